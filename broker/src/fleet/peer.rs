//! The node-to-node listener: accepts links from peers that present a fleet
//! certificate, checks that they route by the same fleet map, and serves
//! forwarded sends and card lookups for the slots this node owns.

use std::sync::Arc;
use std::time::Duration;

use backbone_protocol::bytes::Text;
use backbone_protocol::fleet::{ForwardAck, PeerCardResult, PeerFrame, PeerHello, PeerRefuse};
use backbone_protocol::frame::ErrorCode;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info_span, warn};

use super::link::{PeerReader, encode_peer_logged};
use crate::route::{StoreTemplate, store_for};
use crate::server::Shared;
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
    let mut reader = PeerReader::new(recv, shared.max_frame_len);
    let (out, rx) = mpsc::channel::<PeerFrame>(PEER_INFLIGHT);
    let writer = spawn_writer_with(send, rx, encode_peer_logged);
    let hello = match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
        Ok(Ok(PeerFrame::Hello(hello))) => hello,
        _ => return connection.close(quinn::VarInt::from_u32(1), b"expected hello"),
    };
    if let Some(reason) = refusal(&shared, &hello) {
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
        let (shared, out) = (shared.clone(), out.clone());
        tokio::spawn(
            async move {
                if let Some(answer) = answer(&shared, frame).await {
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

async fn answer(shared: &Arc<Shared>, frame: PeerFrame) -> Option<PeerFrame> {
    match frame {
        PeerFrame::Forward(forward) => {
            metrics::counter!("backbone_fleet_forwards_received_total").increment(1);
            let template = StoreTemplate {
                message_id: forward.message_id,
                sender: forward.sender,
                stored_at_ms: forward.stored_at_ms,
                expires_at_ms: forward.expires_at_ms,
                envelope: forward.envelope.0,
            };
            let (stored, failed) = store_for(shared, forward.recipients, &template).await;
            Some(PeerFrame::ForwardAck(ForwardAck {
                request_id: forward.request_id,
                stored,
                failed,
            }))
        }
        PeerFrame::FetchCard(fetch) => {
            let result = if matches!(shared.fleet.route(&fetch.address), super::Route::Local) {
                let store = shared.store.clone();
                match tokio::task::spawn_blocking(move || store.card(&fetch.address)).await {
                    Ok(Ok(Some(card))) => Ok(card),
                    Ok(Ok(None)) => Err(ErrorCode::UnknownAddress as u16),
                    Ok(Err(_)) => Err(ErrorCode::StorageFailure as u16),
                    Err(_) => Err(ErrorCode::Internal as u16),
                }
            } else {
                Err(ErrorCode::ShardUnavailable as u16)
            };
            Some(PeerFrame::CardResult(PeerCardResult {
                request_id: fetch.request_id,
                result,
            }))
        }
        other => {
            debug!(frame = ?other.request_id(), "unexpected frame on a peer link");
            None
        }
    }
}
