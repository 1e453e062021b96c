//! A `graph` manifest's `nodes` → [`DagNode`]s with their weights.
//!
//! Every node is checked for what a user can get wrong: an unknown op, a
//! missing or mistyped argument, an input that is not an earlier node, a
//! duplicate name. The message names the node and says what to fix.

use std::collections::HashMap;

use serde_json::Value;

use super::ops::{BinOp, GraphOp, Unary};
use super::{DagNode, INPUT};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::NodeKind;
use crate::layers::{
    AdaptiveAvgPool2d, BatchNorm2d, Conv2d, ConvConfig, Padding, Pool2d, PoolKind,
};

/// Every op a node may name.
pub const OPS: &[&str] = &[
    "conv2d",
    "batch_norm2d",
    "layer_norm",
    "linear",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "relu",
    "relu6",
    "leaky_relu",
    "hardswish",
    "hardsigmoid",
    "silu",
    "sigmoid",
    "gelu",
    "tanh",
    "softmax",
    "dropout",
    "dropout2d",
    "identity",
    "flatten",
    "add",
    "sub",
    "mul",
    "div",
    "cat",
    "reshape",
    "permute",
    "transpose",
    "narrow",
    "mean",
    "slice",
    "pad",
    "parameter",
];

/// Reads one node's arguments, naming the node in every complaint.
struct Args<'a> {
    node: &'a str,
    op: &'a str,
    v: &'a serde_json::Map<String, Value>,
}

impl Args<'_> {
    fn bad(&self, what: String) -> Error {
        Error::Manifest(format!("node '{}' ({}): {what}", self.node, self.op))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.bad(format!("needs `{key}` (a non-negative integer)")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.bad(format!("`{key}` must be a non-negative integer, got {v}"))
            }),
        }
    }

    fn int(&self, key: &str, default: Option<i64>) -> Result<isize> {
        match self.get(key) {
            None => default
                .map(|d| d as isize)
                .ok_or_else(|| self.bad(format!("needs `{key}` (an integer)"))),
            Some(v) => v
                .as_i64()
                .map(|n| n as isize)
                .ok_or_else(|| self.bad(format!("`{key}` must be an integer, got {v}"))),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    /// An integer or `[h, w]`.
    fn pair(&self, key: &str, default: Option<(usize, usize)>) -> Result<(usize, usize)> {
        let Some(v) = self.get(key) else {
            return default.ok_or_else(|| self.bad(format!("needs `{key}`")));
        };
        let n = |v: &Value| v.as_u64().map(|n| n as usize);
        match v {
            Value::Array(a) if a.len() == 2 => match (n(&a[0]), n(&a[1])) {
                (Some(h), Some(w)) => Ok((h, w)),
                _ => Err(self.bad(format!("`{key}` must be [h, w] integers, got {v}"))),
            },
            Value::Array(a) if a.len() == 1 => n(&a[0])
                .map(|k| (k, k))
                .ok_or_else(|| self.bad(format!("`{key}` must be an integer, got {v}"))),
            _ => n(v)
                .map(|k| (k, k))
                .ok_or_else(|| self.bad(format!("`{key}` must be an integer or [h, w], got {v}"))),
        }
    }

    fn ints(&self, key: &str) -> Result<Vec<isize>> {
        let v = self
            .get(key)
            .ok_or_else(|| self.bad(format!("needs `{key}` (a list of integers)")))?;
        match v {
            Value::Number(_) => Ok(vec![self.int(key, None)?]),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_i64()
                        .map(|n| n as isize)
                        .ok_or_else(|| self.bad(format!("`{key}` must list integers, got {v}")))
                })
                .collect(),
            _ => Err(self.bad(format!("`{key}` must be a list of integers, got {v}"))),
        }
    }

    fn square(&self, key: &str, (a, b): (usize, usize)) -> Result<usize> {
        if a == b {
            Ok(a)
        } else {
            Err(self.bad(format!(
                "`{key}` [{a}, {b}] differs between height and width, which convscope's convolution does not support yet"
            )))
        }
    }
}

/// The tensor a `parameter` node stands for.
fn parameter(a: &Args, ck: &mut Checkpoint) -> Result<(GraphOp, String)> {
    let target = a
        .get("target")
        .and_then(Value::as_str)
        .ok_or_else(|| a.bad("needs `target`, the tensor's state_dict name".into()))?
        .to_string();
    let shape = a
        .ints("shape")?
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| a.bad("negative size in `shape`".into())))
        .collect::<Result<Vec<_>>>()?;
    Ok((GraphOp::Parameter(ck.take(&target, &shape)?), target))
}

fn conv(a: &Args, ck: &mut Checkpoint, module: &str) -> Result<GraphOp> {
    let kernel = a.pair("kernel_size", None)?;
    let stride = a.square("stride", a.pair("stride", Some((1, 1)))?)?;
    let dilation = a.square("dilation", a.pair("dilation", Some((1, 1)))?)?;
    let padding = match a.get("padding").and_then(Value::as_str) {
        Some("valid") => Padding::symmetric(0, 0),
        Some("same") => {
            if stride != 1 {
                return Err(a.bad("padding='same' needs stride 1 (as in PyTorch)".into()));
            }
            Padding::same(kernel, dilation)
        }
        Some(other) => {
            return Err(a.bad(format!(
                "padding {other:?}: give an integer, [h, w], \"same\" or \"valid\""
            )));
        }
        None => {
            let (ph, pw) = a.pair("padding", Some((0, 0)))?;
            Padding::symmetric(ph, pw)
        }
    };
    let config = ConvConfig::new(a.usize("in_channels")?, a.usize("out_channels")?, kernel.0)
        .kernel_hw(kernel)
        .stride(stride)
        .padding(padding)
        .dilation(dilation)
        .groups(a.opt_usize("groups")?.unwrap_or(1))
        .bias(a.bool("bias", true)?);
    Ok(GraphOp::Conv(Conv2d::load(ck, module, config)?))
}

fn pool(a: &Args, kind: PoolKind) -> Result<GraphOp> {
    let kernel = a.pair("kernel_size", None)?;
    let stride = a.pair("stride", Some(kernel))?;
    let padding = a.pair("padding", Some((0, 0)))?;
    Ok(GraphOp::Pool(Pool2d::new(
        kind,
        kernel,
        stride,
        padding,
        a.bool("ceil_mode", false)?,
        a.bool("count_include_pad", true)?,
        a.node,
    )?))
}

/// One node's op, taking its weights from `ck` under `module`.
fn op(a: &Args, ck: &mut Checkpoint, module: &str) -> Result<GraphOp> {
    let dropout = |kind| -> Result<GraphOp> {
        Ok(GraphOp::Identity {
            kind,
            p: a.f64("p", 0.5)? as f32,
        })
    };
    let binary = |op| -> Result<GraphOp> {
        let scalar = match a.get("scalar") {
            None => None,
            Some(_) => Some((a.f64("scalar", 0.0)?, a.bool("scalar_first", false)?)),
        };
        Ok(GraphOp::Binary { op, scalar })
    };
    Ok(match a.op {
        "conv2d" => conv(a, ck, module)?,
        "batch_norm2d" => GraphOp::BatchNorm(BatchNorm2d::load(
            ck,
            module,
            a.usize("num_features")?,
            a.f64("eps", 1e-5)?,
            a.bool("affine", true)?,
        )?),
        "layer_norm" => {
            let shape = a.ints("normalized_shape")?;
            let [size] = shape[..] else {
                return Err(a.bad(format!(
                    "normalized_shape {shape:?}: only one normalised dimension is supported"
                )));
            };
            let size = usize::try_from(size).map_err(|_| a.bad("negative normalized_shape".into()))?;
            let affine = a.bool("elementwise_affine", true)?;
            let weight = affine
                .then(|| ck.take(&format!("{module}.weight"), &[size]))
                .transpose()?;
            let bias = (affine && a.bool("bias", true)?)
                .then(|| ck.take(&format!("{module}.bias"), &[size]))
                .transpose()?;
            GraphOp::LayerNorm {
                weight,
                bias,
                eps: a.f64("eps", 1e-5)?,
                dim: a.int("dim", Some(-1))?,
                size,
            }
        }
        "linear" => {
            let (i, o) = (a.usize("in_features")?, a.usize("out_features")?);
            let weight = ck.take(&format!("{module}.weight"), &[o, i])?;
            let bias = a
                .bool("bias", true)?
                .then(|| ck.take(&format!("{module}.bias"), &[o]))
                .transpose()?;
            GraphOp::Linear {
                weight,
                bias,
                any_rank: true,
            }
        }
        "max_pool2d" => pool(a, PoolKind::Max)?,
        "avg_pool2d" => pool(a, PoolKind::Avg)?,
        "adaptive_avg_pool2d" => GraphOp::AdaptiveAvgPool(AdaptiveAvgPool2d {
            output: a.pair("output_size", None)?,
        }),
        "adaptive_max_pool2d" => GraphOp::AdaptiveMaxPool(a.pair("output_size", None)?),
        "relu" => GraphOp::Unary(Unary::Relu),
        "relu6" => GraphOp::Unary(Unary::Relu6),
        "leaky_relu" => GraphOp::Unary(Unary::LeakyRelu(a.f64("negative_slope", 0.01)?)),
        "hardswish" => GraphOp::Unary(Unary::Hardswish),
        "hardsigmoid" => GraphOp::Unary(Unary::Hardsigmoid),
        "silu" => GraphOp::Unary(Unary::Silu),
        "sigmoid" => GraphOp::Unary(Unary::Sigmoid),
        "tanh" => GraphOp::Unary(Unary::Tanh),
        "gelu" => match a.get("approximate").and_then(Value::as_str).unwrap_or("none") {
            "none" => GraphOp::Unary(Unary::Gelu),
            "tanh" => GraphOp::Unary(Unary::GeluTanh),
            other => return Err(a.bad(format!("approximate {other:?}: use \"none\" or \"tanh\""))),
        },
        "softmax" => GraphOp::Softmax {
            dim: a.int("dim", Some(-1))?,
        },
        "dropout" => dropout(NodeKind::Dropout)?,
        "dropout2d" => dropout(NodeKind::Dropout2d)?,
        "identity" => GraphOp::Identity {
            kind: NodeKind::Identity,
            p: 0.0,
        },
        "flatten" => GraphOp::Flatten {
            start: a.int("start_dim", Some(1))?,
            end: a.int("end_dim", Some(-1))?,
        },
        "add" => binary(BinOp::Add)?,
        "sub" => binary(BinOp::Sub)?,
        "mul" => binary(BinOp::Mul)?,
        "div" => binary(BinOp::Div)?,
        "cat" => GraphOp::Cat {
            dim: a.int("dim", Some(0))?,
        },
        "reshape" => GraphOp::Reshape {
            shape: a
                .ints("shape")?
                .into_iter()
                .map(|d| {
                    usize::try_from(d).map_err(|_| {
                        a.bad("`shape` is the per-sample shape and must not hold -1 or other negatives".into())
                    })
                })
                .collect::<Result<_>>()?,
        },
        "permute" => GraphOp::Permute {
            dims: a
                .ints("dims")?
                .into_iter()
                .map(|d| usize::try_from(d).map_err(|_| a.bad("`dims` must be non-negative".into())))
                .collect::<Result<_>>()?,
        },
        "transpose" => GraphOp::Transpose {
            a: a.int("dim0", None)?,
            b: a.int("dim1", None)?,
        },
        "narrow" => GraphOp::Narrow {
            dim: a.int("dim", None)?,
            start: a.usize("start")?,
            length: a.usize("length")?,
        },
        "slice" => GraphOp::Slice {
            dim: a.int("dim", None)?,
            start: a.usize("start")?,
            end: a.usize("end")?,
            step: a.opt_usize("step")?.unwrap_or(1),
        },
        "pad" => GraphOp::Pad {
            pad: a
                .ints("pad")?
                .into_iter()
                .map(|p| usize::try_from(p).map_err(|_| a.bad("`pad` must be non-negative (zero padding)".into())))
                .collect::<Result<_>>()?,
        },
        "mean" => GraphOp::Mean {
            dims: a.ints("dims")?,
            keepdim: a.bool("keepdim", false)?,
        },
        other => {
            return Err(Error::Manifest(format!(
                "node '{}': unknown op {other:?}; known: {}",
                a.node,
                OPS.join(", ")
            )));
        }
    })
}

/// Parses every node, resolving inputs to indices of earlier nodes.
pub(super) fn nodes(raw: &[Value], ck: &mut Checkpoint) -> Result<Vec<DagNode>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Manifest(format!("nodes[{i}] must be an object, got {v}")))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Manifest(format!("nodes[{i}] needs a non-empty `name`")))?;
        let op_name = obj
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Manifest(format!("node '{name}' needs an `op`")))?;
        let a = Args {
            node: name,
            op: op_name,
            v: obj,
        };
        if name == "input" || index.contains_key(name) {
            return Err(a.bad("the name is used twice (or is the reserved name `input`)".into()));
        }
        let inputs = match obj.get("inputs") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|x| {
                    let s = x
                        .as_str()
                        .ok_or_else(|| a.bad(format!("`inputs` must list node names, got {x}")))?;
                    if s == "input" {
                        return Ok(INPUT);
                    }
                    index.get(s).copied().ok_or_else(|| {
                        a.bad(format!(
                            "input '{s}' is not an earlier node (nodes are in topological order)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => return Err(a.bad(format!("`inputs` must be a list, got {other}"))),
        };
        let module = obj.get("module").and_then(Value::as_str).unwrap_or(name);
        let (op, module) = if op_name == "parameter" {
            let (op, target) = parameter(&a, ck)?;
            (op, Some(target))
        } else {
            let op = op(&a, ck, module)?;
            let has_weights = op.params() > 0 || matches!(op, GraphOp::BatchNorm(_));
            let named = obj.contains_key("module") || has_weights;
            (op, named.then(|| module.to_string()))
        };
        match op.arity() {
            Some(n) if n != inputs.len() => {
                return Err(a.bad(format!(
                    "takes {n} input(s) but `inputs` lists {}",
                    inputs.len()
                )));
            }
            None if inputs.is_empty() => return Err(a.bad("needs at least one input".into())),
            _ => {}
        }
        let aliases = match obj.get("aliases") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(|name| super::Alias {
                            name: name.to_string(),
                            kind: NodeKind::Block,
                        })
                        .ok_or_else(|| a.bad(format!("`aliases` must list names, got {x}")))
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(a.bad(format!("`aliases` must be a list, got {other}"))),
        };
        index.insert(name.to_string(), i);
        out.push(DagNode {
            name: name.to_string(),
            aliases,
            hidden: false,
            module,
            op,
            inputs,
        });
    }
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for n in &out {
        for alias in &n.aliases {
            let alias = alias.name.as_str();
            if index.contains_key(alias) || seen.insert(alias, &n.name).is_some() {
                return Err(Error::Manifest(format!(
                    "node '{}': alias '{alias}' is already the name of another node or alias",
                    n.name
                )));
            }
        }
    }
    Ok(out)
}
