//! The mailbox actor: a thin shell around the core that performs what the
//! core cannot (reads at start, recounts, policy and relationship
//! changes, retirement, the idle timer).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use backbone_protocol::Address;
use backbone_protocol::bytes::{MessageId, RelationshipId};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::frame::ErrorCode;
use backbone_protocol::relationship::{
    self, InboundPolicy, Notice, Relationship, RequestOutcome, Role, SideChange, State,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use super::core::{Caller, Core, Idle, MIN_IDLE_CHECK, Start};
use super::handle::AppendReply;
use super::{Mailbox, MailboxContext, MailboxError, NotNow};
use crate::store::{StoreError, StoredEnvelope};

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
    /// retirement waited for it (see [`super::Writes`]).
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

/// The mailbox actor; holds no state of its own (see [`MailboxState`]).
pub struct MailboxActor;

/// Per-mailbox state, built in `pre_start`.
pub struct MailboxState {
    /// The core, the writes and the watch, shared with appending sessions.
    pub(super) mailbox: Arc<Mailbox>,
    pub(super) context: Arc<MailboxContext>,
    /// A retirement waiting for the writes in flight, with its answer.
    pub(super) retiring: Option<(RetireReply, Deletion)>,
}

/// Where a retirement is answered.
pub(super) type RetireReply = RpcReplyPort<Result<Option<Deletion>, MailboxError>>;

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
    pub(super) async fn append(
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
    pub(super) async fn recount(&mut self) -> Result<(), ActorProcessingErr> {
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
    pub(super) fn stop_retired(
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
    pub(super) fn submit_notice(
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
            envelope: bytes.into(),
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
    pub(super) async fn change_relationship(
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
pub(super) fn target(decision: relationship::Decision) -> State {
    match decision {
        relationship::Decision::Accept => State::Active,
        relationship::Decision::Reject => State::Rejected,
        relationship::Decision::Terminate => State::Terminated,
    }
}

pub(super) fn state_name(state: State) -> &'static str {
    match state {
        State::Pending => "pending",
        State::Active => "active",
        State::Rejected => "rejected",
        State::Terminated => "terminated",
    }
}
