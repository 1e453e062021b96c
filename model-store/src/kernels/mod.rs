//! CPU kernels as candle custom ops, each with its own backward, where
//! candle's stock ops fall short. Each is tested against a reference
//! implementation on random shapes.

pub mod conv;
pub mod elementwise;
pub mod pool;
pub mod winograd;
