//! Number and text formatting for tables, CSV, JSON and plot labels.

use serde_json::{Value, json};

pub(crate) fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// JSON has no NaN or infinity; null keeps the line parseable and the gap visible.
pub(crate) fn jnum(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

pub(crate) fn jopt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, jnum)
}

pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub(crate) fn csv_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

pub(crate) fn csv_opt(x: Option<f64>) -> String {
    x.map_or_else(String::new, csv_num)
}

pub(crate) fn pct_cell(a: Option<f64>) -> String {
    match a.filter(|a| a.is_finite()) {
        Some(a) => format!("{:.1}", a * 100.0),
        None => String::from("–"),
    }
}

pub(crate) fn loss_cell(l: f64) -> String {
    if l.is_finite() {
        format!("{l:.3}")
    } else {
        String::from("–")
    }
}

/// One line of Markdown text: newlines would end a table row or heading early.
pub(crate) fn md_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Text for a Markdown table cell: a raw `|` would split the cell.
pub(crate) fn md_escape(s: &str) -> String {
    md_line(s).replace('|', "\\|")
}

/// Escape text for SVG/XML; control characters XML 1.0 forbids become U+FFFD.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Fixed-point with at most `decimals` decimals, trailing zeros dropped (0.6000000001 → "0.6").
pub(crate) fn trim_fixed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        String::from("0")
    } else {
        s.to_string()
    }
}

/// A tick label: short, no float noise.
pub fn fmt_plain(v: f64) -> String {
    if !v.is_finite() {
        return String::from("–");
    }
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e15).contains(&a) {
        return format!("{v:e}");
    }
    trim_fixed(v, 6)
}

/// A value already in percent: `20` → "20%".
pub fn fmt_percent(v: f64) -> String {
    format!("{}%", fmt_plain(v))
}

/// Decimal units (1 KB = 1000 B) so that round byte ticks get round labels.
pub fn fmt_bytes(v: f64) -> String {
    if !v.is_finite() {
        return String::from("–");
    }
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut x = v;
    let mut u = 0;
    while x.abs() >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    format!("{} {}", trim_fixed(x, if u == 0 { 0 } else { 3 }), UNITS[u])
}
