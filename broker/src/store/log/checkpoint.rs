//! Checkpoints of the log's index, kept in the directory store.
//!
//! A checkpoint is one value per mailbox (its head and its entries, the
//! layout below) and the log position it covers, written in that order and
//! each made durable: a crash between the two leaves the previous position
//! with some newer mailbox values, which replay from that position
//! reconciles (replaying a record twice changes nothing).
//!
//! ```text
//! version u8 (1) ‖ head u64 ‖ count u32 ‖ count × (seq u64 ‖ position u64 ‖
//! len u32 ‖ envelope_len u32 ‖ expires_at_ms u64)        integers LE
//! ```

use std::collections::VecDeque;

use backbone_protocol::Address;

use super::index::{Entry, MailboxIndex};
use crate::store::StoreError;

const VERSION: u8 = 1;
const ENTRY_LEN: usize = 32;

/// Visits one checkpointed mailbox: its address and encoded index.
pub type Visit<'a> = dyn FnMut(Address, &[u8]) -> Result<(), StoreError> + 'a;

/// Where checkpoints of the log's index are kept: the directory store.
pub trait Checkpoints: Send + Sync {
    /// The position the durable checkpoint covers (`None`: there is none),
    /// visiting every mailbox value in it.
    fn load_checkpoint(&self, visit: &mut Visit<'_>) -> Result<Option<u64>, StoreError>;

    /// The checkpointed value of one mailbox.
    fn checkpointed(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `mailboxes`' values (`None` removes a forgotten mailbox's)
    /// and makes them durable, then records that the checkpoint covers the
    /// log up to `position`, durably.
    fn write_checkpoint(
        &self,
        mailboxes: &[(Address, Option<Vec<u8>>)],
        position: u64,
    ) -> Result<(), StoreError>;
}

/// Encodes one mailbox's index.
pub fn encode(mailbox: &MailboxIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + mailbox.entries.len() * ENTRY_LEN);
    out.push(VERSION);
    out.extend_from_slice(&mailbox.head.to_le_bytes());
    out.extend_from_slice(&(mailbox.entries.len() as u32).to_le_bytes());
    for entry in &mailbox.entries {
        out.extend_from_slice(&entry.seq.to_le_bytes());
        out.extend_from_slice(&entry.position.to_le_bytes());
        out.extend_from_slice(&entry.len.to_le_bytes());
        out.extend_from_slice(&entry.envelope_len.to_le_bytes());
        out.extend_from_slice(&entry.expires_at_ms.to_le_bytes());
    }
    out
}

/// Decodes one mailbox's index.
pub fn decode(bytes: &[u8]) -> Result<MailboxIndex, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        what: format!("log index checkpoint: {what}"),
    };
    let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
    if version != VERSION {
        return Err(corrupt(&format!("unknown version {version}")));
    }
    if rest.len() < 12 {
        return Err(corrupt("shorter than its header"));
    }
    let head = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
    let body = &rest[12..];
    if body.len() != count * ENTRY_LEN {
        return Err(corrupt("entry count does not match its length"));
    }
    let mut entries = VecDeque::with_capacity(count);
    for chunk in body.chunks_exact(ENTRY_LEN) {
        let u64_at = |at: usize| u64::from_le_bytes(chunk[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_le_bytes(chunk[at..at + 4].try_into().expect("4"));
        let entry = Entry {
            seq: u64_at(0),
            position: u64_at(8),
            len: u32_at(16),
            envelope_len: u32_at(20),
            expires_at_ms: u64_at(24),
        };
        if entries
            .back()
            .is_some_and(|last: &Entry| last.seq >= entry.seq)
            || entry.seq > head
        {
            return Err(corrupt("entries out of order or above the head"));
        }
        entries.push_back(entry);
    }
    Ok(MailboxIndex { head, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mailbox_round_trips_and_bad_bytes_are_corrupt() {
        let mailbox = MailboxIndex {
            head: 9,
            entries: [(3, 100), (9, 900)]
                .into_iter()
                .map(|(seq, position)| Entry {
                    seq,
                    position,
                    len: 200,
                    envelope_len: 50,
                    expires_at_ms: 77,
                })
                .collect(),
        };
        let bytes = encode(&mailbox);
        assert_eq!(decode(&bytes), Ok(mailbox));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut unordered = bytes.clone();
        unordered[13..21].copy_from_slice(&10u64.to_le_bytes());
        assert!(decode(&unordered).is_err());
    }
}
