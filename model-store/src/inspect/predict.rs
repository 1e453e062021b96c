//! A prediction: the most probable classes of one image's logits.

use serde::Serialize;

/// One class of a prediction.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassScore {
    /// Output index.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// Softmax probability.
    pub probability: f64,
    /// Raw score before softmax.
    pub logit: f32,
}

/// Softmax of one image's logits, in f64 with the max subtracted so that no
/// logit overflows (the probabilities of every endpoint come from here).
pub fn probabilities(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` most probable classes, highest first.
pub fn top_classes(logits: &[f32], k: usize, labels: &[String]) -> Vec<ClassScore> {
    let probability = probabilities(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable sort: ties keep the lower index first, as torch.topk does on CPU.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| ClassScore {
            class_index: i,
            label: labels[i].clone(),
            probability: probability[i],
            logit: logits[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_classes_are_sorted_and_probabilities_sum_to_one() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let top = top_classes(&[1.0, 3.0, 2.0], 3, &labels);
        assert_eq!(
            top.iter().map(|c| c.class_index).collect::<Vec<_>>(),
            [1, 2, 0]
        );
        let total: f64 = top.iter().map(|c| c.probability).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }
}
