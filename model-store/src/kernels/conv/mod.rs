//! 2-D convolution on the CPU: im2col + one gemm per image and group, with
//! the bias and the activation fused into the pass that writes the output,
//! and a backward that computes only the gradients somebody asked for.
//!
//! candle 0.11's CPU convolution gathers its im2col tiles and scatters the
//! result element by element (several times the cost of its gemm), runs
//! grouped convolutions as a loop of convolutions plus a `cat`, and
//! differentiates through `conv_transpose2d`, a loop without gemm, always
//! computing the weight gradient too. Here:
//! - the forward writes each im2col row with whole-row copies (zero borders
//!   for the padding), multiplies with [`gemm`] straight into the NCHW
//!   output, then adds the bias and applies ReLU/ReLU6 in one pass;
//!   1×1 stride-1 unpadded convolutions skip the im2col entirely;
//! - at the AVX2 and AVX-512 tiers, stride-1 convolutions other than
//!   unpadded 1×1 ones take the direct kernel of `direct.rs` instead of
//!   gemm (depthwise never, grouped ones with whole blocks of 8 output
//!   channels a group): it reads the windows of a zero-padded copy of the
//!   input in place (no im2col at all). The others, when the positions per
//!   image are whole vectors of 16, take it too, reading the im2col rows
//!   (a 1×1's input) where gemm would pack them again: at AVX-512 always,
//!   at AVX2 below 64 rows, gemm being faster on more. The bias and
//!   activation are applied in its registers; the predict path packs the
//!   weights once at load ([`pack_weights`], [`PackedConvOp`]);
//! - depthwise convolutions (one input and one output channel per group)
//!   have their own direct kernel;
//! - the backward masks the gradient by the fused activation, then computes
//!   the input gradient (`Wᵀ·G`, then col2im) only when the input is
//!   tracked (a `Var`, or computed from one), the weight gradient (`G·colᵀ`)
//!   only when the weight is, and the bias gradient only when the bias is;
//! - a batch is spread over the rayon pool one image per task; a single
//!   image lets gemm use the pool instead.
//!
//! Other devices and dtypes take candle's own ops (see
//! [`crate::layers::Conv2d::forward`]); the randomized tests below hold this
//! kernel to that reference.

mod backward;
mod forward;
mod im2col;
mod packed;
mod plan;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::direct;
pub(super) use backward::flip_weights;
pub(super) use im2col::{Mat, matmul};
pub use packed::{PackedConvOp, pack_weights, packs};

pub use super::activation::Activation;

/// The convolution's geometry; applied with `Tensor::apply_op3(weight, bias)`
/// where an empty bias (`[0]`) means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvOp {
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Dilation `(h, w)`.
    pub dilation: (usize, usize),
    /// Zero padding `(top, bottom, left, right)`.
    pub padding: (usize, usize, usize, usize),
    /// Groups.
    pub groups: usize,
    /// Fused activation.
    pub activation: Activation,
}

/// Every size one call works with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Input channels per group.
    pub(super) cg: usize,
    /// Output channels per group.
    pub(super) og: usize,
}

impl Dims {
    /// im2col rows: one per (input channel of the group, ky, kx).
    fn k(&self) -> usize {
        self.cg * self.kh * self.kw
    }
    /// Output positions per image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }
}

/// The input, weight and bias of a convolution as f32 slices, the bias
/// empty (none) or one value per output channel.
pub(super) fn operands<'a>(
    d: &Dims,
    x: (&'a CpuStorage, &Layout),
    w: (&'a CpuStorage, &Layout),
    b: (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let (x, w, b) = (
        f32_slice(x.0, x.1, "input")?,
        f32_slice(w.0, w.1, "weight")?,
        f32_slice(b.0, b.1, "bias")?,
    );
    if !b.is_empty() && b.len() != d.o {
        bail!(
            "conv2d: the bias has {} values for {} channels",
            b.len(),
            d.o
        );
    }
    Ok((x, w, b))
}

pub(super) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        bail!("conv2d: the {what} must be f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("conv2d: the {what} must be contiguous"),
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "convscope-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward(xs, xl, ws, wl, bs, bl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, bias, res, grad_res, None)
    }
}

impl ConvOp {
    /// The gradients [`CustomOp3::bwd`] returns; `winograd` as for
    /// [`backward::Transposed::input_grad`].
    pub(super) fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
        winograd: Option<&Arc<[f32]>>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.layout(), w.layout())?;
        let p = d.p();
        let g = if self.activation == Activation::Identity {
            to_vec(grad_res)?
        } else {
            // The smooth activations' slope needs the value before them:
            // the convolution again, without the activation.
            let z = if self.activation.needs_input() {
                let linear = Self {
                    activation: Activation::Identity,
                    ..*self
                };
                linear.forward(&d, &to_vec(x)?, &to_vec(w)?, &to_vec(bias)?, None)
            } else {
                Vec::new()
            };
            self.activation.mask_gradient(res, grad_res, &z)?
        };
        let db = (bias.elem_count() > 0 && bias.track_op())
            .then(|| {
                let mut db = vec![0f32; d.o];
                for (plane, gs) in g.chunks(p).enumerate() {
                    db[plane % d.o] += gs.iter().sum::<f32>();
                }
                Tensor::from_vec(db, d.o, bias.device())
            })
            .transpose()?;
        let want_x = x.track_op();
        let want_w = w.track_op();
        let wv = if want_x || want_w {
            to_vec(w)?
        } else {
            Vec::new()
        };
        let in_image = d.c * d.h * d.w;
        let out_image = d.o * p;
        let dx = want_x
            .then(|| {
                if let Some(t) = self.transposed(&d) {
                    return Tensor::from_vec(
                        t.input_grad(&d, &wv, &g, winograd),
                        x.shape(),
                        x.device(),
                    );
                }
                let mut dx = vec![0f32; d.n * in_image];
                if self.depthwise(&d) {
                    dx.par_chunks_mut(d.h * d.w)
                        .enumerate()
                        .for_each(|(plane, dxs)| {
                            let ch = plane % d.c;
                            self.depthwise_input_grad(
                                &d,
                                &wv[ch * d.kh * d.kw..(ch + 1) * d.kh * d.kw],
                                &g[plane * p..(plane + 1) * p],
                                dxs,
                            );
                        });
                } else {
                    dx.par_chunks_mut(in_image)
                        .enumerate()
                        .for_each(|(img, dxs)| {
                            self.input_grad_image(
                                &d,
                                &wv,
                                &g[img * out_image..(img + 1) * out_image],
                                dxs,
                            )
                        });
                }
                Tensor::from_vec(dx, x.shape(), x.device())
            })
            .transpose()?;
        let dw = if want_w {
            let xv = to_vec(x)?;
            let wlen = wv.len();
            let dw = if self.depthwise(&d) {
                let mut dw = vec![0f32; wlen];
                let kk = d.kh * d.kw;
                dw.par_chunks_mut(kk).enumerate().for_each(|(ch, dws)| {
                    for img in 0..d.n {
                        let plane = img * d.c + ch;
                        self.depthwise_weight_grad(
                            &d,
                            &xv[plane * d.h * d.w..(plane + 1) * d.h * d.w],
                            &g[plane * p..(plane + 1) * p],
                            dws,
                        );
                    }
                });
                dw
            } else {
                // One partial sum per task, added at the end.
                let chunk = d.n.div_ceil(rayon::current_num_threads()).max(1);
                let partials: Vec<Vec<f32>> = (0..d.n)
                    .step_by(chunk)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map(|start| {
                        let mut dw = vec![0f32; wlen];
                        let mut col = Vec::new();
                        for img in start..(start + chunk).min(d.n) {
                            self.weight_grad_image(
                                &d,
                                &xv[img * in_image..(img + 1) * in_image],
                                &g[img * out_image..(img + 1) * out_image],
                                &mut dw,
                                &mut col,
                            );
                        }
                        dw
                    })
                    .collect();
                let mut dw = vec![0f32; wlen];
                for part in partials {
                    for (a, b) in dw.iter_mut().zip(part) {
                        *a += b;
                    }
                }
                dw
            };
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
