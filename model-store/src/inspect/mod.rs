//! Inspection features: pure functions over a loaded model and an input
//! batch, each one the model's single forward pass with a different tap.
//! Encoding (PNG, JSON, npy) is the server's business.

pub mod activations;
pub mod attribution;
pub mod embeddings;
pub mod faithfulness;
pub mod filters;
pub mod grad_cam;
pub mod maximize;
pub mod predict;
pub mod sanity;
