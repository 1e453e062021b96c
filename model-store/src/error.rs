//! The one error type of the crate. Variants name the condition and carry what
//! a user needs to fix it; HTTP status codes are the server's business.

use std::path::PathBuf;

/// Everything that can go wrong while loading, validating or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest JSON is malformed or a field is out of range.
    #[error("invalid manifest: {0}")]
    Manifest(String),

    /// The manifest names an architecture this build does not know.
    #[error("unknown architecture '{name}'; known: {}", known.join(", "))]
    UnknownArchitecture {
        /// What the manifest asked for.
        name: String,
        /// Every architecture name accepted here.
        known: Vec<String>,
    },

    /// The checkpoint does not match the architecture; every problem is listed.
    #[error("checkpoint does not match the architecture: {}", problems.join("; "))]
    Checkpoint {
        /// One line per missing, extra or mis-shaped tensor.
        problems: Vec<String>,
    },

    /// The layers do not chain: a layer receives a shape it cannot take.
    #[error("layer '{layer}': {reason}")]
    Shape {
        /// The layer that cannot take its input.
        layer: String,
        /// What it expected and what it got.
        reason: String,
    },

    /// The shared catalogue or object storage cannot be reached now; the
    /// change was not made anywhere, and may be tried again.
    #[error("model storage is unreachable, nothing was changed: {0}")]
    Unavailable(String),

    /// A manifest's `check` logits are not what its weights give.
    #[error("check failed: {0}")]
    Check(String),

    /// The uploaded bytes are not an image we can decode.
    #[error("cannot decode image: {0}")]
    ImageDecode(String),

    /// The image decodes but cannot be fed to this model as it is.
    #[error("{0}")]
    ImageInput(String),

    /// A layer name that the model does not have.
    #[error("model '{model}' has no layer '{layer}'; layers: {}", known.join(", "))]
    UnknownLayer {
        /// The model asked about.
        model: String,
        /// The layer asked for.
        layer: String,
        /// The layers it does have, in forward order.
        known: Vec<String>,
    },

    /// No model of that name is loaded.
    #[error("model '{name}' not found; available: {}", known.join(", "))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The models there are.
        known: Vec<String>,
    },

    /// A model of that name exists (loaded, or its files are in the
    /// models directory).
    #[error(
        "a model named '{name}' already exists; DELETE /models/{name} first or choose another name"
    )]
    NameTaken {
        /// The name.
        name: String,
    },

    /// The name is held by a job that will register it, or by a
    /// registration or deletion under way.
    #[error("the name '{name}' is held by {owner} until it ends; choose another name")]
    NameHeld {
        /// The name.
        name: String,
        /// Who holds it.
        owner: crate::store::Owner,
    },

    /// A job tried to write a name it does not hold: a bug, not a user error.
    #[error("job {job} does not hold '{name}' (held by: {})", holder.as_deref().unwrap_or("nobody"))]
    NotReserved {
        /// The name.
        name: String,
        /// The job that tried.
        job: String,
        /// Who holds it instead.
        holder: Option<String>,
    },

    /// A request parameter is malformed or out of range.
    #[error("{param}: {reason}")]
    InvalidArgument {
        /// The parameter, as the caller named it.
        param: String,
        /// What is wrong and what would be right.
        reason: String,
    },

    /// Another process holds the models directory alone (or this one needs
    /// it alone and another has it open).
    #[error(
        "the models directory {path} is in use by another convscope process; stop it first (a running server: use POST /jobs to train instead of convscope train)"
    )]
    DirectoryInUse {
        /// The directory.
        path: PathBuf,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed inside the forward pass of a named layer.
    #[error("layer '{layer}': {source}")]
    Forward {
        /// The layer whose computation failed.
        layer: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },

    /// A dataset is missing, malformed or does not fit the model.
    #[error("dataset: {0}")]
    Dataset(String),

    /// A long computation passed its deadline and stopped.
    #[error("stopped after {0:.1} s: past the deadline")]
    DeadlineExceeded(f64),

    /// Any other candle failure (device selection, safetensors parsing).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
