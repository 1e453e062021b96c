//! Inspection over HTTP against PyTorch: every layer's activation as a
//! forward hook sees it, the model summary against hand calculations, the
//! course's 6-vs-7 embedding distances, and pictures whose pixels are checked
//! against the numbers they show.

use convscope_tests::*;
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/inspection").join(name)).unwrap(),
    )
    .unwrap()
}

async fn store_input(app: &TestApp, path: &str) -> String {
    let png = std::fs::read(repo().join(path)).unwrap();
    let r = app.post_images("/inputs", &[&png]).await;
    assert_eq!(r.status().as_u16(), 201);
    let body: Value = r.json().await.unwrap();
    body["input_id"].as_str().unwrap().to_string()
}

async fn get_bytes(app: &TestApp, path: &str) -> (u16, String, Vec<u8>) {
    let r = app.client.get(app.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    (status, ct, r.bytes().await.unwrap().to_vec())
}

/// Every layer PyTorch can hook must exist here and give the same values:
/// same shape, the sampled elements within 1e-4 (relative; near zero on the
/// layer's RMS scale) and the sum within the matching bound.
async fn check_all_layers(app: &TestApp, fixture_file: &str) {
    let fx = fixture(fixture_file);
    let model = fx["model"].as_str().unwrap();
    let id = store_input(app, fx["image"].as_str().unwrap()).await;
    let (_, detail) = app.get_json(&format!("/models/{model}")).await;
    let ours: Vec<&str> = detail["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for layer in fx["layers"].as_array().unwrap() {
        let name = layer["name"].as_str().unwrap();
        assert!(
            ours.contains(&name),
            "{model}: PyTorch module {name} is not a layer here"
        );
        let (status, ct, bytes) = get_bytes(
            app,
            &format!("/models/{model}/activations/{name}?format=npy&input={id}"),
        )
        .await;
        assert_eq!(
            (status, ct.as_str()),
            (200, "application/octet-stream"),
            "{model} {name}"
        );
        let (shape, data) = parse_npy(&bytes);
        let want_shape: Vec<usize> = layer["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{model} {name} shape");
        let count = layer["count"].as_u64().unwrap() as f64;
        let sumsq = layer["sumsq"].as_f64().unwrap();
        let rms = (sumsq / count).sqrt() as f32;
        let stride = layer["stride"].as_u64().unwrap() as usize;
        let got: Vec<f32> = data.iter().step_by(stride).copied().collect();
        let want: Vec<f32> = layer["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_close_with_floor(&got, &want, 1e-4, rms.max(1.0), &format!("{model} {name}"));
        let sum: f64 = data.iter().map(|&v| v as f64).sum();
        let want_sum = layer["sum"].as_f64().unwrap();
        let bound = 1e-4 * (count * sumsq).sqrt().max(1.0);
        assert!(
            (sum - want_sum).abs() <= bound,
            "{model} {name}: sum {sum} vs PyTorch {want_sum}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_layer_of_resnet20_cnn_a_and_resnet18_matches_pytorch_forward_hooks() {
    let dir = models_dir(&["resnet20-cifar10", "cnn-a-mnist"]);
    write_hash_model_with(dir.path(), "resnet18", |m| {
        m["name"] = json!("resnet18-hash");
        m["input"]["height"] = json!(64);
        m["input"]["width"] = json!(64);
    });
    let app = TestApp::spawn(dir.path()).await;
    check_all_layers(&app, "resnet20_activations.json").await;
    check_all_layers(&app, "cnn_a_activations.json").await;
    check_all_layers(&app, "resnet18_activations.json").await;
    app.stop().await;
}

fn zero_weights(
    dir: &std::path::Path,
    name: &str,
    tensors: &[(String, Vec<usize>)],
    manifest: Value,
) {
    let full: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), vec![0.0; s.iter().product()]))
        .collect();
    std::fs::write(dir.join(format!("{name}.safetensors")), safetensors(&full)).unwrap();
    std::fs::write(dir.join(format!("{name}.json")), manifest.to_string()).unwrap();
}

fn layer<'a>(detail: &'a Value, name: &str) -> &'a Value {
    detail["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_summary_equals_the_hand_calculation() {
    let dir = tempfile::tempdir().unwrap();
    let lists = fixture("torchvision_tensors.json");
    let imagenet = json!({"channels": 3, "height": 224, "width": 224});
    for key in ["alexnet", "resnet18"] {
        let tensors: Vec<(String, Vec<usize>)> = lists[key]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t[0].as_str().unwrap().to_string(),
                    t[1].as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect();
        zero_weights(
            dir.path(),
            key,
            &tensors,
            json!({"name": key, "architecture": format!("torchvision.{key}"), "input": imagenet}),
        );
    }
    // The original AlexNet of the course notes (one tower), from a manifest alone.
    let conv = |name: &str, i: usize, o: usize, k: usize, s: usize, p: usize| json!({"name": name, "type": "conv2d", "in_channels": i, "out_channels": o, "kernel_size": k, "stride": s, "padding": p});
    let pool =
        |name: &str| json!({"name": name, "type": "max_pool2d", "kernel_size": 3, "stride": 2});
    let relu = |name: &str| json!({"name": name, "type": "relu"});
    let fc = |name: &str, i: usize, o: usize| json!({"name": name, "type": "linear", "in_features": i, "out_features": o});
    let course = vec![
        conv("conv1", 3, 96, 11, 4, 0),
        relu("relu1"),
        pool("pool1"),
        conv("conv2", 96, 256, 5, 1, 2),
        relu("relu2"),
        pool("pool2"),
        conv("conv3", 256, 384, 3, 1, 1),
        relu("relu3"),
        conv("conv4", 384, 384, 3, 1, 1),
        relu("relu4"),
        conv("conv5", 384, 256, 3, 1, 1),
        relu("relu5"),
        pool("pool5"),
        json!({"name": "flatten", "type": "flatten"}),
        fc("fc6", 9216, 4096),
        relu("relu6"),
        fc("fc7", 4096, 4096),
        relu("relu7"),
        fc("fc8", 4096, 1000),
    ];
    let mut tensors = Vec::new();
    for l in &course {
        let n = l["name"].as_str().unwrap();
        let u = |k: &str| l[k].as_u64().unwrap() as usize;
        match l["type"].as_str().unwrap() {
            "conv2d" => {
                tensors.push((
                    format!("{n}.weight"),
                    vec![
                        u("out_channels"),
                        u("in_channels"),
                        u("kernel_size"),
                        u("kernel_size"),
                    ],
                ));
                tensors.push((format!("{n}.bias"), vec![u("out_channels")]));
            }
            "linear" => {
                tensors.push((
                    format!("{n}.weight"),
                    vec![u("out_features"), u("in_features")],
                ));
                tensors.push((format!("{n}.bias"), vec![u("out_features")]));
            }
            _ => {}
        }
    }
    zero_weights(
        dir.path(),
        "alexnet-course",
        &tensors,
        json!({"name": "alexnet-course", "architecture": "sequential", "layers": course, "input": {"channels": 3, "height": 227, "width": 227}}),
    );

    let app = TestApp::spawn(dir.path()).await;
    let (_, list) = app.get_json("/models").await;
    assert_eq!(list["load_errors"], json!([]));

    let (_, alexnet) = app.get_json("/models/alexnet").await;
    let f0 = layer(&alexnet, "features.0");
    assert_eq!(f0["output_shape"], json!([64, 55, 55]));
    assert_eq!(f0["params"], 23_296, "3·11·11·64 + 64");
    assert_eq!(f0["receptive_field"], 11);
    assert_eq!(f0["jump"], 4);
    assert_eq!(f0["macs"], 55 * 55 * 64 * 3 * 11 * 11);
    // conv2 after the 3x3/2 pool: 11 + 2·4 = 19, then 19 + 4·8 = 51.
    assert_eq!(layer(&alexnet, "features.3")["receptive_field"], 51);
    assert_eq!(
        layer(&alexnet, "features.12")["output_shape"],
        json!([256, 6, 6])
    );
    assert_eq!(alexnet["total_params"], 61_100_840);
    assert_eq!(alexnet["total_params"], lists["alexnet"]["total_params"]);

    let (_, resnet18) = app.get_json("/models/resnet18").await;
    assert_eq!(resnet18["total_params"], 11_689_512);
    assert_eq!(
        layer(&resnet18, "maxpool")["output_shape"],
        json!([64, 56, 56])
    );
    assert_eq!(
        layer(&resnet18, "layer4.1")["output_shape"],
        json!([512, 7, 7])
    );
    assert_eq!(layer(&resnet18, "layer4")["jump"], 32);

    let (_, course) = app.get_json("/models/alexnet-course").await;
    let c1 = layer(&course, "conv1");
    assert_eq!(c1["output_shape"], json!([96, 55, 55]));
    assert_eq!(c1["params"], 34_944, "3·11·11·96 + 96");
    assert_eq!(layer(&course, "pool5")["output_shape"], json!([256, 6, 6]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn six_versus_seven_distances_equal_pytorch_for_all_five_metrics() {
    let fx = fixture("cnn_a_distances.json");
    let dir = models_dir(&["cnn-a-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    let picks: Vec<usize> = fx["mnist_test_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let all = mnist_test(0..22);
    let mut form = reqwest::multipart::Form::new();
    for &i in &picks {
        form = form
            .part(
                "image",
                reqwest::multipart::Part::bytes(all[i].0.clone()).file_name("d.png"),
            )
            .text("label", all[i].1.to_string());
    }
    let r = app
        .client
        .post(app.url("/models/cnn-a-mnist/embeddings"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["layer"], "fc2",
        "the default layer is the input of the last linear layer"
    );
    assert_eq!(body["labels"], json!(["6", "6", "7", "7"]));
    for (got, want) in body["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fx["embeddings"].as_array().unwrap())
    {
        let f = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect::<Vec<_>>()
        };
        assert_close(&f(got), &f(want), 1e-4, "fc2 embedding");
    }
    for metric in ["euclidean", "mse", "cosine", "cross_entropy", "kl"] {
        let got = &body["distances"][metric];
        let want = &fx["distances"][metric];
        for i in 0..4 {
            for j in 0..4 {
                let (g, w) = (got[i][j].as_f64().unwrap(), want[i][j].as_f64().unwrap());
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1e-6),
                    "{metric}[{i}][{j}]: {g} vs PyTorch {w}"
                );
            }
        }
        // The contract's class means, from the PyTorch matrix.
        let m = |i: usize, j: usize| want[i][j].as_f64().unwrap();
        let intra6 = (m(0, 1) + m(1, 0)) / 2.0;
        let inter67 = (m(0, 2) + m(0, 3) + m(1, 2) + m(1, 3)) / 4.0;
        let classes = &body["classes"];
        assert!(
            (classes["intra"]["6"][metric].as_f64().unwrap() - intra6).abs()
                <= 1e-5 * intra6.abs().max(1e-6),
            "{metric} intra 6"
        );
        assert!(
            (classes["inter"]["6/7"][metric].as_f64().unwrap() - inter67).abs()
                <= 1e-5 * inter67.abs().max(1e-6),
            "{metric} inter 6/7"
        );
        assert!(classes["inter"]["7/6"][metric].is_number());
    }
    // A property of real trained weights (the bundled cnn-a-mnist): same-digit
    // embeddings sit closer than different-digit ones.
    let c = &body["classes"];
    let inter = c["inter"]["6/7"]["mse"].as_f64().unwrap();
    for d in ["6", "7"] {
        assert!(
            c["intra"][d]["mse"].as_f64().unwrap() < inter,
            "intra {d} < inter under MSE"
        );
    }
    assert!(c["inter_intra_ratio"]["mse"].as_f64().unwrap() > 1.0);

    // The same through JSON, with the metrics and the layer chosen.
    let b64 =
        |i: usize| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &all[i].0);
    let items: Vec<Value> = picks
        .iter()
        .map(|&i| json!({"image": b64(i), "label": all[i].1}))
        .collect();
    let r = app
        .client
        .post(app.url("/models/cnn-a-mnist/embeddings?layer=fc2&metrics=mse,kl"))
        .json(&json!({"items": items}))
        .send()
        .await
        .unwrap();
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["distances"]["mse"], body["distances"]["mse"]);
    assert_eq!(again["distances"].as_object().unwrap().len(), 2);
    assert_eq!(
        again["labels"],
        json!(["6", "6", "7", "7"]),
        "numeric JSON labels become strings"
    );
    app.stop().await;
}

fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

/// Height of the legend footer under every grid (colour bar and caption).
const LEGEND: u32 = 40;

/// A grid of `w × h` pixels above its legend footer: the footer adds
/// [`LEGEND`] rows, and columns only where the grid is narrower than the
/// legend's text.
fn assert_grid(img: &image::RgbImage, (w, h): (u32, u32), what: &str) {
    assert_eq!(img.height(), h + LEGEND, "{what}: {:?}", img.dimensions());
    if w >= 300 {
        assert_eq!(img.width(), w, "{what}");
    } else {
        assert!(img.width() >= w, "{what}: {:?}", img.dimensions());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pictures_decode_have_the_documented_size_and_show_the_numbers() {
    let dir = models_dir(&["cnn-a-mnist", "resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let digit = store_input(&app, "data/mnist/samples/test0000_digit7.png").await;

    // conv2 of CNN_A: 64 maps of 11x11, default scale 48/11 = 4 → 44-px
    // tiles on an 8x8 grid with 1-px separators; labels add a 13-px line per row.
    let (s, ct, png) = get_bytes(
        &app,
        &format!("/models/cnn-a-mnist/activations/conv2?input={digit}"),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    let img = decode_png(&png);
    assert_grid(&img, (8 * 44 + 9, 8 * 44 + 9), "conv2");
    let (_, _, png) = get_bytes(
        &app,
        &format!(
            "/models/cnn-a-mnist/activations/conv2?input={digit}&labels=true&colormap=viridis"
        ),
    )
    .await;
    assert_grid(
        &decode_png(&png),
        (8 * 44 + 9, 8 * (44 + 13) + 9),
        "conv2 with labels",
    );

    // One channel in gray at scale 1: each pixel is round(255·(v − min)/(max − min)).
    let (_, json_bytes) = {
        let (_, _, b) = get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv2?input={digit}&format=json&channels=5"),
        )
        .await;
        ((), b)
    };
    let j: Value = serde_json::from_slice(&json_bytes).unwrap();
    assert_eq!(j["shape"], json!([1, 1, 11, 11]));
    let v: Vec<f32> = j["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (_, _, png) = get_bytes(
        &app,
        &format!("/models/cnn-a-mnist/activations/conv2?input={digit}&channels=5&scale=1"),
    )
    .await;
    let img = decode_png(&png);
    assert_grid(&img, (13, 13), "one 11x11 tile inside a 1-px frame");
    for r in 0..11 {
        for c in 0..11 {
            let want = ((v[r * 11 + c] - lo) / (hi - lo) * 255.0).round() as u8;
            assert_eq!(
                img.get_pixel(c as u32 + 1, r as u32 + 1).0,
                [want; 3],
                "pixel ({r}, {c})"
            );
        }
    }

    // npy of a selection: the header says what NumPy will load.
    let (_, _, npy) = get_bytes(
        &app,
        &format!("/models/cnn-a-mnist/activations/conv2?input={digit}&format=npy&channels=0-3,9"),
    )
    .await;
    let (shape, data) = parse_npy(&npy);
    assert_eq!(shape, [1, 5, 11, 11]);
    assert_eq!(
        &data[4 * 121..5 * 121],
        &{
            let (_, _, b) = get_bytes(
                &app,
                &format!(
                    "/models/cnn-a-mnist/activations/conv2?input={digit}&format=npy&channels=9"
                ),
            )
            .await;
            parse_npy(&b).1
        }[..]
    );

    // A flat layer is a strip of cells: fc2 has 64 values → an 8x8 grid of 16-px cells.
    let (_, _, png) = get_bytes(
        &app,
        &format!("/models/cnn-a-mnist/activations/fc2?input={digit}"),
    )
    .await;
    assert_grid(&decode_png(&png), (8 * 16 + 9, 8 * 16 + 9), "fc2");

    // Filters: ResNet-20 conv1 in colour, 16 kernels of 3x3 at scale 16 on a 4x4 grid.
    let (s, _, png) = get_bytes(&app, "/models/resnet20-cifar10/filters/conv1").await;
    assert_eq!(s, 200);
    let img = decode_png(&png);
    assert_grid(&img, (4 * 48 + 5, 4 * 48 + 5), "conv1 filters");
    let (_, _, w) = get_bytes(
        &app,
        "/models/resnet20-cifar10/filters/conv1?format=json&channels=0",
    )
    .await;
    let w: Value = serde_json::from_slice(&w).unwrap();
    assert_eq!(w["shape"], json!([1, 3, 3, 3]));
    let k: Vec<f32> = w["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (lo, hi) = k
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let q = |x: f32| ((x - lo) / (hi - lo) * 255.0).round() as u8;
    // Kernel 0, position (0, 0): R, G, B planes of one min-max.
    assert_eq!(img.get_pixel(1, 1).0, [q(k[0]), q(k[9]), q(k[18])]);
    let (_, _, png) = get_bytes(
        &app,
        "/models/cnn-a-mnist/filters/conv2?in_channel=3&labels=true",
    )
    .await;
    assert_grid(
        &decode_png(&png),
        (8 * 48 + 9, 8 * (48 + 13) + 9),
        "conv2 filters with labels",
    );
    let (_, _, npy) = get_bytes(&app, "/models/cnn-a-mnist/filters/conv2?format=npy").await;
    assert_eq!(parse_npy(&npy).0, [64, 32, 3, 3]);

    // The whole model: a sheet, and statistics that agree with the layer itself.
    let cat = store_input(&app, "data/cifar10/samples/test0000_cat.png").await;
    let (s, ct, png) = get_bytes(
        &app,
        &format!("/models/resnet20-cifar10/activations?input={cat}"),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    let sheet = decode_png(&png);
    assert!(
        sheet.width() > 800 && sheet.height() > 1000,
        "{:?}",
        sheet.dimensions()
    );
    let (_, stats) = app
        .get_json(&format!(
            "/models/resnet20-cifar10/activations?input={cat}&format=json"
        ))
        .await;
    let rows = stats["layers"].as_array().unwrap();
    assert_eq!(rows.len(), 63, "every named layer of ResNet-20");
    let fx = fixture("resnet20_activations.json");
    for name in ["conv1", "layer2.0", "layer3"] {
        let row = rows.iter().find(|r| r["name"] == name).unwrap();
        let f = fx["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap();
        let mean = f["sum"].as_f64().unwrap() / f["count"].as_f64().unwrap();
        let rms = (f["sumsq"].as_f64().unwrap() / f["count"].as_f64().unwrap()).sqrt();
        assert!(
            (row["mean"].as_f64().unwrap() - mean).abs() < 1e-4 * rms,
            "{name} mean"
        );
        let std = (rms * rms - mean * mean).sqrt();
        assert!(
            (row["std"].as_f64().unwrap() - std).abs() < 1e-4 * rms,
            "{name} std"
        );
    }
    let relu = rows.iter().find(|r| r["name"] == "layer3").unwrap();
    assert!(
        relu["zero_fraction"].as_f64().unwrap() > 0.0,
        "a ReLU output has zeros"
    );
    assert!(relu["min"].as_f64().unwrap() >= 0.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inspection_errors_say_what_to_fix() {
    let dir = models_dir(&["cnn-a-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    let png = std::fs::read(repo().join("data/mnist/samples/test0000_digit7.png")).unwrap();
    let id = store_input(&app, "data/mnist/samples/test0000_digit7.png").await;
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(&png)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(id, want, "input ids are the SHA-256 of the bytes");
    assert_eq!(
        store_input(&app, "data/mnist/samples/test0000_digit7.png").await,
        id,
        "content-addressed"
    );

    let check = |(s, _ct, b): (u16, String, Vec<u8>), status: u16, needle: &str| {
        let body: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(s, status, "{body}");
        assert!(
            body["detail"].as_str().unwrap_or("").contains(needle),
            "{body} should mention {needle:?}"
        );
    };
    check(
        get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv9?input={id}"),
        )
        .await,
        404,
        "conv1, pool1, relu1, conv2",
    );
    check(
        get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv2?input={id}&channels=999"),
        )
        .await,
        400,
        "the layer has 64 channels",
    );
    check(
        get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv2?input={id}&colormap=rainbow"),
        )
        .await,
        400,
        "colormap",
    );
    check(
        get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv2?input={id}&scale=0"),
        )
        .await,
        400,
        "scale",
    );
    check(
        get_bytes(
            &app,
            &format!("/models/cnn-a-mnist/activations/conv2?input={id},{id}"),
        )
        .await,
        400,
        "one image",
    );
    check(
        get_bytes(&app, "/models/cnn-a-mnist/activations/conv2?input=0000").await,
        404,
        "POST the image to /inputs",
    );
    check(
        get_bytes(&app, "/models/cnn-a-mnist/activations/conv2").await,
        400,
        "?input=",
    );
    check(
        get_bytes(&app, "/models/cnn-a-mnist/filters/pool1").await,
        400,
        "convolution layers: conv1, conv2",
    );
    check(
        get_bytes(&app, "/models/cnn-a-mnist/filters/nope").await,
        404,
        "conv2",
    );
    check(
        get_bytes(&app, "/models/cnn-a-mnist/filters/conv2?in_channel=32").await,
        400,
        "0..32",
    );
    let r = app
        .post_images(
            "/models/cnn-a-mnist/embeddings?metrics=mse,manhattan",
            &[&png, &png],
        )
        .await;
    check(
        (
            r.status().as_u16(),
            String::new(),
            r.bytes().await.unwrap().to_vec(),
        ),
        400,
        "unknown metric",
    );
    let r = app
        .post_images("/models/cnn-a-mnist/embeddings?labels=6", &[&png, &png])
        .await;
    check(
        (
            r.status().as_u16(),
            String::new(),
            r.bytes().await.unwrap().to_vec(),
        ),
        422,
        "1 labels for 2 images",
    );
    let r = app
        .post_images("/inputs", &[b"not an image".as_slice()])
        .await;
    check(
        (
            r.status().as_u16(),
            String::new(),
            r.bytes().await.unwrap().to_vec(),
        ),
        422,
        "cannot decode",
    );
    app.assert_healthy().await;
    app.stop().await;
}
