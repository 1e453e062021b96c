//! Writing the answer: each output asked for, as JSON numbers or after the
//! JSON header, top-k strings for the classification extension, compressed
//! when the client accepts it.

use std::io::Write;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use model_store::LoadedModel;
use model_store::inspect::predict;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::{HEADER_LENGTH, OutputKind, VERSION, Wanted};

/// The answer to an inference request (its JSON part).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"model_name": "resnet20-cifar10", "model_version": "1", "id": "42", "outputs": [{"name": "probabilities", "datatype": "BYTES", "shape": [1, 3], "data": ["0.9020885:3:cat", "0.03066133:0:airplane", "0.027432289:5:dog"]}]}))]
pub struct InferResponse {
    /// The model that answered.
    pub model_name: String,
    /// Always `1`.
    pub model_version: String,
    /// The request's `id`, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The outputs, in the order asked for.
    pub outputs: Vec<ResponseOutput>,
}

/// One output tensor of an answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// `FP32`, or `BYTES` for a classification.
    pub datatype: String,
    /// `[N, classes]`, or `[N, k]` for a classification.
    pub shape: Vec<usize>,
    /// `binary_data_size` when the data follows the JSON header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    /// The elements, flat and row-major, unless sent as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<TensorData>,
}

/// An output's elements in JSON: FP32 numbers as the shortest decimal that
/// reads back as the same float, or BYTES as strings.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TensorData {
    /// FP32 elements.
    Fp32(Vec<f32>),
    /// BYTES elements (`"value:index:label"` for a classification).
    Bytes(Vec<String>),
}

/// The answer: each output asked for, from the batch's logits, in JSON or
/// after the JSON header, compressed if the client accepts it.
pub fn respond(
    model: &LoadedModel,
    id: Option<String>,
    wanted: &[Wanted],
    logits: &[Vec<f32>],
    accept_encoding: Option<&HeaderValue>,
) -> Response {
    let classes = model.classes.len();
    let rows = logits.len();
    let mut binary: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let values: Vec<Vec<f32>> = match w.kind {
            OutputKind::Logits => logits.to_vec(),
            OutputKind::Probabilities => logits
                .iter()
                .map(|row| {
                    predict::probabilities(row)
                        .into_iter()
                        .map(|p| p as f32)
                        .collect()
                })
                .collect(),
        };
        let (datatype, shape, bytes, data) = match w.classification {
            None => {
                let flat: Vec<f32> = values.into_iter().flatten().collect();
                let bytes: Vec<u8> = if w.binary {
                    flat.iter().flat_map(|v| v.to_le_bytes()).collect()
                } else {
                    Vec::new()
                };
                ("FP32", vec![rows, classes], bytes, TensorData::Fp32(flat))
            }
            Some(k) => {
                let k = k.min(classes);
                let strings: Vec<String> = values
                    .iter()
                    .flat_map(|row| {
                        predict::top_classes(row, k, &model.classes)
                            .into_iter()
                            .map(|c| {
                                format!("{}:{}:{}", row[c.class_index], c.class_index, c.label)
                            })
                    })
                    .collect();
                let bytes: Vec<u8> = if w.binary {
                    strings
                        .iter()
                        .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
                        .collect()
                } else {
                    Vec::new()
                };
                ("BYTES", vec![rows, k], bytes, TensorData::Bytes(strings))
            }
        };
        let (parameters, data) = if w.binary {
            let mut p = Map::new();
            p.insert("binary_data_size".into(), json!(bytes.len()));
            binary.extend_from_slice(&bytes);
            (Some(p), None)
        } else {
            (None, Some(data))
        };
        outputs.push(ResponseOutput {
            name: w.kind.name().into(),
            datatype: datatype.into(),
            shape,
            parameters,
            data,
        });
    }
    let body = InferResponse {
        model_name: model.name().to_string(),
        model_version: VERSION.into(),
        id,
        outputs,
    };
    let mut bytes = serde_json::to_vec(&body).expect("the answer serialises");
    let json_length = bytes.len();
    let any_binary = wanted.iter().any(|w| w.binary);
    bytes.extend_from_slice(&binary);
    let mut headers = HeaderMap::new();
    if any_binary {
        headers.insert(HEADER_LENGTH, HeaderValue::from(json_length));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    // Caches must not hand a compressed answer to a client that did not ask.
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    let bytes = match accepted_encoding(accept_encoding) {
        Some((name, compressed)) => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(name));
            compressed(&bytes)
        }
        None => bytes,
    };
    (StatusCode::OK, headers, bytes).into_response()
}

type Compressor = fn(&[u8]) -> Vec<u8>;

/// gzip or deflate when `Accept-Encoding` names one (tritonclient's
/// `response_compression_algorithm`); otherwise the body goes as it is.
fn accepted_encoding(accept: Option<&HeaderValue>) -> Option<(&'static str, Compressor)> {
    let accept = accept?.to_str().ok()?.to_ascii_lowercase();
    let offered = |name: &str| {
        accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            parts.next() == Some(name)
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q == 0.0)
                })
        })
    };
    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).expect("writing to memory");
        e.finish().expect("writing to memory")
    }
    fn deflate(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).expect("writing to memory");
        e.finish().expect("writing to memory")
    }
    if offered("gzip") {
        Some(("gzip", gzip))
    } else if offered("deflate") {
        Some(("deflate", deflate))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_is_honoured() {
        let pick =
            |s: &'static str| accepted_encoding(Some(&HeaderValue::from_static(s))).map(|(n, _)| n);
        assert_eq!(pick("gzip"), Some("gzip"));
        assert_eq!(pick("deflate, br"), Some("deflate"));
        assert_eq!(pick("gzip;q=0, deflate"), Some("deflate"));
        assert_eq!(pick("br"), None);
        assert_eq!(accepted_encoding(None).map(|(n, _)| n), None);
    }
}
