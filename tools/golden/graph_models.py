"""Reference outputs for `graph` manifests: every torchvision classification
CNN family, and a student-style net, exported by tools/export/convscope_export.py
with hash-derived weights (the rule of torchvision_hash.py, so no weights are
committed) and compared node by node.

For each model, tests/fixtures/graph/<key>.json holds:
- `manifest`: what the exporter wrote (its `check` computed with these weights);
- `tensors`: [name, shape, is_bn] of the safetensors the exporter wrote;
- `logits`, `top5` for the committed image;
- `nodes`: per node (and per container alias) the output as PyTorch computed
  it: shape, sum, sum of |x|, RMS and 32 strided samples `[index, value]`.
  Node values come from a torch.fx Interpreter; every forward hook of every
  module is checked here against the node the exporter named for it, so the
  fixture also proves the naming rule (k-th call -> `path_k`, containers ->
  aliases).
- `gradcam`: pytorch-grad-cam's GradCAM for the top class at the last 4-D node
  before global pooling (the module the node belongs to is the target layer).

Regenerate (pinned versions in requirements.txt):

    .venv/bin/python tools/golden/graph_models.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "export"))
sys.path.insert(0, str(ROOT / "tools" / "golden"))

import convscope_export as cx  # noqa: E402
from torchvision_hash import hash_tensor as _hash_tensor  # noqa: E402
from versions import versions  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "graph"
SAMPLES = 32

TORCHVISION = {
    "mobilenet_v2": 224, "mobilenet_v3_small": 224, "efficientnet_b0": 224, "efficientnet_v2_s": 224,
    "densenet121": 224, "googlenet": 224, "inception_v3": 299, "shufflenet_v2_x0_5": 224,
    "squeezenet1_1": 224, "mnasnet0_5": 224, "regnet_y_400mf": 224, "convnext_tiny": 224,
    "resnext50_32x4d": 224, "wide_resnet50_2": 224,
}


def hash_tensor(name, shape, is_bn):
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("weight", "bias", "running_mean", "running_var"):
        return _hash_tensor(name, shape, is_bn)
    # Any other learned tensor (ConvNeXt's layer_scale, a student's gate): 0.5 + u.
    return (0.5 + cx_uniform(name, int(np.prod(shape)))).astype(np.float32).reshape(shape)


def cx_uniform(name, n):
    from torchvision_hash import uniform

    return uniform(name, n)


def hash_state(model):
    """Overwrites every float tensor of the state_dict in place (MNASNet's
    load_state_dict insists on its own metadata, so no reload)."""
    sd = model.state_dict()
    bn = {k[: -len(".running_mean")] for k in sd if k.endswith("running_mean")}
    with torch.no_grad():
        for name, t in sd.items():
            if not name.endswith("num_batches_tracked"):
                t.copy_(torch.from_numpy(hash_tensor(name, list(t.shape), name.rsplit(".", 1)[0] in bn)))
    return bn


# ---------------------------------------------------------------------------
# The student-style net: an Inception block joined with torch.cat, a
# squeeze-excitation gate `x * scale`, `F.relu(x + body(x))`, GELU, a
# ceil_mode pool, a learned scale used as a tensor, chunk, hardswish.


class Inception(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.b1 = nn.Conv2d(c, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 5, padding="same"))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, 6, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c, c // 4)
        self.fc2 = nn.Linear(c // 4, c)

    def forward(self, x):
        s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(x.size(0), -1, 1, 1)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class StudentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception = Inception(16)
        self.se = SE(32)
        self.res = Residual(32)
        self.gate = nn.Parameter(torch.ones(1, 16, 1, 1))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        x = self.pool(F.hardswish(self.bn(self.stem(x))))
        x = self.res(self.se(self.inception(x)))
        a, b = x.chunk(2, dim=1)
        x = torch.tanh(a) * self.gate + 0.5 * b
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class FftNet(nn.Module):
    """What the IR lacks: the exporter must refuse it, naming the node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.fft.fft2(self.conv(x)).real.flatten(1)


# ---------------------------------------------------------------------------


def image(size):
    src = Image.open(ROOT / "data" / "imagenet" / "samples" / "grace_hopper.png").convert("RGB")
    path = OUT / f"grace_hopper_{size}.png"
    if size == 224:
        path = ROOT / "tests" / "fixtures" / "torchvision" / "grace_hopper_224.png"
    else:
        img = torchvision.transforms.CenterCrop(size)(torchvision.transforms.Resize(int(size * 256 / 224))(src))
        img.save(path)
    x = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(path).convert("RGB")).unsqueeze(0)
    return x, str(path.relative_to(ROOT))


def summary(t):
    a = t.detach().double().flatten()
    n = a.numel()
    idx = sorted({(k * n) // SAMPLES for k in range(SAMPLES)})
    g = lambda v, d=9: float(f"{float(v):.{d}g}")  # float32 values need 9 digits, not 17
    return {"shape": list(t.shape[1:]), "sum": g(a.sum(), 12), "abs_sum": g(a.abs().sum(), 12),
            "rms": g(a.pow(2).mean().sqrt()), "samples": [[i, g(a[i])] for i in idx]}


def node_values(model, x, names, aliases_of):
    """Every manifest node's value (fx Interpreter), checked against hooks."""
    tracer = cx.Tracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)
    values = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                values[names[n.name]] = out.detach().clone()
            return out

    hooked = {}
    modules = dict(model.named_modules())

    def hook(path):
        def record(_m, _i, out):
            if isinstance(out, torch.Tensor):
                hooked.setdefault(path, []).append(out.detach().clone())
        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in modules.items() if p]
    with torch.no_grad():
        Capture(gm).run(x)
        model(x)
    for h in handles:
        h.remove()
    # Hooks vs nodes: the k-th call of module `p` is node or alias p / p_k.
    checked = 0
    for path, outs in hooked.items():
        for k, out in enumerate(outs):
            name = path if k == 0 else f"{path}_{k}"
            target = aliases_of.get(name, name)
            if target in values:
                assert torch.equal(values[target], out), f"hook {name} != node {target}"
                checked += 1
    return values, checked


def calibrate(model, x):
    """Hash weights with batch-norm statistics that do not normalise the
    real activations make deep nets blow up (EfficientNet-V2-S's logits
    reached 5e8), and then float32 rounding, amplified layer after layer,
    is all a comparison measures. So each batch norm's running_var is
    scaled by one number per layer: the mean over channels of the variance
    its input actually has on the fixture image, with the layers before it
    already scaled (one pass, forward pre-hooks in execution order). The
    scale is a float32 value, applied as f32(var * scale) on both sides."""
    scales = {}
    modules = {m: p for p, m in model.named_modules()}

    def pre(m, inputs):
        v = inputs[0].detach().double().var(dim=(0, 2, 3), unbiased=False).mean().item()
        s = float(np.float32(max(v, 1e-6)))
        with torch.no_grad():
            m.running_var.copy_((m.running_var.double() * s).float())
        scales[modules[m]] = s

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return scales


def fixture(key, model, size, mean_std=True):
    model = model.eval()
    bn = hash_state(model)
    x, image_path = image(size)
    bn_var_scale = calibrate(model, x)
    manifest, tensors = cx.export(model, (3, size, size), key.replace("_", "-") + "-graph",
                                  mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    # manifest name -> fx name, via the exporter's own mapping
    exporter_names = {}
    tracer = cx.Tracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(2, 3, size, size))
    ex = cx.Exporter(model, gm, tracer, (2,))
    ex.run()
    for fx_node, name in ex.names.items():
        exporter_names[fx_node.name] = name
    aliases_of = {a: n["name"] for n in manifest["nodes"] for a in n.get("aliases", [])}
    values, checked = node_values(model, x, exporter_names, aliases_of)
    with torch.no_grad():
        logits = model(x)[0]
    nodes = {}
    for n in manifest["nodes"]:
        if n["name"] in values and n["op"] != "parameter":
            s = summary(values[n["name"]])
            nodes[n["name"]] = s
            for a in n.get("aliases", []):
                nodes[a] = s
    cam = gradcam(model, manifest, nodes, x, int(logits.argmax()))
    record = {
        "manifest": manifest,
        "tensors": [[k, list(t.shape), k.rsplit(".", 1)[0] in bn] for k, t in tensors.items()],
        "bn_var_scale": bn_var_scale,
        "image": image_path,
        "logits": logits.tolist(),
        "top5": logits.topk(5).indices.tolist(),
        "nodes": nodes,
        "hooks_checked": checked,
        "gradcam": cam,
        "versions": versions(),
    }
    (OUT / f"{key}.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")
    print(f"{key}: {len(manifest['nodes'])} nodes, {checked} hook outputs checked, top-1 {int(logits.argmax())}, "
          f"logits [{float(logits.min()):.3g}, {float(logits.max()):.3g}], gradcam at {cam and cam['layer']}")


def gradcam(model, manifest, nodes, x, cls):
    """pytorch-grad-cam's GradCAM, at the layer's resolution, at the last 4-D
    node before global pooling that a hook can target: a module called once
    whose output it is (its own module, or a container it ends)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(model.named_modules())
    calls, seen = {}, {}

    def count(p):
        def hook(_m, _i, o):
            calls[p] = calls.get(p, 0) + 1
            if isinstance(o, torch.Tensor):
                seen[p] = (o, o.detach().clone())
        return hook

    handles = [m.register_forward_hook(count(p)) for p, m in modules.items() if p]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    # A module output that a later in-place op overwrites (DenseNet's
    # F.relu(features, inplace=True)) is not what pytorch-grad-cam's hook
    # keeps, so it cannot be the reference: such targets are skipped.
    mutated = {p for p, (o, c) in seen.items() if not torch.equal(o, c)}
    spatial = [n for n in manifest["nodes"] if n["name"] in nodes
               and len(nodes[n["name"]]["shape"]) == 3 and nodes[n["name"]]["shape"][1] * nodes[n["name"]]["shape"][2] > 1]
    default = spatial[-1]["name"]
    for n in reversed(spatial):
        candidates = list(reversed(n.get("aliases", [])))
        if n.get("module") == n["name"]:
            candidates.append(n["name"])
        for c in candidates:
            if c in modules and calls.get(c) == 1 and c not in mutated:
                shape = nodes[c]["shape"]
                cam = GradCAM(model=model, target_layers=[modules[c]])
                cam.get_target_width_height = lambda _x, s=shape: (s[2], s[1])
                grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
                return {"layer": c, "default_layer": default, "class_index": cls, "shape": shape[1:],
                        "cam": grayscale.astype(np.float32).flatten().tolist()}
    return None


if __name__ == "__main__":
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for key, size in TORCHVISION.items():
        if only and key not in only:
            continue
        kwargs = {"weights": None}
        if key in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = True
        fixture(key, getattr(torchvision.models, key)(**kwargs), size)
    if not only or "student_net" in only:
        fixture("student_net", StudentNet(), 64)
    (OUT / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
