//! A direct convolution kernel for CPUs with AVX2 + FMA or AVX-512: the product of the
//! weights `[O, K]` with an im2col matrix `[K, positions]` that is read in
//! place, never packed.
//!
//! Row `r` of the im2col matrix starts at `offsets[r]` in a source slice.
//! For a stride-1 convolution the source is a zero-padded copy of the input
//! (`[C, Hp, Wp]`) and row `(c, ky, kx)` is the window at
//! `c·Hp·Wp + ky·dh·Wp + kx·dw`: the output at `(oy, ox)` reads it at
//! `oy·Wp + ox`, so the im2col matrix is never written. Otherwise
//! (strided, 1×1…) the source is an im2col matrix built by
//! `conv.rs`, read row by row where gemm would pack it again (at the AVX2
//! tier only below 64 rows: more rows are more streams, and gemm's packed
//! panels beat it there, `conv/forward.rs`). On
//! ResNet-20's layers (16–64 channels, 8×8–32×32) building and packing
//! that matrix cost about a third of the forward pass.
//!
//! Each register tile is 8 output channels × 3 vectors of 16 positions (24
//! accumulators): per im2col row it loads the three vectors, broadcasts 8
//! weights (packed `[K][8]` per block of channels, [`pack`]) and issues 24
//! fused multiply-adds, which keeps both FMA pipes busy on operands from
//! L1. The bias and activation are applied in registers before the store.
//! A vector is 16 consecutive positions, or ([`Lanes::Split`]) two output
//! rows of 8 that are consecutive in the output but a padded row apart in
//! the input.
//!
//! With AVX2 (16 registers of 8 lanes) the same block and the same vectors
//! run as halves of 8 positions: each tile is 3 output channels × 4 halves
//! (12 accumulators, 4 loads and 3 broadcasts per 12 multiply-adds), the
//! block's 8 channels in three passes (3, 3, 2) over the same rows. The
//! layout, the packing and the plan are the tiers' common ground, so both
//! are held to the same portable reference by the same tests.
//!
//! [`kernel`] says which tier (`tier.rs`) runs it, if any; elsewhere
//! `conv.rs` keeps im2col + gemm.

use super::conv::Activation;
use super::tier::Tier;

/// The epilogue's activation as a tile's const parameter: none (or one the
/// caller applies after the block), ReLU, ReLU6. Resolved at compile time,
/// so the epilogue stays small enough to unroll and the accumulators stay
/// in registers: with a run-time match over the seven activations the
/// compiler kept the 24 accumulators in memory, a store after every
/// multiply-add, and the kernel ran at 40% of its speed.
#[cfg(target_arch = "x86_64")]
const LINEAR: u8 = 0;
#[cfg(target_arch = "x86_64")]
const RELU: u8 = 1;
#[cfg(target_arch = "x86_64")]
const RELU6: u8 = 2;

/// Calls `tile::<…, ACT>(args)` with the const for `activation`.
#[cfg(target_arch = "x86_64")]
macro_rules! with_act {
    ($a:expr, $f:ident :: <$($g:tt),*> ($($arg:expr),*)) => {
        match $a {
            Activation::Relu => $f::<$($g),*, RELU>($($arg),*),
            Activation::Relu6 => $f::<$($g),*, RELU6>($($arg),*),
            _ => $f::<$($g),*, LINEAR>($($arg),*),
        }
    };
}

/// Output channels per packed block (and per AVX-512 register tile).
pub(super) const MR: usize = 8;
/// Output channels per AVX2 register tile (the last of a block has two).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const MR2: usize = 3;
/// Halves of 8 positions per AVX2 register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const NH: usize = 4;
/// Vectors of 16 positions per register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const NV: usize = 3;
/// Positions per vector.
pub(super) const LANES: usize = 16;

/// The tier this kernel runs at, if the active kernel tier has its
/// instructions (the CPU has them and `CONVSCOPE_KERNELS` does not cap them
/// off); `None` leaves im2col + gemm.
pub(super) fn kernel() -> Option<Tier> {
    kernel_at(super::tier::active())
}

/// The variant of this kernel `tier` runs: AVX-512 or AVX2, none for
/// portable.
pub(super) fn kernel_at(tier: Tier) -> Option<Tier> {
    (tier >= Tier::Avx2).then_some(tier)
}

/// Weights `[O, K]` (row-major) in the kernel's order: blocks of [`MR`]
/// output channels, each `[K][MR]`, the last block padded with zero rows.
pub(super) fn pack(w: &[f32], o: usize, k: usize) -> Vec<f32> {
    if k == 0 {
        return Vec::new();
    }
    let blocks = o.div_ceil(MR);
    let mut packed = vec![0f32; blocks * k * MR];
    for (oc, row) in w.chunks_exact(k).take(o).enumerate() {
        let block = &mut packed[oc / MR * k * MR..][..k * MR];
        for (r, &v) in row.iter().enumerate() {
            block[r * MR + oc % MR] = v;
        }
    }
    packed
}

/// Where a vector's 16 values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// 16 consecutive values.
    Contiguous,
    /// 8 consecutive values, then 8 more this far after the first (two
    /// output rows of 8, which lie one after the other in the output but
    /// one padded row apart in the input).
    Split(usize),
}

/// One block of output channels: for each `(src, dst)` in `vectors`,
/// `out[i · ld + dst + j] = act(bias[i] + Σ_r block[r][i] ·
/// xp[offsets[r] + src + j'])` for `j` in `0..16` and the block's `rows`
/// (≤ [`MR`]) channels, where `j' = j` for [`Lanes::Contiguous`] and
/// `j' = j` for `j < 8`, `pitch + j − 8` after it for [`Lanes::Split`].
/// `block` is one `[K][MR]` block of [`pack`], `bias` the block's [`MR`]
/// biases (zeros for none).
///
/// Panics unless every read and write lies inside its slice and the CPU
/// has `tier`'s instructions (from [`kernel`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn block(
    tier: Tier,
    block: &[f32],
    offsets: &[usize],
    xp: &[f32],
    lanes: Lanes,
    vectors: &[(usize, usize)],
    out: &mut [f32],
    ld: usize,
    rows: usize,
    bias: &[f32; MR],
    activation: Activation,
) {
    let k = offsets.len();
    assert_eq!(block.len(), k * MR, "direct conv: packed block size");
    assert!(
        rows <= MR && rows > 0,
        "direct conv: {rows} rows in a block"
    );
    // Checked sums: a wrapped bound would pass the asserts and let the
    // kernel read or write anywhere.
    let reach = offsets
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .checked_add(match lanes {
            Lanes::Contiguous => LANES,
            Lanes::Split(pitch) => pitch.saturating_add(LANES / 2),
        });
    let last_row = (rows - 1).checked_mul(ld);
    let fits = |&(src, dst): &(usize, usize)| {
        let read = reach.and_then(|r| r.checked_add(src));
        let write = dst.checked_add(LANES);
        read.is_some_and(|r| r <= xp.len())
            && write.is_some_and(|w| w <= ld)
            && write
                .zip(last_row)
                .and_then(|(w, l)| w.checked_add(l))
                .is_some_and(|w| w <= out.len())
    };
    assert!(
        vectors.iter().all(fits),
        "direct conv: a vector reaches past the padded input, its output row or the output"
    );
    assert!(lanes != Lanes::Split(0), "direct conv: split lanes 0 apart");
    // The CPU's instructions, not the capped tier: a test may run this
    // kernel under a CONVSCOPE_KERNELS cap, but never on a CPU without it.
    assert!(
        tier >= Tier::Avx2 && tier.supported(),
        "direct conv: the CPU lacks the {tier} tier's instructions"
    );
    #[cfg(target_arch = "x86_64")]
    if tier == Tier::Avx2 {
        avx2_block(
            block, offsets, xp, lanes, vectors, out, ld, rows, bias, activation,
        );
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut rest = vectors;
        while !rest.is_empty() {
            // Tiles of three vectors; four left go as two and two, since a
            // one-vector tile issues as many loads as multiply-adds.
            let take = if rest.len() == 4 {
                2
            } else {
                rest.len().min(NV)
            };
            let (v, next) = rest.split_at(take);
            rest = next;
            // SAFETY: AVX-512 F and DQ are present (asserted above: the
            // tier is avx512 and supported); the
            // asserts bound, without overflow, every load (`src +
            // offsets[r] + 16 ≤ xp.len()`, or `src + offsets[r] + pitch + 8`
            // for split lanes, whose variant is chosen by `lanes`), every
            // weight read (`r·MR + i < k·MR`, `block.len() = k·MR`) and every
            // store (`i·ld + dst + 16 ≤ (rows − 1)·ld + dst + 16 ≤
            // out.len()`).
            #[allow(unsafe_code)]
            unsafe {
                let (b, o, x, a) = (block, offsets, xp, activation);
                match (v.len(), lanes) {
                    (3, Lanes::Contiguous) => {
                        with_act!(a, tile::<3, false>(b, o, x, 0, v, out, ld, rows, bias))
                    }
                    (2, Lanes::Contiguous) => {
                        with_act!(a, tile::<2, false>(b, o, x, 0, v, out, ld, rows, bias))
                    }
                    (_, Lanes::Contiguous) => {
                        with_act!(a, tile::<1, false>(b, o, x, 0, v, out, ld, rows, bias))
                    }
                    (3, Lanes::Split(p)) => {
                        with_act!(a, tile::<3, true>(b, o, x, p, v, out, ld, rows, bias))
                    }
                    (2, Lanes::Split(p)) => {
                        with_act!(a, tile::<2, true>(b, o, x, p, v, out, ld, rows, bias))
                    }
                    (_, Lanes::Split(p)) => {
                        with_act!(a, tile::<1, true>(b, o, x, p, v, out, ld, rows, bias))
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (xp, vectors, out, ld, bias, activation);
        panic!("direct conv: not available on this architecture");
    }
}

/// [`block`] with AVX2 + FMA: each vector as two halves of 8 positions,
/// tiles of [`MR2`] channels × up to [`NH`] halves (the block's last
/// two channels as a tile of two). The caller checked the bounds and the
/// CPU's instructions.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn avx2_block(
    block: &[f32],
    offsets: &[usize],
    xp: &[f32],
    lanes: Lanes,
    vectors: &[(usize, usize)],
    out: &mut [f32],
    ld: usize,
    rows: usize,
    bias: &[f32; MR],
    activation: Activation,
) {
    const HALF: usize = LANES / 2;
    let second = match lanes {
        Lanes::Contiguous => HALF,
        Lanes::Split(pitch) => pitch,
    };
    let halves: Vec<(usize, usize)> = vectors
        .iter()
        .flat_map(|&(src, dst)| [(src, dst), (src + second, dst + HALF)])
        .collect();
    // The channel passes innermost: each reads the rows the one before it
    // just brought into L1 (the other order streamed the whole input
    // through the cache once per pass, and halved the kernel's speed on
    // ResNeXt's grouped layers).
    for h in halves.chunks(NH) {
        for c0 in (0..rows).step_by(MR2) {
            // A tile of three would read past the block's eighth channel.
            let wide = c0 + MR2 <= MR;
            let rows = (rows - c0).min(MR2);
            // SAFETY: the CPU has AVX2 and FMA (asserted by `block`), whose
            // asserts bound every load: a half reads 8 values from `src +
            // offsets[r]`, within the 16 (or `pitch + 8`) they bound. Weight
            // reads are `r·MR + c0 + i < k·MR` (`c0 + i < MR`: `wide` says
            // three fit); stores are `(c0 + i)·ld + dst + 8` with `c0 + i <
            // rows` and the half's `dst + 8` within its vector's `dst + 16`.
            #[allow(unsafe_code)]
            unsafe {
                let (b, o, x, a) = (block, offsets, xp, activation);
                // `C` channels × as many halves as this tile has.
                macro_rules! halves {
                    ($c:literal) => {
                        match h.len() {
                            4 => with_act!(
                                a,
                                tile_avx2::<$c, 4>(b, o, x, h, out, ld, c0, rows, bias)
                            ),
                            3 => with_act!(
                                a,
                                tile_avx2::<$c, 3>(b, o, x, h, out, ld, c0, rows, bias)
                            ),
                            2 => with_act!(
                                a,
                                tile_avx2::<$c, 2>(b, o, x, h, out, ld, c0, rows, bias)
                            ),
                            _ => with_act!(
                                a,
                                tile_avx2::<$c, 1>(b, o, x, h, out, ld, c0, rows, bias)
                            ),
                        }
                    };
                }
                if wide { halves!(3) } else { halves!(2) }
            }
        }
    }
}

/// One AVX2 register tile: channels `c0..c0 + rows` (`rows` ≤ `C`) of the
/// block × `H` halves of 8 positions, the epilogue as in [`tile`]. Per
/// im2col row it broadcasts `C` weights, then loads each half once for
/// `C` multiply-adds: `C·H + C + 1` registers, 16 for 3 × 4, so nothing
/// spills (a 4 × 3 tile needs 17, and the spilled accumulator's
/// store-to-load round trip halved the kernel's speed).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const C: usize, const H: usize, const ACT: u8>(
    block: &[f32],
    offsets: &[usize],
    xp: &[f32],
    halves: &[(usize, usize)],
    out: &mut [f32],
    ld: usize,
    c0: usize,
    rows: usize,
    bias: &[f32; MR],
) {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_max_ps, _mm256_min_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    // SAFETY: the caller (`avx2_block`, after `block`'s asserts) bounds
    // every offset, and checked that the CPU has AVX2 and FMA.
    unsafe {
        let mut src = [xp.as_ptr(); H];
        for (s, &(at, _)) in src.iter_mut().zip(halves) {
            *s = s.add(at);
        }
        let w = block.as_ptr().add(c0);
        let mut acc: [[__m256; C]; H] = [[_mm256_setzero_ps(); C]; H];
        for (r, &off) in offsets.iter().enumerate() {
            let wr = w.add(r * MR);
            let b: [__m256; C] = std::array::from_fn(|i| _mm256_broadcast_ss(&*wr.add(i)));
            for (col, s) in acc.iter_mut().zip(&src) {
                let xv = _mm256_loadu_ps(s.add(off));
                for (a, &b) in col.iter_mut().zip(&b) {
                    *a = _mm256_fmadd_ps(b, xv, *a);
                }
            }
        }
        let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
        let dst = out.as_mut_ptr();
        for (col, &(_, at)) in acc.iter().zip(halves) {
            for (i, a) in col.iter().enumerate().take(rows) {
                let y = _mm256_add_ps(*a, _mm256_set1_ps(bias[c0 + i]));
                let y = match ACT {
                    RELU => _mm256_max_ps(y, zero),
                    RELU6 => _mm256_min_ps(six, _mm256_max_ps(zero, y)),
                    _ => y,
                };
                _mm256_storeu_ps(dst.add((c0 + i) * ld + at), y);
            }
        }
    }
}

/// One register tile: `rows` output channels × `V` vectors (each two
/// halves `pitch` apart when `SPLIT`), with the bias and activation applied
/// as [`Activation::apply`] does (a NaN stays NaN except under ReLU, which
/// maps it to 0 like `f32::max`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn tile<const V: usize, const SPLIT: bool, const ACT: u8>(
    block: &[f32],
    offsets: &[usize],
    xp: &[f32],
    pitch: usize,
    vectors: &[(usize, usize)],
    out: &mut [f32],
    ld: usize,
    rows: usize,
    bias: &[f32; MR],
) {
    use std::arch::x86_64::{
        __m512, _mm256_loadu_ps, _mm512_add_ps, _mm512_castps256_ps512, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_mask_broadcast_f32x8, _mm512_max_ps, _mm512_min_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_ps,
    };
    // SAFETY: the caller (`block`) bounds every offset as documented
    // there, and checked that the CPU has the AVX-512 F and DQ (for
    // `_mm512_mask_broadcast_f32x8`) instructions this function is
    // compiled for.
    unsafe {
        let mut src = [xp.as_ptr(); V];
        for (s, &(at, _)) in src.iter_mut().zip(vectors) {
            *s = s.add(at);
        }
        let w = block.as_ptr();
        let mut acc: [[__m512; V]; MR] = [[_mm512_setzero_ps(); V]; MR];
        for (r, &off) in offsets.iter().enumerate() {
            let mut xv: [__m512; V] = [_mm512_setzero_ps(); V];
            for (slot, s) in xv.iter_mut().zip(&src) {
                let at = s.add(off);
                *slot = if SPLIT {
                    let low = _mm512_castps256_ps512(_mm256_loadu_ps(at));
                    _mm512_mask_broadcast_f32x8(low, 0xFF00, _mm256_loadu_ps(at.add(pitch)))
                } else {
                    _mm512_loadu_ps(at)
                };
            }
            let wr = w.add(r * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*wr.add(i));
                for (a, &xv) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(b, xv, *a);
                }
            }
        }
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        let dst = out.as_mut_ptr();
        for (i, row) in acc.iter().enumerate().take(rows) {
            let b = _mm512_set1_ps(bias[i]);
            for (a, &(_, at)) in row.iter().zip(vectors) {
                let y = _mm512_add_ps(*a, b);
                // maxps/minps return their second operand when either is
                // NaN.
                let y = match ACT {
                    RELU => _mm512_max_ps(y, zero),
                    RELU6 => _mm512_min_ps(six, _mm512_max_ps(zero, y)),
                    _ => y,
                };
                _mm512_storeu_ps(dst.add(i * ld + at), y);
            }
        }
    }
}
