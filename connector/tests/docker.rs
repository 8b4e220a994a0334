//! The Connector's image (`docker/connector.Dockerfile`) and
//! `docker/compose.connector.yaml`: a broker, two Connectors made with
//! `init` in their volumes, and the example webhook receiver, each in its
//! container. A message sent through Connector A's REST API is listed by
//! Connector B and reaches the receiver with a valid signature.
//!
//! It needs Docker, so it is ignored by default. Run it with
//! `scripts/connector-docker-test`, that is
//!
//! ```text
//! cargo test -p backbone-connector --test docker -- --ignored
//! ```
//!
//! The broker's and the Connector's images are built first with
//! `docker/build-image.sh` and `docker/build-connector-image.sh` (release
//! builds); `BACKBONE_TEST_IMAGE` and `BACKBONE_CONNECTOR_TEST_IMAGE` name
//! existing images to run instead. The project publishes fixed host ports
//! (7720/udp, 9720 and 8721-8729/tcp), apart from the fleet tests'; the
//! containers' logs are saved under the target tmpdir.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{Api, eventually};

/// The compose project. Fixed, so that a run killed before its guard ran
/// is cleaned up by the next one; not `docker`, the default of someone
/// trying the file out by hand.
const PROJECT: &str = "bbtest-connector";

/// Image tags the test builds; not the `:dev` tags, which a test run must
/// neither replace nor run.
const BROKER_IMAGE: &str = "backbone:connector-test";
const CONNECTOR_IMAGE: &str = "backbone-connector:test";

/// The webhook secret the compose file gives Connector B and the receiver.
const WEBHOOK_SECRET: &str = "docker test webhook secret 0123456789";

/// How long everything after the image builds may take: starting the
/// project, the health checks (the first runs 10 s after a start), the
/// message, and the teardown's margin.
const LIMIT: Duration = Duration::from_secs(240);

/// How long the services may take to report healthy.
const HEALTHY_LIMIT: Duration = Duration::from_secs(90);

/// The host ports of `docker/compose.connector.yaml`.
const CONNECTOR_A: &str = "http://127.0.0.1:8721";
const CONNECTOR_B: &str = "http://127.0.0.1:8722";
const RECEIVER: &str = "http://127.0.0.1:8729";

/// The repository root (this crate is `connector/`).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("connector/ has a parent")
}

/// Writes a line to stderr even when libtest captures output.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker; run with scripts/connector-docker-test"]
async fn a_message_through_connector_a_reaches_connector_b_and_its_webhook() {
    let (broker_image, connector_image) = tokio::task::spawn_blocking(|| {
        (
            image(
                "docker/build-image.sh",
                "BACKBONE_IMAGE",
                BROKER_IMAGE,
                "BACKBONE_TEST_IMAGE",
            ),
            image(
                "docker/build-connector-image.sh",
                "BACKBONE_CONNECTOR_IMAGE",
                CONNECTOR_IMAGE,
                "BACKBONE_CONNECTOR_TEST_IMAGE",
            ),
        )
    })
    .await
    .expect("image build task");
    let project = Project {
        broker_image,
        connector_image,
    };
    let started = std::time::Instant::now();
    tokio::time::timeout(LIMIT, exchange(&project))
        .await
        .unwrap_or_else(|_| panic!("not done within {LIMIT:?}"));
    report(&format!(
        "{PROJECT}: up, message through A to B and B's webhook in {:.1?}",
        started.elapsed()
    ));
}

async fn exchange(project: &Project) {
    // A previous run killed before its guard ran may have left the project.
    project.compose(&["down", "-v", "-t", "1"]).await;
    project.compose(&["up", "-d"]).await;
    let services = ["connector-a", "connector-b", "webhook-receiver"];
    let mut containers = Vec::new();
    for service in services {
        containers.push(project.container(service).await);
    }
    // The images' own health checks: the Connectors answer /health with 200
    // only once connected to the broker.
    let healthy = std::time::Instant::now();
    for (service, container) in services.iter().zip(&containers) {
        project.wait_healthy(service, container).await;
    }
    report(&format!(
        "{PROJECT}: connectors and receiver healthy after {:.1?}",
        healthy.elapsed()
    ));
    for (service, container) in services.iter().zip(&containers) {
        let uid = docker(&["exec", container, "id", "-u"]).await;
        assert_ne!(uid.trim(), "0", "{service} runs as root");
    }

    // The API keys: `init` printed each once, to its one-shot's stdout.
    let a = Api::new(
        CONNECTOR_A.into(),
        project.api_key("connector-a-init").await,
    );
    let b = Api::new(
        CONNECTOR_B.into(),
        project.api_key("connector-b-init").await,
    );
    let a_address = address(&a).await;
    let b_address = address(&b).await;
    assert_ne!(a_address, b_address);
    let unauthenticated = a
        .http
        .get(a.url("/api/v1/messages"))
        .send()
        .await
        .expect("GET without a key");
    assert_eq!(unauthenticated.status(), 401);

    let text = "invoice 4711, through Docker";
    let sent = a
        .post_ok(
            "/api/v1/messages",
            &json!({ "recipients": [b_address], "text": text }),
            201,
        )
        .await;
    assert_eq!(sent["stored"][0]["address"], b_address.as_str());
    let received = eventually("B lists the message", || async {
        b.messages(&format!("peer={a_address}"))
            .await
            .into_iter()
            .find(|message| message["text"] == text)
    })
    .await;
    assert_eq!(received["direction"], "in");
    assert_eq!(received["sender"], a_address.as_str());
    assert_eq!(received["message_id"], sent["message"]["message_id"]);

    let (delivery, rejected) = eventually("the receiver gets B's webhook", || async {
        let events = receiver_events(&a).await?;
        let delivery = events["events"].as_array()?.iter().find(|delivery| {
            delivery["event"]["kind"] == "message.received"
                && delivery["event"]["data"]["text"] == text
        })?;
        Some((delivery.clone(), events["rejected"].clone()))
    })
    .await;
    assert_eq!(rejected, 0, "the receiver rejected deliveries");
    assert_eq!(delivery["event"]["peer"], a_address.as_str());
    assert_eq!(delivery["event"]["event_id"], delivery["event_id"]);
    // The receiver verified the signature; check it here too, on the
    // body exactly as received.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        backbone_connector::webhook::verify(
            WEBHOOK_SECRET,
            delivery["signature"].as_str().expect("signature"),
            delivery["body"].as_str().expect("body").as_bytes(),
            now,
            Duration::from_secs(600),
        ),
        "the signature does not verify: {delivery}"
    );
}

async fn address(api: &Api) -> String {
    let identity = api.get("/api/v1/identity").await;
    identity["address"].as_str().expect("address").to_owned()
}

/// The receiver's `GET /events` (it asks for no key).
async fn receiver_events(api: &Api) -> Option<Value> {
    let response = api
        .http
        .get(format!("{RECEIVER}/events"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// The image to run: the one `override_env` names, or `tag` built with
/// `script` from this checkout (a release build, quick when up to date, and
/// `docker build`, whose layer cache makes an unchanged binary cheap).
fn image(script: &str, tag_env: &str, tag: &str, override_env: &str) -> String {
    if let Ok(image) = std::env::var(override_env) {
        report(&format!(
            "{PROJECT}: using the image {image} ({override_env})"
        ));
        return image;
    }
    report(&format!(
        "{PROJECT}: building {tag} with {script} (set {override_env} to skip)"
    ));
    let started = std::time::Instant::now();
    let mut command = std::process::Command::new(repo_root().join(script));
    // `cargo test` gives this process the test crate's CARGO_MANIFEST_DIR,
    // CARGO_PKG_* and the like. The script's `cargo build` would pass them
    // on to build scripts that track them (ring's does), find its release
    // build stale, and rebuild it from scratch on every run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let output = command
        .env(tag_env, tag)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|error| panic!("{script} did not run: {error}"));
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    report(&format!(
        "{PROJECT}: built {tag} in {:.0?}",
        started.elapsed()
    ));
    tag.to_owned()
}

/// `docker compose` if the plugin is there, else docker-compose v1.
fn compose_program() -> &'static [&'static str] {
    static PROGRAM: OnceLock<&'static [&'static str]> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let works = |program: &[&str]| {
            std::process::Command::new(program[0])
                .args(&program[1..])
                .arg("version")
                .output()
                .is_ok_and(|output| output.status.success())
        };
        if works(&["docker", "compose"]) {
            &["docker", "compose"]
        } else if works(&["docker-compose"]) {
            &["docker-compose"]
        } else {
            panic!("neither `docker compose` nor `docker-compose` works; this test needs Docker")
        }
    })
}

/// The compose project; `down -v` when dropped, even when the test panics
/// or times out, after saving the containers' logs.
struct Project {
    broker_image: String,
    connector_image: String,
}

impl Project {
    fn command(&self, args: &[&str]) -> std::process::Command {
        let program = compose_program();
        let mut command = std::process::Command::new(program[0]);
        command
            .args(&program[1..])
            .arg("-f")
            .arg(repo_root().join("docker/compose.connector.yaml"))
            .args(["-p", PROJECT])
            .args(args)
            .env("BACKBONE_IMAGE", &self.broker_image)
            .env("BACKBONE_CONNECTOR_IMAGE", &self.connector_image)
            .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
            .stdin(std::process::Stdio::null());
        command
    }

    /// Runs a compose command; panics with its output if it fails.
    async fn compose(&self, args: &[&str]) -> String {
        run(
            tokio::process::Command::from(self.command(args)),
            &format!("compose {}", args.join(" ")),
        )
        .await
    }

    /// The id of `service`'s container, running or not (`compose ps`
    /// lists stopped one-shots in v1 but not in v2, so ask docker by label).
    async fn container(&self, service: &str) -> String {
        let ids = docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={PROJECT}"),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
        .await;
        let mut ids = ids.split_whitespace();
        let id = ids
            .next()
            .unwrap_or_else(|| panic!("no container for {service}"));
        assert!(ids.next().is_none(), "several containers for {service}");
        id.to_owned()
    }

    /// The API key an init one-shot printed: its only line on stdout (the
    /// rest of what `init` says goes to stderr).
    async fn api_key(&self, init_service: &str) -> String {
        let container = self.container(init_service).await;
        let stdout = docker(&["logs", &container]).await;
        let key = stdout.trim();
        assert!(
            key.starts_with("bbk_") && !key.contains(char::is_whitespace),
            "{init_service} printed no single API key on stdout: {stdout:?}"
        );
        key.to_owned()
    }

    /// Waits until Docker reports `container` healthy by the image's (or
    /// the compose file's) health check.
    async fn wait_healthy(&self, service: &str, container: &str) {
        let started = std::time::Instant::now();
        loop {
            let status = docker(&["inspect", "-f", "{{.State.Health.Status}}", container]).await;
            if status.trim() == "healthy" {
                return;
            }
            assert!(
                started.elapsed() < HEALTHY_LIMIT,
                "{service} not healthy after {HEALTHY_LIMIT:?}: {}",
                status.trim()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Saves the containers' logs under the test's target tmpdir.
    fn save_logs(&self) -> Option<std::path::PathBuf> {
        let output = self.command(&["logs", "--no-color", "-t"]).output().ok()?;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{PROJECT}.log"));
        std::fs::write(&path, &output.stdout).ok()?;
        Some(path)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if let Some(path) = self.save_logs() {
            report(&format!(
                "{PROJECT}: container logs saved to {}",
                path.display()
            ));
        }
        match self.command(&["down", "-v", "-t", "5"]).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => report(&format!(
                "{PROJECT}: compose down failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(error) => report(&format!("{PROJECT}: compose down did not run: {error}")),
        }
    }
}

async fn docker(args: &[&str]) -> String {
    let mut command = tokio::process::Command::new("docker");
    command.args(args).stdin(std::process::Stdio::null());
    run(command, &format!("docker {}", args.join(" "))).await
}

/// Runs `command`, returning its stdout; panics with stderr if it fails.
/// A command still running when the test times out is killed.
async fn run(mut command: tokio::process::Command, what: &str) -> String {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|error| panic!("{what} did not run: {error}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
