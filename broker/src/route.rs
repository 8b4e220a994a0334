//! Storing one accepted envelope for its recipients, wherever they live:
//! locally through the mailbox actors, on other nodes through fleet links.

use std::collections::HashMap;
use std::sync::Arc;

use backbone_protocol::Address;
use backbone_protocol::bytes::{Blob, CapabilityHash, MessageId};
use backbone_protocol::fleet::{Forward, PeerFrame, SealedForward};
use backbone_protocol::frame::{ErrorCode, Failed, Stored};
use bytes::Bytes;
use tracing::warn;

use crate::fleet::Route;
use crate::shared::Shared;
use crate::store::StoredEnvelope;

/// What every recipient's copy of an envelope shares.
#[derive(Clone, Debug)]
pub struct StoreTemplate {
    /// Broker-assigned id.
    pub message_id: MessageId,
    /// The authenticated sender.
    pub sender: Option<Address>,
    /// When the send was accepted.
    pub stored_at_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// The opaque envelope, shared by every recipient's copy.
    pub envelope: Bytes,
}

impl StoreTemplate {
    fn envelope(&self) -> StoredEnvelope {
        StoredEnvelope {
            seq: 0,
            message_id: self.message_id,
            sender: self.sender,
            stored_at_ms: self.stored_at_ms,
            expires_at_ms: self.expires_at_ms,
            envelope: self.envelope.clone(),
        }
    }
}

fn failed(shared: &Shared, address: Address, code: ErrorCode) -> Failed {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Failed {
        address,
        code: code as u16,
        retry_after_ms: code.is_retryable().then(|| shared.fleet.retry_after_ms()),
    }
}

/// Stores the envelope for `recipients` this node owns, each durably, and
/// refuses the others with `ShardUnavailable`: a node never stores for a slot
/// it does not own (a peer routing by another map gets a clear refusal), nor
/// for one still being handed over to it.
pub async fn store_for(
    shared: &Arc<Shared>,
    recipients: Vec<Address>,
    template: &StoreTemplate,
) -> (Vec<Stored>, Vec<Failed>) {
    let mut stored = Vec::with_capacity(recipients.len());
    let mut refused = Vec::new();
    // A `JoinSet` allocates even empty: made only for several recipients.
    let mut tasks = None;
    let mut single = None;
    let local: Vec<Address> = recipients
        .into_iter()
        .filter(|address| match shared.fleet.route(address) {
            Route::Local if !shared.fleet.is_importing(address) => true,
            Route::Local | Route::Remote(_) => {
                refused.push(failed(shared, *address, ErrorCode::ShardUnavailable));
                false
            }
        })
        .collect();
    if let [only] = local[..] {
        single = Some((
            only,
            shared.registry.append(&only, template.envelope()).await,
        ));
    } else {
        let tasks = tasks.insert(tokio::task::JoinSet::new());
        for recipient in local {
            let (shared, envelope) = (shared.clone(), template.envelope());
            tasks.spawn(async move {
                (
                    recipient,
                    shared.registry.append(&recipient, envelope).await,
                )
            });
        }
    }
    let others = match tasks {
        Some(tasks) => tasks.join_all().await,
        None => Vec::new(),
    };
    let outcomes = single.into_iter().chain(others);
    for (address, outcome) in outcomes {
        match outcome {
            Ok(seq) => stored.push(Stored { address, seq }),
            Err(error) => {
                warn!(%error, "append failed");
                refused.push(failed(shared, address, error.code()));
            }
        }
    }
    (stored, refused)
}

/// Stores the envelope for every recipient: local ones here, the others on
/// their owner nodes, all concurrently. Returns once every owner answered
/// (or its link failed or timed out).
pub async fn store_everywhere(
    shared: &Arc<Shared>,
    recipients: Vec<Address>,
    template: StoreTemplate,
) -> (Vec<Stored>, Vec<Failed>) {
    let mut local = Vec::new();
    let mut remote: HashMap<String, Vec<Address>> = HashMap::new();
    for address in recipients {
        match shared.fleet.route(&address) {
            Route::Local => local.push(address),
            Route::Remote(node) => remote.entry(node.name.clone()).or_default().push(address),
        }
    }
    if remote.is_empty() {
        return store_for(shared, local, &template).await;
    }
    let template = Arc::new(template);
    let mut forwards = tokio::task::JoinSet::new();
    for (node, addresses) in remote {
        let (shared, template) = (shared.clone(), template.clone());
        forwards.spawn(async move {
            let frame_recipients = addresses.clone();
            forward(&shared, node, addresses, |request_id| {
                PeerFrame::Forward(Forward {
                    request_id,
                    message_id: template.message_id,
                    sender: template.sender,
                    stored_at_ms: template.stored_at_ms,
                    expires_at_ms: template.expires_at_ms,
                    recipients: frame_recipients,
                    envelope: Blob(template.envelope.clone()),
                })
            })
            .await
        });
    }
    let (mut stored, mut refused) = store_for(shared, local, &template).await;
    for (more_stored, more_failed) in forwards.join_all().await {
        stored.extend(more_stored);
        refused.extend(more_failed);
    }
    (stored, refused)
}

/// Stores a sealed envelope (`template.sender` is `None`) for `recipient`,
/// admitted by the capability whose hash is `capability_hash`: here when
/// this node owns the recipient, else on its owner through a
/// [`SealedForward`]. The owner decides; see [`store_sealed_for`].
pub async fn store_sealed(
    shared: &Arc<Shared>,
    recipient: Address,
    capability_hash: CapabilityHash,
    template: StoreTemplate,
) -> (Vec<Stored>, Vec<Failed>) {
    match shared.fleet.route(&recipient) {
        Route::Local => store_sealed_for(shared, recipient, &capability_hash, &template).await,
        Route::Remote(node) => {
            let node = node.name.clone();
            forward(shared, node, vec![recipient], |request_id| {
                PeerFrame::SealedForward(SealedForward {
                    request_id,
                    message_id: template.message_id,
                    stored_at_ms: template.stored_at_ms,
                    expires_at_ms: template.expires_at_ms,
                    recipient,
                    capability_hash,
                    envelope: Blob(template.envelope.clone()),
                })
            })
            .await
        }
    }
}

/// The owner's side of a sealed send: refuses a recipient this node does not
/// serve (`ShardUnavailable`), a capability hash the recipient has not
/// registered (`UnknownCapability`, also after a revocation) and a capability
/// over its rate (`RateLimited` with a retry-after), then stores like any
/// other envelope. The capability is checked before the rate limit, so
/// unknown hashes never take room in the limiter.
pub async fn store_sealed_for(
    shared: &Arc<Shared>,
    recipient: Address,
    capability_hash: &CapabilityHash,
    template: &StoreTemplate,
) -> (Vec<Stored>, Vec<Failed>) {
    let refuse = |failure: Failed| (Vec::new(), vec![failure]);
    if !matches!(shared.fleet.route(&recipient), Route::Local)
        || shared.fleet.is_importing(&recipient)
    {
        // A slot being imported may not have its capability hashes yet.
        return refuse(failed(shared, recipient, ErrorCode::ShardUnavailable));
    }
    let store = shared.directory.clone();
    let hash = *capability_hash;
    // A deleted identity's capabilities are gone with it; its sender learns
    // why, as a plain send's would.
    let known = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        if store.has_capability(&recipient, &hash)? {
            return Ok(Ok(()));
        }
        let deleted = store
            .deletion(&recipient)?
            .is_some_and(|deletion| deletion.is_tombstone());
        Ok(Err(if deleted {
            ErrorCode::IdentityDeleted
        } else {
            ErrorCode::UnknownCapability
        }))
    })
    .await;
    match known {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(code))) => {
            metrics::counter!("backbone_sealed_refused_total", "reason" => "unknown_capability")
                .increment(1);
            return refuse(failed(shared, recipient, code));
        }
        Ok(Err(error)) => {
            warn!(%error, "capability lookup failed");
            return refuse(failed(shared, recipient, ErrorCode::StorageFailure));
        }
        Err(_) => return refuse(failed(shared, recipient, ErrorCode::Internal)),
    }
    if let Some(limiter) = &shared.sealed_limiter
        && let Err(not_until) = limiter.check_key(capability_hash)
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
        metrics::counter!("backbone_errors_total", "code" => ErrorCode::RateLimited.name())
            .increment(1);
        metrics::counter!("backbone_sealed_refused_total", "reason" => "capability_rate")
            .increment(1);
        return refuse(Failed {
            address: recipient,
            code: ErrorCode::RateLimited as u16,
            retry_after_ms: Some(wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32),
        });
    }
    let (stored, refused) = store_for(shared, vec![recipient], template).await;
    metrics::counter!("backbone_sealed_envelopes_stored_total").increment(stored.len() as u64);
    (stored, refused)
}

async fn forward(
    shared: &Arc<Shared>,
    node: String,
    recipients: Vec<Address>,
    build: impl FnOnce(u64) -> PeerFrame,
) -> (Vec<Stored>, Vec<Failed>) {
    let Some(links) = shared.fleet.links() else {
        let refused = recipients
            .into_iter()
            .map(|address| failed(shared, address, ErrorCode::ShardUnavailable))
            .collect();
        return (Vec::new(), refused);
    };
    metrics::counter!("backbone_fleet_forwards_sent_total", "peer" => node.clone()).increment(1);
    let started = std::time::Instant::now();
    let answer = links.request(&node, build).await;
    metrics::histogram!("backbone_fleet_forward_seconds", "peer" => node.clone())
        .record(started.elapsed().as_secs_f64());
    match answer {
        Ok(PeerFrame::ForwardAck(ack)) => {
            // Only recipients that were asked for count; anything else the
            // peer claims is ignored, and a recipient it does not mention failed.
            let mut stored = Vec::new();
            let mut refused = Vec::new();
            for address in recipients {
                if let Some(s) = ack.stored.iter().find(|s| s.address == address) {
                    stored.push(*s);
                } else if let Some(f) = ack.failed.iter().find(|f| f.address == address) {
                    refused.push(*f);
                } else {
                    refused.push(failed(shared, address, ErrorCode::Internal));
                }
            }
            (stored, refused)
        }
        Ok(_) => {
            warn!(peer = %node, "peer answered a forward with the wrong frame");
            let refused = recipients
                .into_iter()
                .map(|address| failed(shared, address, ErrorCode::Internal))
                .collect();
            (Vec::new(), refused)
        }
        Err(error) => {
            warn!(%error, "forward failed");
            let refused = recipients
                .into_iter()
                .map(|address| failed(shared, address, ErrorCode::ShardUnavailable))
                .collect();
            (Vec::new(), refused)
        }
    }
}
