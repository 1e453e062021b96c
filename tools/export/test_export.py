"""Tests of the exporter, with real torch and a real convscope server.

    python tools/export/test_export.py [path/to/convscope]

Run by .ci/run (which installs torch and torchvision from PyPI); `cargo
test` does not need them. The server binary defaults to
target/release/convscope. Each test exports with the command line a student
would type, then registers the result over HTTP and compares logits with
PyTorch's.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXPORTER = HERE / "convscope_export.py"
BINARY = Path(os.environ.get("CONVSCOPE_BIN", ROOT / "target" / "release" / "convscope"))
IMAGE = ROOT / "tests" / "fixtures" / "torchvision" / "grace_hopper_224.png"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

sys.path.insert(0, str(HERE))
import convscope_export as cx  # noqa: E402

STUDENT = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Conv2d(8, 4, 3, padding=1)
        self.se = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = torch.cat([self.b1(x), self.b3(x)], 1)
        x = x * torch.sigmoid(self.se(x.mean((2, 3)))).view(x.size(0), -1, 1, 1)
        x = F.relu(x + self.body(x))
        x = self.pool(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Fft(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.fft.fft2(self.conv(x)).real.flatten(1)
'''


def export(*args):
    return subprocess.run([sys.executable, str(EXPORTER), *map(str, args)], capture_output=True, text=True)


def multipart(fields):
    boundary = uuid.uuid4().hex
    body = b""
    for name, (filename, data) in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([str(BINARY), "serve", "--models", self.dir.name, "--addr",
                                      f"127.0.0.1:{self.port}", "--datasets", self.dir.name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("convscope did not start")

    def request(self, method, path, data=None, ctype=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path):
        return self.request("GET", path)

    def register(self, manifest, weights, weights_name="w.safetensors"):
        body, ctype = multipart({"manifest": ("m.json", json.dumps(manifest).encode()),
                                 "weights": (weights_name, Path(weights).read_bytes())})
        status, out = self.request("POST", "/models", body, ctype)
        return status, json.loads(out or b"null")

    def logits(self, model, image, classes):
        status, out = self.request("POST", f"/models/{model}/predict?top_k={classes}", Path(image).read_bytes(),
                                   "image/png")
        assert status == 200, out
        top = json.loads(out)["predictions"][0]["top_k"]
        values = [0.0] * classes
        for c in top:
            values[c["class_index"]] = c["logit"]
        return torch.tensor(values)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.dir.cleanup()


def pytorch_logits(model, size=224):
    from PIL import Image

    t = torchvision.transforms.Compose([torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size),
                                        torchvision.transforms.ToTensor(),
                                        torchvision.transforms.Normalize(MEAN, STD)])
    with torch.no_grad():
        return model.eval()(t(Image.open(IMAGE).convert("RGB")).unsqueeze(0))[0]


def close_rel(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


class ExporterTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.out = Path(cls.tmp.name)
        (cls.out / "student.py").write_text(STUDENT)
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.tmp.cleanup()

    def test_a_student_file_exports_registers_and_matches_pytorch(self):
        torch.manual_seed(1)
        sys.path.insert(0, str(self.out))
        import student

        net = student.Net()
        with torch.no_grad():
            net.body[1].running_mean.uniform_(-0.3, 0.3)
            net.body[1].running_var.uniform_(0.5, 2.0)
        torch.save({"epoch": 9, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
                   self.out / "student.pth")
        r = export(f"{self.out / 'student.py'}:Net", "--input", "3,224,224", "--name", "student", "--out", self.out,
                   "--weights", self.out / "student.pth", "--classes", "a,b,c,d,e", "--mean", "0.485,0.456,0.406",
                   "--std", "0.229,0.224,0.225")
        self.assertEqual(r.returncode, 0, r.stderr)
        manifest = json.loads((self.out / "student.json").read_text())
        names = {n["name"] for n in manifest["nodes"]}
        self.assertTrue({"conv1", "cat", "mul", "body.1", "add", "pool", "fc"} <= names, names)
        status, body = self.server.register(manifest, self.out / "student.safetensors")
        self.assertEqual(status, 201, body)
        got = self.server.logits("student", IMAGE, 5)
        self.assertTrue(close_rel(got, pytorch_logits(net)), (got, pytorch_logits(net)))

    def test_an_operation_the_format_lacks_fails_naming_the_node(self):
        r = export(f"{self.out / 'student.py'}:Fft", "--input", "3,16,16", "--name", "fft", "--out", self.out)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("node 'fft_fft2'", r.stderr)
        self.assertIn("fft", r.stderr)
        self.assertIn("no convscope equivalent", r.stderr)
        self.assertFalse((self.out / "fft.json").exists())

    def test_torchvision_resnet18_as_pth_gives_the_logits_of_its_safetensors_and_of_pytorch(self):
        torch.manual_seed(2)
        model = torchvision.models.resnet18(weights=None).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        torch.save(model.state_dict(), self.out / "resnet18.pth")
        want = pytorch_logits(model)
        # The exporter's graph, with the .pth as its weights...
        r = export("torchvision:resnet18", "--input", "3,224,224", "--name", "r18-graph", "--out", self.out,
                   "--weights", self.out / "resnet18.pth", "--mean", "0.485,0.456,0.406",
                   "--std", "0.229,0.224,0.225")
        self.assertEqual(r.returncode, 0, r.stderr)
        graph = json.loads((self.out / "r18-graph.json").read_text())
        self.assertEqual(self.server.register(graph, self.out / "r18-graph.safetensors")[0], 201)
        # ...and the built-in architecture given the .pth and the safetensors.
        builtin = {"name": "r18-pth", "architecture": "torchvision.resnet18",
                   "input": {"channels": 3, "height": 224, "width": 224, "mean": MEAN, "std": STD}}
        status, body = self.server.register(builtin, self.out / "resnet18.pth", "resnet18.pth")
        self.assertEqual(status, 201, body)
        builtin["name"] = "r18-st"
        self.assertEqual(self.server.register(builtin, self.out / "r18-graph.safetensors")[0], 201)
        pth = self.server.logits("r18-pth", IMAGE, 1000)
        st = self.server.logits("r18-st", IMAGE, 1000)
        g = self.server.logits("r18-graph", IMAGE, 1000)
        self.assertTrue(torch.equal(pth, st), "the .pth and its safetensors give the same logits")
        for name, got in [("builtin", st), ("graph", g)]:
            self.assertTrue(close_rel(got, want), (name, float((got - want).abs().max())))
        self.assertEqual(got.topk(5).indices.tolist(), want.topk(5).indices.tolist())

    def test_every_torchvision_classifier_family_exports(self):
        for name, size in [("densenet121", 224), ("googlenet", 224), ("inception_v3", 299), ("mobilenet_v3_large", 224),
                           ("efficientnet_b0", 224), ("shufflenet_v2_x1_0", 224), ("squeezenet1_0", 224),
                           ("mnasnet1_0", 224), ("regnet_x_400mf", 224), ("convnext_tiny", 224)]:
            with self.subTest(name):
                r = export(f"torchvision:{name}", "--input", f"3,{size},{size}", "--name", name, "--out", self.out)
                self.assertEqual(r.returncode, 0, r.stderr)
                status, body = self.server.register(json.loads((self.out / f"{name}.json").read_text()),
                                                    self.out / f"{name}.safetensors")
                self.assertEqual(status, 201, body)

    def test_the_server_serves_this_very_file(self):
        status, body = self.server.get("/export.py")
        self.assertEqual(status, 200)
        self.assertEqual(body, EXPORTER.read_bytes())

    def test_the_check_input_matches_the_rust_generator(self):
        # convscope's rng::hash_uniform of "convscope.check", first values.
        u = cx.splitmix_uniform(cx.CHECK_SEED_NAME, 3)
        self.assertTrue(all(0.0 <= v < 1.0 for v in u))
        self.assertEqual(cx.fnv1a64("a"), 0xAF63DC4C8601EC8C)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        BINARY = Path(sys.argv.pop(1))
    torch.set_num_threads(2)
    unittest.main(verbosity=2)
