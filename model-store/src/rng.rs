//! The project's one random generator: seeded, and the same numbers on
//! every machine, so a seed reproduces a training run, a SmoothGrad sample
//! or a maximisation exactly. Initialisation, shuffling, augmentation,
//! dropout, noise and the kernels' random tests all draw from it.

/// A seeded standard normal generator (splitmix64 + Box–Muller), so that a
/// seed gives the same noise on every machine.
pub struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    /// A uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 * 2f64.powi(-53)
    }

    /// A standard normal.
    pub fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }
}

/// FNV-1a, 64 bit: a tensor name → a seed.
pub fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xCBF29CE484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001B3)
    })
}

/// `n` uniforms in `[0, 1)` that are a pure function of `(name, index)`:
/// splitmix64 of `FNV-1a(name) XOR i`, top 53 bits. The exporter's `check`
/// input and the hash-derived test weights are computed this way in Python
/// too, bit for bit.
pub fn hash_uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let mut z = (seed ^ i).wrapping_add(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            ((z ^ (z >> 31)) >> 11) as f64 * 2f64.powi(-53)
        })
        .collect()
}
