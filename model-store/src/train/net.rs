//! A network being trained: the same graph the server runs, with its
//! parameters swapped for candle `Var`s, run by the same interpreter
//! ([`Dag::run_with`]) with the training-mode behaviour of PyTorch modules
//! (batch-norm batch statistics and running-statistics updates, dropout).
//!
//! Frozen layers keep plain tensors, so no gradient reaches them and the
//! optimiser never sees them; batch norms inside them run in eval mode, so
//! not even their running statistics move: a frozen layer is bit-identical
//! after training.

use std::collections::HashMap;

use candle_core::{D, DType, Tensor, Var};

use crate::dag::{Dag, GraphOp};
use crate::error::{Error, Result};
use crate::graph::{Network, NodeKind};

use super::Rng;

/// One trainable parameter: its `state_dict` name and its variable.
#[derive(Clone)]
pub struct Param {
    /// `layer3.0.conv1.weight`.
    pub name: String,
    /// The variable the layers read.
    pub var: Var,
}

/// The network's graph with trainable parameters.
pub struct TrainNet {
    dag: Dag,
    params: Vec<Param>,
    /// Running statistics of trainable batch norms, updated in place.
    buffers: HashMap<String, Var>,
    /// Batches seen by each batch norm in training (PyTorch's
    /// `num_batches_tracked`), saved with the checkpoint.
    batches_tracked: i64,
}

/// Whether `name` lies inside one of the frozen layers.
pub fn is_frozen(name: &str, freeze: &[String]) -> bool {
    freeze
        .iter()
        .any(|f| name == f || name.starts_with(&format!("{f}.")))
}

impl TrainNet {
    /// Makes every parameter outside `freeze` a variable.
    pub fn new(network: &Network, freeze: &[String]) -> Result<Self> {
        let mut dag = network.dag().clone();
        let mut params = Vec::new();
        let mut buffers = HashMap::new();
        graph_vars(&mut dag, freeze, &mut params, &mut buffers)?;
        Ok(Self {
            dag,
            params,
            buffers,
            batches_tracked: 0,
        })
    }

    /// The trainable parameters, in module order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Running statistics of the trainable batch norms, by `state_dict` name.
    pub fn buffers(&self) -> &HashMap<String, Var> {
        &self.buffers
    }

    /// Batches trained so far (restored on resume).
    pub fn batches_tracked(&self) -> i64 {
        self.batches_tracked
    }

    /// Sets the batch count (on resume).
    pub fn set_batches_tracked(&mut self, n: i64) {
        self.batches_tracked = n;
    }

    /// The forward pass; `rng` is `Some` in training mode (dropout draws,
    /// batch statistics), `None` for evaluation.
    pub fn forward(&mut self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let training = rng.is_some();
        if training {
            self.batches_tracked += 1;
        }
        let mut ctx = Ctx {
            rng,
            buffers: &self.buffers,
        };
        self.dag
            .run_with(x, |n, inputs| graph_node(n, inputs, &mut ctx))
    }

    /// Every tensor of the `state_dict`, as PyTorch names it (frozen ones
    /// included), ready to save as safetensors.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        graph_collect(&self.dag, &mut out);
        let tracked =
            Tensor::new(&[self.batches_tracked], &candle_core::Device::Cpu)?.reshape(())?;
        let mut with_counters = Vec::with_capacity(out.len());
        for (name, t) in out {
            let is_bn_mean = name.ends_with(".running_mean");
            let prefix = name.trim_end_matches(".running_mean").to_string();
            with_counters.push((name, t.to_device(&candle_core::Device::Cpu)?.copy()?));
            if is_bn_mean {
                with_counters.push((format!("{prefix}.num_batches_tracked"), tracked.clone()));
            }
        }
        Ok(with_counters)
    }
}

struct Ctx<'a, 'r> {
    rng: Option<&'r mut Rng>,
    buffers: &'a HashMap<String, Var>,
}

fn var_of(t: &mut Tensor) -> Result<Var> {
    let var = Var::from_tensor(t)?;
    *t = var.as_tensor().clone();
    Ok(var)
}

/// The `Var`s of a graph model: every module node's parameters (once per
/// module, however often it is called) and its batch-norm buffers.
fn graph_vars(
    dag: &mut crate::dag::Dag,
    freeze: &[String],
    params: &mut Vec<Param>,
    buffers: &mut HashMap<String, Var>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for node in dag.nodes_mut() {
        let Some(module) = node.module.clone() else {
            continue;
        };
        if !seen.insert(module.clone()) {
            continue;
        }
        let frozen = is_frozen(&module, freeze);
        let mut push = |suffix: Option<&str>, t: &mut Tensor| -> Result<()> {
            if !frozen {
                params.push(Param {
                    name: suffix.map_or_else(|| module.clone(), |s| format!("{module}.{s}")),
                    var: var_of(t)?,
                });
            }
            Ok(())
        };
        match &mut node.op {
            GraphOp::Conv(c) => {
                c.prepared = None;
                push(Some("weight"), &mut c.weight)?;
                if let Some(b) = c.bias.as_mut() {
                    push(Some("bias"), b)?;
                }
            }
            GraphOp::Linear { weight, bias, .. }
            | GraphOp::LayerNorm {
                weight: Some(weight),
                bias,
                ..
            } => {
                push(Some("weight"), weight)?;
                if let Some(b) = bias.as_mut() {
                    push(Some("bias"), b)?;
                }
            }
            GraphOp::BatchNorm(b) => {
                if b.affine() {
                    push(Some("weight"), &mut b.weight)?;
                    push(Some("bias"), &mut b.bias)?;
                }
                if !frozen {
                    buffers.insert(
                        format!("{module}.running_mean"),
                        var_of(&mut b.running_mean)?,
                    );
                    buffers.insert(format!("{module}.running_var"), var_of(&mut b.running_var)?);
                }
            }
            GraphOp::Parameter(t) => push(None, t)?,
            _ => {}
        }
    }
    Ok(())
}

/// A graph model's `state_dict`, module by module.
fn graph_collect(dag: &crate::dag::Dag, out: &mut Vec<(String, Tensor)>) {
    let mut seen = std::collections::HashSet::new();
    for node in dag.nodes() {
        let Some(m) = node.module.as_deref() else {
            continue;
        };
        if !seen.insert(m) {
            continue;
        }
        let mut put = |suffix: &str, t: &Tensor| out.push((format!("{m}.{suffix}"), t.clone()));
        match &node.op {
            GraphOp::Conv(c) => {
                put("weight", &c.weight);
                if let Some(b) = &c.bias {
                    put("bias", b);
                }
            }
            GraphOp::Linear { weight, bias, .. } => {
                put("weight", weight);
                if let Some(b) = bias {
                    put("bias", b);
                }
            }
            GraphOp::LayerNorm { weight, bias, .. } => {
                if let Some(w) = weight {
                    put("weight", w);
                }
                if let Some(b) = bias {
                    put("bias", b);
                }
            }
            GraphOp::BatchNorm(b) => {
                if b.affine() {
                    put("weight", &b.weight);
                    put("bias", &b.bias);
                }
                put("running_mean", &b.running_mean);
                put("running_var", &b.running_var);
            }
            GraphOp::Parameter(t) => out.push((m.to_string(), t.clone())),
            _ => {}
        }
    }
}

/// One graph node in training (or evaluation) mode.
fn graph_node(node: &crate::dag::DagNode, inputs: &[&Tensor], ctx: &mut Ctx) -> Result<Tensor> {
    let err = |source| Error::Forward {
        layer: node.name.clone(),
        source,
    };
    Ok(match &node.op {
        GraphOp::BatchNorm(b) => {
            let x = inputs[0];
            let module = node.module.as_deref().unwrap_or(&node.name);
            match (
                ctx.rng.is_some(),
                ctx.buffers.get(&format!("{module}.running_mean")),
            ) {
                (true, Some(mean)) => {
                    let var = &ctx.buffers[&format!("{module}.running_var")];
                    batch_norm_train(x, b, mean, var).map_err(err)?
                }
                _ => batch_norm_eval(x, b).map_err(err)?,
            }
        }
        GraphOp::Identity { kind, p }
            if matches!(kind, NodeKind::Dropout | NodeKind::Dropout2d) =>
        {
            let x = inputs[0];
            match ctx.rng.as_deref_mut() {
                Some(rng) if *p > 0.0 => {
                    dropout(x, *p, *kind == NodeKind::Dropout2d, rng).map_err(err)?
                }
                _ => x.clone(),
            }
        }
        op => op.forward(inputs).map_err(err)?,
    })
}

/// PyTorch's `BatchNorm2d` momentum default.
const BN_MOMENTUM: f64 = 0.1;

fn batch_norm_eval(x: &Tensor, b: &crate::layers::BatchNorm2d) -> candle_core::Result<Tensor> {
    let c = b.weight.dim(0)?;
    let scale = b.weight.div(&(&b.running_var + b.eps)?.sqrt()?)?;
    let shift = b.bias.sub(&b.running_mean.mul(&scale)?)?;
    x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1, 1))?)
}

/// Batch statistics for the output; the running statistics move by
/// momentum 0.1 towards the batch mean and the *unbiased* batch variance,
/// exactly as `torch.nn.BatchNorm2d` does.
fn batch_norm_train(
    x: &Tensor,
    b: &crate::layers::BatchNorm2d,
    running_mean: &Var,
    running_var: &Var,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let count = (n * h * w) as f64;
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?; // [1, C, 1, 1]
    let centred = x.broadcast_sub(&mean)?;
    let var = centred
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    let normed = centred.broadcast_div(&(var.clone() + b.eps)?.sqrt()?)?;
    let y = normed
        .broadcast_mul(&b.weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.bias.reshape((1, c, 1, 1))?)?;
    let m = BN_MOMENTUM;
    let batch_mean = mean.detach().flatten_all()?;
    let unbiased = (var.detach().flatten_all()? * (count / (count - 1.0).max(1.0)))?;
    running_mean.set(&((running_mean.as_tensor() * (1.0 - m))? + (batch_mean * m)?)?)?;
    running_var.set(&((running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
    Ok(y)
}

/// Inverted dropout: zero with probability `p`, scale the rest by 1/(1-p).
fn dropout(x: &Tensor, p: f32, channelwise: bool, rng: &mut Rng) -> candle_core::Result<Tensor> {
    if p >= 1.0 {
        return x.zeros_like();
    }
    let dims = x.dims();
    let mask_shape: Vec<usize> = if channelwise && dims.len() == 4 {
        vec![dims[0], dims[1], 1, 1]
    } else {
        dims.to_vec()
    };
    let n: usize = mask_shape.iter().product();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.uniform() as f32 >= p { keep } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, mask_shape, x.device())?;
    x.broadcast_mul(&mask)
}

/// Mean cross-entropy of logits against `u32` class indices
/// (`nn.CrossEntropyLoss`): candle-nn's, which is PyTorch's definition.
pub use candle_nn::loss::cross_entropy;

/// Argmax per row, as `u32` class indices.
pub fn argmax(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()
}
