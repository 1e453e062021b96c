"""Fixtures for POST /models/{m}/faithfulness (tests/fixtures/faithfulness).

For each (model, image, method) the map at the input's size and the scores:
- `deletion` (zero and blur baselines) and `insertion`, 20 steps, by a NumPy
  implementation of the contract's definition (below), the model run by
  PyTorch;
- `road_morf`, `road_lerf`: pytorch-grad-cam 1.5.7's
  ROADMostRelevantFirstAverage / ROADLeastRelevantFirstAverage with
  NoisyLinearImputer's noise at 0 and ClassifierOutputSoftmaxTarget;
- `drop_in_confidence`, `increase_in_confidence`: its DropInConfidence /
  IncreaseInConfidence, the same target.
Maps: pytorch-grad-cam's GradCAM (its cam at the input's size) and Captum's
InputXGradient summed over channels. Models: ResNet-20 (CIFAR-10 test
image 0, `layer3`), the bundled CNN_A (MNIST test digit 0, `relu2`).

    .venv/bin/python tools/golden/faithfulness.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
from captum.attr import InputXGradient
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics import road
from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "faithfulness"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from train_cnn_a import LAYERS as CNN_A_LAYERS, build as build_cnn_a  # noqa: E402
from inspection import ResNetCifar  # noqa: E402
from grad_cam import tensor, IMAGENET  # noqa: E402

from versions import versions  # tools/golden/versions.py

STEPS = 20
SIGMA = 5.0

# ROAD with the imputer's noise at 0 (its default is 0.01).
road.NoisyLinearImputer.__init__.__defaults__ = (0.0, road.neighbors_weights)


def blur(x):
    """Gaussian, sigma 5 px, per channel: scipy's defaults (truncate 4, mirrored borders)."""
    return np.stack([scipy.ndimage.gaussian_filter(p.astype(np.float64), SIGMA) for p in x]).astype(np.float32)


def probabilities(model, batch, cls):
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(batch)), dim=-1)[:, cls].numpy()


def curve(model, x, cls, saliency, start, source):
    """The contract's deletion/insertion: rank positions highest first (stable: ties keep the lower
    index first), then for i = 0..STEPS put the first floor(i*H*W/STEPS) positions of `source` into
    `start`, all channels."""
    c, h, w = x.shape
    order = np.argsort(-saliency.ravel(), kind="stable")
    batch = []
    for i in range(STEPS + 1):
        k = i * h * w // STEPS
        img = start.copy().reshape(c, -1)
        img[:, order[:k]] = source.reshape(c, -1)[:, order[:k]]
        batch.append(img.reshape(c, h, w))
    ys = probabilities(model, np.stack(batch), cls)
    return ys, float(np.sum((ys[1:] + ys[:-1]) / 2) / STEPS)


def scores(model, x, cls, saliency):
    x0 = x[0].numpy()
    out, curves = {}, {}
    for name, start, source in [("deletion", x0, np.zeros_like(x0)), ("deletion_blur", x0, blur(x0)),
                                ("insertion", blur(x0), x0)]:
        ys, area = curve(model, x0, cls, saliency, start, source)
        out[name], curves[name] = area, ys.tolist()
    target = [ClassifierOutputSoftmaxTarget(cls)]
    cams = saliency[None].astype(np.float32)
    out["road_morf"] = float(ROADMostRelevantFirstAverage()(x, cams, target, model)[0])
    out["road_lerf"] = float(ROADLeastRelevantFirstAverage()(x, cams, target, model)[0])
    out["drop_in_confidence"] = float(DropInConfidence()(x, cams, target, model)[0])
    out["increase_in_confidence"] = float(IncreaseInConfidence()(x, cams, target, model)[0])
    return out, curves


def case(key, model_name, model, image, x, layer):
    model.eval()
    with torch.no_grad():
        cls = int(model(x)[0].argmax())
    module = dict(model.named_modules())[layer]
    cam = GradCAM(model=model, target_layers=[module])(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
    ixg = InputXGradient(model).attribute(x.clone().requires_grad_(True), target=cls)[0].sum(0).detach().numpy()
    out = []
    for method, saliency in [("gradcam", cam), ("input_x_gradient", ixg)]:
        s, curves = scores(model, x, cls, saliency.astype(np.float32))
        out.append({"key": key, "model": model_name, "image": image, "layer": layer, "method": method,
                    "class_index": cls, "map": saliency.astype(np.float32).tolist(), "scores": s,
                    "curves": curves})
        print(key, method, cls, s)
    return out


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    net = ResNetCifar(3)
    net.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    img = "data/cifar10/samples/test0000_cat.png"
    cases += case("resnet20", "resnet20-cifar10", net, img, tensor(img, "RGB", *IMAGENET), "layer3")
    net = build_cnn_a(CNN_A_LAYERS)
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    img = "data/mnist/samples/test0000_digit7.png"
    cases += case("cnn_a", "cnn-a-mnist", net, img, tensor(img, "L", [0.1307], [0.3081]), "relu2")
    (OUT / "index.json").write_text(json.dumps({"steps": STEPS, "cases": cases, "versions": versions()}) + "\n")


if __name__ == "__main__":
    main()
