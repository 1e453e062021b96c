//! ReLUs whose backward pass follows another rule than the chain rule:
//! guided backpropagation (Springenberg et al. 2015) and deconvolution
//! (Zeiler & Fergus 2014). Captum gets them by hooking every `nn.ReLU`'s
//! backward; here the forward pass builds the ReLU as this op instead, so
//! the same network and the same autograd give both (see
//! [`crate::tap::Tap::relu_rule`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};

/// How a ReLU passes the gradient back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReluRule {
    /// The chain rule: `g · [x > 0]` as PyTorch's ReLU backward, in every
    /// fused kernel's backward. A ReLU that runs alone under this rule is
    /// candle's, whose backward is `g · [x ≥ 0]`: the two differ only where
    /// a pre-activation is exactly 0 (a ReLU after a linear layer, or after
    /// a layer a tap wants).
    #[default]
    Autograd,
    /// Guided backpropagation: `max(g, 0) · [x > 0]`, Captum's
    /// `GuidedBackprop` (the ReLU of the ordinary input gradient).
    Guided,
    /// Deconvolution: `max(g, 0)`, the ReLU applied to the output gradient
    /// alone, Captum's `Deconvolution`.
    Deconvolution,
}

/// `max(x, 0)` whose backward follows `rule`.
pub fn relu(x: &Tensor, rule: ReluRule) -> Result<Tensor> {
    match rule {
        ReluRule::Autograd => x.relu(),
        rule => x.contiguous()?.apply_op1(RuleRelu(rule)),
    }
}

struct RuleRelu(ReluRule);

impl CustomOp1 for RuleRelu {
    fn name(&self) -> &'static str {
        "relu-with-rule"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match storage {
            CpuStorage::F32(v) => v,
            _ => bail!("{}: only f32 tensors are supported", self.name()),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: the input must be contiguous", self.name())
        };
        let y = x[start..end].iter().map(|&v| v.max(0.0)).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let passed = grad_res.relu()?;
        Ok(Some(match self.0 {
            ReluRule::Deconvolution => passed,
            _ => passed.mul(&arg.gt(0f32)?.to_dtype(arg.dtype())?)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn grads(rule: ReluRule) -> Vec<f32> {
        let x = Var::new(&[-1f32, 2.0, 3.0, -4.0], &Device::Cpu).unwrap();
        let y = relu(x.as_tensor(), rule).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 2.0, 3.0, 0.0]);
        // Upstream gradient (1, 1, -1, -1): negative where x = 3 and x = -4.
        let up = Tensor::new(&[1f32, 1.0, -1.0, -1.0], &Device::Cpu).unwrap();
        let g = y.mul(&up).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn each_rule_passes_the_gradient_its_own_way() {
        assert_eq!(grads(ReluRule::Autograd), [0.0, 1.0, -1.0, 0.0]);
        assert_eq!(grads(ReluRule::Guided), [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(grads(ReluRule::Deconvolution), [1.0, 1.0, 0.0, 0.0]);
    }
}
