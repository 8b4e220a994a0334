//! What the Connector's end-to-end tests share: a broker on loopback,
//! Connector processes made with `init` and run with `serve`, an API
//! client, and a webhook receiver that checks signatures and can be told to
//! fail.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A broker on loopback with a throw-away data dir.
pub struct Broker {
    pub broker: backbone_broker::Broker,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub async fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = backbone_broker::Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.server.data_dir = dir.path().to_owned();
        config.server.shutdown_grace = Duration::from_secs(2);
        config.metrics.listen = None;
        let broker = backbone_broker::Broker::start(config, Default::default())
            .await
            .expect("the broker starts");
        Broker { broker, _dir: dir }
    }
}

/// A webhook receiver on loopback.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub secret: String,
    state: Arc<ReceiverState>,
}

struct ReceiverState {
    secret: String,
    failing: AtomicBool,
    /// Every request accepted: (event id header, body as JSON).
    received: Mutex<Vec<(String, Value)>>,
    /// Requests whose signature did not verify.
    bad_signatures: Mutex<u32>,
    /// Requests answered 503 while failing.
    refused: Mutex<u32>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let secret = "test webhook secret 0123456789".to_owned();
        let state = Arc::new(ReceiverState {
            secret: secret.clone(),
            failing: AtomicBool::new(false),
            received: Mutex::new(Vec::new()),
            bad_signatures: Mutex::new(0),
            refused: Mutex::new(0),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            secret,
            state,
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<(String, Value)> {
        self.state.received.lock().expect("lock").clone()
    }

    pub fn refused(&self) -> u32 {
        *self.state.refused.lock().expect("lock")
    }

    pub fn bad_signatures(&self) -> u32 {
        *self.state.bad_signatures.lock().expect("lock")
    }

    /// The distinct events received, by event id, in order of first receipt.
    pub fn distinct(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        self.received()
            .into_iter()
            .filter(|(id, _)| seen.insert(id.clone()))
            .map(|(_, body)| body)
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    if state.failing.load(Ordering::SeqCst) {
        *state.refused.lock().expect("lock") += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let now = backbone_protocol::unix_millis_now() / 1000;
    if !backbone_connector::webhook::verify(
        &state.secret,
        &header("backbone-signature"),
        &body,
        now,
        Duration::from_secs(300),
    ) {
        *state.bad_signatures.lock().expect("lock") += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let json: Value = serde_json::from_slice(&body).expect("a JSON event");
    assert_eq!(json["event_id"], header("backbone-event-id"));
    state
        .received
        .lock()
        .expect("lock")
        .push((header("backbone-event-id"), json));
    StatusCode::NO_CONTENT
}

/// A Connector process and its API.
pub struct Connector {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub api: Api,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Connector {
    /// `init`s a Connector for `broker` and starts it with `env` overrides
    /// (webhooks, backoff).
    pub async fn start(broker: &Broker, env: &[(&str, String)]) -> Connector {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let config = dir.path().join("connector.toml");
        let output = Command::new(env!("CARGO_BIN_EXE_backbone-connector"))
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .arg("--server")
            .arg(broker.broker.quic_addr.to_string())
            .arg("--ca")
            .arg(&broker.broker.cert_path)
            .output()
            .expect("run init");
        assert!(
            output.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let key = String::from_utf8(output.stdout)
            .expect("utf-8")
            .trim()
            .to_owned();
        let port = free_port();
        let mut all_env = vec![(
            "BACKBONE_CONNECTOR__API__LISTEN".to_owned(),
            format!("127.0.0.1:{port}"),
        )];
        all_env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let api = Api::new(format!("http://127.0.0.1:{port}"), key);
        let log = dir.path().join("connector.log");
        let mut connector = Connector {
            dir,
            config,
            api,
            env: all_env,
            child: None,
            log,
        };
        connector.spawn().await;
        connector
    }

    /// Starts the process (again) and waits until it is connected.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_backbone-connector"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(response) = self.api.http.get(self.api.url("/health")).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Connector did not become healthy; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process (SIGKILL: no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn address(&self) -> String {
        let identity = self.api.get("/api/v1/identity").await;
        identity["address"].as_str().expect("address").to_owned()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The REST API with a key.
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: String, key: String) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            base,
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.key)
    }

    /// A GET that must answer 200 with JSON.
    pub async fn get(&self, path: &str) -> Value {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// A POST of JSON; the status and the answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    /// A POST that must answer `expected`.
    pub async fn post_ok(&self, path: &str, body: &Value, expected: u16) -> Value {
        let (status, json) = self.post(path, body).await;
        assert_eq!(status, expected, "POST {path}: {json}");
        json
    }

    /// The messages listed with `query`, all pages.
    pub async fn messages(&self, query: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get(&format!("/api/v1/messages?{query}&limit=50&after={after}"))
                .await;
            all.extend(
                page["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .cloned(),
            );
            match page["next_after"].as_i64() {
                Some(next) => after = next,
                None => return all,
            }
        }
    }
}

/// Waits until `check` returns `Some`, or fails with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
