//! The one font of every picture: DejaVu Sans (Bitstream Vera licence,
//! `server/assets/fonts/LICENSE`), compiled into the binary so that charts
//! and image sheets look the same on every machine, with no system fonts.

use std::sync::Once;

/// The font file.
pub const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family name charts ask plotters for (SVG files name it too; a
/// viewer without DejaVu Sans falls back to its own sans-serif).
pub const FAMILY: &str = "sans-serif";

/// Registers the font with plotters (once per process).
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, plotters::style::FontStyle::Normal, DEJAVU_SANS)
            .is_err()
        {
            panic!("the bundled DejaVu Sans does not parse");
        }
    });
}

/// The font for drawing text straight into image sheets (`render::Canvas`).
pub fn face() -> &'static ab_glyph::FontRef<'static> {
    static FACE: std::sync::OnceLock<ab_glyph::FontRef<'static>> = std::sync::OnceLock::new();
    FACE.get_or_init(|| {
        ab_glyph::FontRef::try_from_slice(DEJAVU_SANS).expect("the bundled DejaVu Sans parses")
    })
}
