//! `Send` and `SealedSend`: the envelope checks, then [`crate::route`]
//! stores a copy on each recipient's owner node; and the forwarded copies
//! another node relays to this one, the owner of their recipients.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use backbone_protocol::bytes::MessageId;
use backbone_protocol::fleet::{Forward, ForwardAck, PeerFrame, SealedForward};
use backbone_protocol::frame::{ErrorCode, SealedSend, Send, SendAck};
use backbone_protocol::{Address, Frame};
use bytes::Bytes;

use super::{error_frame, relationships};
use crate::route::{StoreTemplate, store_everywhere, store_for, store_sealed, store_sealed_for};
use crate::shared::Shared;

/// Counts the envelope copies a `Send` or `SealedSend` answer refuses, by
/// code: the whole request once when it is refused, else each recipient
/// listed as failed.
pub(crate) fn count_refused_copies(kind: &'static str, answer: &Frame) {
    let count = |code: u16| {
        let code = ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name);
        metrics::counter!("backbone_sends_refused_total", "kind" => kind, "code" => code)
            .increment(1);
    };
    match answer {
        Frame::Error(error) => count(error.code),
        Frame::SendAck(ack) => ack.failed.iter().for_each(|failed| count(failed.code)),
        _ => {}
    }
}

/// A send of the authenticated identity `sender`; its copy rate was
/// checked by [`super::gate`].
pub async fn send(shared: &Arc<Shared>, sender: Address, send: Send) -> Frame {
    let limits = &shared.config.limits;
    let id = send.request_id;
    if send.recipients.is_empty() || send.recipients.len() > limits.max_recipients {
        return error_frame(
            id,
            ErrorCode::InvalidRecipients,
            format!("between 1 and {} recipients", limits.max_recipients),
        );
    }
    let unique: HashSet<_> = send.recipients.iter().collect();
    if unique.len() != send.recipients.len() {
        return error_frame(id, ErrorCode::InvalidRecipients, "duplicate recipient");
    }
    if let Some(refusal) = envelope_refusal(shared, id, &send.envelope.0, send.ttl_secs) {
        return refusal;
    }
    let template = template(shared, Some(sender), send.ttl_secs, send.envelope.0);
    let message_id = template.message_id;
    let (stored, failed) = store_everywhere(shared, send.recipients, template).await;
    Frame::SendAck(SendAck {
        request_id: id,
        message_id,
        stored,
        failed,
    })
}

/// A sealed send: the same envelope and TTL checks as [`send`], then
/// [`store_sealed`], which checks the capability on the recipient's owner
/// node. A refused capability or a capability over its rate is a
/// per-recipient failure in the `SendAck` (that is how the owner node
/// reports it), not an `Error` frame.
pub async fn sealed(shared: &Arc<Shared>, send: SealedSend) -> Frame {
    let started = Instant::now();
    let id = send.request_id;
    let answer = match envelope_refusal(shared, id, &send.envelope.0, send.ttl_secs) {
        Some(refusal) => refusal,
        None => {
            // The point of a sealed send: the broker stores no sender.
            let template = template(shared, None, send.ttl_secs, send.envelope.0);
            let message_id = template.message_id;
            let (stored, failed) =
                store_sealed(shared, send.recipient, send.capability.hash(), template).await;
            metrics::counter!("backbone_envelopes_accepted_total").increment(stored.len() as u64);
            Frame::SendAck(SendAck {
                request_id: id,
                message_id,
                stored,
                failed,
            })
        }
    };
    metrics::histogram!("backbone_send_seconds", "kind" => "sealed")
        .record(started.elapsed().as_secs_f64());
    count_refused_copies("sealed", &answer);
    answer
}

/// The refusal of an envelope too large, a TTL of 0, or an envelope in the
/// form reserved for relationship introductions.
fn envelope_refusal(shared: &Shared, id: u64, envelope: &[u8], ttl_secs: u32) -> Option<Frame> {
    let limits = &shared.config.limits;
    if envelope.len() as u64 > limits.max_envelope_size.as_u64() {
        return Some(error_frame(
            id,
            ErrorCode::EnvelopeTooLarge,
            format!("envelope exceeds {}", limits.max_envelope_size),
        ));
    }
    if ttl_secs == 0 {
        return Some(error_frame(
            id,
            ErrorCode::InvalidTtl,
            "ttl must be at least one second",
        ));
    }
    if backbone_protocol::relationship::is_reserved(envelope) {
        let (code, message) = relationships::reserved();
        return Some(error_frame(id, code, message));
    }
    None
}

/// What every copy of an accepted envelope shares: a new message id, the
/// times (the TTL capped at `limits.max_ttl`) and the sender, if known.
fn template(
    shared: &Shared,
    sender: Option<Address>,
    ttl_secs: u32,
    envelope: Bytes,
) -> StoreTemplate {
    let max_ttl_ms = shared.config.limits.max_ttl.as_millis() as u64;
    let ttl_ms = (u64::from(ttl_secs) * 1000).min(max_ttl_ms);
    let stored_at_ms = (shared.clock)();
    StoreTemplate {
        message_id: MessageId::random(),
        sender,
        stored_at_ms,
        expires_at_ms: stored_at_ms + ttl_ms,
        envelope,
    }
}

/// Copies of a send another node accepted, for recipients this node owns.
pub async fn forwarded(shared: &Arc<Shared>, forward: Forward) -> PeerFrame {
    metrics::counter!("backbone_fleet_forwards_received_total").increment(1);
    let template = StoreTemplate {
        message_id: forward.message_id,
        sender: forward.sender,
        stored_at_ms: forward.stored_at_ms,
        expires_at_ms: forward.expires_at_ms,
        envelope: forward.envelope.0,
    };
    let (stored, failed) = store_for(shared, forward.recipients, &template).await;
    PeerFrame::ForwardAck(ForwardAck {
        request_id: forward.request_id,
        stored,
        failed,
    })
}

/// A sealed send another node accepted, for a recipient this node owns:
/// the capability and its rate are checked here.
pub async fn sealed_forwarded(shared: &Arc<Shared>, forward: SealedForward) -> PeerFrame {
    metrics::counter!("backbone_fleet_forwards_received_total").increment(1);
    let template = StoreTemplate {
        message_id: forward.message_id,
        sender: None,
        stored_at_ms: forward.stored_at_ms,
        expires_at_ms: forward.expires_at_ms,
        envelope: forward.envelope.0,
    };
    let (stored, failed) = store_sealed_for(
        shared,
        forward.recipient,
        &forward.capability_hash,
        &template,
    )
    .await;
    PeerFrame::ForwardAck(ForwardAck {
        request_id: forward.request_id,
        stored,
        failed,
    })
}
