//! The rule every skip path goes through ([`pabal_testkit::skip`]): a test that cannot run
//! here passes with a `skipped:` line, except under CI (`CI=true`), where it fails. Checked
//! in child processes (this test binary, re-run on one test), so the environment of the
//! test run itself is left alone.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly

use std::process::{Command, Output};

/// Set in the child: the test then skips instead of spawning.
const PROBE: &str = "PABAL_TESTKIT_SKIP_PROBE";

/// This test, alone, in a child with `CI` set to `ci`.
fn child(ci: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_skip_fails_under_ci_only", "--nocapture"])
        .env(PROBE, "1")
        .env("CI", ci)
        .output()
        .unwrap()
}

#[test]
fn a_skip_fails_under_ci_only() {
    if std::env::var_os(PROBE).is_some() {
        pabal_testkit::skip("the probe's reason");
        return;
    }
    let out = child("true");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a skip passed under CI=true:\n{stderr}"
    );
    assert!(
        stderr.contains("under CI no test may skip, but: the probe's reason"),
        "{stderr}"
    );

    let out = child("false");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a skip failed outside CI:\n{stderr}");
    assert!(stderr.contains("skipped: the probe's reason"), "{stderr}");
}
