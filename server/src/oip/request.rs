//! Reading an inference request: its JSON, the binary tensor data after
//! it, the compression it came in, and every check that gives a 400 which
//! says what to fix.

use std::io::Read;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{HEADER_LENGTH, bad};
use crate::error::ApiError;

/// `POST /v2/models/{model}/infer`: the request's JSON (all of the body,
/// or its first `Inference-Header-Content-Length` bytes).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNocFAAAAIkAOGrWWInAAAAAElFTkSuQmCC"]}], "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}))]
pub struct InferRequest {
    /// Echoed in the answer.
    pub id: Option<String>,
    /// `binary_data_output: true` sends every output as binary data.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Exactly one: `input` or `image`.
    pub inputs: Vec<RequestInput>,
    /// The outputs wanted; both when absent.
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One input tensor of a request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestInput {
    /// `input` or `image`.
    pub name: String,
    /// `[N, C, H, W]` for `input`, `[N]` (or `[N, 1]`) for `image`.
    pub shape: Vec<i64>,
    /// `FP32` for `input`, `BYTES` for `image`.
    pub datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON header.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The elements in row-major order (flat or nested); base64 strings
    /// for `image`.
    pub data: Option<Value>,
}

/// An output a request asks for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// `binary_data` (bool) and `classification` (the top k, as BYTES
    /// `"value:index:label"`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// The batch a request carries.
#[derive(Debug)]
pub enum Batch {
    /// FP32 numbers, already preprocessed, with their shape.
    Tensor {
        /// Row-major values.
        values: Vec<f32>,
        /// `[N, C, H, W]`.
        shape: Vec<usize>,
    },
    /// Encoded image files.
    Images(Vec<Bytes>),
}

impl Batch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        match self {
            Batch::Tensor { shape, .. } => shape.first().copied().unwrap_or(0),
            Batch::Images(images) => images.len(),
        }
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The two outputs of every model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// The last layer's scores.
    Logits,
    /// Their softmax.
    Probabilities,
}

impl OutputKind {
    /// Its name in requests and answers.
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Logits => "logits",
            OutputKind::Probabilities => "probabilities",
        }
    }
}

/// An output as asked for.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    /// Which one.
    pub kind: OutputKind,
    /// Its data after the JSON header instead of in it.
    pub binary: bool,
    /// The top k classes as BYTES `"value:index:label"` instead of all values.
    pub classification: Option<usize>,
}

/// A request read and checked, ready to run.
#[derive(Debug)]
pub struct Decoded {
    /// Echoed in the answer.
    pub id: Option<String>,
    /// The images.
    pub batch: Batch,
    /// The outputs, in the order asked for.
    pub outputs: Vec<Wanted>,
}

/// The length in the `Inference-Header-Content-Length` header, if any.
pub fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(v) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            bad(format!(
                "Inference-Header-Content-Length is {v:?}; it must be the byte length of the JSON header"
            ))
        })
}

/// The body with its `Content-Encoding` undone (gzip or deflate, as
/// tritonclient's `request_compression_algorithm` sends), never more than
/// `max_bytes` of it.
pub fn decompress(headers: &HeaderMap, body: Bytes, max_bytes: usize) -> Result<Bytes, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let reader: Box<dyn Read> = match encoding.as_str() {
        "identity" | "" => return Ok(body),
        "gzip" | "x-gzip" => Box::new(flate2::read::GzDecoder::new(&body[..])),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(&body[..])),
        other => {
            return Err(bad(format!(
                "Content-Encoding {other:?} is not supported; send gzip, deflate or an uncompressed body"
            )));
        }
    };
    let mut out = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("the {encoding} body does not decompress: {e}")))?;
    if out.len() > max_bytes {
        return Err(ApiError::TooLarge(format!(
            "the body decompresses to more than this server's limit of {max_bytes} bytes (--max-body-bytes)"
        )));
    }
    Ok(out.into())
}

/// Reads an inference request: its JSON (the first `header_length` bytes
/// when given, else the whole body) and the binary data after it.
pub fn parse(body: &Bytes, header_length: Option<usize>) -> Result<Decoded, ApiError> {
    let (json_part, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body.clone(), Bytes::new()),
    };
    let request: InferRequest = serde_json::from_slice(&json_part).map_err(|e| {
        bad(format!(
            "the inference request is not valid JSON of the protocol: {e}"
        ))
    })?;
    let [input] = <[RequestInput; 1]>::try_from(request.inputs).map_err(|inputs| {
        bad(format!(
            "the request has {} inputs; give exactly one: `input` (FP32 [N, C, H, W], preprocessed) or `image` (BYTES [N], encoded image files)",
            inputs.len()
        ))
    })?;
    let raw = match input.parameters.get("binary_data_size") {
        None => None,
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                bad(format!(
                    "input `{}`: binary_data_size is {v}; it must be a byte count",
                    input.name
                ))
            })? as usize;
            if n > binary.len() {
                return Err(bad(format!(
                    "input `{}`: binary_data_size is {n} but only {} bytes follow the JSON header",
                    input.name,
                    binary.len()
                )));
            }
            Some(binary.split_to(n))
        }
    };
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes follow the JSON header that no input's binary_data_size accounts for",
            binary.len()
        )));
    }
    if input.parameters.contains_key("shared_memory_region") {
        return Err(bad(
            "shared memory inputs are not supported: send the data in the body",
        ));
    }
    let shape = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            bad(format!(
                "input `{}`: shape {:?} has a negative dimension",
                input.name, input.shape
            ))
        })?;
    let data = match (raw, input.data) {
        (Some(raw), None) => Data::Binary(raw),
        (None, Some(json)) => Data::Json(json),
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "input `{}` has both `data` and binary_data_size; give one",
                input.name
            )));
        }
        (None, None) => {
            return Err(bad(format!(
                "input `{}` has no data: give `data` or binary_data_size with the bytes after the JSON header",
                input.name
            )));
        }
    };
    let batch = match input.name.as_str() {
        "input" => {
            expect_datatype("input", &input.datatype, "FP32")?;
            if shape.len() != 4 {
                return Err(bad(format!(
                    "input `input`: shape {shape:?} is not [N, C, H, W]"
                )));
            }
            Batch::Tensor {
                values: data.floats(&shape)?,
                shape,
            }
        }
        "image" => {
            expect_datatype("image", &input.datatype, "BYTES")?;
            let n = match shape[..] {
                [n] | [n, 1] => n,
                _ => {
                    return Err(bad(format!(
                        "input `image`: shape {shape:?} is not [N] (or [N, 1]): one encoded file per image"
                    )));
                }
            };
            Batch::Images(data.strings(n)?)
        }
        other => {
            return Err(bad(format!(
                "the model has no input `{other}`; its inputs are `input` (FP32 [N, C, H, W], preprocessed) and `image` (BYTES [N], encoded image files)"
            )));
        }
    };
    if batch.is_empty() {
        return Err(bad("the batch is empty: give at least one image"));
    }
    Ok(Decoded {
        id: request.id,
        batch,
        outputs: wanted(request.outputs, &request.parameters)?,
    })
}

fn expect_datatype(name: &str, got: &str, want: &str) -> Result<(), ApiError> {
    if got == want {
        Ok(())
    } else {
        Err(bad(format!(
            "input `{name}` has datatype {got}; it takes {want}"
        )))
    }
}

fn flag(parameters: &Map<String, Value>, name: &str, at: &str) -> Result<bool, ApiError> {
    match parameters.get(name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(format!(
            "{at}: {name} is {other}; it must be true or false"
        ))),
    }
}

fn wanted(
    outputs: Option<Vec<RequestOutput>>,
    parameters: &Map<String, Value>,
) -> Result<Vec<Wanted>, ApiError> {
    let all_binary = flag(parameters, "binary_data_output", "the request")?;
    let outputs = match outputs {
        Some(o) if !o.is_empty() => o,
        _ => {
            return Ok([OutputKind::Logits, OutputKind::Probabilities]
                .map(|kind| Wanted {
                    kind,
                    binary: all_binary,
                    classification: None,
                })
                .to_vec());
        }
    };
    let mut list: Vec<Wanted> = Vec::with_capacity(outputs.len());
    for o in outputs {
        let kind = match o.name.as_str() {
            "logits" => OutputKind::Logits,
            "probabilities" => OutputKind::Probabilities,
            other => {
                return Err(bad(format!(
                    "the model has no output `{other}`; its outputs are `logits` and `probabilities`"
                )));
            }
        };
        if list.iter().any(|w| w.kind == kind) {
            return Err(bad(format!("output `{}` is asked for twice", o.name)));
        }
        let at = format!("output `{}`", o.name);
        let binary = if o.parameters.contains_key("binary_data") {
            flag(&o.parameters, "binary_data", &at)?
        } else {
            all_binary
        };
        let classification = match o.parameters.get("classification") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(k) if k >= 1 => Some(k as usize),
                _ => {
                    return Err(bad(format!(
                        "{at}: classification is {v}; it must be a class count of at least 1"
                    )));
                }
            },
        };
        list.push(Wanted {
            kind,
            binary,
            classification,
        });
    }
    Ok(list)
}

/// An input's data, from the JSON or after it.
enum Data {
    Json(Value),
    Binary(Bytes),
}

impl Data {
    /// FP32 values: little-endian floats, or JSON numbers (nested arrays
    /// flattened in row-major order), exactly as many as `shape` holds.
    fn floats(self, shape: &[usize]) -> Result<Vec<f32>, ApiError> {
        let count = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("input `input`: shape {shape:?} is too large")))?;
        let values = match self {
            Data::Binary(raw) => {
                if raw.len() != count.saturating_mul(4) {
                    return Err(bad(format!(
                        "input `input`: {} bytes of binary data; shape {shape:?} in FP32 needs {}",
                        raw.len(),
                        count.saturating_mul(4)
                    )));
                }
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            Data::Json(json) => {
                let mut values = Vec::with_capacity(count.min(1 << 24));
                flatten_numbers(&json, &mut values)?;
                if values.len() != count {
                    return Err(bad(format!(
                        "input `input`: `data` has {} numbers; shape {shape:?} needs {count}",
                        values.len()
                    )));
                }
                values
            }
        };
        Ok(values)
    }

    /// BYTES elements: `n` length-prefixed (4-byte little-endian) byte
    /// strings, or `n` JSON strings holding base64.
    fn strings(self, n: usize) -> Result<Vec<Bytes>, ApiError> {
        let items = match self {
            Data::Binary(mut raw) => {
                let mut items = Vec::new();
                while !raw.is_empty() {
                    if raw.len() < 4 {
                        return Err(bad(
                            "input `image`: the binary data ends inside an element's 4-byte length",
                        ));
                    }
                    let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
                    let _ = raw.split_to(4);
                    if len > raw.len() {
                        return Err(bad(format!(
                            "input `image`: element {} says {len} bytes but {} are left",
                            items.len(),
                            raw.len()
                        )));
                    }
                    items.push(raw.split_to(len));
                }
                items
            }
            Data::Json(json) => {
                let mut strings = Vec::new();
                flatten_strings(&json, &mut strings)?;
                strings
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        // Data URLs as a browser makes them are accepted too.
                        let b64 = s.split_once(";base64,").map_or(s.as_str(), |(_, b)| b);
                        base64::engine::general_purpose::STANDARD
                            .decode(b64.trim())
                            .map(Bytes::from)
                            .map_err(|e| {
                                bad(format!(
                                    "input `image`: data[{i}] is not base64 ({e}); in JSON each element is a base64-encoded image file"
                                ))
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        if items.len() != n {
            return Err(bad(format!(
                "input `image`: {} elements for shape [{n}]",
                items.len()
            )));
        }
        Ok(items)
    }
}

fn flatten_numbers(v: &Value, out: &mut Vec<f32>) -> Result<(), ApiError> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|item| flatten_numbers(item, out)),
        Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        other => Err(bad(format!(
            "input `input`: `data` holds {other}; FP32 data is numbers"
        ))),
    }
}

fn flatten_strings(v: &Value, out: &mut Vec<String>) -> Result<(), ApiError> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|item| flatten_strings(item, out)),
        Value::String(s) => {
            out.push(s.clone());
            Ok(())
        }
        other => Err(bad(format!(
            "input `image`: `data` holds {}; BYTES data is base64 strings",
            short(other)
        ))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}…", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn header_and(json: &Value, binary: &[u8]) -> (Bytes, usize) {
        let mut body = serde_json::to_vec(json).unwrap();
        let n = body.len();
        body.extend_from_slice(binary);
        (body.into(), n)
    }

    #[test]
    fn binary_fp32_input_is_read_after_the_header() {
        let values = [1.5f32, -2.0, 0.25, 3.0];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (body, n) = header_and(
            &json!({"id": "7", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2],
                     "parameters": {"binary_data_size": 16}}],
                    "parameters": {"binary_data_output": true}}),
            &raw,
        );
        let d = parse(&body, Some(n)).unwrap();
        assert_eq!(d.id.as_deref(), Some("7"));
        match d.batch {
            Batch::Tensor { values: v, shape } => {
                assert_eq!(v, values);
                assert_eq!(shape, [1, 1, 2, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.outputs.len(), 2);
        assert!(d.outputs.iter().all(|w| w.binary));
    }

    #[test]
    fn bytes_input_binary_and_json_agree() {
        let files: [&[u8]; 2] = [b"\x89PNG-one", b"GIF89a-two"];
        let raw: Vec<u8> = files
            .iter()
            .flat_map(|f| {
                (f.len() as u32)
                    .to_le_bytes()
                    .into_iter()
                    .chain(f.iter().copied())
            })
            .collect();
        let (body, n) = header_and(
            &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                     "parameters": {"binary_data_size": raw.len()}}]}),
            &raw,
        );
        let b64 = |f: &[u8]| base64::engine::general_purpose::STANDARD.encode(f);
        let json_body: Bytes =
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES",
            "shape": [2, 1], "data": [b64(files[0]), b64(files[1])]}]}))
            .unwrap()
            .into();
        for d in [
            parse(&body, Some(n)).unwrap(),
            parse(&json_body, None).unwrap(),
        ] {
            match d.batch {
                Batch::Images(images) => assert_eq!(images, files.map(Bytes::from_static)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn malformed_requests_say_what_to_fix() {
        let cases: &[(Value, &str)] = &[
            (json!({"inputs": []}), "give exactly one"),
            (
                json!({"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 1, 1, 1], "data": [1]}]}),
                "it takes FP32",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [1, 2]}]}),
                "needs 12",
            ),
            (
                json!({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}),
                "no input `pixels`",
            ),
            (
                json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@"]}]}),
                "not base64",
            ),
            (
                json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                       "outputs": [{"name": "softmax"}]}),
                "no output `softmax`",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 1, 1], "data": [1]}]}),
                "negative",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 1, 1]}]}),
                "has no data",
            ),
        ];
        for (body, want) in cases {
            let body: Bytes = serde_json::to_vec(body).unwrap().into();
            let e = parse(&body, None).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
        // A header length past the body, and bytes nobody accounts for.
        let (body, n) = header_and(
            &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}),
            b"xx",
        );
        assert!(
            parse(&body, Some(n + 10))
                .unwrap_err()
                .to_string()
                .contains("only")
        );
        assert!(
            parse(&body, Some(n))
                .unwrap_err()
                .to_string()
                .contains("no input's binary_data_size")
        );
    }

    #[test]
    fn compressed_bodies_are_bounded() {
        let plain = vec![b'a'; 10_000];
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&plain).unwrap();
        let gz: Bytes = e.finish().unwrap().into();
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(decompress(&h, gz.clone(), 10_000).unwrap(), plain);
        assert!(matches!(
            decompress(&h, gz, 9_999),
            Err(ApiError::TooLarge(_))
        ));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert!(decompress(&h, Bytes::from_static(b"x"), 10).is_err());
    }
}
