//! The JavaScript client (`clients/js`) from the workspace's one test command: its own suite
//! on Node's test runner against a real relay (the relay binary, started by the suite on the
//! backend named here), and the demo page in headless Chromium (Debian's `chromium` driven by
//! `playwright-core`). Where node, Chromium or the npm install is missing these skip, and
//! under CI=true fail: `.ci/install-js.sh` installs them.
//!
//! Owns: running those suites and reporting their output. Must not touch: what they test
//! (`clients/js/test`), the relay's configuration (the suites write their own).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pabal_relay::io::BackendKind;
use pabal_testkit::{per_backend, skip};

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

fn js_dir() -> PathBuf {
    workspace().join("clients").join("js")
}

/// Prefixes of the environment cargo sets for one crate's build or tests.
const CARGO_SET_FOR_A_CRATE: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// The relay binary the suites start: `$PABAL_RELAY_BIN`, else built here (a no-op when the
/// test build already made it). `test-hooks` is on because this crate enables it for the
/// whole workspace build: the same features find the same artifact instead of rebuilding it.
fn relay_binary() -> &'static Path {
    static RELAY: OnceLock<PathBuf> = OnceLock::new();
    RELAY.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PABAL_RELAY_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Without the variables cargo set for this test crate (CARGO_MANIFEST_DIR,
        // CARGO_PKG_NAME, ...): build scripts (ring's) track them, and inherited they would
        // make this build differ from the shell's `cargo test` and rebuild the relay.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if CARGO_SET_FOR_A_CRATE.iter().any(|set| key.starts_with(set)) {
                cmd.env_remove(&*key);
            }
        }
        let out = cmd
            .args(["build", "-p", "pabal-relay", "--bin", "relay"])
            .args(["--features", "test-hooks", "--locked"])
            .arg("--message-format=json-render-diagnostics")
            .current_dir(workspace())
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building the relay failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "relay")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo names the relay's executable")
    })
}

/// `node` and the flags it needs for a global WebSocket (Node 20: `--experimental-websocket`),
/// or why it cannot run the suites.
fn node() -> Result<&'static [&'static str], String> {
    static NODE: OnceLock<Result<&'static [&'static str], String>> = OnceLock::new();
    NODE.get_or_init(|| {
        let has_websocket = |flags: &[&str]| {
            Command::new("node")
                .args(flags)
                .args([
                    "-e",
                    "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if Command::new("node").arg("--version").output().is_err() {
            return Err("node is not installed (Node 20 or later)".into());
        }
        if has_websocket(&[]) {
            Ok(&[][..])
        } else if has_websocket(&["--experimental-websocket"]) {
            Ok(&["--experimental-websocket"][..])
        } else {
            Err("this node has no WebSocket (Node 20 or later needed)".into())
        }
    })
    .clone()
}

fn backend_name(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Epoll => "epoll",
        BackendKind::IoUring => "io_uring",
        BackendKind::Auto => "auto",
    }
}

/// Runs `node --test` on `files` (relative to clients/js) against the relay on `backend`,
/// with Chromium at `chromium` for the browser test.
fn node_test(
    backend: BackendKind,
    flags: &[&str],
    files: &[PathBuf],
    chromium: Option<&Path>,
) -> Output {
    let mut cmd = Command::new("node");
    cmd.args(flags)
        .args(["--test", "--test-reporter=spec"])
        .args(files)
        .current_dir(js_dir())
        .env("PABAL_RELAY_BIN", relay_binary())
        .env("PABAL_IO_BACKEND", backend_name(backend));
    if let Some(chromium) = chromium {
        cmd.env("CHROMIUM_PATH", chromium);
    }
    cmd.output().expect("node runs")
}

fn assert_passed(what: &str, out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    // A suite that ran nothing cannot fail: make sure it ran tests and none was skipped.
    assert!(
        text.contains("ℹ tests ") && !text.contains("ℹ tests 0\n"),
        "{what} ran no tests:\n{text}"
    );
    assert!(
        text.contains("ℹ skipped 0"),
        "{what} skipped tests:\n{text}"
    );
    eprintln!("{text}");
}

/// Where Chromium is: `$CHROMIUM_PATH`, else Debian's `/usr/bin/chromium`.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM_PATH")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    path.exists().then_some(path)
}

per_backend! {
    fn js_client_suite_against_a_real_relay(backend) {
        let flags = match node() {
            Ok(flags) => flags,
            Err(why) => return skip(format_args!("the JS client's tests: {why}")),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(js_dir().join("test"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".test.js"))
            .collect();
        files.sort();
        assert!(files.len() >= 3, "the JS test files: {files:?}");
        let out = node_test(backend, flags, &files, None);
        assert_passed("node --test clients/js/test/*.test.js", &out);
    }

    fn demo_page_in_headless_chromium(backend) {
        let flags = match node() {
            Ok(flags) => flags,
            Err(why) => return skip(format_args!("the demo page's Chromium test: {why}")),
        };
        let Some(chromium) = chromium() else {
            return skip("the demo page's Chromium test: no chromium (.ci/install-js.sh installs it)");
        };
        if !js_dir().join("node_modules/playwright-core").exists() {
            return skip("the demo page's Chromium test: run `npm ci` in clients/js (.ci/install-js.sh does)");
        }
        let files = [PathBuf::from("test/browser/demo_chromium.mjs")];
        let out = node_test(backend, flags, &files, Some(&chromium));
        assert_passed("the demo page in headless Chromium", &out);
    }
}
