//! `backbone-loadtest`: drives a broker with real clients and measures it.
//!
//! Every scenario uses the real client library. By default envelopes are
//! end-to-end encrypted as an application would; `--opaque` sends random
//! bytes to measure the broker alone. Delivery is verified: every
//! acknowledged envelope must arrive exactly once per recipient.

mod broker;
mod plot;
mod report;
mod scenarios;
mod soak;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load-test a Backbone broker.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    /// Send random opaque payloads instead of end-to-end encrypted envelopes
    /// (isolates broker cost from sealing cost).
    #[arg(long, global = true)]
    opaque: bool,
    /// Write the full result as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time to this SVG file.
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Which broker to drive.
#[derive(Args, Clone)]
pub struct TargetArgs {
    /// Start a broker (the `backbone` binary next to this one) in a temporary directory.
    #[arg(long, global = true, conflicts_with = "server")]
    spawn_broker: bool,
    /// Broker address host:port.
    #[arg(long, global = true)]
    server: Option<String>,
    /// Certificate to trust.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Certificate fingerprint to pin instead of --ca.
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// TLS server name to verify (default: the host part of --server; a
    /// fleet is entered through any node and redirects are followed).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// PID of a local broker to sample CPU and memory from (automatic with --spawn-broker).
    #[arg(long, global = true)]
    broker_pid: Option<u32>,
    /// Extra environment for a spawned broker, KEY=VALUE (repeatable), e.g.
    /// `--broker-env BACKBONE__MAILBOX__IDLE_TIMEOUT=2s`.
    #[arg(long, global = true, value_parser = parse_env_pair)]
    broker_env: Vec<(String, String)>,
    /// Client UDP endpoints to spread connections over.
    #[arg(long, global = true, default_value_t = 4)]
    endpoints: usize,
    /// Let the clients probe for a path MTU above 1,200 bytes (off in the
    /// client library by default; a spawned broker also needs
    /// `--broker-env BACKBONE__TRANSPORT__MTU_DISCOVERY=true`).
    #[arg(long, global = true)]
    mtu_discovery: bool,
}

/// The scenarios.
#[derive(Subcommand, Clone)]
pub enum Scenario {
    /// N connected recipient mailboxes, M senders, sustained load.
    Steady(SteadyArgs),
    /// One sender to many recipients per message.
    Fanout(FanoutArgs),
    /// A fraction of recipients offline while messages arrive; then they reconnect and drain.
    OfflineCatchup(CatchupArgs),
    /// Handshake + auth rate, then idle connections held to measure memory per connection.
    ConnectStorm(StormArgs),
    /// Store one envelope in each of many mailboxes, wait past the broker's
    /// mailbox idle timeout, then report live mailbox actors and memory.
    IdleMailboxes(IdleArgs),
    /// Long mixed load (steady sends, connect/send/receive/disconnect churn,
    /// short TTLs expiring), then checks that the broker's memory, file
    /// descriptors and tasks stayed flat and its disk use stayed proportional
    /// to live data. Needs --spawn-broker.
    Soak(SoakArgs),
}

/// `soak`.
#[derive(Args, Clone)]
pub struct SoakArgs {
    /// How long to run the load, warm-up included.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before the first measured window; must be at least --ttl, so
    /// that the live data has reached its steady size when measuring starts.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Length of the first (right after warm-up) and last windows whose
    /// averages are compared.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// How often to sample the broker.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// Always-connected recipient mailboxes (their deliveries are verified).
    #[arg(long, default_value_t = 200)]
    pub mailboxes: usize,
    /// Always-connected sender connections.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 4)]
    pub inflight: usize,
    /// Steady send rate in messages/s over all senders.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Envelope payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// TTL of the steady sends that are not short-lived.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Fraction of steady sends given a short TTL instead of --ttl.
    #[arg(long, default_value_t = 0.25)]
    pub short_ttl_fraction: f64,
    /// Shortest short TTL (whole seconds).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub short_ttl_min: Duration,
    /// Longest short TTL (whole seconds).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub short_ttl_max: Duration,
    /// Identities used by the churn connections; each is offline between its visits.
    #[arg(long, default_value_t = 200)]
    pub churn_identities: usize,
    /// Churn connections opened per second (each connects, authenticates,
    /// sends, receives, acks, deletes and disconnects).
    #[arg(long, default_value_t = 10.0)]
    pub churn_rate: f64,
    /// Churn connections in progress at once, at most.
    #[arg(long, default_value_t = 8)]
    pub churn_workers: usize,
    /// Short-TTL sends per churn connection, to other churn identities.
    #[arg(long, default_value_t = 5)]
    pub churn_sends: usize,
    /// How long a churn connection waits for its pending envelopes.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub churn_linger: Duration,
    /// Fail if resident memory grows more than this (percent, last window
    /// against the first).
    #[arg(long, default_value_t = 5.0)]
    pub max_rss_growth: f64,
    /// Fail if the broker's live tokio tasks grow more than this (percent,
    /// last window average against the first).
    #[arg(long, default_value_t = 5.0)]
    pub max_task_growth: f64,
    /// Fail if open file descriptors after warm-up vary by more than this.
    #[arg(long, default_value_t = 8)]
    pub max_fd_spread: u64,
    /// Fail if disk use exceeds live data by more than this factor (last window).
    #[arg(long, default_value_t = 20.0)]
    pub max_disk_factor: f64,
}

/// `idle-mailboxes`.
#[derive(Args, Clone)]
pub struct IdleArgs {
    /// Mailboxes that each receive one envelope.
    #[arg(long, default_value_t = 100_000)]
    pub mailboxes: usize,
    /// Sender connections.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Envelope size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// How long to wait after the last send; must exceed the broker's `mailbox.idle_timeout`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// `steady`.
#[derive(Args, Clone)]
pub struct SteadyArgs {
    /// Connected recipient mailboxes.
    #[arg(long, default_value_t = 1000)]
    pub mailboxes: usize,
    /// Sender connections.
    #[arg(long, default_value_t = 50)]
    pub senders: usize,
    /// Envelope size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Target rate in messages/s over all senders; 0 = closed loop, as fast as acks allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Sends in flight per sender (closed loop concurrency).
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    pub fanout: usize,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// `fanout`.
#[derive(Args, Clone)]
pub struct FanoutArgs {
    /// Recipients of every message.
    #[arg(long, default_value_t = 100)]
    pub recipients: usize,
    /// Envelope size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Sends in flight.
    #[arg(long, default_value_t = 4)]
    pub inflight: usize,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// `offline-catchup`.
#[derive(Args, Clone)]
pub struct CatchupArgs {
    /// Recipient mailboxes.
    #[arg(long, default_value_t = 1000)]
    pub mailboxes: usize,
    /// Fraction of them offline while messages are sent.
    #[arg(long, default_value_t = 0.5)]
    pub offline_fraction: f64,
    /// Messages sent to each mailbox.
    #[arg(long, default_value_t = 20)]
    pub per_mailbox: usize,
    /// Envelope size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Sender connections.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
}

/// `connect-storm`.
#[derive(Args, Clone)]
pub struct StormArgs {
    /// Connections to open and authenticate.
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to hold the idle connections before measuring memory.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = broker::Target::resolve(&cli.target).await?;
        let result = scenarios::run(&cli, &target).await;
        target.stop().await;
        let result = result?;
        report::print(&result);
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
            println!("full result written to {}", path.display());
        }
        if let Some(path) = &cli.plot {
            plot::draw(&result, path)?;
            println!("plot written to {}", path.display());
        }
        if result.lost > 0 {
            anyhow::bail!("{} acknowledged envelopes were not delivered", result.lost);
        }
        if let Some(soak) = &result.soak {
            let failed: Vec<&str> = soak
                .checks
                .iter()
                .filter(|check| !check.pass)
                .map(|check| check.name.as_str())
                .collect();
            if !failed.is_empty() {
                anyhow::bail!("soak checks failed: {}", failed.join(", "));
            }
        }
        Ok(())
    })
}
