//! Winograd F(2×2, 3×3): 3×3 stride-1 convolutions with 16 multiplies per
//! 2×2 output tile and input channel instead of 36 (Lavin & Gray, 2015).
//!
//! Most of a ResNet's work is in such layers. With `U = G g Gᵀ` per
//! (output, input) channel pair computed once when the model loads
//! ([`transform_weights`]), a forward pass is:
//! 1. `V = Bᵀ d B` for every 4×4 input tile `d` (tiles overlap by 2),
//!    stored `[C][16][tiles]` so each task writes its own channel;
//! 2. 16 gemms, one per tile position ξ: `M_ξ [O, tiles] = U_ξ [O, C] · V_ξ [C, tiles]`,
//!    the tiles of every image of the batch side by side;
//! 3. `Y = Aᵀ M A` per tile, plus bias and the fused activation, written
//!    into the NCHW output (dropping the row or column past an odd edge).
//!
//! The backward is the direct convolution's ([`ConvOp`]): gradients do not
//! depend on how the forward was computed. F(2, 3)'s transforms only add,
//! subtract and halve, so the rounding stays at float32's level; the tests
//! hold it to the direct kernel on random shapes.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::conv::{Activation, ConvOp, Dims, Mat, matmul, operands};
use super::tier::{self, Tier};

/// Input tile transform `Bᵀ d` along one axis.
fn bt(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// Kernel transform `G g` along one axis.
fn g3(g: [f32; 3]) -> [f32; 4] {
    [
        g[0],
        0.5 * (g[0] + g[1] + g[2]),
        0.5 * (g[0] - g[1] + g[2]),
        g[2],
    ]
}

/// Output transform `Aᵀ m` along one axis.
fn at(m: [f32; 4]) -> [f32; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// Whether `op` with a `kh × kw` kernel can run as Winograd F(2×2, 3×3).
pub fn eligible(op: &ConvOp, kh: usize, kw: usize) -> bool {
    kh == 3 && kw == 3 && op.stride == (1, 1) && op.dilation == (1, 1) && op.groups == 1
}

/// Whether Winograd beats the direct kernel for this weight: with fewer
/// than 128 input or output channels the 16 gemms are too thin (few
/// multiply-accumulates per element of `M`) and the transforms, which move
/// 16/4 times the data of the output, dominate. Measured on ResNet-18/20
/// (BENCHMARKS.md): from 128 channels on it is faster, below it slower.
pub fn pays(w: &Tensor) -> bool {
    pays_for(w.dim(0).unwrap_or(0), w.dim(1).unwrap_or(0))
}

/// [`pays`] for `o` output and `c` input channels.
pub(super) fn pays_for(o: usize, c: usize) -> bool {
    c >= MIN_CHANNELS && o >= MIN_CHANNELS
}

/// See [`pays`].
const MIN_CHANNELS: usize = 128;

/// `U` of the flipped kernel `W'[c, o, i, j] = W[o, c, 2−i, 2−j]`, laid out
/// `[16][C][O]`: the weight of the transposed convolution that gives a
/// 3×3 stride-1 layer's input gradient (`conv/backward.rs`).
pub fn transform_transposed(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    transform_weights(&super::conv::flip_weights(w, o, c, 9), c, o)
}

/// `U = G g Gᵀ` for an OIHW 3×3 weight, laid out `[16][O][C]`.
pub fn transform_weights(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    for oc in 0..o * c {
        let g = &w[oc * 9..oc * 9 + 9];
        // Rows first: G g is 4×3.
        let cols: [[f32; 4]; 3] = std::array::from_fn(|j| g3([g[j], g[3 + j], g[6 + j]]));
        for i in 0..4 {
            let row = g3([cols[0][i], cols[1][i], cols[2][i]]);
            for (j, v) in row.into_iter().enumerate() {
                u[(i * 4 + j) * o * c + oc] = v;
            }
        }
    }
    u
}

/// The Winograd forward of a [`ConvOp`] with its transformed weights `u`
/// (from [`transform_weights`] of the same weight the op is applied with).
#[derive(Debug, Clone)]
pub struct WinogradOp {
    /// The convolution (geometry, activation; and the backward).
    pub base: ConvOp,
    /// `[16][O][C]`.
    pub u: Arc<[f32]>,
}

/// Floats of V plus M one chunk of images may hold.
const BUDGET: usize = 8 << 20;

impl WinogradOp {
    /// The output `[N, O, oh, ow]` of `x` under `d`'s geometry (which
    /// [`eligible`] accepted, with `u` of `d`'s channels).
    pub(super) fn forward(&self, d: &Dims, x: &[f32], bias: &[f32]) -> Vec<f32> {
        self.forward_at(tier::active(), d, x, bias)
    }

    /// [`Self::forward`] with the tile transforms compiled for `tier`.
    fn forward_at(&self, tier: Tier, d: &Dims, x: &[f32], bias: &[f32]) -> Vec<f32> {
        let (th, tw) = (d.oh.div_ceil(2), d.ow.div_ceil(2));
        let tiles = th * tw;
        let per_chunk = (BUDGET / (16 * (d.c + d.o) * tiles).max(1)).clamp(1, d.n);
        let mut out = vec![0f32; d.n * d.o * d.oh * d.ow];
        let (mut v, mut m) = (Vec::new(), Vec::new());
        for first in (0..d.n).step_by(per_chunk) {
            let imgs = per_chunk.min(d.n - first);
            let nt = imgs * tiles;
            v.resize(d.c * 16 * nt, 0.0);
            let (top, left) = (self.base.padding.0, self.base.padding.2);
            // Each task's scratch (padded lines, the output's four
            // values per tile) is made once per thread, not once per plane.
            v.par_chunks_mut(16 * nt)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (c, vc)| {
                    let planes = (first..first + imgs)
                        .map(|img| &x[(img * d.c + c) * d.h * d.w..][..d.h * d.w]);
                    for (img, plane) in planes.enumerate() {
                        let source = Source {
                            plane,
                            h: d.h,
                            w: d.w,
                            top,
                            left,
                            th,
                            tw,
                        };
                        input_plane_at(tier, &source, &mut vc[img * tiles..], nt, scratch);
                    }
                });
            m.resize(16 * d.o * nt, 0.0);
            m.par_chunks_mut(d.o * nt).enumerate().for_each(|(xi, mx)| {
                matmul(
                    mx,
                    Mat {
                        data: &self.u[xi * d.o * d.c..(xi + 1) * d.o * d.c],
                        rows: d.o,
                        cols: d.c,
                        rs: d.c,
                        cs: 1,
                    },
                    Mat {
                        data: &v[xi * nt..],
                        rows: d.c,
                        cols: nt,
                        rs: 16 * nt,
                        cs: 1,
                    },
                    false,
                    1,
                );
            });
            let act = self.base.activation;
            out[first * d.o * d.oh * d.ow..(first + imgs) * d.o * d.oh * d.ow]
                .par_chunks_mut(d.oh * d.ow)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (p, y)| {
                    let (img, o) = (p / d.o, p % d.o);
                    let b = bias.get(o).copied().unwrap_or(0.0);
                    let plane = Plane {
                        m: &m,
                        xi_stride: d.o * nt,
                        first: o * nt + img * tiles,
                        oh: d.oh,
                        ow: d.ow,
                    };
                    output_plane_at(tier, &plane, b, act, y, scratch);
                });
        }
        out
    }
}

/// One input plane and where its tiles start: tile `(ty, tx)` reads the
/// 4×4 window at `(2ty − top, 2tx − left)`, zero outside the plane.
struct Source<'a> {
    plane: &'a [f32],
    h: usize,
    w: usize,
    top: usize,
    left: usize,
    th: usize,
    tw: usize,
}

/// [`input_plane`] compiled for `tier` (a tier the CPU lacks runs the
/// best it has).
fn input_plane_at(tier: Tier, src: &Source, v: &mut [f32], nt: usize, scratch: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each variant runs only where the CPU has its
        // instructions.
        #[allow(unsafe_code)]
        unsafe {
            if tier >= Tier::Avx512 && Tier::Avx512.supported() {
                return input_plane_avx512(src, v, nt, scratch);
            }
            if tier >= Tier::Avx2 && Tier::Avx2.supported() {
                return input_plane_avx2(src, v, nt, scratch);
            }
        }
    }
    let _ = tier;
    input_plane(src, v, nt, scratch);
}

/// `V = Bᵀ d B` of every tile of one input plane: value ξ of tile `t` to
/// `v[ξ·nt + t]`. Each row of tiles reads four input rows, copied into
/// zero-padded lines (so no tile needs a bounds test) and split into even
/// and odd columns (so tile `tx`'s four columns are `even[tx]`, `odd[tx]`,
/// `even[tx + 1]`, `odd[tx + 1]`, and [`TILES`] tiles read each as one
/// vector); it was a scalar function per tile, 4% of ResNet-18 at batch 8
/// on AVX2, and its 16 scattered writes another 2%. The sums are the same,
/// in the same order, at every tier.
#[inline(always)]
fn input_plane(src: &Source, v: &mut [f32], nt: usize, scratch: &mut Vec<f32>) {
    let (th, tw) = (src.th, src.tw);
    let wide = 2 * tw + 2;
    scratch.resize(wide + 8 * (tw + 1), 0.0);
    // `split`'s row i: even columns at `[2i]`, odd at `[2i + 1]`, `tw + 1`
    // each (every value is written before it is read).
    let (line, split) = scratch.split_at_mut(wide);
    for ty in 0..th {
        for (i, halves) in split.chunks_exact_mut(2 * (tw + 1)).enumerate() {
            line.fill(0.0);
            let iy = (2 * ty + i).checked_sub(src.top).filter(|&iy| iy < src.h);
            if let Some(iy) = iy {
                // Input column x lands at `x + left`.
                let n = src.w.min(wide.saturating_sub(src.left));
                line[src.left..src.left + n].copy_from_slice(&src.plane[iy * src.w..][..n]);
            }
            let (even, odd) = halves.split_at_mut(tw + 1);
            for ((e, o), pair) in even.iter_mut().zip(odd).zip(line.chunks_exact(2)) {
                (*e, *o) = (pair[0], pair[1]);
            }
        }
        let cols: [&[f32]; 8] = std::array::from_fn(|k| &split[k * (tw + 1)..][..tw + 1]);
        let row = ty * tw;
        let blocked = tw - tw % TILES;
        for tx in (0..blocked).step_by(TILES) {
            let t = input_tiles(&cols, tx);
            for (xi, lanes) in t.iter().enumerate() {
                v[xi * nt + row + tx..][..TILES].copy_from_slice(lanes);
            }
        }
        for tx in blocked..tw {
            let d: [[f32; 4]; 4] = std::array::from_fn(|i| {
                let (even, odd) = (cols[2 * i], cols[2 * i + 1]);
                [even[tx], odd[tx], even[tx + 1], odd[tx + 1]]
            });
            for (xi, val) in input_tile(d).into_iter().enumerate() {
                v[xi * nt + row + tx] = val;
            }
        }
    }
}

/// `Bᵀ d B` of one 4×4 tile: columns `Bᵀ d`, then rows `(Bᵀ d) B`.
#[inline(always)]
fn input_tile(t: [[f32; 4]; 4]) -> [f32; 16] {
    let cols: [[f32; 4]; 4] = std::array::from_fn(|j| bt([t[0][j], t[1][j], t[2][j], t[3][j]]));
    let mut out = [0f32; 16];
    for i in 0..4 {
        let row = bt([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
        out[i * 4..i * 4 + 4].copy_from_slice(&row);
    }
    out
}

/// [`input_tile`] of [`TILES`] tiles from `tx` on, lane by lane, from
/// the even and odd columns of the four rows (`cols[2i]`, `cols[2i + 1]`;
/// see [`input_plane`]): `[ξ]` is value ξ of each tile.
#[inline(always)]
fn input_tiles(cols: &[&[f32]; 8], tx: usize) -> [[f32; TILES]; 16] {
    let lanes = |f: &dyn Fn(usize) -> f32| -> [f32; TILES] { std::array::from_fn(f) };
    // d[i][j][l]: row i, column j of tile tx + l.
    let mut d = [[[0f32; TILES]; 4]; 4];
    for (i, rows) in d.iter_mut().enumerate() {
        let (even, odd) = (cols[2 * i], cols[2 * i + 1]);
        rows[0].copy_from_slice(&even[tx..tx + TILES]);
        rows[1].copy_from_slice(&odd[tx..tx + TILES]);
        rows[2].copy_from_slice(&even[tx + 1..tx + 1 + TILES]);
        rows[3].copy_from_slice(&odd[tx + 1..tx + 1 + TILES]);
    }
    let bt_lanes = |a: [&[f32; TILES]; 4]| -> [[f32; TILES]; 4] {
        [
            lanes(&|l| a[0][l] - a[2][l]),
            lanes(&|l| a[1][l] + a[2][l]),
            lanes(&|l| a[2][l] - a[1][l]),
            lanes(&|l| a[1][l] - a[3][l]),
        ]
    };
    let cols: [[[f32; TILES]; 4]; 4] =
        std::array::from_fn(|j| bt_lanes([&d[0][j], &d[1][j], &d[2][j], &d[3][j]]));
    let mut out = [[0f32; TILES]; 16];
    for i in 0..4 {
        let row = bt_lanes([&cols[0][i], &cols[1][i], &cols[2][i], &cols[3][i]]);
        out[i * 4..i * 4 + 4].copy_from_slice(&row);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_plane_avx2(src: &Source, v: &mut [f32], nt: usize, scratch: &mut Vec<f32>) {
    input_plane(src, v, nt, scratch)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn input_plane_avx512(src: &Source, v: &mut [f32], nt: usize, scratch: &mut Vec<f32>) {
    input_plane(src, v, nt, scratch)
}

/// Where one output plane's tiles lie in `M` (`[16][O][tiles]`): tile `t`
/// of the plane at position ξ is `m[ξ·xi_stride + first + t]`, `t = ty·tw + tx`.
struct Plane<'a> {
    m: &'a [f32],
    xi_stride: usize,
    first: usize,
    oh: usize,
    ow: usize,
}

/// [`output_plane`] compiled for `tier` (a tier the CPU lacks runs the
/// best it has).
fn output_plane_at(
    tier: Tier,
    plane: &Plane,
    b: f32,
    act: Activation,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each variant runs only where the CPU has its
        // instructions.
        #[allow(unsafe_code)]
        unsafe {
            if tier >= Tier::Avx512 && Tier::Avx512.supported() {
                return output_plane_avx512(plane, b, act, y, scratch);
            }
            if tier >= Tier::Avx2 && Tier::Avx2.supported() {
                return output_plane_avx2(plane, b, act, y, scratch);
            }
        }
    }
    let _ = tier;
    output_plane(plane, b, act, y, scratch);
}

/// `Y = Aᵀ M A + b`, then the activation, for one output plane `y`
/// (`oh × ow`). A plane's tiles lie side by side in each of the 16 `M_ξ`,
/// so they are transformed across vectors of [`TILES`] tiles (this was a
/// scalar loop per tile, 10% of ResNet-18 at batch 8 on AVX2), then
/// written out row by row, the row and column past an odd edge dropped.
/// The sums are the same, in the same order, at every tier.
#[inline(always)]
fn output_plane(plane: &Plane, b: f32, act: Activation, y: &mut [f32], scratch: &mut Vec<f32>) {
    let (oh, ow) = (plane.oh, plane.ow);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let tiles = th * tw;
    let ms: [&[f32]; 16] =
        std::array::from_fn(|xi| &plane.m[xi * plane.xi_stride + plane.first..][..tiles]);
    // Output (i, j) of every tile: `scratch[(2i + j)·tiles + t]`, every
    // value written before it is read.
    scratch.resize(4 * tiles, 0.0);
    let (s00, rest) = scratch.split_at_mut(tiles);
    let (s01, rest) = rest.split_at_mut(tiles);
    let (s10, s11) = rest.split_at_mut(tiles);
    let blocked = tiles - tiles % TILES;
    for t in (0..blocked).step_by(TILES) {
        let r = output_tiles(&ms, t);
        s00[t..t + TILES].copy_from_slice(&r[0][0]);
        s01[t..t + TILES].copy_from_slice(&r[0][1]);
        s10[t..t + TILES].copy_from_slice(&r[1][0]);
        s11[t..t + TILES].copy_from_slice(&r[1][1]);
    }
    for t in blocked..tiles {
        let r = output_tile(&ms, t);
        (s00[t], s01[t], s10[t], s11[t]) = (r[0][0], r[0][1], r[1][0], r[1][1]);
    }
    for ty in 0..th {
        let row = ty * tw;
        for (i, (left, right)) in [(&*s00, &*s01), (&*s10, &*s11)].into_iter().enumerate() {
            let oy = 2 * ty + i;
            if oy >= oh {
                break;
            }
            let line = &mut y[oy * ow..][..ow];
            let (left, right) = (&left[row..][..tw], &right[row..][..tw]);
            for (tx, pair) in line.chunks_exact_mut(2).enumerate() {
                pair[0] = left[tx] + b;
                pair[1] = right[tx] + b;
            }
            if ow % 2 == 1 {
                line[ow - 1] = left[tw - 1] + b;
            }
        }
    }
    act.apply_slice_inline(y);
}

/// Tiles the transforms take at once, lane by lane: a vector of 8 lanes
/// (two at SSE, half of one at AVX-512; written as arrays so that it
/// vectorises at every tier).
const TILES: usize = 8;

/// [`output_tile`] of [`TILES`] tiles from `t` on, lane by lane: `[i][j]`
/// is output `(i, j)` of each tile.
#[inline(always)]
fn output_tiles(ms: &[&[f32]; 16], t: usize) -> [[[f32; TILES]; 2]; 2] {
    let mut v = [[0f32; TILES]; 16];
    for (lanes, m) in v.iter_mut().zip(ms) {
        lanes.copy_from_slice(&m[t..t + TILES]);
    }
    let lanes = |f: &dyn Fn(usize) -> f32| -> [f32; TILES] { std::array::from_fn(f) };
    // Aᵀ M per column j: [m_j + m_4+j + m_8+j, m_4+j − m_8+j − m_12+j].
    let c: [[[f32; TILES]; 2]; 4] = std::array::from_fn(|j| {
        [
            lanes(&|l| v[j][l] + v[4 + j][l] + v[8 + j][l]),
            lanes(&|l| v[4 + j][l] - v[8 + j][l] - v[12 + j][l]),
        ]
    });
    std::array::from_fn(|i| {
        [
            lanes(&|l| c[0][i][l] + c[1][i][l] + c[2][i][l]),
            lanes(&|l| c[1][i][l] - c[2][i][l] - c[3][i][l]),
        ]
    })
}

/// `Aᵀ M A` (2×2) of tile `t`: `Aᵀ M` per column, then by rows.
#[inline(always)]
fn output_tile(ms: &[&[f32]; 16], t: usize) -> [[f32; 2]; 2] {
    let c: [[f32; 2]; 4] =
        std::array::from_fn(|j| at([ms[j][t], ms[4 + j][t], ms[8 + j][t], ms[12 + j][t]]));
    std::array::from_fn(|i| at([c[0][i], c[1][i], c[2][i], c[3][i]]))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_plane_avx2(
    plane: &Plane,
    b: f32,
    act: Activation,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    output_plane(plane, b, act, y, scratch)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn output_plane_avx512(
    plane: &Plane,
    b: f32,
    act: Activation,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    output_plane(plane, b, act, y, scratch)
}

impl CustomOp3 for WinogradOp {
    fn name(&self) -> &'static str {
        "convscope-conv2d-winograd"
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
        if !eligible(&self.base, d.kh, d.kw) || self.u.len() != 16 * d.o * d.c {
            bail!(
                "winograd: not a 3x3 stride-1 ungrouped convolution with its transformed weights"
            );
        }
        // The weight is checked, but `u` is what is applied.
        let (x, _, b) = operands(&d, (xs, xl), (ws, wl), (bs, bl))?;
        let out = self.forward(&d, x, b);
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.o, d.oh, d.ow))))
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::kernels::conv::Activation;
    use crate::kernels::testing::Cases as Rng;

    fn winograd(op: ConvOp, w: &Tensor) -> WinogradOp {
        let (o, c, _, _) = w.dims4().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        WinogradOp {
            base: op,
            u: transform_weights(&wv, o, c).into(),
        }
    }

    /// A 3×3 stride-1 convolution padded by less than `pad` on each side.
    fn random_op(rng: &mut Rng, pad: usize, activation: Activation) -> ConvOp {
        ConvOp {
            stride: (1, 1),
            dilation: (1, 1),
            padding: (
                rng.below(pad),
                rng.below(pad),
                rng.below(pad),
                rng.below(pad),
            ),
            groups: 1,
            activation,
        }
    }

    /// Random 3×3 stride-1 cases: odd and even sizes, asymmetric padding,
    /// batches, bias or none, ReLU, ReLU6 or none.
    #[test]
    fn matches_the_direct_convolution_on_random_shapes() {
        let mut rng = Rng::new(21);
        for case in 0..300 {
            let act = [Activation::Identity, Activation::Relu, Activation::Relu6][case % 3];
            let op = random_op(&mut rng, 3, act);
            let (n, c, o) = (1 + rng.below(3), 1 + rng.below(20), 1 + rng.below(20));
            // Rows of up to 21 tiles: whole blocks of `TILES` and the rest.
            let (h, w) = (3 + rng.below(12), 3 + rng.below(38));
            let x = rng.tensor(&[n, c, h, w]);
            let wt = rng.tensor(&[o, c, 3, 3]);
            let b = if case % 2 == 0 {
                rng.tensor(&[o])
            } else {
                Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()
            };
            let fast = x.apply_op3(&wt, &b, winograd(op, &wt)).unwrap();
            let direct = x.apply_op3(&wt, &b, op).unwrap();
            assert_eq!(fast.dims(), direct.dims());
            let (f, dv) = (
                fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                direct.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (i, (a, b)) in f.iter().zip(&dv).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{op:?} x[{n},{c},{h},{w}] o={o}, element {i}: {a} vs {b}"
                );
            }
        }
    }

    /// The input and output transforms compiled for each tier give the
    /// portable ones' values bit for bit (the same sums in the same order), on odd
    /// and even sizes, rows narrower and wider than a vector, every
    /// activation.
    #[test]
    fn every_tiers_tile_transforms_are_the_portable_ones() {
        let tiers = crate::kernels::tier::tested_tiers("winograd tile transforms");
        let mut rng = Rng::new(33);
        for case in 0..120 {
            let op = random_op(&mut rng, 2, Activation::ALL[case % Activation::ALL.len()]);
            let (n, c, o) = (1 + rng.below(2), 1 + rng.below(6), 1 + rng.below(6));
            let (h, w) = (3 + rng.below(40), 3 + rng.below(40));
            let x = rng.tensor(&[n, c, h, w]);
            let wt = rng.tensor(&[o, c, 3, 3]);
            let b = rng.tensor(&[o]);
            let d = op.dims(x.layout(), wt.layout()).unwrap();
            let (xv, bv) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
            );
            let wino = winograd(op, &wt);
            let portable = wino.forward_at(Tier::Portable, &d, &xv, &bv);
            for &t in &tiers {
                let got = wino.forward_at(t, &d, &xv, &bv);
                let same = got
                    .iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{t} tier, {op:?} x[{n},{c},{h},{w}] o={o}");
            }
        }
    }

    #[test]
    fn gradients_are_the_direct_convolutions() {
        let mut rng = Rng::new(4);
        let op = ConvOp {
            stride: (1, 1),
            dilation: (1, 1),
            padding: (1, 1, 1, 1),
            groups: 1,
            activation: Activation::Relu,
        };
        let x = Var::from_tensor(&rng.tensor(&[2, 5, 7, 6])).unwrap();
        let w = Var::from_tensor(&rng.tensor(&[4, 5, 3, 3])).unwrap();
        let b = Var::from_tensor(&rng.tensor(&[4])).unwrap();
        let probe = rng.tensor(&[2, 4, 7, 6]);
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let fast = grads(
            x.as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), winograd(op, w.as_tensor()))
                .unwrap(),
        );
        let direct = grads(
            x.as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), op)
                .unwrap(),
        );
        let values = |g: &candle_core::backprop::GradStore, t: &Tensor| {
            g.get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            let (a, d) = (values(&fast, t), values(&direct, t));
            for (p, q) in a.iter().zip(&d) {
                assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "{p} vs {q}");
            }
        }
    }
}
