//! Where the model looks: the Grad-CAM family, with pytorch-grad-cam 1.5.x's
//! definitions.
//!
//! Gradients come from the model's one forward pass: a tap swaps the target
//! layer's output for a candle `Var`, so `backward` from the class score
//! runs from the logit down to that layer and no further, and no weight
//! (a constant, not a `Var`) is differentiated. With `A` the layer's
//! activation `[C, H, W]` and `G = ∂ logit[class] / ∂A`:
//! - `gradcam`: `w_c = mean_hw G_c`, `cam = Σ_c w_c A_c`
//! - `hirescam`: `cam = Σ_c G_c ⊙ A_c`
//! - `gradcam++`: `α = G² / (2G² + Σ_hw A_c · G³ + 1e-6)` where `G ≠ 0`,
//!   `w_c = Σ_hw max(G, 0) · α`
//! - `xgradcam`: `w_c = Σ_hw G·A / (Σ_hw A_c + 1e-7)`
//! - `layercam`: `cam = Σ_c max(G_c, 0) ⊙ A_c`
//! - `eigencam`: `A` as `(H·W) × C`, channels centred, projected on its
//!   first right singular vector. SVD's sign is arbitrary; we take the sign
//!   whose largest magnitude is positive (the sign correction of Seg-Eigen-CAM,
//!   also in pytorch-grad-cam as `get_2d_projection_with_sign_correction`).
//! - `scorecam`: each channel, bilinearly upsampled to the input
//!   (`align_corners=True`) and min-max scaled (`+1e-8`), masks the
//!   normalised input; the class logits of the masked inputs (batched
//!   forward passes), softmaxed over channels, are the weights.
//! - `ablationcam`: each channel of the layer in turn set to 0 (far below
//!   the layer's minimum when that is not 0, as pytorch-grad-cam's
//!   `AblationLayer`) in batched forward passes of 32; `w_c = (y − y_c) / y`
//!   with `y` the class logit and `y_c` the logit with channel `c` ablated.
//!
//! [`Options`] adds pytorch-grad-cam's two options: `eigen_smooth` maps
//! the per-channel products (`w_c·A_c`, `G⊙A` or `max(G,0)⊙A`) by their
//! first principal component instead of summing them; `aug_smooth` averages
//! the normalised maps of six inputs, the image and its mirror image each
//! times 0.9, 1 and 1.1, each map mirrored back. Every copy explains the
//! class of the clean image (asked for, or predicted on it), where
//! pytorch-grad-cam without targets would take each copy's own prediction.
//!
//! Then `cam = ReLU(raw)` and per image `cam −= min; cam /= (max + 1e-7)`,
//! all zeros (never NaN) when nothing survives the ReLU.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::graph::NodeKind;
use crate::inspect::argmax;
use crate::inspect::clock::Clock;
use crate::model::LoadedModel;
use crate::tap::Tap;

/// A method of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Selvaraju et al. 2017.
    GradCam,
    /// Draelos & Carin 2020: no spatial averaging of the gradient.
    HiResCam,
    /// Chattopadhyay et al. 2018.
    GradCamPlusPlus,
    /// Fu et al. 2020.
    XGradCam,
    /// Jiang et al. 2021.
    LayerCam,
    /// Muhammad & Yeasin 2020: gradient-free, first principal component.
    EigenCam,
    /// Wang et al. 2020: gradient-free, masked forward passes.
    ScoreCam,
    /// Desai & Ramaswamy 2020: gradient-free, each channel ablated in turn.
    AblationCam,
}

/// Every method, in the contract's order.
pub const METHODS: [Method; 8] = [
    Method::GradCam,
    Method::GradCamPlusPlus,
    Method::HiResCam,
    Method::XGradCam,
    Method::LayerCam,
    Method::EigenCam,
    Method::ScoreCam,
    Method::AblationCam,
];

impl Method {
    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Method::GradCam => "gradcam",
            Method::HiResCam => "hirescam",
            Method::GradCamPlusPlus => "gradcam++",
            Method::XGradCam => "xgradcam",
            Method::LayerCam => "layercam",
            Method::EigenCam => "eigencam",
            Method::ScoreCam => "scorecam",
            Method::AblationCam => "ablationcam",
        }
    }

    /// Parses a method name (`gradcampp` is accepted for `gradcam++`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gradcam++" | "gradcampp" => Some(Method::GradCamPlusPlus),
            other => METHODS.into_iter().find(|m| m.name() == other),
        }
    }

    fn uses_gradients(self) -> bool {
        !matches!(
            self,
            Method::EigenCam | Method::ScoreCam | Method::AblationCam
        )
    }
}

/// What to explain: image `image` of the batch, for class `class`
/// (`None`: the class the model predicts for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into the input batch.
    pub image: usize,
    /// Class index, or the predicted class.
    pub class: Option<usize>,
}

/// One explanation.
#[derive(Debug, Clone)]
pub struct Cam {
    /// Index into the input batch.
    pub image: usize,
    /// The class explained.
    pub class_index: usize,
    /// Its logit.
    pub score: f32,
    /// Per-channel weights for the methods that have them.
    pub weights: Option<Vec<f32>>,
    /// `H·W` values before ReLU and normalisation.
    pub raw_cam: Vec<f32>,
    /// `H·W` values in `[0, 1]`.
    pub cam: Vec<f32>,
}

/// The explanations of one request.
#[derive(Debug, Clone)]
pub struct CamSet {
    /// The target layer.
    pub layer: String,
    /// `(H, W)` of the layer.
    pub shape: (usize, usize),
    /// One per target, in order.
    pub cams: Vec<Cam>,
}

/// The default target layer: the last residual block, else the last
/// convolution, followed by its activation function when one comes next.
/// For a `graph` model: the last node whose output is a `[C, H, W]` map
/// (the last 4-D node before global pooling).
pub fn default_layer(model: &LoadedModel) -> Option<String> {
    let layers = model.network.layers();
    let spatial = |i: usize| matches!(layers[i].output_shape[..], [_, h, w] if h * w > 1);
    if model.network.is_graph() {
        return (0..layers.len())
            .rev()
            .find(|&i| {
                spatial(i) && !matches!(layers[i].kind, NodeKind::Block | NodeKind::Parameter)
            })
            .map(|i| layers[i].name.clone());
    }
    let pick = (0..layers.len())
        .rev()
        .find(|&i| layers[i].kind == NodeKind::ResidualBlock && spatial(i))
        .or_else(|| {
            (0..layers.len())
                .rev()
                .find(|&i| layers[i].kind == NodeKind::Conv2d && spatial(i))
        })?;
    let next = layers.get(pick + 1);
    match next {
        Some(n)
            if matches!(n.kind, NodeKind::Relu | NodeKind::Relu6)
                && n.output_shape == layers[pick].output_shape =>
        {
            Some(n.name.clone())
        }
        _ => Some(layers[pick].name.clone()),
    }
}

/// `(C, H, W)` of a layer that Grad-CAM can target, or why not.
pub fn check_layer(model: &LoadedModel, layer: &str) -> Result<(usize, usize, usize)> {
    crate::inspect::activations::check_layer(model, layer)?;
    let info = model.network.layer(layer).expect("checked above");
    match info.output_shape[..] {
        [c, h, w] if h * w > 1 => Ok((c, h, w)),
        _ => {
            let spatial: Vec<String> = model
                .network
                .layers()
                .iter()
                .filter(|l| matches!(l.output_shape[..], [_, h, w] if h * w > 1))
                .map(|l| l.name.clone())
                .collect();
            Err(Error::InvalidArgument {
                param: "layer".into(),
                reason: format!(
                    "'{layer}' outputs {:?}, which has no spatial extent: a class activation map needs a layer with an [C, H, W] output larger than 1x1, before flatten and global pooling; such layers: {}",
                    info.output_shape,
                    spatial.join(", ")
                ),
            })
        }
    }
}

/// Swaps the target layer's output for a `Var` and keeps the logits.
struct SwapTap {
    layer: String,
    var: Option<Var>,
    pre_softmax: Option<String>,
    logits: Option<Tensor>,
}

impl Tap for SwapTap {
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
        if layer == self.layer && self.var.is_none() {
            let var = Var::from_tensor(&output.detach())?;
            let t = var.as_tensor().clone();
            self.var = Some(var);
            return Ok(t);
        }
        if self.pre_softmax.as_deref() == Some(layer) {
            self.logits = Some(output.clone());
        }
        Ok(output)
    }

    fn wants(&self, layer: &str) -> bool {
        layer == self.layer || self.pre_softmax.as_deref() == Some(layer)
    }
}

/// pytorch-grad-cam's `aug_smooth` and `eigen_smooth`, and a deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// The mean map over mirrored and scaled copies of the input.
    pub aug_smooth: bool,
    /// The first principal component of the per-channel products.
    pub eigen_smooth: bool,
    /// When set, the passes stop with [`Error::DeadlineExceeded`] once it
    /// has passed (checked between batches of masked or ablated inputs).
    pub deadline: Option<std::time::Instant>,
}

impl Method {
    /// Forward passes per explanation of one image at a layer of
    /// `channels` channels: one for most, one per channel for ScoreCAM and
    /// AblationCAM, six times that with `aug_smooth`.
    pub fn passes(self, channels: usize, aug_smooth: bool) -> usize {
        let one = match self {
            Method::ScoreCam | Method::AblationCam => channels.max(1) + 1,
            _ => 1,
        };
        one * if aug_smooth { 6 } else { 1 }
    }
}

/// Explains each target of the batch `x` at `layer` with `method`.
pub fn grad_cam(
    model: &LoadedModel,
    x: &Tensor,
    layer: &str,
    targets: &[Target],
    method: Method,
) -> Result<CamSet> {
    grad_cam_with(model, x, layer, targets, method, Options::default())
}

/// [`grad_cam`] with pytorch-grad-cam's smoothing options. With
/// `aug_smooth`, `cam` is the mean of the six normalised maps, `raw_cam`
/// the same, and there are no weights; the class and score are the
/// clean image's.
pub fn grad_cam_with(
    model: &LoadedModel,
    x: &Tensor,
    layer: &str,
    targets: &[Target],
    method: Method,
    options: Options,
) -> Result<CamSet> {
    let clean = one_pass(model, x, layer, targets, method, options)?;
    if !options.aug_smooth {
        return Ok(clean);
    }
    let (_, _, _, width) = x.dims4()?;
    let fixed: Vec<Target> = clean
        .cams
        .iter()
        .map(|c| Target {
            image: c.image,
            class: Some(c.class_index),
        })
        .collect();
    let reversed: Vec<u32> = (0..width as u32).rev().collect();
    let reversed = Tensor::new(reversed.as_slice(), x.device())?;
    let (h, w) = clean.shape;
    let mut sums: Vec<Vec<f64>> = vec![vec![0.0; h * w]; clean.cams.len()];
    for flip in [false, true] {
        for factor in [0.9, 1.0, 1.1] {
            let xa = if flip {
                x.index_select(&reversed, 3)?
            } else {
                x.clone()
            };
            let xa = (xa * factor)?;
            let set = if !flip && factor == 1.0 {
                clean.clone()
            } else {
                one_pass(model, &xa, layer, &fixed, method, options)?
            };
            for (sum, cam) in sums.iter_mut().zip(&set.cams) {
                for y in 0..h {
                    for xx in 0..w {
                        let from = if flip { w - 1 - xx } else { xx };
                        sum[y * w + xx] += cam.cam[y * w + from] as f64;
                    }
                }
            }
        }
    }
    let cams = clean
        .cams
        .into_iter()
        .zip(sums)
        .map(|(c, sum)| {
            let mean: Vec<f32> = sum.iter().map(|v| (v / 6.0) as f32).collect();
            Cam {
                weights: None,
                raw_cam: mean.clone(),
                cam: mean,
                ..c
            }
        })
        .collect();
    Ok(CamSet { cams, ..clean })
}

fn one_pass(
    model: &LoadedModel,
    x: &Tensor,
    layer: &str,
    targets: &[Target],
    method: Method,
    options: Options,
) -> Result<CamSet> {
    let eigen_smooth = options.eigen_smooth;
    Clock::new(options.deadline).check()?;
    let (c, h, w) = check_layer(model, layer)?;
    let classes = model.classes.len();
    for t in targets {
        if let Some(k) = t.class.filter(|&k| k >= classes) {
            return Err(Error::ImageInput(format!(
                "class {k} is out of range: the model has {classes} classes (0-{})",
                classes - 1
            )));
        }
    }
    let rows: Vec<u32> = targets.iter().map(|t| t.image as u32).collect();
    let x = x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)?;
    let pre_softmax = model.network.ends_with_softmax().then(|| {
        let l = model.network.layers();
        l[l.len() - 2].name.clone()
    });
    let mut tap = SwapTap {
        layer: layer.to_string(),
        var: None,
        pre_softmax,
        logits: None,
    };
    let out = model.network.forward(&x, &mut tap)?;
    let logits = tap.logits.take().unwrap_or(out);
    let logit_rows = logits.to_vec2::<f32>()?;
    let class_of: Vec<usize> = targets
        .iter()
        .zip(&logit_rows)
        .map(|(t, row)| t.class.unwrap_or_else(|| argmax(row)))
        .collect();
    let var = tap.var.ok_or_else(|| Error::Shape {
        layer: layer.to_string(),
        reason: "was not reached by the forward pass".into(),
    })?;
    let activations = var.as_tensor().detach();
    let grads = if method.uses_gradients() {
        // Σ over rows of each row's class logit: one backward for the batch.
        let mut onehot = vec![0f32; class_of.len() * classes];
        for (r, &k) in class_of.iter().enumerate() {
            onehot[r * classes + k] = 1.0;
        }
        let mask = Tensor::from_vec(onehot, (class_of.len(), classes), logits.device())?;
        let score = logits.mul(&mask)?.sum_all()?;
        let store = score.backward()?;
        let g = match store.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        Some(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    let a = activations
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = c * h * w;
    let score_weights = match method {
        Method::ScoreCam => Some(score_cam_weights(
            model,
            &x,
            &activations,
            &class_of,
            options.deadline,
        )?),
        Method::AblationCam => Some(ablation_weights(
            model,
            &x,
            layer,
            &activations,
            (&class_of, &logit_rows),
            options.deadline,
        )?),
        _ => None,
    };
    let cams = targets
        .iter()
        .enumerate()
        .map(|(r, t)| {
            let ar = &a[r * plane..(r + 1) * plane];
            let gr = grads.as_ref().map(|g| &g[r * plane..(r + 1) * plane]);
            let (weights, raw) = match (method, gr) {
                (Method::EigenCam, _) => (None, eigen_projection(ar, c, h * w)),
                (Method::ScoreCam | Method::AblationCam, _) => {
                    let wts = score_weights
                        .as_ref()
                        .map(|s| s[r].clone())
                        .unwrap_or_default();
                    let raw = weighted_sum(ar, &wts, h * w);
                    (Some(wts), raw)
                }
                (_, Some(g)) => gradient_cam(method, ar, g, c, h * w),
                (_, None) => unreachable!("gradient methods have gradients"),
            };
            let raw = match (eigen_smooth, method) {
                (false, _) | (true, Method::EigenCam) => raw,
                (true, _) => {
                    let products = channel_products(method, ar, gr, weights.as_deref(), h * w);
                    eigen_projection(&products, c, h * w)
                }
            };
            Cam {
                image: t.image,
                class_index: class_of[r],
                score: logit_rows[r][class_of[r]],
                weights,
                cam: normalise(&raw),
                raw_cam: raw,
            }
        })
        .collect();
    Ok(CamSet {
        layer: layer.to_string(),
        shape: (h, w),
        cams,
    })
}

/// Weights and raw map of the gradient methods, for one image.
fn gradient_cam(
    method: Method,
    a: &[f32],
    g: &[f32],
    c: usize,
    hw: usize,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let chan = |k: usize| (&a[k * hw..(k + 1) * hw], &g[k * hw..(k + 1) * hw]);
    match method {
        Method::GradCam => {
            let w: Vec<f32> = (0..c)
                .map(|k| (chan(k).1.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32)
                .collect();
            let raw = weighted_sum(a, &w, hw);
            (Some(w), raw)
        }
        Method::GradCamPlusPlus => {
            let w: Vec<f32> = (0..c)
                .map(|k| {
                    let (ak, gk) = chan(k);
                    let sum_a: f64 = ak.iter().map(|&v| v as f64).sum();
                    gk.iter()
                        .map(|&gv| {
                            let gv = gv as f64;
                            if gv == 0.0 {
                                return 0.0;
                            }
                            let (g2, g3) = (gv * gv, gv * gv * gv);
                            let alpha = g2 / (2.0 * g2 + sum_a * g3 + 1e-6);
                            gv.max(0.0) * alpha
                        })
                        .sum::<f64>() as f32
                })
                .collect();
            let raw = weighted_sum(a, &w, hw);
            (Some(w), raw)
        }
        Method::XGradCam => {
            let w: Vec<f32> = (0..c)
                .map(|k| {
                    let (ak, gk) = chan(k);
                    let sum_a: f64 = ak.iter().map(|&v| v as f64).sum();
                    (ak.iter()
                        .zip(gk)
                        .map(|(&x, &y)| x as f64 * y as f64)
                        .sum::<f64>()
                        / (sum_a + 1e-7)) as f32
                })
                .collect();
            let raw = weighted_sum(a, &w, hw);
            (Some(w), raw)
        }
        Method::HiResCam | Method::LayerCam => {
            let mut raw = vec![0f64; hw];
            for k in 0..c {
                let (ak, gk) = chan(k);
                for i in 0..hw {
                    let gv = if method == Method::LayerCam {
                        gk[i].max(0.0)
                    } else {
                        gk[i]
                    };
                    raw[i] += gv as f64 * ak[i] as f64;
                }
            }
            (None, raw.into_iter().map(|v| v as f32).collect())
        }
        Method::EigenCam | Method::ScoreCam | Method::AblationCam => {
            unreachable!("gradient-free methods are handled by the caller")
        }
    }
}

/// The `C × HW` terms whose sum over channels is the map: `w_c·A_c` for
/// the methods with weights, `G⊙A` (HiResCAM), `max(G, 0)⊙A` (LayerCAM).
fn channel_products(
    method: Method,
    a: &[f32],
    g: Option<&[f32]>,
    weights: Option<&[f32]>,
    hw: usize,
) -> Vec<f32> {
    match (method, g, weights) {
        (Method::HiResCam, Some(g), _) => a.iter().zip(g).map(|(a, g)| a * g).collect(),
        (Method::LayerCam, Some(g), _) => a.iter().zip(g).map(|(a, g)| a * g.max(0.0)).collect(),
        (_, _, Some(w)) => a.iter().enumerate().map(|(i, &v)| v * w[i / hw]).collect(),
        _ => a.to_vec(),
    }
}

fn weighted_sum(a: &[f32], w: &[f32], hw: usize) -> Vec<f32> {
    let mut raw = vec![0f64; hw];
    for (k, &wk) in w.iter().enumerate() {
        for (r, &v) in raw.iter_mut().zip(&a[k * hw..(k + 1) * hw]) {
            *r += wk as f64 * v as f64;
        }
    }
    raw.into_iter().map(|v| v as f32).collect()
}

/// `ReLU`, then `(x − min) / (max + 1e-7)` as pytorch-grad-cam's `scale_cam_image`.
pub fn normalise(raw: &[f32]) -> Vec<f32> {
    let relu: Vec<f32> = raw
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v.max(0.0) })
        .collect();
    let min = relu.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = relu.iter().map(|&v| v - min).collect();
    let max = shifted.iter().copied().fold(0f32, f32::max);
    shifted.iter().map(|&v| v / (1e-7 + max)).collect()
}

/// EigenCAM's projection for one image: `A` is `C × HW`.
fn eigen_projection(a: &[f32], c: usize, hw: usize) -> Vec<f32> {
    // X = Aᵀ, HW × C, centred per channel; NaN counts as 0 as upstream.
    let mut x = vec![0f64; hw * c];
    for k in 0..c {
        let ch = &a[k * hw..(k + 1) * hw];
        let mean = ch
            .iter()
            .map(|&v| if v.is_nan() { 0.0 } else { v as f64 })
            .sum::<f64>()
            / hw as f64;
        for i in 0..hw {
            let v = if ch[i].is_nan() { 0.0 } else { ch[i] as f64 };
            x[i * c + k] = v - mean;
        }
    }
    // X·v₁ through the smaller Gram matrix: with XXᵀ = UΛUᵀ, X·v₁ = σ₁u₁;
    // with XᵀX = VΛVᵀ, X·v₁ directly.
    let projection: Vec<f64> = if hw <= c {
        let gram = gram(&x, hw, c, true);
        let (lambda, u) = top_eigen(gram, hw);
        u.iter().map(|&ui| ui * lambda.max(0.0).sqrt()).collect()
    } else {
        let gram = gram(&x, hw, c, false);
        let (_, v) = top_eigen(gram, c);
        (0..hw)
            .map(|i| (0..c).map(|k| x[i * c + k] * v[k]).sum())
            .collect()
    };
    let (lo, hi) = projection
        .iter()
        .fold((0f64, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let sign = if lo.abs() > hi.abs() { -1.0 } else { 1.0 };
    projection.into_iter().map(|v| (sign * v) as f32).collect()
}

/// `XXᵀ` (rows) or `XᵀX` (columns) of a row-major `rows × cols` matrix.
fn gram(x: &[f64], rows: usize, cols: usize, by_rows: bool) -> Vec<f64> {
    let n = if by_rows { rows } else { cols };
    let mut g = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let s: f64 = if by_rows {
                (0..cols).map(|k| x[i * cols + k] * x[j * cols + k]).sum()
            } else {
                (0..rows).map(|r| x[r * cols + i] * x[r * cols + j]).sum()
            };
            g[i * n + j] = s;
            g[j * n + i] = s;
        }
    }
    g
}

/// The largest eigenvalue and its unit eigenvector of a symmetric matrix,
/// by cyclic Jacobi rotations (robust when eigenvalues are close, unlike
/// power iteration).
fn top_eigen(mut m: Vec<f64>, n: usize) -> (f64, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j].powi(2))
            .sum();
        let scale: f64 = (0..n)
            .map(|i| m[i * n + i].powi(2))
            .sum::<f64>()
            .max(1e-300);
        if off <= 1e-22 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * cs;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = cs * mkp - sn * mkq;
                    m[k * n + q] = sn * mkp + cs * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = cs * mpk - sn * mqk;
                    m[q * n + k] = sn * mpk + cs * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = cs * vkp - sn * vkq;
                    v[k * n + q] = sn * vkp + cs * vkq;
                }
            }
        }
    }
    let top = (0..n)
        .max_by(|&a, &b| m[a * n + a].total_cmp(&m[b * n + b]))
        .unwrap_or(0);
    (m[top * n + top], (0..n).map(|k| v[k * n + top]).collect())
}

/// ScoreCAM's weights: `[rows][C]`.
fn score_cam_weights(
    model: &LoadedModel,
    x: &Tensor,
    activations: &Tensor,
    class_of: &[usize],
    deadline: Option<std::time::Instant>,
) -> Result<Vec<Vec<f32>>> {
    let clock = Clock::new(deadline);
    let (_, _, ih, iw) = x.dims4()?;
    let (_, c, _, _) = activations.dims4()?;
    let up = activations.upsample_bilinear2d(ih, iw, true)?;
    let flat = up.flatten_from(2)?;
    let mins = flat.min_keepdim(2)?.unsqueeze(3)?;
    let maxs = flat.max_keepdim(2)?.unsqueeze(3)?;
    let masks = up
        .broadcast_sub(&mins)?
        .broadcast_div(&(maxs - &mins)?.affine(1.0, 1e-8)?)?;
    let mut out = Vec::with_capacity(class_of.len());
    const BATCH: usize = 32;
    for (r, &class) in class_of.iter().enumerate() {
        let xr = x.get(r)?.unsqueeze(0)?; // [1, Cin, H, W]
        let mr = masks.get(r)?.unsqueeze(1)?; // [C, 1, H, W]
        let mut scores = Vec::with_capacity(c);
        for start in (0..c).step_by(BATCH) {
            clock.check()?;
            let len = BATCH.min(c - start);
            let masked = mr.narrow(0, start, len)?.broadcast_mul(&xr)?;
            let logits = model.logits(&masked)?;
            scores.extend(
                logits
                    .narrow(1, class, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = scores.iter().map(|&s| ((s - max) as f64).exp()).collect();
        let sum: f64 = exps.iter().sum();
        out.push(exps.iter().map(|e| (e / sum) as f32).collect());
    }
    Ok(out)
}

/// Replaces a layer's output with a batch of ablated copies of it.
struct AblateTap {
    layer: String,
    replacement: Option<Tensor>,
}

impl Tap for AblateTap {
    fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
        if layer == self.layer
            && let Some(t) = self.replacement.take()
        {
            return Ok(t);
        }
        Ok(output)
    }

    fn wants(&self, layer: &str) -> bool {
        layer == self.layer
    }
}

/// AblationCAM's weights, `[rows][C]`: pytorch-grad-cam's `AblationCAM`
/// with its default `AblationLayer` (every channel, batches of 32).
fn ablation_weights(
    model: &LoadedModel,
    x: &Tensor,
    layer: &str,
    activations: &Tensor,
    (class_of, logit_rows): (&[usize], &[Vec<f32>]),
    deadline: Option<std::time::Instant>,
) -> Result<Vec<Vec<f32>>> {
    let clock = Clock::new(deadline);
    let (_, c, h, w) = activations.dims4()?;
    let hw = h * w;
    const BATCH: usize = 32;
    let mut out = Vec::with_capacity(class_of.len());
    for (r, &class) in class_of.iter().enumerate() {
        let a = activations.get(r)?.flatten_all()?.to_vec1::<f32>()?;
        let min = a.iter().copied().fold(f32::INFINITY, f32::min);
        let original = logit_rows[r][class];
        let xr = x.get(r)?.unsqueeze(0)?;
        let mut weights = Vec::with_capacity(c);
        for start in (0..c).step_by(BATCH) {
            clock.check()?;
            let len = BATCH.min(c - start);
            let mut batch = Vec::with_capacity(len * c * hw);
            // Zero where the layer's minimum is 0 (after a ReLU). Else far
            // below every value: pytorch-grad-cam's AblationLayer sets each
            // row of its batch of 32 to the batch's running minimum minus
            // 1e7, which every row before it has lowered by 1e7 (in f32).
            let mut running = min;
            for k in start..start + len {
                let ablated = if min == 0.0 {
                    0.0
                } else {
                    running -= 1e7;
                    running
                };
                let from = batch.len();
                batch.extend_from_slice(&a);
                batch[from + k * hw..from + (k + 1) * hw].fill(ablated);
            }
            let mut tap = AblateTap {
                layer: layer.to_string(),
                replacement: Some(Tensor::from_vec(batch, (len, c, h, w), x.device())?),
            };
            let input = xr.repeat((len, 1, 1, 1))?;
            let logits = logits_through(model, &input, &mut tap)?;
            for y in logits
                .narrow(1, class, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?
            {
                weights.push((original - y) / original);
            }
        }
        out.push(weights);
    }
    Ok(out)
}

/// The logits of a pass observed by `tap` (the softmax's inputs for a
/// network that ends in one).
fn logits_through(model: &LoadedModel, x: &Tensor, tap: &mut AblateTap) -> Result<Tensor> {
    if !model.network.ends_with_softmax() {
        return model.network.forward(x, tap);
    }
    let l = model.network.layers();
    let before = l[l.len() - 2].name.clone();
    struct Both<'a> {
        inner: &'a mut AblateTap,
        before: String,
        logits: Option<Tensor>,
    }
    impl Tap for Both<'_> {
        fn on_output(&mut self, layer: &str, output: Tensor) -> Result<Tensor> {
            let output = self.inner.on_output(layer, output)?;
            if layer == self.before {
                self.logits = Some(output.clone());
            }
            Ok(output)
        }
        fn wants(&self, layer: &str) -> bool {
            self.inner.wants(layer) || layer == self.before
        }
    }
    let mut both = Both {
        inner: tap,
        before,
        logits: None,
    };
    model.network.forward(x, &mut both)?;
    both.logits.ok_or_else(|| Error::Shape {
        layer: "logits".into(),
        reason: "the layer before the softmax produced no output".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_the_top_eigenpair() {
        // [[2, 1], [1, 2]]: eigenvalues 3 and 1, top vector (1, 1)/√2.
        let (l, v) = top_eigen(vec![2.0, 1.0, 1.0, 2.0], 2);
        assert!((l - 3.0).abs() < 1e-12);
        assert!(
            (v[0].abs() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12
                && (v[0] - v[1]).abs() < 1e-12
        );
    }

    #[test]
    fn normalising_an_all_negative_map_gives_zeros_not_nan() {
        assert_eq!(normalise(&[-1.0, -2.0]), [0.0, 0.0]);
        let n = normalise(&[0.0, 2.0, 1.0]);
        assert!((n[1] - 1.0).abs() < 1e-6 && (n[2] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn method_names_round_trip() {
        for m in METHODS {
            assert_eq!(Method::parse(m.name()), Some(m));
        }
        assert_eq!(Method::parse("gradcampp"), Some(Method::GradCamPlusPlus));
        assert_eq!(
            Method::parse("gradcam  "),
            None,
            "URL decoding is the server's"
        );
    }
}
