//! The CPU's peak float32 multiply-add rate at a kernel tier, so that a
//! benchmark can say how close a model gets to it (`convscope bench` prints
//! it beside each case). The Rust twin of `tools/bench/peak_fma.c`: twelve
//! independent chains of fused multiply-adds per thread (enough to cover
//! the FMA latency on every x86 core in use), all threads at once.

use super::tier::Tier;

/// Multiply-add steps per chain and run: about 0.1 s on a 3 GHz core.
const STEPS: u64 = 25_000_000;
/// Independent chains per thread.
const CHAINS: u64 = 12;

/// GFLOP/s (2 per multiply-add) of `threads` threads at once running
/// `tier`'s widest FMA, the best of three runs; `None` for the portable
/// tier (no fixed instruction to measure) or a tier this CPU lacks.
pub fn gflops(tier: Tier, threads: usize) -> Option<f64> {
    let lanes = match tier {
        Tier::Portable => return None,
        Tier::Avx2 => 8,
        Tier::Avx512 => 16,
    };
    if !tier.supported() {
        return None;
    }
    let threads = threads.max(1);
    let best = (0..3)
        .map(|_| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| chains(tier));
                }
            });
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    Some((threads as u64 * STEPS * CHAINS * lanes * 2) as f64 / best / 1e9)
}

/// One thread's chains; the result keeps them from being optimised away.
fn chains(tier: Tier) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `gflops` checked the CPU has the tier's instructions.
        #[allow(unsafe_code)]
        unsafe {
            match tier {
                Tier::Avx512 => return avx512(),
                Tier::Avx2 => return avx2(),
                Tier::Portable => {}
            }
        }
    }
    let _ = tier;
    0.0
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2() -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
    let mut acc: [__m256; CHAINS as usize] = std::array::from_fn(|i| _mm256_set1_ps(i as f32));
    for _ in 0..STEPS {
        for a in &mut acc {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut lanes = [0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    // SAFETY: 8 floats into an 8-float array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    std::hint::black_box(lanes.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn avx512() -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
    let mut acc: [__m512; CHAINS as usize] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
    for _ in 0..STEPS {
        for a in &mut acc {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    std::hint::black_box(_mm512_reduce_add_ps(sum))
}
