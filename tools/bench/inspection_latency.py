"""Inspection latency, convscope over HTTP beside PyTorch in-process, same
weights, same image, 2 threads each.

Start the server first (`cargo run --release -- serve`; candle uses one
thread per physical core, 2 here), then:

    .venv/bin/python tools/bench/inspection_latency.py --url http://127.0.0.1:8080

Prints a markdown table: median and p90 of N runs after warm-up.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from inspection import ResNetCifar  # noqa: E402

sys.path.insert(0, str(ROOT / "tools" / "bench"))
from common import get, post_image, timed  # noqa: E402

IMAGE = ROOT / "data" / "cifar10" / "samples" / "test0000_cat.png"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)

    net = ResNetCifar(3).eval()
    net.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    x = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(IMAGE).convert("RGB")).unsqueeze(0)
    stats = []

    def hook(name):
        def record(_m, _i, out):
            o = out.detach()
            stats.append((name, o.mean().item(), o.std(unbiased=False).item(), o.min().item(), o.max().item(),
                           (o == 0).float().mean().item()))
        return record

    for name, m in net.named_modules():
        if name:
            m.register_forward_hook(hook(name))

    def torch_stats():
        stats.clear()
        with torch.no_grad():
            net(x)

    def torch_forward():
        with torch.no_grad():
            net(x)

    rows = []
    rows.append(("PyTorch: ResNet-20 forward with hooks + stats on every module (in-process)", *timed(torch_stats, args.runs)))
    model = "resnet20-cifar10"
    input_id = json.loads(post_image(f"{args.url}/inputs", IMAGE))["input_id"]
    rows.append(("convscope: `GET /models/resnet20-cifar10/activations?format=json` (stats of every layer, HTTP)",
                 *timed(lambda: get(f"{args.url}/models/{model}/activations?format=json&input={input_id}"), args.runs)))
    rows.append(("convscope: `GET /models/resnet20-cifar10/activations` (PNG sheet of 63 layers, HTTP)",
                 *timed(lambda: get(f"{args.url}/models/{model}/activations?input={input_id}"), args.runs)))
    rows.append(("convscope: `POST .../activations` with the image in the body (decode included)",
                 *timed(lambda: post_image(f"{args.url}/models/{model}/activations", IMAGE), args.runs)))
    rows.append(("PyTorch: ResNet-20 forward alone, batch 1", *timed(torch_forward, args.runs)))
    rows.append(("convscope: `POST /models/resnet20-cifar10/predict`, batch 1 (HTTP)",
                 *timed(lambda: post_image(f"{args.url}/models/{model}/predict", IMAGE), args.runs)))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, runs {args.runs} after 3 warm-up\n")
    print("| what | median ms | p90 ms |")
    print("|---|---|---|")
    for name, med, p90 in rows:
        print(f"| {name} | {med:.2f} | {p90:.2f} |")


if __name__ == "__main__":
    main()
