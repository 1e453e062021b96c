//! The model manifest (`<name>.json` beside `<name>.safetensors`), as the
//! contract in `spec/api.md` defines it, parsed into typed configuration.
//!
//! Parsing is strict about what it uses and lenient about what it does not:
//! unknown keys (`description`, `test_accuracy`, ...) are kept in
//! [`Manifest::extra`] and ignored, so provenance notes survive a round trip.
//! Every error names the layer (index and name) and the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// A parsed manifest. `layers` stays raw JSON here and is typed by
/// [`parse_layers`], because only the `sequential` architecture reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The model's name in the store and in URLs.
    pub name: String,
    /// `sequential`, `resnet20-cifar`, `torchvision.resnet18`, ...
    pub architecture: String,
    /// The layer list of a `sequential` model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<Value>>,
    /// The nodes of a `graph` model, in topological order (see [`crate::dag`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<Value>>,
    /// The node whose output is the model's (default: the last node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Checkpoint tensors the graph does not use (training-only heads such
    /// as Inception's `AuxLogits`), accepted and dropped rather than refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unused_weights: Vec<String>,
    /// An input and the logits PyTorch gave for it, recomputed on
    /// registration and load ([`crate::check`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::check::CheckSpec>,
    /// What the network takes and how to get there from an image file.
    pub input: InputSpec,
    /// Class labels in output order; optional (labels are then the indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Keys the service does not use, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// The network input and the preprocessing that produces it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    /// 1 (greyscale) or 3 (RGB).
    pub channels: usize,
    /// Input height after preprocessing.
    pub height: usize,
    /// Input width after preprocessing.
    pub width: usize,
    /// Per-channel mean on the `[0, 1]` scale (one value is broadcast).
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation on the `[0, 1]` scale.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Resize so that the shorter side has this length (bilinear).
    #[serde(default)]
    pub resize: Option<usize>,
    /// Center crop to this size after the resize.
    #[serde(default)]
    pub center_crop: Option<Pair>,
}

/// An `int` or `[h, w]`, as PyTorch accepts for sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pair {
    /// The same value for height and width.
    One(usize),
    /// `[height, width]`.
    Two([usize; 2]),
}

impl Pair {
    /// `(height, width)`.
    pub fn hw(self) -> (usize, usize) {
        match self {
            Pair::One(v) => (v, v),
            Pair::Two([h, w]) => (h, w),
        }
    }
}

/// Convolution padding: a size, `"valid"` (0) or `"same"` (stride 1 only, as PyTorch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PaddingSpec {
    /// Explicit symmetric padding.
    Size(Pair),
    /// `"valid"` or `"same"`.
    Named(String),
}

fn one() -> Pair {
    Pair::One(1)
}
fn zero() -> Pair {
    Pair::One(0)
}
fn yes() -> bool {
    true
}
fn usize_one() -> usize {
    1
}
fn eps_default() -> f64 {
    1e-5
}
fn momentum_default() -> f64 {
    0.1
}
fn start_dim_default() -> i64 {
    1
}
fn end_dim_default() -> i64 {
    -1
}
fn dropout_default() -> f64 {
    0.5
}

/// `conv2d`, with `torch.nn.Conv2d`'s argument names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Conv2dSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size.
    pub kernel_size: Pair,
    /// Stride (default 1).
    #[serde(default = "one")]
    pub stride: Pair,
    /// Zero padding (default 0).
    #[serde(default = "padding_zero")]
    pub padding: PaddingSpec,
    /// Dilation (default 1).
    #[serde(default = "one")]
    pub dilation: Pair,
    /// Groups (default 1).
    #[serde(default = "usize_one")]
    pub groups: usize,
    /// Whether the checkpoint has `<name>.bias` (default true).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Only `"zeros"` is supported.
    #[serde(default)]
    pub padding_mode: Option<String>,
}

fn padding_zero() -> PaddingSpec {
    PaddingSpec::Size(Pair::One(0))
}

/// `batch_norm2d` (evaluated with its running statistics).
#[derive(Debug, Clone, Deserialize)]
pub struct BatchNormSpec {
    /// Channels.
    pub num_features: usize,
    /// Added to the variance (default 1e-5).
    #[serde(default = "eps_default")]
    pub eps: f64,
    /// Running-statistics momentum; used by training only.
    #[serde(default = "momentum_default")]
    pub momentum: f64,
    /// Whether the checkpoint has `weight` and `bias` (default true).
    #[serde(default = "yes")]
    pub affine: bool,
}

/// `max_pool2d` and `avg_pool2d`.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolSpec {
    /// Window size.
    pub kernel_size: Pair,
    /// Stride; `kernel_size` when absent, as in PyTorch.
    #[serde(default)]
    pub stride: Option<Pair>,
    /// Implicit padding (−∞ for max, zeros for average).
    #[serde(default = "zero")]
    pub padding: Pair,
    /// Only 1 is supported.
    #[serde(default = "one")]
    pub dilation: Pair,
    /// Round the output size up instead of down.
    #[serde(default)]
    pub ceil_mode: bool,
    /// Average pooling: count padded zeros in the divisor (PyTorch default true).
    #[serde(default = "yes")]
    pub count_include_pad: bool,
}

/// `linear`.
#[derive(Debug, Clone, Deserialize)]
pub struct LinearSpec {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether the checkpoint has `<name>.bias` (default true).
    #[serde(default = "yes")]
    pub bias: bool,
}

/// One typed layer of a `sequential` manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerKind {
    /// `torch.nn.Conv2d`.
    Conv2d(Conv2dSpec),
    /// `torch.nn.BatchNorm2d` in eval mode.
    BatchNorm2d(BatchNormSpec),
    /// `torch.nn.ReLU`.
    Relu {},
    /// `torch.nn.ReLU6`.
    Relu6 {},
    /// `torch.nn.MaxPool2d`.
    MaxPool2d(PoolSpec),
    /// `torch.nn.AvgPool2d`.
    AvgPool2d(PoolSpec),
    /// `torch.nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d {
        /// Output `[h, w]` or one integer.
        output_size: Pair,
    },
    /// `torch.nn.Dropout`: identity at inference.
    Dropout {
        /// Drop probability (used in training only).
        #[serde(default = "dropout_default")]
        p: f64,
    },
    /// `torch.nn.Dropout2d`: identity at inference.
    Dropout2d {
        /// Drop probability (used in training only).
        #[serde(default = "dropout_default")]
        p: f64,
    },
    /// `torch.nn.Flatten`.
    Flatten {
        /// First dimension to flatten (default 1).
        #[serde(default = "start_dim_default")]
        start_dim: i64,
        /// Last dimension to flatten (only -1 is supported).
        #[serde(default = "end_dim_default")]
        end_dim: i64,
    },
    /// `torch.nn.Linear`.
    Linear(LinearSpec),
    /// `torch.nn.Softmax` over the class dimension.
    Softmax {
        /// Must be 1 or -1.
        #[serde(default)]
        dim: Option<i64>,
    },
}

/// A named layer of a `sequential` manifest.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// The name (= checkpoint key prefix = API layer name).
    pub name: String,
    /// What it is.
    pub kind: LayerKind,
}

/// The layer types the contract lists, for error messages.
pub const LAYER_TYPES: &[&str] = &[
    "conv2d",
    "batch_norm2d",
    "relu",
    "relu6",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "dropout",
    "dropout2d",
    "flatten",
    "linear",
    "softmax",
];

impl Manifest {
    /// Parses and validates a manifest from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::Manifest(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what serde cannot: names, input sizes, normalisation vectors.
    pub fn validate(&self) -> Result<()> {
        validate_model_name(&self.name)?;
        let input = &self.input;
        if input.channels != 1 && input.channels != 3 {
            return Err(Error::Manifest(format!(
                "input.channels must be 1 or 3, got {}",
                input.channels
            )));
        }
        if input.height == 0 || input.width == 0 || input.height > 4096 || input.width > 4096 {
            return Err(Error::Manifest(format!(
                "input.height and input.width must be in 1..=4096, got {}x{}",
                input.height, input.width
            )));
        }
        for (field, values) in [("mean", &input.mean), ("std", &input.std)] {
            if let Some(v) = values {
                if v.len() != 1 && v.len() != input.channels {
                    return Err(Error::Manifest(format!(
                        "input.{field} has {} values; give 1 or {} (one per channel)",
                        v.len(),
                        input.channels
                    )));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Manifest(format!("input.{field} must be finite")));
                }
            }
        }
        if let Some(std) = &input.std
            && std.iter().any(|&s| s <= 0.0)
        {
            return Err(Error::Manifest("input.std values must be > 0".into()));
        }
        if let Some(r) = input.resize
            && (r == 0 || r > 4096)
        {
            {
                return Err(Error::Manifest(format!(
                    "input.resize must be in 1..=4096, got {r}"
                )));
            }
        }
        if let Some(classes) = &self.classes
            && classes.is_empty()
        {
            {
                return Err(Error::Manifest(
                    "classes is empty; omit it or list one label per output".into(),
                ));
            }
        }
        Ok(())
    }

    /// The per-channel `(mean, std)` used to normalise `[0, 1]` pixels.
    pub fn normalisation(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.input.channels;
        let expand = |v: &Option<Vec<f32>>, default: f32| match v {
            None => vec![default; c],
            Some(v) if v.len() == 1 => vec![v[0]; c],
            Some(v) => v.clone(),
        };
        (expand(&self.input.mean, 0.0), expand(&self.input.std, 1.0))
    }
}

/// Model names end up in file names and URLs: letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit, at most 64 characters. This rules out path
/// traversal (`../x`) and hidden files.
pub fn validate_model_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::Manifest(format!(
            "name {name:?} is not a valid model name: use 1-64 letters, digits, '.', '_', '-' or '@' (epoch snapshots are name@epoch-N), starting with a letter or digit"
        )))
    }
}

/// Types the `layers` of a `sequential` manifest; errors name the layer.
pub fn parse_layers(raw: &[Value]) -> Result<Vec<LayerSpec>> {
    let mut seen = std::collections::HashSet::new();
    raw.iter()
        .enumerate()
        .map(|(i, v)| {
            let name = v
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::Manifest(format!("layers[{i}]: missing string field `name`"))
                })?
                .to_string();
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(Error::Manifest(format!(
                    "layers[{i}]: name {name:?} must be non-empty, without spaces or '/'"
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(Error::Manifest(format!(
                    "layers[{i}]: name '{name}' is used twice"
                )));
            }
            let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
            if !LAYER_TYPES.contains(&ty) {
                return Err(Error::Manifest(format!(
                    "layers[{i}] ('{name}'): unknown type {ty:?}; known: {}",
                    LAYER_TYPES.join(", ")
                )));
            }
            let kind: LayerKind = serde_json::from_value(v.clone())
                .map_err(|e| Error::Manifest(format!("layers[{i}] ('{name}'): {e}")))?;
            Ok(LayerSpec { name, kind })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cnn_a() -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cnn-a-mnist.json"),
        )
        .unwrap()
    }

    #[test]
    fn a_bundled_manifest_parses_and_keeps_unknown_keys() {
        let mut v: Value = serde_json::from_slice(&cnn_a()).unwrap();
        v["description"] = serde_json::json!("kept, not used");
        let m = Manifest::from_json(v.to_string().as_bytes()).unwrap();
        assert_eq!(m.name, "cnn-a-mnist");
        assert_eq!(m.input.channels, 1);
        assert_eq!(m.extra["description"], "kept, not used");
        let (mean, std) = m.normalisation();
        assert_eq!((mean.len(), std.len()), (1, 1));
    }

    #[test]
    fn layer_errors_name_the_layer_and_the_field() {
        let layers = |l: Value| parse_layers(l.as_array().unwrap()).unwrap_err().to_string();
        let e = layers(serde_json::json!([{"name": "c1", "type": "conv2d", "in_channels": 1}]));
        assert!(
            e.contains("layers[0] ('c1')") && e.contains("out_channels"),
            "{e}"
        );
        let e = layers(serde_json::json!([{"name": "x", "type": "lstm"}]));
        assert!(
            e.contains("unknown type \"lstm\"") && e.contains("conv2d"),
            "{e}"
        );
        let e = layers(
            serde_json::json!([{"name": "a", "type": "relu"}, {"name": "a", "type": "relu"}]),
        );
        assert!(e.contains("used twice"), "{e}");
        assert!(validate_model_name("bad name!").is_err());
        assert!(validate_model_name("net@epoch-3").is_ok());
    }
}
