//! Mailbox actors and the registry that spawns them on demand.
//!
//! One actor per *active* address. It owns the mailbox's sequence counter, so
//! appends are numbered in arrival order, hands each append to the group-commit
//! writer, and only once the writer reports the envelope durable does it answer
//! the sender and push the envelope to the address's subscribed devices. An
//! actor with no subscriber and no activity for the idle timeout stops itself,
//! so memory follows active mailboxes, not stored ones.
//!
//! Blocking storage work never runs in a handler: the head is read in
//! `spawn_blocking`, writes go to the writer thread, and completions come back
//! as messages through a per-mailbox forwarder task that preserves their order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backbone_protocol::Address;
use backbone_protocol::frame::ErrorCode;
use dashmap::DashMap;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, oneshot};

use crate::server::Clock;
use crate::store::{Append, MailboxUsage, Store, StoreError, StoredEnvelope, WriteHandle};

/// How often a mailbox that looks full may recount what it stores, to notice
/// room freed by expiry (deletes by the owner reset the count at once).
const RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

/// A device session's subscription to its mailbox.
#[derive(Debug)]
pub struct Subscriber {
    /// Unique per subscription.
    pub id: u64,
    /// Durable envelopes, in sequence order. Bounded: when full, the envelope is
    /// not queued and `lagged` is set, and the session reads it from the store.
    pub tx: mpsc::Sender<Arc<StoredEnvelope>>,
    /// Set when an envelope could not be queued.
    pub lagged: Arc<AtomicBool>,
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
    /// Internal: the writer finished a batch of this mailbox's appends.
    Durable {
        /// The envelopes written.
        envelopes: Vec<Arc<StoredEnvelope>>,
        /// The flush outcome.
        result: Result<(), StoreError>,
        /// The senders to answer.
        replies: Vec<RpcReplyPort<Result<u64, MailboxError>>>,
    },
    /// Register a device session; answered with the mailbox's durable head.
    Subscribe {
        /// The subscription.
        subscriber: Subscriber,
        /// The highest durable sequence number, kept current by the actor.
        reply: RpcReplyPort<Arc<AtomicU64>>,
    },
    /// Remove a subscription.
    Unsubscribe {
        /// The subscription id.
        id: u64,
    },
    /// Envelopes were deleted from the mailbox outside the actor: its quota
    /// count is stale and is taken again before the next append.
    Freed,
    /// Internal timer: stop if idle.
    IdleCheck,
}

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
    /// The store, for reads.
    pub store: Arc<dyn Store>,
    /// The group-commit writer.
    pub writer: WriteHandle,
    /// Idle actors stop after this long.
    pub idle_timeout: Duration,
    /// The registry, so an idle actor can remove itself.
    pub actors: DashMap<Address, ActorRef<MailboxMsg>>,
    /// Per-mailbox storage limits.
    pub quota: MailboxQuota,
    /// The broker's clock, to tell expired envelopes when counting usage.
    pub clock: Clock,
    /// This run's sequence floor ([`crate::store::begin_run`]): a mailbox
    /// numbers on from its stored head or from here, whichever is higher.
    pub seq_floor: u64,
}

/// The mailbox actor; holds no state of its own (see [`MailboxState`]).
pub struct MailboxActor;

/// Per-mailbox state, built in `pre_start`.
pub struct MailboxState {
    address: Address,
    context: Arc<MailboxContext>,
    /// The last sequence number handed out.
    last_seq: u64,
    /// The highest sequence number known durable, shared with subscribers:
    /// they never read past it from the store, because an envelope the
    /// writer has inserted but not yet flushed is visible to reads and may
    /// still vanish in a crash (and its sequence number be reused).
    durable_seq: Arc<AtomicU64>,
    pending_writes: usize,
    /// What the mailbox stores plus what is being written, for the quota: an
    /// upper bound, because expiry and deletes outside the actor only lower
    /// the real figure. `None` until first counted, and after a delete.
    usage: Option<MailboxUsage>,
    /// When `usage` was last counted from the store.
    counted_at: Option<Instant>,
    /// Envelopes handed to the writer and not yet reported durable.
    in_flight: MailboxUsage,
    subscribers: HashMap<u64, Subscriber>,
    last_activity: Instant,
    forwarder: mpsc::UnboundedSender<PendingWrite>,
}

struct PendingWrite {
    done: oneshot::Receiver<Result<(), StoreError>>,
    envelopes: Vec<Arc<StoredEnvelope>>,
    replies: Vec<RpcReplyPort<Result<u64, MailboxError>>>,
}

/// Arguments for spawning a mailbox actor.
pub struct MailboxArgs {
    /// The mailbox's address.
    pub address: Address,
    /// Shared context.
    pub context: Arc<MailboxContext>,
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
        let store = args.context.store.clone();
        let address = args.address;
        let stored_head =
            tokio::task::spawn_blocking(move || store.head_seq(&address)).await??;
        // Everything the store shows counts as durable (subscribers may read
        // up to here), but numbering goes on above this run's floor, never
        // reusing a number an earlier run may have shown and since lost.
        let head = stored_head.max(args.context.seq_floor);
        let (forwarder, mut pending) = mpsc::unbounded_channel::<PendingWrite>();
        let actor = myself.clone();
        // Completions are awaited strictly in submission order, so subscribers
        // see envelopes in sequence order.
        tokio::spawn(async move {
            while let Some(write) = pending.recv().await {
                let result = write.done.await.unwrap_or(Err(StoreError::Closed));
                let message = MailboxMsg::Durable {
                    envelopes: write.envelopes,
                    result,
                    replies: write.replies,
                };
                // If the actor is gone, answer the senders so none waits forever.
                if let Err(ractor::MessagingErr::SendErr(MailboxMsg::Durable {
                    replies,
                    result,
                    envelopes,
                })) = actor.cast(message)
                {
                    for (reply, envelope) in replies.into_iter().zip(envelopes) {
                        let outcome = result.clone().map(|()| envelope.seq);
                        let _ = reply.send(outcome.map_err(MailboxError::Store));
                    }
                }
            }
        });
        let interval = (args.context.idle_timeout / 2).max(Duration::from_millis(10));
        myself.send_interval(interval, || MailboxMsg::IdleCheck);
        metrics::gauge!("backbone_mailbox_actors").increment(1.0);
        Ok(MailboxState {
            address,
            context: args.context,
            last_seq: head,
            durable_seq: Arc::new(AtomicU64::new(head)),
            pending_writes: 0,
            usage: None,
            counted_at: None,
            in_flight: MailboxUsage::default(),
            subscribers: HashMap::new(),
            last_activity: Instant::now(),
            forwarder,
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
            MailboxMsg::Append {
                mut envelope,
                reply,
            } => {
                state.last_activity = Instant::now();
                if let Some(refusal) = state.admit(envelope.envelope.len() as u64).await? {
                    metrics::counter!("backbone_quota_refusals_total").increment(1);
                    let _ = reply.send(Err(MailboxError::QuotaExceeded(refusal)));
                    return Ok(());
                }
                state.last_seq += 1;
                envelope.seq = state.last_seq;
                let envelope = Arc::new(envelope);
                let (done, wait) = oneshot::channel();
                state.context.writer.submit_append(
                    vec![Append {
                        address: state.address,
                        envelope: envelope.clone(),
                    }],
                    done,
                );
                state.pending_writes += 1;
                let write = PendingWrite {
                    done: wait,
                    envelopes: vec![envelope],
                    replies: vec![reply],
                };
                if state.forwarder.send(write).is_err() {
                    return Err("mailbox forwarder stopped".into());
                }
            }
            MailboxMsg::Durable {
                envelopes,
                result,
                replies,
            } => {
                state.pending_writes -= 1;
                for (reply, envelope) in replies.into_iter().zip(&envelopes) {
                    let outcome = result.clone().map(|()| envelope.seq);
                    let _ = reply.send(outcome.map_err(MailboxError::Store));
                }
                if !state.context.quota.is_unlimited() {
                    for envelope in &envelopes {
                        let len = envelope.envelope.len() as u64;
                        state.in_flight.envelopes = state.in_flight.envelopes.saturating_sub(1);
                        state.in_flight.bytes = state.in_flight.bytes.saturating_sub(len);
                        // Not stored (or not durably): stop counting it. A
                        // partial write that did become visible is found by
                        // the next recount.
                        if let (Err(_), Some(usage)) = (&result, &mut state.usage) {
                            usage.envelopes = usage.envelopes.saturating_sub(1);
                            usage.bytes = usage.bytes.saturating_sub(len);
                        }
                    }
                }
                if result.is_ok() {
                    for envelope in envelopes {
                        state.durable_seq.fetch_max(envelope.seq, Ordering::AcqRel);
                        notify(&state.subscribers, &envelope);
                    }
                }
            }
            MailboxMsg::Subscribe { subscriber, reply } => {
                state.last_activity = Instant::now();
                let _ = reply.send(state.durable_seq.clone());
                state.subscribers.insert(subscriber.id, subscriber);
            }
            MailboxMsg::Unsubscribe { id } => {
                state.last_activity = Instant::now();
                state.subscribers.remove(&id);
            }
            MailboxMsg::Freed => state.usage = None,
            MailboxMsg::IdleCheck => {
                state
                    .subscribers
                    .retain(|_, subscriber| !subscriber.tx.is_closed());
                let idle = state.subscribers.is_empty()
                    && state.pending_writes == 0
                    && state.last_activity.elapsed() >= state.context.idle_timeout;
                if idle {
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
            let store = self.context.store.clone();
            let (address, now_ms) = (self.address, (self.context.clock)());
            let counted =
                tokio::task::spawn_blocking(move || store.usage(&address, now_ms)).await??;
            // Appends in flight may or may not be in the store's count yet;
            // adding them keeps the figure an upper bound.
            self.usage = Some(MailboxUsage {
                envelopes: counted.envelopes + self.in_flight.envelopes,
                bytes: counted.bytes + self.in_flight.bytes,
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
        self.in_flight.envelopes += 1;
        self.in_flight.bytes += len;
        Ok(None)
    }
}

fn notify(subscribers: &HashMap<u64, Subscriber>, envelope: &Arc<StoredEnvelope>) {
    for subscriber in subscribers.values() {
        if subscriber.tx.try_send(envelope.clone()).is_err() {
            subscriber.lagged.store(true, Ordering::Release);
        }
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

    /// A fresh subscriber id.
    pub fn next_subscriber_id(&self) -> u64 {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    async fn actor(&self, address: &Address) -> Result<ActorRef<MailboxMsg>, MailboxError> {
        if let Some(actor) = self.context.actors.get(address) {
            return Ok(actor.clone());
        }
        let args = MailboxArgs {
            address: *address,
            context: self.context.clone(),
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
        for _ in 0..3 {
            let actor = self.actor(address).await?;
            match actor.call(&build, Some(self.call_timeout)).await {
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
    pub async fn append(
        &self,
        address: &Address,
        envelope: StoredEnvelope,
    ) -> Result<u64, MailboxError> {
        self.call(address, |reply| MailboxMsg::Append {
            envelope: envelope.clone(),
            reply,
        })
        .await?
    }

    /// Tells a live mailbox actor that envelopes were deleted outside it, so
    /// its quota count is taken again.
    pub fn freed(&self, address: &Address) {
        if let Some(actor) = self.context.actors.get(address) {
            let _ = actor.cast(MailboxMsg::Freed);
        }
    }

    /// Subscribes a device session; returns the mailbox's durable head, which
    /// the actor keeps current.
    pub async fn subscribe(
        &self,
        address: &Address,
        id: u64,
        tx: mpsc::Sender<Arc<StoredEnvelope>>,
        lagged: Arc<AtomicBool>,
    ) -> Result<Arc<AtomicU64>, MailboxError> {
        self.call(address, |reply| MailboxMsg::Subscribe {
            subscriber: Subscriber {
                id,
                tx: tx.clone(),
                lagged: lagged.clone(),
            },
            reply,
        })
        .await
    }

    /// Removes a subscription, if the actor is still alive.
    pub fn unsubscribe(&self, address: &Address, id: u64) {
        if let Some(actor) = self.context.actors.get(address) {
            let _ = actor.cast(MailboxMsg::Unsubscribe { id });
        }
    }

    /// Stops every actor (shutdown).
    pub fn stop_all(&self) {
        for actor in self.context.actors.iter() {
            actor.stop(Some("shutdown".into()));
        }
    }
}
