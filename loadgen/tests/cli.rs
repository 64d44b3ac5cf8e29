//! The command line refuses to run a scenario whose `[relay]` section cannot apply to a
//! relay loadgen did not start, names the options, and goes on only when told to.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

fn loadgen(args: &[&str]) -> (Option<i32>, String) {
    let scenarios = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scenarios/reconnect-storm.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        // Nothing listens on the discard port: the run itself cannot start.
        .args(["--target", "127.0.0.1:9", "--quiet", scenarios])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn relay_options_a_running_relay_cannot_take_are_refused_unless_waived() {
    let (code, err) = loadgen(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("relay.new_connections_per_second = 2000")
            && err.contains("relay.reconnect_spread_s = 10")
            && err.contains("--ignore-relay-options"),
        "{err}"
    );
    assert!(
        !err.contains("no relay answers"),
        "it must stop before connecting: {err}"
    );
    let (code, err) = loadgen(&["--ignore-relay-options"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("going on without them"), "{err}");
    assert!(err.contains("no relay answers"), "{err}");
}
