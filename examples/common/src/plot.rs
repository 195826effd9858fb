//! PNG plots for the experiment reports and the demo, drawn with plotters' bitmap backend.
//!
//! Text goes through ab_glyph with DejaVu Sans read at run time from [`FONT_PATH`], so nothing depends
//! on fontconfig or on a font found by guessing. Logarithmic axes are drawn by plotting `log10(v)` and
//! labelling ticks with `v`.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

/// Reads and registers the font once per process.
pub fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT_PATH).map_err(|e| {
            format!("cannot read the plot font {FONT_PATH}: {e}; install the Debian package `fonts-dejavu-core`")
        })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_PATH} is not a font ab_glyph can read; reinstall `fonts-dejavu-core`"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// One line of points.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Optional symmetric error bars on y, one per point.
    pub y_err: Option<Vec<f64>>,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { label: label.into(), points, y_err: None }
    }
}

/// One chart of a figure.
#[derive(Clone, Debug, Default)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    /// Horizontal reference lines (label, y), drawn dashed: a loss floor, a ratio of 1.
    pub hlines: Vec<(String, f64)>,
}

#[derive(Clone, Copy, Debug)]
pub struct Axes<'a> {
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

fn tf(log: bool, v: f64) -> f64 {
    if log {
        v.log10()
    } else {
        v
    }
}

fn tick_label(log: bool, v: f64) -> String {
    let v = if log { 10f64.powf(v) } else { v };
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.1e}")
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return None;
    }
    let pad = if hi > lo { 0.06 * (hi - lo) } else { 0.5 * lo.abs().max(0.1) };
    Some((lo - pad, hi + pad))
}

/// Draws `panels` side by side (up to `columns` per row) into one PNG.
pub fn plot_panels(path: &Path, title: &str, axes: Axes, panels: &[Panel], columns: usize) -> Result<()> {
    ensure_font()?;
    if panels.is_empty() {
        bail!("plot {}: no panels", path.display());
    }
    let columns = columns.clamp(1, panels.len());
    let rows = panels.len().div_ceil(columns);
    // At least 760 px wide so a one-panel figure keeps its whole title.
    let (w, h) = ((420 * columns as u32).max(760), 330 * rows as u32 + 40);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 20))?;
    let areas = root.split_evenly((rows, columns));
    for (panel, area) in panels.iter().zip(areas) {
        draw_panel(&area, panel, axes).with_context(|| format!("plot {} panel `{}`", path.display(), panel.title))?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, panel: &Panel, axes: Axes) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = panel.series.iter().flat_map(|s| s.points.iter().map(|p| tf(axes.log_x, p.0)));
    let ys = panel.series.iter().flat_map(|s| {
        s.points.iter().enumerate().flat_map(move |(i, p)| {
            let e = s.y_err.as_ref().map_or(0.0, |e| e[i]);
            [tf(axes.log_y, p.1 - e), tf(axes.log_y, p.1 + e)]
        })
    });
    let hl = panel.hlines.iter().map(|h| tf(axes.log_y, h.1));
    let Some((x0, x1)) = range(xs) else { return Ok(()) };
    let (y0, y1) = range(ys.chain(hl)).unwrap_or((0.0, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 15))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(52)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(axes.x_label)
        .y_desc(axes.y_label)
        .label_style((FONT, 11))
        .axis_desc_style((FONT, 12))
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| tick_label(axes.log_x, *v))
        .y_label_formatter(&|v| tick_label(axes.log_y, *v))
        .draw()?;
    for (i, (label, y)) in panel.hlines.iter().enumerate() {
        let y = tf(axes.log_y, *y);
        let color = RGBColor(90, 90, 90);
        let n = 40;
        let dashes = (0..n).step_by(2).map(|k| {
            let a = x0 + (x1 - x0) * k as f64 / n as f64;
            let b = x0 + (x1 - x0) * (k + 1) as f64 / n as f64;
            PathElement::new(vec![(a, y), (b, y)], color.stroke_width(1))
        });
        chart.draw_series(dashes)?;
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (x0 + 0.02 * (x1 - x0), y + (0.012 + 0.04 * i as f64) * (y1 - y0)),
            (FONT, 11).into_font().color(&color),
        )))?;
    }
    for (i, s) in panel.series.iter().enumerate() {
        let color = palette(i);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (tf(axes.log_x, p.0), tf(axes.log_y, p.1))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        if let Some(err) = &s.y_err {
            let bars = s.points.iter().zip(err).map(|(p, e)| {
                let x = tf(axes.log_x, p.0);
                PathElement::new(vec![(x, tf(axes.log_y, p.1 - e)), (x, tf(axes.log_y, p.1 + e))], color.stroke_width(1))
            });
            chart.draw_series(bars)?;
        }
    }
    if panel.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .label_font((FONT, 10))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

/// The demo's diagnostic: each hidden matrix's final sigma_max in the proxy and in the target, and
/// their ratio (the gain ratio, 1 when the transfer holds). `names[i]` labels `proxy[i]`, `target[i]`.
pub fn plot_sigma_proxy_vs_target(path: &Path, names: &[String], proxy: &[f64], target: &[f64]) -> Result<()> {
    if names.len() != proxy.len() || names.len() != target.len() {
        bail!("plot {}: {} names but {} proxy and {} target values", path.display(), names.len(), proxy.len(), target.len());
    }
    let idx = |v: &[f64]| v.iter().enumerate().map(|(i, s)| (i as f64, *s)).collect::<Vec<_>>();
    let ratio: Vec<(f64, f64)> = proxy.iter().zip(target).enumerate().map(|(i, (p, t))| (i as f64, t / p)).collect();
    let legend = names.iter().enumerate().map(|(i, n)| format!("{i}: {n}")).collect::<Vec<_>>().join("   ");
    let panels = [
        Panel {
            title: "sigma_max per hidden matrix".into(),
            series: vec![Series::new("proxy", idx(proxy)), Series::new("target", idx(target))],
            hlines: vec![],
        },
        Panel {
            title: "gain ratio sigma_target / sigma_proxy".into(),
            series: vec![Series::new("ratio", ratio)],
            hlines: vec![("1".into(), 1.0)],
        },
    ];
    let title = if legend.len() < 160 { legend } else { "hidden matrices by index (see the table)".into() };
    plot_panels(path, &title, Axes { x_label: "matrix index", y_label: "", log_x: false, log_y: false }, &panels, 2)
}

/// Each hidden matrix's gain ratio (`sigma_target / sigma_reference`) under one or more rules, the parameter
/// names along the x axis, the alert's band `[lower, upper]` shaded and drawn: the demo's verdict figure.
/// `series[k] = (rule, ratio per name)`.
pub fn plot_gain_ratio_by_param(path: &Path, title: &str, names: &[String], series: &[(String, Vec<f64>)], band: (f64, f64)) -> Result<()> {
    ensure_font()?;
    if names.is_empty() || series.iter().any(|(_, v)| v.len() != names.len()) {
        bail!("plot {}: {} names, series of lengths {:?}", path.display(), names.len(), series.iter().map(|s| s.1.len()).collect::<Vec<_>>());
    }
    let n = names.len();
    let w = (70 * n as u32 + 160).max(760);
    let root = BitMapBackend::new(path, (w, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ys = series.iter().flat_map(|(_, v)| v.iter().copied()).chain([band.0, band.1, 1.0]);
    let (y0, y1) = range(ys).unwrap_or((0.5, 2.0));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 17))
        .margin(12)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), y0..y1)?;
    let label = |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            names[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_desc("hidden matrix")
        .y_desc("gain ratio sigma_target / sigma_reference")
        .label_style((FONT, 11))
        .x_label_style((FONT, 11).into_font().transform(FontTransform::Rotate90))
        .axis_desc_style((FONT, 12))
        .x_labels(n)
        .x_label_formatter(&label)
        .disable_x_mesh()
        .draw()?;
    let band_color = RGBColor(44, 160, 44);
    chart.draw_series(std::iter::once(Rectangle::new([(-0.5, band.0), (n as f64 - 0.5, band.1)], band_color.mix(0.12).filled())))?;
    for (y, text) in [(band.0, format!("GainDrift band {}", band.0)), (band.1, format!("GainDrift band {}", band.1))] {
        chart.draw_series(std::iter::once(PathElement::new(vec![(-0.5, y), (n as f64 - 0.5, y)], band_color.stroke_width(2))))?;
        chart.draw_series(std::iter::once(Text::new(text, (-0.45, y + 0.01 * (y1 - y0)), (FONT, 11).into_font().color(&band_color))))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(vec![(-0.5, 1.0), (n as f64 - 0.5, 1.0)], RGBColor(120, 120, 120).stroke_width(1))))?;
    for (k, (rule, ratios)) in series.iter().enumerate() {
        let color = palette(k);
        // Side by side within each parameter's slot, so the rules do not hide each other.
        let dx = 0.12 * (k as f64 - (series.len() as f64 - 1.0) / 2.0);
        let pts: Vec<(f64, f64)> = ratios.iter().enumerate().filter(|(_, r)| r.is_finite()).map(|(i, r)| (i as f64 + dx, *r)).collect();
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 5, color.filled())))?
            .label(rule.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One heatmap panel: `values[row][column]`, rows following `y_ticks` (bottom to top) and columns `x_ticks`;
/// each value comes with the text written in its cell (None: not measured, drawn grey).
#[derive(Clone, Debug)]
pub struct Heatmap {
    pub title: String,
    pub x_ticks: Vec<String>,
    pub y_ticks: Vec<String>,
    pub values: Vec<Vec<Option<(f64, String)>>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HeatmapAxes<'a> {
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// What the colour bar measures.
    pub colour_label: &'a str,
}

/// Viridis, by linear interpolation between five of its colours; `t` in [0, 1].
fn viridis(t: f64) -> RGBColor {
    const C: [(f64, f64, f64); 5] = [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let x = t.clamp(0.0, 1.0) * (C.len() - 1) as f64;
    let i = (x.floor() as usize).min(C.len() - 2);
    let f = x - i as f64;
    let mix = |a: f64, b: f64| (a + f * (b - a)).round() as u8;
    RGBColor(mix(C[i].0, C[i + 1].0), mix(C[i].1, C[i + 1].1), mix(C[i].2, C[i + 1].2))
}

/// Draws the heatmaps side by side with one shared colour scale and its colour bar.
pub fn plot_heatmaps(path: &Path, title: &str, axes: HeatmapAxes, maps: &[Heatmap]) -> Result<()> {
    ensure_font()?;
    if maps.is_empty() {
        bail!("plot {}: no heatmaps", path.display());
    }
    let finite = maps.iter().flat_map(|m| m.values.iter().flatten().flatten().map(|v| v.0)).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if !lo.is_finite() { (0.0, 1.0) } else if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
    let (w, h) = ((460 * maps.len() as u32).max(760) + 130, 460);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 16))?;
    let (panels, bar) = root.split_horizontally(w - 130);
    for (map, area) in maps.iter().zip(panels.split_evenly((1, maps.len()))) {
        let (nx, ny) = (map.x_ticks.len() as i32, map.y_ticks.len() as i32);
        // A segmented range a..b has the b − a + 1 segments a..=b.
        let mut chart = ChartBuilder::on(&area)
            .caption(&map.title, (FONT, 15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((0..(nx - 1).max(0)).into_segmented(), (0..(ny - 1).max(0)).into_segmented())?;
        let label = |ticks: &[String], v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) if *i >= 0 && (*i as usize) < ticks.len() => ticks[*i as usize].clone(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(axes.x_label)
            .y_desc(axes.y_label)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .x_label_formatter(&|v| label(&map.x_ticks, v))
            .y_label_formatter(&|v| label(&map.y_ticks, v))
            .draw()?;
        for (row, values) in map.values.iter().enumerate() {
            for (col, value) in values.iter().enumerate() {
                let (c, r) = (col as i32, row as i32);
                let colour = match value {
                    Some((v, _)) if v.is_finite() => viridis((v - lo) / (hi - lo)),
                    _ => RGBColor(200, 200, 200),
                };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(SegmentValue::Exact(c), SegmentValue::Exact(r)), (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1))],
                    colour.filled(),
                )))?;
                let text = value.as_ref().map_or("not run".to_string(), |v| v.1.clone());
                let dark = matches!(value, Some((v, _)) if v.is_finite() && (v - lo) / (hi - lo) < 0.55);
                let style = (FONT, 12).into_font().color(if dark { &WHITE } else { &BLACK }).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ));
                chart.draw_series(std::iter::once(Text::new(text, (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r)), style)))?;
            }
        }
    }
    let mut cb = ChartBuilder::on(&bar).margin_top(40).margin_bottom(50).margin_right(10).y_label_area_size(70).build_cartesian_2d(0.0..1.0, lo..hi)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(axes.colour_label)
        .label_style((FONT, 11))
        .axis_desc_style((FONT, 12))
        .y_labels(6)
        .y_label_formatter(&|v| tick_label(false, *v))
        .draw()?;
    let steps = 100;
    cb.draw_series((0..steps).map(|k| {
        let (a, b) = (lo + (hi - lo) * k as f64 / steps as f64, lo + (hi - lo) * (k + 1) as f64 / steps as f64);
        Rectangle::new([(0.0, a), (1.0, b)], viridis((k as f64 + 0.5) / steps as f64).filled())
    }))?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
