//! The SVG chart of a run: live-delivery latency per second (p50, p90, p99, max), the
//! relay's added p99 and loadgen's own lag p99 beside it, on a log scale; the phases of the
//! run as bands, scenario events as lines, and a strip of connection drops and GOAWAYs per
//! second under the plot. The legend sits below, off the data.
//!
//! Owns: drawing. Must not touch: measuring (everything comes from a [`RunReport`]).
//!
//! Why the lag line: the "relay added" figure is end to end minus the link's share, so it
//! includes loadgen's own scheduling delay. Where the dotted lag line runs close to the
//! dashed relay line, loadgen was starved and the relay is not to blame.

use std::fmt::Write as _;

use crate::run::{RunReport, SecondPoint};

const W: f64 = 960.0;
const H: f64 = 600.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 64.0;
/// Height of the latency plot.
const PLOT_H: f64 = 360.0;
/// Gap between the plot and the drops strip, and the strip's height.
const STRIP_GAP: f64 = 10.0;
const STRIP_H: f64 = 40.0;

type Line = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SecondPoint) -> f64,
);

const LINES: [Line; 6] = [
    ("p50", "#1f77b4", "", |p| p.latency.p50),
    ("p90", "#2ca02c", "", |p| p.latency.p90),
    ("p99", "#ff7f0e", "", |p| p.latency.p99),
    ("max", "#d62728", "", |p| p.latency.max),
    (
        "relay added p99",
        "#7f7f7f",
        r#" stroke-dasharray="6,3""#,
        |p| p.relay_added.p99,
    ),
    (
        "loadgen lag p99",
        "#9467bd",
        r#" stroke-dasharray="2,2""#,
        |p| p.loadgen_lag.p99,
    ),
];

/// The chart (see the module docs).
pub fn to_svg(r: &RunReport) -> String {
    let pw = W - LEFT - RIGHT;
    let max_sec = r
        .series
        .last()
        .map_or(1.0, |p| f64::from(p.sec.max(1)) + 1.0)
        .max(r.timeline.total_s);
    let top_ms = r
        .series
        .iter()
        .flat_map(|p| [p.latency.max, p.loadgen_lag.p99, p.relay_added.p99])
        .fold(10.0_f64, f64::max);
    let decades = top_ms.log10().ceil().max(1.0);
    let x = |sec: f64| LEFT + pw * (sec / max_sec).clamp(0.0, 1.0);
    let y = |ms: f64| {
        let v = ms.max(1.0).log10().clamp(0.0, decades);
        TOP + PLOT_H * (1.0 - v / decades)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}: live delivery latency per second, with what the relay added and loadgen's own lag</text>"#,
        W / 2.0,
        xml(&r.name)
    );
    phases(&mut s, r, &x);
    grid(&mut s, decades, max_sec, &x, &y);
    for (label, colour, dash, get) in LINES {
        let pts: Vec<String> = r
            .series
            .iter()
            .filter(|p| get(p) > 0.0)
            .map(|p| format!("{:.1},{:.1}", x(f64::from(p.sec) + 0.5), y(get(p))))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"><title>{label}</title></polyline>"#,
                pts.join(" ")
            );
        }
    }
    events(&mut s, r, &x);
    strip(&mut s, r, &x);
    legend(&mut s);
    s.push_str("</svg>\n");
    s
}

/// Phase bands (ramp, settle, steady, drain) across the plot, labelled above it.
fn phases(s: &mut String, r: &RunReport, x: &impl Fn(f64) -> f64) {
    let t = &r.timeline;
    let mut at = 0.0;
    for (label, len, fill) in [
        ("ramp", t.ramp_s, "#eef4fb"),
        ("settle", t.settle_s, "#f7f7f7"),
        ("steady", t.steady_s, "#ffffff"),
        ("drain", t.drain_s, "#f3f0f8"),
    ] {
        let (x0, x1) = (x(at), x(at + len));
        at += len;
        if x1 - x0 < 0.5 {
            continue;
        }
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{PLOT_H}" fill="{fill}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
            x1 - x0,
            (x0 + x1) / 2.0,
            TOP - 8.0
        );
    }
}

fn grid(
    s: &mut String,
    decades: f64,
    max_sec: f64,
    x: &impl Fn(f64) -> f64,
    y: &impl Fn(f64) -> f64,
) {
    let pw = W - LEFT - RIGHT;
    for d in 0..=decades as u32 {
        let ms = 10f64.powi(d as i32);
        let yy = y(ms);
        let label = if ms >= 1000.0 {
            format!("{} s", ms / 1000.0)
        } else {
            format!("{ms} ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    let step = [1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|&st| max_sec / f64::from(st) <= 12.0)
        .unwrap_or(3600);
    let axis_y = TOP + PLOT_H + STRIP_GAP + STRIP_H;
    let mut sec = 0;
    while f64::from(sec) <= max_sec {
        let xx = x(f64::from(sec));
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{sec}</text>"##,
            TOP + PLOT_H,
            axis_y + 16.0
        );
        sec += step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{PLOT_H}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start</text>"#,
        LEFT + pw / 2.0,
        axis_y + 34.0
    );
    let mid = TOP + PLOT_H / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="16" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 16 {mid:.1})">latency (log scale)</text>"#
    );
}

/// Scenario events as vertical lines through the plot and the strip.
fn events(s: &mut String, r: &RunReport, x: &impl Fn(f64) -> f64) {
    for e in &r.events {
        let xx = x(e.at_s);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#8c564b" stroke-width="1.5" stroke-dasharray="4,2"/><text x="{:.1}" y="{:.1}" fill="#8c564b">{}</text>"##,
            TOP - 20.0,
            TOP + PLOT_H + STRIP_GAP + STRIP_H,
            xx + 3.0,
            TOP - 22.0,
            xml(&e.label)
        );
    }
}

/// Connection drops (red) and GOAWAYs (grey) per second, as bars under the plot.
fn strip(s: &mut String, r: &RunReport, x: &impl Fn(f64) -> f64) {
    let y0 = TOP + PLOT_H + STRIP_GAP;
    let pw = W - LEFT - RIGHT;
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{y0}" width="{pw}" height="{STRIP_H}" fill="none" stroke="#999"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">drops</text><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">GOAWAY</text>"##,
        LEFT - 6.0,
        y0 + 14.0,
        LEFT - 6.0,
        y0 + 30.0
    );
    let most = r
        .series
        .iter()
        .map(|p| p.drops.max(p.goaways))
        .max()
        .unwrap_or(0);
    if most == 0 {
        return;
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555">max {most}/s</text>"##,
        LEFT + 4.0,
        y0 + 11.0
    );
    for p in &r.series {
        let (x0, x1) = (x(f64::from(p.sec)), x(f64::from(p.sec) + 1.0));
        let bw = ((x1 - x0) / 2.0).max(0.5);
        for (k, n, colour) in [(0.0, p.drops, "#d62728"), (1.0, p.goaways, "#7f7f7f")] {
            if n == 0 {
                continue;
            }
            let bh = (STRIP_H - 2.0) * n as f64 / most as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{bh:.1}" fill="{colour}"><title>{} at {}-{} s: {n}</title></rect>"#,
                x0 + k * bw,
                y0 + STRIP_H - 1.0 - bh,
                if k == 0.0 { "drops" } else { "GOAWAY" },
                p.sec,
                p.sec + 1
            );
        }
    }
}

/// The legend, in a row below the axis title: never on the data.
fn legend(s: &mut String) {
    let y = H - 14.0;
    let mut lx = LEFT;
    for (label, colour, dash, _) in LINES {
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"{dash}/><text x="{:.1}" y="{y:.1}">{label}</text>"#,
            y - 4.0,
            lx + 22.0,
            y - 4.0,
            lx + 27.0
        );
        lx += 32.0 + 7.0 * label.len() as f64;
    }
    for (label, colour) in [("drops/s", "#d62728"), ("GOAWAY/s", "#7f7f7f")] {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{y:.1}">{label}</text>"#,
            y - 10.0,
            lx + 14.0
        );
        lx += 24.0 + 7.0 * label.len() as f64;
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::metrics::{Counters, Metrics, Summary};
    use crate::run::{EventMark, GapSummary, PublishAccount, Timeline};
    use crate::verify::{FinalSummary, Violations};

    fn report() -> RunReport {
        let ms = |v: f64| Summary {
            count: 10,
            p50: v,
            p90: v,
            p99: v,
            p999: v,
            max: v,
            mean: v,
        };
        RunReport {
            name: "chart".into(),
            phones: 10,
            rooms: Default::default(),
            threads: 1,
            profiles: vec!["3g".into()],
            phones_per_profile: vec![10],
            timeline: Timeline {
                ramp_s: 2.0,
                settle_s: 1.0,
                steady_s: 10.0,
                drain_s: 3.0,
                total_s: 16.0,
            },
            metrics: Metrics::new(1, false),
            api: Counters::default(),
            violations: Violations::default(),
            summary: FinalSummary::default(),
            series: (0..16)
                .map(|sec| SecondPoint {
                    sec,
                    deliveries: 100,
                    published: 10,
                    latency: ms(200.0),
                    relay_added: ms(5.0),
                    connected: 10,
                    loadgen_lag: ms(2.0),
                    drops: u64::from(sec == 8) * 10,
                    goaways: u64::from(sec == 9) * 7,
                })
                .collect(),
            events: vec![EventMark {
                at_s: 8.0,
                label: "drop 100%".into(),
            }],
            run_id: "r1".into(),
            publishes: PublishAccount::default(),
            gap_summary: GapSummary::default(),
        }
    }

    /// Phases, the event, the drops strip and loadgen's lag are drawn; the legend lies below
    /// everything that carries data.
    #[test]
    fn phases_events_lag_and_a_legend_off_the_data() {
        let svg = to_svg(&report());
        for phase in ["ramp", "settle", "steady", "drain"] {
            assert!(svg.contains(&format!(">{phase}</text>")), "{phase}");
        }
        assert!(svg.contains(">drop 100%</text>"));
        assert!(svg.contains("<title>loadgen lag p99</title>"));
        assert!(svg.contains("<title>drops at 8-9 s: 10</title>"));
        assert!(svg.contains("<title>GOAWAY at 9-10 s: 7</title>"));
        let data_bottom = TOP + PLOT_H + STRIP_GAP + STRIP_H;
        for label in LINES.iter().map(|l| l.0).chain(["drops/s", "GOAWAY/s"]) {
            let text = format!(">{label}</text>");
            let at = svg.find(&text).unwrap();
            let y_attr = svg[..at].rfind(" y=\"").unwrap() + 4;
            let y: f64 = svg[y_attr..].split('"').next().unwrap().parse().unwrap();
            assert!(y > data_bottom + 30.0, "legend {label} at y {y}");
        }
    }
}
