//! Inspection features: pure functions over a loaded model and an input
//! batch, each one the model's single forward pass with a different tap.
//! Encoding (PNG, JSON, npy) is the server's business.

pub mod activations;
pub mod attribution;
pub mod clock;
pub mod embeddings;
pub mod faithfulness;
pub mod filters;
pub mod grad_cam;
pub mod maximize;
pub mod predict;
pub mod sanity;

/// The index of the largest value (the first of equals): the predicted class.
pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// `(v − min) / (max − min)`; all zeros for a constant map.
pub(crate) fn min_max(values: &[f32]) -> Vec<f32> {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = hi - lo;
    values
        .iter()
        .map(|&v| if span > 0.0 { (v - lo) / span } else { 0.0 })
        .collect()
}
