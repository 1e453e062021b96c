//! From uploaded bytes to the network's input tensor, exactly as the manifest
//! says and as torchvision would do it.
//!
//! - Decoding: PNG, JPEG, BMP, WebP, GIF (first frame). The header is read
//!   first and an image over the pixel limit is refused before any pixel
//!   buffer is allocated.
//! - Channels: 3 → RGB (alpha dropped, as PIL's `convert("RGB")`); 1 → PIL's
//!   `convert("L")` integer formula `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16`,
//!   so a colour image reaches an MNIST model as it would in torchvision.
//! - `resize` (shorter side, torchvision's `int(size · long / short)` for the
//!   other side): bilinear with a triangle filter widened when downscaling
//!   (antialiased, like PIL's bilinear); close to PIL but not bit-identical.
//!   An image already at the target size is not touched.
//! - `center_crop`: torchvision's offsets, `round((h − th) / 2)` with
//!   Python's round-half-to-even.
//! - Values: `(p / 255 − mean) / std` in `f32`, the same operations in the
//!   same order as `ToTensor()` + `Normalize`, so with no resize the input is
//!   bit-identical to PyTorch's.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView, ImageReader, imageops::FilterType};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// Bounds applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted width × height of an uploaded image.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
        }
    }
}

/// Decodes image bytes, refusing oversized images from their header alone.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::ImageDecode("the image is empty (0 bytes)".into()));
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::ImageDecode(e.to_string()))?;
        if r.format().is_none() {
            return Err(Error::ImageDecode(
                "unrecognised image format; send PNG, JPEG, BMP, WebP or GIF".into(),
            ));
        }
        Ok(r)
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| Error::ImageDecode(e.to_string()))?;
    let pixels = w as u64 * h as u64;
    if pixels == 0 {
        return Err(Error::ImageDecode(format!(
            "the image is {w}x{h}: it has no pixels"
        )));
    }
    if pixels > limits.max_pixels {
        return Err(Error::ImageInput(format!(
            "the image is {w}x{h} = {pixels} pixels; the limit is {} pixels: downscale it first",
            limits.max_pixels
        )));
    }
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    // RGBA f32 of the declared size is the most any decoder here needs.
    l.max_alloc = Some((pixels * 16).max(1 << 20));
    r.limits(l);
    r.decode().map_err(|e| Error::ImageDecode(e.to_string()))
}

/// Whether the bytes start like an image format we decode (a cheap sniff,
/// for bodies sent without a usable Content-Type).
pub fn looks_like_image(bytes: &[u8]) -> bool {
    image::guess_format(bytes).is_ok()
}

/// The model input for one decoded image: `C·H·W` floats in CHW order.
pub fn preprocess(img: &DynamicImage, manifest: &Manifest) -> Result<Vec<f32>> {
    let c = manifest.input.channels;
    let px = pixels(img, manifest)?;
    let plane = px.len() / c.max(1);
    let (mean, std) = manifest.normalisation();
    Ok(px
        .iter()
        .enumerate()
        .map(|(i, &p)| (p as f32 / 255.0 - mean[i / plane]) / std[i / plane])
        .collect())
}

/// The 8-bit pixels of the model input for one decoded image, CHW, before
/// normalisation: channel conversion, resize and crop exactly as inference
/// does them (training on an ImageFolder stores these).
pub fn pixels(img: &DynamicImage, manifest: &Manifest) -> Result<Vec<u8>> {
    let spec = &manifest.input;
    let (mut w, mut h) = img.dimensions();
    // Channel conversion first, on 8-bit data, as PIL's convert() does.
    let mut planes: Vec<image::ImageBuffer<image::Luma<u8>, Vec<u8>>> = if spec.channels == 1 {
        vec![to_pil_luma(img)]
    } else {
        let rgb = img.to_rgb8();
        (0..3)
            .map(|c| {
                image::ImageBuffer::from_fn(w, h, |x, y| image::Luma([rgb.get_pixel(x, y)[c]]))
            })
            .collect()
    };
    let plan = plan(w, h, manifest)?;
    if (plan.resized.0, plan.resized.1) != (w, h) {
        planes = planes
            .iter()
            .map(|p| {
                image::imageops::resize(p, plan.resized.0, plan.resized.1, FilterType::Triangle)
            })
            .collect();
        (w, h) = plan.resized;
    }
    if let Some((left, top, tw, th)) = plan.crop {
        planes = planes
            .iter()
            .map(|p| image::imageops::crop_imm(p, left, top, tw, th).to_image())
            .collect();
        (w, h) = (tw, th);
    }
    if (w as usize, h as usize) != (spec.width, spec.height) {
        let hint = if spec.resize.is_none() {
            " (this model's manifest does not resize)"
        } else {
            ""
        };
        return Err(Error::ImageInput(format!(
            "the image is {w}x{h} but model '{}' takes {}x{} images{hint}; send a {}x{} image",
            manifest.name, spec.width, spec.height, spec.width, spec.height
        )));
    }
    let mut out = Vec::with_capacity(spec.channels * (w * h) as usize);
    for plane in &planes {
        out.extend_from_slice(plane.as_raw());
    }
    Ok(out)
}

/// The geometry of preprocessing one image: the size after `resize`, and
/// the `center_crop` box `(left, top, width, height)` in resized pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// `(width, height)` after the resize (the original size when none).
    pub resized: (u32, u32),
    /// The crop box in resized pixels.
    pub crop: Option<(u32, u32, u32, u32)>,
}

/// Plans the resize and crop of a `width × height` image for `manifest`.
pub fn plan(width: u32, height: u32, manifest: &Manifest) -> Result<Plan> {
    let spec = &manifest.input;
    let (mut w, mut h) = (width, height);
    if let Some(size) = spec.resize {
        let size = size as u32;
        (w, h) = if w <= h {
            (size, (size as u64 * h as u64 / w as u64) as u32)
        } else {
            ((size as u64 * w as u64 / h as u64) as u32, size)
        };
    }
    let crop = match spec.center_crop {
        None => None,
        Some(crop) => {
            let (th, tw) = crop.hw();
            let (th, tw) = (th as u32, tw as u32);
            if th > h || tw > w {
                return Err(Error::ImageInput(format!(
                    "the image is {w}x{h} after resizing, smaller than the model's center crop {tw}x{th}; send a larger image"
                )));
            }
            Some((
                round_half_even((w - tw) as f64 / 2.0),
                round_half_even((h - th) as f64 / 2.0),
                tw,
                th,
            ))
        }
    };
    Ok(Plan {
        resized: (w, h),
        crop,
    })
}

/// The region of the original image that becomes the network input, as
/// `(x, y, width, height)` in original pixels: where a CAM belongs.
pub fn input_region(width: u32, height: u32, manifest: &Manifest) -> Result<(f64, f64, f64, f64)> {
    let p = plan(width, height, manifest)?;
    let sx = p.resized.0 as f64 / width as f64;
    let sy = p.resized.1 as f64 / height as f64;
    let (l, t, cw, ch) = p.crop.unwrap_or((0, 0, p.resized.0, p.resized.1));
    Ok((l as f64 / sx, t as f64 / sy, cw as f64 / sx, ch as f64 / sy))
}

/// A batch given as numbers already preprocessed (the Open Inference
/// Protocol's FP32 input): `shape` must be `[N, C, H, W]` with the model's
/// C, H and W, `values` exactly that many and all finite, since a NaN would
/// only come back as NaN logits with nothing saying why.
pub fn tensor_input(
    values: Vec<f32>,
    shape: &[usize],
    manifest: &Manifest,
    device: &Device,
) -> Result<Tensor> {
    let s = &manifest.input;
    let want = [s.channels, s.height, s.width];
    if shape.len() != 4 || shape[1..] != want || shape[0] == 0 {
        return Err(Error::ImageInput(format!(
            "the input's shape is {shape:?}; this model takes [N, {}, {}, {}] with N >= 1",
            s.channels, s.height, s.width
        )));
    }
    let count: usize = shape.iter().product();
    if values.len() != count {
        return Err(Error::ImageInput(format!(
            "the input has {} values; its shape {shape:?} needs {count}",
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::ImageInput(format!(
            "the input's value at flat index {i} is {}; every value must be finite",
            values[i]
        )));
    }
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Stacks preprocessed images into an `[N, C, H, W]` tensor.
pub fn batch(images: &[Vec<f32>], manifest: &Manifest, device: &Device) -> Result<Tensor> {
    let s = &manifest.input;
    let flat: Vec<f32> = images.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(
        flat,
        (images.len(), s.channels, s.height, s.width),
        device,
    )?)
}

/// PIL's `convert("L")`: ITU-R 601-2 luma with PIL's fixed-point rounding.
fn to_pil_luma(img: &DynamicImage) -> image::ImageBuffer<image::Luma<u8>, Vec<u8>> {
    match img {
        DynamicImage::ImageLuma8(l) => l.clone(),
        DynamicImage::ImageLumaA8(la) => {
            image::ImageBuffer::from_fn(la.width(), la.height(), |x, y| {
                image::Luma([la.get_pixel(x, y)[0]])
            })
        }
        _ => {
            let rgb = img.to_rgb8();
            image::ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
                let [r, g, b] = rgb.get_pixel(x, y).0;
                let l = (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16;
                image::Luma([l as u8])
            })
        }
    }
}

/// Python's `round()`: halves go to the even neighbour.
fn round_half_even(x: f64) -> u32 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        (r - x.signum()) as u32
    } else {
        r as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_input_takes_only_the_models_shape_and_finite_numbers() {
        let manifest = Manifest::from_json(
            br#"{"name": "m", "architecture": "sequential", "layers": [],
                "input": {"channels": 1, "height": 2, "width": 2}, "classes": ["a"]}"#,
        )
        .unwrap();
        let cpu = Device::Cpu;
        let x = tensor_input(vec![1.0; 8], &[2, 1, 2, 2], &manifest, &cpu).unwrap();
        assert_eq!(x.dims(), [2, 1, 2, 2]);
        let refused = |values: Vec<f32>, shape: &[usize], says: &str| {
            let e = tensor_input(values, shape, &manifest, &cpu).unwrap_err();
            assert!(e.to_string().contains(says), "{e} lacks {says:?}");
        };
        refused(vec![1.0; 12], &[1, 3, 2, 2], "[N, 1, 2, 2]");
        refused(vec![], &[0, 1, 2, 2], "N >= 1");
        refused(vec![1.0; 3], &[1, 1, 2, 2], "needs 4");
        refused(vec![1.0, f32::NAN, 0.0, 0.0], &[1, 1, 2, 2], "flat index 1");
    }

    #[test]
    fn python_round_sends_halves_to_even() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
        assert_eq!(round_half_even(3.7), 4);
    }

    #[test]
    fn pil_luma_matches_pil_for_pure_colours() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        let cases = [
            ([255, 0, 0], 76),
            ([0, 255, 0], 150),
            ([0, 0, 255], 29),
            ([255, 255, 255], 255),
        ];
        for (rgb, want) in cases {
            let img =
                DynamicImage::ImageRgb8(image::ImageBuffer::from_pixel(1, 1, image::Rgb(rgb)));
            assert_eq!(to_pil_luma(&img).get_pixel(0, 0)[0], want, "{rgb:?}");
        }
    }

    #[test]
    fn empty_and_garbage_bytes_are_decode_errors() {
        assert!(matches!(
            decode(b"", DecodeLimits::default()),
            Err(Error::ImageDecode(_))
        ));
        assert!(matches!(
            decode(b"hello, world", DecodeLimits::default()),
            Err(Error::ImageDecode(_))
        ));
    }
}
