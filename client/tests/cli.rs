//! The real binaries: `backbone serve` and two `backbone-cli` processes, as a
//! newcomer would run them, plus the zero-knowledge check: a random canary in
//! the messages appears neither in the broker's data directory nor in its logs.

use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backbone-cli"))
}

/// The broker binary sits next to the CLI in the target directory; build it if
/// this test runs before anything else built it.
fn broker_binary() -> PathBuf {
    let path = cli().with_file_name("backbone");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "backbone-broker", "--bin", "backbone"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the broker failed");
    }
    path
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct BrokerProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(data_dir: &Path, port: u16, log: PathBuf) -> BrokerProcess {
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(broker_binary())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .env("BACKBONE__METRICS__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .stdout(log_file.try_clone().expect("clone"))
        .stderr(log_file)
        .spawn()
        .expect("broker starts");
    let cert = data_dir.join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening")
    {
        assert!(
            Instant::now() < deadline,
            "broker did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cert.exists());
    BrokerProcess { child, log }
}

fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(cli()).args(args).output().expect("cli runs")
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn two_terminals_exchange_encrypted_messages_and_the_broker_never_sees_the_canary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let alice = stdout(&run_cli(&[
        "keygen",
        "--out",
        alice_key.to_str().expect("utf8"),
    ]));
    let bob = stdout(&run_cli(&[
        "keygen",
        "--out",
        bob_key.to_str().expect("utf8"),
    ]));
    assert!(alice.starts_with("bb1") && bob.starts_with("bb1"));
    assert_eq!(
        stdout(&run_cli(&[
            "address",
            "--key",
            bob_key.to_str().expect("utf8")
        ])),
        bob
    );

    // Terminal 2: Bob listens for two messages.
    let listener = Command::new(cli())
        .args([
            "listen",
            "--server",
            &server,
            "--ca",
            ca.to_str().expect("utf8"),
        ])
        .args([
            "--key",
            bob_key.to_str().expect("utf8"),
            "--count",
            "2",
            "--timeout",
            "60s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("listen starts");
    // Bob's card must be published before Alice can seal to it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let canary = format!("canary-{}", hex::encode(rand::random::<[u8; 16]>()));
    loop {
        let output = run_cli(&[
            "send",
            "--server",
            &server,
            "--ca",
            ca.to_str().expect("utf8"),
            "--key",
            alice_key.to_str().expect("utf8"),
            "--to",
            &bob,
            "--message",
            &format!("first {canary}"),
        ]);
        if output.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "send never succeeded: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let message_file = dir.path().join("message.txt");
    std::fs::write(&message_file, format!("second {canary}")).expect("write");
    stdout(&run_cli(&[
        "send",
        "--server",
        &server,
        "--fingerprint",
        &fingerprint(&broker.log),
        "--key",
        alice_key.to_str().expect("utf8"),
        "--to",
        &bob,
        "--file",
        message_file.to_str().expect("utf8"),
    ]));

    let output = listener.wait_with_output().expect("listen ends");
    let printed = stdout(&output);
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert_eq!(lines[0]["text"], format!("first {canary}"));
    assert_eq!(lines[1]["text"], format!("second {canary}"));
    assert_eq!(lines[0]["sender"], alice);

    // Flush and stop the broker, then look for the canary everywhere it wrote.
    drop(broker);
    let needle = canary.as_bytes();
    let mut files = 0;
    for path in walk(&data) {
        files += 1;
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .expect("open")
            .read_to_end(&mut bytes)
            .expect("read");
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "canary found in {}",
            path.display()
        );
    }
    assert!(files > 2, "the data directory holds the store");
    let log = std::fs::read(dir.path().join("broker.log")).expect("log");
    assert!(
        !log.windows(needle.len()).any(|w| w == needle),
        "canary found in the broker log"
    );
}

#[test]
fn errors_are_understandable_and_exit_codes_distinct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k.key");
    stdout(&run_cli(&["keygen", "--out", key.to_str().expect("utf8")]));
    let again = run_cli(&["keygen", "--out", key.to_str().expect("utf8")]);
    assert!(
        !again.status.success(),
        "an existing key file is not overwritten"
    );

    let typo = run_cli(&[
        "send",
        "--key",
        key.to_str().expect("utf8"),
        "--fingerprint",
        &"0".repeat(64),
        "--to",
        "bb1notanaddress",
        "--message",
        "x",
    ]);
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("recipient"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );

    // Nothing listens on this port: unreachable, exit code 3.
    let port = free_udp_port();
    let output = run_cli(&[
        "listen",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--fingerprint",
        &"0".repeat(64),
        "--key",
        key.to_str().expect("utf8"),
        "--timeout",
        "1s",
    ]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A broker with another certificate: certificate mismatch, exit code 4.
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let output = run_cli(&[
        "listen",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--fingerprint",
        &"0".repeat(64),
        "--key",
        key.to_str().expect("utf8"),
        "--timeout",
        "1s",
    ]);
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("certificate"));
}

fn fingerprint(log: &Path) -> String {
    let text = std::fs::read_to_string(log).expect("log");
    text.lines()
        .find_map(|line| line.strip_prefix("fingerprint: "))
        .expect("broker prints its fingerprint")
        .trim()
        .to_owned()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
