//! convscope's training step against PyTorch's, number for number
//! (fixtures: `tools/golden/training.py`): the same small net with batch
//! norm in train mode, the same seeded initial weights and 16 real MNIST
//! images, 4 steps with each optimiser. The loss of every step, and after
//! the last every weight, bias and running statistic, within 1e-4.

use candle_core::{Device, Tensor};
use convscope_tests::*;
use model_store::LoadedModel;
use model_store::train::data::{Augment, Batcher};
use model_store::train::net::{TrainNet, cross_entropy};
use model_store::train::optim::{Optimizer, OptimizerSpec};
use model_store::train::{Rng, data};
use serde_json::{Value, json};

fn load(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn four_training_steps_match_pytorch_with_every_optimizer() {
    let dir = repo().join("tests/fixtures/training");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest = json!({
        "name": "trainee", "architecture": "sequential", "layers": index["layers"],
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.1307], "std": [0.3081]},
        "classes": (0..10).map(|i| i.to_string()).collect::<Vec<_>>(),
    });
    let weights = std::fs::read(dir.join("initial.safetensors")).unwrap();
    let model =
        LoadedModel::from_bytes(manifest.to_string().as_bytes(), &weights, &Device::Cpu).unwrap();
    let mnist = data::open(&repo().join("data"), "mnist", &model.manifest, 0.2).unwrap();
    let batcher = Batcher {
        channels: 1,
        mean: vec![0.1307],
        std: vec![0.3081],
    };
    let batches: Vec<(Tensor, Tensor)> = index["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let (lo, hi) = (
                b[0].as_u64().unwrap() as usize,
                b[1].as_u64().unwrap() as usize,
            );
            let idx: Vec<usize> = (lo..hi).collect();
            batcher
                .batch(&mnist.train, &idx, Augment::default(), None, &Device::Cpu)
                .unwrap()
        })
        .collect();
    let runs = index["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 4);
    for (name, run) in runs {
        let spec: OptimizerSpec = serde_json::from_value(run["optimizer"].clone()).unwrap();
        let (l1, l2) = (run["l1"].as_f64().unwrap(), run["l2"].as_f64().unwrap());
        let mut net = TrainNet::new(&model.network, &[]).unwrap();
        let mut opt = Optimizer::new(&spec);
        let mut rng = Rng::new(0);
        let mut losses = Vec::new();
        for (x, y) in &batches {
            let logits = net.forward(x, Some(&mut rng)).unwrap();
            let mut loss = cross_entropy(&logits, y).unwrap();
            for p in net.params() {
                let w = p.var.as_tensor();
                if l1 > 0.0 {
                    loss = (loss + (w.abs().unwrap().sum_all().unwrap() * l1).unwrap()).unwrap();
                }
                if l2 > 0.0 {
                    loss = (loss + (w.sqr().unwrap().sum_all().unwrap() * l2).unwrap()).unwrap();
                }
            }
            let grads = loss.backward().unwrap();
            opt.step(net.params(), &grads).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        let want: Vec<f32> = run["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close(&losses, &want, 1e-4, &format!("{name}: losses"));
        let reference = load(&dir.join(format!("{name}.safetensors")));
        let ours: std::collections::HashMap<String, Tensor> =
            net.state_dict().unwrap().into_iter().collect();
        for (tensor, want) in &reference {
            let got = ours
                .get(tensor)
                .unwrap_or_else(|| panic!("{name}: {tensor} missing"));
            assert_close_layer(&flat(got), &flat(want), 1e-4, &format!("{name}: {tensor}"));
        }
        // The batch norms' running statistics moved (train mode), as PyTorch's did.
        let initial = load(&dir.join("initial.safetensors"));
        assert_ne!(
            flat(&ours["bn1.running_var"]),
            flat(&initial["bn1.running_var"]),
            "{name}"
        );
    }
}
