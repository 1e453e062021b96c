"""Starts the release binary on a free loopback port with a copy of the
bundled models, for the interop tests that drive it with other projects'
clients (tritonclient, prometheus_client)."""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Server:
    """`with Server(binary, *flags) as s:` — `s.url` is `127.0.0.1:PORT`;
    the log is printed if the block fails."""

    def __init__(self, binary, *flags):
        self.binary, self.flags = Path(binary), flags

    def __enter__(self):
        self.work = Path(tempfile.mkdtemp(prefix="convscope-interop-"))
        shutil.copytree(ROOT / "models", self.work / "models")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.log = self.work / "server.log"
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--models", str(self.work / "models"),
             "--addr", f"127.0.0.1:{port}", *self.flags],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://{self.url}/readyz", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"the server exited: {self.log.read_text()}")
                time.sleep(0.1)
        sys.exit("the server did not become ready")

    def __exit__(self, kind, value, tb):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if kind is not None or getattr(self, "failed", False):
            print(self.log.read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)
        return False
