//! convscope's HTTP service. A code tour:
//! - [`startup`]: `Application` — load the model store, bind, serve.
//! - [`settings`]: flags, environment variables and limits.
//! - [`routes`]: one module per resource (`health`, `models`, `predict`, `activations`).
//! - [`input`]: images from multipart, raw bodies, base64 JSON or the inputs cache.
//! - [`inputs`]: the content-addressed, LRU-bounded inputs cache.
//! - [`render`]: colormaps, grids, PNG and `.npy` encoding.
//! - [`compute`]: the bounded pool model work runs on.
//! - [`error`]: `ApiError`, answered as problem+json.
//! - [`metrics`]: Prometheus text at `/metrics`; [`auth`]: the optional API key.

pub mod auth;
pub mod compute;
pub mod error;
pub mod extract;
pub mod input;
pub mod inputs;
pub mod metrics;
pub mod render;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod state;

pub use settings::Settings;
pub use startup::Application;
