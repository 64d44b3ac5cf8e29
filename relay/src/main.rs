//! `relay`: the pabal relay daemon.
//!
//! The main thread loads the configuration, starts the relay and waits for its workers. One
//! control thread takes every signal (signal-hook) and passes it on as a message: SIGTERM
//! and SIGINT begin a graceful shutdown, SIGHUP reloads the configuration file. The
//! watchdog thread ([`pabal_relay::watchdog`]) probes the workers for systemd's watchdog
//! and `/healthz`, and keeps systemd's `STATUS=` line current.
//!
//! Under systemd (`Type=notify`, see `systemd/relay.service`) the relay sends READY=1 once
//! it listens, RELOADING=1 ... READY=1 around a reload and STOPPING=1 when it drains; every
//! notification is a no-op without `NOTIFY_SOCKET`. Logs go to stderr, one line per event;
//! when stderr is the journal (`JOURNAL_STREAM`), without timestamps (journald adds its
//! own) and with the syslog priority prefix journald files them under.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;
use pabal_relay::config::{Config, LogFormat};
use pabal_relay::metrics;
use pabal_relay::runtime::{Relay, RelayHandle};
use pabal_relay::watchdog::{self, NotifyState, Watchdog, WatchdogConfig};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// pabal relay: holds phones' connections and fans messages out to rooms and channels.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file (TOML). Without it, the embedded default runs: loopback,
    /// no authentication.
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate a configuration file, print the effective configuration, and exit
    /// (non-zero if invalid). Used by systemd before a reload.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// With --check-config: do not print the effective configuration, only the verdict.
    #[arg(long, short, requires = "check_config")]
    quiet: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", pabal_relay::config::EMBEDDED_DEFAULT);
        return ExitCode::SUCCESS;
    }
    let journal = stderr_is_journal();
    if let Some(path) = &cli.check_config {
        // Every file the configuration names is read too (API key, token keys): what passes
        // here passes at start and at the reload `systemctl reload` sends next.
        return match Config::load(path).and_then(|c| c.check_files().map(|()| c)) {
            Ok(config) => {
                if !cli.quiet {
                    print!("{}", config.to_toml());
                }
                eprintln!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                let message = format!("{}: {e}", path.display());
                eprintln!("{}", if journal { one_line(&message) } else { message });
                ExitCode::FAILURE
            }
        };
    }
    let loaded = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::embedded(),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("relay: {}", one_line(&e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    let log = init_logging(&config, journal);
    install_panic_hook();
    match run(config, cli.config.as_deref(), &log) {
        Ok(()) => {
            tracing::info!("relay stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let message = error_chain(&e);
            tracing::error!("{message}");
            watchdog::notify(&[NotifyState::Status(&format!("failed: {message}"))]);
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, path: Option<&Path>, log: &LogControl) -> anyhow::Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let relay = RelayHandle::start(config)?;
    let (watchdog_config, systemd_watchdog) = WatchdogConfig::from_env();
    let watchdog =
        match Watchdog::spawn(relay.relay().clone(), watchdog_config, watchdog::systemd()) {
            Ok(watchdog) => watchdog,
            Err(e) => {
                relay.shutdown();
                let _ = relay.join();
                return Err(e).context("cannot start the watchdog thread");
            }
        };
    if systemd_watchdog {
        tracing::info!(
            "systemd watchdog on: every worker is probed every {:.1} s",
            watchdog_config.period.as_secs_f64()
        );
    }
    for route in metrics::routes_with(Some(watchdog.liveness())) {
        relay.add_route(route);
    }
    watchdog::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "listening on {} ({} workers, backend {})",
            relay.local_addr(),
            relay.workers(),
            relay.backend()
        )),
    ]);
    let handle = signals.handle();
    // Signals are taken on this control thread and passed to the workers as messages.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    reload(&relay, path, log);
                    continue;
                }
                let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
                tracing::info!("{name}: shutting down gracefully");
                watchdog::notify(&[
                    NotifyState::Stopping,
                    NotifyState::Status("draining: GOAWAY to every client"),
                ]);
                relay.shutdown();
                break;
            }
        });
        // A worker leaving (shutdown done, or a failure) ends the process.
        relay.wait_any_exit(None);
        relay.shutdown();
        handle.close();
    });
    watchdog.stop();
    relay.join()
}

/// SIGHUP: re-reads the file and applies it. RELOADING=1 and READY=1 bracket the work so
/// `systemctl reload` returns once it is done; a file that fails changes nothing.
fn reload(relay: &Relay, path: Option<&Path>, log: &LogControl) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running the embedded default (no --config); nothing to reload");
        return;
    };
    watchdog::notify_reloading();
    let outcome = Config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|new| relay.reload(new));
    match outcome {
        Ok(report) => {
            // log.level is classified live: this binary owns the log filter and applies it.
            if report.live.iter().any(|f| f == "log.level") {
                match log.set_level(&relay.config().log.level) {
                    Ok(true) => {}
                    Ok(false) => tracing::info!("log.level changed, but RUST_LOG overrides it"),
                    Err(e) => tracing::warn!("cannot apply log.level: {e:#}"),
                }
            }
            let live = if report.live.is_empty() {
                "nothing".to_string()
            } else {
                report.live.join(", ")
            };
            if report.needs_restart.is_empty() {
                tracing::info!(path = %path.display(), "configuration reloaded; changed live: {live}");
            } else {
                tracing::warn!(
                    path = %path.display(),
                    "configuration reloaded; changed live: {live}; needs a restart, running \
                     value kept: {}",
                    report.needs_restart.join(", ")
                );
            }
        }
        Err(e) => tracing::error!(
            path = %path.display(),
            "reload failed, the running configuration stays: {}",
            error_chain(&e)
        ),
    }
    watchdog::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "reloaded; listening on {} ({} workers, backend {})",
            relay.local_addr(),
            relay.workers(),
            relay.backend()
        )),
    ]);
}

/// Collapses a multi-line message (TOML errors show the offending line) into one line, so
/// the journal keeps it as one entry.
fn one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('|').trim_start())
        .filter(|l| !l.is_empty())
        .collect();
    parts.join(" | ")
}

/// An error and its causes on one line, skipping a cause whose text the message before
/// already includes (`ConfigError` displays its TOML source itself).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    one_line(&text)
}

/// Whether stderr is connected to the journal: `JOURNAL_STREAM` names its device and inode
/// (systemd.exec(5)), compared so a redirected stderr is not mistaken for it.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The reloadable part of logging: the level filter.
struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over `log.level`, at start and on reload.
    from_env: bool,
}

impl LogControl {
    /// Applies a new `log.level`; `Ok(false)` when `RUST_LOG` overrides it.
    fn set_level(&self, level: &str) -> anyhow::Result<bool> {
        if self.from_env {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level).context("log.level")?;
        self.filter.reload(filter).context("log filter")?;
        Ok(true)
    }
}

type Base = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

fn init_logging(config: &Config, journal: bool) -> LogControl {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = from_env
        .then(|| EnvFilter::try_from_default_env().ok())
        .flatten()
        .or_else(|| EnvFilter::try_new(&config.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let tty = !journal && std::io::stderr().is_terminal();
    let output: Box<dyn Layer<Base> + Send + Sync> = match config.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(OneLine {
                priority: journal,
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false),
            })
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if tty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if journal => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(OneLine {
                priority: true,
                inner: tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false),
            })
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(OneLine {
                priority: false,
                inner: tracing_subscriber::fmt::format()
                    .with_target(false)
                    .with_ansi(false),
            })
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    LogControl {
        filter: handle,
        from_env,
    }
}

/// Wraps an event format: one line per event whatever the message holds, and under
/// journald the `<N>` syslog priority prefix (sd-daemon(3)), which journald strips and
/// files the entry under, so `journalctl -p warning` finds warnings and errors.
struct OneLine<F> {
    priority: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for OneLine<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        if self.priority {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                _ => 7,
            };
            write!(line, "<{priority}>")?;
        }
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        if body.contains('\n') {
            writer.write_str(&body.replace('\n', " | "))?;
        } else {
            writer.write_str(body)?;
        }
        writer.write_char('\n')
    }
}

/// A panic becomes one error line in the log (thread, place, message) instead of the
/// default multi-line report; with `RUST_BACKTRACE=1` the backtrace follows on the same line.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-text panic payload)");
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(
                thread,
                at = %place,
                "panic: {}; backtrace: {}",
                one_line(message),
                one_line(&backtrace.to_string())
            );
        } else {
            tracing::error!(thread, at = %place, "panic: {}", one_line(message));
        }
    }));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    #[test]
    fn multi_line_messages_become_one_line() {
        assert_eq!(
            one_line("TOML parse error at line 1\n  |\n1 | x = \n  | ^\nbad\n"),
            "TOML parse error at line 1 | 1 | x = | ^ | bad"
        );
    }
}
