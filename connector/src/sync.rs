//! The receive loop: every envelope the Backbone pushes is opened, recorded
//! in the local database with its event and webhook deliveries (what
//! arrived together in one transaction), and only then acknowledged to the
//! Backbone. A crash between the commit and the
//! ack means the envelope is pushed again; the database recognises it by
//! its broker message id and records nothing twice.

use std::sync::Arc;
use std::time::Duration;

use backbone_client::{Client, Event};
use backbone_protocol::relationship::Notice;
use futures_util::FutureExt;
use tokio::sync::{Notify, watch};

use crate::api::relationships::record_of;
use crate::content::Content;
use crate::db::{Database, Incoming, NewEvent, NewMessage, UnreadableEnvelope};

/// What the loop needs.
pub struct Receiver {
    /// The connection.
    pub client: Arc<Client>,
    /// The database.
    pub db: Database,
    /// The webhook endpoints' URLs: each event gets a delivery to each.
    pub endpoints: Vec<String>,
    /// Told the newest event's position.
    pub events: watch::Sender<i64>,
    /// Woken when a delivery is queued.
    pub webhooks: Arc<Notify>,
    /// Why receiving is stuck, if it is (`/health` reports it).
    pub stalled: Arc<std::sync::Mutex<Option<String>>>,
}

/// Envelopes recorded in one transaction at most: what has arrived while
/// the previous batch was being committed, so that a burst costs one sync
/// to disk per batch instead of one per envelope.
const BATCH: usize = 128;

impl Receiver {
    /// Receives until `shutdown` turns true or the Backbone ends the
    /// session for good (the identity deleted, the device revoked).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let event = tokio::select! {
                event = self.client.next_event() => event,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let Some(event) = event else {
                let reason = match self.client.status() {
                    backbone_client::Status::Stopped(reason) => reason,
                    other => format!("{other:?}"),
                };
                tracing::error!(%reason, "the Backbone ended this identity's session for good");
                self.set_stalled(Some(format!("the Backbone ended the session: {reason}")));
                return;
            };
            // Whatever else has arrived goes in the same transaction.
            // (`next_event` only waits on a lock and a channel, so polling
            // it once and dropping it loses nothing.)
            let mut events = vec![event];
            while events.len() < BATCH {
                match self.client.next_event().now_or_never() {
                    Some(Some(event)) => events.push(event),
                    _ => break,
                }
            }
            let seq = events.iter().map(seq_of).max().unwrap_or_default();
            let batch: Vec<Incoming> = events.iter().map(|event| self.incoming(event)).collect();
            // Nothing is acknowledged before it is committed: a failing
            // database holds the loop (the Backbone keeps the envelopes).
            let mut attempt = 0u32;
            let position = loop {
                match self
                    .db
                    .record_incoming(batch.clone(), self.endpoints.clone())
                    .await
                {
                    Ok(position) => {
                        if attempt > 0 {
                            self.set_stalled(None);
                        }
                        break position;
                    }
                    Err(error) => {
                        attempt += 1;
                        tracing::error!(%error, seq, attempt, "recording received envelopes");
                        self.set_stalled(Some(format!("recording received envelopes: {error}")));
                        let wait = Duration::from_millis(100 << attempt.min(6));
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            _ = shutdown.wait_for(|stop| *stop) => return,
                        }
                    }
                }
            };
            metrics::histogram!("connector_receive_batch_envelopes").record(batch.len() as f64);
            if let Some(position) = position {
                self.events.send_replace(position);
                self.webhooks.notify_one();
            }
            // One cumulative ack covers the batch: pushes come in sequence
            // order, so every envelope up to `seq` is committed.
            if let Err(error) = self.client.ack(seq).await {
                // The ack goes with the next one (acks are cumulative) or
                // the envelopes come again and are recognised.
                tracing::warn!(%error, seq, "acknowledging to the Backbone");
            }
        }
    }

    fn set_stalled(&self, reason: Option<String>) {
        if let Ok(mut stalled) = self.stalled.lock() {
            *stalled = reason;
        }
    }

    /// What to record of one pushed envelope.
    fn incoming(&self, event: &Event) -> Incoming {
        match event {
            Event::Message(message) => {
                let opened = &message.opened;
                let content = Content::decode(opened.plaintext.clone());
                metrics::counter!("connector_messages_received_total").increment(1);
                Incoming::Message(NewMessage {
                    broker_message_id: hex::encode(message.delivery.message_id.as_bytes()),
                    seq: Some(message.delivery.seq),
                    sender: opened.sender.to_string(),
                    recipients: opened.recipients.iter().map(ToString::to_string).collect(),
                    sent_at_ms: opened.sent_at_ms,
                    stored_at_ms: Some(message.delivery.stored_at_ms),
                    expires_at_ms: Some(message.delivery.expires_at_ms),
                    content_type: content.content_type,
                    content: content.body,
                    attachments: content.attachments,
                })
            }
            Event::Notice(delivery, notice) => {
                let (relationship, reason, intro) = match notice {
                    Notice::Relationship {
                        relationship,
                        intro,
                    } => {
                        let intro = intro.as_ref().map(|intro| {
                            self.client
                                .open_intro(&relationship.peer, &intro.0)
                                .map(|opened| {
                                    String::from_utf8_lossy(&opened.plaintext).into_owned()
                                })
                                .map_err(|error| error.to_string())
                        });
                        (relationship, "changed", intro)
                    }
                    Notice::IdentityDeleted { relationship } => {
                        (relationship, "identity_deleted", None)
                    }
                };
                let record = record_of(relationship);
                let mut data = serde_json::json!({
                    "relationship": record,
                    "reason": reason,
                });
                match intro {
                    Some(Ok(text)) => data["intro"] = text.into(),
                    Some(Err(error)) => data["intro_error"] = error.into(),
                    None => {}
                }
                let event = NewEvent {
                    source: format!("notice:{}", hex::encode(delivery.message_id.as_bytes())),
                    kind: "relationship.changed",
                    peer: record.peer.clone(),
                    data,
                };
                metrics::counter!("connector_notices_received_total").increment(1);
                Incoming::Relationship(record, event)
            }
            Event::Unreadable(delivery, error) => {
                // It will never open; it is kept as it came (and raises an
                // event) before it is acknowledged, like everything else.
                metrics::counter!("connector_unreadable_envelopes_total").increment(1);
                tracing::warn!(seq = delivery.seq, %error, "an envelope could not be opened; kept aside");
                Incoming::Unreadable(UnreadableEnvelope {
                    broker_message_id: hex::encode(delivery.message_id.as_bytes()),
                    seq: delivery.seq,
                    sender: delivery.sender.map(|sender| sender.to_string()),
                    stored_at_ms: delivery.stored_at_ms,
                    envelope: delivery.envelope.to_vec(),
                    error: error.to_string(),
                })
            }
        }
    }
}

fn seq_of(event: &Event) -> u64 {
    match event {
        Event::Message(message) => message.delivery.seq,
        Event::Notice(delivery, _) | Event::Unreadable(delivery, _) => delivery.seq,
    }
}
