//! Operations: the systemd unit, `/metrics`, `/healthz` and `/readyz`, the watchdog, and a
//! SIGHUP reload of the real binary (`relay`) under a fake systemd notify socket.
//!
//! Every wait is bounded: a hang fails the test instead of CI. In-process relays listen on
//! 127.0.0.1:0; the spawned binary does too and its addresses are read from its log.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pabal_codec::Event;
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_relay::metrics;
use pabal_relay::watchdog::{Notifier, Watchdog, WatchdogConfig};
use pabal_testkit::daemon::{Daemon, addr_in, limit_nofile};
use pabal_testkit::http::get_anonymous;
use pabal_testkit::{Client, TempDir, TestRelay, WAIT, repo_file, skip};

/// The binary under test.
const RELAY: &str = env!("CARGO_BIN_EXE_relay");

/// A relay in this process with `workers` workers on the configured default backend, and a
/// short shutdown grace.
fn start_relay(workers: usize) -> TestRelay {
    TestRelay::start(BackendKind::Auto, workers, |c| {
        c.shutdown.grace = Duration::from_secs(2);
    })
}

/// One HTTP/1.1 GET without credentials: (status, content type, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let reply = get_anonymous(addr, path);
    let content_type = reply.header("content-type").unwrap_or("").to_string();
    assert!(
        !reply
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked")),
        "this reader expects a plain body"
    );
    (reply.status, content_type, reply.body)
}

// ---------------------------------------------------------------------------------------
// A strict OpenMetrics text parser (what prometheus-client writes and Prometheus reads
// under `application/openmetrics-text`). The `prometheus-parse` crate skips lines it
// cannot match, so it cannot prove an exposition valid; this one panics on anything off.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The sum of every sample named `name` whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect();
        assert!(!matching.is_empty(), "no sample {name} with {with:?}");
        matching.iter().map(|s| s.value).sum()
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_number(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    // Digits, an optional fraction and exponent: no "inf", "infinity", hex or underscores.
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let ok = !(int.is_empty() && frac.is_empty())
        && digits(int)
        && digits(frac)
        && exponent.is_none_or(|e| !e.is_empty() && digits(e));
    if !ok {
        return Err(format!("`{text}` is not a number"));
    }
    text.parse().map_err(|e| format!("`{text}`: {e}"))
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name `{name}`"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut end = None;
        while end.is_none() {
            let start = chars.peek().map(|&(i, _)| i).ok_or("unterminated labels")?;
            if inner[start..].starts_with('}') && labels.is_empty() {
                end = Some(start + 1);
                break;
            }
            let eq = inner[start..].find('=').ok_or("label without `=`")? + start;
            let key = &inner[start..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name `{key}`"));
            }
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label `{key}`: value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")? {
                    (_, '"') => break,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape `\\{c}`")),
                    },
                    (_, '\n') => return Err("newline in label value".into()),
                    (_, c) => value.push(c),
                }
            }
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label `{key}` repeated"));
            }
            labels.push((key.to_string(), value));
            match chars.next().ok_or("unterminated labels")? {
                (_, ',') => {}
                (i, '}') => end = Some(i + 1),
                (_, c) => return Err(format!("unexpected `{c}` after a label")),
            }
        }
        rest = &inner[end.ok_or("unterminated labels")?..];
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_number(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        parse_number(ts)?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_openmetrics(text: &str) -> Exposition {
    let body = text
        .strip_suffix("# EOF\n")
        .expect("ends with `# EOF` and a newline");
    let mut expo = Exposition::default();
    let mut family: Option<(String, String)> = None;
    let mut helped: HashSet<String> = HashSet::new();
    for (n, line) in body.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        assert!(!line.is_empty(), "{}: empty line", at());
        if let Some(meta) = line.strip_prefix("# ") {
            let (keyword, rest) = meta.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            let (name, arg) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(is_metric_name(name), "{}: bad family name", at());
            match keyword {
                "HELP" => {
                    assert!(helped.insert(name.to_string()), "{}: HELP repeated", at());
                    family = None; // samples may not follow a HELP before its TYPE
                }
                "TYPE" => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "info",
                            "unknown",
                            "summary",
                            "stateset",
                            "gaugehistogram"
                        ]
                        .contains(&arg),
                        "{}: unknown type",
                        at()
                    );
                    assert!(
                        expo.types
                            .insert(name.to_string(), arg.to_string())
                            .is_none(),
                        "{}: family declared twice",
                        at()
                    );
                    family = Some((name.to_string(), arg.to_string()));
                }
                "UNIT" => {
                    let (fam, _) = family
                        .as_ref()
                        .unwrap_or_else(|| panic!("{}: UNIT before TYPE", at()));
                    assert_eq!(fam, name, "{}", at());
                    assert!(
                        name.ends_with(&format!("_{arg}")),
                        "{}: name must end with its unit",
                        at()
                    );
                }
                _ => panic!("{}: unknown metadata", at()),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "{}: stray comment", at());
        let sample = parse_sample(line).unwrap_or_else(|e| panic!("{}: {e}", at()));
        let (fam, kind) = family
            .as_ref()
            .unwrap_or_else(|| panic!("{}: sample before its TYPE", at()));
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        assert!(
            suffixes.iter().any(|s| sample.name == format!("{fam}{s}")),
            "{}: sample does not belong to family {fam} ({kind})",
            at()
        );
        if kind == "counter" || sample.name.ends_with("_count") || sample.name.ends_with("_bucket")
        {
            assert!(
                sample.value >= 0.0 && sample.value.is_finite(),
                "{}: counts are >= 0",
                at()
            );
        }
        if sample.name.ends_with("_bucket") {
            assert!(
                sample.labels.iter().any(|(k, _)| k == "le"),
                "{}: bucket without le",
                at()
            );
        }
        expo.samples.push(sample);
    }
    check_histograms(&expo);
    expo
}

/// Per histogram and label set: `le` increases to `+Inf`, counts never decrease, and the
/// `+Inf` bucket equals `_count`.
fn check_histograms(expo: &Exposition) {
    for (fam, _) in expo.types.iter().filter(|(_, t)| *t == "histogram") {
        type Key = Vec<(String, String)>;
        let mut series: HashMap<Key, Vec<(f64, f64)>> = HashMap::new();
        for s in expo
            .samples
            .iter()
            .filter(|s| s.name == format!("{fam}_bucket"))
        {
            let key: Key = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .cloned()
                .collect();
            let le = s.labels.iter().find(|(k, _)| k == "le").unwrap();
            let le = parse_number(&le.1).unwrap();
            series.entry(key).or_default().push((le, s.value));
        }
        assert!(!series.is_empty(), "{fam}: no buckets");
        for (key, buckets) in series {
            for pair in buckets.windows(2) {
                assert!(
                    pair[0].0 < pair[1].0,
                    "{fam}{key:?}: le must increase: {buckets:?}"
                );
                assert!(
                    pair[0].1 <= pair[1].1,
                    "{fam}{key:?}: buckets must be cumulative: {buckets:?}"
                );
            }
            let &(last_le, inf) = buckets.last().unwrap();
            assert_eq!(
                last_le,
                f64::INFINITY,
                "{fam}{key:?}: the last bucket must be +Inf"
            );
            let count = expo
                .samples
                .iter()
                .find(|s| s.name == format!("{fam}_count") && s.labels == key)
                .unwrap_or_else(|| panic!("{fam}{key:?}: no _count"));
            assert_eq!(
                inf, count.value,
                "{fam}{key:?}: +Inf bucket must equal _count"
            );
            assert!(
                expo.samples
                    .iter()
                    .any(|s| s.name == format!("{fam}_sum") && s.labels == key),
                "{fam}{key:?}: no _sum"
            );
        }
    }
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    for bad in [
        "# TYPE a counter\na_total{x=\"1} 1\n# EOF\n",
        "# TYPE a counter\na_total 1\n",
        "# TYPE a counter\na_total{1x=\"1\"} 1\n# EOF\n",
        "# TYPE a counter\nb_total 1\n# EOF\n",
        "# TYPE a gauge\na infinity\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\nh_sum 0\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
    ] {
        let text = bad.to_string();
        let refused = std::panic::catch_unwind(move || parse_openmetrics(&text)).is_err();
        assert!(refused, "accepted: {bad:?}");
    }
    let good = "# HELP a A.\n# TYPE a counter\na_total{w=\"0\",k=\"q\\\"x\"} 1\n# TYPE h histogram\n\
                h_sum 0.5\nh_count 2\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n";
    let expo = parse_openmetrics(good);
    assert_eq!(expo.sum("a_total", &[("k", "q\"x")]), 1.0);
}

// ---------------------------------------------------------------------------------------
// The unit and the shipped configuration.

#[test]
fn the_unit_passes_systemd_analyze() {
    // `.ci/run` installs systemd where it is missing; under CI a missing tool fails.
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => {
            skip("systemd-analyze not installed (`apt-get install systemd`)");
            return;
        }
    }
    let dir = TempDir::new("unit");
    // `verify` checks that ExecStart= exists: point it at the binary under test.
    let unit = std::fs::read_to_string(repo_file("systemd/relay.service")).unwrap();
    let unit_path = dir.path("relay.service");
    std::fs::write(&unit_path, unit.replace("/usr/bin/relay", RELAY)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("relay.service"),
        "systemd-analyze verify complains:\n{stderr}"
    );
    // The exposure score needs `--offline` (systemd 252 and later); report it where it runs.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.contains("Overall exposure level")) {
        Some(line) => {
            println!("{line}");
            let score: f64 = line
                .split(':')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
            assert!(score <= 2.0, "the unit's exposure grew to {score}:\n{text}");
        }
        None => skip(format_args!(
            "systemd-analyze security --offline unsupported here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn check_config(path: &Path) -> (bool, String) {
    let out = Command::new(RELAY)
        .arg("--check-config")
        .arg(path)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.stdout.is_empty(), "--quiet prints nothing on stdout");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_config_is_valid_and_so_are_its_production_lines() {
    let template = repo_file("systemd/relay.toml");
    let (ok, stderr) = check_config(&template);
    assert!(ok, "systemd/relay.toml: {stderr}");

    // The commented production lines: public listen address and EdDSA tokens, with the
    // test key standing in for /etc/relay/keys.
    let text = std::fs::read_to_string(&template).unwrap();
    let key = repo_file("relay/tests/data/jwt-test-ed25519-a.pub.pem");
    let mut production = String::new();
    let mut keys_blocks = 0;
    for line in text.lines() {
        let enable = |l: &str| l.strip_prefix("# ").unwrap_or(l).to_string();
        let out = match line {
            "listen = \"127.0.0.1:7700\"" | "mode = \"none\"" => continue,
            "# listen = \"0.0.0.0:7700\""
            | "# mode = \"jwt\""
            | "# [auth.jwt]"
            | "# leeway = 30" => enable(line),
            "# [[auth.jwt.keys]]" => {
                keys_blocks += 1;
                if keys_blocks > 1 {
                    continue;
                }
                enable(line)
            }
            l if keys_blocks == 1
                && (l.starts_with("# kid = ") || l.starts_with("# algorithm = ")) =>
            {
                enable(l)
            }
            l if keys_blocks == 1 && l.starts_with("# public_key_file = ") => {
                format!("public_key_file = {:?}", key.display().to_string())
            }
            l => l.to_string(),
        };
        production.push_str(&out);
        production.push('\n');
    }
    let dir = TempDir::new("prod-config");
    let path = dir.path("relay.toml");
    std::fs::write(&path, &production).unwrap();
    let (ok, stderr) = check_config(&path);
    assert!(
        ok,
        "production lines of systemd/relay.toml:\n{production}\n{stderr}"
    );
    let config = Config::load(&path).unwrap();
    assert!(!config.listen.ip().is_loopback());
    assert_eq!(config.auth.jwt.unwrap().keys.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Metrics and health, in process.

#[test]
fn metrics_parse_and_move_with_traffic() {
    let relay = start_relay(2);
    for route in metrics::routes() {
        relay.add_route(route);
    }
    let control = relay.control_addr().unwrap();
    let (status, content_type, before) = http_get(control, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(content_type, metrics::CONTENT_TYPE);
    let before = parse_openmetrics(&before);
    assert_eq!(
        before.sum("pabal_build_info", &[("backend", relay.backend())]),
        1.0
    );
    assert_eq!(before.sum("pabal_workers", &[]), 2.0);

    let mut alice = Client::connect(relay.local_addr(), "alice");
    let mut bob = Client::connect(relay.local_addr(), "bob");
    let a = alice.join("ops-metrics");
    let b = bob.join("ops-metrics");
    let (acked, limited) = alice.publish_burst(a, 5);
    assert_eq!((acked, limited), (5, 0));
    for _ in 0..5 {
        bob.wait_for(|e| matches!(e, Event::Message { alias, seq: Some(_), .. } if *alias == b));
    }

    let (status, _, after) = http_get(control, "/metrics");
    assert_eq!(status, 200);
    let after = parse_openmetrics(&after);
    let delta = |name: &str| after.sum(name, &[]) - before.sum(name, &[]);
    assert_eq!(delta("pabal_messages_accepted_total"), 5.0);
    assert!(delta("pabal_deliveries_total") >= 5.0, "bob got 5 messages");
    assert!(
        delta("pabal_frames_received_total") >= 9.0,
        "2 HELLO, 2 SUBSCRIBE, 5 PUBLISH"
    );
    assert!(delta("pabal_connections_accepted_total") >= 2.0);
    assert!(delta("pabal_received_bytes_total") > 0.0);
    assert!(delta("pabal_sent_bytes_total") > 0.0);
    assert!(delta("pabal_sends_total") > 0.0);
    assert_eq!(
        after.sum("pabal_connections", &[("backend", relay.backend())]),
        2.0
    );
    assert!(
        delta("pabal_publish_to_send_seconds_count") >= 5.0,
        "one observation per delivery"
    );
    assert!(delta("pabal_fanout_batch_connections_count") >= 1.0);
    assert_eq!(
        after.sum("pabal_errors_total", &[("kind", "rate_limited")]),
        0.0
    );
    assert!(after.sum("pabal_uptime_seconds", &[]) >= before.sum("pabal_uptime_seconds", &[]));
    for worker in ["0", "1"] {
        after.sum("pabal_inbox_batches", &[("worker", worker)]);
        after.sum("pabal_queued_bytes", &[("worker", worker)]);
    }
    drop((alice, bob));
    relay.stop();
}

#[test]
fn health_and_readiness() {
    let relay = start_relay(2);
    for route in metrics::routes() {
        relay.add_route(route);
    }
    let control = relay.control_addr().unwrap();
    let (status, _, body) = http_get(control, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http_get(control, "/readyz");
    assert_eq!(status, 200, "{body}");

    // Without a watchdog thread, /healthz probes and waits a second: a wedged worker is
    // named.
    relay.stall_worker(1, Duration::from_millis(2500));
    let (status, _, body) = http_get(control, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("worker 1 "), "{body}");
    assert!(!body.contains("worker 0 "), "{body}");
    let until = Instant::now() + WAIT;
    while http_get(control, "/healthz").0 != 200 {
        assert!(Instant::now() < until, "worker 1 never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }

    relay.begin_shutdown();
    let (status, _, body) = http_get(control, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    relay.join();
}

/// Counts `WATCHDOG=1` pings until `until`, keeping other notifications.
fn pings_until(
    rx: &crossbeam_channel::Receiver<String>,
    until: Instant,
    other: &mut Vec<String>,
) -> usize {
    let mut pings = 0;
    while let Ok(msg) = rx.recv_deadline(until) {
        if msg == "WATCHDOG=1" {
            pings += 1;
        } else {
            other.push(msg);
        }
    }
    pings
}

/// A two-worker relay with a watchdog probing every 200 ms, its notifications collected,
/// `/healthz` reading the watchdog's record.
fn watched_relay() -> (TestRelay, Watchdog, crossbeam_channel::Receiver<String>) {
    let relay = start_relay(2);
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let notifier: Notifier = Box::new(move |states| {
        for state in states {
            let _ = tx.send(state.to_string());
        }
    });
    let config = WatchdogConfig {
        period: Duration::from_millis(200),
        status_every: Duration::from_secs(60),
    };
    let watchdog = Watchdog::spawn(Arc::clone(relay.relay()), config, notifier).unwrap();
    for route in metrics::routes_with(Some(watchdog.liveness())) {
        relay.add_route(route);
    }
    (relay, watchdog, rx)
}

#[test]
fn the_watchdog_withholds_pings_while_a_worker_is_wedged() {
    let (relay, watchdog, rx) = watched_relay();
    let control = relay.control_addr().unwrap();
    let mut other = Vec::new();

    let healthy = pings_until(&rx, Instant::now() + Duration::from_secs(1), &mut other);
    assert!(healthy >= 2, "{healthy} pings in 1 s at a 200 ms period");
    assert!(
        other
            .iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("backend")),
        "{other:?}"
    );
    assert_eq!(http_get(control, "/healthz").0, 200);

    let t0 = Instant::now();
    relay.stall_worker(1, Duration::from_secs(3));
    // A probe answered just before the stall may still earn one ping.
    pings_until(&rx, t0 + Duration::from_millis(600), &mut other);
    let wedged = pings_until(&rx, t0 + Duration::from_millis(2400), &mut other);
    assert_eq!(wedged, 0, "no WATCHDOG=1 while worker 1 is wedged");
    // Silent for over two periods and a second: /healthz names it, and only it.
    let (status, _, body) = http_get(control, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("worker 1 has not answered"), "{body}");
    assert!(!body.contains("worker 0 "), "{body}");

    let resumed = pings_until(&rx, t0 + Duration::from_millis(5000), &mut other);
    assert!(resumed >= 1, "pings resume once the worker answers again");
    assert_eq!(http_get(control, "/healthz").0, 200);

    watchdog.stop();
    relay.stop();
}

// ---------------------------------------------------------------------------------------
// The real binary: READY, SIGHUP reload, SIGTERM.

/// Waits for a notification containing `needle`; returns the notifications up to it.
fn wait_notify(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no notification with {needle:?}; got {seen:?}"
        );
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

fn daemon_config(publish_rate: f64, burst: f64, workers: usize, max_messages: usize) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nworkers = {workers}\npin_workers = false\n\
         [control]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\npublish_rate = {publish_rate:?}\npublish_burst = {burst:?}\n\
         [retention]\nmax_messages = {max_messages}\n\
         [shutdown]\ngrace = \"2s\"\nreconnect_spread = \"1s\"\n\
         [log]\nlevel = \"info\"\nformat = \"text\"\n"
    )
}

#[test]
fn sighup_raises_a_limit_without_dropping_a_connection() {
    let dir = TempDir::new("sighup");
    let config = dir.path("relay.toml");
    std::fs::write(&config, daemon_config(1.0, 2.0, 2, 1000)).unwrap();
    let notify_path = dir.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();

    let mut daemon = Daemon::spawn(RELAY, &config, |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1000000");
    });
    let mut notes = Vec::new();
    wait_notify(&notify, "READY=1", &mut notes);
    let addr = addr_in(&daemon.wait_log("relay listening"));
    let control = addr_in(&daemon.wait_log("control API listening"));

    // publish_rate = 1/s with a burst of 2: most of a burst of 6 is refused.
    let mut client = Client::connect(addr, "alice");
    let alias = client.join("ops-reload");
    let (acked, limited) = client.publish_burst(alias, 6);
    assert!(
        acked <= 3 && limited >= 3,
        "acked {acked}, limited {limited}"
    );

    // Raise the limit (and change retention live, and `workers`, which needs a restart).
    std::fs::write(&config, daemon_config(1000.0, 1000.0, 3, 500)).unwrap();
    daemon.signal(libc::SIGHUP);
    let reloading = wait_notify(&notify, "RELOADING=1", &mut notes);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    wait_notify(&notify, "READY=1", &mut notes);
    let line = daemon.wait_log("configuration reloaded");
    assert!(
        line.contains("limits.publish_rate") && line.contains("retention.max_messages"),
        "{line}"
    );
    assert!(
        line.contains("needs a restart") && line.contains("workers"),
        "{line}"
    );

    // The same connection, still open, now publishes a burst freely (the bucket refills
    // at the new rate).
    std::thread::sleep(Duration::from_millis(200));
    client.ping();
    assert_eq!(client.publish_burst(alias, 6), (6, 0));

    // A broken file changes nothing, and systemd still gets READY=1 after RELOADING=1.
    std::fs::write(&config, "listne = \"oops\"\n").unwrap();
    daemon.signal(libc::SIGHUP);
    wait_notify(&notify, "RELOADING=1", &mut notes);
    wait_notify(&notify, "READY=1", &mut notes);
    let line = daemon.wait_log("reload failed");
    assert!(line.contains("listne"), "the error names the field: {line}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        client.publish_burst(alias, 6),
        (6, 0),
        "the reloaded limit stays"
    );

    // The binary's control listener serves the operations routes.
    let (status, _, body) = http_get(control, "/metrics");
    assert_eq!(status, 200);
    let expo = parse_openmetrics(&body);
    assert!(expo.sum("pabal_errors_total", &[("kind", "rate_limited")]) >= 3.0);
    assert_eq!(expo.sum("pabal_connections", &[]), 1.0);
    assert_eq!(http_get(control, "/healthz").0, 200);
    // WATCHDOG_USEC = 1 s: a ping at least every 500 ms.
    if !notes.iter().any(|n| n.contains("WATCHDOG=1")) {
        wait_notify(&notify, "WATCHDOG=1", &mut notes);
    }

    // SIGTERM: STOPPING=1, GOAWAY to the client, exit 0.
    daemon.signal(libc::SIGTERM);
    wait_notify(&notify, "STOPPING=1", &mut notes);
    client.wait_for(|e| matches!(e, Event::GoAway(_)));
    drop(client);
    daemon.assert_exits_cleanly();
}

// ---------------------------------------------------------------------------------------
// The control plane: descriptor exhaustion, a wedged control thread, key files.

#[test]
fn the_control_accept_loop_survives_descriptor_exhaustion() {
    let dir = TempDir::new("emfile");
    let config = dir.path("relay.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nworkers = 1\npin_workers = false\nio_backend = \"epoll\"\n\
         [control]\nlisten = \"127.0.0.1:0\"\nmax_connections = 10000\nheader_timeout = \"60s\"\n\
         idle_timeout = \"120s\"\n[limits]\nreserved_fds = 32\n[log]\nlevel = \"info\"\n",
    )
    .unwrap();
    let notify_path = dir.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // 64 descriptors: a few dozen connections exhaust them.
    let mut daemon = Daemon::spawn(RELAY, &config, |cmd| {
        limit_nofile(cmd, 64, 64);
        cmd.env("NOTIFY_SOCKET", &notify_path);
    });
    let control = addr_in(&daemon.wait_log("control API listening"));
    // The operations routes are added after the control API listens, before READY=1.
    wait_notify(&notify, "READY=1", &mut Vec::new());
    assert_eq!(http_get(control, "/healthz").0, 200);
    let held: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect_timeout(&control, WAIT).unwrap())
        .collect();
    daemon.wait_log("control API: accept failed");
    // Descriptors come back as the clients go: the port answers again without a restart.
    drop(held);
    let (status, _, body) = http_get(control, "/healthz");
    assert_eq!(status, 200, "{body}");
    daemon.wait_log("control API: accepting again");
    daemon.signal(libc::SIGTERM);
    daemon.assert_exits_cleanly();
}

#[test]
fn the_watchdog_withholds_pings_while_the_control_plane_is_wedged() {
    let (relay, watchdog, rx) = watched_relay();
    let control = relay.control_addr().unwrap();
    let mut other = Vec::new();
    assert!(pings_until(&rx, Instant::now() + Duration::from_secs(1), &mut other) >= 2);

    let t0 = Instant::now();
    relay.control_plane().unwrap().stall(Duration::from_secs(3));
    pings_until(&rx, t0 + Duration::from_millis(600), &mut other);
    let wedged = pings_until(&rx, t0 + Duration::from_millis(2400), &mut other);
    assert_eq!(wedged, 0, "no WATCHDOG=1 while the control plane is wedged");
    // The health view names it (component 2: after the two workers), and only it.
    let stuck = watchdog.liveness().check(Instant::now()).unwrap_err();
    assert_eq!(
        stuck.iter().map(|&(c, _)| c).collect::<Vec<_>>(),
        vec![2],
        "{stuck:?}"
    );
    assert_eq!(
        pabal_relay::watchdog::component_name(2, 2),
        "the control plane"
    );

    let resumed = pings_until(&rx, t0 + Duration::from_millis(5000), &mut other);
    assert!(
        resumed >= 1,
        "pings resume once the control plane answers again"
    );
    assert_eq!(http_get(control, "/healthz").0, 200);
    watchdog.stop();
    relay.stop();
}

#[test]
fn check_config_reads_the_api_key_file() {
    let dir = TempDir::new("keyfile");
    let config = dir.path("relay.toml");
    let key = dir.path("api.key");
    std::fs::write(
        &config,
        format!(
            "[control]\nlisten = \"0.0.0.0:7701\"\napi_key_file = {:?}\n",
            key.display().to_string()
        ),
    )
    .unwrap();
    let (ok, stderr) = check_config(&config);
    assert!(!ok, "a missing key file passes --check-config");
    assert!(stderr.contains("control.api_key_file"), "{stderr}");
    for bad in ["", "\n", "fifteen-bytes!!\n"] {
        std::fs::write(&key, bad).unwrap();
        let (ok, stderr) = check_config(&config);
        assert!(!ok, "{bad:?} passes --check-config");
        assert!(stderr.contains("control.api_key_file"), "{bad:?}: {stderr}");
    }
    std::fs::write(&key, "sixteen-bytes!!!\n").unwrap();
    let (ok, stderr) = check_config(&config);
    assert!(ok, "{stderr}");
    // The same rule for a key given inline.
    std::fs::write(&config, "[control]\napi_key = \"\"\n").unwrap();
    let (ok, stderr) = check_config(&config);
    assert!(!ok && stderr.contains("control.api_key"), "{stderr}");
}

#[test]
fn check_config_names_bad_cluster_fields() {
    let dir = TempDir::new("cluster-config");
    let config = dir.path("relay.toml");
    for (body, field) in [
        ("[cluster]\nredis = [\"http://db:6379\"]\n", "cluster.redis"),
        (
            "[cluster]\nredis = [\"redis://a:1\", \"redis://b:1\"]\n",
            "cluster.redis",
        ),
        ("[cluster]\nnode_id = \"a b\"\n", "cluster.node_id"),
        ("[cluster]\nmax_in_flight = 0\n", "cluster.max_in_flight"),
        (
            "[cluster]\npresence_lease = \"500ms\"\n",
            "cluster.presence_lease",
        ),
        (
            "[storage]\nmode = \"disk\"\ndir = \"/var/lib/relay\"\n[cluster]\n",
            "storage.mode",
        ),
    ] {
        std::fs::write(&config, body).unwrap();
        let (ok, stderr) = check_config(&config);
        assert!(!ok, "{body:?} passes --check-config");
        assert!(stderr.contains(field), "{body:?}: {stderr}");
    }
    std::fs::write(
        &config,
        "[cluster]\nredis = [\"redis://127.0.0.1:6379\"]\nnode_id = \"relay-1\"\n",
    )
    .unwrap();
    let (ok, stderr) = check_config(&config);
    assert!(ok, "{stderr}");
    // Offline hand-off works with [cluster] (markers live in the engine).
    std::fs::write(
        &config,
        "[cluster]\nredis = [\"redis://127.0.0.1:6379\"]\n[handoff]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"0123456789abcdef0123\"\n",
    )
    .unwrap();
    let (ok, stderr) = check_config(&config);
    assert!(ok, "[cluster] with [handoff] is refused: {stderr}");
}
