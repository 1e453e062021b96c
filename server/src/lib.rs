//! convscope's HTTP service. A code tour:
//! - [`startup`]: `Application` — load the model store, bind, serve.
//! - [`settings`]: flags, environment variables and limits.
//! - [`routes`]: one module per resource (`health`, `models`, `predict`, `activations`).
//! - [`input`]: images from multipart, raw bodies or base64 JSON.
//! - [`compute`]: the bounded pool model work runs on.
//! - [`error`]: `ApiError`, answered as problem+json.

pub mod compute;
pub mod error;
pub mod extract;
pub mod input;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod state;

pub use settings::Settings;
pub use startup::Application;
