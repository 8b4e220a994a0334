//! A real `backbone` process for tests: built if missing, started on a free
//! loopback port with a data directory, its output in a log file, killed
//! when dropped.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The broker's test-only sabotage features, compiled into the broker the
/// tests run and inert unless their environment variable is set (see
/// `broker/Cargo.toml`). A new sabotage switch goes here, and its
/// environment in a constant below.
const TEST_FEATURES: &str = "unsafe-early-ack";

/// The environment that makes the broker acknowledge appends before writing
/// them (`unsafe-early-ack`): a crash right after an acknowledgement loses it.
pub const UNSAFE_EARLY_ACK: &[(&str, &str)] = &[("BACKBONE_UNSAFE_EARLY_ACK", "1")];

/// The environment that makes the broker skip durability: its mailbox log
/// never calls `fdatasync` (`BACKBONE_UNSAFE_NO_SYNC`, in the
/// `unsafe-early-ack` feature), so its acknowledged envelopes are not on
/// stable storage and a power cut right after an acknowledgement loses
/// them. The power-loss test's sabotage run uses it to show that its
/// checker catches a missing fdatasync.
pub const UNSAFE_SKIP_DURABILITY: &[(&str, &str)] = &[("BACKBONE_UNSAFE_NO_SYNC", "1")];

/// The broker binary of this target directory, brought up to date once per
/// test process (with the `TEST_FEATURES` compiled in), so the tests never
/// run a stale broker.
pub fn broker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "backbone-broker", "--bin", "backbone"])
                .args(["--features", TEST_FEATURES])
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the broker failed");
            PathBuf::from(env!("CARGO_BIN_EXE_backbone-cli")).with_file_name("backbone")
        })
        .clone()
}

/// A UDP port free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A TCP port free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `GET path` from the broker's HTTP endpoint at `addr` (metrics, health):
/// the whole response, status line and headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint reachable");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// A running broker process.
pub struct BrokerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BrokerProcess {
    /// SIGKILL, and reap the process.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    /// Waits until the broker logs that it listens.
    pub fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains("listening")
        {
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a broker and waits until it listens.
pub fn start_broker(data_dir: &Path, port: u16, log: PathBuf) -> BrokerProcess {
    start_broker_with_metrics(data_dir, port, log, "127.0.0.1:0")
}

/// Starts a broker with its metrics on `metrics` and waits until it listens.
pub fn start_broker_with_metrics(
    data_dir: &Path,
    port: u16,
    log: PathBuf,
    metrics: &str,
) -> BrokerProcess {
    let broker = spawn_broker(data_dir, port, log, metrics, "debug", &[]);
    broker.wait_listening();
    assert!(data_dir.join("tls/cert.pem").exists());
    broker
}

/// A broker process on free loopback ports in a temporary directory, with
/// its metrics served: what a test that reads `/metrics` starts.
pub struct MeteredBroker {
    /// Dropped first: the process is killed before its directory goes.
    pub process: BrokerProcess,
    /// Its QUIC address, `127.0.0.1:port`.
    pub server: String,
    /// Its metrics address.
    pub metrics: String,
    /// The certificate it made, for clients to trust.
    pub ca: PathBuf,
    /// The temporary directory (data directory `data/`, log `broker.log`).
    pub dir: tempfile::TempDir,
}

/// Starts a [`MeteredBroker`] and waits until it listens.
pub fn start_metered_broker() -> MeteredBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let process = start_broker_with_metrics(&data, port, dir.path().join("broker.log"), &metrics);
    MeteredBroker {
        process,
        server: format!("127.0.0.1:{port}"),
        metrics,
        ca: data.join("tls/cert.pem"),
        dir,
    }
}

/// Starts a broker without waiting for it.
pub fn spawn_broker(
    data_dir: &Path,
    port: u16,
    log: PathBuf,
    metrics: &str,
    log_level: &str,
    env: &[(&str, &str)],
) -> BrokerProcess {
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(broker_binary())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--metrics-listen", metrics])
        .env("RUST_LOG", log_level)
        .envs(env.iter().copied())
        .stdout(log_file.try_clone().expect("clone"))
        .stderr(log_file)
        .spawn()
        .expect("broker starts");
    BrokerProcess { child, log }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}
