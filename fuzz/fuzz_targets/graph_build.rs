//! Any bytes as a `graph` manifest, built and (when small) run: the node
//! parser, the shape rules and the interpreter. There are no weights, so
//! a node that needs some fails the checkpoint check before anything is
//! prepared; weightless graphs (activations, arithmetic, reshapes, pools,
//! cat, slices) run on a seeded input. Errors are fine, panics are findings.
#![no_main]

use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;
use model_store::LoadedModel;

/// An empty safetensors file: 8-byte header length, then `{}` padded.
const EMPTY: &[u8] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ";

fuzz_target!(|data: &[u8]| {
    let Ok(model) = LoadedModel::from_bytes(data, EMPTY, &Device::Cpu) else {
        return;
    };
    // Keep each run small: the node limit allows 1 GiB per node.
    if model.network.activation_bytes() > 64 << 20 {
        return;
    }
    let (c, h, w) = model.network.input();
    let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 7919) % 17) as f32 - 8.0).collect();
    if let Ok(x) = Tensor::from_vec(x, (1, c, h, w), &Device::Cpu) {
        let _ = model.network.predict(&x);
    }
});
