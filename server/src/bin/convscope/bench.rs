//! `convscope bench`: the model-level timings of `BENCHMARKS.md`, in the
//! release build, beside `tools/bench/forward.py` (the same cases in
//! PyTorch). Each case runs 3 warm-up iterations, then `runs` timed ones;
//! the median and the 90th percentile are printed, with the thread count
//! candle uses (set `RAYON_NUM_THREADS` to pin it).
//!
//! Weights: the bundled ResNet-20, MobileNet and CNN_A; torchvision
//! ResNet-18 freshly initialised (timing does not depend on the values).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;
use model_store::checkpoint::Checkpoint;
use model_store::inspect::{activations, attribution, grad_cam};
use model_store::train::net::{TrainNet, cross_entropy};
use model_store::train::optim::{Optimizer, OptimizerSpec};
use model_store::train::{self, Rng};
use model_store::{LoadedModel, Manifest};
use serde::Serialize;

/// One case's result.
#[derive(Debug, Serialize)]
pub(crate) struct Timing {
    /// Case name, shared with the PyTorch script.
    pub(crate) case: String,
    /// Median milliseconds per iteration.
    pub(crate) median_ms: f64,
    /// 90th percentile.
    pub(crate) p90_ms: f64,
    /// Images per iteration (per-image time = median / batch).
    pub(crate) batch: usize,
    /// Floating-point operations per iteration (2 per multiply-add of the
    /// model's layers), for forward passes: the rate against the peak.
    pub(crate) gflop: Option<f64>,
}

impl Timing {
    /// For a forward pass of `model` on `batch` images.
    fn forward_of(mut self, model: &LoadedModel) -> Self {
        self.gflop = Some(2.0 * model.network.total_macs() as f64 * self.batch as f64 / 1e9);
        self
    }

    /// GFLOP/s at the median.
    pub(crate) fn gflops(&self) -> Option<f64> {
        self.gflop.map(|g| g / (self.median_ms / 1e3))
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Times `f` as the server runs model work: on a thread of the rayon pool
/// (see `convscope::compute`).
fn time(
    case: &str,
    batch: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<(), Error> + Send,
) -> Result<Timing, Error> {
    let mut f = move || rayon::scope(|_| f());
    for _ in 0..3 {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let median = if runs % 2 == 1 {
        ms[runs / 2]
    } else {
        (ms[runs / 2 - 1] + ms[runs / 2]) / 2.0
    };
    Ok(Timing {
        case: case.to_string(),
        median_ms: median,
        p90_ms: ms[((runs - 1) as f64 * 0.9) as usize],
        batch,
        gflop: None,
    })
}

fn random(shape: &[usize], seed: u64) -> Result<Tensor, Error> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// torchvision ResNet-18 for 1000 classes, freshly initialised.
fn resnet18() -> Result<LoadedModel, Error> {
    let classes: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let manifest = serde_json::json!({
        "name": "resnet18-bench", "architecture": "torchvision.resnet18",
        "input": {"channels": 3, "height": 224, "width": 224}, "classes": classes,
    })
    .to_string();
    let parsed = Manifest::from_json(manifest.as_bytes())?;
    let mut ck = Checkpoint::fresh(&Device::Cpu, 0);
    let root = model_store::arch::build(&parsed, &mut ck)?;
    let network = model_store::Network::new(root, (3, 224, 224))?;
    let weights = train::safetensors_bytes(&TrainNet::new(&network, &[])?.state_dict()?)?;
    Ok(LoadedModel::from_bytes(
        manifest.as_bytes(),
        &weights,
        &Device::Cpu,
    )?)
}

/// `forward graph <name> <size> b1` and `b8` for every `graph` manifest in
/// `dir`, on a seeded random input of the manifest's size.
pub(crate) fn graph_models(dir: &Path, runs: usize) -> Result<Vec<Timing>, Error> {
    let mut manifests: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    manifests.sort();
    let mut out = Vec::new();
    for path in manifests {
        let model = LoadedModel::from_files(&path, &Device::Cpu)?;
        if !model.network.is_graph() {
            continue;
        }
        let (c, h, w) = model.network.input();
        for n in [1, 8] {
            let x = random(&[n, c, h, w], 1)?;
            let case = format!("forward graph {} {h} b{n}", model.name());
            let t = time(&case, n, runs, || {
                model.network.predict(&x)?.sum_all()?.to_scalar::<f32>()?;
                Ok(())
            })?;
            out.push(t.forward_of(&model));
        }
    }
    Ok(out)
}

fn bundled(models: &Path, name: &str) -> Result<LoadedModel, Error> {
    Ok(LoadedModel::from_files(
        &models.join(format!("{name}.json")),
        &Device::Cpu,
    )?)
}

/// Runs every case (or those whose name contains `only`).
pub(crate) fn run(models: &Path, runs: usize, only: Option<&str>) -> Result<Vec<Timing>, Error> {
    let wanted = |case: &str| only.is_none_or(|o| case.contains(o));
    let mut out = Vec::new();
    // ResNet-18's fresh initialisation takes a moment: only when asked for.
    let r18_cases = [
        "forward resnet18 224 b1",
        "forward resnet18 224 b8",
        "gradcam resnet18 layer4.1",
        "integrated gradients resnet18 224 50 steps",
        "input gradient resnet18 224 b13 fused",
    ];
    let r18 = if r18_cases.iter().any(|c| wanted(c)) {
        Some(resnet18()?)
    } else {
        None
    };
    let r20 = bundled(models, "resnet20-cifar10")?;
    let mobilenet = bundled(models, "mobilenet-v1-0.25-128")?;
    for (case, model, shape) in [
        ("forward resnet18 224 b1", r18.as_ref(), [1, 3, 224, 224]),
        ("forward resnet18 224 b8", r18.as_ref(), [8, 3, 224, 224]),
        ("forward resnet20 32 b1", Some(&r20), [1, 3, 32, 32]),
        ("forward resnet20 32 b64", Some(&r20), [64, 3, 32, 32]),
        (
            "forward mobilenet 128 b1",
            Some(&mobilenet),
            [1, 3, 128, 128],
        ),
    ] {
        if let Some(model) = model.filter(|_| wanted(case)) {
            let x = random(&shape, 1)?;
            let t = time(case, shape[0], runs, || {
                model
                    .network
                    .predict(&x)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                Ok(())
            })?;
            out.push(t.forward_of(model));
        }
    }
    if let Some(r18) = r18.as_ref().filter(|_| wanted("gradcam resnet18 layer4.1")) {
        let x = random(&[1, 3, 224, 224], 2)?;
        let target = [grad_cam::Target {
            image: 0,
            class: None,
        }];
        out.push(time("gradcam resnet18 layer4.1", 1, runs, || {
            grad_cam::grad_cam(r18, &x, "layer4.1", &target, grad_cam::Method::GradCam)?;
            Ok(())
        })?);
    }
    if let Some(r18) = r18
        .as_ref()
        .filter(|_| wanted("integrated gradients resnet18 224 50 steps"))
    {
        let x = random(&[1, 3, 224, 224], 2)?;
        let method = attribution::Method::IntegratedGradients {
            steps: 50,
            baseline: attribution::Baseline::Zero,
        };
        out.push(time(
            "integrated gradients resnet18 224 50 steps",
            1,
            runs,
            || {
                attribution::attribute(r18, &x, &[None], &method, None, None)?;
                Ok(())
            },
        )?);
    }
    if let Some(r18) = r18
        .as_ref()
        .filter(|_| wanted("input gradient resnet18 224 b13 fused"))
    {
        // The fused pass (batch norm folded, Winograd and packed kernels)
        // differentiated: what integrated gradients would cost on it.
        let x = random(&[13, 3, 224, 224], 2)?;
        out.push(time(
            "input gradient resnet18 224 b13 fused",
            13,
            runs,
            || {
                let var = candle_core::Var::from_tensor(&x)?;
                let score = r18.logits(var.as_tensor())?.narrow(1, 0, 1)?.sum_all()?;
                score.backward()?;
                Ok(())
            },
        )?);
    }
    if wanted("activations resnet20 all layers + stats") {
        let x = random(&[1, 3, 32, 32], 3)?;
        out.push(time(
            "activations resnet20 all layers + stats",
            1,
            runs,
            || {
                for (name, t) in activations::all_outputs(&r20, &x)? {
                    activations::layer_stats(&name, &t.squeeze(0)?)?;
                }
                Ok(())
            },
        )?);
    }
    let http_cases = [
        "predict http resnet20 1 client latency",
        "predict http resnet20 server overhead",
        "predict http resnet20 1 client, per request",
        "predict http resnet20 32 clients, per request",
    ];
    if http_cases.iter().any(|c| wanted(c)) {
        out.extend(http(models, runs)?);
    }
    if wanted("train step cnn_a b64 adam") {
        let cnn_a = bundled(models, "cnn-a-mnist")?;
        let mut net = TrainNet::new(&cnn_a.network, &[])?;
        let spec: OptimizerSpec =
            serde_json::from_value(serde_json::json!({"type": "adam", "lr": 0.001}))?;
        let mut opt = Optimizer::new(&spec);
        let x = random(&[64, 1, 28, 28], 4)?;
        let y = Tensor::from_vec(
            (0..64u32).map(|i| i % 10).collect::<Vec<_>>(),
            64,
            &Device::Cpu,
        )?;
        let mut rng = Rng::new(5);
        out.push(time("train step cnn_a b64 adam", 64, runs, || {
            let logits = net.forward(&x, Some(&mut rng))?;
            let loss = cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            opt.step(net.params(), &grads)?;
            Ok(())
        })?);
    }
    Ok(out)
}

/// A 32×32 RGB PNG of noise: the size a CIFAR-10 image is.
fn png_32x32() -> Result<Vec<u8>, Error> {
    let mut rng = Rng::new(6);
    let pixels: Vec<u8> = (0..32 * 32 * 3)
        .map(|_| (rng.normal().abs() * 80.0).min(255.0) as u8)
        .collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &pixels,
        32,
        32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(png)
}

/// A keep-alive HTTP/1.1 connection that posts one body and reads the
/// answer: the least a client can do, so the time measured is the server's.
struct Connection {
    reader: std::io::BufReader<std::net::TcpStream>,
    request: Vec<u8>,
}

impl Connection {
    fn open(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Result<Self, Error> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        Ok(Self {
            reader: std::io::BufReader::new(stream),
            request,
        })
    }

    /// Status and body of one request.
    fn post(&mut self) -> Result<(u16, Vec<u8>), Error> {
        use std::io::{BufRead, Read, Write};
        self.reader.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}

/// `/predict` over loopback HTTP on the bundled ResNet-20 with the server's
/// defaults (dynamic batching on): one client's latency and how much of it
/// is not the compute (`elapsed_ms` in the answer is decode + forward), then
/// requests per second with 1 and with 32 concurrent clients (reported as
/// milliseconds per completed request; the clients share the cores with the
/// server, as a load generator on the same machine would).
fn http(models: &Path, runs: usize) -> Result<Vec<Timing>, Error> {
    // The server gets a runtime of its own on its own thread (the caller
    // may be inside one already); it stops when the sender is dropped.
    let jobs = tempfile::tempdir()?;
    let mut settings = convscope::Settings::for_tests(models);
    settings.train_workers = 0;
    settings.jobs_db = Some(jobs.path().join("jobs.sqlite3"));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let app = convscope::Application::build(settings)
                .await
                .map_err(|e| e.to_string())?;
            let _ = port_tx.send(app.port());
            app.run_until(async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| e.to_string())
        })
    });
    let Ok(port) = port_rx.recv() else {
        return Err(match server.join() {
            Ok(Err(e)) => e.into(),
            _ => "the bench server did not start".into(),
        });
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let png = png_32x32()?;
    let path = "/models/resnet20-cifar10/predict";

    let mut conn = Connection::open(addr, path, &png)?;
    let (mut latency, mut overhead) = (Vec::new(), Vec::new());
    for i in 0..20 + runs * 20 {
        let t = Instant::now();
        let (status, body) = conn.post()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if status != 200 {
            return Err(format!("/predict answered {status}").into());
        }
        let elapsed = serde_json::from_slice::<serde_json::Value>(&body)?["elapsed_ms"]
            .as_f64()
            .ok_or("no elapsed_ms")?;
        if i >= 20 {
            latency.push(ms);
            overhead.push(ms - elapsed);
        }
    }
    let summary = |case: &str, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        Timing {
            case: case.to_string(),
            median_ms: v[v.len() / 2],
            p90_ms: v[(v.len() - 1) * 9 / 10],
            batch: 1,
            gflop: None,
        }
    };
    let mut out = vec![
        summary("predict http resnet20 1 client latency", latency),
        summary("predict http resnet20 server overhead", overhead),
    ];
    for clients in [1usize, 32] {
        let seconds = 5.0;
        let done = std::sync::atomic::AtomicUsize::new(0);
        let latencies = std::sync::Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|scope| -> Result<(), Error> {
            let mut handles = Vec::new();
            for _ in 0..clients {
                let (png, done, latencies) = (&png, &done, &latencies);
                handles.push(scope.spawn(move || -> Result<(), Error> {
                    let mut conn = Connection::open(addr, path, png)?;
                    let mut mine = Vec::new();
                    while started.elapsed().as_secs_f64() < seconds {
                        let t = Instant::now();
                        let (status, _) = conn.post()?;
                        if status != 200 {
                            return Err(format!("/predict answered {status}").into());
                        }
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    latencies.lock().map_err(|_| "poisoned")?.extend(mine);
                    Ok(())
                }));
            }
            for h in handles {
                h.join().map_err(|_| "a client panicked")??;
            }
            Ok(())
        })?;
        let wall = started.elapsed().as_secs_f64() * 1e3;
        let n = done.into_inner().max(1);
        let mut lat = latencies.into_inner().map_err(|_| "poisoned")?;
        lat.sort_by(f64::total_cmp);
        out.push(Timing {
            case: format!(
                "predict http resnet20 {clients} client{}, per request",
                if clients == 1 { "" } else { "s" }
            ),
            median_ms: wall / n as f64,
            p90_ms: lat
                .get((lat.len().max(1) - 1) * 9 / 10)
                .copied()
                .unwrap_or(0.0),
            batch: 1,
            gflop: None,
        });
    }
    drop(stop);
    let _ = server.join();
    Ok(out)
}
