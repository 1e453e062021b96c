//! Embeddings and the distances between them: the course's "intra- and
//! inter-class distances of two 6s and two 7s" as one computation.
//!
//! Definitions (the contract's), with `M[i][j] = metric(a = item i, b = item j)`:
//! - `euclidean(a, b) = ‖a − b‖₂`
//! - `mse(a, b) = mean((a − b)²)`
//! - `cosine(a, b) = 1 − a·b / (‖a‖‖b‖)` (1 when either vector is zero)
//! - `cross_entropy(a, b) = −Σ softmax(b)ᵢ · log softmax(a)ᵢ`, which is
//!   `torch.nn.functional.cross_entropy(a, softmax(b))`; not symmetric
//! - `kl(a, b) = KL(softmax(b) ‖ softmax(a))`, so that
//!   `cross_entropy(a, b) = H(softmax(b)) + kl(a, b)`
//!
//! Computed in f64 from the f32 embeddings.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::graph::NodeKind;
use crate::model::LoadedModel;

/// The metrics, in the order the contract lists them.
pub const METRICS: [Metric; 5] = [
    Metric::Euclidean,
    Metric::Mse,
    Metric::Cosine,
    Metric::CrossEntropy,
    Metric::Kl,
];

/// A distance (or divergence) between two embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// `‖a − b‖₂`.
    Euclidean,
    /// Mean squared difference.
    Mse,
    /// `1 − cos(a, b)`.
    Cosine,
    /// `−Σ softmax(b) log softmax(a)`.
    CrossEntropy,
    /// `KL(softmax(b) ‖ softmax(a))`.
    Kl,
}

impl Metric {
    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Euclidean => "euclidean",
            Metric::Mse => "mse",
            Metric::Cosine => "cosine",
            Metric::CrossEntropy => "cross_entropy",
            Metric::Kl => "kl",
        }
    }

    /// Parses an API name.
    pub fn parse(s: &str) -> Option<Self> {
        METRICS.into_iter().find(|m| m.name() == s)
    }

    /// `metric(a, b)`.
    pub fn eval(self, a: &[f32], b: &[f32]) -> f64 {
        let diff2 = || {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum::<f64>()
        };
        match self {
            Metric::Euclidean => diff2().sqrt(),
            Metric::Mse => diff2() / a.len().max(1) as f64,
            Metric::Cosine => {
                let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                let nb = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
                if na == 0.0 || nb == 0.0 {
                    1.0
                } else {
                    1.0 - dot / (na * nb)
                }
            }
            Metric::CrossEntropy => {
                let (la, lb) = (log_softmax(a), log_softmax(b));
                -lb.iter().zip(&la).map(|(&q, &p)| q.exp() * p).sum::<f64>()
            }
            Metric::Kl => {
                let (la, lb) = (log_softmax(a), log_softmax(b));
                lb.iter()
                    .zip(&la)
                    .map(|(&q, &p)| q.exp() * (q - p))
                    .sum::<f64>()
            }
        }
    }
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// The default embedding layer: the input of the model's last linear layer
/// (for CNN_A `fc2`, for the ResNets the flattened pooled features), or the
/// second-to-last layer when there is no linear layer.
pub fn default_layer(model: &LoadedModel) -> String {
    let layers = model.network.layers();
    let last_linear = layers.iter().rposition(|l| l.kind == NodeKind::Linear);
    let idx = match last_linear {
        Some(i) if i > 0 => i - 1,
        _ => layers.len().saturating_sub(2),
    };
    layers[idx].name.clone()
}

/// One flattened embedding per image of the batch `x`, from `layer`.
pub fn embeddings(model: &LoadedModel, x: &Tensor, layer: &str) -> Result<Vec<Vec<f32>>> {
    let out = crate::inspect::activations::layer_output(model, x, layer)?;
    let n = out.dim(0)?;
    let flat = out.flatten_from(1)?;
    (0..n)
        .map(|i| Ok(flat.get(i)?.to_vec1::<f32>()?))
        .collect::<Result<Vec<_>>>()
}

/// `M[i][j] = metric(e[i], e[j])`.
pub fn distance_matrix(e: &[Vec<f32>], metric: Metric) -> Vec<Vec<f64>> {
    e.iter()
        .map(|a| e.iter().map(|b| metric.eval(a, b)).collect())
        .collect()
}

/// Class-level means of one metric's matrix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassDistances {
    /// Per class: mean over ordered pairs `i ≠ j` within it (absent for a
    /// class with one item: there is no pair).
    pub intra: BTreeMap<String, f64>,
    /// Per ordered class pair `"c/d"`: mean over rows of `c` and columns of `d`.
    pub inter: BTreeMap<String, f64>,
}

/// Intra- and inter-class means of matrix `m` for `labels` (one per item).
pub fn class_distances(m: &[Vec<f64>], labels: &[String]) -> ClassDistances {
    let mut classes: Vec<&String> = labels.iter().collect();
    classes.sort();
    classes.dedup();
    let mut out = ClassDistances::default();
    for &c in &classes {
        for &d in &classes {
            let (mut sum, mut count) = (0.0, 0usize);
            for (i, li) in labels.iter().enumerate() {
                for (j, lj) in labels.iter().enumerate() {
                    if li == c && lj == d && (c != d || i != j) {
                        sum += m[i][j];
                        count += 1;
                    }
                }
            }
            if count == 0 {
                continue;
            }
            if c == d {
                out.intra.insert(c.clone(), sum / count as f64);
            } else {
                out.inter.insert(format!("{c}/{d}"), sum / count as f64);
            }
        }
    }
    out
}

/// The mean inter-class value over the mean intra-class value: above 1 when
/// classes sit apart more than their members do.
pub fn inter_intra_ratio(d: &ClassDistances) -> Option<f64> {
    let mean = |v: &BTreeMap<String, f64>| {
        (!v.is_empty()).then(|| v.values().sum::<f64>() / v.len() as f64)
    };
    match (mean(&d.inter), mean(&d.intra)) {
        (Some(inter), Some(intra)) if intra != 0.0 => Some(inter / intra),
        _ => None,
    }
}

/// Checks the number of labels against the number of images.
pub fn check_labels(labels: &[String], images: usize) -> Result<()> {
    if labels.is_empty() || labels.len() == images {
        Ok(())
    } else {
        Err(Error::ImageInput(format!(
            "{} labels for {images} images: give one label per image, in the same order, or none",
            labels.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_is_entropy_plus_kl() {
        let (a, b) = ([0.3f32, -1.0, 2.0], [1.0f32, 0.5, -0.2]);
        let h: f64 = -log_softmax(&b).iter().map(|&l| l.exp() * l).sum::<f64>();
        let ce = Metric::CrossEntropy.eval(&a, &b);
        assert!((ce - (h + Metric::Kl.eval(&a, &b))).abs() < 1e-12);
        assert!(Metric::Kl.eval(&a, &a).abs() < 1e-12);
    }

    #[test]
    fn class_means_follow_the_contract() {
        let labels: Vec<String> = ["6", "6", "7"].iter().map(|s| s.to_string()).collect();
        let m = vec![
            vec![0.0, 1.0, 5.0],
            vec![3.0, 0.0, 7.0],
            vec![2.0, 4.0, 0.0],
        ];
        let d = class_distances(&m, &labels);
        assert_eq!(d.intra["6"], 2.0);
        assert!(!d.intra.contains_key("7"), "one item: no pair");
        assert_eq!(d.inter["6/7"], 6.0);
        assert_eq!(d.inter["7/6"], 3.0);
        assert_eq!(inter_intra_ratio(&d), Some(4.5 / 2.0));
    }
}
