//! What input excites a unit most: gradient ascent on the input for the
//! mean activation of a layer's channel (or of the whole layer, or a class
//! logit), with the regularisers that keep the result an image rather than
//! adversarial noise (Olah et al. 2017, "Feature Visualization"):
//! - random jitter: each step sees the image shifted by up to `jitter` pixels;
//! - total variation: `tv_weight · mean |∇x|` is subtracted from the objective;
//! - normalised steps: `x += lr · g / mean|g|`, then pixels are clipped to
//!   the valid range of the model's input normalisation.
//!
//! Deterministic for a seed: the starting noise and the jitter come from a
//! seeded generator, and the CPU kernels are deterministic.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::rng::Rng;
use crate::tap::Record;

/// What to maximise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Objective {
    /// Mean activation of one channel of a layer (or of the whole layer).
    Layer {
        /// The layer.
        layer: String,
        /// The channel; `None`: all of them.
        channel: Option<usize>,
    },
    /// A class logit.
    Class(usize),
}

/// The settings of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What to maximise.
    pub objective: Objective,
    /// Gradient steps.
    pub steps: usize,
    /// Step size in normalised-input units.
    pub lr: f32,
    /// Seed of the starting noise and the jitter.
    pub seed: u64,
    /// Largest shift, in pixels, applied before each step.
    pub jitter: usize,
    /// Weight of the total-variation penalty.
    pub tv_weight: f32,
    /// When set, the run stops with [`crate::Error::DeadlineExceeded`] at
    /// the first step past it: a server whose client has been answered 504
    /// does not keep computing for nobody.
    pub deadline: Option<std::time::Instant>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Maximized {
    /// The image in `[0, 1]` pixels, `C·H·W`.
    pub pixels: Vec<f32>,
    /// The objective (without the penalty, without jitter) at the start.
    pub start: f32,
    /// The objective at the end, measured the same way.
    pub end: f32,
    /// The objective seen at each step (with jitter, without the penalty).
    pub curve: Vec<f32>,
}

/// Checks the objective against the model.
pub fn check(model: &LoadedModel, objective: &Objective) -> Result<()> {
    match objective {
        Objective::Class(k) if *k >= model.classes.len() => Err(Error::InvalidArgument {
            param: "class".into(),
            reason: format!(
                "{k} is out of range: the model has {} classes",
                model.classes.len()
            ),
        }),
        Objective::Class(_) => Ok(()),
        Objective::Layer { layer, channel } => {
            crate::inspect::activations::check_layer(model, layer)?;
            let shape = &model.network.layer(layer).expect("checked").output_shape;
            match channel {
                Some(c) if *c >= shape[0] => Err(Error::InvalidArgument {
                    param: "channel".into(),
                    reason: format!(
                        "{c} is out of range: layer '{layer}' has {} channels (0-{})",
                        shape[0],
                        shape[0] - 1
                    ),
                }),
                _ => Ok(()),
            }
        }
    }
}

/// The objective of a batch of one image.
fn objective(model: &LoadedModel, x: &Tensor, what: &Objective) -> Result<Tensor> {
    match what {
        Objective::Class(k) => Ok(model.logits(x)?.narrow(1, *k, 1)?.mean_all()?),
        Objective::Layer { layer, channel } => {
            let mut tap = Record::layers([layer.as_str()]);
            model.network.forward(x, &mut tap)?;
            let out = tap.get(layer).cloned().ok_or_else(|| Error::Shape {
                layer: layer.clone(),
                reason: "produced no output".into(),
            })?;
            match channel {
                Some(c) => Ok(out.narrow(1, *c, 1)?.mean_all()?),
                None => Ok(out.mean_all()?),
            }
        }
    }
}

/// Runs gradient ascent from `start` (a preprocessed `[1, C, H, W]` image)
/// or, when `None`, from seeded noise around mid-grey.
pub fn maximize(model: &LoadedModel, start: Option<&Tensor>, s: &Settings) -> Result<Maximized> {
    check(model, &s.objective)?;
    let spec = &model.manifest.input;
    let (c, h, w) = (spec.channels, spec.height, spec.width);
    let (mean, std) = model.manifest.normalisation();
    let lo: Vec<f32> = (0..c).map(|i| (0.0 - mean[i]) / std[i]).collect();
    let hi: Vec<f32> = (0..c).map(|i| (1.0 - mean[i]) / std[i]).collect();
    let shape = (1, c, h, w);
    let per_channel = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, c, 1, 1), &model.device);
    let (lo_t, hi_t) = (per_channel(&lo)?, per_channel(&hi)?);
    let mut rng = Rng::new(s.seed);
    let x0 = match start {
        Some(t) => t.to_dtype(DType::F32)?,
        None => {
            let pixels: Vec<f32> = (0..c * h * w)
                .map(|i| {
                    let ch = i / (h * w);
                    let p = 0.5 + 0.1 * (rng.uniform() as f32 * 2.0 - 1.0);
                    (p - mean[ch]) / std[ch]
                })
                .collect();
            Tensor::from_vec(pixels, shape, &model.device)?
        }
    };
    let start_value = objective(model, &x0, &s.objective)?.to_scalar::<f32>()?;
    let var = Var::from_tensor(&x0)?;
    let mut curve = Vec::with_capacity(s.steps);
    let clock = crate::inspect::clock::Clock::new(s.deadline);
    for _ in 0..s.steps {
        clock.check()?;
        let (dy, dx) = if s.jitter > 0 {
            let span = 2 * s.jitter + 1;
            let r = |g: &mut Rng| (g.uniform() * span as f64) as i32 - s.jitter as i32;
            (r(&mut rng), r(&mut rng))
        } else {
            (0, 0)
        };
        let shifted = var.as_tensor().roll(dy, 2)?.roll(dx, 3)?;
        let value = objective(model, &shifted, &s.objective)?;
        curve.push(value.to_scalar::<f32>()?);
        let loss = if s.tv_weight > 0.0 {
            let x = var.as_tensor();
            let tv_h = x
                .narrow(2, 1, h - 1)?
                .sub(&x.narrow(2, 0, h - 1)?)?
                .abs()?
                .mean_all()?;
            let tv_w = x
                .narrow(3, 1, w - 1)?
                .sub(&x.narrow(3, 0, w - 1)?)?
                .abs()?
                .mean_all()?;
            (value - ((tv_h + tv_w)? * s.tv_weight as f64)?)?
        } else {
            value
        };
        let grads = loss.backward()?;
        let Some(g) = grads.get(var.as_tensor()) else {
            break;
        };
        let scale = g.abs()?.mean_all()?.to_scalar::<f32>()? + 1e-8;
        let next = (var.as_tensor() + (g * (s.lr / scale) as f64)?)?;
        let next = next.broadcast_maximum(&lo_t)?.broadcast_minimum(&hi_t)?;
        var.set(&next)?;
    }
    let x = var.as_tensor().detach();
    let end = objective(model, &x, &s.objective)?.to_scalar::<f32>()?;
    let pixels = x
        .broadcast_mul(&per_channel(&std)?)?
        .broadcast_add(&per_channel(&mean)?)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Maximized {
        pixels,
        start: start_value,
        end,
        curve,
    })
}
