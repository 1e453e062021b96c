//! Numbers against PyTorch: every bundled and fixture model's logits, the
//! intermediate layers of torchvision nets with hash-derived weights, and
//! accuracy on real test sets — all through the HTTP API.
//!
//! Tolerance: 1e-4 relative, the norm for float32. Logits: absolute below
//! magnitude 1. Intermediate layers: absolute below the layer's RMS (see
//! `assert_close_layer` for why).

use convscope_tests::*;
use serde_json::Value;

const TOL: f32 = 1e-4;

fn reference(file: &str) -> Value {
    serde_json::from_slice(&std::fs::read(repo().join("data/reference").join(file)).unwrap())
        .unwrap()
}

/// `data/reference/<model>_logits.json` for test images 0..7.
async fn check_reference_logits(
    app: &TestApp,
    model: &str,
    file: &str,
    images: Vec<(Vec<u8>, usize)>,
) {
    let reference = reference(file);
    let pngs: Vec<Vec<u8>> = images.iter().map(|(p, _)| p.clone()).collect();
    let body = app
        .post_images_json(&format!("/models/{model}/predict?top_k=1000"), &pngs)
        .await;
    let predictions = body["predictions"].as_array().unwrap();
    for (item, prediction) in reference["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(predictions)
    {
        let want: Vec<f32> = item["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = logits_by_class(prediction);
        assert_close(
            &got,
            &want,
            TOL,
            &format!("{model} image {}", item["index"]),
        );
        assert_eq!(
            prediction["top_k"][0]["class_index"].as_u64(),
            item["pred"].as_u64(),
            "{model} image {} top-1",
            item["index"]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logits_match_the_pytorch_references_for_every_reference_model() {
    let dir = models_dir(&[
        "resnet20-cifar10",
        "resnet32-cifar10",
        "resnet44-cifar10",
        "resnet56-cifar10",
        "captum-cifar-net",
        "lenet5-mnist",
        "mobilenet-v1-0.25-128",
    ]);
    let app = TestApp::spawn(dir.path()).await;
    for n in [20, 32, 44, 56] {
        check_reference_logits(
            &app,
            &format!("resnet{n}-cifar10"),
            &format!("resnet{n}_cifar10_logits.json"),
            cifar_test(0..8),
        )
        .await;
    }
    check_reference_logits(
        &app,
        "captum-cifar-net",
        "captum_cifar_net_logits.json",
        cifar_test(0..8),
    )
    .await;
    check_reference_logits(
        &app,
        "lenet5-mnist",
        "lenet5_mnist_logits.json",
        mnist_test(0..8),
    )
    .await;

    // MobileNet: the four 128x128 inputs; the reference keeps the top-5 and the first 10 logits.
    let reference = reference("mobilenet_v1_0.25_128_imagenet_logits.json");
    for item in reference["items"].as_array().unwrap() {
        let png = std::fs::read(repo().join("data").join(item["image"].as_str().unwrap())).unwrap();
        let body = app
            .post_images_json("/models/mobilenet-v1-0.25-128/predict?top_k=1001", &[png])
            .await;
        let got = logits_by_class(&body["predictions"][0]);
        let first10: Vec<f32> = item["logits_first10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close(
            &got[..10],
            &first10,
            TOL,
            &format!("mobilenet {} first 10", item["image"]),
        );
        for (rank, want) in item["top5"].as_array().unwrap().iter().enumerate() {
            let top = &body["predictions"][0]["top_k"][rank];
            assert_eq!(
                top["class_index"], want["index"],
                "mobilenet {} rank {rank}",
                item["image"]
            );
            assert_close(
                &[top["logit"].as_f64().unwrap() as f32],
                &[want["logit"].as_f64().unwrap() as f32],
                TOL,
                "top-5 logit",
            );
        }
        let sum: f32 = got.iter().sum();
        let want_sum = item["logit_sum"].as_f64().unwrap() as f32;
        assert!(
            (sum - want_sum).abs() < 1e-2,
            "mobilenet logit sum {sum} vs {want_sum}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resnet20_scores_915_of_the_first_1000_cifar10_test_images_as_in_pytorch() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let images = cifar_test(0..1000);
    let mut correct = 0;
    for chunk in images.chunks(50) {
        let pngs: Vec<Vec<u8>> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let body = app
            .post_images_json("/models/resnet20-cifar10/predict?top_k=1", &pngs)
            .await;
        for (p, (_, label)) in body["predictions"].as_array().unwrap().iter().zip(chunk) {
            correct += (p["top_k"][0]["class_index"].as_u64() == Some(*label as u64)) as usize;
        }
    }
    // PyTorch (data/README.md): 915/1000 = 91.5%.
    assert_eq!(
        correct, 915,
        "resnet20 top-1 on CIFAR-10 test images 0..999"
    );
    app.stop().await;
}

/// Scores a bundled MNIST model on all 10,000 test images over HTTP and
/// compares with the count PyTorch measured on its checkpoint.
async fn check_bundled_mnist_model(name: &str) {
    let dir = models_dir(&[name]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(repo().join(format!("models/{name}.json"))).unwrap())
            .unwrap();
    let pytorch_correct = manifest["test_accuracy"]["correct"].as_u64().unwrap() as i64;
    let app = TestApp::spawn(dir.path()).await;
    let images = mnist_test(0..10_000);
    let mut correct = 0i64;
    for chunk in images.chunks(64) {
        let pngs: Vec<Vec<u8>> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let body = app
            .post_images_json(&format!("/models/{name}/predict?top_k=1"), &pngs)
            .await;
        for (p, (_, label)) in body["predictions"].as_array().unwrap().iter().zip(chunk) {
            correct += (p["top_k"][0]["class_index"].as_u64() == Some(*label as u64)) as i64;
        }
    }
    assert!(correct >= 9800, "{name} must reach 98%: {correct}/10000");
    // Same inputs, same weights: at most a tie or two may break differently.
    assert!(
        (correct - pytorch_correct).abs() <= 2,
        "{name}: convscope {correct} vs PyTorch {pytorch_correct}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bundled_cnn_a_scores_what_pytorch_measured_on_the_whole_mnist_test_set() {
    check_bundled_mnist_model("cnn-a-mnist").await;
}

/// The CNN_A trained by `convscope train` (models/README.md has the
/// command): its checkpoint, loaded into PyTorch, scored 98.32%; served by
/// convscope it scores the same.
#[tokio::test(flavor = "multi_thread")]
async fn the_cnn_a_convscope_trained_scores_in_convscope_what_it_scores_in_pytorch() {
    check_bundled_mnist_model("cnn-a-mnist-convscope").await;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(repo().join("models/cnn-a-mnist-convscope.json")).unwrap(),
    )
    .unwrap();
    // And convscope's own evaluation during training said the same.
    let history = manifest["training"]["history"].as_array().unwrap();
    let trained = history.last().unwrap()["test_accuracy"].as_f64().unwrap();
    let pytorch = manifest["test_accuracy"]["correct"].as_u64().unwrap() as f64 / 10_000.0;
    assert!((trained - pytorch).abs() <= 2e-4, "{trained} vs {pytorch}");
}

/// Logits and three hooked layers of a hash-weight fixture model.
async fn check_hash_model(key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = write_hash_model(dir.path(), key);
    let name = fixture["manifest"]["name"].as_str().unwrap();
    let app = TestApp::spawn(dir.path()).await;
    let (status, list) = app.get_json("/models").await;
    assert_eq!(status, 200);
    assert_eq!(list["load_errors"], serde_json::json!([]), "{key} loads");
    let image = std::fs::read(repo().join(fixture["image"].as_str().unwrap())).unwrap();
    let want: Vec<f32> = fixture["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let body = app
        .post_images_json(
            &format!("/models/{name}/predict?top_k={}", want.len()),
            &[&image],
        )
        .await;
    assert_close(
        &logits_by_class(&body["predictions"][0]),
        &want,
        TOL,
        &format!("{key} logits"),
    );
    for (layer, spec) in fixture["layers"].as_object().unwrap() {
        let (shape, data) = read_npy(
            &repo()
                .join("tests/fixtures/torchvision")
                .join(spec["file"].as_str().unwrap()),
        );
        let got = app
            .post_images_json(
                &format!("/models/{name}/activations/{layer}?format=json"),
                &[&image],
            )
            .await;
        let got_shape: Vec<usize> = got["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got_shape, shape, "{key} {layer} shape");
        let got_data: Vec<f32> = got["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close_layer(&got_data, &data, TOL, &format!("{key} {layer}"));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn torchvision_resnet18_matches_pytorch_logits_and_hooked_layers() {
    check_hash_model("resnet18").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn torchvision_vgg11_matches_pytorch_logits_and_hooked_layers() {
    check_hash_model("vgg11").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn course_nets_load_from_a_sequential_manifest_alone_and_match_pytorch() {
    check_hash_model("mnist_examples_net").await;
    check_hash_model("cifar_bn_net").await;
}
