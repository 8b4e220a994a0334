//! `backbone serve` on a fresh data directory: a first start (and a plain
//! restart) is routine, so it logs no warning, and `serve --json` prints
//! where the broker listens as one JSON object, its logs on standard error.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `backbone serve` process, killed if a test fails before stopping it.
struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts the broker on `data` with loopback addresses the kernel
    /// picks, standard output and standard error into the two files.
    fn start(data: &Path, extra: &[&str], stdout: &Path, stderr: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_backbone"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            // The default level, whatever the environment of the test says.
            .env("RUST_LOG", "info")
            .env_remove("BACKBONE_CONFIG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(stdout).expect("stdout file"))
            .stderr(std::fs::File::create(stderr).expect("stderr file"))
            .spawn()
            .expect("backbone starts");
        Self { child }
    }

    /// SIGTERM, and the graceful shutdown's exit status 0.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the broker did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status}");
    }
}

/// Waits until `file` holds `needle`, and returns its text.
fn wait_for(file: &Path, needle: &str, serve: &mut Serve) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = serve.child.try_wait().expect("wait") {
            panic!("the broker exited ({status}): {text}");
        }
        assert!(Instant::now() < deadline, "no {needle:?} in: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines logged at WARN or ERROR.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect()
}

#[test]
fn a_first_start_and_a_restart_log_no_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));

    for start in ["first start", "restart"] {
        let mut serve = Serve::start(&data, &[], &out, &err);
        wait_for(&out, "backbone listening on", &mut serve);
        serve.stop();
        let log = std::fs::read_to_string(&out).expect("stdout")
            + &std::fs::read_to_string(&err).expect("stderr");
        assert!(log.contains("store opened"), "{start}: {log}");
        assert_eq!(warnings(&log), Vec::<&str>::new(), "{start}: {log}");
    }
}

#[test]
fn serve_json_prints_where_it_listens_and_logs_on_standard_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut serve = Serve::start(&data, &["--json"], &out, &err);
    let printed = wait_for(&out, "\n", &mut serve);
    let listening: serde_json::Value =
        serde_json::from_str(printed.trim()).expect("one JSON object");
    let quic: std::net::SocketAddr = listening["quic_addr"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .expect("quic_addr");
    assert_ne!(quic.port(), 0, "{listening}");
    assert_eq!(
        listening["certificate"],
        data.join("tls/cert.pem").display().to_string()
    );
    assert_eq!(listening["fingerprint"].as_str().map(str::len), Some(64));

    // The metrics address it printed answers the healthcheck.
    let metrics = listening["metrics_addr"].as_str().expect("metrics_addr");
    let health = Command::new(env!("CARGO_BIN_EXE_backbone"))
        .args(["healthcheck", "--json", "--url"])
        .arg(format!("http://{metrics}/health"))
        .output()
        .expect("healthcheck runs");
    assert!(health.status.success(), "{health:?}");
    let health: serde_json::Value = serde_json::from_slice(&health.stdout).expect("json");
    assert!(
        health["status"]
            .as_str()
            .is_some_and(|status| status.contains("200")),
        "{health}"
    );
    serve.stop();

    let stdout = std::fs::read_to_string(&out).expect("stdout");
    assert_eq!(
        stdout.lines().count(),
        1,
        "only JSON on standard output: {stdout}"
    );
    let stderr = std::fs::read_to_string(&err).expect("stderr");
    assert!(stderr.contains("store opened"), "the logs: {stderr}");
    assert_eq!(warnings(&stderr), Vec::<&str>::new(), "{stderr}");
}
