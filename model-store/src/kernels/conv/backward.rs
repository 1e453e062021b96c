//! The gradients of one image: input (`Wᵀ·G`, then col2im) and weight
//! (`G·colᵀ`), and their depthwise forms.

use std::sync::Arc;

use super::im2col::*;
use super::*;
use crate::kernels::winograd::{self, WinogradOp};

/// The input gradient of a stride-1 convolution as a convolution itself:
/// `dx = conv(G, W')` with `W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j]` and
/// padding `k − 1 − p` on each side. It then runs on the forward's fast
/// kernels (direct, packed on the fly) instead of `Wᵀ·G` and a col2im
/// scatter per image: a ResNet's 3×3 layers are most of its backward pass.
pub(super) struct Transposed {
    op: ConvOp,
}

impl ConvOp {
    /// The transposed convolution of this one's input gradient, when it
    /// applies: one group, stride and dilation 1, a kernel larger than 1×1
    /// (a 1×1's gradient is already one product), padding below the kernel.
    pub(super) fn transposed(&self, d: &Dims) -> Option<Transposed> {
        let (t, b, l, r) = self.padding;
        let fits = t < d.kh && b < d.kh && l < d.kw && r < d.kw;
        (self.groups == 1
            && self.stride == (1, 1)
            && self.dilation == (1, 1)
            && d.kh * d.kw > 1
            && fits
            && d.oh + d.kh - 1 == d.h + t + b
            && d.ow + d.kw - 1 == d.w + l + r)
            .then(|| Transposed {
                op: ConvOp {
                    stride: (1, 1),
                    dilation: (1, 1),
                    padding: (d.kh - 1 - t, d.kh - 1 - b, d.kw - 1 - l, d.kw - 1 - r),
                    groups: 1,
                    activation: Activation::Identity,
                },
            })
    }
}

impl Transposed {
    /// `dx` `[N, C, H, W]` from the masked output gradient `g` `[N, O, oh, ow]`.
    /// `winograd` is [`crate::kernels::winograd::transform_transposed`] of
    /// `w`, made once per model: with it a 3×3 layer runs as Winograd (made
    /// per call, the transform cost more than it saved).
    pub(super) fn input_grad(
        &self,
        d: &Dims,
        w: &[f32],
        g: &[f32],
        winograd: Option<&Arc<[f32]>>,
    ) -> Vec<f32> {
        let dims = Dims {
            n: d.n,
            c: d.o,
            h: d.oh,
            w: d.ow,
            o: d.c,
            kh: d.kh,
            kw: d.kw,
            oh: d.h,
            ow: d.w,
            cg: d.o,
            og: d.c,
        };
        if let Some(u) = winograd
            .filter(|u| winograd::eligible(&self.op, d.kh, d.kw) && u.len() == 16 * d.c * d.o)
        {
            let op = WinogradOp {
                base: self.op,
                u: u.clone(),
            };
            return op.forward(&dims, g, &[]);
        }
        let flipped = flip_weights(w, d.o, d.c, d.kh * d.kw);
        self.op.forward(&dims, g, &flipped, &[], None)
    }
}

/// `W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j]` for an `[O, C, kh, kw]`
/// weight of `kk = kh·kw` taps: the transposed convolution's kernel.
pub(in crate::kernels) fn flip_weights(w: &[f32], o: usize, c: usize, kk: usize) -> Vec<f32> {
    let mut flipped = vec![0f32; w.len()];
    for oc in 0..o {
        for ic in 0..c {
            let from = &w[(oc * c + ic) * kk..][..kk];
            let to = &mut flipped[(ic * o + oc) * kk..][..kk];
            for (i, v) in from.iter().enumerate() {
                to[kk - 1 - i] = *v;
            }
        }
    }
    flipped
}

impl ConvOp {
    /// `dx` for one image from its masked output gradient `g` `[O, P]`.
    pub(super) fn input_grad_image(&self, d: &Dims, w: &[f32], g: &[f32], dx: &mut [f32]) {
        let (k, p) = (d.k(), d.p());
        let plane = d.h * d.w;
        let mut dcol = vec![0f32; if self.pointwise(d) { 0 } else { k * p }];
        for grp in 0..self.groups {
            let wt = Mat {
                data: &w[grp * d.og * k..(grp + 1) * d.og * k],
                rows: k,
                cols: d.og,
                rs: 1,
                cs: k,
            };
            let gg = Mat {
                data: &g[grp * d.og * p..(grp + 1) * d.og * p],
                rows: d.og,
                cols: p,
                rs: p,
                cs: 1,
            };
            let dxg = &mut dx[grp * d.cg * plane..(grp + 1) * d.cg * plane];
            if self.pointwise(d) {
                matmul(dxg, wt, gg, false, 1);
            } else {
                matmul(&mut dcol, wt, gg, false, 1);
                for (r, row) in dcol.chunks(p).enumerate() {
                    col2im_row(d, self, row, r, dxg);
                }
            }
        }
    }

    /// `dW += G · colᵀ` for one image.
    pub(super) fn weight_grad_image(
        &self,
        d: &Dims,
        x: &[f32],
        g: &[f32],
        dw: &mut [f32],
        col: &mut Vec<f32>,
    ) {
        let (k, p) = (d.k(), d.p());
        for grp in 0..self.groups {
            let xg = &x[grp * d.cg * d.h * d.w..(grp + 1) * d.cg * d.h * d.w];
            let cols = if self.pointwise(d) {
                xg
            } else {
                col.resize(k * p, 0.0);
                im2col(d, self, xg, col, 1);
                &col[..]
            };
            matmul(
                &mut dw[grp * d.og * k..(grp + 1) * d.og * k],
                Mat {
                    data: &g[grp * d.og * p..(grp + 1) * d.og * p],
                    rows: d.og,
                    cols: p,
                    rs: p,
                    cs: 1,
                },
                Mat {
                    data: cols,
                    rows: p,
                    cols: k,
                    rs: 1,
                    cs: p,
                },
                true,
                1,
            );
        }
    }

    /// Depthwise input gradient of one plane.
    pub(super) fn depthwise_input_grad(&self, d: &Dims, w: &[f32], g: &[f32], dx: &mut [f32]) {
        let sw = self.stride.1;
        for ky in 0..d.kh {
            for kx in 0..d.kw {
                let wv = w[ky * d.kw + kx];
                let (ox0, ox1, off) = column_span(d, self, kx);
                for (oy, src) in g.chunks_exact(d.ow).enumerate() {
                    let Some(iy) = input_row(d, self, oy, ky) else {
                        continue;
                    };
                    let dst = &mut dx[iy * d.w..(iy + 1) * d.w];
                    let first = ((ox0 * sw) as isize + off) as usize;
                    for (j, v) in src[ox0..ox1].iter().enumerate() {
                        dst[first + j * sw] += wv * v;
                    }
                }
            }
        }
    }

    /// Depthwise weight gradient of one plane, added to `dw` `[kh * kw]`.
    pub(super) fn depthwise_weight_grad(&self, d: &Dims, x: &[f32], g: &[f32], dw: &mut [f32]) {
        let sw = self.stride.1;
        for ky in 0..d.kh {
            for kx in 0..d.kw {
                let (ox0, ox1, off) = column_span(d, self, kx);
                let mut acc = 0f32;
                for (oy, src) in g.chunks_exact(d.ow).enumerate() {
                    let Some(iy) = input_row(d, self, oy, ky) else {
                        continue;
                    };
                    let row = &x[iy * d.w..(iy + 1) * d.w];
                    let first = ((ox0 * sw) as isize + off) as usize;
                    for (j, v) in src[ox0..ox1].iter().enumerate() {
                        acc += v * row[first + j * sw];
                    }
                }
                dw[ky * d.kw + kx] += acc;
            }
        }
    }
}
