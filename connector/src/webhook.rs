//! Webhooks: events POSTed to each configured endpoint from the durable
//! outbox (`webhook_deliveries`), signed, retried with exponential backoff
//! and jitter up to `webhooks.max_age`, at least once and in order per peer.
//!
//! Each delivery is the body of an [`EventRecord`] as JSON with three
//! headers:
//! - `Backbone-Event-Id`: the event's id, the same in every retry, for
//!   deduplication;
//! - `Backbone-Timestamp`: Unix seconds of this attempt;
//! - `Backbone-Signature`: `t=<timestamp>,v1=<hex HMAC-SHA256>` of
//!   `"<timestamp>.<body>"` under the endpoint's secret, as Stripe signs
//!   its webhooks; [`verify`] checks one.
//!
//! For each endpoint and peer, only the oldest pending delivery is
//! attempted, so a receiver sees one peer's events in order; deliveries to
//! different peers or endpoints go in parallel. A delivery older than
//! `max_age` that still fails is marked failed and the next one for its
//! peer goes ahead; failed ones are listed and retried through the API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::{WebhookConfig, WebhookEndpoint};
use crate::db::{Database, DueDelivery, EventRecord};

/// Deliveries attempted at once.
const PARALLEL: usize = 16;

/// The signature header's value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `header` (a `Backbone-Signature` value) signs `body` under
/// `secret` with a timestamp within `tolerance` of `now_secs`. The
/// comparison is constant-time.
pub fn verify(secret: &str, header: &str, body: &[u8], now_secs: u64, tolerance: Duration) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => signatures.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return false;
    };
    if now_secs.abs_diff(timestamp) > tolerance.as_secs() {
        return false;
    }
    signatures
        .iter()
        .any(|signature| mac(secret, timestamp, body).verify_slice(signature).is_ok())
}

/// HMAC-SHA256 under `secret`, fed `"<timestamp>.<body>"`: what `v1` signs.
fn mac(secret: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The delay before attempt `attempts + 1`: `initial · 2^attempts`, capped
/// at `max`, times a jitter of 50–100 % so that retries of many deliveries
/// spread out.
pub fn backoff(config: &WebhookConfig, attempts: u32) -> Duration {
    let exponential = config
        .initial_backoff
        .saturating_mul(1u32 << attempts.min(20))
        .min(config.max_backoff);
    exponential.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// The outbox's worker.
pub struct Worker {
    db: Database,
    config: Arc<WebhookConfig>,
    http: reqwest::Client,
    wake: Arc<Notify>,
}

/// How one attempt ended, for the scheduler: whether its outcome could be
/// written down (if not, the scheduler pauses instead of attempting the
/// delivery again at once).
struct Attempted {
    recorded: bool,
}

impl Worker {
    /// A worker for `config`'s endpoints, woken by `wake` when deliveries are queued.
    pub fn new(db: Database, config: WebhookConfig, wake: Arc<Notify>) -> anyhow::Result<Self> {
        // reqwest takes rustls's process-wide provider; ring is the one this
        // workspace builds (aws-lc-rs needs cmake). Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("backbone-connector/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            db,
            config: Arc::new(config),
            http,
            wake,
        })
    }

    /// Delivers until `shutdown` turns true.
    ///
    /// Up to [`PARALLEL`] attempts run at once, at most one per endpoint and
    /// peer (the head of that queue); a slow endpoint holds up only its own
    /// queues. Attempts cut short by the shutdown are made again after the
    /// restart (at least once).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let urls: Vec<String> = self
            .config
            .endpoints
            .iter()
            .map(|endpoint| endpoint.url.clone())
            .collect();
        match self.db.fail_unconfigured(urls.clone()).await {
            Ok(0) => {}
            Ok(count) => tracing::warn!(
                count,
                "webhook deliveries to endpoints no longer configured are marked failed"
            ),
            Err(error) => tracing::error!(%error, "failing deliveries to removed endpoints"),
        }
        if urls.is_empty() {
            return;
        }
        let mut in_flight: JoinSet<Attempted> = JoinSet::new();
        // The queues (endpoint, peer) with an attempt in flight, with the
        // delivery's id, and the attempts' tasks with their queue.
        let mut busy: HashMap<(String, String), i64> = HashMap::new();
        let mut tasks: HashMap<tokio::task::Id, (String, String)> = HashMap::new();
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                pause = Duration::ZERO;
            }
            let now = backbone_protocol::unix_millis_now();
            if in_flight.len() < PARALLEL {
                match self.db.due_deliveries(urls.clone(), now, 256).await {
                    Ok(due) => {
                        for due in due {
                            if in_flight.len() >= PARALLEL {
                                break;
                            }
                            let queue = (due.delivery.endpoint.clone(), due.delivery.peer.clone());
                            if busy.contains_key(&queue) {
                                continue;
                            }
                            busy.insert(queue.clone(), due.delivery.id);
                            let task = in_flight.spawn(attempt(
                                self.db.clone(),
                                self.config.clone(),
                                self.http.clone(),
                                due,
                            ));
                            tasks.insert(task.id(), queue);
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "reading the webhook outbox");
                        pause = Duration::from_secs(1);
                        continue;
                    }
                }
            }
            let busy_ids: Vec<i64> = busy.values().copied().collect();
            let wait = match self.db.next_due_ms(urls.clone(), busy_ids).await {
                Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now)),
                Ok(None) => Duration::from_secs(60),
                Err(error) => {
                    tracing::error!(%error, "reading the webhook outbox");
                    Duration::from_secs(1)
                }
            };
            // Below a millisecond the next one is due already: with the
            // queue full, wait for an attempt to end instead.
            let timer = if wait.is_zero() && in_flight.len() < PARALLEL {
                Duration::ZERO
            } else {
                wait.max(Duration::from_millis(1))
            };
            tokio::select! {
                Some(ended) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let (task, recorded) = match ended {
                        Ok((task, attempted)) => (task, attempted.recorded),
                        Err(error) => {
                            tracing::error!(%error, "a webhook attempt failed to run");
                            (error.id(), false)
                        }
                    };
                    if let Some(queue) = tasks.remove(&task) {
                        busy.remove(&queue);
                    }
                    if !recorded {
                        pause = Duration::from_secs(1);
                    }
                }
                () = tokio::time::sleep(timer) => {}
                () = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => {
                    in_flight.abort_all();
                    return;
                }
            }
        }
    }
}

/// One attempt of one delivery; its outcome is recorded.
async fn attempt(
    db: Database,
    config: Arc<WebhookConfig>,
    http: reqwest::Client,
    due: DueDelivery,
) -> Attempted {
    let id = due.delivery.id;
    let Some(endpoint) = config
        .endpoints
        .iter()
        .find(|endpoint| endpoint.url == due.delivery.endpoint)
    else {
        return Attempted { recorded: true };
    };
    let started = std::time::Instant::now();
    let outcome = post(&http, endpoint, &due.event).await;
    metrics::histogram!("connector_webhook_seconds").record(started.elapsed().as_secs_f64());
    let recorded = match outcome {
        Ok(()) => {
            metrics::counter!("connector_webhook_deliveries_total", "outcome" => "delivered")
                .increment(1);
            db.delivery_succeeded(id).await
        }
        Err(error) => {
            let now = backbone_protocol::unix_millis_now();
            let age = Duration::from_millis(now.saturating_sub(due.delivery.created_at_ms));
            let retry_at = (age < config.max_age)
                .then(|| now + backoff(&config, due.delivery.attempts).as_millis() as u64);
            let outcome = if retry_at.is_some() {
                "retry"
            } else {
                "failed"
            };
            metrics::counter!("connector_webhook_deliveries_total", "outcome" => outcome)
                .increment(1);
            tracing::warn!(
                delivery = id,
                attempts = due.delivery.attempts + 1,
                %error,
                gave_up = retry_at.is_none(),
                "webhook delivery failed"
            );
            db.delivery_attempt_failed(id, error, retry_at).await
        }
    };
    if let Err(error) = &recorded {
        tracing::error!(%error, delivery = id, "recording a webhook delivery's outcome");
    }
    Attempted {
        recorded: recorded.is_ok(),
    }
}

/// POSTs `event` to `endpoint`; any 2xx is a success.
async fn post(
    http: &reqwest::Client,
    endpoint: &WebhookEndpoint,
    event: &EventRecord,
) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|error| error.to_string())?;
    let timestamp = backbone_protocol::unix_millis_now() / 1000;
    let response = http
        .post(&endpoint.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Backbone-Event-Id", &event.event_id)
        .header("Backbone-Timestamp", timestamp.to_string())
        .header(
            "Backbone-Signature",
            sign(&endpoint.secret, timestamp, &body),
        )
        .body(body)
        .send()
        .await
        // Without the URL, which may carry credentials and goes to the log.
        .map_err(|error| error.without_url().to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the endpoint answered {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_secret_or_old_timestamp_does_not() {
        let secret = "0123456789abcdef";
        let header = sign(secret, 1_000, b"{\"a\":1}");
        let tolerance = Duration::from_secs(300);
        assert!(verify(secret, &header, b"{\"a\":1}", 1_010, tolerance));
        assert!(!verify(secret, &header, b"{\"a\":2}", 1_010, tolerance));
        assert!(!verify(
            "another secret!!",
            &header,
            b"{\"a\":1}",
            1_010,
            tolerance
        ));
        assert!(!verify(secret, &header, b"{\"a\":1}", 2_000, tolerance));
        assert!(!verify(secret, "v1=00", b"{\"a\":1}", 1_000, tolerance));
        // A known vector, so receivers in other languages can check theirs:
        // HMAC-SHA256("0123456789abcdef", "1000.{\"a\":1}").
        assert_eq!(
            header,
            "t=1000,v1=184364ed94b589380b6a72a5c787edc953ea07f51731c4873f8d46afe77c80c5"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = WebhookConfig {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            ..WebhookConfig::default()
        };
        for attempts in 0..30 {
            let delay = backoff(&config, attempts);
            let full = Duration::from_secs(1u64 << attempts.min(20)).min(config.max_backoff);
            assert!(delay >= full / 2 && delay <= full, "{attempts}: {delay:?}");
        }
    }
}
