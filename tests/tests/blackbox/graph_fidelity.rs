//! `graph` manifests against PyTorch, node by node: every torchvision
//! classification CNN family and a student-style net, exported by
//! `tools/export/convscope_export.py` with hash-derived weights
//! (`tools/golden/graph_models.py` wrote the fixtures). In-process, through
//! `LoadedModel` (which also recomputes the manifest's `check`), because
//! comparing every node over HTTP would run hundreds of forward passes per
//! model; `graph_api.rs` registers the same manifests over HTTP.
//!
//! Tolerances: logits and every node within 1e-4 of max(|x|, RMS of the
//! node) (float32 summation order differs between kernels), sums within
//! 1e-4 of the sum of |x|, the same top-5, Grad-CAM r ≥ 0.999 against
//! pytorch-grad-cam.

use candle_core::{Device, Tensor};
use convscope_tests::{f32s, hash_tensors, repo, safetensors};
use model_store::inspect::grad_cam::{self, Method, Target};
use model_store::{LoadedModel, Record};
use serde_json::Value;

/// The fixture and the model built from its manifest and hash weights.
pub(crate) fn load(key: &str) -> (Value, LoadedModel) {
    let path = repo().join(format!("tests/fixtures/graph/{key}.json"));
    let fixture: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let weights = hash_weights(&fixture);
    let manifest = serde_json::to_vec(&fixture["manifest"]).unwrap();
    let model = LoadedModel::from_bytes(&manifest, &weights, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    (fixture, model)
}

/// The safetensors bytes of a fixture's tensor list: hash-derived, each
/// batch norm's running variance scaled by the fixture's `bn_var_scale`.
pub(crate) fn hash_weights(fixture: &Value) -> Vec<u8> {
    let mut tensors = hash_tensors(fixture, str::to_string);
    // The generator's per-layer running_var scale (`calibrate`).
    for (name, _, data) in &mut tensors {
        if let Some(s) = name
            .strip_suffix(".running_var")
            .and_then(|m| fixture["bn_var_scale"][m].as_f64())
        {
            data.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
        }
    }
    safetensors(&tensors)
}

/// The fixture's image, preprocessed by the manifest, as a batch of one.
pub(crate) fn input(fixture: &Value, model: &LoadedModel) -> Tensor {
    let bytes = std::fs::read(repo().join(fixture["image"].as_str().unwrap())).unwrap();
    let img = model_store::preprocess::decode(&bytes, Default::default()).unwrap();
    let x = model_store::preprocess::preprocess(&img, &model.manifest).unwrap();
    model_store::preprocess::batch(&[x], &model.manifest, &Device::Cpu).unwrap()
}

fn top5(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(5);
    idx
}

fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt().max(1e-300)
}

/// Logits, top-5, every node and alias, and Grad-CAM against the fixture.
pub(crate) fn check(key: &str) {
    let (fixture, model) = load(key);
    let x = input(&fixture, &model);
    let mut tap = Record::all();
    let out = model.network.forward(&x, &mut tap).unwrap();
    let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = f32s(&fixture["logits"]);
    convscope_tests::assert_close_layer(&got, &want, 1e-4, &format!("{key} logits"));
    let want_top5: Vec<usize> = fixture["top5"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(top5(&got), want_top5, "{key}: top-5");

    let outputs: std::collections::HashMap<&str, &Tensor> =
        tap.outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let nodes = fixture["nodes"].as_object().unwrap();
    let mut compared = 0;
    for (name, want) in nodes {
        let t = outputs
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{key}: no output recorded for '{name}'"));
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(&t.dims()[1..], shape.as_slice(), "{key}: shape of '{name}'");
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rms = want["rms"].as_f64().unwrap();
        let abs_sum = want["abs_sum"].as_f64().unwrap();
        for s in want["samples"].as_array().unwrap() {
            let (i, w) = (s[0].as_u64().unwrap() as usize, s[1].as_f64().unwrap());
            let g = flat[i] as f64;
            let floor = w.abs().max(rms).max(1e-6);
            assert!(
                (g - w).abs() <= 1e-4 * floor,
                "{key}: '{name}'[{i}] = {g}, PyTorch {w} (rms {rms})"
            );
        }
        let sum: f64 = flat.iter().map(|&v| v as f64).sum();
        let want_sum = want["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-4 * abs_sum.max(1e-6),
            "{key}: sum of '{name}' = {sum}, PyTorch {want_sum} (Σ|x| {abs_sum})"
        );
        compared += 1;
    }
    assert!(compared > 10, "{key}: only {compared} nodes compared");

    let cam = &fixture["gradcam"];
    if !cam.is_null() {
        let layer = cam["layer"].as_str().unwrap();
        assert_eq!(
            grad_cam::default_layer(&model).as_deref(),
            cam["default_layer"].as_str(),
            "{key}: the default Grad-CAM layer"
        );
        let set = grad_cam::grad_cam(
            &model,
            &x,
            layer,
            &[Target {
                image: 0,
                class: Some(cam["class_index"].as_u64().unwrap() as usize),
            }],
            Method::GradCam,
        )
        .unwrap();
        let r = pearson(&set.cams[0].cam, &f32s(&cam["cam"]));
        assert!(r >= 0.999, "{key}: Grad-CAM at '{layer}' r = {r}");
    }
    windowed_matches_whole(key, &model, &x);
    eprintln!(
        "{key}: logits, top-5, {compared} nodes{} match PyTorch",
        if cam.is_null() { "" } else { " and Grad-CAM" }
    );
}

/// Occlusion's windowed pass (`Dag::forward_windowed`: each patched image
/// computed only where its patch reaches) gives the logits of the whole
/// batch, for 16×16 zero patches at a corner, the middle and the far edge.
fn windowed_matches_whole(key: &str, model: &LoadedModel, x: &Tensor) {
    let (_, c, h, w) = x.dims4().unwrap();
    let side = 16.min(h).min(w);
    let at = [
        (0, 0),
        ((h - side) / 2, (w - side) / 3),
        (h - side, w - side),
    ];
    let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut whole = Vec::new();
    for &(y0, x0) in &at {
        let mut one = base.clone();
        for ch in 0..c {
            for y in y0..y0 + side {
                one[ch * h * w + y * w + x0..ch * h * w + y * w + x0 + side].fill(0.0);
            }
        }
        whole.extend(one);
    }
    let whole = Tensor::from_vec(whole, (at.len(), c, h, w), &Device::Cpu).unwrap();
    let crops = Tensor::zeros(
        (at.len(), c, side, side),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = model.logits(&whole).unwrap();
    let pass = model.network.dag().base_pass(x).unwrap();
    let got = model.logits_windowed(&pass, &crops, &at).unwrap();
    let (got, want) = (
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    convscope_tests::assert_close_layer(&got, &want, 1e-4, &format!("{key} windowed logits"));
}

macro_rules! graph_fidelity {
    ($($test:ident => $key:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($key);
            }
        )*
    };
}

graph_fidelity! {
    mobilenet_v2_matches_pytorch_node_by_node => "mobilenet_v2",
    mobilenet_v3_small_matches_pytorch_node_by_node => "mobilenet_v3_small",
    efficientnet_b0_matches_pytorch_node_by_node => "efficientnet_b0",
    efficientnet_v2_s_matches_pytorch_node_by_node => "efficientnet_v2_s",
    densenet121_matches_pytorch_node_by_node => "densenet121",
    googlenet_matches_pytorch_node_by_node => "googlenet",
    inception_v3_matches_pytorch_node_by_node => "inception_v3",
    shufflenet_v2_matches_pytorch_node_by_node => "shufflenet_v2_x0_5",
    squeezenet1_1_matches_pytorch_node_by_node => "squeezenet1_1",
    mnasnet0_5_matches_pytorch_node_by_node => "mnasnet0_5",
    regnet_y_400mf_matches_pytorch_node_by_node => "regnet_y_400mf",
    convnext_tiny_matches_pytorch_node_by_node => "convnext_tiny",
    resnext50_32x4d_matches_pytorch_node_by_node => "resnext50_32x4d",
    wide_resnet50_2_matches_pytorch_node_by_node => "wide_resnet50_2",
    student_net_matches_pytorch_node_by_node => "student_net",
}
