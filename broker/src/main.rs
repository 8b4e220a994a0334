//! `backbone`: the broker binary.
//!
//! `main` parses the command line, sets up logging and runs one command.
//! Every result goes through [`Output`]: text for people, or with `--json`
//! one JSON object per line for scripts (docs/operations.md lists the
//! fields); an error is then one JSON object on standard error.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use backbone_broker::{Broker, Config, StartOptions};
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

/// mimalloc instead of the C library's allocator: about a quarter less CPU
/// per envelope at saturation (glibc's malloc and free were a tenth of the
/// broker's profile: envelopes are allocated on tokio's workers and freed
/// on the log's threads, and back). Built without transparent huge pages
/// (the `no_thp` feature), which cost idle connections 4-5 KB each.
/// Measurements in docs/benchmarks.md (2026-12-07, fourth session).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Backbone: a zero-knowledge message broker.
#[derive(Parser)]
#[command(name = "backbone", version, about)]
struct Cli {
    /// Print results as JSON for scripts: one object per line on standard
    /// output (logs go to standard error), with the field names
    /// docs/operations.md lists. An error is one JSON object on standard
    /// error (`error`, `message`), and the exit code stays what it is
    /// without --json.
    #[arg(long, global = true)]
    json: bool,
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
    /// Print a shell completion script on standard output. For bash:
    /// `backbone completions bash > ~/.local/share/bash-completion/completions/backbone`;
    /// zsh: write `_backbone` into a directory of your `$fpath`; fish:
    /// `~/.config/fish/completions/backbone.fish`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write a man page for backbone and one for each of its subcommands
    /// (`backbone-store-verify.1`, ...) into a directory, for example
    /// `/usr/local/share/man/man1`.
    Man {
        /// The directory to write the pages into (created if missing).
        #[arg(long)]
        out: PathBuf,
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

/// Where a command prints its results, and in which form.
#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// Prints one result on standard output: `value` as one JSON line, or
    /// the lines `text` returns (nothing when it returns an empty string).
    fn result<T: Serialize>(self, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer(&mut stdout, value)?;
            writeln!(stdout)?;
        } else {
            let text = text();
            if !text.is_empty() {
                writeln!(stdout, "{text}")?;
            }
        }
        stdout.flush()?;
        Ok(())
    }
}

/// What kind of failure ended a command: the stable `error` field of a JSON
/// error. Every kind but `usage` (exit code 2) exits with 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ErrorKind {
    /// The command line does not parse.
    Usage,
    /// Anything not listed below.
    Failed,
    /// `store verify` or `store repair` found damaged ranges.
    Damaged,
    /// `fleet check --previous` found slots changing owner without a move.
    UnsafeTransition,
    /// `healthcheck` got no 200 from /health, or no answer at all.
    Unhealthy,
}

/// A failure of a kind other than [`ErrorKind::Failed`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    /// An error of `kind`.
    fn error(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Failure {
            kind,
            message: message.into(),
        })
    }
}

/// An error as `--json` prints it on standard error.
#[derive(Serialize)]
struct ErrorReport<'a> {
    error: ErrorKind,
    message: &'a str,
}

fn print_json_error(kind: ErrorKind, message: &str) {
    // An error object holds only strings: it always serializes.
    let line = serde_json::to_string(&ErrorReport {
        error: kind,
        message,
    })
    .unwrap_or_default();
    eprintln!("{line}");
}

/// Prints `error` on standard error and returns exit code 1.
fn report_error(output: Output, error: &anyhow::Error) -> ExitCode {
    if output.json {
        let kind = error
            .downcast_ref::<Failure>()
            .map_or(ErrorKind::Failed, |failure| failure.kind);
        print_json_error(kind, &format!("{error:#}"));
    } else {
        // As a `main` returning the error would print it.
        eprintln!("Error: {error:?}");
    }
    ExitCode::FAILURE
}

/// The command line failed to parse: as JSON with `--json` among the
/// arguments (`--help` and `--version` print as usual), else as clap prints it.
fn usage_error(error: clap::Error) -> ExitCode {
    let json_asked = std::env::args_os()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json");
    if !json_asked || !error.use_stderr() {
        error.exit()
    }
    let rendered = error.render().to_string();
    let message = rendered.lines().next().unwrap_or_default();
    print_json_error(ErrorKind::Usage, message.trim_start_matches("error: "));
    ExitCode::from(2)
}

/// One damaged range of the mailbox log, in `store verify|repair --json`.
#[derive(Serialize)]
struct DamagedRange {
    file: String,
    offset: u64,
    position: u64,
    len: u64,
    /// Whether the range runs to the end of the log.
    tail: bool,
    error: String,
    /// Addresses with envelopes indexed in the range.
    mailboxes: Vec<String>,
    /// For a range no checkpoint covers: the address its damaged bytes read as.
    possibly: Option<String>,
}

/// `store verify --json`.
#[derive(Serialize)]
struct Verified {
    log: String,
    whole: bool,
    damaged: Vec<DamagedRange>,
}

/// `store repair --json`.
#[derive(Serialize)]
struct Repaired {
    log: String,
    damaged: Vec<DamagedRange>,
    repaired_ranges: usize,
    dropped_envelopes: usize,
}

/// `backbone store verify|repair`.
fn store(output: Output, command: StoreCommand) -> anyhow::Result<()> {
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
    let damaged: Vec<DamagedRange> = damages
        .iter()
        .map(|damage| DamagedRange {
            file: damage.file.display().to_string(),
            offset: damage.offset,
            position: damage.position,
            len: damage.len,
            tail: damage.tail,
            error: damage.error.clone(),
            mailboxes: damage.mailboxes.iter().map(ToString::to_string).collect(),
            possibly: damage.possibly.map(|address| address.to_string()),
        })
        .collect();
    let log = log_path.display().to_string();
    let whole_text = || format!("{log}: the mailbox log is whole");
    if damages.is_empty() && repair {
        let repaired = Repaired {
            log: log.clone(),
            damaged,
            repaired_ranges: 0,
            dropped_envelopes: 0,
        };
        return output.result(&repaired, whole_text);
    }
    if !repair {
        let whole = damages.is_empty();
        let verified = Verified {
            log: log.clone(),
            whole,
            damaged,
        };
        output.result(&verified, || {
            if whole {
                whole_text()
            } else {
                damage_text(&verified.damaged)
            }
        })?;
        if whole {
            return Ok(());
        }
        return Err(Failure::error(
            ErrorKind::Damaged,
            format!(
                "{} damaged range(s); `backbone store repair --data-dir {}` drops them",
                damages.len(),
                data_dir.display()
            ),
        ));
    }
    if !output.json {
        println!("{}", damage_text(&damaged));
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
    let repaired = Repaired {
        log,
        damaged,
        repaired_ranges: damages.len(),
        dropped_envelopes: dropped,
    };
    output.result(&repaired, || {
        format!(
            "repaired {} range(s); {dropped} indexed envelope(s) dropped",
            repaired.repaired_ranges
        )
    })
}

/// The damaged ranges as `store verify` prints them for people.
fn damage_text(damaged: &[DamagedRange]) -> String {
    let mut lines = Vec::new();
    for damage in damaged {
        lines.push(format!(
            "{} offset {} ({} bytes{}): {}",
            damage.file,
            damage.offset,
            damage.len,
            if damage.tail {
                ", the end of the log"
            } else {
                ""
            },
            damage.error
        ));
        for address in &damage.mailboxes {
            lines.push(format!("  envelopes of {address} are in it"));
        }
        if let Some(address) = &damage.possibly {
            lines.push(format!(
                "  possibly envelopes of {address} (read from the damaged bytes)"
            ));
        }
    }
    lines.join("\n")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    let output = Output { json: cli.json };
    init_logging(output);
    match run(output, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report_error(output, &error),
    }
}

/// Logs go to standard output, or to standard error with `--json` so that
/// standard output holds only JSON. Colours only for a terminal: log files,
/// `docker logs` and journald get plain text (and each connection's span
/// keeps its fields without escape codes). NO_COLOR turns them off on a
/// terminal too.
fn init_logging(output: Output) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colours = std::env::var_os("NO_COLOR").is_none();
    if output.json {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(colours && std::io::stderr().is_terminal())
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(colours && std::io::stdout().is_terminal())
            .with_env_filter(filter)
            .init();
    }
}

fn run(output: Output, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(output, args),
        Command::Fleet(command) => fleet(output, command),
        Command::Store(command) => store(output, command),
        Command::Healthcheck { url, timeout_secs } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            // Whatever went wrong, the broker is not known to be healthy.
            healthcheck(output, &url, timeout).map_err(|error| match error.is::<Failure>() {
                true => error,
                false => Failure::error(ErrorKind::Unhealthy, format!("{error:#}")),
            })
        }
        Command::Completions { shell } => {
            let mut command = Cli::command();
            let mut stdout = std::io::stdout().lock();
            clap_complete::generate(shell, &mut command, "backbone", &mut stdout);
            stdout.flush()?;
            Ok(())
        }
        Command::Man { out } => man(output, &out),
    }
}

/// `serve --json`: where the broker listens, printed once it does.
#[derive(Serialize)]
struct Listening {
    quic_addr: String,
    certificate: String,
    fingerprint: String,
    metrics_addr: Option<String>,
}

fn serve(output: Output, args: ServeArgs) -> anyhow::Result<()> {
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
        let listening = Listening {
            quic_addr: broker.quic_addr.to_string(),
            certificate: broker.cert_path.display().to_string(),
            fingerprint: broker.fingerprint.clone(),
            metrics_addr: broker.metrics_addr.map(|addr| addr.to_string()),
        };
        output.result(&listening, || {
            let mut lines = vec![
                format!("backbone listening on {} (udp)", listening.quic_addr),
                format!("certificate: {}", listening.certificate),
                format!("fingerprint: {}", listening.fingerprint),
            ];
            if let Some(addr) = &listening.metrics_addr {
                lines.push(format!(
                    "metrics: http://{addr}/metrics  health: http://{addr}/health"
                ));
            }
            lines.join("\n")
        })?;
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

/// `man --json`: every page written.
#[derive(Serialize)]
struct ManPages {
    pages: Vec<String>,
}

/// `man --out DIR`: one page for backbone and one for each subcommand,
/// named as man expects (`backbone-store-verify.1`).
fn man(output: Output, out: &Path) -> anyhow::Result<()> {
    fn write_pages(
        command: &clap::Command,
        out: &Path,
        pages: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let page = clap_mangen::Man::new(command.clone());
        let path = page
            .generate_to(out)
            .with_context(|| format!("writing {} in {}", page.get_filename(), out.display()))?;
        pages.push(path.display().to_string());
        for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            write_pages(subcommand, out, pages)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Built once from the top, so that every subcommand's page is titled
    // with its full name (`backbone-store-verify`), not just `verify`.
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut pages = Vec::new();
    write_pages(&command, out, &mut pages)?;
    let written = ManPages { pages };
    output.result(&written, || {
        written
            .pages
            .iter()
            .map(|page| format!("wrote {page}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `fleet pki --json`: the files written (none when every node already had
/// a certificate).
#[derive(Serialize)]
struct PkiWritten {
    written: Vec<String>,
}

/// `fleet check --json`.
#[derive(Serialize)]
struct FleetChecked {
    epoch: u64,
    digest: String,
    nodes: Vec<FleetNode>,
    moves: Vec<FleetMove>,
    /// With `--previous`: that map's epoch.
    previous_epoch: Option<u64>,
    /// With `--previous`: slots changing owner without a move (empty when
    /// the transition is safe).
    problems: Vec<String>,
}

/// One node of a fleet map; slots as inclusive `[first, last]` ranges.
#[derive(Serialize)]
struct FleetNode {
    name: String,
    slot_count: usize,
    slots: Vec<(u16, u16)>,
    peer: String,
    public: String,
}

/// One `[[move]]` of a fleet map.
#[derive(Serialize)]
struct FleetMove {
    from: String,
    to: String,
    slots: Vec<(u16, u16)>,
}

fn fleet(output: Output, command: FleetCommand) -> anyhow::Result<()> {
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
            let written = PkiWritten {
                written: written
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect(),
            };
            output.result(&written, || {
                if written.written.is_empty() {
                    return "nothing to do: every node already has a certificate".to_owned();
                }
                written
                    .written
                    .iter()
                    .map(|path| format!("wrote {path}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        FleetCommand::Check { file, previous } => {
            let map = backbone_broker::fleet::FleetMap::load(&file)?;
            let previous = previous
                .map(|path| backbone_broker::fleet::FleetMap::load(&path))
                .transpose()?;
            let checked = FleetChecked {
                epoch: map.epoch(),
                digest: hex::encode(map.digest()),
                nodes: map
                    .nodes()
                    .iter()
                    .map(|node| FleetNode {
                        name: node.name.clone(),
                        slot_count: node.slot_count,
                        slots: map.slot_ranges(&node.name),
                        peer: node.peer.clone(),
                        public: node.public.clone(),
                    })
                    .collect(),
                moves: map
                    .moves()
                    .iter()
                    .map(|m| FleetMove {
                        from: m.from.clone(),
                        to: m.to.clone(),
                        slots: m.slots.clone(),
                    })
                    .collect(),
                previous_epoch: previous.as_ref().map(|previous| previous.epoch()),
                problems: previous
                    .as_ref()
                    .map(|previous| {
                        backbone_broker::fleet::map::check_transition(previous, &map)
                            .iter()
                            .map(ToString::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            output.result(&checked, || fleet_text(&checked))?;
            if let Some(epoch) = checked.previous_epoch {
                if !checked.problems.is_empty() {
                    if !output.json {
                        for problem in &checked.problems {
                            eprintln!("{problem}");
                        }
                    }
                    return Err(Failure::error(
                        ErrorKind::UnsafeTransition,
                        format!("the transition from epoch {epoch} is not safe"),
                    ));
                }
                if !output.json {
                    println!("transition from epoch {epoch} checked");
                }
            }
            Ok(())
        }
    }
}

/// A checked fleet map as `fleet check` prints it for people.
fn fleet_text(checked: &FleetChecked) -> String {
    let ranges = |slots: &[(u16, u16)], collapse: bool| {
        slots
            .iter()
            .map(|&(a, b)| {
                if collapse && a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines = vec![format!("epoch {} digest {}", checked.epoch, checked.digest)];
    for node in &checked.nodes {
        lines.push(format!(
            "{}: {} slots [{}] peer {} public {}",
            node.name,
            node.slot_count,
            ranges(&node.slots, true),
            node.peer,
            node.public
        ));
    }
    for m in &checked.moves {
        lines.push(format!(
            "move {} -> {}: [{}]",
            m.from,
            m.to,
            ranges(&m.slots, false)
        ));
    }
    lines.join("\n")
}

/// `healthcheck --json`.
#[derive(Serialize)]
struct Healthy {
    url: String,
    /// The response's status line.
    status: String,
}

/// A minimal HTTP/1.1 GET: the broker serves /health itself, so the image
/// needs no curl.
fn healthcheck(output: Output, url: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    use std::io::Read;
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
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(Failure::error(
            ErrorKind::Unhealthy,
            format!("unhealthy: {status:?}"),
        ));
    }
    output.result(
        &Healthy {
            url: url.to_owned(),
            status: status.to_owned(),
        },
        String::new,
    )
}
