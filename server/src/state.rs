//! The state every handler shares: cheap handles only.

use std::sync::Arc;

use model_store::{LoadedModel, ModelStore};

use crate::compute::Compute;
use crate::error::ApiError;
use crate::inputs::InputCache;
use crate::settings::Settings;

/// Handles to the model store, the compute pool and the limits.
#[derive(Clone)]
pub struct AppState {
    /// The model store: loaded models, their directory, load failures and
    /// the names jobs hold. Every registration goes through it.
    pub models: Arc<ModelStore>,
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
    /// Training jobs: queue, workers, events.
    pub jobs: Arc<crate::jobs::Jobs>,
}

impl AppState {
    /// The model called `name`, or a 404 listing the models there are.
    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
        Ok(self.models.lookup(name)?)
    }

    /// The model `POST /predict` uses: the configured default if loaded,
    /// else the first by name.
    pub fn default_model(&self) -> Result<Arc<LoadedModel>, ApiError> {
        match self.models.lookup(&self.settings.default_model) {
            Ok(m) => Ok(m),
            // Object storage away: a 503, never another model's answer.
            Err(e @ model_store::Error::Unavailable(_)) => Err(e.into()),
            Err(_) => {
                let first = self
                    .models
                    .names()
                    .into_iter()
                    .next()
                    .ok_or_else(|| ApiError::NotFound("no models are loaded".into()))?;
                Ok(self.models.lookup(&first)?)
            }
        }
    }
}
