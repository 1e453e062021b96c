//! Sanity checks for explanations (Adebayo et al. 2018): cascading
//! randomisation. Parameters are re-initialised layer by layer from the
//! output side, and each step's map is compared with the original; a map
//! that stays the same while the network it explains is destroyed does not
//! explain the network.
//!
//! A re-initialised layer gets PyTorch's default initialisation (conv and
//! linear weights and biases `U(±1/√fan_in)`, batch-norm weight 1, bias 0,
//! running mean 0, running variance 1), each tensor from a generator seeded
//! by the request's seed and the tensor's name, so a layer keeps its random
//! weights from the step it is randomised on. Maps are at the input's size
//! ([`Explainer::map`]); an attribution's by its absolute value (Adebayo et
//! al.'s absolute-value variant: the sign of a gradient is not what
//! randomisation should preserve). Per step:
//! - `spearman`: Spearman's rank correlation (average ranks for ties, as
//!   `scipy.stats.spearmanr`); 1 for identical maps, 0 when one map is
//!   constant and the other not.
//! - `ssim`: the structural similarity of the maps min-max scaled to
//!   `[0, 1]`, as `skimage.metrics.structural_similarity(a, b,
//!   data_range=1)` (7×7 uniform windows, sample covariances, the mean over
//!   the windows inside the map).

use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::graph::NodeKind;
use crate::inspect::clock::Clock;
use crate::inspect::faithfulness::Explainer;
use crate::inspect::{argmax, min_max};
use crate::model::LoadedModel;
use crate::rng::{Rng, fnv1a64};

/// One step of the cascade.
#[derive(Debug, Clone)]
pub struct Step {
    /// The layer re-initialised at this step (with every one before it in
    /// the cascade); `None` for the first step, which changes nothing.
    pub layer: Option<String>,
    /// Rank correlation with the original map.
    pub spearman: f32,
    /// Structural similarity with the original map.
    pub ssim: f32,
    /// The map at this step, `H·W` (min-max scaled, for pictures).
    pub map: Vec<f32>,
}

/// A cascade's result.
#[derive(Debug, Clone)]
pub struct Cascade {
    /// The class explained.
    pub class_index: usize,
    /// One step per layer, after the unchanged first one.
    pub steps: Vec<Step>,
}

/// The layers with parameters, output side first: the default cascade.
pub fn parameter_layers(model: &LoadedModel) -> Vec<String> {
    model
        .network
        .layers()
        .iter()
        .rev()
        .filter(|l| {
            l.params > 0
                && !matches!(
                    l.kind,
                    NodeKind::Sequential | NodeKind::ResidualBlock | NodeKind::Block
                )
        })
        .map(|l| l.name.clone())
        .collect()
}

/// Runs the cascade over `layers` (in order) for image `x` (`[1, C, H, W]`).
pub fn cascade(
    model: &LoadedModel,
    x: &Tensor,
    class: Option<usize>,
    explainer: &Explainer,
    layers: &[String],
    seed: u64,
    deadline: Option<Instant>,
) -> Result<Cascade> {
    let known = parameter_layers(model);
    if let Some((i, dup)) = layers
        .iter()
        .enumerate()
        .find(|(i, l)| layers[..*i].contains(l))
    {
        return Err(Error::InvalidArgument {
            param: "layers".into(),
            reason: format!(
                "'{dup}' is listed twice (again at position {}): a cascade re-initialises each layer once",
                i + 1
            ),
        });
    }
    if let Some(bad) = layers.iter().find(|l| !known.contains(l)) {
        return Err(Error::InvalidArgument {
            param: "layers".into(),
            reason: format!(
                "'{bad}' is not a layer with parameters of this model; those are (output side first): {}",
                known.join(", ")
            ),
        });
    }
    let k = model.classes.len();
    let class = match class {
        Some(c) if c >= k => {
            return Err(Error::ImageInput(format!(
                "class {c} is out of range: the model has {k} classes (0-{})",
                k - 1
            )));
        }
        Some(c) => c,
        None => argmax(&model.logits(x)?.flatten_all()?.to_vec1::<f32>()?),
    };
    let shown = |m: Vec<f32>| -> Vec<f32> {
        match explainer {
            Explainer::Cam { .. } => m,
            Explainer::Attribution { .. } => m.iter().map(|v| v.abs()).collect(),
        }
    };
    let clock = Clock::new(deadline);
    let (_, _, h, w) = x.dims4()?;
    let original = shown(explainer.map(model, x, class, deadline)?);
    let state = model.state_dict()?;
    let mut steps = vec![Step {
        layer: None,
        spearman: spearman(&original, &original),
        ssim: ssim(&original, &original, h, w),
        map: min_max(&original),
    }];
    for (i, layer) in layers.iter().enumerate() {
        clock.check()?;
        let random = &layers[..=i];
        let tensors = reinitialise(&state, random, seed)?;
        let randomised = model.with_tensors(tensors)?;
        let map = shown(explainer.map(&randomised, x, class, deadline)?);
        steps.push(Step {
            layer: Some(layer.clone()),
            spearman: spearman(&original, &map),
            ssim: ssim(&original, &map, h, w),
            map: min_max(&map),
        });
    }
    Ok(Cascade {
        class_index: class,
        steps,
    })
}

fn under(name: &str, layers: &[String]) -> bool {
    layers.iter().any(|l| {
        name.strip_prefix(l.as_str())
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// `state` with the tensors of `layers` re-initialised as PyTorch would.
fn reinitialise(
    state: &[(String, Tensor)],
    layers: &[String],
    seed: u64,
) -> Result<Vec<(String, Tensor)>> {
    let fan_in = |prefix: &str| -> Option<usize> {
        state
            .iter()
            .find(|(n, _)| n.strip_prefix(prefix) == Some(".weight"))
            .map(|(_, t)| t.dims()[1..].iter().product::<usize>())
    };
    state
        .iter()
        .map(|(name, t)| {
            if !under(name, layers) {
                return Ok((name.clone(), t.clone()));
            }
            let (prefix, suffix) = name.rsplit_once('.').unwrap_or(("", name));
            let shape = t.dims();
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(seed ^ fnv1a64(name));
            let mut uniform = |bound: f64| -> Vec<f32> {
                (0..n)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            let values = match (suffix, shape.len()) {
                ("running_mean", _) => vec![0.0; n],
                ("running_var", _) => vec![1.0; n],
                ("weight", 1) => vec![1.0; n],
                ("weight", _) => uniform(1.0 / (fan_in(prefix).unwrap_or(1).max(1) as f64).sqrt()),
                // A batch norm's bias (its weight is 1-D) is 0; a conv's or
                // linear's is uniform like its weight.
                ("bias", _) => match state
                    .iter()
                    .find(|(m, _)| m.strip_prefix(prefix) == Some(".weight"))
                {
                    Some((_, wt)) if wt.dims().len() > 1 => {
                        uniform(1.0 / (fan_in(prefix).unwrap_or(1).max(1) as f64).sqrt())
                    }
                    _ => vec![0.0; n],
                },
                // num_batches_tracked and anything else: left as is.
                _ => return Ok((name.clone(), t.clone())),
            };
            Ok((name.clone(), Tensor::from_vec(values, shape, t.device())?))
        })
        .collect()
}

/// Ranks from 1, ties given their average rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0f64; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = avg;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation.
pub fn spearman(a: &[f32], b: &[f32]) -> f32 {
    if a == b {
        return 1.0;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    (cov / (va * vb).sqrt()) as f32
}

/// SSIM of two `h × w` maps, each min-max scaled to `[0, 1]` first.
pub fn ssim(a: &[f32], b: &[f32], h: usize, w: usize) -> f32 {
    let (a, b) = (min_max(a), min_max(b));
    // skimage's 7×7 window, or the largest odd one the map holds.
    let side = 7.min(h).min(w).max(1);
    let win = if side % 2 == 0 { side - 1 } else { side };
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let np = (win * win) as f64;
    let cov_norm = np / (np - 1.0).max(1.0);
    let (mut total, mut count) = (0.0f64, 0usize);
    for y in 0..=h - win {
        for x in 0..=w - win {
            let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for dy in 0..win {
                for dx in 0..win {
                    let (p, q) = (
                        a[(y + dy) * w + x + dx] as f64,
                        b[(y + dy) * w + x + dx] as f64,
                    );
                    sa += p;
                    sb += q;
                    saa += p * p;
                    sbb += q * q;
                    sab += p * q;
                }
            }
            let (ma, mb) = (sa / np, sb / np);
            let va = cov_norm * (saa / np - ma * ma);
            let vb = cov_norm * (sbb / np - mb * mb);
            let vab = cov_norm * (sab / np - ma * mb);
            let s = ((2.0 * ma * mb + c1) * (2.0 * vab + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            total += s;
            count += 1;
        }
    }
    (total / count.max(1) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_fits_its_window_into_small_maps() {
        for (h, w) in [(1, 1), (2, 2), (4, 6), (6, 9), (3, 8)] {
            let m: Vec<f32> = (0..h * w).map(|i| (i % 5) as f32).collect();
            assert!((ssim(&m, &m, h, w) - 1.0).abs() < 1e-6, "{h}x{w}");
        }
    }

    #[test]
    fn spearman_uses_average_ranks_and_ssim_is_one_for_equal_maps() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-6);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-6);
        assert_eq!(spearman(&[1.0, 2.0], &[5.0, 5.0]), 0.0);
        let m: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32).collect();
        assert!((ssim(&m, &m, 10, 10) - 1.0).abs() < 1e-6);
        let flipped: Vec<f32> = m.iter().map(|v| 10.0 - v).collect();
        assert!(ssim(&m, &flipped, 10, 10) < 0.0);
    }
}
