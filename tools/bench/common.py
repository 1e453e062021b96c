"""Timing and HTTP helpers shared by the benchmark scripts (standard library only)."""

import statistics
import time
import urllib.request
import uuid


def timed(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def alternated(theirs, ours, runs, warmup=1):
    """`timed` of two functions run in turn (one of each per round), so that
    a VM whose speed drifts within the minute slows both sides alike."""
    for _ in range(warmup):
        theirs()
        ours()
    times = ([], [])
    for _ in range(runs):
        for fn, out in zip((theirs, ours), times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    stats = []
    for t in times:
        t.sort()
        stats.append((statistics.median(t), t[int(0.9 * (len(t) - 1))]))
    return stats


def post_image(url, path):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req) as r:
        return r.read()


def get(url):
    with urllib.request.urlopen(url) as r:
        return r.read()
