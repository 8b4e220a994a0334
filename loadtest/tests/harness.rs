//! The harness end to end: the real binary spawns the real broker, runs short
//! scenarios, and its JSON and SVG outputs carry verified results.

use std::path::PathBuf;
use std::process::Command;

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backbone-loadtest"))
}

/// `--spawn-broker` runs the `backbone` binary next to this one; build it if needed.
fn ensure_broker_binary() {
    if !loadtest().with_file_name("backbone").exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "backbone-broker", "--bin", "backbone"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the broker failed");
    }
}

fn run(args: &[&str]) -> serde_json::Value {
    ensure_broker_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("result.json");
    let output = Command::new(loadtest())
        .args(["--spawn-broker", "--quiet", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("loadtest runs");
    assert!(
        output.status.success(),
        "loadtest failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid json")
}

#[test]
fn steady_verifies_every_delivery_and_writes_json_and_svg() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("run.svg");
    let svg_arg = svg.to_str().expect("utf8");
    let result = run(&[
        "--plot",
        svg_arg,
        "steady",
        "--mailboxes",
        "10",
        "--senders",
        "2",
        "--inflight",
        "2",
        "--duration",
        "2s",
    ]);
    let acked = result["acked"].as_u64().expect("acked");
    assert!(acked > 0, "{result}");
    assert_eq!(result["expected_deliveries"].as_u64(), Some(acked));
    assert_eq!(result["delivered"].as_u64(), Some(acked));
    assert_eq!(result["lost"].as_u64(), Some(0));
    assert_eq!(result["duplicates"].as_u64(), Some(0));
    assert!(result["send_ack"]["p99_us"].as_u64().expect("p99") > 0);
    assert!(result["push"]["count"].as_u64().expect("count") >= acked);
    assert!(
        result["broker"]["cpu_seconds"]
            .as_f64()
            .expect("broker sampled")
            > 0.0
    );
    // The load generator measures itself too (#21: the client's cost).
    assert!(
        result["generator"]["cpu_us_per_message"]
            .as_f64()
            .expect("generator sampled")
            > 0.0,
        "{result}"
    );
    assert!(
        std::fs::read_to_string(&svg)
            .expect("svg written")
            .starts_with("<svg")
    );
}

#[test]
fn idle_mailboxes_settle_to_no_actors() {
    let result = run(&[
        "--broker-env",
        "BACKBONE__MAILBOX__IDLE_TIMEOUT=500ms",
        "idle-mailboxes",
        "--mailboxes",
        "200",
        "--senders",
        "2",
        "--settle",
        "2s",
    ]);
    assert_eq!(result["idle"]["mailboxes"].as_u64(), Some(200), "{result}");
    // No actor stays, not even those of the two senders, who are still
    // connected: a subscribed device does not keep its mailbox's actor.
    assert_eq!(
        result["idle"]["actors_after_settle"].as_u64(),
        Some(0),
        "{result}"
    );
}

#[test]
fn connect_storm_reports_memory_and_cpu_per_connection() {
    let result = run(&[
        "connect-storm",
        "--connections",
        "40",
        "--concurrency",
        "8",
        "--hold",
        "500ms",
    ]);
    let connect = &result["connect"];
    assert_eq!(connect["connections"].as_u64(), Some(40), "{result}");
    assert!(connect["rate_per_s"].as_f64().expect("rate") > 0.0);
    assert!(connect["handshake"]["p50_us"].as_u64().expect("p50") > 0);
    assert!(
        connect["broker_bytes_per_connection"].is_number(),
        "{result}"
    );
    assert!(
        connect["broker_cpu_us_per_connection"]
            .as_f64()
            .expect("cpu per connection")
            > 0.0,
        "{result}"
    );
    // No message was sent, so there is no per-message figure.
    assert!(result["broker"]["cpu_us_per_message"].is_null(), "{result}");
}

#[test]
fn a_short_soak_samples_the_broker_and_judges_every_check() {
    // Twenty seconds of the real mix at a low rate. The thresholds are
    // loosened: this checks the machinery, not the broker (memory still
    // settles in so short a run); the 10-minute soak in docs/reliability.md
    // judges the broker.
    let result = run(&[
        "--opaque",
        "soak",
        "--duration",
        "20s",
        "--warmup",
        "5s",
        "--window",
        "5s",
        "--sample-every",
        "1s",
        "--mailboxes",
        "10",
        "--senders",
        "2",
        "--rate",
        "200",
        "--ttl",
        "5s",
        "--short-ttl-min",
        "1s",
        "--short-ttl-max",
        "3s",
        "--churn-identities",
        "20",
        "--churn-rate",
        "5",
        "--max-rss-growth",
        "1000",
        "--max-task-growth",
        "1000",
        "--max-fd-spread",
        "1000",
        "--max-disk-factor",
        "1000000",
    ]);
    assert_eq!(result["lost"].as_u64(), Some(0), "{result}");
    assert!(result["expected_deliveries"].as_u64().expect("owed") > 0);
    let soak = &result["soak"];
    let samples = soak["samples"].as_array().expect("samples");
    assert!(samples.len() >= 15, "{soak}");
    let last = samples.last().expect("a sample");
    assert!(last["tasks"].as_u64().expect("tasks scraped") > 0, "{last}");
    assert!(last["fds"].as_u64().expect("fds") > 0, "{last}");
    assert!(last["disk_bytes"].as_u64().expect("disk") > 0, "{last}");
    assert!(
        samples
            .iter()
            .any(|s| s["live_bytes"].as_u64().expect("live") > 0),
        "{soak}"
    );
    assert!(
        soak["churn_connections"].as_u64().expect("churn") > 10,
        "{soak}"
    );
    assert!(
        soak["broker_expired"].as_u64().expect("expired") > 0,
        "{soak}"
    );
    let checks = soak["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 5, "{soak}");
    assert!(checks.iter().all(|c| c["pass"] == true), "{soak}");
}
