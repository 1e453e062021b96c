"""The bundled ResNet-20 (akamaster/pytorch_resnet_cifar10, real trained
weights) exported as a `graph` manifest from its own PyTorch code (the
ResNetCifar class of inspection.py: option-A shortcuts `F.pad(x[:, :, ::2,
::2], ...)` in a LambdaLayer, `F.avg_pool2d(out, out.size()[3])`,
`out.view(out.size(0), -1)`). Its tensor names are the bundled
checkpoint's, so tests/fixtures/graph/resnet20_cifar10_graph.json is paired
with models/resnet20-cifar10.safetensors; the black-box and browser tests
compare it with the built-in `resnet20-cifar` architecture.

    .venv/bin/python tools/golden/resnet20_graph.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "export"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))

import convscope_export as cx  # noqa: E402
from inspection import ResNetCifar  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

builtin = json.loads((ROOT / "models" / "resnet20-cifar10.json").read_text())
m = ResNetCifar(3)
m.load_state_dict(load_file(ROOT / "models" / "resnet20-cifar10.safetensors"))
manifest, tensors = cx.export(m.eval(), (3, 32, 32), "resnet20-cifar10-graph", classes=builtin["classes"],
                              mean=builtin["input"]["mean"], std=builtin["input"]["std"], resize=32, center_crop=32)
assert set(tensors) == set(load_file(ROOT / "models" / "resnet20-cifar10.safetensors")), "tensor names differ"
manifest["description"] = "the bundled resnet20-cifar10, exported by tools/export/convscope_export.py from its PyTorch code"
(ROOT / "tests" / "fixtures" / "graph" / "resnet20_cifar10_graph.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(len(manifest["nodes"]), "nodes")
