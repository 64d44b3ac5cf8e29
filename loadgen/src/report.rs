//! Reports of a run: a table for people, JSON for machines, and an SVG chart of latency
//! percentiles over time.
//!
//! Owns: formatting. Must not touch: measuring (everything comes from a [`RunReport`]).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::metrics::{Breakdown, Summary};
use crate::plan::Bucket;
use crate::run::{RunReport, SecondPoint};
use crate::verify::Kind;

const HEAD: &str =
    "                              count       p50       p90       p99     p99.9       max";

fn row(out: &mut String, label: &str, h: &Histogram<u64>) {
    let s = Summary::of(h);
    if s.count == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "{label:<26} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        s.count, s.p50, s.p90, s.p99, s.p999, s.max
    );
}

fn breakdown(out: &mut String, title: &str, b: &Breakdown, r: &RunReport) {
    let _ = writeln!(out, "\n{title}, ms\n{HEAD}");
    row(out, "all", &b.all);
    for (name, h) in r.profiles.iter().zip(&b.by_profile) {
        row(out, &format!("  receiver on {name}"), h);
    }
    for bucket in Bucket::ALL {
        row(
            out,
            &format!("  fan-out {}", bucket.label()),
            &b.by_bucket[bucket.index()],
        );
    }
}

fn per(total: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { total as f64 / n as f64 }
}

/// The table for people.
pub fn table(r: &RunReport) -> String {
    let m = &r.metrics;
    let c = &m.counters;
    let t = &r.timeline;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pabal loadgen: {} - {} phones on {} thread(s); ramp {:.1} s, settle {:.1} s, steady {:.1} s, drain {:.1} s",
        r.name, r.phones, r.threads, t.ramp_s, t.settle_s, t.steady_s, t.drain_s
    );
    let mix: Vec<String> = r
        .profiles
        .iter()
        .zip(&r.phones_per_profile)
        .map(|(p, n)| format!("{p} {n}"))
        .collect();
    let rooms: Vec<String> = r.rooms.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        out,
        "links: {}; rooms: {}",
        mix.join(", "),
        rooms.join(", ")
    );
    breakdown(
        &mut out,
        "live delivery latency, end to end from the intended send time",
        &m.e2e,
        r,
    );
    breakdown(
        &mut out,
        "link model alone (sender's uplink + receiver's downlink)",
        &m.link,
        r,
    );
    breakdown(
        &mut out,
        "relay added (end to end minus the link's share, per delivery)",
        &m.relay,
        r,
    );
    let _ = writeln!(out, "\nconnections, ms\n{HEAD}");
    row(&mut out, "connect (TCP -> WELCOME)", &m.connect);
    row(&mut out, "reconnect (TCP -> WELCOME)", &m.reconnect);
    row(&mut out, "resume (TCP -> caught up)", &m.resume);
    row(&mut out, "missed, delivered on resume", &m.resumed);
    row(&mut out, "first message after idle", &m.after_idle);
    row(&mut out, "loadgen lag (due -> handled)", &m.timer_lag);
    let published = c.published + r.api.published;
    let acked = c.acked + r.api.acked;
    let _ = writeln!(
        out,
        "\ntraffic: {published} published ({acked} acknowledged, {} refused, {} unacknowledged when \
         their connection ended, {} skipped while offline, {} skipped before the room was bound); \
         {} delivered ({} live, {} on resume)",
        c.refused + r.api.refused,
        c.unacked_at_close,
        c.skipped_offline,
        c.skipped_unbound,
        c.delivered,
        c.delivered - c.delivered_resumed,
        c.delivered_resumed
    );
    let _ = writeln!(
        out,
        "bytes on the wire: {:.1} B down per delivery ({:.1} MB in all), {:.1} B up per publish \
         ({:.1} MB in all); link share unknown for {} deliveries",
        per(c.bytes_down, c.delivered),
        c.bytes_down as f64 / 1e6,
        per(c.bytes_up, c.published),
        c.bytes_up as f64 / 1e6,
        c.link_unknown
    );
    let goaways: Vec<String> = c.goaways.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let errors: Vec<String> = c.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        out,
        "connections: {} attempts, {} failed, {} welcomed ({} reconnects); drops: {} by handover, \
         {} by the scenario, {} NAT blackholes, {} keepalive timeouts, {} closed by the relay; \
         GOAWAY: {}; errors: {}",
        c.connects,
        c.connect_failures,
        c.welcomes,
        c.reconnects,
        c.link_drops,
        c.scripted_drops,
        c.blackholes,
        c.keepalive_timeouts,
        c.closed_by_relay,
        if goaways.is_empty() {
            "none".into()
        } else {
            goaways.join(", ")
        },
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        },
    );
    let s = &r.summary;
    let v = &r.violations;
    let _ = writeln!(
        out,
        "\nverification: {} (phone, room) pairs; {} caught up; announced losses: {} GAPs covering \
         {} messages, {} epoch resets; not judged: {} pairs still receiving ({} messages), {} \
         pairs offline at the end ({} messages); {} memberships never bound",
        s.pairs,
        s.caught_up,
        c.gaps,
        c.gap_messages,
        c.epoch_resets,
        s.behind_receiving,
        s.behind_receiving_messages,
        s.behind_offline,
        s.behind_offline_messages,
        s.never_bound
    );
    let _ = writeln!(
        out,
        "violations: silent loss {} ({} messages), duplicates {}, skip/repeat/reorder {}, content \
         {}, cursor jumps {}, malformed {}, misrouted {}",
        v.count(Kind::SilentLoss),
        v.messages.get(&Kind::SilentLoss).copied().unwrap_or(0),
        v.count(Kind::Duplicate),
        v.count(Kind::Session),
        v.count(Kind::Content),
        v.count(Kind::CursorJump),
        v.count(Kind::Malformed),
        v.count(Kind::Misrouted)
    );
    for e in v.examples.iter().take(20) {
        let _ = writeln!(out, "  - {e}");
    }
    let _ = writeln!(
        out,
        "RESULT: {}",
        if r.passed() {
            "PASS (no silent loss, duplicate or reorder)"
        } else {
            "FAIL (see the violations above)"
        }
    );
    out
}

fn summary_json(h: &Histogram<u64>) -> Value {
    serde_json::to_value(Summary::of(h)).unwrap_or(Value::Null)
}

fn breakdown_json(b: &Breakdown, r: &RunReport) -> Value {
    let profiles: serde_json::Map<String, Value> = r
        .profiles
        .iter()
        .zip(&b.by_profile)
        .map(|(p, h)| (p.clone(), summary_json(h)))
        .collect();
    let buckets: serde_json::Map<String, Value> = Bucket::ALL
        .iter()
        .map(|b2| {
            (
                b2.label().to_string(),
                summary_json(&b.by_bucket[b2.index()]),
            )
        })
        .collect();
    json!({ "all": summary_json(&b.all), "by_profile": profiles, "by_fanout": buckets })
}

/// The JSON report (latencies in ms).
pub fn to_json(r: &RunReport) -> Value {
    let m = &r.metrics;
    let c = &m.counters;
    json!({
        "name": r.name,
        "passed": r.passed(),
        "phones": r.phones,
        "threads": r.threads,
        "profiles": r.profiles.iter().zip(&r.phones_per_profile).map(|(p, n)| json!({"name": p, "phones": n})).collect::<Vec<_>>(),
        "rooms": r.rooms,
        "timeline": r.timeline,
        "latency_ms": {
            "end_to_end": breakdown_json(&m.e2e, r),
            "link": breakdown_json(&m.link, r),
            "relay_added": breakdown_json(&m.relay, r),
            "connect": summary_json(&m.connect),
            "reconnect": summary_json(&m.reconnect),
            "resume": summary_json(&m.resume),
            "delivered_on_resume": summary_json(&m.resumed),
            "first_after_idle": summary_json(&m.after_idle),
            "loadgen_lag": summary_json(&m.timer_lag),
        },
        "bytes": {
            "down_per_delivery": per(c.bytes_down, c.delivered),
            "up_per_publish": per(c.bytes_up, c.published),
            "down_total": c.bytes_down,
            "up_total": c.bytes_up,
        },
        "counters": c,
        "api_counters": r.api,
        "verification": {
            "summary": r.summary,
            "violations": r.violations,
        },
        "series": r.series,
    })
}

/// An SVG chart of p50/p90/p99/max end-to-end latency per second, on a log scale.
pub fn to_svg(r: &RunReport) -> String {
    let (w, h) = (960.0, 480.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let points: Vec<_> = r.series.iter().filter(|p| p.latency.count > 0).collect();
    let max_sec = r.series.last().map_or(1, |p| p.sec.max(1)) as f64;
    let top_ms = points
        .iter()
        .map(|p| p.latency.max)
        .fold(10.0_f64, f64::max);
    let decades = top_ms.log10().ceil().max(1.0);
    let x = |sec: f64| left + pw * sec / max_sec;
    let y = |ms: f64| {
        let v = ms.max(1.0).log10().clamp(0.0, decades);
        top + ph * (1.0 - v / decades)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}: live delivery latency per second (end to end; dashed: relay added p99)</text>"#,
        w / 2.0,
        xml(&r.name)
    );
    // Axes and grid.
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
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
    }
    let step = [1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|&s| max_sec / f64::from(s) <= 12.0)
        .unwrap_or(3600);
    let mut sec = 0;
    while f64::from(sec) <= max_sec {
        let xx = x(f64::from(sec));
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{sec}</text>"##,
            top + ph,
            top + ph + 16.0
        );
        sec += step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start</text>"#,
        left + pw / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency (log scale)</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    type Line = (
        &'static str,
        &'static str,
        &'static str,
        fn(&SecondPoint) -> f64,
    );
    let lines: [Line; 5] = [
        ("p50", "#1f77b4", "", |p| p.latency.p50),
        ("p90", "#2ca02c", "", |p| p.latency.p90),
        ("p99", "#ff7f0e", "", |p| p.latency.p99),
        ("max", "#d62728", "", |p| p.latency.max),
        (
            "relay added p99",
            "#7f7f7f",
            r#" stroke-dasharray="5,3""#,
            |p| p.relay_added.p99,
        ),
    ];
    for (k, (label, colour, dash, get)) in lines.iter().enumerate() {
        let pts: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(f64::from(p.sec) + 0.5), y(get(p))))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let lx = left + 10.0 + 70.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            top + 14.0,
            lx + 20.0,
            top + 14.0,
            lx + 25.0,
            top + 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
