//! A training job's curves: the loss at every progress report with the
//! epoch means over it, train and test accuracy per epoch, and the learning
//! rate per epoch when the job has a schedule.

use model_store::train::EpochRecord;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{Chart, SERIES, text};

/// What a training plot shows.
pub struct TrainingChart<'a> {
    /// The title: the job and its model.
    pub title: String,
    /// `[fraction of the job, loss]` at each progress report.
    pub curve: &'a [[f64; 2]],
    /// One record per finished epoch.
    pub history: &'a [EpochRecord],
    /// Epochs the job runs.
    pub epochs: usize,
    /// The learning rate of each epoch (1-based order), when a schedule changes it.
    pub learning_rates: Option<Vec<f64>>,
}

/// Tick text for an epoch axis: whole epochs without decimals.
fn epoch_tick(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

impl Chart for TrainingChart<'_> {
    fn default_size(&self) -> (u32, u32) {
        if self.learning_rates.is_some() {
            (1500, 460)
        } else {
            (1100, 460)
        }
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        s: f64,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let root = root.titled(&self.title, text(20.0, s))?;
        let panels = if self.learning_rates.is_some() { 3 } else { 2 };
        // Side by side while each panel gets 300 px; stacked when the chart
        // is asked to be narrower.
        let across = ((root.dim_in_pixel().0 as f64 / (300.0 * s)) as usize).clamp(1, panels);
        let areas = root.split_evenly((panels.div_ceil(across), across));
        let epochs = self.epochs.max(1) as f64;
        let px = |v: f64| (v * s).round() as u32;
        let line = |c: RGBColor| c.stroke_width(px(2.0).max(1));

        // Loss: every progress report, and the epoch means on top.
        let max_loss = self
            .curve
            .iter()
            .map(|p| p[1])
            .chain(self.history.iter().map(|h| h.loss))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let top = if max_loss > 0.0 { max_loss * 1.08 } else { 1.0 };
        let mut chart = panel(
            &areas[0],
            ("training loss", "loss"),
            (epochs, top),
            &|v| format!("{v:.2}"),
            s,
        )?;
        let reports: Vec<(f64, f64)> = self
            .curve
            .iter()
            .filter(|p| p[1].is_finite())
            .map(|p| (p[0] * epochs, p[1]))
            .collect();
        chart
            .draw_series(LineSeries::new(reports, line(SERIES[0])))?
            .label("running mean within the epoch, per report")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + px(20.0) as i32, y)], line(SERIES[0]))
            });
        // A diverged epoch (NaN or infinite loss) is left out, not drawn at an edge.
        let means: Vec<(f64, f64)> = self
            .history
            .iter()
            .filter(|h| h.loss.is_finite())
            .map(|h| (h.epoch as f64, h.loss))
            .collect();
        chart
            .draw_series(LineSeries::new(means.clone(), line(SERIES[1])))?
            .label("epoch mean")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + px(20.0) as i32, y)], line(SERIES[1]))
            });
        chart.draw_series(
            means
                .iter()
                .map(|&p| Circle::new(p, px(4.0), SERIES[1].filled())),
        )?;
        // Loss falls from the top left: the top right is free for the legend.
        legend(&mut chart, s, SeriesLabelPosition::UpperRight)?;

        // Accuracy per epoch, train and test.
        let last = self
            .history
            .last()
            .map(|h| {
                format!(
                    "accuracy (epoch {}: train {:.2}%, test {:.2}%)",
                    h.epoch,
                    h.train_accuracy * 100.0,
                    h.test_accuracy * 100.0
                )
            })
            .unwrap_or_else(|| "accuracy (no epoch finished yet)".into());
        let mut chart = panel(
            &areas[1],
            (&last, "accuracy (%)"),
            (epochs, 100.0),
            &|v| format!("{v:.0}%"),
            s,
        )?;
        for (name, color, pick) in [
            (
                "train",
                SERIES[0],
                (|h: &EpochRecord| h.train_accuracy) as fn(&EpochRecord) -> f64,
            ),
            ("test", SERIES[2], |h: &EpochRecord| h.test_accuracy),
        ] {
            let points: Vec<(f64, f64)> = self
                .history
                .iter()
                .map(|h| (h.epoch as f64, pick(h) * 100.0))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), line(color)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + px(20.0) as i32, y)], line(color))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, px(4.0), color.filled())),
            )?;
        }
        // Accuracy rises from the bottom left: the bottom right is free.
        legend(&mut chart, s, SeriesLabelPosition::LowerRight)?;

        // The learning rate of each epoch, when a schedule moves it.
        if let Some(rates) = &self.learning_rates {
            let top = rates
                .iter()
                .copied()
                .fold(0.0f64, f64::max)
                .max(f64::MIN_POSITIVE)
                * 1.1;
            let mut chart = panel(
                &areas[2],
                ("learning rate", "learning rate"),
                (epochs, top),
                &|v| format!("{v:.1e}"),
                s,
            )?;
            // Each epoch trains at its rate from its start to its end.
            let steps: Vec<(f64, f64)> = rates
                .iter()
                .enumerate()
                .flat_map(|(i, &r)| [(i as f64, r), (i as f64 + 1.0, r)])
                .collect();
            chart.draw_series(LineSeries::new(steps, line(SERIES[3])))?;
        }
        Ok(())
    }
}

pub(super) type EpochChart<'a, DB> =
    ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One panel: `caption` above, epochs 0..`epochs` across, 0..`top` up with
/// `y_desc` and ticks written by `y_tick`, on a light grid.
fn panel<'a, DB: DrawingBackend + 'a>(
    area: &'a DrawingArea<DB, Shift>,
    (caption, y_desc): (&str, &str),
    (epochs, top): (f64, f64),
    y_tick: &dyn Fn(&f64) -> String,
    s: f64,
) -> Result<EpochChart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
    let px = |v: f64| (v * s).round() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, text(17.0, s))
        .margin(px(12.0))
        .x_label_area_size(px(44.0))
        .y_label_area_size(px(70.0))
        .build_cartesian_2d(0f64..epochs, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_label_formatter(&epoch_tick)
        .y_label_formatter(y_tick)
        .label_style(text(13.0, s))
        .axis_desc_style(text(14.0, s))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    Ok(chart)
}

/// The chart's series names in a box at `position`.
pub(super) fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut EpochChart<'a, DB>,
    s: f64,
    position: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(text(13.0, s))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charts::{ChartParams, Format, render, size};

    fn record(epoch: usize, loss: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            loss,
            train_accuracy: 0.5,
            test_accuracy: 0.6,
            seconds: 1.0,
        }
    }

    #[test]
    fn diverged_losses_narrow_sizes_and_large_scales_still_draw() {
        let history = [
            record(1, 2.0),
            record(2, f64::NAN),
            record(3, f64::INFINITY),
        ];
        let curve = [[0.1, 2.5], [0.5, f64::NAN], [0.9, 1.0]];
        let chart = TrainingChart {
            title: "t".into(),
            curve: &curve,
            history: &history,
            epochs: 3,
            learning_rates: Some(vec![1e-3, 5e-4, 2.5e-4]),
        };
        for (width, height, scale) in [(Some(200), Some(460), None), (None, None, Some(4.0))] {
            let params = ChartParams {
                width,
                height,
                scale,
            };
            let (w, h, _) = size(&params, chart.default_size()).unwrap();
            assert!(w <= crate::charts::MAX_SIDE && h <= crate::charts::MAX_SIDE);
            let png = render(&chart, &params, Format::Png).unwrap();
            let img = image::load_from_memory(&png.bytes).unwrap();
            assert_eq!((img.width(), img.height()), (w, h));
        }
    }
}
