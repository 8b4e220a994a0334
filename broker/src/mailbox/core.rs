//! A mailbox's rules as a plain state machine: sequence numbers, the quota,
//! consent, the deleted identity and when an idle mailbox stops.
//!
//! [`Core`] does no I/O and reads no clock: every event carries the time
//! (`now`), and every answer says what to do ([`Admission`], [`Idle`]), so
//! the rules are tested deterministically with a virtual clock (see the
//! tests below), as `quinn-proto` tests its connections. Its owners perform
//! the actions: the mailbox actor, and the sessions' appends, which take the
//! core's lock directly instead of a message to the actor (see
//! `Mailbox::try_append` in the parent module).
//!
//! **Architecture Invariant:** a sequence number is handed out only under
//! the core's lock, and the append it numbers is handed to the log before
//! the lock is released, so a mailbox's appends reach the log in sequence
//! order, and its completions (which answer senders and push to devices)
//! run in that order too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backbone_protocol::Address;
use backbone_protocol::relationship::{self, InboundPolicy, Relationship};

use crate::store::MailboxUsage;

/// How often a mailbox that looks full may recount what it stores, to notice
/// room freed by expiry (deletes by the owner reset the count at once).
pub const RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest wait between two idle checks of one actor.
pub const MIN_IDLE_CHECK: Duration = Duration::from_millis(10);

/// How much one mailbox may hold; 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxQuota {
    /// Most unexpired envelopes stored.
    pub max_envelopes: u64,
    /// Most envelope bytes stored (the sum of the opaque envelope lengths).
    pub max_bytes: u64,
}

impl MailboxQuota {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
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

/// What the core decided about one append.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Stored under this sequence number: hand it to the log now, before
    /// the core's lock is released. `counted` is the length the quota
    /// counts while the write is in flight (`None`: no quota).
    Numbered {
        /// The envelope's sequence number.
        seq: u64,
        /// The bytes counted against the quota.
        counted: Option<u64>,
    },
    /// Refused: the identity was deleted.
    Deleted,
    /// Refused: the mailbox's inbound policy does not admit the sender.
    NotConsented,
    /// Refused: the mailbox is full, for this reason.
    OverQuota(String),
    /// The quota needs a count of what the mailbox stores first (the actor
    /// reads it from the log and reports it with [`Core::counted`]).
    Recount,
    /// The actor is busy with a change that must come first, or has
    /// stopped: the append goes through the actor's queue instead.
    Deferred,
}

/// What an idle check decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Idle {
    /// The mailbox is idle: the core is stopped (every later append is
    /// deferred), and the actor leaves the registry and stops.
    Stop,
    /// Check again after this long.
    CheckAfter(Duration),
}

/// Where an append comes from: the actor's own queue, or a session calling
/// the core directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The actor, which performs the change the core is busy with, so it
    /// is never deferred for being busy.
    Actor,
    /// A session, deferred to the actor while the actor is busy.
    Session,
}

/// One mailbox's rules and the state they need.
#[derive(Debug)]
pub struct Core {
    address: Address,
    quota: MailboxQuota,
    /// The last sequence number handed out.
    last_seq: u64,
    /// What the mailbox stores plus what is being written, for the quota: an
    /// upper bound, because expiry and deletes outside the core only lower
    /// the real figure. `None` until first counted, and after a delete.
    usage: Option<MailboxUsage>,
    /// When `usage` was last counted from the store.
    counted_at: Option<Instant>,
    last_activity: Instant,
    /// The inbound policy and this side's relationship records; every
    /// change goes through the actor.
    pub(super) policy: InboundPolicy,
    pub(super) relationships: HashMap<Address, Relationship>,
    /// The identity was deleted: everything is refused.
    deleted: bool,
    /// The actor performs a change (a policy, a relationship, a retirement,
    /// a recount) that appends must not overtake.
    busy: bool,
    /// The actor stopped or is stopping: a newer core may own the mailbox.
    stopped: bool,
}

/// What the core starts from, read from the store when its actor starts.
#[derive(Debug)]
pub struct Start {
    /// The mailbox.
    pub address: Address,
    /// The quota in force.
    pub quota: MailboxQuota,
    /// The highest sequence number handed out before (durable, or still in
    /// flight from an earlier actor).
    pub last_seq: u64,
    /// What the mailbox stores, if counted at start.
    pub usage: Option<MailboxUsage>,
    /// The inbound policy.
    pub policy: InboundPolicy,
    /// This side's relationship records.
    pub relationships: Vec<Relationship>,
    /// Whether the identity was deleted.
    pub deleted: bool,
    /// The time.
    pub now: Instant,
}

impl Core {
    /// A core at `start`.
    pub fn new(start: Start) -> Self {
        Self {
            address: start.address,
            quota: start.quota,
            last_seq: start.last_seq,
            counted_at: start.usage.map(|_| start.now),
            usage: start.usage,
            last_activity: start.now,
            policy: start.policy,
            relationships: start
                .relationships
                .into_iter()
                .map(|r| (r.peer, r))
                .collect(),
            deleted: start.deleted,
            busy: false,
            stopped: false,
        }
    }

    /// Decides about an append of `len` bytes from `sender` (`None`: sealed,
    /// admitted by its capability before it got here) at `now`.
    pub fn admit(
        &mut self,
        caller: Caller,
        sender: Option<&Address>,
        len: u64,
        now: Instant,
    ) -> Admission {
        if self.stopped || (self.busy && caller == Caller::Session) {
            return Admission::Deferred;
        }
        self.last_activity = now;
        if self.deleted {
            return Admission::Deleted;
        }
        if let Some(sender) = sender
            && !relationship::admits(
                self.policy,
                &self.address,
                sender,
                self.relationships.get(sender),
            )
        {
            return Admission::NotConsented;
        }
        if !self.quota.is_unlimited() {
            let stale = self
                .counted_at
                .is_none_or(|at| now.saturating_duration_since(at) >= RECOUNT_INTERVAL);
            let refusal = self.usage.map(|usage| self.quota.refusal(usage, len));
            match (refusal, stale) {
                (None, _) | (Some(Some(_)), true) => return Admission::Recount,
                (Some(Some(refusal)), false) => return Admission::OverQuota(refusal),
                (Some(None), _) => {}
            }
        }
        let (seq, counted) = self.number(len);
        Admission::Numbered { seq, counted }
    }

    /// The next sequence number, for an envelope of `len` bytes counted in
    /// the mailbox's usage (which is only kept under a quota), and the
    /// bytes the quota counts while it is written.
    fn number(&mut self, len: u64) -> (u64, Option<u64>) {
        if let Some(usage) = &mut self.usage {
            usage.envelopes += 1;
            usage.bytes += len;
        }
        self.last_seq += 1;
        (self.last_seq, (!self.quota.is_unlimited()).then_some(len))
    }

    /// Numbers a broker notice of `len` bytes: past the policy and the
    /// quota (a notice is the broker's, and small), but counted in the
    /// mailbox's usage like any envelope.
    pub fn number_notice(&mut self, len: u64, now: Instant) -> (u64, Option<u64>) {
        self.last_activity = now;
        self.number(len)
    }

    /// The mailbox stores `stored` (just read from the log) and `in_flight`
    /// is being written: appends in flight may or may not be in the store's
    /// count yet, so adding them keeps the figure an upper bound.
    pub fn counted(&mut self, stored: MailboxUsage, in_flight: MailboxUsage, now: Instant) {
        self.usage = Some(MailboxUsage {
            envelopes: stored.envelopes + in_flight.envelopes,
            bytes: stored.bytes + in_flight.bytes,
        });
        self.counted_at = Some(now);
    }

    /// An append of `len` counted bytes failed in the log: it no longer
    /// counts. A partial write that did become visible is found by the next
    /// recount.
    pub fn unwritten(&mut self, len: u64) {
        if let Some(usage) = &mut self.usage {
            usage.envelopes = usage.envelopes.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(len);
        }
    }

    /// Envelopes were deleted outside the core: the count is taken again
    /// before the next append.
    pub fn freed(&mut self) {
        self.usage = None;
    }

    /// The actor starts (`true`) or ends (`false`) a change that appends
    /// must not overtake; meanwhile sessions' appends are deferred to it.
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// Activity other than an append (a policy or relationship change).
    pub fn touched(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// The identity is deleted from now on.
    pub fn mark_deleted(&mut self) {
        self.deleted = true;
    }

    /// Whether the identity was deleted.
    pub fn deleted(&self) -> bool {
        self.deleted
    }

    /// The core's actor stopped or is stopping: every later append is
    /// deferred (and finds the next actor through the registry).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// An idle check at `now`, with `pending` appends in flight: stop after
    /// `timeout` without activity and nothing in flight, else check again
    /// when the mailbox could be idle. Subscribed devices do not keep the
    /// mailbox: the watch outlives the actor.
    pub fn idle_check(&mut self, now: Instant, timeout: Duration, pending: bool) -> Idle {
        let quiet = now.saturating_duration_since(self.last_activity);
        if pending || quiet < timeout {
            let next = if pending {
                timeout / 2
            } else {
                timeout - quiet
            };
            return Idle::CheckAfter(next.max(MIN_IDLE_CHECK));
        }
        self.stopped = true;
        Idle::Stop
    }
}

#[cfg(test)]
mod tests {
    use backbone_protocol::bytes::RelationshipId;
    use backbone_protocol::relationship::{Role, State};

    use super::*;
    use crate::store::tests::address;

    const OWNER: u8 = 1;
    const PEER: u8 = 2;
    const STRANGER: u8 = 3;

    /// A virtual clock: the tests move time by hand.
    struct Clock(Instant);

    impl Clock {
        fn now(&self) -> Instant {
            self.0
        }
        fn advance(&mut self, by: Duration) {
            self.0 += by;
        }
    }

    fn core(quota: MailboxQuota, usage: Option<MailboxUsage>, clock: &Clock) -> Core {
        Core::new(Start {
            address: address(OWNER),
            quota,
            last_seq: 7,
            usage,
            policy: InboundPolicy::Anyone,
            relationships: Vec::new(),
            deleted: false,
            now: clock.now(),
        })
    }

    fn usage(envelopes: u64, bytes: u64) -> MailboxUsage {
        MailboxUsage { envelopes, bytes }
    }

    fn append(core: &mut Core, len: u64, clock: &Clock) -> Admission {
        core.admit(Caller::Session, Some(&address(PEER)), len, clock.now())
    }

    #[test]
    fn numbers_follow_the_highest_handed_out_without_a_quota() {
        let clock = Clock(Instant::now());
        let mut core = core(MailboxQuota::default(), None, &clock);
        for seq in 8..=10 {
            assert_eq!(
                append(&mut core, 100, &clock),
                Admission::Numbered { seq, counted: None }
            );
        }
        let (seq, counted) = core.number_notice(40, clock.now());
        assert_eq!((seq, counted), (11, None), "notices share the numbering");
    }

    #[test]
    fn the_quota_counts_first_refuses_when_full_and_recounts_once_a_second() {
        let mut clock = Clock(Instant::now());
        let quota = MailboxQuota {
            max_envelopes: 3,
            max_bytes: 0,
        };
        let mut core = core(quota, None, &clock);
        assert_eq!(append(&mut core, 10, &clock), Admission::Recount);
        core.counted(usage(1, 10), usage(0, 0), clock.now());
        assert_eq!(
            append(&mut core, 10, &clock),
            Admission::Numbered {
                seq: 8,
                counted: Some(10)
            }
        );
        assert_eq!(
            append(&mut core, 10, &clock),
            Admission::Numbered {
                seq: 9,
                counted: Some(10)
            }
        );
        // Three held: refused without a recount for a second.
        let refused = append(&mut core, 10, &clock);
        assert!(matches!(refused, Admission::OverQuota(ref why) if why.contains("3 envelopes")));
        clock.advance(RECOUNT_INTERVAL - Duration::from_millis(1));
        assert!(matches!(
            append(&mut core, 10, &clock),
            Admission::OverQuota(_)
        ));
        // Then the count is taken again: expiry freed two, one in flight.
        clock.advance(Duration::from_millis(1));
        assert_eq!(append(&mut core, 10, &clock), Admission::Recount);
        core.counted(usage(1, 10), usage(1, 10), clock.now());
        assert_eq!(
            append(&mut core, 10, &clock),
            Admission::Numbered {
                seq: 10,
                counted: Some(10)
            }
        );
        assert!(matches!(
            append(&mut core, 10, &clock),
            Admission::OverQuota(_)
        ));
        // A failed write gives its room back; a delete forces a recount.
        core.unwritten(10);
        assert!(matches!(
            append(&mut core, 10, &clock),
            Admission::Numbered { seq: 11, .. }
        ));
        core.freed();
        assert_eq!(append(&mut core, 10, &clock), Admission::Recount);
    }

    #[test]
    fn the_byte_limit_counts_the_envelope_asked_for() {
        let clock = Clock(Instant::now());
        let quota = MailboxQuota {
            max_envelopes: 0,
            max_bytes: 100,
        };
        let mut core = core(quota, Some(usage(2, 60)), &clock);
        assert!(matches!(
            append(&mut core, 41, &clock),
            Admission::OverQuota(ref why) if why.contains("100 envelope bytes")
        ));
        assert!(matches!(
            append(&mut core, 40, &clock),
            Admission::Numbered {
                counted: Some(40),
                ..
            }
        ));
        // Notices are counted but never refused.
        assert!(matches!(core.number_notice(30, clock.now()), (_, Some(30))));
        assert!(matches!(
            append(&mut core, 1, &clock),
            Admission::OverQuota(_)
        ));
    }

    #[test]
    fn consent_follows_the_policy_and_active_relationships() {
        let clock = Clock(Instant::now());
        let mut core = core(MailboxQuota::default(), None, &clock);
        core.policy = InboundPolicy::RelationshipsOnly;
        assert_eq!(append(&mut core, 1, &clock), Admission::NotConsented);
        let mut record = Relationship {
            id: RelationshipId([9; 16]),
            peer: address(PEER),
            role: Role::Owner,
            state: State::Pending,
            changed_at_ms: 0,
        };
        core.relationships.insert(address(PEER), record);
        assert_eq!(
            append(&mut core, 1, &clock),
            Admission::NotConsented,
            "pending does not admit"
        );
        record.state = State::Active;
        core.relationships.insert(address(PEER), record);
        assert!(matches!(
            append(&mut core, 1, &clock),
            Admission::Numbered { seq: 8, .. }
        ));
        assert_eq!(
            core.admit(Caller::Session, Some(&address(STRANGER)), 1, clock.now()),
            Admission::NotConsented
        );
        assert!(
            matches!(
                core.admit(Caller::Session, None, 1, clock.now()),
                Admission::Numbered { seq: 9, .. }
            ),
            "sealed envelopes were admitted by their capability"
        );
        assert!(
            matches!(
                core.admit(Caller::Session, Some(&address(OWNER)), 1, clock.now()),
                Admission::Numbered { seq: 10, .. }
            ),
            "an identity may always write to itself"
        );
    }

    #[test]
    fn a_busy_core_defers_sessions_but_not_its_actor_and_a_stopped_one_defers_all() {
        let clock = Clock(Instant::now());
        let mut core = core(MailboxQuota::default(), None, &clock);
        core.set_busy(true);
        assert_eq!(append(&mut core, 1, &clock), Admission::Deferred);
        assert!(matches!(
            core.admit(Caller::Actor, Some(&address(PEER)), 1, clock.now()),
            Admission::Numbered { seq: 8, .. }
        ));
        core.set_busy(false);
        assert!(matches!(
            append(&mut core, 1, &clock),
            Admission::Numbered { seq: 9, .. }
        ));
        core.mark_deleted();
        assert_eq!(append(&mut core, 1, &clock), Admission::Deleted);
        core.stop();
        assert_eq!(append(&mut core, 1, &clock), Admission::Deferred);
        assert_eq!(
            core.admit(Caller::Actor, None, 1, clock.now()),
            Admission::Deferred
        );
    }

    #[test]
    fn an_idle_check_stops_only_a_quiet_mailbox_with_nothing_in_flight() {
        let mut clock = Clock(Instant::now());
        let timeout = Duration::from_secs(30);
        let mut core = core(MailboxQuota::default(), None, &clock);
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            core.idle_check(clock.now(), timeout, false),
            Idle::CheckAfter(Duration::from_secs(20)),
            "checked again when it would be idle"
        );
        append(&mut core, 1, &clock);
        clock.advance(Duration::from_secs(30));
        assert_eq!(
            core.idle_check(clock.now(), timeout, true),
            Idle::CheckAfter(Duration::from_secs(15)),
            "a write in flight keeps it"
        );
        assert_eq!(core.idle_check(clock.now(), timeout, false), Idle::Stop);
        assert_eq!(append(&mut core, 1, &clock), Admission::Deferred);
        let mut short = self::core(MailboxQuota::default(), None, &clock);
        assert_eq!(
            short.idle_check(clock.now(), Duration::from_millis(1), true),
            Idle::CheckAfter(MIN_IDLE_CHECK),
            "never sooner than the shortest wait"
        );
    }
}
