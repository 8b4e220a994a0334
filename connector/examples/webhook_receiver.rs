//! A small webhook receiver, for trying the Connector's webhooks out: it
//! checks each delivery's `Backbone-Signature` with
//! [`backbone_connector::webhook::verify`], logs the event, and keeps the
//! last [`KEPT`] accepted deliveries for `GET /events`. The Connector image
//! ships it as `backbone-webhook-receiver`, and
//! `docker/compose.connector.yaml` runs it next to two Connectors.
//!
//! ```text
//! WEBHOOK_RECEIVER_SECRET='at least 16 characters of secret' \
//!     cargo run -p backbone-connector --example webhook_receiver -- --listen 127.0.0.1:8090
//! ```
//!
//! with the Connector's `[[webhooks.endpoints]]` at
//! `url = "http://127.0.0.1:8090/hook"` and the same secret.
//!
//! - `POST /hook`: a delivery. 204 when the signature verifies, 401 (and
//!   counted in `rejected`) when it does not, so the Connector retries.
//! - `GET /events`: `{ "events": [...], "rejected": n }`, oldest first;
//!   each event holds its `Backbone-Event-Id`, `Backbone-Signature`, the
//!   body exactly as received (`body`) and parsed (`event`).
//! - `GET /health`: 200, for the container's health check.
//!
//! It is an example, not a product: events live in memory only, retries of
//! one event are all kept, and `GET /events` asks for no key.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::Serialize;

/// Deliveries kept for `GET /events`; older ones are dropped, so that a
/// receiver left running does not grow without bound.
const KEPT: usize = 1000;

/// How far a delivery's timestamp may be from this machine's clock. It is
/// what guards against a captured delivery being replayed later.
const TOLERANCE: Duration = Duration::from_secs(300);

/// Receives the Connector's webhooks, checks their signatures and lists
/// them at GET /events.
#[derive(Parser)]
struct Args {
    /// Where to listen for deliveries and requests.
    #[arg(
        long,
        env = "WEBHOOK_RECEIVER_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    listen: SocketAddr,
    /// The endpoint's shared secret, as in the Connector's
    /// `[[webhooks.endpoints]]` (taken from the environment, so that it
    /// does not show in the process list).
    #[arg(long, env = "WEBHOOK_RECEIVER_SECRET", hide_env_values = true)]
    secret: String,
}

/// One accepted delivery.
#[derive(Clone, Serialize)]
struct Delivery {
    event_id: String,
    signature: String,
    /// The body as received, which is what the signature covers.
    body: String,
    /// The body parsed, for reading.
    event: serde_json::Value,
}

#[derive(Default, Serialize)]
struct Received {
    events: VecDeque<Delivery>,
    rejected: u64,
}

struct Receiver {
    secret: String,
    received: Mutex<Received>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let receiver = Arc::new(Receiver {
        secret: args.secret,
        received: Mutex::new(Received::default()),
    });
    let app = Router::new()
        .route("/hook", post(receive))
        .route("/events", get(events))
        .route("/health", get(|| async { StatusCode::OK }))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "receiving webhooks at POST /hook");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let signature = header("backbone-signature");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut received = receiver.received.lock().expect("not poisoned");
    if !backbone_connector::webhook::verify(&receiver.secret, &signature, &body, now, TOLERANCE) {
        received.rejected += 1;
        tracing::warn!(%signature, "rejected a delivery: the signature does not verify");
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        tracing::warn!("rejected a signed delivery whose body is not JSON");
        return StatusCode::BAD_REQUEST;
    };
    let event_id = header("backbone-event-id");
    tracing::info!(%event_id, kind = %event["kind"], peer = %event["peer"], "received");
    if received.events.len() == KEPT {
        received.events.pop_front();
    }
    received.events.push_back(Delivery {
        event_id,
        signature,
        body: String::from_utf8_lossy(&body).into_owned(),
        event,
    });
    StatusCode::NO_CONTENT
}

async fn events(State(receiver): State<Arc<Receiver>>) -> Json<serde_json::Value> {
    let received = receiver.received.lock().expect("not poisoned");
    Json(serde_json::to_value(&*received).expect("plain JSON values"))
}

/// SIGINT or SIGTERM. In a container the receiver is process 1, which the
/// kernel sends no default-action signals to, so without this `docker
/// stop` would wait for its timeout and then kill it.
async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
