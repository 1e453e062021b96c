"""Graph models beside PyTorch: torchvision's mobilenet_v2, efficientnet_b0
and densenet121 at 224x224, batch 1, exported with
tools/export/convscope_export.py (PyTorch's default init, batch-norm
statistics drawn so that they are not the identity), then timed on the same
weights and thread count: `convscope bench --graph DIR` and the eval-mode
module under torch.no_grad(), alternated for several rounds (this VM drifts).

    cargo build --release
    .venv/bin/python tools/bench/graph_models.py --rounds 3 --threads 2 --runs 20
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "export"))
import convscope_export as cx  # noqa: E402

MODELS = ["mobilenet_v2", "efficientnet_b0", "densenet121"]
LINE = re.compile(r"^forward graph (?P<name>\S+) 224 b1\s+(?P<median>[\d.]+)")


def torch_ms(model, runs):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(3):
            model(x)
        ms = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--convscope", default=str(ROOT / "target" / "release" / "convscope"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp())
    models = {}
    for name in MODELS:
        m = getattr(torchvision.models, name)(weights=None).eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
        manifest, tensors = cx.export(m, (3, 224, 224), name.replace("_", "-"))
        (out / f"{name}.json").write_text(__import__("json").dumps(manifest))
        cx.write_safetensors(tensors, out / f"{name}.safetensors")
        models[name.replace("_", "-")] = m
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    ours, theirs = {n: [] for n in models}, {n: [] for n in models}
    for r in range(args.rounds):
        text = subprocess.run([args.convscope, "bench", "--runs", str(args.runs), "--only", "forward graph",
                               "--graph", str(out)], env=env, capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            m = LINE.match(line.strip())
            if m:
                ours[m["name"]].append(float(m["median"]))
        for n, m in models.items():
            theirs[n].append(torch_ms(m, args.runs))
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    print(f"{args.rounds} rounds; {args.threads} threads; each side's median of {args.runs} runs per round")
    print(f"{'case':36} {'convscope':>10} {'PyTorch':>10} {'ratio':>7}")
    for n in models:
        o, t = statistics.median(ours[n]), statistics.median(theirs[n])
        print(f"{'forward ' + n + ' 224 b1':36} {o:10.2f} {t:10.2f} {o / t:6.2f}x")


if __name__ == "__main__":
    main()
