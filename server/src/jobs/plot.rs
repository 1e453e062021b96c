//! Pictures of training: loss and accuracy curves, and a labelled
//! confusion-matrix heatmap. Drawn with the same canvas and font as the
//! activation sheets; no plotting library.

use model_store::train::{EpochRecord, Evaluation};

use crate::render::{Canvas, Colormap};

const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GREEN: [u8; 3] = [44, 160, 44];
const AXIS: [u8; 3] = [90, 90, 90];
const GRID: [u8; 3] = [225, 225, 225];

/// A plot area in canvas pixels and the data ranges it shows.
struct Frame {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Frame {
    fn to_px(&self, vx: f64, vy: f64) -> (f64, f64) {
        let fx = (vx - self.x_range.0) / (self.x_range.1 - self.x_range.0).max(1e-12);
        let fy = (vy - self.y_range.0) / (self.y_range.1 - self.y_range.0).max(1e-12);
        (
            self.x as f64 + fx.clamp(0.0, 1.0) * self.w as f64,
            (self.y + self.h) as f64 - fy.clamp(0.0, 1.0) * self.h as f64,
        )
    }

    fn axes(&self, c: &mut Canvas, title: &str, y_label: (&str, &str), x_label: &str) {
        for i in 0..=4 {
            let yy = self.y + self.h * i / 4;
            c.fill(self.x, yy, self.w, 1, GRID);
        }
        c.fill(self.x, self.y, 1, self.h + 1, AXIS);
        c.fill(self.x, self.y + self.h, self.w + 1, 1, AXIS);
        c.text(self.x, self.y.saturating_sub(14), title, self.w);
        c.text(self.x.saturating_sub(44), self.y, y_label.0, 40);
        c.text(
            self.x.saturating_sub(44),
            self.y + self.h - 8,
            y_label.1,
            40,
        );
        c.text(self.x, self.y + self.h + 6, x_label, self.w);
    }

    fn line(&self, c: &mut Canvas, points: &[(f64, f64)], rgb: [u8; 3]) {
        let px: Vec<(f64, f64)> = points.iter().map(|&(a, b)| self.to_px(a, b)).collect();
        for w in px.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
                c.fill(x as u32, y as u32, 2, 2, rgb);
            }
        }
        for &(x, y) in &px {
            c.fill(
                (x as u32).saturating_sub(2),
                (y as u32).saturating_sub(2),
                5,
                5,
                rgb,
            );
        }
    }
}

/// Left: the training loss at each progress report (x in epochs) and the
/// epoch means; right: train and test accuracy per epoch.
pub fn training_curves(curve: &[[f64; 2]], history: &[EpochRecord], epochs: usize) -> Vec<u8> {
    let mut c = Canvas::new(760, 300);
    let epochs = epochs.max(1) as f64;
    let max_loss = curve
        .iter()
        .map(|p| p[1])
        .chain(history.iter().map(|h| h.loss))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6);
    let loss = Frame {
        x: 60,
        y: 40,
        w: 280,
        h: 200,
        x_range: (0.0, epochs),
        y_range: (0.0, max_loss * 1.05),
    };
    loss.axes(
        &mut c,
        "training loss",
        (&format!("{:.3}", max_loss * 1.05), "0"),
        &format!("epoch (0-{})", epochs as usize),
    );
    let points: Vec<(f64, f64)> = curve.iter().map(|p| (p[0] * epochs, p[1])).collect();
    loss.line(&mut c, &points, BLUE);
    let means: Vec<(f64, f64)> = history.iter().map(|h| (h.epoch as f64, h.loss)).collect();
    loss.line(&mut c, &means, ORANGE);
    c.text(
        20,
        272,
        "blue: epoch's running mean, orange: epoch mean",
        400,
    );

    let acc = Frame {
        x: 440,
        y: 40,
        w: 280,
        h: 200,
        x_range: (0.0, epochs),
        y_range: (0.0, 1.0),
    };
    acc.axes(
        &mut c,
        "accuracy",
        ("100%", "0%"),
        &format!("epoch (0-{})", epochs as usize),
    );
    let train: Vec<(f64, f64)> = history
        .iter()
        .map(|h| (h.epoch as f64, h.train_accuracy))
        .collect();
    let test: Vec<(f64, f64)> = history
        .iter()
        .map(|h| (h.epoch as f64, h.test_accuracy))
        .collect();
    acc.line(&mut c, &train, BLUE);
    acc.line(&mut c, &test, GREEN);
    let last = history
        .last()
        .map(|h| format!("test {:.2}%", h.test_accuracy * 100.0))
        .unwrap_or_default();
    c.text(440, 272, &format!("blue: train, green: test  {last}"), 320);
    c.png()
}

/// The confusion matrix as a heatmap, rows = true class, columns =
/// predicted, each cell's count written in it, rows normalised for colour.
pub fn confusion_png(e: &Evaluation) -> Vec<u8> {
    let k = e.classes.len().max(1);
    let cell: u32 = if k <= 10 { 44 } else { (440 / k as u32).max(8) };
    let label_w = 8 * e.classes.iter().map(|c| c.len().min(12)).max().unwrap_or(1) as u32 + 8;
    let (x0, y0) = (label_w + 4, 40);
    let mut c = Canvas::new(x0 + cell * k as u32 + 20, y0 + cell * k as u32 + 40);
    c.text(
        4,
        4,
        &format!(
            "confusion matrix: {} images, accuracy {:.2}%",
            e.count,
            e.accuracy * 100.0
        ),
        x0 + cell * k as u32,
    );
    c.text(x0, 20, "predicted ->", 200);
    c.text(4, 20, "true", label_w);
    for (i, row) in e.confusion_matrix.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        c.text(
            4,
            y0 + i as u32 * cell + cell / 2 - 4,
            &e.classes[i],
            label_w,
        );
        for (j, &n) in row.iter().enumerate() {
            let v = n as f32 / total as f32;
            let (x, y) = (x0 + j as u32 * cell, y0 + i as u32 * cell);
            c.fill(x, y, cell - 1, cell - 1, Colormap::Viridis.color(v));
            if cell >= 24 {
                let s = n.to_string();
                let tx = x + (cell.saturating_sub(8 * s.len() as u32)) / 2;
                // White cell behind the digits keeps them legible on any colour.
                c.fill(
                    tx - 1,
                    y + cell / 2 - 5,
                    8 * s.len() as u32 + 2,
                    10,
                    [255, 255, 255],
                );
                c.text(tx, y + cell / 2 - 4, &s, cell);
            }
        }
    }
    for (j, label) in e.classes.iter().enumerate() {
        if cell >= 24 {
            let s: String = label.chars().take((cell / 8) as usize).collect();
            c.text(x0 + j as u32 * cell + 2, y0 + k as u32 * cell + 6, &s, cell);
        }
    }
    c.png()
}
