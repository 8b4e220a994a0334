//! Finding damaged records in a log that is not open, and dropping them.
//!
//! [`verify`] reads every record of every segment and reports each range of
//! bytes that is not a valid record: where it is, what is wrong, and which
//! mailboxes had envelopes there (from the index checkpoint, or, for a
//! record after the checkpoint, from the damaged bytes themselves when they
//! still read as an address).
//!
//! [`repair`] drops exactly those ranges: each is overwritten in place by a
//! void record of the same length, so no position moves and the index stays
//! valid, and the checkpointed index entries that pointed into them are
//! removed. A damaged range at the very end of the last segment is cut off
//! instead, as the broker would at start.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use backbone_protocol::Address;

use super::checkpoint::{self, Checkpoints};
use super::index::MailboxIndex;
use super::record::{self, MIN_RECORD_LEN, Record};
use super::segment::{Scanned, Scanner, Segment, Segments};
use crate::store::StoreError;
use crate::store::failpoint::FailPoints;

/// One damaged range of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub file: PathBuf,
    /// Where the range starts in the file.
    pub offset: u64,
    /// Its log position.
    pub position: u64,
    /// Its length, up to the next valid record or the end of the file.
    pub len: u64,
    /// What is wrong at its start.
    pub error: String,
    /// Whether it runs to the end of the last segment (a torn tail, which
    /// the broker cuts off at start by itself).
    pub tail: bool,
    /// Mailboxes with envelopes indexed in the range (by the checkpoint).
    pub mailboxes: BTreeSet<Address>,
    /// For a range the checkpoint does not cover: the address its damaged
    /// bytes still read as, which may itself be damaged.
    pub possibly: Option<Address>,
}

/// Reads the whole log in `dir` and reports every damaged range; the
/// checkpoint in `checkpoints` names the mailboxes affected.
pub fn verify(
    dir: &std::path::Path,
    checkpoints: &dyn Checkpoints,
) -> Result<Vec<Damage>, StoreError> {
    let fail = FailPoints::default();
    let segments = Segments::open(dir, 0, &fail)?;
    let (indexed, covered) = checkpointed(checkpoints)?;
    let all = segments.all();
    let mut damages = Vec::new();
    for (at, segment) in all.iter().enumerate() {
        let last = at + 1 == all.len();
        let mut scanner = Scanner::new(segment, segment.first_record());
        loop {
            match scanner.next_record()? {
                Scanned::End => break,
                Scanned::Record { .. } => {}
                Scanned::Bad(position, _) if last && super::zeros_from(segment, position)? => {
                    break;
                }
                Scanned::Bad(position, error) => {
                    let next = next_valid(segment, position)?;
                    let end = next.unwrap_or(segment.end());
                    let mailboxes: BTreeSet<Address> = indexed
                        .range(position..end)
                        .map(|(_, address)| *address)
                        .collect();
                    let possibly = if position >= covered {
                        address_in(segment, position)?
                    } else {
                        None
                    };
                    damages.push(Damage {
                        file: segment.path().to_owned(),
                        offset: position - segment.base(),
                        position,
                        len: end - position,
                        error: error.to_string(),
                        tail: last && next.is_none(),
                        mailboxes,
                        possibly,
                    });
                    match next {
                        Some(next) => scanner.skip_to(next),
                        None => break,
                    }
                }
            }
        }
    }
    Ok(damages)
}

/// Drops the `damages` [`verify`] found in `dir`, and the checkpointed index
/// entries that pointed into them. Returns how many envelopes were dropped
/// from the index.
pub fn repair(
    dir: &std::path::Path,
    checkpoints: &dyn Checkpoints,
    damages: &[Damage],
) -> Result<usize, StoreError> {
    let fail = FailPoints::default();
    let segments = Segments::open(dir, 0, &fail)?;
    for damage in damages {
        let segment = segments
            .holding(damage.position)
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("no segment holds position {}", damage.position),
            })?;
        if damage.tail {
            let keep = segment.file_len()?;
            segment.truncate(damage.position, Some(keep), &fail)?;
        } else {
            overwrite_with_void(&segment, damage.position, damage.len)?;
        }
    }
    // Drop the index entries that pointed into the dropped ranges.
    let mut changed = Vec::new();
    let mut dropped = 0;
    let mut mailboxes: Vec<(Address, MailboxIndex)> = Vec::new();
    let covered = checkpoints.load_checkpoint(&mut |address, bytes| {
        mailboxes.push((address, checkpoint::decode(bytes)?));
        Ok(())
    })?;
    for (address, mut mailbox) in mailboxes {
        let before = mailbox.entries.len();
        mailbox.entries.retain(|entry| {
            !damages.iter().any(|damage| {
                (damage.position..damage.position + damage.len).contains(&entry.position)
            })
        });
        if mailbox.entries.len() != before {
            dropped += before - mailbox.entries.len();
            changed.push((address, Some(checkpoint::encode(&mailbox))));
        }
    }
    if !changed.is_empty() {
        checkpoints.write_checkpoint(&changed, covered.unwrap_or(0))?;
    }
    Ok(dropped)
}

/// Overwrites `len` bytes at `position` with void records.
fn overwrite_with_void(segment: &Segment, position: u64, len: u64) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(len as usize);
    let mut left = len as usize;
    while left > 0 {
        // One record as large as allowed; a remainder too short for a
        // record of its own goes into the one before.
        let mut take = left.min(record::MAX_RECORD_LEN / 2);
        if left - take < MIN_RECORD_LEN && left - take > 0 {
            take = left - MIN_RECORD_LEN;
        }
        if take < MIN_RECORD_LEN {
            return Err(StoreError::Corrupt {
                what: format!(
                    "{} bytes at position {position} are too few to overwrite with a void record",
                    len
                ),
            });
        }
        Record::Void {
            padding: take - MIN_RECORD_LEN,
        }
        .encode_into(&mut bytes);
        left -= take;
    }
    segment.overwrite(position, &bytes)
}

/// The position of the next valid record after the bad bytes at `position`.
fn next_valid(segment: &Segment, position: u64) -> Result<Option<u64>, StoreError> {
    let rest = segment.read_at(position, (segment.end() - position) as usize)?;
    for offset in 1..rest.len() {
        if record::decode(&rest[offset..]).is_ok() {
            return Ok(Some(position + offset as u64));
        }
    }
    Ok(None)
}

/// The mailbox address in the damaged bytes at `position`, if they still
/// read as the start of an append record.
fn address_in(segment: &Segment, position: u64) -> Result<Option<Address>, StoreError> {
    let available = (segment.end() - position).min(64) as usize;
    let bytes = segment.read_at(position, available)?;
    // Header (8) and kind (1) of an append, then the address.
    if bytes.len() >= 9 + 32 && bytes[8] == 1 {
        return Ok(Some(Address(bytes[9..41].try_into().expect("32 bytes"))));
    }
    Ok(None)
}

/// Every checkpointed index entry's position, with its mailbox, and the
/// position the checkpoint covers.
fn checkpointed(
    checkpoints: &dyn Checkpoints,
) -> Result<(BTreeMap<u64, Address>, u64), StoreError> {
    let mut positions = BTreeMap::new();
    let covered = checkpoints.load_checkpoint(&mut |address, bytes| {
        for entry in checkpoint::decode(bytes)?.entries {
            positions.insert(entry.position, address);
        }
        Ok(())
    })?;
    Ok((positions, covered.unwrap_or(0)))
}
