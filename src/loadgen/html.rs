//! The bench run as one self-contained HTML page (`imgsvc-client bench
//! --report FILE.html`): a summary, a latency histogram, the percentiles
//! and throughput over time, drawn as inline SVG. No script, style sheet,
//! font or image is fetched: the file opens offline, in any browser, and
//! can be attached to a ticket as it is.

use std::{fmt::Write, time::Duration};

use super::{BenchReport, Sample, percentile_ms};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 36.0;
const TOP: f64 = 16.0;
const RIGHT: f64 = 16.0;

/// The page for one run.
pub fn render(report: &BenchReport, samples: &[Sample]) -> String {
    let mut ok: Vec<Duration> = samples.iter().filter(|s| s.code.is_none()).map(|s| s.latency).collect();
    ok.sort_unstable();
    let title = format!(
        "imgsvc bench: {:?} {}x{} {:?} via {:?}, concurrency {}",
        report.op, report.width, report.height, report.format, report.api, report.concurrency
    );
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222;background:#fff}}h1{{font-size:20px}}h2{{font-size:16px;margin-top:28px}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{background:#f0f0f0}}\
         svg text{{font-family:sans-serif;font-size:11px;fill:#333}}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(&title)
    );
    page.push_str(&summary(report));
    page.push_str("<h2>Latency histogram (successful calls)</h2>\n");
    page.push_str(&histogram(&ok));
    page.push_str("<h2>Latency percentiles</h2>\n");
    page.push_str(&percentiles(&ok));
    page.push_str("<h2>Throughput over time</h2>\n");
    page.push_str(&throughput(samples, Duration::from_secs_f64(report.elapsed_s)));
    page.push_str("<p>Written by imgsvc-client bench --report (docs/client.md#the-html-report).</p>\n</body></html>\n");
    page
}

fn summary(report: &BenchReport) -> String {
    let errors = if report.errors.is_empty() {
        "none".to_string()
    } else {
        report.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    };
    let rows = [
        ("calls OK", report.ok.to_string()),
        ("errors", errors),
        ("retries after a refusal", report.retries.to_string()),
        ("elapsed", format!("{:.2} s", report.elapsed_s)),
        ("throughput", format!("{:.1} calls/s", report.requests_per_s)),
        ("p50 / p90 / p99", format!("{:.2} / {:.2} / {:.2} ms", report.p50_ms, report.p90_ms, report.p99_ms)),
        ("max", format!("{:.2} ms", report.max_ms)),
    ];
    let mut out = String::from("<table id=\"summary\">\n");
    for (k, v) in rows {
        let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(&v));
    }
    out.push_str("</table>\n");
    out
}

/// An SVG frame with axes; `plot` adds the marks inside.
fn frame(id: &str, x_label: &str, y_label: &str, x_ticks: &[(f64, String)], y_max: f64, plot: &str) -> String {
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let mut out = format!(
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">\n\
         <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#fafafa\"/>\n"
    );
    for i in 0..=4 {
        let y = TOP + h - h * f64::from(i) / 4.0;
        let value = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + w,
            LEFT - 6.0,
            y + 4.0,
            short(value)
        );
    }
    for (x, label) in x_ticks {
        let px = LEFT + x * w;
        let _ = writeln!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#999\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + h,
            TOP + h + 4.0,
            TOP + h + 16.0,
            escape(label)
        );
    }
    out.push_str(plot);
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>\n</svg>\n",
        TOP + h,
        TOP + h,
        LEFT + w,
        TOP + h,
        LEFT + w / 2.0,
        HEIGHT - 4.0,
        escape(x_label),
        TOP + h / 2.0,
        TOP + h / 2.0,
        escape(y_label)
    );
    out
}

/// Calls per latency bin; bins evenly spaced on a log scale from the
/// fastest to the slowest call (latencies span orders of magnitude).
fn histogram(sorted: &[Duration]) -> String {
    const BINS: usize = 40;
    let Some((first, last)) = sorted.first().zip(sorted.last()) else {
        return "<p>No successful calls.</p>\n".into();
    };
    let lo = first.as_secs_f64().max(1e-6).ln();
    let hi = last.as_secs_f64().max(1e-6).ln().max(lo + 1e-3);
    let mut counts = [0u64; BINS];
    for d in sorted {
        let t = (d.as_secs_f64().max(1e-6).ln() - lo) / (hi - lo);
        counts[((t * BINS as f64) as usize).min(BINS - 1)] += 1;
    }
    let y_max = nice(*counts.iter().max().unwrap_or(&1) as f64);
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let bar = w / BINS as f64;
    let mut plot = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let bh = h * c as f64 / y_max;
        let _ = writeln!(
            plot,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3b7dd8\"><title>{c} calls</title></rect>",
            LEFT + bar * i as f64 + 1.0,
            TOP + h - bh,
            (bar - 2.0).max(1.0)
        );
    }
    let ticks: Vec<(f64, String)> = (0..=4).map(|i| (f64::from(i) / 4.0, ms((lo + (hi - lo) * f64::from(i) / 4.0).exp() * 1e3))).collect();
    frame("histogram", "latency (log scale)", "calls", &ticks, y_max, &plot)
}

fn percentiles(sorted: &[Duration]) -> String {
    const POINTS: [f64; 8] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0];
    if sorted.is_empty() {
        return "<p>No successful calls.</p>\n".into();
    }
    let values: Vec<f64> = POINTS.iter().map(|&p| percentile_ms(sorted, p)).collect();
    let y_max = nice(values.last().copied().unwrap_or(1.0));
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let step = w / POINTS.len() as f64;
    let mut plot = String::new();
    let mut table = String::from("<table id=\"percentiles\"><tr><th>percentile</th>");
    for p in POINTS {
        let _ = write!(table, "<th>p{p}</th>");
    }
    table.push_str("</tr><tr><th>ms</th>");
    for (i, v) in values.iter().enumerate() {
        let bh = h * v / y_max;
        let _ = writeln!(
            plot,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#e07b39\"><title>{v:.2} ms</title></rect>",
            LEFT + step * i as f64 + step * 0.2,
            TOP + h - bh,
            step * 0.6
        );
        let _ = write!(table, "<td>{v:.2}</td>");
    }
    table.push_str("</tr></table>\n");
    let ticks: Vec<(f64, String)> =
        POINTS.iter().enumerate().map(|(i, p)| ((i as f64 + 0.5) / POINTS.len() as f64, format!("p{p}"))).collect();
    frame("percentile-chart", "percentile", "latency (ms)", &ticks, y_max, &plot) + &table
}

/// Successful and failed calls per second, in 10 to 60 time bins.
fn throughput(samples: &[Sample], elapsed: Duration) -> String {
    if samples.is_empty() {
        return "<p>No calls.</p>\n".into();
    }
    let total = elapsed.as_secs_f64().max(1e-3);
    let bins = ((total * 10.0).ceil() as usize).clamp(10, 60);
    let width_s = total / bins as f64;
    let (mut ok, mut failed) = (vec![0u64; bins], vec![0u64; bins]);
    for s in samples {
        let i = ((s.finished.as_secs_f64() / width_s) as usize).min(bins - 1);
        let counts = if s.code.is_none() { &mut ok } else { &mut failed };
        counts[i] += 1;
    }
    let rate = |c: u64| c as f64 / width_s;
    let y_max = nice(ok.iter().chain(&failed).map(|&c| rate(c)).fold(1.0, f64::max));
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let line = |counts: &[u64], colour: &str| {
        let points: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("{:.1},{:.1}", LEFT + w * (i as f64 + 0.5) / bins as f64, TOP + h - h * rate(c) / y_max))
            .collect();
        format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n", points.join(" "))
    };
    let mut plot = line(&ok, "#2e9e4f");
    if failed.iter().any(|&c| c > 0) {
        plot.push_str(&line(&failed, "#d23c3c"));
    }
    let _ = writeln!(
        plot,
        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"#2e9e4f\"/><text x=\"{:.1}\" y=\"{:.1}\">OK</text>\
         <rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"#d23c3c\"/><text x=\"{:.1}\" y=\"{:.1}\">failed</text>",
        LEFT + w - 110.0,
        TOP + 4.0,
        LEFT + w - 96.0,
        TOP + 13.0,
        LEFT + w - 60.0,
        TOP + 4.0,
        LEFT + w - 46.0,
        TOP + 13.0
    );
    let ticks: Vec<(f64, String)> = (0..=4).map(|i| (f64::from(i) / 4.0, format!("{:.1} s", total * f64::from(i) / 4.0))).collect();
    frame("throughput", "time since start", "calls per second", &ticks, y_max, &plot)
}

/// A round axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&m| m >= v).unwrap_or(10.0 * magnitude)
}

fn short(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn ms(v: f64) -> String {
    if v >= 10.0 { format!("{v:.0} ms") } else { format!("{v:.2} ms") }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{BenchApi, BenchFormat, BenchOp};

    fn report(ok: u64) -> BenchReport {
        BenchReport {
            op: BenchOp::Mean,
            api: BenchApi::V1,
            width: 8,
            height: 8,
            format: BenchFormat::Gray8,
            concurrency: 2,
            ok,
            errors: Default::default(),
            elapsed_s: 2.0,
            requests_per_s: ok as f64 / 2.0,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms: 3.0,
            max_ms: 4.0,
            retries: 0,
        }
    }

    #[test]
    fn the_page_is_self_contained_with_three_charts() {
        let samples: Vec<Sample> = (1..=200u64)
            .map(|i| Sample {
                finished: Duration::from_millis(i * 10),
                latency: Duration::from_micros(500 + i * 37 % 4000),
                code: (i % 50 == 0).then_some(tonic::Code::ResourceExhausted),
            })
            .collect();
        let page = render(&report(196), &samples);
        for id in ["histogram", "percentile-chart", "throughput"] {
            assert!(page.contains(&format!("<svg id=\"{id}\"")), "{id}");
        }
        assert_eq!(page.matches("<rect x=").count() - 3, 40 + 8 + 2, "a background per chart, 40 bins, 8 percentiles, 2 legend keys");
        // Nothing to fetch: no script, no link, no src, no url().
        for outside in ["<script", "<link", "src=", "url(", "http://www.w3.org/2000/svg\" href"] {
            assert!(!page.contains(outside), "{outside}");
        }
    }

    #[test]
    fn an_empty_run_still_renders() {
        let page = render(&report(0), &[]);
        assert!(page.contains("No successful calls.") && page.contains("No calls."));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!((nice(0.0), nice(3.0), nice(7.0), nice(10.0), nice(0.013)), (1.0, 5.0, 10.0, 10.0, 0.02));
    }
}
