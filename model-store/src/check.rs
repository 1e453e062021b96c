//! A manifest's `check` entry: an input and the logits PyTorch gave for it.
//!
//! The exporter writes one; registration and loading recompute it, so a
//! manifest that does not describe its weights (another seed, a layer the
//! exporter got wrong, a checkpoint of another run) is refused with the
//! measured difference instead of serving wrong numbers.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `check` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckSpec {
    /// How to make the input.
    pub input: CheckInput,
    /// PyTorch's logits for it, one per class.
    pub logits: Vec<f32>,
}

/// A deterministic input: `low + (high − low) · u`, with `u` from
/// [`crate::rng::hash_uniform`] of `seed`, in `[C, H, W]` order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckInput {
    /// Only `splitmix64`.
    pub generator: String,
    /// The name hashed into the seed.
    pub seed: String,
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// The tolerance of the contract: `1e-3 · max(1, max |logit|)`.
pub fn tolerance(want: &[f32]) -> f32 {
    1e-3 * want.iter().fold(1f32, |m, v| m.max(v.abs()))
}

impl CheckSpec {
    /// The `[1, C, H, W]` input.
    pub fn input_tensor(&self, chw: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        let i = &self.input;
        if i.generator != "splitmix64" {
            return Err(Error::Manifest(format!(
                "check.input.generator {:?}: only \"splitmix64\" is known",
                i.generator
            )));
        }
        let (c, h, w) = chw;
        let data: Vec<f32> = crate::rng::hash_uniform(&i.seed, c * h * w)
            .into_iter()
            .map(|u| (i.low + (i.high - i.low) * u) as f32)
            .collect();
        Ok(Tensor::from_vec(data, (1, c, h, w), device)?)
    }

    /// Compares `got` (the logits convscope computes) with the recorded ones.
    pub fn verify(&self, got: &[f32]) -> Result<()> {
        if got.len() != self.logits.len() {
            return Err(Error::Check(format!(
                "the check lists {} logits but the network gives {}",
                self.logits.len(),
                got.len()
            )));
        }
        let (mut worst, mut at) = (0f32, 0);
        for (i, (g, w)) in got.iter().zip(&self.logits).enumerate() {
            let d = (g - w).abs();
            if d > worst || d.is_nan() {
                (worst, at) = (if d.is_nan() { f32::INFINITY } else { d }, i);
            }
        }
        let tol = tolerance(&self.logits);
        if worst > tol {
            return Err(Error::Check(format!(
                "the weights do not give the manifest's check logits: the largest |Δlogit| is {worst:.3e} at class {at} (convscope {:.6}, PyTorch {:.6}), tolerance {tol:.1e}; re-export the model with these weights",
                got[at], self.logits[at]
            )));
        }
        Ok(())
    }
}
