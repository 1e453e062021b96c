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
pub use crate::kernels::relu_rule::ReluRule;

/// An observer of named layer outputs.
pub trait Tap {
    /// Sees a named layer's output; returns the tensor the network continues with.
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor>;

    /// Whether the tap looks at (or replaces) `layer`'s output. When it
    /// does not, the network may skip materialising it: a convolution, the
    /// batch norm and the ReLU after it then run as one fused kernel (two
    /// when [`Self::folds_batch_norm`] is false).
    fn wants(&self, _layer: &str) -> bool {
        true
    }

    /// When true, the network stops at the next layer boundary: whatever it
    /// returns then is not the model output. Lets an embedding request skip
    /// the layers after the one it wants.
    fn is_done(&self) -> bool {
        false
    }

    /// How the pass's ReLUs pass gradients back: guided backpropagation and
    /// deconvolution change the rule, not the network. Any other rule than
    /// the chain rule runs every ReLU as its own node (no chain ending in a
    /// ReLU is fused; other chains still are).
    fn relu_rule(&self) -> ReluRule {
        ReluRule::Autograd
    }

    /// Whether a convolution may run with the batch norm after it folded
    /// into its weights (when the tap wants neither output). Folding
    /// rounds differently from PyTorch's convolution-then-batch-norm by an
    /// ulp or so, which can put a unit within 1e-7 of a ReLU's kink on the
    /// other side: gradients that are compared with PyTorch's at 1e-4 ask
    /// for the two modules' own rounding (the batch norm and the activation
    /// still run as one kernel).
    fn folds_batch_norm(&self) -> bool {
        true
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::LoadedModel;

    fn resnet20() -> LoadedModel {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        LoadedModel::from_files(&models.join("resnet20-cifar10.json"), &Device::Cpu).unwrap()
    }

    fn input() -> Tensor {
        let mut rng = crate::rng::Rng::new(5);
        let v: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu).unwrap()
    }

    /// Counts the layers the pass reported, around another tap.
    struct Counting<T: Tap> {
        inner: T,
        seen: usize,
    }

    impl<T: Tap> Tap for Counting<T> {
        fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
            self.seen += 1;
            self.inner.on_output(layer, output)
        }
        fn wants(&self, layer: &str) -> bool {
            self.inner.wants(layer)
        }
        fn is_done(&self) -> bool {
            self.inner.is_done()
        }
    }

    #[test]
    fn the_fused_pass_and_the_observed_pass_give_the_same_logits() {
        let model = resnet20();
        let x = input();
        // No tap: conv + batch norm + ReLU fused, residual add + ReLU in one.
        let fused = model.network.predict(&x).unwrap();
        // Every layer observed: nothing can be fused.
        let mut all = Record::all();
        let observed = model.network.forward(&x, &mut all).unwrap();
        let diff = (fused - &observed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = observed
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "fused and unfused differ by {diff}"
        );
        assert_eq!(all.outputs.len(), model.network.layers().len());
        // Forward order, as PyTorch's hooks fire: children before their block.
        let names: Vec<&str> = all.outputs.iter().map(|(n, _)| n.as_str()).collect();
        let pos = |n: &str| names.iter().position(|m| *m == n).unwrap();
        assert!(pos("layer1.0.conv1") < pos("layer1.0") && pos("layer1.0") < pos("linear"));
    }

    #[test]
    fn a_record_of_some_layers_stops_the_pass_once_it_has_them() {
        let model = resnet20();
        let total = model.network.layers().len();
        let mut tap = Counting {
            inner: Record::layers(["layer1.0.conv1", "layer1.0"]),
            seen: 0,
        };
        model.network.forward(&input(), &mut tap).unwrap();
        assert_eq!(tap.inner.outputs.len(), 2);
        assert!(tap.inner.get("layer1.0").is_some());
        assert!(
            tap.seen < total / 2,
            "the pass went on to {} of {total} layers",
            tap.seen
        );
        // With the output too, it runs to the end (the layers no tap wants
        // fused, so not reported).
        let mut tap = Record::layers_and_output(["layer1.0"]);
        let out = model.network.forward(&input(), &mut tap).unwrap();
        assert_eq!(out.dims(), [2, 10]);
        assert_eq!(tap.outputs.len(), 1);
    }
}
