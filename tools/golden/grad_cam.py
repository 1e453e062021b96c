"""pytorch-grad-cam 1.5.x fixtures for the seven methods (tests/fixtures/gradcam).

For each (model, layer): the normalised CAM at the layer's resolution from
pytorch-grad-cam itself (its target size set to the layer's, so its final
cv2.resize is the identity), for the predicted class and one other class.
Models: torchvision ResNet-18 (`layer4.1`, `layer3.1`; hash weights as in
torchvision_hash.py, 224x224 Grace Hopper; ScoreCAM on the 64x64 crop, as it
runs one forward pass per channel), the bundled CNN_A (`conv2`, MNIST
test digit 0) and torchvision AlexNet (`features.11`, the ReLU after the last
conv, whose gradient passes a 3x3/2 max-pool; hash weights, the 128x128 Grace Hopper).

    .venv/bin/pip install grad-cam
    .venv/bin/python tools/golden/grad_cam.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gradcam"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
from train_cnn_a import LAYERS as CNN_A_LAYERS, build as build_cnn_a  # noqa: E402
from torchvision_hash import hash_state  # noqa: E402

from versions import versions  # tools/golden/versions.py

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "xgradcam": XGradCAM,
           "layercam": LayerCAM, "eigencam": EigenCAM, "scorecam": ScoreCAM}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def tensor(path, mode, mean, std):
    img = Image.open(ROOT / path).convert(mode)
    return torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std),
    ])(img).unsqueeze(0)


def cams(model, x, layer_name, methods, other_class):
    module = dict(model.named_modules())[layer_name]
    with torch.no_grad():
        logits = model(x)[0]
        shape = None

        def grab(_m, _i, o):
            nonlocal shape
            shape = tuple(o.shape[-2:])
        h = module.register_forward_hook(grab)
        model(x)
        h.remove()
    predicted = int(logits.argmax())
    out = []
    for cls in [predicted, other_class]:
        for name in methods:
            cam = METHODS[name](model=model, target_layers=[module])
            # Keep the CAM at the layer's resolution: cv2.resize to the same size is the identity.
            cam.get_target_width_height = lambda _x, s=shape: (s[1], s[0])
            if name == "scorecam":
                cam.batch_size = 64
            grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
            out.append({"method": name, "class_index": cls, "cam": grayscale.astype(np.float32).tolist()})
    return {"layer": layer_name, "shape": list(shape), "predicted": predicted, "cams": out}


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    all_methods = list(METHODS)
    fixtures = {}

    net = torchvision.models.resnet18(weights=None).eval()
    hash_state(net)
    image = "tests/fixtures/torchvision/grace_hopper_224.png"
    x = tensor(image, "RGB", *IMAGENET)
    gradient_methods = [m for m in all_methods if m != "scorecam"]
    fixtures["resnet18"] = {"model": "resnet18-hash", "input": 224, "image": image,
                            "layers": [cams(net, x, "layer4.1", gradient_methods, 3),
                                       cams(net, x, "layer3.1", gradient_methods, 3)]}
    # ScoreCAM needs one forward pass per channel (512 + 256 here): a 64x64 input keeps that quick.
    image = "tests/fixtures/inspection/grace_hopper_64.png"
    x = tensor(image, "RGB", *IMAGENET)
    fixtures["resnet18_scorecam"] = {"model": "resnet18-hash", "input": 64, "image": image,
                                     "layers": [cams(net, x, "layer4.1", ["scorecam"], 3),
                                                cams(net, x, "layer3.1", ["scorecam"], 3)]}

    net = build_cnn_a(CNN_A_LAYERS).eval()
    net.load_state_dict(load_file(ROOT / "models" / "cnn-a-mnist.safetensors"))
    image = "data/mnist/samples/test0000_digit7.png"
    x = tensor(image, "L", [0.1307], [0.3081])
    fixtures["cnn_a"] = {"model": "cnn-a-mnist", "image": image, "layers": [cams(net, x, "conv2", all_methods, 1)]}

    net = torchvision.models.alexnet(weights=None).eval()
    hash_state(net)
    image = "data/imagenet/samples/grace_hopper_128x128.png"
    x = tensor(image, "RGB", *IMAGENET)
    fixtures["alexnet"] = {"model": "alexnet-hash", "input": 128, "image": image,
                           # features.11, the ReLU after the last conv: pytorch-grad-cam keeps the hooked
                           # output without copying it, so for features.10 (followed by an in-place ReLU)
                           # it would silently use the rectified values anyway.
                           "layers": [cams(net, x, "features.11", ["gradcam", "layercam"], 3)]}

    for key, value in fixtures.items():
        (OUT / f"{key}.json").write_text(json.dumps(value) + "\n")
        print(key, [(l["layer"], l["shape"], l["predicted"]) for l in value["layers"]])


if __name__ == "__main__":
    main()
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
