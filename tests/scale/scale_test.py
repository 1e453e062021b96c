#!/usr/bin/env python3
"""Scale-out with the real parts: PostgreSQL, two API replicas, two workers.

Starts a real PostgreSQL server (Debian's binaries, as the `postgres` user
when run as root, on a temporary data directory and a loopback port), then
`convscope serve` twice and `convscope worker` twice, all on that database
and one shared models directory, and checks, over HTTP:

  1. a job submitted to API 1 is run by a worker, and API 2 predicts with
     its model within 2 s of the job's success; deleted through API 2, it is
     gone from API 1; the workers answer /metrics and nothing else;
  2. a name reserved by a job queued through API 1 is refused by API 2 for
     an upload and for a second job (409), and API 2 can cancel that job;
  3. kill -9 of the worker running a 3-epoch job after epoch 1: the other
     worker claims it once the lease expires, resumes after epoch 1 with the
     epoch-1 record unchanged, and finishes; exactly one model registered,
     no work directory or temporary file left behind;
  4. 20 jobs submitted at once across both APIs: each runs exactly once
     (its `attempts`, and the workers' logs counted per job), all succeed,
     all models visible on both APIs;
  5. PostgreSQL restarted while a job trains: the job finishes, run once,
     and both APIs answer again;
  6. a job's Server-Sent Events stream from the replica it was not queued on;
  7. SIGTERM to the worker running a job: it finishes the epoch and gives the
     job back; the other worker resumes after that epoch;
  8. a `--max-jobs 2` worker runs two jobs and exits, leaving the third;
  9. kill -9 of API 1 under 64 clients spread over both: API 2 answers every
     request sent to it, with no 5xx.

Not a timed test; .ci/run runs it after `cargo build --release`:

    python3 tests/scale/scale_test.py target/release/convscope

Needs Python's standard library, the release binary and PostgreSQL.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = os.path.join(REPO, "data", "mnist", "samples")
LEASE = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(method, url, body=None, content_type="application/json", timeout=30):
    data = None
    headers = {}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["content-type"] = content_type
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url):
    status, body = request("GET", url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


class Postgres:
    """A throwaway cluster: initdb, start, restart, stop."""

    def __init__(self, root):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            sys.exit("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = bins[-1]
        self.data = os.path.join(root, "pgdata")
        self.log = os.path.join(root, "postgres.log")
        self.port = free_port()
        os.makedirs(self.data)
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            # initdb refuses root; the data directory belongs to `postgres`.
            shutil.chown(root, "postgres")
            shutil.chown(self.data, "postgres")
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def createdb(self, name):
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def run(self, tool, *args):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def ctl(self, *args):
        opts = f"-p {self.port} -h 127.0.0.1 -k {os.path.dirname(self.data)}"
        self.run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", *args)

    def start(self):
        self.ctl("start")

    def restart(self):
        self.ctl("restart", "-m", "fast")

    def stop(self):
        try:
            self.ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass


class Process:
    """One `convscope serve` or `convscope worker`, logging JSON to a file."""

    def __init__(self, binary, kind, name, root, pg, models, extra=(), jobs_url=None, env=None):
        self.name = name
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(root, f"{name}.log")
        self.args = [
            binary, "--log-format", "json", kind,
            "--addr", f"127.0.0.1:{self.port}",
            "--models", models, "--datasets", os.path.join(REPO, "data"),
            "--jobs", jobs_url or pg.url, "--instance", name,
            "--lease", str(LEASE), "--train-threads", "1", *extra,
        ]
        self.proc = None
        self.spawn()

    def start(self):
        self.spawn()
        self.wait_ready()

    def spawn(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)

    def wait_ready(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited at start; see {self.log_path}:\n" + open(self.log_path).read()[-3000:])
            try:
                if request("GET", self.url + "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"{self.name} did not answer /healthz within 60 s")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def starts(self, job_id):
        """Times this process began training `job_id` (its log's "training" lines)."""
        n = 0
        with open(self.log_path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                fields = entry.get("fields", {})
                if fields.get("message") == "training" and fields.get("job") == job_id:
                    n += 1
        return n


def job(name, epochs=1, train_limit=640, **extra):
    body = {
        "model_name": name, "architecture": "cnn_a", "dataset": "mnist",
        "epochs": epochs, "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001},
        "seed": 13, "train_limit": train_limit, "test_limit": 200, "progress_every": 5,
    }
    body.update(extra)
    return body


def submit(api, body):
    status, out = request("POST", api.url + "/jobs", body)
    assert status == 202, (status, out[:400])
    return json.loads(out)["job_id"]


def wait_job(api, job_id, until, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            j = get_json(f"{api.url}/jobs/{job_id}")
        except (AssertionError, OSError):
            time.sleep(0.2)
            continue
        if until(j):
            return j
        if j["status"] in ("failed", "cancelled") and not until(j):
            raise AssertionError(f"job {job_id} ended {j['status']}: {j.get('error')}")
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: condition not met within {timeout} s: {j}")


def succeeded(j):
    return j["status"] == "succeeded"


def png_digit():
    files = sorted(glob.glob(os.path.join(IMAGE, "*.png")))
    assert files, f"no MNIST sample images under {IMAGE}"
    with open(files[0], "rb") as f:
        return f.read()


def predict(api, model, image):
    return request("POST", f"{api.url}/models/{model}/predict", image, content_type="image/png")


def check(name, fn):
    started = time.time()
    fn()
    print(f"ok   {name} ({time.time() - started:.1f} s)", flush=True)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target", "release", "convscope")
    root = tempfile.mkdtemp(prefix="convscope-scale-")
    os.chmod(root, 0o755)
    pg = Postgres(root)
    pg.start()
    models = os.path.join(root, "models")
    os.makedirs(models)
    for f in glob.glob(os.path.join(REPO, "models", "cnn-a-mnist.*")):
        shutil.copy(f, models)
    procs = []
    try:
        # All four start at once on an empty database: the migration runs
        # once, under its lock, and the shared directory opens for all.
        api1 = Process(binary, "serve", "api-1", root, pg, models, ["--train-workers", "0"])
        api2 = Process(binary, "serve", "api-2", root, pg, models, ["--train-workers", "0"])
        w1 = Process(binary, "worker", "worker-1", root, pg, models)
        w2 = Process(binary, "worker", "worker-2", root, pg, models)
        procs[:] = [api1, api2, w1, w2]
        for p in procs:
            p.wait_ready()
        workers = {"worker-1": w1, "worker-2": w2}
        image = png_digit()

        def visible_on_the_other_replica():
            job_id = submit(api1, job("first"))
            j = wait_job(api1, job_id, succeeded)
            assert j["worker"] is None and j["attempts"] == 1, j
            deadline = j["finished_at"] + 2.0
            while True:
                status, out = predict(api2, "first", image)
                if status == 200:
                    break
                assert time.time() < deadline, f"API 2 did not serve 'first' within 2 s of success: {status} {out[:200]}"
                time.sleep(0.05)
            lag = time.time() - j["finished_at"]
            print(f"     API 2 predicted with it {lag:.2f} s after the job succeeded")
            assert sum(w.starts(job_id) for w in workers.values()) == 1
            # Deleted through API 2: gone from API 1 too.
            assert request("DELETE", api2.url + "/models/first")[0] == 204
            deadline = time.time() + 2
            while predict(api1, "first", image)[0] != 404:
                assert time.time() < deadline, "API 1 still serves a model API 2 deleted"
                time.sleep(0.05)
            # A worker serves its health and metrics, and nothing else.
            for w in workers.values():
                status, text = request("GET", w.url + "/metrics")
                assert status == 200 and b'convscope_jobs{state="succeeded"}' in text, (status, text[:300])
                assert request("GET", w.url + "/models")[0] == 404

        def reservations_hold_across_replicas():
            job_id = submit(api1, job("held", epochs=3, train_limit=6400))
            # An upload of that name through the other replica, and a job.
            with open(os.path.join(REPO, "models", "cnn-a-mnist.json")) as f:
                manifest = json.load(f)
            manifest["name"] = "held"
            with open(os.path.join(REPO, "models", "cnn-a-mnist.safetensors"), "rb") as f:
                weights = f.read()
            boundary = "convscope-scale-boundary"
            body = (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"; filename=\"m.json\"\r\n"
                f"Content-Type: application/json\r\n\r\n{json.dumps(manifest)}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w.safetensors\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode() + weights + f"\r\n--{boundary}--\r\n".encode()
            deadline = time.time() + 2
            while True:
                status, out = request("POST", api2.url + "/models", body,
                                      content_type=f"multipart/form-data; boundary={boundary}")
                if status == 409 or time.time() > deadline:
                    break
                time.sleep(0.05)
            assert status == 409, (status, out[:300])
            status, out = request("POST", api2.url + "/jobs", job("held"))
            assert status == 409, (status, out[:300])
            # Cancelled through the replica it was not submitted to.
            status, out = request("POST", f"{api2.url}/jobs/{job_id}/cancel")
            assert status in (200, 202), (status, out[:300])
            wait_job(api1, job_id, lambda j: j["status"] == "cancelled")
            # Free again on the other replica once the job has ended.
            deadline = time.time() + 3
            while True:
                status, out = request("POST", api2.url + "/jobs", job("held"))
                if status == 202 or time.time() > deadline:
                    break
                time.sleep(0.05)
            assert status == 202, (status, out[:300])
            again = json.loads(out)["job_id"]
            request("POST", f"{api1.url}/jobs/{again}/cancel")
            wait_job(api2, again, lambda j: j["status"] in ("cancelled", "succeeded"))

        def a_killed_worker_s_job_resumes_elsewhere():
            # Without epoch snapshots: the one model is the whole result.
            job_id = submit(api1, job("resumed", epochs=3, train_limit=9600, epoch_snapshots=False))
            j = wait_job(api1, job_id, lambda j: j["status"] == "running" and len(j["history"]) >= 1)
            first_epoch = j["history"][0]
            victim = j["worker"]
            assert victim in workers, j
            killed_at = time.time()
            workers[victim].kill9()
            survivor = next(n for n in workers if n != victim)
            j = wait_job(api2, job_id, lambda j: j["worker"] == survivor or j["status"] == "succeeded")
            claimed_after = time.time() - killed_at
            j = wait_job(api2, job_id, succeeded)
            assert j["attempts"] == 2, j
            assert j["history"][0] == first_epoch, (j["history"][0], first_epoch)
            assert [h["epoch"] for h in j["history"]] == [1, 2, 3], j["history"]
            print(f"     {survivor} took it over {claimed_after:.1f} s after the kill (lease {LEASE} s)")
            assert workers[survivor].starts(job_id) == 1
            names = [m["name"] for m in get_json(api2.url + "/models")["models"]]
            assert names.count("resumed") == 1 and not [n for n in names if n.startswith("resumed@")], names
            leftovers = [f for f in os.listdir(models) if f.startswith(".upload-") or f.startswith(".commit-")]
            assert not leftovers, leftovers
            assert not os.path.exists(os.path.join(models, ".jobs", job_id)), "the work directory was left behind"
            workers[victim].start()

        def twenty_jobs_run_once_each():
            ids = {}
            lock = threading.Lock()

            def send(i):
                api = (api1, api2)[i % 2]
                job_id = submit(api, job(f"many-{i:02}", train_limit=320))
                with lock:
                    ids[job_id] = f"many-{i:02}"

            threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(ids) == 20
            for job_id in ids:
                j = wait_job(api1, job_id, succeeded, timeout=600)
                assert j["attempts"] == 1, j
                starts = sum(w.starts(job_id) for w in workers.values())
                assert starts == 1, (job_id, starts)
            ran_by = {w: sum(1 for i in ids if workers[w].starts(i)) for w in workers}
            print(f"     runs per worker: {ran_by}")
            deadline = time.time() + 3
            for api in (api1, api2):
                while True:
                    names = {m["name"] for m in get_json(api.url + "/models")["models"]}
                    missing = set(ids.values()) - names
                    if not missing:
                        break
                    assert time.time() < deadline, f"{api.name} lacks {sorted(missing)}"
                    time.sleep(0.1)

        def postgres_restart_loses_nothing():
            job_id = submit(api1, job("through-restart", epochs=2, train_limit=6400))
            wait_job(api1, job_id, lambda j: j["status"] == "running" and j["progress"] is not None)
            running_on = get_json(f"{api1.url}/jobs/{job_id}")["worker"]
            pg.restart()
            j = wait_job(api2, job_id, succeeded)
            with open(workers[running_on].log_path) as f:
                assert "job store connection ended" in f.read(), "the restart did not reach the worker"
            assert j["attempts"] == 1, j
            assert sum(w.starts(job_id) for w in workers.values()) == 1
            for api in (api1, api2):
                get_json(api.url + "/jobs")

        def events_stream_on_every_replica():
            job_id = submit(api1, job("streamed", epochs=2, train_limit=1280))
            kinds = []
            req = urllib.request.Request(f"{api2.url}/jobs/{job_id}/events")
            with urllib.request.urlopen(req, timeout=120) as r:
                event = None
                for raw in r:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and event:
                        data = json.loads(line.split(":", 1)[1])
                        kinds.append((event, data["status"]))
            assert kinds[0][0] == "state", kinds
            assert ("epoch", "running") in kinds, kinds
            assert any(k == "progress" for k, _ in kinds), kinds
            assert kinds[-1] == ("state", "succeeded"), kinds
            print(f"     API 2 streamed {len(kinds)} events of a job API 1 queued and a worker ran")

        def sigterm_finishes_the_epoch_and_gives_the_job_back():
            job_id = submit(api1, job("handed-over", epochs=3, train_limit=6400, epoch_snapshots=False))
            j = wait_job(api1, job_id, lambda j: j["status"] == "running" and j["progress"] is not None)
            assert not j["history"], j
            leaving = workers[j["worker"]]
            other = next(w for n, w in workers.items() if n != j["worker"])
            leaving.proc.terminate()
            leaving.proc.wait(timeout=120)
            j = get_json(f"{api1.url}/jobs/{job_id}")
            # It stopped after finishing epoch 1, and was queued again at once.
            assert len(j["history"]) == 1, j["history"]
            j = wait_job(api2, job_id, succeeded)
            assert j["attempts"] == 2 and [h["epoch"] for h in j["history"]] == [1, 2, 3], j
            assert other.starts(job_id) == 1 and leaving.starts(job_id) == 1
            leaving.start()

        def a_one_shot_worker_stops_after_its_jobs():
            for w in workers.values():
                w.stop()
            one_shot = Process(binary, "worker", "one-shot", root, pg, models, ["--max-jobs", "2"])
            procs.append(one_shot)
            one_shot.wait_ready()
            ids = [submit(api1, job(f"once-{i}", train_limit=320)) for i in range(3)]
            one_shot.proc.wait(timeout=120)
            states = [get_json(f"{api1.url}/jobs/{i}")["status"] for i in ids]
            assert states == ["succeeded", "succeeded", "queued"], states
            for w in workers.values():
                w.start()
            wait_job(api1, ids[2], succeeded)

        def a_killed_replica_leaves_the_other_answering():
            stop = threading.Event()
            results = {"api-1": [], "api-2": []}
            lock = threading.Lock()

            def client(i):
                api = (api1, api2)[i % 2]
                while not stop.is_set():
                    try:
                        status, _ = predict(api, "cnn-a-mnist", image)
                    except OSError as e:
                        status = type(e).__name__
                    with lock:
                        results[api.name].append(status)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
            for t in threads:
                t.start()
            time.sleep(2)
            api1.kill9()
            before = len(results["api-2"])
            time.sleep(3)
            stop.set()
            for t in threads:
                t.join()
            after = results["api-2"]
            bad = [s for s in after if s != 200]
            assert not bad, f"API 2 answered {len(bad)} of {len(after)} requests badly: {bad[:10]}"
            assert len(after) > before, "API 2 stopped answering after API 1 died"
            print(f"     API 2 answered {len(after)} requests, {len(after) - before} after the kill, all 200")
            api1.start()

        check("a job run by a worker is served by the other API replica", visible_on_the_other_replica)
        check("a name held by a job is held on every replica; cancel from any", reservations_hold_across_replicas)
        check("kill -9 of the worker after epoch 1: resumed by the other", a_killed_worker_s_job_resumes_elsewhere)
        check("20 jobs at once across 2 workers run once each", twenty_jobs_run_once_each)
        check("PostgreSQL restarted mid-job: nothing lost or run twice", postgres_restart_loses_nothing)
        check("a job's events stream from the replica it was not queued on", events_stream_on_every_replica)
        check("SIGTERM to a worker: it finishes the epoch, another resumes", sigterm_finishes_the_epoch_and_gives_the_job_back)
        check("--max-jobs 2: the worker runs two jobs and exits", a_one_shot_worker_stops_after_its_jobs)
        check("kill -9 of one API under 64 clients: the other keeps answering", a_killed_replica_leaves_the_other_answering)
        print("scale-out: all checks passed")
    except BaseException:
        for p in procs:
            print(f"--- last lines of {p.log_path}", file=sys.stderr)
            with open(p.log_path) as f:
                print("".join(f.readlines()[-15:]), file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
