//! Any bytes as the weights of a small sequential model: lying headers
//! (offsets past the end, huge shapes, wrong dtypes) must be errors, never
//! panics or huge allocations.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use model_store::LoadedModel;

const MANIFEST: &str = r#"{"name":"f","architecture":"sequential",
 "layers":[{"name":"conv1","type":"conv2d","in_channels":1,"out_channels":2,"kernel_size":3},
           {"name":"bn1","type":"batch_norm2d","num_features":2},
           {"name":"relu1","type":"relu"},
           {"name":"flatten","type":"flatten"},
           {"name":"fc","type":"linear","in_features":8,"out_features":3}],
 "input":{"channels":1,"height":4,"width":4}}"#;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = LoadedModel::from_bytes(MANIFEST.as_bytes(), data, &Device::Cpu) {
        let x = candle_core::Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let _ = model.logits(&x);
    }
});
