"""PyTorch autograd input gradients: the backward of every op convscope's
architectures use, checked through the saliency endpoint (tests/fixtures/gradients).

For each model, the gradient of the predicted class's logit with respect to
the normalised input, as a float32 .npy, plus `index.json`:
- ResNet-20 (conv, eval batch norm, ReLU, option-A shortcut, global pooling, linear)
- the bundled CNN_A (max-pool 2, dropout, linear, final ReLU)
- MobileNet v1 (depthwise conv, TF "SAME" asymmetric padding, ReLU6)
- torchvision ResNet-18 (padded 3x3/2 max-pool, downsample shortcuts), hash weights, 64x64
- torchvision AlexNet (3x3/2 max-pools, adaptive pool), hash weights, 128x128
- `ops_net`, a `sequential` net with hash weights exercising dilation, grouped
  and depthwise convs, average pooling with padding + ceil_mode +
  count_include_pad=False, max pooling with ceil_mode, non-divisible adaptive
  pooling, ReLU6 and batch norm

    .venv/bin/python tools/golden/gradients.py
"""

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gradients"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from train_cnn_a import LAYERS as CNN_A_LAYERS, build as build_cnn_a  # noqa: E402
from torchvision_hash import hash_state  # noqa: E402
from inspection import ResNetCifar  # noqa: E402

from versions import versions  # tools/golden/versions.py

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

OPS_NET = [
    {"name": "conv1", "type": "conv2d", "in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 2, "dilation": 2},
    {"name": "bn1", "type": "batch_norm2d", "num_features": 8},
    {"name": "act1", "type": "relu6"},
    {"name": "pool1", "type": "avg_pool2d", "kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False},
    {"name": "conv2", "type": "conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 8, "bias": False},
    {"name": "bn2", "type": "batch_norm2d", "num_features": 8},
    {"name": "act2", "type": "relu"},
    {"name": "conv3", "type": "conv2d", "in_channels": 8, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1, "groups": 2},
    {"name": "act3", "type": "relu"},
    {"name": "pool2", "type": "max_pool2d", "kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"name": "adapt", "type": "adaptive_avg_pool2d", "output_size": [3, 3]},
    {"name": "flatten", "type": "flatten"},
    {"name": "fc", "type": "linear", "in_features": 144, "out_features": 10},
]


def ops_net():
    make = {
        "conv2d": lambda l: nn.Conv2d(l["in_channels"], l["out_channels"], l["kernel_size"], stride=l.get("stride", 1),
                                      padding=l.get("padding", 0), dilation=l.get("dilation", 1),
                                      groups=l.get("groups", 1), bias=l.get("bias", True)),
        "batch_norm2d": lambda l: nn.BatchNorm2d(l["num_features"]),
        "relu6": lambda l: nn.ReLU6(),
        "relu": lambda l: nn.ReLU(),
        "avg_pool2d": lambda l: nn.AvgPool2d(l["kernel_size"], l["stride"], l["padding"], ceil_mode=l["ceil_mode"],
                                             count_include_pad=l["count_include_pad"]),
        "max_pool2d": lambda l: nn.MaxPool2d(l["kernel_size"], l["stride"], l["padding"], ceil_mode=l["ceil_mode"]),
        "adaptive_avg_pool2d": lambda l: nn.AdaptiveAvgPool2d(tuple(l["output_size"])),
        "flatten": lambda l: nn.Flatten(),
        "linear": lambda l: nn.Linear(l["in_features"], l["out_features"]),
    }
    return nn.Sequential(OrderedDict((l["name"], make[l["type"]](l)) for l in OPS_NET))


def tensor(path, mode, mean, std):
    img = Image.open(ROOT / path).convert(mode)
    return torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std),
    ])(img).unsqueeze(0)


def mobilenet():
    """MobileNet v1 0.25 in PyTorch, TF SAME padding done by hand."""
    sd = load_file(ROOT / "models" / "mobilenet-v1-0.25-128.safetensors")
    strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]

    def same(x, k, s):
        h = x.shape[-1]
        out = -(-h // s)
        total = max((out - 1) * s + k - h, 0)
        return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(x):
        x = F.relu6(F.conv2d(same(x, 3, 2), sd["Conv2d_0.weight"], sd["Conv2d_0.bias"], stride=2))
        for i in range(1, 14):
            dw, pw = f"Conv2d_{i}_depthwise", f"Conv2d_{i}_pointwise"
            c = sd[dw + ".weight"].shape[0]
            x = F.relu6(F.conv2d(same(x, 3, strides[i]), sd[dw + ".weight"], sd[dw + ".bias"], stride=strides[i], groups=c))
            x = F.relu6(F.conv2d(x, sd[pw + ".weight"], sd[pw + ".bias"]))
        return F.linear(x.mean((2, 3)), sd["Logits.weight"], sd["Logits.bias"])

    return forward


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []

    def record(key, model_name, image, fn, x):
        x = x.clone().requires_grad_(True)
        logits = fn(x)[0]
        cls = int(logits.argmax())
        logits[cls].backward()
        np.save(OUT / f"{key}.npy", x.grad[0].numpy().astype("<f4"))
        cases.append({"key": key, "model": model_name, "image": image, "class_index": cls, "file": f"{key}.npy"})
        print(key, cls, float(x.grad.abs().max()))

    net = ResNetCifar(3).eval()
    net.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    img = "data/cifar10/samples/test0000_cat.png"
    record("resnet20", "resnet20-cifar10", img, net, tensor(img, "RGB", *IMAGENET))

    net = build_cnn_a(CNN_A_LAYERS).eval()
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    img = "data/mnist/samples/test0000_digit7.png"
    record("cnn_a", "cnn-a-mnist", img, net, tensor(img, "L", [0.1307], [0.3081]))

    img = "data/imagenet/samples/cat_128x128.png"
    record("mobilenet", "mobilenet-v1-0.25-128", img, mobilenet(), tensor(img, "RGB", [128 / 255] * 3, [128 / 255] * 3))

    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    img = "tests/fixtures/inspection/grace_hopper_64.png"
    record("resnet18", "resnet18-hash-64", img, net, tensor(img, "RGB", *IMAGENET))

    net = torchvision.models.alexnet(weights=None).eval()
    hash_state(net)
    img = "data/imagenet/samples/grace_hopper_128x128.png"
    record("alexnet", "alexnet-hash", img, net, tensor(img, "RGB", *IMAGENET))

    net = ops_net().eval()
    tensors = hash_state(net)
    img = "data/cifar10/samples/test0000_cat.png"
    record("ops_net", "ops-net", img, net, tensor(img, "RGB", *IMAGENET))
    ops = {"manifest": {"name": "ops-net", "architecture": "sequential", "layers": OPS_NET,
                        "input": {"channels": 3, "height": 32, "width": 32,
                                  "mean": IMAGENET[0], "std": IMAGENET[1]}},
           "tensors": tensors}
    (OUT / "ops_net_model.json").write_text(json.dumps(ops) + "\n")
    (OUT / "index.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
