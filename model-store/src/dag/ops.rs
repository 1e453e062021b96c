//! The operations of a `graph` manifest: each with its forward computation
//! and its shape rule, in one place, so that adding an op touches only this
//! file (its parse in `parse.rs` aside).
//!
//! Dimensions here are PyTorch's: dim 0 is the batch. Shapes in
//! [`infer`](GraphOp::infer) include a batch of 1 for activations; a
//! parameter node's shape is its tensor's own (it broadcasts, as in PyTorch).

use candle_core::Tensor;

use crate::graph::NodeKind;
use crate::kernels::activation::Activation;
use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Geo, Pool2d, PoolKind};

/// One-input elementwise functions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `x` if positive else `slope · x`.
    LeakyRelu(f64),
    /// `x · relu6(x + 3) / 6`.
    Hardswish,
    /// `relu6(x + 3) / 6`.
    Hardsigmoid,
    /// `x · sigmoid(x)`.
    Silu,
    /// `1 / (1 + e⁻ˣ)`.
    Sigmoid,
    /// `x · Φ(x)`, exact (erf).
    Gelu,
    /// GELU's tanh approximation (`approximate="tanh"`).
    GeluTanh,
    /// `tanh(x)`.
    Tanh,
}

impl Unary {
    /// The convolution-fusable [`Activation`] this is, if any: one
    /// definition for the node alone and for the fused kernels.
    pub(crate) fn activation(self) -> Option<Activation> {
        match self {
            Unary::Relu => Some(Activation::Relu),
            Unary::Relu6 => Some(Activation::Relu6),
            Unary::Hardswish => Some(Activation::Hardswish),
            Unary::Hardsigmoid => Some(Activation::Hardsigmoid),
            Unary::Silu => Some(Activation::Silu),
            Unary::Sigmoid => Some(Activation::Sigmoid),
            Unary::LeakyRelu(_) | Unary::Gelu | Unary::GeluTanh | Unary::Tanh => None,
        }
    }

    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Unary::LeakyRelu(slope) => candle_nn::ops::leaky_relu(x, slope),
            Unary::Gelu => x.gelu_erf(),
            Unary::GeluTanh => x.gelu(),
            Unary::Tanh => x.tanh(),
            fusable => match fusable.activation() {
                Some(a) => a.tensor(x),
                None => unreachable!("every other unary op is an Activation"),
            },
        }
    }

    fn kind(self) -> NodeKind {
        match self {
            Unary::Relu => NodeKind::Relu,
            Unary::Relu6 => NodeKind::Relu6,
            Unary::LeakyRelu(_) => NodeKind::LeakyRelu,
            Unary::Hardswish => NodeKind::Hardswish,
            Unary::Hardsigmoid => NodeKind::Hardsigmoid,
            Unary::Silu => NodeKind::Silu,
            Unary::Sigmoid => NodeKind::Sigmoid,
            Unary::Gelu | Unary::GeluTanh => NodeKind::Gelu,
            Unary::Tanh => NodeKind::Tanh,
        }
    }
}

/// Two-operand arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
}

/// What a graph node computes.
#[derive(Debug, Clone)]
pub enum GraphOp {
    /// `nn.Conv2d`.
    Conv(Conv2d),
    /// `nn.BatchNorm2d` (running statistics).
    BatchNorm(BatchNorm2d),
    /// `nn.LayerNorm` over one dimension: the last (`dim = -1`, on a
    /// channels-last tensor) or the channels (`dim = 1`, ConvNeXt's
    /// `LayerNorm2d`).
    LayerNorm {
        /// `[C]`, or `None` without `elementwise_affine`.
        weight: Option<Tensor>,
        /// `[C]`.
        bias: Option<Tensor>,
        /// Added to the variance.
        eps: f64,
        /// The normalised dimension, as given (negative counts from the end).
        dim: isize,
        /// Its size.
        size: usize,
    },
    /// `nn.Linear`: on the last dimension of any rank (graph manifests), or
    /// only on a flat `[N, in]` input (the built-ins, whose manifests are
    /// told to add a flatten layer).
    Linear {
        /// `[out, in]`.
        weight: Tensor,
        /// `[out]`.
        bias: Option<Tensor>,
        /// Whether inputs of rank > 2 are taken.
        any_rank: bool,
    },
    /// ResNet-CIFAR "option A": `x[:, :, ::2, ::2]` then `pad` zero
    /// channels on each side. No parameters.
    ShortcutA {
        /// Zero channels added before and after.
        pad: usize,
    },
    /// Max or average pooling.
    Pool(Pool2d),
    /// Adaptive average pooling.
    AdaptiveAvgPool(AdaptiveAvgPool2d),
    /// Adaptive max pooling to `(h, w)`.
    AdaptiveMaxPool((usize, usize)),
    /// An elementwise function.
    Unary(Unary),
    /// Softmax over `dim`.
    Softmax {
        /// The dimension.
        dim: isize,
    },
    /// The identity at inference: dropout, dropout2d, stochastic depth,
    /// `nn.Identity`, `contiguous`. `kind` says which for the summary.
    Identity {
        /// What the node was in PyTorch.
        kind: NodeKind,
        /// Dropout probability (training).
        p: f32,
    },
    /// `torch.flatten(x, start_dim, end_dim)`.
    Flatten {
        /// First dimension merged.
        start: isize,
        /// Last dimension merged.
        end: isize,
    },
    /// Tensor–tensor (broadcasting) or tensor–scalar arithmetic.
    Binary {
        /// Which.
        op: BinOp,
        /// `Some((s, first))`: the other operand is the constant `s`,
        /// written before the tensor when `first` (`1 - x`).
        scalar: Option<(f64, bool)>,
    },
    /// `torch.cat(inputs, dim)`.
    Cat {
        /// The dimension.
        dim: isize,
    },
    /// `x.view(N, *shape)`: the batch dimension stays first.
    Reshape {
        /// The per-sample shape.
        shape: Vec<usize>,
    },
    /// `x.permute(dims)`.
    Permute {
        /// A permutation of `0..rank`.
        dims: Vec<usize>,
    },
    /// `x.transpose(a, b)`.
    Transpose {
        /// First dimension.
        a: isize,
        /// Second dimension.
        b: isize,
    },
    /// `x.narrow(dim, start, length)`: one piece of a chunk or split.
    Narrow {
        /// The dimension.
        dim: isize,
        /// First index.
        start: usize,
        /// How many.
        length: usize,
    },
    /// `x[..., start:end:step]` along one dimension.
    Slice {
        /// The dimension.
        dim: isize,
        /// First index.
        start: usize,
        /// One past the last index.
        end: usize,
        /// Stride (≥ 1).
        step: usize,
    },
    /// `F.pad(x, pad)` with zeros: `pad` as PyTorch gives it, (before,
    /// after) pairs from the last dimension backwards.
    Pad {
        /// `[last_before, last_after, second_last_before, ...]`.
        pad: Vec<usize>,
    },
    /// `x.mean(dims, keepdim)`.
    Mean {
        /// The dimensions averaged.
        dims: Vec<isize>,
        /// Keep them as size 1.
        keepdim: bool,
    },
    /// A learned tensor used as a value (ConvNeXt's layer scale).
    Parameter(Tensor),
}

fn norm_dim(dim: isize, rank: usize) -> Option<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    (0..rank as isize).contains(&d).then_some(d as usize)
}

/// A shape rule's failure, turned into [`crate::Error::Shape`] by the caller.
pub type ShapeResult<T> = std::result::Result<T, String>;

fn dim_of(dim: isize, shape: &[usize]) -> ShapeResult<usize> {
    norm_dim(dim, shape.len())
        .ok_or_else(|| format!("dimension {dim} is out of range for shape {shape:?}"))
}

/// numpy/PyTorch broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> ShapeResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let x = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let y = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

/// What a node's shape rule gives: its shape (with the batch of 1 for
/// activations), its receptive-field geometry, its multiply-accumulates.
pub struct Inferred {
    /// The full shape.
    pub shape: Vec<usize>,
    /// Receptive field and jump (meaningful for `[N, C, H, W]` maps).
    pub geo: Geo,
    /// Multiply-accumulates per image.
    pub macs: u64,
}

impl Inferred {
    fn with_geo(mut self, f: impl FnOnce(&mut Geo)) -> Self {
        f(&mut self.geo);
        self
    }
}

impl GraphOp {
    /// The summary's `kind`.
    pub fn kind(&self) -> NodeKind {
        match self {
            GraphOp::Conv(_) => NodeKind::Conv2d,
            GraphOp::BatchNorm(_) => NodeKind::BatchNorm2d,
            GraphOp::LayerNorm { .. } => NodeKind::LayerNorm,
            GraphOp::Linear { .. } => NodeKind::Linear,
            GraphOp::ShortcutA { .. } => NodeKind::Shortcut,
            GraphOp::Pool(p) if p.kind == PoolKind::Max => NodeKind::MaxPool2d,
            GraphOp::Pool(_) => NodeKind::AvgPool2d,
            GraphOp::AdaptiveAvgPool(_) => NodeKind::AdaptiveAvgPool2d,
            GraphOp::AdaptiveMaxPool(_) => NodeKind::AdaptiveMaxPool2d,
            GraphOp::Unary(u) => u.kind(),
            GraphOp::Softmax { .. } => NodeKind::Softmax,
            GraphOp::Identity { kind, .. } => *kind,
            GraphOp::Flatten { .. } => NodeKind::Flatten,
            GraphOp::Binary { op, .. } => match op {
                BinOp::Add => NodeKind::Add,
                BinOp::Sub => NodeKind::Sub,
                BinOp::Mul => NodeKind::Mul,
                BinOp::Div => NodeKind::Div,
            },
            GraphOp::Cat { .. } => NodeKind::Cat,
            GraphOp::Reshape { .. } => NodeKind::Reshape,
            GraphOp::Permute { .. } => NodeKind::Permute,
            GraphOp::Transpose { .. } => NodeKind::Transpose,
            GraphOp::Narrow { .. } => NodeKind::Narrow,
            GraphOp::Mean { .. } => NodeKind::Mean,
            GraphOp::Slice { .. } => NodeKind::Slice,
            GraphOp::Pad { .. } => NodeKind::Pad,
            GraphOp::Parameter(_) => NodeKind::Parameter,
        }
    }

    /// Learned values this node holds.
    pub fn params(&self) -> u64 {
        let n = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.elem_count()) as u64;
        match self {
            GraphOp::Conv(c) => c.params(),
            GraphOp::BatchNorm(b) => b.params(),
            GraphOp::LayerNorm { weight, bias, .. } => n(weight) + n(bias),
            GraphOp::Linear { weight, bias, .. } => weight.elem_count() as u64 + n(bias),
            GraphOp::Parameter(t) => t.elem_count() as u64,
            _ => 0,
        }
    }

    /// How many tensor inputs the node takes (`None`: any number ≥ 1).
    pub fn arity(&self) -> Option<usize> {
        match self {
            GraphOp::Parameter(_) => Some(0),
            GraphOp::Cat { .. } => None,
            GraphOp::Binary { scalar: None, .. } => Some(2),
            _ => Some(1),
        }
    }

    /// The shape rule. `inputs` are the inputs' full shapes and geometries.
    pub fn infer(&self, layer: &str, inputs: &[(&[usize], &Geo)]) -> ShapeResult<Inferred> {
        let plain = |shape: Vec<usize>, geo: &Geo| Inferred {
            geo: Geo {
                shape: shape.get(1..).map(<[usize]>::to_vec).unwrap_or_default(),
                ..geo.clone()
            },
            shape,
            macs: 0,
        };
        let spatial = |geo: Geo| Inferred {
            shape: std::iter::once(1)
                .chain(geo.shape.iter().copied())
                .collect(),
            geo,
            macs: 0,
        };
        let err = |e: crate::Error| match e {
            crate::Error::Shape { reason, .. } => reason,
            other => other.to_string(),
        };
        if let GraphOp::Parameter(t) = self {
            return Ok(Inferred {
                shape: t.dims().to_vec(),
                geo: Geo::input(1, 1, 1),
                macs: 0,
            });
        }
        let (x, g) = inputs[0];
        let four_d = || {
            if x.len() == 4 {
                Ok(())
            } else {
                Err(format!(
                    "expects an [N, C, H, W] feature map but receives shape {x:?}"
                ))
            }
        };
        Ok(match self {
            GraphOp::Conv(c) => {
                four_d()?;
                let geo = c.geometry(layer, g).map_err(err)?;
                let macs = c.macs(&geo);
                Inferred {
                    macs,
                    ..spatial(geo)
                }
            }
            GraphOp::BatchNorm(b) => {
                four_d()?;
                spatial(b.geometry(layer, g).map_err(err)?)
            }
            GraphOp::Pool(p) => {
                four_d()?;
                spatial(p.geometry(layer, g).map_err(err)?)
            }
            GraphOp::AdaptiveAvgPool(p) => {
                four_d()?;
                spatial(p.geometry(layer, g).map_err(err)?)
            }
            GraphOp::AdaptiveMaxPool(out) => {
                four_d()?;
                let pool = AdaptiveAvgPool2d { output: *out };
                spatial(pool.geometry(layer, g).map_err(err)?)
            }
            GraphOp::LayerNorm { dim, size, .. } => {
                let d = dim_of(*dim, x)?;
                if x[d] != *size {
                    return Err(format!(
                        "normalises {size} features along dim {dim} but the input has shape {x:?}"
                    ));
                }
                plain(x.to_vec(), g)
            }
            GraphOp::Linear {
                weight,
                any_rank: false,
                ..
            } => {
                let (o, i) = weight.dims2().map_err(|e| e.to_string())?;
                match x[1..] {
                    [n] if n == i => {}
                    [n] => return Err(format!("expects {i} input features but receives {n}")),
                    _ => {
                        return Err(format!(
                            "expects a flat input of {i} features but receives shape {:?} (= {} values); add a flatten layer before it",
                            &x[1..],
                            x[1..].iter().product::<usize>()
                        ));
                    }
                }
                Inferred {
                    macs: (i * o) as u64,
                    ..plain(vec![1, o], g)
                }
            }
            GraphOp::ShortcutA { pad } => match x[1..] {
                [c, h, w] => plain(vec![1, c + 2 * pad, h.div_ceil(2), w.div_ceil(2)], g)
                    .with_geo(|geo| geo.jump = (g.jump.0 * 2, g.jump.1 * 2)),
                _ => return Err(format!("expects [C, H, W], got {:?}", &x[1..])),
            },
            GraphOp::Linear { weight, .. } => {
                let (o, i) = weight.dims2().map_err(|e| e.to_string())?;
                match x.last() {
                    Some(&n) if n == i && x.len() >= 2 => {}
                    _ => {
                        return Err(format!(
                            "expects {i} input features in the last dimension but receives shape {x:?}"
                        ));
                    }
                }
                let mut shape = x.to_vec();
                *shape.last_mut().expect("rank >= 2") = o;
                let rows: usize = x[1..x.len() - 1].iter().product();
                Inferred {
                    macs: (rows * i * o) as u64,
                    ..plain(shape, g)
                }
            }
            GraphOp::Unary(_) | GraphOp::Identity { .. } => plain(x.to_vec(), g),
            GraphOp::Softmax { dim } => {
                dim_of(*dim, x)?;
                plain(x.to_vec(), g)
            }
            GraphOp::Flatten { start, end } => {
                let (s, e) = (dim_of(*start, x)?, dim_of(*end, x)?);
                if s > e {
                    return Err(format!("start_dim {start} is after end_dim {end}"));
                }
                if s == 0 {
                    return Err("flattening the batch dimension (start_dim must be >= 1)".into());
                }
                let mut shape = x[..s].to_vec();
                shape.push(x[s..=e].iter().product());
                shape.extend_from_slice(&x[e + 1..]);
                let mut out = plain(shape, g);
                if x.len() == 4 && out.shape.len() == 2 {
                    // Each flat unit sees the whole map.
                    out.geo.rf = (
                        g.rf.0 + (x[2] - 1) * g.jump.0,
                        g.rf.1 + (x[3] - 1) * g.jump.1,
                    );
                }
                out
            }
            GraphOp::Binary {
                scalar: Some(_), ..
            } => plain(x.to_vec(), g),
            GraphOp::Binary { scalar: None, .. } => {
                let (y, gy) = inputs[1];
                let shape = broadcast(x, y)?;
                let mut out = plain(shape, g);
                out.geo.rf = (g.rf.0.max(gy.rf.0), g.rf.1.max(gy.rf.1));
                out
            }
            GraphOp::Cat { dim } => {
                let d = dim_of(*dim, x)?;
                if d == 0 {
                    return Err("concatenating along the batch dimension".into());
                }
                let mut shape = x.to_vec();
                shape[d] = 0;
                let mut rf = g.rf;
                for (y, gy) in inputs {
                    let same_rank = y.len() == x.len();
                    let others_match = same_rank
                        && y.iter()
                            .zip(x.iter())
                            .enumerate()
                            .all(|(i, (a, b))| i == d || a == b);
                    if !others_match {
                        return Err(format!(
                            "inputs of shapes {x:?} and {y:?} cannot be concatenated along dim {dim}"
                        ));
                    }
                    shape[d] += y[d];
                    rf = (rf.0.max(gy.rf.0), rf.1.max(gy.rf.1));
                }
                let mut out = plain(shape, g);
                out.geo.rf = rf;
                out
            }
            GraphOp::Reshape { shape } => {
                let have: usize = x[1..].iter().product();
                let want: usize = shape.iter().product();
                if have != want {
                    return Err(format!(
                        "cannot view {:?} ({have} values per sample) as {shape:?} ({want})",
                        &x[1..]
                    ));
                }
                plain(std::iter::once(1).chain(shape.iter().copied()).collect(), g)
            }
            GraphOp::Permute { dims } => {
                let mut seen = dims.clone();
                seen.sort_unstable();
                if seen != (0..x.len()).collect::<Vec<_>>() || dims[0] != 0 {
                    return Err(format!(
                        "dims {dims:?} are not a permutation of 0..{} that keeps the batch first",
                        x.len()
                    ));
                }
                plain(dims.iter().map(|&d| x[d]).collect(), g)
            }
            GraphOp::Transpose { a, b } => {
                let (a, b) = (dim_of(*a, x)?, dim_of(*b, x)?);
                if a == 0 || b == 0 {
                    return Err("transposing the batch dimension".into());
                }
                let mut shape = x.to_vec();
                shape.swap(a, b);
                plain(shape, g)
            }
            GraphOp::Narrow { dim, start, length } => {
                let d = dim_of(*dim, x)?;
                if d == 0 || start + length > x[d] || *length == 0 {
                    return Err(format!(
                        "narrow({dim}, {start}, {length}) does not fit shape {x:?}"
                    ));
                }
                let mut shape = x.to_vec();
                shape[d] = *length;
                plain(shape, g)
            }
            GraphOp::Slice {
                dim,
                start,
                end,
                step,
            } => {
                let d = dim_of(*dim, x)?;
                if d == 0 || *step == 0 || start >= end || *end > x[d] {
                    return Err(format!(
                        "slice {start}:{end}:{step} along dim {dim} does not fit shape {x:?}"
                    ));
                }
                let mut shape = x.to_vec();
                shape[d] = (end - start).div_ceil(*step);
                let mut out = plain(shape, g);
                if x.len() == 4 && d >= 2 {
                    let j = &mut out.geo.jump;
                    if d == 2 {
                        j.0 *= step;
                    } else {
                        j.1 *= step;
                    }
                }
                out
            }
            GraphOp::Pad { pad } => {
                if pad.len() % 2 == 1 || pad.len() / 2 >= x.len() {
                    return Err(format!(
                        "pad {pad:?} must give (before, after) pairs for at most {} trailing dimensions",
                        x.len() - 1
                    ));
                }
                let mut shape = x.to_vec();
                for (k, lr) in pad.chunks(2).enumerate() {
                    let d = x.len() - 1 - k;
                    shape[d] += lr[0] + lr[1];
                }
                plain(shape, g)
            }
            GraphOp::Mean { dims, keepdim } => {
                let mut ds = dims
                    .iter()
                    .map(|&d| dim_of(d, x))
                    .collect::<ShapeResult<Vec<_>>>()?;
                ds.sort_unstable();
                ds.dedup();
                if ds.first() == Some(&0) {
                    return Err("averaging over the batch dimension".into());
                }
                let shape: Vec<usize> = if *keepdim {
                    x.iter()
                        .enumerate()
                        .map(|(i, &n)| if ds.contains(&i) { 1 } else { n })
                        .collect()
                } else {
                    x.iter()
                        .enumerate()
                        .filter(|(i, _)| !ds.contains(i))
                        .map(|(_, &n)| n)
                        .collect()
                };
                let mut out = plain(shape, g);
                if x.len() == 4 && ds == [2, 3] {
                    out.geo.rf = (
                        g.rf.0 + (x[2] - 1) * g.jump.0,
                        g.rf.1 + (x[3] - 1) * g.jump.1,
                    );
                }
                out
            }
            GraphOp::Parameter(_) => unreachable!("handled above"),
        })
    }

    /// The forward computation.
    pub fn forward(&self, inputs: &[&Tensor]) -> candle_core::Result<Tensor> {
        if let GraphOp::Parameter(t) = self {
            return Ok(t.clone());
        }
        let x = inputs[0];
        let rank = x.rank();
        let dim = |d: isize| {
            norm_dim(d, rank).ok_or_else(|| {
                candle_core::Error::Msg(format!("dimension {d} out of range for rank {rank}"))
            })
        };
        match self {
            GraphOp::Conv(c) => c.forward(x),
            GraphOp::BatchNorm(b) => b.forward(x),
            GraphOp::LayerNorm {
                weight,
                bias,
                eps,
                dim: d,
                size,
            } => layer_norm(x, dim(*d)?, *size, weight.as_ref(), bias.as_ref(), *eps),
            GraphOp::ShortcutA { pad } => {
                let (_, _, h, w) = x.dims4()?;
                let even = |n: usize| {
                    let idx: Vec<u32> = (0..n as u32).step_by(2).collect();
                    Tensor::new(idx.as_slice(), x.device())
                };
                x.index_select(&even(h)?, 2)?
                    .index_select(&even(w)?, 3)?
                    .pad_with_zeros(1, *pad, *pad)
            }
            GraphOp::Linear { weight, bias, .. } => {
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let flat = x.contiguous()?.reshape((rows, dims[dims.len() - 1]))?;
                let mut y = flat.matmul(&weight.t()?)?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                let mut out = dims;
                *out.last_mut().expect("rank >= 2") = weight.dim(0)?;
                y.reshape(out)
            }
            GraphOp::Pool(p) => p.forward(x),
            GraphOp::AdaptiveAvgPool(p) => p.forward(x),
            GraphOp::AdaptiveMaxPool(out) => adaptive_max(x, *out),
            GraphOp::Unary(u) => u.forward(x),
            GraphOp::Softmax { dim: d } => candle_nn::ops::softmax(x, dim(*d)?),
            GraphOp::Identity { .. } => Ok(x.clone()),
            GraphOp::Flatten { start, end } => {
                let (s, e) = (dim(*start)?, dim(*end)?);
                let dims = x.dims();
                let mut shape = dims[..s].to_vec();
                shape.push(dims[s..=e].iter().product());
                shape.extend_from_slice(&dims[e + 1..]);
                x.reshape(shape)
            }
            GraphOp::Binary { op, scalar } => match scalar {
                None => {
                    let y = inputs[1];
                    match op {
                        BinOp::Add => x.broadcast_add(y),
                        BinOp::Sub => x.broadcast_sub(y),
                        BinOp::Mul => crate::kernels::elementwise::mul(x, y),
                        BinOp::Div => x.broadcast_div(y),
                    }
                }
                Some((s, first)) => {
                    let s = *s;
                    match (op, first) {
                        (BinOp::Add, _) => x + s,
                        (BinOp::Sub, false) => x - s,
                        (BinOp::Sub, true) => x.neg()? + s,
                        (BinOp::Mul, _) => x * s,
                        (BinOp::Div, false) => x / s,
                        (BinOp::Div, true) => x.recip()? * s,
                    }
                }
            },
            GraphOp::Cat { dim: d } => Tensor::cat(inputs, dim(*d)?),
            GraphOp::Reshape { shape } => {
                let full: Vec<usize> = std::iter::once(x.dim(0)?)
                    .chain(shape.iter().copied())
                    .collect();
                x.contiguous()?.reshape(full)
            }
            GraphOp::Permute { dims } => x.permute(dims.as_slice())?.contiguous(),
            GraphOp::Transpose { a, b } => x.transpose(dim(*a)?, dim(*b)?)?.contiguous(),
            GraphOp::Narrow {
                dim: d,
                start,
                length,
            } => x.narrow(dim(*d)?, *start, *length),
            GraphOp::Slice {
                dim: d,
                start,
                end,
                step,
            } => {
                let d = dim(*d)?;
                let y = x.narrow(d, *start, end - start)?;
                if *step == 1 {
                    return Ok(y);
                }
                let idx: Vec<u32> = (0..(end - start) as u32).step_by(*step).collect();
                y.contiguous()?
                    .index_select(&Tensor::new(idx.as_slice(), x.device())?, d)
            }
            GraphOp::Pad { pad } => {
                let mut y = x.clone();
                for (k, lr) in pad.chunks(2).enumerate() {
                    y = y.pad_with_zeros(rank - 1 - k, lr[0], lr[1])?;
                }
                Ok(y)
            }
            GraphOp::Mean { dims, keepdim } => {
                let mut ds = dims
                    .iter()
                    .map(|&d| dim(d))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                ds.sort_unstable();
                ds.dedup();
                let mut y = x.clone();
                for &d in ds.iter().rev() {
                    y = if *keepdim {
                        y.mean_keepdim(d)?
                    } else {
                        y.mean(d)?
                    };
                }
                Ok(y)
            }
            GraphOp::Parameter(_) => unreachable!("handled above"),
        }
    }
}

/// `(x − mean) / sqrt(var + eps) · w + b` over `dim`, the biased variance,
/// as `torch.nn.functional.layer_norm`.
fn layer_norm(
    x: &Tensor,
    dim: usize,
    size: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(dim)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(dim)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let along = |t: &Tensor| {
        let mut shape = vec![1; x.rank()];
        shape[dim] = size;
        t.reshape(shape)
    };
    if let Some(w) = weight {
        y = y.broadcast_mul(&along(w)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&along(b)?)?;
    }
    Ok(y)
}

/// Adaptive max pooling: PyTorch's bins, rows then columns (the bins are
/// separable, so the maximum of the row maxima is the window's).
fn adaptive_max(x: &Tensor, (oh, ow): (usize, usize)) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let rows = crate::layers::adaptive_bins(x, 2, h, oh, true)?;
    crate::layers::adaptive_bins(&rows, 3, w, ow, true)
}
