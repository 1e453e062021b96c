//! Weights packed once, at load, in the order the direct kernel reads them.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::*;

/// `w` (`[O, K]`) in [`direct`]'s order: `packed` when given (made by
/// [`pack_weights`] from the same weights), else packed now.
pub(super) fn packed_or_pack(d: &Dims, w: &[f32], packed: Option<&Arc<[f32]>>) -> Arc<[f32]> {
    match packed {
        Some(p) => p.clone(),
        None => Arc::from(direct::pack(w, d.o, d.k())),
    }
}

/// Whether the direct kernel takes a convolution of `o` output channels in
/// `groups` groups (one group, or whole blocks of channels per group) with
/// `i` input channels a group, a `kh × kw` window at `stride` and
/// (`padded`) any zero padding, at the active tier, so that its weights are
/// worth packing. Stride-1 windows wider than 1×1, or padded, always take
/// it (the padded path); at the AVX2 tier strided and 1×1 convolutions of
/// 64+ im2col rows run as gemm (`forward::direct_takes_rows`), and packing
/// theirs would only hold memory, most of ResNeXt-50's weights.
pub fn packs(
    o: usize,
    groups: usize,
    stride: usize,
    (i, kh, kw): (usize, usize, usize),
    padded: bool,
) -> bool {
    let grouping = groups == 1 || (groups > 0 && (o / groups).is_multiple_of(direct::MR));
    let geometry = (stride == 1 && (kh * kw > 1 || padded))
        || direct::kernel()
            .is_some_and(|tier| super::forward::direct_takes_rows(tier, i * kh * kw));
    grouping && geometry
}

/// A convolution's weights `[O, I/groups, kh, kw]` (where [`packs`]) packed
/// once (at load, for [`PackedConvOp`]) in the order the direct kernel
/// reads them; `None` when this CPU does not run it. Packed on every call,
/// they took 6% of a batch-1 ResNet-20 forward, so the predict path packs
/// them once.
pub fn pack_weights(w: &[f32], o: usize, k: usize) -> Option<Arc<[f32]>> {
    (direct::kernel().is_some() && k > 0).then(|| Arc::from(direct::pack(w, o, k)))
}

/// [`ConvOp`] with its weight already packed by [`pack_weights`]; the
/// same results and the same backward.
#[derive(Debug, Clone)]
pub struct PackedConvOp {
    /// The geometry and activation.
    pub base: ConvOp,
    /// The weight applied with it, packed.
    pub packed: Arc<[f32]>,
    /// [`crate::kernels::winograd::transform_transposed`] of that weight,
    /// for the input gradient, when it pays.
    pub transposed: Option<Arc<[f32]>>,
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
        if !self.base.direct_groups(&d)
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
        self.base
            .backward(x, w, bias, res, grad_res, self.transposed.as_ref())
    }
}
