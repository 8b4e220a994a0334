//! Mailboxes: a plain core of rules, an actor around it, and the registry
//! that starts them on demand.
//!
//! One actor per *active* address. Its [`core::Core`] holds the mailbox's
//! rules and state (sequence numbers, quota, consent, deletion, idleness)
//! with no I/O; the actor performs what the core cannot: reads from the
//! store when it starts, recounts for the quota, policy and relationship
//! changes, retirement, the idle timer. A session's append does not go
//! through the actor's queue: it takes the core's lock, and the core numbers
//! the envelope and the session hands it to the log under that lock (one
//! hand-off less per envelope). While the actor performs a change appends
//! must not overtake (a relationship, a retirement, a recount), the core is
//! busy and appends queue behind the change at the actor instead.
//!
//! An append's completion runs on the log's sync thread, in log order (so in
//! sequence order for the mailbox): it answers the sender, publishes the
//! envelope to the watch and settles the mailbox's [`Writes`] there. An
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
//! The actor of a deleted identity refuses everything with `IdentityDeleted`:
//! it learns so when it starts (the store holds the tombstone) or when the
//! purge begins through it ([`MailboxMsg::Retire`]), so that no append or
//! relationship change slips in between the tombstone and the purge.
//!
//! **Architecture Invariant:** at most one core numbers a mailbox's
//! envelopes. A core is marked stopped before its mailbox leaves the
//! registry ([`MailboxContext::forget`]), and a stopped core defers every
//! append, so the next actor, which numbers on from the log's head and the
//! numbers still in flight ([`MailboxContext::assigned`]), starts after the
//! last number the old core handed out.

mod core;
mod watch;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use backbone_protocol::Address;
use backbone_protocol::bytes::{MessageId, RelationshipId};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::frame::ErrorCode;
use backbone_protocol::relationship::{
    self, InboundPolicy, Notice, Relationship, RequestOutcome, Role, SideChange, State,
};
use dashmap::DashMap;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

pub use self::core::MailboxQuota;
use self::core::{Admission, Caller, Core, Idle, MIN_IDLE_CHECK, Start};
pub use self::watch::{PushQueue, Subscriber, Subscription, Watch, WatchLease, Watches};
use crate::shared::Clock;
use crate::store::prelude::*;
use crate::store::{Append, MailboxUsage, StoreError, StoredEnvelope, WriteHandle};

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
    /// Number, store, and answer once durable with the sequence number: an
    /// append the core did not take directly (no actor ran, the core was
    /// busy, or the quota needs a count first).
    Append {
        /// The envelope; `seq` is assigned by the core.
        envelope: StoredEnvelope,
        /// Answered after the flush, or at once if the mailbox is full.
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    },
    /// Internal: the mailbox's last write in flight completed while a
    /// retirement waited for it (see [`Writes`]).
    Drained,
    /// Internal: an append failed in the log; it no longer counts in the
    /// mailbox's usage. A message, not a lock of the core, because a
    /// completion may run inside the submission, which holds that lock.
    Unwritten {
        /// The envelope's length.
        bytes: u64,
    },
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
    /// The running mailboxes, by address. Leave only through
    /// [`MailboxContext::forget`].
    pub actors: DashMap<Address, Arc<Mailbox>>,
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
    /// Counts mailboxes forgotten, by a stripe of their address, so that an
    /// actor started from reads that a forgotten one has since outdated
    /// is not registered (see [`Registry::actor`]).
    pub forgotten: Forgotten,
}

/// How many mailboxes left the registry, counted in stripes by address:
/// enough stripes (32 KiB of counters) that a start is rarely outdated by
/// another mailbox than its own, even while many stop at once.
#[derive(Debug)]
pub struct Forgotten(Box<[AtomicU64; 4096]>);

impl Default for Forgotten {
    fn default() -> Self {
        Self(Box::new(std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

impl Forgotten {
    fn stripe(&self, address: &Address) -> &AtomicU64 {
        let stripe = usize::from(u16::from_le_bytes([address.0[0], address.0[1]]));
        &self.0[stripe % self.0.len()]
    }

    /// The count of `address`'s stripe.
    fn of(&self, address: &Address) -> u64 {
        self.stripe(address).load(Ordering::SeqCst)
    }

    fn count(&self, address: &Address) {
        self.stripe(address).fetch_add(1, Ordering::SeqCst);
    }
}

impl MailboxContext {
    /// Takes `mailbox` out of the registry: its core is stopped first, so no
    /// append numbered by it can follow the numbers of the next actor.
    pub fn forget(&self, mailbox: &Arc<Mailbox>) {
        mailbox.core().stop();
        self.actors.remove_if(&mailbox.address, |address, running| {
            let registered = Arc::ptr_eq(running, mailbox);
            if registered {
                // Counted under the slot's lock, before it is empty: whoever
                // finds it empty sees the count.
                self.forgotten.count(address);
            }
            registered
        });
    }

    /// [`MailboxContext::forget`] for the mailbox whose actor is `actor`,
    /// when only its id is known (a failed actor).
    pub fn forget_actor(&self, actor: ActorId) {
        let found: Vec<Arc<Mailbox>> = self
            .actors
            .iter()
            .filter(|running| running.actor.get_id() == actor)
            .map(|running| running.value().clone())
            .collect();
        for mailbox in &found {
            self.forget(mailbox);
        }
    }
}

/// One running mailbox, shared by its actor and the sessions appending to
/// it: its core, its writes in flight and its watch.
#[derive(Debug)]
pub struct Mailbox {
    address: Address,
    actor: ActorRef<MailboxMsg>,
    core: Mutex<Core>,
    writes: Arc<Writes>,
    watch: WatchLease,
}

/// Where an append is answered.
type AppendReply = RpcReplyPort<Result<u64, MailboxError>>;

/// An append the core did not take now, given back with its answer.
enum NotNow {
    /// The quota needs a count first (only the actor takes it).
    Recount(StoredEnvelope, AppendReply),
    /// The actor is busy or stopped: go through its queue (the answer was
    /// dropped: through the actor, it is answered there; at a stopped
    /// actor, its caller goes through the registry again).
    Deferred(StoredEnvelope),
}

impl Mailbox {
    /// The mailbox's actor.
    pub fn actor(&self) -> &ActorRef<MailboxMsg> {
        &self.actor
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // Every change of the core is complete before it can panic.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the core busy until the guard is dropped (see [`Core::set_busy`]).
    fn busy(&self) -> Busy<'_> {
        self.core().set_busy(true);
        Busy(self)
    }

    /// Appends `envelope` if the core takes it now: numbered and handed to
    /// the log under the core's lock, or refused; `reply` is answered
    /// either way. Otherwise gives both back.
    // The error gives the envelope back by value, on the rare way through
    // the actor; boxing it would allocate for that.
    #[allow(clippy::result_large_err)]
    fn try_append(
        &self,
        context: &Arc<MailboxContext>,
        caller: Caller,
        envelope: StoredEnvelope,
        reply: AppendReply,
    ) -> Result<(), NotNow> {
        let len = envelope.envelope.len() as u64;
        let mut core = self.core();
        let refusal = match core.admit(caller, envelope.sender.as_ref(), len, Instant::now()) {
            Admission::Numbered { seq, counted } => {
                self.submit(context, envelope, seq, counted, reply);
                drop(core);
                return Ok(());
            }
            Admission::Recount => return Err(NotNow::Recount(envelope, reply)),
            Admission::Deferred => return Err(NotNow::Deferred(envelope)),
            Admission::Deleted => MailboxError::IdentityDeleted,
            Admission::NotConsented => {
                metrics::counter!("backbone_consent_refusals_total").increment(1);
                MailboxError::NotConsented
            }
            Admission::OverQuota(why) => {
                metrics::counter!("backbone_quota_refusals_total").increment(1);
                MailboxError::QuotaExceeded(why)
            }
        };
        drop(core);
        let _ = reply.send(Err(refusal));
        Ok(())
    }

    /// Hands `envelope`, numbered `seq` by the core, to the log; answers
    /// `reply` with `seq` once durable. Called under the core's lock, so
    /// that the mailbox's appends reach the log in sequence order.
    ///
    /// The completion runs on the log's sync thread, in log order: it
    /// answers the sender, publishes the envelope to the mailbox's watch
    /// and settles the write's accounting ([`Writes`]) itself; the actor
    /// hears of it only when a retirement waits for its writes, or an
    /// append failed.
    fn submit(
        &self,
        context: &Arc<MailboxContext>,
        mut envelope: StoredEnvelope,
        seq: u64,
        counted: Option<u64>,
        reply: AppendReply,
    ) {
        envelope.seq = seq;
        self.writes.started(counted);
        context.assigned.insert(self.address, seq);
        let envelope = Arc::new(envelope);
        let item = Append {
            address: self.address,
            envelope: envelope.clone(),
        };
        let (actor, writes, watch) = (self.actor.clone(), self.writes.clone(), self.watch.clone());
        let (shared, address) = (context.clone(), self.address);
        context
            .writer
            .submit_append_then(vec![item], move |result| {
                let durable = result.is_ok();
                let _ = reply.send(result.map(|()| seq).map_err(MailboxError::Store));
                if durable {
                    watch.publish(&envelope);
                } else if let Some(bytes) = counted {
                    let _ = actor.cast(MailboxMsg::Unwritten { bytes });
                }
                drop(watch);
                if writes.finished(counted) {
                    // Every number handed out is durable (or failed): the
                    // log's head covers them from here, unless the core
                    // numbered another meanwhile.
                    shared
                        .assigned
                        .remove_if(&address, |_, assigned| *assigned == seq);
                    if writes.drain_awaited() {
                        let _ = actor.cast(MailboxMsg::Drained);
                    }
                }
            });
    }
}

/// The core is busy while this lives (see [`Mailbox::busy`]).
struct Busy<'a>(&'a Mailbox);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.core().set_busy(false);
    }
}

/// The mailbox actor; holds no state of its own (see [`MailboxState`]).
pub struct MailboxActor;

/// Per-mailbox state, built in `pre_start`.
pub struct MailboxState {
    /// The core, the writes and the watch, shared with appending sessions.
    mailbox: Arc<Mailbox>,
    context: Arc<MailboxContext>,
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
    /// Where `pre_start` leaves the running mailbox for the registry.
    pub started: Arc<OnceLock<Arc<Mailbox>>>,
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
        // Numbering goes on above every number handed out, durable or not.
        // Read before the log's head: an entry leaves only once its writes
        // are durable, so a number missing here is under the head read
        // next. (Read after, the writes of an actor that was killed could
        // become durable between the two reads, and be under neither.)
        let assigned = args.context.assigned.get(&address).map_or(0, |seq| *seq);
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
        // One timer at a time, re-armed by each check for the idle time
        // still owed: a mailbox written once is checked once.
        myself.send_after(args.context.idle_timeout.max(MIN_IDLE_CHECK), || {
            MailboxMsg::IdleCheck
        });
        metrics::gauge!("backbone_mailbox_actors").increment(1.0);
        let core = Core::new(Start {
            address,
            quota: args.context.quota,
            last_seq: durable_head.max(assigned),
            usage,
            policy: policy.unwrap_or(args.context.default_policy),
            relationships,
            deleted: deletion.is_some_and(|d| d.is_tombstone()),
            now: Instant::now(),
        });
        let mailbox = Arc::new(Mailbox {
            address,
            actor: myself,
            core: Mutex::new(core),
            writes: Arc::default(),
            watch: args.context.watches.attach(address, durable_head),
        });
        let _ = args.started.set(mailbox.clone());
        Ok(MailboxState {
            mailbox,
            context: args.context,
            retiring: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.context.forget(&state.mailbox);
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
            MailboxMsg::Append { envelope, reply } => state.append(envelope, reply).await?,
            MailboxMsg::SetPolicy { policy, reply } => {
                let busy = state.mailbox.busy();
                state.mailbox.core().touched(Instant::now());
                if state.mailbox.core().deleted() {
                    let _ = reply.send(Err(MailboxError::IdentityDeleted));
                    return Ok(());
                }
                let (store, address) = (state.context.directory.clone(), state.mailbox.address);
                let (written, held) = tokio::task::spawn_blocking(move || {
                    let written = store
                        .set_inbound_policy(&address, policy)
                        .and_then(|()| store.sync());
                    // A failed write or flush may still have reached the
                    // store: what the core admits follows what is stored,
                    // so it reads the policy back.
                    let held = match &written {
                        Ok(()) => Ok(Some(policy)),
                        Err(_) => store.inbound_policy(&address),
                    };
                    (written, held)
                })
                .await?;
                match held {
                    Ok(held) => {
                        state.mailbox.core().policy = held.unwrap_or(state.context.default_policy);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the inbound policy could not be read back")
                    }
                }
                drop(busy);
                let _ = reply.send(written.map_err(MailboxError::Store));
            }
            MailboxMsg::Relationship {
                peer,
                change,
                reply,
            } => {
                let busy = state.mailbox.busy();
                state.mailbox.core().touched(Instant::now());
                if state.mailbox.core().deleted() {
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
                        state.submit_notice(peer, &notice, tx.into())?;
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
                drop(busy);
            }
            MailboxMsg::Drained => {
                if state.mailbox.writes.pending() == 0
                    && let Some((reply, tombstone)) = state.retiring.take()
                {
                    state.stop_retired(&myself, reply, tombstone);
                }
            }
            MailboxMsg::Unwritten { bytes } => state.mailbox.core().unwritten(bytes),
            MailboxMsg::Retire { now_ms, reply } => {
                let busy = state.mailbox.busy();
                let to_tell: Vec<PeerToTell> = state
                    .mailbox
                    .core()
                    .relationships
                    .values()
                    .filter(|r| !r.state.is_final())
                    .map(|r| PeerToTell {
                        peer: r.peer,
                        relationship: r.id,
                    })
                    .collect();
                let (store, address) = (state.context.directory.clone(), state.mailbox.address);
                let begun = tokio::task::spawn_blocking(move || {
                    let begun = store.begin_purge(&address, now_ms, &to_tell)?;
                    store.sync()?;
                    Ok::<_, StoreError>(begun)
                })
                .await?;
                if let Ok(Some(_)) = &begun {
                    // Before the core stops being busy: no session's append
                    // is numbered after the tombstone.
                    state.mailbox.core().mark_deleted();
                }
                drop(busy);
                match begun {
                    Ok(Some(tombstone)) => {
                        let writes = &state.mailbox.writes;
                        // Asked to be told before looking: the last
                        // completion either sees the request or finished
                        // before the look.
                        writes.tell_when_drained();
                        if writes.pending() == 0 {
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
            MailboxMsg::IdleCheck => {
                let timeout = state.context.idle_timeout;
                // Read under the core's lock, which every submission holds
                // while it counts its write.
                let idle = {
                    let mut core = state.mailbox.core();
                    let pending = state.mailbox.writes.pending() > 0;
                    core.idle_check(Instant::now(), timeout, pending)
                };
                match idle {
                    Idle::CheckAfter(next) => {
                        myself.send_after(next, || MailboxMsg::IdleCheck);
                    }
                    Idle::Stop => {
                        // Leave the registry first so new callers spawn a
                        // fresh actor; any message still queued here is
                        // dropped and its caller retries.
                        state.context.forget(&state.mailbox);
                        myself.stop(Some("idle".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl MailboxState {
    /// The running mailbox.
    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// An append that came through the actor's queue: the core was busy,
    /// or needs a count of the mailbox first, which this takes.
    async fn append(
        &mut self,
        envelope: StoredEnvelope,
        reply: AppendReply,
    ) -> Result<(), ActorProcessingErr> {
        let (envelope, reply) =
            match self
                .mailbox
                .try_append(&self.context, Caller::Actor, envelope, reply)
            {
                Ok(()) => return Ok(()),
                // Stopped: dropping the answer sends the caller through
                // the registry again, to the next actor.
                Err(NotNow::Deferred(_)) => return Ok(()),
                Err(NotNow::Recount(envelope, reply)) => (envelope, reply),
            };
        self.recount().await?;
        match self
            .mailbox
            .try_append(&self.context, Caller::Actor, envelope, reply)
        {
            Ok(()) | Err(NotNow::Deferred(_)) => {}
            Err(NotNow::Recount(_, reply)) => {
                // Just counted: the core asks again only after a second.
                let _ = reply.send(Err(MailboxError::Unavailable(
                    "the mailbox's usage could not be counted".into(),
                )));
            }
        }
        Ok(())
    }

    /// Counts what the mailbox stores, for the quota; appends wait at the
    /// actor meanwhile.
    async fn recount(&mut self) -> Result<(), ActorProcessingErr> {
        let _busy = self.mailbox.busy();
        let log = self.context.log.clone();
        let (address, now_ms) = (self.mailbox.address, (self.context.clock)());
        let stored = tokio::task::spawn_blocking(move || log.usage(&address, now_ms)).await??;
        let mut core = self.mailbox.core();
        core.counted(stored, self.mailbox.writes.in_flight(), Instant::now());
        Ok(())
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
        self.context.forget(&self.mailbox);
        let _ = reply.send(Ok(Some(tombstone)));
        myself.stop(Some("identity deleted".into()));
    }

    /// Stores a broker notice about `peer` in this mailbox, past the inbound
    /// policy and the quota (a notice is the broker's, and small), but
    /// counted in the mailbox's usage like any envelope.
    fn submit_notice(
        &self,
        peer: Address,
        notice: &Notice,
        reply: AppendReply,
    ) -> Result<(), ActorProcessingErr> {
        let bytes = notice
            .to_envelope()
            .map_err(|error| format!("cannot encode a notice: {error}"))?;
        let now = (self.context.clock)();
        let envelope = StoredEnvelope {
            seq: 0,
            message_id: MessageId::random(),
            sender: Some(peer),
            stored_at_ms: now,
            expires_at_ms: now + self.context.notice_ttl.as_millis() as u64,
            envelope: bytes,
        };
        let mut core = self.mailbox.core();
        let (seq, counted) = core.number_notice(envelope.envelope.len() as u64, Instant::now());
        self.mailbox
            .submit(&self.context, envelope, seq, counted, reply);
        drop(core);
        Ok(())
    }

    /// Checks `change` to the relationship with `peer` against this side's
    /// record and, if it changes anything, stores the new record durably.
    /// Returns the record and the notice to store, or `None` for the notice
    /// when the change was already applied (a retry). The outer error is
    /// the actor's own failure; the inner one is the caller's answer.
    async fn change_relationship(
        &self,
        peer: Address,
        change: SideChange,
    ) -> Result<Result<(Relationship, Option<Notice>), MailboxError>, ActorProcessingErr> {
        let refuse =
            |code: ErrorCode, message: String| Ok(Err(MailboxError::Refused { code, message }));
        if peer == self.mailbox.address {
            return refuse(
                ErrorCode::InvalidRecipients,
                "an identity has no relationship with itself".into(),
            );
        }
        let existing = self.mailbox.core().relationships.get(&peer).copied();
        let now = (self.context.clock)();
        let mut intro = None;
        let mut peer_deleted = false;
        let record = match change {
            SideChange::Request {
                capability_hash,
                intro: introduction,
            } => {
                let (store, address) = (self.context.directory.clone(), self.mailbox.address);
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
        let (store, address) = (self.context.directory.clone(), self.mailbox.address);
        let written = tokio::task::spawn_blocking(move || {
            store.put_relationship(&address, &record)?;
            store.sync()
        })
        .await?;
        if let Err(error) = written {
            // The record may or may not have reached the store: read back
            // what is there, so the view admits by what a restart would see.
            let (store, address) = (self.context.directory.clone(), self.mailbox.address);
            let stored =
                tokio::task::spawn_blocking(move || store.relationships(&address)).await??;
            self.mailbox.core().relationships = stored.into_iter().map(|r| (r.peer, r)).collect();
            return Ok(Err(MailboxError::Store(error)));
        }
        self.mailbox.core().relationships.insert(peer, record);
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

    /// The running mailbox of `address`, or a new one (see
    /// [`MailboxArgs::count_usage`] for `for_write`).
    ///
    /// A new actor reads where numbering goes on when it starts, some time
    /// before it is registered; if another mailbox of the address was
    /// registered and forgotten meanwhile, that one may have numbered past
    /// those reads, so the new one is discarded and another started.
    async fn actor(
        &self,
        address: &Address,
        for_write: bool,
    ) -> Result<Arc<Mailbox>, MailboxError> {
        for _ in 0..8 {
            if let Some(mailbox) = self.context.actors.get(address) {
                return Ok(mailbox.clone());
            }
            let forgotten = self.context.forgotten.of(address);
            let started = Arc::new(OnceLock::new());
            let args = MailboxArgs {
                address: *address,
                context: self.context.clone(),
                count_usage: for_write,
                started: started.clone(),
            };
            let spawned = match &self.supervisor {
                Some(supervisor) => {
                    Actor::spawn_linked(None, MailboxActor, args, supervisor.clone()).await
                }
                None => Actor::spawn(None, MailboxActor, args).await,
            };
            let (actor, _handle) =
                spawned.map_err(|error| MailboxError::Unavailable(error.to_string()))?;
            // `spawn` returns once `pre_start` has, which left the mailbox here.
            let mailbox = started
                .get()
                .cloned()
                .ok_or_else(|| MailboxError::Unavailable("the mailbox did not start".into()))?;
            let registered = match self.context.actors.entry(*address) {
                dashmap::Entry::Occupied(existing) => Some(existing.get().clone()),
                dashmap::Entry::Vacant(slot) if self.context.forgotten.of(address) == forgotten => {
                    slot.insert(mailbox.clone());
                    return Ok(mailbox);
                }
                dashmap::Entry::Vacant(_) => None,
            };
            // Another caller's mailbox won the race, or ours started from
            // outdated reads; ours never received a message and its core
            // never numbered anything.
            mailbox.core().stop();
            actor.stop(None);
            if let Some(existing) = registered {
                return Ok(existing);
            }
        }
        Err(MailboxError::Unavailable(
            "the mailbox kept being replaced while it started".into(),
        ))
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
            let mailbox = self.actor(address, for_write).await?;
            match mailbox.actor.call(&build, timeout).await {
                Ok(ractor::rpc::CallResult::Success(value)) => return Ok(value),
                Ok(ractor::rpc::CallResult::Timeout) => return Err(MailboxError::Timeout),
                Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                    self.context.forget(&mailbox);
                }
            }
        }
        Err(MailboxError::Unavailable(
            "mailbox actor kept stopping".into(),
        ))
    }

    /// Appends to a mailbox; returns the sequence number once durable.
    ///
    /// The mailbox's core (started for this write if none runs) takes the
    /// append directly, under its lock, without a message to the actor; the
    /// actor's queue is the way only when the core is busy with a change,
    /// or the quota needs a count first.
    ///
    /// Without a timeout of its own: every append is answered once the log
    /// reports it (or refused at once), so the wait is the log's, and a
    /// timer per envelope would cost more than the rest of the call. A
    /// client that gives up waits on its own request timeout; the append
    /// stays counted against the session's requests in progress until then.
    pub async fn append(
        &self,
        address: &Address,
        envelope: StoredEnvelope,
    ) -> Result<u64, MailboxError> {
        let mailbox = self.actor(address, true).await?;
        let (reply, answer) = oneshot::channel();
        let envelope =
            match mailbox.try_append(&self.context, Caller::Session, envelope, reply.into()) {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(MailboxError::Unavailable(
                            "the append's answer was dropped".into(),
                        ))
                    });
                }
                Err(NotNow::Recount(envelope, _) | NotNow::Deferred(envelope)) => envelope,
            };
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
        if let Some(mailbox) = self.context.actors.get(address) {
            mailbox.core().freed();
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
        for mailbox in self.context.actors.iter() {
            mailbox.actor.stop(Some("shutdown".into()));
        }
    }
}
