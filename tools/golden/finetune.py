"""PyTorch reference for fine-tuning a graph model (tests/fixtures/finetune).

torchvision's mobilenet_v2 at 64x64 with hash-derived weights (the rule of
torchvision_hash.py) and non-trivial batch-norm statistics, exported by
tools/export/convscope_export.py; a new 2-class head (nn.Linear(1280, 2),
PyTorch's default init under torch.manual_seed(0), saved here); `features`
frozen: requires_grad=False and its batch norms in eval mode, so that not
even their running statistics move; the classifier's dropout set to p=0
(its draws could not be matched). Four SGD steps (momentum 0.9, lr 0.0005) on
an ImageFolder of eight real images, 64x64 PNGs (folder/<class>/), batches
[0:4], [4:8], [0:4], [4:8] in sorted-file order. Records each loss and the
head after the last step.

    .venv/bin/python tools/golden/finetune.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "finetune"
sys.path.insert(0, str(ROOT / "tools" / "export"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))

import convscope_export as cx  # noqa: E402
from graph_models import hash_state  # noqa: E402
from versions import versions  # noqa: E402

SOURCES = {
    "animal": ["data/imagenet/samples/bird.png", "data/imagenet/samples/cat.png",
               "data/imagenet/samples/parrot.jpg", "data/cifar10/samples/test0012_dog.png"],
    "machine": ["data/cifar10/samples/test0001_ship.png", "data/cifar10/samples/test0003_airplane.png",
                "data/cifar10/samples/test0006_automobile.png", "data/cifar10/samples/test0011_truck.png"],
}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    files = []
    for cls, paths in SOURCES.items():
        (OUT / "folder" / cls).mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(paths):
            img = Image.open(ROOT / p).convert("RGB").resize((64, 64), Image.BILINEAR)
            dst = OUT / "folder" / cls / f"{i}.png"
            img.save(dst)
            files.append((dst, 0 if cls == "animal" else 1))
    norm = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                           torchvision.transforms.Normalize(MEAN, STD)])
    x = torch.stack([norm(Image.open(f).convert("RGB")) for f, _ in files])
    y = torch.tensor([c for _, c in files])

    model = torchvision.models.mobilenet_v2(weights=None).eval()
    bn = hash_state(model)
    manifest, tensors = cx.export(model, (3, 64, 64), "mobilenet-v2-64", mean=MEAN, std=STD)

    torch.manual_seed(0)
    model.classifier[1] = nn.Linear(1280, 2)
    model.classifier[0].p = 0.0
    head0 = {k: v.detach().clone() for k, v in model.classifier[1].state_dict().items()}
    for p in model.features.parameters():
        p.requires_grad_(False)
    model.train()
    model.features.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0005, momentum=0.9)
    losses = []
    for lo, hi in [(0, 4), (4, 8), (0, 4), (4, 8)]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    head = model.classifier[1].state_dict()
    (OUT / "index.json").write_text(json.dumps({
        "manifest": manifest,
        "tensors": [[k, list(t.shape), k.rsplit(".", 1)[0] in bn] for k, t in tensors.items()],
        "folder": "tests/fixtures/finetune/folder",
        "batches": [[0, 4], [4, 8], [0, 4], [4, 8]],
        "optimizer": {"type": "sgd", "lr": 0.0005, "momentum": 0.9},
        "freeze": ["features"],
        "head_initial": {k: v.flatten().tolist() for k, v in head0.items()},
        "losses": losses,
        "head_final": {k: v.flatten().tolist() for k, v in head.items()},
        "versions": versions(),
    }) + "\n")
    print("losses", losses)


if __name__ == "__main__":
    main()
