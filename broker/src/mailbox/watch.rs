//! What a mailbox's devices watch: its durable head and its subscriptions,
//! and the bounded queue each subscribed device session reads its pushes
//! from.
//!
//! A [`Watch`] outlives the mailbox's actor while any device is subscribed,
//! and the actor started by the next write takes it over, so a connected but
//! quiet mailbox keeps this small record and no actor.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use backbone_protocol::Address;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::store::StoredEnvelope;

/// A device session's subscription to its mailbox.
#[derive(Clone, Debug)]
pub struct Subscriber {
    /// Unique per subscription.
    pub id: u64,
    /// Where its durable envelopes are queued.
    pub queue: Arc<PushQueue>,
}

/// The durable envelopes waiting for one device session, in sequence order.
///
/// Bounded: when full, an envelope is not queued and the queue is marked
/// lagged, and the session reads it from the store. Unlike a channel, it
/// allocates nothing until an envelope is queued, so an idle connection
/// pays for a few words, not for a block of empty slots.
#[derive(Debug)]
pub struct PushQueue {
    queue: Mutex<VecDeque<Arc<StoredEnvelope>>>,
    capacity: usize,
    lagged: AtomicBool,
    ready: Notify,
}

impl PushQueue {
    /// A queue of at most `capacity` envelopes (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            lagged: AtomicBool::new(false),
            ready: Notify::new(),
        })
    }

    pub(super) fn queue(&self) -> MutexGuard<'_, VecDeque<Arc<StoredEnvelope>>> {
        // Every change is one push or pop: a panic cannot leave it half done.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `envelope`, or marks the queue lagged when it is full.
    pub(super) fn offer(&self, envelope: &Arc<StoredEnvelope>) {
        let mut queue = self.queue();
        if queue.len() >= self.capacity {
            self.lagged.store(true, Ordering::Release);
            return;
        }
        queue.push_back(envelope.clone());
        drop(queue);
        self.ready.notify_one();
    }

    /// The next queued envelope, waiting for one. Cancel-safe: an envelope
    /// is taken only when this returns it.
    pub async fn recv(&self) -> Arc<StoredEnvelope> {
        loop {
            if let Some(envelope) = self.queue().pop_front() {
                return envelope;
            }
            // `notify_one` leaves a permit when nobody waits, so an envelope
            // queued between the check and this wait is not missed.
            self.ready.notified().await;
        }
    }

    /// Whether an envelope was dropped since the last call, clearing the mark.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

/// What a mailbox's devices watch: its durable head and its subscriptions.
///
/// It lives as long as an actor or a subscription holds it (through a
/// [`WatchLease`]), so a mailbox whose devices are connected but which sees no
/// traffic keeps this small record and no actor.
#[derive(Debug)]
pub struct Watch {
    /// The highest sequence number known durable: how far subscribers catch
    /// up from the log before live pushes take over.
    durable_seq: AtomicU64,
    subscribers: Mutex<HashMap<u64, Subscriber>>,
}

impl Watch {
    /// A new watch at `durable_seq`, counted in `backbone_mailbox_watches`
    /// until it leaves the map.
    fn created(durable_seq: u64) -> Arc<Self> {
        metrics::gauge!("backbone_mailbox_watches").increment(1.0);
        Arc::new(Self {
            durable_seq: AtomicU64::new(durable_seq),
            subscribers: Mutex::new(HashMap::new()),
        })
    }

    /// The highest sequence number known durable.
    pub fn durable(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// Raises the durable head to `head` (read from the log).
    pub(super) fn raise(&self, head: u64) {
        self.durable_seq.fetch_max(head, Ordering::AcqRel);
    }

    pub(super) fn subscribers(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        // A panic while holding the lock leaves the map whole: every change
        // is one insert or remove.
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a subscriber. It reads the durable head after this returns, so
    /// every envelope made durable later is either pushed to it or below
    /// the head it reads.
    pub(super) fn add(&self, subscriber: Subscriber) {
        self.subscribers().insert(subscriber.id, subscriber);
    }

    /// Records `envelope` as durable and queues it for every subscriber: a
    /// full queue marks its subscriber lagged (it reads the store instead),
    /// and a queue nobody else holds is dropped (its session ended without
    /// unsubscribing).
    pub(super) fn publish(&self, envelope: &Arc<StoredEnvelope>) {
        self.durable_seq.fetch_max(envelope.seq, Ordering::AcqRel);
        self.subscribers().retain(|_, subscriber| {
            if Arc::strong_count(&subscriber.queue) == 1 {
                return false;
            }
            subscriber.queue.offer(envelope);
            true
        });
    }
}

/// Every mailbox's [`Watch`], shared by the actors and the sessions.
///
/// A watch exists while an actor or a subscribed session holds it. The
/// log's reads and head show only durable envelopes, so anyone may start a
/// watch at the log's head; a session re-reads the head once its
/// subscription is in place (see [`Registry::subscribe`]), so an envelope
/// made durable while it subscribed is either pushed to it or below the
/// head it then knows.
#[derive(Debug, Default)]
pub struct Watches {
    map: DashMap<Address, Arc<Watch>>,
}

impl Watches {
    /// How many mailboxes have a watch (an actor or a subscribed device).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no mailbox has a watch.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn lease(self: &Arc<Self>, address: Address, watch: Arc<Watch>) -> WatchLease {
        WatchLease {
            watches: self.clone(),
            address,
            watch: Some(watch),
        }
    }

    /// A hold on `address`'s watch, if it has one.
    pub(super) fn existing(self: &Arc<Self>, address: &Address) -> Option<WatchLease> {
        let watch = self.map.get(address)?.clone();
        Some(self.lease(*address, watch))
    }

    /// A hold on `address`'s watch, started at `head` (a durable head read
    /// from the log) if there is none; an existing watch's head only rises.
    pub(super) fn attach(self: &Arc<Self>, address: Address, head: u64) -> WatchLease {
        let watch = self
            .map
            .entry(address)
            .or_insert_with(|| Watch::created(head))
            .clone();
        watch.raise(head);
        self.lease(address, watch)
    }
}

/// A hold on a mailbox's [`Watch`]; when the last hold is dropped, the watch
/// leaves the map.
#[derive(Debug)]
pub struct WatchLease {
    watches: Arc<Watches>,
    address: Address,
    /// Always `Some` until dropped.
    watch: Option<Arc<Watch>>,
}

/// Another hold on the same watch: a write's completion holds one until it
/// has published, so the watch outlives the write.
impl Clone for WatchLease {
    fn clone(&self) -> Self {
        let watch = self
            .watch
            .clone()
            .expect("a lease holds its watch until dropped");
        self.watches.lease(self.address, watch)
    }
}

impl WatchLease {
    fn watch(&self) -> &Watch {
        self.watch
            .as_deref()
            .expect("a lease holds its watch until dropped")
    }
}

impl std::ops::Deref for WatchLease {
    type Target = Watch;

    fn deref(&self) -> &Watch {
        self.watch()
    }
}

impl Drop for WatchLease {
    fn drop(&mut self) {
        drop(self.watch.take());
        // Each holder drops its own hold before looking, so the last of
        // several dropping at once sees only the map's.
        if self
            .watches
            .map
            .remove_if(&self.address, |_, watch| Arc::strong_count(watch) == 1)
            .is_some()
        {
            metrics::gauge!("backbone_mailbox_watches").decrement(1.0);
        }
    }
}

/// A device session's subscription: ends when dropped.
#[derive(Debug)]
pub struct Subscription {
    pub(super) lease: WatchLease,
    pub(super) id: u64,
}

impl Subscription {
    /// The mailbox's highest durable sequence number.
    pub fn durable(&self) -> u64 {
        self.lease.durable()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.lease.subscribers().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{address, envelope};

    fn subscriber(id: u64, capacity: usize) -> (Subscriber, Arc<PushQueue>) {
        let queue = PushQueue::new(capacity);
        let subscriber = Subscriber {
            id,
            queue: queue.clone(),
        };
        (subscriber, queue)
    }

    fn queued(queue: &PushQueue) -> Vec<u64> {
        queue.queue().iter().map(|envelope| envelope.seq).collect()
    }

    /// Polls a future once.
    fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn a_push_queue_is_bounded_marks_lag_once_and_is_cancel_safe() {
        let queue = PushQueue::new(2);
        for seq in 1..=3 {
            queue.offer(&Arc::new(envelope(seq, 0, u64::MAX)));
        }
        assert_eq!(queued(&queue), [1, 2], "the third did not fit");
        assert!(queue.take_lagged());
        assert!(!queue.take_lagged(), "the mark is cleared when read");

        let first = queue.recv();
        tokio::pin!(first);
        assert_eq!(poll_once(first.as_mut()).map(|e| e.seq), Some(1));
        // A wait given up before anything arrives takes nothing.
        let drained = queue.recv();
        tokio::pin!(drained);
        assert_eq!(poll_once(drained.as_mut()).map(|e| e.seq), Some(2));
        let abandoned = queue.recv();
        tokio::pin!(abandoned);
        assert!(poll_once(abandoned.as_mut()).is_none());
        queue.offer(&Arc::new(envelope(4, 0, u64::MAX)));
        assert_eq!(queued(&queue), [4], "still queued for the next wait");
        // A new wait finds it at once; so would the abandoned one, which
        // holds the wake-up.
        let next = queue.recv();
        tokio::pin!(next);
        assert_eq!(poll_once(next.as_mut()).map(|e| e.seq), Some(4));
        assert!(
            poll_once(abandoned.as_mut()).is_none(),
            "nothing left to take"
        );
    }

    #[test]
    fn a_watch_leaves_the_map_with_its_last_hold_and_its_head_only_rises() {
        let watches = Arc::new(Watches::default());
        let actor = watches.attach(address(1), 4);
        let session = watches.attach(address(1), 2);
        assert_eq!(session.durable(), 4, "a lower read does not lower it");
        let later = watches.attach(address(1), 6);
        assert_eq!(actor.durable(), 6, "a higher read raises it for all");
        drop(actor);
        drop(later);
        assert_eq!(watches.len(), 1, "the session still holds it");
        let again = watches.existing(&address(1)).expect("still there");
        drop(session);
        assert_eq!(watches.len(), 1);
        drop(again);
        assert!(watches.is_empty());
        assert!(watches.existing(&address(1)).is_none());
    }

    #[test]
    fn an_actor_takes_over_the_watch_its_devices_hold() {
        let watches = Arc::new(Watches::default());
        let session = watches.attach(address(1), 5);
        let (device, pushed) = subscriber(1, 4);
        session.add(device);

        let actor = watches.attach(address(1), 5);
        actor.publish(&Arc::new(envelope(6, 0, u64::MAX)));
        assert_eq!(session.durable(), 6);
        assert_eq!(queued(&pushed), [6]);

        // The actor stops; the device keeps the head, and the next actor
        // pushes to it too.
        drop(actor);
        let actor = watches.attach(address(1), 6);
        actor.publish(&Arc::new(envelope(7, 0, u64::MAX)));
        assert_eq!(queued(&pushed), [6, 7]);
        assert_eq!(session.durable(), 7);
    }

    #[test]
    fn publishing_marks_full_subscribers_lagged_and_drops_closed_ones() {
        let watches = Arc::new(Watches::default());
        let actor = watches.attach(address(1), 0);
        let (full, full_queue) = subscriber(1, 1);
        let (gone, gone_queue) = subscriber(2, 4);
        actor.add(full);
        actor.add(gone);
        drop(gone_queue);
        actor.publish(&Arc::new(envelope(1, 0, u64::MAX)));
        assert!(!full_queue.take_lagged());
        actor.publish(&Arc::new(envelope(2, 0, u64::MAX)));
        assert!(full_queue.take_lagged(), "the second did not fit");
        assert_eq!(queued(&full_queue), [1]);
        let ids: Vec<u64> = actor.subscribers().keys().copied().collect();
        assert_eq!(ids, [1], "the closed subscriber is gone");
        assert_eq!(actor.durable(), 2);
    }

    #[test]
    fn a_dropped_subscription_leaves_the_watch() {
        let watches = Arc::new(Watches::default());
        let actor = watches.attach(address(1), 0);
        let (device, _rx) = subscriber(7, 4);
        actor.add(device);
        let subscription = Subscription {
            lease: watches.attach(address(1), 0),
            id: 7,
        };
        assert_eq!(actor.subscribers().len(), 1);
        drop(subscription);
        assert!(actor.subscribers().is_empty());
    }
}
