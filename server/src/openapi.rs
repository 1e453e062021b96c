//! The OpenAPI 3.1 document and the pieces every operation shares.
//!
//! Each handler carries a `#[utoipa::path]` annotation and is routed with
//! `utoipa_axum::routes!`, so the router and the document come from one
//! source: a route cannot be served without being documented. The document
//! is committed as `openapi/openapi.json`; `convscope openapi >
//! openapi/openapi.json` regenerates it, and a test fails when they differ.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::{OpenApi as Document, RefOr};
use utoipa::{IntoResponses, OpenApi, ToSchema};

/// Top-level information; the paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "convscope",
        description = "Opens up trained convolutional networks over HTTP: predictions, \
activation maps, filter images, the Grad-CAM family, saliency, activation maximisation \
and embedding distances, on real checkpoints.\n\n\
Images are sent as multipart `image` fields (repeat for a batch), as a raw `image/*` body, \
as base64 JSON, or stored once with `POST /inputs` and named with `?input=<id>`. \
Errors are `application/problem+json` (RFC 9457) with a `detail` that says what to fix.",
        license(name = "MIT OR Apache-2.0")
    ),
    components(schemas(Problem, Binary, crate::routes::models::GraphNode, crate::oip::V2ErrorBody)),
    tags(
        (name = "service", description = "Health, readiness, metrics and this document."),
        (name = "models", description = "The model store: list, describe, register, unregister."),
        (name = "predict", description = "Classification."),
        (name = "inputs", description = "Content-addressed image cache for `?input=`."),
        (name = "inspection", description = "Activation maps, filters and embeddings."),
        (name = "gradients", description = "Grad-CAM family, saliency and activation maximisation."),
        (name = "training", description = "Training jobs (a durable queue), datasets and evaluation."),
        (name = "inference-protocol", description = "The Open Inference Protocol (KServe v2 REST, as Triton, KServe and \
MLServer speak it), with the binary tensor data and classification extensions; errors are `{\"error\": ...}` as the protocol says."),
    )
)]
pub struct ApiDoc;

/// The whole document: `ApiDoc` plus every routed path. Built once.
pub fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = crate::routes::api_router().split_for_parts().1;
        // An image endpoint takes its image from the body or from
        // `?input=`: where the query offers `input`, the body is optional.
        for item in doc.paths.paths.values_mut() {
            if let Some(op) = item.post.as_mut() {
                let has_input = op.parameters.iter().flatten().any(|p| p.name == "input");
                if let Some(body) = op.request_body.as_mut().filter(|_| has_input) {
                    body.required = Some(utoipa::openapi::Required::False);
                }
            }
        }
        doc
    })
}

/// The document as the committed file holds it: pretty JSON and a newline.
pub fn document_json() -> String {
    let mut json = document()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    json.push('\n');
    json
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

/// An RFC 9457 problem: every error the API answers.
#[derive(ToSchema)]
#[schema(example = json!({"type": "urn:convscope:problem:not-found", "title": "Not Found", "status": 404, "detail": "model 'x' not found; GET /models lists the loaded models"}))]
pub struct Problem {
    /// `urn:convscope:problem:<slug>`, one per kind of error.
    #[schema(rename = "type")]
    pub kind: String,
    /// The HTTP reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong and what to send instead.
    pub detail: String,
    /// Every problem, when a body is checked whole (job bodies).
    pub errors: Option<Vec<String>>,
    /// On a 500: the request id its cause is logged under (also in the
    /// `x-request-id` header of every answer).
    pub request_id: Option<String>,
}

/// Bytes of a file (an image, a PNG answer, a `.npy` array).
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .description(Some("The bytes of a file."))
            .into()
    }
}

impl ToSchema for Binary {}

/// The multipart form of an image endpoint.
#[derive(ToSchema)]
pub struct ImageForm {
    /// One or more image files (PNG, JPEG, BMP, WebP, GIF); repeat the
    /// field for a batch, answered in order.
    pub image: Vec<Binary>,
}

/// The multipart form of the embeddings endpoint: images and their labels.
#[derive(ToSchema)]
pub struct LabelledImageForm {
    /// Image files; repeat the field, one per item.
    pub image: Vec<Binary>,
    /// Labels, paired with the images in order (any text: `6`, `cat`).
    pub label: Option<Vec<Text>>,
}

/// Any text: a multipart field's value (a `6` is the label "6", not a number).
pub struct Text;

impl utoipa::PartialSchema for Text {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .description(Some("Text of a multipart field."))
            .into()
    }
}

impl ToSchema for Text {}

/// The JSON form of an image endpoint: base64 images.
#[derive(ToSchema)]
pub struct Base64Images {
    /// One base64 image.
    pub image: Option<String>,
    /// Several base64 images, a batch.
    pub images: Option<Vec<String>>,
    /// Images with labels (embeddings).
    pub items: Option<Vec<Base64Item>>,
}

/// One labelled base64 image.
#[derive(ToSchema)]
pub struct Base64Item {
    /// The image file, base64.
    pub image: String,
    /// Its class, for intra/inter-class distances.
    pub label: Option<String>,
}

/// Errors of endpoints that read images.
#[derive(IntoResponses)]
pub enum ImageErrors {
    /// Malformed parameters or body.
    #[response(
        status = 400,
        description = "A parameter or the body is malformed; `detail` says which.",
        content_type = "application/problem+json"
    )]
    BadRequest(Problem),
    /// Missing API key.
    #[response(
        status = 401,
        description = "An API key is configured and reads are protected: send `Authorization: Bearer <key>`.",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    /// Unknown model, layer, class or input id.
    #[response(
        status = 404,
        description = "No such model, layer, class or input id.",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    /// Body or image over a limit.
    #[response(
        status = 413,
        description = "The body, the batch or the image is over a limit (see the README's limits).",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    /// A body type this endpoint does not read.
    #[response(
        status = 415,
        description = "The body is neither multipart, an image nor JSON.",
        content_type = "application/problem+json"
    )]
    UnsupportedMediaType(Problem),
    /// Well-formed but unusable input.
    #[response(
        status = 422,
        description = "The image does not decode, or a value is out of range.",
        content_type = "application/problem+json"
    )]
    Unprocessable(Problem),
    /// The compute queue is full.
    #[response(
        status = 503,
        description = "Every compute slot and queue place is taken; retry after `Retry-After` seconds.",
        content_type = "application/problem+json"
    )]
    Busy(Problem),
    /// The request ran past its time limit.
    #[response(
        status = 504,
        description = "The computation ran past `--request-timeout-secs`.",
        content_type = "application/problem+json"
    )]
    Timeout(Problem),
}

/// Errors of endpoints that read no image.
#[derive(IntoResponses)]
pub enum LookupErrors {
    /// Malformed parameters.
    #[response(
        status = 400,
        description = "A parameter is malformed; `detail` says which.",
        content_type = "application/problem+json"
    )]
    BadRequest(Problem),
    /// Missing API key.
    #[response(
        status = 401,
        description = "An API key is configured and this endpoint needs it: send `Authorization: Bearer <key>`.",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    /// Unknown model or layer.
    #[response(
        status = 404,
        description = "No such model or layer.",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    /// A value out of range.
    #[response(
        status = 422,
        description = "A value is out of range, or the layer has no such view.",
        content_type = "application/problem+json"
    )]
    Unprocessable(Problem),
    /// The compute queue is full.
    #[response(
        status = 503,
        description = "Every compute slot and queue place is taken; retry after `Retry-After` seconds.",
        content_type = "application/problem+json"
    )]
    Busy(Problem),
    /// The request ran past its time limit.
    #[response(
        status = 504,
        description = "The computation ran past `--request-timeout-secs`.",
        content_type = "application/problem+json"
    )]
    Timeout(Problem),
}

/// A method of the Grad-CAM family, as pytorch-grad-cam defines it.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CamMethod {
    /// Gradients averaged per channel.
    Gradcam,
    /// Grad-CAM++.
    #[serde(rename = "gradcam++")]
    GradcamPlusPlus,
    /// Element-wise gradient × activation.
    Hirescam,
    /// XGrad-CAM.
    Xgradcam,
    /// Layer-CAM.
    Layercam,
    /// First principal component of the activations (no gradient).
    Eigencam,
    /// Score-CAM: masked forward passes (slow).
    Scorecam,
    /// Ablation-CAM: one forward pass per channel ablated (slow).
    Ablationcam,
}

/// Errors of the Open Inference Protocol's endpoints: `{"error": ...}`, as
/// the protocol shapes them, not problem+json.
#[derive(IntoResponses)]
pub enum V2Errors {
    /// Malformed request.
    #[response(
        status = 400,
        description = "The request is malformed (JSON, shape, datatype, data size, an unknown input or output); `error` says what to fix.",
        content_type = "application/json"
    )]
    BadRequest(crate::oip::V2ErrorBody),
    /// Missing API key.
    #[response(
        status = 401,
        description = "An API key is configured and reads are protected: send `Authorization: Bearer <key>`.",
        content_type = "application/json"
    )]
    Unauthorized(crate::oip::V2ErrorBody),
    /// Unknown model or version.
    #[response(
        status = 404,
        description = "No such model, or no such version of it (every model has version 1 only).",
        content_type = "application/json"
    )]
    NotFound(crate::oip::V2ErrorBody),
    /// Body or batch over a limit.
    #[response(
        status = 413,
        description = "The body (after decompression) or the batch is over a limit (`--max-body-bytes`, `--max-batch`).",
        content_type = "application/json"
    )]
    TooLarge(crate::oip::V2ErrorBody),
    /// Well-formed but unusable input.
    #[response(
        status = 422,
        description = "An image does not decode, or a tensor holds a value the model cannot take (not finite).",
        content_type = "application/json"
    )]
    Unprocessable(crate::oip::V2ErrorBody),
    /// The compute queue is full.
    #[response(
        status = 503,
        description = "Every compute slot and queue place is taken; retry after `Retry-After` seconds.",
        content_type = "application/json"
    )]
    Busy(crate::oip::V2ErrorBody),
    /// The request ran past its time limit.
    #[response(
        status = 504,
        description = "The computation ran past `--request-timeout-secs`.",
        content_type = "application/json"
    )]
    Timeout(crate::oip::V2ErrorBody),
}
