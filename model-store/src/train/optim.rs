//! Optimisers with PyTorch's exact update rules, written here because
//! candle-nn's SGD has no momentum, Nesterov or weight decay, and its AdamW
//! defaults to weight decay 0.01 where Adam means none.
//!
//! State (momentum buffers, Adam moments, the step count) is saved with each
//! epoch's checkpoint, so a resumed job continues the same trajectory.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::net::Param;
use crate::error::Result;

/// Which update rule. Any other name is kept, so that the job's 422 can say
/// what was asked for alongside every other problem of the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum OptimizerKind {
    /// `torch.optim.SGD`.
    Sgd,
    /// `torch.optim.Adam`.
    Adam,
    /// `torch.optim.AdamW`.
    AdamW,
    /// A name this build does not know.
    Unknown(String),
}

impl From<String> for OptimizerKind {
    fn from(s: String) -> Self {
        match s.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "adam" => OptimizerKind::Adam,
            "adamw" => OptimizerKind::AdamW,
            _ => OptimizerKind::Unknown(s),
        }
    }
}

impl From<OptimizerKind> for String {
    fn from(k: OptimizerKind) -> Self {
        k.to_string()
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Unknown(s) => s,
        })
    }
}

/// The optimiser of a job, as the job body gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// `sgd`, `adam` or `adamw`.
    #[serde(rename = "type")]
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// SGD momentum (default 0).
    #[serde(default)]
    pub momentum: f64,
    /// SGD Nesterov momentum (default false).
    #[serde(default)]
    pub nesterov: bool,
    /// Weight decay: L2 added to the gradient (SGD, Adam) or decoupled
    /// (AdamW). Default 0 for SGD and Adam, 0.01 for AdamW (PyTorch's).
    pub weight_decay: Option<f64>,
    /// Adam `betas` (default `[0.9, 0.999]`).
    pub betas: Option<[f64; 2]>,
    /// Adam `eps` (default 1e-8).
    pub eps: Option<f64>,
}

impl OptimizerSpec {
    /// Everything wrong with it, for the job's 422.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if matches!(self.kind, OptimizerKind::Unknown(_)) {
            p.push(format!(
                "optimizer.type must be sgd, adam or adamw, got '{}'",
                self.kind
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            p.push(format!("optimizer.lr must be in (0, 10], got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            p.push(format!(
                "optimizer.momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        if self.nesterov && (self.kind != OptimizerKind::Sgd || self.momentum == 0.0) {
            p.push("optimizer.nesterov needs type sgd and a momentum > 0".into());
        }
        if self.kind != OptimizerKind::Sgd && self.momentum != 0.0 {
            p.push("optimizer.momentum is for sgd; adam uses betas".into());
        }
        if let Some(wd) = self.weight_decay
            && !(wd.is_finite() && (0.0..=1.0).contains(&wd))
        {
            p.push(format!(
                "optimizer.weight_decay must be in [0, 1], got {wd}"
            ));
        }
        if let Some([b1, b2]) = self.betas
            && !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2))
        {
            p.push(format!(
                "optimizer.betas must both be in [0, 1), got [{b1}, {b2}]"
            ));
        }
        if let Some(eps) = self.eps
            && !(eps.is_finite() && eps > 0.0)
        {
            p.push(format!("optimizer.eps must be > 0, got {eps}"));
        }
        p
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
            .unwrap_or(if self.kind == OptimizerKind::AdamW {
                0.01
            } else {
                0.0
            })
    }
}

/// An optimiser over a fixed list of parameters.
pub struct Optimizer {
    spec: OptimizerSpec,
    /// Learning rate now (the schedule changes it per epoch).
    pub lr: f64,
    step: u64,
    /// Momentum buffer (SGD) or first moment (Adam), per parameter name.
    m: HashMap<String, Tensor>,
    /// Second moment (Adam).
    v: HashMap<String, Tensor>,
}

impl Optimizer {
    /// A fresh optimiser.
    pub fn new(spec: &OptimizerSpec) -> Self {
        Self {
            spec: spec.clone(),
            lr: spec.lr,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient:
    ///
    /// SGD: `g = grad + wd·p`; `buf = μ·buf + g` (`buf = g` at first);
    /// `g = g + μ·buf` (Nesterov) or `buf`; `p -= lr·g`.
    ///
    /// Adam(W): `g = grad (+ wd·p for Adam)`; `p *= 1 - lr·wd` (AdamW);
    /// `m = β₁m + (1-β₁)g`; `v = β₂v + (1-β₂)g²`;
    /// `p -= lr/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + ε)`.
    pub fn step(&mut self, params: &[Param], grads: &GradStore) -> Result<()> {
        self.step += 1;
        let wd = self.spec.weight_decay();
        let lr = self.lr;
        for p in params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let w = p.var.as_tensor().detach();
            let grad = grad.detach();
            match &self.spec.kind {
                OptimizerKind::Sgd => {
                    let g = if wd != 0.0 {
                        (grad + (&w * wd)?)?
                    } else {
                        grad
                    };
                    let mu = self.spec.momentum;
                    let g = if mu != 0.0 {
                        let buf = match self.m.get(&p.name) {
                            Some(buf) => ((buf * mu)? + &g)?,
                            None => g.clone(),
                        };
                        self.m.insert(p.name.clone(), buf.clone());
                        if self.spec.nesterov {
                            (g + (buf * mu)?)?
                        } else {
                            buf
                        }
                    } else {
                        g
                    };
                    p.var.set(&(w - (g * lr)?)?)?;
                }
                kind => {
                    let [b1, b2] = self.spec.betas.unwrap_or([0.9, 0.999]);
                    let eps = self.spec.eps.unwrap_or(1e-8);
                    let (w, g) = if *kind == OptimizerKind::AdamW {
                        ((&w * (1.0 - lr * wd))?, grad)
                    } else if wd != 0.0 {
                        (w.clone(), (grad + (&w * wd)?)?)
                    } else {
                        (w, grad)
                    };
                    let m = match self.m.get(&p.name) {
                        Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
                        None => (&g * (1.0 - b1))?,
                    };
                    let v = match self.v.get(&p.name) {
                        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                        None => (g.sqr()? * (1.0 - b2))?,
                    };
                    let t = self.step as i32;
                    let bc1 = 1.0 - b1.powi(t);
                    let bc2 = 1.0 - b2.powi(t);
                    let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                    let update = (m.div(&denom)? * (lr / bc1))?;
                    p.var.set(&(w - update)?)?;
                    self.m.insert(p.name.clone(), m);
                    self.v.insert(p.name.clone(), v);
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (for the resume checkpoint).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "step".to_string(),
            Tensor::new(&[self.step as i64], &Device::Cpu)?,
        )];
        for (name, t) in &self.m {
            out.push((format!("m.{name}"), t.to_device(&Device::Cpu)?));
        }
        for (name, t) in &self.v {
            out.push((format!("v.{name}"), t.to_device(&Device::Cpu)?));
        }
        Ok(out)
    }

    /// Restores [`Optimizer::state`].
    pub fn restore(&mut self, state: HashMap<String, Tensor>, device: &Device) -> Result<()> {
        for (name, t) in state {
            if name == "step" {
                self.step = t.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
            } else if let Some(p) = name.strip_prefix("m.") {
                self.m.insert(p.to_string(), t.to_device(device)?);
            } else if let Some(p) = name.strip_prefix("v.") {
                self.v.insert(p.to_string(), t.to_device(device)?);
            }
        }
        Ok(())
    }
}
