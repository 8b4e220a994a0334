//! The mailbox as sessions see it: appends under the core's lock, or
//! queued at the actor while it performs a change.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use backbone_protocol::Address;
use ractor::{ActorRef, RpcReplyPort};

use super::core::{Admission, Caller, Core};
use super::watch::WatchLease;
use super::{MailboxContext, MailboxError, MailboxMsg, Writes};
use crate::store::{Append, StoredEnvelope};

/// One running mailbox, shared by its actor and the sessions appending to
/// it: its core, its writes in flight and its watch.
#[derive(Debug)]
pub struct Mailbox {
    pub(super) address: Address,
    pub(super) actor: ActorRef<MailboxMsg>,
    pub(super) core: Mutex<Core>,
    pub(super) writes: Arc<Writes>,
    pub(super) watch: WatchLease,
}

/// Where an append is answered.
pub(super) type AppendReply = RpcReplyPort<Result<u64, MailboxError>>;

/// An append the core did not take now, given back with its answer.
pub(super) enum NotNow {
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

    pub(super) fn core(&self) -> MutexGuard<'_, Core> {
        // Every change of the core is complete before it can panic.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the core busy until the guard is dropped (see [`Core::set_busy`]).
    pub(super) fn busy(&self) -> Busy<'_> {
        self.core().set_busy(true);
        Busy(self)
    }

    /// Appends `envelope` if the core takes it now: numbered and handed to
    /// the log under the core's lock, or refused; `reply` is answered
    /// either way. Otherwise gives both back.
    // The error gives the envelope back by value, on the rare way through
    // the actor; boxing it would allocate for that.
    #[allow(clippy::result_large_err)]
    pub(super) fn try_append(
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
    pub(super) fn submit(
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
pub(super) struct Busy<'a>(&'a Mailbox);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.core().set_busy(false);
    }
}
