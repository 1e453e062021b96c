//! The confusion matrix of an evaluation: true classes down, predicted
//! across, class names on both axes (turned upright when they are wider
//! than a cell), each cell's count in it where it fits, coloured by the
//! fraction of its row (the true class) with a colour bar saying so.
//! Cells shrink with the class count; 100 classes stay legible at the
//! default size.

use model_store::train::Evaluation;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Chart, text};
use crate::render::Colormap;

/// What the matrix chart shows.
pub struct ConfusionChart<'a> {
    /// The scores (matrix, classes, accuracy).
    pub evaluation: &'a Evaluation,
    /// What was evaluated: the model and the dataset.
    pub title: String,
}

/// Side of a cell at scale 1 by default: large for a few classes, 12 px
/// at 100.
fn default_cell(k: usize) -> f64 {
    (640.0 / k.max(1) as f64).clamp(12.0, 56.0)
}

/// Estimated width of `s` at `px` (DejaVu Sans averages about 0.6 em).
fn rough_width(s: &str, px: f64) -> f64 {
    s.chars().count() as f64 * px * 0.62
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

impl Chart for ConfusionChart<'_> {
    fn default_size(&self) -> (u32, u32) {
        let k = self.evaluation.classes.len().max(1);
        let cell = default_cell(k);
        let font = (cell * 0.75).clamp(9.0, 14.0);
        let widest = self
            .evaluation
            .classes
            .iter()
            .map(|c| rough_width(c, font))
            .fold(0.0, f64::max);
        let side = cell * k as f64;
        let labels_below = if widest > cell { widest } else { font * 1.4 };
        let w = 60.0 + widest + 12.0 + side + 110.0;
        let h = 60.0 + side + 12.0 + labels_below + 50.0;
        (w.ceil() as u32, h.ceil() as u32)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        s: f64,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let e = self.evaluation;
        let k = e.classes.len().max(1);
        let (w, h) = root.dim_in_pixel();
        let (w, h) = (w as f64, h as f64);

        // Layout: title, then the matrix with the y labels left of it, the
        // x labels below it and the colour bar right of it.
        let title_h = 52.0 * s;
        let axis_title = 30.0 * s;
        let bar_w = 110.0 * s;
        let pad = 8.0 * s;
        let mut font = (default_cell(k) * 0.75).clamp(9.0, 14.0) * s;
        let mut cell = 0.0;
        for _ in 0..2 {
            let style = text(font / s, s);
            let widest = e
                .classes
                .iter()
                .map(|c| root.estimate_text_size(c, &style).map(|(w, _)| w as f64))
                .try_fold(0.0f64, |m, w| w.map(|w| m.max(w)))?;
            let below = |cell: f64| if widest > cell { widest } else { font * 1.4 };
            let across = (w - axis_title - widest - pad - bar_w - pad) / k as f64;
            // The cell must also leave room for the labels below the matrix.
            let mut c = across.min((h - title_h - pad - below(across) - axis_title) / k as f64);
            // Whole pixels: every cell and grid line the same on screen.
            c = c.floor().max(1.0);
            cell = c;
            let fits = (c * 0.8).max(6.0 * s);
            if fits >= font {
                break;
            }
            font = fits;
        }
        let label_style = text(font / s, s);
        let widest = e
            .classes
            .iter()
            .map(|c| {
                root.estimate_text_size(c, &label_style)
                    .map(|(w, _)| w as f64)
            })
            .try_fold(0.0f64, |m, w| w.map(|w| m.max(w)))?;
        let x0 = axis_title + widest + pad;
        let y0 = title_h;
        let side = cell * k as f64;
        let at = |v: f64| v.round() as i32;

        root.draw(&Text::new(
            format!(
                "{}: {} images, accuracy {:.2}%",
                self.title,
                e.count,
                e.accuracy * 100.0
            ),
            (at(x0), at(14.0 * s)),
            text(18.0, s),
        ))?;

        // The cells, coloured by their row's fraction, counts where they fit:
        // one rectangle in the colour of 0, then only the cells that are not
        // (a matrix of many classes is mostly empty).
        root.draw(&Rectangle::new(
            [(at(x0), at(y0)), (at(x0 + side), at(y0 + side))],
            rgb(Colormap::Viridis.color(0.0)).filled(),
        ))?;
        let count_px = (cell * 0.38).min(13.0 * s);
        let counts_fit = count_px >= 7.0 * s;
        for (i, row) in e.confusion_matrix.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            for (j, &n) in row.iter().enumerate().filter(|(_, n)| **n > 0) {
                let v = n as f64 / total;
                let c = Colormap::Viridis.color(v as f32);
                let (cx, cy) = (x0 + j as f64 * cell, y0 + i as f64 * cell);
                root.draw(&Rectangle::new(
                    [(at(cx), at(cy)), (at(cx + cell), at(cy + cell))],
                    rgb(c).filled(),
                ))?;
                if counts_fit {
                    // Light digits on viridis' dark end, dark ones on its light end.
                    let luma = 0.299 * c[0] as f64 + 0.587 * c[1] as f64 + 0.114 * c[2] as f64;
                    let ink: &'static RGBColor = if luma < 140.0 { &WHITE } else { &BLACK };
                    root.draw(&Text::new(
                        n.to_string(),
                        (at(cx + cell / 2.0), at(cy + cell / 2.0)),
                        text(count_px / s, s)
                            .color(ink)
                            .pos(Pos::new(HPos::Center, VPos::Center)),
                    ))?;
                }
            }
        }
        // Thin grid lines between cells once they are big enough to see.
        if cell >= 10.0 * s {
            let grid = RGBColor(255, 255, 255).stroke_width(1);
            for i in 0..=k {
                let p = i as f64 * cell;
                root.draw(&PathElement::new(
                    vec![(at(x0), at(y0 + p)), (at(x0 + side), at(y0 + p))],
                    grid,
                ))?;
                root.draw(&PathElement::new(
                    vec![(at(x0 + p), at(y0)), (at(x0 + p), at(y0 + side))],
                    grid,
                ))?;
            }
        }

        // Class names: right-aligned left of the rows; below the columns,
        // upright when wider than a cell.
        let upright = widest > cell;
        for (i, name) in e.classes.iter().enumerate() {
            let mid = i as f64 * cell + cell / 2.0;
            root.draw(&Text::new(
                name.clone(),
                (at(x0 - pad / 2.0), at(y0 + mid)),
                label_style.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            let style = if upright {
                label_style
                    .transform(FontTransform::Rotate270)
                    .pos(Pos::new(HPos::Right, VPos::Center))
            } else {
                label_style.pos(Pos::new(HPos::Center, VPos::Top))
            };
            root.draw(&Text::new(
                name.clone(),
                (at(x0 + mid), at(y0 + side + pad / 2.0)),
                style,
            ))?;
        }
        let below = if upright { widest } else { font * 1.4 };
        let axis = text(15.0, s);
        root.draw(&Text::new(
            "predicted class",
            (at(x0 + side / 2.0), at(y0 + side + pad + below + 4.0 * s)),
            axis.pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        root.draw(&Text::new(
            "true class",
            (at(axis_title / 2.0), at(y0 + side / 2.0)),
            axis.transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;

        // The colour bar: what a cell's colour means.
        let bx = x0 + side + 16.0 * s;
        let bw = 16.0 * s;
        let bh = side.max(60.0 * s);
        let steps = 64;
        for t in 0..steps {
            let v = 1.0 - t as f64 / steps as f64;
            let c = Colormap::Viridis.color(v as f32);
            let ya = y0 + bh * t as f64 / steps as f64;
            let yb = y0 + bh * (t + 1) as f64 / steps as f64;
            root.draw(&Rectangle::new(
                [(at(bx), at(ya)), (at(bx + bw), at(yb.ceil()))],
                rgb(c).filled(),
            ))?;
        }
        root.draw(&Rectangle::new(
            [(at(bx), at(y0)), (at(bx + bw), at(y0 + bh))],
            RGBColor(120, 120, 120).stroke_width(1),
        ))?;
        let tick = text(12.0, s);
        for (v, label) in [(1.0, "100%"), (0.5, "50%"), (0.0, "0%")] {
            root.draw(&Text::new(
                label,
                (at(bx + bw + 4.0 * s), at(y0 + bh * (1.0 - v))),
                tick.pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        root.draw(&Text::new(
            "share of the true class",
            (at(bx + bw + 50.0 * s), at(y0 + bh / 2.0)),
            text(12.0, s)
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charts::{ChartParams, Format, render};

    fn evaluation(k: usize, name: impl Fn(usize) -> String) -> Evaluation {
        // A diagonal with some confusion into the next class.
        let matrix: Vec<Vec<u64>> = (0..k)
            .map(|i| {
                (0..k)
                    .map(|j| {
                        if i == j {
                            8
                        } else if j == (i + 1) % k {
                            2
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect();
        Evaluation {
            accuracy: 0.8,
            count: 10 * k,
            confusion_matrix: matrix,
            per_class: Vec::new(),
            classes: (0..k).map(name).collect(),
        }
    }

    #[test]
    fn a_hundred_classes_draw_within_a_second_in_both_formats() {
        let e = evaluation(100, |i| format!("{i:02}"));
        let chart = ConfusionChart {
            evaluation: &e,
            title: "t".into(),
        };
        for format in [Format::Png, Format::Svg] {
            let started = std::time::Instant::now();
            let drawn = render(&chart, &ChartParams::default(), format).unwrap();
            let took = started.elapsed();
            eprintln!(
                "100-class confusion matrix, {format:?}: {took:?}, {} bytes",
                drawn.bytes.len()
            );
            assert!(
                took < std::time::Duration::from_secs(1),
                "{format:?} took {took:?}"
            );
        }
    }

    #[test]
    fn one_class_and_a_thousand_classes_draw_at_their_default_size() {
        for k in [1, 1000] {
            let e = evaluation(k, |i| format!("c{i}"));
            let chart = ConfusionChart {
                evaluation: &e,
                title: "t".into(),
            };
            let png = render(&chart, &ChartParams::default(), Format::Png).unwrap();
            let img = image::load_from_memory(&png.bytes).unwrap();
            assert!((200..=4096).contains(&img.width()), "{k}: {}", img.width());
            // Only the cells that are not zero are drawn one by one.
            let svg = render(&chart, &ChartParams::default(), Format::Svg).unwrap();
            let rects = String::from_utf8(svg.bytes)
                .unwrap()
                .matches("<rect")
                .count();
            assert!(rects < 3 * k + 100, "{k} classes: {rects} rectangles");
        }
    }

    #[test]
    fn long_names_stand_upright_and_short_ones_lie_flat() {
        // Measured the same way the chart measures them.
        let long = evaluation(10, |i| format!("automobile-{i}"));
        let short = evaluation(10, |i| i.to_string());
        let mut rotated = Vec::new();
        for (e, wide) in [(&long, true), (&short, false)] {
            let chart = ConfusionChart {
                evaluation: e,
                title: "t".into(),
            };
            let (w, h) = chart.default_size();
            // Upright labels take their length below the matrix; flat ones a line.
            let side = default_cell(10) * 10.0;
            let below = h as f64 - 60.0 - side - 12.0 - 50.0;
            assert_eq!(below > 30.0, wide, "{w}×{h}");
            let drawn = render(&chart, &ChartParams::default(), Format::Svg).unwrap();
            let svg = String::from_utf8(drawn.bytes).unwrap();
            rotated.push(svg.matches("rotate(").count());
        }
        // The axis title and the colour bar's caption stand upright in both;
        // the ten column labels only where they are long.
        assert_eq!(rotated, [12, 2]);
    }
}
