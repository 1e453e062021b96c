//! Charts as the server draws them: training curves of real jobs and
//! confusion matrices of real evaluations, PNG at the size asked for and
//! SVG that parses as XML; CNN_A on MNIST, and a 100-class ImageFolder of
//! two-digit numbers made from real MNIST digits. With
//! `CONVSCOPE_WRITE_DOCS=1` the pictures are also written to `docs/img/`,
//! where the README shows them.

use std::time::Duration;

use convscope_tests::*;
use serde_json::{Value, json};

async fn get(app: &TestApp, path: &str) -> (u16, String, Vec<u8>) {
    let r = app.client.get(app.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.bytes().await.unwrap().to_vec())
}

async fn post_json(app: &TestApp, path: &str, body: &Value) -> (u16, String, Vec<u8>) {
    let r = app
        .client
        .post(app.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (status, ct, r.bytes().await.unwrap().to_vec())
}

/// A PNG of exactly `size` with more than a handful of colours (a drawn
/// chart, not an empty canvas).
fn assert_chart_png(bytes: &[u8], size: (u32, u32), what: &str) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{what}: not a PNG: {e}"))
        .to_rgb8();
    assert_eq!(img.dimensions(), size, "{what}");
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "{what}: {} colours", colours.len());
}

/// An SVG document that parses as XML, its root an `<svg>` of `size`,
/// holding `texts` among its `<text>` elements.
fn assert_chart_svg(bytes: &[u8], size: (u32, u32), texts: &[&str], what: &str) {
    let text = std::str::from_utf8(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    let doc = roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{what}: not XML: {e}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{what}");
    assert_eq!(
        (root.attribute("width"), root.attribute("height")),
        (
            Some(size.0.to_string().as_str()),
            Some(size.1.to_string().as_str())
        ),
        "{what}"
    );
    let drawn: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect();
    for want in texts {
        assert!(
            drawn.iter().any(|t| t.contains(want)),
            "{what}: no text {want:?} in {drawn:?}"
        );
    }
}

/// Queues a training job and waits for it to succeed; its id.
async fn train(app: &TestApp, body: &Value) -> String {
    let (status, queued) = app.submit_job(body).await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap().to_string();
    let job = app
        .wait_for_job(&id, Duration::from_secs(300), job_is_final)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    id
}

fn write_doc(name: &str, bytes: &[u8]) {
    if std::env::var_os("CONVSCOPE_WRITE_DOCS").is_some() {
        std::fs::write(repo().join("docs/img").join(name), bytes).unwrap();
    }
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    image::load_from_memory(bytes)
        .unwrap()
        .to_rgb8()
        .dimensions()
}

#[tokio::test(flavor = "multi_thread")]
async fn cnn_a_training_and_its_confusion_matrix_are_charts() {
    let models = models_dir(&["cnn-a-mnist"]);
    let app = TestApp::spawn(models.path()).await;

    // A short CNN_A run on real MNIST with a step schedule: all three panels.
    let id = train(
        &app,
        &json!({"model_name": "cnn-a-charts", "architecture": "cnn_a", "dataset": "mnist",
            "epochs": 3, "batch_size": 64, "train_limit": 2000, "test_limit": 500,
            "lr_schedule": {"type": "step", "step_size": 1, "gamma": 0.5}, "seed": 3}),
    )
    .await;

    let (s, ct, png) = get(&app, &format!("/jobs/{id}/plot.png")).await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    assert_chart_png(&png, (1500, 460), "training plot");
    write_doc("chart-training-cnn-a.png", &png);
    let (s, ct, png) = get(
        &app,
        &format!("/jobs/{id}/plot?width=900&height=300&scale=2"),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    assert_chart_png(&png, (1800, 600), "training plot at scale 2");
    // A scale that would take the chart's own size past the bound fits it in.
    let (s, _, png) = get(&app, &format!("/jobs/{id}/plot?scale=4")).await;
    assert_eq!(s, 200);
    let (w, h) = png_size(&png);
    assert!(w <= 4096 && h <= 4096 && w >= 4000, "{w}×{h}");
    let (s, ct, svg) = get(&app, &format!("/jobs/{id}/plot?format=svg")).await;
    assert_eq!((s, ct.as_str()), (200, "image/svg+xml"));
    assert_chart_svg(
        &svg,
        (1500, 460),
        &["training loss", "learning rate", "epoch", "test"],
        "training plot SVG",
    );

    // The bundled CNN_A on 1,000 MNIST test images.
    let body = json!({"dataset": "mnist", "limit": 1000});
    let (s, ct, png) = post_json(&app, "/models/cnn-a-mnist/evaluate?format=png", &body).await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    let size = png_size(&png);
    assert!(size.0 >= 600 && size.1 >= 600, "{size:?}");
    assert_chart_png(&png, size, "confusion matrix");
    write_doc("chart-confusion-cnn-a.png", &png);
    let (s, ct, svg) = post_json(&app, "/models/cnn-a-mnist/evaluate?format=svg", &body).await;
    assert_eq!((s, ct.as_str()), (200, "image/svg+xml"));
    assert_chart_svg(
        &svg,
        size,
        &[
            "cnn-a-mnist on mnist",
            "predicted class",
            "true class",
            "7",
            "100%",
        ],
        "confusion SVG",
    );
    let (s, _, png) = post_json(
        &app,
        "/models/cnn-a-mnist/evaluate?format=png&width=500&height=400",
        &body,
    )
    .await;
    assert_eq!(s, 200);
    assert_chart_png(&png, (500, 400), "confusion matrix at 500×400");

    // Sizes out of bounds are refused before anything is drawn.
    for query in [
        "width=5000",
        "height=100",
        "scale=9",
        "width=3000&scale=2",
        "format=gif",
    ] {
        let (s, ct, body) = get(&app, &format!("/jobs/{id}/plot?{query}")).await;
        assert_eq!(
            (s, ct.as_str()),
            (400, "application/problem+json"),
            "{query}"
        );
        let detail: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            detail["detail"].as_str().unwrap().contains("must")
                || detail["detail"].as_str().unwrap().contains("most"),
            "{query}: {detail}"
        );
    }
    let (s, _, _) = post_json(
        &app,
        "/models/cnn-a-mnist/evaluate?format=png&width=99999",
        &body,
    )
    .await;
    assert_eq!(s, 400);
    app.stop().await;
}

/// 100 classes: every number 00-99 written with two real MNIST test digits
/// side by side (28×56), learned for a few epochs by a small network; its
/// confusion matrix is drawn within a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_class_image_folder_gets_a_legible_confusion_matrix() {
    let datasets = tempfile::tempdir().unwrap();
    let root = datasets.path().join("imagefolder/two-digits");
    let digits: Vec<(image::GrayImage, usize)> = mnist_test(0..3000)
        .into_iter()
        .map(|(png, label)| (image::load_from_memory(&png).unwrap().to_luma8(), label))
        .collect();
    let mut by_digit: Vec<Vec<&image::GrayImage>> = vec![Vec::new(); 10];
    for (img, label) in &digits {
        by_digit[*label].push(img);
    }
    for n in 0..100usize {
        let dir = root.join(format!("{n:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..12usize {
            let (tens, ones) = (n / 10, n % 10);
            let a = by_digit[tens][(i * 7 + n) % by_digit[tens].len()];
            let b = by_digit[ones][(i * 11 + 3 * n) % by_digit[ones].len()];
            let mut px = vec![0u8; 28 * 56];
            for y in 0..28 {
                for x in 0..28 {
                    px[y * 56 + x] = a.get_pixel(x as u32, y as u32).0[0];
                    px[y * 56 + 28 + x] = b.get_pixel(x as u32, y as u32).0[0];
                }
            }
            std::fs::write(dir.join(format!("{i:02}.png")), png(56, 28, 1, &px)).unwrap();
        }
    }
    let models = models_dir(&[]);
    let mut settings = convscope::Settings::for_tests(models.path());
    settings.datasets = datasets.path().to_path_buf();
    let app = TestApp::spawn_with(settings).await;
    let layers = json!([
        {"name": "conv1", "type": "conv2d", "in_channels": 1, "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"name": "relu1", "type": "relu"},
        {"name": "pool1", "type": "max_pool2d", "kernel_size": 2},
        {"name": "conv2", "type": "conv2d", "in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"name": "relu2", "type": "relu"},
        {"name": "pool2", "type": "max_pool2d", "kernel_size": 2},
        {"name": "flatten", "type": "flatten"},
        {"name": "fc", "type": "linear", "in_features": 32 * 7 * 14, "out_features": 100}
    ]);
    let id = train(
        &app,
        &json!({"model_name": "two-digits", "architecture": {"layers": layers}, "dataset": "two-digits",
            "input": {"channels": 1, "height": 28, "width": 56, "mean": [0.1307], "std": [0.3081]},
            "epochs": 4, "batch_size": 32, "test_fraction": 0.25, "seed": 11}),
    )
    .await;
    let (s, _, png) = get(&app, &format!("/jobs/{id}/plot.png")).await;
    assert_eq!(s, 200);
    assert_chart_png(&png, (1100, 460), "100-class training plot");
    write_doc("chart-training-two-digits.png", &png);

    let body = json!({"dataset": "two-digits"});
    let started = std::time::Instant::now();
    let (s, ct, json_body) = post_json(&app, "/models/two-digits/evaluate", &body).await;
    let evaluate_only = started.elapsed();
    assert_eq!((s, ct.as_str()), (200, "application/json"));
    let scores: Value = serde_json::from_slice(&json_body).unwrap();
    assert_eq!(scores["classes"].as_array().unwrap().len(), 100);
    let started = std::time::Instant::now();
    let (s, ct, png) = post_json(&app, "/models/two-digits/evaluate?format=png", &body).await;
    let with_chart = started.elapsed();
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    let size = png_size(&png);
    assert!(size.0 >= 1200 && size.1 >= 1200, "{size:?}");
    assert_chart_png(&png, size, "100-class confusion matrix");
    write_doc("chart-confusion-two-digits.png", &png);
    // The drawing's share of the request (the evaluation itself is timed
    // alone just before): under a second.
    assert!(
        with_chart.saturating_sub(evaluate_only) < Duration::from_secs(1),
        "drawing took {:?} ({with_chart:?} with, {evaluate_only:?} without)",
        with_chart.saturating_sub(evaluate_only)
    );
    let (s, _, svg) = post_json(&app, "/models/two-digits/evaluate?format=svg", &body).await;
    assert_eq!(s, 200);
    assert_chart_svg(
        &svg,
        size,
        &["00", "42", "99", "predicted class"],
        "100-class SVG",
    );
    app.stop().await;
}
