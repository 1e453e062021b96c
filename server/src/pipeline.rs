//! The one request pipeline every inspection route runs: model lookup →
//! parameter validation (the route's own) → decode limits → compute on the
//! bounded pool → render. A route says only what is its own: which
//! parameters it checks, which `model_store::inspect` call it makes and how
//! the result is drawn.

use std::sync::Arc;

use axum::body::Bytes;
use candle_core::Tensor;
use model_store::LoadedModel;
use model_store::preprocess::DecodeLimits;

use crate::error::ApiResult;
use crate::input::prepare_batch;
use crate::state::AppState;

/// A request for model work: the model it names and the limits its images
/// are decoded under.
pub struct Pipeline {
    /// The model, looked up once (a 404 listing the models otherwise).
    pub model: Arc<LoadedModel>,
    /// `--max-pixels`, checked from each image's header before decoding.
    pub limits: DecodeLimits,
    state: AppState,
}

impl Pipeline {
    /// Looks up `model`.
    pub fn new(state: &AppState, model: &str) -> ApiResult<Self> {
        Ok(Self::for_model(state, state.model(model)?))
    }

    /// For a model already looked up (the default model of `POST /predict`).
    pub fn for_model(state: &AppState, model: Arc<LoadedModel>) -> Self {
        Self {
            model,
            limits: DecodeLimits {
                max_pixels: state.settings.max_pixels,
            },
            state: state.clone(),
        }
    }

    /// A `class` parameter: an index or a label of the model, or `None`
    /// (absent or empty: the predicted class).
    pub fn class(&self, token: Option<&str>) -> ApiResult<Option<usize>> {
        match token.map(str::trim) {
            None | Some("") => Ok(None),
            Some(c) => Ok(Some(self.model.class_index(c)?)),
        }
    }

    /// Runs `f` on the compute pool (503 when full, 504 past the deadline).
    pub async fn compute<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&LoadedModel, DecodeLimits) -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let (model, limits) = (self.model.clone(), self.limits);
        self.state.compute.run(move || f(&model, limits)).await
    }

    /// Decodes and preprocesses `images` as the model's manifest says, then
    /// runs `f` on the batch, all on the compute pool.
    pub async fn on_images<T, F>(&self, images: Vec<Bytes>, f: F) -> ApiResult<T>
    where
        F: FnOnce(&LoadedModel, Tensor, &[Bytes]) -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        self.compute(move |model, limits| {
            let x = prepare_batch(model, &images, limits)?;
            f(model, x, &images)
        })
        .await
    }
}
