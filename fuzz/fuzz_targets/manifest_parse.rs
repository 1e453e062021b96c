//! Any bytes as a manifest, and its layer list typed: errors are fine,
//! panics are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_store::Manifest;
use model_store::manifest::parse_layers;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json(data) {
        let _ = m.normalisation();
        if let Some(layers) = &m.layers {
            let _ = parse_layers(layers);
        }
    }
});
