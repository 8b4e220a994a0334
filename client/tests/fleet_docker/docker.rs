//! The three-node fleet of `docker/compose.yaml`, driven from a test: the
//! image, `docker compose` (v2 plugin or v1 `docker-compose`), the nodes'
//! `/health`, faults (kill, start, restart, network disconnect), and a
//! teardown guard.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use backbone_broker::fleet::FleetMap;
use backbone_protocol::Address;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The nodes, in the order of their published ports (index 0 is node-a).
pub const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Every node name by index, including `node-d`, which
/// `docker/compose.grow.yaml` adds when the fleet grows.
pub const ALL_NODES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

/// The slots `config/fleet-compose-grow.toml` moves from node-c to node-d.
pub const MOVED_SLOTS: std::ops::RangeInclusive<u16> = 3413..=4095;

/// The image tag the tests build. Not `backbone:dev`: a test run must not
/// replace the image someone is trying out by hand, nor run theirs.
const TEST_IMAGE: &str = "backbone:fleet-test";

/// Names an existing image to run as it is, skipping the build.
const IMAGE_ENV: &str = "BACKBONE_TEST_IMAGE";

/// How long one `/health` request may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// The repository root (this crate is `client/`).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client/ has a parent")
}

/// Writes a line to the test's stderr even when libtest captures output:
/// the counts are what these tests are run for, so they are shown on
/// success too. (`eprintln!` is captured; a direct write is not.)
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The image every test of this process runs, built on first use.
///
/// With `BACKBONE_TEST_IMAGE` set, that image is used as it is. Otherwise
/// `docker/build-image.sh` builds `backbone:fleet-test` from this checkout:
/// it runs `cargo build --release` for the broker (quick when up to date) and
/// `docker build`, whose layer cache makes an unchanged binary cheap.
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        if let Ok(image) = std::env::var(IMAGE_ENV) {
            report(&format!("fleet: using the image {image} ({IMAGE_ENV})"));
            return image;
        }
        report(&format!(
            "fleet: building {TEST_IMAGE} with docker/build-image.sh (set {IMAGE_ENV} to skip)"
        ));
        let started = std::time::Instant::now();
        let mut command = std::process::Command::new(repo_root().join("docker/build-image.sh"));
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
            .env("BACKBONE_IMAGE", TEST_IMAGE)
            .current_dir(repo_root())
            .output()
            .expect("docker/build-image.sh runs");
        assert!(
            output.status.success(),
            "docker/build-image.sh failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        report(&format!(
            "fleet: built {TEST_IMAGE} in {:.0?}",
            started.elapsed()
        ));
        TEST_IMAGE.to_owned()
    })
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
            panic!("neither `docker compose` nor `docker-compose` works; these tests need Docker")
        }
    })
}

/// What `/health` says about one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// `status` is `ok`.
    pub ok: bool,
    /// Each peer's name and link state (`connecting`, `up`, `down`, `refused`).
    pub peers: Vec<(String, String)>,
}

impl Health {
    /// The state of the link to `peer`, if this node has one.
    pub fn link_to(&self, peer: &str) -> Option<&str> {
        self.peers
            .iter()
            .find(|(name, _)| name == peer)
            .map(|(_, state)| state.as_str())
    }

    /// Healthy with every link up, in a fleet of `nodes` nodes.
    pub fn ready(&self, nodes: usize) -> bool {
        self.ok && self.peers.len() == nodes - 1 && self.peers.iter().all(|(_, s)| s == "up")
    }
}

/// `GET /health` on node `index`; `None` if it does not answer in time.
pub async fn health(index: usize) -> Option<Health> {
    let json = health_json(index).await?;
    let peers = json["fleet"]["peers"]
        .as_array()?
        .iter()
        .map(|peer| {
            (
                peer["node"].as_str().unwrap_or_default().to_owned(),
                peer["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    Some(Health {
        ok: json["status"] == "ok",
        peers,
    })
}

/// The whole `/health` document of node `index`.
pub async fn health_json(index: usize) -> Option<serde_json::Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 9711 + index as u16));
    let body = tokio::time::timeout(HEALTH_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    })
    .await
    .ok()??;
    serde_json::from_str(&body).ok()
}

/// The client address (QUIC, UDP) of node `index` on the host.
pub fn client_addr(index: usize) -> String {
    format!("127.0.0.1:{}", 7711 + index)
}

/// Progress lines of one test, stamped with the seconds since it started.
/// They go through `eprintln!`, which libtest captures: shown with
/// `--nocapture` or when the test fails.
#[derive(Clone, Debug)]
pub struct Log {
    project: String,
    started: Instant,
}

impl Log {
    /// Writes one progress line.
    pub fn line(&self, line: &str) {
        eprintln!(
            "[{:6.1}s {}] {line}",
            self.started.elapsed().as_secs_f64(),
            self.project
        );
    }
}

/// A running compose project of the three nodes; `down -v` when dropped,
/// even when the test panics, after saving the nodes' logs.
pub struct DockerFleet {
    project: String,
    image: &'static str,
    containers: Vec<String>,
    map: FleetMap,
    /// Compose files in use (the growth step adds one).
    files: Vec<PathBuf>,
    /// How many nodes run (4 after [`DockerFleet::grow`]).
    node_count: usize,
    pki: tempfile::TempDir,
    log: Log,
}

impl DockerFleet {
    /// Starts project `bbtest-<name>` and waits until every node is healthy
    /// with every link up.
    pub async fn start(name: &str) -> DockerFleet {
        let image = tokio::task::spawn_blocking(image)
            .await
            .expect("image build task");
        let map = FleetMap::load(&repo_root().join("config/fleet-compose.toml"))
            .expect("config/fleet-compose.toml loads");
        let project = format!("bbtest-{name}");
        let mut fleet = DockerFleet {
            log: Log {
                project: project.clone(),
                started: Instant::now(),
            },
            project,
            image,
            containers: Vec::new(),
            map,
            files: vec![repo_root().join("docker/compose.yaml")],
            node_count: NODES.len(),
            pki: tempfile::tempdir().expect("tempdir"),
        };
        // A previous run killed before its guard ran may have left the project.
        fleet.compose_blocking(&["down", "-v", "-t", "1"]);
        fleet.compose(&["up", "-d"]).await;
        for node in NODES {
            let id = fleet.compose(&["ps", "-q", node]).await;
            fleet.containers.push(id.trim().to_owned());
        }
        let ready = fleet.wait_ready(Duration::from_secs(60)).await;
        fleet.log(&format!("fleet up, all links up after {ready:.1?}"));
        let ca = fleet
            .compose(&[
                "run",
                "--rm",
                "--no-deps",
                "-T",
                "--entrypoint",
                "cat",
                "fleet-pki",
                "/fleet-pki/ca.pem",
            ])
            .await;
        assert!(
            ca.contains("BEGIN CERTIFICATE"),
            "not a CA certificate: {ca}"
        );
        std::fs::write(fleet.ca_path(), ca).expect("write ca.pem");
        fleet
    }

    /// A progress line (see [`Log`]).
    pub fn log(&self, line: &str) {
        self.log.line(line);
    }

    /// The test's progress log, for the traffic to write to.
    pub fn logger(&self) -> Log {
        self.log.clone()
    }

    /// The fleet CA certificate, to trust every node.
    pub fn ca_path(&self) -> PathBuf {
        self.pki.path().join("ca.pem")
    }

    /// The index of the node owning `address`'s mailbox.
    pub fn home_of(&self, address: &Address) -> usize {
        let owner = &self.map.owner(address).name;
        NODES
            .iter()
            .position(|node| node == owner)
            .unwrap_or_else(|| panic!("the map names {owner}, not one of {NODES:?}"))
    }

    fn compose_command(&self, args: &[&str]) -> std::process::Command {
        let program = compose_program();
        let mut command = std::process::Command::new(program[0]);
        command.args(&program[1..]);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command
            .args(["-p", &self.project])
            .args(args)
            .env("BACKBONE_IMAGE", self.image)
            .stdin(std::process::Stdio::null());
        command
    }

    /// Runs a compose command; panics with its output if it fails.
    async fn compose(&self, args: &[&str]) -> String {
        let what = format!("compose {}", args.join(" "));
        run(
            tokio::process::Command::from(self.compose_command(args)),
            &what,
        )
        .await
    }

    /// Runs a compose command from a non-async context; failures are logged.
    fn compose_blocking(&self, args: &[&str]) -> Option<String> {
        match self.compose_command(args).output() {
            Ok(output) if output.status.success() => {
                Some(String::from_utf8_lossy(&output.stdout).into_owned())
            }
            Ok(output) => {
                eprintln!(
                    "compose {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr)
                );
                None
            }
            Err(error) => {
                eprintln!("compose {} did not run: {error}", args.join(" "));
                None
            }
        }
    }

    async fn docker(&self, args: &[&str]) -> String {
        let mut command = tokio::process::Command::new("docker");
        command.args(args).stdin(std::process::Stdio::null());
        run(command, &format!("docker {}", args.join(" "))).await
    }

    /// SIGKILL: the process dies at once, without draining or flushing.
    /// Docker does not restart a container killed on purpose.
    pub async fn kill(&self, index: usize) {
        self.log(&format!("docker kill {}", ALL_NODES[index]));
        self.docker(&["kill", &self.containers[index]]).await;
    }

    /// Starts a stopped node again, on the same data volume.
    pub async fn start_node(&self, index: usize) {
        self.log(&format!("docker start {}", ALL_NODES[index]));
        self.docker(&["start", &self.containers[index]]).await;
    }

    /// A graceful restart: SIGTERM, the broker drains (up to its 10 s
    /// shutdown grace, well inside the 20 s given here) and starts again.
    /// Returns how long `docker restart` took.
    pub async fn restart(&self, index: usize) -> Duration {
        self.log(&format!("docker restart {}", ALL_NODES[index]));
        let started = Instant::now();
        self.docker(&["restart", "-t", "20", &self.containers[index]])
            .await;
        started.elapsed()
    }

    /// The compose network the nodes share (its name depends on the project
    /// and the compose version, so it is read from the container).
    async fn network(&self, index: usize) -> String {
        let networks = self
            .docker(&[
                "inspect",
                "-f",
                "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
                &self.containers[index],
            ])
            .await;
        networks
            .split_whitespace()
            .find(|name| name.ends_with("backbone-fleet"))
            .unwrap_or_else(|| panic!("no backbone-fleet network in {networks:?}"))
            .to_owned()
    }

    /// Cuts node `index` off the fleet network: no peer reaches it, and its
    /// published ports (clients, /health) go too. Returns the network name
    /// for [`DockerFleet::reconnect`].
    pub async fn disconnect(&self, index: usize) -> String {
        let network = self.network(index).await;
        self.log(&format!(
            "docker network disconnect {network} {}",
            ALL_NODES[index]
        ));
        self.docker(&["network", "disconnect", &network, &self.containers[index]])
            .await;
        network
    }

    /// Puts node `index` back on `network`. The service name must be given
    /// as an alias again: `network connect` restores only the container's
    /// own name, and the peers dial `node-x:7701` by service name.
    pub async fn reconnect(&self, index: usize, network: &str) {
        self.log(&format!(
            "docker network connect {network} {}",
            ALL_NODES[index]
        ));
        self.docker(&[
            "network",
            "connect",
            "--alias",
            ALL_NODES[index],
            network,
            &self.containers[index],
        ])
        .await;
    }

    /// Waits until every node answers `/health` with status ok and every
    /// link up; returns how long that took. Panics after `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let mut states = Vec::new();
            for index in 0..self.node_count {
                states.push(health(index).await);
            }
            let nodes = self.node_count;
            if states
                .iter()
                .all(|s| s.as_ref().is_some_and(|h| h.ready(nodes)))
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "fleet not ready after {limit:?}: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every other node reports its link to node `index` up.
    pub async fn others_link_up_to(&self, index: usize) -> bool {
        for other in (0..self.node_count).filter(|&other| other != index) {
            let up = health(other)
                .await
                .is_some_and(|h| h.link_to(ALL_NODES[index]) == Some("up"));
            if !up {
                return false;
            }
        }
        true
    }

    /// The growth step of `docker/compose.grow.yaml`: issues node-d's
    /// certificate from the same CA and starts node-d on the epoch-2 map.
    /// The old nodes keep running the epoch-1 map until [`DockerFleet::recreate`].
    pub async fn grow(&mut self) {
        self.files
            .push(repo_root().join("docker/compose.grow.yaml"));
        self.log("compose run fleet-pki (node-d's certificate)");
        self.compose(&["run", "--rm", "fleet-pki"]).await;
        self.log("compose up node-d (epoch 2)");
        self.compose(&["up", "-d", "--no-deps", "node-d"]).await;
        let id = self.compose(&["ps", "-q", "node-d"]).await;
        self.containers.push(id.trim().to_owned());
        self.node_count = ALL_NODES.len();
        self.map = FleetMap::load(&repo_root().join("config/fleet-compose-grow.toml"))
            .expect("config/fleet-compose-grow.toml loads");
    }

    /// Recreates node `index` with the current compose files (a graceful
    /// stop, then a start on the new configuration); returns how long it took.
    pub async fn recreate(&mut self, index: usize) -> Duration {
        let node = ALL_NODES[index];
        self.log(&format!("compose up {node} (recreated on the current map)"));
        let started = Instant::now();
        self.compose(&["up", "-d", "--no-deps", node]).await;
        let id = self.compose(&["ps", "-q", node]).await;
        self.containers[index] = id.trim().to_owned();
        started.elapsed()
    }

    /// Waits until node `index` answers `/health` with status ok.
    pub async fn wait_healthy(&self, index: usize, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if health(index).await.is_some_and(|h| h.ok) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "{} not healthy after {limit:?}",
                ALL_NODES[index]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node-c reports its handover to node-d done and node-d
    /// imports nothing any more; returns how long that took.
    pub async fn wait_handoff(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let from = health_json(2).await;
            let to = health_json(3).await;
            let done = from
                .as_ref()
                .is_some_and(|h| h["fleet"]["handoffs"][0]["state"] == "done");
            let imported = to.as_ref().is_some_and(|h| {
                h["fleet"]["importing_slots"] == 0
                    && h["fleet"]["handoffs"][0]["state"] == "imported"
            });
            if done && imported {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "handover not done after {limit:?}: node-c {from:?}, node-d {to:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves every node's log under the test's target tmpdir; returns the path.
    fn save_logs(&self) -> Option<PathBuf> {
        let logs = self.compose_blocking(&["logs", "--no-color", "-t"])?;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.log", self.project));
        std::fs::write(&path, logs).ok()?;
        Some(path)
    }
}

impl Drop for DockerFleet {
    fn drop(&mut self) {
        if let Some(path) = self.save_logs() {
            report(&format!(
                "{}: node logs saved to {}",
                self.project,
                path.display()
            ));
        }
        self.compose_blocking(&["down", "-v", "-t", "1"]);
    }
}

/// Runs `command`, returning its stdout; panics with stderr if it fails.
async fn run(mut command: tokio::process::Command, what: &str) -> String {
    let output = command
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
