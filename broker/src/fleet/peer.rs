//! The node-to-node listener: accepts links from peers that present a fleet
//! certificate, checks that they route by the same fleet map, and serves
//! forwarded sends (sealed ones included, with their capability check),
//! card lookups and token fetches for the slots this node owns.

use std::sync::Arc;
use std::time::Duration;

use backbone_protocol::bytes::Text;
use backbone_protocol::fleet::{
    HandoffAck, ImportFile, MailboxTransfer, PeerFrame, PeerHello, PeerRefuse, slot_of,
};
use backbone_protocol::frame::ErrorCode;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

use super::handoff::to_export;
use super::link::{PeerReader, encode_peer_logged};
use crate::shared::Shared;
use crate::store::{FileQuota, StoredFile};
use crate::wire::spawn_writer_with;

/// Requests one peer link may have in progress.
const PEER_INFLIGHT: usize = 4096;

/// Accepts peer connections until shutdown, then waits for the links being
/// served to finish their requests (they hold the store).
pub async fn serve(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let mut shutdown = shared.shutdown.clone();
    let mut links = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => break,
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let shared = shared.clone();
        links.spawn(
            async move {
                match incoming.await {
                    Ok(connection) => serve_peer(shared, connection).await,
                    Err(error) => debug!(%error, "peer handshake failed"),
                }
            }
            .instrument(info_span!("peer", %remote)),
        );
    }
    let grace = shared.config.server.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, async { while links.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("peer links still busy after the grace period; aborting them");
        links.abort_all();
        while links.join_next().await.is_some() {}
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
}

/// Checks that the peer's certificate (already verified against the fleet
/// CA by TLS) names the node it claims to be, so one node cannot act for another.
fn certified_name(connection: &quinn::Connection, node: &str) -> Result<(), String> {
    let chain = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "the peer presented no certificate".to_owned())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the peer presented no certificate".to_owned())?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|error| format!("unreadable peer certificate: {error:?}"))?;
    let name =
        ServerName::try_from(node).map_err(|_| format!("{node:?} is not a valid node name"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the peer's certificate does not name node {node}"))
}

fn refusal(shared: &Shared, hello: &PeerHello) -> Option<String> {
    let map = shared.fleet.map();
    if map.node(&hello.node.0).is_none() {
        return Some(format!(
            "node {} is not in this node's fleet map",
            hello.node.0
        ));
    }
    if hello.epoch != map.epoch() || hello.map_digest != map.digest() {
        return Some(format!(
            "fleet map mismatch: {} routes by epoch {} (digest {}), {} by epoch {} (digest {}); \
             load the same fleet file on both nodes",
            hello.node.0,
            hello.epoch,
            hex::encode(&hello.map_digest[..8]),
            shared.fleet.local_name(),
            map.epoch(),
            hex::encode(&map.digest()[..8]),
        ));
    }
    None
}

async fn serve_peer(shared: Arc<Shared>, connection: quinn::Connection) {
    let Ok(Ok((send, recv))) =
        tokio::time::timeout(Duration::from_secs(5), connection.accept_bi()).await
    else {
        return;
    };
    // Peers are authenticated fleet nodes; handover batches exceed the client frame limit.
    let mut reader = PeerReader::new(recv, backbone_protocol::codec::MAX_FRAME_LEN);
    let (out, rx) = mpsc::channel::<PeerFrame>(PEER_INFLIGHT);
    let writer = spawn_writer_with(send, rx, encode_peer_logged);
    let hello = match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
        Ok(Ok(PeerFrame::Hello(hello))) => hello,
        _ => return connection.close(quinn::VarInt::from_u32(1), b"expected hello"),
    };
    let reason = match certified_name(&connection, &hello.node.0) {
        Ok(()) => refusal(&shared, &hello),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = reason {
        warn!(%reason, "refusing a fleet link");
        let _ = out
            .send(PeerFrame::Refuse(PeerRefuse {
                reason: Text(reason),
            }))
            .await;
        drop(out);
        // Let the refusal reach the peer before the connection goes.
        let _ = writer.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
        return;
    }
    let map = shared.fleet.map();
    let welcome = PeerHello {
        node: Text(shared.fleet.local_name().to_owned()),
        epoch: map.epoch(),
        map_digest: map.digest(),
    };
    if out.send(PeerFrame::Welcome(welcome)).await.is_err() {
        return;
    }
    let permits = Arc::new(Semaphore::new(PEER_INFLIGHT));
    let mut shutdown = shared.shutdown.clone();
    loop {
        let frame = tokio::select! {
            frame = reader.next() => frame,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                debug!(%error, peer = %hello.node.0, "peer link ended");
                break;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (shared, out, peer) = (shared.clone(), out.clone(), hello.node.0.clone());
        tokio::spawn(
            async move {
                if let Some(answer) = answer(&shared, &peer, frame).await {
                    let _ = out.send(answer).await;
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
    // Finish what is in progress (bounded), then close.
    let _ = tokio::time::timeout(
        shared.config.server.shutdown_grace,
        permits.acquire_many(PEER_INFLIGHT as u32),
    )
    .await;
    drop(out);
    let _ = writer.await;
}

/// The answer to one frame of a peer link: the handover frames here, the
/// relayed requests through [`crate::cmd::apply_peer`].
async fn answer(shared: &Arc<Shared>, peer: &str, frame: PeerFrame) -> Option<PeerFrame> {
    match frame {
        PeerFrame::Import(import) => {
            let result = import_mailboxes(shared, peer, import.epoch, import.mailboxes).await;
            Some(handoff_ack(import.request_id, result))
        }
        PeerFrame::ImportFile(import) => {
            let request_id = import.request_id;
            let result = import_file(shared, peer, import).await;
            Some(handoff_ack(request_id, result))
        }
        PeerFrame::HandoffDone(done) => {
            let result = finish_import(shared, peer, done.epoch, done.slots).await;
            Some(handoff_ack(done.request_id, result))
        }
        // The requests another node relays to this one, the owner of
        // the address they name, go through the command table's dispatch.
        other => match crate::cmd::apply_peer(shared, other).await {
            Ok(answer) => Some(answer),
            Err(other) => {
                debug!(frame = ?other.request_id(), "unexpected frame on a peer link");
                None
            }
        },
    }
}

fn handoff_ack(request_id: u64, result: Result<(), (ErrorCode, String)>) -> PeerFrame {
    PeerFrame::HandoffAck(HandoffAck {
        request_id,
        result: result.map_err(|(code, reason)| (code as u16, Text(reason))),
    })
}

/// The move `peer` executes towards this node at `epoch`, if it is one.
fn incoming_move<'a>(
    shared: &'a Shared,
    peer: &str,
    epoch: u64,
) -> Result<&'a super::Move, (ErrorCode, String)> {
    if epoch != shared.fleet.map().epoch() {
        return Err((
            ErrorCode::ShardUnavailable,
            format!(
                "handover for epoch {epoch}, this node runs epoch {}",
                shared.fleet.map().epoch()
            ),
        ));
    }
    shared.fleet.move_from(peer).ok_or_else(|| {
        (
            ErrorCode::UnexpectedFrame,
            format!("the fleet map moves no slots from {peer} to this node"),
        )
    })
}

async fn import_mailboxes(
    shared: &Arc<Shared>,
    peer: &str,
    epoch: u64,
    mailboxes: Vec<MailboxTransfer>,
) -> Result<(), (ErrorCode, String)> {
    let m = incoming_move(shared, peer, epoch)?;
    // Only mailboxes of the moving slots.
    if let Some(mailbox) = mailboxes
        .iter()
        .find(|mb| !m.contains(slot_of(&mb.address)))
    {
        return Err((
            ErrorCode::UnexpectedFrame,
            format!(
                "slot {} is not part of the move from {peer}",
                slot_of(&mailbox.address)
            ),
        ));
    }
    if !shared.fleet.is_move_importing(m) {
        // The move completed before: the sender missed our answer to its
        // HandoffDone and is starting over. Its copies cannot have changed
        // since (it owns none of these slots), so there is nothing to merge,
        // and merging would bring back what was deleted or expired here.
        return Ok(());
    }
    let count = mailboxes.len();
    let (store, log) = (shared.directory.clone(), shared.log.clone());
    tokio::task::spawn_blocking(move || {
        for mailbox in mailboxes {
            let export = to_export(mailbox);
            crate::store::wait_for(|done| {
                crate::store::import_mailbox(log.as_ref(), store.as_ref(), &export, done)
            })?;
        }
        store.sync()
    })
    .await
    .map_err(|error| (ErrorCode::Internal, error.to_string()))?
    .map_err(|error| (ErrorCode::StorageFailure, error.to_string()))?;
    metrics::counter!("backbone_fleet_handoff_transfers_received_total").increment(count as u64);
    Ok(())
}

/// Stores one part of a handed-over file: its bytes, durably, and with the
/// last part its record (flushed), so a record never names missing bytes.
async fn import_file(
    shared: &Arc<Shared>,
    peer: &str,
    import: ImportFile,
) -> Result<(), (ErrorCode, String)> {
    let m = incoming_move(shared, peer, import.epoch)?;
    let slot = slot_of(&import.file.id.route_address());
    if !m.contains(slot) || slot_of(&import.file.owner) != slot {
        return Err((
            ErrorCode::UnexpectedFrame,
            format!("slot {slot} is not part of the move from {peer}"),
        ));
    }
    if !shared.fleet.is_move_importing(m) {
        return Ok(()); // already complete: the sender missed our answer
    }
    let (store, files) = (shared.directory.clone(), shared.files.clone());
    tokio::task::spawn_blocking(move || {
        let file = import.file;
        files
            .write_part(&file.id, import.offset, &import.bytes.0)
            .map_err(|error| (ErrorCode::StorageFailure, error.to_string()))?;
        if import.last {
            let record = StoredFile {
                id: file.id,
                owner: file.owner,
                size: file.size,
                content_hash: file.content_hash,
                secret_hash: file.secret_hash,
                expires_at_ms: file.expires_at_ms,
                complete: file.complete,
            };
            // The previous owner applied the quota.
            let unlimited = FileQuota {
                max_files: usize::MAX,
                max_bytes: u64::MAX,
            };
            let stored = store
                .put_file(&record, unlimited, 0)
                .and_then(|_| store.sync());
            stored.map_err(|error| (ErrorCode::StorageFailure, error.to_string()))?;
        }
        Ok(())
    })
    .await
    .map_err(|error| (ErrorCode::Internal, error.to_string()))?
}

async fn finish_import(
    shared: &Arc<Shared>,
    peer: &str,
    epoch: u64,
    slots: Vec<(u16, u16)>,
) -> Result<(), (ErrorCode, String)> {
    let m = incoming_move(shared, peer, epoch)?.clone();
    if slots != m.slots {
        return Err((
            ErrorCode::UnexpectedFrame,
            format!(
                "handover of {slots:?} does not match the map's move of {:?}",
                m.slots
            ),
        ));
    }
    if !shared.fleet.is_move_importing(&m) {
        return Ok(()); // already complete: the sender missed our answer
    }
    let inner = shared.clone();
    tokio::task::spawn_blocking(move || inner.fleet.finish_import(&m, inner.directory.as_ref()))
        .await
        .map_err(|error| (ErrorCode::Internal, error.to_string()))?
        .map_err(|error| (ErrorCode::StorageFailure, error.to_string()))?;
    info!(from = %peer, "slot handover received; serving the slots");
    Ok(())
}
