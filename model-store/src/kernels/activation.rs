//! The activations a convolution applies in the pass that writes its
//! output, and their gradients.
//!
//! ReLU and ReLU6 are applied in the direct kernel's registers. The smooth
//! ones (SiLU, sigmoid, hardswish, hardsigmoid: MobileNet-v3, EfficientNet
//! and their squeeze-excitation gates) are applied to each block of output
//! while it is still in cache, by [`Activation::apply_slice`]: one loop per
//! activation, written once in plain Rust and compiled for each kernel tier
//! (AVX-512, AVX2 + FMA, and the target's baseline), the tier chosen at run
//! time. Its exponential is a polynomial the compiler vectorises (libm's
//! `expf` is a call per element, and was 15% of an EfficientNet-B0 forward
//! pass through candle's SiLU).

use candle_core::Tensor;

use super::elementwise::with_host;
use super::tier::{self, Tier};

/// The activation applied to the convolution's output in the same pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `x · σ(x)`.
    Silu,
    /// `σ(x) = 1 / (1 + e^−x)`.
    Sigmoid,
    /// `x · min(max(x + 3, 0), 6) / 6`.
    Hardswish,
    /// `min(max(x + 3, 0), 6) / 6`.
    Hardsigmoid,
}

impl Activation {
    /// Every activation, for the tests that cover each.
    #[cfg(test)]
    pub(crate) const ALL: [Activation; 7] = [
        Activation::Identity,
        Activation::Relu,
        Activation::Relu6,
        Activation::Silu,
        Activation::Sigmoid,
        Activation::Hardswish,
        Activation::Hardsigmoid,
    ];

    /// The activation of one value.
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Self::Identity => v,
            Self::Relu => v.max(0.0),
            Self::Relu6 => v.clamp(0.0, 6.0),
            Self::Silu => v / (1.0 + exp(-v)),
            Self::Sigmoid => 1.0 / (1.0 + exp(-v)),
            Self::Hardswish => v * ((v + 3.0).clamp(0.0, 6.0) / 6.0),
            Self::Hardsigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
        }
    }

    /// The activation by candle's ops: the graph's activation nodes, and the
    /// devices and dtypes the fused CPU kernels do not take.
    pub fn tensor(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Identity => Ok(x.clone()),
            Self::Relu => x.relu(),
            Self::Relu6 => x.clamp(0f32, 6f32),
            Self::Silu => x.silu(),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::Hardswish => x.mul(&(x + 3.0)?.clamp(0f32, 6f32)?)? / 6.0,
            Self::Hardsigmoid => (x + 3.0)?.clamp(0f32, 6f32)? / 6.0,
        }
    }

    /// Whether the direct kernel applies it in registers; the others it
    /// leaves to [`Self::apply_slice`].
    pub(super) fn in_registers(self) -> bool {
        matches!(self, Self::Identity | Self::Relu | Self::Relu6)
    }

    /// Whether its gradient needs the value before the activation (the
    /// others' follows from the output alone).
    pub(super) fn needs_input(self) -> bool {
        matches!(self, Self::Silu | Self::Hardswish | Self::Hardsigmoid)
    }

    /// `dy/dz` at the pre-activation `z` (used when [`Self::needs_input`])
    /// or the output `y`, as PyTorch's backward defines it at the kinks.
    pub(super) fn derivative(self, z: f32, y: f32) -> f32 {
        match self {
            Self::Identity => 1.0,
            Self::Relu => f32::from(y > 0.0),
            Self::Relu6 => f32::from(y > 0.0 && y < 6.0),
            Self::Sigmoid => y * (1.0 - y),
            Self::Silu => {
                let s = 1.0 / (1.0 + (-z).exp());
                s * (1.0 + z * (1.0 - s))
            }
            Self::Hardswish => {
                if z < -3.0 {
                    0.0
                } else if z <= 3.0 {
                    z / 3.0 + 0.5
                } else {
                    1.0
                }
            }
            Self::Hardsigmoid => {
                if z > -3.0 && z < 3.0 {
                    1.0 / 6.0
                } else {
                    0.0
                }
            }
        }
    }

    /// `g · dy/dz` for each value of an output gradient `grad` and the
    /// activation's saved output `res` (and its input `z`, for the
    /// activations that need it, [`Self::needs_input`]; empty otherwise):
    /// the backward of every kernel that fuses an activation (a
    /// convolution's, add + ReLU). One pass on the rayon pool over the
    /// tensors read in place; ReLU's slope without a call per value, and
    /// `0` (not `g · 0`) where it is flat, as PyTorch's `threshold_backward`.
    pub(super) fn mask_gradient(
        self,
        res: &Tensor,
        grad: &Tensor,
        z: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        use rayon::prelude::*;
        const CHUNK: usize = 16 * 1024;
        with_host(res, |y| {
            with_host(grad, |g| {
                let mut out = vec![0f32; g.len()];
                out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                    let at = k * CHUNK..k * CHUNK + o.len();
                    let (y, g) = (&y[at.clone()], &g[at.clone()]);
                    if self == Self::Relu {
                        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                            *o = if y > 0.0 { g } else { 0.0 };
                        }
                    } else {
                        let z = z.get(at).unwrap_or(&[]);
                        for (i, ((o, &y), &g)) in o.iter_mut().zip(y).zip(g).enumerate() {
                            *o = g * self.derivative(z.get(i).copied().unwrap_or(0.0), y);
                        }
                    }
                });
                out
            })
        })?
    }

    /// Applies it to every value of `v` in place, at the active tier.
    pub fn apply_slice(self, v: &mut [f32]) {
        self.apply_slice_at(tier::active(), v);
    }

    /// [`Self::apply_slice`] at `tier` (a tier the CPU lacks runs the best
    /// it has, never an instruction it lacks).
    pub(super) fn apply_slice_at(self, tier: Tier, v: &mut [f32]) {
        if self == Self::Identity {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each variant runs only where the CPU has its
            // instructions.
            #[allow(unsafe_code)]
            unsafe {
                if tier >= Tier::Avx512 && Tier::Avx512.supported() {
                    return slice_avx512(self, v);
                }
                if tier >= Tier::Avx2 && Tier::Avx2.supported() {
                    return slice_avx2(self, v);
                }
            }
        }
        let _ = tier;
        slice(self, v);
    }
}

impl Activation {
    /// [`Self::apply_slice`] inlined into the caller, at the caller's
    /// instruction set: for kernels that are themselves compiled per tier.
    #[inline(always)]
    pub(super) fn apply_slice_inline(self, v: &mut [f32]) {
        slice(self, v)
    }
}

/// One loop per activation, so that each vectorises.
#[inline(always)]
fn slice(a: Activation, v: &mut [f32]) {
    macro_rules! each {
        ($act:expr) => {
            for x in v.iter_mut() {
                *x = $act.apply(*x);
            }
        };
    }
    match a {
        Activation::Identity => {}
        Activation::Relu => each!(Activation::Relu),
        Activation::Relu6 => each!(Activation::Relu6),
        Activation::Silu => each!(Activation::Silu),
        Activation::Sigmoid => each!(Activation::Sigmoid),
        Activation::Hardswish => each!(Activation::Hardswish),
        Activation::Hardsigmoid => each!(Activation::Hardsigmoid),
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn slice_avx2(a: Activation, v: &mut [f32]) {
    slice(a, v)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn slice_avx512(a: Activation, v: &mut [f32]) {
    slice(a, v)
}

/// `e^x` in float32 to about 2 ulp (Cephes' `expf`: `x = n·ln 2 + r`,
/// a degree-6 polynomial in `r`, times `2^n` built from its bits), without
/// branches or float-to-int conversions so that it vectorises. Saturates at `e^±88` (below `e^−87.3`
/// it gives `e^−87.3`, a float32 denormal boundary); NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let big = x * LOG2E + ROUND;
    let n = big - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from `big`'s low mantissa bits, which hold 2^22 + n: adding the
    // bias and shifting drops the rest. (`n as i32` would not vectorise:
    // Rust's saturating float-to-int conversion is a branch per lane.)
    y * f32::from_bits(big.to_bits().wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                ((ours - libm) / libm).abs() < 4.0 * f32::EPSILON,
                "exp({x}) = {ours}, libm {libm}"
            );
            x += 0.0137;
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), exp(-87.3));
    }

    #[test]
    fn every_tier_applies_every_activation_as_the_f64_formula_does() {
        let all = Activation::ALL;
        let f64_of = |a: Activation, x: f64| match a {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            Activation::Hardsigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
        };
        // Odd lengths, so each vector loop's tail runs too.
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) * 0.037).collect();
        for t in tier::tested_tiers("activations applied to a slice") {
            for a in all {
                let mut v = xs.clone();
                a.apply_slice_at(t, &mut v);
                for (&x, &y) in xs.iter().zip(&v) {
                    let want = f64_of(a, x as f64);
                    assert!(
                        (y as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{a:?} at {t}: f({x}) = {y}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn derivatives_match_finite_differences_away_from_the_kinks() {
        for a in [
            Activation::Silu,
            Activation::Sigmoid,
            Activation::Hardswish,
            Activation::Hardsigmoid,
        ] {
            for i in 0..400 {
                let z = (i as f64 - 200.0) * 0.0413 + 0.001;
                if [-3.0f64, 3.0].iter().any(|k| (z - k).abs() < 0.01) {
                    continue;
                }
                let f = |z: f64| a.apply(z as f32) as f64;
                let fd = (f(z + 1e-3) - f(z - 1e-3)) / 2e-3;
                let y = a.apply(z as f32);
                let d = a.derivative(z as f32, y) as f64;
                assert!((d - fd).abs() < 2e-3, "{a:?}'({z}) = {d}, differences {fd}");
            }
        }
    }
}
