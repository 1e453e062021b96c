"""Real `torch.save` files for the `.pth` upload tests (tests/fixtures/pth/).

- cnn_a.pth: the bundled CNN_A's weights (models/cnn-a-mnist.safetensors)
  as an OrderedDict state_dict, exactly what torch.save(model.state_dict())
  writes; the tests check it gives the same logits as the safetensors.
- tiny_*: a small nn.Sequential (its manifest is tiny.json):
  state_dict.pth (model.state_dict()), checkpoint.pth (a training
  checkpoint: {"epoch", "state_dict" with DataParallel's `module.` prefix,
  "optimizer"}), legacy.pth (_use_new_zipfile_serialization=False),
  script.pt (torch.jit.script), missing.pth (a zip whose data record for
  one tensor was removed), int64.pth (a weight saved as int64).

    .venv/bin/python tools/golden/pth_fixtures.py
"""

import collections
import io
import json
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from versions import versions

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "pth"


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = collections.OrderedDict()
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.float32).reshape(v["shape"]).clone()
    return out


def tiny():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.eval()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    sd = read_safetensors(ROOT / "models" / "cnn-a-mnist.safetensors")
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    torch.save(sd, OUT / "cnn_a.pth")

    m = tiny()
    manifest = {"name": "tiny-pth", "architecture": "sequential",
                "layers": [
                    {"name": "0", "type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3},
                    {"name": "1", "type": "batch_norm2d", "num_features": 4},
                    {"name": "2", "type": "relu"},
                    {"name": "3", "type": "flatten"},
                    {"name": "4", "type": "linear", "in_features": 144, "out_features": 3}],
                "input": {"channels": 1, "height": 8, "width": 8}, "classes": ["a", "b", "c"]}
    from PIL import Image
    import numpy as np

    pixels = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(pixels, mode="L").save(OUT / "tiny.png")
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(1, 1, 8, 8)
    with torch.no_grad():
        logits = m(x)[0].tolist()
    (OUT / "tiny.json").write_text(json.dumps({"manifest": manifest, "image": "tests/fixtures/pth/tiny.png",
                                               "logits": logits, "versions": versions()}, indent=1) + "\n")
    torch.save(m.state_dict(), OUT / "tiny_state_dict.pth")
    torch.save({"epoch": 3, "state_dict": collections.OrderedDict(("module." + k, v) for k, v in m.state_dict().items()),
                "optimizer": {"lr": 0.1, "momentum": 0.9}}, OUT / "tiny_checkpoint.pth")
    torch.save(m.state_dict(), OUT / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(m), OUT / "tiny_script.pt")
    bad = m.state_dict()
    bad["0.weight"] = bad["0.weight"].round().to(torch.int64)
    torch.save(bad, OUT / "tiny_int64.pth")
    # A zip with one tensor's data record removed (a truncated copy, say).
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    records = sorted(n for n in src.namelist() if "/data/" in n and not n.endswith(".pkl"))
    with zipfile.ZipFile(OUT / "tiny_missing.pth", "w") as dst:
        for n in src.namelist():
            if n != records[0]:
                dst.writestr(src.getinfo(n), src.read(n))
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
