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
//! - on a CPU with AVX-512, one-group convolutions take the direct kernel
//!   of `direct.rs` instead of gemm: at stride 1 it reads the windows of a
//!   zero-padded copy of the input in place (no im2col at all); otherwise,
//!   when the positions per image are whole vectors of 16, it reads the
//!   im2col rows where gemm would pack them again. The bias and activation
//!   are applied in its registers; the predict path packs the weights once
//!   at load ([`pack_weights`], [`PackedConvOp`]);
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

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::direct;

/// The activation applied to the convolution's output in the same pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl Activation {
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            Self::Identity => v,
            Self::Relu => v.max(0.0),
            Self::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// Whether the gradient flows through an output of value `y`.
    fn passes(self, y: f32) -> bool {
        match self {
            Self::Identity => true,
            Self::Relu => y > 0.0,
            Self::Relu6 => y > 0.0 && y < 6.0,
        }
    }
}

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

/// A read-only matrix view for [`matmul`]: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl Mat<'_> {
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (+)= a · b` with `dst` row-major `[a.rows, b.cols]`.
///
/// `gemm` is the crate candle's own matmul runs on (already in the build):
/// a packed, AVX-512/AVX2/NEON microkernel with its own rayon parallelism.
/// Its entry point is raw pointers and strides; the asserts below check that
/// every element the strides reach lies inside the slices, which is what
/// it needs to be sound.
#[allow(unsafe_code)]
pub(super) fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool, threads: usize) {
    assert_eq!(a.cols, b.rows, "matmul: inner sizes differ");
    assert!(
        a.fits() && b.fits(),
        "matmul: a view reaches past its slice"
    );
    assert!(
        dst.len() >= a.rows * b.cols,
        "matmul: destination too small"
    );
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            dst[..a.rows * b.cols].fill(0.0);
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm computes from these
    // sizes and strides within `dst`, `a.data` and `b.data`; `dst` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Runs `f` on each `n`-value chunk of `buf` with its index, spread over
/// the rayon pool when `threads > 1`.
fn for_each_chunk<F>(buf: &mut [f32], n: usize, threads: usize, f: F)
where
    F: Fn((usize, &mut [f32])) + Send + Sync,
{
    if threads > 1 {
        buf.par_chunks_mut(n).enumerate().for_each(f);
    } else {
        buf.chunks_mut(n).enumerate().for_each(f);
    }
}

/// The im2col matrix `[K, P]` of one group's input `xg` into `col`.
fn im2col(d: &Dims, op: &ConvOp, xg: &[f32], col: &mut [f32], threads: usize) {
    for_each_chunk(&mut col[..d.k() * d.p()], d.p(), threads, |(r, row)| {
        im2col_row(d, op, xg, r, row)
    });
}

/// The geometry of a padded input whose zero borders a scratch buffer
/// holds (see [`Padded::key`]).
type ScratchKey = [usize; 8];

/// The key of scratch use that writes no padded input (im2col alone): no
/// padded input's key matches it, so the next padded call zeroes borders.
const NO_PADDED_INPUT: ScratchKey = [usize::MAX; 8];

thread_local! {
    /// Per-thread working memory of [`ConvOp::forward_image_padded`], kept
    /// between calls so a forward pass does not fault in fresh pages for
    /// every layer, with the key of the padded input at its start. It grows
    /// to the largest layer seen on the thread.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Option<ScratchKey>)> =
        const { std::cell::Cell::new((Vec::new(), None)) };
}

/// Runs `f` on `n` floats of this thread's scratch memory, and whether its
/// start already holds the zero borders of the padded input `key` names
/// (set by the last call on this thread with that key; `f` must leave them
/// zero, writing only inside them). Other contents are unspecified. A
/// nested call (work stolen while `f` waits on the pool) finds the scratch
/// taken and allocates its own.
fn with_scratch<R>(n: usize, key: ScratchKey, f: impl FnOnce(&mut [f32], bool) -> R) -> R {
    let (mut buf, held) = SCRATCH.take();
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    let result = f(&mut buf[..n], held == Some(key));
    SCRATCH.set((buf, Some(key)));
    result
}

/// For kernel column `kx`: the output columns `[ox0, ox1)` whose input
/// column `ox * sw + kx * dw - left` lies inside `[0, w)`, and that offset.
fn column_span(d: &Dims, op: &ConvOp, kx: usize) -> (usize, usize, isize) {
    let sw = op.stride.1;
    let off = (kx * op.dilation.1) as isize - op.padding.2 as isize;
    let ox0 = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(sw)
    };
    let ox1 = if (d.w as isize) <= off {
        0
    } else {
        ((d.w as isize - off) as usize).div_ceil(sw)
    };
    (ox0.min(d.ow), ox1.min(d.ow).max(ox0.min(d.ow)), off)
}

/// The input row of output row `oy` for kernel row `ky`, if inside.
fn input_row(d: &Dims, op: &ConvOp, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * op.stride.0 + ky * op.dilation.0) as isize - op.padding.0 as isize;
    (0..d.h as isize).contains(&iy).then_some(iy as usize)
}

/// Writes im2col row `r` (input channel `c` of `x`, kernel tap `ky, kx`).
fn im2col_row(d: &Dims, op: &ConvOp, x: &[f32], r: usize, row: &mut [f32]) {
    let (c, ky, kx) = (r / (d.kh * d.kw), r / d.kw % d.kh, r % d.kw);
    let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
    let (ox0, ox1, off) = column_span(d, op, kx);
    let sw = op.stride.1;
    for (oy, dst) in row.chunks_exact_mut(d.ow).enumerate() {
        let Some(iy) = input_row(d, op, oy, ky) else {
            dst.fill(0.0);
            continue;
        };
        let src = &plane[iy * d.w..(iy + 1) * d.w];
        dst[..ox0].fill(0.0);
        dst[ox1..].fill(0.0);
        let first = (ox0 * sw) as isize + off;
        if sw == 1 {
            dst[ox0..ox1].copy_from_slice(&src[first as usize..first as usize + (ox1 - ox0)]);
        } else {
            for (i, v) in dst[ox0..ox1].iter_mut().enumerate() {
                *v = src[first as usize + i * sw];
            }
        }
    }
}

/// The inverse scatter: adds im2col row `r` back into the input gradient.
fn col2im_row(d: &Dims, op: &ConvOp, row: &[f32], r: usize, dx: &mut [f32]) {
    let (c, ky, kx) = (r / (d.kh * d.kw), r / d.kw % d.kh, r % d.kw);
    let plane = &mut dx[c * d.h * d.w..(c + 1) * d.h * d.w];
    let (ox0, ox1, off) = column_span(d, op, kx);
    let sw = op.stride.1;
    for (oy, src) in row.chunks_exact(d.ow).enumerate() {
        let Some(iy) = input_row(d, op, oy, ky) else {
            continue;
        };
        let dst = &mut plane[iy * d.w..(iy + 1) * d.w];
        let first = (ox0 * sw) as isize + off;
        for (i, v) in src[ox0..ox1].iter().enumerate() {
            dst[first as usize + i * sw] += v;
        }
    }
}

/// `w` (`[O, K]`) in [`direct`]'s order: `packed` when given (made by
/// [`pack_weights`] from the same weights), else packed now.
fn packed_or_pack(d: &Dims, w: &[f32], packed: Option<&Arc<[f32]>>) -> Arc<[f32]> {
    match packed {
        Some(p) => p.clone(),
        None => Arc::from(direct::pack(w, d.o, d.k())),
    }
}

/// A one-group convolution's weights `[O, I, kh, kw]` packed once (at load,
/// for [`PackedConvOp`]) in the order the direct kernel reads them; `None`
/// when this CPU does not run it. Packed on every call, they took 6% of a
/// batch-1 ResNet-20 forward, so the predict path packs them once.
pub fn pack_weights(w: &[f32], o: usize, k: usize) -> Option<Arc<[f32]>> {
    (direct::available() && k > 0).then(|| Arc::from(direct::pack(w, o, k)))
}

/// [`ConvOp`] with its weight already packed by [`pack_weights`]; the
/// same results and the same backward.
#[derive(Debug, Clone)]
pub struct PackedConvOp {
    /// The geometry and activation.
    pub base: ConvOp,
    /// The weight applied with it, packed.
    pub packed: Arc<[f32]>,
}

impl CustomOp3 for PackedConvOp {
    fn name(&self) -> &'static str {
        "convscope-conv2d-packed"
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
        let d = self.base.dims(xl, wl)?;
        if self.base.groups != 1
            || self.packed.len() != d.o.div_ceil(direct::MR) * d.k() * direct::MR
        {
            bail!(
                "conv2d: packed weights that do not fit a [{}, {}] weight",
                d.o,
                d.k()
            );
        }
        self.base
            .cpu_forward(xs, xl, ws, wl, bs, bl, Some(&self.packed))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.base.bwd(x, w, bias, res, grad_res)
    }
}

/// How one call computes its images.
enum Plan {
    /// [`ConvOp::padded_path`].
    Padded(Padded),
    /// im2col (unless pointwise), then gemm, or [`direct`] when given.
    General(Option<Direct>),
}

/// The padded path's geometry for one call, worked out once for all its
/// images: the zero-padded input's size, each im2col row's offset into it,
/// and for [`direct`] the packed weight and the vectors it computes.
struct Padded {
    hp: usize,
    wp: usize,
    /// Positions computed per output channel: `OH · Wp`, rounded up to
    /// whole vectors for [`direct`].
    np: usize,
    /// The padded input plus the tail the last windows read.
    xp_len: usize,
    /// Where im2col row `(c, ky, kx)` starts in the padded input.
    offsets: Vec<usize>,
    direct: Option<Direct>,
}

/// What [`direct`] needs for one call: the packed weight, where each of
/// the `K` rows of the (virtual) im2col matrix starts in the source it
/// reads, and which vectors of it to compute.
struct Direct {
    packed: Arc<[f32]>,
    offsets: Vec<usize>,
    /// `(source position, output position)` of each vector's first value.
    vectors: Vec<(usize, usize)>,
    lanes: direct::Lanes,
    /// Whether `vectors` index the output itself (rather than a buffer of
    /// every padded position, cropped after).
    straight: bool,
}

impl Direct {
    /// For the general path, on one group: the im2col matrix `[K, P]` (or
    /// the input itself, for a pointwise convolution) read row by row, the
    /// output written in place. Needs `P` to be whole vectors.
    fn general(d: &Dims, w: &[f32], packed: Option<&Arc<[f32]>>) -> Self {
        let (k, p) = (d.k(), d.p());
        Self {
            packed: packed_or_pack(d, w, packed),
            offsets: (0..k).map(|r| r * p).collect(),
            vectors: (0..p).step_by(direct::LANES).map(|q| (q, q)).collect(),
            lanes: direct::Lanes::Contiguous,
            straight: true,
        }
    }

    /// `target[o · ld + …] = act(bias[o] + Σ_r w[o, r] · src[offsets[r] +
    /// …])` for every output channel, the blocks of [`direct::MR`]
    /// channels spread over the pool when `threads > 1`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        d: &Dims,
        src: &[f32],
        target: &mut [f32],
        ld: usize,
        bias: &[f32],
        activation: Activation,
        threads: usize,
    ) {
        let k = self.offsets.len();
        let run = |(blk, dst): (usize, &mut [f32])| {
            let o0 = blk * direct::MR;
            let rows = (d.o - o0).min(direct::MR);
            let mut b = [0f32; direct::MR];
            if !bias.is_empty() {
                b[..rows].copy_from_slice(&bias[o0..o0 + rows]);
            }
            let block = &self.packed[blk * k * direct::MR..][..k * direct::MR];
            direct::block(
                block,
                &self.offsets,
                src,
                self.lanes,
                &self.vectors,
                dst,
                ld,
                rows,
                &b,
                activation,
            );
        };
        for_each_chunk(&mut target[..d.o * ld], direct::MR * ld, threads, run);
    }
}

impl Padded {
    fn new(op: &ConvOp, d: &Dims, w: &[f32], direct: bool, packed: Option<&Arc<[f32]>>) -> Self {
        let (t, b, l, r) = op.padding;
        let (hp, wp) = (d.h + t + b, d.w + l + r);
        let (dh, dw) = op.dilation;
        let np = if direct {
            (d.oh * wp).next_multiple_of(direct::LANES)
        } else {
            d.oh * wp
        };
        // The last window of a plane reads this far past it (into
        // positions that are dropped).
        let xp_len = d.c * hp * wp + dw * (d.kw - 1) + (np - d.oh * wp);
        let offsets: Vec<usize> = (0..d.k())
            .map(|row| {
                let (c, ky, kx) = (row / (d.kh * d.kw), row / d.kw % d.kh, row % d.kw);
                c * hp * wp + ky * dh * wp + kx * dw
            })
            .collect();
        let direct = direct.then(|| {
            let (lanes, vectors) = if d.ow.is_multiple_of(direct::LANES) {
                // Whole vectors per output row, written straight out.
                let per_row = d.ow / direct::LANES;
                let vectors = (0..d.oh * per_row)
                    .map(|i| {
                        let (oy, j) = (i / per_row, i % per_row * direct::LANES);
                        (oy * wp + j, oy * d.ow + j)
                    })
                    .collect();
                (direct::Lanes::Contiguous, vectors)
            } else if d.ow == direct::LANES / 2 && d.oh.is_multiple_of(2) {
                // Rows of 8 (CIFAR nets' last stage): two rows per vector,
                // also written straight out.
                let vectors = (0..d.oh)
                    .step_by(2)
                    .map(|oy| (oy * wp, oy * d.ow))
                    .collect();
                (direct::Lanes::Split(wp), vectors)
            } else {
                // Every padded position, cropped after.
                let vectors = (0..np).step_by(direct::LANES).map(|q| (q, q)).collect();
                (direct::Lanes::Contiguous, vectors)
            };
            let straight = d.ow.is_multiple_of(direct::LANES) || lanes != direct::Lanes::Contiguous;
            Direct {
                packed: packed_or_pack(d, w, packed),
                offsets: offsets.clone(),
                vectors,
                lanes,
                straight,
            }
        });
        Self {
            hp,
            wp,
            np,
            xp_len,
            offsets,
            direct,
        }
    }

    /// Floats of scratch one image takes: the padded input, then the
    /// im2col matrix (gemm only) and the uncropped output (unless written
    /// straight out).
    fn scratch(&self, d: &Dims) -> usize {
        match &self.direct {
            Some(dir) if dir.straight => self.xp_len,
            Some(_) => self.xp_len + d.o * self.np,
            None => self.xp_len + d.k() * self.np + d.o * self.np,
        }
    }

    /// What identifies the padded input's zero borders: a thread's next
    /// image with the same key finds them still zero in its scratch.
    fn key(&self, op: &ConvOp, d: &Dims) -> ScratchKey {
        let (t, _, l, _) = op.padding;
        [d.c, d.h, d.w, t, l, self.hp, self.wp, self.xp_len]
    }
}

impl ConvOp {
    /// A 1×1, stride-1, unpadded convolution: the input is its own im2col.
    fn pointwise(&self, d: &Dims) -> bool {
        d.kh == 1
            && d.kw == 1
            && self.stride == (1, 1)
            && self.padding == (0, 0, 0, 0)
            && d.oh == d.h
            && d.ow == d.w
    }

    fn depthwise(&self, d: &Dims) -> bool {
        d.cg == 1 && d.og == 1
    }

    pub(super) fn dims(&self, x: &Layout, w: &Layout) -> Result<Dims> {
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
    fn image(
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
    fn forward_image(
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
                with_scratch(k * p, NO_PADDED_INPUT, |col, _| {
                    im2col(d, self, x, col, threads);
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
    fn padded_path(&self, d: &Dims) -> bool {
        self.stride == (1, 1) && self.groups == 1 && !self.pointwise(d) && !self.depthwise(d)
    }

    /// One image through [`Self::padded_path`], epilogue included: the
    /// product by [`direct`] when the plan has it, else by im2col + gemm.
    #[allow(clippy::too_many_arguments)]
    fn forward_image_padded(
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
                        *v = self.activation.apply(s + bo);
                    }
                }
            };
            for_each_chunk(&mut out[..d.o * p], p, threads, finish);
        });
    }

    /// Depthwise: each output plane from its one input plane.
    fn forward_depthwise_plane(&self, d: &Dims, x: &[f32], w: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        let sw = self.stride.1;
        for ky in 0..d.kh {
            for kx in 0..d.kw {
                let wv = w[ky * d.kw + kx];
                let (ox0, ox1, off) = column_span(d, self, kx);
                for (oy, dst) in out.chunks_exact_mut(d.ow).enumerate() {
                    let Some(iy) = input_row(d, self, oy, ky) else {
                        continue;
                    };
                    let src = &x[iy * d.w..(iy + 1) * d.w];
                    let first = ((ox0 * sw) as isize + off) as usize;
                    if sw == 1 {
                        for (o, i) in dst[ox0..ox1].iter_mut().zip(&src[first..]) {
                            *o += wv * i;
                        }
                    } else {
                        for (j, o) in dst[ox0..ox1].iter_mut().enumerate() {
                            *o += wv * src[first + j * sw];
                        }
                    }
                }
            }
        }
    }

    /// [`CustomOp3::cpu_fwd`], with the weight already packed or not.
    #[allow(clippy::too_many_arguments)]
    fn cpu_forward(
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

    fn forward(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        packed: Option<&Arc<[f32]>>,
    ) -> Vec<f32> {
        self.forward_by(d, x, w, bias, direct::available(), packed)
    }

    /// The forward pass, with the product by [`direct`] where it applies
    /// when `direct` is set (the caller checked [`direct::available`]) and
    /// by im2col + gemm otherwise; `packed` is `w` packed for [`direct`]
    /// already ([`pack_weights`]), or `None` to pack it here.
    fn forward_by(
        &self,
        d: &Dims,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        direct: bool,
        packed: Option<&Arc<[f32]>>,
    ) -> Vec<f32> {
        let (p, threads) = (d.p(), rayon::current_num_threads());
        let mut out = vec![0f32; d.n * d.o * p];
        let in_image = d.c * d.h * d.w;
        // Without input channels there is nothing to multiply: gemm's
        // path writes the bias alone.
        let direct = direct && d.k() > 0;
        let plan = if self.padded_path(d) {
            Plan::Padded(Padded::new(self, d, w, direct, packed))
        } else {
            let gemmless =
                direct && self.groups == 1 && !self.depthwise(d) && p.is_multiple_of(direct::LANES);
            Plan::General(gemmless.then(|| Direct::general(d, w, packed)))
        };
        if self.depthwise(d) {
            out.par_chunks_mut(p).enumerate().for_each(|(plane, y)| {
                let (img, ch) = (plane / d.o, plane % d.o);
                let xs = &x[img * in_image + ch * d.h * d.w..][..d.h * d.w];
                let ws = &w[ch * d.kh * d.kw..(ch + 1) * d.kh * d.kw];
                self.forward_depthwise_plane(d, xs, ws, y);
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
        // The padded path and the direct kernel applied the bias and
        // activation themselves.
        if matches!(plan, Plan::General(None))
            && (!bias.is_empty() || self.activation != Activation::Identity)
        {
            out.par_chunks_mut(p).enumerate().for_each(|(plane, y)| {
                let b = bias.get(plane % d.o).copied().unwrap_or(0.0);
                for v in y {
                    *v = self.activation.apply(*v + b);
                }
            });
        }
        out
    }

    /// `dx` for one image from its masked output gradient `g` `[O, P]`.
    fn input_grad_image(&self, d: &Dims, w: &[f32], g: &[f32], dx: &mut [f32]) {
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
    fn weight_grad_image(
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
    fn depthwise_input_grad(&self, d: &Dims, w: &[f32], g: &[f32], dx: &mut [f32]) {
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
    fn depthwise_weight_grad(&self, d: &Dims, x: &[f32], g: &[f32], dw: &mut [f32]) {
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
        let d = self.dims(x.layout(), w.layout())?;
        let p = d.p();
        let mut g = to_vec(grad_res)?;
        if self.activation != Activation::Identity {
            for (gv, y) in g.iter_mut().zip(to_vec(res)?) {
                if !self.activation.passes(y) {
                    *gv = 0.0;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::testing::Cases as Rng;
    use crate::kernels::tier;

    /// A random case: the op, input, weight and bias (maybe empty).
    fn case(rng: &mut Rng) -> (ConvOp, Tensor, Tensor, Tensor) {
        let groups = [1, 1, 2, 3][rng.below(4)];
        let depthwise = rng.below(4) == 0;
        let (cg, og) = if depthwise {
            (1, 1)
        } else {
            (1 + rng.below(4), 1 + rng.below(5))
        };
        let groups = if depthwise { 1 + rng.below(5) } else { groups };
        let (kh, kw) = (1 + rng.below(4), 1 + rng.below(4));
        let op = ConvOp {
            stride: (1 + rng.below(3), 1 + rng.below(3)),
            dilation: (1 + rng.below(2), 1 + rng.below(2)),
            padding: (rng.below(3), rng.below(3), rng.below(3), rng.below(3)),
            groups,
            activation: [Activation::Identity, Activation::Relu, Activation::Relu6][rng.below(3)],
        };
        let (eh, ew) = (op.dilation.0 * (kh - 1) + 1, op.dilation.1 * (kw - 1) + 1);
        let (h, w) = (eh + rng.below(9), ew + rng.below(9));
        let n = 1 + rng.below(3);
        let x = rng.tensor(&[n, cg * groups, h, w]);
        let wt = rng.tensor(&[og * groups, cg, kh, kw]);
        let b = if rng.below(2) == 0 {
            rng.tensor(&[og * groups])
        } else {
            Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap()
        };
        (op, x, wt, b)
    }

    /// candle's own ops: pad, conv2d (equal strides/dilations only), bias, activation.
    fn reference(op: &ConvOp, x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let (t, bo, l, r) = op.padding;
        let x = x
            .pad_with_zeros(2, t, bo)
            .unwrap()
            .pad_with_zeros(3, l, r)
            .unwrap();
        let mut y = x
            .conv2d(w, 0, op.stride.0, op.dilation.0, op.groups)
            .unwrap();
        if b.elem_count() > 0 {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
        }
        match op.activation {
            Activation::Identity => y,
            Activation::Relu => y.relu().unwrap(),
            Activation::Relu6 => y.clamp(0f32, 6f32).unwrap(),
        }
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let (a, b) = (to_vec(a).unwrap(), to_vec(b).unwrap());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "{what}, element {i}: {x} vs {y}"
            );
        }
    }

    /// candle's conv2d takes one stride and one dilation; the cases where
    /// both directions agree compare against it directly.
    fn symmetric(op: &ConvOp) -> bool {
        op.stride.0 == op.stride.1 && op.dilation.0 == op.dilation.1
    }

    /// candle 0.11's conv backward (`conv_transpose2d` without output
    /// padding) returns a wrongly sized input gradient when the stride does
    /// not divide the padded input minus the kernel extent.
    fn candle_differentiates(op: &ConvOp, x: &Tensor, w: &Tensor) -> bool {
        let (_, _, h, wd) = x.dims4().unwrap();
        let (_, _, kh, kw) = w.dims4().unwrap();
        let (t, b, l, r) = op.padding;
        let eh = op.dilation.0 * (kh - 1) + 1;
        let ew = op.dilation.1 * (kw - 1) + 1;
        symmetric(op)
            && (h + t + b - eh).is_multiple_of(op.stride.0)
            && (wd + l + r - ew).is_multiple_of(op.stride.1)
    }

    #[test]
    fn forward_matches_candle_on_random_shapes() {
        let mut rng = Rng::new(3);
        let mut checked = 0;
        while checked < 400 {
            let (op, x, w, b) = case(&mut rng);
            if !symmetric(&op) {
                continue;
            }
            let ours = x.apply_op3(&w, &b, op).unwrap();
            close(
                &ours,
                &reference(&op, &x, &w, &b),
                &format!("{op:?} x{:?} w{:?}", x.dims(), w.dims()),
            );
            checked += 1;
        }
    }

    #[test]
    fn the_direct_kernel_and_im2col_gemm_both_match_candle() {
        // One group, on channel counts on both sides of the kernel's
        // 8-channel blocks. Stride 1 takes the padded path, with output
        // widths that are whole vectors (16, 32: written straight out), 8
        // (two rows per vector, straight out when the rows pair up) and
        // others (cropped); other strides and 1×1 kernels take the
        // general path, which runs the kernel when the positions per image
        // are whole vectors.
        let mut ways: Vec<bool> = tier::tested_tiers("direct convolution vs im2col + gemm")
            .into_iter()
            .map(direct::runs_at)
            .collect();
        ways.dedup();
        let mut rng = Rng::new(17);
        let (mut straight, mut split, mut cropped, mut general) = (0, 0, 0, 0);
        for case in 0..240 {
            let pointwise = case % 8 == 7;
            let (kh, kw) = if pointwise {
                (1, 1)
            } else {
                (1 + rng.below(4), 1 + rng.below(4))
            };
            let s = if pointwise {
                1
            } else {
                [1, 1, 2, 3][rng.below(4)]
            };
            let dil = 1 + rng.below(2);
            let pad = if pointwise {
                (0, 0, 0, 0)
            } else {
                (rng.below(3), rng.below(3), rng.below(3), rng.below(3))
            };
            let op = ConvOp {
                stride: (s, s),
                dilation: (dil, dil),
                padding: pad,
                groups: 1,
                activation: [Activation::Identity, Activation::Relu, Activation::Relu6]
                    [rng.below(3)],
            };
            let (eh, ew) = (dil * (kh - 1) + 1, dil * (kw - 1) + 1);
            // An output width of 8, 16 or 32 half the time, any other else.
            let ow = if case % 2 == 0 {
                [8, 16, 32][rng.below(3)]
            } else {
                1 + rng.below(40)
            };
            let oh = 1 + rng.below(12);
            // The input that gives that output (at least 1 wide).
            let w = ((ow - 1) * s + ew).saturating_sub(pad.2 + pad.3).max(1);
            let h = ((oh - 1) * s + eh).saturating_sub(pad.0 + pad.1).max(1);
            if h + pad.0 + pad.1 < eh || w + pad.2 + pad.3 < ew {
                continue;
            }
            // Two or more outputs: one input and one output is depthwise.
            let (n, c, o) = (1 + rng.below(3), 1 + rng.below(6), 2 + rng.below(19));
            let x = rng.tensor(&[n, c, h, w]);
            let wt = rng.tensor(&[o, c, kh, kw]);
            let b = if rng.below(2) == 0 {
                rng.tensor(&[o])
            } else {
                Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap()
            };
            let what = format!("{op:?} x{:?} w{:?}", x.dims(), wt.dims());
            let expected = reference(&op, &x, &wt, &b);
            let d = op.dims(x.layout(), wt.layout()).unwrap();
            if op.padded_path(&d) {
                if d.ow.is_multiple_of(direct::LANES) {
                    straight += 1;
                } else if d.ow == 8 && d.oh.is_multiple_of(2) {
                    split += 1;
                } else {
                    cropped += 1;
                }
            } else if d.p().is_multiple_of(direct::LANES) {
                general += 1;
            }
            let (xs, ws, bs) = (
                to_vec(&x).unwrap(),
                to_vec(&wt).unwrap(),
                to_vec(&b).unwrap(),
            );
            for &by_direct in &ways {
                let y = op.forward_by(&d, &xs, &ws, &bs, by_direct, None);
                let y = Tensor::from_vec(y, expected.dims(), &Device::Cpu).unwrap();
                close(&y, &expected, &format!("{what}, direct {by_direct}"));
            }
        }
        assert!(
            straight >= 30 && split >= 10 && cropped >= 40 && general >= 20,
            "too few cases of a path: {straight} straight, {split} split, {cropped} cropped, \
             {general} general"
        );
    }

    #[test]
    fn weights_packed_once_give_the_same_outputs() {
        let tiers = tier::tested_tiers("weights packed once for the direct convolution");
        if !tiers.into_iter().any(direct::runs_at) {
            return; // said above: no tier here runs the direct kernel
        }
        let mut rng = Rng::new(23);
        let mut checked = 0;
        while checked < 60 {
            let (op, x, w, b) = case(&mut rng);
            let (o, cg, kh, kw) = w.dims4().unwrap();
            if op.groups != 1 {
                continue;
            }
            // Packed directly, so a CONVSCOPE_KERNELS cap does not skip it.
            let packed: Arc<[f32]> = Arc::from(direct::pack(&to_vec(&w).unwrap(), o, cg * kh * kw));
            let what = format!("{op:?} x{:?} w{:?}", x.dims(), w.dims());
            let ours = x
                .apply_op3(
                    &w,
                    &b,
                    PackedConvOp {
                        base: op,
                        packed: packed.clone(),
                    },
                )
                .unwrap();
            close(&ours, &x.apply_op3(&w, &b, op).unwrap(), &what);
            // Packed for another shape: refused, not misread.
            let short: Arc<[f32]> = Arc::from(&packed[..packed.len() - 1]);
            assert!(
                x.apply_op3(
                    &w,
                    &b,
                    PackedConvOp {
                        base: op,
                        packed: short
                    }
                )
                .is_err(),
                "{what}"
            );
            checked += 1;
        }
    }

    #[test]
    fn no_input_channels_give_the_bias() {
        // Reachable from a manifest; every path must answer, not panic.
        for (stride, kernel) in [(1, 3), (2, 3), (1, 1)] {
            let op = ConvOp {
                stride: (stride, stride),
                dilation: (1, 1),
                padding: (1, 1, 1, 1),
                groups: 1,
                activation: Activation::Identity,
            };
            let x = Tensor::zeros((2, 0, 8, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::zeros(
                (3, 0, kernel, kernel),
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let b = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
            let y = x.apply_op3(&w, &b, op).unwrap();
            let values = to_vec(&y).unwrap();
            let plane = values.len() / 6;
            for (i, v) in values.iter().enumerate() {
                assert_eq!(*v, [1f32, -2.0, 3.0][i / plane % 3], "{op:?}");
            }
        }
    }

    #[test]
    fn batches_and_threads_agree_with_one_image_at_a_time() {
        // A batch runs one image per task; one image runs gemm on the pool.
        let mut rng = Rng::new(5);
        for _ in 0..40 {
            let (op, x, w, b) = case(&mut rng);
            let n = x.dim(0).unwrap();
            let batch = x.apply_op3(&w, &b, op).unwrap();
            for i in 0..n {
                let one = x.narrow(0, i, 1).unwrap().apply_op3(&w, &b, op).unwrap();
                close(&one, &batch.narrow(0, i, 1).unwrap(), &format!("{op:?}"));
            }
        }
    }

    #[test]
    fn backward_matches_candle_on_random_shapes() {
        let mut rng = Rng::new(9);
        let mut checked = 0;
        while checked < 150 {
            let (op, x, w, b) = case(&mut rng);
            if !candle_differentiates(&op, &x, &w) {
                continue;
            }
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let bv = Var::from_tensor(&b).unwrap();
            let bias = if b.elem_count() > 0 {
                bv.as_tensor().clone()
            } else {
                b.clone()
            };
            // A loss that weighs every output differently.
            let probe = rng.tensor(reference(&op, &x, &w, &b).dims());
            let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let ours = grads(xv.as_tensor().apply_op3(wv.as_tensor(), &bias, op).unwrap());
            let theirs = grads(reference(&op, xv.as_tensor(), wv.as_tensor(), &bias));
            let what = format!("{op:?} x{:?} w{:?}", x.dims(), w.dims());
            close(
                ours.get(xv.as_tensor()).unwrap(),
                theirs.get(xv.as_tensor()).unwrap(),
                &format!("dx {what}"),
            );
            close(
                ours.get(wv.as_tensor()).unwrap(),
                theirs.get(wv.as_tensor()).unwrap(),
                &format!("dw {what}"),
            );
            if b.elem_count() > 0 {
                close(
                    ours.get(&bias).unwrap(),
                    theirs.get(&bias).unwrap(),
                    &format!("db {what}"),
                );
            }
            checked += 1;
        }
    }

    #[test]
    fn what_candle_cannot_do_matches_finite_differences() {
        // Unequal strides or dilations, and strides that leave input
        // columns unused: check the forward against per-direction
        // subsampling of a stride-1 run, and the gradient numerically.
        let mut rng = Rng::new(13);
        let mut checked = 0;
        while checked < 40 {
            let (op, x, w, b) = case(&mut rng);
            if candle_differentiates(&op, &x, &w) || op.activation != Activation::Identity {
                continue;
            }
            let dense = ConvOp {
                stride: (1, 1),
                ..op
            };
            let full = x.apply_op3(&w, &b, dense).unwrap();
            let ours = x.apply_op3(&w, &b, op).unwrap();
            let (_, _, oh, ow) = ours.dims4().unwrap();
            let rows: Vec<u32> = (0..oh as u32).map(|i| i * op.stride.0 as u32).collect();
            let cols: Vec<u32> = (0..ow as u32).map(|i| i * op.stride.1 as u32).collect();
            let sub = full
                .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 2)
                .unwrap()
                .index_select(&Tensor::new(cols.as_slice(), &Device::Cpu).unwrap(), 3)
                .unwrap();
            close(&ours, &sub, &format!("{op:?}"));
            // d/dx of Σ probe·y, against central differences in f64.
            let probe = to_vec(&rng.tensor(ours.dims())).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y = xv.as_tensor().apply_op3(&w, &b, op).unwrap();
            let pt = Tensor::from_vec(probe.clone(), y.shape(), &Device::Cpu).unwrap();
            let dx = to_vec(
                (y * pt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(xv.as_tensor())
                    .unwrap(),
            )
            .unwrap();
            let xs = to_vec(&x).unwrap();
            let loss = |v: &[f32]| -> f64 {
                let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
                to_vec(&t.apply_op3(&w, &b, op).unwrap())
                    .unwrap()
                    .iter()
                    .zip(&probe)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            for i in (0..xs.len()).step_by(7) {
                let (mut up, mut down) = (xs.clone(), xs.clone());
                up[i] += 1e-2;
                down[i] -= 1e-2;
                let numeric = (loss(&up) - loss(&down)) / 2e-2;
                assert!(
                    (numeric - dx[i] as f64).abs() < 1e-2,
                    "{op:?} element {i}: {numeric} vs {}",
                    dx[i]
                );
            }
            checked += 1;
        }
    }

    #[test]
    fn only_the_gradients_asked_for_are_computed() {
        let mut rng = Rng::new(17);
        let x = Var::from_tensor(&rng.tensor(&[2, 4, 6, 6])).unwrap();
        let w = rng.tensor(&[3, 4, 3, 3]);
        let b = rng.tensor(&[3]);
        let op = ConvOp {
            stride: (1, 1),
            dilation: (1, 1),
            padding: (1, 1, 1, 1),
            groups: 1,
            activation: Activation::Relu,
        };
        let y = x.as_tensor().apply_op3(&w, &b, op).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(
            grads.get(&w).is_none(),
            "a constant weight gets no gradient"
        );
        assert!(grads.get(&b).is_none(), "a constant bias gets no gradient");
    }
}
