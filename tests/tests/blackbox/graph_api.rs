//! Any PyTorch CNN over HTTP: a `graph` manifest as the exporter writes it
//! registers with `POST /models` and every inspection works on it; `.pth`
//! weights (real `torch.save` files, tools/golden/pth_fixtures.py) register
//! for every architecture; what cannot be read is a 422 that says how to
//! fix it, and the server keeps serving.

use convscope_tests::*;
use serde_json::{Value, json};

use super::graph_fidelity::hash_weights;

fn fixture(key: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(repo().join(format!("tests/fixtures/graph/{key}.json"))).unwrap(),
    )
    .unwrap()
}

async fn upload(app: &TestApp, manifest: &Value, weights: Vec<u8>) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(manifest, weights))
        .send()
        .await
        .unwrap();
    problem_or_json(r).await
}

async fn logits(app: &TestApp, model: &str, image: &[u8], classes: usize) -> Vec<f32> {
    let out = app
        .post_images_json(
            &format!("/models/{model}/predict?top_k={classes}"),
            &[image],
        )
        .await;
    logits_by_class(&out["predictions"][0])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_student_graph_registers_and_every_inspection_works_on_its_nodes() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let fx = fixture("student_net");
    let (status, body) = upload(&app, &fx["manifest"], hash_weights(&fx)).await;
    assert_eq!(status, 201, "{body}");
    let name = fx["manifest"]["name"].as_str().unwrap();
    let image = std::fs::read(repo().join(fx["image"].as_str().unwrap())).unwrap();

    // Logits through the real preprocessing, within 1e-4 of PyTorch.
    let got = logits(&app, name, &image, 10).await;
    assert_close_layer(
        &got,
        &f32s(&fx["logits"]),
        1e-4,
        "student_net logits over HTTP",
    );

    // The summary lists module nodes, functional nodes and container aliases.
    let (status, detail) = app.get_json(&format!("/models/{name}")).await;
    assert_eq!(status, 200, "{detail}");
    let layers = detail["layers"].as_array().unwrap();
    let kind = |n: &str| {
        layers
            .iter()
            .find(|l| l["name"] == n)
            .unwrap_or_else(|| panic!("no layer {n} in {detail}"))["kind"]
            .clone()
    };
    assert_eq!(kind("inception.b3.2"), json!("conv2d"));
    assert_eq!(kind("cat"), json!("cat"));
    assert_eq!(kind("inception"), json!("block"));
    assert_eq!(kind("res"), json!("block"));
    assert_eq!(kind("mul"), json!("mul"));
    assert_eq!(detail["architecture"], json!("graph"));

    // Activations of a functional node (torch.cat) and of a container, as npy.
    for layer in ["cat", "res"] {
        let r = app
            .post_images(
                &format!("/models/{name}/activations/{layer}?format=npy"),
                &[&image],
            )
            .await;
        assert_eq!(r.status().as_u16(), 200, "{layer}");
        let (shape, data) = parse_npy(&r.bytes().await.unwrap());
        let want = &fx["nodes"][layer];
        assert_eq!(
            &shape[1..],
            f32s(&want["shape"])
                .iter()
                .map(|&d| d as usize)
                .collect::<Vec<_>>()
                .as_slice()
        );
        let rms = want["rms"].as_f64().unwrap();
        for s in want["samples"].as_array().unwrap() {
            let (i, w) = (s[0].as_u64().unwrap() as usize, s[1].as_f64().unwrap());
            assert!(
                (data[i] as f64 - w).abs() <= 1e-4 * w.abs().max(rms),
                "{layer}[{i}] = {}, PyTorch {w}",
                data[i]
            );
        }
    }

    // Grad-CAM: the default layer is the last 4-D node before global pooling.
    let r = app
        .post_images(&format!("/models/{name}/gradcam?output=json"), &[&image])
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let cam: Value = r.json().await.unwrap();
    assert_eq!(cam["layer"], fx["gradcam"]["default_layer"], "{cam}");
    // ...and any 4-D node can be asked for, a container included.
    let r = app
        .post_images(
            &format!("/models/{name}/gradcam?output=json&layer=res"),
            &[&image],
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let cam: Value = r.json().await.unwrap();
    let (got, want) = (
        f32s(&cam["cam"].as_array().unwrap().concat_rows()),
        f32s(&fx["gradcam"]["cam"]),
    );
    assert!(
        pearson(&got, &want) >= 0.999,
        "Grad-CAM at res against pytorch-grad-cam"
    );

    // Filters of a conv inside a block; embeddings at a functional node.
    let (status, filters) = app
        .get_json(&format!("/models/{name}/filters/inception.b1?format=json"))
        .await;
    assert_eq!(status, 200, "{filters}");
    let r = app
        .post_images(
            &format!("/models/{name}/embeddings?layer=add"),
            &[&image, &image],
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    app.stop().await;
}

trait Rows {
    fn concat_rows(&self) -> Value;
}

impl Rows for Vec<Value> {
    /// `cam` comes back as rows; flatten them in order.
    fn concat_rows(&self) -> Value {
        Value::Array(
            self.iter()
                .flat_map(|r| r.as_array().cloned().unwrap_or_else(|| vec![r.clone()]))
                .collect(),
        )
    }
}

fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        ab += dx * dy;
        aa += dx * dx;
        bb += dy * dy;
    }
    ab / (aa * bb).sqrt()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_that_the_weights_do_not_reproduce_is_refused_with_the_difference() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let fx = fixture("mobilenet_v2");
    // The same tensors drawn from another seed: every name hashed with a suffix.
    let mut other = fx.clone();
    let tensors = hash_tensors(&fx, |name| format!("seed2.{name}"));
    other["manifest"]["name"] = json!("mobilenet-v2-other-seed");
    let (status, body) = upload(&app, &other["manifest"], safetensors(&tensors)).await;
    assert_problem(status, &body, 422, "largest |Δlogit|");
    assert!(
        body["detail"].as_str().unwrap().contains("tolerance"),
        "{body}"
    );
    let (_, models) = app.get_json("/models").await;
    assert!(models["models"].as_array().unwrap().is_empty(), "{models}");
    // The right weights register.
    let (status, body) = upload(&app, &fx["manifest"], hash_weights(&fx)).await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pth_weights_give_the_same_logits_as_their_safetensors() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    // The bundled CNN_A, as torch.save(state_dict) wrote it.
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(repo().join("models/cnn-a-mnist.json")).unwrap())
            .unwrap();
    let st = std::fs::read(repo().join("models/cnn-a-mnist.safetensors")).unwrap();
    let pth = std::fs::read(repo().join("tests/fixtures/pth/cnn_a.pth")).unwrap();
    manifest["name"] = json!("cnn-a-st");
    assert_eq!(upload(&app, &manifest, st).await.0, 201);
    manifest["name"] = json!("cnn-a-pth");
    let (status, body) = upload(&app, &manifest, pth).await;
    assert_eq!(status, 201, "{body}");
    for (png, _) in mnist_test(0..3) {
        let a = logits(&app, "cnn-a-st", &png, 10).await;
        let b = logits(&app, "cnn-a-pth", &png, 10).await;
        assert_eq!(
            a, b,
            "the .pth and the safetensors give the same logits, bit for bit"
        );
    }
    // It is stored as safetensors.
    assert!(dir.path().join("cnn-a-pth.safetensors").exists());

    // A plain state_dict and a training checkpoint ({"epoch", "state_dict"
    // with `module.` names, "optimizer"}) both match PyTorch's logits.
    let tiny: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/pth/tiny.json")).unwrap(),
    )
    .unwrap();
    let image = std::fs::read(repo().join(tiny["image"].as_str().unwrap())).unwrap();
    for (i, file) in ["tiny_state_dict.pth", "tiny_checkpoint.pth"]
        .iter()
        .enumerate()
    {
        let mut m = tiny["manifest"].clone();
        m["name"] = json!(format!("tiny-{i}"));
        let bytes = std::fs::read(repo().join("tests/fixtures/pth").join(file)).unwrap();
        let (status, body) = upload(&app, &m, bytes).await;
        assert_eq!(status, 201, "{file}: {body}");
        let got = logits(&app, &format!("tiny-{i}"), &image, 3).await;
        assert_close(&got, &f32s(&tiny["logits"]), 1e-5, file);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_pth_files_are_refused_with_how_to_fix_them() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let tiny: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/pth/tiny.json")).unwrap(),
    )
    .unwrap();
    let cases = [
        ("tiny_legacy.pth", "legacy (non-zip) PyTorch pickle"),
        ("tiny_script.pt", "TorchScript"),
        ("tiny_missing.pth", "cannot be read"),
        ("tiny_int64.pth", "tensor '0.weight' has dtype I64"),
    ];
    for (file, says) in cases {
        let mut m = tiny["manifest"].clone();
        m["name"] = json!("tiny-bad");
        let bytes = std::fs::read(repo().join("tests/fixtures/pth").join(file)).unwrap();
        let (status, body) = upload(&app, &m, bytes).await;
        assert_problem(status, &body, 422, says);
    }
    let (_, models) = app.get_json("/models").await;
    assert!(models["models"].as_array().unwrap().is_empty(), "{models}");
    assert_eq!(app.get_json("/healthz").await.0, 200);
    // Nothing was left on disk.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(files.is_empty(), "{files:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_exporter_is_served_as_it_is_in_the_repository() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let r = app.client.get(app.url("/export.py")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/x-python"),
        "{:?}",
        r.headers()
    );
    let body = r.bytes().await.unwrap();
    assert_eq!(
        body.as_ref(),
        std::fs::read(repo().join("tools/export/convscope_export.py"))
            .unwrap()
            .as_slice()
    );
    app.stop().await;
}

/// The built-in architectures are lowered to the same graph IR as `graph`
/// manifests: their layer tables (names, kinds, shapes, parameters,
/// receptive fields, MACs, in hook order) are what the module-tree
/// interpreter gave before (tests/fixtures/summaries, written by it).
#[tokio::test(flavor = "multi_thread")]
async fn the_built_in_architectures_keep_their_layer_tables() {
    let names = [
        "captum-cifar-net",
        "cnn-a-mnist",
        "cnn-a-mnist-convscope",
        "mobilenet-v1-0.25-128",
        "resnet20-cifar10",
        "resnet32-cifar10",
        "resnet44-cifar10",
        "resnet56-cifar10",
    ];
    let dir = models_dir(&names);
    let app = TestApp::spawn(dir.path()).await;
    for name in names {
        let want: Value = serde_json::from_slice(
            &std::fs::read(repo().join(format!("tests/fixtures/summaries/{name}.json"))).unwrap(),
        )
        .unwrap();
        let (status, got) = app.get_json(&format!("/models/{name}")).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["layers"], want["layers"], "{name}");
        for key in [
            "total_params",
            "total_macs",
            "param_mib",
            "activation_mib",
            "classes",
        ] {
            assert_eq!(got[key], want[key], "{name}: {key}");
        }
    }
    app.stop().await;
}

/// The bundled ResNet-20 exported from its own PyTorch code (option-A
/// shortcuts as `F.pad(x[:, :, ::2, ::2])`, `F.avg_pool2d(out,
/// out.size()[3])`) with the bundled weights: the same predictions as the
/// built-in architecture on real CIFAR-10 images, and the same maps at the
/// layers both name.
#[tokio::test(flavor = "multi_thread")]
async fn resnet20_exported_from_its_pytorch_code_serves_what_the_built_in_serves() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/graph/resnet20_cifar10_graph.json")).unwrap(),
    )
    .unwrap();
    let weights = std::fs::read(repo().join("models/resnet20-cifar10.safetensors")).unwrap();
    let (status, body) = upload(&app, &manifest, weights).await;
    assert_eq!(status, 201, "{body}");
    for (png, label) in cifar_test(0..8) {
        let a = logits(&app, "resnet20-cifar10", &png, 10).await;
        let b = logits(&app, "resnet20-cifar10-graph", &png, 10).await;
        assert_close(&b, &a, 1e-4, &format!("CIFAR image of class {label}"));
    }
    let png = &cifar_test(0..1)[0].0;
    for layer in ["layer2.0.shortcut", "layer3.2", "layer1.0.bn2"] {
        let mut maps = Vec::new();
        for model in ["resnet20-cifar10", "resnet20-cifar10-graph"] {
            let r = app
                .post_images(
                    &format!("/models/{model}/activations/{layer}?format=npy"),
                    &[png],
                )
                .await;
            assert_eq!(r.status().as_u16(), 200, "{model} {layer}");
            maps.push(parse_npy(&r.bytes().await.unwrap()));
        }
        assert_eq!(maps[0].0, maps[1].0, "{layer}: shapes");
        assert_close_layer(&maps[1].1, &maps[0].1, 1e-4, layer);
    }
    app.stop().await;
}

/// Graph manifests that cannot work are a 422 naming the node and what to
/// fix, before anything large is allocated; the server keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn broken_graph_manifests_are_refused_naming_the_node() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let conv = |extra: Value| {
        let mut n = json!({"name": "c", "op": "conv2d", "inputs": ["input"], "in_channels": 1,
            "out_channels": 2, "kernel_size": 3, "bias": false});
        for (k, v) in extra.as_object().unwrap() {
            n[k] = v.clone();
        }
        n
    };
    let weights = safetensors(&[("c.weight".to_string(), vec![2, 1, 3, 3], vec![0.5; 18])]);
    let flat = json!({"name": "f", "op": "flatten", "inputs": ["c"]});
    let cases = [
        (
            json!([conv(json!({})), {"name": "f", "op": "fft2", "inputs": ["c"]}]),
            "node 'f': unknown op \"fft2\"",
        ),
        (
            json!([conv(json!({})), {"name": "f", "op": "flatten", "inputs": ["nope"]}]),
            "input 'nope' is not an earlier node",
        ),
        (
            json!([conv(json!({})), conv(json!({}))]),
            "the name is used twice",
        ),
        (
            json!([conv(json!({"padding": 100000})), flat.clone()]),
            "more than the 268435456",
        ),
        (
            json!([conv(json!({"out_channels": 100000000})), flat.clone()]),
            "tensor 'c.weight' has shape [2, 1, 3, 3], expected [100000000, 1, 3, 3]",
        ),
        (
            json!([conv(json!({})), {"name": "a", "op": "add", "inputs": ["c"]}, flat.clone()]),
            "takes 2 input(s)",
        ),
        (json!([conv(json!({}))]), "must end in a flat vector"),
        (
            json!([conv(json!({"kernel_size": "big"})), flat.clone()]),
            "`kernel_size` must be an integer or [h, w]",
        ),
    ];
    for (nodes, says) in cases {
        let manifest = json!({"name": "broken", "architecture": "graph", "nodes": nodes,
            "input": {"channels": 1, "height": 8, "width": 8}});
        let (status, body) = upload(&app, &manifest, weights.clone()).await;
        assert_problem(status, &body, 422, says);
    }
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let (_, models) = app.get_json("/models").await;
    assert!(models["models"].as_array().unwrap().is_empty(), "{models}");
    app.stop().await;
}
