"""The cases of `convscope bench` in PyTorch, same shapes, same thread count,
median of N runs after 3 warm-up: forward passes (torchvision ResNet-18 at
224², bundled ResNet-20 and MobileNet), pytorch-grad-cam's GradCAM on
ResNet-18 `layer4[-1]`, ResNet-20 with a stats hook on every module, and one
Adam training step of CNN_A on a batch of 64.

    RAYON_NUM_THREADS=2 target/release/convscope bench --runs 10
    /root/venv/bin/python tools/bench/forward.py --threads 2 --runs 10
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from inspection import ResNetCifar  # noqa: E402
from gradients import mobilenet  # noqa: E402
from train_cnn_a import LAYERS, build  # noqa: E402


def timed(fn, runs):
    for _ in range(3):
        fn()
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return statistics.median(ms), ms[int((runs - 1) * 0.9)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    rows = []

    r18 = torchvision.models.resnet18().eval()
    r20 = ResNetCifar(3).eval()
    r20.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    mnet = mobilenet()
    for case, fn, shape in [
        ("forward resnet18 224 b1", r18, (1, 3, 224, 224)),
        ("forward resnet18 224 b8", r18, (8, 3, 224, 224)),
        ("forward resnet20 32 b1", r20, (1, 3, 32, 32)),
        ("forward resnet20 32 b64", r20, (64, 3, 32, 32)),
        ("forward mobilenet 128 b1", mnet, (1, 3, 128, 128)),
    ]:
        x = torch.randn(shape, generator=g)

        def forward(fn=fn, x=x):
            with torch.no_grad():
                fn(x)
        rows.append((case, shape[0], *timed(forward, args.runs)))

    from pytorch_grad_cam import GradCAM
    x = torch.randn((1, 3, 224, 224), generator=g)
    cam = GradCAM(model=r18, target_layers=[r18.layer4[-1]])
    rows.append(("gradcam resnet18 layer4.1", 1, *timed(lambda: cam(input_tensor=x, targets=None), args.runs)))

    stats = []

    def hook(_m, _i, out):
        o = out.detach()
        stats.append((o.mean().item(), o.std(unbiased=False).item(), o.min().item(), o.max().item(),
                      (o == 0).float().mean().item()))
    for name, m in r20.named_modules():
        if name:
            m.register_forward_hook(hook)
    x = torch.randn((1, 3, 32, 32), generator=g)

    def sheet():
        stats.clear()
        with torch.no_grad():
            r20(x)
    rows.append(("activations resnet20 all layers + stats", 1, *timed(sheet, args.runs)))

    cnn_a = build(LAYERS).train()
    opt = torch.optim.Adam(cnn_a.parameters(), lr=1e-3)
    x = torch.randn((64, 1, 28, 28), generator=g)
    y = torch.arange(64) % 10

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(cnn_a(x), y).backward()
        opt.step()
    rows.append(("train step cnn_a b64 adam", 64, *timed(step, args.runs)))

    caps = {k: os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(f'{k}={v}' for k, v in caps.items())}), "
          f"median of {args.runs} runs after 3 warm-up")
    print(f"{'case':<42} {'median ms':>10} {'p90 ms':>10} {'ms / image':>12}")
    for case, batch, med, p90 in rows:
        print(f"{case:<42} {med:>10.2f} {p90:>10.2f} {med / batch:>12.2f}")


if __name__ == "__main__":
    main()
