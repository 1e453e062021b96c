//! convscope's HTTP service. A code tour:
//! - [`startup`]: `Application` — load the model store, bind, serve.
//! - [`settings`]: flags, environment variables and limits.
//! - [`routes`]: one module per resource (`health`, `models`, `predict`, `activations`).
//! - [`input`]: images from multipart, raw bodies, base64 JSON or the inputs cache.
//! - [`inputs`]: the content-addressed, LRU-bounded inputs cache.
//! - [`render`]: colormaps, grids, PNG and `.npy` encoding; [`charts`]: training
//!   curves and confusion matrices drawn with plotters, PNG or SVG.
//! - [`pipeline`]: the one request pipeline of the inspection routes.
//! - [`compute`]: the bounded pool model work runs on.
//! - [`jobs`]: training jobs: the SQLite queue, workers, events, plots.
//! - [`error`]: `ApiError`, answered as problem+json; [`catch_panic`]: a
//!   panic while handling a request becomes a 500 with the request id.
//! - [`metrics`]: Prometheus text at `/metrics`; [`auth`]: the optional API key.
//! - [`openapi`]: the OpenAPI 3.1 document, built with the router from the handlers.
//! - [`oip`]: the Open Inference Protocol's wire format (KServe v2: JSON, binary
//!   tensor data, classification); its routes are `routes::v2`.

pub mod auth;
pub mod batching;
pub mod catch_panic;
pub mod charts;
pub mod compute;
pub mod error;
pub mod extract;
pub mod input;
pub mod inputs;
pub mod jobs;
pub mod linger;
pub mod metrics;
pub mod oip;
pub mod openapi;
pub mod pipeline;
pub mod render;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod state;
pub mod storage;

pub use settings::Settings;
pub use startup::{Application, Worker};
