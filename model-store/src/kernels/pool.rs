//! 2-D max and average pooling with PyTorch's semantics, forward and backward.
//!
//! candle's pooling has no padding or `ceil_mode`, and its backward bails
//! when the kernel differs from the stride (torchvision's ResNet stem and
//! AlexNet use `MaxPool2d(3, 2)`), and splits a max-pool gradient between
//! tied maxima, where PyTorch gives it all to the first. This op follows
//! PyTorch exactly:
//! - max: the window is clipped to the input (padding acts as −∞); the first
//!   maximum wins, NaN propagates; the gradient goes to that element;
//! - average: windows end at `H + padding`; the divisor is the window area
//!   within that bound (`count_include_pad`) or within the input.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::layers::PoolKind;

/// The pooling op; `out` is precomputed by the caller with PyTorch's rule.
#[derive(Debug, Clone, Copy)]
pub struct PoolOp {
    /// Max or average.
    pub kind: PoolKind,
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Padding `(h, w)`.
    pub padding: (usize, usize),
    /// Output `(h, w)`.
    pub out: (usize, usize),
    /// Average pooling: count padding in the divisor.
    pub count_include_pad: bool,
}

/// Per output row and per output column: the input range, clipped, and
/// the window's length before clipping ([`PoolOp::span`]).
type Spans = (Vec<(usize, usize, usize)>, Vec<(usize, usize, usize)>);

/// One output cell's window in input coordinates, and the average divisor.
struct Window {
    h0: usize,
    h1: usize,
    w0: usize,
    w1: usize,
    divisor: f32,
}

impl Window {
    /// The window's maximum in a plane `w` wide and where it lies (the
    /// first of equal values; a NaN wins, as in PyTorch); `None` for an
    /// empty window.
    fn argmax(&self, plane: &[f32], w: usize) -> (f32, Option<usize>) {
        let mut best = (f32::NEG_INFINITY, None);
        for y in self.h0..self.h1 {
            for xx in self.w0..self.w1 {
                let v = plane[y * w + xx];
                if v > best.0 || v.is_nan() || best.1.is_none() {
                    best = (v, Some(y * w + xx));
                    if v.is_nan() {
                        return best;
                    }
                }
            }
        }
        best
    }
}

impl PoolOp {
    /// Output index `o`'s input range along `axis` (0: rows, 1: columns)
    /// of an input `n` long, clipped to the input, and the window's length
    /// before that clipping (within the padding for average pooling): the
    /// windows are products of these, so a plane computes them once per
    /// row and once per column instead of once per cell.
    fn span(&self, o: usize, axis: usize, n: usize) -> (usize, usize, usize) {
        let (k, s, p) = if axis == 0 {
            (self.kernel.0, self.stride.0, self.padding.0)
        } else {
            (self.kernel.1, self.stride.1, self.padding.1)
        };
        let (n, p) = (n as isize, p as isize);
        let start = (o * s) as isize - p;
        let end = match self.kind {
            PoolKind::Max => (start + k as isize).min(n),
            PoolKind::Avg => (start + k as isize).min(n + p),
        };
        (
            start.max(0) as usize,
            end.min(n).max(0) as usize,
            (end - start).max(0) as usize,
        )
    }

    /// The spans ([`Self::span`]) of every output row and column.
    fn spans(&self, h: usize, w: usize) -> Spans {
        (
            (0..self.out.0).map(|oy| self.span(oy, 0, h)).collect(),
            (0..self.out.1).map(|ox| self.span(ox, 1, w)).collect(),
        )
    }

    /// Runs `f(out_index_in_plane, window)` for every output cell of one
    /// plane, with the spans of [`Self::spans`].
    fn for_each_cell(&self, (rows, cols): &Spans, mut f: impl FnMut(usize, &Window)) {
        let ow = cols.len();
        for (oy, &(h0, h1, fh)) in rows.iter().enumerate() {
            for (ox, &(w0, w1, fw)) in cols.iter().enumerate() {
                let divisor = if self.count_include_pad {
                    (fh * fw) as f32
                } else {
                    (h1.saturating_sub(h0) * w1.saturating_sub(w0)) as f32
                };
                let win = Window {
                    h0,
                    h1,
                    w0,
                    w1,
                    divisor,
                };
                f(oy * ow + ox, &win);
            }
        }
    }

    /// Max pooling of one plane, separably: per output row, the maximum of
    /// its input rows down each column (whole rows at a time, which
    /// vectorises), then of each window's columns. Same values as the
    /// window-by-window scan but for the sign of a zero maximum and which
    /// NaN wins (where a window holds both −0 and +0, or two NaNs): a NaN
    /// anywhere in a window wins, an empty window is −∞. (The window loop
    /// with its per-cell clipping was 4% of ResNet-18's batch-1 forward.)
    fn max_plane(&self, (rows, cols): &Spans, plane: &[f32], out: &mut [f32], w: usize) {
        let ow = cols.len();
        let mut column = vec![f32::NEG_INFINITY; w];
        for (oy, &(h0, h1, _)) in rows.iter().enumerate() {
            column.fill(f32::NEG_INFINITY);
            for y in h0..h1 {
                for (m, &v) in column.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                    let take = v > *m || v.is_nan();
                    *m = if take { v } else { *m };
                }
            }
            for (o, &(w0, w1, _)) in out[oy * ow..(oy + 1) * ow].iter_mut().zip(cols) {
                let mut best = f32::NEG_INFINITY;
                for &v in &column[w0.min(w1)..w1] {
                    if v > best || v.is_nan() {
                        best = v;
                    }
                }
                *o = best;
            }
        }
    }

    fn forward_plane(&self, spans: &Spans, plane: &[f32], out: &mut [f32], w: usize) {
        if self.kind == PoolKind::Max {
            return self.max_plane(spans, plane, out, w);
        }
        self.for_each_cell(spans, |o, win| {
            let mut sum = 0f32;
            for y in win.h0..win.h1 {
                sum += plane[y * w + win.w0..y * w + win.w1].iter().sum::<f32>();
            }
            out[o] = sum / win.divisor;
        });
    }

    /// Planes in parallel on the rayon pool.
    fn forward_slice(&self, x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let per = self.out.0 * self.out.1;
        let mut out = vec![0f32; planes * per];
        if per == 0 || h * w == 0 {
            return out;
        }
        let spans = self.spans(h, w);
        out.par_chunks_mut(per)
            .zip(x.par_chunks(h * w))
            .with_min_len(PLANES_PER_TASK)
            .for_each(|(o, plane)| self.forward_plane(&spans, plane, o, w));
        out
    }

    fn backward_plane(
        &self,
        spans: &Spans,
        x: &[f32],
        grad_out: &[f32],
        grad: &mut [f32],
        w: usize,
    ) {
        self.for_each_cell(spans, |o, win| match self.kind {
            PoolKind::Max => {
                if let (_, Some(i)) = win.argmax(x, w) {
                    grad[i] += grad_out[o];
                }
            }
            PoolKind::Avg => {
                let g = grad_out[o] / win.divisor;
                for y in win.h0..win.h1 {
                    for v in &mut grad[y * w + win.w0..y * w + win.w1] {
                        *v += g;
                    }
                }
            }
        });
    }

    fn backward_slice(
        &self,
        x: &[f32],
        grad_out: &[f32],
        planes: usize,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let mut grad = vec![0f32; x.len()];
        let per = self.out.0 * self.out.1;
        if per == 0 || h * w == 0 || planes == 0 {
            return grad;
        }
        let spans = self.spans(h, w);
        grad.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(grad_out.par_chunks(per)))
            .with_min_len(PLANES_PER_TASK)
            .for_each(|(g, (xs, go))| self.backward_plane(&spans, xs, go, g, w));
        grad
    }
}

/// Planes one rayon task takes at least (a plane is often a few hundred values).
const PLANES_PER_TASK: usize = 16;

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let x = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("pool2d: only f32 tensors are supported"),
        };
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => &x[start..end],
            None => candle_core::bail!("pool2d: the input must be contiguous"),
        };
        let out = self.forward_slice(x, n * c, h, w);
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, c, self.out.0, self.out.1)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let grad = self.backward_slice(&x, &g, n * c, h, w);
        Ok(Some(Tensor::from_vec(grad, (n, c, h, w), arg.device())?))
    }
}

impl PoolOp {
    /// `MaxPool2d(2)` with every window inside the input: the common case,
    /// with its own loop.
    fn is_2x2(&self, h: usize, w: usize) -> bool {
        self.kind == PoolKind::Max
            && self.kernel == (2, 2)
            && self.stride == (2, 2)
            && self.padding == (0, 0)
            && 2 * self.out.0 <= h
            && 2 * self.out.1 <= w
    }
}

/// 2×2 stride-2 max pooling of one plane with the maxima's indices; the
/// first maximum in row-major order wins and NaN propagates, as in the
/// general loop and in PyTorch.
fn max_2x2(plane: &[f32], w: usize, out: (usize, usize), o: &mut [f32], ix: &mut [u32]) {
    let (oh, ow) = out;
    for oy in 0..oh {
        let (r0, r1) = (2 * oy * w, (2 * oy + 1) * w);
        let (top, bottom) = (&plane[r0..r0 + 2 * ow], &plane[r1..r1 + 2 * ow]);
        let (orow, irow) = (
            &mut o[oy * ow..(oy + 1) * ow],
            &mut ix[oy * ow..(oy + 1) * ow],
        );
        for (ox, (ov, iv)) in orow.iter_mut().zip(irow.iter_mut()).enumerate() {
            let v = [
                top[2 * ox],
                top[2 * ox + 1],
                bottom[2 * ox],
                bottom[2 * ox + 1],
            ];
            let at = [r0 + 2 * ox, r0 + 2 * ox + 1, r1 + 2 * ox, r1 + 2 * ox + 1];
            // Strict `>`: the first maximum wins. Branch-free selects.
            let (mut bv, mut bi) = (v[0], 0);
            for (k, &vk) in v.iter().enumerate().skip(1) {
                let gt = vk > bv;
                bv = if gt { vk } else { bv };
                bi = if gt { k } else { bi };
            }
            // NaN propagates: the first NaN wins (rare; off the fast path).
            if v.iter().any(|x| x.is_nan()) {
                let k = v.iter().position(|x| x.is_nan()).unwrap_or(0);
                (bv, bi) = (v[k], k);
            }
            *ov = bv;
            *iv = at[bi] as u32;
        }
    }
}

/// Max pooling that records each maximum's position during the forward
/// pass (PyTorch's `max_pool2d_with_indices`), so the backward scatters
/// the gradient without scanning the windows again. Used when the input is
/// differentiated (training, saliency).
#[derive(Debug)]
pub struct MaxPoolWithIndices {
    op: PoolOp,
    /// Per output cell, the index of its maximum within its plane.
    indices: std::sync::Mutex<Vec<u32>>,
}

impl MaxPoolWithIndices {
    /// Wraps a max-pooling op.
    pub fn new(op: PoolOp) -> Self {
        Self {
            op,
            indices: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl CustomOp1 for MaxPoolWithIndices {
    fn name(&self) -> &'static str {
        "max-pool2d-with-indices"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("pool2d: only f32 tensors are supported");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("pool2d: the input must be contiguous");
        };
        let x = &x[start..end];
        let per = self.op.out.0 * self.op.out.1;
        let mut out = vec![0f32; n * c * per];
        let mut idx = vec![0u32; n * c * per];
        if per > 0 && h * w > 0 {
            let spans = self.op.spans(h, w);
            out.par_chunks_mut(per)
                .zip(idx.par_chunks_mut(per))
                .zip(x.par_chunks(h * w))
                .with_min_len(PLANES_PER_TASK)
                .for_each(|((o, ix), plane)| {
                    if self.op.is_2x2(h, w) {
                        max_2x2(plane, w, self.op.out, o, ix);
                        return;
                    }
                    self.op.for_each_cell(&spans, |cell, win| {
                        let best = win.argmax(plane, w);
                        o[cell] = best.0;
                        ix[cell] = best.1.map_or(u32::MAX, |i| i as u32);
                    });
                });
        }
        *self.indices.lock().unwrap_or_else(|e| e.into_inner()) = idx;
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, c, self.op.out.0, self.op.out.1)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let idx = self.indices.lock().unwrap_or_else(|e| e.into_inner());
        let per = self.op.out.0 * self.op.out.1;
        let mut grad = vec![0f32; n * c * h * w];
        if per > 0 && h * w > 0 {
            grad.par_chunks_mut(h * w)
                .zip(g.par_chunks(per).zip(idx.par_chunks(per)))
                .with_min_len(PLANES_PER_TASK)
                .for_each(|(dst, (gs, is))| {
                    for (gv, &i) in gs.iter().zip(is) {
                        if let Some(d) = dst.get_mut(i as usize) {
                            *d += gv;
                        }
                    }
                });
        }
        Ok(Some(Tensor::from_vec(grad, (n, c, h, w), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::testing::Cases as Rng;
    use crate::layers::Pool2d;

    fn random_pool(rng: &mut Rng, kind: PoolKind) -> Pool2d {
        let k = (1 + rng.below(4), 1 + rng.below(4));
        let s = (1 + rng.below(3), 1 + rng.below(3));
        let p = (rng.below(k.0 / 2 + 1), rng.below(k.1 / 2 + 1));
        Pool2d::new(kind, k, s, p, rng.below(2) == 1, rng.below(2) == 1, "t").unwrap()
    }

    #[test]
    fn forward_matches_the_padded_candle_composition_on_random_shapes() {
        let mut rng = Rng::new(7);
        for case in 0..300 {
            let kind = if case % 2 == 0 {
                PoolKind::Max
            } else {
                PoolKind::Avg
            };
            let pool = random_pool(&mut rng, kind);
            let (h, w) = (pool.kernel.0 + rng.below(9), pool.kernel.1 + rng.below(9));
            let (n, c) = (1 + rng.below(2), 1 + rng.below(3));
            let x = Tensor::from_vec(rng.values(n * c * h * w, 2.0), (n, c, h, w), &Device::Cpu)
                .unwrap();
            let fast = pool
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let reference = pool
                .forward_composite(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(fast.len(), reference.len(), "{pool:?} on {h}x{w}");
            for (a, b) in fast.iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{pool:?} on {h}x{w}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn average_backward_matches_candle_where_candle_has_one() {
        let mut rng = Rng::new(11);
        for _ in 0..30 {
            let k = 1 + rng.below(3);
            let pool =
                Pool2d::new(PoolKind::Avg, (k, k), (k, k), (0, 0), false, true, "t").unwrap();
            let (h, w) = (k * (1 + rng.below(4)), k * (1 + rng.below(4)));
            let x = Var::from_tensor(
                &Tensor::from_vec(rng.values(2 * h * w, 2.0), (1, 2, h, w), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let g = |y: Tensor| {
                (y.sqr().unwrap().sum_all().unwrap())
                    .backward()
                    .unwrap()
                    .get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let ours = g(pool.forward(x.as_tensor()).unwrap());
            let theirs = g(x.as_tensor().avg_pool2d(k).unwrap());
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "k={k}: {a} vs {b}"
                );
            }
        }
    }

    /// candle 0.11's own max-pool backward scales the gradient by
    /// (number of maxima) / k² instead of 1 / (number of maxima); PyTorch,
    /// and this op, send it whole to the first maximum.
    #[test]
    fn max_backward_sends_the_whole_gradient_to_the_first_maximum() {
        let pool = Pool2d::new(PoolKind::Max, (2, 2), (2, 2), (0, 0), false, true, "t").unwrap();
        let grad_of = |v: [f32; 4]| {
            let x = Var::from_tensor(
                &Tensor::from_vec(v.to_vec(), (1, 1, 2, 2), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let y = pool.forward(x.as_tensor()).unwrap().sum_all().unwrap();
            y.backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(grad_of([1.0, 2.0, 3.0, 4.0]), [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(
            grad_of([5.0, 5.0, 0.0, 5.0]),
            [1.0, 0.0, 0.0, 0.0],
            "ties: the first one"
        );
        // The padded 3x3/2 pool of torchvision's ResNet stem is differentiable.
        let stem = Pool2d::new(PoolKind::Max, (3, 3), (2, 2), (1, 1), false, true, "t").unwrap();
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 16.0, &Device::Cpu)
                .unwrap()
                .reshape((1, 1, 4, 4))
                .unwrap(),
        )
        .unwrap();
        let g = stem
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Windows end at rows/cols 1 and 3: the maxima are 5, 7, 13, 15.
        let hot: Vec<usize> = g
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hot, [5, 7, 13, 15]);
    }

    #[test]
    fn the_2x2_loop_agrees_with_the_general_one_on_ties_and_nans() {
        let mut rng = Rng::new(31);
        for case in 0..50 {
            let (h, w) = (2 + rng.below(9), 2 + rng.below(9));
            // Few distinct values: many ties; some NaNs.
            let v: Vec<f32> = (0..2 * h * w)
                .map(|i| match rng.below(10) {
                    0 if case % 3 == 0 => f32::NAN,
                    k => (k % 3) as f32 + (i % 2) as f32 * 0.0,
                })
                .collect();
            let pool =
                Pool2d::new(PoolKind::Max, (2, 2), (2, 2), (0, 0), false, true, "t").unwrap();
            let x =
                Var::from_tensor(&Tensor::from_vec(v.clone(), (1, 2, h, w), &Device::Cpu).unwrap())
                    .unwrap();
            // Tracked input: the indexed op (2x2 loop); plain: the general loop.
            let fast = pool.forward(x.as_tensor()).unwrap();
            let general = pool.forward(&x.as_tensor().detach()).unwrap();
            let (a, b) = (
                fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                general.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (p, q) in a.iter().zip(&b) {
                assert!(p == q || (p.is_nan() && q.is_nan()), "{p} vs {q}");
            }
            let grads = fast.sum_all().unwrap().backward().unwrap();
            let g = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let reference = PoolOp {
                kind: PoolKind::Max,
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
                out: (h / 2, w / 2),
                count_include_pad: true,
            }
            .backward_slice(&v, &vec![1.0; 2 * (h / 2) * (w / 2)], 2, h, w);
            assert_eq!(g, reference, "{h}x{w}");
        }
    }

    #[test]
    fn the_separable_max_agrees_with_the_window_scan_on_ties_and_nans() {
        let mut rng = Rng::new(37);
        for case in 0..200 {
            let (k, s) = (
                (1 + rng.below(4), 1 + rng.below(4)),
                (1 + rng.below(3), 1 + rng.below(3)),
            );
            let p = (rng.below(k.0 / 2 + 1), rng.below(k.1 / 2 + 1));
            let (h, w) = (k.0 + rng.below(9), k.1 + rng.below(9));
            let v: Vec<f32> = (0..2 * h * w)
                .map(|_| match rng.below(12) {
                    0 if case % 3 == 0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    k => (k % 3) as f32,
                })
                .collect();
            let ceil = rng.below(2) == 1;
            let pool = Pool2d::new(PoolKind::Max, k, s, p, ceil, true, "t").unwrap();
            let x = Var::from_tensor(&Tensor::from_vec(v, (1, 2, h, w), &Device::Cpu).unwrap())
                .unwrap();
            // Plain input: the separable pass; tracked: the indexed op's
            // window-by-window scan.
            let separable = pool.forward(&x.as_tensor().detach()).unwrap();
            let scan = pool.forward(x.as_tensor()).unwrap();
            let (a, b) = (
                separable.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                scan.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    p == q || (p.is_nan() && q.is_nan()),
                    "{k:?} {s:?} {h}x{w}: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_with_padding_and_overlap() {
        let mut rng = Rng::new(23);
        for case in 0..40 {
            let kind = if case % 2 == 0 {
                PoolKind::Max
            } else {
                PoolKind::Avg
            };
            let pool = random_pool(&mut rng, kind);
            let (h, w) = (pool.kernel.0 + rng.below(4), pool.kernel.1 + rng.below(4));
            let values = rng.values(h * w, 2.0);
            let weights = rng.values(1000, 2.0);
            // loss = Σ weight_i · out_i, a linear read-out of the pooled map.
            let loss = |v: &[f32]| -> f64 {
                let x = Tensor::from_vec(v.to_vec(), (1, 1, h, w), &Device::Cpu).unwrap();
                let y = pool
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                y.iter()
                    .zip(&weights)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            let x = Var::from_tensor(
                &Tensor::from_vec(values.clone(), (1, 1, h, w), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let y = pool.forward(x.as_tensor()).unwrap();
            let n = y.elem_count();
            let wt = Tensor::from_vec(weights[..n].to_vec(), y.shape(), &Device::Cpu).unwrap();
            let grads = (y * wt).unwrap().sum_all().unwrap().backward().unwrap();
            let analytic = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..values.len() {
                let eps = 1e-3f32;
                let (mut up, mut down) = (values.clone(), values.clone());
                up[i] += eps;
                down[i] -= eps;
                let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
                assert!(
                    (numeric - analytic[i] as f64).abs() < 2e-2,
                    "{pool:?} on {h}x{w}, element {i}: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
    }
}
