//! Training a graph model, against PyTorch (fixture:
//! `tools/golden/finetune.py`): torchvision's mobilenet_v2 as the exporter
//! wrote it, a new 2-class head, `features` frozen, four SGD steps on an
//! ImageFolder of real images. Every loss and the head within 1e-4 of
//! PyTorch's; every frozen tensor, running statistics included, bit for bit
//! what it was. Then the same fine-tuning as a job over HTTP, whose result
//! is a graph model again and serves.

use std::time::Duration;

use candle_core::{Device, Tensor};
use convscope_tests::*;
use model_store::LoadedModel;
use model_store::train::Rng;
use model_store::train::net::{TrainNet, cross_entropy};
use model_store::train::optim::{Optimizer, OptimizerSpec};
use serde_json::{Value, json};

use super::graph_fidelity::hash_weights;

fn index() -> Value {
    serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/finetune/index.json")).unwrap(),
    )
    .unwrap()
}

/// The eight images in sorted order with their class (0 animal, 1 machine).
fn images(index: &Value) -> Vec<(std::path::PathBuf, u32)> {
    let root = repo().join(index["folder"].as_str().unwrap());
    let mut out = Vec::new();
    for (c, class) in ["animal", "machine"].iter().enumerate() {
        let mut files: Vec<_> = std::fs::read_dir(root.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (f, c as u32)));
    }
    out
}

#[test]
fn fine_tuning_a_frozen_mobilenet_v2_graph_matches_pytorch_step_for_step() {
    let index = index();
    let mut manifest = index["manifest"].clone();
    manifest.as_object_mut().unwrap().remove("check");
    for node in manifest["nodes"].as_array_mut().unwrap() {
        if node["name"] == "classifier.1" {
            node["out_features"] = json!(2);
        }
        if node["name"] == "classifier.0" {
            node["p"] = json!(0.0);
        }
    }
    manifest["classes"] = json!(["animal", "machine"]);
    // Hash weights for the features, PyTorch's initial head for the rest.
    let mut fixture = json!({"tensors": index["tensors"]});
    fixture["tensors"] = json!(
        index["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| !t[0].as_str().unwrap().starts_with("classifier."))
            .collect::<Vec<_>>()
    );
    let features = hash_weights(&fixture);
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load_buffer(&features, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let head = &index["head_initial"];
    tensors.push((
        "classifier.1.weight".into(),
        Tensor::from_vec(f32s(&head["weight"]), (2, 1280), &Device::Cpu).unwrap(),
    ));
    tensors.push((
        "classifier.1.bias".into(),
        Tensor::from_vec(f32s(&head["bias"]), 2, &Device::Cpu).unwrap(),
    ));
    let weights = model_store::train::safetensors_bytes(&tensors).unwrap();
    let model =
        LoadedModel::from_bytes(manifest.to_string().as_bytes(), &weights, &Device::Cpu).unwrap();

    let files = images(&index);
    let pixels: Vec<Vec<f32>> = files
        .iter()
        .map(|(f, _)| {
            let img =
                model_store::preprocess::decode(&std::fs::read(f).unwrap(), Default::default())
                    .unwrap();
            model_store::preprocess::preprocess(&img, &model.manifest).unwrap()
        })
        .collect();
    let labels: Vec<u32> = files.iter().map(|(_, c)| *c).collect();

    let freeze = vec!["features".to_string()];
    let mut net = TrainNet::new(&model.network, &freeze).unwrap();
    assert!(
        net.params()
            .iter()
            .all(|p| p.name.starts_with("classifier.")),
        "only the head trains"
    );
    let spec: OptimizerSpec = serde_json::from_value(index["optimizer"].clone()).unwrap();
    let mut opt = Optimizer::new(&spec);
    let mut rng = Rng::new(0);
    let mut losses = Vec::new();
    for b in index["batches"].as_array().unwrap() {
        let (lo, hi) = (
            b[0].as_u64().unwrap() as usize,
            b[1].as_u64().unwrap() as usize,
        );
        let x =
            model_store::preprocess::batch(&pixels[lo..hi], &model.manifest, &Device::Cpu).unwrap();
        let y = Tensor::new(&labels[lo..hi], &Device::Cpu).unwrap();
        let logits = net.forward(&x, Some(&mut rng)).unwrap();
        let loss = cross_entropy(&logits, &y).unwrap();
        let grads = loss.backward().unwrap();
        opt.step(net.params(), &grads).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    assert_close(&losses, &f32s(&index["losses"]), 1e-4, "losses");
    let ours: std::collections::HashMap<String, Tensor> =
        net.state_dict().unwrap().into_iter().collect();
    for (k, want) in index["head_final"].as_object().unwrap() {
        let got = ours[&format!("classifier.1.{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close_layer(&got, &f32s(want), 1e-4, &format!("classifier.1.{k}"));
    }
    // Frozen: bit-identical, running statistics included.
    let mut frozen = 0;
    for (name, t) in &tensors {
        if name.starts_with("features.") {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = ours[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} moved"
            );
            frozen += 1;
        }
    }
    assert!(frozen > 200, "{frozen} frozen tensors compared");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_fine_tunes_a_graph_model_with_a_new_head_and_serves_a_graph_model() {
    let index = index();
    let datasets = tempfile::tempdir().unwrap();
    let root = datasets.path().join("imagefolder/things");
    for (f, c) in images(&index) {
        let class = ["animal", "machine"][c as usize];
        std::fs::create_dir_all(root.join(class)).unwrap();
        std::fs::copy(&f, root.join(class).join(f.file_name().unwrap())).unwrap();
    }
    let models = models_dir(&[]);
    let mut settings = convscope::Settings::for_tests(models.path());
    settings.datasets = datasets.path().to_path_buf();
    let app = TestApp::spawn_with(settings).await;
    let fixture = json!({"tensors": index["tensors"]});
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&index["manifest"], hash_weights(&fixture)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let (status, queued) = app
        .submit_job(
            &json!({"model_name": "things-mobilenet", "init_from": "mobilenet-v2-64",
            "dataset": "things", "freeze": ["features"], "epochs": 2, "batch_size": 4,
            "test_fraction": 0.25, "optimizer": {"type": "sgd", "lr": 0.0005, "momentum": 0.9},
            "seed": 3}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap();
    let job = app
        .wait_for_job(id, Duration::from_secs(120), job_is_final)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, detail) = app.get_json("/models/things-mobilenet").await;
    assert_eq!(detail["architecture"], "graph", "{detail}");
    assert_eq!(detail["classes"], json!(["animal", "machine"]));
    // Frozen tensors in the written checkpoint are the source's, bit for bit.
    let written = candle_core::safetensors::load(
        models.path().join("things-mobilenet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let source = candle_core::safetensors::load(
        models.path().join("mobilenet-v2-64.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, t) in &source {
        if name.starts_with("features.") {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = written[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} moved"
            );
        }
    }
    assert_eq!(written["classifier.1.weight"].dims(), &[2, 1280]);
    // It serves.
    let png = std::fs::read(&images(&index)[0].0).unwrap();
    let out = app
        .post_images_json("/models/things-mobilenet/predict", &[&png])
        .await;
    assert_eq!(
        out["predictions"][0]["top_k"].as_array().unwrap().len(),
        2,
        "{out}"
    );
    app.stop().await;
}
