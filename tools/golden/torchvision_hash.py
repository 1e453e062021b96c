"""Reference outputs for models with hash-derived weights: torchvision ResNet-18
and VGG-11, and two course nets that convscope loads from a `sequential`
manifest alone (the PyTorch-examples MNIST net and the CIFAR net with
BatchNorm blocks named `conv_layer.N` / `fc_layer.N`).

Committing 45+ MB of random weights would be silly, so every weight is a pure
function of (tensor name, element index) that this script and the Rust tests
(`tests/src/lib.rs`, `hash_weights`) compute identically, bit for bit:

    seed  = FNV-1a-64(name)
    h     = splitmix64(seed XOR index)
    u     = (h >> 11) * 2**-53                      # uniform in [0, 1), exact in f64
    conv/linear weight   (2u - 1) * sqrt(6 / fan_in)   (Kaiming-uniform, keeps activations O(1))
    bias                 (2u - 1) * 0.1
    BN weight            0.5 + u
    BN bias, running_mean  (2u - 1) * 0.2
    BN running_var       0.5 + u
    computed in float64, then rounded to float32.

Only the tensor list, the logits and three intermediate layers per model are
committed (tests/fixtures/torchvision). Regenerate with:

    .venv/bin/python tools/golden/torchvision_hash.py
"""

import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from versions import versions  # tools/golden/versions.py

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "torchvision"
MASK = (1 << 64) - 1

MODELS = {
    "resnet18": ("torchvision.resnet18", ["maxpool", "layer3.1", "layer4.1.bn2"]),
    "vgg11": ("torchvision.vgg11", ["features.15", "avgpool", "classifier.4"]),
}


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def uniform(name: str, n: int) -> np.ndarray:
    x = np.uint64(fnv1a64(name)) ^ np.arange(n, dtype=np.uint64)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def hash_tensor(name: str, shape, is_bn: bool) -> np.ndarray:
    n = int(np.prod(shape))
    u = uniform(name, n)
    leaf = name.rsplit(".", 1)[1]
    if leaf == "weight" and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        v = (2 * u - 1) * np.sqrt(6.0 / fan_in)
    elif leaf == "weight":
        v = 0.5 + u
    elif leaf == "bias":
        v = (2 * u - 1) * (0.2 if is_bn else 0.1)
    elif leaf == "running_mean":
        v = (2 * u - 1) * 0.2
    elif leaf == "running_var":
        v = 0.5 + u
    else:
        raise ValueError(name)
    return v.astype(np.float32).reshape(shape)


def seq(layers):
    """The PyTorch twin of a `sequential` manifest (names become module paths)."""
    import torch.nn as nn

    def make(l):
        t = l["type"]
        if t == "conv2d":
            return nn.Conv2d(l["in_channels"], l["out_channels"], l["kernel_size"],
                             stride=l.get("stride", 1), padding=l.get("padding", 0))
        if t == "batch_norm2d":
            return nn.BatchNorm2d(l["num_features"])
        if t == "relu":
            return nn.ReLU()
        if t == "max_pool2d":
            return nn.MaxPool2d(l["kernel_size"], l.get("stride"))
        if t in ("dropout", "dropout2d"):
            return nn.Dropout(l.get("p", 0.5))
        if t == "flatten":
            return nn.Flatten()
        if t == "linear":
            return nn.Linear(l["in_features"], l["out_features"])
        raise ValueError(t)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.order = [l["name"] for l in layers]
            for l in layers:
                # Dotted names ("conv_layer.0") become nested containers, as in the original nets.
                parent, leaf = self, l["name"].split(".")
                for part in leaf[:-1]:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf[-1], make(l))

        def forward(self, x):
            mods = dict(self.named_modules())
            for name in self.order:
                x = mods[name](x)
            return x

    return Seq()


def conv(name, cin, cout, k=3, **kw):
    return {"name": name, "type": "conv2d", "in_channels": cin, "out_channels": cout, "kernel_size": k, **kw}


# The PyTorch examples' MNIST Net (log_softmax left out: logits are its input).
MNIST_EXAMPLES = [
    conv("conv1", 1, 32), {"name": "relu1", "type": "relu"},
    conv("conv2", 32, 64), {"name": "relu2", "type": "relu"},
    {"name": "pool", "type": "max_pool2d", "kernel_size": 2},
    {"name": "dropout1", "type": "dropout", "p": 0.25},
    {"name": "flatten", "type": "flatten"},
    {"name": "fc1", "type": "linear", "in_features": 9216, "out_features": 128},
    {"name": "relu3", "type": "relu"},
    {"name": "dropout2", "type": "dropout", "p": 0.5},
    {"name": "fc2", "type": "linear", "in_features": 128, "out_features": 10},
]

# The widely copied CIFAR-10 CNN with BatchNorm blocks.
CIFAR_BN = [
    conv("conv_layer.0", 3, 32, padding=1), {"name": "conv_layer.1", "type": "batch_norm2d", "num_features": 32},
    {"name": "conv_layer.2", "type": "relu"},
    conv("conv_layer.3", 32, 64, padding=1), {"name": "conv_layer.4", "type": "relu"},
    {"name": "conv_layer.5", "type": "max_pool2d", "kernel_size": 2, "stride": 2},
    conv("conv_layer.6", 64, 128, padding=1), {"name": "conv_layer.7", "type": "batch_norm2d", "num_features": 128},
    {"name": "conv_layer.8", "type": "relu"},
    conv("conv_layer.9", 128, 128, padding=1), {"name": "conv_layer.10", "type": "relu"},
    {"name": "conv_layer.11", "type": "max_pool2d", "kernel_size": 2, "stride": 2},
    {"name": "conv_layer.12", "type": "dropout2d", "p": 0.05},
    conv("conv_layer.13", 128, 256, padding=1), {"name": "conv_layer.14", "type": "batch_norm2d", "num_features": 256},
    {"name": "conv_layer.15", "type": "relu"},
    conv("conv_layer.16", 256, 256, padding=1), {"name": "conv_layer.17", "type": "relu"},
    {"name": "conv_layer.18", "type": "max_pool2d", "kernel_size": 2, "stride": 2},
    {"name": "flatten", "type": "flatten"},
    {"name": "fc_layer.0", "type": "dropout", "p": 0.1},
    {"name": "fc_layer.1", "type": "linear", "in_features": 4096, "out_features": 1024},
    {"name": "fc_layer.2", "type": "relu"},
    {"name": "fc_layer.3", "type": "linear", "in_features": 1024, "out_features": 512},
    {"name": "fc_layer.4", "type": "relu"},
    {"name": "fc_layer.5", "type": "dropout", "p": 0.1},
    {"name": "fc_layer.6", "type": "linear", "in_features": 512, "out_features": 10},
]

SEQUENTIAL = {
    "mnist_examples_net": (MNIST_EXAMPLES, "data/mnist/samples/test0000_digit7.png", (0.1307,), (0.3081,), "L",
                           ["conv2", "pool", "fc1"]),
    "cifar_bn_net": (CIFAR_BN, "data/cifar10/samples/test0000_cat.png", (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616), "RGB", ["conv_layer.7", "conv_layer.11", "fc_layer.2"]),
}


def hash_state(model):
    sd = model.state_dict()
    bn_prefixes = {k[: -len(".running_mean")] for k in sd if k.endswith("running_mean")}
    tensors, new_sd = [], {}
    for name, t in sd.items():
        if name.endswith("num_batches_tracked"):
            new_sd[name] = t
            continue
        is_bn = name.rsplit(".", 1)[0] in bn_prefixes
        new_sd[name] = torch.from_numpy(hash_tensor(name, list(t.shape), is_bn))
        tensors.append([name, list(t.shape), is_bn])
    model.load_state_dict(new_sd, strict=True)
    return tensors


def record_run(key, model, x, layers, extra):
    seen = {}
    modules = dict(model.named_modules())

    def hook(layer):
        # Must return None: a forward hook's return value replaces the module
        # output, and in-place ops downstream (`out += identity`) would then
        # mutate the recorded copy.
        def record(_module, _inputs, output):
            seen.setdefault(layer, output.detach().clone())
        return record

    for layer in layers:
        modules[layer].register_forward_hook(hook(layer))
    with torch.no_grad():
        logits = model(x)[0]
    record = {**extra, "logits": logits.tolist(), "layers": {}}
    for layer in layers:
        arr = seen[layer].numpy().astype("<f4")
        file = f"{key}_{layer}.npy"
        np.save(OUT / file, arr)
        record["layers"][layer] = {"shape": list(arr.shape), "file": file}
    (OUT / f"{key}.json").write_text(json.dumps(record) + "\n")
    print(key, "top-1", int(logits.argmax()), "logit range", float(logits.min()), float(logits.max()))


def sequential_fixtures():
    for key, (layers, image, mean, std, mode, observe) in SEQUENTIAL.items():
        model = seq(layers).eval()
        tensors = hash_state(model)
        pil = Image.open(ROOT / image).convert(mode)
        x = torchvision.transforms.Compose([
            torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std),
        ])(pil).unsqueeze(0)
        manifest = {"name": key.replace("_", "-"), "architecture": "sequential", "layers": layers,
                    "input": {"channels": 1 if mode == "L" else 3, "height": pil.height, "width": pil.width,
                              "mean": list(mean), "std": list(std)}}
        record_run(key, model, x, observe, {"manifest": manifest, "image": image, "tensors": tensors})


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    # The input: Grace Hopper (public domain), PIL-resized and cropped once here
    # and committed, so both sides read the same 224x224 pixels.
    src = Image.open(ROOT / "data" / "imagenet" / "samples" / "grace_hopper.png").convert("RGB")
    img = torchvision.transforms.CenterCrop(224)(torchvision.transforms.Resize(256)(src))
    img.save(OUT / "grace_hopper_224.png")
    x = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(OUT / "grace_hopper_224.png")).unsqueeze(0)
    for key, (arch, layers) in MODELS.items():
        model = getattr(torchvision.models, key)(weights=None).eval()
        tensors = hash_state(model)
        manifest = {"name": f"{key}-hash", "architecture": arch,
                    "input": {"channels": 3, "height": 224, "width": 224,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
        record_run(key, model, x, layers, {"manifest": manifest, "image": "tests/fixtures/torchvision/grace_hopper_224.png",
                                           "tensors": tensors})
    sequential_fixtures()


if __name__ == "__main__":
    main()
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
