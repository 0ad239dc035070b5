//! What a run leaves besides its JSON report (issue 5 item 3): a
//! latency-percentile plot (PNG, the HdrHistogram "percentile
//! distribution" chart), a Markdown row appended to a results file, and
//! the percentile curves both are drawn from.
//!
//! Every latency object of a report (`Percentiles`, anywhere in the JSON)
//! carries its `curve`: `[percentile, µs]` points at four per decade of
//! nines (0 %, 43.8 %, 68.4 %, 82.2 %, 90 %, ..., 99.99 %, ...) up to the last one the
//! sample size supports, and the maximum. The plot draws every curve it
//! finds in the report, labelled by its path in the JSON, so a scenario
//! gets its plot by reporting its histograms, without plotting code of
//! its own.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::Value;

/// Points per decade of nines on the curve.
const STEPS_PER_DECADE: u32 = 4;
/// The curve stops at 99.9999 % even for larger samples.
const MAX_NINES: f64 = 6.0;
const PLOT_SIZE: (u32, u32) = (1200, 720);

/// The curve of a histogram: `[percentile, value]` pairs, percentiles in
/// percent, increasing; the last point is the maximum at 100 %. Empty for
/// an empty histogram.
pub fn curve(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    // The tail a sample supports: with n values, the 1 - 1/n quantile is
    // the last that is not the maximum itself.
    let supported = (h.len() as f64).log10().min(MAX_NINES);
    let mut points = Vec::new();
    let mut step = 0;
    loop {
        let nines = f64::from(step) / f64::from(STEPS_PER_DECADE);
        if nines > supported {
            break;
        }
        let q = 1.0 - 10f64.powf(-nines);
        let q = if step == 0 { 0.0 } else { q };
        points.push([round(q * 100.0, 6), h.value_at_quantile(q) as f64]);
        step += 1;
    }
    points.push([100.0, h.max() as f64]);
    points
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Every `curve` in the report with its path (`latency_us`,
/// `stages.tls`, `baseline.latency_us`, ...), in document order.
pub fn curves(report: &Value) -> Vec<(String, Vec<[f64; 2]>)> {
    let mut found = Vec::new();
    walk(report, String::new(), &mut found);
    found
}

fn walk(v: &Value, path: String, found: &mut Vec<(String, Vec<[f64; 2]>)>) {
    let Value::Object(map) = v else { return };
    if let Some(Value::Array(points)) = map.get("curve") {
        let points: Vec<[f64; 2]> = points
            .iter()
            .filter_map(|p| Some([p.get(0)?.as_f64()?, p.get(1)?.as_f64()?]))
            .collect();
        // A scenario that reports the same histogram twice (baseline's
        // top level and its `baseline` section) draws it once.
        if !points.is_empty() && !found.iter().any(|(_, p)| *p == points) {
            found.push((path.clone(), points));
        }
    }
    for (key, child) in map {
        let child_path = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        walk(child, child_path, found);
    }
}

/// `FILE.json` → `FILE.png`.
pub fn plot_path(json: &Path) -> PathBuf {
    json.with_extension("png")
}

/// The x coordinate of a percentile: its nines, log10(1 / (1 - p)), so
/// 90 % is 1, 99 % is 2. 100 % (the maximum) sits half a decade past the
/// last finite point.
fn nines(percent: f64, last_finite: f64) -> f64 {
    if percent >= 100.0 {
        last_finite + 0.5
    } else {
        -(1.0 - percent / 100.0).log10()
    }
}

fn nines_label(x: f64) -> String {
    if x <= 0.0 {
        return "0%".into();
    }
    let p = (1.0 - 10f64.powf(-x)) * 100.0;
    // 90, 99, 99.9 ... read better without trailing noise.
    let digits = (x.ceil() as usize).saturating_sub(2);
    format!("{p:.digits$}%")
}

/// Where the plot's font comes from: ab_glyph needs the bytes of a
/// TrueType file (plotters' fontconfig path would need the C library).
/// Debian's fonts-dejavu-core is on every machine of this kind; another
/// file can be named with COAP_GATEWAY_BENCH_FONT.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let from_env = std::env::var_os("COAP_GATEWAY_BENCH_FONT").map(PathBuf::from);
        let candidates: Vec<PathBuf> = from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered once per process and used until exit.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{} is not a TrueType font", path.display()));
            }
        }
        Err(format!(
            "no font for the plot's text (tried {}); install fonts-dejavu-core or set COAP_GATEWAY_BENCH_FONT",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
    .clone()
}

/// Draws every latency curve of `report` into a PNG at `path`. A report
/// without latencies draws nothing and returns `Ok(false)`.
pub fn write_plot(report: &Value, path: &Path) -> Result<bool, String> {
    let series = curves(report);
    if series.is_empty() {
        return Ok(false);
    }
    register_font()?;
    let last_finite = series
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .filter(|p| p[0] < 100.0)
        .map(|p| nines(p[0], 0.0))
        .fold(0.0, f64::max);
    let x_max = last_finite + 0.6;
    let y_min = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p[1]))
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let y_max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p[1]))
        .fold(1.0, f64::max);
    let title = format!(
        "{} — latency by percentile ({} devices)",
        report["scenario"].as_str().unwrap_or("run"),
        report["devices"]
    );
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(90)
            .build_cartesian_2d(0f64..x_max, ((y_min * 0.8)..(y_max * 1.25)).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile (max at the right end)")
            .y_desc("latency, µs (log)")
            .x_labels(x_max.ceil() as usize + 1)
            .x_label_formatter(&|x| nines_label(*x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| (nines(p[0], last_finite), p[1].max(1.0)))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    Ok(true)
}

/// A cell of the Markdown row: `|` would end the cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn fmt_num(v: &Value) -> Option<String> {
    let x = v.as_f64()?;
    Some(if x.fract() == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    })
}

/// Errors of a report: its `total` when it has one, else the sum of its
/// counters (scenarios count errors by kind; `samples` are messages).
fn error_count(errors: &Value) -> u64 {
    match errors {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::Object(map) => match map.get("total").and_then(Value::as_u64) {
            Some(total) => total,
            None => map
                .iter()
                .filter(|(k, _)| k.as_str() != "samples")
                .map(|(_, v)| error_count(v))
                .sum(),
        },
        _ => 0,
    }
}

/// `{"ratio_min": 0.9, "met": true}` → `ratio_min 0.9`.
fn goal_text(goal: &Value) -> String {
    match goal {
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| k.as_str() != "met")
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

/// The key figures of a report in one Markdown table row: date, scenario,
/// command, throughput, latency percentiles, gateway CPU and memory, lost
/// and duplicated messages, errors, goal and whether it was met, the JSON
/// file.
pub fn markdown_row(report: &Value, date: &str, json: Option<&Path>) -> String {
    let mut figures = String::new();
    let mut add = |label: &str, v: &Value| {
        if let Some(s) = fmt_num(v) {
            if !figures.is_empty() {
                figures.push_str("; ");
            }
            let _ = write!(figures, "{label} {s}");
        }
    };
    add("throughput/s", &report["throughput_per_s"]);
    let lat = &report["latency_us"];
    for key in ["p50", "p99", "p999", "max"] {
        add(&format!("{key} µs"), &lat[key]);
    }
    let gw = &report["gateway"];
    add("gateway CPU-s", &gw["cpu_seconds"]);
    add("gateway RSS bytes", &gw["rss_bytes"]);
    add("bytes/device", &gw["bytes_per_device"]);
    add("lost", &report["lost"]);
    add("duplicated", &report["duplicated"]);
    add("errors", &Value::from(error_count(&report["errors"])));
    let goal = &report["goal"];
    let verdict = match goal["met"].as_bool() {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "—",
    };
    let file = json
        .map(|p| format!("`{}`", p.display()))
        .unwrap_or_default();
    format!(
        "| {date} | {} | `{}` | {} | {} | {verdict} | {file} |",
        cell(report["scenario"].as_str().unwrap_or("?")),
        cell(report["command"].as_str().unwrap_or("")),
        cell(&figures),
        cell(&goal_text(goal)),
    )
}

/// The heading of the table the harness appends to.
pub const LOG_HEADING: &str = "## Run log (appended by coap-gateway-bench --results-md)";
const LOG_TABLE_HEAD: &str = "| Date | Scenario | Command | Figures | Goal | Verdict | Report |\n|---|---|---|---|---|---|---|";

/// Appends `row` to the run-log table at the end of `path`, creating the
/// heading and the table head when the file does not end with that table
/// yet (so hand-written tables above it are never touched).
pub fn append_row(path: &Path, row: &str) -> Result<(), String> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let ends_with_log = existing.rfind(LOG_HEADING).is_some_and(|at| {
        existing[at..]
            .lines()
            .skip(1)
            .all(|l| l.starts_with('|') || l.trim().is_empty())
    });
    let mut out = String::new();
    if !ends_with_log {
        if !existing.is_empty() && !existing.ends_with("\n\n") {
            out.push_str(if existing.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            });
        }
        let _ = write!(out, "{LOG_HEADING}\n\n{LOG_TABLE_HEAD}\n");
    } else if !existing.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(row);
    out.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.write_all(out.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filled(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = crate::load::histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn curve_of_a_uniform_sample_follows_its_quantiles() {
        let h = filled(1..=10_000);
        let c = curve(&h);
        // 0 to 4 nines at 4 steps per decade (17 points) plus the max.
        assert_eq!(c.len(), 18, "{c:?}");
        assert_eq!(c[0][0], 0.0);
        let last = c.last().unwrap();
        // The max is reported at the histogram's precision (3 digits).
        assert!(
            last[0] == 100.0 && (last[1] - 10_000.0).abs() <= 10.0,
            "{last:?}"
        );
        let at = |p: f64| c.iter().find(|x| (x[0] - p).abs() < 1e-6).unwrap()[1];
        // 3 significant digits: within 0.1 % of the exact quantile.
        assert!((at(90.0) - 9_000.0).abs() <= 9.0, "{}", at(90.0));
        assert!((at(99.0) - 9_900.0).abs() <= 10.0, "{}", at(99.0));
        assert!(c
            .windows(2)
            .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]));
    }

    #[test]
    fn a_small_sample_stops_at_the_tail_it_supports() {
        let c = curve(&filled([5, 7, 9, 11, 13, 15, 17, 19, 21, 100]));
        // 10 values: up to 1 nine (90 %), then the max.
        assert_eq!(c.len(), 6, "{c:?}");
        assert_eq!(c[4][0], 90.0);
        assert!(c[5][0] == 100.0 && (c[5][1] - 100.0).abs() <= 0.1, "{c:?}");
        assert!(curve(&crate::load::histogram()).is_empty());
    }

    #[test]
    fn curves_are_found_anywhere_in_a_report_with_their_paths() {
        let report = json!({
            "scenario": "connect",
            "latency_us": {"p50": 1, "curve": [[0.0, 1.0], [100.0, 3.0]]},
            "stages": {"tls": {"curve": [[0.0, 2.0]]}, "empty": {"curve": []},
                       "tls_copy": {"curve": [[0.0, 2.0]]}},
            "baseline": {"latency_us": {"curve": [[0.0, 4.0], ["bad", 1]]}},
        });
        let found: Vec<String> = curves(&report).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found, ["baseline.latency_us", "latency_us", "stages.tls"]);
        assert_eq!(curves(&report)[0].1, vec![[0.0, 4.0]]);
    }

    #[test]
    fn plot_is_a_png_with_every_curve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.png");
        let a = curve(&filled(1..=1000));
        let b = curve(&filled((1..=1000).map(|v| v * 3)));
        let report = json!({"scenario": "notify", "devices": 50,
            "latency_us": {"curve": a}, "baseline": {"latency_us": {"curve": b}}});
        assert!(write_plot(&report, &path).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 10_000,
            "a drawn chart, not a blank: {}",
            bytes.len()
        );
        // No latencies: nothing drawn, no file.
        let none = dir.path().join("none.png");
        assert!(!write_plot(&json!({"scenario": "idle"}), &none).unwrap());
        assert!(!none.exists());
    }

    #[test]
    fn markdown_row_has_the_key_figures_and_escapes_pipes() {
        let report = json!({
            "scenario": "notify", "command": "coap-gateway-bench notify --a|b",
            "throughput_per_s": 12345.6, "latency_us": {"p50": 10, "p99": 99, "p999": 150, "max": 400},
            "gateway": {"cpu_seconds": 1.25, "rss_bytes": 1000, "bytes_per_device": null},
            "lost": 0, "duplicated": 0,
            "errors": {"devices_closed": 1, "thread_errors": 1, "samples": ["x"], "by": {"tls": 1}},
            "goal": {"notifications_per_cpu_s_min": 100000.0, "met": false},
        });
        let row = markdown_row(
            &report,
            "2026-11-26",
            Some(Path::new("perf/results/x.json")),
        );
        assert_eq!(
            row,
            "| 2026-11-26 | notify | `coap-gateway-bench notify --a\\|b` | throughput/s 12346; p50 µs 10; p99 µs 99; p999 µs 150; max µs 400; gateway CPU-s 1.250; gateway RSS bytes 1000; lost 0; duplicated 0; errors 3 | notifications_per_cpu_s_min 100000.0 | **missed** | `perf/results/x.json` |"
        );
    }

    #[test]
    fn rows_append_under_one_heading_after_hand_written_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("RESULTS.md");
        std::fs::write(&path, "# Results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n").unwrap();
        append_row(&path, "| r1 |").unwrap();
        append_row(&path, "| r2 |").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(LOG_HEADING).count(), 1, "{text}");
        assert!(text.starts_with("# Results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Run log"));
        assert!(
            text.ends_with("|---|---|---|---|---|---|---|\n| r1 |\n| r2 |\n"),
            "{text}"
        );
        // Text written after the log starts a new log below it.
        std::fs::write(&path, format!("{text}\nA note.\n")).unwrap();
        append_row(&path, "| r3 |").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(LOG_HEADING).count(), 2);
        assert!(text.ends_with("A note.\n\n## Run log (appended by coap-gateway-bench --results-md)\n\n| Date | Scenario | Command | Figures | Goal | Verdict | Report |\n|---|---|---|---|---|---|---|\n| r3 |\n"));
        // A new file gets the heading.
        let fresh = dir.path().join("new.md");
        append_row(&fresh, "| x |").unwrap();
        assert!(std::fs::read_to_string(&fresh)
            .unwrap()
            .starts_with(LOG_HEADING));
    }
}
