//! The SVG charts of `tether compare`, drawn with `plotters`: the latency CDF of every mode
//! (log time axis) and the highest sustained rate per mode.
//!
//! plotters is built without its font back ends: labels are sized by its built-in estimate
//! and written as SVG `<text>`, which whatever displays the file renders with its own fonts,
//! so nothing here needs fontconfig or a font file.

use super::report::thousands;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 540);
/// Font sizes (plotters scales them down by about a fifth when it writes the SVG).
const CAPTION: u32 = 24;
const LABELS: u32 = 16;
const AXIS_DESC: u32 = 17;

/// One colour per mode, in the order the modes run; failed modes keep their colour slot.
fn colour(mode: &str) -> RGBColor {
    match mode {
        "single" => RGBColor(0x44, 0x44, 0x44),
        "sticky" => RGBColor(0xd9, 0x5f, 0x02),
        "routed" => RGBColor(0x1a, 0x8a, 0x3a),
        "redis" => RGBColor(0xc0, 0x1c, 0x28),
        "nats" => RGBColor(0x1b, 0x6a, 0xc9),
        "nats-cluster" => RGBColor(0x26, 0xa2, 0x69),
        _ => RGBColor(0x7a, 0x7a, 0x7a),
    }
}

/// plotters' errors carry the backend's error type; flatten them into a message.
fn err<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e:?}")
}

/// One mode's latency distribution: `(µs, fraction at or below)`.
pub struct CdfSeries<'a> {
    pub mode: &'a str,
    pub points: &'a [(u64, f64)],
}

/// `latency-cdf.svg`: fraction of deliveries at or below each latency, per mode, with the
/// step-up's p99 bound marked.
pub fn latency_cdf(path: &Path, series: &[CdfSeries<'_>], p99_bound_ms: f64, subtitle: &str) -> Result<()> {
    let to_ms = |us: u64| (us.max(1) as f64) / 1e3;
    let all = series.iter().flat_map(|s| s.points.iter().map(|p| to_ms(p.0)));
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi.max(p99_bound_ms)) } else { (0.1, p99_bound_ms.max(1.0)) };
    // Whole decades around the data, so the log axis has readable ticks.
    let lo = 10f64.powf(lo.log10().floor()).max(0.001);
    let hi = 10f64.powf(hi.log10().ceil());

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("latency CDF"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Latency CDF, send → receipt ({subtitle})"), ("sans-serif", CAPTION))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
        .map_err(err("latency CDF"))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", LABELS))
        .axis_desc_style(("sans-serif", AXIS_DESC))
        .x_desc("latency (ms, log scale)")
        .y_desc("deliveries at or below (%)")
        .x_label_formatter(&|v| if *v >= 1.0 { format!("{v:.0}") } else { format!("{v}") })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err("latency CDF"))?;
    let bound = RGBColor(0x55, 0x55, 0x55);
    chart
        .draw_series(DashedLineSeries::new([(p99_bound_ms, 0.0), (p99_bound_ms, 100.0)], 6, 4, bound.stroke_width(2)))
        .map_err(err("latency CDF"))?
        .label(format!("step-up p99 bound ({p99_bound_ms:.0} ms)"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], bound.stroke_width(2)));
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let c = colour(s.mode);
        chart
            .draw_series(LineSeries::new(s.points.iter().map(|&(us, q)| (to_ms(us), q * 100.0)), c.stroke_width(2)))
            .map_err(err("latency CDF"))?
            .label(s.mode)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", LABELS))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err("latency CDF"))?;
    root.present().map_err(err("latency CDF"))?;
    Ok(())
}

/// One bar: a mode's highest sustained rate, or why it has none.
pub struct RateBar<'a> {
    pub mode: &'a str,
    /// msg/s; `None` when the mode failed before its step-up.
    pub rate: Option<f64>,
}

/// `max-rate.svg`: the highest sustained rate per mode, each bar labelled with its value.
pub fn max_rate(path: &Path, bars: &[RateBar<'_>], subtitle: &str) -> Result<()> {
    let top = bars.iter().filter_map(|b| b.rate).fold(0.0, f64::max).max(1.0) * 1.15;
    // A segmented `0..last` has a segment for each of `0..=last`: one per bar.
    let last = u32::try_from(bars.len().saturating_sub(1)).unwrap_or(u32::MAX);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("max-rate chart"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Highest sustained publish rate ({subtitle})"), ("sans-serif", CAPTION))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d((0u32..last).into_segmented(), 0f64..top)
        .map_err(err("max-rate chart"))?;
    let names: Vec<&str> = bars.iter().map(|b| b.mode).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .label_style(("sans-serif", LABELS))
        .axis_desc_style(("sans-serif", AXIS_DESC))
        .x_desc("mode")
        .y_desc("messages per second, all publishers")
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i as usize).map_or(String::new(), |s| (*s).to_owned())
            }
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err("max-rate chart"))?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .margin(40)
                .style_func(|x, _| match x {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                        colour(names.get(*i as usize).copied().unwrap_or("")).filled()
                    }
                    SegmentValue::Last => BLACK.filled(),
                })
                .data(bars.iter().enumerate().map(|(i, b)| (i as u32, b.rate.unwrap_or(0.0)))),
        )
        .map_err(err("max-rate chart"))?;
    let label = ("sans-serif", LABELS + 2).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let text = match b.rate {
                Some(r) if r > 0.0 => format!("{} msg/s", thousands(r)),
                Some(_) => "below the first step".to_owned(),
                None => "failed".to_owned(),
            };
            Text::new(text, (SegmentValue::CenterOf(i as u32), b.rate.unwrap_or(0.0) + top * 0.01), label.clone())
        }))
        .map_err(err("max-rate chart"))?;
    root.present().map_err(err("max-rate chart"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the SVG holds a `<text>` element reading exactly `s` (plotters puts the
    /// content on its own line).
    fn has_text(svg: &str, s: &str) -> bool {
        svg.contains(&format!(">\n{s}\n</text>"))
    }

    #[test]
    fn charts_are_svg_with_text_and_one_curve_or_bar_per_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a: Vec<(u64, f64)> = vec![(300, 0.1), (500, 0.5), (900, 0.99), (2_000, 1.0)];
        let b: Vec<(u64, f64)> = vec![(600, 0.1), (800, 0.5), (3_000, 0.99), (9_000, 1.0)];
        let cdf = dir.path().join("cdf.svg");
        latency_cdf(
            &cdf,
            &[CdfSeries { mode: "single", points: &a }, CdfSeries { mode: "redis", points: &b }],
            50.0,
            "test",
        )
        .expect("cdf chart");
        let svg = std::fs::read_to_string(&cdf).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(has_text(&svg, "redis") && has_text(&svg, "Latency CDF, send → receipt (test)"), "{svg}");
        assert!(svg.matches("<polyline").count() >= 3, "two modes and the bound");

        let bars = dir.path().join("bars.svg");
        max_rate(
            &bars,
            &[
                RateBar { mode: "single", rate: Some(4000.0) },
                RateBar { mode: "sticky", rate: Some(0.0) },
                RateBar { mode: "nats", rate: None },
            ],
            "test",
        )
        .expect("bar chart");
        let svg = std::fs::read_to_string(&bars).expect("written");
        assert!(has_text(&svg, "4,000 msg/s") && has_text(&svg, "failed") && has_text(&svg, "single"), "{svg}");
        // An empty run still draws (axes only).
        latency_cdf(&cdf, &[], 50.0, "empty").expect("empty cdf");
        max_rate(&bars, &[], "empty").expect("empty bars");
    }
}
