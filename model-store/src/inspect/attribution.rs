//! Attribution methods with Captum 0.9's definitions: how much each input
//! value contributed to the class logit.
//!
//! With `x` the normalised input, `f` the class logit and `g = ∂f/∂x`:
//! - `vanilla`: `g` (Captum's `Saliency` with `abs=False`).
//! - `input_x_gradient`: `x ⊙ g`.
//! - `integrated_gradients`: `(x − b) ⊙ Σₖ wₖ · g(b + αₖ(x − b))` with
//!   `(αₖ, wₖ)` the Gauss-Legendre nodes and weights on `[0, 1]`, as
//!   Captum's default `gausslegendre` approximation; every step of an image
//!   goes through the network in one batch. The convergence delta is
//!   `Σ attributions − (f(x) − f(b))`.
//! - `guided_backprop`, `deconvolution`: `g` with every ReLU's backward
//!   replaced ([`ReluRule`]), through the tap of the one forward pass.
//! - `guided_gradcam`: guided backprop times Grad-CAM's ReLU'd map at
//!   `layer`, upsampled to the input by nearest neighbour (Captum's
//!   `GuidedGradCam`: the map is not normalised).
//! - `occlusion`: a `(C, window, window)` patch of zeros slides with
//!   stride `(C, stride, stride)`; each value gets the mean, over the patches
//!   that cover it, of `f(x) − f(x occluded)`. The occluded copies are
//!   forwarded in batches without gradients; on the CPU each is computed
//!   only where its patch reaches ([`crate::dag::Dag::forward_windowed`]),
//!   the rest taken from the clean image's pass.
//!
//! A noise tunnel ([`Tunnel`], Captum's `NoiseTunnel`) runs any method on
//! `samples` copies of `x` with Gaussian noise of standard deviation
//! `noise · (max(x) − min(x))` and reduces: the mean (`smoothgrad`), the
//! mean of squares (`smoothgrad_sq`) or the variance (`vargrad`).

use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::inspect::clock::Clock;
use crate::inspect::grad_cam::{self, Target};
use crate::inspect::{argmax, min_max};
use crate::model::LoadedModel;
use crate::rng::Rng;
use crate::tap::{ReluRule, Tap};

/// Integrated gradients' starting point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Zeros in the normalised input space (Captum's default).
    Zero,
    /// A black image, normalised: `(0 − mean) / std` per channel.
    Black,
    /// The image blurred ([`blur`], σ = 5 px).
    Blur,
}

impl Baseline {
    /// Every baseline's API name.
    pub const NAMES: [&'static str; 3] = ["zero", "black", "blur"];

    /// The API name.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Parses an API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "zero" => Some(Self::Zero),
            "black" => Some(Self::Black),
            "blur" => Some(Self::Blur),
            _ => None,
        }
    }
}

/// An attribution method and its own parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// The input gradient.
    Vanilla,
    /// Input times its gradient.
    InputXGradient,
    /// Integrated gradients over `steps` Gauss-Legendre nodes.
    IntegratedGradients {
        /// Nodes of the quadrature.
        steps: usize,
        /// Where the path starts.
        baseline: Baseline,
    },
    /// Gradients through guided ReLUs.
    GuidedBackprop,
    /// Gradients through deconvolution ReLUs.
    Deconvolution,
    /// Guided backprop times Grad-CAM at `layer`.
    GuidedGradCam {
        /// The Grad-CAM layer.
        layer: String,
    },
    /// A sliding patch of zeros.
    Occlusion {
        /// Side of the square patch, in pixels.
        window: usize,
        /// Step between patches, in pixels.
        stride: usize,
    },
}

impl Method {
    /// Network passes per image on an `h × w` input, without a tunnel:
    /// integrated gradients' steps, occlusion's patches (Captum's count),
    /// two for guided Grad-CAM, one otherwise.
    pub fn passes(&self, h: usize, w: usize) -> usize {
        match self {
            Method::IntegratedGradients { steps, .. } => *steps,
            Method::Occlusion { window, stride } => {
                occlusion_starts(h, *window, *stride).len()
                    * occlusion_starts(w, *window, *stride).len()
            }
            Method::GuidedGradCam { .. } => 2,
            _ => 1,
        }
    }

    /// The API name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Vanilla => "vanilla",
            Method::InputXGradient => "input_x_gradient",
            Method::IntegratedGradients { .. } => "integrated_gradients",
            Method::GuidedBackprop => "guided_backprop",
            Method::Deconvolution => "deconvolution",
            Method::GuidedGradCam { .. } => "guided_gradcam",
            Method::Occlusion { .. } => "occlusion",
        }
    }
}

/// How a noise tunnel reduces its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The mean.
    SmoothGrad,
    /// The mean of the squares.
    SmoothGradSq,
    /// The variance (mean of squares minus square of the mean).
    VarGrad,
}

impl Reduce {
    /// Every reduction's API name.
    pub const NAMES: [&'static str; 3] = ["smoothgrad", "smoothgrad_sq", "vargrad"];

    /// Parses an API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "smoothgrad" => Some(Self::SmoothGrad),
            "smoothgrad_sq" => Some(Self::SmoothGradSq),
            "vargrad" => Some(Self::VarGrad),
            _ => None,
        }
    }

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SmoothGrad => "smoothgrad",
            Self::SmoothGradSq => "smoothgrad_sq",
            Self::VarGrad => "vargrad",
        }
    }
}

/// A noise tunnel around a method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tunnel {
    /// The reduction.
    pub reduce: Reduce,
    /// Noisy copies.
    pub samples: usize,
    /// Noise standard deviation as a fraction of each image's value range.
    pub noise: f32,
    /// Seed of the noise.
    pub seed: u64,
}

/// One image's attributions.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// The class explained.
    pub class_index: usize,
    /// Its logit on the clean input.
    pub score: f32,
    /// `C·H·W`, the input's layout.
    pub values: Vec<f32>,
    /// Integrated gradients without a tunnel: `Σ values − (f(x) − f(b))`.
    pub convergence_delta: Option<f32>,
}

/// Input values per batch of perturbed or interpolated copies: bounds the
/// memory a request's forward (and backward) pass holds.
const BATCH_VALUES: usize = 1 << 21;

/// Floats of the largest layer output one windowed occlusion batch may
/// hold (128 MiB), should its windows cover the plane there (many models
/// go whole early: a squeeze-excitation gate, a layer norm).
const WINDOWED_VALUES: usize = 1 << 25;

/// Attributions of each image of `x` (`[N, C, H, W]`, normalised) for its
/// class (`None`: the predicted one). Stops with
/// [`Error::DeadlineExceeded`] between batches once `deadline` has passed.
pub fn attribute(
    model: &LoadedModel,
    x: &Tensor,
    classes: &[Option<usize>],
    method: &Method,
    tunnel: Option<Tunnel>,
    deadline: Option<Instant>,
) -> Result<Vec<Attribution>> {
    let clock = Clock::new(deadline);
    let (n, c, h, w) = x.dims4()?;
    let k = model.classes.len();
    if let Some(bad) = classes.iter().flatten().find(|&&c| c >= k) {
        return Err(Error::ImageInput(format!(
            "class {bad} is out of range: the model has {k} classes (0-{})",
            k - 1
        )));
    }
    if let Method::Occlusion { window, stride } = *method {
        check_occlusion(window, stride, h, w)?;
    }
    if !x.device().is_cpu()
        && matches!(
            method,
            Method::GuidedBackprop | Method::Deconvolution | Method::GuidedGradCam { .. }
        )
    {
        return Err(Error::InvalidArgument {
            param: "method".into(),
            reason: format!(
                "{} replaces the ReLU's backward with a CPU kernel; this model runs on {:?}: use a server on the CPU for it",
                method.name(),
                x.device()
            ),
        });
    }
    let logits = model.logits(x)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(n);
    for (i, row) in logits.iter().enumerate() {
        let class = classes
            .get(i)
            .copied()
            .flatten()
            .unwrap_or_else(|| argmax(row));
        let xi = x.narrow(0, i, 1)?;
        // The baseline comes from the clean image, also inside a tunnel (a
        // fixed baseline tensor, as Captum is given one).
        let base = match method {
            Method::IntegratedGradients { baseline, .. } => {
                Some(baseline_of(model, &xi, *baseline)?)
            }
            _ => None,
        };
        let (values, delta) = match tunnel {
            None => one(model, &xi, class, method, base.as_deref(), &clock)?,
            Some(t) => (
                tunneled(model, &xi, class, method, base.as_deref(), t, &clock)?,
                None,
            ),
        };
        debug_assert_eq!(values.len(), c * h * w);
        out.push(Attribution {
            class_index: class,
            score: row[class],
            values,
            convergence_delta: delta,
        });
    }
    Ok(out)
}

/// Whether a `window × window` patch every `stride` pixels fits an
/// `h × w` input and covers every pixel (Captum's conditions), or why not.
pub fn check_occlusion(window: usize, stride: usize, h: usize, w: usize) -> Result<()> {
    let bad = |param: &str, reason: String| {
        Err(Error::InvalidArgument {
            param: param.into(),
            reason,
        })
    };
    if window == 0 || window > h.min(w) {
        return bad(
            "window",
            format!(
                "must be in 1..={} (the input is {h}x{w}), got {window}",
                h.min(w)
            ),
        );
    }
    if stride == 0 || stride > window {
        return bad(
            "stride",
            format!(
                "must be in 1..={window} (at most the window, so every pixel is covered), got {stride}"
            ),
        );
    }
    Ok(())
}

/// One image (`[1, C, H, W]`) without a tunnel; `base` is integrated
/// gradients' baseline.
fn one(
    model: &LoadedModel,
    x: &Tensor,
    class: usize,
    method: &Method,
    base: Option<&[f32]>,
    clock: &Clock,
) -> Result<(Vec<f32>, Option<f32>)> {
    clock.check()?;
    let host = || -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
    Ok(match method {
        Method::Vanilla => (gradient(model, x, class, ReluRule::Autograd)?, None),
        Method::GuidedBackprop => (gradient(model, x, class, ReluRule::Guided)?, None),
        Method::Deconvolution => (gradient(model, x, class, ReluRule::Deconvolution)?, None),
        Method::InputXGradient => {
            let g = gradient(model, x, class, ReluRule::Autograd)?;
            (host()?.iter().zip(&g).map(|(a, b)| a * b).collect(), None)
        }
        Method::IntegratedGradients { steps, baseline } => {
            let b = match base {
                Some(b) => b.to_vec(),
                None => baseline_of(model, x, *baseline)?,
            };
            let stem = model.network.dag().input_convolution();
            let (values, delta) = integrated(model, x, &b, class, *steps, stem, clock)?;
            (values, Some(delta))
        }
        Method::GuidedGradCam { layer } => (guided_grad_cam(model, x, class, layer)?, None),
        Method::Occlusion { window, stride } => {
            (occlusion(model, x, class, *window, *stride, clock)?, None)
        }
    })
}

/// `samples` noisy copies through `method`, reduced.
fn tunneled(
    model: &LoadedModel,
    x: &Tensor,
    class: usize,
    method: &Method,
    base: Option<&[f32]>,
    t: Tunnel,
    clock: &Clock,
) -> Result<Vec<f32>> {
    let host = x.flatten_all()?.to_vec1::<f32>()?;
    let (lo, hi) = host
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let sigma = t.noise * (hi - lo);
    let mut rng = Rng::new(t.seed);
    let mut sum = vec![0f64; host.len()];
    let mut sum_sq = vec![0f64; host.len()];
    for _ in 0..t.samples {
        let noisy: Vec<f32> = host.iter().map(|&v| v + sigma * rng.normal()).collect();
        let xn = Tensor::from_vec(noisy, x.shape(), x.device())?;
        let (a, _) = one(model, &xn, class, method, base, clock)?;
        for ((s, q), &v) in sum.iter_mut().zip(&mut sum_sq).zip(&a) {
            *s += v as f64;
            *q += v as f64 * v as f64;
        }
    }
    let m = t.samples.max(1) as f64;
    Ok(sum
        .iter()
        .zip(&sum_sq)
        .map(|(&s, &q)| {
            (match t.reduce {
                Reduce::SmoothGrad => s / m,
                Reduce::SmoothGradSq => q / m,
                Reduce::VarGrad => q / m - (s / m) * (s / m),
            }) as f32
        })
        .collect())
}

/// Keeps the logits before a final softmax and asks for a ReLU rule. It
/// wants no layer but that one, so the fused kernels run (batch norm +
/// ReLU, add + ReLU, conv + ReLU; under the chain rule only, since the
/// other rules replace each ReLU's backward), but no batch norm is folded
/// into its convolution: gradients then round as PyTorch's convolution
/// and batch norm do. With the batch norm folded into the weights, a unit
/// within ~1e-7 of a ReLU's kink can land on the other side, and one such
/// unit on one of integrated gradients' 50 paths moved an attribution by
/// 3e-4.
///
/// With a `stem` (the convolution that alone reads the input), its output
/// becomes a fresh variable, so the backward pass stops there and gives
/// the gradient at the stem's output ([`stem_gradients`]).
struct RuleTap {
    rule: ReluRule,
    pre_softmax: Option<String>,
    logits: Option<Tensor>,
    stem: Option<String>,
    stem_out: Option<Var>,
}

impl RuleTap {
    fn new(model: &LoadedModel, rule: ReluRule, stem: Option<&str>) -> Self {
        let pre_softmax = model.network.ends_with_softmax().then(|| {
            let l = model.network.layers();
            l[l.len() - 2].name.clone()
        });
        Self {
            rule,
            pre_softmax,
            logits: None,
            stem: stem.map(str::to_string),
            stem_out: None,
        }
    }

    /// The forward pass; the logits (before a final softmax).
    fn logits(&mut self, model: &LoadedModel, x: &Tensor) -> Result<Tensor> {
        let out = model.network.forward(x, self)?;
        Ok(self.logits.take().unwrap_or(out))
    }
}

impl Tap for RuleTap {
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
        let output = if self.stem.as_deref() == Some(layer) {
            let var = Var::from_tensor(&output.detach())?;
            let out = var.as_tensor().clone();
            self.stem_out = Some(var);
            out
        } else {
            output
        };
        if self.pre_softmax.as_deref() == Some(layer) {
            self.logits = Some(output.clone());
        }
        Ok(output)
    }

    fn wants(&self, layer: &str) -> bool {
        self.pre_softmax.as_deref() == Some(layer) || self.stem.as_deref() == Some(layer)
    }

    fn relu_rule(&self) -> ReluRule {
        self.rule
    }

    fn folds_batch_norm(&self) -> bool {
        false
    }
}

/// Logits of a batch under a ReLU rule, through [`RuleTap`]: fused kernels,
/// no batch norm folded (the softmax's inputs for a network that ends in
/// one, as [`LoadedModel::logits`]).
fn logits_with(model: &LoadedModel, x: &Tensor, rule: ReluRule) -> Result<Tensor> {
    RuleTap::new(model, rule, None).logits(model, x)
}

/// `∂ Σ_rows logit[class] / ∂(stem's output)`, `[N, …]`, for a batch whose
/// rows all explain `class`; `stem` is the network's
/// [`crate::dag::Dag::input_convolution`].
fn stem_gradients(model: &LoadedModel, x: &Tensor, class: usize, stem: &str) -> Result<Tensor> {
    let mut tap = RuleTap::new(model, ReluRule::Autograd, Some(stem));
    let logits = tap.logits(model, x)?;
    let var = tap.stem_out.take().ok_or_else(|| Error::Shape {
        layer: stem.into(),
        reason: "the stem convolution did not run".into(),
    })?;
    class_gradient(&logits, class, &var)
}

/// `∂ Σ_rows logit[class] / ∂x` for a batch whose rows all explain `class`.
fn gradients(model: &LoadedModel, x: &Tensor, class: usize, rule: ReluRule) -> Result<Tensor> {
    let var = Var::from_tensor(&x.detach())?;
    let logits = logits_with(model, var.as_tensor(), rule)?;
    class_gradient(&logits, class, &var)
}

/// `∂ Σ_rows logits[class] / ∂wrt`; zeros where the score does not reach it.
fn class_gradient(logits: &Tensor, class: usize, wrt: &Var) -> Result<Tensor> {
    let grads = logits.narrow(1, class, 1)?.sum_all()?.backward()?;
    Ok(match grads.get(wrt.as_tensor()) {
        Some(g) => g.to_dtype(DType::F32)?,
        None => wrt.as_tensor().zeros_like()?,
    })
}

fn gradient(model: &LoadedModel, x: &Tensor, class: usize, rule: ReluRule) -> Result<Vec<f32>> {
    Ok(gradients(model, x, class, rule)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The baseline of one image.
fn baseline_of(model: &LoadedModel, x: &Tensor, baseline: Baseline) -> Result<Vec<f32>> {
    let (_, c, h, w) = x.dims4()?;
    Ok(match baseline {
        Baseline::Zero => vec![0.0; c * h * w],
        Baseline::Black => {
            let spec = &model.manifest.input;
            (0..c)
                .flat_map(|ch| {
                    let mean = spec.mean.as_ref().map_or(0.0, |m| m[ch % m.len()]);
                    let std = spec.std.as_ref().map_or(1.0, |s| s[ch % s.len()]);
                    std::iter::repeat_n(-mean / std, h * w)
                })
                .collect()
        }
        Baseline::Blur => blur(&x.flatten_all()?.to_vec1::<f32>()?, c, h, w, BLUR_SIGMA),
    })
}

/// The Gaussian blur of the `blur` baselines, in pixels.
pub const BLUR_SIGMA: f64 = 5.0;

/// A separable Gaussian blur of each `h × w` plane of `x`, as
/// `scipy.ndimage.gaussian_filter(plane, sigma)` with its defaults: taps to
/// `⌊4σ + 0.5⌋` pixels either side, borders mirrored about the edge
/// (`d c b a | a b c d`).
pub fn blur(x: &[f32], c: usize, h: usize, w: usize, sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as isize;
    let taps: Vec<f64> = (-radius..=radius)
        .map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let mirror = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let m = i.rem_euclid(2 * n);
        (if m < n { m } else { 2 * n - 1 - m }) as usize
    };
    let mut out = vec![0f32; x.len()];
    let mut rows = vec![0f64; h * w];
    for p in 0..c {
        let plane = &x[p * h * w..(p + 1) * h * w];
        for y in 0..h {
            for xx in 0..w {
                rows[y * w + xx] = taps
                    .iter()
                    .enumerate()
                    .map(|(t, k)| {
                        k * plane[y * w + mirror(xx as isize + t as isize - radius, w)] as f64
                    })
                    .sum();
            }
        }
        for y in 0..h {
            for xx in 0..w {
                out[p * h * w + y * w + xx] = taps
                    .iter()
                    .enumerate()
                    .map(|(t, k)| k * rows[mirror(y as isize + t as isize - radius, h) * w + xx])
                    .sum::<f64>() as f32;
            }
        }
    }
    out
}

/// The `n` Gauss-Legendre nodes and weights mapped to `[0, 1]`, nodes
/// ascending, as `0.5 · (1 + leggauss(n))` and `0.5 · weights` (Captum's
/// `gausslegendre`): Newton's method on the Legendre polynomial from
/// Chebyshev starting points.
pub fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // The i-th root from the top, then refined.
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 1.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, z);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * z * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            // P'ₙ(z) = n (z Pₙ − Pₙ₋₁) / (z² − 1).
            dp = n as f64 * (z * p1 - p0) / (z * z - 1.0);
            let dz = p1 / dp;
            z -= dz;
            if dz.abs() < 1e-15 {
                break;
            }
        }
        let weight = 2.0 / ((1.0 - z * z) * dp * dp);
        out.push((0.5 * (1.0 + z), 0.5 * weight));
    }
    out.reverse();
    out
}

/// Integrated gradients of one image from baseline `b`.
///
/// When one convolution alone reads the input (a ResNet's `conv1`), the
/// steps' weighted gradients are summed at its output and taken back
/// through it once: `Σₖ wₖ Wᵀgₖ = Wᵀ Σₖ wₖ gₖ`. The stem's backward (a 7×7
/// stride-2 convolution into 3 channels, col2im-bound) then runs once per
/// image instead of once per step. `stem` is that convolution
/// ([`crate::dag::Dag::input_convolution`]); `None` backpropagates each
/// step to the input.
fn integrated(
    model: &LoadedModel,
    x: &Tensor,
    b: &[f32],
    class: usize,
    steps: usize,
    stem: Option<&str>,
    clock: &Clock,
) -> Result<(Vec<f32>, f32)> {
    let (_, c, h, w) = x.dims4()?;
    let per = c * h * w;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let diff: Vec<f32> = xs.iter().zip(b).map(|(a, b)| a - b).collect();
    let nodes = gauss_legendre(steps);
    let chunk = (BATCH_VALUES / per).clamp(1, steps.max(1));
    // The weighted sum of the gradients: at the input, or at the stem's
    // output (its shape taken from the first batch's).
    let mut total = vec![0f64; if stem.is_some() { 0 } else { per }];
    let mut stem_shape = Vec::new();
    for part in nodes.chunks(chunk) {
        clock.check()?;
        let mut batch = Vec::with_capacity(part.len() * per);
        for &(alpha, _) in part {
            let alpha = alpha as f32;
            batch.extend(b.iter().zip(&diff).map(|(b, d)| b + alpha * d));
        }
        let t = Tensor::from_vec(batch, (part.len(), c, h, w), x.device())?;
        let g = match stem {
            Some(stem) => {
                let g = stem_gradients(model, &t, class, stem)?;
                if total.is_empty() {
                    stem_shape = g.dims().to_vec();
                    stem_shape[0] = 1;
                    total = vec![0f64; g.elem_count() / part.len()];
                }
                g
            }
            None => gradients(model, &t, class, ReluRule::Autograd)?,
        };
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        for (row, &(_, weight)) in g.chunks(total.len()).zip(part) {
            for (t, &v) in total.iter_mut().zip(row) {
                *t += weight * v as f64;
            }
        }
    }
    if let Some(stem) = stem {
        let summed: Vec<f32> = total.iter().map(|&v| v as f32).collect();
        let g = Tensor::from_vec(summed, stem_shape, x.device())?;
        total = model
            .network
            .dag()
            .convolution_input_gradient(stem, &g, &[1, c, h, w])?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
    }
    let values: Vec<f32> = total
        .iter()
        .zip(&diff)
        .map(|(t, &d)| (*t as f32) * d)
        .collect();
    let ends = Tensor::from_vec([xs, b.to_vec()].concat(), (2, c, h, w), x.device())?;
    let f = model.logits(&ends)?.narrow(1, class, 1)?.flatten_all()?;
    let f = f.to_vec1::<f32>()?;
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    Ok((values, (sum - (f[0] as f64 - f[1] as f64)) as f32))
}

/// Guided backprop times the ReLU'd Grad-CAM map at `layer`, upsampled by
/// nearest neighbour (`src = ⌊dst · in / out⌋`, as `F.interpolate`).
fn guided_grad_cam(model: &LoadedModel, x: &Tensor, class: usize, layer: &str) -> Result<Vec<f32>> {
    let (_, c, h, w) = x.dims4()?;
    let set = grad_cam::grad_cam(
        model,
        x,
        layer,
        &[Target {
            image: 0,
            class: Some(class),
        }],
        grad_cam::Method::GradCam,
    )?;
    let (lh, lw) = set.shape;
    let cam = &set.cams[0].raw_cam;
    let guided = gradient(model, x, class, ReluRule::Guided)?;
    let mut out = guided;
    for ch in 0..c {
        for y in 0..h {
            let sy = ((y as f64 * lh as f64 / h as f64) as usize).min(lh - 1);
            for xx in 0..w {
                let sx = ((xx as f64 * lw as f64 / w as f64) as usize).min(lw - 1);
                out[ch * h * w + y * w + xx] *= cam[sy * lw + sx].max(0.0);
            }
        }
    }
    Ok(out)
}

/// Captum's `Occlusion` with a zero baseline on one image.
fn occlusion(
    model: &LoadedModel,
    x: &Tensor,
    class: usize,
    window: usize,
    stride: usize,
    clock: &Clock,
) -> Result<Vec<f32>> {
    let (_, c, h, w) = x.dims4()?;
    let per = c * h * w;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let initial = model.logits(x)?.narrow(1, class, 1)?.flatten_all()?;
    let initial = initial.to_vec1::<f32>()?[0];
    let columns = occlusion_starts(w, window, stride);
    let patches: Vec<(usize, usize)> = occlusion_starts(h, window, stride)
        .into_iter()
        .flat_map(|y| columns.iter().map(move |&x| (y, x)))
        .collect();
    let covers = |(py, px): (usize, usize)| {
        (py..(py + window).min(h))
            .flat_map(move |y| (px..(px + window).min(w)).map(move |x| (y, x)))
    };
    let mut sum = vec![0f64; h * w];
    let mut count = vec![0u32; h * w];
    // On the CPU each patched image is computed only where its patch
    // reaches (`Dag::forward_windowed`), so many more fit in a batch.
    // A window that grows to cover its plane becomes the whole batch, so a
    // batch is also bounded by the largest layer output it may then hold.
    let windowed = (x.device().is_cpu() && x.dtype() == DType::F32)
        .then(|| model.network.dag().base_pass(x))
        .transpose()?;
    let chunk = if windowed.is_some() {
        let largest = model
            .network
            .layers()
            .iter()
            .map(|l| l.output_shape.iter().product::<usize>())
            .max()
            .unwrap_or(per);
        (BATCH_VALUES / (c * window * window * 8)).min(WINDOWED_VALUES / largest.max(1))
    } else {
        BATCH_VALUES / per
    }
    .clamp(1, patches.len());
    for part in patches.chunks(chunk) {
        clock.check()?;
        let logits = if let Some(pass) = &windowed {
            // Each crop: the window × window square holding the patch (a
            // patch cut by the edge keeps its square inside the image).
            let at: Vec<(usize, usize)> = part
                .iter()
                .map(|&(py, px)| (py.min(h - window), px.min(w - window)))
                .collect();
            let mut crops = Vec::with_capacity(part.len() * c * window * window);
            for (&p, &(y0, x0)) in part.iter().zip(&at) {
                for ch in 0..c {
                    for y in y0..y0 + window {
                        for xx in x0..x0 + window {
                            let hidden = (p.0..p.0 + window).contains(&y)
                                && (p.1..p.1 + window).contains(&xx);
                            crops.push(if hidden {
                                0.0
                            } else {
                                xs[ch * h * w + y * w + xx]
                            });
                        }
                    }
                }
            }
            let crops = Tensor::from_vec(crops, (part.len(), c, window, window), x.device())?;
            model.logits_windowed(pass, &crops, &at)?
        } else {
            let mut batch = Vec::with_capacity(part.len() * per);
            for &p in part {
                let start = batch.len();
                batch.extend_from_slice(&xs);
                for (y, xx) in covers(p) {
                    for ch in 0..c {
                        batch[start + ch * h * w + y * w + xx] = 0.0;
                    }
                }
            }
            model.logits(&Tensor::from_vec(batch, (part.len(), c, h, w), x.device())?)?
        };
        let f = logits.narrow(1, class, 1)?.flatten_all()?;
        for (&p, v) in part.iter().zip(f.to_vec1::<f32>()?) {
            let drop = (initial - v) as f64;
            for (y, xx) in covers(p) {
                sum[y * w + xx] += drop;
                count[y * w + xx] += 1;
            }
        }
    }
    let plane: Vec<f32> = sum
        .iter()
        .zip(&count)
        .map(|(&s, &n)| if n > 0 { (s / n as f64) as f32 } else { 0.0 })
        .collect();
    Ok((0..c).flat_map(|_| plane.iter().copied()).collect())
}

/// Which signs of the channel sum a picture shows (Captum's
/// `visualize_image_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sign {
    /// `|Σ_c a|` (Captum's default, `absolute_value`).
    #[default]
    Absolute,
    /// The positive part.
    Positive,
    /// The negative part, as magnitudes.
    Negative,
    /// Both, in `[−1, 1]`.
    All,
}

/// The channel sum of `C·H·W` attributions, as Captum's
/// `visualize_image_attr` scales it: the chosen signs, divided by the value
/// below which 98% of their total mass lies (2% outliers clipped), clipped
/// to `[−1, 1]` (`[0, 1]` but for [`Sign::All`]). All zeros when there is
/// nothing to show, where Captum would fail.
pub fn visual_map(values: &[f32], c: usize, hw: usize, sign: Sign) -> Vec<f32> {
    let sum: Vec<f64> = (0..hw)
        .map(|p| (0..c).map(|ch| values[ch * hw + p] as f64).sum())
        .collect();
    let shown: Vec<f64> = sum
        .iter()
        .map(|&v| match sign {
            Sign::Absolute => v.abs(),
            Sign::Positive => v.max(0.0),
            Sign::Negative => (-v).max(0.0),
            Sign::All => v,
        })
        .collect();
    let mut sorted: Vec<f64> = shown.iter().map(|v| v.abs()).collect();
    sorted.sort_by(f64::total_cmp);
    let total: f64 = sorted.iter().sum();
    let mut running = 0.0;
    let threshold = sorted
        .iter()
        .find(|&&v| {
            running += v;
            running >= total * 0.98
        })
        .copied()
        .unwrap_or(0.0);
    if threshold <= 0.0 || !threshold.is_finite() {
        return vec![0.0; hw];
    }
    shown
        .iter()
        .map(|&v| (v / threshold).clamp(-1.0, 1.0) as f32)
        .collect()
}

/// Per pixel, the sum over the channels: an attribution's map.
pub fn channel_sum(values: &[f32], c: usize, hw: usize) -> Vec<f32> {
    (0..hw)
        .map(|p| (0..c).map(|ch| values[ch * hw + p]).sum())
        .collect()
}

/// Per pixel, the largest |value| over the channels, min-max scaled to
/// `[0, 1]` (Simonyan et al. 2014's saliency map).
pub fn max_abs_map(values: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let m: Vec<f32> = (0..hw)
        .map(|p| {
            (0..c)
                .map(|ch| values[ch * hw + p].abs())
                .fold(0f32, f32::max)
        })
        .collect();
    min_max(&m)
}

/// Where occlusion's patches start along a side: Captum's shift count,
/// `⌈(size − window) / stride⌉ + 1` (the last patch may hang over the edge
/// and is cut there); none when the window does not fit.
fn occlusion_starts(size: usize, window: usize, stride: usize) -> Vec<usize> {
    if window == 0 || stride == 0 || window > size {
        return Vec::new();
    }
    (0..(size - window).div_ceil(stride) + 1)
        .map(|k| k * stride)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet20() -> LoadedModel {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        LoadedModel::from_files(
            &models.join("resnet20-cifar10.json"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn a_batch_has_the_gradients_of_its_images_alone() {
        let model = resnet20();
        let mut rng = Rng::new(3);
        for n in [31, 32, 40] {
            let v: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.normal()).collect();
            let x = Tensor::from_vec(v, (n, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
            let all = gradients(&model, &x, 3, ReluRule::Autograd).unwrap();
            for i in [0, n - 1] {
                let xi = x.narrow(0, i, 1).unwrap();
                let one = gradient(&model, &xi, 3, ReluRule::Autograd).unwrap();
                let row = all
                    .get(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let worst = one
                    .iter()
                    .zip(&row)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "batch {n}, image {i}: differs by {worst}");
            }
        }
    }

    /// The stem's shortcut (the steps' gradients summed at conv1's output,
    /// then one backward through conv1) against every step taken back to
    /// the input, on ResNet-20 with a blur baseline: the same attributions
    /// and convergence delta but for float32 rounding. 700 steps make two
    /// batches (682 + 18), so the sum runs across batches and a partial
    /// one. (ResNet-18's 7×7 stride-2 stem is held to Captum by the
    /// black-box fixtures of resnet18-hash-64.)
    #[test]
    fn integrated_gradients_through_the_stem_once_equals_every_step_to_the_input() {
        let model = resnet20();
        assert_eq!(model.network.dag().input_convolution(), Some("conv1"));
        let steps = 700;
        assert!(steps > BATCH_VALUES / (3 * 32 * 32));
        let mut rng = Rng::new(5);
        let v: Vec<f32> = (0..3 * 32 * 32).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(v, (1, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
        let b = baseline_of(&model, &x, Baseline::Blur).unwrap();
        let clock = Clock::new(None);
        let (every, d0) = integrated(&model, &x, &b, 3, steps, None, &clock).unwrap();
        let (once, d1) = integrated(&model, &x, &b, 3, steps, Some("conv1"), &clock).unwrap();
        let rms = (every.iter().map(|v| v * v).sum::<f32>() / every.len() as f32).sqrt();
        assert!(rms > 0.0);
        let worst = every
            .iter()
            .zip(&once)
            .map(|(a, b)| (a - b).abs() / a.abs().max(rms))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-4,
            "worst error {worst} of max(|value|, rms {rms})"
        );
        assert!((d0 - d1).abs() <= 1e-4 * d0.abs().max(1.0), "{d0} vs {d1}");
    }

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        for n in [1, 2, 5, 24, 31, 32, 33, 49, 50, 64, 500] {
            let nodes = gauss_legendre(n);
            assert_eq!(nodes.len(), n);
            assert!(nodes.windows(2).all(|p| p[0].0 < p[1].0), "ascending");
            let total: f64 = nodes.iter().map(|&(_, w)| w).sum();
            assert!((total - 1.0).abs() < 1e-12, "{n}: weights sum to {total}");
            // ∫₀¹ x^(2n−1) dx = 1 / 2n, exact for n nodes.
            let p = 2 * n as i32 - 1;
            let got: f64 = nodes.iter().map(|&(a, w)| w * a.powi(p)).sum();
            assert!((got - 1.0 / (p + 1) as f64).abs() < 1e-12, "{n}: {got}");
        }
    }

    #[test]
    fn the_visual_map_clips_the_top_two_percent_of_the_mass() {
        // 100 pixels: 99 of value 1 and one of 1000 (the outlier).
        let mut v = vec![1f32; 100];
        v[42] = 1000.0;
        let m = visual_map(&v, 1, 100, Sign::Absolute);
        // 98% of the mass (1099) is reached only by the outlier itself.
        assert!((m[0] - 0.001).abs() < 1e-6 && m[42] == 1.0);
        // Two channels are summed; negatives show only where asked.
        let two = [1f32, -3.0, 1.0, 1.0];
        assert_eq!(visual_map(&two, 2, 2, Sign::Positive), [1.0, 0.0]);
        assert_eq!(visual_map(&two, 2, 2, Sign::Negative), [0.0, 1.0]);
        assert_eq!(visual_map(&two, 2, 2, Sign::All), [1.0, -1.0]);
        assert_eq!(visual_map(&[0.0; 4], 1, 4, Sign::All), [0.0; 4]);
    }

    #[test]
    fn blur_keeps_a_constant_and_mirrors_its_borders() {
        let flat = blur(&[2.0; 3 * 7 * 5], 3, 7, 5, 5.0);
        assert!(flat.iter().all(|&v| (v - 2.0).abs() < 1e-5));
        // A step: the blurred values stay inside the range and keep the order.
        let step: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 0.0 } else { 1.0 }).collect();
        let b = blur(&step, 1, 8, 8, 1.0);
        assert!(b[0] < b[7] && b.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
