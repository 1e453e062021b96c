//! How faithful an explanation is: what happens to the class probability
//! when the pixels the map ranks highest are removed or kept.
//!
//! The map is `H × W` at the input's size (a Grad-CAM map resized by
//! [`resize_cam`], an attribution summed over channels). With `p(x)` the
//! softmax probability of the class:
//! - `deletion`, `insertion` (Petsiuk et al. 2018): pixel positions ranked
//!   by the map, highest first (ties: lower row-major index first); for
//!   `i = 0 … steps` the first `⌊i·H·W/steps⌋` positions (all channels) are
//!   replaced by the baseline (deletion: zeros in the normalised space or
//!   the blurred image), or copied from the image into the blurred image
//!   (insertion); the score is the trapezoid-rule area under `p` over
//!   `i / steps`. Every step of a curve goes through the network in one
//!   batch.
//! - `road_morf`, `road_lerf` (Rong et al. 2022), as pytorch-grad-cam's
//!   `ROADMostRelevantFirstAverage` / `ROADLeastRelevantFirstAverage` with
//!   the imputer's noise at 0: for percentiles 10, 20, …, 90 the pixels at
//!   or above that percentile of the map (of `1 − map` for LeRF) are
//!   imputed by [`impute`], and the score is the mean change of `p`.
//! - `drop_in_confidence`, `increase_in_confidence`: pytorch-grad-cam's
//!   `DropInConfidence` (`max(p(x) − p(x·map), 0)`) and
//!   `IncreaseInConfidence` (`1` if `p(x·map) > p(x)` else `0`).

use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::inspect::argmax;
use crate::inspect::attribution::{self, BLUR_SIGMA, Tunnel, blur};
use crate::inspect::clock::Clock;
use crate::inspect::grad_cam::{self, Target};
use crate::model::LoadedModel;

/// A method whose map is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Explainer {
    /// A Grad-CAM-family map at `layer`, resized to the input.
    Cam {
        /// The method.
        method: grad_cam::Method,
        /// Its layer.
        layer: String,
    },
    /// An attribution summed over channels.
    Attribution {
        /// The method.
        method: attribution::Method,
        /// Its noise tunnel, if any.
        tunnel: Option<Tunnel>,
    },
}

impl Explainer {
    /// Network passes its map of one image takes.
    pub fn passes(&self, model: &LoadedModel) -> usize {
        match self {
            Explainer::Cam { method, layer } => {
                let channels = model
                    .network
                    .layer(layer)
                    .and_then(|l| l.output_shape.first().copied())
                    .unwrap_or(1);
                method.passes(channels, false)
            }
            Explainer::Attribution { method, tunnel } => {
                let (_, h, w) = model.network.input();
                method.passes(h, w) * tunnel.map_or(1, |t| t.samples)
            }
        }
    }

    /// The map of image `x` (`[1, C, H, W]`) for `class` at the input's
    /// size: a Grad-CAM map's `cam` by [`resize_cam`], an attribution's
    /// sum over channels.
    pub fn map(
        &self,
        model: &LoadedModel,
        x: &Tensor,
        class: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<f32>> {
        let (_, c, h, w) = x.dims4()?;
        Ok(match self {
            Explainer::Cam { method, layer } => {
                let target = Target {
                    image: 0,
                    class: Some(class),
                };
                let options = grad_cam::Options {
                    deadline,
                    ..Default::default()
                };
                let set = grad_cam::grad_cam_with(model, x, layer, &[target], *method, options)?;
                resize_cam(&set.cams[0].cam, set.shape, (h, w))
            }
            Explainer::Attribution { method, tunnel } => {
                let a =
                    attribution::attribute(model, x, &[Some(class)], method, *tunnel, deadline)?;
                attribution::channel_sum(&a[0].values, c, h * w)
            }
        })
    }
}

/// One image's scores.
#[derive(Debug, Clone)]
pub struct Report {
    /// The class explained.
    pub class_index: usize,
    /// Its softmax probability on the image.
    pub probability: f32,
    /// Per explainer, in order: each metric's score.
    pub scores: Vec<Vec<Score>>,
}

/// Scores each explainer's map of each image of `x` (`[N, C, H, W]`) for
/// `class` (`None`: each image's predicted class) with `metrics`.
pub fn report(
    model: &LoadedModel,
    x: &Tensor,
    class: Option<usize>,
    explainers: &[Explainer],
    metrics: &[Metric],
    options: Options,
) -> Result<Vec<Report>> {
    let k = model.classes.len();
    if let Some(bad) = class.filter(|&c| c >= k) {
        return Err(Error::ImageInput(format!(
            "class {bad} is out of range: the model has {k} classes (0-{})",
            k - 1
        )));
    }
    let probs = candle_nn::ops::softmax_last_dim(&model.logits(x)?)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(probs.len());
    for (i, row) in probs.iter().enumerate() {
        let class = class.unwrap_or_else(|| argmax(row));
        let xi = x.narrow(0, i, 1)?;
        let mut scores = Vec::with_capacity(explainers.len());
        for e in explainers {
            let map = e.map(model, &xi, class, options.deadline)?;
            scores.push(score(model, &xi, class, &map, metrics, options)?);
        }
        out.push(Report {
            class_index: class,
            probability: row[class],
            scores,
        });
    }
    Ok(out)
}

/// A faithfulness score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Area under the probability as the top pixels are removed (lower is better).
    Deletion,
    /// Area under the probability as the top pixels are restored (higher is better).
    Insertion,
    /// Mean probability change with the most relevant pixels imputed (lower is better).
    RoadMorf,
    /// Mean probability change with the least relevant pixels imputed (higher is better).
    RoadLerf,
    /// The probability lost when the image is multiplied by the map.
    DropInConfidence,
    /// Whether the probability rises when the image is multiplied by the map.
    IncreaseInConfidence,
}

/// Every metric, in the contract's order.
pub const METRICS: [Metric; 6] = [
    Metric::Deletion,
    Metric::Insertion,
    Metric::RoadMorf,
    Metric::RoadLerf,
    Metric::DropInConfidence,
    Metric::IncreaseInConfidence,
];

impl Metric {
    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Deletion => "deletion",
            Metric::Insertion => "insertion",
            Metric::RoadMorf => "road_morf",
            Metric::RoadLerf => "road_lerf",
            Metric::DropInConfidence => "drop_in_confidence",
            Metric::IncreaseInConfidence => "increase_in_confidence",
        }
    }

    /// Parses an API name.
    pub fn parse(s: &str) -> Option<Self> {
        METRICS.into_iter().find(|m| m.name() == s)
    }

    /// Whether it has a curve over the steps.
    pub fn has_curve(self) -> bool {
        matches!(self, Metric::Deletion | Metric::Insertion)
    }
}

/// What deleted pixels become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeletionBaseline {
    /// Zeros in the normalised input space.
    #[default]
    Zero,
    /// The image blurred (Gaussian, σ = 5 px).
    Blur,
}

/// One metric's result.
#[derive(Debug, Clone)]
pub struct Score {
    /// The metric.
    pub metric: Metric,
    /// Its value.
    pub value: f32,
    /// Deletion and insertion: `p` at each of the `steps + 1` fractions.
    pub curve: Option<Vec<f32>>,
}

/// The percentiles ROAD averages over.
pub const ROAD_PERCENTILES: [f64; 9] = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0];

/// Input values per batch of perturbed copies.
const BATCH_VALUES: usize = 1 << 21;

/// How the metrics run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Deletion and insertion: the curve's steps.
    pub steps: usize,
    /// Deletion: what removed pixels become.
    pub baseline: DeletionBaseline,
    /// When set, scoring stops with [`Error::DeadlineExceeded`] between
    /// batches once it has passed.
    pub deadline: Option<Instant>,
}

/// Scores the map `map` (`H·W`) of image `x` (`[1, C, H, W]`, normalised)
/// for `class` with each metric.
pub fn score(
    model: &LoadedModel,
    x: &Tensor,
    class: usize,
    map: &[f32],
    metrics: &[Metric],
    options: Options,
) -> Result<Vec<Score>> {
    let Options {
        steps,
        baseline,
        deadline,
    } = options;
    if steps == 0 {
        return Err(Error::InvalidArgument {
            param: "steps".into(),
            reason: "must be at least 1".into(),
        });
    }
    let (_, c, h, w) = x.dims4()?;
    if map.len() != h * w {
        return Err(Error::Shape {
            layer: "map".into(),
            reason: format!("has {} values for a {h}x{w} input", map.len()),
        });
    }
    let clock = Clock::new(deadline);
    let img = x.flatten_all()?.to_vec1::<f32>()?;
    let blurred = || blur(&img, c, h, w, BLUR_SIGMA);
    let probs = |batch: Vec<f32>, n: usize| -> Result<Vec<f32>> {
        clock.check()?;
        probabilities(
            model,
            &Tensor::from_vec(batch, (n, c, h, w), x.device())?,
            class,
        )
    };
    let p0 = probs(img.clone(), 1)?[0];
    let order = ranking(map);
    let hw = h * w;
    let mut out = Vec::with_capacity(metrics.len());
    for &metric in metrics {
        let (value, curve) = match metric {
            Metric::Deletion | Metric::Insertion => {
                let (start, source) = match (metric, baseline) {
                    (Metric::Insertion, _) => (blurred(), img.clone()),
                    (_, DeletionBaseline::Zero) => (img.clone(), vec![0.0; img.len()]),
                    (_, DeletionBaseline::Blur) => (img.clone(), blurred()),
                };
                let mut curve = Vec::with_capacity(steps + 1);
                let per_batch = (BATCH_VALUES / img.len()).clamp(1, steps + 1);
                let fractions: Vec<usize> = (0..=steps).collect();
                for part in fractions.chunks(per_batch) {
                    let mut batch = Vec::with_capacity(part.len() * img.len());
                    for &i in part {
                        let k = i * hw / steps;
                        let from = batch.len();
                        batch.extend_from_slice(&start);
                        for &p in &order[..k] {
                            for ch in 0..c {
                                batch[from + ch * hw + p] = source[ch * hw + p];
                            }
                        }
                    }
                    curve.extend(probs(batch, part.len())?);
                }
                (trapezoid(&curve), Some(curve))
            }
            Metric::RoadMorf | Metric::RoadLerf => {
                let ranked: Vec<f32> = match metric {
                    Metric::RoadMorf => map.to_vec(),
                    _ => map.iter().map(|v| 1.0 - v).collect(),
                };
                // The nine imputations are independent, so they spread
                // over the pool; each is solved exactly as alone, so the
                // report's numbers do not change (a 3 × 4 × 20 report on
                // ResNet-20 took 12% less time on two threads).
                let images: Vec<Vec<f32>> = ROAD_PERCENTILES
                    .par_iter()
                    .map(|&q| {
                        clock.check()?;
                        let threshold = percentile(&ranked, q);
                        let keep: Vec<bool> = ranked.iter().map(|&v| v < threshold).collect();
                        impute(&img, c, h, w, &keep, deadline)
                    })
                    .collect::<Result<_>>()?;
                let batch = images.concat();
                let ps = probs(batch, ROAD_PERCENTILES.len())?;
                let mean = ps.iter().map(|&p| (p - p0) as f64).sum::<f64>() / ps.len() as f64;
                (mean as f32, None)
            }
            Metric::DropInConfidence | Metric::IncreaseInConfidence => {
                let scaled: Vec<f32> = img
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v * map[i % hw])
                    .collect();
                let change = probs(scaled, 1)?[0] - p0;
                let value = match metric {
                    Metric::DropInConfidence => (-change).max(0.0),
                    _ => f32::from(change > 0.0),
                };
                (value, None)
            }
        };
        out.push(Score {
            metric,
            value,
            curve,
        });
    }
    Ok(out)
}

/// Forward passes the metrics take per map: a curve's `steps + 1`, ROAD's
/// nine imputations, one for the confidence scores.
pub fn metric_passes(metrics: &[Metric], steps: usize) -> usize {
    metrics
        .iter()
        .map(|m| match m {
            Metric::Deletion | Metric::Insertion => steps + 1,
            Metric::RoadMorf | Metric::RoadLerf => ROAD_PERCENTILES.len(),
            Metric::DropInConfidence | Metric::IncreaseInConfidence => 1,
        })
        .sum()
}

/// Softmax probability of `class` for each image of a batch.
fn probabilities(model: &LoadedModel, x: &Tensor, class: usize) -> Result<Vec<f32>> {
    let p = candle_nn::ops::softmax_last_dim(&model.logits(x)?)?;
    Ok(p.narrow(1, class, 1)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Positions by value, highest first; ties keep the lower index first
/// (`−0` ties with `0`, as in NumPy's stable argsort; NaN ranks last).
pub fn ranking(map: &[f32]) -> Vec<usize> {
    let key = |v: f32| {
        if v.is_nan() {
            f32::NEG_INFINITY
        } else if v == 0.0 {
            0.0
        } else {
            v
        }
    };
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| key(map[b]).total_cmp(&key(map[a])));
    order
}

/// The trapezoid rule over `y` at `0, 1/n, …, 1`.
pub fn trapezoid(y: &[f32]) -> f32 {
    if y.len() < 2 {
        return 0.0;
    }
    let n = (y.len() - 1) as f64;
    let inner: f64 = y
        .windows(2)
        .map(|p| (p[0] as f64 + p[1] as f64) / 2.0)
        .sum();
    (inner / n) as f32
}

/// `numpy.percentile(values, q)`: linear interpolation between the closest
/// ranks.
pub fn percentile(values: &[f32], q: f64) -> f32 {
    let mut sorted: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    sorted.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = pos - lo as f64;
    (sorted[lo] + t * (sorted[hi] - sorted[lo])) as f32
}

/// ROAD's noisy linear imputation with the noise at 0: every pixel not
/// kept becomes the weighted mean of its in-image 8 neighbours (weight 1/6
/// along the axes, 1/12 on the diagonals), kept or imputed, per channel, as
/// pytorch-grad-cam's `NoisyLinearImputer`. Its sparse system is
/// symmetric positive definite wherever the imputed pixels touch a kept
/// one, so conjugate gradients solve it (in f64, to a relative residual of
/// 1e-12) where pytorch-grad-cam calls a direct sparse solver. Stops with
/// [`Error::DeadlineExceeded`] (checked every 64 iterations) once
/// `deadline` has passed.
pub fn impute(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    keep: &[bool],
    deadline: Option<Instant>,
) -> Result<Vec<f32>> {
    const NEIGHBOURS: [((isize, isize), f64); 8] = [
        ((1, 1), 1.0 / 12.0),
        ((0, 1), 1.0 / 6.0),
        ((-1, 1), 1.0 / 12.0),
        ((1, -1), 1.0 / 12.0),
        ((0, -1), 1.0 / 6.0),
        ((-1, -1), 1.0 / 12.0),
        ((1, 0), 1.0 / 6.0),
        ((-1, 0), 1.0 / 6.0),
    ];
    let hw = h * w;
    let unknown: Vec<usize> = (0..hw).filter(|&p| !keep[p]).collect();
    let mut index = vec![usize::MAX; hw];
    for (i, &p) in unknown.iter().enumerate() {
        index[p] = i;
    }
    // Per unknown: its diagonal (in-image weights) and its neighbours.
    let n = unknown.len();
    let mut diag = vec![0f64; n];
    let mut links: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
    let mut known: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
    for (i, &p) in unknown.iter().enumerate() {
        let (y, x) = ((p / w) as isize, (p % w) as isize);
        for ((dy, dx), wt) in NEIGHBOURS {
            let (ny, nx) = (y + dy, x + dx);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            diag[i] += wt;
            let q = ny as usize * w + nx as usize;
            if keep[q] {
                known[i].push((q, wt));
            } else {
                links[i].push((index[q], wt));
            }
        }
    }
    let apply = |v: &[f64], out: &mut [f64]| {
        for i in 0..n {
            out[i] = diag[i] * v[i] - links[i].iter().map(|&(j, wt)| wt * v[j]).sum::<f64>();
        }
    };
    let mut out = img.to_vec();
    for ch in 0..c {
        let plane = &img[ch * hw..(ch + 1) * hw];
        let b: Vec<f64> = known
            .iter()
            .map(|k| k.iter().map(|&(q, wt)| wt * plane[q] as f64).sum())
            .collect();
        let x = conjugate_gradients(&apply, &b, n, deadline)?;
        for (i, &p) in unknown.iter().enumerate() {
            out[ch * hw + p] = x[i] as f32;
        }
    }
    Ok(out)
}

fn conjugate_gradients(
    apply: &dyn Fn(&[f64], &mut [f64]),
    b: &[f64],
    n: usize,
    deadline: Option<Instant>,
) -> Result<Vec<f64>> {
    let clock = Clock::new(deadline);
    let mut x = vec![0f64; n];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut ap = vec![0f64; n];
    let norm_b: f64 = b.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut rr: f64 = r.iter().map(|v| v * v).sum();
    if norm_b == 0.0 {
        return Ok(x);
    }
    for iteration in 0..(10 * n).max(100) {
        if rr.sqrt() <= 1e-12 * norm_b {
            break;
        }
        if iteration % 64 == 63 {
            clock.check()?;
        }
        apply(&p, &mut ap);
        let pap: f64 = p.iter().zip(&ap).map(|(a, b)| a * b).sum();
        if pap <= 0.0 {
            break;
        }
        let alpha = rr / pap;
        for i in 0..n {
            x[i] += alpha * p[i];
            r[i] -= alpha * ap[i];
        }
        let next: f64 = r.iter().map(|v| v * v).sum();
        let beta = next / rr;
        rr = next;
        for i in 0..n {
            p[i] = r[i] + beta * p[i];
        }
    }
    Ok(x)
}

/// A Grad-CAM map (`lh × lw`, in `[0, 1]`) at the input's `h × w`:
/// bilinear with half-pixel centres and clamped borders (`cv2.resize`'s
/// `INTER_LINEAR`), then min-max scaled again, as pytorch-grad-cam's
/// `scale_cam_image` leaves it.
pub fn resize_cam(cam: &[f32], (lh, lw): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let axis = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                let f = (o as f64 + 0.5) * scale - 0.5;
                let i0 = f.floor();
                let t = (f - i0) as f32;
                let i0 = i0 as isize;
                let clamp = |i: isize| i.clamp(0, inp as isize - 1) as usize;
                if i0 < 0 {
                    (0, 0, 0.0)
                } else if i0 as usize >= inp - 1 {
                    (inp - 1, inp - 1, 0.0)
                } else {
                    (clamp(i0), clamp(i0 + 1), t)
                }
            })
            .collect()
    };
    let (ys, xs) = (axis(h, lh), axis(w, lw));
    let mut out = Vec::with_capacity(h * w);
    for &(y0, y1, ty) in &ys {
        for &(x0, x1, tx) in &xs {
            let top = cam[y0 * lw + x0] * (1.0 - tx) + cam[y0 * lw + x1] * tx;
            let bottom = cam[y1 * lw + x0] * (1.0 - tx) + cam[y1 * lw + x1] * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    let min = out.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = out.iter().map(|v| v - min).collect();
    let max = shifted.iter().copied().fold(0f32, f32::max);
    shifted.iter().map(|v| v / (1e-7 + max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_breaks_ties_by_position_and_the_trapezoid_is_exact_for_lines() {
        assert_eq!(ranking(&[0.5, 1.0, 0.5, 0.0]), [1, 0, 2, 3]);
        assert_eq!(ranking(&[-0.0, 0.0, f32::NAN, -1.0]), [0, 1, 3, 2]);
        assert!((trapezoid(&[0.0, 0.5, 1.0]) - 0.5).abs() < 1e-7);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 90.0), 2.8);
    }

    #[test]
    fn imputation_fills_a_hole_with_its_neighbours_mean() {
        // A 3x3 constant plane with its centre missing: the centre is the
        // constant; a linear ramp is reproduced exactly (the weights are
        // symmetric).
        let mut keep = vec![true; 9];
        keep[4] = false;
        let flat = impute(&[2.0; 9], 1, 3, 3, &keep, None).unwrap();
        assert!((flat[4] - 2.0).abs() < 1e-6);
        let ramp: Vec<f32> = (0..25).map(|i| (i % 5) as f32).collect();
        let mut keep = vec![true; 25];
        for p in [6, 7, 8, 11, 12, 13, 16, 17, 18] {
            keep[p] = false;
        }
        let filled = impute(&ramp, 1, 5, 5, &keep, None).unwrap();
        for p in [6, 7, 8, 11, 12, 13, 16, 17, 18] {
            assert!((filled[p] - ramp[p]).abs() < 1e-6, "{p}: {}", filled[p]);
        }
    }

    #[test]
    fn resizing_keeps_a_constant_and_clamps_its_borders() {
        let up = resize_cam(&[0.0, 1.0], (1, 2), (1, 4));
        // Half-pixel centres: x = 0.5·(o + 0.5) − 0.5 → −0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
        let want = [0.0, 0.25, 0.75, 1.0];
        for (g, w) in up.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{up:?}");
        }
    }
}
