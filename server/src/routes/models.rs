//! The model store over HTTP: list, describe, register, unregister.

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use model_store::{LayerInfo, LoadedModel};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, body_error, declared_within};
use crate::openapi::{Binary, LookupErrors, Problem};
use crate::state::AppState;

/// One model in `GET /models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    /// Name in URLs.
    pub name: String,
    /// Architecture from the manifest.
    pub architecture: String,
    /// Outputs of the head.
    pub num_classes: usize,
    /// What the network takes.
    pub input: InputInfo,
    /// Where it runs.
    pub device: String,
}

/// Input size and preprocessing.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputInfo {
    /// 1 or 3.
    pub channels: usize,
    /// Pixels.
    pub height: usize,
    /// Pixels.
    pub width: usize,
    /// Per-channel mean on `[0, 1]`.
    pub mean: Vec<f32>,
    /// Per-channel std on `[0, 1]`.
    pub std: Vec<f32>,
    /// Shorter-side resize, if any.
    pub resize: Option<usize>,
    /// Center crop `[h, w]`, if any.
    pub center_crop: Option<[usize; 2]>,
}

/// `GET /models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Loaded models, by name.
    pub models: Vec<ModelEntry>,
    /// The model `POST /predict` uses.
    pub default_model: Option<String>,
    /// Files in the models directory that failed to load, and why.
    pub load_errors: Vec<LoadError>,
}

/// A model file that did not load.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadError {
    /// The manifest file name.
    pub file: String,
    /// Why, naming the tensor or layer.
    pub error: String,
}

/// A row of the per-layer table.
#[derive(Debug, Serialize, ToSchema)]
pub struct LayerRow {
    /// Module path, usable as `{layer}` in inspection URLs.
    pub name: String,
    /// `conv2d`, `residual_block`, ...
    pub kind: &'static str,
    /// `[C, H, W]` or `[N]` for one image of the manifest's input size.
    pub output_shape: Vec<usize>,
    /// Learned parameters in this layer (and inside it, for blocks).
    pub params: u64,
    /// Input pixels one output unit sees (an integer, or `[h, w]` when not square).
    pub receptive_field: Extent,
    /// Input pixels between neighbouring output units (same form).
    pub jump: Extent,
    /// Multiply-accumulates per image (conv and linear; blocks sum their children).
    pub macs: u64,
    /// Whether the layer holds learned parameters (torchinfo's `trainable`;
    /// a served model has no frozen layers).
    pub trainable: bool,
    /// Its share of `total_params`, in percent (torchinfo's `params_percent`).
    pub params_percent: f64,
}

/// A size in pixels: one integer when square, `[h, w]` otherwise.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Extent {
    /// Height = width.
    Square(usize),
    /// `[h, w]`.
    Rect([usize; 2]),
}

/// The multipart body of `POST /models`.
#[derive(ToSchema)]
pub struct RegisterForm {
    /// The manifest (JSON, as in the contract's "Model manifest").
    #[schema(example = json!({"name": "my-net", "architecture": "resnet20-cifar", "input": {"channels": 3, "height": 32, "width": 32}, "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}))]
    pub manifest: String,
    /// The weights with PyTorch `state_dict` names: a `.safetensors` file,
    /// or a PyTorch zip checkpoint (`torch.save(model.state_dict(), "m.pth")`;
    /// a dict holding it under `state_dict` or `model` counts), read without
    /// running code and stored as safetensors.
    pub weights: Binary,
}

/// One node of a `graph` manifest (`"architecture": "graph"`, `"nodes": [...]`
/// in topological order, optional `"output"`: the node whose output is the
/// model's, default the last; optional `"unused_weights"`: checkpoint tensors
/// to accept and ignore; optional `"check"`: `{"input": {"generator":
/// "splitmix64", "seed", "low", "high"}, "logits": [...]}`, recomputed on
/// registration, 422 when a logit differs by more than 1e-3 × max(1, max
/// |logit|)). `tools/export/convscope_export.py` (also `GET /export.py`)
/// writes these from any torch.fx-traceable module.
///
/// Ops and their arguments (PyTorch's names and defaults; dims count the
/// batch as 0): `conv2d` (in_channels, out_channels, kernel_size, stride,
/// padding: int, [h, w], "same" or "valid", dilation, groups, bias),
/// `batch_norm2d` (num_features, eps, affine), `layer_norm`
/// (normalized_shape: [C], eps, elementwise_affine, bias, dim: -1 or 1),
/// `linear` (in_features, out_features, bias; on the last dim of any rank),
/// `max_pool2d` / `avg_pool2d` (kernel_size, stride, padding, ceil_mode,
/// count_include_pad), `adaptive_avg_pool2d` / `adaptive_max_pool2d`
/// (output_size), `relu`, `relu6`, `leaky_relu` (negative_slope),
/// `hardswish`, `hardsigmoid`, `silu`, `sigmoid`, `gelu` (approximate:
/// "none" or "tanh"), `tanh`, `softmax` (dim), `dropout` / `dropout2d` (p),
/// `identity`, `flatten` (start_dim, end_dim), `add` / `sub` / `mul` / `div`
/// (two inputs, broadcasting; or one input and `scalar`, with
/// `scalar_first: true` for `s - x`), `cat` (dim), `reshape` (shape: the
/// per-sample shape), `permute` (dims), `transpose` (dim0, dim1), `narrow`
/// (dim, start, length), `slice` (dim, start, end, step: `x[:, :, a:b:c]`),
/// `pad` (pad: zero padding as `F.pad` takes it), `mean` (dims, keepdim),
/// `parameter` (target: the state_dict name, shape; no inputs).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: the model store parses nodes
pub struct GraphNode {
    /// The module path for a module call (`features.3.conv.0.0`; a second
    /// call of one module is `path_1`), the torch.fx name for a functional
    /// step (`add`, `cat_1`). An API layer name.
    #[schema(example = "layer1.0.conv1")]
    pub name: String,
    /// The operation (list above).
    #[schema(example = "conv2d")]
    pub op: String,
    /// Names of earlier nodes, or `input` for the image.
    #[schema(example = json!(["maxpool"]))]
    pub inputs: Vec<String>,
    /// The module whose `state_dict` entries hold this node's weights
    /// (default: `name`).
    pub module: Option<String>,
    /// Container modules whose output this node's output is (`layer1.0`,
    /// `features`): also API layer names, shown with kind `block`.
    pub aliases: Option<Vec<String>>,
}

/// `GET /models/{model}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelDetail {
    /// Everything in the list entry.
    #[serde(flatten)]
    pub entry: ModelEntry,
    /// Every named layer in forward order.
    pub layers: Vec<LayerRow>,
    /// Learned parameters (BatchNorm running statistics excluded, as PyTorch counts).
    pub total_params: u64,
    /// Multiply-accumulates per image.
    pub total_macs: u64,
    /// Memory of the weights: parameters and batch-norm running
    /// statistics, float32, in MiB.
    pub param_mib: f64,
    /// Memory of one image's forward pass if every layer's output were
    /// kept (what recording all activations holds; inference frees each
    /// after its last use), float32, in MiB.
    pub activation_mib: f64,
    /// Labels in output order.
    pub classes: Vec<String>,
}

/// `/models`, `/models/{model}`.
pub fn router(max_model_bytes: usize) -> OpenApiRouter<AppState> {
    // The upload limit applies to registration only; other bodies keep
    // `--max-body-bytes`.
    let register = OpenApiRouter::new()
        .routes(routes!(register))
        .layer(DefaultBodyLimit::max(max_model_bytes));
    OpenApiRouter::new()
        .routes(routes!(list))
        .merge(register)
        .routes(routes!(detail, unregister))
}

/// Lists the loaded models and any that failed to load.
#[utoipa::path(
    get,
    path = "/models",
    tag = "models",
    responses(
        (status = 200, description = "The loaded models.", body = ModelList),
        (status = 401, description = "Reads are protected (`--protect-reads`): send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let default_model = state.default_model().ok().map(|m| m.name().to_string());
    let load_errors = state
        .models
        .failures()
        .iter()
        .map(|f| LoadError {
            file: f.file.file_name().map_or_else(
                || f.file.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            error: f.error.clone(),
        })
        .collect();
    Json(ModelList {
        models: state.models.summaries().iter().map(entry).collect(),
        default_model,
        load_errors,
    })
}

/// Describes one model, with its per-layer table.
#[utoipa::path(
    get,
    path = "/models/{model}",
    tag = "models",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10")),
    responses((status = 200, description = "The model, its layers and classes.", body = ModelDetail), LookupErrors)
)]
async fn detail(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ModelDetail>> {
    Ok(Json(describe(&state.model(&name)?)))
}

/// Registers a model from multipart `manifest` (JSON) and `weights`
/// (safetensors): validated as at start-up, written atomically, served at once.
#[utoipa::path(
    post,
    path = "/models",
    tag = "models",
    request_body(content = RegisterForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Registered and serving; `Location` names it.", body = ModelDetail,
         headers(("location" = String, description = "`/models/{name}`"))),
        (status = 400, description = "Not a multipart body with `manifest` and `weights`.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "An API key is configured: send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A model of that name exists. Or a queued or running job holds the name (`detail` names the job).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over `--max-model-bytes`.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The manifest is invalid or does not match the weights; `detail` names every tensor. Also: a `.pth` that cannot be read without running code (a legacy pickle or a TorchScript archive: `detail` says how to re-save it), and a `check` entry the weights do not reproduce (`detail` gives the largest |Δlogit|).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The compute queue is full; retry after `Retry-After` seconds.", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Loading ran past `--request-timeout-secs`.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<impl IntoResponse> {
    declared_within(
        &headers,
        state.settings.max_model_bytes,
        "--max-model-bytes",
    )?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::BadRequest(format!(
            "send a multipart/form-data body with fields `manifest` and `weights` ({})",
            e.body_text()
        ))
    })?;
    let (mut manifest, mut weights) = (None, None);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| body_error(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or("").to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| body_error(e.status(), e.body_text()))?;
        match name.as_str() {
            "manifest" => manifest = Some(bytes),
            "weights" => weights = Some(bytes),
            _ => {}
        }
    }
    let (Some(manifest), Some(weights)) = (manifest, weights) else {
        return Err(ApiError::BadRequest(
            "send multipart fields `manifest` (the JSON manifest) and `weights` (the .safetensors file)".into(),
        ));
    };
    // A malformed manifest or a taken or held name (an upload under way, a
    // job that will register it) is refused before waiting for the compute
    // pool; the store checks the name again, atomically, as it claims it.
    let name = model_store::Manifest::from_json(&manifest)?.name;
    state.jobs.unless_stale(|| state.models.check_free(&name))?;
    let store = state.models.clone();
    let model = state
        .compute
        .run(move || Ok(store.register(&manifest, &weights)?))
        .await?;
    let name = model.name().to_string();
    tracing::info!(model = %name, "registered model");
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("/models/{name}")) {
        headers.insert(header::LOCATION, v);
    }
    Ok((StatusCode::CREATED, headers, Json(describe(&model))))
}

/// Unregisters a model and deletes its files.
#[utoipa::path(
    delete,
    path = "/models/{model}",
    tag = "models",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "my-net")),
    responses(
        (status = 204, description = "Unregistered; its files are gone."),
        (status = 400, description = "The name is malformed.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "An API key is configured: send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such model.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A queued or running job holds the name (its result or an epoch snapshot); `detail` names the job.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn unregister(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    // Off the async threads: with object storage a deletion is a database
    // transaction and an S3 request.
    let (jobs, models, n) = (state.jobs.clone(), state.models.clone(), name.clone());
    tokio::task::spawn_blocking(move || jobs.unless_stale(|| models.delete(&n)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    tracing::info!(model = %name, "unregistered model");
    Ok(StatusCode::NO_CONTENT)
}

fn entry(m: &model_store::Summary) -> ModelEntry {
    let s = &m.manifest.input;
    let (mean, std) = m.manifest.normalisation();
    ModelEntry {
        name: m.manifest.name.clone(),
        architecture: m.manifest.architecture.clone(),
        num_classes: m.num_classes,
        input: InputInfo {
            channels: s.channels,
            height: s.height,
            width: s.width,
            mean,
            std,
            resize: s.resize,
            center_crop: s.center_crop.map(|c| {
                let (h, w) = c.hw();
                [h, w]
            }),
        },
        device: device_name(&m.device),
    }
}

fn describe(m: &Arc<LoadedModel>) -> ModelDetail {
    let net = &m.network;
    ModelDetail {
        entry: entry(&model_store::Summary::from(m.as_ref())),
        layers: net
            .layers()
            .iter()
            .map(|l| row(l, net.total_params()))
            .collect(),
        total_params: net.total_params(),
        total_macs: net.total_macs(),
        param_mib: net.param_bytes() as f64 / MIB,
        activation_mib: net.activation_bytes() as f64 / MIB,
        classes: m.classes.clone(),
    }
}

const MIB: f64 = (1 << 20) as f64;

fn row(l: &LayerInfo, total_params: u64) -> LayerRow {
    let pair = |(h, w): (usize, usize)| {
        if h == w {
            Extent::Square(h)
        } else {
            Extent::Rect([h, w])
        }
    };
    LayerRow {
        name: l.name.clone(),
        kind: l.kind.name(),
        output_shape: l.output_shape.clone(),
        params: l.params,
        receptive_field: pair(l.receptive_field),
        jump: pair(l.jump),
        macs: l.macs,
        trainable: l.params > 0,
        params_percent: if total_params == 0 {
            0.0
        } else {
            100.0 * l.params as f64 / total_params as f64
        },
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
