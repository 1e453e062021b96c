//! The state every handler shares: cheap handles only.

use std::sync::{Arc, RwLock};

use candle_core::Device;
use model_store::{LoadFailure, LoadedModel, ModelDir, Registry};

use crate::compute::Compute;
use crate::error::ApiError;
use crate::inputs::InputCache;
use crate::settings::Settings;

/// Handles to the model store, the compute pool and the limits.
#[derive(Clone)]
pub struct AppState {
    /// Loaded models by name.
    pub registry: Arc<Registry>,
    /// Where registered models persist.
    pub model_dir: ModelDir,
    /// Models that failed to load at start-up, with the reason.
    pub load_failures: Arc<RwLock<Vec<LoadFailure>>>,
    /// Device new models are loaded onto.
    pub device: Device,
    /// The bounded pool model work runs on.
    pub compute: Compute,
    /// Dynamic batching of `/predict`.
    pub batcher: Arc<crate::batching::Batcher>,
    /// Images uploaded once with `POST /inputs`, by content hash.
    pub inputs: Arc<InputCache>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Limits and defaults.
    pub settings: Arc<Settings>,
    /// Serialises registrations and deletions so that the check for a taken
    /// name, the file writes and the registry update happen as one step.
    pub store_lock: Arc<tokio::sync::Mutex<()>>,
    /// Training jobs: queue, workers, events.
    pub jobs: Arc<crate::jobs::Jobs>,
}

impl AppState {
    /// The model called `name`, or a 404 listing the models there are.
    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
        self.registry.get(name).ok_or_else(|| {
            ApiError::NotFound(format!(
                "model '{name}' not found; available: {}",
                self.registry.names().join(", ")
            ))
        })
    }

    /// The model `POST /predict` uses: the configured default if loaded,
    /// else the first by name.
    pub fn default_model(&self) -> Result<Arc<LoadedModel>, ApiError> {
        self.registry
            .get(&self.settings.default_model)
            .or_else(|| self.registry.list().into_iter().next())
            .ok_or_else(|| ApiError::NotFound("no models are loaded".into()))
    }
}
