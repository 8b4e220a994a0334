//! The `backbone` binary's command-line tools: shell completions, man pages,
//! and `--json` output (fields as docs/operations.md lists them) for the
//! commands that print a result.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backbone_broker::config::StoreConfig;
use backbone_broker::store::{Append, open, wait_for};
use backbone_protocol::Address;
use common::{NOW_MS, damage_marked_record, envelope, text};
use serde_json::Value;

/// The subcommands every completion script and the man pages must name.
const SUBCOMMANDS: &[&str] = &[
    "serve",
    "fleet",
    "store",
    "healthcheck",
    "completions",
    "man",
];

fn backbone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backbone"))
        .args(args)
        .output()
        .expect("backbone runs")
}

/// The one JSON object a command printed on standard output.
fn json_stdout(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|error| panic!("{error}: {}", text(output)));
    assert_eq!(lines.next(), None, "one line: {stdout}");
    value
}

/// The JSON error object a command printed as the last line of standard
/// error (logs may come before it).
fn json_stderr(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|error| panic!("{error}: {}", text(output)))
}

/// Whether `program` can be run (for the optional shells and man).
fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Checks a script's syntax with `shell` and its `args`; false when the
/// shell is not installed.
fn syntax_checked(shell: &str, args: &[&str], script: &Path) -> bool {
    if !installed(shell) {
        return false;
    }
    let checked = Command::new(shell)
        .args(args)
        .arg(script)
        .output()
        .expect("shell runs");
    assert!(
        checked.status.success(),
        "{shell} rejects {}: {}",
        script.display(),
        text(&checked)
    );
    true
}

#[test]
fn completion_scripts_name_every_subcommand_and_parse_in_their_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (shell, checker, args) in [
        ("bash", "bash", &["-n"][..]),
        ("zsh", "zsh", &["-n"][..]),
        ("fish", "fish", &["--no-execute"][..]),
    ] {
        let generated = backbone(&["completions", shell]);
        assert!(generated.status.success(), "{}", text(&generated));
        let script = String::from_utf8(generated.stdout).expect("utf-8");
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        for subcommand in SUBCOMMANDS
            .iter()
            .chain(&["verify", "repair", "pki", "check"])
        {
            assert!(
                script.contains(subcommand),
                "{shell} script does not name {subcommand}"
            );
        }
        let path = dir.path().join(format!("backbone.{shell}"));
        std::fs::write(&path, &script).expect("write");
        let checked = syntax_checked(checker, args, &path);
        // bash is always there; zsh and fish are checked where installed.
        assert!(checked || shell != "bash", "bash is not installed");
    }
    // --json does not turn a script into JSON.
    let with_json = backbone(&["--json", "completions", "bash"]);
    assert!(with_json.status.success(), "{}", text(&with_json));
    assert!(String::from_utf8_lossy(&with_json.stdout).contains("complete -F"));
}

#[test]
fn man_pages_are_written_for_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man1");
    let written = backbone(&["man", "--out", out.to_str().expect("utf-8"), "--json"]);
    assert!(written.status.success(), "{}", text(&written));
    let pages: Vec<PathBuf> = json_stdout(&written)["pages"]
        .as_array()
        .expect("pages")
        .iter()
        .map(|page| PathBuf::from(page.as_str().expect("a path")))
        .collect();
    let mut expected = vec!["backbone".to_owned()];
    expected.extend(SUBCOMMANDS.iter().map(|name| format!("backbone-{name}")));
    expected.extend(
        ["store-verify", "store-repair", "fleet-pki", "fleet-check"]
            .iter()
            .map(|name| format!("backbone-{name}")),
    );
    for name in &expected {
        let path = out.join(format!("{name}.1"));
        assert!(pages.contains(&path), "{name} missing from {pages:?}");
        let page = std::fs::read_to_string(&path).expect("the page exists");
        assert!(page.contains(&format!(".TH {name} 1")), "{page}");
        // roff escapes the hyphens of the name in the NAME section.
        assert!(page.contains(&name.replace('-', "\\-")), "{name}: {page}");
    }
    let verify = std::fs::read_to_string(out.join("backbone-store-verify.1")).expect("page");
    assert!(verify.contains("data\\-dir"), "{verify}");

    // Rendered by man where it is installed: the name and the options show.
    if installed("man") {
        let rendered = Command::new("man")
            .arg("-l")
            .arg(out.join("backbone-store-verify.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man runs");
        assert!(rendered.status.success(), "{}", text(&rendered));
        let page = String::from_utf8_lossy(&rendered.stdout);
        assert!(page.contains("backbone-store-verify"), "{page}");
        assert!(page.contains("--data-dir"), "{page}");
    }
}

#[test]
fn store_verify_and_repair_report_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let data_arg = data.to_str().expect("utf-8");
    let alice = Address([1; 32]);
    let marker = [0x5au8; 64];
    {
        let (stores, _) = open::open(data, &StoreConfig::default(), NOW_MS).expect("opens");
        for seq in 1..=3 {
            let payload: &[u8] = if seq == 2 { &marker } else { b"fine" };
            let items = vec![Append {
                address: alice,
                envelope: envelope(seq, payload),
            }];
            wait_for(|done| stores.log.append(items, done)).expect("appended");
        }
        stores.log.close().expect("closes");
    }
    let whole = backbone(&["store", "verify", "--data-dir", data_arg, "--json"]);
    assert!(whole.status.success(), "{}", text(&whole));
    let report = json_stdout(&whole);
    assert_eq!(report["whole"], true, "{report}");
    assert_eq!(report["damaged"], serde_json::json!([]), "{report}");
    assert_eq!(report["log"], data.join("log").display().to_string());

    // One damaged byte in the middle of the log.
    let segment = damage_marked_record(data, &marker);

    let damaged = backbone(&["--json", "store", "verify", "--data-dir", data_arg]);
    assert_eq!(damaged.status.code(), Some(1), "{}", text(&damaged));
    let report = json_stdout(&damaged);
    assert_eq!(report["whole"], false, "{report}");
    let ranges = report["damaged"].as_array().expect("damaged ranges");
    assert_eq!(ranges.len(), 1, "{report}");
    assert_eq!(ranges[0]["file"], segment.display().to_string());
    assert!(ranges[0]["offset"].as_u64().is_some(), "{report}");
    assert!(ranges[0]["len"].as_u64().is_some_and(|len| len > 0));
    assert_eq!(ranges[0]["tail"], false, "{report}");
    assert_eq!(
        ranges[0]["mailboxes"],
        serde_json::json!([alice.to_string()])
    );
    let error = json_stderr(&damaged);
    assert_eq!(error["error"], "damaged", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.contains("1 damaged range(s)")),
        "{error}"
    );

    let repaired = backbone(&["store", "repair", "--yes", "--data-dir", data_arg, "--json"]);
    assert!(repaired.status.success(), "{}", text(&repaired));
    let report = json_stdout(&repaired);
    assert_eq!(report["repaired_ranges"], 1, "{report}");
    assert_eq!(report["dropped_envelopes"], 1, "{report}");
    assert_eq!(report["damaged"].as_array().map(Vec::len), Some(1));
    let verified = backbone(&["store", "verify", "--data-dir", data_arg, "--json"]);
    assert_eq!(json_stdout(&verified)["whole"], true, "{}", text(&verified));

    // No log at all: a JSON error, exit code 1.
    let empty = tempfile::tempdir().expect("tempdir");
    let missing = backbone(&[
        "store",
        "verify",
        "--json",
        "--data-dir",
        empty.path().to_str().expect("utf-8"),
    ]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(missing.stdout.is_empty(), "{}", text(&missing));
    let error = json_stderr(&missing);
    assert_eq!(error["error"], "failed", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.contains("holds no mailbox log")),
        "{error}"
    );
}

#[test]
fn fleet_commands_report_as_json() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let (before, after) = (
        config.join("fleet-compose.toml"),
        config.join("fleet-compose-grow.toml"),
    );
    let (before, after) = (
        before.to_str().expect("utf-8"),
        after.to_str().expect("utf-8"),
    );
    let checked = backbone(&["--json", "fleet", "check", after, "--previous", before]);
    assert!(checked.status.success(), "{}", text(&checked));
    let report = json_stdout(&checked);
    assert_eq!(report["epoch"], 2, "{report}");
    assert_eq!(report["previous_epoch"], 1, "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["digest"].as_str().map(str::len),
        Some(64),
        "{report}"
    );
    let nodes = report["nodes"].as_array().expect("nodes");
    let slots: u64 = nodes
        .iter()
        .map(|node| node["slot_count"].as_u64().expect("slot_count"))
        .sum();
    assert_eq!(slots, 4096, "{report}");
    assert_eq!(
        nodes[0]["slots"][0],
        serde_json::json!([0, 1364]),
        "{report}"
    );
    assert_eq!(report["moves"][0]["from"], "node-c", "{report}");
    assert_eq!(report["moves"][0]["to"], "node-d", "{report}");

    // Backwards is unsafe: the report names the problems, the error its kind.
    let unsafe_ = backbone(&["fleet", "check", before, "--previous", after, "--json"]);
    assert_eq!(unsafe_.status.code(), Some(1), "{}", text(&unsafe_));
    let report = json_stdout(&unsafe_);
    assert!(
        report["problems"]
            .as_array()
            .is_some_and(|problems| !problems.is_empty()),
        "{report}"
    );
    assert_eq!(json_stderr(&unsafe_)["error"], "unsafe_transition");

    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().to_str().expect("utf-8");
    let generated = backbone(&["fleet", "pki", "--dir", pki, "--nodes", "node-a", "--json"]);
    assert!(generated.status.success(), "{}", text(&generated));
    let written = json_stdout(&generated)["written"].clone();
    let written: Vec<&str> = written
        .as_array()
        .expect("written")
        .iter()
        .map(|path| path.as_str().expect("a path"))
        .collect();
    assert!(
        written.iter().any(|path| path.ends_with("node-a.pem")),
        "{written:?}"
    );
    let again = backbone(&["fleet", "pki", "--dir", pki, "--nodes", "node-a", "--json"]);
    assert_eq!(json_stdout(&again)["written"], serde_json::json!([]));
}

#[test]
fn usage_errors_and_a_failed_healthcheck_are_json_objects_on_standard_error() {
    let usage = backbone(&["--json", "store", "verify", "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));
    assert!(usage.stdout.is_empty(), "{}", text(&usage));
    let error = json_stderr(&usage);
    assert_eq!(error["error"], "usage", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.contains("--no-such-flag")),
        "{error}"
    );
    // Without --json, clap's own message.
    let plain = backbone(&["store", "verify", "--no-such-flag"]);
    assert_eq!(plain.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&plain.stderr).starts_with("error:"));

    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}/health");
    let unhealthy = backbone(&["healthcheck", "--url", &url, "--json"]);
    assert_eq!(unhealthy.status.code(), Some(1), "{}", text(&unhealthy));
    assert_eq!(json_stderr(&unhealthy)["error"], "unhealthy");
}
