//! Reading an inference request: its JSON, the binary tensor data after
//! it, the compression it came in, and every check that gives a 400 which
//! says what to fix.

use std::io::Read;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use base64::Engine;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{HEADER_LENGTH, bad};
use crate::error::ApiError;

/// `POST /v2/models/{model}/infer`: the request's JSON (all of the body,
/// or its first `Inference-Header-Content-Length` bytes). Parameters the
/// server does not use are skipped unread, and `data` is kept as raw text
/// until the shape is checked, so no request becomes a tree of values many
/// times its size.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNocFAAAAIkAOGrWWInAAAAAElFTkSuQmCC"]}], "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}))]
pub struct InferRequest {
    /// Echoed in the answer.
    pub id: Option<String>,
    /// Request parameters.
    #[serde(default)]
    pub parameters: RequestParameters,
    /// Exactly one: `input` or `image`.
    pub inputs: Vec<RequestInput>,
    /// The outputs wanted; both when absent.
    pub outputs: Option<Vec<RequestOutput>>,
}

/// The request parameters this server reads; others are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RequestParameters {
    /// Every output as binary data after the JSON header.
    pub binary_data_output: Option<bool>,
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
    /// Input parameters.
    #[serde(default)]
    pub parameters: InputParameters,
    /// The elements in row-major order (flat or nested); base64 strings
    /// for `image`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<Box<RawValue>>,
}

/// The input parameters this server reads; others are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct InputParameters {
    /// The tensor's bytes follow the JSON header (after earlier inputs').
    pub binary_data_size: Option<u64>,
    /// Refused: this server reads tensors from the body only.
    #[schema(value_type = Option<Object>)]
    pub shared_memory_region: Option<IgnoredAny>,
}

/// An output a request asks for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// Output parameters.
    #[serde(default)]
    pub parameters: OutputParameters,
}

/// The output parameters this server reads; others are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct OutputParameters {
    /// Its data after the JSON header (default: the request's `binary_data_output`).
    pub binary_data: Option<bool>,
    /// The top k classes as BYTES `"value:index:label"` (0: all values, as
    /// without it).
    pub classification: Option<u64>,
}

/// What the model takes, for checking a request before reading its data.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// `[C, H, W]` of the model's input.
    pub input: [usize; 3],
    /// `--max-batch`.
    pub max_batch: usize,
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
pub fn parse(
    body: &Bytes,
    header_length: Option<usize>,
    expect: Expect,
) -> Result<Decoded, ApiError> {
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
    let raw = match input.parameters.binary_data_size {
        None => None,
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > binary.len() {
                return Err(bad(format!(
                    "input `{}`: binary_data_size is {n} but only {} bytes follow the JSON header",
                    short(&input.name),
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
    if input.parameters.shared_memory_region.is_some() {
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
                short(&input.name),
                input.shape
            ))
        })?;
    let data = match (raw, input.data) {
        (Some(raw), None) => Data::Binary(raw),
        (None, Some(json)) => Data::Json(json),
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "input `{}` has both `data` and binary_data_size; give one",
                short(&input.name)
            )));
        }
        (None, None) => {
            return Err(bad(format!(
                "input `{}` has no data: give `data` or binary_data_size with the bytes after the JSON header",
                short(&input.name)
            )));
        }
    };
    let batch = match input.name.as_str() {
        "input" => {
            expect_datatype("input", &input.datatype, "FP32")?;
            let [c, h, w] = expect.input;
            if shape.len() != 4 || shape[1..] != expect.input || shape[0] == 0 {
                return Err(bad(format!(
                    "input `input`: the shape is {shape:?}; this model takes [N, {c}, {h}, {w}] with N >= 1"
                )));
            }
            over_batch(shape[0], expect.max_batch)?;
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
            over_batch(n, expect.max_batch)?;
            Batch::Images(data.strings(n)?)
        }
        other => {
            let other = short(other);
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
            "input `{name}` has datatype {}; it takes {want}",
            short(got)
        )))
    }
}

/// A batch over `--max-batch` is refused before its data is read.
fn over_batch(n: usize, max_batch: usize) -> Result<(), ApiError> {
    if n > max_batch {
        return Err(ApiError::TooLarge(format!(
            "{n} images in one request; the limit is {max_batch} (--max-batch)"
        )));
    }
    Ok(())
}

fn wanted(
    outputs: Option<Vec<RequestOutput>>,
    parameters: &RequestParameters,
) -> Result<Vec<Wanted>, ApiError> {
    let all_binary = parameters.binary_data_output.unwrap_or(false);
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
                    "the model has no output `{}`; its outputs are `logits` and `probabilities`",
                    short(other)
                )));
            }
        };
        if list.iter().any(|w| w.kind == kind) {
            return Err(bad(format!("output `{}` is asked for twice", o.name)));
        }
        let binary = o.parameters.binary_data.unwrap_or(all_binary);
        // 0 asks for no classification, as Triton reads it.
        let classification = o
            .parameters
            .classification
            .filter(|&k| k > 0)
            .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
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
    Json(Box<RawValue>),
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
                let values: Vec<f32> = read_flat(&json, count, "input `input`")?;
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
                    if items.len() == n {
                        return Err(bad(format!(
                            "input `image`: more than {n} elements for shape [{n}]"
                        )));
                    }
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
                let strings: Vec<String> = read_flat(&json, n, "input `image`")?;
                strings
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        decode_base64(s).map(Bytes::from).ok_or_else(|| {
                            bad(format!(
                                "input `image`: data[{i}] is not base64; in JSON each element is a base64-encoded image file"
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

/// Base64 as clients write it: standard or URL-safe, padded or not, or a
/// data URL as a browser makes one.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let b64 = s.split_once(";base64,").map_or(s, |(_, b)| b).trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(b64).ok())
}

/// A tensor element in JSON: a number for FP32, a string for BYTES.
trait Element: Sized {
    /// What the protocol calls such data, for errors.
    const KIND: &'static str;
    fn from_number(v: f64) -> Option<Self>;
    fn from_str(v: &str) -> Option<Self>;
}

impl Element for f32 {
    const KIND: &'static str = "numbers";
    fn from_number(v: f64) -> Option<Self> {
        Some(v as f32)
    }
    fn from_str(_: &str) -> Option<Self> {
        None
    }
}

impl Element for String {
    const KIND: &'static str = "base64 strings";
    fn from_number(_: f64) -> Option<Self> {
        None
    }
    fn from_str(v: &str) -> Option<Self> {
        Some(v.to_string())
    }
}

/// `data` read straight into a flat list (nested arrays in row-major
/// order), never more than `limit` elements: the shape's count, already
/// checked against the model and `--max-batch`.
fn read_flat<T: Element>(raw: &RawValue, limit: usize, at: &str) -> Result<Vec<T>, ApiError> {
    use serde::de::{DeserializeSeed, SeqAccess, Visitor};

    struct Flat<'v, T> {
        out: &'v mut Vec<T>,
        limit: usize,
    }

    impl<'de, T: Element> DeserializeSeed<'de> for Flat<'_, T> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<T: Element> Flat<'_, T> {
        fn push<E: serde::de::Error>(self, v: Option<T>) -> Result<(), E> {
            let v = v.ok_or_else(|| E::custom(format!("`data` must hold {}", T::KIND)))?;
            if self.out.len() == self.limit {
                return Err(E::custom(format!(
                    "`data` has more than the {} elements its shape holds",
                    self.limit
                )));
            }
            self.out.push(v);
            Ok(())
        }
    }

    impl<'de, T: Element> Visitor<'de> for Flat<'_, T> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of {}", T::KIND)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq
                .next_element_seed(Flat {
                    out: &mut *self.out,
                    limit: self.limit,
                })?
                .is_some()
            {}
            Ok(())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
            self.push(T::from_number(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
            self.push(T::from_number(v as f64))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
            self.push(T::from_number(v as f64))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
            self.push(T::from_str(v))
        }
    }

    let mut out = Vec::with_capacity(limit.min(raw.get().len() / 2 + 1));
    let mut d = serde_json::Deserializer::from_str(raw.get());
    Flat {
        out: &mut out,
        limit,
    }
    .deserialize(&mut d)
    .and_then(|()| d.end())
    .map_err(|e| bad(format!("{at}: {e}")))?;
    Ok(out)
}

/// At most 40 characters of client text, for error messages.
fn short(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::HeaderValue;
    use serde_json::{Value, json};

    use super::*;

    /// A model of 1 × 2 × 2 inputs, batches of up to 8.
    const E: Expect = Expect {
        input: [1, 2, 2],
        max_batch: 8,
    };

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
        let d = parse(&body, Some(n), E).unwrap();
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
            parse(&body, Some(n), E).unwrap(),
            parse(&json_body, None, E).unwrap(),
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
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [1, 2]}]}),
                "needs 4",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [1, 2]}]}),
                "takes [N, 1, 2, 2]",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [1, 2, 3, 4, 5]}]}),
                "more than the 4 elements",
            ),
            (
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [1, "2", 3, 4]}]}),
                "must hold numbers",
            ),
            (
                json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA==", "AA==", "AA=="]}]}),
                "more than the 2 elements",
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
            let e = parse(&body, None, E).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
        // Over --max-batch: refused before any data is read.
        let body: Bytes = serde_json::to_vec(
            &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [9], "data": "x"}]}),
        )
        .unwrap()
        .into();
        assert!(matches!(parse(&body, None, E), Err(ApiError::TooLarge(_))));
        // Long client text is cut in messages.
        let name = "n".repeat(10_000);
        let body: Bytes = serde_json::to_vec(
            &json!({"inputs": [{"name": name, "datatype": "FP32", "shape": [1], "data": [1]}]}),
        )
        .unwrap()
        .into();
        assert!(parse(&body, None, E).unwrap_err().to_string().len() < 300);
        // A header length past the body, and bytes nobody accounts for.
        let (body, n) = header_and(
            &json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}),
            b"xx",
        );
        assert!(
            parse(&body, Some(n + 10), E)
                .unwrap_err()
                .to_string()
                .contains("only")
        );
        assert!(
            parse(&body, Some(n), E)
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
