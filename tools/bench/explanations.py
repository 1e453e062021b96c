"""Explanations beside Captum and pytorch-grad-cam, 2 threads each:
- integrated gradients (50 steps, zero baseline) and occlusion (window 16,
  stride 8, zero baseline) on torchvision ResNet-18 at 224x224 with the
  hash-derived weights (tools/golden/torchvision_hash.py), Grace Hopper;
  convscope over HTTP (`POST /saliency?output=json`), Captum in-process,
  one run of each in turn (after one warm-up each), so that the VM's drift
  slows both alike;
- a faithfulness report of 3 methods x 4 metrics x 20 steps on ResNet-20
  (CIFAR-10 test image 0): convscope's `POST /faithfulness` beside the same
  report computed with Captum and pytorch-grad-cam (GradCAM, Captum's
  IntegratedGradients and Occlusion; deletion and insertion by NumPy as in
  tools/golden/faithfulness.py, ROAD by pytorch-grad-cam with noise 0).

Builds nothing: run `cargo build --release` first.

    .venv/bin/python tools/bench/explanations.py
"""

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torchvision
from captum.attr import IntegratedGradients, Occlusion
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "golden"))
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
from torchvision_hash import hash_state  # noqa: E402
from common import alternated  # noqa: E402
import faithfulness as golden  # noqa: E402  (sets ROAD's imputer noise to 0)
from inspection import ResNetCifar  # noqa: E402

HOPPER = ROOT / "tests" / "fixtures" / "torchvision" / "grace_hopper_224.png"
CAT = ROOT / "data" / "cifar10" / "samples" / "test0000_cat.png"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def tensor(path):
    return torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(*IMAGENET),
    ])(Image.open(path).convert("RGB")).unsqueeze(0)


def post(url, path):
    req = urllib.request.Request(url, data=path.read_bytes(), headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def serve(d):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(ROOT / "target" / "release" / "convscope"), "serve", "--models", d,
                               "--addr", f"127.0.0.1:{port}", "--request-timeout-secs", "600"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/readyz")
            break
        except OSError:
            time.sleep(0.1)
    return server, url


def main():
    torch.set_num_threads(2)
    rows = []
    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    for m in net.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    x = tensor(HOPPER)
    with torch.no_grad():
        cls = int(net(x).argmax())
    ig = IntegratedGradients(net)
    occ = Occlusion(net)

    r20 = ResNetCifar(3).eval()
    r20.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    xc = golden.tensor("data/cifar10/samples/test0000_cat.png", "RGB", *IMAGENET)
    with torch.no_grad():
        c20 = int(r20(xc).argmax())

    def python_report():
        cam = GradCAM(model=r20, target_layers=[r20.layer3[-1]])(input_tensor=xc, targets=[ClassifierOutputTarget(c20)])[0]
        maps = [cam,
                IntegratedGradients(r20).attribute(xc, target=c20, n_steps=50)[0].sum(0).detach().numpy(),
                Occlusion(r20).attribute(xc, target=c20, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4),
                                         baselines=0)[0].sum(0).detach().numpy()]
        target = [ClassifierOutputSoftmaxTarget(c20)]
        x0 = xc[0].numpy()
        for m in maps:
            m = m.astype(np.float32)
            golden.curve(r20, x0, c20, m, x0, np.zeros_like(x0))
            golden.curve(r20, x0, c20, m, golden.blur(x0), x0)
            ROADMostRelevantFirstAverage()(xc, m[None], target, r20)
            ROADLeastRelevantFirstAverage()(xc, m[None], target, r20)

    with tempfile.TemporaryDirectory() as d:
        sd = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(sd, f"{d}/resnet18-hash.safetensors")
        Path(f"{d}/resnet18-hash.json").write_text(json.dumps({
            "name": "resnet18-hash", "architecture": "torchvision.resnet18",
            "input": {"channels": 3, "height": 224, "width": 224, "mean": IMAGENET[0], "std": IMAGENET[1]}}))
        for ext in ("json", "safetensors"):
            Path(f"{d}/resnet20-cifar10.{ext}").write_bytes((ROOT / "models" / f"resnet20-cifar10.{ext}").read_bytes())
        server, url = serve(d)
        try:
            base = f"{url}/models/resnet18-hash/saliency?output=json&class={cls}"
            # Each case alternates Captum's run with convscope's.
            captum_ig, ours_ig = alternated(
                lambda: ig.attribute(x, target=cls, n_steps=50),
                lambda: post(f"{base}&method=integrated_gradients&steps=50", HOPPER), 3)
            captum_occ, ours_occ = alternated(
                lambda: occ.attribute(x, target=cls, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8),
                                      baselines=0),
                lambda: post(f"{base}&method=occlusion&window=16&stride=8", HOPPER), 3)
            report = (f"{url}/models/resnet20-cifar10/faithfulness?methods=gradcam,integrated_gradients,occlusion"
                      "&metrics=deletion,insertion,road_morf,road_lerf&steps=20")
            python_rep, ours_rep = alternated(python_report, lambda: post(report, CAT), 5)
        finally:
            server.terminate()
            server.wait()
    rows += [
        ("integrated gradients, 50 steps, ResNet-18 224", captum_ig, ours_ig),
        ("occlusion, window 16, stride 8, ResNet-18 224", captum_occ, ours_occ),
        ("report: 3 methods x 4 metrics x 20 steps, ResNet-20", python_rep, ours_rep),
    ]
    print("| case | Captum / pytorch-grad-cam, median (p90) ms | convscope, median (p90) ms | ratio |")
    print("|---|---|---|---|")
    for name, theirs, ours in rows:
        print(f"| {name} | {theirs[0]:.1f} ({theirs[1]:.1f}) | {ours[0]:.1f} ({ours[1]:.1f}) | {ours[0] / theirs[0]:.2f} |")


if __name__ == "__main__":
    main()
