//! Gradients with respect to the input against PyTorch autograd (through
//! the saliency endpoint), SmoothGrad, and activation maximisation.

use convscope_tests::*;
use serde_json::{Value, json};

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn input_gradients_match_pytorch_autograd_through_every_op() {
    let dir = models_dir(&["resnet20-cifar10", "cnn-a-mnist", "mobilenet-v1-0.25-128"]);
    write_hash_torchvision(dir.path(), "resnet18", "resnet18-hash-64", 64);
    write_hash_torchvision(dir.path(), "alexnet", "alexnet-hash", 128);
    write_hash_fixture(
        dir.path(),
        "tests/fixtures/gradients/ops_net_model.json",
        |_| {},
    );
    let app = TestApp::spawn(dir.path()).await;
    let (_, list) = app.get_json("/models").await;
    assert_eq!(list["load_errors"], json!([]));
    let index: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/gradients/index.json")).unwrap(),
    )
    .unwrap();
    for case in index.as_array().unwrap() {
        let model = case["model"].as_str().unwrap();
        let class = case["class_index"].as_u64().unwrap();
        let image = std::fs::read(repo().join(case["image"].as_str().unwrap())).unwrap();
        let got = app
            .post_images_json(
                &format!("/models/{model}/saliency?output=json&class={class}"),
                &[&image],
            )
            .await;
        assert_eq!(got["class_index"].as_u64(), Some(class));
        let (shape, want) = read_npy(
            &repo()
                .join("tests/fixtures/gradients")
                .join(case["file"].as_str().unwrap()),
        );
        let ours = flat(&got["gradient"]);
        assert_eq!(
            ours.len(),
            shape.iter().product::<usize>(),
            "{model}: gradient size"
        );
        assert_close_layer(&ours, &want, 1e-4, &format!("{model}: ∂logit/∂input"));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smoothgrad_is_deterministic_for_a_seed_and_pictures_have_the_input_size() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0000_cat.png")).unwrap();
    let get = |q: &'static str| {
        let (app, cat) = (&app, cat.clone());
        async move {
            app.post_images_json(
                &format!("/models/resnet20-cifar10/saliency?output=json&{q}"),
                &[&cat],
            )
            .await
        }
    };
    let a = get("method=smoothgrad&samples=8&seed=3").await;
    let b = get("method=smoothgrad&samples=8&seed=3").await;
    let c = get("method=smoothgrad&samples=8&seed=4").await;
    let v = get("").await;
    assert_eq!(a["gradient"], b["gradient"], "same seed, same noise");
    assert_ne!(a["gradient"], c["gradient"]);
    assert_ne!(a["gradient"], v["gradient"]);
    assert_eq!(a["method"], "smoothgrad");
    assert_eq!(v["method"], "vanilla");
    let s = flat(&a["saliency"]);
    assert_eq!(s.len(), 32 * 32);
    assert!(s.iter().all(|x| (0.0..=1.0).contains(x)));
    let r = app
        .post_images("/models/resnet20-cifar10/saliency", &[&cat])
        .await;
    assert_eq!(r.headers()["content-type"], "image/png");
    let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let r = app
        .post_images(
            "/models/resnet20-cifar10/saliency?method=smoothgrad&samples=0",
            &[&cat],
        )
        .await;
    assert_eq!(r.status().as_u16(), 400);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn activation_maximisation_excites_its_channel_far_beyond_real_images_and_is_deterministic() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    // What real images give layer3's channel 0: the ten bundled CIFAR-10 samples.
    let mut real = Vec::new();
    for entry in std::fs::read_dir(repo().join("data/cifar10/samples")).unwrap() {
        let png = std::fs::read(entry.unwrap().path()).unwrap();
        let j = app
            .post_images_json(
                "/models/resnet20-cifar10/activations/layer3?format=json&channels=0",
                &[&png],
            )
            .await;
        let d = flat(&j["data"]);
        real.push(d.iter().sum::<f32>() / d.len() as f32);
    }
    let real_mean = real.iter().sum::<f32>() / real.len() as f32;
    let (s, body) = app
        .get_json(
            "/models/resnet20-cifar10/maximize?layer=layer3&channel=0&steps=128&seed=7&format=json",
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (start, end) = (
        body["start_objective"].as_f64().unwrap() as f32,
        body["final_objective"].as_f64().unwrap() as f32,
    );
    assert!(end >= 10.0 * start, "final {end} vs starting noise {start}");
    assert!(
        end >= 10.0 * real_mean,
        "final {end} vs real images' mean {real_mean}"
    );
    assert_eq!(body["objective"].as_array().unwrap().len(), 128);

    // Deterministic for a seed, different for another.
    let png = |q: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .get(app.url(&format!(
                    "/models/resnet20-cifar10/maximize?layer=layer3&channel=0&steps=16&{q}"
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["content-type"], "image/png");
            r.bytes().await.unwrap().to_vec()
        }
    };
    let (a, b, c) = (
        png("seed=1").await,
        png("seed=1").await,
        png("seed=2").await,
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    let img = image::load_from_memory(&a).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (128, 128),
        "32 px × default scale 4"
    );

    // A class logit, by label, from an uploaded start image.
    let cat = std::fs::read(repo().join("data/cifar10/samples/test0001_ship.png")).unwrap();
    let r = app
        .post_images(
            "/models/resnet20-cifar10/maximize?class=cat&steps=8&format=json",
            &[&cat],
        )
        .await;
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["class_index"], 3);
    assert!(j["final_objective"].as_f64().unwrap() > j["start_objective"].as_f64().unwrap());

    for (q, status, needle) in [
        ("layer=layer3&channel=999", 400, "has 64 channels"),
        ("layer=nope", 404, "layer1.0.conv1"),
        ("steps=0", 400, "steps"),
        ("steps=100000", 400, "steps"),
        ("lr=-1", 400, "lr"),
        ("jitter=99", 400, "jitter"),
        ("class=unicorn", 400, "airplane"),
    ] {
        let (s, body) = app
            .get_json(&format!("/models/resnet20-cifar10/maximize?{q}"))
            .await;
        assert_eq!(s, status, "{q}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(needle),
            "{q}: {body}"
        );
    }
    app.stop().await;
}
