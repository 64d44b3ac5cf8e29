//! Real relay nodes on one `redis-server` watched with `MONITOR`: the keys and SHAs of
//! every script call, and a `SCRIPT FLUSH` mid-run.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use pabal_codec::{Ack, ClientFrame};
use pabal_relay::cluster::script::{all_scripts, sha1_hex};
use pabal_relay::cluster::{ClusterConfig, StreamEntry, WindowOrder};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{KEY, http};
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use serde_json::{Value as Json, json};

// ---------------------------------------------------------------------------------------
// MONITOR: what the scripts ran.

/// `redis-cli MONITOR` on a Redis, its lines gathered until it is dropped.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "MONITOR"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli runs");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (started, up) = mpsc::channel();
        let gathered = lines.clone();
        std::thread::spawn(move || {
            let mut started = Some(started);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Some(tx) = started.take() {
                    let _ = tx.send(()); // "OK": watching
                }
                gathered.lock().unwrap().push(line);
            }
        });
        up.recv_timeout(WAIT).expect("MONITOR started");
        Monitor { child, lines }
    }

    /// The lines so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line containing `text`; how many lines there were up to it.
    fn lines_through(&self, text: &str) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(at) = self.lines().iter().position(|l| l.contains(text)) {
                return at + 1;
            }
            assert!(Instant::now() < deadline, "MONITOR never showed {text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One MONITOR line: the client (`lua` for a command a script ran) and the arguments.
fn parse_line(line: &str) -> Option<(String, Vec<Vec<u8>>)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let client = line[open + 1..close].split(' ').nth(1)?.to_owned();
    let b = &line.as_bytes()[close + 1..];
    let mut args = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' && i + 1 < b.len() {
                i += 1;
                match b[i] {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                        arg.push(u8::from_str_radix(hex, 16).ok()?);
                        i += 2;
                    }
                    c => arg.push(c),
                }
            } else {
                arg.push(b[i]);
            }
            i += 1;
        }
        i += 1;
        args.push(arg);
    }
    Some((client, args))
}

/// The keys a command run by a script touches (every command the scripts run is named
/// here: a new one must say where its keys are).
fn keys_of(args: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let cmd = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    match cmd.as_str() {
        "TIME" | "PUBLISH" | "SPUBLISH" => Vec::new(),
        "DEL" => args[1..].to_vec(),
        "HGET" | "HSET" | "HDEL" | "HINCRBY" | "HEXISTS" | "HGETALL" | "HKEYS" | "HLEN"
        | "HSCAN" | "XADD" | "XRANGE" | "ZADD" | "ZSCORE" | "ZREM" | "ZRANGE" | "ZCARD"
        | "ZREMRANGEBYRANK" | "SISMEMBER" | "SREM" | "SADD" | "SCARD" | "SMEMBERS" | "PTTL"
        | "PEXPIRE" | "XLEN" | "XTRIM" | "ZRANGEBYSCORE" | "ZREMRANGEBYSCORE" | "HMGET" => {
            vec![args[1].clone()]
        }
        other => panic!("a script ran {other}: say in keys_of where its keys are"),
    }
}

/// One script call as MONITOR saw it.
struct Call {
    client: String,
    script: &'static str,
    /// Sent with its text (`EVAL`), not its SHA.
    text: bool,
    declared: Vec<Vec<u8>>,
    /// `(command, key)` for every key its commands touched.
    touched: Vec<(String, Vec<u8>)>,
    /// Whether it came after the `SCRIPT FLUSH`.
    after_flush: bool,
}

/// The script calls in MONITOR's `lines`, with the commands each ran.
fn script_calls(lines: &[String]) -> Vec<Call> {
    let by_sha: HashMap<Vec<u8>, &'static str> = all_scripts()
        .into_iter()
        .map(|(name, text)| (sha1_hex(text).to_vec(), name))
        .collect();
    let mut calls: Vec<Call> = Vec::new();
    let mut open = false;
    let mut flushed = false;
    for line in lines {
        let Some((client, args)) = parse_line(line) else {
            continue;
        };
        let Some(verb) = args
            .first()
            .map(|v| String::from_utf8_lossy(v).to_ascii_uppercase())
        else {
            continue;
        };
        if client == "lua" {
            assert!(
                open,
                "a script's command with no script call before it: {line}"
            );
            let call = calls.last_mut().unwrap();
            for key in keys_of(&args) {
                call.touched.push((verb.clone(), key));
            }
            continue;
        }
        open = false;
        if verb == "SCRIPT"
            && args
                .get(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"FLUSH"))
        {
            flushed = true;
        }
        if verb != "EVAL" && verb != "EVALSHA" {
            continue;
        }
        let text = verb == "EVAL";
        let sha = if text {
            sha1_hex(std::str::from_utf8(&args[1]).unwrap()).to_vec()
        } else {
            args[1].clone()
        };
        let script = *by_sha
            .get(&sha)
            .unwrap_or_else(|| panic!("a script the relay does not name: {line}"));
        let n: usize = std::str::from_utf8(&args[2]).unwrap().parse().unwrap();
        calls.push(Call {
            client,
            script,
            text,
            declared: args[3..3 + n].to_vec(),
            touched: Vec::new(),
            after_flush: flushed,
        });
        open = true;
    }
    calls
}

// ---------------------------------------------------------------------------------------
// The end-to-end run.

/// A server-API call to `node`.
fn call(node: &TestRelay, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
    let body = body.map(|b| b.to_string());
    let addr = node.handle().control_addr().unwrap();
    http(addr, method, path, Some(KEY), body.as_deref())
}

/// A server-API call that must answer 200.
fn ok(node: &TestRelay, method: &str, path: &str, body: Option<Json>) -> Json {
    let (status, answer) = call(node, method, path, body);
    assert_eq!(status, 200, "{method} {path}: {answer}");
    answer
}

/// The SHA of a script by its name.
fn sha_of(name: &str) -> String {
    let (_, text) = all_scripts().into_iter().find(|(n, _)| *n == name).unwrap();
    String::from_utf8(sha1_hex(text).to_vec()).unwrap()
}

/// Waits until MONITOR saw a hand-off decision (`HANDOFF`) after its line `from`; the
/// number of lines then.
fn handoff_decided(monitor: &Monitor, from: usize) -> usize {
    let sha = sha_of("HANDOFF");
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let lines = monitor.lines();
        if lines[from.min(lines.len())..]
            .iter()
            .any(|l| l.contains(&sha))
        {
            return lines.len();
        }
        assert!(Instant::now() < deadline, "no hand-off was decided");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The server API's reads from the engine, and a replacing member call setting `set`.
fn reads_and_a_replacement(n: &[TestRelay], unread_of: &str, set: &[&str]) {
    ok(&n[2], "GET", &format!("/v1/rooms/{ROOM}/receipts"), None);
    ok(&n[2], "GET", &format!("/v1/users/{unread_of}/unread"), None);
    ok(&n[2], "GET", "/v1/users/ann/presence", None);
    let members = format!("/v1/rooms/{ROOM}/members");
    ok(&n[1], "PUT", &members, Some(json!({ "users": set })));
}

const ROOM: &str = "group:scripts";

/// Every script runs at least once: joins through a phone and the API, a refused join
/// (its undo), publishes, a sequence Redis lost moved up, ACKs, a hand-off decision, the
/// API's reads, a replacing member call, a leave, a closed connection.
fn every_script_once(n: &[TestRelay], monitor: &Monitor, redis: &RedisServer) {
    let members = format!("/v1/rooms/{ROOM}/members");
    ok(&n[2], "POST", &members, Some(json!({"users": ["cy"]})));
    let mut ann = Client::connect(n[0].addr, "ann");
    let a = ann.join(ROOM);
    let mut bob = Client::connect(n[1].addr, "bob");
    let b = bob.join(ROOM);
    for seq in 1..=2 {
        assert_eq!(ann.publish_acked(a, format!("m{seq}")), seq);
    }
    bob.wait_for(|e| matches!(e, pabal_codec::Event::Message { seq: Some(2), .. }));
    bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 2)])));
    // bob's node writes its stream entries in four fields (`PUBLISH_FIELDS`).
    assert_eq!(bob.publish_acked(b, "m3"), 3);
    // Redis loses the room's sequence's last step (a failover to a replica behind): its
    // owners read the room again once their pub/sub connections are back, and move the
    // sequence up to what they delivered (`RAISE`).
    redis.cli(&["HINCRBY", &format!("pabal:{{r:{ROOM}}}:m"), "s", "-1"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let raised = || {
        n.iter()
            .map(|node| {
                node.cluster()
                    .unwrap()
                    .sequences_raised
                    .load(Ordering::Relaxed)
            })
            .sum::<u64>()
    };
    let deadline = Instant::now() + WAIT;
    while raised() == 0 {
        assert!(Instant::now() < deadline, "no owner moved the sequence up");
        std::thread::sleep(Duration::from_millis(10));
    }
    handoff_decided(monitor, 0);
    let path = format!("/v1/rooms/{ROOM}/receipts");
    let deadline = Instant::now() + WAIT;
    // bob's ACK reaches the engine asynchronously.
    while ok(&n[2], "GET", &path, None)["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["user"] != "bob" || m["delivered_up_to"] != 2)
    {
        assert!(
            Instant::now() < deadline,
            "bob's ACK never reached the engine"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    reads_and_a_replacement(n, "bob", &["ann", "bob", "cy"]);
    // dee may be in two rooms (`limits.max_rooms_per_user`): the third join is refused
    // on the user's side and undone on the room's.
    for room in ["first", "second", "third"] {
        let path = format!("/v1/rooms/{room}/members");
        let _ = call(&n[2], "POST", &path, Some(json!({"users": ["dee"]})));
    }
    ok(&n[2], "DELETE", &format!("{members}/bob"), None);
    drop(bob);
    drop(ann);
}

/// After a `SCRIPT FLUSH` (MONITOR's line `flushed_at`): the same kinds of calls all
/// succeed.
fn after_the_flush(n: &[TestRelay], monitor: &Monitor, flushed_at: usize) {
    let members = format!("/v1/rooms/{ROOM}/members");
    let mut ann = Client::connect(n[0].addr, "ann");
    let a = ann.join(ROOM);
    assert_eq!(ann.publish_acked(a, "m4"), 4);
    // cy's node runs `PUBLISH_ASCENDING`.
    let mut cy = Client::connect(n[2].addr, "cy");
    let c = cy.join(ROOM);
    assert_eq!(cy.publish_acked(c, "m5"), 5);
    handoff_decided(monitor, flushed_at);
    ok(&n[1], "POST", &members, Some(json!({"users": ["eve"]})));
    ok(&n[1], "DELETE", &format!("{members}/eve"), None);
    reads_and_a_replacement(n, "ann", &["ann", "cy"]);
    drop(cy);
    drop(ann);
}

/// Three nodes on `redis`, with the hand-off to `url`, every user in at most two rooms; as
/// in rolling upgrades, the second writes its stream entries in four fields
/// (`cluster.stream_entry = "fields"`) and the second and third score the window's keys by
/// sequence (`window_order = "ascending"`), so that all three publish scripts run.
fn nodes(backend: BackendKind, redis: &RedisServer, url: &str) -> Vec<TestRelay> {
    (1..=3)
        .map(|i| {
            let cluster = ClusterConfig {
                redis: vec![redis.url()],
                node_id: Some(format!("s{i}")),
                stream_entry: if i == 2 {
                    StreamEntry::Fields
                } else {
                    StreamEntry::Packed
                },
                window_order: if i == 1 {
                    WindowOrder::Descending
                } else {
                    WindowOrder::Ascending
                },
                ..ClusterConfig::default()
            };
            TestRelay::cluster_node(backend, cluster, |c: &mut Config| {
                c.receipts.interval = Duration::from_millis(20);
                c.handoff.url = url.to_owned();
                c.handoff.secret = Some("handoff-test-secret-0123".into());
                c.handoff.delay = Duration::from_millis(500);
                c.handoff.batch_interval = Duration::from_millis(100);
                c.limits.max_rooms_per_user = 2;
            })
        })
        .collect()
}

per_backend! {
    fn every_script_declares_its_keys_goes_by_sha_and_survives_a_script_flush(backend) {
        let Some(redis) = RedisServer::start("scripts-monitor") else { return };
        let monitor = Monitor::start(redis.port);
        // The hand-off's app server takes connections and never answers: the decisions
        // are what is watched, not the requests.
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/pabal", app.local_addr().unwrap());
        let n = nodes(backend, &redis, &url);
        every_script_once(&n, &monitor, &redis);
        assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
        let flushed_at = monitor.lines_through("\"SCRIPT\" \"FLUSH\"");
        after_the_flush(&n, &monitor, flushed_at);
        // The last calls reach MONITOR's output.
        std::thread::sleep(Duration::from_millis(300));
        let calls = script_calls(&monitor.lines());
        drop(monitor);

        // Every key a script touched was declared by its call.
        let mut problems = BTreeSet::new();
        for c in &calls {
            for (cmd, key) in &c.touched {
                if !c.declared.contains(key) {
                    problems.insert(format!("{} touched {cmd} {} not in its KEYS", c.script, String::from_utf8_lossy(key)));
                }
            }
        }

        // Every script ran (the check above is about all of them).
        let ran: BTreeSet<&str> = calls.iter().map(|c| c.script).collect();
        for (name, _) in all_scripts() {
            if !ran.contains(name) {
                problems.insert(format!("{name} never ran"));
            }
        }

        // A script's text goes only after its SHA was tried on that connection (and Redis
        // answered NOSCRIPT): each EVAL follows an EVALSHA of the same script, one each.
        let mut tried: HashMap<(&str, &str), usize> = HashMap::new();
        for c in &calls {
            let k = (c.client.as_str(), c.script);
            if !c.text {
                *tried.entry(k).or_default() += 1;
            } else if let Some(left) = tried.get_mut(&k).filter(|n| **n > 0) {
                *left -= 1;
            } else {
                problems.insert(format!("{} went as EVAL with no EVALSHA before it", c.script));
            }
        }
        // The flush was met: scripts called after it were loaded again with their text,
        // and every call after it succeeded (the API answered 200 above).
        let reloaded: BTreeSet<&str> = calls.iter().filter(|c| c.after_flush && c.text).map(|c| c.script).collect();
        for script in ["PUBLISH", "ROOM_JOIN", "USER_JOIN", "ROOM_LEAVE", "USER_LEAVE", "READ_RECEIPTS", "PRESENCE_CLAIM", "HANDOFF"] {
            if !reloaded.contains(script) {
                problems.insert(format!("{script} was not sent again after the flush"));
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
        let by_sha = calls.iter().filter(|c| !c.text).count();
        assert!(by_sha > calls.len() / 2, "{by_sha} of {} calls by SHA", calls.len());
    }
}
