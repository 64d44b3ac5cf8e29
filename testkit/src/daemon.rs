//! The relay binary as a child process: spawned with a configuration file and a clean
//! logging environment, its log lines read as they come, signals sent to it, its exit
//! awaited; and reading addresses out of its log lines.
//!
//! Owns: the child process of one test. Must not touch: the binary's path, which only the
//! relay crate's own tests know (`env!("CARGO_BIN_EXE_relay")`); they pass it in.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::WAIT;

/// The spawned relay, killed if the test fails before it exits.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: crossbeam_channel::Receiver<String>,
    /// Log lines read so far.
    pub seen: Vec<String>,
}

impl Daemon {
    /// Starts `<binary> --config <config>` with a clean logging environment and its stderr
    /// read line by line; `setup` adds to the command (environment, limits).
    pub fn spawn(binary: &str, config: &Path, setup: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            log,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` (or finds it among those already read).
    pub fn wait_log(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.log.recv_deadline(deadline) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?}; log so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` to the relay.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the relay to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit and expects status 0.
    pub fn assert_exits_cleanly(&mut self) {
        let status = self.wait_exit();
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits for the relay to exit, then returns its whole log.
    pub fn into_log(mut self) -> Vec<String> {
        self.wait_exit();
        // The reader thread sends the last line before it sees EOF and hangs up.
        while let Ok(line) = self.log.recv_timeout(WAIT) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the command under RLIMIT_NOFILE `soft`/`hard`.
pub fn limit_nofile(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: runs in the forked child before exec; setrlimit(2) is async-signal-safe and
    // `limit` is a plain value moved into the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Limits this process's file sizes to `bytes` (RLIMIT_FSIZE) and ignores SIGXFSZ, so a write
/// past the limit fails with EFBIG instead of killing the process: a full disk for one
/// process. Call it only in a child process that runs one test (it changes the whole
/// process).
pub fn limit_file_size_of_this_process(bytes: u64) {
    // SAFETY: setting a signal disposition and a resource limit of this process; no memory
    // is shared with the calls (`lim` is a plain local value).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = bytes;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

/// The address in a log line's `addr=` field.
pub fn addr_in(line: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
        .parse()
        .unwrap()
}
