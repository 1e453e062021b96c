//! Training jobs over real HTTP: a CNN_A run on real MNIST, evaluation,
//! progress as JSON, Server-Sent Events and a plot, cancellation, frozen
//! layers when fine-tuning ResNet-20 on real CIFAR-10 images, validation
//! of bad bodies. (Inference while a job trains: `responsiveness.rs`, alone
//! in its binary so no other test's training competes for the cores; crash
//! and resume with a killed process: `server/tests/crash.rs`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use convscope_tests::*;
use serde_json::{Value, json};

fn tensors(path: &std::path::Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(_, t)| t.dtype() == candle_core::DType::F32)
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cnn_a_job_trains_on_real_mnist_and_its_model_serves_at_once() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let (status, datasets) = app.get_json("/datasets").await;
    assert_eq!(status, 200);
    let mnist = datasets["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mnist")
        .expect("mnist is listed");
    assert_eq!(
        (mnist["train_size"].as_u64(), mnist["test_size"].as_u64()),
        (Some(60000), Some(10000))
    );

    // Part of an epoch of the acceptance run (the full one is in
    // BENCHMARKS.md): CNN_A, batch 64, Adam 1e-3, seed 13.
    let body = json!({
        "model_name": "cnn-a-test", "architecture": "cnn_a", "dataset": "mnist",
        "epochs": 1, "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001},
        "seed": 13, "train_limit": 12800, "test_limit": 2000, "progress_every": 10
    });
    let r = app
        .client
        .post(app.url("/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let queued: Value = r.json().await.unwrap();
    assert_eq!(queued["status"], "queued");
    let id = queued["job_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/jobs/{id}"));

    // Follow it as Server-Sent Events until the final state.
    let mut stream = app
        .client
        .get(app.url(&format!("/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), stream.chunk())
        .await
        .expect("the event stream ends when the job does")
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let kind = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((kind.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        kinds.iter().filter(|k| **k == "progress").count() >= 5,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"epoch"), "{kinds:?}");
    let (last_kind, last) = events.last().unwrap();
    assert_eq!(
        (last_kind.as_str(), last["status"].as_str()),
        ("state", Some("succeeded"))
    );
    // Progress moves forward.
    let fractions: Vec<f64> = events
        .iter()
        .filter(|(k, _)| k == "progress")
        .map(|(_, j)| j["progress"]["fraction"].as_f64().unwrap())
        .collect();
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");

    let (_, job) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["model"], "cnn-a-test");
    assert_eq!(job["progress"]["fraction"], 1.0);
    assert_eq!(job["progress"]["steps"], 200);
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    let epoch = &history[0];
    let test_accuracy = epoch["test_accuracy"].as_f64().unwrap();
    // 200 steps of CNN_A reach ~96% (PyTorch: the full 938-step epoch, 98.4%).
    assert!(test_accuracy > 0.94, "{epoch}");
    assert!(epoch["loss"].as_f64().unwrap() < 0.7, "{epoch}");
    assert!(epoch["train_accuracy"].as_f64().unwrap() > 0.75, "{epoch}");
    assert!(epoch["seconds"].as_f64().unwrap() > 0.0);

    // The model is registered, with its epoch snapshot, and serves at once.
    let (_, models) = app.get_json("/models").await;
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"cnn-a-test") && names.contains(&"cnn-a-test@epoch-1"),
        "{names:?}"
    );
    let digits = mnist_test(0..8);
    let images: Vec<&[u8]> = digits.iter().map(|(png, _)| png.as_slice()).collect();
    let preds = app
        .post_images_json("/models/cnn-a-test/predict?top_k=1", &images)
        .await;
    let right = preds["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&digits)
        .filter(|(p, (_, label))| p["top_k"][0]["class_index"].as_u64() == Some(*label as u64))
        .count();
    assert!(right >= 7, "{right}/8 right: {preds}");

    // Evaluating the served model on the same 2000 test images gives the
    // accuracy the job measured in training-eval mode.
    let r = app
        .client
        .post(app.url("/models/cnn-a-test/evaluate"))
        .json(&json!({"dataset": "mnist", "limit": 2000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["count"], 2000);
    assert!(
        (e["accuracy"].as_f64().unwrap() - test_accuracy).abs() < 1e-9,
        "{e}"
    );
    let m: Vec<Vec<u64>> = serde_json::from_value(e["confusion_matrix"].clone()).unwrap();
    assert_eq!(m.len(), 10);
    assert_eq!(m.iter().flatten().sum::<u64>(), 2000);
    let diagonal: u64 = (0..10).map(|i| m[i][i]).sum();
    assert!((diagonal as f64 / 2000.0 - test_accuracy).abs() < 1e-9);
    for (i, c) in e["per_class"].as_array().unwrap().iter().enumerate() {
        let support: u64 = m[i].iter().sum();
        let predicted: u64 = m.iter().map(|r| r[i]).sum();
        assert_eq!(c["support"], support);
        assert!((c["recall"].as_f64().unwrap() - m[i][i] as f64 / support as f64).abs() < 1e-12);
        assert!(
            (c["precision"].as_f64().unwrap() - m[i][i] as f64 / predicted as f64).abs() < 1e-12
        );
    }
    // The confusion matrix as a picture, and the training curves.
    for path in [
        "/jobs/{id}/plot.png".replace("{id}", &id),
        "/models/cnn-a-test/evaluate?format=png".to_string(),
    ] {
        let r = if path.contains("evaluate") {
            app.client
                .post(app.url(&path))
                .json(&json!({"dataset": "mnist", "limit": 500}))
                .send()
                .await
                .unwrap()
        } else {
            app.client.get(app.url(&path)).send().await.unwrap()
        };
        assert_eq!(r.status(), 200, "{path}");
        let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
        assert!(img.width() >= 300 && img.height() >= 200, "{path}");
    }
    // Evaluation from uploaded, labelled images (multipart).
    let mut form = reqwest::multipart::Form::new();
    for (png, label) in &digits {
        form = form
            .part(
                "image",
                reqwest::multipart::Part::bytes(png.clone()).file_name("d.png"),
            )
            .text("label", label.to_string());
    }
    let r = app
        .client
        .post(app.url("/models/cnn-a-test/evaluate"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["count"].as_u64(), e["dataset"].as_str()),
        (Some(8), Some("upload"))
    );
    assert_eq!(e["accuracy"].as_f64().unwrap(), right as f64 / 8.0);

    // Jobs by state in the metrics.
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("convscope_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("convscope_job_queue_depth 0"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_job_bodies_are_refused_whole_and_nothing_is_queued() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            json!({"model_name": "x", "architecture": "resnet9000", "dataset": "nope",
                   "epochs": 0, "batch_size": 0, "optimizer": {"type": "adam", "lr": -1}}),
            vec![
                "architecture",
                "dataset",
                "epochs",
                "batch_size",
                "optimizer.lr",
            ],
        ),
        (
            json!({"model_name": "ft", "init_from": "resnet20-cifar10", "dataset": "cifar10-sample",
                   "freeze": ["conv1", "layer9", "fc"], "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 1.5}}),
            vec!["layer9", "'fc'", "momentum"],
        ),
        (
            json!({"model_name": "resnet20-cifar10", "init_from": "nope", "dataset": "mnist",
                   "architecture": "cnn_a"}),
            vec!["already exists", "init_from: no model 'nope'", "not both"],
        ),
        (
            json!({"model_name": "m", "architecture": "cnn_a", "dataset": "cifar10-sample"}),
            vec!["28x28", "32x32"],
        ),
        (
            json!({"model_name": "bad name!", "dataset": "mnist", "architecture": "cnn_a",
                   "epochs": "two", "lr": 0.1, "optimizer": {"type": "rmsprop", "lr": 0.1}}),
            vec!["epochs:", "unknown field 'lr'"],
        ),
        (json!([1, 2]), vec!["JSON object"]),
        (
            json!({"dataset": "mnist"}),
            vec!["missing field 'model_name'"],
        ),
    ];
    for (body, expected) in cases {
        let (status, problem) = app.submit_job(&body).await;
        assert_eq!(status, 422, "{body}: {problem}");
        let errors: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{problem}"))
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        for want in expected {
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "{body}: no problem mentions {want:?}: {errors:#?}"
            );
        }
        assert!(problem["detail"].as_str().unwrap().contains("problem"));
    }
    // Not JSON at all.
    let r = app
        .client
        .post(app.url("/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (_, jobs) = app.get_json("/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");
    app.assert_healthy().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_stops_within_a_batch_and_registers_nothing() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let (status, queued) = app
        .submit_job(
            &json!({"model_name": "never", "architecture": "cnn_a", "dataset": "mnist",
                "batch_size": 64, "progress_every": 1, "test_limit": 500}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap().to_string();
    let running = app
        .wait_for_job(&id, Duration::from_secs(60), |j| {
            j["progress"]["step"].as_u64().unwrap_or(0) >= 3
        })
        .await;
    assert_eq!(running["status"], "running");
    let (status, at_cancel) = app.cancel_job(&id).await;
    assert_eq!(status, 202, "{at_cancel}");
    let step_at_cancel = at_cancel["progress"]["step"].as_u64().unwrap();
    let job = app
        .wait_for_job(&id, Duration::from_secs(30), job_is_final)
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    // Within one batch: at most the batch in flight finished after the request.
    let last_step = job["progress"]["step"].as_u64().unwrap();
    assert!(
        last_step <= step_at_cancel + 1,
        "stopped at step {last_step}, cancel asked at {step_at_cancel}"
    );
    let (_, models) = app.get_json("/models").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 0, "{models}");
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(files.is_empty(), "{files:?}");
    // A second cancel: the job has ended.
    let (status, body) = app.cancel_job(&id).await;
    assert_eq!(status, 409, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fine_tuning_resnet20_keeps_frozen_layers_bit_identical() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let (status, queued) = app
        .submit_job(
            &json!({"model_name": "resnet20-ft", "init_from": "resnet20-cifar10",
                "dataset": "cifar10-sample", "train_limit": 500, "batch_size": 50,
                "freeze": ["conv1", "layer1", "layer2"],
                "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005},
                "augment": {"random_crop_padding": 4, "horizontal_flip": true}, "seed": 1}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap();
    let job = app
        .wait_for_job(id, Duration::from_secs(300), job_is_final)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let before = tensors(&repo().join("models/resnet20-cifar10.safetensors"));
    let after = tensors(&dir.path().join("resnet20-ft.safetensors"));
    let frozen =
        |n: &str| n.starts_with("conv1.") || n.starts_with("layer1.") || n.starts_with("layer2.");
    let (mut same, mut changed) = (0, Vec::new());
    for (name, old) in &before {
        let new = after.get(name).unwrap_or_else(|| panic!("{name} missing"));
        if frozen(name) {
            assert!(
                old.iter().zip(new).all(|(a, b)| a.to_bits() == b.to_bits()),
                "frozen {name} changed"
            );
            same += 1;
        } else if old != new {
            changed.push(name.clone());
        }
    }
    assert!(same >= 40, "{same} frozen tensors");
    for trained in [
        "layer3.0.conv1.weight",
        "layer3.2.bn2.running_mean",
        "linear.weight",
        "linear.bias",
        "bn1.weight",
    ] {
        assert!(
            changed.iter().any(|c| c == trained),
            "{trained} did not change: {changed:?}"
        );
    }
    // The fine-tuned model still classifies the CIFAR images it never saw.
    let history = job["history"].as_array().unwrap();
    assert!(
        history[0]["test_accuracy"].as_f64().unwrap() > 0.6,
        "{history:?}"
    );
    app.stop().await;
}

/// An ImageFolder dataset (one sub-folder per class) and a network given
/// as `{"layers": [...]}`: bright squares vs bright discs on noise, 16×16.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_folder_and_a_layer_list_train_with_sgd_nesterov_and_a_cosine_schedule() {
    let datasets = tempfile::tempdir().unwrap();
    let root = datasets.path().join("imagefolder/shapes");
    let mut seed = 1u64;
    let mut noise = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % 60) as u8
    };
    for (class, is_disc) in [("disc", true), ("square", false)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..40 {
            let (cx, cy) = (5.0 + (i % 6) as f32, 5.0 + (i / 6 % 6) as f32);
            let mut px = vec![0u8; 16 * 16];
            for y in 0..16 {
                for x in 0..16 {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let inside = if is_disc {
                        dx * dx + dy * dy <= 9.0
                    } else {
                        dx.abs() <= 3.0 && dy.abs() <= 3.0
                    };
                    px[y * 16 + x] = if inside { 200 } else { 0 } + noise();
                }
            }
            std::fs::write(
                root.join(class).join(format!("{i:02}.png")),
                png(16, 16, 1, &px),
            )
            .unwrap();
        }
    }
    let models = models_dir(&[]);
    let mut settings = convscope::Settings::for_tests(models.path());
    settings.datasets = datasets.path().to_path_buf();
    let app = TestApp::spawn_with(settings).await;
    let (_, listed) = app.get_json("/datasets").await;
    let shapes = listed["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "shapes")
        .unwrap_or_else(|| panic!("{listed}"))
        .clone();
    assert_eq!(shapes["classes"], json!(["disc", "square"]));
    assert_eq!(shapes["format"], "imagefolder");
    let layers = json!([
        {"name": "conv1", "type": "conv2d", "in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"name": "bn1", "type": "batch_norm2d", "num_features": 8},
        {"name": "relu1", "type": "relu"},
        {"name": "pool1", "type": "max_pool2d", "kernel_size": 2},
        {"name": "drop1", "type": "dropout2d", "p": 0.1},
        {"name": "conv2", "type": "conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"name": "relu2", "type": "relu"},
        {"name": "gap", "type": "adaptive_avg_pool2d", "output_size": 1},
        {"name": "flatten", "type": "flatten"},
        {"name": "fc", "type": "linear", "in_features": 8, "out_features": 2}
    ]);
    let (status, queued) = app.submit_job(&json!({"model_name": "shapes-net", "architecture": {"layers": layers}, "dataset": "shapes",
                "input": {"channels": 1, "height": 16, "width": 16, "mean": [0.2], "std": [0.3]},
                "epochs": 6, "batch_size": 8, "test_fraction": 0.25, "l2": 0.0001,
                "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": true},
                "lr_schedule": {"type": "cosine"}, "augment": {"horizontal_flip": true}, "seed": 5}),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap();
    let job = app
        .wait_for_job(id, Duration::from_secs(120), job_is_final)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 6);
    let last = history.last().unwrap();
    // 20 test images (a quarter of each class); the shapes are easy.
    assert!(
        last["test_accuracy"].as_f64().unwrap() >= 0.9,
        "{history:?}"
    );
    assert!(
        last["loss"].as_f64().unwrap() < history[0]["loss"].as_f64().unwrap(),
        "{history:?}"
    );
    // Six snapshots, one per epoch, and the model: all serve.
    let (_, models_list) = app.get_json("/models").await;
    assert_eq!(
        models_list["models"].as_array().unwrap().len(),
        7,
        "{models_list}"
    );
    let (_, detail) = app.get_json("/models/shapes-net").await;
    assert_eq!(detail["classes"], json!(["disc", "square"]));
    app.stop().await;

    // Transfer learning with a new head: ResNet-20 (10 CIFAR classes) on the
    // two shapes (resized to its 32×32 RGB input), everything frozen but
    // the fresh 2-class head.
    let models = models_dir(&["resnet20-cifar10"]);
    let mut settings = convscope::Settings::for_tests(models.path());
    settings.datasets = datasets.path().to_path_buf();
    let app = TestApp::spawn_with(settings).await;
    let (status, queued) = app.submit_job(&json!({"model_name": "shapes-resnet", "init_from": "resnet20-cifar10", "dataset": "shapes",
                "freeze": ["conv1", "bn1", "layer1", "layer2", "layer3"], "epochs": 3, "batch_size": 10,
                "optimizer": {"type": "adam", "lr": 0.01}, "epoch_snapshots": false, "seed": 3}),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap();
    let job = app
        .wait_for_job(id, Duration::from_secs(120), job_is_final)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, detail) = app.get_json("/models/shapes-resnet").await;
    assert_eq!(detail["classes"], json!(["disc", "square"]));
    assert_eq!(detail["architecture"], "resnet20-cifar");
    let head = detail["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "linear")
        .unwrap();
    assert_eq!(head["output_shape"], json!([2]));
    let before = tensors(&repo().join("models/resnet20-cifar10.safetensors"));
    let after = tensors(&models.path().join("shapes-resnet.safetensors"));
    for (name, old) in &before {
        if !name.starts_with("linear.") {
            assert_eq!(&after[name], old, "frozen {name} changed");
        }
    }
    assert_eq!(after["linear.weight"].len(), 2 * 64);
    // Frozen features, a new head trained for 3 epochs: better than chance.
    let acc = job["history"][2]["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.7, "{job}");
    // The head cannot be frozen when it is new.
    let (status, problem) = app.submit_job(&json!({"model_name": "x", "init_from": "resnet20-cifar10", "dataset": "shapes", "freeze": ["linear"]}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(problem["errors"].to_string().contains("new"), "{problem}");
    app.stop().await;
}
