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
//!
//! - `core`: the rules, as a plain state machine with no I/O.
//! - `handle`: the mailbox as sessions see it ([`Mailbox`]):
//!   appends under the core's lock.
//! - `actor`: the ractor actor around the core.
//! - `registry`: finds or starts a mailbox's actor, and what
//!   every actor shares ([`MailboxContext`]).
//! - `watch`: subscriptions, the durable head, and the push
//!   queue of each subscribed device.

mod actor;
mod core;
mod handle;
mod registry;
mod watch;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use backbone_protocol::frame::ErrorCode;

pub use self::actor::{MailboxActor, MailboxArgs, MailboxMsg, MailboxState};
pub use self::core::MailboxQuota;
pub use self::handle::Mailbox;
use self::handle::NotNow;
pub use self::registry::{Forgotten, MailboxContext, Registry};
pub use self::watch::{PushQueue, Subscriber, Subscription, Watch, WatchLease, Watches};
use crate::store::{MailboxUsage, StoreError};

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
