//! Relationships, consent and each mailbox's inbound policy.
//!
//! A *relationship* joins two identities: a **requester** and the **owner**
//! of the template the requester answered. A template is a delivery
//! capability of the owner, handed out inside an encrypted token (a QR code,
//! a link): presenting it is what lets a stranger ask at all.
//!
//! ```text
//!             request (requester, with the owner's capability)
//!   (none) ───────────────────────────────────────────────▶ Pending
//!   Pending ── accept (owner) ───▶ Active
//!   Pending ── reject (owner) ───▶ Rejected        (final)
//!   Pending ── terminate (requester: withdraw) ──▶ Terminated (final)
//!   Active  ── terminate (either side) ──────────▶ Terminated (final)
//! ```
//!
//! After `Rejected` or `Terminated`, a new request starts a new relationship
//! with a new id. When one identity is deleted, each of its `Pending` or
//! `Active` relationships ends on the other side too ([`peer_deleted`]). Each side's node keeps that side's view ([`Relationship`]:
//! the peer, its own role, the state); a change is applied to the other
//! side first and then to the deciding side, and both sides are told by a
//! broker [`Notice`] stored in their mailboxes, so every device of both
//! identities learns it, online now or later.
//!
//! Every mailbox has an [`InboundPolicy`]. Under
//! [`InboundPolicy::RelationshipsOnly`] the broker stores an envelope from an
//! identified sender only if the mailbox has an `Active` relationship with
//! it ([`admits`]); a sealed send's delivery capability counts as consent,
//! because the owner handed it out. Envelopes an identity sends to itself
//! (its other devices) are always admitted.
//!
//! Everything here is pure: the broker's mailbox actor and the fuzz and
//! property tests drive the same functions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bytes::{Blob, CapabilityHash, RelationshipId};
use crate::codec::{DecodeError, EncodeError, decode_value, encode_value};
use crate::identity::Address;

/// Which envelopes a mailbox accepts from identified senders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InboundPolicy {
    /// Any identity may send.
    #[default]
    Anyone,
    /// Only identities with an `Active` relationship (and holders of a
    /// registered delivery capability, through sealed sends).
    RelationshipsOnly,
}

impl InboundPolicy {
    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            InboundPolicy::Anyone => "anyone",
            InboundPolicy::RelationshipsOnly => "relationships-only",
        }
    }
}

impl fmt::Display for InboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is neither `anyone` nor `relationships-only`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unknown inbound policy {0:?}: expected \"anyone\" or \"relationships-only\"")]
pub struct ParsePolicyError(pub String);

impl FromStr for InboundPolicy {
    type Err = ParsePolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "anyone" => Ok(InboundPolicy::Anyone),
            "relationships-only" => Ok(InboundPolicy::RelationshipsOnly),
            other => Err(ParsePolicyError(other.to_owned())),
        }
    }
}

/// Which end of a relationship a side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Answered a template and asked.
    Requester,
    /// Owns the template; accepts or rejects.
    Owner,
}

impl Role {
    /// The other side's role.
    pub fn other(self) -> Role {
        match self {
            Role::Requester => Role::Owner,
            Role::Owner => Role::Requester,
        }
    }
}

/// Where a relationship stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Requested; the owner has not decided.
    Pending,
    /// Accepted: both sides consent to envelopes from each other.
    Active,
    /// The owner said no. Final.
    Rejected,
    /// Ended by either side (or withdrawn by the requester). Final.
    Terminated,
}

impl State {
    /// Whether no decision can change this state any more.
    pub fn is_final(self) -> bool {
        matches!(self, State::Rejected | State::Terminated)
    }
}

/// What one side decides about a relationship.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    /// The owner accepts a pending request.
    Accept,
    /// The owner rejects a pending request.
    Reject,
    /// Either side ends an active relationship, or the requester withdraws
    /// a pending request.
    Terminate,
}

impl Decision {
    /// The decision's name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Reject => "reject",
            Decision::Terminate => "terminate",
        }
    }
}

/// One side's view of a relationship, as stored on that side's node and
/// as reported to its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationship {
    /// Shared by both sides' records.
    pub id: RelationshipId,
    /// The other identity.
    pub peer: Address,
    /// This side's role.
    pub role: Role,
    /// Where it stands.
    pub state: State,
    /// When it last changed, milliseconds since the Unix epoch.
    pub changed_at_ms: u64,
}

/// Why a decision or request is not allowed in the relationship's state.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TransitionError {
    /// Only the template's owner accepts or rejects.
    #[error("only the owner of the template can {0} a request")]
    NotOwner(&'static str),
    /// Accept and reject apply to pending requests only.
    #[error("the relationship is {0:?}, not pending")]
    NotPending(State),
    /// The relationship already ended.
    #[error("the relationship has already ended ({0:?})")]
    Ended(State),
    /// A request to someone already related.
    #[error("the relationship is already active")]
    AlreadyActive,
    /// The other identity asked first: the right move is to decide on its request.
    #[error("this identity has a pending request from you to decide on instead")]
    CrossedRequest,
}

/// The state `decision`, taken by the side with `role`, moves `state` to.
pub fn decide(state: State, role: Role, decision: Decision) -> Result<State, TransitionError> {
    match (decision, state, role) {
        (_, state, _) if state.is_final() => Err(TransitionError::Ended(state)),
        (Decision::Accept | Decision::Reject, _, Role::Requester) => {
            Err(TransitionError::NotOwner(decision.as_str()))
        }
        (Decision::Accept, State::Pending, Role::Owner) => Ok(State::Active),
        (Decision::Reject, State::Pending, Role::Owner) => Ok(State::Rejected),
        (Decision::Accept | Decision::Reject, state, Role::Owner) => {
            Err(TransitionError::NotPending(state))
        }
        // The owner of a pending request rejects it rather than terminating.
        (Decision::Terminate, State::Pending, Role::Owner) => {
            Err(TransitionError::NotPending(State::Pending))
        }
        (Decision::Terminate, State::Pending | State::Active, _) => Ok(State::Terminated),
        (Decision::Terminate, state, _) => Err(TransitionError::Ended(state)),
    }
}

/// The state a relationship moves to on one side when the identity on the
/// other side is deleted: a pending or active relationship is terminated,
/// whichever side asked; an ended one stays as it is.
pub fn peer_deleted(state: State) -> State {
    match state {
        State::Pending | State::Active => State::Terminated,
        ended @ (State::Rejected | State::Terminated) => ended,
    }
}

/// What a new request finds on the owner's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// No live relationship: start a new one.
    New,
    /// The same request is already pending (a retry): answer with it again.
    AlreadyPending(Relationship),
}

/// Whether `requester` may ask the owner whose current record for it is
/// `existing` (the owner's view).
pub fn request(existing: Option<&Relationship>) -> Result<RequestOutcome, TransitionError> {
    match existing {
        None => Ok(RequestOutcome::New),
        Some(r) if r.state.is_final() => Ok(RequestOutcome::New),
        Some(r) if r.state == State::Active => Err(TransitionError::AlreadyActive),
        Some(r) if r.role == Role::Owner => Ok(RequestOutcome::AlreadyPending(*r)),
        Some(_) => Err(TransitionError::CrossedRequest),
    }
}

/// Whether a mailbox of `owner` with `policy` stores an envelope from the
/// identified `sender`, given the mailbox's record for that sender.
pub fn admits(
    policy: InboundPolicy,
    owner: &Address,
    sender: &Address,
    relationship: Option<&Relationship>,
) -> bool {
    match policy {
        InboundPolicy::Anyone => true,
        InboundPolicy::RelationshipsOnly => {
            owner == sender || relationship.is_some_and(|r| r.state == State::Active)
        }
    }
}

/// A change to one side's record, applied on that side's node: the unit a
/// node asks a peer node to apply for a side it owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SideChange {
    /// On the owner's side: the peer asks, presenting the hash of a
    /// delivery capability that must be registered with the owner's mailbox;
    /// `intro` is the requester's encrypted introduction, passed on in the
    /// owner's notice.
    Request {
        /// The presented capability's hash.
        capability_hash: CapabilityHash,
        /// Opaque, end-to-end encrypted bytes for the owner.
        intro: Blob,
    },
    /// On the requester's side: record the request the owner's side took
    /// under `id`.
    Requested {
        /// The owner side's id for it.
        id: RelationshipId,
    },
    /// Apply a decision to relationship `id`; `by_peer` says whether the
    /// peer took it (this side is the counterpart) or this side did.
    Decide {
        /// Which relationship.
        id: RelationshipId,
        /// What was decided.
        decision: Decision,
        /// Whether the other side decided.
        by_peer: bool,
    },
    /// On the surviving side: the peer identity was deleted, so
    /// relationship `id` ends ([`peer_deleted`]) and the side is told by
    /// a [`Notice::IdentityDeleted`].
    PeerDeleted {
        /// Which relationship.
        id: RelationshipId,
    },
}

/// The first bytes of every broker notice stored in a mailbox. Clients
/// never send an envelope starting with them: the broker refuses such a
/// send (`ReservedEnvelope`), so a notice cannot be forged by a peer.
pub const NOTICE_PREFIX: [u8; 8] = *b"\xffBBNOTE1";

/// Whether `envelope` starts like a broker notice.
pub fn is_reserved(envelope: &[u8]) -> bool {
    envelope.starts_with(&NOTICE_PREFIX)
}

/// Something the broker tells an identity's devices through its mailbox.
/// The envelope's sender field names the peer the notice concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// A relationship of this identity changed; `relationship` is this
    /// side's view after the change.
    Relationship {
        /// The new state, from this side.
        relationship: Relationship,
        /// With a new request: the requester's encrypted introduction.
        intro: Option<Blob>,
    },
    /// The peer identity was deleted: its mailbox, cards and devices are
    /// gone and its address will never authenticate again.
    /// `relationship` is this side's view afterwards (terminated).
    IdentityDeleted {
        /// This side's record, ended.
        relationship: Relationship,
    },
}

impl Notice {
    /// The envelope bytes: [`NOTICE_PREFIX`] and the encoded notice.
    pub fn to_envelope(&self) -> Result<Vec<u8>, EncodeError> {
        let mut bytes = NOTICE_PREFIX.to_vec();
        bytes.extend(encode_value(self)?);
        Ok(bytes)
    }

    /// The notice in `envelope`, if it is one: `None` for an ordinary
    /// envelope, an error for a notice that does not decode.
    pub fn from_envelope(envelope: &[u8]) -> Option<Result<Notice, DecodeError>> {
        envelope.strip_prefix(&NOTICE_PREFIX).map(decode_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [State; 4] = [
        State::Pending,
        State::Active,
        State::Rejected,
        State::Terminated,
    ];
    const ROLES: [Role; 2] = [Role::Requester, Role::Owner];
    const DECISIONS: [Decision; 3] = [Decision::Accept, Decision::Reject, Decision::Terminate];

    /// The whole transition table, spelled out once.
    #[test]
    fn decisions_follow_the_documented_table() {
        use Decision::*;
        use State::*;
        let allowed = [
            ((Pending, Role::Owner, Accept), Active),
            ((Pending, Role::Owner, Reject), Rejected),
            ((Pending, Role::Requester, Terminate), Terminated),
            ((Active, Role::Owner, Terminate), Terminated),
            ((Active, Role::Requester, Terminate), Terminated),
        ];
        for state in STATES {
            for role in ROLES {
                for decision in DECISIONS {
                    let expected = allowed
                        .iter()
                        .find(|(key, _)| *key == (state, role, decision))
                        .map(|(_, to)| *to);
                    assert_eq!(
                        decide(state, role, decision).ok(),
                        expected,
                        "{state:?} {role:?} {decision:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn final_states_never_change() {
        for state in [State::Rejected, State::Terminated] {
            for role in ROLES {
                for decision in DECISIONS {
                    assert_eq!(
                        decide(state, role, decision),
                        Err(TransitionError::Ended(state))
                    );
                }
            }
        }
    }

    fn record(role: Role, state: State) -> Relationship {
        Relationship {
            id: RelationshipId([1; 16]),
            peer: Address([2; 32]),
            role,
            state,
            changed_at_ms: 5,
        }
    }

    #[test]
    fn requests_start_fresh_after_an_end_and_repeat_while_pending() {
        assert_eq!(request(None), Ok(RequestOutcome::New));
        for ended in [State::Rejected, State::Terminated] {
            assert_eq!(
                request(Some(&record(Role::Owner, ended))),
                Ok(RequestOutcome::New)
            );
        }
        let pending = record(Role::Owner, State::Pending);
        assert_eq!(
            request(Some(&pending)),
            Ok(RequestOutcome::AlreadyPending(pending))
        );
        assert_eq!(
            request(Some(&record(Role::Requester, State::Pending))),
            Err(TransitionError::CrossedRequest)
        );
        assert_eq!(
            request(Some(&record(Role::Owner, State::Active))),
            Err(TransitionError::AlreadyActive)
        );
    }

    #[test]
    fn only_an_active_relationship_admits_under_relationships_only() {
        let (owner, sender) = (Address([1; 32]), Address([2; 32]));
        for state in STATES {
            let r = record(Role::Owner, state);
            assert!(admits(InboundPolicy::Anyone, &owner, &sender, Some(&r)));
            assert_eq!(
                admits(InboundPolicy::RelationshipsOnly, &owner, &sender, Some(&r)),
                state == State::Active,
                "{state:?}"
            );
        }
        assert!(admits(InboundPolicy::Anyone, &owner, &sender, None));
        assert!(!admits(
            InboundPolicy::RelationshipsOnly,
            &owner,
            &sender,
            None
        ));
        // An identity's own devices always reach its mailbox.
        assert!(admits(
            InboundPolicy::RelationshipsOnly,
            &owner,
            &owner,
            None
        ));
    }

    #[test]
    fn notices_round_trip_and_are_told_apart_from_envelopes() {
        let notice = Notice::Relationship {
            relationship: record(Role::Owner, State::Pending),
            intro: Some(Blob::from(vec![9; 40])),
        };
        let bytes = notice.to_envelope().expect("encodes");
        assert!(is_reserved(&bytes));
        // The layout docs/protocol.md gives: prefix, variant, record, intro.
        assert_eq!(bytes.len(), 8 + 4 + 64 + 1 + 8 + 40);
        let bare = Notice::Relationship {
            relationship: record(Role::Owner, State::Active),
            intro: None,
        };
        assert_eq!(bare.to_envelope().expect("encodes").len(), 8 + 4 + 64 + 1);
        assert_eq!(Notice::from_envelope(&bytes), Some(Ok(notice)));
        assert_eq!(Notice::from_envelope(b"\x02an ordinary envelope"), None);
        let mut damaged = NOTICE_PREFIX.to_vec();
        damaged.push(0xee);
        assert!(matches!(Notice::from_envelope(&damaged), Some(Err(_))));
    }

    #[test]
    fn a_deleted_peer_ends_live_relationships_and_leaves_ended_ones() {
        assert_eq!(peer_deleted(State::Pending), State::Terminated);
        assert_eq!(peer_deleted(State::Active), State::Terminated);
        assert_eq!(peer_deleted(State::Rejected), State::Rejected);
        assert_eq!(peer_deleted(State::Terminated), State::Terminated);
    }

    #[test]
    fn the_identity_deleted_notice_has_its_documented_layout() {
        let notice = Notice::IdentityDeleted {
            relationship: record(Role::Requester, State::Terminated),
        };
        let bytes = notice.to_envelope().expect("encodes");
        // The layout docs/protocol.md gives: prefix, variant 1, record.
        assert_eq!(bytes.len(), 8 + 4 + 64);
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(
            bytes[12..12 + 16],
            record(Role::Requester, State::Terminated).id.0
        );
        assert_eq!(Notice::from_envelope(&bytes), Some(Ok(notice)));
    }

    #[test]
    fn policies_parse_from_their_names() {
        for policy in [InboundPolicy::Anyone, InboundPolicy::RelationshipsOnly] {
            assert_eq!(policy.as_str().parse::<InboundPolicy>(), Ok(policy));
        }
        assert!("friends".parse::<InboundPolicy>().is_err());
    }
}
