"""The README's Grad-CAM pictures, made by a running server (default
http://127.0.0.1:8080 serving the bundled models):

- docs/img/gradcam-methods.png: overlays of the seven methods on four CIFAR-10
  test images (ResNet-20, predicted class, default layer), each 32x32 overlay
  enlarged 4x with nearest neighbour for display;
- docs/img/gradcam-mobilenet-cat.png: the default overlay of MobileNet on a
  full-size photo, as the server returns it.

    .venv/bin/python tools/docs/gradcam_montage.py
"""

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from common import post_image  # noqa: E402

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
METHODS = ["gradcam", "gradcam%2B%2B", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam"]
IMAGES = ["test0000_cat", "test0003_airplane", "test0012_dog", "test0013_horse"]
TILE, PAD, HEAD = 128, 4, 16


def main():
    out = Image.new("RGB", (PAD + (len(METHODS) + 1) * (TILE + PAD), HEAD + PAD + len(IMAGES) * (TILE + PAD)), "white")
    draw = ImageDraw.Draw(out)
    for col, name in enumerate(["input"] + [m.replace("%2B", "+") for m in METHODS]):
        draw.text((PAD + col * (TILE + PAD) + 4, 2), name, fill=(40, 40, 40))
    for row, stem in enumerate(IMAGES):
        path = ROOT / "data" / "cifar10" / "samples" / f"{stem}.png"
        y = HEAD + PAD + row * (TILE + PAD)
        out.paste(Image.open(path).convert("RGB").resize((TILE, TILE), Image.NEAREST), (PAD, y))
        for col, method in enumerate(METHODS, start=1):
            png = post_image(f"{URL}/models/resnet20-cifar10/gradcam?method={method}", path)
            tile = Image.open(io.BytesIO(png)).convert("RGB").resize((TILE, TILE), Image.NEAREST)
            out.paste(tile, (PAD + col * (TILE + PAD), y))
    out.save(ROOT / "docs" / "img" / "gradcam-methods.png")
    cat = post_image(f"{URL}/models/mobilenet-v1-0.25-128/gradcam", ROOT / "data" / "imagenet" / "samples" / "cat.png")
    (ROOT / "docs" / "img" / "gradcam-mobilenet-cat.png").write_bytes(cat)


if __name__ == "__main__":
    main()
