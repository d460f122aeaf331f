//! `recall_qps.png`: recall on x, QPS on y, a line per system, a panel per filter.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One line of the plot: (recall, QPS) points in ef order.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Fonts searched for the labels (Debian's fonts-dejavu-core).
const FONT_PATHS: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

fn load_font() -> anyhow::Result<()> {
    let path = FONT_PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf found: install Debian's fonts-dejavu-core for the plot labels")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow::anyhow!("{path} is not a usable font"))
}

/// Draws one panel per `(filter, series)` entry into `path`.
pub fn recall_qps(path: &Path, panels: &[(String, Vec<Series>)]) -> anyhow::Result<()> {
    load_font()?;
    let width = 640 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for ((filter, series), area) in panels.iter().zip(areas) {
        let all = series.iter().flat_map(|s| s.points.iter());
        // QPS spans orders of magnitude across systems and filters: a log axis.
        let max_qps = all.clone().map(|p| p.1).fold(1.0f64, f64::max) * 1.5;
        let min_qps = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min).clamp(0.1, max_qps / 10.0) / 1.5;
        let min_recall = all.map(|p| p.0).fold(1.0f64, f64::min).min(0.9) - 0.02;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("recall vs QPS ({filter})"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(min_recall.max(0.0)..1.005f64, (min_qps..max_qps).log_scale())?;
        chart.configure_mesh().x_desc("recall@k").y_desc("QPS (log)").label_style(("sans-serif", 13)).draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
