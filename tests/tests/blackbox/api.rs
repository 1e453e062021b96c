//! The HTTP contract of the foundation: listing, describing, registering and
//! deleting models, the three ways of sending images, batching, and errors
//! that say what to fix without ever taking the server down.

use base64::Engine;
use convscope_tests::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_models_directory_is_served_and_described() {
    let app = TestApp::spawn(&repo().join("models")).await;
    app.assert_healthy().await;
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    let (status, list) = app.get_json("/models").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for want in [
        "captum-cifar-net",
        "cnn-a-mnist",
        "cnn-a-mnist-convscope",
        "mobilenet-v1-0.25-128",
        "resnet20-cifar10",
        "resnet32-cifar10",
        "resnet44-cifar10",
        "resnet56-cifar10",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert_eq!(ready["models"].as_u64(), Some(names.len() as u64));
    assert_eq!(list["default_model"], "resnet20-cifar10");
    assert_eq!(list["load_errors"], json!([]));
    let resnet = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "resnet20-cifar10")
        .unwrap();
    assert_eq!(resnet["architecture"], "resnet20-cifar");
    assert_eq!(resnet["num_classes"], 10);
    assert_eq!(resnet["input"]["channels"], 3);
    assert_eq!(resnet["device"], "cpu");

    // The per-layer table: hand-checkable numbers.
    let (status, detail) = app.get_json("/models/resnet20-cifar10").await;
    assert_eq!(status, 200);
    assert_eq!(
        detail["total_params"], 269_722,
        "ResNet-20 has 0.27M parameters"
    );
    assert_eq!(detail["classes"][3], "cat");
    let layers = detail["layers"].as_array().unwrap();
    let layer = |n: &str| {
        layers
            .iter()
            .find(|l| l["name"] == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(layer("conv1")["output_shape"], json!([16, 32, 32]));
    assert_eq!(layer("conv1")["params"], 3 * 16 * 9);
    assert_eq!(layer("conv1")["receptive_field"], 3);
    assert_eq!(layer("layer2.0")["output_shape"], json!([32, 16, 16]));
    assert_eq!(
        layer("layer2.0.shortcut")["output_shape"],
        json!([32, 16, 16])
    );
    assert_eq!(layer("layer3")["output_shape"], json!([64, 8, 8]));
    assert_eq!(layer("layer3")["jump"], 4);
    assert_eq!(layer("linear")["output_shape"], json!([10]));
    assert_eq!(layer("linear")["params"], 650);

    let (_, cnn) = app.get_json("/models/cnn-a-mnist").await;
    let cnn_layers = cnn["layers"].as_array().unwrap();
    let conv2 = cnn_layers.iter().find(|l| l["name"] == "conv2").unwrap();
    // conv1 3x3 → pool 2 → conv2 3x3: 11x11 maps, each unit sees 8x8 input pixels.
    assert_eq!(conv2["output_shape"], json!([64, 11, 11]));
    assert_eq!(conv2["receptive_field"], 8);
    assert_eq!(cnn["total_params"], 320 + 18_496 + 204_928 + 8_256 + 650);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_eight_equals_eight_single_requests() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let images: Vec<Vec<u8>> = cifar_test(0..8).into_iter().map(|(p, _)| p).collect();
    let batch = app
        .post_images_json("/models/resnet20-cifar10/predict?top_k=10", &images)
        .await;
    let batch = batch["predictions"].as_array().unwrap();
    assert_eq!(batch.len(), 8);
    for (i, img) in images.iter().enumerate() {
        let single = app
            .post_images_json("/models/resnet20-cifar10/predict?top_k=10", &[&img])
            .await;
        let single = &single["predictions"][0];
        let order = |p: &Value| {
            p["top_k"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["class_index"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(single), order(&batch[i]), "image {i} ranking");
        assert_close(
            &logits_by_class(&batch[i]),
            &logits_by_class(single),
            1e-5,
            &format!("image {i}"),
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_bodies_base64_json_and_the_default_model_give_the_same_answer() {
    let dir = models_dir(&["resnet20-cifar10", "captum-cifar-net"]);
    let app = TestApp::spawn(dir.path()).await;
    let png = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let multipart = app
        .post_images_json("/models/resnet20-cifar10/predict", &[&png])
        .await;
    let want = logits_by_class(
        &app.post_images_json("/models/resnet20-cifar10/predict?top_k=10", &[&png])
            .await["predictions"][0],
    );
    assert_eq!(multipart["model"], "resnet20-cifar10");
    assert_eq!(
        multipart["predictions"][0]["top_k"]
            .as_array()
            .unwrap()
            .len(),
        5,
        "top_k defaults to 5"
    );
    assert_eq!(multipart["predictions"][0]["top_k"][0]["label"], "cat");
    assert!(multipart["elapsed_ms"].as_f64().unwrap() > 0.0);

    let raw: Value = app
        .client
        .post(app.url("/models/resnet20-cifar10/predict?top_k=10"))
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(logits_by_class(&raw["predictions"][0]), want);

    // curl --data-binary sends application/x-www-form-urlencoded: sniffed.
    let sniffed: Value = app
        .client
        .post(app.url("/predict?top_k=10"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(png.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        sniffed["model"], "resnet20-cifar10",
        "POST /predict uses the default model"
    );
    assert_eq!(logits_by_class(&sniffed["predictions"][0]), want);

    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    for body in [
        json!({"image": b64}),
        json!({"images": [b64, b64]}),
        json!({"items": [{"image": b64, "label": "3"}]}),
    ] {
        let r: Value = app
            .client
            .post(app.url("/models/resnet20-cifar10/predict?top_k=10"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for p in r["predictions"].as_array().unwrap() {
            assert_eq!(logits_by_class(p), want, "{body:.40}");
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_problem_json_that_says_what_to_fix() {
    let dir = models_dir(&["resnet20-cifar10", "lenet5-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    let png = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();

    let (s, b) = problem(app.post_images("/models/nope/predict", &[&png]).await).await;
    assert_problem(
        s,
        &b,
        404,
        "model 'nope' not found; available: lenet5-mnist, resnet20-cifar10",
    );
    let (s, b) = problem(
        app.client
            .get(app.url("/models/nope"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(s, &b, 404, "nope");

    // A text file posted as an image, as multipart and as a mislabelled raw body.
    let text = b"this is not an image\n".to_vec();
    let (s, b) = problem(
        app.post_images("/models/resnet20-cifar10/predict", &[&text])
            .await,
    )
    .await;
    assert_problem(s, &b, 422, "cannot decode image");
    let r = app
        .client
        .post(app.url("/predict"))
        .header("content-type", "image/png")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 422, "cannot decode image");
    let r = app
        .client
        .post(app.url("/predict"))
        .header("content-type", "text/plain")
        .body(text)
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 415, "text/plain");

    // A truncated PNG: the header is fine, the pixel data is cut.
    let truncated = png[..png.len() / 2].to_vec();
    let (s, b) = problem(app.post_images("/predict", &[truncated]).await).await;
    assert_problem(s, &b, 422, "cannot decode image");

    // The wrong size for a model without resize in its manifest is not silently stretched.
    let (s, b) = problem(
        app.post_images("/models/lenet5-mnist/predict", &[&png])
            .await,
    )
    .await;
    assert_problem(
        s,
        &b,
        422,
        "the image is 32x32 but model 'lenet5-mnist' takes 28x28 images",
    );
    // With resize + center crop, a small image is scaled up and cropped.
    let tiny = convscope_tests::png(7, 5, 3, &[90u8; 7 * 5 * 3]);
    let r = app.post_images("/predict", &[tiny]).await;
    assert_eq!(r.status().as_u16(), 200);

    // Which image of a batch is wrong.
    let (s, b) = problem(
        app.post_images("/predict", &[png.clone(), b"junk".to_vec()])
            .await,
    )
    .await;
    assert_problem(s, &b, 422, "image 1:");

    // Empty multipart, zero-byte body, bad query values.
    let r = app
        .client
        .post(app.url("/predict"))
        .multipart(reqwest::multipart::Form::new().text("other", "x"))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 400, "no image");
    let r = app
        .client
        .post(app.url("/predict"))
        .header("content-type", "image/png")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 422, "empty");
    let (s, b) = problem(app.post_images("/predict?top_k=0", &[&png]).await).await;
    assert_problem(s, &b, 400, "top_k");
    let (s, b) = problem(app.post_images("/predict?top_k=many", &[&png]).await).await;
    assert_problem(s, &b, 400, "top_k");
    let r = app
        .client
        .post(app.url("/predict"))
        .json(&json!({"image": "%%%not base64"}))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 422, "base64");

    // Unknown layer: 404 listing the real ones.
    let (s, b) = problem(
        app.post_images(
            "/models/resnet20-cifar10/activations/conv9?format=json",
            &[&png],
        )
        .await,
    )
    .await;
    assert_problem(s, &b, 404, "layer1.0.conv1");

    // Unknown route.
    let (s, b) = problem(
        app.client
            .get(app.url("/nothing/here"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(s, &b, 404, "/nothing/here");

    // After all that, still serving.
    app.assert_healthy().await;
    let ok = app.post_images_json("/predict", &[png]).await;
    assert_eq!(ok["predictions"][0]["top_k"][0]["label"], "cat");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_model_predicts_at_once_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The course CNN_A, as a student would upload their PyTorch state_dict.
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(repo().join("models/cnn-a-mnist.json")).unwrap())
            .unwrap();
    manifest["name"] = json!("cnn-a-student");
    let weights = std::fs::read(repo().join("models/cnn-a-mnist.safetensors")).unwrap();
    let digits: Vec<Vec<u8>> = mnist_test(0..4).into_iter().map(|(p, _)| p).collect();

    let app = TestApp::spawn(dir.path()).await;
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&manifest, weights.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(r.headers()["location"], "/models/cnn-a-student");
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["name"], "cnn-a-student");
    assert_eq!(created["layers"][3]["name"], "conv2");

    let before = app
        .post_images_json("/models/cnn-a-student/predict?top_k=10", &digits)
        .await;
    let labels: Vec<&str> = before["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["top_k"][0]["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["7", "2", "1", "0"], "MNIST test digits 0..3");

    // The name is taken now.
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&manifest, weights.clone()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 409, "already exists");
    app.stop().await;

    // Restart on the same directory: still there, same numbers, no stray files.
    let app = TestApp::spawn(dir.path()).await;
    let after = app
        .post_images_json("/models/cnn-a-student/predict?top_k=10", &digits)
        .await;
    assert_eq!(before["predictions"], after["predictions"]);
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // `.jobs/` holds the training queue's database, not models.
        .filter(|n| n != ".jobs")
        .collect();
    files.sort();
    assert_eq!(files, ["cnn-a-student.json", "cnn-a-student.safetensors"]);

    // Delete: gone from the API and from disk.
    let r = app
        .client
        .delete(app.url("/models/cnn-a-student"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (s, _) = app.get_json("/models/cnn-a-student").await;
    assert_eq!(s, 404);
    let left = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != ".jobs")
        .count();
    assert_eq!(left, 0);
    let r = app
        .client
        .delete(app.url("/models/cnn-a-student"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_that_does_not_match_its_weights_is_refused_naming_the_tensor() {
    // At start-up: ResNet-20 weights under a ResNet-32 manifest, beside a good model.
    let dir = models_dir(&["resnet20-cifar10", "captum-cifar-net"]);
    let mut bad: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("resnet20-cifar10.json")).unwrap())
            .unwrap();
    bad["name"] = json!("liar");
    bad["architecture"] = json!("resnet32-cifar");
    std::fs::write(dir.path().join("liar.json"), bad.to_string()).unwrap();
    std::fs::copy(
        dir.path().join("resnet20-cifar10.safetensors"),
        dir.path().join("liar.safetensors"),
    )
    .unwrap();
    let app = TestApp::spawn(dir.path()).await;
    let (_, list) = app.get_json("/models").await;
    let errors = list["load_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{list}");
    assert_eq!(errors[0]["file"], "liar.json");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("missing tensor 'layer1.3.conv1.weight'"),
        "{}",
        errors[0]
    );
    let (s, _) = app.get_json("/models/liar").await;
    assert_eq!(s, 404);
    let png = std::fs::read(repo().join("data/cifar10/samples/test0001_ship.png")).unwrap();
    let ok = app
        .post_images_json("/models/captum-cifar-net/predict", &[png])
        .await;
    assert_eq!(
        ok["predictions"][0]["top_k"][0]["label"], "ship",
        "the other models still serve"
    );

    // At registration: a mis-shaped tensor, and layers that do not chain.
    let captum: Value = serde_json::from_slice(
        &std::fs::read(repo().join("models/captum-cifar-net.json")).unwrap(),
    )
    .unwrap();
    let weights = std::fs::read(repo().join("models/captum-cifar-net.safetensors")).unwrap();
    let mut wrong = captum.clone();
    wrong["name"] = json!("wrong-shape");
    wrong["layers"][0]["out_channels"] = json!(8);
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&wrong, weights.clone()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(
        s,
        &b,
        422,
        "tensor 'conv1.weight' has shape [6, 3, 5, 5], expected [8, 3, 5, 5]",
    );

    let mut unchained = captum.clone();
    unchained["name"] = json!("unchained");
    unchained.as_object_mut().unwrap().insert(
        "input".into(),
        json!({"channels": 3, "height": 36, "width": 36}),
    );
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&unchained, weights.clone()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(
        s,
        &b,
        422,
        "layer 'fc1': expects 400 input features but receives 576",
    );

    let mut traversal = captum.clone();
    traversal["name"] = json!("../escape");
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&traversal, weights.clone()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 422, "not a valid model name");

    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&captum, b"not safetensors".to_vec()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 409, "already exists");
    let mut fresh = captum.clone();
    fresh["name"] = json!("fresh");
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(&fresh, b"not safetensors".to_vec()))
        .send()
        .await
        .unwrap();
    let (s, b) = problem(r).await;
    assert_problem(s, &b, 422, "safetensors");

    // Nothing was written for any refused model.
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // `.jobs/` holds the training queue's database, not models.
        .filter(|n| n != ".jobs")
        .collect();
    files.sort();
    assert_eq!(files.len(), 6, "{files:?}");
    app.assert_healthy().await;
    app.stop().await;
}
