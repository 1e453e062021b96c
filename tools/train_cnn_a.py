"""Train the course's CNN_A on MNIST with PyTorch and write it as a convscope model.

This produces the bundled `models/cnn-a-mnist` until convscope's own training jobs
land. One epoch over the full training set, batch 64, Adam lr 1e-3, seed 13,
2 threads; the test accuracy on all 10,000 test images goes into the manifest.

    .venv/bin/python tools/train_cnn_a.py --data data/mnist --out models
"""

import argparse
import gzip
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

MEAN, STD = 0.1307, 0.3081

# The manifest layer list; the PyTorch module below is built from the same names.
LAYERS = [
    {"name": "conv1", "type": "conv2d", "in_channels": 1, "out_channels": 32, "kernel_size": 3},
    {"name": "pool1", "type": "max_pool2d", "kernel_size": 2},
    {"name": "relu1", "type": "relu"},
    {"name": "conv2", "type": "conv2d", "in_channels": 32, "out_channels": 64, "kernel_size": 3},
    {"name": "pool2", "type": "max_pool2d", "kernel_size": 2},
    {"name": "relu2", "type": "relu"},
    {"name": "dropout1", "type": "dropout", "p": 0.25},
    {"name": "flatten", "type": "flatten"},
    {"name": "fc1", "type": "linear", "in_features": 1600, "out_features": 128},
    {"name": "relu3", "type": "relu"},
    {"name": "dropout2", "type": "dropout", "p": 0.5},
    {"name": "fc2", "type": "linear", "in_features": 128, "out_features": 64},
    {"name": "fc3", "type": "linear", "in_features": 64, "out_features": 10},
    {"name": "relu4", "type": "relu"},
]


def build(layers):
    make = {
        "conv2d": lambda l: nn.Conv2d(l["in_channels"], l["out_channels"], l["kernel_size"]),
        "max_pool2d": lambda l: nn.MaxPool2d(l["kernel_size"]),
        "relu": lambda l: nn.ReLU(),
        "dropout": lambda l: nn.Dropout(l["p"]),
        "flatten": lambda l: nn.Flatten(),
        "linear": lambda l: nn.Linear(l["in_features"], l["out_features"]),
    }
    return nn.Sequential(OrderedDict((l["name"], make[l["type"]](l)) for l in layers))


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def tensors(data, split):
    x = idx(data / f"{split}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = idx(data / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return torch.from_numpy((x - MEAN) / STD).unsqueeze(1), torch.from_numpy(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("data/mnist"))
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    xtr, ytr = tensors(args.data, "train")
    xte, yte = tensors(args.data, "t10k")
    model = build(LAYERS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            b = perm[i: i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}, {time.time() - t0:.1f} s")
    model.eval()
    with torch.no_grad():
        correct = sum((model(xte[i: i + 1000]).argmax(1) == yte[i: i + 1000]).sum().item() for i in range(0, 10000, 1000))
    acc = correct / 100.0
    print(f"test accuracy {acc:.2f}% ({correct}/10000)")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "cnn-a-mnist.safetensors")
    manifest = {
        "name": "cnn-a-mnist",
        "architecture": "sequential",
        "description": "The course's CNN_A, trained by tools/train_cnn_a.py (PyTorch) on the full MNIST training set",
        "layers": LAYERS,
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [MEAN], "std": [STD], "resize": 28, "center_crop": 28},
        "classes": [str(i) for i in range(10)],
        "test_accuracy": {"dataset": "MNIST test set, all 10000 images", "top1_percent": acc, "correct": correct},
        "training": {"script": "tools/train_cnn_a.py", "epochs": args.epochs, "batch_size": 64,
                     "optimizer": "adam", "lr": 1e-3, "seed": args.seed, "torch": torch.__version__},
    }
    (args.out / "cnn-a-mnist.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
