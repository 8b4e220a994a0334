//! `backbone`: the broker binary.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use backbone_broker::{Broker, Config, StartOptions};
use clap::{Parser, Subcommand};

/// Backbone: a zero-knowledge message broker.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. With no flags it uses embedded defaults: data in
    /// ./backbone-data, QUIC on 127.0.0.1:7700, metrics on 127.0.0.1:9700.
    Serve(ServeArgs),
    /// Fleet administration.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Check or repair a stopped broker's mailbox log.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Exit 0 if the broker's /health answers 200 (for container healthchecks).
    Healthcheck {
        /// The health URL (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:9700/health")]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Read every record of the mailbox log and report each damaged range:
    /// its file, offset, length, what is wrong, and the mailboxes with
    /// envelopes in it. Exits 0 when the log is whole, 1 when damage was
    /// found. The broker must be stopped.
    Verify {
        /// The broker's data directory.
        #[arg(long, default_value = "backbone-data")]
        data_dir: PathBuf,
    },
    /// Drop the damaged ranges `verify` reports: each is overwritten in
    /// place by a void record (a damaged end of the log is cut off), and
    /// the index entries that pointed into them are removed. The envelopes
    /// in them are lost; everything else is kept. Copy the data directory
    /// first. The broker must be stopped.
    Repair {
        /// The broker's data directory.
        #[arg(long, default_value = "backbone-data")]
        data_dir: PathBuf,
        /// Repair without asking.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Create the fleet CA (once) and a certificate for each listed node that
    /// has none yet, in DIR. Rerun with more nodes to add them.
    Pki {
        /// Directory for ca.pem, ca.key and <node>.pem/<node>.key.
        #[arg(long)]
        dir: PathBuf,
        /// Node names, as in the fleet map (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Extra DNS names or IPs for every node certificate.
        #[arg(long = "san")]
        extra_names: Vec<String>,
    },
    /// Validate a fleet map and print each node's slots, moves, epoch and
    /// digest. With --previous, also check that every slot changing owner
    /// is in a [[move]] from its previous owner.
    Check {
        /// The fleet file.
        file: PathBuf,
        /// The map the fleet runs now, to check the transition from.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (see config/backbone.toml for every key).
    #[arg(long, env = "BACKBONE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// QUIC listen address, UDP (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Metrics and health listen address, TCP (overrides metrics.listen).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// `backbone store verify|repair`.
fn store(command: StoreCommand) -> anyhow::Result<()> {
    use backbone_broker::store::SledStore;
    use backbone_broker::store::log::verify;
    let (data_dir, repair, yes) = match command {
        StoreCommand::Verify { data_dir } => (data_dir, false, false),
        StoreCommand::Repair { data_dir, yes } => (data_dir, true, yes),
    };
    let (store_path, log_path) = backbone_broker::store::open::paths(&data_dir);
    anyhow::ensure!(
        log_path.is_dir(),
        "{} holds no mailbox log (no {} directory)",
        data_dir.display(),
        log_path.display()
    );
    // Opening the directory takes its lock: a running broker holds it.
    let directory = SledStore::open(&store_path).with_context(|| {
        format!(
            "cannot open {} (is a broker running on this data directory?)",
            store_path.display()
        )
    })?;
    let damages = verify::verify(&log_path, &directory)?;
    if damages.is_empty() {
        println!("{}: the mailbox log is whole", log_path.display());
        return Ok(());
    }
    for damage in &damages {
        println!(
            "{} offset {} ({} bytes{}): {}",
            damage.file.display(),
            damage.offset,
            damage.len,
            if damage.tail {
                ", the end of the log"
            } else {
                ""
            },
            damage.error
        );
        for address in &damage.mailboxes {
            println!("  envelopes of {address} are in it");
        }
        if let Some(address) = damage.possibly {
            println!("  possibly envelopes of {address} (read from the damaged bytes)");
        }
    }
    if !repair {
        println!(
            "{} damaged range(s); `backbone store repair --data-dir {}` drops them",
            damages.len(),
            data_dir.display()
        );
        std::process::exit(1);
    }
    if !yes {
        eprint!(
            "drop {} damaged range(s) and the envelopes in them? Copy the data directory first. [y/N] ",
            damages.len()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            anyhow::bail!("nothing changed");
        }
    }
    let dropped = verify::repair(&log_path, &directory, &damages)?;
    println!(
        "repaired {} range(s); {dropped} indexed envelope(s) dropped",
        damages.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Colours only for a terminal: log files, `docker logs` and journald get
    // plain text (and each connection's span keeps its fields without escape
    // codes). NO_COLOR turns them off on a terminal too.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Fleet(command) => return fleet(command),
        Command::Store(command) => return store(command),
        Command::Healthcheck { url, timeout_secs } => {
            return healthcheck(&url, std::time::Duration::from_secs(timeout_secs));
        }
    };
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = Some(listen);
    }
    config.validate()?;
    // A bounded blocking pool: under load, an unbounded one grew to hundreds
    // of threads for short store reads, and waking them cost more than
    // queueing (docs/benchmarks.md, fourth session of 2026-11-24).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(config.server.blocking_threads())
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        backbone_broker::metrics_http::handle();
        let broker = Broker::start(config, StartOptions::default()).await?;
        println!("backbone listening on {} (udp)", broker.quic_addr);
        println!("certificate: {}", broker.cert_path.display());
        println!("fingerprint: {}", broker.fingerprint);
        if let Some(addr) = broker.metrics_addr {
            println!("metrics: http://{addr}/metrics  health: http://{addr}/health");
        }
        wait_for_signal().await?;
        broker.shutdown().await
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn fleet(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Pki {
            dir,
            nodes,
            extra_names,
        } => {
            if let Some(bad) = nodes.iter().find(|n| {
                n.is_empty()
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            }) {
                anyhow::bail!("node name {bad:?}: use letters, digits, '-' and '.' only");
            }
            if let Some(bad) = nodes
                .iter()
                .find(|n| backbone_broker::fleet::map::reserved_name(n))
            {
                anyhow::bail!(
                    "node name {bad:?} is reserved: every node certificate also names localhost and its loopback IP"
                );
            }
            let written = backbone_broker::fleet::pki::generate(&dir, &nodes, &extra_names)?;
            for path in &written {
                println!("wrote {}", path.display());
            }
            if written.is_empty() {
                println!("nothing to do: every node already has a certificate");
            }
            Ok(())
        }
        FleetCommand::Check { file, previous } => {
            let map = backbone_broker::fleet::FleetMap::load(&file)?;
            println!("epoch {} digest {}", map.epoch(), hex::encode(map.digest()));
            for node in map.nodes() {
                let ranges: Vec<String> = map
                    .slot_ranges(&node.name)
                    .into_iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                println!(
                    "{}: {} slots [{}] peer {} public {}",
                    node.name,
                    node.slot_count,
                    ranges.join(", "),
                    node.peer,
                    node.public
                );
            }
            for m in map.moves() {
                let ranges: Vec<String> = m.slots.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                println!("move {} -> {}: [{}]", m.from, m.to, ranges.join(", "));
            }
            if let Some(previous) = previous {
                let previous = backbone_broker::fleet::FleetMap::load(&previous)?;
                let problems = backbone_broker::fleet::map::check_transition(&previous, &map);
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    anyhow::bail!("the transition from epoch {} is not safe", previous.epoch());
                }
                println!("transition from epoch {} checked", previous.epoch());
            }
            Ok(())
        }
    }
}

/// A minimal HTTP/1.1 GET: the broker serves /health itself, so the image
/// needs no curl.
fn healthcheck(url: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        anyhow::bail!("unhealthy: {status:?}")
    }
}
