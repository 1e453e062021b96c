//! The im2col matrix and the gemm it feeds: rows written with whole-row
//! copies (zero borders for the padding), the product straight into the
//! NCHW output, and the per-thread scratch buffers they use.

use rayon::prelude::*;

use super::*;

/// A read-only matrix view for [`matmul`]: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(in crate::kernels) struct Mat<'a> {
    pub(in crate::kernels) data: &'a [f32],
    pub(in crate::kernels) rows: usize,
    pub(in crate::kernels) cols: usize,
    pub(in crate::kernels) rs: usize,
    pub(in crate::kernels) cs: usize,
}

impl Mat<'_> {
    pub(super) fn fits(&self) -> bool {
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
pub(in crate::kernels) fn matmul(
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    threads: usize,
) {
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
pub(super) fn for_each_chunk<F>(buf: &mut [f32], n: usize, threads: usize, f: F)
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
pub(super) fn im2col(d: &Dims, op: &ConvOp, xg: &[f32], col: &mut [f32], threads: usize) {
    for_each_chunk(&mut col[..d.k() * d.p()], d.p(), threads, |(r, row)| {
        im2col_row(d, op, xg, r, row)
    });
}

/// The geometry of a padded input whose zero borders a scratch buffer
/// holds (see [`Padded::key`]).
pub(super) type ScratchKey = [usize; 8];

/// The key of scratch use that writes no padded input (im2col alone): no
/// padded input's key matches it, so the next padded call zeroes borders.
pub(super) const NO_PADDED_INPUT: ScratchKey = [usize::MAX; 8];

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
pub(super) fn with_scratch<R>(
    n: usize,
    key: ScratchKey,
    f: impl FnOnce(&mut [f32], bool) -> R,
) -> R {
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
pub(super) fn column_span(d: &Dims, op: &ConvOp, kx: usize) -> (usize, usize, isize) {
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
pub(super) fn input_row(d: &Dims, op: &ConvOp, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * op.stride.0 + ky * op.dilation.0) as isize - op.padding.0 as isize;
    (0..d.h as isize).contains(&iy).then_some(iy as usize)
}

/// Writes im2col row `r` (input channel `c` of `x`, kernel tap `ky, kx`).
pub(super) fn im2col_row(d: &Dims, op: &ConvOp, x: &[f32], r: usize, row: &mut [f32]) {
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
        // A tap that sees only padding (padding wider than the output
        // reaches) has no columns, and `first` may lie before the row.
        if ox0 == ox1 {
            continue;
        }
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
pub(super) fn col2im_row(d: &Dims, op: &ConvOp, row: &[f32], r: usize, dx: &mut [f32]) {
    let (c, ky, kx) = (r / (d.kh * d.kw), r / d.kw % d.kh, r % d.kw);
    let plane = &mut dx[c * d.h * d.w..(c + 1) * d.h * d.w];
    let (ox0, ox1, off) = column_span(d, op, kx);
    let sw = op.stride.1;
    for (oy, src) in row.chunks_exact(d.ow).enumerate() {
        let Some(iy) = input_row(d, op, oy, ky) else {
            continue;
        };
        if ox0 == ox1 {
            continue; // as in `im2col_row`
        }
        let dst = &mut plane[iy * d.w..(iy + 1) * d.w];
        let first = (ox0 * sw) as isize + off;
        for (i, v) in src[ox0..ox1].iter().enumerate() {
            dst[first as usize + i * sw] += v;
        }
    }
}
