//! Figures with plotters: line plots of several series with error bars, linear or log axes, legends, and
//! grids of such panels, written as PNG and SVG side by side. Functions take plain data (series of
//! `(x, y, err)` points), never models, so any result file can be plotted.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One curve: points `(x, y, err)` where `err` is a symmetric error bar (0 draws none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
    /// Dashed line without markers (used for theory curves and fitted lines).
    #[serde(default)]
    pub dashed: bool,
    /// Colour index into the palette; `None` uses the series' position in its panel.
    #[serde(default)]
    pub color: Option<usize>,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64, f64)>) -> Self {
        Series { label: label.into(), points, dashed: false, color: None }
    }

    /// A curve without error bars.
    pub fn from_xy(label: impl Into<String>, xy: impl IntoIterator<Item = (f64, f64)>) -> Self {
        Series::new(label, xy.into_iter().map(|(x, y)| (x, y, 0.0)).collect())
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn color(mut self, index: usize) -> Self {
        self.color = Some(index);
        self
    }
}

/// One chart: axes, labels and series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        Panel { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), ..Default::default() }
    }

    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }

    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    pub fn with(mut self, series: Series) -> Self {
        self.series.push(series);
        self
    }
}

/// Colour-blind-friendly palette (Okabe–Ito), then plotters' defaults.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Pixel size of one panel.
pub const PANEL_SIZE: (u32, u32) = (640, 460);

/// Writes `panel` as `<stem>.png` and `<stem>.svg`; returns both paths.
pub fn line_plot(stem: &Path, panel: &Panel) -> Result<Vec<PathBuf>> {
    panel_grid(stem, "", std::slice::from_ref(panel), 1)
}

/// Writes `panels` in a grid of `cols` columns (row-major) with an overall `title` as `<stem>.png` and
/// `<stem>.svg`; returns both paths.
pub fn panel_grid(stem: &Path, title: &str, panels: &[Panel], cols: usize) -> Result<Vec<PathBuf>> {
    if panels.is_empty() {
        return Err(Error::invalid("plot.panels", "needs at least one panel"));
    }
    if cols == 0 {
        return Err(Error::invalid("plot.cols", "must be at least 1"));
    }
    let cols = cols.min(panels.len());
    let rows = panels.len().div_ceil(cols);
    let header = if title.is_empty() { 0 } else { 40 };
    let size = (PANEL_SIZE.0 * cols as u32, PANEL_SIZE.1 * rows as u32 + header);
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
    }
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_grid(&root, title, header, panels, rows, cols).map_err(|e| plot_error(&png, e))?;
        root.present().map_err(|e| plot_error(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_grid(&root, title, header, panels, rows, cols).map_err(|e| plot_error(&svg, e))?;
        root.present().map_err(|e| plot_error(&svg, e.to_string()))?;
    }
    Ok(vec![png, svg])
}

fn plot_error(path: &Path, reason: String) -> Error {
    Error::Write { path: path.to_path_buf(), source: std::io::Error::other(reason) }
}

type DrawResult = std::result::Result<(), String>;

fn draw_grid<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    header: u32,
    panels: &[Panel],
    rows: usize,
    cols: usize,
) -> DrawResult {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = if header > 0 {
        root.titled(title, ("sans-serif", 26).into_font()).map_err(|e| e.to_string())?
    } else {
        root.clone()
    };
    let areas = body.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    Ok(())
}

/// Axis range covering the data (and error bars), padded; on a log axis only positive values count.
fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let (l, h) = (lo.log10(), hi.log10());
        let pad = ((h - l) * 0.06).max(0.05);
        let (mut a, mut b) = (l - pad, h + pad);
        // A log axis labels only powers of ten (and a few multiples): span at least one full decade
        // boundary so every panel has readable tick labels.
        if b.floor() == a.floor() {
            a = a.floor();
            b = b.max(a + 1.0);
        }
        (10f64.powf(a), 10f64.powf(b))
    } else {
        let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) * 0.1 };
        (lo - 0.06 * span, hi + 0.06 * span)
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> DrawResult {
    let xs = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = range(xs, panel.log_x);
    let ys = panel.series.iter().flat_map(|s| s.points.iter().flat_map(|p| [p.1 - p.2.abs(), p.1, p.1 + p.2.abs()]));
    let (y0, y1) = range(ys, panel.log_y);
    let mut builder = ChartBuilder::on(area);
    builder.caption(&panel.title, ("sans-serif", 20)).margin(10).x_label_area_size(42).y_label_area_size(64);
    // Log x axes are model sizes along a doubling ladder: ticks at powers of 2 label every size (base 10
    // would label one point of a 128..1024 ladder).
    match (panel.log_x, panel.log_y) {
        (false, false) => {
            let chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| e.to_string())?;
            fill(chart, panel)
        }
        (true, false) => {
            let chart = builder.build_cartesian_2d((x0..x1).log_scale().base(2.0), y0..y1).map_err(|e| e.to_string())?;
            fill(chart, panel)
        }
        (false, true) => {
            let chart = builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| e.to_string())?;
            fill(chart, panel)
        }
        (true, true) => {
            let chart =
                builder.build_cartesian_2d((x0..x1).log_scale().base(2.0), (y0..y1).log_scale()).map_err(|e| e.to_string())?;
            fill(chart, panel)
        }
    }
}

/// Compact tick labels: plain decimals in a readable range, scientific notation otherwise. Values below
/// 1e-12 are rounding residue of a linear axis's tick arithmetic (e.g. 3e-18 for the tick at 0).
fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn fill<'a, DB, X, Y>(mut chart: ChartContext<'a, DB, Cartesian2d<X, Y>>, panel: &Panel) -> DrawResult
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_labels(7)
        .y_labels(7)
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| e.to_string())?;
    let ok = |x: f64, y: f64| x.is_finite() && y.is_finite() && (!panel.log_x || x > 0.0) && (!panel.log_y || y > 0.0);
    for (i, s) in panel.series.iter().enumerate() {
        let c = color(s.color.unwrap_or(i));
        let pts: Vec<(f64, f64)> = s.points.iter().filter(|p| ok(p.0, p.1)).map(|p| (p.0, p.1)).collect();
        let stroke = c.stroke_width(2);
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, stroke)).map_err(|e| e.to_string())?
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), stroke)).map_err(|e| e.to_string())?
        };
        if !s.label.is_empty() {
            anno.label(&s.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
        }
        if !s.dashed {
            chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled()))).map_err(|e| e.to_string())?;
        }
        let bars = s.points.iter().filter(|p| p.2 > 0.0 && ok(p.0, p.1)).map(|&(x, y, e)| {
            // On a log axis the lower end of a bar that would cross zero is clipped to a visible value.
            let lo = if panel.log_y { (y - e).max(y * 1e-3) } else { y - e };
            ErrorBar::new_vertical(x, lo, y, y + e, c.stroke_width(1), 6)
        });
        chart.draw_series(bars).map_err(|e| e.to_string())?;
    }
    if panel.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(128.0), "128");
        assert_eq!(tick(1e-5), "1e-5");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(3e-18), "0");
    }

    #[test]
    fn ranges_cover_data() {
        let (lo, hi) = range([1.0, 100.0].into_iter(), true);
        assert!(lo < 1.0 && hi > 100.0 && lo > 0.0);
        let (lo, hi) = range([-1.0, 0.0, -5.0].into_iter(), true);
        assert!(lo > 0.0 && hi > lo);
        let (lo, hi) = range([2.0, 2.0].into_iter(), false);
        assert!(lo < 2.0 && hi > 2.0);
    }
}
