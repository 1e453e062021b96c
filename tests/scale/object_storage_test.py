#!/usr/bin/env python3
"""Models on a real S3 API (moto's server) catalogued in a real PostgreSQL.

Starts PostgreSQL (as tests/scale/scale_test.py does), `moto_server` on a
loopback port, and two `convscope serve` replicas and two `convscope
worker`s with `--models s3://convscope/models`, each with a local cache
directory of its own (nothing is shared on disk), and checks over HTTP:

  1. the catalogue is seeded once with the bundled model although all four
     start at once: one row, one object;
  2. a job queued on API 1 is run by a worker, and API 2 predicts with its
     model within 2 s of its success;
  3. kill -9 of the worker running a 3-epoch job after epoch 1: the other
     worker, which never saw its files, fetches the epoch-1 resume state from
     the bucket, resumes after epoch 1 (its record unchanged) and finishes;
     one model registered; the bucket holds exactly the catalogue's objects
     (no resume state, no orphan);
  4. S3 unreachable (moto stopped with SIGSTOP for 10 s): a registration
     answers 503 with Retry-After and nothing is half-written (no row on any
     replica, no new object); afterwards the same registration succeeds and
     is served by the other replica;
  5. a model deleted through one replica is gone from the other and its
     object from the bucket;
  6. a replica whose cache holds one model serves three in turn (loaded on
     first use, least recently used dropped), as the other replica does;
  7. 20 jobs at once run once each; a name a job holds is refused by the
     other replica; PostgreSQL restarted mid-job loses and repeats nothing.

    python3 tests/scale/object_storage_test.py target/release/convscope MOTO_SERVER

Needs Python's standard library, the release binary, PostgreSQL and moto's
server (`pip install 'moto[server]'`; its path is the second argument).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_test import (  # noqa: E402
    REPO, Postgres, Process, check, free_port, get_json, job, png_digit,
    predict, request, submit, succeeded, wait_job,
)

BUCKET = "convscope"


class Moto:
    """moto's S3 server on loopback; SIGSTOP makes it unreachable."""

    def __init__(self, server, root):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(root, "moto.log"), "w")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "moto_server did not start"
                time.sleep(0.2)
        # moto checks no signatures: a plain PUT makes the bucket.
        req = urllib.request.Request(f"{self.url}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=5)

    def keys(self, prefix=""):
        out = urllib.request.urlopen(f"{self.url}/{BUCKET}?list-type=2&prefix={prefix}", timeout=5).read()
        ns = re.match(r"\{.*\}", ET.fromstring(out).tag)
        ns = ns.group(0) if ns else ""
        return sorted(e.text for e in ET.fromstring(out).iter(f"{ns}Key"))

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(timeout=10)


def multipart(manifest, weights):
    boundary = "convscope-s3-boundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"; filename=\"m.json\"\r\n"
        f"Content-Type: application/json\r\n\r\n{json.dumps(manifest)}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w.safetensors\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + weights + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def register(api, name):
    with open(os.path.join(REPO, "models", "cnn-a-mnist.json")) as f:
        manifest = json.load(f)
    manifest["name"] = name
    with open(os.path.join(REPO, "models", "cnn-a-mnist.safetensors"), "rb") as f:
        weights = f.read()
    body, content_type = multipart(manifest, weights)
    url = api.url + "/models"
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def names(api):
    return {m["name"] for m in get_json(api.url + "/models")["models"]}


def main():
    binary = sys.argv[1]
    moto_server = sys.argv[2]
    root = tempfile.mkdtemp(prefix="convscope-s3-")
    os.chmod(root, 0o755)
    pg = Postgres(root)
    pg.start()
    moto = Moto(moto_server, root)
    seed = os.path.join(root, "seed")
    os.makedirs(seed)
    for f in ("cnn-a-mnist.json", "cnn-a-mnist.safetensors"):
        shutil.copy(os.path.join(REPO, "models", f), seed)
    env = {
        "AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
    }
    url = f"s3://{BUCKET}/models"
    procs = []
    try:
        def start(kind, name, extra=()):
            cache = os.path.join(root, f"cache-{name}")
            return Process(binary, kind, name, root, pg, url,
                           ["--models-cache", cache, "--seed-models", seed, "--storage-timeout", "2", *extra],
                           env=env)

        api1 = start("serve", "api-1", ["--train-workers", "0"])
        # API 2 keeps one CNN_A's weights (0.93 MB) at a time.
        api2 = start("serve", "api-2", ["--train-workers", "0", "--models-cache-bytes", "1500000"])
        w1 = start("worker", "worker-1")
        w2 = start("worker", "worker-2")
        procs[:] = [api1, api2, w1, w2]
        for p in procs:
            p.wait_ready()
        workers = {"worker-1": w1, "worker-2": w2}
        image = png_digit()

        def seeded_once():
            for api in (api1, api2):
                assert names(api) == {"cnn-a-mnist"}, names(api)
            keys = moto.keys()
            assert len(keys) == 1 and keys[0].startswith("models/models/"), keys
            assert predict(api2, "cnn-a-mnist", image)[0] == 200

        def trained_and_served_elsewhere():
            job_id = submit(api1, job("s3-first", epoch_snapshots=False))
            j = wait_job(api1, job_id, succeeded)
            deadline = j["finished_at"] + 2.0
            while predict(api2, "s3-first", image)[0] != 200:
                assert time.time() < deadline, "API 2 did not serve 's3-first' within 2 s of success"
                time.sleep(0.05)
            print(f"     API 2 predicted with it {time.time() - j['finished_at']:.2f} s after the job succeeded")

        def resumed_from_the_bucket():
            job_id = submit(api1, job("s3-resumed", epochs=3, train_limit=9600, epoch_snapshots=False))
            j = wait_job(api1, job_id, lambda j: j["status"] == "running" and len(j["history"]) >= 1)
            first_epoch = j["history"][0]
            victim = j["worker"]
            # The epoch's state is in the bucket before the epoch counts.
            assert any(k.startswith(f"models/jobs/{job_id}/epoch-1/") for k in moto.keys()), moto.keys()
            workers[victim].kill9()
            survivor = next(n for n in workers if n != victim)
            j = wait_job(api2, job_id, succeeded)
            assert j["attempts"] == 2, j
            assert j["history"][0] == first_epoch, (j["history"][0], first_epoch)
            assert [h["epoch"] for h in j["history"]] == [1, 2, 3], j["history"]
            # The survivor never had the victim's files: it resumed from S3.
            assert not os.path.exists(os.path.join(root, f"cache-{survivor}", ".jobs", job_id)), "work dir left"
            assert workers[survivor].starts(job_id) == 1
            listed = sorted(names(api2))
            assert listed.count("s3-resumed") == 1, listed
            # The resume state goes just after the job's row says succeeded.
            deadline = time.time() + 3
            while [k for k in moto.keys() if "/jobs/" in k] and time.time() < deadline:
                time.sleep(0.1)
            keys = moto.keys()
            assert not [k for k in keys if "/jobs/" in k], f"resume state left in the bucket: {keys}"
            # One object per distinct weights: the seed, s3-first, s3-resumed.
            assert len(keys) == 3 and all(k.startswith("models/models/") for k in keys), keys
            workers[victim].start()

        def loaded_on_first_use_within_the_bound():
            # Listed without being loaded; each loads on its first use, and
            # the least recently used goes (from memory and the cache).
            listed = names(api2)
            assert {"cnn-a-mnist", "s3-first", "s3-resumed"} <= listed, listed
            cache = os.path.join(root, "cache-api-2")
            for _ in range(2):
                for name in ("cnn-a-mnist", "s3-first", "s3-resumed"):
                    status, body = predict(api2, name, image)
                    assert status == 200, (name, status, body[:200])
                    other = predict(api1, name, image)
                    assert json.loads(body)["predictions"] == json.loads(other[1])["predictions"], name
                    cached = [f for f in os.listdir(cache) if f.endswith(".json") and not f.startswith(".")]
                    assert len(cached) <= 1, f"over the cache bound: {cached}"
            print(f"     API 2 served 3 models, 2 rounds, with at most 1 cached (bound 1.5 MB)")

        def twenty_jobs_once_each():
            import threading
            ids, lock = {}, threading.Lock()

            def send(i):
                api = (api1, api2)[i % 2]
                job_id = submit(api, job(f"s3-many-{i:02}", train_limit=320, epoch_snapshots=False))
                with lock:
                    ids[job_id] = f"s3-many-{i:02}"

            threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for job_id in ids:
                j = wait_job(api1, job_id, succeeded, timeout=600)
                assert j["attempts"] == 1, j
                assert sum(w.starts(job_id) for w in workers.values()) == 1, job_id
            deadline = time.time() + 3
            for api in (api1, api2):
                while not set(ids.values()) <= names(api):
                    assert time.time() < deadline, f"{api.name} lacks some of the 20 models"
                    time.sleep(0.1)
            # A name a job queued on API 1 holds is refused by API 2 (the
            # catalogue's transaction checks the jobs table), then freed.
            held = submit(api1, job("s3-held", epochs=3, train_limit=6400))
            status, _, body = register(api2, "s3-held")
            assert status == 409, (status, body[:300])
            request("POST", f"{api2.url}/jobs/{held}/cancel")
            wait_job(api1, held, lambda j: j["status"] == "cancelled")
            for job_id, name in ids.items():
                assert request("DELETE", f"{api2.url}/models/{name}")[0] == 204, name

        def postgres_restart_mid_job():
            job_id = submit(api1, job("s3-restart", epochs=2, train_limit=6400, epoch_snapshots=False))
            wait_job(api1, job_id, lambda j: j["status"] == "running" and j["progress"] is not None)
            pg.restart()
            j = wait_job(api2, job_id, succeeded)
            assert j["attempts"] == 1 and sum(w.starts(job_id) for w in workers.values()) == 1, j
            deadline = time.time() + 3
            while predict(api2, "s3-restart", image)[0] != 200:
                assert time.time() < deadline, "API 2 does not serve the model trained across the restart"
                time.sleep(0.1)
            assert request("DELETE", api1.url + "/models/s3-restart")[0] == 204

        def storage_outage_refused_whole():
            before = moto.keys()
            moto.pause()
            started = time.time()
            try:
                status, headers, body = register(api2, "during-outage")
            finally:
                paused_for = time.time() - started
                time.sleep(max(0.0, 10 - paused_for))
                moto.resume()
            assert status == 503, (status, body[:300])
            assert "retry-after" in {k.lower() for k in headers}, headers
            print(f"     503 after {paused_for:.1f} s: {json.loads(body)['detail'][:200]}")
            for api in (api1, api2):
                assert "during-outage" not in names(api)
            assert moto.keys() == before, (before, moto.keys())
            status, _, body = register(api2, "during-outage")
            assert status == 201, (status, body[:300])
            deadline = time.time() + 2
            while predict(api1, "during-outage", image)[0] != 200:
                assert time.time() < deadline, "API 1 does not serve the model registered on API 2"
                time.sleep(0.05)

        def deleted_everywhere():
            # Same weights as the seed: its object stays for the seed's row.
            status, _ = request("DELETE", api1.url + "/models/during-outage")
            assert status == 204, status
            deadline = time.time() + 2
            while predict(api2, "during-outage", image)[0] != 404:
                assert time.time() < deadline, "API 2 still serves a deleted model"
                time.sleep(0.05)
            status, _ = request("DELETE", api2.url + "/models/s3-first")
            assert status == 204
            keys = moto.keys()
            assert len(keys) == 2, keys  # the seed's and s3-resumed's weights

        check("S3: the catalogue is seeded once by four processes starting together", seeded_once)
        check("S3: a job run by a worker is served by the other replica", trained_and_served_elsewhere)
        check("S3: kill -9 after epoch 1: the other worker resumes from the bucket", resumed_from_the_bucket)
        check("S3: models load on first use; the LRU keeps the cache in its bound", loaded_on_first_use_within_the_bound)
        check("S3: 20 jobs at once run once each; a held name is refused across replicas", twenty_jobs_once_each)
        check("S3: PostgreSQL restarted mid-job: run once, served", postgres_restart_mid_job)
        check("S3: unreachable for 10 s: 503 with Retry-After, nothing half-written", storage_outage_refused_whole)
        check("S3: a deletion reaches the other replica and the bucket", deleted_everywhere)
        print("object storage: all checks passed")
    except BaseException:
        for p in procs:
            print(f"--- last lines of {p.log_path}", file=sys.stderr)
            with open(p.log_path) as f:
                print("".join(f.readlines()[-12:]), file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.stop()
        moto.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
