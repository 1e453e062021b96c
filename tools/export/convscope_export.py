#!/usr/bin/env python3
"""Export a PyTorch CNN as a convscope `graph` manifest and its safetensors.

    python convscope_export.py TARGET --input C,H,W --name NAME --out DIR
           [--weights FILE] [--classes a,b,...] [--mean m,... --std s,...]
           [--resize N] [--center-crop N]

TARGET is `path/to/file.py:factory`, `package.module:factory` or
`torchvision:NAME` (a torchvision.models builder, called with weights=None).
The factory is called with no arguments and returns an nn.Module.

How it works: the model is put in eval mode and traced with torch.fx. Every
fx node becomes one manifest node, in topological order:

- a call of a leaf module (Conv2d, BatchNorm2d, ReLU, ...) is named by its
  module path (`features.0.0`); a second call of the same module gets `_1`,
  a third `_2`, ...: the k-th output a forward hook on it sees;
- a functional step keeps its fx name (`add`, `cat_1`, `flatten`);
- a container module (`layer1.0`, `features.3`) has no node of its own: its
  output is the output of some node, which lists it in `aliases`, so that
  `/activations/layer1.0` is what a hook on `layer1.0` sees.

Shapes are resolved with the example input (shape propagation at batch 2):
`x.view(x.size(0), -1)` becomes a reshape to a fixed per-sample shape, and a
chunk or split becomes one `narrow` per piece, so the manifest holds no
Python arithmetic. A node the format cannot express stops the export with a
message naming the node, its operation and the module it comes from; the
exit status is then 2.

The manifest carries a `check` entry: a deterministic input (splitmix64 of
FNV-1a("convscope.check"), uniform in [-1, 1)) and the logits PyTorch gives
for it. convscope recomputes them when the model is registered.

Needs Python with torch (torchvision for `torchvision:` targets); runs
offline. Nothing is unpickled but with `torch.load(weights_only=True)`.
"""

import argparse
import importlib
import importlib.util
import json
import math
import operator
import sys
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

FORMAT_VERSION = 1
CHECK_SEED_NAME = "convscope.check"
MASK = (1 << 64) - 1


class ExportError(Exception):
    """A node the manifest format cannot express."""


# --------------------------------------------------------------------------
# The deterministic check input, computed identically by convscope (Rust).


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def splitmix_uniform(name, n):
    """u[i] in [0, 1): splitmix64(FNV-1a(name) XOR i) >> 11, times 2^-53 (pure
    Python, so that the exporter needs torch only)."""
    seed = fnv1a64(name)
    out = []
    for i in range(n):
        x = ((seed ^ i) + 0x9E3779B97F4A7C15) & MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
        x ^= x >> 31
        out.append((x >> 11) * 2.0**-53)
    return out


def check_input(c, h, w):
    u = torch.tensor(splitmix_uniform(CHECK_SEED_NAME, c * h * w), dtype=torch.float64)
    return (2 * u - 1).to(torch.float32).reshape(1, c, h, w)


# --------------------------------------------------------------------------
# Loading the target and its weights.


def load_target(target):
    if ":" not in target:
        raise SystemExit(f"TARGET must be file.py:factory, module:factory or torchvision:NAME, got {target!r}")
    where, factory = target.rsplit(":", 1)
    if where == "torchvision":
        import torchvision

        builder = getattr(torchvision.models, factory, None)
        if builder is None or not callable(builder):
            raise SystemExit(f"torchvision.models has no builder {factory!r}")
        kwargs = {"weights": None}
        if factory in ("googlenet", "inception_v3"):
            # Without pretrained weights these default to aux heads that run
            # only in training; keep them (their weights are in the state_dict).
            kwargs["init_weights"] = True
        return builder(**kwargs)
    if where.endswith(".py"):
        path = Path(where)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None:
            raise SystemExit(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj = getattr(module, factory, None)
    if obj is None:
        raise SystemExit(f"{where} has no {factory!r}")
    model = obj()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{target} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model, path):
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


# The safetensors format, by hand (8-byte little-endian header length, JSON
# header, raw little-endian data), so that the exporter needs torch only.

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def tensor_bytes(t):
    try:
        return t.numpy().tobytes()  # NumPy is nearly always beside torch...
    except (RuntimeError, ImportError):
        import array  # ...but is not required

        return array.array("f", t.flatten().tolist()).tobytes()


def write_safetensors(tensors, path):
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        data = tensor_bytes(t.detach().to(torch.float32).contiguous())
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(body[start:end])
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[info["dtype"]])
        out[key] = t.reshape(info["shape"]).clone()
    return out


# --------------------------------------------------------------------------
# Tracing: leaf modules stay calls; containers are traced through and their
# outputs remembered.

LEAF_CLASSES = ("LayerNorm2d",)


class Tracer(torch.fx.Tracer):
    def __init__(self):
        super().__init__()
        self.container_outputs = []  # (module path, fx node), in call order

    def is_leaf_module(self, m, qualname):
        if type(m).__name__ in LEAF_CLASSES and isinstance(m, nn.LayerNorm):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        if path and not self.is_leaf_module(m, path) and isinstance(out, torch.fx.Proxy):
            self.container_outputs.append((path, out.node))
        return out


def fold_python_values(gm, c, h, w):
    """Replaces arguments computed in Python from tensor sizes (`x.size(3)`,
    `out.size()[3]`) by their values, which are fixed by the input size. A
    value that changes with the batch size (`x.size(0)`) stays: only a
    reshape may use it, and a reshape takes its shape from shape propagation."""
    runs = []
    for n in (2, 3):
        values = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                if isinstance(out, (int, float, torch.Size)) or (
                        isinstance(out, tuple) and all(isinstance(v, int) for v in out)):
                    values[node] = out
                return out

        Record(gm).run(torch.zeros(n, c, h, w))
        runs.append(values)
    fixed = {k: v for k, v in runs[0].items() if runs[1].get(k) == v}

    def sub(a):
        if isinstance(a, torch.fx.Node) and a in fixed:
            v = fixed[a]
            return tuple(v) if isinstance(v, torch.Size) else v
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.args = tuple(sub(a) for a in node.args)
            node.kwargs = {k: sub(v) for k, v in node.kwargs.items()}


def pair(v):
    if isinstance(v, torch.fx.Node) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.fx.Node) for x in v)):
        raise ExportError(f"an argument computed from the input ({v}) that changes with the batch size")
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return [int(v[0]), int(v[0])]
        return [int(v[0]), int(v[1])]
    return [int(v), int(v)]


def arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class Exporter:
    def __init__(self, model, gm, tracer, batch_shape):
        self.model = model
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.tracer = tracer
        self.batch = batch_shape[0]
        self.names = {}  # fx node -> manifest name (tensor-valued nodes only)
        self.calls = {}  # module path -> number of calls so far
        self.nodes = []
        self.tensors = set()  # state_dict keys the graph uses
        self.output = None

    # -- helpers ----------------------------------------------------------

    def fail(self, node, why):
        source = node.meta.get("nn_module_stack")
        where = ""
        if source:
            path, cls = list(source.values())[-1]
            where = f" (in module '{path}' of type {getattr(cls, '__name__', cls)})"
        elif node.op == "call_module":
            where = f" (module '{node.target}' of type {type(self.modules[node.target]).__name__})"
        else:
            where = f" (in the forward of the top-level {type(self.model).__name__})"
        raise ExportError(f"node '{node.name}' ({node.op} {self.describe(node)}){where}: {why}")

    @staticmethod
    def describe(node):
        t = node.target
        if callable(t):
            return getattr(t, "__module__", "") + "." + getattr(t, "__name__", repr(t))
        return str(t)

    def meta_shape(self, node):
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            return None
        return list(tm.shape)

    def ref(self, node, value):
        """The manifest name of a tensor-valued argument."""
        if not isinstance(value, torch.fx.Node):
            self.fail(node, f"expected a tensor argument, got {type(value).__name__} {value!r}")
        if value not in self.names:
            self.fail(node, f"its input '{value.name}' is not a tensor convscope can follow")
        return self.names[value]

    def emit(self, node, name, op, inputs, **attrs):
        entry = {"name": name, "op": op, "inputs": inputs}
        entry.update(attrs)
        self.nodes.append(entry)
        self.names[node] = name
        return entry

    def use_params(self, path, module, names):
        for n in names:
            if getattr(module, n, None) is not None:
                self.tensors.add(f"{path}.{n}")

    # -- the walk --------------------------------------------------------------

    def run(self):
        aliases = {}
        for path, fx_node in self.tracer.container_outputs:
            aliases.setdefault(fx_node, [])
            k = sum(1 for p, _ in self.tracer.container_outputs[: self.tracer.container_outputs.index((path, fx_node))]
                    if p == path)
            aliases[fx_node].append(path if k == 0 else f"{path}_{k}")
        for node in self.gm.graph.nodes:
            self.visit(node)
            if node in aliases and node in self.names:
                entry = next(e for e in reversed(self.nodes) if e["name"] == self.names[node])
                entry.setdefault("aliases", []).extend(a for a in aliases[node] if a != entry["name"])
        if self.output is None:
            raise ExportError("the model returns nothing convscope can follow")

    def visit(self, node):
        if node.op == "placeholder":
            if any(n.op == "placeholder" for n in self.names if n is not node):
                self.fail(node, "the model takes more than one input")
            self.names[node] = "input"
            return
        if node.op == "output":
            value = node.args[0]
            if not isinstance(value, torch.fx.Node) or value not in self.names:
                self.fail(node, "the model must return one tensor of class scores (eval mode)")
            self.output = self.names[value]
            return
        if node.op == "get_attr":
            value = self.fetch_attr(node.target)
            if isinstance(value, torch.Tensor):
                if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    self.fail(node, f"tensor attribute of dtype {value.dtype}")
                self.tensors.add(node.target)
                self.emit(node, node.name, "parameter", [], target=node.target, shape=list(value.shape))
            return  # other attributes are constants folded into their users
        shape = self.meta_shape(node)
        if shape is None:
            return  # a Python value (x.size(), a tuple from chunk): resolved in its users
        if shape[0] != self.batch:
            self.fail(node, f"its output {shape} does not keep the batch dimension first")
        if node.op == "call_module":
            self.module_call(node)
        elif node.op in ("call_function", "call_method"):
            self.function_call(node)
        else:
            self.fail(node, "unsupported fx node kind")

    def fetch_attr(self, target):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    # -- modules ---------------------------------------------------------------

    def module_call(self, node):
        path = node.target
        m = self.modules[path]
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        name = path if k == 0 else f"{path}_{k}"
        x = self.ref(node, node.args[0]) if node.args else self.fail(node, "a module call without input")
        if len(node.args) != 1 or node.kwargs:
            self.fail(node, "a module called with more than one argument")
        cls = type(m).__name__
        entry = dict(module=path)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                self.fail(node, f"padding_mode={m.padding_mode!r} (only zero padding)")
            padding = m.padding if isinstance(m.padding, str) else pair(m.padding)
            if padding == "valid":
                padding = [0, 0]
            self.use_params(path, m, ["weight", "bias"])
            self.emit(node, name, "conv2d", [x], in_channels=m.in_channels, out_channels=m.out_channels,
                      kernel_size=pair(m.kernel_size), stride=pair(m.stride), padding=padding,
                      dilation=pair(m.dilation), groups=m.groups, bias=m.bias is not None, **entry)
        elif isinstance(m, nn.BatchNorm2d):
            if not m.track_running_stats or m.running_mean is None:
                self.fail(node, "batch norm without running statistics")
            self.use_params(path, m, ["weight", "bias", "running_mean", "running_var"])
            self.emit(node, name, "batch_norm2d", [x], num_features=m.num_features, eps=m.eps,
                      momentum=m.momentum if m.momentum is not None else 0.1, affine=m.affine, **entry)
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                self.fail(node, f"layer norm over {len(m.normalized_shape)} dimensions (only one)")
            self.use_params(path, m, ["weight", "bias"])
            dim = 1 if cls == "LayerNorm2d" else -1
            self.emit(node, name, "layer_norm", [x], normalized_shape=list(m.normalized_shape), eps=m.eps,
                      elementwise_affine=m.weight is not None, bias=m.bias is not None, dim=dim, **entry)
        elif isinstance(m, nn.Linear):
            self.use_params(path, m, ["weight", "bias"])
            self.emit(node, name, "linear", [x], in_features=m.in_features, out_features=m.out_features,
                      bias=m.bias is not None, **entry)
        elif isinstance(m, nn.MaxPool2d):
            if pair(m.dilation) != [1, 1] or m.return_indices:
                self.fail(node, "max pool with dilation or return_indices")
            self.emit(node, name, "max_pool2d", [x], kernel_size=pair(m.kernel_size),
                      stride=pair(m.stride if m.stride is not None else m.kernel_size), padding=pair(m.padding),
                      ceil_mode=bool(m.ceil_mode), **entry)
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                self.fail(node, "avg pool with divisor_override")
            self.emit(node, name, "avg_pool2d", [x], kernel_size=pair(m.kernel_size),
                      stride=pair(m.stride if m.stride is not None else m.kernel_size), padding=pair(m.padding),
                      ceil_mode=bool(m.ceil_mode), count_include_pad=bool(m.count_include_pad), **entry)
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            op = "adaptive_avg_pool2d" if isinstance(m, nn.AdaptiveAvgPool2d) else "adaptive_max_pool2d"
            self.emit(node, name, op, [x], output_size=self.output_size(node, m.output_size), **entry)
        elif isinstance(m, nn.Flatten):
            self.emit(node, name, "flatten", [x], start_dim=m.start_dim, end_dim=m.end_dim, **entry)
        elif isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)):
            op = "dropout2d" if isinstance(m, nn.Dropout2d) else "dropout"
            self.emit(node, name, op, [x], p=float(m.p), **entry)
        elif isinstance(m, nn.Identity):
            self.emit(node, name, "identity", [x], **entry)
        elif isinstance(m, nn.Softmax):
            self.emit(node, name, "softmax", [x], dim=m.dim if m.dim is not None else 1, **entry)
        elif isinstance(m, nn.LeakyReLU):
            self.emit(node, name, "leaky_relu", [x], negative_slope=float(m.negative_slope), **entry)
        elif isinstance(m, nn.GELU):
            self.emit(node, name, "gelu", [x], approximate=m.approximate, **entry)
        elif type(m) in SIMPLE_MODULES:
            self.emit(node, name, SIMPLE_MODULES[type(m)], [x], **entry)
        else:
            self.fail(node, f"module type {cls} has no convscope operation")

    def output_size(self, node, size):
        shape = self.meta_shape(node)
        out = list(size) if isinstance(size, (tuple, list)) else [size, size]
        return [shape[2] if out[0] is None else int(out[0]), shape[3] if out[1] is None else int(out[1])]

    # -- functions and methods -------------------------------------------------

    def function_call(self, node):
        t = node.target
        name = node.name
        x0 = node.args[0] if node.args else None
        if t in BINARY:
            self.binary(node, BINARY[t])
        elif t in UNARY:
            self.emit(node, name, UNARY[t], [self.ref(node, x0)])
        elif t in (F.relu, torch.relu, "relu", F.relu_, "relu_"):
            self.emit(node, name, "relu", [self.ref(node, x0)])
        elif t in (F.leaky_relu, "leaky_relu"):
            self.emit(node, name, "leaky_relu", [self.ref(node, x0)],
                      negative_slope=float(arg(node, 1, "negative_slope", 0.01)))
        elif t in (F.gelu, "gelu"):
            self.emit(node, name, "gelu", [self.ref(node, x0)], approximate=node.kwargs.get("approximate", "none"))
        elif t in (F.softmax, torch.softmax, "softmax"):
            dim = arg(node, 1, "dim")
            if dim is None:
                self.fail(node, "softmax without dim")
            self.emit(node, name, "softmax", [self.ref(node, x0)], dim=int(dim))
        elif t in (F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout) or getattr(
                t, "__name__", "") == "stochastic_depth" or t == "contiguous" or t in ("clone", "detach"):
            if t not in ("contiguous", "clone", "detach") and bool(arg(node, 3, "training", True)) and getattr(
                    t, "__name__", "") == "stochastic_depth":
                self.fail(node, "stochastic depth in training mode")
            self.emit(node, name, "identity", [self.ref(node, x0)])
        elif t in (torch.cat, torch.concat, torch.concatenate):
            tensors = x0
            if not isinstance(tensors, (list, tuple)):
                self.fail(node, "cat of something other than a list")
            self.emit(node, name, "cat", [self.ref(node, v) for v in tensors], dim=self.dim(node, arg(node, 1, "dim", 0)))
        elif t in (torch.flatten, "flatten"):
            self.emit(node, name, "flatten", [self.ref(node, x0)], start_dim=int(arg(node, 1, "start_dim", 0)),
                      end_dim=int(arg(node, 2, "end_dim", -1)))
        elif t in ("view", "reshape", torch.reshape, "view_as", "reshape_as"):
            self.emit(node, name, "reshape", [self.ref(node, x0)], shape=self.meta_shape(node)[1:])
        elif t in (torch.permute, "permute"):
            dims = list(node.args[1:]) if t == "permute" else list(arg(node, 1, "dims"))
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = list(dims[0])
            self.emit(node, name, "permute", [self.ref(node, x0)], dims=[int(d) for d in dims])
        elif t in (torch.transpose, "transpose"):
            self.emit(node, name, "transpose", [self.ref(node, x0)], dim0=int(arg(node, 1, "dim0")),
                      dim1=int(arg(node, 2, "dim1")))
        elif t in (torch.mean, "mean"):
            dims = arg(node, 1, "dim")
            if dims is None:
                self.fail(node, "mean over every dimension (the batch too)")
            dims = [dims] if isinstance(dims, int) else list(dims)
            self.emit(node, name, "mean", [self.ref(node, x0)], dims=[int(d) for d in dims],
                      keepdim=bool(arg(node, 2, "keepdim", False)))
        elif t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            op = "adaptive_avg_pool2d" if t is F.adaptive_avg_pool2d else "adaptive_max_pool2d"
            self.emit(node, name, op, [self.ref(node, x0)], output_size=self.output_size(node, arg(node, 1, "output_size")))
        elif t in (F.max_pool2d, torch.max_pool2d):
            k = arg(node, 1, "kernel_size")
            stride = arg(node, 2, "stride") or k
            if pair(arg(node, 4, "dilation", 1)) != [1, 1]:
                self.fail(node, "max pool with dilation")
            self.emit(node, name, "max_pool2d", [self.ref(node, x0)], kernel_size=pair(k), stride=pair(stride),
                      padding=pair(arg(node, 3, "padding", 0)), ceil_mode=bool(arg(node, 5, "ceil_mode", False)))
        elif t in (F.avg_pool2d, torch._C._nn.avg_pool2d):
            k = arg(node, 1, "kernel_size")
            stride = arg(node, 2, "stride") or k
            if arg(node, 6, "divisor_override") is not None:
                self.fail(node, "avg pool with divisor_override")
            self.emit(node, name, "avg_pool2d", [self.ref(node, x0)], kernel_size=pair(k), stride=pair(stride),
                      padding=pair(arg(node, 3, "padding", 0)), ceil_mode=bool(arg(node, 4, "ceil_mode", False)),
                      count_include_pad=bool(arg(node, 5, "count_include_pad", True)))
        elif t is operator.getitem:
            self.getitem(node)
        elif t in (F.pad, torch.constant_pad_nd):
            pad = list(arg(node, 1, "pad"))
            mode = arg(node, 2, "mode", "constant")
            value = arg(node, 3, "value", 0.0) or 0.0
            if mode != "constant" or value != 0 or any(not isinstance(p, int) or p < 0 for p in pad):
                self.fail(node, f"pad {pad} mode={mode!r} value={value}: only non-negative zero padding")
            self.emit(node, name, "pad", [self.ref(node, x0)], pad=pad)
        else:
            self.fail(node, "this operation has no convscope equivalent")

    def dim(self, node, d):
        if not isinstance(d, int):
            self.fail(node, f"dimension {d!r} is not a constant")
        return d

    def binary(self, node, op):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            self.fail(node, "add/sub with alpha")
        a_t = isinstance(a, torch.fx.Node) and a in self.names
        b_t = isinstance(b, torch.fx.Node) and b in self.names
        if a_t and b_t:
            self.emit(node, node.name, op, [self.names[a], self.names[b]])
        elif a_t and isinstance(b, (int, float)):
            self.emit(node, node.name, op, [self.names[a]], scalar=float(b))
        elif b_t and isinstance(a, (int, float)):
            self.emit(node, node.name, op, [self.names[b]], scalar=float(a), scalar_first=True)
        else:
            self.fail(node, f"operands {a!r} and {b!r} are not tensors or constants")

    def getitem(self, node):
        src, index = node.args
        if not isinstance(src, torch.fx.Node):
            self.fail(node, "indexing a Python value")
        if src.op in ("call_function", "call_method") and src.target in (torch.chunk, "chunk", torch.split, "split"):
            pieces = self.pieces(src)
            if not isinstance(index, int):
                self.fail(node, "a chunk indexed by something other than a constant")
            start, length, dim = pieces[index]
            self.emit(node, node.name, "narrow", [self.ref(node, src.args[0])], dim=dim, start=start, length=length)
            return
        if src in self.names:
            self.slices(node, src, index)
            return
        self.fail(node, "indexing a value convscope does not follow")

    def slices(self, node, src, index):
        """`x[:, :, ::2, 1:]`: one `slice` node per dimension it narrows."""
        index = index if isinstance(index, tuple) else (index,)
        shape = self.meta_shape(src)
        if any(i is Ellipsis for i in index) or len(index) > len(shape):
            self.fail(node, f"tensor indexing x[{index!r}]: give one slice per leading dimension, no ...")
        current = self.names[src]
        steps = []
        for d, i in enumerate(index):
            if not isinstance(i, slice) or any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step)):
                self.fail(node, f"tensor indexing x[{index!r}]: only constant slices (a:b:c) are supported")
            start, stop, step = i.indices(shape[d])
            if (start, stop, step) == (0, shape[d], 1):
                continue
            if d == 0:
                self.fail(node, "slicing the batch dimension")
            if step < 1:
                self.fail(node, "a slice with a negative step")
            steps.append((d, start, stop, step))
        if not steps:
            self.emit(node, node.name, "identity", [current])
            return
        for k, (d, start, stop, step) in enumerate(steps):
            last = k == len(steps) - 1
            name = node.name if last else f"{node.name}_dim{d}"
            entry = {"name": name, "op": "slice", "inputs": [current], "dim": d, "start": start, "end": stop,
                     "step": step}
            self.nodes.append(entry)
            current = name
        self.names[node] = current

    def pieces(self, src):
        x = src.args[0]
        shape = self.meta_shape(x)
        if src.target in (torch.chunk, "chunk"):
            chunks = int(arg(src, 1, "chunks"))
            dim = int(arg(src, 2, "dim", 0))
            size = shape[dim]
            step = math.ceil(size / chunks)
            lengths = [min(step, size - s) for s in range(0, size, step)]
        else:
            split = arg(src, 1, "split_size_or_sections" if src.target is torch.split else "split_size")
            dim = int(arg(src, 2, "dim", 0))
            size = shape[dim]
            lengths = list(split) if isinstance(split, (list, tuple)) else [
                min(split, size - s) for s in range(0, size, split)]
        if dim % len(shape) == 0:
            self.fail(src, "chunk/split over the batch dimension")
        out, start = [], 0
        for n in lengths:
            out.append((start, n, dim))
            start += n
        return out


SIMPLE_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}

UNARY = {
    F.relu6: "relu6", "relu6": "relu6",
    F.hardswish: "hardswish", "hardswish": "hardswish",
    F.hardsigmoid: "hardsigmoid", "hardsigmoid": "hardsigmoid",
    F.silu: "silu", "silu": "silu",
    torch.sigmoid: "sigmoid", "sigmoid": "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", "tanh": "tanh", F.tanh: "tanh",
}

BINARY = {
    operator.add: "add", torch.add: "add", "add": "add", operator.iadd: "add", "add_": "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub", operator.isub: "sub",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.imul: "mul", "mul_": "mul",
    operator.truediv: "div", torch.div: "div", "div": "div", operator.itruediv: "div",
}


# --------------------------------------------------------------------------


def export(model, input_chw, name, classes=None, mean=None, std=None, resize=None, center_crop=None):
    """Returns (manifest dict, {tensor name: tensor}) for an eval-mode model."""
    model = model.eval()
    c, h, w = input_chw
    tracer = Tracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)
    example = torch.zeros(2, c, h, w)
    with torch.no_grad():
        fold_python_values(gm, c, h, w)
        ShapeProp(gm).propagate(example)
    exporter = Exporter(model, gm, tracer, example.shape)
    exporter.run()

    x = check_input(c, h, w)
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ExportError(f"the model must return [N, classes] logits, got {type(logits).__name__}")
    sd = model.state_dict()
    missing = sorted(exporter.tensors - set(sd) - {n for n, _ in model.named_parameters()})
    tensors = {}
    for key in sorted(exporter.tensors):
        t = sd[key] if key in sd else exporter.fetch_attr(key)
        tensors[key] = t.detach().to(torch.float32).contiguous().clone()
    if missing:
        raise ExportError(f"tensors {missing} are used but not in the state_dict")
    unused = sorted(k for k in sd if k not in exporter.tensors and not k.endswith("num_batches_tracked"))
    manifest = {
        "name": name,
        "architecture": "graph",
        "graph_format": FORMAT_VERSION,
        "input": {"channels": c, "height": h, "width": w},
        "nodes": exporter.nodes,
        "output": exporter.output,
        "unused_weights": unused,
        "check": {"input": {"generator": "splitmix64", "seed": CHECK_SEED_NAME, "low": -1.0, "high": 1.0},
                  "logits": [float(v) for v in logits[0].tolist()]},
        "exported_with": {"torch": torch.__version__, "module": type(model).__name__},
    }
    if mean is not None:
        manifest["input"]["mean"] = mean
    if std is not None:
        manifest["input"]["std"] = std
    if resize is not None:
        manifest["input"]["resize"] = resize
    if center_crop is not None:
        manifest["input"]["center_crop"] = center_crop
    if classes is not None:
        manifest["classes"] = classes
    return manifest, tensors


def floats(text):
    return [float(v) for v in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--input", required=True, help="C,H,W")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights")
    p.add_argument("--classes")
    p.add_argument("--mean", type=floats)
    p.add_argument("--std", type=floats)
    p.add_argument("--resize", type=int)
    p.add_argument("--center-crop", type=int)
    a = p.parse_args(argv)
    try:
        chw = [int(v) for v in a.input.split(",")]
        assert len(chw) == 3
    except (ValueError, AssertionError):
        p.error(f"--input must be C,H,W, got {a.input!r}")
    model = load_target(a.target)
    if a.weights:
        load_weights(model, a.weights)
    classes = a.classes.split(",") if a.classes else None
    try:
        manifest, tensors = export(model, chw, a.name, classes, a.mean, a.std, a.resize, a.center_crop)
    except ExportError as e:
        print(f"convscope_export: cannot export {a.target}: {e}", file=sys.stderr)
        return 2
    except torch.fx.proxy.TraceError as e:
        print(f"convscope_export: torch.fx cannot trace {a.target}: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    write_safetensors(tensors, out / f"{a.name}.safetensors")
    print(f"wrote {out / (a.name + '.json')} ({len(manifest['nodes'])} nodes) and "
          f"{out / (a.name + '.safetensors')} ({len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
