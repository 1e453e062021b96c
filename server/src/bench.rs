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
use model_store::checkpoint::Checkpoint;
use model_store::inspect::{activations, grad_cam};
use model_store::train::net::{TrainNet, cross_entropy};
use model_store::train::optim::{Optimizer, OptimizerSpec};
use model_store::train::{self, Rng};
use model_store::{LoadedModel, Manifest};
use serde::Serialize;

/// One case's result.
#[derive(Debug, Serialize)]
pub struct Timing {
    /// Case name, shared with the PyTorch script.
    pub case: String,
    /// Median milliseconds per iteration.
    pub median_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Images per iteration (per-image time = median / batch).
    pub batch: usize,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn time(
    case: &str,
    batch: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<(), Error>,
) -> Result<Timing, Error> {
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

fn bundled(models: &Path, name: &str) -> Result<LoadedModel, Error> {
    Ok(LoadedModel::from_files(
        &models.join(format!("{name}.json")),
        &Device::Cpu,
    )?)
}

/// Runs every case (or those whose name contains `only`).
pub fn run(models: &Path, runs: usize, only: Option<&str>) -> Result<Vec<Timing>, Error> {
    let wanted = |case: &str| only.is_none_or(|o| case.contains(o));
    let mut out = Vec::new();
    // ResNet-18's fresh initialisation takes a moment: only when asked for.
    let r18_cases = [
        "forward resnet18 224 b1",
        "forward resnet18 224 b8",
        "gradcam resnet18 layer4.1",
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
            out.push(time(case, shape[0], runs, || {
                model
                    .network
                    .predict(&x)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                Ok(())
            })?);
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
