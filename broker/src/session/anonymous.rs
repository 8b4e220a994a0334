//! An anonymous session: what the command table allows anyone (sealed
//! sends, card lookups, token fetches, file downloads), each request
//! counted against the session's budgets.

use std::sync::Arc;

use backbone_protocol::Frame;
use backbone_protocol::frame::{ErrorCode, Pong};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug};

use super::requests::{FileStreams, next_request};
use crate::admission::Source;
use crate::cmd::rate::AnonymousBudget;
use crate::cmd::{Caller, Runs};
use crate::shared::Shared;
use crate::shared::live::close;
use crate::wire::{FrameReader, Outbox};

/// Serves an anonymous session until the client closes or the broker shuts
/// down. Requests run as tasks, at most
/// `limits.anonymous_max_inflight_requests` at once, each counted against
/// the session's and its source's request budgets ([`AnonymousBudget`]).
pub(super) async fn serve_anonymous(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    source: Option<Source>,
    mut reader: FrameReader,
    out: Outbox,
) {
    let budget = Arc::new(AnonymousBudget::new(shared, source));
    let inflight = shared.config.limits.anonymous_max_inflight_requests;
    let permits = Arc::new(Semaphore::new(inflight));
    let mut shutdown = shared.shutdown.clone();
    let mut files = FileStreams::anonymous(budget.clone());
    loop {
        let Some((frame, rules)) = next_request(
            shared,
            &Caller::Anonymous,
            connection,
            &mut reader,
            &out,
            &mut files,
            &mut shutdown,
        )
        .await
        else {
            break;
        };
        if rules.runs != Runs::Task {
            let answer = match frame {
                Frame::Ping(ping) => Frame::Pong(Pong { nonce: ping.nonce }),
                Frame::Pong(_) => continue,
                Frame::Error(error) => {
                    debug!(code = error.code, message = %error.message, "client reported an error");
                    continue;
                }
                // The table admits no other frame that a session runs itself.
                other => crate::cmd::internal(&other),
            };
            if out.send(answer).await.is_err() {
                break;
            }
            continue;
        }
        if let Err(refusal) = budget.spend(shared) {
            if matches!(frame, Frame::SealedSend(_)) {
                metrics::counter!("backbone_sealed_refused_total", "reason" => "connection_rate")
                    .increment(1);
            }
            if out.send(refusal.answer(&frame)).await.is_err() {
                break;
            }
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (shared, out) = (shared.clone(), out.clone());
        tokio::spawn(
            async move {
                let response = crate::cmd::apply(&shared, Caller::Anonymous, frame).await;
                let _ = out.send(response).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
    let _ = tokio::time::timeout(
        shared.config.server.shutdown_grace,
        permits.acquire_many(inflight as u32),
    )
    .await;
    if *shared.shutdown.borrow() {
        close(
            connection,
            ErrorCode::ShuttingDown,
            "broker is shutting down",
        );
    }
}
