//! Any bytes through image decoding and a model's preprocessing: errors are
//! fine, panics, hangs and unbounded allocations are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_store::Manifest;
use model_store::preprocess::{self, DecodeLimits};

fuzz_target!(|data: &[u8]| {
    static MANIFEST: std::sync::OnceLock<(Manifest, Manifest)> = std::sync::OnceLock::new();
    let (rgb, grey) = MANIFEST.get_or_init(|| {
        let m = |c: usize| {
            Manifest::from_json(
                format!(
                    r#"{{"name":"f","architecture":"sequential","input":{{"channels":{c},"height":32,"width":32,"mean":[0.5],"std":[0.25],"resize":32,"center_crop":32}}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        (m(3), m(1))
    });
    let limits = DecodeLimits { max_pixels: 4_000_000 };
    if let Ok(img) = preprocess::decode(data, limits) {
        for m in [rgb, grey] {
            if let Ok(v) = preprocess::preprocess(&img, m) {
                assert_eq!(v.len(), m.input.channels * 32 * 32);
                assert!(v.iter().all(|x| x.is_finite()));
            }
        }
    }
});
