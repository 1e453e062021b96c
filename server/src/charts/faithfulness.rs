//! Deletion and insertion curves (Petsiuk et al. 2018): the class
//! probability as the pixels an explanation ranks highest are removed
//! (deletion: a faithful map makes it fall fast) or restored into a blurred
//! image (insertion: rise fast), one line per method with its area.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Chart, SERIES, text};

/// One method's curves.
pub struct MethodCurves {
    /// The method's name.
    pub method: String,
    /// Deletion: the probability at each fraction, and its area.
    pub deletion: Option<(Vec<f32>, f32)>,
    /// Insertion: the same.
    pub insertion: Option<(Vec<f32>, f32)>,
}

/// What a faithfulness plot shows.
pub struct FaithfulnessChart {
    /// The title: the model, the image's class.
    pub title: String,
    /// One entry per method, in the request's order.
    pub methods: Vec<MethodCurves>,
}

impl Chart for FaithfulnessChart {
    fn default_size(&self) -> (u32, u32) {
        (1100, 480)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        s: f64,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let root = root.titled(&self.title, text(20.0, s))?;
        let panels: Vec<(&str, bool)> = [("deletion", false), ("insertion", true)]
            .into_iter()
            .filter(|&(_, ins)| {
                self.methods.iter().any(|m| {
                    if ins {
                        m.insertion.is_some()
                    } else {
                        m.deletion.is_some()
                    }
                })
            })
            .collect();
        if panels.is_empty() {
            return Ok(());
        }
        let across = ((root.dim_in_pixel().0 as f64 / (300.0 * s)) as usize).clamp(1, panels.len());
        let areas = root.split_evenly((panels.len().div_ceil(across), across));
        let px = |v: f64| (v * s).round() as u32;
        for (area, &(name, insertion)) in areas.iter().zip(&panels) {
            let caption = if insertion {
                "insertion: pixels restored into the blurred image, highest first (higher area is better)"
            } else {
                "deletion: pixels removed, highest first (lower area is better)"
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, text(14.0, s))
                .margin(px(12.0))
                .x_label_area_size(px(44.0))
                .y_label_area_size(px(60.0))
                .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
            chart
                .configure_mesh()
                .x_desc(format!("fraction of pixels ({name})"))
                .y_desc("class probability")
                .x_label_formatter(&|v| format!("{:.0}%", v * 100.0))
                .y_label_formatter(&|v| format!("{v:.1}"))
                .label_style(text(13.0, s))
                .axis_desc_style(text(14.0, s))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            for (i, m) in self.methods.iter().enumerate() {
                let curve = if insertion { &m.insertion } else { &m.deletion };
                let Some((ys, area)) = curve else { continue };
                let color = SERIES[i % SERIES.len()];
                let style = color.stroke_width(px(2.0).max(1));
                let n = (ys.len().max(2) - 1) as f64;
                let points: Vec<(f64, f64)> = ys
                    .iter()
                    .enumerate()
                    .map(|(k, &y)| (k as f64 / n, y as f64))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points, style))?
                    .label(format!("{} (area {area:.3})", m.method))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + px(20.0) as i32, y)], style)
                    });
            }
            // Deletion falls from the top left, insertion rises to the top right.
            let corner = if insertion {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            };
            super::training::legend(&mut chart, s, corner)?;
        }
        Ok(())
    }
}
