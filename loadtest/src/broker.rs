//! The broker under test: spawned locally or given by address, and sampled
//! from /proc when it runs on this machine.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use backbone_client::{ConnectConfig, Trust};

use crate::TargetArgs;

/// A broker to connect to.
pub struct Target {
    /// How clients connect.
    pub connect: ConnectConfig,
    /// Shared client endpoints.
    pub endpoints: Vec<quinn::Endpoint>,
    /// Whether clients probe the path MTU (`--mtu-discovery`).
    pub mtu_discovery: bool,
    /// The broker's PID, when local.
    pub pid: Option<u32>,
    /// The broker's metrics/health address, when spawned.
    pub metrics: Option<String>,
    child: Mutex<Option<Child>>,
    dir: Option<tempfile::TempDir>,
}

/// CPU time and resident memory of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Operating-system threads.
    pub threads: u64,
}

impl Target {
    /// Spawns a broker or describes the given one.
    pub async fn resolve(args: &TargetArgs) -> anyhow::Result<Target> {
        let endpoints = (0..args.endpoints.max(1))
            .map(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal address")))
            .collect::<Result<Vec<_>, _>>()?;
        if args.spawn_broker {
            let mut target = spawn(endpoints, &args.broker_env).await?;
            target.mtu_discovery = args.mtu_discovery;
            return Ok(target);
        }
        let Some(server) = args.server.clone() else {
            bail!("give --server HOST:PORT (with --ca or --fingerprint), or --spawn-broker");
        };
        let trust = match (&args.fingerprint, &args.ca) {
            (Some(fingerprint), _) => Trust::Fingerprint(fingerprint.clone()),
            (None, Some(ca)) => Trust::CaFile(ca.clone()),
            (None, None) => bail!("give --ca or --fingerprint for --server"),
        };
        let mut connect = ConnectConfig::new(server, trust);
        connect.server_name = args.server_name.clone();
        Ok(Target {
            connect,
            endpoints,
            mtu_discovery: args.mtu_discovery,
            pid: args.broker_pid,
            metrics: None,
            child: Mutex::new(None),
            dir: None,
        })
    }

    /// A connect config using the `index`-th shared endpoint.
    pub fn connect_config(&self, index: usize) -> ConnectConfig {
        let mut config = self.connect.clone();
        config.mtu_discovery = self.mtu_discovery;
        config.endpoint = Some(self.endpoints[index % self.endpoints.len()].clone());
        config
    }

    /// Samples the broker process, if local.
    pub fn sample(&self) -> Option<ProcSample> {
        proc_sample(self.pid?)
    }

    /// The data directory of a spawned broker.
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// Stops a spawned broker.
    pub async fn stop(&self) {
        let child = self.child.lock().expect("child lock").take();
        if let Some(mut child) = child {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time, resident memory and threads of process `pid`, from /proc.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    // Linux reports CPU time in USER_HZ, which is 100 on every mainstream configuration.
    Some(ProcSample {
        cpu_seconds: ticks / 100.0,
        rss_bytes: field("VmRSS:")? * 1024,
        threads: field("Threads:")?,
    })
}

/// Open file descriptors of process `pid`, from /proc.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

async fn spawn(
    endpoints: Vec<quinn::Endpoint>,
    env: &[(String, String)],
) -> anyhow::Result<Target> {
    let binary = std::env::current_exe()?.with_file_name("backbone");
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p backbone-broker`",
            binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(&binary)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("BACKBONE__METRICS__LISTEN", "127.0.0.1:0")
        .env("BACKBONE__LIMITS__MAX_CONNECTIONS", "200000")
        // The harness measures the broker's capacity, not its abuse limits:
        // a few senders carry the whole load, and storms open connections
        // as fast as they can. `--broker-env` can set these back.
        .env("BACKBONE__LIMITS__SEND_RATE", "0")
        .env("BACKBONE__LIMITS__MAX_UNAUTHENTICATED", "100000")
        // Every load-generator connection comes from one loopback address.
        .env(
            "BACKBONE__LIMITS__PER_SOURCE__EXEMPT",
            r#"["127.0.0.0/8", "::1/128"]"#,
        )
        .env("RUST_LOG", "warn")
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("broker stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut cert, mut metrics) = (None, None);
    while let Some(line) = lines.next().transpose()? {
        if let Some(path) = line.strip_prefix("certificate: ") {
            cert = Some(PathBuf::from(path.trim()));
        }
        // The last line the broker prints at start-up.
        if let Some(rest) = line.strip_prefix("metrics: http://") {
            metrics = rest.split('/').next().map(str::to_owned);
            break;
        }
    }
    // Keep draining stdout so the broker never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let cert = cert.context("the broker did not print its certificate path")?;
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(cert));
    connect.server_name = Some("localhost".into());
    let pid = Some(child.id());
    Ok(Target {
        connect,
        endpoints,
        mtu_discovery: false,
        pid,
        metrics,
        child: Mutex::new(Some(child)),
        dir: Some(dir),
    })
}

/// The body of `GET path` on a broker's metrics/health address.
fn http_get(metrics: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(metrics)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: loadtest\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .with_context(|| format!("{path} response has no body"))
}

/// `GET /metrics`: every series without labels, by name.
pub fn scrape(metrics: &str) -> anyhow::Result<HashMap<String, f64>> {
    Ok(parse_unlabelled(&http_get(metrics, "/metrics")?))
}

fn parse_unlabelled(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.contains('{'))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, as `du` counts).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_usage(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            // A file removed between listing and stat (sled replaces its snapshots).
            Err(_) => 0,
        })
        .sum()
}

/// `GET /health` of a spawned broker: the number of live mailbox actors.
pub fn mailbox_actors(metrics: &str) -> anyhow::Result<u64> {
    let body = http_get(metrics, "/health")?;
    let health: serde_json::Value = serde_json::from_str(&body)?;
    health["mailbox_actors"]
        .as_u64()
        .context("health response lacks mailbox_actors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_reads_unlabelled_series_and_skips_comments_and_labels() {
        let text = "# TYPE backbone_tokio_tasks gauge\nbackbone_tokio_tasks 812\n\
                    backbone_errors_total{code=\"RateLimited\"} 3\nprocess_open_fds 17\n";
        let series = parse_unlabelled(text);
        assert_eq!(series.get("backbone_tokio_tasks"), Some(&812.0));
        assert_eq!(series.get("process_open_fds"), Some(&17.0));
        assert_eq!(series.len(), 2);
    }
}
