//! What each filter learned: a convolution layer's kernels.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::graph::NodeKind;
use crate::model::LoadedModel;

/// Why a layer has no kernels to show.
#[derive(Debug)]
pub enum NoKernels {
    /// The layer does not exist (the known layers are in the error).
    Unknown(Error),
    /// It exists but is not a convolution; these are.
    NotConv {
        /// The layer's kind (`max_pool2d`, ...).
        kind: &'static str,
        /// The convolution layers of the model.
        conv_layers: Vec<String>,
    },
}

/// The kernels `[O, I/groups, kh, kw]` of convolution `layer`.
pub fn kernels(model: &LoadedModel, layer: &str) -> std::result::Result<Tensor, NoKernels> {
    crate::inspect::activations::check_layer(model, layer).map_err(NoKernels::Unknown)?;
    match model.network.conv_weight(layer) {
        Some(w) => Ok(w.clone()),
        None => Err(NoKernels::NotConv {
            kind: model
                .network
                .layer(layer)
                .map_or("layer", |l| l.kind.name()),
            conv_layers: conv_layers(model),
        }),
    }
}

/// Names of the model's convolution layers, in forward order.
pub fn conv_layers(model: &LoadedModel) -> Vec<String> {
    model
        .network
        .layers()
        .iter()
        .filter(|l| l.kind == NodeKind::Conv2d)
        .map(|l| l.name.clone())
        .collect()
}

/// One output channel's kernel (`[I, kh, kw]`, flat) as a single `kh × kw`
/// plane: input channel `plane`, or the mean over every input channel.
pub fn kernel_plane(kernel: &[f32], in_channels: usize, plane: Option<usize>) -> Vec<f32> {
    let k2 = kernel.len() / in_channels.max(1);
    match plane {
        Some(n) => kernel[n * k2..(n + 1) * k2].to_vec(),
        None => (0..k2)
            .map(|j| {
                (0..in_channels).map(|ch| kernel[ch * k2 + j]).sum::<f32>() / in_channels as f32
            })
            .collect(),
    }
}

/// The kernels as `f32` values with their shape, on the CPU.
pub fn to_host(t: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
}
