//! Reports of a run: a table for people and JSON for machines (the SVG chart is
//! [`crate::chart`]'s).
//!
//! Owns: formatting. Must not touch: measuring (everything comes from a [`RunReport`]).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::metrics::{Breakdown, Summary};
use crate::plan::Bucket;
use crate::run::RunReport;
use crate::verify::Kind;

pub use crate::chart::to_svg;

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
        "links: {}; rooms: {}; run id {} (suffix of every room and user name)",
        mix.join(", "),
        rooms.join(", "),
        r.run_id
    );
    let ramp_end = t.ramp_s;
    let steady_from = ramp_end + t.settle_s;
    let steady_to = steady_from + t.steady_s;
    let mut phases = format!(
        "phases: ramp 0-{ramp_end:.1} s, settle to {steady_from:.1} s, steady {steady_from:.1}-\
         {steady_to:.1} s, drain {steady_to:.1}-{:.1} s",
        steady_to + t.drain_s
    );
    for e in &r.events {
        let _ = write!(phases, "; event at {:.1} s: {}", e.at_s, e.label);
    }
    let _ = writeln!(out, "{phases}");
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
    let p = &r.publishes;
    let _ = writeln!(
        out,
        "\ntraffic: {} published = {} acknowledged + {} refused + {} without PUBACK when their \
         connection ended + {} never acknowledged on a live connection (violations) + {} \
         unacknowledged on phones not judged{}; not sent: {} due while offline, {} before the \
         room was bound; {} delivered ({} live, {} on resume)",
        p.published,
        p.acked,
        p.refused,
        p.lost_with_connection,
        p.never_acked,
        p.unacked_not_judged,
        match p.unaccounted() {
            0 => String::new(),
            n => format!(" ({n} UNACCOUNTED)"),
        },
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
    let g = &r.gap_summary;
    let _ = writeln!(
        out,
        "\nverification: judged {} of {} phones ({} never welcomed, {} not judged: {} waiting \
         out a relay's retry hint); {} (phone, room) pairs, {} caught up; not judged: {} pairs \
         still receiving ({} messages), {} pairs offline ({} messages); {} memberships never \
         bound",
        s.phones_judged,
        s.phones,
        s.never_welcomed,
        s.not_judged,
        s.not_judged_waiting_for_hint,
        s.pairs,
        s.caught_up,
        s.behind_receiving,
        s.behind_receiving_messages,
        s.behind_offline,
        s.behind_offline_messages,
        s.never_bound
    );
    let _ = writeln!(
        out,
        "announced losses: {} GAPs covering {} messages (explained by retention: {} count, {} \
         bytes, {} age; {} by an epoch change; {} unexplained; retention {}), {} epoch resets",
        c.gaps,
        c.gap_messages,
        g.by_count,
        g.by_bytes,
        g.by_age,
        g.by_epoch,
        g.unexplained,
        g.retention_source,
        c.epoch_resets
    );
    let counts: Vec<String> = Kind::ALL
        .iter()
        .map(|&k| {
            let n = v.count(k);
            let m = v.messages(k);
            if m > n {
                format!("{} {n} ({m} messages)", k.label())
            } else {
                format!("{} {n}", k.label())
            }
        })
        .collect();
    let _ = writeln!(out, "violations: {}", counts.join(", "));
    for e in v.examples.iter().take(20) {
        let _ = writeln!(out, "  - {e}");
    }
    let _ = writeln!(
        out,
        "RESULT: {}",
        if r.passed() {
            "PASS (every publish accounted for; no silent loss, unexplained GAP, corruption, \
             duplicate or reorder; every phone welcomed, bound and judged)"
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
        "run_id": r.run_id,
        "events": r.events,
        "publishes": r.publishes,
        "verification": {
            "summary": r.summary,
            "gaps": r.gap_summary,
            "violations": r.violations,
        },
        "series": r.series,
        // For `--merge` (crate::shard): the latency histograms themselves, V2 in base64.
        "histograms": {
            "end_to_end": crate::shard::encode_histogram(&m.e2e.all),
            "relay_added": crate::shard::encode_histogram(&m.relay.all),
        },
    })
}
