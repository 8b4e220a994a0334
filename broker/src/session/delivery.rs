//! Delivery to one device: catch-up from the log, then live pushes, at
//! most `push_window` unacknowledged, and the device's cursor written
//! at most once a second.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use backbone_protocol::bytes::Blob;
use backbone_protocol::frame::Deliver;
use backbone_protocol::{Address, DeviceId, Frame};
use tokio::sync::watch;
use tracing::warn;

use super::{Session, SessionMetrics};
use crate::cmd::error_frame;
use crate::mailbox::PushQueue;
use crate::shared::Shared;
use crate::store::{StoredEnvelope, WriteHandle};
use crate::wire::Outbox;

/// One device session's share of `backbone_push_pending_envelopes`: the
/// envelopes up to the durable head it has not acknowledged. Taken back
/// when the session ends.
struct PendingGauge {
    /// The gauge's handle, looked up once per session rather than per push.
    gauge: metrics::Gauge,
    reported: u64,
}

impl PendingGauge {
    fn new() -> Self {
        Self {
            gauge: metrics::gauge!("backbone_push_pending_envelopes"),
            reported: 0,
        }
    }

    fn set(&mut self, pending: u64) {
        if pending > self.reported {
            self.gauge.increment((pending - self.reported) as f64);
        } else if pending < self.reported {
            self.gauge.decrement((self.reported - pending) as f64);
        }
        self.reported = pending;
    }
}

impl Drop for PendingGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Pushes the mailbox to one device: first what is stored after its cursor,
/// then live envelopes, in sequence order, never more than `push_window`
/// unacknowledged. Ends when the session's ack channel closes.
pub(super) async fn deliver(
    shared: Arc<Shared>,
    session: Arc<Session>,
    out: Outbox,
    mut acks: watch::Receiver<u64>,
) {
    let window = shared.config.limits.push_window;
    let live = PushQueue::new(window);
    let subscriber = shared.registry.next_subscriber_id();
    let address = session.address;
    // Only envelopes up to the durable head are ever pushed: the store's
    // reads also see envelopes inserted but not yet flushed, which a crash
    // may still take back (and their sequence numbers be handed out again).
    let subscription = match shared
        .registry
        .subscribe(&address, subscriber, live.clone())
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => {
            warn!(%error, "cannot subscribe to mailbox");
            let _ = out
                .send(error_frame(0, error.code(), error.to_string()))
                .await;
            return;
        }
    };
    let mut known_head = subscription.durable();
    let mut acked = session.acked_seq;
    let mut sent = acked;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut cursor = CursorWriter::new(shared.writer.clone(), address, session.device);
    let mut pending = PendingGauge::new();
    let lag = metrics::histogram!("backbone_device_push_lag_envelopes");
    let pushes = SessionMetrics::get();
    // One timer for the session, moved only when the cursor's next write
    // time changes: a timer made afresh on every push and ack costs a
    // registration and a removal each. Made when first needed, so an idle
    // session does not hold one.
    let mut cursor_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut cursor_timer_at = None;

    'session: loop {
        pending.set(known_head.saturating_sub(acked));
        // Catch up from the store while behind and the window has room.
        while sent < known_head && in_flight.len() < window {
            let store = shared.log.clone();
            let behind = usize::try_from(known_head - sent).unwrap_or(usize::MAX);
            let limit = (window - in_flight.len()).min(behind);
            let (from, now) = (sent + 1, (shared.clock)());
            let batch = match tokio::task::spawn_blocking(move || {
                store.read_from(&address, from, limit, now)
            })
            .await
            {
                Ok(Ok(batch)) => batch,
                Ok(Err(error)) => {
                    warn!(%error, "reading the mailbox failed");
                    break 'session;
                }
                Err(_) => break 'session,
            };
            let ready: Vec<_> = batch
                .into_iter()
                .take_while(|envelope| envelope.seq <= known_head)
                .collect();
            if ready.is_empty() {
                // Nothing durable is left below the head (expired or deleted).
                sent = known_head;
                break;
            }
            for envelope in ready {
                sent = envelope.seq;
                in_flight.push_back(envelope.seq);
                if out
                    .send(deliver_frame(&shared, pushes, &envelope))
                    .await
                    .is_err()
                {
                    break 'session;
                }
            }
        }
        let cursor_due = cursor.waiting_until();
        if let Some(due) = cursor_due
            && cursor_timer_at != Some(due)
        {
            match &mut cursor_timer {
                Some(timer) => timer.as_mut().reset(due),
                None => cursor_timer = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            cursor_timer_at = Some(due);
        }
        tokio::select! {
            envelope = live.recv() => {
                known_head = known_head.max(envelope.seq);
                if envelope.seq == sent + 1 && in_flight.len() < window {
                    sent = envelope.seq;
                    if envelope.expires_at_ms > (shared.clock)() {
                        in_flight.push_back(envelope.seq);
                        if out.send(deliver_frame(&shared, pushes, &envelope)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            changed = acks.changed() => {
                if changed.is_err() {
                    break;
                }
                let claimed = *acks.borrow_and_update();
                if claimed > sent {
                    // The device has more than this session pushed: it got
                    // them in an earlier session, and its cursor's last
                    // move was lost with a crash (cursor moves are synced
                    // only with checkpoints). Skip what it has, up to the
                    // durable head; waiting for an ack of a redelivery it
                    // drops as a repeat would stall the window for good.
                    sent = sent.max(claimed.min(known_head));
                }
                let up_to = claimed.min(sent);
                if up_to > acked {
                    let newly = in_flight.iter().take_while(|seq| **seq <= up_to).count();
                    in_flight.drain(..newly);
                    pushes.acked.increment(newly as u64);
                    acked = up_to;
                    lag.record(known_head.saturating_sub(acked) as f64);
                    cursor.ack(up_to);
                }
            }
            () = async { cursor_timer.as_mut().expect("armed with a due time").await },
                if cursor_due.is_some() => {
                cursor_timer_at = None;
                cursor.next();
            }
        }
        if live.take_lagged() {
            // Live envelopes were dropped for this slow device: catch up from
            // the store, up to the durable head.
            known_head = known_head.max(subscription.durable());
        }
    }
    cursor.finish();
    drop(subscription);
}

/// How often a device's cursor is written to the directory at most. A
/// cursor move is not synced on its own (it becomes durable with the next
/// checkpoint, every `store.checkpoint_interval`), and a lost move only
/// means envelopes are delivered again, which clients drop as repeats; so
/// holding a busy device's acks this long costs no durability and saves
/// most of its directory writes. A session's last move is queued at once
/// when it ends ([`CursorWriter::finish`]).
const CURSOR_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A device's cursor on its way to the store: at most one move queued per
/// [`CURSOR_WRITE_INTERVAL`], the acks that arrive meanwhile folded into
/// the next one, so a device acking every envelope costs one store write a
/// second, not one per envelope. Moves are queued and forgotten (the
/// writer's thread logs a failure), so a write wakes no session.
struct CursorWriter {
    writer: WriteHandle,
    address: Address,
    device: DeviceId,
    /// The highest seq acked and not yet handed to the writer.
    wanted: Option<u64>,
    /// When the last move was queued.
    last_write: Option<tokio::time::Instant>,
}

impl CursorWriter {
    fn new(writer: WriteHandle, address: Address, device: DeviceId) -> Self {
        Self {
            writer,
            address,
            device,
            wanted: None,
            last_write: None,
        }
    }

    /// Records an ack; it is queued at once unless the last move was
    /// queued less than [`CURSOR_WRITE_INTERVAL`] ago.
    fn ack(&mut self, up_to: u64) {
        self.wanted = Some(self.wanted.map_or(up_to, |wanted| wanted.max(up_to)));
        self.next_if_due();
    }

    /// When acks wait for the interval to pass, the time the next move may
    /// be queued.
    fn waiting_until(&self) -> Option<tokio::time::Instant> {
        self.wanted?;
        Some(
            self.last_write
                .map_or_else(tokio::time::Instant::now, |last| {
                    last + CURSOR_WRITE_INTERVAL
                }),
        )
    }

    /// Queues the folded acks if the interval has passed.
    fn next_if_due(&mut self) {
        if self
            .last_write
            .is_none_or(|last| last.elapsed() >= CURSOR_WRITE_INTERVAL)
        {
            self.next();
        }
    }

    /// Queues the folded acks, if any.
    fn next(&mut self) {
        if let Some(seq) = self.wanted.take() {
            self.writer.set_cursor(self.address, self.device, seq);
            self.last_write = Some(tokio::time::Instant::now());
        }
    }

    /// Queues what is still unwritten now, so it is ordered before anything
    /// submitted after the session ends (an identity's purge).
    fn finish(mut self) {
        self.next();
    }
}

fn deliver_frame(shared: &Shared, metrics: &SessionMetrics, envelope: &StoredEnvelope) -> Frame {
    let now = (shared.clock)();
    metrics
        .push_delay
        .record(now.saturating_sub(envelope.stored_at_ms) as f64 / 1000.0);
    metrics.pushed.increment(1);
    Frame::Deliver(Deliver {
        seq: envelope.seq,
        message_id: envelope.message_id,
        sender: envelope.sender,
        stored_at_ms: envelope.stored_at_ms,
        expires_at_ms: envelope.expires_at_ms,
        envelope: Blob(envelope.envelope.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;
    use crate::store::{MemoryStore, Writer};

    #[tokio::test]
    async fn cursor_moves_fold_the_acks_of_an_interval_and_finish_queues_the_last() {
        let store = Arc::new(MemoryStore::new());
        let (writer, handle) = Writer::start(store.clone(), store.clone());
        let (address, device) = (Address([1; 32]), DeviceId([2; 32]));
        let mut cursor = CursorWriter::new(handle.clone(), address, device);

        cursor.ack(1);
        cursor.ack(2);
        cursor.ack(3);
        handle.flush().await.expect("flushes");
        // Only the first ack was queued; 2 and 3 wait, folded into one.
        assert_eq!(store.cursor(&address, &device), Ok(Some(1)));
        let due = cursor.waiting_until().expect("acks wait");
        assert!(
            due > tokio::time::Instant::now(),
            "the interval runs from the first move"
        );
        cursor.next_if_due();
        handle.flush().await.expect("flushes");
        assert_eq!(
            store.cursor(&address, &device),
            Ok(Some(1)),
            "not before the interval is over"
        );
        tokio::time::sleep_until(due).await;
        cursor.next_if_due();
        assert_eq!(cursor.waiting_until(), None, "nothing waits once queued");
        cursor.ack(4);
        assert!(
            cursor.waiting_until().is_some(),
            "4 waits for the next interval"
        );
        // The session ends with 4 still wanted: it is queued before anything
        // submitted after it.
        cursor.finish();
        handle.flush().await.expect("flushes");
        assert_eq!(store.cursor(&address, &device), Ok(Some(4)));

        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .expect("join")
            .expect("shutdown");
    }
}
