//! The leaf operations every architecture is built from, each with its
//! forward computation and its geometry (output shape, receptive field,
//! parameter count, multiply-accumulates) for the model summary.
//!
//! Shapes here exclude the batch dimension: `[C, H, W]` or `[N]`.

use std::sync::{Arc, OnceLock};

use candle_core::{D, DType, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
pub use crate::kernels::conv::Activation;
use crate::kernels::conv::{self, ConvOp, PackedConvOp};
use crate::kernels::elementwise::ChannelAffine;
use crate::kernels::winograd::{self, WinogradOp};

/// Per-position geometry that flows through the network with the shape: how
/// many input pixels one output unit sees (`rf`) and how far apart, in input
/// pixels, neighbouring units are (`jump`). Both as `(h, w)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geo {
    /// Output shape without the batch dimension.
    pub shape: Vec<usize>,
    /// Receptive field `(h, w)` in input pixels.
    pub rf: (usize, usize),
    /// Distance between neighbouring outputs `(h, w)` in input pixels.
    pub jump: (usize, usize),
}

impl Geo {
    /// The network input: each pixel sees itself.
    pub fn input(c: usize, h: usize, w: usize) -> Self {
        Self {
            shape: vec![c, h, w],
            rf: (1, 1),
            jump: (1, 1),
        }
    }

    pub(crate) fn chw(&self, layer: &str) -> Result<(usize, usize, usize)> {
        match self.shape[..] {
            [c, h, w] => Ok((c, h, w)),
            _ => Err(Error::Shape {
                layer: layer.to_string(),
                reason: format!(
                    "expects a [C, H, W] feature map but receives shape {:?}; spatial layers must come before flatten",
                    self.shape
                ),
            }),
        }
    }

    /// The geometry after a sliding window of `k` with stride `s` and
    /// dilation `d` producing `(oh, ow)` from this map.
    fn window(
        &self,
        c: usize,
        oh: usize,
        ow: usize,
        k: (usize, usize),
        s: (usize, usize),
        d: (usize, usize),
    ) -> Self {
        Self {
            shape: vec![c, oh, ow],
            rf: (
                self.rf.0 + (d.0 * (k.0 - 1)) * self.jump.0,
                self.rf.1 + (d.1 * (k.1 - 1)) * self.jump.1,
            ),
            jump: (self.jump.0 * s.0, self.jump.1 * s.1),
        }
    }
}

fn shape_err(layer: &str, reason: String) -> Error {
    Error::Shape {
        layer: layer.to_string(),
        reason,
    }
}

/// Zero padding `(top, bottom, left, right)`, or TensorFlow's "SAME" rule,
/// which depends on the input size and pads the extra pixel bottom/right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Fixed padding `(top, bottom, left, right)`.
    Explicit(usize, usize, usize, usize),
    /// TF "SAME": `out = ceil(in / stride)`.
    TfSame,
}

impl Padding {
    /// PyTorch's symmetric `(ph, pw)`.
    pub fn symmetric(ph: usize, pw: usize) -> Self {
        Padding::Explicit(ph, ph, pw, pw)
    }

    /// PyTorch's `padding="same"` (stride 1): `d·(k−1)` in total per
    /// dimension, the odd pixel at the bottom/right.
    pub fn same(kernel: (usize, usize), dilation: usize) -> Self {
        let th = dilation * kernel.0.saturating_sub(1);
        let tw = dilation * kernel.1.saturating_sub(1);
        Padding::Explicit(th / 2, th - th / 2, tw / 2, tw - tw / 2)
    }

    fn resolve(
        self,
        h: usize,
        w: usize,
        k: (usize, usize),
        s: (usize, usize),
        d: (usize, usize),
    ) -> (usize, usize, usize, usize) {
        match self {
            Padding::Explicit(t, b, l, r) => (t, b, l, r),
            Padding::TfSame => {
                let total = |n: usize, k: usize, s: usize, d: usize| {
                    let out = n.div_ceil(s);
                    ((out - 1) * s + d * (k - 1) + 1).saturating_sub(n)
                };
                let (th, tw) = (total(h, k.0, s.0, d.0), total(w, k.1, s.1, d.1));
                (th / 2, th - th / 2, tw / 2, tw - tw / 2)
            }
        }
    }
}

/// The hyper-parameters of a convolution, PyTorch-style, built with
/// `ConvConfig::new(in, out, kernel)` and chained setters.
#[derive(Debug, Clone, Copy)]
pub struct ConvConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride (square; candle's conv takes one value).
    pub stride: usize,
    /// Padding.
    pub padding: Padding,
    /// Dilation (square).
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
    /// Whether there is a bias.
    pub bias: bool,
}

impl ConvConfig {
    /// A square-kernel convolution with stride 1, no padding, with bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel: (kernel, kernel),
            stride: 1,
            padding: Padding::symmetric(0, 0),
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }

    /// Sets a `(h, w)` kernel.
    pub fn kernel_hw(mut self, kernel: (usize, usize)) -> Self {
        self.kernel = kernel;
        self
    }

    /// Sets the stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// Sets symmetric padding.
    pub fn pad(mut self, padding: usize) -> Self {
        self.padding = Padding::symmetric(padding, padding);
        self
    }

    /// Sets any padding.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }

    /// Sets the dilation.
    pub fn dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation;
        self
    }

    /// Sets the groups.
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Sets whether the layer has a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// `Conv2d`: weight `[O, I/groups, kh, kw]`, optional bias `[O]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Kernel, OIHW.
    pub weight: Tensor,
    /// Bias per output channel.
    pub bias: Option<Tensor>,
    /// Stride `(h, w)`; candle needs them equal.
    pub stride: usize,
    /// Dilation; candle needs them equal.
    pub dilation: usize,
    /// Groups (depthwise when equal to the input channels).
    pub groups: usize,
    /// How the input is padded.
    pub padding: Padding,
    /// The weights the predict path runs with (set by
    /// [`crate::Network::new`]; cleared for training, which changes them).
    pub prepared: Option<Arc<Prepared>>,
}

/// A convolution made ready for inference once, at load: the batch norm
/// after it folded in (`W' = W · s`, `b' = b · s + shift` per output
/// channel with `s = γ / sqrt(var + eps)`, PyTorch's `fuse_conv_bn_eval`),
/// and 3×3 stride-1 kernels transformed for Winograd.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `W` or `W'`, OIHW.
    pub weight: Tensor,
    /// `b` or `b'`, `[O]`.
    pub bias: Option<Tensor>,
    /// Whether the following batch norm is folded in.
    pub folds_bn: bool,
    /// `G W Gᵀ` per channel pair for Winograd F(2×2, 3×3), `[16][O][I]`.
    pub winograd: Option<Arc<[f32]>>,
    /// `W` or `W'` packed for the direct kernel (one group, on a CPU that
    /// runs it), so no call packs it again.
    pub packed: Option<Arc<[f32]>>,
    /// For the unfolded weights only: the Winograd transform of the
    /// flipped kernel `W[o, c, 2−i, 2−j]` `[16][I][O]` (3×3 stride-1 layers
    /// wide enough for Winograd to pay), with which the backward computes
    /// the input gradient as a transposed convolution in 2.25 times fewer
    /// multiplies (`kernels/conv/backward.rs`).
    pub transposed: Option<Arc<[f32]>>,
    /// When `W'` folds a batch norm: the convolution's own weights made
    /// ready the first time a pass asks for them unfolded (attributions,
    /// compared with PyTorch's convolution-then-batch-norm), so models
    /// that never explain pay neither the time nor the memory.
    unfolded: OnceLock<Option<Box<Prepared>>>,
}

impl Prepared {
    /// The unfolded weights of `conv`, whose folding preparation this is:
    /// packed for the direct kernel and with the transposed Winograd
    /// transform where it pays, made on first use. The forward they give
    /// is the plain convolution's bit for bit (the same kernel and order).
    fn unfolded(&self, conv: &Conv2d) -> Option<&Prepared> {
        self.unfolded
            .get_or_init(|| conv.prepare_unfolded().ok().map(Box::new))
            .as_deref()
    }
}

impl Conv2d {
    /// Takes `<prefix>.weight` (and `.bias`) from the checkpoint.
    pub fn load(ck: &mut Checkpoint, prefix: &str, config: ConvConfig) -> Result<Self> {
        let ConvConfig {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            bias,
        } = config;
        if groups == 0
            || !in_channels.is_multiple_of(groups)
            || !out_channels.is_multiple_of(groups)
        {
            return Err(Error::Manifest(format!(
                "layer '{prefix}': groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )));
        }
        if stride == 0 || dilation == 0 || kernel.0 == 0 || kernel.1 == 0 {
            return Err(Error::Manifest(format!(
                "layer '{prefix}': kernel_size, stride and dilation must be >= 1"
            )));
        }
        let weight = ck.take(
            &format!("{prefix}.weight"),
            &[out_channels, in_channels / groups, kernel.0, kernel.1],
        )?;
        let bias = if bias {
            Some(ck.take(&format!("{prefix}.bias"), &[out_channels])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            dilation,
            groups,
            padding,
            prepared: None,
        })
    }

    pub(crate) fn kernel(&self) -> (usize, usize, usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1], d[2], d[3])
    }

    /// The padding `(top, bottom, left, right)` for an `h × w` input.
    pub fn pads(&self, h: usize, w: usize) -> (usize, usize, usize, usize) {
        let (_, _, kh, kw) = self.kernel();
        let (s, d) = (self.stride, self.dilation);
        self.padding.resolve(h, w, (kh, kw), (s, s), (d, d))
    }

    /// Runs the convolution on an NCHW batch.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let unfolded = match self.prepared.as_deref() {
            Some(p) if !p.folds_bn => Some(p),
            Some(p) => p.unfolded(self),
            None => None,
        };
        match unfolded {
            Some(p) => self.forward_fused(x, p, Activation::Identity),
            None => self.run(
                x,
                &self.weight,
                self.bias.as_ref(),
                None,
                Activation::Identity,
            ),
        }
    }

    /// The convolution with its prepared weights (when they fold a batch
    /// norm, this is conv + batch norm) and `activation` in the same pass.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        p: &Prepared,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        self.run(x, &p.weight, p.bias.as_ref(), Some(p), activation)
    }

    /// Whether `weight` (this convolution's own, or one with a batch norm
    /// folded in) runs as Winograd F(2×2, 3×3): a 3×3 stride-1 ungrouped
    /// float32 kernel on the CPU, wide enough for it to pay.
    fn winograd_pays(&self, weight: &Tensor) -> bool {
        let (_, _, kh, kw) = self.kernel();
        let probe = ConvOp {
            stride: (self.stride, self.stride),
            dilation: (self.dilation, self.dilation),
            padding: (0, 0, 0, 0),
            groups: self.groups,
            activation: Activation::Identity,
        };
        winograd::eligible(&probe, kh, kw)
            && winograd::pays(weight)
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32
    }

    /// Whether zero padding can apply ([`conv::packs`]: a padded 1×1
    /// stride-1 convolution takes the padded path). TF "SAME" pads a
    /// stride-1 1×1 window by nothing.
    fn padded(&self) -> bool {
        let (_, _, kh, kw) = self.kernel();
        match self.padding {
            Padding::Explicit(t, b, l, r) => t + b + l + r > 0,
            Padding::TfSame => !(self.stride == 1 && kh * kw == 1),
        }
    }

    /// Makes the weights the predict path runs with, folding in `bn` when
    /// it follows this convolution.
    pub fn prepare(&self, bn: Option<&BatchNorm2d>) -> candle_core::Result<Prepared> {
        let (weight, bias) = match bn {
            Some(bn) => {
                let (w, b) = bn.fold_into(self)?;
                (w, Some(b))
            }
            None => (self.weight.clone(), self.bias.clone()),
        };
        let (o, i, kh, kw) = self.kernel();
        let winograd = self
            .winograd_pays(&weight)
            .then(|| {
                let w = weight.flatten_all()?.to_vec1::<f32>()?;
                Ok::<_, candle_core::Error>(Arc::from(winograd::transform_weights(&w, o, i)))
            })
            .transpose()?;
        let packed = (conv::packs(o, self.groups, self.stride, (i, kh, kw), self.padded())
            && winograd.is_none()
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32)
            .then(|| {
                let w = weight.flatten_all()?.to_vec1::<f32>()?;
                Ok::<_, candle_core::Error>(conv::pack_weights(&w, o, i * kh * kw))
            })
            .transpose()?
            .flatten();
        Ok(Prepared {
            weight,
            bias,
            folds_bn: bn.is_some(),
            winograd,
            packed,
            transposed: None,
            unfolded: OnceLock::new(),
        })
    }

    /// The convolution's own weights for the unfolded passes: packed for
    /// the direct kernel, and the transposed transform for the backward
    /// where Winograd pays. No forward Winograd: the unfolded forward stays
    /// the plain convolution's bit for bit, since Winograd's rounding put
    /// units of the hash-weight ResNet-18 across ReLU kinks that PyTorch's
    /// convolution does not (integrated gradients' error against Captum
    /// went from 1.2e-4 to 2.1e-3). A convolution with no batch norm after
    /// it keeps its one preparation, Winograd included, as before.
    fn prepare_unfolded(&self) -> candle_core::Result<Prepared> {
        let (o, i, kh, kw) = self.kernel();
        let cpu_f32 = self.weight.device().is_cpu() && self.weight.dtype() == DType::F32;
        let w = if cpu_f32 {
            self.weight.flatten_all()?.to_vec1::<f32>()?
        } else {
            Vec::new()
        };
        let packed = (cpu_f32
            && conv::packs(o, self.groups, self.stride, (i, kh, kw), self.padded()))
        .then(|| conv::pack_weights(&w, o, i * kh * kw))
        .flatten();
        // Only the packed op carries the transform to its backward.
        let transposed = (packed.is_some() && self.winograd_pays(&self.weight))
            .then(|| Arc::from(winograd::transform_transposed(&w, o, i)));
        Ok(Prepared {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            folds_bn: false,
            winograd: None,
            packed,
            transposed,
            unfolded: OnceLock::new(),
        })
    }

    /// f32 on the CPU runs [`ConvOp`] (or, given prepared weights that
    /// have them, [`WinogradOp`] or [`PackedConvOp`]); anything else takes
    /// candle's ops. `prepared` made `weight`, when given.
    fn run(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        prepared: Option<&Prepared>,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = self.kernel();
        let s = (self.stride, self.stride);
        let d = (self.dilation, self.dilation);
        let padding = self.padding.resolve(h, w, (kh, kw), s, d);
        if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            let op = ConvOp {
                stride: s,
                dilation: d,
                padding,
                groups: self.groups,
                activation,
            };
            // An empty bias means none.
            let bias = match bias {
                Some(b) => b.contiguous()?,
                None => Tensor::zeros(0, DType::F32, x.device())?,
            };
            let (x, weight) = (x.contiguous()?, weight.contiguous()?);
            let winograd = prepared.and_then(|p| p.winograd.as_ref());
            let packed = prepared.and_then(|p| p.packed.as_ref());
            return match (winograd, packed) {
                (Some(u), _) if winograd::eligible(&op, kh, kw) => x.apply_op3(
                    &weight,
                    &bias,
                    WinogradOp {
                        base: op,
                        u: u.clone(),
                    },
                ),
                (_, Some(packed)) => x.apply_op3(
                    &weight,
                    &bias,
                    PackedConvOp {
                        base: op,
                        packed: packed.clone(),
                        transposed: prepared.and_then(|p| p.transposed.clone()),
                    },
                ),
                _ => x.apply_op3(&weight, &bias, op),
            };
        }
        let (t, b, l, r) = padding;
        let y = if t == b && l == r && t == l {
            x.conv2d(weight, t, self.stride, self.dilation, self.groups)?
        } else {
            let x = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
            x.conv2d(weight, 0, self.stride, self.dilation, self.groups)?
        };
        let y = match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        activation.tensor(&y)
    }

    /// Output geometry; fails when the input channels or size do not fit.
    pub fn geometry(&self, layer: &str, g: &Geo) -> Result<Geo> {
        let (c, h, w) = g.chw(layer)?;
        let (o, i, kh, kw) = self.kernel();
        if c != i * self.groups {
            return Err(shape_err(
                layer,
                format!(
                    "expects {} input channels but receives {c} (input shape {:?})",
                    i * self.groups,
                    g.shape
                ),
            ));
        }
        let s = (self.stride, self.stride);
        let d = (self.dilation, self.dilation);
        let (t, b, l, r) = self.padding.resolve(h, w, (kh, kw), s, d);
        let (eh, ew) = (d.0 * (kh - 1) + 1, d.1 * (kw - 1) + 1);
        if h + t + b < eh || w + l + r < ew {
            return Err(shape_err(
                layer,
                format!(
                    "kernel {kh}x{kw} (dilated {eh}x{ew}) is larger than its padded input {}x{}",
                    h + t + b,
                    w + l + r
                ),
            ));
        }
        let oh = (h + t + b - eh) / s.0 + 1;
        let ow = (w + l + r - ew) / s.1 + 1;
        Ok(g.window(o, oh, ow, (kh, kw), s, d))
    }

    /// Weights plus bias.
    pub fn params(&self) -> u64 {
        (self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())) as u64
    }

    /// Multiply-accumulates for one image producing `out`.
    pub fn macs(&self, out: &Geo) -> u64 {
        let (_, i, kh, kw) = self.kernel();
        (out.shape.iter().product::<usize>() * i * kh * kw) as u64
    }
}

/// `BatchNorm2d`. Inference uses the running statistics folded into a
/// per-channel scale and shift; the raw tensors are kept for training
/// (batch statistics, running-statistics updates) and for saving.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// `weight / sqrt(running_var + eps)`, shaped `[1, C, 1, 1]`.
    scale: Tensor,
    /// `bias - running_mean * scale`, shaped `[1, C, 1, 1]`.
    shift: Tensor,
    /// `scale` and `shift` as host vectors for the one-pass CPU kernel
    /// (made once at load, not per forward pass); `None` off the CPU.
    host: Option<ChannelAffine>,
    channels: usize,
    affine: bool,
    /// `γ` (ones when not affine).
    pub weight: Tensor,
    /// `β` (zeros when not affine).
    pub bias: Tensor,
    /// The running mean, `[C]`.
    pub running_mean: Tensor,
    /// The running (unbiased) variance, `[C]`.
    pub running_var: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl BatchNorm2d {
    /// Takes `weight`, `bias`, `running_mean`, `running_var` under `prefix`.
    pub fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        channels: usize,
        eps: f64,
        affine: bool,
    ) -> Result<Self> {
        let mean = ck.take(&format!("{prefix}.running_mean"), &[channels])?;
        let var = ck.take(&format!("{prefix}.running_var"), &[channels])?;
        let (weight, bias) = if affine {
            (
                ck.take(&format!("{prefix}.weight"), &[channels])?,
                ck.take(&format!("{prefix}.bias"), &[channels])?,
            )
        } else {
            (
                Tensor::ones(channels, DType::F32, ck.device())?,
                Tensor::zeros(channels, DType::F32, ck.device())?,
            )
        };
        let scale = weight.div(&(&var + eps)?.sqrt()?)?;
        let shift = bias.sub(&mean.mul(&scale)?)?;
        let host = if scale.device().is_cpu() && scale.dtype() == DType::F32 {
            Some(ChannelAffine {
                scale: Arc::from(scale.to_vec1::<f32>()?),
                shift: Arc::from(shift.to_vec1::<f32>()?),
                activation: Activation::Identity,
            })
        } else {
            None
        };
        Ok(Self {
            host,
            scale: scale.reshape((1, channels, 1, 1))?,
            shift: shift.reshape((1, channels, 1, 1))?,
            channels,
            affine,
            weight,
            bias,
            running_mean: mean,
            running_var: var,
            eps,
        })
    }

    /// This batch norm folded into `conv`, the convolution before it:
    /// `(W', b')`.
    fn fold_into(&self, conv: &Conv2d) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = self.scale.reshape((self.channels, 1, 1, 1))?;
        let shift = self.shift.flatten_all()?;
        let bias = match &conv.bias {
            Some(b) => (b * self.scale.flatten_all()?)?.add(&shift)?,
            None => shift,
        };
        Ok((conv.weight.broadcast_mul(&scale)?, bias))
    }

    /// Whether `weight` and `bias` are learned (and in the checkpoint).
    pub fn affine(&self) -> bool {
        self.affine
    }

    /// Normalises an NCHW batch with the running statistics.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, Activation::Identity)
    }

    /// [`Self::forward`], then `activation`: one pass on the CPU (f32,
    /// NCHW), candle's ops elsewhere.
    pub fn forward_with(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        if let Some(host) = &self.host
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && x.rank() == 4
        {
            let op = ChannelAffine {
                activation,
                ..host.clone()
            };
            return x.contiguous()?.apply_op1(op);
        }
        activation.tensor(&x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }

    /// Same shape; checks the channel count.
    pub fn geometry(&self, layer: &str, g: &Geo) -> Result<Geo> {
        let (c, _, _) = g.chw(layer)?;
        if c != self.channels {
            return Err(shape_err(
                layer,
                format!("expects {} channels but receives {c}", self.channels),
            ));
        }
        Ok(g.clone())
    }

    /// Learned parameters (`weight`, `bias`); running statistics are buffers.
    pub fn params(&self) -> u64 {
        if self.affine {
            2 * self.channels as u64
        } else {
            0
        }
    }
}

/// Max or average pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// `MaxPool2d`.
    Max,
    /// `AvgPool2d`.
    Avg,
}

/// `MaxPool2d` / `AvgPool2d` with PyTorch's padding and `ceil_mode` rules.
#[derive(Debug, Clone)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Padding `(h, w)`, at most half the window as PyTorch demands.
    pub padding: (usize, usize),
    /// Round the output size up.
    pub ceil_mode: bool,
    /// Average pooling: padded zeros count in the divisor.
    pub count_include_pad: bool,
}

impl Pool2d {
    /// Checks the constraints PyTorch itself enforces.
    pub fn new(
        kind: PoolKind,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        ceil_mode: bool,
        count_include_pad: bool,
        layer: &str,
    ) -> Result<Self> {
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
            return Err(Error::Manifest(format!(
                "layer '{layer}': kernel_size and stride must be >= 1"
            )));
        }
        if padding.0 * 2 > kernel.0 || padding.1 * 2 > kernel.1 {
            return Err(Error::Manifest(format!(
                "layer '{layer}': padding {padding:?} must be at most half of kernel_size {kernel:?}"
            )));
        }
        Ok(Self {
            kind,
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
        })
    }

    fn out_len(&self, n: usize, k: usize, s: usize, p: usize) -> Option<usize> {
        let span = (n + 2 * p).checked_sub(k)?;
        let mut out = if self.ceil_mode {
            span.div_ceil(s)
        } else {
            span / s
        } + 1;
        // PyTorch: the last window must start inside the input or left padding.
        if self.ceil_mode && (out - 1) * s >= n + p {
            out -= 1;
        }
        Some(out)
    }

    /// Pools an NCHW batch. On the CPU this is the project's pooling op,
    /// differentiable for every kernel, stride and padding; elsewhere the
    /// composition of candle ops below (forward only when kernel ≠ stride).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            return self.forward_composite(x);
        }
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = match (
            self.out_len(h, self.kernel.0, self.stride.0, self.padding.0),
            self.out_len(w, self.kernel.1, self.stride.1, self.padding.1),
        ) {
            (Some(oh), Some(ow)) => (oh, ow),
            _ => candle_core::bail!(
                "pool window {:?} is larger than the padded input",
                self.kernel
            ),
        };
        let op = crate::kernels::pool::PoolOp {
            kind: self.kind,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            out: (oh, ow),
            count_include_pad: self.count_include_pad,
        };
        if self.kind == PoolKind::Max && x.track_op() {
            // Differentiated: remember where each maximum was.
            return x
                .contiguous()?
                .apply_op1(crate::kernels::pool::MaxPoolWithIndices::new(op));
        }
        x.contiguous()?.apply_op1(op)
    }

    /// The same pooling as a composition of candle ops: −∞ or zero padding,
    /// then candle's pool, with a divisor map for average pooling.
    pub fn forward_composite(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let (oh, ow) = match (self.out_len(h, kh, sh, ph), self.out_len(w, kw, sw, pw)) {
            (Some(oh), Some(ow)) => (oh, ow),
            _ => candle_core::bail!("pool window {kh}x{kw} is larger than the padded input"),
        };
        // Extra bottom/right cells that only ceil_mode windows reach.
        let eh = ((oh - 1) * sh + kh).saturating_sub(h + 2 * ph);
        let ew = ((ow - 1) * sw + kw).saturating_sub(w + 2 * pw);
        let plain = ph == 0 && pw == 0 && eh == 0 && ew == 0;
        match self.kind {
            PoolKind::Max if plain => x.max_pool2d_with_stride(self.kernel, self.stride),
            PoolKind::Max => {
                let x = pad_value(x, 2, ph, ph + eh, f32::NEG_INFINITY)?;
                let x = pad_value(&x, 3, pw, pw + ew, f32::NEG_INFINITY)?;
                x.max_pool2d_with_stride(self.kernel, self.stride)
            }
            PoolKind::Avg if plain => x.avg_pool2d_with_stride(self.kernel, self.stride),
            PoolKind::Avg => {
                let xp = x
                    .pad_with_zeros(2, ph, ph + eh)?
                    .pad_with_zeros(3, pw, pw + ew)?;
                let sums = xp.avg_pool2d_with_stride(self.kernel, self.stride)?;
                // The divisor: cells of the input, plus the padding when
                // count_include_pad; never the ceil_mode overhang.
                let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
                let mask = if self.count_include_pad {
                    let m = pad_value(&ones, 2, ph, ph, 1.0)?;
                    pad_value(&m, 3, pw, pw, 1.0)?
                        .pad_with_zeros(2, 0, eh)?
                        .pad_with_zeros(3, 0, ew)?
                } else {
                    ones.pad_with_zeros(2, ph, ph + eh)?
                        .pad_with_zeros(3, pw, pw + ew)?
                };
                let counts = mask.avg_pool2d_with_stride(self.kernel, self.stride)?;
                sums.broadcast_div(&counts)
            }
        }
    }

    /// Output geometry.
    pub fn geometry(&self, layer: &str, g: &Geo) -> Result<Geo> {
        let (c, h, w) = g.chw(layer)?;
        let oh = self.out_len(h, self.kernel.0, self.stride.0, self.padding.0);
        let ow = self.out_len(w, self.kernel.1, self.stride.1, self.padding.1);
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(g.window(c, oh, ow, self.kernel, self.stride, (1, 1))),
            _ => Err(shape_err(
                layer,
                format!(
                    "pool window {:?} is larger than its padded input {}x{}",
                    self.kernel,
                    h + 2 * self.padding.0,
                    w + 2 * self.padding.1
                ),
            )),
        }
    }
}

/// Pads `dim` of `x` with a constant.
fn pad_value(
    x: &Tensor,
    dim: usize,
    left: usize,
    right: usize,
    value: f32,
) -> candle_core::Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let mut dims = x.dims().to_vec();
    if left > 0 {
        dims[dim] = left;
        parts.push(Tensor::full(value, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if right > 0 {
        dims[dim] = right;
        parts.push(Tensor::full(value, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    Tensor::cat(&parts, dim)
}

/// `AdaptiveAvgPool2d` with PyTorch's bin edges:
/// `start = floor(i·n/out)`, `end = ceil((i+1)·n/out)`.
#[derive(Debug, Clone)]
pub struct AdaptiveAvgPool2d {
    /// Output `(h, w)`.
    pub output: (usize, usize),
}

impl AdaptiveAvgPool2d {
    /// Pools an NCHW batch.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = self.output;
        if (oh, ow) == (1, 1) {
            return x.mean_keepdim(3)?.mean_keepdim(2);
        }
        if h % oh == 0 && w % ow == 0 {
            let k = (h / oh, w / ow);
            return x.avg_pool2d_with_stride(k, k);
        }
        // Separable: average rows into bins, then columns.
        let rows = adaptive_bins(x, 2, h, oh, false)?;
        adaptive_bins(&rows, 3, w, ow, false)
    }

    /// Output geometry. A bin spans at most `ceil(n/out)` + 1 positions.
    pub fn geometry(&self, layer: &str, g: &Geo) -> Result<Geo> {
        let (c, h, w) = g.chw(layer)?;
        let (oh, ow) = self.output;
        let k = (max_bin(h, oh), max_bin(w, ow));
        let s = ((h / oh).max(1), (w / ow).max(1));
        Ok(g.window(c, oh, ow, k, s, (1, 1)))
    }
}

fn max_bin(n: usize, out: usize) -> usize {
    (0..out)
        .map(|i| ((i + 1) * n).div_ceil(out) - (i * n) / out)
        .max()
        .unwrap_or(1)
}

/// PyTorch's adaptive bins along `dim` (`floor(i·n/out)` to
/// `ceil((i+1)·n/out)`), each averaged, or its maximum taken when `max`.
pub(crate) fn adaptive_bins(
    x: &Tensor,
    dim: usize,
    n: usize,
    out: usize,
    max: bool,
) -> candle_core::Result<Tensor> {
    let bins = (0..out)
        .map(|i| {
            let start = (i * n) / out;
            let end = ((i + 1) * n).div_ceil(out);
            let bin = x.narrow(dim, start, end - start)?;
            if max {
                bin.max_keepdim(dim)
            } else {
                bin.mean_keepdim(dim)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&bins, dim)
}

/// `Linear`: weight `[out, in]`, optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Takes `<prefix>.weight` (and `.bias`).
    pub fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = ck.take(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias {
            Some(ck.take(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// `x · Wᵀ + b` on an `[N, in]` batch.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Output geometry; the input must be flat with `in_features` values.
    pub fn geometry(&self, layer: &str, g: &Geo) -> Result<Geo> {
        match g.shape[..] {
            [n] if n == self.in_features => Ok(Geo {
                shape: vec![self.out_features],
                ..g.clone()
            }),
            [n] => Err(shape_err(
                layer,
                format!(
                    "expects {} input features but receives {n}",
                    self.in_features
                ),
            )),
            _ => Err(shape_err(
                layer,
                format!(
                    "expects a flat input of {} features but receives shape {:?} (= {} values); add a flatten layer before it",
                    self.in_features,
                    g.shape,
                    g.shape.iter().product::<usize>()
                ),
            )),
        }
    }

    /// Weights plus bias.
    pub fn params(&self) -> u64 {
        (self.in_features * self.out_features
            + if self.bias.is_some() {
                self.out_features
            } else {
                0
            }) as u64
    }

    /// Multiply-accumulates for one input.
    pub fn macs(&self) -> u64 {
        (self.in_features * self.out_features) as u64
    }
}

/// Softmax over the class dimension (the differentiable candle op, so that
/// gradients flow through it when a manifest ends with one).
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}
