//! The fuzz targets' committed seed corpus (`codec/fuzz/corpus/<target>/`), replayed through
//! the targets' own logic on the stable toolchain, so every `cargo test` exercises it whether
//! or not nightly and cargo-fuzz are installed (`.ci/run` also fuzzes briefly where they are).
//!
//! The logic is `codec/fuzz/fuzz_targets/common.rs`, included here as it is.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

#[path = "../fuzz/fuzz_targets/common.rs"]
mod fuzz;

use std::path::PathBuf;

/// Every file of `corpus/<target>/`, sorted by name; panics if there are none.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "{}: a seed corpus of a few dozen files, found {}",
        dir.display(),
        files.len()
    );
    files
}

/// Runs every corpus file of `target` through `logic`, naming the file that fails.
fn replay(target: &str, logic: fn(&[u8])) {
    for (name, data) in corpus(target) {
        if std::panic::catch_unwind(|| logic(&data)).is_err() {
            panic!("corpus/{target}/{name} fails the target: replay it with the fuzzer");
        }
    }
}

#[test]
fn decode_client_corpus() {
    replay("decode_client", fuzz::decode_client);
}

#[test]
fn decode_server_corpus() {
    replay("decode_server", fuzz::decode_server);
}

#[test]
fn session_corpus() {
    replay("session", fuzz::session);
}

/// The header of the input format: several cuts, each scaled over the stream, sorted; or
/// one read per byte.
#[test]
fn cuts_come_from_the_input() {
    let stream = [9u8; 10];
    let mut data = vec![3, 255, 0, 128];
    data.extend_from_slice(&stream);
    assert_eq!(fuzz::cuts(&data), Some((&stream[..], vec![0, 5, 10])));
    let mut every = vec![fuzz::EVERY_BYTE];
    every.extend_from_slice(&stream[..4]);
    assert_eq!(fuzz::cuts(&every), Some((&stream[..4], vec![1, 2, 3])));
    assert_eq!(
        fuzz::cuts(&[2, 7]),
        None,
        "two cut bytes announced, one present"
    );
    assert_eq!(fuzz::cuts(&[]), None);
}
