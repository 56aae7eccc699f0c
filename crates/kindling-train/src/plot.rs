//! PNG plots with plotters. The font ships inside the binary (DejaVu Sans, its licence beside
//! it in assets/), so plots render the same on machines without system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::{io_err, Result, TrainError};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| ())
            .expect("the bundled font parses");
    });
}

/// A named series of (step, value) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn thin and pale (raw per-step values under their smoothed line).
    pub faint: bool,
}

fn plot_err<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Plot(e.to_string())
}

/// Loss curves with horizontal reference lines on top, the learning rate below.
pub fn draw_loss_plot(
    path: &Path,
    curves: &[Curve],
    references: &[(String, f64)],
    lr: &[(f64, f64)],
) -> Result<()> {
    draw_chart(path, "loss", "nats", curves, references, lr)
}

/// Evaluation metrics (accuracies, monitors) against step, one line each.
pub fn draw_metrics_plot(path: &Path, title: &str, curves: &[Curve]) -> Result<()> {
    draw_chart(path, title, "value", curves, &[], &[])
}

fn draw_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    curves: &[Curve],
    references: &[(String, f64)],
    lr: &[(f64, f64)],
) -> Result<()> {
    register_font();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter().copied())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ys = all
        .iter()
        .map(|p| p.1)
        .chain(references.iter().map(|r| r.1))
        .filter(|y| y.is_finite());
    let (mut y_min, mut y_max) =
        ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    y_min -= pad;
    y_max += pad;

    // Write to a temporary name, then rename: a reader never sees half a PNG.
    let tmp = path.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (1000, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, bottom) = if lr.is_empty() {
            root.split_vertically(800)
        } else {
            root.split_vertically(560)
        };
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_desc)
            .draw()
            .map_err(plot_err)?;
        let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, c) in curves.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let style = if c.faint {
                ShapeStyle::from(colour.mix(0.25)).stroke_width(1)
            } else {
                ShapeStyle::from(colour).stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))
                .map_err(plot_err)?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if c.points.len() < 50 {
                chart
                    .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(plot_err)?;
            }
        }
        for (label, y) in references {
            let style = ShapeStyle::from(BLACK.mix(0.6)).stroke_width(1);
            chart
                .draw_series(LineSeries::new([(0.0, *y), (x_max, *y)], style))
                .map_err(plot_err)?
                .label(format!("{label} ({y:.3})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        if !lr.is_empty() {
            let lr_max = lr.iter().map(|p| p.1).fold(1e-12, f64::max) * 1.05;
            let mut chart = ChartBuilder::on(&bottom)
                .caption("learning rate", ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, 0f64..lr_max)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.1e}"))
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(LineSeries::new(
                    lr.iter().copied(),
                    ShapeStyle::from(BLUE).stroke_width(2),
                ))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
