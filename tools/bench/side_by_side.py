"""`convscope bench` and tools/bench/forward.py, alternated for several
rounds, then one table: per case, the median over rounds of each side's
median (ms per call: a whole batch where one is timed), the ratio of those, and the lowest and highest ratio of a single
round. This VM drifts by 10-20% over minutes; alternating puts both sides
in the same drift, and the range shows how far one round can stray.

    cargo build --release
    /root/venv/bin/python tools/bench/side_by_side.py --rounds 3 --threads 2 --runs 30

`--tier avx2` caps both sides to AVX2: convscope with CONVSCOPE_KERNELS=avx2,
PyTorch with ATEN_CPU_CAPABILITY=avx2 (its own kernels), ONEDNN_MAX_CPU_ISA=AVX2
(its convolutions) and MKL_ENABLE_INSTRUCTIONS=AVX2 (its matmuls). For a
like-for-like AVX2 run on an AVX-512 machine, pass a convscope built without
gemm's AVX-512 kernels: `cargo build --release -p convscope
--no-default-features --target-dir target/avx2-gemm` and `--convscope
target/avx2-gemm/release/convscope`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<case>\S.*?)\s{2,}(?P<median>[\d.]+)\s+(?P<p90>[\d.]+)\s+(?P<per>[\d.]+)(\s+(?P<gflops>\S+)\s+(?P<pct>\S+))?$")


def cases(text):
    """`case -> (median ms, ms per image)` from either tool's table."""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            out[m["case"].strip()] = (float(m["median"]), float(m["per"]), m["pct"] or "-")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--convscope", default=str(ROOT / "target" / "release" / "convscope"))
    ap.add_argument("--tier", choices=["native", "avx2"], default="native")
    ap.add_argument("--only", help="only the cases whose name contains this")
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    if args.tier == "avx2":
        env.update(CONVSCOPE_KERNELS="avx2", ATEN_CPU_CAPABILITY="avx2",
                   ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    ours_cmd = [args.convscope, "bench", "--runs", str(args.runs)]
    torch_cmd = [sys.executable, str(ROOT / "tools" / "bench" / "forward.py"),
                 "--threads", str(args.threads), "--runs", str(args.runs)]
    if args.only:
        ours_cmd += ["--only", args.only]
    rounds = []
    for r in range(args.rounds):
        ours = subprocess.run(ours_cmd, env=env, capture_output=True, text=True, check=True).stdout
        theirs = subprocess.run(torch_cmd, env=env, capture_output=True, text=True, check=True).stdout
        if r == 0:
            # Both sides' header: threads, kernel tier, gemm, peak; torch's
            # version and CPU capability.
            print(next(l for l in ours.splitlines() if l.startswith("convscope ")))
            print(next(l for l in theirs.splitlines() if l.startswith("torch ")))
        rounds.append((cases(ours), cases(theirs)))
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    print(f"{args.rounds} rounds, convscope then PyTorch in each; {args.threads} threads; "
          f"each side's median of {args.runs} runs per round")
    print(f"{'case':44} {'convscope':>10} {'PyTorch':>10} {'ratio':>7}  {'round ratios':>13}  "
          f"{'% of peak':>9}")
    for case in rounds[0][0]:
        ours = [r[0][case] for r in rounds if case in r[0]]
        theirs = [r[1][case] for r in rounds if case in r[1]]
        if len(theirs) != len(ours):
            med = statistics.median(o[0] for o in ours)
            print(f"{case:44} {med:10.2f} {'-':>10}")
            continue
        # Per call (a whole batch where one is timed): the printed
        # per-image column has too few digits for small times.
        o = statistics.median(x[0] for x in ours)
        t = statistics.median(x[0] for x in theirs)
        ratios = [a[0] / b[0] for a, b in zip(ours, theirs)]
        # convscope's share of the tier's peak, in the round of its median.
        pct = min(ours, key=lambda x: abs(x[0] - o))[2]
        print(f"{case:44} {o:10.2f} {t:10.2f} {o / t:6.2f}x  {min(ratios):.2f}-{max(ratios):.2f}x  {pct:>9}")


if __name__ == "__main__":
    main()
