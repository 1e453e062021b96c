//! How one call runs: the direct kernel over the padded input or over the
//! im2col rows, or gemm; offsets and vectors worked out once per call.

use std::sync::Arc;

use super::im2col::*;
use super::packed::packed_or_pack;
use super::*;
use crate::kernels::tier::Tier;

/// How one call computes its images.
pub(super) enum Plan {
    /// [`ConvOp::padded_path`].
    Padded(Padded),
    /// im2col (unless pointwise), then gemm, or [`direct`] when given.
    General(Option<Direct>),
}

/// The padded path's geometry for one call, worked out once for all its
/// images: the zero-padded input's size, each im2col row's offset into it,
/// and for [`direct`] the packed weight and the vectors it computes.
pub(super) struct Padded {
    pub(super) hp: usize,
    pub(super) wp: usize,
    /// Positions computed per output channel: `OH · Wp`, rounded up to
    /// whole vectors for [`direct`].
    pub(super) np: usize,
    /// The padded input plus the tail the last windows read.
    pub(super) xp_len: usize,
    /// Where im2col row `(c, ky, kx)` starts in the padded input.
    pub(super) offsets: Vec<usize>,
    pub(super) direct: Option<Direct>,
}

/// What [`direct`] needs for one call: the packed weight, where each of
/// the `K` rows of the (virtual) im2col matrix starts in the source it
/// reads, and which vectors of it to compute.
pub(super) struct Direct {
    /// The tier whose variant of the kernel runs.
    pub(super) tier: Tier,
    pub(super) packed: Arc<[f32]>,
    pub(super) offsets: Vec<usize>,
    /// `(source position, output position)` of each vector's first value.
    pub(super) vectors: Vec<(usize, usize)>,
    pub(super) lanes: direct::Lanes,
    /// Whether `vectors` index the output itself (rather than a buffer of
    /// every padded position, cropped after).
    pub(super) straight: bool,
    /// How far apart two groups' rows lie in the source (`offsets` are
    /// group 0's): a block of [`direct::MR`] output channels lies in one
    /// group ([`ConvOp::direct_groups`]) and reads that group's rows.
    pub(super) group_pitch: usize,
}

impl Direct {
    /// For the general path, on one group: the im2col matrix `[K, P]` (or
    /// the input itself, for a pointwise convolution) read row by row, the
    /// output written in place. Needs `P` to be whole vectors.
    pub(super) fn general(tier: Tier, d: &Dims, w: &[f32], packed: Option<&Arc<[f32]>>) -> Self {
        let (k, p) = (d.k(), d.p());
        Self {
            tier,
            packed: packed_or_pack(d, w, packed),
            offsets: (0..k).map(|r| r * p).collect(),
            vectors: (0..p).step_by(direct::LANES).map(|q| (q, q)).collect(),
            lanes: direct::Lanes::Contiguous,
            straight: true,
            // One group's im2col rows (or input channels, for 1×1) after
            // another's.
            group_pitch: k * p,
        }
    }

    /// `target[o · ld + …] = act(bias[o] + Σ_r w[o, r] · src[offsets[r] +
    /// …])` for every output channel, the blocks of [`direct::MR`]
    /// channels spread over the pool when `threads > 1`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
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
            let src = &src[o0 / d.og * self.group_pitch..];
            let rows = (d.o - o0).min(direct::MR);
            let mut b = [0f32; direct::MR];
            if !bias.is_empty() {
                b[..rows].copy_from_slice(&bias[o0..o0 + rows]);
            }
            let block = &self.packed[blk * k * direct::MR..][..k * direct::MR];
            direct::block(
                self.tier,
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
            if !activation.in_registers() {
                activation.apply_slice_at(self.tier, &mut dst[..rows * ld]);
            }
        };
        for_each_chunk(&mut target[..d.o * ld], direct::MR * ld, threads, run);
    }
}

impl Padded {
    pub(super) fn new(
        op: &ConvOp,
        d: &Dims,
        w: &[f32],
        direct: Option<Tier>,
        packed: Option<&Arc<[f32]>>,
    ) -> Self {
        let (t, b, l, r) = op.padding;
        let (hp, wp) = (d.h + t + b, d.w + l + r);
        let (dh, dw) = op.dilation;
        let np = if direct.is_some() {
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
        let direct = direct.map(|tier| {
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
                tier,
                packed: packed_or_pack(d, w, packed),
                offsets: offsets.clone(),
                vectors,
                lanes,
                straight,
                group_pitch: d.cg * hp * wp,
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
    pub(super) fn scratch(&self, d: &Dims) -> usize {
        match &self.direct {
            Some(dir) if dir.straight => self.xp_len,
            Some(_) => self.xp_len + d.o * self.np,
            None => self.xp_len + d.k() * self.np + d.o * self.np,
        }
    }

    /// What identifies the padded input's zero borders: a thread's next
    /// image with the same key finds them still zero in its scratch.
    pub(super) fn key(&self, op: &ConvOp, d: &Dims) -> ScratchKey {
        let (t, _, l, _) = op.padding;
        [d.c, d.h, d.w, t, l, self.hp, self.wp, self.xp_len]
    }
}
