"""The versions a fixture was generated with, recorded in the fixture.

Every generator in tools/golden/ puts `versions()` into the JSON it
writes, so a fixture says which PyTorch, torchvision, pytorch-grad-cam and
NumPy made its numbers (tools/golden/requirements.txt pins them).
"""

import importlib.metadata
import platform


def versions():
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "grad-cam", "captum", "numpy", "pillow", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
