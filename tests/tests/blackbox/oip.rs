//! The Open Inference Protocol (KServe v2) over real HTTP, written by hand
//! from the protocol (CI also drives it with the official tritonclient:
//! tests/interop/tritonclient_test.py): JSON and binary tensor data, BYTES
//! images and FP32 tensors giving `/predict`'s logits, and errors shaped
//! `{"error"}` with the API's limits and key applied.

use base64::Engine;
use convscope_tests::*;
use serde_json::{Value, json};

const MODEL: &str = "resnet20-cifar10";

fn samples(n: usize) -> Vec<Vec<u8>> {
    let dir = repo().join("data/cifar10/samples");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .take(n)
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The model's FP32 input for `images`, made by model-store's own
/// preprocessing (what `/predict` feeds the network).
fn preprocessed(images: &[Vec<u8>]) -> Vec<f32> {
    let manifest = model_store::Manifest::from_json(
        &std::fs::read(repo().join("models/resnet20-cifar10.json")).unwrap(),
    )
    .expect("the bundled manifest reads");
    images
        .iter()
        .flat_map(|bytes| {
            let img = model_store::preprocess::decode(bytes, Default::default()).unwrap();
            model_store::preprocess::preprocess(&img, &manifest).unwrap()
        })
        .collect()
}

async fn predict_logits(app: &TestApp, images: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let r = app
        .post_images(&format!("/models/{MODEL}/predict?top_k=10"), images)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(logits_by_class)
        .collect()
}

/// A binary-extension body: the JSON header, then `binary`.
fn binary_body(header: &Value, binary: &[u8]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let n = body.len();
    body.extend_from_slice(binary);
    (body, n)
}

/// POSTs a binary-extension body whose JSON header is `n` bytes.
async fn post_binary(app: &TestApp, url: &str, body: Vec<u8>, n: usize) -> reqwest::Response {
    app.client
        .post(url)
        .header("Inference-Header-Content-Length", n)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The answer's `Inference-Header-Content-Length`.
fn answer_header_length(r: &reqwest::Response) -> usize {
    r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Splits a binary answer into its JSON and the named outputs' FP32 rows.
fn read_binary_answer(body: &[u8], header_length: usize) -> (Value, Vec<(String, Vec<f32>)>) {
    let json: Value = serde_json::from_slice(&body[..header_length]).unwrap();
    let mut rest = &body[header_length..];
    let mut outputs = Vec::new();
    for o in json["outputs"].as_array().unwrap() {
        let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let values = rest[..size]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        outputs.push((o["name"].as_str().unwrap().to_string(), values));
        rest = &rest[size..];
    }
    assert!(rest.is_empty(), "bytes after the last output");
    (json, outputs)
}

#[tokio::test(flavor = "multi_thread")]
async fn images_and_tensors_give_predicts_logits_in_json_and_binary() {
    let dir = models_dir(&[MODEL]);
    let app = TestApp::spawn(dir.path()).await;
    let images = samples(3);
    let want = predict_logits(&app, &images).await;
    let want_flat: Vec<f32> = want.iter().flatten().copied().collect();
    let url = app.url(&format!("/v2/models/{MODEL}/infer"));

    // BYTES images as base64 JSON; FP32 as JSON numbers; both all-JSON answers.
    let b64: Vec<String> = images
        .iter()
        .map(|i| base64::engine::general_purpose::STANDARD.encode(i))
        .collect();
    let x = preprocessed(&images);
    for input in [
        json!({"name": "image", "datatype": "BYTES", "shape": [3], "data": b64}),
        json!({"name": "input", "datatype": "FP32", "shape": [3, 3, 32, 32], "data": x}),
    ] {
        let r = app
            .client
            .post(&url)
            .json(&json!({"id": "req-1", "inputs": [input]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["id"], "req-1");
        assert_eq!(body["model_name"], MODEL);
        assert_eq!(body["model_version"], "1");
        let logits = &body["outputs"][0];
        assert_eq!(logits["name"], "logits");
        assert_eq!(logits["datatype"], "FP32");
        assert_eq!(logits["shape"], json!([3, 10]));
        assert_close(&f32s(&logits["data"]), &want_flat, 1e-6, "JSON logits");
        let probabilities = f32s(&body["outputs"][1]["data"]);
        for (row, p) in want.iter().zip(probabilities.chunks(10)) {
            let softmax = model_store::inspect::predict::probabilities(row);
            let softmax: Vec<f32> = softmax.iter().map(|&v| v as f32).collect();
            assert_close(p, &softmax, 1e-6, "JSON probabilities");
        }
    }

    // The binary extension: FP32 after the JSON header, outputs after the
    // answer's header, only the one asked for.
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (body, n) = binary_body(
        &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 3, 32, 32],
                 "parameters": {"binary_data_size": raw.len()}}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}),
        &raw,
    );
    let r = post_binary(&app, &url, body, n).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let header_length = answer_header_length(&r);
    let bytes = r.bytes().await.unwrap();
    let (json, outputs) = read_binary_answer(&bytes, header_length);
    assert_eq!(json["outputs"][0]["shape"], json!([3, 10]));
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].0, "logits");
    assert_close(&outputs[0].1, &want_flat, 1e-6, "binary logits");

    // BYTES images as length-prefixed binary elements, all outputs binary.
    let raw: Vec<u8> = images
        .iter()
        .flat_map(|i| {
            (i.len() as u32)
                .to_le_bytes()
                .into_iter()
                .chain(i.iter().copied())
        })
        .collect();
    let (body, n) = binary_body(
        &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                 "parameters": {"binary_data_size": raw.len()}}],
                "parameters": {"binary_data_output": true}}),
        &raw,
    );
    let r = post_binary(
        &app,
        &app.url(&format!("/v2/models/{MODEL}/versions/1/infer")),
        body,
        n,
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
    let header_length = answer_header_length(&r);
    let (_, outputs) = read_binary_answer(&r.bytes().await.unwrap(), header_length);
    assert_eq!(
        outputs.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["logits", "probabilities"]
    );
    assert_close(&outputs[0].1, &want_flat, 1e-6, "binary BYTES logits");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_health_and_errors_follow_the_protocol() {
    let dir = models_dir(&[MODEL]);
    let mut settings = convscope::Settings::for_tests(dir.path());
    settings.max_batch = 2;
    let app = TestApp::spawn_with(settings).await;
    let (status, server) = app.get_json("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(server["name"], "convscope");
    assert_eq!(
        server["extensions"],
        json!(["binary_tensor_data", "classification"])
    );
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        &format!("/v2/models/{MODEL}/ready"),
        &format!("/v2/models/{MODEL}/versions/1/ready"),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let (status, meta) = app.get_json(&format!("/v2/models/{MODEL}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
               {"name": "image", "datatype": "BYTES", "shape": [-1]}])
    );

    let url = app.url(&format!("/v2/models/{MODEL}/infer"));
    let image = base64::engine::general_purpose::STANDARD.encode(&samples(1)[0]);
    let cases: Vec<(String, Vec<u8>, u16, &str)> = vec![
        (url.clone(), b"{not json".to_vec(), 400, "not valid JSON"),
        (
            url.clone(),
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": vec![0.0; 784]}]}).to_string().into_bytes(),
            400,
            "[N, 3, 32, 32]",
        ),
        (
            url.clone(),
            json!({"inputs": [{"name": "input", "datatype": "FP16", "shape": [1, 3, 32, 32], "data": [0]}]}).to_string().into_bytes(),
            400,
            "it takes FP32",
        ),
        (
            url.clone(),
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [&image, &image, &image]}]}).to_string().into_bytes(),
            413,
            "--max-batch",
        ),
        (
            url.clone(),
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}).to_string().into_bytes(),
            422,
            "image",
        ),
        (
            app.url("/v2/models/no-such-model/infer"),
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [&image]}]}).to_string().into_bytes(),
            404,
            "no-such-model",
        ),
        (
            app.url(&format!("/v2/models/{MODEL}/versions/7/infer")),
            json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [&image]}]}).to_string().into_bytes(),
            404,
            "no version '7'",
        ),
    ];
    for (url, body, status, contains) in cases {
        let r = app.client.post(&url).body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{url} {contains}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: Value = r.json().await.unwrap();
        let error = body["error"].as_str().expect("an `error` string");
        assert!(error.contains(contains), "{error:?} lacks {contains:?}");
    }
    // An unknown path and a wrong method under /v2 answer the protocol's way.
    let r = app
        .client
        .get(app.url("/v2/repository/index"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    app.assert_healthy().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_guards_inference_but_never_health() {
    let dir = models_dir(&[MODEL]);
    let mut settings = convscope::Settings::for_tests(dir.path());
    settings.api_key = Some("s3cret".into());
    settings.protect_reads = true;
    let app = TestApp::spawn_with(settings).await;
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let url = app.url(&format!("/v2/models/{MODEL}/infer"));
    let image = base64::engine::general_purpose::STANDARD.encode(&samples(1)[0]);
    let body =
        json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]});
    let r = app.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    let r = app
        .client
        .post(&url)
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    app.stop().await;
}
