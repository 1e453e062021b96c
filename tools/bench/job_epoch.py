"""The acceptance run of the training issue through the HTTP API: one epoch
of CNN_A on the full MNIST training set (batch 64, Adam 1e-3, seed 13) as a
`POST /jobs`, followed until it ends; prints the job's history.

    target/release/convscope serve --models /tmp/m --train-threads 2 &
    python3 tools/bench/job_epoch.py --url http://127.0.0.1:8080
"""

import argparse
import json
import time
import urllib.request


def call(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--name", default="cnn-a-job-epoch")
    args = ap.parse_args()
    job = {"model_name": args.name, "architecture": "cnn_a", "dataset": "mnist", "epochs": 1,
           "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001}, "seed": 13}
    t0 = time.time()
    queued = call(f"{args.url}/jobs", job)
    job_id = queued["job_id"]
    while True:
        state = call(f"{args.url}/jobs/{job_id}")
        if state["status"] not in ("queued", "running"):
            break
        time.sleep(1)
    print(json.dumps({"job_id": job_id, "status": state["status"], "history": state["history"],
                      "wall_seconds": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
