//! An authenticated session's requests: sends inside the session's task,
//! other requests as tasks, acks to the delivery.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use backbone_protocol::Frame;
use backbone_protocol::frame::{ErrorCode, Pong, Send};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug};

use super::delivery::deliver;
use super::requests::{FileStreams, next_request};
use super::{Session, SessionMetrics};
use crate::cmd::Runs;
use crate::cmd::send::count_refused_copies;
use crate::shared::Shared;
use crate::shared::live::close;
use crate::wire::{FrameReader, Outbox};

/// Serves an authenticated session until the client closes or the broker
/// shuts down, then lets its requests in flight finish (bounded by
/// `server.shutdown_grace`).
pub(super) async fn serve_authenticated(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    session: Session,
    mut reader: FrameReader,
    out: Outbox,
) {
    let session = Arc::new(session);
    let caller = session.caller();
    let mut files = FileStreams::new(caller);
    let (ack_tx, ack_rx) = watch::channel(session.acked_seq);
    let delivery = tokio::spawn(
        deliver(shared.clone(), session.clone(), out.clone(), ack_rx).in_current_span(),
    );
    let permits = Arc::new(Semaphore::new(shared.config.limits.max_inflight_requests));
    let mut shutdown = shared.shutdown.clone();
    // Sends run inside this task, not as a task each: a send spends nearly
    // all its time waiting for its mailbox and the log, and a task per send
    // costs a spawn, a schedule and a wake-up on another worker each time.
    // They progress whenever this task waits: for the next frame, for a
    // permit, for room in the outbox.
    let send_metrics = SessionMetrics::get();
    // Made at the first send: an empty `FuturesUnordered` already holds a
    // stub task as large as a send's future, which an idle connection
    // would pay for.
    let mut sends = None;
    loop {
        let next = std::pin::pin!(next_request(
            shared,
            &caller,
            connection,
            &mut reader,
            &out,
            &mut files,
            &mut shutdown,
        ));
        let Some((frame, rules)) = while_sending(&mut sends, next).await else {
            break;
        };
        if rules.runs == Runs::Connection {
            match frame {
                Frame::Ack(ack) => {
                    send_metrics.acks.increment(1);
                    ack_tx.send_modify(|acked| *acked = (*acked).max(ack.up_to_seq));
                }
                Frame::Ping(ping) => {
                    let pong = std::pin::pin!(out.send(Frame::Pong(Pong { nonce: ping.nonce })));
                    let _ = while_sending(&mut sends, pong).await;
                }
                Frame::Error(error) => {
                    debug!(code = error.code, message = %error.message, "client reported an error")
                }
                // A `Pong`; the table admits no other connection frame after
                // the handshake.
                _ => {}
            }
            continue;
        }
        let Some(permit) =
            while_sending(&mut sends, std::pin::pin!(permits.clone().acquire_owned()))
                .await
                .ok()
        else {
            break;
        };
        match frame {
            // `Runs::InSession`.
            Frame::Send(send) => {
                sends
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(answer_send(
                        shared,
                        &session,
                        &out,
                        send_metrics,
                        send,
                        permit,
                    ));
            }
            // `Runs::Task`.
            request => {
                let (shared, session, out) = (shared.clone(), session.clone(), out.clone());
                tokio::spawn(
                    async move {
                        let response = crate::cmd::apply(&shared, caller, request).await;
                        let _ = out.send(response).await;
                        // The session stays listed until its requests are over.
                        drop(session);
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
        }
    }
    // Let in-flight requests finish (bounded by the shutdown grace), then stop.
    let all = shared.config.limits.max_inflight_requests as u32;
    let _ = tokio::time::timeout(shared.config.server.shutdown_grace, async {
        if let Some(sends) = &mut sends {
            while sends.next().await.is_some() {}
        }
        permits.acquire_many(all).await
    })
    .await;
    drop(ack_tx);
    let _ = delivery.await;
    if *shared.shutdown.borrow() {
        close(
            connection,
            ErrorCode::ShuttingDown,
            "broker is shutting down",
        );
    }
}

/// Awaits `future` while driving the session's sends in progress, so that
/// they complete while the session waits for anything else.
///
/// The future is pinned by the caller and only borrowed here, so that the
/// session's state holds it once (a future moved in and pinned again would
/// take its size twice in every idle connection's task).
pub(super) async fn while_sending<F: Future>(
    sends: &mut Option<FuturesUnordered<impl Future<Output = ()>>>,
    mut future: Pin<&mut F>,
) -> F::Output {
    let Some(sends) = sends else {
        return future.await;
    };
    loop {
        tokio::select! {
            biased;
            Some(()) = sends.next(), if !sends.is_empty() => {}
            output = &mut future => return output,
        }
    }
}

/// One send of an authenticated session, from its checks to its answer in
/// the outbox; holds one of the session's request permits.
async fn answer_send(
    shared: &Arc<Shared>,
    session: &Session,
    out: &Outbox,
    metrics: &SessionMetrics,
    send: Send,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let response = crate::cmd::send::send(shared, session.address, send).await;
    metrics.send_seconds.record(started.elapsed().as_secs_f64());
    if let Frame::SendAck(ack) = &response {
        metrics.accepted.increment(ack.stored.len() as u64);
    }
    count_refused_copies("send", &response);
    let _ = out.send(response).await;
    drop(permit);
}
