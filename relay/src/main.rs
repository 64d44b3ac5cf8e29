//! `relay`: the pabal relay daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;
use pabal_relay::config::{Config, LogFormat};
use pabal_relay::runtime::RelayHandle;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", pabal_relay::config::EMBEDDED_DEFAULT);
        return Ok(());
    }
    if let Some(path) = cli.check_config {
        let config = Config::load(&path)?;
        print!("{}", config.to_toml());
        eprintln!("{}: ok", path.display());
        return Ok(());
    }
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    init_logging(&config);
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let relay = RelayHandle::start(config)?;
    let handle = signals.handle();
    // Signals are taken on this control thread and passed to the workers as messages.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => tracing::warn!(
                        "SIGHUP: live reload is not available in this build; restart to apply \
                         config changes"
                    ),
                    _ => {
                        tracing::info!(signal, "shutting down gracefully");
                        relay.shutdown();
                        break;
                    }
                }
            }
        });
        // A worker leaving (shutdown done, or a failure) ends the process.
        relay.wait_any_exit(None);
        relay.shutdown();
        handle.close();
    });
    relay.join()?;
    tracing::info!("relay stopped");
    Ok(())
}
