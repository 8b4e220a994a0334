//! The real binaries: `backbone serve` and two `backbone-cli` processes, as a
//! newcomer would run them, plus the zero-knowledge check: a random canary in
//! the messages appears neither in the broker's data directory nor in its logs.

mod process;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process::{free_tcp_port, free_udp_port, http_get, start_broker, start_broker_with_metrics};

fn cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backbone-cli"))
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

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that the command's standard error mentions `needle`.
fn assert_stderr_has(output: &std::process::Output, needle: &str) {
    let text = stderr(output);
    assert!(text.contains(needle), "expected {needle:?} in: {text}");
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
    for path in process::files_under(&data) {
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
    let listen_pinned_to_a_wrong_fingerprint = |port: u16| {
        let server = format!("127.0.0.1:{port}");
        let key = key.to_str().expect("utf8");
        let wrong = "0".repeat(64);
        run_cli(&[
            "listen",
            "--server",
            &server,
            "--fingerprint",
            &wrong,
            "--key",
            key,
            "--timeout",
            "1s",
        ])
    };
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
    assert_stderr_has(&typo, "recipient");

    // Nothing listens on this port: unreachable, exit code 3.
    let port = free_udp_port();
    let output = listen_pinned_to_a_wrong_fingerprint(port);
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
    let output = listen_pinned_to_a_wrong_fingerprint(port);
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_stderr_has(&output, "certificate");
}

fn fingerprint(log: &Path) -> String {
    let text = std::fs::read_to_string(log).expect("log");
    text.lines()
        .find_map(|line| line.strip_prefix("fingerprint: "))
        .expect("broker prints its fingerprint")
        .trim()
        .to_owned()
}

#[test]
fn kill_9_loses_no_acknowledged_envelope_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut broker =
        start_broker_with_metrics(&data, port, dir.path().join("broker.log"), &metrics);
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let ca = ca.to_str().expect("utf8");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let (alice_key, bob_key) = (
        alice_key.to_str().expect("utf8"),
        bob_key.to_str().expect("utf8"),
    );
    stdout(&run_cli(&["keygen", "--out", alice_key]));
    let bob = stdout(&run_cli(&["keygen", "--out", bob_key]));

    let health = http_get(&metrics, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");

    // Bob publishes his card and goes offline; Alice's sends are acknowledged.
    stdout(&run_cli(&[
        "listen",
        "--server",
        &server,
        "--ca",
        ca,
        "--key",
        bob_key,
        "--timeout",
        "200ms",
    ]));
    for n in 0..5 {
        stdout(&run_cli(&[
            "send",
            "--server",
            &server,
            "--ca",
            ca,
            "--key",
            alice_key,
            "--to",
            &bob,
            "--message",
            &format!("durable {n}"),
        ]));
    }
    let scraped = http_get(&metrics, "/metrics");
    assert!(
        scraped.contains("backbone_envelopes_accepted_total 5"),
        "{scraped}"
    );
    assert!(
        scraped.contains("backbone_store_flush_seconds"),
        "{scraped}"
    );
    // Each CLI run closed its connection before exiting, so no session
    // waits for the broker's idle timeout (a minute). Alice's five sessions
    // each held a watch of her mailbox and left none behind; Bob's mailbox
    // keeps one while its actor lives.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = http_get(&metrics, "/metrics");
        if scraped.contains("backbone_sessions 0\n")
            && scraped.contains("backbone_mailbox_watches 1\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{scraped}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGKILL: no shutdown path runs. What was acknowledged must still be there.
    broker.kill_9();
    let broker = start_broker_with_metrics(&data, port, dir.path().join("broker2.log"), &metrics);
    let output = run_cli(&[
        "listen",
        "--server",
        &server,
        "--ca",
        ca,
        "--key",
        bob_key,
        "--count",
        "5",
        "--timeout",
        "30s",
        "--json",
    ]);
    let printed = stdout(&output);
    let texts: Vec<String> = printed
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("json")["text"]
                .as_str()
                .expect("text")
                .to_owned()
        })
        .collect();
    assert_eq!(
        texts,
        (0..5).map(|n| format!("durable {n}")).collect::<Vec<_>>()
    );

    // SIGTERM: graceful shutdown, exit status 0.
    let pid = broker.child.id().to_string();
    let mut broker = broker;
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = broker.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(dir.path().join("broker2.log")).expect("log");
    assert!(log.contains("shutdown complete"), "{log}");
}

/// After a crash, the restarted broker resets the previous run's connections
/// (its stateless-reset key survives in the data directory), so a connected
/// client notices on its next keep-alive instead of at the 30 s idle timeout.
#[test]
fn clients_of_a_crashed_broker_notice_on_their_next_packet() {
    use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let mut broker = start_broker(&data, port, dir.path().join("broker.log"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut connect = ConnectConfig::new(
        format!("127.0.0.1:{port}"),
        Trust::CaFile(data.join("tls/cert.pem")),
    );
    connect.server_name = Some("localhost".into());
    connect.keep_alive = Duration::from_secs(1);
    let client = runtime.block_on(async {
        Client::connect(ClientOptions::primary(
            connect,
            backbone_protocol::Keypair::generate(),
            backbone_client::envelope::EncryptionKeypair::generate(),
        ))
        .await
        .expect("connects")
    });

    let mut changes = client.status_changes();
    changes.mark_unchanged();
    broker.kill_9();
    let _broker = start_broker(&data, port, dir.path().join("broker2.log"));
    // The client's idle timeout is quinn's 30 s: noticing well before it
    // means the new run's reset reached it. The client may reconnect before
    // a poll of its status would see it gone, so the test waits for the
    // change itself.
    let noticed = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), changes.changed()).await });
    assert!(
        matches!(noticed, Ok(Ok(()))),
        "the client still believes in its old connection; the broker logged:\n{}",
        std::fs::read_to_string(dir.path().join("broker2.log")).unwrap_or_default()
    );
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), client.wait_connected())
            .await
            .expect("reconnects in time")
            .expect("reconnects");
    });
}

#[test]
fn a_broker_refuses_to_start_on_a_damaged_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let mut broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let ca = ca.to_str().expect("utf8");
    let key = dir.path().join("alice.key");
    let key = key.to_str().expect("utf8");
    let alice = stdout(&run_cli(&["keygen", "--out", key]));
    stdout(&run_cli(&[
        "listen",
        "--server",
        &server,
        "--ca",
        ca,
        "--key",
        key,
        "--timeout",
        "200ms",
    ]));
    for n in 0..20 {
        stdout(&run_cli(&[
            "send",
            "--server",
            &server,
            "--ca",
            ca,
            "--key",
            key,
            "--to",
            &alice,
            "--message",
            &format!("note to self {n}"),
        ]));
    }
    broker.kill_9();

    // Lose the last three quarters of sled's data file, as a bad disk might.
    let db = data.join("store/db");
    let len = std::fs::metadata(&db).expect("sled data file").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open")
        .set_len(len / 4)
        .expect("truncate");

    let log = dir.path().join("restart.log");
    let mut restarted = process::spawn_broker(&data, port, log.clone(), "127.0.0.1:0", "info", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = restarted.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the broker started on a damaged store: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).expect("log");
    assert!(!status.success(), "{output}");
    assert!(output.contains("the store is damaged"), "{output}");
    assert!(
        output.contains("Restore the store from a backup"),
        "{output}"
    );
}

#[test]
fn a_sealed_send_through_the_cli_names_its_sender_only_inside_the_envelope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
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
    let as_bob = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--server",
            &server,
            "--ca",
            ca.to_str().expect("utf8"),
            "--key",
            bob_key.to_str().expect("utf8"),
        ]);
        run_cli(&all)
    };

    // Bob creates a capability (the broker may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    let capability = loop {
        let output = as_bob(&["capability", "create"]);
        if output.status.success() {
            break stdout(&output);
        }
        assert!(
            Instant::now() < deadline,
            "capability create never succeeded: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(capability.len(), 64, "{capability}");
    let listed = stdout(&as_bob(&["capability", "list"]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let hash = listed.trim().to_owned();

    let send_sealed = |text: &str| {
        run_cli(&[
            "send",
            "--sealed",
            "--capability",
            &capability,
            "--server",
            &server,
            "--ca",
            ca.to_str().expect("utf8"),
            "--key",
            alice_key.to_str().expect("utf8"),
            "--to",
            &bob,
            "--message",
            text,
        ])
    };
    stdout(&send_sealed("sealed via the cli"));
    let received = stdout(&as_bob(&[
        "listen",
        "--count",
        "1",
        "--timeout",
        "30s",
        "--json",
    ]));
    let line: serde_json::Value = serde_json::from_str(&received).expect("json line");
    assert_eq!(line["text"], "sealed via the cli");
    assert_eq!(line["sender"], alice);

    // Revoked by its hash, the capability no longer admits a send.
    stdout(&as_bob(&["capability", "revoke", &hash]));
    assert_eq!(stdout(&as_bob(&["capability", "list"])), "");
    let refused = send_sealed("after the revocation");
    assert!(!refused.status.success());
    assert_stderr_has(&refused, "UnknownCapability");
}

#[test]
fn a_token_is_created_fetched_without_an_identity_and_deleted_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    for key in [&alice_key, &bob_key] {
        stdout(&run_cli(&["keygen", "--out", key.to_str().expect("utf8")]));
    }
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "tea for two\n").expect("write");
    let connection = ["--server", &server, "--ca", ca.to_str().expect("utf8")];
    let with = |args: &[&str], key: Option<&Path>| {
        let mut all = args.to_vec();
        all.extend(connection);
        if let Some(key) = key {
            all.extend(["--key", key.to_str().expect("utf8")]);
        }
        run_cli(&all)
    };

    // Alice creates a password-protected token (the broker may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    let create = [
        "token",
        "create",
        "--text",
        "the spare key is under the mat",
        "--ttl",
        "1h",
        "--password-file",
        password_file.to_str().expect("utf8"),
    ];
    let reference = loop {
        let output = with(&create, Some(&alice_key));
        if output.status.success() {
            break stdout(&output);
        }
        assert!(
            Instant::now() < deadline,
            "token create never succeeded: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reference.starts_with("bbt1:"), "{reference}");

    // Anyone fetches it without a key file, with the password from the environment.
    let get = |key: Option<&Path>, password_env: &str| {
        let mut command = Command::new(cli());
        command
            .args([
                "token",
                "get",
                &reference,
                "--password-env",
                "TOKEN_PASSWORD",
            ])
            .args(connection)
            .env("TOKEN_PASSWORD", password_env);
        if let Some(key) = key {
            command.args(["--key", key.to_str().expect("utf8")]);
        }
        command.output().expect("cli runs")
    };
    assert_eq!(
        stdout(&get(None, "tea for two")),
        "the spare key is under the mat"
    );
    let out = dir.path().join("content");
    stdout(&with(
        &[
            "token",
            "get",
            &reference,
            "--password-file",
            password_file.to_str().expect("utf8"),
            "--out",
            out.to_str().expect("utf8"),
        ],
        Some(&bob_key),
    ));
    assert_eq!(
        std::fs::read(&out).expect("written"),
        b"the spare key is under the mat"
    );
    let wrong = get(None, "coffee");
    assert_eq!(wrong.status.code(), Some(5), "refused by the broker");
    assert_stderr_has(&wrong, "wrong or missing password");

    // Bob may not delete it; Alice may, and then it is gone.
    let refused = with(&["token", "delete", &reference], Some(&bob_key));
    assert!(!refused.status.success());
    assert_stderr_has(&refused, "no such token");
    stdout(&get(None, "tea for two"));
    stdout(&with(&["token", "delete", &reference], Some(&alice_key)));
    let gone = get(None, "tea for two");
    assert_eq!(gone.status.code(), Some(5));
    assert_stderr_has(&gone, "no such token");

    // A mistyped reference is refused before connecting.
    let mistyped = with(&["token", "get", "bbt1:abc"], None);
    assert!(!mistyped.status.success());
    assert_stderr_has(&mistyped, "token reference");
}

#[test]
fn a_relationship_is_asked_for_accepted_and_ended_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let mut addresses = Vec::new();
    for key in [&alice_key, &bob_key] {
        addresses.push(stdout(&run_cli(&[
            "keygen",
            "--out",
            key.to_str().expect("utf8"),
        ])));
    }
    let (alice, bob) = (addresses[0].clone(), addresses[1].clone());
    let connection = ["--server", &server, "--ca", ca.to_str().expect("utf8")];
    let as_ = |key: &Path, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(connection);
        all.extend(["--key", key.to_str().expect("utf8")]);
        run_cli(&all)
    };

    // Bob takes only relationships and publishes a template (the broker
    // may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = as_(&bob_key, &["relationship", "policy", "relationships-only"]);
        if output.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let template = stdout(&as_(&bob_key, &["relationship", "template", "--ttl", "1h"]));
    assert!(template.starts_with("bbt1:"), "{template}");

    // Alice is refused until Bob accepts her request.
    let refused = as_(&alice_key, &["send", "--to", &bob, "--message", "hi"]);
    assert!(!refused.status.success());
    assert_stderr_has(&refused, "NotConsented");
    let requested = stdout(&as_(
        &alice_key,
        &[
            "relationship",
            "request",
            &template,
            "--message",
            "it's Alice",
        ],
    ));
    assert!(
        requested.starts_with(&format!("pending requester {bob} ")),
        "{requested}"
    );
    let listed = stdout(&as_(&bob_key, &["relationship", "list"]));
    assert!(
        listed.starts_with("policy relationships-only\npending owner "),
        "{listed}"
    );
    // Only the owner accepts.
    assert!(
        !as_(&alice_key, &["relationship", "accept", &bob])
            .status
            .success()
    );
    let accepted = stdout(&as_(&bob_key, &["relationship", "accept", &alice]));
    assert!(
        accepted.starts_with(&format!("active owner {alice} ")),
        "{accepted}"
    );
    stdout(&as_(&alice_key, &["send", "--to", &bob, "--message", "hi"]));

    // Alice ends it; Bob's mailbox refuses her again.
    let ended = stdout(&as_(&alice_key, &["relationship", "terminate", &bob]));
    assert!(ended.starts_with("terminated requester"), "{ended}");
    assert!(
        !as_(&alice_key, &["send", "--to", &bob, "--message", "again"])
            .status
            .success()
    );
    // A mistyped address is refused before connecting.
    let mistyped = as_(&bob_key, &["relationship", "reject", "bb1nonsense"]);
    assert!(!mistyped.status.success());
    assert_stderr_has(&mistyped, "address");
}

#[test]
fn a_file_is_uploaded_downloaded_without_an_identity_and_deleted_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    for key in [&alice_key, &bob_key] {
        stdout(&run_cli(&["keygen", "--out", key.to_str().expect("utf8")]));
    }
    let connection = ["--server", &server, "--ca", ca.to_str().expect("utf8")];
    let with = |args: &[&str], key: Option<&Path>| {
        let mut all = args.to_vec();
        all.extend(connection);
        if let Some(key) = key {
            all.extend(["--key", key.to_str().expect("utf8")]);
        }
        run_cli(&all)
    };
    // Three chunks and a bit of bytes that do not repeat.
    let original = dir.path().join("report.bin");
    let mut content = vec![0u8; 200_000];
    blake3::Hasher::new()
        .update(b"report")
        .finalize_xof()
        .fill(&mut content);
    std::fs::write(&original, &content).expect("write");
    let path = original.to_str().expect("utf8");

    // Alice uploads (the broker may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    let reference = loop {
        let output = with(&["file", "put", path, "--ttl", "1h"], Some(&alice_key));
        if output.status.success() {
            break stdout(&output);
        }
        assert!(
            Instant::now() < deadline,
            "file put never succeeded: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reference.starts_with("bbf1:"), "{reference}");
    let status = stdout(&with(&["file", "status", &reference], Some(&alice_key)));
    assert!(status.ends_with(" complete"), "{status}");
    // Resuming a complete upload changes nothing and succeeds.
    stdout(&with(
        &["file", "put", path, "--resume", &reference],
        Some(&alice_key),
    ));
    // Resuming from a file that changed since is refused (exit code 1),
    // saying how to upload it anew.
    let mut changed = content.clone();
    changed[150_000] ^= 1;
    std::fs::write(&original, &changed).expect("write");
    let refused = with(
        &["file", "put", path, "--resume", &reference],
        Some(&alice_key),
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert_stderr_has(&refused, "cannot resume");
    assert_stderr_has(&refused, "without --resume");
    std::fs::write(&original, &content).expect("write");

    // Anyone holding the reference downloads it, to a file or to stdout.
    let out = dir.path().join("copy.bin");
    stdout(&with(
        &[
            "file",
            "get",
            &reference,
            "--out",
            out.to_str().expect("utf8"),
        ],
        None,
    ));
    assert_eq!(std::fs::read(&out).expect("written"), content);
    assert!(!dir.path().join("copy.bin.part").exists());
    let piped = with(&["file", "get", &reference], Some(&bob_key));
    assert!(piped.status.success());
    assert_eq!(piped.stdout, content);

    // The id without the secret is refused.
    let mut fields: Vec<&str> = reference.split(':').collect();
    let zeros = "0".repeat(64);
    fields[2] = &zeros;
    let forged = fields.join(":");
    let refused = with(&["file", "get", &forged], None);
    assert_eq!(refused.status.code(), Some(5), "refused by the broker");
    assert_stderr_has(&refused, "Forbidden");

    // Bob may not delete it; Alice may, and then it is gone.
    let refused = with(&["file", "delete", &reference], Some(&bob_key));
    assert_eq!(refused.status.code(), Some(5));
    stdout(&with(&["file", "delete", &reference], Some(&alice_key)));
    let gone = with(&["file", "get", &reference], None);
    assert_eq!(gone.status.code(), Some(5));
    assert_stderr_has(&gone, "NotFound");
    let mistyped = with(&["file", "get", "bbf1:abc"], None);
    assert!(!mistyped.status.success());
    assert_stderr_has(&mistyped, "file reference");
}

#[test]
fn an_identity_is_deleted_through_the_cli_after_confirmation_and_its_peer_is_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let broker = process::spawn_broker(
        &data,
        port,
        dir.path().join("broker.log"),
        "127.0.0.1:0",
        "info",
        &[("BACKBONE__IDENTITY__DELETION_GRACE", "3s")],
    );
    broker.wait_listening();
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let mut addresses = Vec::new();
    for key in [&alice_key, &bob_key] {
        addresses.push(stdout(&run_cli(&[
            "keygen",
            "--out",
            key.to_str().expect("utf8"),
        ])));
    }
    let (alice, bob) = (addresses[0].clone(), addresses[1].clone());
    let connection = ["--server", &server, "--ca", ca.to_str().expect("utf8")];
    let args_as = |key: &Path, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(connection);
        all.extend(["--key", key.to_str().expect("utf8")]);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let as_ = |key: &Path, args: &[&str]| {
        run_cli(
            &args_as(key, args)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    // Answers the confirmation prompt with `answer`.
    let answering = |answer: &str, key: &Path, args: &[&str]| {
        let mut child = Command::new(cli())
            .args(args_as(key, args))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cli runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(answer.as_bytes())
            .expect("answers");
        child.wait_with_output().expect("cli ends")
    };

    // Alice and Bob relate (the broker may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    let template = loop {
        let output = as_(&bob_key, &["relationship", "template", "--ttl", "1h"]);
        if output.status.success() {
            break stdout(&output);
        }
        assert!(Instant::now() < deadline, "{}", stderr(&output));
        std::thread::sleep(Duration::from_millis(200));
    };
    stdout(&as_(&alice_key, &["relationship", "request", &template]));
    stdout(&as_(&bob_key, &["relationship", "accept", &alice]));

    // Without a yes nothing happens; there is nothing to cancel either.
    let declined = answering("no\n", &alice_key, &["delete-identity"]);
    assert_eq!(declined.status.code(), Some(1), "{}", stderr(&declined));
    assert_stderr_has(&declined, "Type yes to confirm");
    assert_stderr_has(&declined, "nothing was deleted");
    let nothing = as_(&alice_key, &["delete-identity", "--cancel"]);
    assert_eq!(nothing.status.code(), Some(5), "{}", stderr(&nothing));
    assert_stderr_has(&nothing, "NotFound");

    // Confirmed: the purge time, in RFC 3339; asking again prints the same.
    let scheduled = answering("yes\n", &alice_key, &["delete-identity"]);
    let purge_at = stdout(&scheduled);
    humantime::parse_rfc3339(&purge_at).expect("an RFC 3339 time");
    assert_stderr_has(&scheduled, "--cancel");
    assert_eq!(
        stdout(&as_(&alice_key, &["delete-identity", "--yes"])),
        purge_at
    );
    stdout(&as_(&alice_key, &["delete-identity", "--cancel"]));
    std::thread::sleep(Duration::from_secs(4));
    // Cancelled: past the grace period, Alice still sends.
    stdout(&as_(
        &alice_key,
        &["send", "--to", &bob, "--message", "still here"],
    ));

    stdout(&as_(&alice_key, &["delete-identity", "--yes"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let output = as_(&alice_key, &["send", "--to", &bob, "--message", "gone?"]);
        if !output.status.success() {
            break output;
        }
        assert!(Instant::now() < deadline, "alice was never deleted");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert_stderr_has(&refused, "identity was deleted");

    // Bob's listener shows her message and the notice that ended it.
    let listened = as_(&bob_key, &["listen", "--timeout", "3s"]);
    assert!(listened.status.success(), "{}", stderr(&listened));
    assert!(
        String::from_utf8_lossy(&listened.stdout).contains("still here"),
        "{}",
        String::from_utf8_lossy(&listened.stdout)
    );
    assert_stderr_has(
        &listened,
        &format!("identity deleted, relationship ended: terminated owner {alice} "),
    );
}

#[test]
fn a_device_is_added_listens_and_is_revoked_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    let laptop_key = dir.path().join("bob-laptop.key");
    stdout(&run_cli(&[
        "keygen",
        "--out",
        alice_key.to_str().expect("utf8"),
    ]));
    let bob = stdout(&run_cli(&[
        "keygen",
        "--out",
        bob_key.to_str().expect("utf8"),
    ]));
    let args_as = |key: &Path, args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        all.extend(["--server", &server, "--ca", ca.to_str().expect("utf8")].map(str::to_owned));
        all.extend(["--key".to_owned(), key.to_str().expect("utf8").to_owned()]);
        all
    };
    let as_ = |key: &Path, args: &[&str]| {
        Command::new(cli())
            .args(args_as(key, args))
            .output()
            .expect("cli runs")
    };

    // Bob publishes his card, so Alice can seal to him (the broker may
    // still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = as_(&bob_key, &["relationship", "list"]);
        if output.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", stderr(&output));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Bob adds his laptop: a key file and a registered device id.
    let out = laptop_key.to_str().expect("utf8");
    let device_id = stdout(&as_(&bob_key, &["device", "add", "--out", out]));
    assert_eq!(device_id.len(), 64, "{device_id}");
    assert!(device_id.chars().all(|c| c.is_ascii_hexdigit()));
    let listed = stdout(&as_(&bob_key, &["device", "list"]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.starts_with(&format!("{device_id} ")), "{listed}");
    // A second add to the same file keeps the first key and registers nothing.
    let again = as_(&bob_key, &["device", "add", "--out", out]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert_stderr_has(&again, "already exists");
    assert_eq!(stdout(&as_(&bob_key, &["device", "list"])), listed);
    // A device key file cannot manage devices.
    let from_laptop = as_(&laptop_key, &["device", "list"]);
    assert_eq!(
        from_laptop.status.code(),
        Some(1),
        "{}",
        stderr(&from_laptop)
    );
    assert_stderr_has(&from_laptop, "device key file");

    // The laptop listens with its own key file and reads Alice's message.
    let mut listener = Command::new(cli())
        .args(args_as(
            &laptop_key,
            &["listen", "--count", "2", "--timeout", "30s"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("listen starts");
    stdout(&as_(
        &alice_key,
        &["send", "--to", &bob, "--message", "for the laptop"],
    ));
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(listener.stdout.as_mut().expect("stdout")),
        &mut first_line,
    )
    .expect("reads");
    assert!(first_line.contains("for the laptop"), "{first_line:?}");

    // Revoked: the listening laptop is shut out at once, with the reason
    // and the exit code of a refusal, and cannot come back.
    assert_eq!(
        stdout(&as_(&bob_key, &["device", "revoke", &device_id])),
        ""
    );
    let ended = listener.wait_with_output().expect("listen ends");
    assert_eq!(ended.status.code(), Some(5), "{}", stderr(&ended));
    assert_stderr_has(&ended, "not registered");
    let refused = as_(&laptop_key, &["listen", "--timeout", "2s"]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert_stderr_has(&refused, "not registered");
    assert_eq!(stdout(&as_(&bob_key, &["device", "list"])), "");
    let twice = as_(&bob_key, &["device", "revoke", &device_id]);
    assert_eq!(twice.status.code(), Some(5), "{}", stderr(&twice));
    assert_stderr_has(&twice, "NotFound");
    let typo = as_(&bob_key, &["device", "revoke", "abc"]);
    assert_eq!(typo.status.code(), Some(1), "{}", stderr(&typo));
    assert_stderr_has(&typo, "device id");
}

/// A data directory written by the broker from before the mailbox log
/// (`660feb1`, envelopes in sled trees), kept as a fixture: the old
/// `backbone serve` on an empty directory, two keys made with its
/// `backbone-cli keygen`, Bob listening once (his card), then Alice's
/// `backbone-cli send` of "before the log: one", "two" and "three" to Bob,
/// and a SIGTERM. The new broker must move the envelopes into the log at
/// its first start and deliver them, numbered on from where they were.
#[test]
fn a_data_directory_from_before_the_mailbox_log_is_upgraded_and_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-log-data.tar.gz");
    let extracted = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar runs");
    assert!(extracted.success());
    let data = dir.path().join("data");
    let (alice, bob) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
    for key in [&alice, &bob] {
        let mut permissions = std::fs::metadata(key).expect("key").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
        std::fs::set_permissions(key, permissions).expect("chmod");
    }
    let port = free_udp_port();
    let broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let ca = ca.to_str().expect("utf-8");
    let key = |path: &Path| path.to_str().expect("utf-8").to_owned();
    let bob_address = stdout(&run_cli(&["address", "--key", &key(&bob)]));
    let listen = |count: &str| {
        run_cli(&[
            "listen",
            "--key",
            &key(&bob),
            "--server",
            &server,
            "--ca",
            ca,
            "--count",
            count,
            "--timeout",
            "20s",
            "--json",
        ])
    };
    let received = stdout(&listen("3"));
    let lines: Vec<serde_json::Value> = received
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let texts: Vec<&str> = lines
        .iter()
        .map(|line| line["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        texts,
        [
            "before the log: one",
            "before the log: two",
            "before the log: three"
        ],
        "{received}"
    );
    // A new message is numbered on from the migrated ones.
    stdout(&run_cli(&[
        "send",
        "--key",
        &key(&alice),
        "--to",
        &bob_address,
        "--server",
        &server,
        "--ca",
        ca,
        "--message",
        "after the log",
    ]));
    // Whether Bob's cursor reached the store before the second listen or
    // not (acks are written behind), the new message comes with seq 4.
    let received = stdout(&run_cli(&[
        "listen",
        "--key",
        &key(&bob),
        "--server",
        &server,
        "--ca",
        ca,
        "--timeout",
        "5s",
        "--json",
    ]));
    let after: Vec<serde_json::Value> = received
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("json"))
        .filter(|line| line["text"] == "after the log")
        .collect();
    assert_eq!(after.len(), 1, "{received}");
    assert_eq!(after[0]["seq"], 4, "{received}");
    drop(broker);
    let log = std::fs::read_to_string(dir.path().join("broker.log")).expect("log");
    assert!(
        log.contains("moved the store's envelopes into the mailbox log"),
        "{log}"
    );
}

/// The one JSON object a successful command printed on standard output.
fn json(output: &std::process::Output) -> serde_json::Value {
    let printed = stdout(output);
    let mut lines = printed.lines();
    let value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|error| panic!("{error}: {printed:?}"));
    assert_eq!(lines.next(), None, "one JSON object: {printed}");
    value
}

/// The JSON lines a successful command printed on standard output.
fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect()
}

/// The JSON error object a failed command printed as the last line of
/// standard error (warnings may be logged before it).
fn json_error(output: &std::process::Output) -> serde_json::Value {
    assert!(!output.status.success(), "{}", stderr(output));
    let text = stderr(output);
    let error: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|error| panic!("{error}: {text}"));
    assert!(error["message"].is_string(), "{error}");
    error
}

#[test]
fn every_command_prints_json_for_scripts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let _broker = start_broker(&data, port, dir.path().join("broker.log"));
    let server = format!("127.0.0.1:{port}");
    let ca = data.join("tls/cert.pem");
    let path = |path: &Path| path.to_str().expect("utf8").to_owned();
    let (alice_key, bob_key) = (dir.path().join("alice.key"), dir.path().join("bob.key"));

    // keygen and address agree.
    let alice = json(&run_cli(&["keygen", "--out", &path(&alice_key), "--json"]));
    assert_eq!(alice["key_file"], path(&alice_key));
    let alice = alice["address"].as_str().expect("address").to_owned();
    assert!(alice.starts_with("bb1"), "{alice}");
    let shown = json(&run_cli(&["--json", "address", "--key", &path(&alice_key)]));
    assert_eq!(shown["address"], alice);
    let bob = json(&run_cli(&["keygen", "--json", "--out", &path(&bob_key)]))["address"]
        .as_str()
        .expect("address")
        .to_owned();

    let as_ = |key: &Path, args: &[&str]| {
        Command::new(cli())
            .args(args)
            .args(["--json", "--server", &server, "--ca", &path(&ca)])
            .args(["--key", &path(key)])
            .output()
            .expect("cli runs")
    };
    // Bob publishes his card (the broker may still be starting).
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let output = as_(&bob_key, &["relationship", "list"]);
        if output.status.success() {
            break json(&output);
        }
        assert!(Instant::now() < deadline, "{}", stderr(&output));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["policy"], "anyone", "{listed}");
    assert_eq!(listed["relationships"], serde_json::json!([]), "{listed}");

    // send gives the message's id and its seq in each mailbox; listen
    // prints the same id, one object per line.
    let sent = json(&as_(
        &alice_key,
        &["send", "--to", &bob, "--message", "hello in json"],
    ));
    let message_id = sent["message_id"].as_str().expect("message_id").to_owned();
    assert_eq!(message_id.len(), 32, "{sent}");
    assert_eq!(sent["delivered"][0]["address"], bob, "{sent}");
    assert_eq!(sent["failed"], serde_json::json!([]), "{sent}");
    let received = json_lines(&as_(
        &bob_key,
        &["listen", "--count", "1", "--timeout", "30s"],
    ));
    assert_eq!(received.len(), 1, "{received:?}");
    let line = &received[0];
    assert_eq!(line["event"], "message", "{line}");
    assert_eq!(line["text"], "hello in json", "{line}");
    assert_eq!(line["sender"], alice, "{line}");
    assert_eq!(line["message_id"], message_id.as_str(), "{line}");
    assert_eq!(line["seq"], sent["delivered"][0]["seq"], "{line}");
    assert!(line["sent_at_ms"].as_u64().is_some(), "{line}");

    // A token round-trips its content; with --out the content is in the file.
    let created = json(&as_(
        &alice_key,
        &[
            "token",
            "create",
            "--text",
            "a note in a token",
            "--ttl",
            "1h",
        ],
    ));
    let reference = created["reference"].as_str().expect("reference").to_owned();
    assert!(reference.starts_with("bbt1:"), "{created}");
    assert_eq!(created["password_protected"], false, "{created}");
    let fetched = json(&run_cli(&[
        "token",
        "get",
        &reference,
        "--json",
        "--server",
        &server,
        "--ca",
        &path(&ca),
    ]));
    assert_eq!(fetched["text"], "a note in a token", "{fetched}");
    assert_eq!(
        fetched["content_hex"],
        hex::encode("a note in a token"),
        "{fetched}"
    );
    assert_eq!(fetched["size"], 17, "{fetched}");
    assert_eq!(fetched["out"], serde_json::Value::Null, "{fetched}");
    let note = dir.path().join("note");
    let saved = json(&as_(
        &bob_key,
        &["token", "get", &reference, "--out", &path(&note)],
    ));
    assert_eq!(saved["out"], path(&note), "{saved}");
    assert_eq!(saved["text"], serde_json::Value::Null, "{saved}");
    assert_eq!(std::fs::read(&note).expect("written"), b"a note in a token");
    let deleted = json(&as_(&alice_key, &["token", "delete", &reference]));
    assert_eq!(deleted["deleted"], true, "{deleted}");
    assert_eq!(deleted["reference"], reference.as_str(), "{deleted}");
    let gone = json_error(&as_(&bob_key, &["token", "get", &reference]));
    assert_eq!(gone["error"], "refused", "{gone}");
    assert!(gone["code"].is_string(), "{gone}");

    // Capabilities: created, listed by hash, revoked.
    let capability = json(&as_(&bob_key, &["capability", "create"]));
    assert_eq!(capability["capability"].as_str().map(str::len), Some(64));
    let hash = capability["hash"].as_str().expect("hash").to_owned();
    let listed = json(&as_(&bob_key, &["capability", "list"]));
    assert_eq!(
        listed["capabilities"],
        serde_json::json!([{ "hash": hash }])
    );
    let revoked = json(&as_(&bob_key, &["capability", "revoke", &hash]));
    assert_eq!(revoked["hash"], hash.as_str(), "{revoked}");
    assert_eq!(
        json(&as_(&bob_key, &["capability", "list"]))["capabilities"],
        serde_json::json!([])
    );

    // Devices: added, listed, revoked.
    let laptop_key = dir.path().join("bob-laptop.key");
    let added = json(&as_(
        &bob_key,
        &["device", "add", "--out", &path(&laptop_key)],
    ));
    let device_id = added["device_id"].as_str().expect("device_id").to_owned();
    assert_eq!(device_id.len(), 64, "{added}");
    assert_eq!(added["key_file"], path(&laptop_key), "{added}");
    let devices = json(&as_(&bob_key, &["device", "list"]));
    assert_eq!(devices["devices"][0]["device_id"], device_id.as_str());
    assert!(devices["devices"][0]["issued_at"].is_string(), "{devices}");
    assert!(devices["devices"][0]["issued_at_ms"].is_u64(), "{devices}");
    let revoked = json(&as_(&bob_key, &["device", "revoke", &device_id]));
    assert_eq!(revoked["revoked"], true, "{revoked}");
    assert_eq!(
        json(&as_(&bob_key, &["device", "list"]))["devices"],
        serde_json::json!([])
    );

    // Relationships: a template, a request, the owner's list, an
    // acceptance the requester hears of as a notice line, a policy.
    let template = json(&as_(&bob_key, &["relationship", "template", "--ttl", "1h"]));
    let template = template["reference"]
        .as_str()
        .expect("reference")
        .to_owned();
    let requested = json(&as_(&alice_key, &["relationship", "request", &template]));
    assert_eq!(requested["state"], "pending", "{requested}");
    assert_eq!(requested["role"], "requester", "{requested}");
    assert_eq!(requested["peer"], bob, "{requested}");
    assert_eq!(
        requested["id"].as_str().map(str::len),
        Some(32),
        "{requested}"
    );
    let listed = json(&as_(&bob_key, &["relationship", "list"]));
    assert_eq!(listed["relationships"][0]["role"], "owner", "{listed}");
    assert_eq!(listed["relationships"][0]["peer"], alice, "{listed}");
    assert_eq!(listed["relationships"][0]["id"], requested["id"]);
    let accepted = json(&as_(&bob_key, &["relationship", "accept", &alice]));
    assert_eq!(accepted["state"], "active", "{accepted}");
    let notices = json_lines(&as_(&alice_key, &["listen", "--timeout", "3s"]));
    assert!(
        notices.iter().any(|line| line["event"] == "relationship"
            && line["relationship"]["state"] == "active"
            && line["relationship"]["peer"] == bob),
        "{notices:?}"
    );
    let policy = json(&as_(
        &bob_key,
        &["relationship", "policy", "relationships-only"],
    ));
    assert_eq!(policy["policy"], "relationships-only", "{policy}");
    let ended = json(&as_(&alice_key, &["relationship", "terminate", &bob]));
    assert_eq!(ended["state"], "terminated", "{ended}");

    // A file: announced, uploaded, its status, downloaded to --out, deleted.
    let original = dir.path().join("report.txt");
    std::fs::write(&original, "a small report".repeat(100)).expect("write");
    let put = json_lines(&as_(&alice_key, &["file", "put", &path(&original)]));
    assert_eq!(put.len(), 2, "{put:?}");
    assert_eq!(put[0]["event"], "announced", "{put:?}");
    assert_eq!(put[1]["event"], "uploaded", "{put:?}");
    assert_eq!(put[1]["reference"], put[0]["reference"], "{put:?}");
    assert_eq!(put[1]["path"], path(&original), "{put:?}");
    let file = put[0]["reference"].as_str().expect("reference").to_owned();
    let status = json(&as_(&alice_key, &["file", "status", &file]));
    // The broker's sizes are of the sealed content, a little larger.
    assert!(
        status["size"].as_u64().is_some_and(|size| size > 1400),
        "{status}"
    );
    assert_eq!(status["received"], status["size"], "{status}");
    assert_eq!(status["complete"], true, "{status}");
    let copy = dir.path().join("copy.txt");
    let downloaded = json(&as_(
        &bob_key,
        &["file", "get", &file, "--out", &path(&copy)],
    ));
    assert_eq!(downloaded["size"], 1400, "{downloaded}");
    assert_eq!(
        std::fs::read(&copy).expect("downloaded"),
        std::fs::read(&original).expect("original")
    );
    let to_stdout = json_error(&as_(&bob_key, &["file", "get", &file]));
    assert_eq!(to_stdout["error"], "failed", "{to_stdout}");
    let deleted = json(&as_(&alice_key, &["file", "delete", &file]));
    assert_eq!(deleted["deleted"], true, "{deleted}");

    // delete-identity: scheduled, then cancelled.
    let scheduled = json(&as_(&alice_key, &["delete-identity", "--yes"]));
    assert_eq!(scheduled["address"], alice, "{scheduled}");
    assert!(scheduled["purge_at_ms"].as_u64().is_some(), "{scheduled}");
    assert!(scheduled["purge_at"].is_string(), "{scheduled}");
    let cancelled = json(&as_(&alice_key, &["delete-identity", "--cancel"]));
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");

    // Errors: one JSON object on standard error, the exit code unchanged.
    let typo = as_(&alice_key, &["send", "--to", "bb1typo", "--message", "x"]);
    assert_eq!(typo.status.code(), Some(1));
    assert_eq!(json_error(&typo)["error"], "failed");
    let quiet = as_(&bob_key, &["listen", "--count", "1", "--timeout", "1s"]);
    assert_eq!(quiet.status.code(), Some(6), "{}", stderr(&quiet));
    let timeout = json_error(&quiet);
    assert_eq!(timeout["error"], "timeout", "{timeout}");
    assert_eq!(timeout["message"], "timed out after 0 of 1 messages");
    // A recipient refused: the result names it and why, and the command
    // fails as without --json.
    let refused = as_(
        &alice_key,
        &["send", "--to", &bob, "--message", "not consented"],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert_eq!(json_error(&refused)["error"], "failed");
    let result: serde_json::Value =
        serde_json::from_slice(&refused.stdout).expect("the result on standard output");
    assert_eq!(result["delivered"], serde_json::json!([]), "{result}");
    assert_eq!(result["failed"][0]["address"], bob, "{result}");
    assert_eq!(result["failed"][0]["error"], "NotConsented", "{result}");
    let usage = run_cli(&["--json", "send", "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    assert_eq!(json_error(&usage)["error"], "usage");
    let nobody = run_cli(&[
        "listen",
        "--json",
        "--server",
        &format!("127.0.0.1:{}", free_udp_port()),
        "--fingerprint",
        &"0".repeat(64),
        "--key",
        &path(&alice_key),
        "--timeout",
        "1s",
    ]);
    assert_eq!(nobody.status.code(), Some(3), "{}", stderr(&nobody));
    assert_eq!(json_error(&nobody)["error"], "unreachable");
}

/// Whether `program` can be run (for the optional shells and man).
fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn completion_scripts_and_man_pages_name_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let subcommands = [
        "keygen",
        "address",
        "send",
        "listen",
        "device",
        "capability",
        "token",
        "relationship",
        "file",
        "delete-identity",
        "completions",
        "man",
    ];
    for (shell, check) in [
        ("bash", &["-n"][..]),
        ("zsh", &["-n"][..]),
        ("fish", &["--no-execute"][..]),
    ] {
        let script = stdout(&run_cli(&["completions", shell]));
        assert!(!script.is_empty(), "{shell}");
        for subcommand in subcommands.iter().chain(&["create", "revoke", "template"]) {
            assert!(script.contains(subcommand), "{shell}: no {subcommand}");
        }
        // bash is always there; zsh and fish are checked where installed.
        if shell != "bash" && !installed(shell) {
            continue;
        }
        let file = dir.path().join(format!("backbone-cli.{shell}"));
        std::fs::write(&file, &script).expect("write");
        let checked = Command::new(shell)
            .args(check)
            .arg(&file)
            .output()
            .expect("shell runs");
        assert!(checked.status.success(), "{shell}: {}", stderr(&checked));
    }

    let out = dir.path().join("man1");
    let written = json(&run_cli(&[
        "man",
        "--out",
        out.to_str().expect("utf8"),
        "--json",
    ]));
    let pages = written["pages"].as_array().expect("pages");
    let names = std::iter::once("backbone-cli".to_owned())
        .chain(
            subcommands
                .iter()
                .map(|name| format!("backbone-cli-{name}")),
        )
        .chain(
            [
                "backbone-cli-token-create",
                "backbone-cli-relationship-accept",
            ]
            .map(str::to_owned),
        );
    for name in names {
        let page = out.join(format!("{name}.1"));
        assert!(
            pages.contains(&serde_json::Value::from(page.to_str().expect("utf8"))),
            "{name} not in {pages:?}"
        );
        let text = std::fs::read_to_string(&page).expect("the page exists");
        assert!(text.contains(&format!(".TH {name} 1")), "{text}");
        // roff escapes the hyphens of the name in the NAME section.
        assert!(text.contains(&name.replace('-', "\\-")), "{text}");
    }
    let create = std::fs::read_to_string(out.join("backbone-cli-token-create.1")).expect("page");
    assert!(create.contains("password\\-file"), "{create}");
    // Rendered by man where it is installed.
    if installed("man") {
        let rendered = Command::new("man")
            .arg("-l")
            .arg(out.join("backbone-cli-send.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man runs");
        let page = stdout(&rendered);
        assert!(page.contains("backbone-cli-send"), "{page}");
        assert!(page.contains("--sealed"), "{page}");
    }
}
