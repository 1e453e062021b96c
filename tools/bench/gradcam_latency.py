"""Grad-CAM latency: convscope (over HTTP) beside pytorch-grad-cam (in-process)
on torchvision ResNet-18 at 224x224, the same hash-derived weights
(tools/golden/torchvision_hash.py), the same image, 2 threads each.

Builds nothing: run `cargo build --release` first. The script writes the
model into a temporary directory and starts `target/release/convscope` on it.

    .venv/bin/python tools/bench/gradcam_latency.py
"""

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "golden"))
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from torchvision_hash import hash_state  # noqa: E402
from common import post_image, timed  # noqa: E402

IMAGE = ROOT / "tests" / "fixtures" / "torchvision" / "grace_hopper_224.png"


def main():
    torch.set_num_threads(2)
    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    x = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(IMAGE).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        cls = int(net(x).argmax())
    cam = GradCAM(model=net, target_layers=[net.layer4[-1]])
    targets = [ClassifierOutputTarget(cls)]

    def forward():
        with torch.no_grad():
            net(x)

    rows = [("PyTorch: ResNet-18 forward, batch 1", *timed(forward, 10)),
            ("pytorch-grad-cam 1.5.7: GradCAM on layer4[-1]", *timed(lambda: cam(input_tensor=x, targets=targets), 10))]

    with tempfile.TemporaryDirectory() as d:
        sd = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(sd, f"{d}/resnet18-hash.safetensors")
        manifest = {"name": "resnet18-hash", "architecture": "torchvision.resnet18",
                    "input": {"channels": 3, "height": 224, "width": 224,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
        Path(f"{d}/resnet18-hash.json").write_text(json.dumps(manifest))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([str(ROOT / "target" / "release" / "convscope"), "serve", "--models", d,
                                   "--addr", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{url}/readyz")
                    break
                except OSError:
                    time.sleep(0.1)
            base = f"{url}/models/resnet18-hash"
            rows.append(("convscope: `POST /predict`, batch 1 (HTTP)", *timed(lambda: post_image(f"{base}/predict", IMAGE), 10)))
            rows.append(("convscope: `POST /gradcam?layer=layer4.1&output=json` (HTTP)",
                         *timed(lambda: post_image(f"{base}/gradcam?layer=layer4.1&output=json", IMAGE), 10)))
            rows.append(("convscope: `POST /gradcam?layer=layer4.1` overlay PNG (HTTP)",
                         *timed(lambda: post_image(f"{base}/gradcam?layer=layer4.1", IMAGE), 10)))
        finally:
            server.terminate()
            server.wait()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 10 runs after 3 warm-up\n")
    print("| what | median ms | p90 ms |")
    print("|---|---|---|")
    for name, med, p90 in rows:
        print(f"| {name} | {med:.1f} | {p90:.1f} |")


if __name__ == "__main__":
    main()
