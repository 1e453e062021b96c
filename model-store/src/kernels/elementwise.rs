//! `relu(a + b)`, the end of every residual block, and `act(x · s + t)` per
//! channel, a batch norm with the activation after it (DenseNet's
//! pre-activation layers, any batch norm no convolution absorbs), each as
//! one pass on the rayon pool.
//!
//! candle 0.11 runs large elementwise ops on a pool of its own whose worker
//! spins for a while after each op; beside the rayon workers the
//! convolutions use, on a machine with few cores, that spinning takes a
//! core from the next convolution. One fused pass also reads and writes
//! the block's output once instead of twice.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::activation::Activation;
use super::conv::f32_slice;
use super::tier;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// `relu(a + b)` for two contiguous f32 tensors of one shape.
#[derive(Debug, Clone, Copy)]
pub struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "convscope-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (a, b) = (f32_slice(s1, l1, "lhs")?, f32_slice(s2, l2, "rhs")?);
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = (a + b).max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass on the pool (candle's `gt`, `to_dtype` and `mul` were
        // three, each on its own pool).
        let g = Activation::Relu.mask_gradient(res, grad_res, &[])?;
        let g = Tensor::from_vec(g, res.shape(), res.device())?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `relu(a + b)`: the fused pass for f32 on the CPU, candle's ops otherwise.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

/// `f` of a CPU f32 tensor's values in order: borrowed in place when the
/// tensor is contiguous, copied otherwise. The backward passes read the
/// tensors they saved without first copying each one whole.
pub(super) fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage
            && let Some((start, end)) = layout.contiguous_offsets()
        {
            return Ok(f(&v[start..end]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// `f(plane index, output plane, input plane)` for each `plane`-value plane
/// of an NCHW `x`, on the rayon pool: a fresh output of `x`'s size.
fn map_planes(x: &[f32], plane: usize, f: impl Fn(usize, &mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if plane > 0 {
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, o, x));
    }
    out
}

/// `x · gate` for an NCHW `x` and a per-channel `gate` `[N, C, 1, 1]`:
/// the end of a squeeze-excitation block (MobileNet-v3, EfficientNet,
/// RegNet), one pass on the rayon pool.
#[derive(Debug, Clone, Copy)]
pub struct ChannelScale;

impl CustomOp2 for ChannelScale {
    fn name(&self) -> &'static str {
        "convscope-channel-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape().dims() != [n, c, 1, 1] {
            bail!(
                "channel scale: a gate {:?} for {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let (x, g) = (f32_slice(s1, l1, "input")?, f32_slice(s2, l2, "gate")?);
        let out = map_planes(x, h * w, |i, o, x| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * g[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| grad_res.broadcast_mul(gate))
            .transpose()?;
        let dgate = gate
            .track_op()
            .then(|| (grad_res * x)?.sum_keepdim((2, 3)))
            .transpose()?;
        Ok((dx, dgate))
    }
}

/// `x · y` with broadcasting: [`ChannelScale`] for an f32 NCHW tensor on
/// the CPU times a per-channel gate, candle's op otherwise.
pub fn mul(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let gate = |a: &Tensor, b: &Tensor| {
        a.device().is_cpu()
            && a.dtype() == candle_core::DType::F32
            && b.dtype() == candle_core::DType::F32
            && a.rank() == 4
            && b.dims() == [a.dim(0).unwrap_or(0), a.dim(1).unwrap_or(0), 1, 1]
    };
    if gate(x, y) {
        x.contiguous()?.apply_op2(&y.contiguous()?, ChannelScale)
    } else if gate(y, x) {
        y.contiguous()?.apply_op2(&x.contiguous()?, ChannelScale)
    } else {
        x.broadcast_mul(y)
    }
}

/// `act(x · scale[c] + shift[c])` for a contiguous f32 NCHW tensor, with
/// its input gradient (`scale` and `shift` are constants: the running
/// statistics of an inference-mode batch norm).
#[derive(Debug, Clone)]
pub struct ChannelAffine {
    /// Per channel.
    pub scale: Arc<[f32]>,
    /// Per channel.
    pub shift: Arc<[f32]>,
    /// Applied after.
    pub activation: Activation,
}

impl ChannelAffine {
    fn planes(&self, l: &Layout) -> Result<usize> {
        let (_, c, h, w) = l.shape().dims4()?;
        if c != self.scale.len() || c != self.shift.len() {
            bail!(
                "channel affine: {c} channels, {} scales and {} shifts",
                self.scale.len(),
                self.shift.len()
            );
        }
        Ok(h * w)
    }
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "convscope-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let plane = self.planes(l)?;
        let x = f32_slice(s, l, "input")?;
        let (c, tier) = (self.scale.len(), tier::active());
        let out = map_planes(x, plane, |i, o, x| {
            let (a, b) = (self.scale[i % c], self.shift[i % c]);
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * a + b;
            }
            self.activation.apply_slice_at(tier, o);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let plane = self.planes(arg.layout())?;
        let (c, act) = (self.scale.len(), self.activation);
        // Planes on the pool, the saved tensors read in place; ReLU's and
        // no activation's slopes need neither the input nor a call per
        // value (this pass, single-threaded over three copies, was a
        // tenth of integrated gradients' time).
        let dx = with_host(arg, |x| {
            with_host(res, |y| {
                with_host(grad_res, |g| {
                    let mut dx = vec![0f32; g.len()];
                    if plane == 0 {
                        return dx;
                    }
                    dx.par_chunks_mut(plane)
                        .enumerate()
                        .with_min_len((CHUNK / plane).max(1))
                        .for_each(|(i, d)| {
                            let (a, b) = (self.scale[i % c], self.shift[i % c]);
                            let at = i * plane..(i + 1) * plane;
                            let (x, y, g) = (&x[at.clone()], &y[at.clone()], &g[at]);
                            match act {
                                Activation::Identity => {
                                    for (d, &g) in d.iter_mut().zip(g) {
                                        *d = g * a;
                                    }
                                }
                                Activation::Relu => {
                                    for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
                                        *d = if y > 0.0 { g * a } else { 0.0 };
                                    }
                                }
                                _ => {
                                    for (((d, &g), &y), &x) in d.iter_mut().zip(g).zip(y).zip(x) {
                                        *d = g * act.derivative(x * a + b, y) * a;
                                    }
                                }
                            }
                        });
                    dx
                })
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_candle_forward_and_backward() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 104729) % 19) as f32 - 9.5).collect();
        let av = Var::from_tensor(&Tensor::from_vec(a, (1, n), &Device::Cpu).unwrap()).unwrap();
        let bv = Var::from_tensor(&Tensor::from_vec(b, (1, n), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, n))
            .unwrap();
        let run = |y: Tensor| {
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                v(&y),
                v(grads.get(av.as_tensor()).unwrap()),
                v(grads.get(bv.as_tensor()).unwrap()),
            )
        };
        let ours = run(add_relu(av.as_tensor(), bv.as_tensor()).unwrap());
        let theirs = run((av.as_tensor() + bv.as_tensor()).unwrap().relu().unwrap());
        assert_eq!(ours, theirs);
    }

    #[test]
    fn channel_scale_matches_candle_forward_and_backward() {
        let (n, c, h, w) = (2, 3, 5, 4);
        let len = n * c * h * w;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 31) % 17) as f32 / 3.0 - 2.0)
            .collect();
        let g: Vec<f32> = (0..n * c).map(|i| 0.1 + i as f32 * 0.2).collect();
        let xv =
            Var::from_tensor(&Tensor::from_vec(x, (n, c, h, w), &Device::Cpu).unwrap()).unwrap();
        let gv =
            Var::from_tensor(&Tensor::from_vec(g, (n, c, 1, 1), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::arange(0f32, len as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, c, h, w))
            .unwrap();
        let run = |y: Tensor| {
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                v(&y),
                v(grads.get(xv.as_tensor()).unwrap()),
                v(grads.get(gv.as_tensor()).unwrap()),
            )
        };
        let theirs = run(xv.as_tensor().broadcast_mul(gv.as_tensor()).unwrap());
        // Either order of the operands.
        for ours in [
            run(mul(xv.as_tensor(), gv.as_tensor()).unwrap()),
            run(mul(gv.as_tensor(), xv.as_tensor()).unwrap()),
        ] {
            for (a, b) in [
                (&ours.0, &theirs.0),
                (&ours.1, &theirs.1),
                (&ours.2, &theirs.2),
            ] {
                for (a, b) in a.iter().zip(b) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn channel_affine_matches_candle_forward_and_backward() {
        let (n, c, h, w) = (2, 5, 7, 9);
        let len = n * c * h * w;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 23) as f32 / 4.0 - 2.7)
            .collect();
        let scale: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.3).collect();
        let shift: Vec<f32> = (0..c).map(|i| i as f32 * 0.4 - 1.0).collect();
        let xv =
            Var::from_tensor(&Tensor::from_vec(x, (n, c, h, w), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::arange(0f32, len as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, c, h, w))
            .unwrap();
        let st = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, c, 1, 1), &Device::Cpu).unwrap();
        for activation in [Activation::Identity, Activation::Relu, Activation::Silu] {
            let run = |y: Tensor| {
                let grads = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (v(&y), v(grads.get(xv.as_tensor()).unwrap()))
            };
            let op = ChannelAffine {
                scale: Arc::from(scale.as_slice()),
                shift: Arc::from(shift.as_slice()),
                activation,
            };
            let ours = run(xv.as_tensor().apply_op1(op).unwrap());
            let z = xv
                .as_tensor()
                .broadcast_mul(&st(&scale))
                .unwrap()
                .broadcast_add(&st(&shift))
                .unwrap();
            let theirs = run(activation.tensor(&z).unwrap());
            for (a, b) in ours
                .0
                .iter()
                .zip(&theirs.0)
                .chain(ours.1.iter().zip(&theirs.1))
            {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{activation:?}: {a} vs {b}"
                );
            }
        }
    }
}
