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
//! `spawn_blocking`, writes go to the writer thread, and the writer thread
//! reports each completion back to the actor as a message, in submission
//! order.
//!
//! The actor of a deleted identity refuses everything with `IdentityDeleted`:
//! it learns so when it starts (the store holds the tombstone) or when the
//! purge begins through it ([`MailboxMsg::Retire`]), so that no append or
//! relationship change slips in between the tombstone and the purge.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The inbound policy of identities that never set one.
    pub default_policy: InboundPolicy,
    /// How long notices stay in a mailbox.
    pub notice_ttl: Duration,
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
        let (stored_head, policy, relationships, deletion) =
            tokio::task::spawn_blocking(move || {
                Ok::<_, StoreError>((
                    store.head_seq(&address)?,
                    store.inbound_policy(&address)?,
                    store.relationships(&address)?,
                    store.deletion(&address)?,
                ))
            })
            .await??;
        // Everything the store shows counts as durable (subscribers may read
        // up to here), but numbering goes on above this run's floor, never
        // reusing a number an earlier run may have shown and since lost.
        let head = stored_head.max(args.context.seq_floor);
        let policy = policy.unwrap_or(args.context.default_policy);
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
                let (store, address) = (state.context.store.clone(), state.address);
                let (written, held) = tokio::task::spawn_blocking(move || {
                    let written = store
                        .set_inbound_policy(&address, policy)
                        .and_then(|()| store.flush());
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
                if state.pending_writes == 0
                    && let Some((reply, tombstone)) = state.retiring.take()
                {
                    state.stop_retired(&myself, reply, tombstone);
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
                let (store, address) = (state.context.store.clone(), state.address);
                let begun = tokio::task::spawn_blocking(move || {
                    let begun = store.begin_purge(&address, now_ms, &to_tell)?;
                    store.flush()?;
                    Ok::<_, StoreError>(begun)
                })
                .await?;
                match begun {
                    Ok(Some(tombstone)) => {
                        state.deleted = true;
                        if state.pending_writes == 0 {
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
    /// its sequence number once durable: the writer reports back with a
    /// [`MailboxMsg::Durable`], in submission order.
    fn submit(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        mut envelope: StoredEnvelope,
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    ) {
        self.last_seq += 1;
        envelope.seq = self.last_seq;
        let envelope = Arc::new(envelope);
        let item = Append {
            address: self.address,
            envelope: envelope.clone(),
        };
        let actor = myself.clone();
        self.context
            .writer
            .submit_append_then(vec![item], move |result| {
                let message = MailboxMsg::Durable {
                    envelopes: vec![envelope],
                    result,
                    replies: vec![reply],
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
            });
        self.pending_writes += 1;
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
        if !self.context.quota.is_unlimited() {
            self.in_flight.envelopes += 1;
            self.in_flight.bytes += len;
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
                let (store, address) = (self.context.store.clone(), self.address);
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
        let (store, address) = (self.context.store.clone(), self.address);
        let written = tokio::task::spawn_blocking(move || {
            store.put_relationship(&address, &record)?;
            store.flush()
        })
        .await?;
        if let Err(error) = written {
            // The record may or may not have reached the store: read back
            // what is there, so the view admits by what a restart would see.
            let (store, address) = (self.context.store.clone(), self.address);
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
