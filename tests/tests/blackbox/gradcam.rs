//! The Grad-CAM family over HTTP against PyTorch: the shared references for
//! ResNet-20 and LeNet-5, all seven methods against pytorch-grad-cam 1.5.7
//! (`tools/golden/grad_cam.py`), overlays at the upload's size, and errors.

use convscope_tests::*;
use serde_json::{Value, json};

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&v| v as f64).sum::<f64>() / n,
        b.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let cov: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - ma) * (y as f64 - mb))
        .sum();
    let va: f64 = a.iter().map(|&x| (x as f64 - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|&y| (y as f64 - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

fn normalise(raw: &[f32]) -> Vec<f32> {
    let relu: Vec<f32> = raw.iter().map(|v| v.max(0.0)).collect();
    let min = relu.iter().copied().fold(f32::INFINITY, f32::min);
    let max = relu.iter().map(|v| v - min).fold(0f32, f32::max);
    relu.iter().map(|v| (v - min) / (1e-7 + max)).collect()
}

async fn cam_json(app: &TestApp, path: &str, image: &[u8]) -> Value {
    app.post_images_json(path, &[image]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gradcam_matches_the_shared_references_for_resnet20_layer3_and_lenet5_conv2() {
    let dir = models_dir(&["resnet20-cifar10", "lenet5-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    for (file, model, layer, images) in [
        (
            "resnet20_cifar10_gradcam.json",
            "resnet20-cifar10",
            "layer3",
            cifar_test(0..4),
        ),
        (
            "lenet5_mnist_gradcam.json",
            "lenet5-mnist",
            "conv2",
            mnist_test(0..4),
        ),
    ] {
        let reference: Value = serde_json::from_slice(
            &std::fs::read(repo().join("data/reference").join(file)).unwrap(),
        )
        .unwrap();
        for (item, (png, _)) in reference["items"].as_array().unwrap().iter().zip(&images) {
            let got = cam_json(
                &app,
                &format!("/models/{model}/gradcam?output=json&layer={layer}"),
                png,
            )
            .await;
            let what = format!("{model} image {}", item["index"]);
            assert_eq!(
                got["class_index"], item["target_class"],
                "{what}: the predicted class"
            );
            assert_eq!(got["method"], "gradcam");
            // α: 1e-4 of the largest weight, plus the reference's own rounding
            // to 6 decimals (5e-7), which is ~1e-4 of LeNet-5's small weights.
            let want_w = flat(&item["channel_weights_alpha"]);
            let scale = want_w.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in flat(&got["weights"]).iter().zip(&want_w).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * scale + 5e-7,
                    "{what} α[{i}]: {g} vs PyTorch {w}"
                );
            }
            // The reference's cam_raw is after the ReLU; ours is before it.
            let want_raw = flat(&item["cam_raw"]);
            let got_raw: Vec<f32> = flat(&got["raw_cam"]).iter().map(|v| v.max(0.0)).collect();
            let scale = want_raw.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close_with_floor(&got_raw, &want_raw, 1e-4, scale, &format!("{what} raw CAM"));
            assert_close_with_floor(
                &flat(&got["cam"]),
                &normalise(&want_raw),
                1e-4,
                1.0,
                &format!("{what} normalised CAM"),
            );
            let shape = &item["target_layer_activation_shape"];
            assert_eq!(got["shape"], json!([shape[1], shape[2]]));
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn all_seven_methods_match_pytorch_grad_cam_on_resnet18_cnn_a_and_alexnet() {
    let dir = models_dir(&["cnn-a-mnist"]);
    write_hash_torchvision(dir.path(), "resnet18", "resnet18-hash", 224);
    write_hash_torchvision(dir.path(), "resnet18", "resnet18-hash-64", 64);
    write_hash_torchvision(dir.path(), "alexnet", "alexnet-hash", 128);
    let app = TestApp::spawn(dir.path()).await;
    let (_, list) = app.get_json("/models").await;
    assert_eq!(list["load_errors"], json!([]));
    for (file, model) in [
        ("resnet18.json", "resnet18-hash"),
        ("resnet18_scorecam.json", "resnet18-hash-64"),
        ("cnn_a.json", "cnn-a-mnist"),
        ("alexnet.json", "alexnet-hash"),
    ] {
        let fx: Value = serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures/gradcam").join(file)).unwrap(),
        )
        .unwrap();
        let image = std::fs::read(repo().join(fx["image"].as_str().unwrap())).unwrap();
        for layer in fx["layers"].as_array().unwrap() {
            let name = layer["layer"].as_str().unwrap();
            for case in layer["cams"].as_array().unwrap() {
                let method = case["method"].as_str().unwrap();
                let class = case["class_index"].as_u64().unwrap();
                let path = format!(
                    "/models/{model}/gradcam?output=json&layer={name}&method={}&class={class}",
                    method.replace('+', "%2B")
                );
                let got = cam_json(&app, &path, &image).await;
                let what = format!("{model} {name} {method} class {class}");
                assert_eq!(got["method"], method, "{what}");
                assert_eq!(got["class_index"].as_u64(), Some(class), "{what}");
                let want = flat(&case["cam"]);
                let ours = flat(&got["cam"]);
                assert_eq!(ours.len(), want.len(), "{what}: size");
                assert!(
                    ours.iter().all(|v| (0.0..=1.0).contains(v)),
                    "{what}: cam in [0, 1]"
                );
                if want.iter().all(|&v| v == 0.0) {
                    assert!(
                        ours.iter().all(|&v| v == 0.0),
                        "{what}: nothing survives the ReLU in either"
                    );
                    continue;
                }
                let r = if method == "eigencam" {
                    // SVD's sign is arbitrary: either sign of the projection is a valid EigenCAM.
                    let raw = flat(&got["raw_cam"]);
                    let flipped: Vec<f32> = raw.iter().map(|v| -v).collect();
                    pearson(&normalise(&raw), &want).max(pearson(&normalise(&flipped), &want))
                } else {
                    pearson(&ours, &want)
                };
                assert!(r >= 0.999, "{what}: Pearson r = {r}");
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlays_have_the_upload_size_and_blend_the_heatmap_with_the_image() {
    let dir = models_dir(&["resnet20-cifar10", "mobilenet-v1-0.25-128"]);
    let app = TestApp::spawn(dir.path()).await;
    let decode = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8();
    let photo = std::fs::read(repo().join("data/imagenet/samples/cat.png")).unwrap();
    let original = decode(&photo);
    let overlay = |q: &'static str| {
        let app = &app;
        let photo = photo.clone();
        async move {
            let r = app
                .post_images(
                    &format!("/models/mobilenet-v1-0.25-128/gradcam?{q}"),
                    &[&photo],
                )
                .await;
            assert_eq!(r.status().as_u16(), 200, "{q}");
            assert_eq!(r.headers()["content-type"], "image/png");
            decode(&r.bytes().await.unwrap())
        }
    };
    let half = overlay("").await;
    assert_eq!(
        half.dimensions(),
        original.dimensions(),
        "the upload's own size"
    );
    assert_eq!(
        overlay("alpha=0").await,
        original,
        "alpha 0 is the image itself"
    );
    // alpha 1 inside the center-crop region: pure colormap colours; outside it, the image.
    let full = overlay("alpha=1").await;
    let (w, h) = original.dimensions();
    let centre = full.get_pixel(w / 2, h / 2).0;
    assert!(centre != original.get_pixel(w / 2, h / 2).0);
    let crop_left = (w - h) / 2; // shorter side resized to 128, then a 128 center crop
    assert_eq!(
        full.get_pixel(crop_left / 2, h / 2),
        original.get_pixel(crop_left / 2, h / 2),
        "outside the crop"
    );
    // Where half differs from the image, it is the average of the image and full.
    let p = (w / 2, h / 2);
    for c in 0..3 {
        let avg =
            (full.get_pixel(p.0, p.1)[c] as f32 + original.get_pixel(p.0, p.1)[c] as f32) / 2.0;
        assert!(
            (half.get_pixel(p.0, p.1)[c] as f32 - avg).abs() <= 1.0,
            "alpha 0.5 blend"
        );
    }
    // The heatmap alone: the model's input size.
    let r = app
        .post_images(
            "/models/resnet20-cifar10/gradcam?output=heatmap",
            &[&std::fs::read(repo().join("data/cifar10/samples/test0003_airplane.png")).unwrap()],
        )
        .await;
    assert_eq!(decode(&r.bytes().await.unwrap()).dimensions(), (32, 32));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn classes_batches_and_errors() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let ship = std::fs::read(repo().join("data/cifar10/samples/test0001_ship.png")).unwrap();
    // By label, several classes, default layer = the last residual block.
    let j = cam_json(
        &app,
        "/models/resnet20-cifar10/gradcam?output=json&class=dog,3",
        &cat,
    )
    .await;
    assert_eq!(j["layer"], "layer3.2");
    assert_eq!(j["results"].as_array().unwrap().len(), 2);
    assert_eq!(j["results"][0]["class_index"], 5);
    assert_eq!(j["results"][0]["label"], "dog");
    assert_eq!(j["results"][1]["class_index"], 3);
    assert_eq!(j["class_index"], 5, "top level = the first result");
    // A batch: each image with its own predicted class.
    let b = app
        .post_images_json(
            "/models/resnet20-cifar10/gradcam?output=json",
            &[&cat, &ship],
        )
        .await;
    let labels: Vec<&str> = b["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["cat", "ship"]);

    let check = |r: (u16, Value), status: u16, needle: &str| {
        assert_eq!(r.0, status, "{}", r.1);
        assert!(
            r.1["detail"].as_str().unwrap_or("").contains(needle),
            "{} should mention {needle:?}",
            r.1
        );
    };
    let post = |q: &str| {
        let app = &app;
        let cat = cat.clone();
        let q = q.to_string();
        async move {
            let r = app
                .post_images(&format!("/models/resnet20-cifar10/gradcam?{q}"), &[&cat])
                .await;
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    check(post("class=unicorn").await, 400, "airplane, automobile");
    check(post("class=10").await, 400, "0-9");
    check(post("layer=flatten").await, 400, "spatial");
    check(post("layer=linear").await, 400, "layer3.2");
    check(post("layer=nope").await, 404, "layer1.0.conv1");
    check(post("method=gradcam3").await, 400, "scorecam");
    check(post("alpha=2").await, 400, "alpha");
    check(post("class=3,5").await, 400, "output=json");
    app.assert_healthy().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aug_smooth_eigen_smooth_and_ablation_cam_match_pytorch_grad_cam() {
    let dir = models_dir(&["resnet20-cifar10", "cnn-a-mnist"]);
    write_hash_torchvision(dir.path(), "resnet18", "resnet18-hash", 224);
    let app = TestApp::spawn(dir.path()).await;
    let fixtures: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/gradcam/smooth.json")).unwrap(),
    )
    .unwrap();
    for case in fixtures["cases"].as_array().unwrap() {
        let (model, layer, method) = (
            case["model"].as_str().unwrap(),
            case["layer"].as_str().unwrap(),
            case["method"].as_str().unwrap(),
        );
        let (aug, eigen) = (case["aug_smooth"] == true, case["eigen_smooth"] == true);
        let class = case["class_index"].as_u64().unwrap();
        let image = std::fs::read(repo().join(case["image"].as_str().unwrap())).unwrap();
        let what = format!("{model} {layer} {method} aug_smooth={aug} eigen_smooth={eigen}");
        let got = cam_json(
            &app,
            &format!(
                "/models/{model}/gradcam?output=json&layer={layer}&method={method}&class={class}&aug_smooth={aug}&eigen_smooth={eigen}"
            ),
            &image,
        )
        .await;
        assert_eq!(got["shape"], case["shape"], "{what}: {got}");
        assert_eq!(
            (got["aug_smooth"] == true, got["eigen_smooth"] == true),
            (aug, eigen)
        );
        let ours = flat(&got["cam"]);
        // SVD's sign is arbitrary: pytorch-grad-cam's own map, or its map
        // with the sign correction convscope applies.
        let r = ["cam", "cam_sign_corrected"]
            .iter()
            .filter(|k| case.get(**k).is_some())
            .map(|k| pearson(&ours, &flat(&case[*k])))
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(r >= 0.999, "{what}: r = {r}");
    }
    // The options are checked like every other parameter.
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let r = app
        .post_images("/models/resnet20-cifar10/gradcam?aug_smooth=yes", &[&cat])
        .await;
    let (status, body) = problem(r).await;
    assert_problem(status, &body, 400, "aug_smooth");
    app.stop().await;
}
