//! Pictures of tensors: colormaps, grids of channel maps with 1-px
//! separators and optional labels, titled sheets, PNG and `.npy` encoding.
//!
//! Colormaps come from `colorgrad`: its viridis and magma presets, and jet
//! built with its gradient builder from matplotlib's definition of jet (the
//! per-channel breakpoints of `_jet_data`, evaluated at their union, so the
//! linear interpolation between them is exactly matplotlib's). Each is
//! sampled once into a 256-entry lookup table.

use std::sync::OnceLock;

use image::{ImageEncoder, RgbImage};

/// A colormap name of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Colormap {
    /// Black to white.
    Gray,
    /// matplotlib's viridis.
    Viridis,
    /// matplotlib's magma.
    Magma,
    /// matplotlib's jet (also what pytorch-grad-cam overlays use).
    Jet,
    /// ColorBrewer's red-yellow-green, diverging: Captum's colormap for
    /// signed attributions (`sign=all`, 0 in the middle).
    Rdylgn,
}

impl Colormap {
    /// The 256-entry RGB lookup table.
    pub fn lut(self) -> &'static [[u8; 3]; 256] {
        static TABLES: [OnceLock<[[u8; 3]; 256]>; 5] = [const { OnceLock::new() }; 5];
        let i = self as usize;
        TABLES[i].get_or_init(|| build_lut(self))
    }

    /// The colour of `t` in `[0, 1]` (clamped; NaN is drawn as 0).
    pub fn color(self, t: f32) -> [u8; 3] {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        self.lut()[(t * 255.0).round() as usize]
    }
}

fn build_lut(map: Colormap) -> [[u8; 3]; 256] {
    use colorgrad::Gradient;
    let sample = |g: &dyn Gradient| {
        let mut lut = [[0u8; 3]; 256];
        for (i, c) in lut.iter_mut().enumerate() {
            let [r, g2, b, _] = g.at(i as f32 / 255.0).to_rgba8();
            *c = [r, g2, b];
        }
        lut
    };
    match map {
        Colormap::Gray => std::array::from_fn(|i| [i as u8; 3]),
        Colormap::Viridis => sample(&colorgrad::preset::viridis()),
        Colormap::Magma => sample(&colorgrad::preset::magma()),
        Colormap::Jet => sample(&jet()),
        Colormap::Rdylgn => sample(&colorgrad::preset::rd_yl_gn()),
    }
}

/// matplotlib's jet: `_jet_data` gives, per channel, (x, value) breakpoints
/// with linear interpolation between them.
fn jet() -> colorgrad::LinearGradient {
    const RED: &[(f32, f32)] = &[
        (0.0, 0.0),
        (0.35, 0.0),
        (0.66, 1.0),
        (0.89, 1.0),
        (1.0, 0.5),
    ];
    const GREEN: &[(f32, f32)] = &[
        (0.0, 0.0),
        (0.125, 0.0),
        (0.375, 1.0),
        (0.64, 1.0),
        (0.91, 0.0),
        (1.0, 0.0),
    ];
    const BLUE: &[(f32, f32)] = &[
        (0.0, 0.5),
        (0.11, 1.0),
        (0.34, 1.0),
        (0.65, 0.0),
        (1.0, 0.0),
    ];
    fn at(points: &[(f32, f32)], x: f32) -> f32 {
        let i = points
            .iter()
            .rposition(|&(p, _)| p <= x)
            .unwrap_or(0)
            .min(points.len() - 2);
        let ((x0, y0), (x1, y1)) = (points[i], points[i + 1]);
        y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    }
    let mut xs: Vec<f32> = RED
        .iter()
        .chain(GREEN)
        .chain(BLUE)
        .map(|&(x, _)| x)
        .collect();
    xs.sort_by(f32::total_cmp);
    xs.dedup();
    let colors: Vec<colorgrad::Color> = xs
        .iter()
        .map(|&x| colorgrad::Color::new(at(RED, x), at(GREEN, x), at(BLUE, x), 1.0))
        .collect();
    colorgrad::GradientBuilder::new()
        .colors(&colors)
        .domain(&xs)
        .build::<colorgrad::LinearGradient>()
        .expect("jet's breakpoints are sorted and in [0, 1]")
}

/// An RGB drawing surface.
pub struct Canvas {
    img: RgbImage,
}

/// Separator and background colour: white, as between matplotlib subplots.
const BACKGROUND: [u8; 3] = [255, 255, 255];
/// Text colour.
const INK: [u8; 3] = [40, 40, 40];
/// Size of sheet text (titles and tile labels), in pixels.
pub const TEXT_PX: f32 = 11.0;
/// Height of a text line: the glyphs at [`TEXT_PX`] and their descenders.
pub const LINE: u32 = 13;

impl Canvas {
    /// A white canvas.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            img: RgbImage::from_pixel(width.max(1), height.max(1), image::Rgb(BACKGROUND)),
        }
    }

    /// Draws a `h × w` map of values already scaled to `[0, 1]`, each value
    /// a `scale × scale` block, with its top-left corner at `(x, y)`.
    pub fn map(
        &mut self,
        (x, y): (u32, u32),
        values: &[f32],
        (h, w): (usize, usize),
        scale: u32,
        cmap: Colormap,
    ) {
        for r in 0..h {
            for c in 0..w {
                let rgb = cmap.color(values[r * w + c]);
                self.fill(
                    x + c as u32 * scale,
                    y + r as u32 * scale,
                    scale,
                    scale,
                    rgb,
                );
            }
        }
    }

    /// Draws an RGB map (three `[0, 1]` planes) the same way.
    pub fn map_rgb(
        &mut self,
        (x, y): (u32, u32),
        planes: [&[f32]; 3],
        (h, w): (usize, usize),
        scale: u32,
    ) {
        for r in 0..h {
            for c in 0..w {
                let v = |p: &[f32]| (p[r * w + c].clamp(0.0, 1.0) * 255.0).round() as u8;
                self.fill(
                    x + c as u32 * scale,
                    y + r as u32 * scale,
                    scale,
                    scale,
                    [v(planes[0]), v(planes[1]), v(planes[2])],
                );
            }
        }
    }

    /// Fills a rectangle, clipped to the canvas.
    pub fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: [u8; 3]) {
        for yy in y..(y + h).min(self.img.height()) {
            for xx in x..(x + w).min(self.img.width()) {
                self.img.put_pixel(xx, yy, image::Rgb(rgb));
            }
        }
    }

    /// Writes `s` in the bundled DejaVu Sans at [`TEXT_PX`] with its top at
    /// `y`, antialiased onto what is there, stopping before a glyph that
    /// would pass `max_width` pixels.
    pub fn text(&mut self, x: u32, y: u32, s: &str, max_width: u32) {
        use ab_glyph::{Font, ScaleFont, point};
        let font = crate::charts::font::face().as_scaled(TEXT_PX);
        let baseline = y as f32 + font.ascent();
        let (w, h) = (self.img.width() as i64, self.img.height() as i64);
        for (id, caret, advance) in layout(s) {
            if caret + advance > max_width as f32 {
                break;
            }
            let glyph = id.with_scale_and_position(TEXT_PX, point(x as f32 + caret, baseline));
            let Some(outline) = font.font().outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let px = bounds.min.x as i64 + gx as i64;
                let py = bounds.min.y as i64 + gy as i64;
                if (0..w).contains(&px) && (0..h).contains(&py) {
                    let a = coverage.clamp(0.0, 1.0);
                    let pixel = self.img.get_pixel_mut(px as u32, py as u32);
                    for (c, ink) in pixel.0.iter_mut().zip(INK) {
                        *c = (*c as f32 * (1.0 - a) + ink as f32 * a).round() as u8;
                    }
                }
            });
        }
    }

    /// Width of `s` in pixels as [`Canvas::text`] draws it.
    pub fn text_width(s: &str) -> u32 {
        layout(s)
            .last()
            .map_or(0.0, |(_, caret, advance)| caret + advance)
            .ceil() as u32
    }

    /// Pastes another canvas at `(x, y)`.
    pub fn paste(&mut self, x: u32, y: u32, other: &RgbImage) {
        image::imageops::replace(&mut self.img, other, x as i64, y as i64);
    }

    /// The pixels.
    pub fn image(&self) -> &RgbImage {
        &self.img
    }

    /// PNG bytes.
    pub fn png(&self) -> Vec<u8> {
        encode_png(&self.img)
    }
}

/// Each glyph of `s` at [`TEXT_PX`]: its id, where it starts (kerned) and
/// how far it advances.
fn layout(s: &str) -> impl Iterator<Item = (ab_glyph::GlyphId, f32, f32)> + '_ {
    use ab_glyph::{Font, ScaleFont};
    let font = crate::charts::font::face().as_scaled(TEXT_PX);
    let mut caret = 0.0f32;
    let mut previous = None;
    s.chars().map(move |ch| {
        let id = font.glyph_id(ch);
        if let Some(p) = previous {
            caret += font.kern(p, id);
        }
        let at = caret;
        let advance = font.h_advance(id);
        caret += advance;
        previous = Some(id);
        (id, at, advance)
    })
}

/// PNG bytes of an RGB image.
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("encoding an in-memory RGB image as PNG cannot fail");
    out
}

/// Scales values to `[0, 1]` by `(v − min) / (max − min)`; a constant map
/// becomes all zeros rather than NaN.
pub fn min_max(values: &[f32]) -> Vec<f32> {
    let (lo, hi) = range(values);
    scale_to(values, lo, hi)
}

/// `(min, max)` of finite values.
pub fn range(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Scales values with a given range.
pub fn scale_to(values: &[f32], lo: f32, hi: f32) -> Vec<f32> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || !span.is_finite() {
        return vec![0.0; values.len()];
    }
    values.iter().map(|&v| (v - lo) / span).collect()
}

/// How to lay out a grid of maps.
#[derive(Debug, Clone, Copy)]
pub struct GridStyle {
    /// Colormap of single-channel tiles.
    pub colormap: Colormap,
    /// Integer upsampling of each map value.
    pub scale: u32,
    /// Index labels above each tile.
    pub labels: bool,
}

/// A tile of the grid: its label and either one `[0, 1]` map or three planes.
pub struct Tile {
    /// Shown above the tile when labels are on.
    pub label: String,
    /// One plane (colormapped) or three (RGB).
    pub planes: Vec<Vec<f32>>,
}

/// A near-square grid of `h × w` tiles with 1-px white separators.
pub fn grid(tiles: &[Tile], h: usize, w: usize, style: GridStyle) -> Canvas {
    let n = tiles.len().max(1);
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = (n as u32).div_ceil(cols);
    let label_h = if style.labels { LINE } else { 0 };
    let (tw, th) = (w as u32 * style.scale, h as u32 * style.scale + label_h);
    let mut canvas = Canvas::new(cols * tw + (cols + 1), rows * th + (rows + 1));
    for (i, tile) in tiles.iter().enumerate() {
        let (r, c) = (i as u32 / cols, i as u32 % cols);
        let (x, y) = (1 + c * (tw + 1), 1 + r * (th + 1));
        if style.labels {
            canvas.text(x + 1, y + 1, &tile.label, tw.saturating_sub(1));
        }
        match tile.planes.as_slice() {
            [p] => canvas.map((x, y + label_h), p, (h, w), style.scale, style.colormap),
            [r, g, b] => canvas.map_rgb((x, y + label_h), [r, g, b], (h, w), style.scale),
            _ => {}
        }
    }
    canvas
}

/// One row of labelled `h × w` maps (a cascade of steps), each `scale`
/// times its size, each label above its map cut to the map's width, with
/// 1-px white separators.
pub fn strip(tiles: &[Tile], h: usize, w: usize, scale: u32, cmap: Colormap) -> Canvas {
    let tw = (w as u32 * scale).max(1);
    let th = h as u32 * scale + LINE;
    let n = tiles.len().max(1) as u32;
    let mut canvas = Canvas::new(n * tw + (n + 1), th + 2);
    for (i, tile) in tiles.iter().enumerate() {
        let x = 1 + i as u32 * (tw + 1);
        canvas.text(x + 1, 1, &tile.label, tw.saturating_sub(1));
        if let [p] = tile.planes.as_slice() {
            canvas.map((x, 1 + LINE), p, (h, w), scale, cmap);
        }
    }
    canvas
}

/// What a sheet's colours mean, drawn in a footer under it: the colormap
/// from its low end to its high end, and what the ends are.
pub struct Legend {
    /// The colormap of the tiles; `None` for RGB tiles (no bar, only the caption).
    pub colormap: Option<Colormap>,
    /// Text at the bar's low end (`-2.31`, `min`).
    pub low: String,
    /// Text at its high end.
    pub high: String,
    /// What the range is: `per-channel min–max`, `layer range`.
    pub caption: String,
}

/// Height of the legend footer.
const LEGEND_H: u32 = LINE * 2 + 14;
/// Width of the legend's colour bar.
const BAR_W: u32 = 128;

/// `sheet` with `legend` as a footer below it. The sheet's pixels keep
/// their positions (the footer only adds rows, and columns when the sheet
/// is narrower than the legend).
pub fn with_legend(sheet: Canvas, legend: &Legend) -> Canvas {
    let (low_w, high_w) = (
        Canvas::text_width(&legend.low),
        Canvas::text_width(&legend.high),
    );
    let bar = if legend.colormap.is_some() { BAR_W } else { 0 };
    let row = low_w + 6 + bar + 6 + high_w;
    let caption_w = Canvas::text_width(&legend.caption);
    let width = sheet.image().width().max(row.max(caption_w) + 8);
    let top = sheet.image().height();
    let mut out = Canvas::new(width, top + LEGEND_H);
    out.paste(0, 0, sheet.image());
    let y = top + 6;
    if let Some(cmap) = legend.colormap {
        out.text(4, y, &legend.low, low_w + 1);
        let bx = 4 + low_w + 6;
        for i in 0..BAR_W {
            let rgb = cmap.color(i as f32 / (BAR_W - 1) as f32);
            out.fill(bx + i, y + 1, 1, LINE - 3, rgb);
        }
        out.text(bx + BAR_W + 6, y, &legend.high, high_w + 1);
    }
    out.text(4, y + LINE + 2, &legend.caption, width.saturating_sub(8));
    out
}

/// A number for a legend end: 3 significant digits.
pub fn legend_number(v: f32) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.2e}")
    } else {
        let digits = (2 - a.max(1e-9).log10().floor() as i32).clamp(0, 6) as usize;
        format!("{v:.digits$}")
    }
}

/// The default upsampling: small maps grow to about 48 px a side, at most ×16.
pub fn auto_scale(h: usize, w: usize) -> u32 {
    (48 / h.max(w).max(1)).clamp(1, 16) as u32
}

/// Samples an `h × w` map at a fractional position with OpenCV's bilinear
/// rule (`cv2.resize`, `INTER_LINEAR`): pixel centres at +0.5, clamped at
/// the borders — what pytorch-grad-cam uses to bring a CAM to image size.
fn bilinear(map: &[f32], (h, w): (usize, usize), fy: f64, fx: f64) -> f32 {
    let fy = fy.clamp(0.0, (h - 1) as f64);
    let fx = fx.clamp(0.0, (w - 1) as f64);
    let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (ty, tx) = ((fy - y0 as f64) as f32, (fx - x0 as f64) as f32);
    let at = |y: usize, x: usize| map[y * w + x];
    let top = at(y0, x0) * (1.0 - tx) + at(y0, x1) * tx;
    let bottom = at(y1, x0) * (1.0 - tx) + at(y1, x1) * tx;
    top * (1.0 - ty) + bottom * ty
}

/// A `[0, 1]` map drawn over `region = (x, y, width, height)` of `image`:
/// bilinearly upsampled, coloured, blended as `alpha·heat + (1 − alpha)·image`.
/// Pixels outside the region (cut off by the model's center crop) keep the image.
pub fn overlay(
    image: &RgbImage,
    map: &[f32],
    size: (usize, usize),
    region: (f64, f64, f64, f64),
    alpha: f32,
    cmap: Colormap,
) -> RgbImage {
    let (rx, ry, rw, rh) = region;
    let (h, w) = size;
    let mut out = image.clone();
    for (px, py, pixel) in out.enumerate_pixels_mut() {
        let (cx, cy) = (px as f64 + 0.5 - rx, py as f64 + 0.5 - ry);
        if cx < 0.0 || cy < 0.0 || cx > rw || cy > rh {
            continue;
        }
        let v = bilinear(
            map,
            size,
            cy * h as f64 / rh - 0.5,
            cx * w as f64 / rw - 0.5,
        );
        let heat = cmap.color(v);
        for (out, h) in pixel.0.iter_mut().zip(heat) {
            *out = (alpha * h as f32 + (1.0 - alpha) * *out as f32)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// A `[0, 1]` map upsampled bilinearly to `out_w × out_h` and coloured.
pub fn heatmap(
    map: &[f32],
    size: (usize, usize),
    (out_w, out_h): (u32, u32),
    cmap: Colormap,
) -> RgbImage {
    let (h, w) = size;
    RgbImage::from_fn(out_w, out_h, |px, py| {
        let fy = (py as f64 + 0.5) * h as f64 / out_h as f64 - 0.5;
        let fx = (px as f64 + 0.5) * w as f64 / out_w as f64 - 0.5;
        image::Rgb(cmap.color(bilinear(map, size, fy, fx)))
    })
}

/// A version-1.0 `.npy` file of little-endian float32 values.
pub fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with
    // spaces and ended by a newline to a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_text_is_the_bundled_font_antialiased() {
        let mut c = Canvas::new(120, LINE);
        c.text(0, 0, "conv2 7", 120);
        let inked: Vec<[u8; 3]> = c
            .image()
            .pixels()
            .map(|p| p.0)
            .filter(|p| *p != BACKGROUND)
            .collect();
        assert!(!inked.is_empty(), "nothing drawn");
        // A bitmap font has two colours; DejaVu's outlines give the edges
        // every shade between ink and paper.
        let shades: std::collections::HashSet<u8> = inked.iter().map(|p| p[0]).collect();
        assert!(shades.len() > 8, "{} shades", shades.len());
        // Its extent is DejaVu Sans' advances at TEXT_PX, not 8 px a character.
        let right = (0..120)
            .rev()
            .find(|&x| (0..LINE).any(|y| c.image().get_pixel(x, y).0 != BACKGROUND))
            .unwrap();
        let width = Canvas::text_width("conv2 7");
        assert!(
            right < width && right + 4 >= width,
            "ink ends at {right}, advance {width}"
        );
        assert_ne!(width, 8 * 7);
        // Text stops before a glyph that would pass the width it is given.
        let mut narrow = Canvas::new(120, LINE);
        narrow.text(0, 0, "conv2 7", 20);
        assert!(
            (20..120).all(|x| (0..LINE).all(|y| narrow.image().get_pixel(x, y).0 == BACKGROUND))
        );
    }

    #[test]
    fn a_legend_keeps_the_sheet_where_it_was() {
        let mut sheet = Canvas::new(50, 30);
        sheet.fill(3, 4, 5, 6, [1, 2, 3]);
        let legend = Legend {
            colormap: Some(Colormap::Viridis),
            low: "-1.5".into(),
            high: "2.25".into(),
            caption: "one range".into(),
        };
        let out = with_legend(sheet, &legend);
        assert_eq!(out.image().height(), 30 + LEGEND_H);
        assert!(
            out.image().width() > 50,
            "the legend is wider than the sheet"
        );
        assert_eq!(out.image().get_pixel(3, 4).0, [1, 2, 3]);
        assert_eq!(out.image().get_pixel(8, 4).0, BACKGROUND);
        // The bar runs from the colormap's low end to its high end.
        let y = 30 + 6 + 2;
        let bx = 4 + Canvas::text_width("-1.5") + 6;
        assert_eq!(out.image().get_pixel(bx, y).0, Colormap::Viridis.color(0.0));
        assert_eq!(
            out.image().get_pixel(bx + BAR_W - 1, y).0,
            Colormap::Viridis.color(1.0)
        );
        assert_eq!(legend_number(0.000123), "1.23e-4");
        assert_eq!(legend_number(-2.3456), "-2.35");
        assert_eq!(legend_number(123.456), "123");
    }

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let bytes = npy(&[2, 3], &[0.0; 6]);
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"));
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + len + 24);
    }

    #[test]
    fn jet_runs_dark_blue_to_dark_red_through_green() {
        let lut = Colormap::Jet.lut();
        assert_eq!(lut[0], [0, 0, 128]);
        assert_eq!(lut[255], [128, 0, 0]);
        let mid = lut[128];
        assert!(mid[1] > 200 && mid[0] > 100 && mid[2] > 100, "{mid:?}");
    }

    #[test]
    fn bilinear_matches_opencv_on_a_two_by_two_upsample() {
        // cv2.resize(np.float32([[0, 1], [2, 3]]), (4, 4)) first row: 0, .25, .75, 1
        let map = [0.0, 1.0, 2.0, 3.0];
        let row: Vec<f32> = (0..4)
            .map(|x| bilinear(&map, (2, 2), -0.25, (x as f64 + 0.5) * 0.5 - 0.5))
            .collect();
        assert_eq!(row, [0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn gray_is_the_identity_and_constant_maps_do_not_make_nan() {
        assert_eq!(Colormap::Gray.color(0.5), [128; 3]);
        assert_eq!(min_max(&[3.0, 3.0]), [0.0, 0.0]);
        assert_eq!(min_max(&[1.0, 3.0]), [0.0, 1.0]);
    }

    #[test]
    fn a_grid_of_five_tiles_is_three_by_two_with_separators() {
        let tiles: Vec<Tile> = (0..5)
            .map(|i| Tile {
                label: i.to_string(),
                planes: vec![vec![1.0; 4]],
            })
            .collect();
        let c = grid(
            &tiles,
            2,
            2,
            GridStyle {
                colormap: Colormap::Gray,
                scale: 3,
                labels: false,
            },
        );
        assert_eq!(
            (c.image().width(), c.image().height()),
            (3 * 6 + 4, 2 * 6 + 3)
        );
    }
}
