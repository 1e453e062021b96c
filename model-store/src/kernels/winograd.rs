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

use super::conv::{ConvOp, Dims, Mat, matmul, operands};

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
        let (th, tw) = (d.oh.div_ceil(2), d.ow.div_ceil(2));
        let tiles = th * tw;
        let per_chunk = (BUDGET / (16 * (d.c + d.o) * tiles).max(1)).clamp(1, d.n);
        let mut out = vec![0f32; d.n * d.o * d.oh * d.ow];
        let (mut v, mut m) = (Vec::new(), Vec::new());
        for first in (0..d.n).step_by(per_chunk) {
            let imgs = per_chunk.min(d.n - first);
            let nt = imgs * tiles;
            v.resize(d.c * 16 * nt, 0.0);
            v.par_chunks_mut(16 * nt).enumerate().for_each(|(c, vc)| {
                for img in 0..imgs {
                    let plane = &x[((first + img) * d.c + c) * d.h * d.w..][..d.h * d.w];
                    for ty in 0..th {
                        for tx in 0..tw {
                            let tile = self.input_tile(d, plane, ty, tx);
                            let col = img * tiles + ty * tw + tx;
                            for (xi, val) in tile.into_iter().enumerate() {
                                vc[xi * nt + col] = val;
                            }
                        }
                    }
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
                .for_each(|(p, y)| {
                    let (img, o) = (p / d.o, p % d.o);
                    let b = bias.get(o).copied().unwrap_or(0.0);
                    for ty in 0..th {
                        for tx in 0..tw {
                            let col = img * tiles + ty * tw + tx;
                            let at_xi = |xi: usize| m[(xi * d.o + o) * nt + col];
                            // Aᵀ M: 2×4, then (Aᵀ M) A: 2×2.
                            let rows: [[f32; 4]; 2] = {
                                let c: [[f32; 2]; 4] = std::array::from_fn(|j| {
                                    at([at_xi(j), at_xi(4 + j), at_xi(8 + j), at_xi(12 + j)])
                                });
                                std::array::from_fn(|i| std::array::from_fn(|j| c[j][i]))
                            };
                            for (i, row) in rows.into_iter().enumerate() {
                                let oy = 2 * ty + i;
                                if oy >= d.oh {
                                    break;
                                }
                                for (j, val) in at(row).into_iter().enumerate() {
                                    let ox = 2 * tx + j;
                                    if ox < d.ow {
                                        y[oy * d.ow + ox] = act.apply(val + b);
                                    }
                                }
                            }
                        }
                    }
                });
        }
        out
    }

    /// `Bᵀ d B` of the 4×4 input tile under output tile `(ty, tx)`, zero
    /// outside the input (the padding).
    fn input_tile(&self, d: &Dims, plane: &[f32], ty: usize, tx: usize) -> [f32; 16] {
        let (top, left) = (self.base.padding.0 as isize, self.base.padding.2 as isize);
        let (y0, x0) = ((2 * ty) as isize - top, (2 * tx) as isize - left);
        let mut t = [[0f32; 4]; 4];
        let inside = y0 >= 0 && x0 >= 0 && y0 + 4 <= d.h as isize && x0 + 4 <= d.w as isize;
        for (i, row) in t.iter_mut().enumerate() {
            let iy = y0 + i as isize;
            if !inside && !(0..d.h as isize).contains(&iy) {
                continue;
            }
            let base = iy as usize * d.w;
            for (j, v) in row.iter_mut().enumerate() {
                let ix = x0 + j as isize;
                if inside || (0..d.w as isize).contains(&ix) {
                    *v = plane[base + ix as usize];
                }
            }
        }
        // Columns: Bᵀ d, then rows: (Bᵀ d) B.
        let cols: [[f32; 4]; 4] = std::array::from_fn(|j| bt([t[0][j], t[1][j], t[2][j], t[3][j]]));
        let mut out = [0f32; 16];
        for i in 0..4 {
            let row = bt([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
            out[i * 4..i * 4 + 4].copy_from_slice(&row);
        }
        out
    }
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

    /// Random 3×3 stride-1 cases: odd and even sizes, asymmetric padding,
    /// batches, bias or none, every activation.
    #[test]
    fn matches_the_direct_convolution_on_random_shapes() {
        let mut rng = Rng::new(21);
        for case in 0..300 {
            let op = ConvOp {
                stride: (1, 1),
                dilation: (1, 1),
                padding: (rng.below(3), rng.below(3), rng.below(3), rng.below(3)),
                groups: 1,
                activation: [Activation::Identity, Activation::Relu, Activation::Relu6][case % 3],
            };
            let (n, c, o) = (1 + rng.below(3), 1 + rng.below(20), 1 + rng.below(20));
            let (h, w) = (3 + rng.below(12), 3 + rng.below(12));
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
