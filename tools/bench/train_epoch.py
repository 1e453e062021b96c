"""One MNIST epoch of CNN_A in PyTorch, timed, beside convscope's own.

Same network (tools/train_cnn_a.py's), batch 64, Adam lr 1e-3, seed 13, the
full 60,000 training images, then the 10,000 test images, with the thread
count pinned. Optionally runs `convscope train` on the same job and reads its
epoch time, and loads the checkpoint convscope wrote into PyTorch to score it
there (a convscope-trained model is a PyTorch state_dict).

    cargo build --release
    /root/venv/bin/python tools/bench/train_epoch.py --threads 2 --convscope target/release/convscope
    /root/venv/bin/python tools/bench/train_epoch.py --score models/cnn-a-mnist-convscope.safetensors
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_cnn_a import LAYERS, build, tensors  # noqa: E402


def pytorch_epoch(data, threads, seed):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xtr, ytr = tensors(data, "train")
    xte, yte = tensors(data, "t10k")
    model = build(LAYERS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    perm = torch.randperm(len(xtr), generator=g)
    for i in range(0, len(xtr), 64):
        b = perm[i: i + 64]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
        loss.backward()
        opt.step()
    t_train = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        correct = sum((model(xte[i: i + 256]).argmax(1) == yte[i: i + 256]).sum().item()
                      for i in range(0, 10000, 256))
    t_all = time.perf_counter() - t0
    return t_train, t_all, correct


def score_in_pytorch(weights, data):
    model = build(LAYERS)
    state = load_file(str(weights))
    model.load_state_dict(state)
    model.eval()
    xte, yte = tensors(data, "t10k")
    with torch.no_grad():
        return sum((model(xte[i: i + 1000]).argmax(1) == yte[i: i + 1000]).sum().item()
                   for i in range(0, 10000, 1000))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("data/mnist"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--convscope", type=Path, help="the convscope binary, to time `convscope train` too")
    ap.add_argument("--score", type=Path,
                    help="only score this CNN_A checkpoint in PyTorch on the 10,000 test images and "
                         "record the result as `test_accuracy` in the manifest beside it")
    args = ap.parse_args()
    if args.score:
        correct = score_in_pytorch(args.score, args.data)
        manifest_path = args.score.with_suffix(".json")
        manifest = json.loads(manifest_path.read_text())
        manifest["test_accuracy"] = {
            "dataset": "MNIST test set, all 10000 images", "top1_percent": correct / 100, "correct": correct,
            "measured_by": f"PyTorch {torch.__version__}: tools/bench/train_epoch.py --score"}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{args.score}: {correct / 100:.2f}% ({correct}/10000) in PyTorch; written to {manifest_path}")
        return
    t_train, t_all, correct = pytorch_epoch(args.data, args.threads, args.seed)
    print(f"pytorch {torch.__version__}, {args.threads} threads: train {t_train:.1f} s, "
          f"train+test {t_all:.1f} s, test accuracy {correct / 100:.2f}% ({correct}/10000)")
    if args.convscope:
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps({
                "model_name": "cnn-a-bench", "architecture": "cnn_a", "dataset": "mnist",
                "epochs": 1, "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001},
                "seed": args.seed, "epoch_snapshots": False}))
            env = {"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
            out = subprocess.run([str(args.convscope), "train", str(job), "--models", tmp,
                                  "--datasets", str(args.data.parent)],
                                 capture_output=True, text=True, env=env, check=True)
            line = [l for l in out.stderr.replace("\r", "\n").splitlines() if l.startswith("Epoch 1/1")][0]
            secs = float(re.search(r"([0-9.]+) s", line).group(1))
            acc = float(re.search(r"test accuracy ([0-9.]+)%", line).group(1))
            ours = score_in_pytorch(Path(tmp) / "cnn-a-bench.safetensors", args.data)
            print(f"convscope, {args.threads} threads: train+test {secs:.1f} s "
                  f"({secs / t_all:.2f}x PyTorch), test accuracy {acc:.2f}%; "
                  f"its checkpoint loaded in PyTorch scores {ours / 100:.2f}% ({ours}/10000)")


if __name__ == "__main__":
    main()
