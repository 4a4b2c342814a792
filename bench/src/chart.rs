//! The comparison as an SVG: IOPS relative to raw fio, and p99 latency.

use std::path::Path;

use plotters::prelude::*;

use crate::compare::{Results, System};

const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(120, 120, 120),
];

#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {detail}")]
pub struct ChartError {
    path: String,
    detail: String,
}

pub fn write_svg(results: &Results, path: &Path) -> Result<(), ChartError> {
    draw(results, path).map_err(|e| ChartError {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(results: &Results, path: &Path) -> DrawResult {
    let n = results.cells.len();
    let root = SVGBackend::new(path, (160 + 110 * n as u32, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(450);
    let labels: Vec<String> = results.cells.iter().map(|c| c.label()).collect();

    let rel: Vec<[f64; 3]> = results
        .cells
        .iter()
        .map(|c| {
            let raw = c.median.raw.iops.max(1e-9);
            [c.median.ours.iops / raw, c.median.qsd.iops / raw, 1.0]
        })
        .collect();
    let ymax = rel.iter().flatten().fold(1.0f64, |a, &b| a.max(b)) * 1.15;
    panel(
        &top,
        &format!(
            "IOPS relative to raw fio (median of {} rounds, {} backing{})",
            results.rounds,
            serde_json::to_value(results.backing)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            if results.direct { ", O_DIRECT" } else { "" }
        ),
        "× raw fio IOPS",
        &labels,
        &rel,
        ymax,
    )?;

    let lat: Vec<[f64; 3]> = results
        .cells
        .iter()
        .map(|c| {
            [
                c.median.ours.p99_us,
                c.median.qsd.p99_us,
                c.median.raw.p99_us,
            ]
        })
        .collect();
    let ymax = lat.iter().flatten().fold(1.0f64, |a, &b| a.max(b)) * 1.15;
    panel(
        &bottom,
        "p99 completion latency (us, lower is better)",
        "us",
        &labels,
        &lat,
        ymax,
    )?;
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    ylabel: &str,
    labels: &[String],
    values: &[[f64; 3]],
    ymax: f64,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let n = labels.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(ylabel)
        .draw()?;
    let width = 0.27;
    for (k, system) in System::ALL.iter().enumerate() {
        let color = COLORS[k];
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 - 1.5 * width + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v[k])], color.filled())
            }))?
            .label(system.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.draw_series(labels.iter().enumerate().map(|(i, l)| {
        Text::new(
            l.clone(),
            (i as f64 - 0.45, -ymax * 0.04),
            ("sans-serif", 11).into_font(),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
