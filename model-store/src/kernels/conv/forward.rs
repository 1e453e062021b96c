//! The forward pass: per image and group, depthwise planes, the padded
//! stride-1 path, bias and activation fused into the pass that writes.

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::im2col::*;
use super::plan::*;
use super::*;
use crate::kernels::tier::Tier;

impl ConvOp {
    /// A 1×1, stride-1, unpadded convolution: the input is its own im2col.
    pub(super) fn pointwise(&self, d: &Dims) -> bool {
        d.kh == 1
            && d.kw == 1
            && self.stride == (1, 1)
            && self.padding == (0, 0, 0, 0)
            && d.oh == d.h
            && d.ow == d.w
    }

    pub(super) fn depthwise(&self, d: &Dims) -> bool {
        d.cg == 1 && d.og == 1
    }

    pub(in crate::kernels) fn dims(&self, x: &Layout, w: &Layout) -> Result<Dims> {
        let (n, c, h, wd) = x.shape().dims4()?;
        let (o, cg, kh, kw) = w.shape().dims4()?;
        let g = self.groups;
        if g == 0 || c % g != 0 || o % g != 0 || c / g != cg {
            bail!(
                "conv2d: input [{n}, {c}, {h}, {wd}] and weight [{o}, {cg}, {kh}, {kw}] do not fit groups={g}"
            );
        }
        let (t, b, l, r) = self.padding;
        let (eh, ew) = (
            self.dilation.0 * (kh - 1) + 1,
            self.dilation.1 * (kw - 1) + 1,
        );
        if h + t + b < eh || wd + l + r < ew || self.stride.0 == 0 || self.stride.1 == 0 {
            bail!("conv2d: a {kh}x{kw} kernel does not fit the padded {h}x{wd} input");
        }
        Ok(Dims {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            oh: (h + t + b - eh) / self.stride.0 + 1,
            ow: (wd + l + r - ew) / self.stride.1 + 1,
            cg,
            og: o / g,
        })
    }

    /// One image, by the plan's path.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn image(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        plan: &Plan,
        bias: &[f32],
        out: &mut [f32],
        threads: usize,
    ) {
        match plan {
            Plan::Padded(padded) => self.forward_image_padded(d, x, w, padded, bias, out, threads),
            Plan::General(gemmless) => {
                self.forward_image(d, x, w, gemmless.as_ref(), bias, out, threads)
            }
        }
    }

    /// One image's output `[O, P]` from its input `[C, H, W]`, before the
    /// bias and activation. `threads` goes to gemm.
    ///
    /// With `gemmless` (one group, whole vectors of positions), the product
    /// is [`direct`]'s instead of gemm's, epilogue included.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_image(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        gemmless: Option<&Direct>,
        bias: &[f32],
        out: &mut [f32],
        threads: usize,
    ) {
        let (k, p) = (d.k(), d.p());
        if let Some(dir) = gemmless {
            if self.pointwise(d) {
                dir.run(d, x, out, p, bias, self.activation, threads);
            } else {
                // Each group's im2col after the previous one's.
                let plane = d.cg * d.h * d.w;
                with_scratch(self.groups * k * p, NO_PADDED_INPUT, |col, _| {
                    for (g, col) in col.chunks_exact_mut(k * p).enumerate() {
                        im2col(d, self, &x[g * plane..(g + 1) * plane], col, threads);
                    }
                    dir.run(d, col, out, p, bias, self.activation, threads);
                });
            }
            return;
        }
        let col_len = if self.pointwise(d) { 0 } else { k * p };
        with_scratch(col_len, NO_PADDED_INPUT, |col, _| {
            for g in 0..self.groups {
                let xg = &x[g * d.cg * d.h * d.w..(g + 1) * d.cg * d.h * d.w];
                let rhs = if self.pointwise(d) {
                    xg
                } else {
                    im2col(d, self, xg, col, threads);
                    &col[..]
                };
                matmul(
                    &mut out[g * d.og * p..(g + 1) * d.og * p],
                    Mat {
                        data: &w[g * d.og * k..(g + 1) * d.og * k],
                        rows: d.og,
                        cols: k,
                        rs: k,
                        cs: 1,
                    },
                    Mat {
                        data: rhs,
                        rows: k,
                        cols: p,
                        rs: p,
                        cs: 1,
                    },
                    false,
                    threads,
                );
            }
        });
    }

    /// Stride 1 without groups: the im2col of a zero-padded copy of the
    /// input, computed over every padded column. Each im2col row is then
    /// one contiguous copy (`OH · Wp` values) instead of one per output row,
    /// and the `kw − 1` extra columns per row are dropped by the epilogue
    /// that adds the bias and applies the activation.
    ///
    /// Grouped convolutions take it only with the direct kernel
    /// (`direct`), when [`Self::direct_groups`].
    pub(super) fn padded_path(&self, d: &Dims, direct: bool) -> bool {
        self.stride == (1, 1)
            && (self.groups == 1 || direct && self.direct_groups(d))
            && !self.pointwise(d)
            && !self.depthwise(d)
    }

    /// Whether the general path (not [`Self::padded_path`]) runs the
    /// direct kernel at `tier` rather than gemm: whole vectors of
    /// positions, groups it takes, and rows [`direct_takes_rows`].
    pub(super) fn general_direct(&self, d: &Dims, tier: Tier) -> bool {
        direct_takes_rows(tier, d.k())
            && self.direct_groups(d)
            && d.p().is_multiple_of(direct::LANES)
    }

    /// Whether [`Self::forward_by`] at `tier` runs the direct kernel, which
    /// reads the weights [`super::packs`] says to pack at load.
    #[cfg(test)]
    pub(super) fn runs_direct(&self, d: &Dims, tier: Tier) -> bool {
        direct::kernel_at(tier.min(Tier::detected()))
            .filter(|_| d.k() > 0)
            .is_some_and(|t| self.padded_path(d, true) || self.general_direct(d, t))
    }

    /// Whether the direct kernel takes these groups: one group, or whole
    /// blocks of [`direct::MR`] output channels per group (ResNeXt's and
    /// RegNet's grouped 3×3 convolutions from 8 channels a group), so that
    /// a block reads one group's rows.
    pub(super) fn direct_groups(&self, d: &Dims) -> bool {
        self.groups == 1 || (!self.depthwise(d) && d.og.is_multiple_of(direct::MR))
    }

    /// One image through [`Self::padded_path`], epilogue included: the
    /// product by [`direct`] when the plan has it, else by im2col + gemm.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_image_padded(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        plan: &Padded,
        bias: &[f32],
        out: &mut [f32],
        threads: usize,
    ) {
        let (t, _, l, _) = self.padding;
        let (hp, wp, np) = (plan.hp, plan.wp, plan.np);
        let (k, p) = (d.k(), d.p());
        with_scratch(plan.scratch(d), plan.key(self, d), |buf, zeroed| {
            let (xp, rest) = buf.split_at_mut(plan.xp_len);
            if !zeroed {
                xp.fill(0.0);
            }
            for c in 0..d.c {
                for y in 0..d.h {
                    let at = (c * hp + y + t) * wp + l;
                    xp[at..at + d.w].copy_from_slice(&x[(c * d.h + y) * d.w..][..d.w]);
                }
            }
            let xp = &*xp;
            if let Some(dir) = &plan.direct {
                let (target, ld) = if dir.straight {
                    (&mut out[..d.o * p], p)
                } else {
                    (&mut rest[..d.o * np], np)
                };
                dir.run(d, xp, target, ld, bias, self.activation, threads);
                if !dir.straight {
                    for (o, y) in out[..d.o * p].chunks_exact_mut(p).enumerate() {
                        for (oy, dst) in y.chunks_exact_mut(d.ow).enumerate() {
                            dst.copy_from_slice(&rest[o * np + oy * wp..][..d.ow]);
                        }
                    }
                }
                return;
            }
            let (col, tmp) = rest.split_at_mut(k * np);
            for_each_chunk(col, np, threads, |(row, dst)| {
                let start = plan.offsets[row];
                dst.copy_from_slice(&xp[start..start + np]);
            });
            matmul(
                tmp,
                Mat {
                    data: w,
                    rows: d.o,
                    cols: k,
                    rs: k,
                    cs: 1,
                },
                Mat {
                    data: col,
                    rows: k,
                    cols: np,
                    rs: np,
                    cs: 1,
                },
                false,
                threads,
            );
            let tmp = &*tmp;
            let finish = |(o, y): (usize, &mut [f32])| {
                let bo = bias.get(o).copied().unwrap_or(0.0);
                for (oy, dst) in y.chunks_exact_mut(d.ow).enumerate() {
                    let src = &tmp[o * np + oy * wp..][..d.ow];
                    for (v, s) in dst.iter_mut().zip(src) {
                        *v = s + bo;
                    }
                }
                self.activation.apply_slice(y);
            };
            for_each_chunk(&mut out[..d.o * p], p, threads, finish);
        });
    }

    /// Depthwise: each output plane from its one input plane, bias and
    /// activation included, at `tier` (see [`depthwise_plane`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_depthwise_plane(
        &self,
        tier: Tier,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        bias: f32,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each variant runs only where the CPU has its
            // instructions.
            #[allow(unsafe_code)]
            unsafe {
                if tier >= Tier::Avx512 && Tier::Avx512.supported() {
                    return depthwise_avx512(self, d, x, w, bias, out, scratch);
                }
                if tier >= Tier::Avx2 && Tier::Avx2.supported() {
                    return depthwise_avx2(self, d, x, w, bias, out, scratch);
                }
            }
        }
        let _ = tier;
        depthwise_plane::<DW_LANES>(self, d, x, w, bias, out, scratch);
    }

    /// [`CustomOp3::cpu_fwd`], with the weight already packed or not.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cpu_forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        packed: Option<&Arc<[f32]>>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let (x, w, b) = operands(&d, (xs, xl), (ws, wl), (bs, bl))?;
        let out = self.forward(&d, x, w, b, packed);
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.o, d.oh, d.ow))))
    }

    pub(super) fn forward(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        packed: Option<&Arc<[f32]>>,
    ) -> Vec<f32> {
        self.forward_by(d, x, w, bias, crate::kernels::tier::active(), packed)
    }

    /// The forward pass at `tier` (capped to what the CPU has): the product
    /// by [`direct`]'s variant for it where it applies and by im2col + gemm
    /// otherwise, depthwise planes and activations by its variants; `packed` is `w` packed for [`direct`]
    /// already ([`pack_weights`]), or `None` to pack it here.
    pub(super) fn forward_by(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        tier: Tier,
        packed: Option<&Arc<[f32]>>,
    ) -> Vec<f32> {
        let tier = tier.min(Tier::detected());
        let (p, threads) = (d.p(), rayon::current_num_threads());
        let mut out = vec![0f32; d.n * d.o * p];
        let in_image = d.c * d.h * d.w;
        // Without input channels there is nothing to multiply: gemm's
        // path writes the bias alone.
        let direct = direct::kernel_at(tier).filter(|_| d.k() > 0);
        let plan = if self.padded_path(d, direct.is_some()) {
            Plan::Padded(Padded::new(self, d, w, direct, packed))
        } else {
            // At the AVX2 tier gemm (packed panels) beats the direct kernel
            // on im2col rows and on 1×1 inputs once they are many: rows `P`
            // apart are as many streams as the product has rows, re-read
            // for every block of channels. Single thread, batch 8
            // (BENCHMARKS.md, 2026-12-03 third session): conv1 7×7/2 (147
            // rows) 15 against 38 GFLOP/s, 256→128 1×1 at 56² 27 against
            // 72, 64→128 36 against 63; but EfficientNet's expansions from
            // 16–40 channels ran 1.3–1.5× faster direct.
            let gemmless = direct.filter(|&tier| self.general_direct(d, tier));
            Plan::General(gemmless.map(|tier| Direct::general(tier, d, w, packed)))
        };
        if self.depthwise(d) {
            out.par_chunks_mut(p)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (plane, y)| {
                    let (img, ch) = (plane / d.o, plane % d.o);
                    let xs = &x[img * in_image + ch * d.h * d.w..][..d.h * d.w];
                    let ws = &w[ch * d.kh * d.kw..(ch + 1) * d.kh * d.kw];
                    let b = bias.get(ch).copied().unwrap_or(0.0);
                    self.forward_depthwise_plane(tier, d, xs, ws, b, y, scratch);
                });
        } else if d.n >= threads || threads == 1 {
            out.par_chunks_mut(d.o * p)
                .enumerate()
                .for_each(|(img, y)| {
                    let x = &x[img * in_image..(img + 1) * in_image];
                    self.image(d, x, w, &plan, bias, y, 1)
                });
        } else {
            for (img, y) in out.chunks_mut(d.o * p).enumerate() {
                self.image(
                    d,
                    &x[img * in_image..(img + 1) * in_image],
                    w,
                    &plan,
                    bias,
                    y,
                    threads,
                );
            }
        }
        // The padded path, the direct kernel and the depthwise kernel
        // applied the bias and activation themselves.
        if matches!(plan, Plan::General(None))
            && !self.depthwise(d)
            && (!bias.is_empty() || self.activation != Activation::Identity)
        {
            out.par_chunks_mut(p).enumerate().for_each(|(plane, y)| {
                let b = bias.get(plane % d.o).copied().unwrap_or(0.0);
                for v in y.iter_mut() {
                    *v += b;
                }
                self.activation.apply_slice_at(tier, y);
            });
        }
        out
    }
}

/// Output columns per register block of the depthwise kernel: a vector of
/// the tier (8 for AVX2 and the portable build, 16 for AVX-512).
const DW_LANES: usize = 8;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const DW_LANES_512: usize = 16;

/// One depthwise plane. The input is copied once into `scratch`, zero
/// padded and split into `sw` column phases (phase `q` holds padded columns
/// `q, q + sw, …`), so that every kernel tap reads a contiguous run for
/// any stride and dilation. Each block of `L` output columns then
/// sums all `kh · kw` taps in registers from the bias, applies the
/// activation and is stored once. Written once, compiled for each tier
/// (`depthwise_avx2`, `depthwise_avx512`): the block is the compiler's
/// vector at that tier's width. The tap loop, not a pass over the plane per
/// tap, keeps the output out of memory until it is final.
#[inline(always)]
fn depthwise_plane<const L: usize>(
    op: &ConvOp,
    d: &Dims,
    x: &[f32],
    w: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let ((sh, sw), (dh, dw)) = (op.stride, op.dilation);
    let (t, b, l, r) = op.padding;
    let (hp, wp) = (d.h + t + b, d.w + l + r);
    // Columns per phase row, with the slack the last block reads.
    let wq = wp.div_ceil(sw) + L;
    scratch.clear();
    scratch.resize(sw * hp * wq, 0.0);
    for q in 0..sw {
        // Padded columns q + j·sw for j in first..end hold input columns
        // ix = q + j·sw − l (0 ≤ ix < W).
        let first = l.saturating_sub(q).div_ceil(sw);
        let end = (d.w + l).saturating_sub(q).div_ceil(sw).min(wq);
        for iy in 0..d.h {
            let src = &x[iy * d.w..(iy + 1) * d.w];
            let dst = &mut scratch[(q * hp + iy + t) * wq..][..wq];
            if sw == 1 {
                dst[l..l + d.w].copy_from_slice(src);
            } else if first < end {
                let start = q + first * sw - l;
                for (v, &s) in dst[first..end]
                    .iter_mut()
                    .zip(src[start..].iter().step_by(sw))
                {
                    *v = s;
                }
            }
        }
    }
    // Where tap (ky, kx) starts, for output (0, 0).
    let taps: Vec<(usize, f32)> = (0..d.kh * d.kw)
        .map(|k| {
            let (ky, kx) = (k / d.kw, k % d.kw);
            let (q, shift) = ((kx * dw) % sw, (kx * dw) / sw);
            ((q * hp + ky * dh) * wq + shift, w[k])
        })
        .collect();
    for (oy, row) in out.chunks_exact_mut(d.ow).enumerate() {
        let base = oy * sh * wq;
        for ox in (0..d.ow).step_by(L) {
            let mut acc = [bias; L];
            for &(at, wk) in &taps {
                let src = &scratch[base + at + ox..][..L];
                for (a, &v) in acc.iter_mut().zip(src) {
                    *a += wk * v;
                }
            }
            let n = (d.ow - ox).min(L);
            row[ox..ox + n].copy_from_slice(&acc[..n]);
        }
        op.activation.apply_slice_inline(row);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_avx2(
    op: &ConvOp,
    d: &Dims,
    x: &[f32],
    w: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    depthwise_plane::<DW_LANES>(op, d, x, w, bias, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise_avx512(
    op: &ConvOp,
    d: &Dims,
    x: &[f32],
    w: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    // Rows narrower than a vector (EfficientNet's 7×7 and 14×14 stages)
    // waste less in blocks of 8.
    if d.ow >= DW_LANES_512 {
        depthwise_plane::<DW_LANES_512>(op, d, x, w, bias, out, scratch)
    } else {
        depthwise_plane::<DW_LANES>(op, d, x, w, bias, out, scratch)
    }
}

/// Whether the direct kernel, at `tier`, reads an im2col matrix (or a 1×1
/// convolution's input) of `rows` rows rather than leave it to gemm: at
/// AVX-512 always, at AVX2 below 64 rows (see [`ConvOp::forward_by`]).
pub(super) fn direct_takes_rows(tier: Tier, rows: usize) -> bool {
    tier >= Tier::Avx512 || rows < 64
}
