//! Identity deletion: the states an identity's deletion goes through on the
//! node that owns its address, as that node stores them and as they move in
//! a slot handover.
//!
//! ```text
//!   DeleteIdentity                   grace period over: purge begins
//!   ─────────────▶ Scheduled ─────────────────────────────────────▶ Purging ──▶ Deleted
//!                  │  CancelDeletion                                  every peer told
//!                  ▼
//!                (none)
//! ```
//!
//! `Purging` and `Deleted` are both a *tombstone*: from the moment purging
//! begins, the address is refused everywhere (authentication, sends, cards,
//! relationships) and never accepted again. `Purging` additionally lists the
//! peers whose side of a live relationship has not yet been ended and told
//! (see [`crate::relationship::SideChange::PeerDeleted`]); the node keeps
//! retrying them, and drops the list, and with it the last trace of the
//! identity's relationships, once all are told. An identity's address is the
//! hash of its key, so no other key can ever claim it; the tombstone keeps
//! the one key that could from coming back.

use serde::{Deserialize, Serialize};

use crate::bytes::RelationshipId;
use crate::identity::Address;

/// Where an identity's deletion stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deletion {
    /// Asked for; the identity works as before, and may cancel, until
    /// `purge_at_ms`.
    Scheduled {
        /// When the purge begins, milliseconds since the Unix epoch.
        purge_at_ms: u64,
    },
    /// The purge has begun: the address is a tombstone, its records are
    /// being deleted, and these peers are still to be told.
    Purging {
        /// When the purge was due (the schedule's time, kept so the node
        /// finds the unfinished purge again).
        purge_at_ms: u64,
        /// Peers with a pending or active relationship whose side has not
        /// been ended yet.
        to_tell: Vec<PeerToTell>,
    },
    /// Done: nothing about the identity is kept but this tombstone.
    Deleted,
}

/// A peer that still has to learn that the identity was deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerToTell {
    /// The other identity.
    pub peer: Address,
    /// The relationship to end on its side.
    pub relationship: RelationshipId,
}

impl Deletion {
    /// Whether the address is refused everywhere: the purge has begun or
    /// is done.
    pub fn is_tombstone(&self) -> bool {
        !matches!(self, Deletion::Scheduled { .. })
    }

    /// The time the deletion is filed under while work remains, `None`
    /// once it is done.
    pub fn due_at_ms(&self) -> Option<u64> {
        match self {
            Deletion::Scheduled { purge_at_ms } | Deletion::Purging { purge_at_ms, .. } => {
                Some(*purge_at_ms)
            }
            Deletion::Deleted => None,
        }
    }

    /// How far the deletion went: a tombstone never becomes a schedule
    /// again, and a finished purge never becomes an unfinished one.
    fn progress(&self) -> u8 {
        match self {
            Deletion::Scheduled { .. } => 0,
            Deletion::Purging { .. } => 1,
            Deletion::Deleted => 2,
        }
    }
}

/// The record to keep when a slot handover brings `incoming` for an address
/// that already has `held`: the one further along, or `incoming` when both
/// are as far. So a tombstone survives any import, and importing the same
/// record twice changes nothing.
pub fn merge(held: Option<&Deletion>, incoming: &Deletion) -> Deletion {
    match held {
        Some(held) if held.progress() > incoming.progress() => held.clone(),
        _ => incoming.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purging(n: u8) -> Deletion {
        Deletion::Purging {
            purge_at_ms: 5,
            to_tell: vec![PeerToTell {
                peer: Address([n; 32]),
                relationship: RelationshipId([n; 16]),
            }],
        }
    }

    #[test]
    fn only_a_schedule_is_not_a_tombstone() {
        let scheduled = Deletion::Scheduled { purge_at_ms: 5 };
        assert!(!scheduled.is_tombstone());
        assert!(purging(1).is_tombstone());
        assert!(Deletion::Deleted.is_tombstone());
        assert_eq!(scheduled.due_at_ms(), Some(5));
        assert_eq!(purging(1).due_at_ms(), Some(5));
        assert_eq!(Deletion::Deleted.due_at_ms(), None);
    }

    #[test]
    fn an_import_never_undoes_a_deletion() {
        let scheduled = Deletion::Scheduled { purge_at_ms: 9 };
        for held in [scheduled.clone(), purging(1), Deletion::Deleted] {
            assert_eq!(merge(Some(&held), &held), held, "idempotent");
            assert_eq!(merge(None, &held), held);
        }
        assert_eq!(merge(Some(&purging(1)), &scheduled), purging(1));
        assert_eq!(
            merge(Some(&Deletion::Deleted), &purging(1)),
            Deletion::Deleted
        );
        assert_eq!(merge(Some(&scheduled), &purging(1)), purging(1));
        // A newer schedule of the same progress replaces the older one.
        let later = Deletion::Scheduled { purge_at_ms: 10 };
        assert_eq!(merge(Some(&scheduled), &later), later);
        assert_eq!(merge(Some(&purging(1)), &purging(2)), purging(2));
    }
}
