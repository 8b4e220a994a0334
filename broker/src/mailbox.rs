//! Mailbox actors and the registry that spawns them on demand.
//!
//! One actor per *active* address. It owns the mailbox's sequence counter, so
//! appends are numbered in arrival order, hands each append to the group-commit
//! writer, and only once the writer reports the envelope durable does it answer
//! the sender and push the envelope to the address's subscribed devices. An
//! actor with no activity for the idle timeout stops itself, even while
//! devices are subscribed, so memory follows active mailboxes, not stored
//! ones or connected ones.
//!
//! A mailbox's subscriptions and its durable head live in a [`Watch`], not in
//! the actor: the watch outlives the actor while any device is subscribed,
//! and the actor started by the next write takes it over. A device
//! subscribes without starting an actor when none is running (see
//! [`Registry::subscribe`]).
//!
//! Blocking storage work never runs in a handler: the head is read in
//! `spawn_blocking` and appends go to the log. An append's completion runs
//! on the log's sync thread, in log order: it answers the sender, publishes
//! the envelope to the watch and settles the mailbox's [`Writes`] there,
//! without a message to the actor (one hop less per envelope); the actor
//! hears of completions only when a retirement waits for them or an append
//! failed.
//!
//! The actor of a deleted identity refuses everything with `IdentityDeleted`:
//! it learns so when it starts (the store holds the tombstone) or when the
//! purge begins through it ([`MailboxMsg::Retire`]), so that no append or
//! relationship change slips in between the tombstone and the purge.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backbone_protocol::Address;
use backbone_protocol::bytes::{MessageId, RelationshipId};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::frame::ErrorCode;
use backbone_protocol::relationship::{
    self, InboundPolicy, Notice, Relationship, RequestOutcome, Role, SideChange, State,
};
use dashmap::DashMap;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{Notify, oneshot};

use crate::server::Clock;
use crate::store::prelude::*;
use crate::store::{Append, MailboxUsage, StoreError, StoredEnvelope, WriteHandle};

/// How often a mailbox that looks full may recount what it stores, to notice
/// room freed by expiry (deletes by the owner reset the count at once).
const RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

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

    fn queue(&self) -> MutexGuard<'_, VecDeque<Arc<StoredEnvelope>>> {
        // Every change is one push or pop: a panic cannot leave it half done.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `envelope`, or marks the queue lagged when it is full.
    fn offer(&self, envelope: &Arc<StoredEnvelope>) {
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
    fn raise(&self, head: u64) {
        self.durable_seq.fetch_max(head, Ordering::AcqRel);
    }

    fn subscribers(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        // A panic while holding the lock leaves the map whole: every change
        // is one insert or remove.
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a subscriber. It reads the durable head after this returns, so
    /// every envelope made durable later is either pushed to it or below
    /// the head it reads.
    fn add(&self, subscriber: Subscriber) {
        self.subscribers().insert(subscriber.id, subscriber);
    }

    /// Records `envelope` as durable and queues it for every subscriber: a
    /// full queue marks its subscriber lagged (it reads the store instead),
    /// and a queue nobody else holds is dropped (its session ended without
    /// unsubscribing).
    fn publish(&self, envelope: &Arc<StoredEnvelope>) {
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
    fn existing(self: &Arc<Self>, address: &Address) -> Option<WatchLease> {
        let watch = self.map.get(address)?.clone();
        Some(self.lease(*address, watch))
    }

    /// A hold on `address`'s watch, started at `head` (a durable head read
    /// from the log) if there is none; an existing watch's head only rises.
    fn attach(self: &Arc<Self>, address: Address, head: u64) -> WatchLease {
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
    lease: WatchLease,
    id: u64,
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

/// A mailbox's writes in flight, shared by its actor (which starts them)
/// and their completions on the log's sync thread (which end them).
#[derive(Debug, Default)]
pub struct Writes {
    /// Appends handed to the log and not yet completed.
    pending: AtomicU64,
    /// Of those, the envelopes and bytes counted against the quota.
    envelopes: AtomicU64,
    bytes: AtomicU64,
    /// A retirement waits for `pending` to reach 0.
    drain_awaited: AtomicBool,
}

impl Writes {
    /// An append of `counted` bytes (`None`: not counted) starts.
    fn started(&self, counted: Option<u64>) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Some(len) = counted {
            self.envelopes.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// An append started with `counted` completed; whether it was the last
    /// one in flight.
    fn finished(&self, counted: Option<u64>) -> bool {
        if let Some(len) = counted {
            self.envelopes.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(len, Ordering::Relaxed);
        }
        self.pending.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// Appends in flight.
    fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// What the appends in flight add to the mailbox's usage.
    fn in_flight(&self) -> MailboxUsage {
        MailboxUsage {
            envelopes: self.envelopes.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// Asks the completion that ends the last write in flight to tell the
    /// actor ([`MailboxMsg::Drained`]).
    fn tell_when_drained(&self) {
        self.drain_awaited.store(true, Ordering::SeqCst);
    }

    /// Whether the actor asked to be told.
    fn drain_awaited(&self) -> bool {
        self.drain_awaited.load(Ordering::SeqCst)
    }
}

/// Messages a mailbox actor handles.
#[derive(Debug)]
pub enum MailboxMsg {
    /// Number, store, and answer once durable with the sequence number.
    Append {
        /// The envelope; `seq` is assigned by the actor.
        envelope: StoredEnvelope,
        /// Answered after the flush, or at once if the mailbox is full.
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    },
    /// Internal: the mailbox's last write in flight completed while a
    /// retirement waited for it (see [`Writes`]).
    Drained,
    /// Internal: an append failed in the log; it no longer counts in the
    /// mailbox's usage.
    Unwritten {
        /// The envelope's length.
        bytes: u64,
    },
    /// Envelopes were deleted from the mailbox outside the actor: its quota
    /// count is stale and is taken again before the next append.
    Freed,
    /// Record the mailbox's inbound policy durably; answered once flushed.
    SetPolicy {
        /// The new policy.
        policy: InboundPolicy,
        /// The outcome.
        reply: RpcReplyPort<Result<(), MailboxError>>,
    },
    /// Apply a change to this side of the relationship with `peer`: check
    /// it against the mailbox's record, store the new record durably, store
    /// a notice for the mailbox's devices, and answer with the new record
    /// once both are durable. Changes go through the actor so that its
    /// consent view, which admits or refuses appends, is never stale.
    Relationship {
        /// The other side.
        peer: Address,
        /// What to apply.
        change: SideChange,
        /// This side's record afterwards.
        reply: RpcReplyPort<Result<Relationship, MailboxError>>,
    },
    /// Begin purging the identity if its deletion is due at `now_ms`: the
    /// actor records the tombstone with every peer of a pending or active
    /// relationship still to be told, refuses everything from then on,
    /// answers once its writes in flight are durable, and stops. Answered
    /// with the tombstone, or `None` when no deletion is due (cancelled,
    /// or not yet).
    Retire {
        /// The broker's time.
        now_ms: u64,
        /// The tombstone, once no write of this mailbox is in flight.
        reply: RetireReply,
    },
    /// Internal timer: stop if idle, else check again when the actor
    /// would be.
    IdleCheck,
}

/// The shortest wait between two idle checks of one actor.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(10);

/// How much one mailbox may hold; 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxQuota {
    /// Most unexpired envelopes stored.
    pub max_envelopes: u64,
    /// Most envelope bytes stored (the sum of the opaque envelope lengths).
    pub max_bytes: u64,
}

impl MailboxQuota {
    fn is_unlimited(&self) -> bool {
        self.max_envelopes == 0 && self.max_bytes == 0
    }

    /// Why `usage` plus one envelope of `len` bytes would be over the quota.
    fn refusal(&self, usage: MailboxUsage, len: u64) -> Option<String> {
        if self.max_envelopes != 0 && usage.envelopes + 1 > self.max_envelopes {
            return Some(format!(
                "the mailbox holds its limit of {} envelopes",
                self.max_envelopes
            ));
        }
        if self.max_bytes != 0 && usage.bytes + len > self.max_bytes {
            return Some(format!(
                "the mailbox would hold more than its limit of {} envelope bytes",
                self.max_bytes
            ));
        }
        None
    }
}

/// What every mailbox actor shares.
pub struct MailboxContext {
    /// The directory: policies, relationships, deletions, capabilities.
    pub directory: Arc<dyn Directory>,
    /// The mailbox log, for heads and quota counts.
    pub log: Arc<dyn MailboxLog>,
    /// The group-commit writer.
    pub writer: WriteHandle,
    /// Idle actors stop after this long.
    pub idle_timeout: Duration,
    /// The registry, so an idle actor can remove itself.
    pub actors: DashMap<Address, ActorRef<MailboxMsg>>,
    /// The mailboxes' durable heads and subscriptions.
    pub watches: Arc<Watches>,
    /// Per-mailbox storage limits.
    pub quota: MailboxQuota,
    /// The broker's clock, to tell expired envelopes when counting usage.
    pub clock: Clock,
    /// The inbound policy of identities that never set one.
    pub default_policy: InboundPolicy,
    /// How long notices stay in a mailbox.
    pub notice_ttl: Duration,
    /// The highest sequence number handed out per mailbox while its
    /// appends are not all durable yet: the log's head shows only durable
    /// ones, so an actor that replaces one that died with appends in flight
    /// numbers on from here, never reusing a number. Entries leave once the
    /// writes are durable.
    pub assigned: DashMap<Address, u64>,
}

/// The mailbox actor; holds no state of its own (see [`MailboxState`]).
pub struct MailboxActor;

/// Per-mailbox state, built in `pre_start`.
pub struct MailboxState {
    address: Address,
    context: Arc<MailboxContext>,
    /// The last sequence number handed out.
    last_seq: u64,
    /// The durable head and the subscribed devices, held while the actor
    /// lives.
    watch: WatchLease,
    /// The mailbox's writes in flight, shared with their completions.
    writes: Arc<Writes>,
    /// What the mailbox stores plus what is being written, for the quota: an
    /// upper bound, because expiry and deletes outside the actor only lower
    /// the real figure. `None` until first counted, and after a delete.
    usage: Option<MailboxUsage>,
    /// When `usage` was last counted from the store.
    counted_at: Option<Instant>,
    last_activity: Instant,
    /// The inbound policy and this side's relationship records, loaded when
    /// the actor starts; every change goes through the actor.
    policy: InboundPolicy,
    relationships: HashMap<Address, Relationship>,
    /// The identity was deleted: everything is refused.
    deleted: bool,
    /// A retirement waiting for the writes in flight, with its answer.
    retiring: Option<(RetireReply, Deletion)>,
}

/// Where a retirement is answered.
type RetireReply = RpcReplyPort<Result<Option<Deletion>, MailboxError>>;

/// Arguments for spawning a mailbox actor.
pub struct MailboxArgs {
    /// The mailbox's address.
    pub address: Address,
    /// Shared context.
    pub context: Arc<MailboxContext>,
    /// Count the mailbox's usage at start, in the same blocking call as
    /// its other reads: the actor is started for a write, whose quota
    /// check needs the count at once.
    pub count_usage: bool,
}

impl Actor for MailboxActor {
    type Msg = MailboxMsg;
    type State = MailboxState;
    type Arguments = MailboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (store, log) = (args.context.directory.clone(), args.context.log.clone());
        let address = args.address;
        let count_usage = args.count_usage && !args.context.quota.is_unlimited();
        let now_ms = (args.context.clock)();
        let (durable_head, policy, relationships, deletion, usage) =
            tokio::task::spawn_blocking(move || {
                Ok::<_, StoreError>((
                    log.head_seq(&address)?,
                    store.inbound_policy(&address)?,
                    store.relationships(&address)?,
                    store.deletion(&address)?,
                    count_usage
                        .then(|| log.usage(&address, now_ms))
                        .transpose()?,
                ))
            })
            .await??;
        // Numbering goes on above every number handed out, durable or not.
        let assigned = args.context.assigned.get(&address).map_or(0, |seq| *seq);
        let policy = policy.unwrap_or(args.context.default_policy);
        // One timer at a time, re-armed by each check for the idle time
        // still owed: a mailbox written once is checked once.
        myself.send_after(args.context.idle_timeout.max(MIN_IDLE_CHECK), || {
            MailboxMsg::IdleCheck
        });
        metrics::gauge!("backbone_mailbox_actors").increment(1.0);
        Ok(MailboxState {
            address,
            watch: args.context.watches.attach(address, durable_head),
            context: args.context,
            last_seq: durable_head.max(assigned),
            writes: Arc::default(),
            counted_at: usage.map(|_| Instant::now()),
            usage,
            last_activity: Instant::now(),
            policy,
            relationships: relationships.into_iter().map(|r| (r.peer, r)).collect(),
            deleted: deletion.is_some_and(|d| d.is_tombstone()),
            retiring: None,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state
            .context
            .actors
            .remove_if(&state.address, |_, actor| actor.get_id() == myself.get_id());
        metrics::gauge!("backbone_mailbox_actors").decrement(1.0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MailboxMsg::Append { envelope, reply } => {
                state.last_activity = Instant::now();
                if state.deleted {
                    let _ = reply.send(Err(MailboxError::IdentityDeleted));
                    return Ok(());
                }
                // Sealed envelopes (no sender) were admitted by their
                // capability before they got here.
                if let Some(sender) = envelope.sender
                    && !relationship::admits(
                        state.policy,
                        &state.address,
                        &sender,
                        state.relationships.get(&sender),
                    )
                {
                    metrics::counter!("backbone_consent_refusals_total").increment(1);
                    let _ = reply.send(Err(MailboxError::NotConsented));
                    return Ok(());
                }
                if let Some(refusal) = state.admit(envelope.envelope.len() as u64).await? {
                    metrics::counter!("backbone_quota_refusals_total").increment(1);
                    let _ = reply.send(Err(MailboxError::QuotaExceeded(refusal)));
                    return Ok(());
                }
                state.submit(&myself, envelope, reply);
            }
            MailboxMsg::SetPolicy { policy, reply } => {
                state.last_activity = Instant::now();
                if state.deleted {
                    let _ = reply.send(Err(MailboxError::IdentityDeleted));
                    return Ok(());
                }
                let (store, address) = (state.context.directory.clone(), state.address);
                let (written, held) = tokio::task::spawn_blocking(move || {
                    let written = store
                        .set_inbound_policy(&address, policy)
                        .and_then(|()| store.sync());
                    // A failed write or flush may still have reached the
                    // store: what the actor admits follows what is stored,
                    // so it reads the policy back.
                    let held = match &written {
                        Ok(()) => Ok(Some(policy)),
                        Err(_) => store.inbound_policy(&address),
                    };
                    (written, held)
                })
                .await?;
                match held {
                    Ok(held) => state.policy = held.unwrap_or(state.context.default_policy),
                    Err(error) => {
                        tracing::warn!(%error, "the inbound policy could not be read back")
                    }
                }
                let _ = reply.send(written.map_err(MailboxError::Store));
            }
            MailboxMsg::Relationship {
                peer,
                change,
                reply,
            } => {
                state.last_activity = Instant::now();
                if state.deleted {
                    let _ = reply.send(Err(MailboxError::IdentityDeleted));
                    return Ok(());
                }
                match state.change_relationship(peer, change).await? {
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                    Ok((record, None)) => {
                        let _ = reply.send(Ok(record));
                    }
                    Ok((record, Some(notice))) => {
                        // Answer once the notice is durable too.
                        let (tx, rx) = oneshot::channel();
                        state.submit_notice(&myself, peer, &notice, tx.into())?;
                        tokio::spawn(async move {
                            let outcome = match rx.await {
                                Ok(Ok(_)) => Ok(record),
                                Ok(Err(error)) => Err(error),
                                Err(_) => Err(MailboxError::Unavailable(
                                    "the mailbox stopped before the notice was stored".into(),
                                )),
                            };
                            let _ = reply.send(outcome);
                        });
                    }
                }
            }
            MailboxMsg::Drained => {
                if state.writes.pending() == 0
                    && let Some((reply, tombstone)) = state.retiring.take()
                {
                    state.stop_retired(&myself, reply, tombstone);
                }
            }
            MailboxMsg::Unwritten { bytes } => {
                // Not stored (or not durably): stop counting it. A partial
                // write that did become visible is found by the next recount.
                if let Some(usage) = &mut state.usage {
                    usage.envelopes = usage.envelopes.saturating_sub(1);
                    usage.bytes = usage.bytes.saturating_sub(bytes);
                }
            }
            MailboxMsg::Retire { now_ms, reply } => {
                let to_tell: Vec<PeerToTell> = state
                    .relationships
                    .values()
                    .filter(|r| !r.state.is_final())
                    .map(|r| PeerToTell {
                        peer: r.peer,
                        relationship: r.id,
                    })
                    .collect();
                let (store, address) = (state.context.directory.clone(), state.address);
                let begun = tokio::task::spawn_blocking(move || {
                    let begun = store.begin_purge(&address, now_ms, &to_tell)?;
                    store.sync()?;
                    Ok::<_, StoreError>(begun)
                })
                .await?;
                match begun {
                    Ok(Some(tombstone)) => {
                        state.deleted = true;
                        // Asked to be told before looking: the last
                        // completion either sees the request or finished
                        // before the look.
                        state.writes.tell_when_drained();
                        if state.writes.pending() == 0 {
                            state.stop_retired(&myself, reply, tombstone);
                        } else {
                            state.retiring = Some((reply, tombstone));
                        }
                    }
                    Ok(None) => {
                        let _ = reply.send(Ok(None));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(MailboxError::Store(error)));
                    }
                }
            }
            MailboxMsg::Freed => state.usage = None,
            MailboxMsg::IdleCheck => {
                // Subscribed devices do not keep the actor: the watch outlives
                // it, and the next write starts an actor that takes it over.
                let timeout = state.context.idle_timeout;
                let quiet = state.last_activity.elapsed();
                let pending = state.writes.pending() > 0;
                if pending || quiet < timeout {
                    let next = if pending {
                        timeout / 2
                    } else {
                        timeout - quiet
                    };
                    myself.send_after(next.max(MIN_IDLE_CHECK), || MailboxMsg::IdleCheck);
                } else {
                    // Leave the registry first so new callers spawn a fresh actor;
                    // any message still queued here is dropped and its caller retries.
                    state
                        .context
                        .actors
                        .remove_if(&state.address, |_, actor| actor.get_id() == myself.get_id());
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

impl MailboxState {
    /// The mailbox's address.
    pub(crate) fn address(&self) -> Address {
        self.address
    }

    /// Answers a retirement and stops: the identity is deleted and no
    /// write of its mailbox is in flight. The registry forgets the actor
    /// first, so the next caller spawns a fresh one, which finds the
    /// tombstone and refuses.
    fn stop_retired(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        reply: RetireReply,
        tombstone: Deletion,
    ) {
        self.context
            .actors
            .remove_if(&self.address, |_, actor| actor.get_id() == myself.get_id());
        let _ = reply.send(Ok(Some(tombstone)));
        myself.stop(Some("identity deleted".into()));
    }

    /// Numbers `envelope`, hands it to the writer, and answers `reply` with
    /// its sequence number once durable.
    ///
    /// The completion runs on the log's sync thread, in log order (so in
    /// sequence order for this mailbox): it answers the sender, publishes
    /// the envelope to the mailbox's watch and settles the write's
    /// accounting ([`Writes`]) itself, without a message to the actor; the
    /// actor hears of it only when a retirement waits for its writes, or an
    /// append failed.
    fn submit(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        mut envelope: StoredEnvelope,
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    ) {
        self.last_seq += 1;
        envelope.seq = self.last_seq;
        let (seq, len) = (envelope.seq, envelope.envelope.len() as u64);
        let counted = !self.context.quota.is_unlimited();
        self.writes.started(counted.then_some(len));
        self.context.assigned.insert(self.address, seq);
        let envelope = Arc::new(envelope);
        let item = Append {
            address: self.address,
            envelope: envelope.clone(),
        };
        let (actor, writes, watch) = (myself.clone(), self.writes.clone(), self.watch.clone());
        let (context, address) = (self.context.clone(), self.address);
        self.context
            .writer
            .submit_append_then(vec![item], move |result| {
                let durable = result.is_ok();
                let _ = reply.send(result.map(|()| seq).map_err(MailboxError::Store));
                if durable {
                    watch.publish(&envelope);
                } else if counted {
                    let _ = actor.cast(MailboxMsg::Unwritten { bytes: len });
                }
                drop(watch);
                if writes.finished(counted.then_some(len)) {
                    // Every number handed out is durable (or failed): the
                    // log's head covers them from here, unless the actor
                    // numbered another meanwhile.
                    context
                        .assigned
                        .remove_if(&address, |_, assigned| *assigned == seq);
                    if writes.drain_awaited() {
                        let _ = actor.cast(MailboxMsg::Drained);
                    }
                }
            });
    }

    /// Stores a broker notice about `peer` in this mailbox, past the inbound
    /// policy and the quota (a notice is the broker's, and small), but
    /// counted in the mailbox's usage like any envelope.
    fn submit_notice(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        peer: Address,
        notice: &Notice,
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    ) -> Result<(), ActorProcessingErr> {
        let bytes = notice
            .to_envelope()
            .map_err(|error| format!("cannot encode a notice: {error}"))?;
        let len = bytes.len() as u64;
        if let Some(usage) = &mut self.usage {
            usage.envelopes += 1;
            usage.bytes += len;
        }
        let now = (self.context.clock)();
        let envelope = StoredEnvelope {
            seq: 0,
            message_id: MessageId::random(),
            sender: Some(peer),
            stored_at_ms: now,
            expires_at_ms: now + self.context.notice_ttl.as_millis() as u64,
            envelope: bytes,
        };
        self.submit(myself, envelope, reply);
        Ok(())
    }

    /// Checks `change` to the relationship with `peer` against this side's
    /// record and, if it changes anything, stores the new record durably.
    /// Returns the record and the notice to store, or `None` for the notice
    /// when the change was already applied (a retry). The outer error is
    /// the actor's own failure; the inner one is the caller's answer.
    async fn change_relationship(
        &mut self,
        peer: Address,
        change: SideChange,
    ) -> Result<Result<(Relationship, Option<Notice>), MailboxError>, ActorProcessingErr> {
        let refuse =
            |code: ErrorCode, message: String| Ok(Err(MailboxError::Refused { code, message }));
        if peer == self.address {
            return refuse(
                ErrorCode::InvalidRecipients,
                "an identity has no relationship with itself".into(),
            );
        }
        let existing = self.relationships.get(&peer).copied();
        let now = (self.context.clock)();
        let mut intro = None;
        let mut peer_deleted = false;
        let record = match change {
            SideChange::Request {
                capability_hash,
                intro: introduction,
            } => {
                let (store, address) = (self.context.directory.clone(), self.address);
                let known = tokio::task::spawn_blocking(move || {
                    store.has_capability(&address, &capability_hash)
                })
                .await?;
                match known {
                    Ok(true) => {}
                    Ok(false) => {
                        return refuse(
                            ErrorCode::UnknownCapability,
                            "the template's capability is not registered with this mailbox (revoked, or never valid)".into(),
                        );
                    }
                    Err(error) => return Ok(Err(MailboxError::Store(error))),
                }
                match relationship::request(existing.as_ref()) {
                    Err(error) => return refuse(ErrorCode::InvalidTransition, error.to_string()),
                    Ok(RequestOutcome::AlreadyPending(record)) => return Ok(Ok((record, None))),
                    Ok(RequestOutcome::New) => {}
                }
                intro = Some(introduction);
                Relationship {
                    id: RelationshipId::random(),
                    peer,
                    role: Role::Owner,
                    state: State::Pending,
                    changed_at_ms: now,
                }
            }
            SideChange::Requested { id } => {
                if let Some(record) = existing.filter(|r| r.id == id) {
                    return Ok(Ok((record, None)));
                }
                // The owner's side accepted the request, so whatever this
                // side still held for the peer is superseded.
                Relationship {
                    id,
                    peer,
                    role: Role::Requester,
                    state: State::Pending,
                    changed_at_ms: now,
                }
            }
            SideChange::Decide {
                id,
                decision,
                by_peer,
            } => {
                let Some(record) = existing.filter(|r| r.id == id) else {
                    return refuse(
                        ErrorCode::NotFound,
                        "no such relationship with this identity".into(),
                    );
                };
                let decider = if by_peer {
                    record.role.other()
                } else {
                    record.role
                };
                match relationship::decide(record.state, decider, decision) {
                    Ok(state) => Relationship {
                        state,
                        changed_at_ms: now,
                        ..record
                    },
                    // A retry of a change this side already took.
                    Err(_) if by_peer && record.state == target(decision) => {
                        return Ok(Ok((record, None)));
                    }
                    Err(error) => return refuse(ErrorCode::InvalidTransition, error.to_string()),
                }
            }
            SideChange::PeerDeleted { id } => {
                let Some(record) = existing.filter(|r| r.id == id) else {
                    return refuse(
                        ErrorCode::NotFound,
                        "no such relationship with this identity".into(),
                    );
                };
                let state = relationship::peer_deleted(record.state);
                if state == record.state {
                    // Ended before, or a retry: nothing changes, nobody is told.
                    return Ok(Ok((record, None)));
                }
                peer_deleted = true;
                Relationship {
                    state,
                    changed_at_ms: now,
                    ..record
                }
            }
        };
        let (store, address) = (self.context.directory.clone(), self.address);
        let written = tokio::task::spawn_blocking(move || {
            store.put_relationship(&address, &record)?;
            store.sync()
        })
        .await?;
        if let Err(error) = written {
            // The record may or may not have reached the store: read back
            // what is there, so the view admits by what a restart would see.
            let (store, address) = (self.context.directory.clone(), self.address);
            let stored =
                tokio::task::spawn_blocking(move || store.relationships(&address)).await??;
            self.relationships = stored.into_iter().map(|r| (r.peer, r)).collect();
            return Ok(Err(MailboxError::Store(error)));
        }
        self.relationships.insert(peer, record);
        metrics::counter!("backbone_relationship_changes_total", "state" => state_name(record.state))
            .increment(1);
        let notice = if peer_deleted {
            Notice::IdentityDeleted {
                relationship: record,
            }
        } else {
            Notice::Relationship {
                relationship: record,
                intro,
            }
        };
        Ok(Ok((record, Some(notice))))
    }

    /// Checks one more envelope of `len` bytes against the quota and counts
    /// it; returns why it is refused instead, if it is. Counting reads the
    /// whole mailbox, so it happens when the actor first needs it, after a
    /// delete, and, while the mailbox looks full, at most once per
    /// [`RECOUNT_INTERVAL`] to notice room freed by expiry.
    async fn admit(&mut self, len: u64) -> Result<Option<String>, ActorProcessingErr> {
        let quota = self.context.quota;
        if quota.is_unlimited() {
            return Ok(None);
        }
        let stale = self
            .counted_at
            .is_none_or(|at| at.elapsed() >= RECOUNT_INTERVAL);
        let full = |usage: Option<MailboxUsage>| usage.and_then(|u| quota.refusal(u, len));
        if self.usage.is_none() || (full(self.usage).is_some() && stale) {
            let store = self.context.log.clone();
            let (address, now_ms) = (self.address, (self.context.clock)());
            let counted =
                tokio::task::spawn_blocking(move || store.usage(&address, now_ms)).await??;
            // Appends in flight may or may not be in the store's count yet;
            // adding them keeps the figure an upper bound.
            let in_flight = self.writes.in_flight();
            self.usage = Some(MailboxUsage {
                envelopes: counted.envelopes + in_flight.envelopes,
                bytes: counted.bytes + in_flight.bytes,
            });
            self.counted_at = Some(Instant::now());
        }
        if let Some(refusal) = full(self.usage) {
            return Ok(Some(refusal));
        }
        if let Some(usage) = &mut self.usage {
            usage.envelopes += 1;
            usage.bytes += len;
        }
        Ok(None)
    }
}

/// The state a decision leads to.
fn target(decision: relationship::Decision) -> State {
    match decision {
        relationship::Decision::Accept => State::Active,
        relationship::Decision::Reject => State::Rejected,
        relationship::Decision::Terminate => State::Terminated,
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Pending => "pending",
        State::Active => "active",
        State::Rejected => "rejected",
        State::Terminated => "terminated",
    }
}

/// Why the registry could not complete a mailbox operation.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// Storage failed; nothing was acknowledged.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// The mailbox holds as much as its quota allows.
    #[error("mailbox quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The mailbox's inbound policy does not admit the sender.
    #[error("the recipient accepts envelopes only from identities it has a relationship with")]
    NotConsented,
    /// The mailbox's identity was deleted.
    #[error("this identity was deleted")]
    IdentityDeleted,
    /// A policy or relationship request the mailbox refuses.
    #[error("{message}")]
    Refused {
        /// The wire code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The actor did not answer in time.
    #[error("mailbox did not answer in time")]
    Timeout,
    /// The actor could not be spawned or reached.
    #[error("mailbox unavailable: {0}")]
    Unavailable(String),
}

impl MailboxError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MailboxError::Store(_) => ErrorCode::StorageFailure,
            MailboxError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            MailboxError::NotConsented => ErrorCode::NotConsented,
            MailboxError::IdentityDeleted => ErrorCode::IdentityDeleted,
            MailboxError::Refused { code, .. } => *code,
            MailboxError::Timeout => ErrorCode::Overloaded,
            MailboxError::Unavailable(_) => ErrorCode::Internal,
        }
    }
}

/// Finds or spawns the mailbox actor of an address.
pub struct Registry {
    context: Arc<MailboxContext>,
    supervisor: Option<ActorCell>,
    next_subscriber: AtomicU64,
    call_timeout: Duration,
}

impl Registry {
    /// A registry whose actors are linked to `supervisor`.
    pub fn new(context: Arc<MailboxContext>, supervisor: Option<ActorCell>) -> Self {
        Self {
            context,
            supervisor,
            next_subscriber: AtomicU64::new(1),
            call_timeout: Duration::from_secs(30),
        }
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<MailboxContext> {
        &self.context
    }

    /// How many mailbox actors are alive.
    pub fn active(&self) -> usize {
        self.context.actors.len()
    }

    /// How many mailboxes have a watch: an actor or a subscribed device.
    pub fn watched(&self) -> usize {
        self.context.watches.len()
    }

    /// A fresh subscriber id.
    pub fn next_subscriber_id(&self) -> u64 {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    /// The running actor of `address`, or a new one (see
    /// [`MailboxArgs::count_usage`] for `for_write`).
    async fn actor(
        &self,
        address: &Address,
        for_write: bool,
    ) -> Result<ActorRef<MailboxMsg>, MailboxError> {
        if let Some(actor) = self.context.actors.get(address) {
            return Ok(actor.clone());
        }
        let args = MailboxArgs {
            address: *address,
            context: self.context.clone(),
            count_usage: for_write,
        };
        let spawned = match &self.supervisor {
            Some(supervisor) => {
                Actor::spawn_linked(None, MailboxActor, args, supervisor.clone()).await
            }
            None => Actor::spawn(None, MailboxActor, args).await,
        };
        let (actor, _handle) =
            spawned.map_err(|error| MailboxError::Unavailable(error.to_string()))?;
        match self.context.actors.entry(*address) {
            dashmap::Entry::Occupied(existing) => {
                // Another caller won the race; ours never received a message.
                actor.stop(None);
                Ok(existing.get().clone())
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(actor.clone());
                Ok(actor)
            }
        }
    }

    /// Calls the mailbox actor, respawning it once if it stopped in between.
    async fn call<T: Send + 'static>(
        &self,
        address: &Address,
        build: impl Fn(RpcReplyPort<T>) -> MailboxMsg,
    ) -> Result<T, MailboxError> {
        self.call_for(address, false, Some(self.call_timeout), build)
            .await
    }

    /// [`Registry::call`], telling a new actor whether it starts for a
    /// write, with `timeout` (`None`: as long as the actor takes).
    async fn call_for<T: Send + 'static>(
        &self,
        address: &Address,
        for_write: bool,
        timeout: Option<Duration>,
        build: impl Fn(RpcReplyPort<T>) -> MailboxMsg,
    ) -> Result<T, MailboxError> {
        for _ in 0..3 {
            let actor = self.actor(address, for_write).await?;
            match actor.call(&build, timeout).await {
                Ok(ractor::rpc::CallResult::Success(value)) => return Ok(value),
                Ok(ractor::rpc::CallResult::Timeout) => return Err(MailboxError::Timeout),
                Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                    self.context
                        .actors
                        .remove_if(address, |_, a| a.get_id() == actor.get_id());
                }
            }
        }
        Err(MailboxError::Unavailable(
            "mailbox actor kept stopping".into(),
        ))
    }

    /// Appends to a mailbox; returns the sequence number once durable.
    ///
    /// Without a timeout of its own: the actor answers every append once
    /// the log reports it (or refuses it at once), so the wait is the log's,
    /// and a timer per envelope would cost more than the rest of the call.
    /// A client that gives up waits on its own request timeout; the append
    /// stays counted against the session's requests in progress until then.
    pub async fn append(
        &self,
        address: &Address,
        envelope: StoredEnvelope,
    ) -> Result<u64, MailboxError> {
        self.call_for(address, true, None, |reply| MailboxMsg::Append {
            envelope: envelope.clone(),
            reply,
        })
        .await?
    }

    /// Sets the mailbox's inbound policy, durably.
    pub async fn set_policy(
        &self,
        address: &Address,
        policy: InboundPolicy,
    ) -> Result<(), MailboxError> {
        self.call(address, |reply| MailboxMsg::SetPolicy { policy, reply })
            .await?
    }

    /// Applies a relationship change to `address`'s side (see
    /// [`MailboxMsg::Relationship`]); returns that side's record afterwards.
    pub async fn change_relationship(
        &self,
        address: &Address,
        peer: Address,
        change: SideChange,
    ) -> Result<Relationship, MailboxError> {
        self.call(address, |reply| MailboxMsg::Relationship {
            peer,
            change: change.clone(),
            reply,
        })
        .await?
    }

    /// Begins the purge of `address` through its mailbox actor if its
    /// deletion is due (see [`MailboxMsg::Retire`]); returns the tombstone,
    /// or `None` when nothing is due.
    pub async fn retire(
        &self,
        address: &Address,
        now_ms: u64,
    ) -> Result<Option<Deletion>, MailboxError> {
        self.call(address, |reply| MailboxMsg::Retire { now_ms, reply })
            .await?
    }

    /// Tells a live mailbox actor that envelopes were deleted outside it, so
    /// its quota count is taken again.
    pub fn freed(&self, address: &Address) {
        if let Some(actor) = self.context.actors.get(address) {
            let _ = actor.cast(MailboxMsg::Freed);
        }
    }

    /// Subscribes a device session to its mailbox; the subscription ends
    /// when dropped. Never starts the mailbox's actor.
    pub async fn subscribe(
        &self,
        address: &Address,
        id: u64,
        queue: Arc<PushQueue>,
    ) -> Result<Subscription, MailboxError> {
        let watches = &self.context.watches;
        let head = || {
            let (log, owner) = (self.context.log.clone(), *address);
            async move {
                tokio::task::spawn_blocking(move || log.head_seq(&owner))
                    .await
                    .map_err(|error| MailboxError::Unavailable(error.to_string()))?
                    .map_err(MailboxError::Store)
            }
        };
        let lease = match watches.existing(address) {
            Some(lease) => lease,
            None => watches.attach(*address, head().await?),
        };
        lease.add(Subscriber { id, queue });
        // Read again now that the subscription is in place: an envelope
        // made durable from here on is pushed to it, one made durable
        // before is below this head.
        lease.raise(head().await?);
        Ok(Subscription { lease, id })
    }

    /// Stops every actor (shutdown).
    pub fn stop_all(&self) {
        for actor in self.context.actors.iter() {
            actor.stop(Some("shutdown".into()));
        }
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
