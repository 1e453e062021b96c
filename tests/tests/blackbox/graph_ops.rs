//! Every op of the graph IR against PyTorch, forward and backward
//! (fixture: `tools/golden/graph_ops.py`). Each case is a small module
//! exported by the exporter; it runs here through the interpreter on the
//! recorded batch of two, and the gradients of sum(output · r) with respect
//! to the input and every parameter come from candle's autograd. Outputs
//! and gradients within 1e-4 of max(|x|, RMS). Every op the manifest format
//! accepts (`model_store::dag::OPS`) has a case.

use candle_core::{Device, Tensor, Var};
use convscope_tests::*;
use model_store::LoadedModel;
use model_store::train::net::TrainNet;
use serde_json::Value;

#[test]
fn every_op_matches_pytorch_forward_and_backward() {
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/graph/ops.json")).unwrap(),
    )
    .unwrap();
    let covered: Vec<&str> = fixture["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    for op in model_store::dag::OPS {
        assert!(
            covered.contains(op),
            "op {op} has no PyTorch case in ops.json"
        );
    }
    let cases = fixture["cases"].as_object().unwrap();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (name, case) in cases {
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = case["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, t)| (k.clone(), dims(&t["shape"]), f32s(&t["data"])))
            .collect();
        let manifest = serde_json::to_vec(&case["manifest"]).unwrap();
        let model = LoadedModel::from_bytes(&manifest, &safetensors(&tensors), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = Var::from_tensor(
            &Tensor::from_vec(f32s(&case["x"]), (2, 3, 6, 6), &Device::Cpu).unwrap(),
        )
        .unwrap();
        // Inference path (fused kernels where they apply) ...
        let y = model.network.predict(x.as_tensor()).unwrap();
        let y_flat = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close_layer(
            &y_flat,
            &f32s(&case["y"]),
            1e-4,
            &format!("{name}: forward"),
        );
        // ... and the differentiable one, with every parameter a Var.
        let mut net = TrainNet::new(&model.network, &[]).unwrap();
        let y = net.forward(x.as_tensor(), None).unwrap();
        assert_eq!(y.dims(), dims(&case["y_shape"]).as_slice(), "{name}");
        let r = Tensor::from_vec(f32s(&case["r"]), y.dims(), &Device::Cpu).unwrap();
        let loss = (y * r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient reached the input"));
        assert_close_layer(
            &gx.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &f32s(&case["grad_x"]),
            1e-4,
            &format!("{name}: d/dx"),
        );
        let want = case["grad_params"].as_object().unwrap();
        assert_eq!(net.params().len(), want.len(), "{name}: parameters");
        for p in net.params() {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
            assert_close_layer(
                &g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &f32s(&want[&p.name]),
                1e-4,
                &format!("{name}: d/d{}", p.name),
            );
        }
    }
}
