//! The state every connection and service shares, at the bottom of the
//! broker: services (the commands under [`crate::cmd`], routing, the
//! deletion sweep, the fleet) import it, never [`crate::server`], which
//! only builds it and wires the broker together.
//!
//! - [`Shared`]: the configuration, the stores, the mailbox registry, the
//!   fleet, the rate limiters, the admission counts and the live sessions.
//! - [`Clock`]: the broker's clock, injectable so tests can move time.
//! - [`live`]: the authenticated sessions of each address, so that a purge
//!   or a device's removal can close them.

pub mod live;

use std::sync::Arc;

use backbone_protocol::bytes::ServerId;
use tokio::sync::watch;

pub use self::live::LiveSessions;
use crate::admission::Admission;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::mailbox::Registry;
use crate::store::WriteHandle;
use crate::store::prelude::*;

/// A clock in Unix milliseconds; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// State shared by every connection.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// The directory: everything stored but envelopes.
    pub directory: Arc<dyn Directory>,
    /// The mailbox log, for reads (writes go through `writer`).
    pub log: Arc<dyn MailboxLog>,
    /// Appends, deletes and cursor moves.
    pub writer: WriteHandle,
    /// Mailbox actors.
    pub registry: Registry,
    /// This node's persistent id.
    pub server_id: ServerId,
    /// Frame size limit derived from the config.
    pub max_frame_len: usize,
    /// The clock.
    pub clock: Clock,
    /// Becomes `true` when shutdown begins.
    pub shutdown: watch::Receiver<bool>,
    /// The fleet map, this node's place in it, and links to its peers.
    pub fleet: Fleet,
    /// Per-identity send rate (`limits.send_rate`), if limited.
    pub send_limiter: Option<governor::DefaultKeyedRateLimiter<backbone_protocol::Address>>,
    /// Per-capability sealed send rate (`limits.sealed_rate`), if limited;
    /// checked on the recipient's node.
    pub sealed_limiter:
        Option<governor::DefaultKeyedRateLimiter<backbone_protocol::bytes::CapabilityHash>>,
    /// Per-requester relationship request rate
    /// (`relationships.requests_per_minute`), if limited.
    pub relationship_limiter: Option<governor::DefaultKeyedRateLimiter<backbone_protocol::Address>>,
    /// The per-connection sealed send rate of anonymous sessions
    /// (`limits.anonymous_rate`), if limited; each session gets its own limiter.
    pub anonymous_quota: Option<governor::Quota>,
    /// Per-source relationship request rate
    /// (`limits.per_source.relationship_requests_per_minute`), if limited.
    pub source_relationship_limiter:
        Option<governor::DefaultKeyedRateLimiter<crate::admission::Source>>,
    /// Per-source anonymous request rate
    /// (`limits.per_source.anonymous_rate`), if limited.
    pub source_anonymous_limiter:
        Option<governor::DefaultKeyedRateLimiter<crate::admission::Source>>,
    /// Which connections are accepted, and the places they hold.
    pub admission: Arc<Admission>,
    /// The bytes of stored files, and the uploads running.
    pub files: Arc<crate::store::Files>,
    /// The authenticated sessions of each address (to end a deleted
    /// identity's connections).
    pub sessions: LiveSessions,
}
