//! Hand-written SVG plots (line and grouped bar), so that a run directory opens in any
//! browser and the crate needs no plotting dependency.

use serde::{Deserialize, Serialize};

use super::format::{fmt_plain, trim_fixed, xml_escape};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub name: String,
    /// Non-finite points are skipped when drawing.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Stroke width in pixels; a non-positive or non-finite width falls back to 2.
    pub width: f64,
}

/// Okabe–Ito, reordered so the low-contrast yellow comes last.
pub(super) const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442",
];

/// Round tick values (1, 2 or 5 × 10^k apart) covering `lo..=hi`, about `target` intervals.
/// Always at least two distinct finite values, so an axis built on them has a nonzero span.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (mut lo, mut hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if !lo.is_finite() || !hi.is_finite() {
        return vec![0.0, 1.0];
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) {
        if lo == 0.0 {
            hi = 1.0;
        } else {
            let pad = lo.abs() * 0.1;
            lo -= pad;
            hi += pad;
        }
    }
    let span = hi - lo;
    if !span.is_finite() || span <= 0.0 {
        return if lo < hi && hi.is_finite() && lo.is_finite() {
            vec![lo, hi]
        } else {
            vec![0.0, 1.0]
        };
    }
    let raw = span / target.max(2) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    let start = (lo / step).floor();
    let end = (hi / step).ceil();
    let n = end - start;
    if !step.is_finite() || step <= 0.0 || !n.is_finite() || !(1.0..=1000.0).contains(&n) {
        return vec![lo, hi];
    }
    // Snap to the step's decimals: 3 * 0.2 is 0.6000000000000001 in binary.
    let decimals = (-step.log10().floor()).clamp(0.0, 300.0) as i32;
    let scale = 10f64.powi(decimals);
    (0..=n as usize)
        .map(|i| {
            let v = (start + i as f64) * step;
            let v = if decimals > 0 {
                (v * scale).round() / scale
            } else {
                v
            };
            if v == 0.0 { 0.0 } else { v }
        })
        .collect()
}

/// Ticks for integer data (rounds): never a fractional tick like 0.2.
pub(super) fn integer_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let t = nice_ticks(lo, hi, target);
    if t.len() >= 2 && t[1] - t[0] >= 1.0 {
        return t;
    }
    let (mut a, mut b) = (lo.floor(), hi.ceil());
    if a == b {
        if a >= 1.0 {
            a -= 1.0;
        }
        b += 1.0;
    }
    let n = (b - a).clamp(1.0, 1000.0) as usize;
    (0..=n).map(|i| a + i as f64).collect()
}

/// Data → pixel mapping of one plot area.
pub(super) struct Axes {
    left: f64,
    top: f64,
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Axes {
    fn px(&self, x: f64) -> f64 {
        pixel(self.left + (x - self.x0) / (self.x1 - self.x0) * self.w)
    }
    fn py(&self, y: f64) -> f64 {
        pixel(self.top + self.h - (y - self.y0) / (self.y1 - self.y0) * self.h)
    }
}

/// Keeps extreme inputs from writing "inf"/"NaN" coordinates into the SVG.
pub(super) fn pixel(v: f64) -> f64 {
    if v.is_finite() {
        v.clamp(-1e6, 1e6)
    } else {
        0.0
    }
}

pub(super) fn svg_open(width: f64, height: f64, title: &str) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    s.push('\n');
    s.push_str(&format!(
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    ));
    s.push('\n');
    s.push_str(&format!(
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        xml_escape(&truncate(title, 90))
    ));
    s.push('\n');
    s
}

pub(super) fn no_data_svg(title: &str) -> String {
    let (w, h) = (640.0, 360.0);
    let mut s = svg_open(w, h, title);
    s.push_str(&format!(
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="16" fill="#666666">no data</text>"##,
        w / 2.0,
        h / 2.0
    ));
    s.push_str("\n</svg>\n");
    s
}

pub(crate) fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Gridlines, tick labels, frame and axis labels.
pub(super) fn draw_axes(
    s: &mut String,
    ax: &Axes,
    x_ticks: &[(f64, String)],
    y_ticks: &[f64],
    y_format: fn(f64) -> String,
    x_label: &str,
    y_label: &str,
) {
    for &t in y_ticks {
        let y = ax.py(t);
        s.push_str(&format!(
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
            ax.left,
            ax.left + ax.w
        ));
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ax.left - 6.0,
            y + 4.0,
            xml_escape(&y_format(t))
        ));
        s.push('\n');
    }
    for (t, label) in x_ticks {
        let x = ax.px(*t);
        s.push_str(&format!(
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/>"##,
            ax.top,
            ax.top + ax.h
        ));
        s.push_str(&format!(
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ax.top + ax.h + 18.0,
            xml_escape(label)
        ));
        s.push('\n');
    }
    s.push_str(&format!(
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444444"/>"##,
        ax.left, ax.top, ax.w, ax.h
    ));
    s.push('\n');
    if !x_label.is_empty() {
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            ax.left + ax.w / 2.0,
            ax.top + ax.h + 40.0,
            xml_escape(x_label)
        ));
    }
    s.push_str(&format!(
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle" font-size="13">{}</text>"#,
        ax.top + ax.h / 2.0,
        xml_escape(y_label)
    ));
    s.push('\n');
}

pub(super) fn finite_points(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

pub(super) fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A line chart: one `<polyline>` per series with two or more finite points, one marker
/// `<path>` per series with exactly one, a legend on the right; dashed horizontal series
/// (reference lines) are also labelled at their right end. No finite point at all → a
/// "no data" plot.
pub fn line_plot_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_format: fn(f64) -> String,
) -> String {
    let clean: Vec<Vec<(f64, f64)>> = series.iter().map(|s| finite_points(&s.points)).collect();
    let all = || clean.iter().flatten();
    let (Some((xmin, xmax)), Some((ymin, ymax))) =
        (min_max(all().map(|p| p.0)), min_max(all().map(|p| p.1)))
    else {
        return no_data_svg(title);
    };
    let x_is_int = all().all(|p| p.0.fract() == 0.0);
    let x_ticks = if x_is_int {
        integer_ticks(xmin, xmax, 8)
    } else {
        nice_ticks(xmin, xmax, 6)
    };
    let y_ticks = nice_ticks(ymin, ymax, 5);
    let (left, top, plot_w, plot_h, legend_w, bottom): (f64, f64, f64, f64, f64, f64) =
        (80.0, 44.0, 500.0, 330.0, 210.0, 56.0);
    let width = left + plot_w + legend_w;
    let height = (top + plot_h + bottom).max(top + 24.0 + 20.0 * series.len() as f64);
    let ax = Axes {
        left,
        top,
        w: plot_w,
        h: plot_h,
        x0: x_ticks[0],
        x1: x_ticks[x_ticks.len() - 1],
        y0: y_ticks[0],
        y1: y_ticks[y_ticks.len() - 1],
    };
    let mut s = svg_open(width, height, title);
    let labelled: Vec<(f64, String)> = x_ticks.iter().map(|&t| (t, fmt_plain(t))).collect();
    draw_axes(&mut s, &ax, &labelled, &y_ticks, y_format, x_label, y_label);

    for (i, (ser, pts)) in series.iter().zip(&clean).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let width = if ser.width.is_finite() && ser.width > 0.0 {
            ser.width.min(12.0)
        } else {
            2.0
        };
        let dash = if ser.dashed {
            r#" stroke-dasharray="7 4""#
        } else {
            ""
        };
        let name = xml_escape(&ser.name);
        match pts.as_slice() {
            [] => {}
            [(x, y)] => {
                let (cx, cy, r) = (ax.px(*x), ax.py(*y), (width + 2.0).max(4.0));
                s.push_str(&format!(
                    r#"<g><title>{name}</title><path d="M{:.1},{cy:.1} a{r:.1},{r:.1} 0 1,0 {:.1},0 a{r:.1},{r:.1} 0 1,0 {:.1},0" fill="{colour}"/></g>"#,
                    cx - r,
                    2.0 * r,
                    -2.0 * r
                ));
                s.push('\n');
            }
            _ => {
                let coords: Vec<String> = pts
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", ax.px(x), ax.py(y)))
                    .collect();
                s.push_str(&format!(
                    r#"<g><title>{name}</title><polyline fill="none" stroke="{colour}" stroke-width="{width:.1}"{dash} stroke-linejoin="round" points="{}"/>"#,
                    coords.join(" ")
                ));
                if !ser.dashed && pts.len() <= 40 {
                    for &(x, y) in pts {
                        s.push_str(&format!(
                            r#"<circle cx="{:.1}" cy="{:.1}" r="{:.1}" fill="{colour}"/>"#,
                            ax.px(x),
                            ax.py(y),
                            (width * 0.9).max(2.2)
                        ));
                    }
                }
                s.push_str("</g>\n");
                let horizontal = pts.iter().all(|p| p.1 == pts[0].1);
                if let (true, true, Some(&(x, y))) = (ser.dashed, horizontal, pts.last()) {
                    s.push_str(&format!(
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{colour}">{}</text>"#,
                        ax.px(x) - 4.0,
                        ax.py(y) - 5.0,
                        xml_escape(&truncate(&ser.name, 40))
                    ));
                    s.push('\n');
                }
            }
        }
        // Legend entry: a short line in the series' style (a <line>, not counted as a series).
        let ly = top + 10.0 + 20.0 * i as f64;
        let lx = left + plot_w + 16.0;
        s.push_str(&format!(
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="{:.1}"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            width.min(5.0),
            lx + 32.0,
            ly + 4.0,
            xml_escape(&truncate(&ser.name, 26))
        ));
        s.push('\n');
    }
    s.push_str("</svg>\n");
    s
}

/// A grouped bar chart: one cluster per group, one `<rect class="bar">` per finite value,
/// error bars of ± err (skipped when err is not finite), legend on the right. The y axis
/// always includes 0, where bars start. No finite value → a "no data" plot.
pub fn grouped_bar_svg(
    title: &str,
    groups: &[String],
    bars: &[(String, Vec<(f64, f64)>)],
    y_label: &str,
) -> String {
    let value = |b: usize, g: usize| -> Option<(f64, f64)> {
        let &(v, e) = bars.get(b)?.1.get(g)?;
        v.is_finite()
            .then_some((v, if e.is_finite() { e.abs() } else { 0.0 }))
    };
    let cells =
        || (0..bars.len()).flat_map(move |b| (0..groups.len()).filter_map(move |g| value(b, g)));
    // Error bars extend the axis only away from zero: a nonnegative quantity such as accuracy
    // keeps its axis at 0 and the bar's lower whisker is clipped there.
    let extent = |(v, e): (f64, f64)| {
        if v >= 0.0 {
            [v, v + e, 0.0]
        } else {
            [v - e, v, 0.0]
        }
    };
    let Some((lo, hi)) = min_max(cells().flat_map(extent)) else {
        return no_data_svg(title);
    };
    let y_ticks = nice_ticks(lo, hi, 5);

    let bar_w = 16.0;
    let group_w = (bars.len() as f64 * bar_w + 24.0).max(60.0);
    let plot_w = (groups.len() as f64 * group_w).max(420.0);
    let group_w = plot_w / groups.len() as f64;
    let max_label = groups
        .iter()
        .map(|g| g.chars().count().min(30))
        .max()
        .unwrap_or(0);
    let rotate = max_label as f64 * 7.0 > group_w - 4.0;
    let (left, top, plot_h, legend_w): (f64, f64, f64, f64) = (80.0, 44.0, 320.0, 230.0);
    let bottom = if rotate {
        50.0 + max_label as f64 * 5.5
    } else {
        56.0
    };
    let width = left + plot_w + legend_w;
    let height = (top + plot_h + bottom).max(top + 24.0 + 20.0 * bars.len() as f64);
    let ax = Axes {
        left,
        top,
        w: plot_w,
        h: plot_h,
        x0: 0.0,
        x1: groups.len() as f64,
        y0: y_ticks[0],
        y1: y_ticks[y_ticks.len() - 1],
    };
    let mut s = svg_open(width, height, title);
    // Group labels are drawn below (rotated when long), so the axes get no x tick labels.
    draw_axes(&mut s, &ax, &[], &y_ticks, fmt_plain, "", y_label);

    let zero = ax.py(0.0);
    s.push_str(&format!(
        r##"<line x1="{:.1}" y1="{zero:.1}" x2="{:.1}" y2="{zero:.1}" stroke="#444444"/>"##,
        ax.left,
        ax.left + ax.w
    ));
    s.push('\n');
    let cluster_w = bars.len() as f64 * bar_w;
    for (g, name) in groups.iter().enumerate() {
        let gx = ax.left + g as f64 * group_w;
        let x0 = gx + (group_w - cluster_w) / 2.0;
        for (b, (series, _)) in bars.iter().enumerate() {
            let Some((v, e)) = value(b, g) else { continue };
            let colour = PALETTE[b % PALETTE.len()];
            let x = x0 + b as f64 * bar_w;
            let (y_top, y_bot) = (ax.py(v.max(0.0)), ax.py(v.min(0.0)));
            s.push_str(&format!(
                r#"<rect class="bar" x="{:.1}" y="{y_top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect>"#,
                x + 1.0,
                bar_w - 2.0,
                (y_bot - y_top).max(0.0),
                xml_escape(series),
                xml_escape(&format!("{} ± {}", trim_fixed(v, 2), trim_fixed(e, 2)))
            ));
            if e > 0.0 {
                let cx = x + bar_w / 2.0;
                let clip = |y: f64| ax.py(y.clamp(ax.y0, ax.y1));
                let (ya, yb) = (clip(v + e), clip(v - e));
                s.push_str(&format!(
                    r##"<line x1="{cx:.1}" y1="{ya:.1}" x2="{cx:.1}" y2="{yb:.1}" stroke="#222222"/><line x1="{:.1}" y1="{ya:.1}" x2="{:.1}" y2="{ya:.1}" stroke="#222222"/><line x1="{:.1}" y1="{yb:.1}" x2="{:.1}" y2="{yb:.1}" stroke="#222222"/>"##,
                    cx - 4.0,
                    cx + 4.0,
                    cx - 4.0,
                    cx + 4.0
                ));
            }
            s.push('\n');
        }
        let lx = gx + group_w / 2.0;
        let ly = ax.top + ax.h + 18.0;
        let label = xml_escape(&truncate(name, 30));
        if rotate {
            s.push_str(&format!(
                r#"<text transform="translate({lx:.1},{ly:.1}) rotate(-35)" text-anchor="end">{label}</text>"#
            ));
        } else {
            s.push_str(&format!(
                r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle">{label}</text>"#
            ));
        }
        s.push('\n');
    }
    for (b, (series, _)) in bars.iter().enumerate() {
        let colour = PALETTE[b % PALETTE.len()];
        let ly = top + 10.0 + 20.0 * b as f64;
        let lx = left + plot_w + 16.0;
        s.push_str(&format!(
            r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="12" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 6.0,
            lx + 20.0,
            ly + 4.0,
            xml_escape(&truncate(series, 28))
        ));
        s.push('\n');
    }
    s.push_str("</svg>\n");
    s
}
