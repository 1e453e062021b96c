//! Taps: observers of the one forward pass.
//!
//! Every inspection feature is the same forward pass with a different tap.
//! The network calls [`Tap::on_output`] with each named layer's output, in the
//! order PyTorch forward hooks would fire (children before their block), and
//! continues with whatever the tap hands back, so a tap can also replace an
//! output (Grad-CAM swaps in a `Var`).

use std::collections::HashSet;

use candle_core::Tensor;

use crate::error::Result;

/// An observer of named layer outputs.
pub trait Tap {
    /// Sees a named layer's output; returns the tensor the network continues with.
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor>;

    /// Whether the tap looks at (or replaces) `layer`'s output. When it
    /// does not, the network may skip materialising it: a convolution, the
    /// batch norm and the ReLU after it then run as one fused kernel.
    fn wants(&self, _layer: &str) -> bool {
        true
    }

    /// When true, the network stops at the next layer boundary: whatever it
    /// returns then is not the model output. Lets an embedding request skip
    /// the layers after the one it wants.
    fn is_done(&self) -> bool {
        false
    }
}

/// Observes nothing: plain inference.
pub struct NoTap;

impl Tap for NoTap {
    fn on_output(&mut self, _layer: &str, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }

    fn wants(&self, _layer: &str) -> bool {
        false
    }
}

/// Records the outputs of the wanted layers (or of all of them) and stops the
/// pass once every wanted layer has been seen.
pub struct Record {
    wanted: Option<HashSet<String>>,
    /// `(layer, output)` in forward order.
    pub outputs: Vec<(String, Tensor)>,
    stop_when_complete: bool,
}

impl Record {
    /// Records every named layer.
    pub fn all() -> Self {
        Self {
            wanted: None,
            outputs: Vec::new(),
            stop_when_complete: false,
        }
    }

    /// Records only these layers and stops the pass after the last of them.
    pub fn layers<I: IntoIterator<Item = S>, S: Into<String>>(layers: I) -> Self {
        Self {
            wanted: Some(layers.into_iter().map(Into::into).collect()),
            outputs: Vec::new(),
            stop_when_complete: true,
        }
    }

    /// Records only these layers but always runs the whole network (when the
    /// model output is needed as well).
    pub fn layers_and_output<I: IntoIterator<Item = S>, S: Into<String>>(layers: I) -> Self {
        Self {
            stop_when_complete: false,
            ..Self::layers(layers)
        }
    }

    /// The recorded output of `layer`, if it was seen.
    pub fn get(&self, layer: &str) -> Option<&Tensor> {
        self.outputs
            .iter()
            .find(|(name, _)| name == layer)
            .map(|(_, t)| t)
    }
}

impl Tap for Record {
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
        let wanted = self.wanted.as_ref().is_none_or(|w| w.contains(layer));
        if wanted && self.get(layer).is_none() {
            self.outputs.push((layer.to_string(), output.clone()));
        }
        Ok(output)
    }

    fn wants(&self, layer: &str) -> bool {
        self.wanted.as_ref().is_none_or(|w| w.contains(layer))
    }

    fn is_done(&self) -> bool {
        self.stop_when_complete
            && self
                .wanted
                .as_ref()
                .is_some_and(|w| w.len() == self.outputs.len())
    }
}
