//! Layer outputs of the real forward pass, and per-layer statistics.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::tap::Record;

/// Checks that `layer` exists, or lists the layers that do.
pub fn check_layer(model: &LoadedModel, layer: &str) -> Result<()> {
    if model.network.layer(layer).is_some() {
        Ok(())
    } else {
        Err(Error::UnknownLayer {
            model: model.name().to_string(),
            layer: layer.to_string(),
            known: model
                .network
                .layers()
                .iter()
                .map(|l| l.name.clone())
                .collect(),
        })
    }
}

/// The output of one layer for a batch: the pass stops right after it.
pub fn layer_output(model: &LoadedModel, x: &Tensor, layer: &str) -> Result<Tensor> {
    check_layer(model, layer)?;
    let mut tap = Record::layers([layer]);
    model.network.forward(x, &mut tap)?;
    tap.get(layer).cloned().ok_or_else(|| Error::Shape {
        layer: layer.to_string(),
        reason: "produced no output".into(),
    })
}

/// Every named layer's output for a batch, in forward order.
pub fn all_outputs(model: &LoadedModel, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let mut tap = Record::all();
    model.network.forward(x, &mut tap)?;
    Ok(tap.outputs)
}

/// Summary statistics of one layer's output for one image (serialised as
/// the API's per-layer row).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LayerStats {
    /// Layer name.
    pub name: String,
    /// Output shape without the batch dimension.
    pub shape: Vec<usize>,
    /// Mean of all values.
    pub mean: f64,
    /// Population standard deviation (as `torch.std(unbiased=False)`).
    pub std: f64,
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
    /// Fraction of values exactly zero (dead ReLU units show up here).
    pub zero_fraction: f64,
    /// Channels (of a `[C, H, W]` output) whose every value is ≤ 0: for the
    /// input shown, they pass nothing through a following ReLU.
    pub dead_channels: Vec<usize>,
}

/// Statistics of one image's output `[C, H, W]` or `[F]` (batch dim removed).
pub fn layer_stats(name: &str, output: &Tensor) -> Result<LayerStats> {
    let shape = output.dims().to_vec();
    let values = output.flatten_all()?.to_vec1::<f32>()?;
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64;
    let dead_channels = match shape[..] {
        [c, h, w] if c > 0 && h * w > 0 => values
            .chunks(h * w)
            .enumerate()
            .filter(|(_, ch)| ch.iter().all(|&v| v <= 0.0))
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    };
    Ok(LayerStats {
        name: name.to_string(),
        shape,
        mean,
        std: var.sqrt(),
        min,
        max,
        zero_fraction: zeros / n,
        dead_channels,
    })
}

/// A layer's output for a batch, keeping only the selected channels in
/// the order asked for, on the CPU.
#[derive(Debug, Clone)]
pub struct Selected {
    /// `[N, channels kept, ...]`.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
    /// The channels kept (every channel when no selection was given).
    pub channels: Vec<usize>,
}

/// `output` (`[N, C, ...]`) with only the channels `spec` selects
/// (`0-15`, `3,7`; all of them for `None`).
pub fn select_channels(output: &Tensor, spec: Option<&str>) -> Result<Selected> {
    let dims = output.dims().to_vec();
    let channels = dims.get(1).copied().unwrap_or(1);
    let data = output.flatten_all()?.to_vec1::<f32>()?;
    let Some(spec) = spec else {
        return Ok(Selected {
            shape: dims,
            data,
            channels: (0..channels).collect(),
        });
    };
    let sel = parse_channels(spec, channels)?;
    let per_item = data.len() / dims[0].max(1);
    let per_channel = per_item / channels.max(1);
    let mut kept = Vec::with_capacity(dims[0] * sel.len() * per_channel);
    for item in data.chunks(per_item) {
        for &c in &sel {
            kept.extend_from_slice(&item[c * per_channel..(c + 1) * per_channel]);
        }
    }
    let mut shape = dims;
    shape[1] = sel.len();
    Ok(Selected {
        shape,
        data: kept,
        channels: sel,
    })
}

/// One image's output (`[C, H, W]` or `[F]`) as one map for the
/// whole-model sheet: `(h, w, values)`. A spatial map is the mean over its
/// channels; a globally pooled `[C, 1, 1]` or flat output is shown as its
/// vector, which says more than its mean; other shapes have no map.
pub fn summary_map(output: &Tensor) -> Result<Option<(usize, usize, Vec<f32>)>> {
    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    Ok(match output.dims()[..] {
        [c, 1, 1] => Some((1, c, host(output)?)),
        [_, h, w] => Some((h, w, host(&output.mean(0)?)?)),
        [f] => Some((1, f, host(output)?)),
        _ => None,
    })
}

/// Parses a channel selection: `0-15`, `3,7,9`, `0-3,8` (inclusive ranges),
/// checked against the layer's `channels`.
pub fn parse_channels(spec: &str, channels: usize) -> Result<Vec<usize>> {
    let invalid = |reason: String| Error::InvalidArgument {
        param: "channels".into(),
        reason,
    };
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.parse::<usize>().map_err(|_| {
                invalid(format!(
                    "{part:?} is not a channel number or range like 0-15"
                ))
            })
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            return Err(invalid(format!("range {part:?} runs backwards")));
        }
        if b >= channels {
            return Err(invalid(format!(
                "{b} is out of range; the layer has {channels} channels (0-{})",
                channels.saturating_sub(1)
            )));
        }
        out.extend(a..=b);
        if out.len() > 4096 {
            return Err(invalid("at most 4096 channels at once".into()));
        }
    }
    if out.is_empty() {
        return Err(invalid("empty selection; give e.g. 0-15 or 3,7,9".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_selections_parse_and_are_bounded() {
        assert_eq!(parse_channels("0-3", 16).unwrap(), [0, 1, 2, 3]);
        assert_eq!(parse_channels("3,7, 9", 16).unwrap(), [3, 7, 9]);
        assert_eq!(parse_channels("0-1,5", 16).unwrap(), [0, 1, 5]);
        assert!(
            parse_channels("999", 64)
                .unwrap_err()
                .to_string()
                .contains("channels: 999 is out of range; the layer has 64 channels")
        );
        assert!(parse_channels("5-2", 64).is_err());
        assert!(parse_channels("x", 64).is_err());
        assert!(parse_channels("", 64).is_err());
    }

    #[test]
    fn stats_count_zeros_and_dead_channels() {
        let t = Tensor::new(
            &[[[0f32, 0.0], [0.0, -1.0]], [[1.0, 2.0], [3.0, 0.0]]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let s = layer_stats("x", &t).unwrap();
        assert_eq!(s.dead_channels, [0]);
        assert_eq!(s.zero_fraction, 4.0 / 8.0);
        assert_eq!((s.min, s.max), (-1.0, 3.0));
        assert!((s.mean - 5.0 / 8.0).abs() < 1e-12);
    }
}
