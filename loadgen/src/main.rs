//! `loadgen`: thousands of virtual phones on emulated mobile links against a pabal relay, with
//! delivery verification. See `loadgen/README.md`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;
use std::sync::{Arc, Mutex, PoisonError};

use pabal_loadgen::api::{ControlApi, Tokens};
use pabal_loadgen::fault::NodeFault;
use pabal_loadgen::report;
use pabal_loadgen::run::{RetentionSource, RunConfig, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::shard::{self, Shard};
use pabal_loadgen::spawn::{ClusterNode, SpawnOptions, SpawnedRelay};
use pabal_loadgen::targets::{TargetPolicy, Targets};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Virtual phones on emulated 3G/LTE links against a pabal relay, with delivery verification.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The scenario (TOML; see loadgen/scenarios/). Without one, the defaults: 1000 phones.
    scenario: Option<PathBuf>,
    /// The relay to load; several (`A,B,C`): a cluster's nodes, phones spread round robin
    /// (see --target-policy).
    #[arg(
        long,
        default_value = "127.0.0.1:7700",
        value_delimiter = ',',
        conflicts_with = "spawn_relay"
    )]
    target: Vec<SocketAddr>,
    /// With several targets: when a phone moves to the next one. `sticky`: only when a
    /// connection to its target fails (a node died); `rotate`: at every reconnect.
    #[arg(long, value_enum, default_value_t = TargetPolicy::Sticky)]
    target_policy: TargetPolicy,
    /// With --spawn-relay: start this many cluster nodes on --redis (one worker set each).
    #[arg(long, default_value_t = 1, requires = "spawn_relay")]
    nodes: usize,
    /// With --spawn-relay: the Redis the nodes share (`redis://127.0.0.1:6379`); makes every
    /// spawned relay a cluster node. loadgen does not start Redis.
    #[arg(long, value_name = "URL", requires = "spawn_relay")]
    redis: Option<String>,
    /// With --spawn-relay: kill -9 this node (1-based) during the run (see --kill-at).
    #[arg(long, value_name = "N", requires = "spawn_relay")]
    kill_node: Option<usize>,
    /// Seconds after publishing starts at which --kill-node dies.
    #[arg(long, default_value_t = 5.0, requires = "kill_node")]
    kill_at: f64,
    /// Seconds the killed node stays down before it is started again (and its memberships
    /// set again); without it, it stays down.
    #[arg(long, value_name = "SECONDS", requires = "kill_node")]
    restart_after: Option<f64>,
    /// Start a local relay (the `relay` binary next to loadgen's) for the run, then stop it.
    #[arg(long)]
    spawn_relay: bool,
    /// Worker threads of the spawned relay (default: the scenario's `[relay] workers`).
    #[arg(long, requires = "spawn_relay")]
    relay_workers: Option<usize>,
    /// The relay binary for --spawn-relay.
    #[arg(long, requires = "spawn_relay")]
    relay_bin: Option<PathBuf>,
    /// loadgen's event-loop threads (phones are spread over them).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Multiply the population (phones, channel subscribers) and population-level rates.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the steady phase's length, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the longest drain, seconds.
    #[arg(long)]
    drain: Option<f64>,
    /// Override the number of phones (before --scale).
    #[arg(long)]
    phones: Option<u64>,
    /// Override the link profile mix, e.g. `3g` or `3g:60,lte:40`.
    #[arg(long)]
    profiles: Option<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write an SVG chart of latency percentiles over time here.
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
    /// HS256 secret file: phones present JWTs minted with it (the relay must require them).
    #[arg(long, value_name = "PATH", requires = "api_key_file")]
    jwt_secret_file: Option<PathBuf>,
    /// The relay's control API, `http://127.0.0.1:PORT` (membership and channel publishes);
    /// against several nodes, any one node's (membership lives in the cluster's engine).
    #[arg(long, value_name = "URL")]
    control: Option<String>,
    /// File holding the control API key.
    #[arg(long, value_name = "PATH")]
    api_key_file: Option<PathBuf>,
    /// Spread phones over this many loopback source addresses (127.0.1.x); 0: one per 2,000
    /// phones against a loopback relay (past ~15,000 connections from one address, each
    /// connect() costs the kernel ~1 ms of port search); 1: never bind.
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Suffix of every room, channel and user name (run isolation: runs against one relay
    /// never see each other's messages). Default: a fresh one per run.
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// With --target: run even though the scenario's `[relay]` section sets options that
    /// cannot apply to a relay loadgen did not start (they are ignored).
    #[arg(long)]
    ignore_relay_options: bool,
    /// Run part i of n of the population (`0/4`): 1/n of it, its own seed and run id
    /// (`<run id>-s<i>`), rooms never shared with another part; for several loadgen processes
    /// against one relay or cluster where one process's descriptor limit is the wall. Give
    /// every part the same --run-id and --json, then --merge the reports.
    #[arg(long, value_name = "I/N", conflicts_with = "spawn_relay")]
    shard: Option<Shard>,
    /// Instead of a run: merge the JSON reports of a run's shards into one verdict (exit 0
    /// only if every shard passed); --json writes the merged one.
    #[arg(long, value_name = "REPORT.json", num_args = 1.., conflicts_with = "scenario")]
    merge: Vec<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Instead of a load run: measure one phone's reconnect over TLS per link profile
    /// (--profiles, default `3g,lte`): fresh handshake, resumed, 0-RTT. With --spawn-relay
    /// the relay gets a throwaway certificate; with --target give --tls-ca.
    #[arg(long, conflicts_with = "scenario")]
    tls_reconnect: bool,
    /// --tls-reconnect against --target: the PEM file of the CA the relay's certificate
    /// chains to.
    #[arg(long, value_name = "PATH", requires = "tls_reconnect")]
    tls_ca: Option<PathBuf>,
    /// --tls-reconnect: the name the relay's certificate carries.
    #[arg(long, default_value = "localhost", requires = "tls_reconnect")]
    tls_server_name: String,
    /// --tls-reconnect: reconnects measured per profile and mode.
    #[arg(long, default_value_t = 9, requires = "tls_reconnect")]
    trials: usize,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match main_inner() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    if cli.tls_reconnect {
        return tls_reconnect_main(&cli);
    }
    if !cli.merge.is_empty() {
        return merge_main(&cli);
    }
    let mut scenario = match &cli.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Scenario::parse(&text).with_context(|| path.display().to_string())?
        }
        None => Scenario::default(),
    };
    if let Some(seed) = cli.seed {
        scenario.seed = seed;
    }
    if let Some(d) = cli.duration {
        scenario.duration_s = d;
    }
    if let Some(d) = cli.drain {
        scenario.drain_s = d;
    }
    if let Some(n) = cli.phones {
        scenario.population.phones = n;
    }
    if let Some(p) = &cli.profiles {
        scenario.population.profiles = p.clone();
    }
    if !(cli.scale.is_finite() && cli.scale > 0.0) {
        anyhow::bail!("--scale must be a positive number");
    }
    scenario.validate()?;
    let scenario = scenario.scaled(cli.scale);
    let scenario = match cli.shard {
        Some(s) => s.part_of(&scenario),
        None => scenario,
    };
    if !cli.spawn_relay {
        let set = scenario.relay.cannot_apply();
        if !set.is_empty() {
            eprintln!(
                "the scenario's [relay] section sets what only a relay loadgen starts can take; \
                 against --target {} it cannot apply:",
                Targets::new(cli.target.clone(), cli.target_policy)?
            );
            for option in &set {
                eprintln!("  {option}");
            }
            if !cli.ignore_relay_options {
                anyhow::bail!(
                    "configure the running relay to match (see loadgen/README.md), then run \
                     again with --ignore-relay-options; or use --spawn-relay"
                );
            }
            eprintln!("--ignore-relay-options: going on without them");
        }
    }

    let nodes = if cli.spawn_relay {
        spawn_nodes(&cli, &scenario)?
    } else {
        Vec::new()
    };
    let lock = |n: &Arc<Mutex<SpawnedRelay>>| {
        let r = n.lock().unwrap_or_else(PoisonError::into_inner);
        (r.addr, r.control)
    };
    let targets = if nodes.is_empty() {
        Targets::new(cli.target.clone(), cli.target_policy)?
    } else {
        Targets::new(nodes.iter().map(|n| lock(n).0).collect(), cli.target_policy)?
    };
    for &target in targets.addrs() {
        std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
            .with_context(|| {
                format!("no relay answers on {target} (start one, or use --spawn-relay)")
            })?;
    }
    let mut config = RunConfig::from_scenario(&scenario, targets)?;
    config.threads = cli.threads;
    config.progress = !cli.quiet;
    config.source_ips = cli.source_ips;
    if let Some(id) = &cli.run_id {
        config.run_id = id.clone();
    }
    if let Some(s) = cli.shard {
        config.run_id = s.run_id(&config.run_id);
    }
    let api_key = cli
        .api_key_file
        .as_deref()
        .map(ControlApi::read_key)
        .transpose()?;
    let control_url = match nodes.first() {
        None => cli.control.clone(),
        Some(node) => Some(format!("http://{}", lock(node).1)),
    };
    if let Some(k) = cli.kill_node {
        let Some(node) = k.checked_sub(1).and_then(|i| nodes.get(i)) else {
            anyhow::bail!("--kill-node {k}: the nodes are 1 to {}", nodes.len());
        };
        config.fault = Some(NodeFault {
            node: node.clone(),
            label: format!("node {k}"),
            kill_at_s: cli.kill_at,
            down_s: cli.restart_after,
        });
    }
    // The relay's own answer beats the scenario's word on retention.
    if let Some(url) = &control_url {
        config.retention = RetentionSource::Api(ControlApi::new(url, api_key.clone())?);
    }
    if let Some(secret) = &cli.jwt_secret_file {
        config.tokens = Tokens::from_secret_file(secret)?;
        let Some(url) = &control_url else {
            anyhow::bail!("--jwt-secret-file needs --control (or --spawn-relay)");
        };
        config.control = Some(ControlApi::new(url, api_key)?);
    } else if config.targets.addrs().len() > 1
        && let Some(url) = &control_url
    {
        // Several nodes: every membership is set up through the server API before anything
        // is published (membership lives in the engine, so one node's API reaches them
        // all), rather than by each phone's first SUBSCRIBE on whichever node it reaches.
        config.control = Some(ControlApi::new(url, api_key)?);
    }
    eprintln!(
        "{}: {} phones, {} rooms, {} thread(s), target {}, run id {}",
        scenario.name,
        config.plan.phones.len(),
        config.plan.rooms.len(),
        config.threads,
        config.targets,
        config.run_id
    );
    let result = run(config);
    for node in nodes {
        let Ok(relay) = Arc::try_unwrap(node) else {
            continue; // still lent: dropping it stops it
        };
        match relay
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .stop()
        {
            Ok(Some(status)) if !status.success() => {
                eprintln!("the spawned relay exited with {status}")
            }
            Err(e) => eprintln!("stopping the spawned relay: {e:#}"),
            _ => {}
        }
    }
    let report = result?;
    print!("{}", report::table(&report));
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report::to_json(&report))?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &cli.svg {
        std::fs::write(path, report::to_svg(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report.passed())
}

/// `--merge`: one verdict from the shards' reports.
fn merge_main(cli: &Cli) -> anyhow::Result<bool> {
    let reports = cli
        .merge
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| path.display().to_string())
        })
        .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
    let merged = shard::merge(&reports)?;
    print!("{}", shard::table(&merged));
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&shard::to_json(&merged))?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(merged.passed)
}

/// `--spawn-relay`: one relay, or `--nodes N` cluster nodes on `--redis`.
fn spawn_nodes(cli: &Cli, scenario: &Scenario) -> anyhow::Result<Vec<Arc<Mutex<SpawnedRelay>>>> {
    if cli.nodes == 0 {
        anyhow::bail!("--nodes must be at least 1");
    }
    if cli.nodes > 1 && cli.redis.is_none() {
        anyhow::bail!(
            "--nodes {} needs --redis (the engine the nodes share)",
            cli.nodes
        );
    }
    let run_tag = std::process::id();
    let mut nodes = Vec::new();
    for k in 1..=cli.nodes {
        let options = SpawnOptions {
            relay_bin: cli.relay_bin.clone(),
            workers: cli.relay_workers.unwrap_or(scenario.relay.workers),
            spec: scenario.relay.clone(),
            jwt_secret_file: cli.jwt_secret_file.clone(),
            api_key_file: cli.api_key_file.clone(),
            cluster: cli.redis.as_ref().map(|redis| ClusterNode {
                redis: redis.clone(),
                node_id: format!("loadgen-{run_tag}-{k}"),
            }),
            io_backend: None,
            log_dir: None,
        };
        let relay = SpawnedRelay::start(&options)?;
        eprintln!(
            "spawned relay {k}: clients on {}, control on {} ({} worker(s){}){}",
            relay.addr,
            relay.control,
            options.workers.max(1),
            cli.redis
                .as_ref()
                .map_or(String::new(), |r| format!(", cluster on {r}")),
            relay
                .log_path()
                .map_or(String::new(), |p| format!(", its log in {}", p.display()))
        );
        nodes.push(Arc::new(Mutex::new(relay)));
    }
    Ok(nodes)
}

/// `--tls-reconnect`: the reconnect probe (see `pabal_loadgen::tls_reconnect`).
fn tls_reconnect_main(cli: &Cli) -> anyhow::Result<bool> {
    use pabal_loadgen::profiles::ProfileMix;
    use pabal_loadgen::tls_reconnect::{self, ProbeConfig};
    let mix = ProfileMix::parse(cli.profiles.as_deref().unwrap_or("3g,lte"))?;
    let profiles = mix.entries().map(|(p, _)| p.clone()).collect();
    let run_id = cli
        .run_id
        .clone()
        .unwrap_or_else(pabal_loadgen::plan::fresh_run_id);
    let (relay, target, tls) = if cli.spawn_relay {
        let dir = std::env::temp_dir().join(format!("pabal-loadgen-tls-{}", std::process::id()));
        let (cert, key, tls) = tls_reconnect::throwaway_certificate(&dir)?;
        let spec = pabal_loadgen::scenario::RelaySpec {
            extra_toml: format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
            ..Default::default()
        };
        let options = SpawnOptions {
            relay_bin: cli.relay_bin.clone(),
            workers: cli.relay_workers.unwrap_or(1),
            spec,
            jwt_secret_file: None,
            api_key_file: None,
            cluster: None,
            io_backend: None,
            log_dir: None,
        };
        let relay = SpawnedRelay::start(&options)?;
        eprintln!("spawned relay: TLS on {}", relay.addr);
        let addr = relay.addr;
        (Some(relay), addr, tls)
    } else {
        let Some(ca) = &cli.tls_ca else {
            anyhow::bail!("--tls-reconnect against --target needs --tls-ca (or use --spawn-relay)");
        };
        (
            None,
            cli.target[0],
            tls_reconnect::trust(ca, &cli.tls_server_name)?,
        )
    };
    let config = ProbeConfig {
        relay: target,
        tls,
        profiles,
        trials: cli.trials.max(1),
        seed: cli.seed.unwrap_or(1),
        run_id,
        timeout: std::time::Duration::from_secs(30),
    };
    let result = tls_reconnect::run_probe(&config);
    if let Some(relay) = relay
        && let Err(e) = relay.stop()
    {
        eprintln!("stopping the spawned relay: {e:#}");
    }
    let reports = result?;
    print!("{}", tls_reconnect::table(&reports));
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&reports)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(true)
}
