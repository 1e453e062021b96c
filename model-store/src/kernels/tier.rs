//! Which instruction-set tier the hand-written kernels run at: the best the
//! CPU has, capped by `CONVSCOPE_KERNELS=portable|avx2|avx512`.
//!
//! The cap exists so that every tier can be exercised and measured on one
//! machine: an AVX-512 CPU runs the AVX2 and portable paths too when told
//! to, and a benchmark beside PyTorch's `ATEN_CPU_CAPABILITY=avx2` compares
//! like with like. It caps this crate's kernels only; the gemm crate under
//! candle's matmul picks its own micro-kernels.
//!
//! Tiers in use today: `avx512` and `avx2` run their variants of the direct
//! convolution (`direct.rs`) and the depthwise kernel; `portable` runs
//! im2col + gemm and plain loops.

use std::sync::OnceLock;

/// An instruction-set tier, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Plain Rust, any target.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F and DQ.
    Avx512,
}

impl Tier {
    /// Every tier, least capable first.
    pub const ALL: [Tier; 3] = [Tier::Portable, Tier::Avx2, Tier::Avx512];

    /// Its name in `CONVSCOPE_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
        }
    }

    /// Parses a `CONVSCOPE_KERNELS` value.
    pub fn parse(s: &str) -> Result<Tier, UnknownTier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownTier(s.to_string()))
    }

    /// Whether this CPU has the tier's instructions.
    pub fn supported(self) -> bool {
        match self {
            Tier::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Avx2 | Tier::Avx512 => false,
        }
    }

    /// The best tier this CPU has.
    pub fn detected() -> Tier {
        Tier::ALL
            .into_iter()
            .rev()
            .find(|t| t.supported())
            .unwrap_or(Tier::Portable)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The micro-kernels gemm (under Winograd, the convolutions the direct
/// kernel does not take, and every matmul) picks for itself on this CPU:
/// `avx512` only when built with the `avx512-gemm` feature (the default),
/// else `avx2` (FMA), or `portable`. `CONVSCOPE_KERNELS` does not cap it.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512-gemm") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    return "neon";
    #[allow(unreachable_code)]
    "portable"
}

/// A `CONVSCOPE_KERNELS` value that names no tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CONVSCOPE_KERNELS={0:?}: use portable, avx2 or avx512")]
pub struct UnknownTier(pub String);

/// The cap from `CONVSCOPE_KERNELS`, if set; an unknown value is an error,
/// which [`check_env`] reports at start-up.
fn cap() -> Result<Option<Tier>, UnknownTier> {
    match std::env::var("CONVSCOPE_KERNELS") {
        Ok(v) if !v.is_empty() => Tier::parse(&v).map(Some),
        _ => Ok(None),
    }
}

/// Checks `CONVSCOPE_KERNELS` (so a typo stops the server at start-up
/// instead of being ignored) and returns the tier the kernels will run at.
pub fn check_env() -> Result<Tier, UnknownTier> {
    cap()?;
    Ok(active())
}

/// The tier the kernels run at: the best the CPU has, capped by
/// `CONVSCOPE_KERNELS`. Read once; a value the CPU lacks gives the best it has.
pub fn active() -> Tier {
    static ACTIVE: OnceLock<Tier> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = Tier::detected();
        match cap() {
            Ok(Some(c)) => c.min(best),
            _ => best,
        }
    })
}

/// For the kernels' tests: the tiers this CPU runs, each with a line on
/// stderr saying it ran, and a loud line for each tier above that it could
/// not test, so a missing tier never passes silently.
#[cfg(test)]
pub(crate) fn tested_tiers(what: &str) -> Vec<Tier> {
    let mut run = Vec::new();
    for t in Tier::ALL {
        if t.supported() {
            eprintln!("[kernel tiers] {what}: testing the {t} tier");
            run.push(t);
        } else {
            eprintln!(
                "[kernel tiers] WARNING: {what}: the {t} tier is NOT TESTED here: this CPU lacks its instructions; run this test on a CPU that has them"
            );
        }
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_order_and_never_exceed_the_cpu() {
        assert_eq!(Tier::parse("avx2"), Ok(Tier::Avx2));
        assert!(
            Tier::parse("avx-2")
                .unwrap_err()
                .to_string()
                .contains("portable, avx2 or avx512")
        );
        assert!(Tier::Portable < Tier::Avx2 && Tier::Avx2 < Tier::Avx512);
        assert!(Tier::Portable.supported());
        assert!(active() <= Tier::detected());
        // A CPU with AVX-512 has AVX2.
        if Tier::Avx512.supported() {
            assert!(Tier::Avx2.supported());
        }
    }
}
