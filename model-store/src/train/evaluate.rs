//! Accuracy, per-class precision and recall, and the confusion matrix.

use std::path::Path;

use candle_core::Device;
use serde::Serialize;

use super::data::{self, Augment, Batcher};
use super::net::{TrainNet, argmax};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// The scores of `model` on a preprocessed batch `x` whose true classes
/// are `labels` (uploaded, labelled images).
pub fn evaluate_batch(
    model: &LoadedModel,
    x: &candle_core::Tensor,
    labels: &[u32],
) -> Result<Evaluation> {
    let predicted = argmax(&model.logits(x)?)?;
    Ok(score(labels, &predicted, &model.classes))
}

/// Accuracy and per-image predictions of `net` on `images`, in eval mode.
pub(super) fn evaluate_net(
    net: &mut TrainNet,
    batcher: &Batcher,
    images: &data::Images,
    device: &Device,
) -> Result<(f64, Vec<u32>)> {
    let mut predictions = Vec::with_capacity(images.len());
    let all: Vec<usize> = (0..images.len()).collect();
    for idx in all.chunks(256) {
        let (x, _) = batcher.batch(images, idx, Augment::default(), None, device)?;
        let logits = net.forward(&x, None)?;
        predictions.extend(argmax(&logits)?);
    }
    let correct = predictions
        .iter()
        .zip(&images.labels)
        .filter(|(a, b)| a == b)
        .count();
    Ok((correct as f64 / images.len().max(1) as f64, predictions))
}

/// Confusion matrix and per-class precision/recall of a loaded model.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evaluation {
    /// Fraction correct.
    pub accuracy: f64,
    /// Images evaluated.
    pub count: usize,
    /// `M[true][predicted]` counts.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Per class: precision, recall, support.
    pub per_class: Vec<ClassScores>,
    /// Class names, the matrix's row and column order.
    pub classes: Vec<String>,
}

/// One class's scores.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassScores {
    /// Label.
    pub label: String,
    /// Of the images predicted as this class, the fraction that are (0 when none were).
    pub precision: f64,
    /// Of the images of this class, the fraction predicted so (0 when there are none).
    pub recall: f64,
    /// Images of this class.
    pub support: u64,
}

/// Scores predictions against labels.
pub fn score(labels: &[u32], predicted: &[u32], classes: &[String]) -> Evaluation {
    let k = classes.len();
    let mut m = vec![vec![0u64; k]; k];
    for (&t, &p) in labels.iter().zip(predicted) {
        if (t as usize) < k && (p as usize) < k {
            m[t as usize][p as usize] += 1;
        }
    }
    let per_class = (0..k)
        .map(|c| {
            let tp = m[c][c] as f64;
            let support: u64 = m[c].iter().sum();
            let predicted: u64 = m.iter().map(|row| row[c]).sum();
            ClassScores {
                label: classes[c].clone(),
                precision: if predicted == 0 {
                    0.0
                } else {
                    tp / predicted as f64
                },
                recall: if support == 0 {
                    0.0
                } else {
                    tp / support as f64
                },
                support,
            }
        })
        .collect();
    let correct: u64 = (0..k).map(|c| m[c][c]).sum();
    Evaluation {
        accuracy: correct as f64 / labels.len().max(1) as f64,
        count: labels.len(),
        confusion_matrix: m,
        per_class,
        classes: classes.to_vec(),
    }
}

/// Evaluates a loaded model on a dataset's test split (the first `limit`
/// images), preprocessed as the model's manifest says.
pub fn evaluate(
    model: &LoadedModel,
    datasets_dir: &Path,
    dataset: &str,
    limit: Option<usize>,
) -> Result<Evaluation> {
    let input = &model.manifest.input;
    let mut ds = data::open(datasets_dir, dataset, &model.manifest, 0.2)?;
    if ds.test.shape.1 != input.height || ds.test.shape.2 != input.width {
        return Err(Error::Dataset(format!(
            "dataset '{dataset}' has {}x{} images but model '{}' takes {}x{}",
            ds.test.shape.1,
            ds.test.shape.2,
            model.name(),
            input.height,
            input.width
        )));
    }
    if ds.classes.len() != model.classes.len() {
        return Err(Error::Dataset(format!(
            "dataset '{dataset}' has {} classes but model '{}' outputs {}",
            ds.classes.len(),
            model.name(),
            model.classes.len()
        )));
    }
    if let Some(n) = limit {
        ds.test.truncate(n);
    }
    let (mean, std) = model.manifest.normalisation();
    let batcher = Batcher {
        channels: input.channels,
        mean,
        std,
    };
    let mut predicted = Vec::with_capacity(ds.test.len());
    let all: Vec<usize> = (0..ds.test.len()).collect();
    for idx in all.chunks(256) {
        let (x, _) = batcher.batch(&ds.test, idx, Augment::default(), None, &model.device)?;
        predicted.extend(argmax(&model.network.predict(&x)?)?);
    }
    Ok(score(&ds.test.labels, &predicted, &model.classes))
}
