"""PyTorch reference for convscope's training step (tests/fixtures/training).

A small `sequential` net with batch norm (train mode: batch statistics and
the running-statistics update), max pooling, a residual-free conv stack and
two linear layers, starting from the same seeded weights, trained for 4
steps on the same 16 real MNIST images (one batch of 8, then the other, then
again) with each optimiser: SGD with momentum, Nesterov and weight decay;
Adam with weight decay; AdamW; and SGD with an L1 + L2 penalty. After every
step the loss is recorded; after the last, every tensor of the state_dict
(weights, biases, running mean/var). The Rust test replays the steps with
convscope's TrainNet and optimisers and compares.

    /root/venv/bin/python tools/golden/training.py
"""

import gzip
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from versions import versions  # tools/golden/versions.py

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "training"

LAYERS = [
    # Convolutions before batch norm have no bias, as in ResNets: its
    # gradient would be zero up to rounding, and Adam turns rounding noise
    # into full-size steps of either sign.
    {"name": "conv1", "type": "conv2d", "in_channels": 1, "out_channels": 6, "kernel_size": 3, "padding": 1, "bias": False},
    {"name": "bn1", "type": "batch_norm2d", "num_features": 6},
    {"name": "relu1", "type": "relu"},
    {"name": "pool1", "type": "max_pool2d", "kernel_size": 2},
    {"name": "conv2", "type": "conv2d", "in_channels": 6, "out_channels": 8, "kernel_size": 3, "stride": 2, "bias": False},
    {"name": "bn2", "type": "batch_norm2d", "num_features": 8},
    {"name": "relu2", "type": "relu"},
    {"name": "flatten", "type": "flatten"},
    {"name": "fc1", "type": "linear", "in_features": 288, "out_features": 32},
    {"name": "relu3", "type": "relu"},
    {"name": "fc2", "type": "linear", "in_features": 32, "out_features": 10},
]

OPTIMIZERS = {
    "sgd_nesterov": {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
    "adam": {"type": "adam", "lr": 0.01, "weight_decay": 0.001},
    "adamw": {"type": "adamw", "lr": 0.01},
    "sgd_l1_l2": {"type": "sgd", "lr": 0.05, "momentum": 0.5, "l1": 0.0001, "l2": 0.001},
}


def build():
    make = {
        "conv2d": lambda l: nn.Conv2d(l["in_channels"], l["out_channels"], l["kernel_size"],
                                      stride=l.get("stride", 1), padding=l.get("padding", 0),
                                      bias=l.get("bias", True)),
        "batch_norm2d": lambda l: nn.BatchNorm2d(l["num_features"]),
        "max_pool2d": lambda l: nn.MaxPool2d(l["kernel_size"]),
        "relu": lambda l: nn.ReLU(),
        "flatten": lambda l: nn.Flatten(),
        "linear": lambda l: nn.Linear(l["in_features"], l["out_features"]),
    }
    return nn.Sequential(OrderedDict((l["name"], make[l["type"]](l)) for l in LAYERS))


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def optimizer(spec, params):
    if spec["type"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec.get("momentum", 0.0),
                               nesterov=spec.get("nesterov", False), weight_decay=spec.get("weight_decay", 0.0))
    if spec["type"] == "adam":
        return torch.optim.Adam(params, lr=spec["lr"], weight_decay=spec.get("weight_decay", 0.0))
    return torch.optim.AdamW(params, lr=spec["lr"])


def main():
    torch.set_num_threads(1)
    torch.manual_seed(7)
    initial = build()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in initial.state_dict().items() if not k.endswith("num_batches_tracked")},
              OUT / "initial.safetensors")
    # Sixteen real MNIST training images, normalised as CNN_A's manifest says.
    x = idx(ROOT / "data/mnist/train-images-idx3-ubyte.gz")[:16].astype(np.float32) / 255.0
    y = idx(ROOT / "data/mnist/train-labels-idx1-ubyte.gz")[:16].astype(np.int64)
    x = torch.from_numpy((x - 0.1307) / 0.3081).unsqueeze(1)
    y = torch.from_numpy(y)
    batches = [slice(0, 8), slice(8, 16), slice(0, 8), slice(8, 16)]
    results = {}
    for name, spec in OPTIMIZERS.items():
        model = build()
        model.load_state_dict(initial.state_dict())
        model.train()
        opt = optimizer(spec, model.parameters())
        losses = []
        for b in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            for p in model.parameters():
                if spec.get("l1"):
                    loss = loss + spec["l1"] * p.abs().sum()
                if spec.get("l2"):
                    loss = loss + spec["l2"] * p.pow(2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(state, OUT / f"{name}.safetensors")
        results[name] = {"optimizer": {k: v for k, v in spec.items() if k not in ("l1", "l2")},
                         "l1": spec.get("l1", 0.0), "l2": spec.get("l2", 0.0), "losses": losses}
    (OUT / "index.json").write_text(json.dumps({
        "torch": torch.__version__, "layers": LAYERS, "mean": 0.1307, "std": 0.3081,
        "images": "data/mnist/train-images-idx3-ubyte.gz, the first 16",
        "batches": [[0, 8], [8, 16], [0, 8], [8, 16]], "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
