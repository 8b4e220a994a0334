//! What operators are given, checked with the tools they would use:
//!
//! - a live broker's `/metrics` passes `promtool check metrics` (HELP text,
//!   names and units), carries the process metrics, and every family it
//!   shows is one `backbone_broker::telemetry` documents;
//! - the alert rules in `deploy/prometheus/` pass `promtool check rules`
//!   and their unit tests (`promtool test rules`);
//! - every expression of the Grafana dashboard in `deploy/grafana/` parses
//!   as PromQL (promtool checks it as a recording rule) and names only
//!   metrics the broker exports.
//!
//! promtool comes with Debian's `prometheus` package; the tests install it
//! when it is missing and they run as root, and fail with a clear message
//! otherwise.

mod process;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use backbone_broker::telemetry::{self, Kind};
use backbone_client::envelope::EncryptionKeypair;
use backbone_client::transport::{Credentials, RawConnection};
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::bytes::Blob;
use backbone_protocol::frame::Send;
use backbone_protocol::{Frame, Keypair};
use process::start_metered_broker;

/// The process metrics the broker must export (from `metrics-process`).
const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
];

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The promtool binary, installed from Debian's `prometheus` package if it
/// is missing (once per test process).
fn promtool() -> &'static Path {
    static PROMTOOL: OnceLock<PathBuf> = OnceLock::new();
    PROMTOOL.get_or_init(|| {
        let found = || {
            Command::new("promtool")
                .arg("--version")
                .output()
                .is_ok_and(|output| output.status.success())
        };
        if !found() {
            let root = Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|output| output.stdout.trim_ascii() == b"0");
            assert!(
                root,
                "promtool is missing and this test is not root, so it cannot install it: \
                 install Debian's `prometheus` package (apt-get install prometheus)"
            );
            let install = || {
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends", "prometheus"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .is_ok_and(|status| status.success())
            };
            if !install() {
                let _ = Command::new("apt-get").arg("update").status();
                assert!(install(), "apt-get install prometheus failed");
            }
            assert!(
                found(),
                "promtool is still missing after installing prometheus"
            );
        }
        PathBuf::from("promtool")
    })
}

/// Runs promtool with `args` (and `stdin`), returning its exit status,
/// stdout and stderr.
fn run_promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    let output = child.wait_with_output().expect("promtool ends");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// The body of a `200 OK` answer to `GET path` from `addr`.
fn http_body(addr: &str, path: &str) -> String {
    let response = process::http_get(addr, path);
    let (head, body) = response.split_once("\r\n\r\n").expect("a header");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Sends, pushes, acknowledgements and a refused send against the broker
/// at `server`, so that most of its metrics have values.
async fn traffic(server: &str, ca: PathBuf) {
    let connect = || {
        let mut config = ConnectConfig::new(server, Trust::CaFile(ca.clone()));
        config.server_name = Some("localhost".into());
        config
    };
    let (alice, bob) = (Keypair::generate(), Keypair::generate());
    let options = |key: &Keypair| {
        let mut options =
            ClientOptions::primary(connect(), key.clone(), EncryptionKeypair::generate());
        options.request_timeout = Duration::from_secs(10);
        options
    };
    let bob_client = Client::connect(options(&bob)).await.expect("bob connects");
    bob_client.publish_card().await.expect("bob's card");
    let alice_client = Client::connect(options(&alice))
        .await
        .expect("alice connects");
    for n in 0..5u8 {
        alice_client
            .send_envelope(&[bob.address()], vec![n; 100], Duration::from_secs(3600))
            .await
            .expect("a send");
    }
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(10), bob_client.next_delivery())
            .await
            .expect("a push in time")
            .expect("bob's client runs");
    }
    // A send the broker refuses (a TTL of zero), to count a refusal.
    let mut raw = RawConnection::connect(&connect()).await.expect("connects");
    raw.authenticate(&Credentials::primary(&alice))
        .await
        .expect("auth");
    raw.send(&Frame::Send(Send {
        request_id: 1,
        ttl_secs: 0,
        recipients: vec![bob.address()],
        envelope: Blob::from(vec![1; 10]),
    }))
    .await
    .expect("sends");
    assert!(matches!(raw.recv().await, Ok(Frame::Error(_))));
    raw.close().await;
    drop((alice_client, bob_client));
}

/// The metric families `/metrics` text declares with `# TYPE`.
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_live_brokers_metrics_pass_promtool_and_are_all_documented() {
    let broker = start_metered_broker();
    let (dir, metrics) = (&broker.dir, &broker.metrics);
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(traffic(&broker.server, broker.ca.clone()));
    // Scraped twice: the second scrape shows the gauges the first sampled.
    http_body(metrics, "/metrics");
    let exposition = http_body(metrics, "/metrics");

    let (ok, report) = run_promtool(&["check", "metrics"], dir.path(), Some(&exposition));
    assert!(
        ok && report.trim().is_empty(),
        "promtool check metrics reports:\n{report}\n--- on:\n{exposition}"
    );

    let families = families(&exposition);
    for family in &families {
        assert!(
            exposition.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    let documented: BTreeSet<&str> = telemetry::METRICS.iter().map(|m| m.name).collect();
    for family in families.iter().filter(|f| f.starts_with("backbone_")) {
        assert!(
            documented.contains(family.as_str()),
            "/metrics shows {family}, which telemetry::METRICS does not list"
        );
    }
    for expected in PROCESS_METRICS.iter().copied().chain([
        "backbone_envelopes_accepted_total",
        "backbone_envelopes_pushed_total",
        "backbone_send_seconds",
        "backbone_sends_refused_total",
        "backbone_log_sync_seconds",
        "backbone_push_pending_envelopes",
        "backbone_data_dir_available_bytes",
    ]) {
        assert!(
            families.contains(expected),
            "/metrics lacks {expected}:\n{exposition}"
        );
    }
    assert!(
        exposition.contains("backbone_sends_refused_total{kind=\"send\",code=\"InvalidTtl\"} 1"),
        "the refused send is counted by code:\n{exposition}"
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repository().join("deploy/prometheus");
    let (ok, report) = run_promtool(&["check", "rules", "alerts.yml"], &dir, None);
    assert!(ok, "promtool check rules:\n{report}");
    let (ok, report) = run_promtool(&["test", "rules", "alerts.test.yml"], &dir, None);
    assert!(ok, "promtool test rules:\n{report}");
    // Every metric an alert names is one the broker exports.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let expressions: Vec<String> = rules
        .split("expr:")
        .skip(1)
        .map(|rest| {
            rest.split("\n        for:")
                .next()
                .expect("an expression")
                .to_owned()
        })
        .collect();
    assert!(
        expressions.len() >= 6,
        "alerts.yml has {}",
        expressions.len()
    );
    for expression in &expressions {
        check_names(expression, "alerts.yml");
    }
}

/// Every identifier in `expression` that names a metric (`backbone_…`,
/// `process_…`) is one the broker exports, histogram series included.
fn check_names(expression: &str, source: &str) {
    let exported: BTreeSet<String> = telemetry::METRICS
        .iter()
        .flat_map(|metric| {
            let series: Vec<String> = match metric.kind {
                Kind::Histogram => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|suffix| format!("{}{suffix}", metric.name))
                    .collect(),
                _ => vec![metric.name.to_owned()],
            };
            series
        })
        .chain(PROCESS_METRICS.iter().map(|name| (*name).to_owned()))
        .collect();
    let mut named = 0;
    for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("backbone_") || word.starts_with("process_") {
            named += 1;
            assert!(
                exported.contains(word),
                "{source}: `{word}` is not a metric the broker exports, in {expression}"
            );
        }
    }
    assert!(
        named > 0 || expression.contains("up{"),
        "{source}: {expression} names no broker metric"
    );
}

#[test]
fn every_dashboard_expression_parses_and_names_an_exported_metric() {
    let path = repository().join("deploy/grafana/backbone.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
            .expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"].as_str().expect("a PromQL expression");
            expressions.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                expression,
            ));
        }
    }
    assert!(expressions.len() >= 20, "{} expressions", expressions.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, (title, expression)) in expressions.iter().enumerate() {
        check_names(expression, &format!("dashboard panel {title:?}"));
        // Grafana's variables, as Grafana would substitute them.
        let promql = expression
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expression_{index}\n        expr: {}\n",
            serde_json::to_string(&promql).expect("a JSON string is a YAML string")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dashboard.rules.yml"), &rules).expect("write rules");
    let (ok, report) = run_promtool(&["check", "rules", "dashboard.rules.yml"], dir.path(), None);
    assert!(
        ok,
        "a dashboard expression is not valid PromQL:\n{report}\n{rules}"
    );
}
