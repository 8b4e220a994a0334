//! The registry that finds or starts the mailbox actor of an address, and
//! what every mailbox actor shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backbone_protocol::Address;
use backbone_protocol::deletion::Deletion;
use backbone_protocol::relationship::{InboundPolicy, Relationship, SideChange};
use dashmap::DashMap;
use ractor::{Actor, ActorCell, ActorId, RpcReplyPort};
use tokio::sync::oneshot;

use super::core::Caller;
use super::core::MailboxQuota;
use super::watch::{PushQueue, Subscriber, Subscription, Watches};
use super::{Mailbox, MailboxActor, MailboxArgs, MailboxError, MailboxMsg, NotNow};
use crate::shared::Clock;
use crate::store::prelude::*;
use crate::store::{StoredEnvelope, WriteHandle};

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
    pub(super) fn stripe(&self, address: &Address) -> &AtomicU64 {
        let stripe = usize::from(u16::from_le_bytes([address.0[0], address.0[1]]));
        &self.0[stripe % self.0.len()]
    }

    /// The count of `address`'s stripe.
    pub(super) fn of(&self, address: &Address) -> u64 {
        self.stripe(address).load(Ordering::SeqCst)
    }

    pub(super) fn count(&self, address: &Address) {
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

/// Finds or spawns the mailbox actor of an address.
pub struct Registry {
    pub(super) context: Arc<MailboxContext>,
    pub(super) supervisor: Option<ActorCell>,
    pub(super) next_subscriber: AtomicU64,
    pub(super) call_timeout: Duration,
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
    pub(super) async fn actor(
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
    pub(super) async fn call<T: Send + 'static>(
        &self,
        address: &Address,
        build: impl Fn(RpcReplyPort<T>) -> MailboxMsg,
    ) -> Result<T, MailboxError> {
        self.call_for(address, false, Some(self.call_timeout), build)
            .await
    }

    /// [`Registry::call`], telling a new actor whether it starts for a
    /// write, with `timeout` (`None`: as long as the actor takes).
    pub(super) async fn call_for<T: Send + 'static>(
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
