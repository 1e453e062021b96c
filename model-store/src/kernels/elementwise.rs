//! `relu(a + b)`, the end of every residual block, as one pass on the rayon
//! pool.
//!
//! candle 0.11 runs large elementwise ops on a pool of its own whose worker
//! spins for a while after each op; beside the rayon workers the
//! convolutions use, on a machine with few cores, that spinning takes a
//! core from the next convolution. One fused pass also reads and writes
//! the block's output once instead of twice.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::conv::f32_slice;

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
        let g = grad_res.mul(&res.gt(0f32)?.to_dtype(grad_res.dtype())?)?;
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
}
