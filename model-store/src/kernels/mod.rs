//! CPU kernels as candle custom ops, each with its own backward, where
//! candle's stock ops fall short. Each is tested against a reference
//! implementation on random shapes, at every instruction-set tier the CPU
//! has ([`tier`]).

pub mod activation;
pub mod conv;
mod direct;
pub mod elementwise;
pub mod peak;
pub mod pool;
pub mod relu_rule;
pub mod tier;
pub mod winograd;

/// Random test cases for the kernels' equivalence tests, from the project's
/// seeded generator, so a failure reproduces.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// Draws sizes and values.
    pub(crate) struct Cases(crate::train::Rng);

    impl Cases {
        pub(crate) fn new(seed: u64) -> Self {
            Self(crate::train::Rng::new(seed))
        }

        /// A size in `0..n`.
        pub(crate) fn below(&mut self, n: usize) -> usize {
            ((self.0.uniform() * n as f64) as usize).min(n - 1)
        }

        /// `n` values uniform in `[-amplitude, amplitude)`.
        pub(crate) fn values(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
            (0..n)
                .map(|_| (self.0.uniform() as f32 * 2.0 - 1.0) * amplitude)
                .collect()
        }

        /// A CPU tensor of values in `[-1, 1)`.
        pub(crate) fn tensor(&mut self, shape: &[usize]) -> Tensor {
            let n = shape.iter().product();
            Tensor::from_vec(self.values(n, 1.0), shape, &Device::Cpu).unwrap()
        }
    }
}
