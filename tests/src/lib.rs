//! Helpers for the black-box tests: start the real server on 127.0.0.1:0
//! with a models directory of our choosing, talk to it over HTTP, and read
//! the real datasets and PyTorch fixtures committed in the repository.

use std::path::{Path, PathBuf};

use convscope::{Application, Settings};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A server running in this process, reached over real HTTP.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A plain HTTP client.
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    /// Builds and starts the server on an OS-chosen port.
    pub async fn spawn(models: &Path) -> TestApp {
        Self::spawn_with(Settings::for_tests(models)).await
    }

    /// Same, with explicit settings.
    pub async fn spawn_with(settings: Settings) -> TestApp {
        let app = Application::build(settings).await.expect("server builds");
        let base = format!("http://{}", app.local_addr());
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        TestApp {
            base,
            client: reqwest::Client::new(),
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the server and waits until it has shut down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GET, returning status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET: the body as text (`/metrics`).
    pub async fn get_text(&self, path: &str) -> String {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// `POST /jobs/{id}/cancel`: status and JSON answer.
    pub async fn cancel_job(&self, id: &str) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(&format!("/jobs/{id}/cancel")))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST images as repeated multipart `image` fields.
    pub async fn post_images<I: AsRef<[u8]>>(&self, path: &str, images: &[I]) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new();
        for (i, img) in images.iter().enumerate() {
            form = form.part(
                "image",
                reqwest::multipart::Part::bytes(img.as_ref().to_vec())
                    .file_name(format!("image{i}.png")),
            );
        }
        self.client
            .post(self.url(path))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// POST images and parse the JSON answer, asserting 200.
    pub async fn post_images_json<I: AsRef<[u8]>>(&self, path: &str, images: &[I]) -> Value {
        let r = self.post_images(path, images).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "POST {path}: {body}");
        body
    }

    /// `POST /jobs` with a JSON body: status and JSON answer.
    pub async fn submit_job(&self, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url("/jobs"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls `GET /jobs/{id}` until `done` holds, panicking after `limit`.
    pub async fn wait_for_job(
        &self,
        id: &str,
        limit: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = std::time::Instant::now();
        loop {
            let (status, job) = self.get_json(&format!("/jobs/{id}")).await;
            assert_eq!(status, 200, "{job}");
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < limit,
                "job {id} did not get there in {limit:?}: {job}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Asserts the server still answers `/healthz`.
    pub async fn assert_healthy(&self) {
        let (status, body) = self.get_json("/healthz").await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Asserts a problem+json body: its status, and that `detail` mentions
/// `detail_contains`.
pub fn assert_problem(status: u16, body: &Value, want_status: u16, detail_contains: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["status"].as_u64(), Some(want_status as u64), "{body}");
    assert!(
        body["type"].is_string() && body["title"].is_string(),
        "{body}"
    );
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} should mention {detail_contains:?}"
    );
}

/// Status and JSON body of an error answer, asserting it is problem+json.
pub async fn problem(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        ct.as_deref(),
        Some("application/problem+json"),
        "status {status}"
    );
    (status, r.json().await.unwrap())
}

/// Status and JSON body (null when empty); an error must be problem+json.
pub async fn problem_or_json(r: reqwest::Response) -> (u16, Value) {
    if r.status().as_u16() >= 400 {
        return problem(r).await;
    }
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The multipart body of `POST /models`.
pub fn model_form(manifest: &Value, weights: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::bytes(manifest.to_string().into_bytes()).file_name("m.json"),
        )
        .part(
            "weights",
            reqwest::multipart::Part::bytes(weights).file_name("w.safetensors"),
        )
}

/// Whether a job has ended (succeeded, failed or cancelled).
pub fn job_is_final(job: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
}

/// A temporary models directory holding copies of the named bundled models
/// (from `models/`) or test-only models (from `data/models/`).
pub fn models_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let src = [repo().join("models"), repo().join("data/models")]
            .into_iter()
            .find(|d| d.join(format!("{name}.json")).exists())
            .unwrap_or_else(|| panic!("no model {name}"));
        for ext in ["json", "safetensors"] {
            std::fs::copy(
                src.join(format!("{name}.{ext}")),
                dir.path().join(format!("{name}.{ext}")),
            )
            .unwrap();
        }
    }
    dir
}

/// Lossless PNG of an 8-bit image (1 or 3 channels, HWC interleaved).
pub fn png(width: u32, height: u32, channels: u8, pixels: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let ct = if channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(pixels, width, height, ct)
        .unwrap();
    out
}

/// CIFAR-10 test images `range` from the committed first-1000 binary, as
/// PNG files with their labels.
pub fn cifar_test(range: std::ops::Range<usize>) -> Vec<(Vec<u8>, usize)> {
    let bytes = std::fs::read(repo().join("data/cifar10/cifar10_test_first1000.bin")).unwrap();
    range
        .map(|i| {
            let rec = &bytes[i * 3073..(i + 1) * 3073];
            let planes = &rec[1..];
            let hwc: Vec<u8> = (0..1024)
                .flat_map(|p| [planes[p], planes[1024 + p], planes[2048 + p]])
                .collect();
            (png(32, 32, 3, &hwc), rec[0] as usize)
        })
        .collect()
}

fn idx(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut data)
        .unwrap();
    let ndim = data[3] as usize;
    data.split_off(4 + 4 * ndim)
}

/// MNIST test images `range`, as PNG files with their labels.
pub fn mnist_test(range: std::ops::Range<usize>) -> Vec<(Vec<u8>, usize)> {
    let images = idx(&repo().join("data/mnist/t10k-images-idx3-ubyte.gz"));
    let labels = idx(&repo().join("data/mnist/t10k-labels-idx1-ubyte.gz"));
    range
        .map(|i| {
            (
                png(28, 28, 1, &images[i * 784..(i + 1) * 784]),
                labels[i] as usize,
            )
        })
        .collect()
}

/// Reads a little-endian float32 `.npy` file: `(shape, data)`.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    parse_npy(&std::fs::read(path).unwrap())
}

/// Parses `.npy` bytes (version 1.0, little-endian float32, C order) as
/// NumPy would, asserting the header's dtype and order.
pub fn parse_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert_eq!(&bytes[6..8], b"\x01\x00", "version 1.0");
    assert_eq!((10 + len) % 64, 0, "header padded to 64 bytes");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape = shape_of(header);
    let count: usize = shape.iter().product();
    assert_eq!(
        bytes.len() - 10 - len,
        count * 4,
        "data length matches the shape"
    );
    let data = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

fn shape_of(header: &str) -> Vec<usize> {
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

/// Asserts `|got − want| ≤ tol · max(|want|, 1)` element-wise: relative
/// tolerance, absolute near zero.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_close_with_floor(got, want, tol, 1.0, what);
}

/// For intermediate layers: relative tolerance, where "near zero" is judged
/// on the tensor's own scale, `|got − want| ≤ tol · max(|want|, rms(want))`.
/// A residual sum of two terms of magnitude ~30 that nearly cancel carries
/// float32 rounding of the terms, not of the small result; the logits of the
/// same network still meet the plain 1e-4 relative bound.
pub fn assert_close_layer(got: &[f32], want: &[f32], tol: f32, what: &str) {
    let rms =
        (want.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    assert_close_with_floor(got, want, tol, (rms as f32).max(1.0), what);
}

/// Element-wise `|got − want| ≤ tol · max(|want|, floor)`.
pub fn assert_close_with_floor(got: &[f32], want: &[f32], tol: f32, floor: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(floor);
        // NaN must count as the worst error.
        if err.is_nan() || err > worst.1 {
            worst = (i, err);
        }
    }
    assert!(
        worst.1 <= tol,
        "{what}: element {} is {} but PyTorch gives {} (scaled error {:e} > {tol:e})",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1
    );
}

/// The logits of each image in a predict response asked with
/// `top_k = num_classes`, back in class order.
pub fn logits_by_class(prediction: &Value) -> Vec<f32> {
    let top = prediction["top_k"].as_array().unwrap();
    let mut out = vec![f32::NAN; top.len()];
    for c in top {
        out[c["class_index"].as_u64().unwrap() as usize] = c["logit"].as_f64().unwrap() as f32;
    }
    out
}

/// Weights as `tools/golden/torchvision_hash.py` derives them from
/// (tensor name, element index): FNV-1a of the name, splitmix64, the top 53
/// bits as a uniform in [0, 1), scaled per tensor kind in f64, rounded to f32.
pub fn hash_tensor(name: &str, shape: &[usize], is_bn: bool) -> Vec<f32> {
    let mut seed: u64 = 0xCBF29CE484222325;
    for b in name.bytes() {
        seed = (seed ^ b as u64).wrapping_mul(0x100000001B3);
    }
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap();
    let fan_in: usize = shape.iter().skip(1).product();
    (0..n as u64)
        .map(|i| {
            let mut x = (seed ^ i).wrapping_add(0x9E3779B97F4A7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
            x ^= x >> 31;
            let u = (x >> 11) as f64 * 2f64.powi(-53);
            let v = match leaf {
                "weight" if shape.len() >= 2 => (2.0 * u - 1.0) * (6.0 / fan_in as f64).sqrt(),
                "weight" => 0.5 + u,
                "bias" => (2.0 * u - 1.0) * if is_bn { 0.2 } else { 0.1 },
                "running_mean" => (2.0 * u - 1.0) * 0.2,
                "running_var" => 0.5 + u,
                // Any other learned tensor (ConvNeXt's layer_scale): a scale.
                _ => 0.5 + u,
            };
            v as f32
        })
        .collect()
}

/// A safetensors file of float32 tensors (the format is an 8-byte header
/// length, a JSON header, then the raw little-endian data).
pub fn safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let end = offset + data.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Writes the hash-weight model of a fixture (`tests/fixtures/torchvision/<key>.json`)
/// into `dir` and returns the fixture.
pub fn write_hash_model(dir: &Path, key: &str) -> Value {
    write_hash_model_with(dir, key, |_| {})
}

/// Same, letting the caller edit the manifest first (name, input size).
pub fn write_hash_model_with(dir: &Path, key: &str, edit: impl FnOnce(&mut Value)) -> Value {
    write_hash_fixture(dir, &format!("tests/fixtures/torchvision/{key}.json"), edit)
}

/// A torchvision model (`resnet18`, `vgg11`, `alexnet`) with hash weights,
/// named `name`, for a square input of `input` pixels.
pub fn write_hash_torchvision(dir: &Path, key: &str, name: &str, input: usize) {
    let edit = |m: &mut Value| {
        m["name"] = serde_json::json!(name);
        m["input"]["height"] = serde_json::json!(input);
        m["input"]["width"] = serde_json::json!(input);
    };
    if key == "alexnet" {
        // AlexNet's tensor list is kept with the inspection fixtures.
        let lists: Value = serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures/inspection/torchvision_tensors.json"))
                .unwrap(),
        )
        .unwrap();
        let tensors: Vec<Value> = lists["alexnet"]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| serde_json::json!([t[0], t[1], false]))
            .collect();
        let mut fixture = serde_json::json!({
            "manifest": {"name": name, "architecture": "torchvision.alexnet",
                "input": {"channels": 3, "height": input, "width": input,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
            "tensors": tensors,
        });
        edit(&mut fixture["manifest"]);
        write_hash_value(dir, &fixture);
    } else {
        write_hash_model_with(dir, key, edit);
    }
}

/// A model from a fixture file holding `manifest` and `tensors`
/// (`[name, shape, is_batch_norm]`), with hash weights.
pub fn write_hash_fixture(dir: &Path, fixture_path: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut fixture: Value =
        serde_json::from_slice(&std::fs::read(repo().join(fixture_path)).unwrap()).unwrap();
    edit(&mut fixture["manifest"]);
    write_hash_value(dir, &fixture);
    fixture
}

/// A JSON array of numbers, as f32.
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of sizes.
pub fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// The hash-derived tensors of a fixture's `tensors` list (`[name, shape,
/// is_batch_norm]`), each drawn from the hash of `seed(name)` (the name
/// itself for the fixture's own weights).
pub fn hash_tensors(
    fixture: &Value,
    seed: impl Fn(&str) -> String,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fixture["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t[0].as_str().unwrap().to_string();
            let shape = dims(&t[1]);
            let data = hash_tensor(&seed(&name), &shape, t[2].as_bool().unwrap());
            (name, shape, data)
        })
        .collect()
}

fn write_hash_value(dir: &Path, fixture: &Value) {
    let tensors = hash_tensors(fixture, str::to_string);
    let name = fixture["manifest"]["name"].as_str().unwrap();
    std::fs::write(
        dir.join(format!("{name}.safetensors")),
        safetensors(&tensors),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        fixture["manifest"].to_string(),
    )
    .unwrap();
}
