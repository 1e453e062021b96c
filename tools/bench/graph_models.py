"""Graph models beside PyTorch: torchvision's mobilenet_v2, efficientnet_b0,
densenet121 and resnext50_32x4d at 224x224, batch 1 and 8, exported with
tools/export/convscope_export.py (PyTorch's default init, batch-norm
statistics drawn so that they are not the identity), then timed on the same
weights and thread count: `convscope bench --graph DIR` and the eval-mode
module under torch.no_grad(), alternated for several rounds (this VM drifts).

    cargo build --release
    .venv/bin/python tools/bench/graph_models.py --rounds 3 --threads 2 --runs 20

`--tier avx2` caps both sides to AVX2 on an AVX-512 machine: convscope with
CONVSCOPE_KERNELS=avx2, PyTorch with ATEN_CPU_CAPABILITY=avx2 (its own
kernels), ONEDNN_MAX_CPU_ISA=AVX2 (its convolutions) and
MKL_ENABLE_INSTRUCTIONS=AVX2 (its matmuls); the script re-runs itself with
them set, since torch reads them when it loads. Pass a convscope built
without gemm's AVX-512 kernels (`cargo build --release -p convscope
--no-default-features --target-dir target/avx2-gemm`) for a like-for-like
AVX2 run.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "export"))
import convscope_export as cx  # noqa: E402

AVX2_ENV = {"CONVSCOPE_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if "--tier" in sys.argv and sys.argv[sys.argv.index("--tier") + 1] == "avx2" \
        and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **AVX2_ENV))

import torch  # noqa: E402
import torchvision  # noqa: E402

MODELS = ["mobilenet_v2", "efficientnet_b0", "densenet121", "resnext50_32x4d"]
BATCHES = [1, 8]
LINE = re.compile(r"^forward graph (?P<name>\S+) 224 b(?P<n>\d+)\s+(?P<median>[\d.]+)")


def torch_ms(model, runs, n):
    x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1))
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
    ap.add_argument("--tier", choices=["native", "avx2"], default="native")
    ap.add_argument("--only", help="models whose name contains this")
    args = ap.parse_args()
    print(f"PyTorch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          + ", ".join(f"{k}={os.environ.get(k, '')}" for k in AVX2_ENV))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp())
    models = {}
    for name in [m for m in MODELS if not args.only or args.only in m]:
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
    keys = [(n, b) for n in models for b in BATCHES]
    ours, theirs = {k: [] for k in keys}, {k: [] for k in keys}
    header = ""
    for r in range(args.rounds):
        text = subprocess.run([args.convscope, "bench", "--runs", str(args.runs), "--only", "forward graph",
                               "--graph", str(out)], env=env, capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            if line.startswith("convscope "):
                header = line
            m = LINE.match(line.strip())
            if m:
                ours[(m["name"], int(m["n"]))].append(float(m["median"]))
        for n, m in models.items():
            for b in BATCHES:
                theirs[(n, b)].append(torch_ms(m, args.runs, b))
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    print(header)
    print(f"{args.rounds} rounds; {args.threads} threads; each side's median of {args.runs} runs per round")
    print(f"{'case':40} {'convscope':>10} {'PyTorch':>10} {'ratio':>7}  round ratios")
    for n, b in keys:
        o, t = statistics.median(ours[(n, b)]), statistics.median(theirs[(n, b)])
        rr = sorted(a / c for a, c in zip(ours[(n, b)], theirs[(n, b)]))
        print(f"{'forward ' + n + f' 224 b{b}':40} {o:10.2f} {t:10.2f} {o / t:6.2f}x  {rr[0]:.2f}-{rr[-1]:.2f}")


if __name__ == "__main__":
    main()
