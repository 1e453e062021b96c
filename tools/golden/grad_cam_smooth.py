"""pytorch-grad-cam 1.5.7 fixtures for `aug_smooth`, `eigen_smooth` and
AblationCAM (tests/fixtures/gradcam/smooth.json).

Each case is a (model, layer, method, options) with the normalised CAM
pytorch-grad-cam computes at the layer's resolution (its target size set to
the layer's, as in grad_cam.py), for the predicted class. `eigen_smooth`
projects on an SVD component whose sign is arbitrary, so those cases carry
a second map, `cam_sign_corrected`, from pytorch-grad-cam's own
`get_2d_projection_with_sign_correction` (Seg-Eigen-CAM's rule, which
convscope uses); either is a valid answer.
Models: ResNet-20 (real weights, CIFAR-10 test image 0, `layer3`), the
bundled CNN_A (MNIST test digit 0, `conv2` and `relu2`), torchvision
ResNet-18 with hash weights (224x224 Grace Hopper, `layer4.1`).

    .venv/bin/python tools/golden/grad_cam_smooth.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import pytorch_grad_cam.base_cam as base_cam
import pytorch_grad_cam.hirescam as hirescam
import pytorch_grad_cam.layer_cam as layer_cam
from pytorch_grad_cam import AblationCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_with_sign_correction
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gradcam"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from train_cnn_a import LAYERS as CNN_A_LAYERS, build as build_cnn_a  # noqa: E402
from torchvision_hash import hash_state  # noqa: E402
from inspection import ResNetCifar  # noqa: E402
from grad_cam import tensor, IMAGENET  # noqa: E402

from versions import versions  # tools/golden/versions.py

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "xgradcam": XGradCAM,
           "layercam": LayerCAM, "ablationcam": AblationCAM}
PROJECTING = (base_cam, hirescam, layer_cam)


def layer_shape(model, module, x):
    shape = None

    def grab(_m, _i, o):
        nonlocal shape
        shape = tuple(o.shape[-2:])
    h = module.register_forward_hook(grab)
    with torch.no_grad():
        logits = model(x)[0]
    h.remove()
    return shape, int(logits.argmax())


def run(model, x, layer, method, cls, shape, aug, eigen, projection):
    for m in PROJECTING:
        m.get_2d_projection = projection
    module = dict(model.named_modules())[layer]
    cam = METHODS[method](model=model, target_layers=[module])
    cam.get_target_width_height = lambda _x, s=shape: (s[1], s[0])
    out = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)], aug_smooth=aug, eigen_smooth=eigen)[0]
    for m in PROJECTING:
        m.get_2d_projection = get_2d_projection
    return out.astype(np.float32)


def cases(key, model_name, model, image, x, plan):
    out = []
    for layer, method, aug, eigen in plan:
        module = dict(model.named_modules())[layer]
        shape, cls = layer_shape(model, module, x)
        entry = {"key": key, "model": model_name, "image": image, "layer": layer, "method": method,
                 "aug_smooth": aug, "eigen_smooth": eigen, "class_index": cls, "shape": list(shape),
                 "cam": run(model, x, layer, method, cls, shape, aug, eigen, get_2d_projection).tolist()}
        if eigen:
            entry["cam_sign_corrected"] = run(model, x, layer, method, cls, shape, aug, eigen,
                                              get_2d_projection_with_sign_correction).tolist()
        out.append(entry)
        print(key, layer, method, "aug" if aug else "", "eigen" if eigen else "", cls)
    return out


def main():
    torch.set_num_threads(2)
    fixtures = []

    net = ResNetCifar(3).eval()
    net.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
    img = "data/cifar10/samples/test0000_cat.png"
    fixtures += cases("resnet20", "resnet20-cifar10", net, img, tensor(img, "RGB", *IMAGENET), [
        ("layer3", "gradcam", True, False), ("layer3", "gradcam", False, True), ("layer3", "gradcam", True, True),
        ("layer3", "gradcam++", False, True), ("layer3", "hirescam", False, True),
        ("layer3", "xgradcam", False, True), ("layer3", "layercam", False, True),
        ("layer3", "ablationcam", False, False), ("layer3", "ablationcam", True, False),
        ("layer2", "ablationcam", False, False),
    ])

    net = build_cnn_a(CNN_A_LAYERS).eval()
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    img = "data/mnist/samples/test0000_digit7.png"
    fixtures += cases("cnn_a", "cnn-a-mnist", net, img, tensor(img, "L", [0.1307], [0.3081]), [
        ("conv2", "gradcam", True, False), ("conv2", "gradcam", False, True), ("conv2", "layercam", True, True),
        ("relu2", "ablationcam", False, False),
    ])

    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    img = "tests/fixtures/torchvision/grace_hopper_224.png"
    fixtures += cases("resnet18", "resnet18-hash", net, img, tensor(img, "RGB", *IMAGENET), [
        ("layer4.1", "gradcam", True, False), ("layer4.1", "gradcam", False, True),
        ("layer4.1", "hirescam", False, True),
    ])

    (OUT / "smooth.json").write_text(json.dumps({"cases": fixtures, "versions": versions()}) + "\n")


if __name__ == "__main__":
    main()
