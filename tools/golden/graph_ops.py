"""Every op of the graph IR against PyTorch, forward and backward
(tests/fixtures/graph/ops.json).

Each case is a small module `f` wrapped as `flatten(f(x), 1)`, exported with
tools/export/convscope_export.py at input [3, 6, 6] with random weights
(and batch-norm statistics), then run in PyTorch on a batch of 2 random
inputs. Recorded: the input, the output, and for the loss sum(output * r)
(r random, recorded) the gradient with respect to the input and to every
parameter. The Rust test (graph_ops.rs) replays it through the interpreter
and candle's autograd.

    .venv/bin/python tools/golden/graph_ops.py
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import LayerNorm2d

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "export"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))
import convscope_export as cx  # noqa: E402
from versions import versions  # noqa: E402


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return torch.flatten(self.fn(self, x), 1)


def chunk_split(m, x):
    a, b = x.chunk(2, dim=2)
    s1, s2 = torch.split(x, [1, 2], dim=1)
    return torch.cat([torch.cat([b * 2, a], 2), s1, s2 * 3], 1)


def case(fn, **modules):
    return Fn(fn, **modules)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, 1, 1))

    def forward(self, x):
        return torch.flatten(x * self.scale, 1)


CASES = {
    "conv2d_stride_pad_bias": lambda: case(lambda m, x: m.c(x), c=nn.Conv2d(3, 4, 3, stride=2, padding=1)),
    "conv2d_groups_dilation_same": lambda: case(lambda m, x: m.c(x), c=nn.Conv2d(3, 6, 3, padding="same", dilation=2, groups=3, bias=False)),
    "conv2d_rect_kernel": lambda: case(lambda m, x: m.c(x), c=nn.Conv2d(3, 2, (1, 3), padding=(0, 1))),
    "batch_norm2d": lambda: case(lambda m, x: m.bn(x), bn=nn.BatchNorm2d(3)),
    "layer_norm_last_dim": lambda: case(lambda m, x: m.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ln=nn.LayerNorm(3)),
    "layer_norm2d": lambda: case(lambda m, x: m.ln(x), ln=LayerNorm2d(3)),
    "linear_on_last_dim": lambda: case(lambda m, x: m.fc(x), fc=nn.Linear(6, 5)),
    "relu": lambda: case(lambda m, x: F.relu(x)),
    "relu6": lambda: case(lambda m, x: F.relu6(x * 4)),
    "leaky_relu": lambda: case(lambda m, x: F.leaky_relu(x, 0.2)),
    "hardswish": lambda: case(lambda m, x: F.hardswish(x * 3)),
    "hardsigmoid": lambda: case(lambda m, x: F.hardsigmoid(x * 3)),
    "silu": lambda: case(lambda m, x: F.silu(x)),
    "sigmoid": lambda: case(lambda m, x: torch.sigmoid(x)),
    "gelu": lambda: case(lambda m, x: F.gelu(x)),
    "gelu_tanh": lambda: case(lambda m, x: F.gelu(x, approximate="tanh")),
    "tanh": lambda: case(lambda m, x: torch.tanh(x)),
    "softmax": lambda: case(lambda m, x: F.softmax(x, dim=1)),
    "add_sub_mul_div_broadcast": lambda: case(lambda m, x: (x + x.mean((2, 3), keepdim=True)) * x - x / (x * x + 1.0)),
    "scalar_forms": lambda: case(lambda m, x: (1.5 - x) * 2.0 + 3.0 / (x * x + 1.0) - x / 4.0),
    "cat": lambda: case(lambda m, x: torch.cat([x, F.relu(x), x * 2], 1)),
    "reshape_permute_transpose": lambda: case(lambda m, x: x.view(x.size(0), 3, 36).transpose(1, 2).permute(0, 2, 1).reshape(x.size(0), 9, 12)),
    "chunk_split": lambda: case(chunk_split),
    "mean": lambda: case(lambda m, x: x.mean(3)),
    "slice_and_pad": lambda: case(lambda m, x: F.pad(x[:, 1:, ::2, 1:5:3], (1, 2, 0, 1, 2, 2))),
    "mean_keepdim": lambda: case(lambda m, x: x * x.mean((2, 3), keepdim=True)),
    "max_pool_pad_ceil": lambda: case(lambda m, x: m.p(x), p=nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
    "avg_pool_ceil_no_pad_count": lambda: case(lambda m, x: m.p(x), p=nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)),
    "avg_pool_functional": lambda: case(lambda m, x: F.avg_pool2d(x, 2)),
    "adaptive_avg_pool_uneven": lambda: case(lambda m, x: m.p(x), p=nn.AdaptiveAvgPool2d((4, 4))),
    "adaptive_max_pool": lambda: case(lambda m, x: m.p(x), p=nn.AdaptiveMaxPool2d((4, 3))),
    "dropouts_and_identity_in_eval": lambda: case(lambda m, x: m.d2(m.d(m.i(x))), d=nn.Dropout(0.3), d2=nn.Dropout2d(0.3), i=nn.Identity()),
    "parameter_as_tensor": Scale,
}


def flat(t):
    return [float(f"{float(v):.9g}") for v in t.detach().flatten().tolist()]


def main():
    out = {}
    for name, make in CASES.items():
        torch.manual_seed(sum(map(ord, name)))
        m = make()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
                if isinstance(mod, (nn.LayerNorm,)):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
        m.eval()
        manifest, tensors = cx.export(m, (3, 6, 6), name.replace("_", "-"))
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        y = m(x)
        r = torch.randn_like(y)
        (y * r).sum().backward()
        grads = {k: flat(p.grad) for k, p in m.named_parameters() if p.grad is not None}
        out[name] = {
            "manifest": manifest,
            "tensors": {k: {"shape": list(t.shape), "data": flat(t)} for k, t in tensors.items()},
            "x": flat(x), "y": flat(y), "y_shape": list(y.shape), "r": flat(r),
            "grad_x": flat(x.grad), "grad_params": grads,
            "ops": sorted({n["op"] for n in manifest["nodes"]}),
        }
        print(name, out[name]["ops"])
    ops = sorted({o for c in out.values() for o in c["ops"]})
    print("ops covered:", ops)
    (ROOT / "tests" / "fixtures" / "graph" / "ops.json").write_text(
        json.dumps({"cases": out, "ops": ops, "versions": versions()}) + "\n")


if __name__ == "__main__":
    main()
