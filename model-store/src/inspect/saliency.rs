//! Which input pixels the class score is most sensitive to: the gradient
//! of the class logit with respect to the (normalised) input, vanilla or
//! averaged over noisy copies (SmoothGrad, Smilkov et al. 2017).
//!
//! The map shown is, per pixel, the largest absolute gradient over the
//! colour channels (Simonyan et al. 2014), min-max scaled to `[0, 1]`.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::rng::Rng;

/// Input gradients of a batch.
#[derive(Debug, Clone)]
pub struct Saliency {
    /// The class explained, per image.
    pub class_index: Vec<usize>,
    /// Its logit on the clean input, per image.
    pub score: Vec<f32>,
    /// `∂ logit / ∂ input`, `[N, C, H, W]` flattened per image (averaged
    /// over the noisy copies for SmoothGrad).
    pub gradient: Vec<Vec<f32>>,
    /// `max_c |gradient|`, min-max scaled, `H·W` per image.
    pub map: Vec<Vec<f32>>,
}

/// Gradients of each image's class logit (`None`: the predicted class).
pub fn input_gradient(
    model: &LoadedModel,
    x: &Tensor,
    classes: &[Option<usize>],
) -> Result<(Tensor, Vec<usize>, Vec<f32>)> {
    let k = model.classes.len();
    if let Some(bad) = classes.iter().flatten().find(|&&c| c >= k) {
        return Err(Error::ImageInput(format!(
            "class {bad} is out of range: the model has {k} classes (0-{})",
            k - 1
        )));
    }
    let var = Var::from_tensor(&x.detach())?;
    let logits = model.logits(var.as_tensor())?;
    let rows = logits.to_vec2::<f32>()?;
    let class_of: Vec<usize> = rows
        .iter()
        .zip(classes)
        .map(|(row, c)| c.unwrap_or_else(|| argmax(row)))
        .collect();
    let mut onehot = vec![0f32; rows.len() * k];
    for (r, &c) in class_of.iter().enumerate() {
        onehot[r * k + c] = 1.0;
    }
    let mask = Tensor::from_vec(onehot, (rows.len(), k), x.device())?;
    let grads = logits.mul(&mask)?.sum_all()?.backward()?;
    let g = match grads.get(var.as_tensor()) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    let scores = class_of.iter().zip(&rows).map(|(&c, row)| row[c]).collect();
    Ok((g, class_of, scores))
}

/// Vanilla gradients (`samples == 0`) or SmoothGrad: the mean gradient over
/// `samples` copies with Gaussian noise of standard deviation
/// `noise · (max(x) − min(x))` per image, from a seeded generator.
pub fn saliency(
    model: &LoadedModel,
    x: &Tensor,
    classes: &[Option<usize>],
    samples: usize,
    noise: f32,
    seed: u64,
) -> Result<Saliency> {
    let (g, class_index, score) = input_gradient(model, x, classes)?;
    let (n, c, h, w) = x.dims4()?;
    let mut total = g.to_dtype(DType::F32)?;
    if samples > 0 {
        let fixed: Vec<Option<usize>> = class_index.iter().map(|&c| Some(c)).collect();
        let host = x.flatten_all()?.to_vec1::<f32>()?;
        let per = c * h * w;
        let sigma: Vec<f32> = host
            .chunks(per)
            .map(|img| {
                let (lo, hi) = img
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                noise * (hi - lo)
            })
            .collect();
        let mut rng = Rng::new(seed);
        total = total.zeros_like()?;
        for _ in 0..samples {
            let noisy: Vec<f32> = host
                .iter()
                .enumerate()
                .map(|(i, &v)| v + sigma[i / per] * rng.normal())
                .collect();
            let xn = Tensor::from_vec(noisy, (n, c, h, w), x.device())?;
            let (gn, _, _) = input_gradient(model, &xn, &fixed)?;
            total = (total + gn)?;
        }
        total = (total / samples as f64)?;
    }
    let flat = total.flatten_all()?.to_vec1::<f32>()?;
    let per = c * h * w;
    let gradient: Vec<Vec<f32>> = flat.chunks(per).map(<[f32]>::to_vec).collect();
    let map = gradient
        .iter()
        .map(|g| {
            let m: Vec<f32> = (0..h * w)
                .map(|p| {
                    (0..c)
                        .map(|ch| g[ch * h * w + p].abs())
                        .fold(0f32, f32::max)
                })
                .collect();
            let (lo, hi) = m
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let span = hi - lo;
            m.iter()
                .map(|&v| if span > 0.0 { (v - lo) / span } else { 0.0 })
                .collect()
        })
        .collect();
    Ok(Saliency {
        class_index,
        score,
        gradient,
        map,
    })
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}
