//! Two loadgen processes (`--shard 0/2`, `--shard 1/2`) against one relay, then `--merge` of
//! their JSON reports: one verdict over both, counts summed, and a failing shard fails it.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::process::Command;

use pabal_relay::io::BackendKind;
use pabal_testkit::{TempDir, TestRelay};

const SCENARIO: &str = r#"
name = "shards"
seed = 3
duration_s = 3
drain_s = 10
settle_s = 1

[population]
phones = 40
profiles = "lte"
connect_rate = 200

[chat]
direct_per_phone = 1
groups_per_phone = 1
group_size = { distribution = "zipf", min = 3, max = 8, exponent = 1.2 }
msgs_per_min = 30
group_share = 0.5
"#;

fn loadgen(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn phones_of(report: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    v["phones"].as_u64().unwrap()
}

fn shards_merge_into_one_verdict(backend: BackendKind) {
    let relay = TestRelay::start(backend, 1, |_| {});
    let dir = TempDir::new("loadgen-shards");
    let scenario = dir.path("shards.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let target = relay.addr.to_string();
    let reports: Vec<_> = (0..2).map(|i| dir.path(&format!("s{i}.json"))).collect();
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let (scenario, target, json) = (
                scenario.to_str().unwrap().to_string(),
                target.clone(),
                reports[i].to_str().unwrap().to_string(),
            );
            std::thread::spawn(move || {
                let shard = format!("{i}/2");
                loadgen(&[
                    &scenario,
                    "--target",
                    &target,
                    "--shard",
                    &shard,
                    "--run-id",
                    "shardtest",
                    "--json",
                    &json,
                ])
            })
        })
        .collect();
    for run in runs {
        let (code, out) = run.join().unwrap();
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("shardtest-s"),
            "each shard has its own run id: {out}"
        );
    }
    assert_eq!(phones_of(&reports[0]) + phones_of(&reports[1]), 40);
    let merged = dir.path("merged.json");
    let paths: Vec<&str> = reports.iter().map(|p| p.to_str().unwrap()).collect();
    let (code, out) = loadgen(&[
        "--merge",
        paths[0],
        paths[1],
        "--json",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("RESULT: PASS") && out.contains(": 40 phones"),
        "{out}"
    );
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&merged).unwrap()).unwrap();
    assert_eq!(m["shards"], 2);
    assert!(
        m["latency_ms"]["end_to_end"]["count"].as_u64().unwrap() > 0,
        "{m}"
    );
    assert!(
        m["sums"]["verification.summary.pairs"].as_u64().unwrap() >= 40,
        "{m}"
    );

    // A shard that failed fails the merge.
    let mut failed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reports[1]).unwrap()).unwrap();
    failed["passed"] = false.into();
    std::fs::write(&reports[1], failed.to_string()).unwrap();
    let (code, out) = loadgen(&["--merge", paths[0], paths[1]]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("RESULT: FAIL"), "{out}");
}

pabal_testkit::per_backend! {
    fn two_shards_against_one_relay_merge_into_one_passing_verdict(backend) {
        shards_merge_into_one_verdict(backend);
    }
}
