#!/usr/bin/env python3
"""Kill the server with SIGKILL at random moments while it registers models.

Twenty times: start `convscope serve` on an empty models directory that
keeps what earlier rounds left, POST a 50 MB checkpoint as a new model, and
SIGKILL the server at a random moment of the upload, load, write or commit.
After every kill the server is started again and must:
  - start (a model that cannot load is named in `load_errors`, never fatal);
  - serve only whole models: every model it lists answers `/predict` with
    exactly the logits of the checkpoint that was uploaded (a model with a
    manifest beside weights it was not written with would differ or fail);
  - list or name every manifest on disk;
  - leave no temporary or journal files behind.

Not a timed test (the kill moments are random); run it by hand or from
.ci/run after `cargo build --release`:

    python3 tools/crash/register_kill.py [--rounds 20] [--seed 1]

Needs only Python's standard library and the release binary.
"""

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(REPO, "target", "release", "convscope")
IMAGE = os.path.join(REPO, "data", "cifar10", "samples", "test0000_cat.png")


def checkpoint(seed):
    """A 3x32x32 -> 4096 -> 10 MLP: 12.6 M float32 parameters, 50 MB."""
    rng = random.Random(seed)
    shapes = [
        ("fc1.weight", [4096, 3072]),
        ("fc1.bias", [4096]),
        ("fc2.weight", [10, 4096]),
        ("fc2.bias", [10]),
    ]
    header, blobs, offset = {}, [], 0
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        # A repeating pattern (fast to make) scaled to keep logits moderate.
        base = [rng.uniform(-1, 1) * 0.02 for _ in range(4096)]
        pattern = struct.pack("<4096f", *base)
        data = (pattern * (n // 4096 + 1))[: 4 * n]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def manifest(name):
    return json.dumps({
        "name": name,
        "architecture": "sequential",
        "layers": [
            {"name": "flatten", "type": "flatten"},
            {"name": "fc1", "type": "linear", "in_features": 3072, "out_features": 4096},
            {"name": "relu1", "type": "relu"},
            {"name": "fc2", "type": "linear", "in_features": 4096, "out_features": 10},
        ],
        "input": {"channels": 3, "height": 32, "width": 32},
    }).encode()


def multipart(fields):
    boundary = "convscope-crash-%016x" % random.getrandbits(64)
    parts = []
    for name, filename, data in fields:
        parts.append(
            ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n" % (boundary, name, filename)).encode())
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(("--%s--\r\n" % boundary).encode())
    return b"".join(parts), "multipart/form-data; boundary=" + boundary


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, models, port, log):
        self.url = "http://127.0.0.1:%d" % port
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--models", models, "--addr", "127.0.0.1:%d" % port,
             "--train-workers", "0", "--max-model-bytes", str(128 << 20)],
            stdout=log, stderr=log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the server exited at start-up (code %s); see the log" % self.proc.returncode)
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.05)
        raise SystemExit("the server did not start within 60 s")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path, body, content_type):
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def logits(server, name, image):
    body, ct = multipart([("image", "cat.png", image)])
    status, answer = server.post("/models/%s/predict?top_k=10" % name, body, ct)
    if status != 200:
        return None
    top = answer["predictions"][0]["top_k"]
    return [t["logit"] for t in sorted(top, key=lambda t: t["class_index"])]


def check(server, models, image, reference):
    """Every listed model whole, every manifest accounted for, no debris."""
    listing = server.get("/models")
    served = {m["name"] for m in listing["models"]}
    failed = {e["file"] for e in listing["load_errors"]}
    for name in sorted(served):
        got = logits(server, name, image)
        if got != reference:
            raise SystemExit("model %s serves logits %s, not the uploaded checkpoint's %s" % (name, got, reference))
    files = os.listdir(models)
    for f in files:
        if f.endswith(".json") and not f.startswith("."):
            stem = f[: -len(".json")]
            if stem not in served and f not in failed:
                raise SystemExit("%s is on disk but neither served nor named in load_errors" % f)
        if f.startswith(".upload-") or f.startswith(".commit-"):
            raise SystemExit("left behind after a restart: %s" % f)
    return served, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        raise SystemExit("build first: cargo build --release")
    rng = random.Random(args.seed)
    weights = checkpoint(args.seed)
    image = open(IMAGE, "rb").read()
    print("checkpoint: %.1f MB" % (len(weights) / 1e6))
    with tempfile.TemporaryDirectory() as models, open(os.path.join(tempfile.gettempdir(), "register_kill.log"), "wb") as log:
        # The reference logits and the time one registration takes.
        server = Server(models, free_port(), log)
        started = time.time()
        body, ct = multipart([("manifest", "m.json", manifest("reference")), ("weights", "w.safetensors", weights)])
        status, answer = server.post("/models", body, ct)
        if status != 201:
            raise SystemExit("the reference upload failed: %s %s" % (status, answer))
        took = time.time() - started
        reference = logits(server, "reference", image)
        print("one registration: %.2f s; reference logits %s" % (took, reference[:3]))
        outcomes = {"answered 201 before the kill": 0, "killed before commit": 0, "killed after commit (replayed)": 0}
        for i in range(args.rounds):
            name = "m%02d" % i
            body, ct = multipart([("manifest", "m.json", manifest(name)), ("weights", "w.safetensors", weights)])
            result = {}

            def upload():
                try:
                    result["status"] = server.post("/models", body, ct)[0]
                except Exception as e:  # the connection dies with the server
                    result["error"] = type(e).__name__

            t = threading.Thread(target=upload)
            t.start()
            time.sleep(rng.uniform(0, took * 1.2))
            server.kill()
            t.join()
            server = Server(models, free_port(), log)
            served, failed = check(server, models, image, reference)
            if result.get("status") == 201:
                outcomes["answered 201 before the kill"] += 1
                if name not in served:
                    raise SystemExit("%s was answered 201 but is gone after the restart" % name)
            elif name in served:
                outcomes["killed after commit (replayed)"] += 1
            else:
                outcomes["killed before commit"] += 1
            print("round %2d: %-8s -> %d models served, %d load errors" % (
                i + 1, result.get("status", result.get("error")), len(served), len(failed)))
        server.stop()
        print("outcomes: %s" % json.dumps(outcomes))
        print("register_kill: %d rounds, every restart served only whole models" % args.rounds)


if __name__ == "__main__":
    sys.exit(main())
