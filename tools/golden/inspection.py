"""PyTorch fixtures for the inspection endpoints (tests/fixtures/inspection).

- `<model>_activations.json`: every hookable layer of ResNet-20 (real weights,
  CIFAR-10 test image 0), the bundled CNN_A (MNIST test image 0) and torchvision
  ResNet-18 (hash-derived weights as in torchvision_hash.py, a 64x64 crop of
  Grace Hopper). Per layer: shape, float64 sum and sum of squares, and the values
  at indices 0, s, 2s, ... (s chosen so at most 1024 are kept; all of them for
  small layers): enough to catch any wrong element pattern without committing
  megabytes.
- `cnn_a_distances.json`: the course task, fc2 embeddings of two 6s and two 7s
  (MNIST test images 11, 21, 0, 17) and the five metrics of the API contract,
  computed with torch in float64 from the float32 embeddings.
- `torchvision_tensors.json`: state_dict names and shapes of torchvision AlexNet
  and ResNet-18 with their parameter counts, for the model-summary test.

    .venv/bin/python tools/golden/inspection.py
"""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "inspection"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from train_cnn_a import LAYERS as CNN_A_LAYERS, build as build_cnn_a  # noqa: E402
from torchvision_hash import hash_state  # noqa: E402

from versions import versions  # tools/golden/versions.py

MAX_SAMPLES = 1024


# akamaster/pytorch_resnet_cifar10 resnet.py, module for module.
class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = planes // 4
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNetCifar(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make(16, n, 1)
        self.layer2 = self._make(32, n, 2)
        self.layer3 = self._make(64, n, 2)
        self.linear = nn.Linear(64, 10)

    def _make(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def to_input(path, mode, mean, std):
    img = Image.open(path).convert(mode)
    return torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std),
    ])(img).unsqueeze(0)


def record_all(model, x):
    """Every named module's first output, as a forward hook sees it."""
    seen = {}

    def hook(name):
        def record(_m, _i, out):
            if name not in seen:
                seen[name] = out.detach().clone()
        return record

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(x)
    return seen


def layer_entries(seen):
    entries = []
    for name, t in seen.items():
        flat = t.reshape(-1).numpy().astype(np.float32)
        stride = max(1, -(-flat.size // MAX_SAMPLES))
        entries.append({
            "name": name, "shape": list(t.shape), "count": int(flat.size),
            "sum": float(flat.astype(np.float64).sum()), "sumsq": float((flat.astype(np.float64) ** 2).sum()),
            "stride": stride, "samples": flat[::stride].tolist(),
        })
    return entries


def activations():
    torch.set_num_threads(2)
    # ResNet-20, real weights.
    net = ResNetCifar(3).eval()
    net.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    image = "data/cifar10/samples/test0000_cat.png"
    x = to_input(ROOT / image, "RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    dump("resnet20", "resnet20-cifar10", image, net, x)
    # CNN_A, the bundled checkpoint.
    net = build_cnn_a(CNN_A_LAYERS).eval()
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    image = "data/mnist/samples/test0000_digit7.png"
    x = to_input(ROOT / image, "L", [0.1307], [0.3081])
    dump("cnn_a", "cnn-a-mnist", image, net, x)
    # torchvision ResNet-18, hash weights, a 64x64 input.
    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    src = Image.open(ROOT / "data" / "imagenet" / "samples" / "grace_hopper.png").convert("RGB")
    small = torchvision.transforms.CenterCrop(64)(torchvision.transforms.Resize(64)(src))
    small.save(OUT / "grace_hopper_64.png")
    image = "tests/fixtures/inspection/grace_hopper_64.png"
    x = to_input(ROOT / image, "RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    dump("resnet18", "resnet18-hash", image, net, x)


def dump(key, model_name, image, net, x):
    seen = record_all(net, x)
    out = {"model": model_name, "image": image, "layers": layer_entries(seen)}
    (OUT / f"{key}_activations.json").write_text(json.dumps(out) + "\n")
    print(key, len(seen), "layers")


def idx(name):
    data = gzip.open(ROOT / "data" / "mnist" / name).read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def distances():
    images, labels = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
    picks = [11, 21, 0, 17]
    assert [int(labels[i]) for i in picks] == [6, 6, 7, 7]
    x = torch.from_numpy((images[picks].astype(np.float32) / 255.0 - 0.1307) / 0.3081).unsqueeze(1)
    net = build_cnn_a(CNN_A_LAYERS).eval()
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    seen = record_all(net, x)
    e = seen["fc2"].double()
    n = len(picks)
    logp = F.log_softmax(e, dim=1)
    metrics = {
        "euclidean": lambda a, b: torch.linalg.vector_norm(e[a] - e[b]),
        "mse": lambda a, b: F.mse_loss(e[a], e[b]),
        "cosine": lambda a, b: 1 - F.cosine_similarity(e[a], e[b], dim=0, eps=0.0),
        "cross_entropy": lambda a, b: F.cross_entropy(e[a:a + 1], F.softmax(e[b:b + 1], dim=1)),
        "kl": lambda a, b: F.kl_div(logp[a], logp[b], reduction="sum", log_target=True),
    }
    out = {"model": "cnn-a-mnist", "layer": "fc2", "mnist_test_indices": picks, "labels": ["6", "6", "7", "7"],
           "embeddings": seen["fc2"].tolist(), "distances": {}}
    for name, f in metrics.items():
        out["distances"][name] = [[float(f(i, j)) for j in range(n)] for i in range(n)]
    (OUT / "cnn_a_distances.json").write_text(json.dumps(out, indent=1) + "\n")
    m = np.array(out["distances"]["mse"])
    print("mse intra 6:", m[0, 1], "intra 7:", m[2, 3], "inter 6/7:", m[:2, 2:].mean())


def tensor_lists():
    out = {}
    for key in ["alexnet", "resnet18"]:
        model = getattr(torchvision.models, key)(weights=None)
        sd = model.state_dict()
        out[key] = {
            "total_params": sum(p.numel() for p in model.parameters()),
            "tensors": [[k, list(v.shape)] for k, v in sd.items() if not k.endswith("num_batches_tracked")],
        }
    (OUT / "torchvision_tensors.json").write_text(json.dumps(out) + "\n")
    print({k: v["total_params"] for k, v in out.items()})


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    activations()
    distances()
    tensor_lists()
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
