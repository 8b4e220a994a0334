//! The byte layout of one log record, and its encoding and decoding.
//!
//! ```text
//! offset  size  field
//! 0       4     len    u32 LE: the bytes after this field (crc, kind, body)
//! 4       4     crc    u32 LE: CRC-32 (IEEE) of kind and body
//! 8       1     kind   1 append, 2 delete, 3 drop, 4 batch, 5 moved, 6 void
//! 9       ...   body
//! ```
//!
//! Bodies (integers little-endian):
//!
//! - **append**: `address (32) ‖ seq u64 ‖ message_id (16) ‖ has_sender u8 ‖
//!   sender (32, only if has_sender = 1) ‖ stored_at_ms u64 ‖ expires_at_ms
//!   u64 ‖ envelope_len u32 ‖ envelope`. One envelope for one mailbox.
//! - **delete**: `address (32) ‖ count u32 ‖ seq u64 × count`. The owner
//!   deleted these envelopes.
//! - **drop**: `address (32) ‖ through_seq u64`. Every envelope of the
//!   mailbox up to `through_seq` is gone (the purge of a deleted identity,
//!   or a mailbox handed over to another node).
//! - **moved**: `from u64 ‖` an append body. Compaction copied the append
//!   record at position `from` here; it counts only while the envelope is
//!   still indexed at `from` (one deleted in between stays deleted).
//! - **batch**: `synced_through u64`. Written first in every write of the
//!   log: every byte before `synced_through` had been made durable when this
//!   batch was written. Recovery uses it to tell a torn tail from damage
//!   (see [`super`]).
//! - **void**: any bytes. `backbone store repair` overwrites a damaged
//!   record with a void record of the same length, so that no position
//!   moves.
//!
//! Decoding never panics and never allocates more than the input holds: a
//! length is checked against the bytes present before anything is copied.

use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;
use bytes::Bytes;

use crate::store::StoredEnvelope;

/// Bytes before a record's kind: its length and checksum.
pub const HEADER_LEN: usize = 8;

/// The largest record body the log accepts or reads: an envelope at the
/// protocol's largest frame, with room for the fields.
pub const MAX_RECORD_LEN: usize = backbone_protocol::codec::MAX_FRAME_LEN + 4096;

const KIND_APPEND: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_DROP: u8 = 3;
const KIND_BATCH: u8 = 4;
const KIND_MOVED: u8 = 5;
const KIND_VOID: u8 = 6;

/// The shortest record: a void record with no padding.
pub const MIN_RECORD_LEN: usize = HEADER_LEN + 1;

/// Bytes of an append record's body before the envelope, with a sender.
const APPEND_FIXED_WITH_SENDER: usize = 32 + 8 + 16 + 1 + 32 + 8 + 8 + 4;

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An envelope appended to a mailbox.
    Append {
        /// The mailbox.
        address: Address,
        /// The envelope, with its sequence number.
        envelope: StoredEnvelope,
    },
    /// Envelopes the owner deleted.
    Delete {
        /// The mailbox.
        address: Address,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Every envelope of a mailbox up to `through_seq` is gone.
    Drop {
        /// The mailbox.
        address: Address,
        /// The highest sequence number removed.
        through_seq: u64,
    },
    /// An append record copied forward by compaction.
    Moved {
        /// The position of the record it copies.
        from: u64,
        /// The mailbox.
        address: Address,
        /// The envelope.
        envelope: StoredEnvelope,
    },
    /// The start of one write of the log.
    Batch {
        /// Every byte before this position was durable when the batch was
        /// written.
        synced_through: u64,
    },
    /// Bytes that mean nothing: a damaged record overwritten by repair.
    Void {
        /// Bytes after the kind.
        padding: usize,
    },
}

/// Why bytes are not a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes end before the record does.
    #[error("the record needs {needed} bytes, {available} are there")]
    Incomplete {
        /// Bytes the record spans, header included.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The length field is zero or above [`MAX_RECORD_LEN`].
    #[error("impossible record length {0}")]
    BadLength(u32),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum matches but the body does not have its kind's layout
    /// (written by a broken build, or a checksum collision).
    #[error("malformed {0} record")]
    Malformed(&'static str),
    /// An unknown kind byte, with a matching checksum.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

impl Record {
    /// Appends the encoded record, header included, to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        match self {
            Record::Append { address, envelope } => {
                out.push(KIND_APPEND);
                encode_append_body(address, envelope, out);
            }
            Record::Delete { address, seqs } => {
                out.push(KIND_DELETE);
                out.extend_from_slice(&address.0);
                out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
                for seq in seqs {
                    out.extend_from_slice(&seq.to_le_bytes());
                }
            }
            Record::Drop {
                address,
                through_seq,
            } => {
                out.push(KIND_DROP);
                out.extend_from_slice(&address.0);
                out.extend_from_slice(&through_seq.to_le_bytes());
            }
            Record::Moved {
                from,
                address,
                envelope,
            } => {
                out.push(KIND_MOVED);
                out.extend_from_slice(&from.to_le_bytes());
                encode_append_body(address, envelope, out);
            }
            Record::Batch { synced_through } => {
                out.push(KIND_BATCH);
                out.extend_from_slice(&synced_through.to_le_bytes());
            }
            Record::Void { padding } => {
                out.push(KIND_VOID);
                out.resize(out.len() + padding, 0);
            }
        }
        seal(out, start);
    }

    /// The encoded record.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Encodes an append record for `envelope` of `address` into `out`, header
/// included: the hot path's encoder, without building a [`Record`].
pub fn encode_append(address: &Address, envelope: &StoredEnvelope, out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(HEADER_LEN + 1 + APPEND_FIXED_WITH_SENDER + envelope.envelope.len());
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(KIND_APPEND);
    encode_append_body(address, envelope, out);
    seal(out, start);
}

fn encode_append_body(address: &Address, envelope: &StoredEnvelope, out: &mut Vec<u8>) {
    out.extend_from_slice(&address.0);
    out.extend_from_slice(&envelope.seq.to_le_bytes());
    out.extend_from_slice(&envelope.message_id.0);
    match &envelope.sender {
        Some(sender) => {
            out.push(1);
            out.extend_from_slice(&sender.0);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&envelope.stored_at_ms.to_le_bytes());
    out.extend_from_slice(&envelope.expires_at_ms.to_le_bytes());
    out.extend_from_slice(&(envelope.envelope.len() as u32).to_le_bytes());
    out.extend_from_slice(&envelope.envelope);
}

/// Fills in the length and checksum of the record that starts at `start`.
fn seal(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The total length (header included) of the record starting at `bytes`,
/// from its length field alone, if the field is there and possible.
pub fn record_len(bytes: &[u8]) -> Result<usize, RecordError> {
    let Some(field) = bytes.get(..4) else {
        return Err(RecordError::Incomplete {
            needed: 4,
            available: bytes.len(),
        });
    };
    let len = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
    // At least the checksum and the kind.
    if len < 5 || len as usize > MAX_RECORD_LEN {
        return Err(RecordError::BadLength(len));
    }
    Ok(4 + len as usize)
}

/// Decodes the record at the start of `bytes`; returns it and its length.
/// The checksum is checked before anything else is read.
pub fn decode(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    let total = record_len(bytes)?;
    let Some(record) = bytes.get(..total) else {
        return Err(RecordError::Incomplete {
            needed: total,
            available: bytes.len(),
        });
    };
    let stored = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    let payload = &record[HEADER_LEN..];
    if crc32fast::hash(payload) != stored {
        return Err(RecordError::Checksum);
    }
    let (&kind, body) = payload
        .split_first()
        .ok_or(RecordError::Malformed("empty"))?;
    let mut reader = Reader(body);
    let record = match kind {
        KIND_APPEND => {
            let address = Address(reader.array().ok_or(RecordError::Malformed("append"))?);
            let envelope =
                decode_append_fields(&mut reader).ok_or(RecordError::Malformed("append"))?;
            Record::Append { address, envelope }
        }
        KIND_DELETE => {
            let malformed = RecordError::Malformed("delete");
            let address = Address(reader.array().ok_or(malformed.clone())?);
            let count = reader.u32().ok_or(malformed.clone())? as usize;
            if reader.0.len() != count * 8 {
                return Err(malformed);
            }
            let seqs = reader
                .0
                .chunks_exact(8)
                .map(|seq| u64::from_le_bytes(seq.try_into().expect("8 bytes")))
                .collect();
            reader.0 = &[];
            Record::Delete { address, seqs }
        }
        KIND_DROP => {
            let malformed = RecordError::Malformed("drop");
            let address = Address(reader.array().ok_or(malformed.clone())?);
            let through_seq = reader.u64().ok_or(malformed)?;
            Record::Drop {
                address,
                through_seq,
            }
        }
        KIND_MOVED => {
            let malformed = RecordError::Malformed("moved");
            let from = reader.u64().ok_or(malformed.clone())?;
            let address = Address(reader.array().ok_or(malformed.clone())?);
            let envelope = decode_append_fields(&mut reader).ok_or(malformed)?;
            Record::Moved {
                from,
                address,
                envelope,
            }
        }
        KIND_BATCH => Record::Batch {
            synced_through: reader.u64().ok_or(RecordError::Malformed("batch"))?,
        },
        KIND_VOID => {
            let padding = reader.0.len();
            reader.0 = &[];
            Record::Void { padding }
        }
        other => return Err(RecordError::UnknownKind(other)),
    };
    if !reader.0.is_empty() {
        return Err(RecordError::Malformed("trailing bytes"));
    }
    Ok((record, total))
}

/// The fields of an append record after its address.
fn decode_append_fields(reader: &mut Reader<'_>) -> Option<StoredEnvelope> {
    let seq = reader.u64()?;
    let message_id = MessageId(reader.array()?);
    let sender = match reader.u8()? {
        0 => None,
        1 => Some(Address(reader.array()?)),
        _ => return None,
    };
    let stored_at_ms = reader.u64()?;
    let expires_at_ms = reader.u64()?;
    let len = reader.u32()? as usize;
    let envelope = Bytes::copy_from_slice(reader.take(len)?);
    Some(StoredEnvelope {
        seq,
        message_id,
        sender,
        stored_at_ms,
        expires_at_ms,
        envelope,
    })
}

/// A cursor over a record body; every read checks the bytes are there.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(seq: u64, sender: Option<Address>, bytes: &[u8]) -> StoredEnvelope {
        StoredEnvelope {
            seq,
            message_id: MessageId([seq as u8; 16]),
            sender,
            stored_at_ms: 1_000 + seq,
            expires_at_ms: 9_000 + seq,
            envelope: Bytes::copy_from_slice(bytes),
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Append {
                address: Address([1; 32]),
                envelope: envelope(7, Some(Address([2; 32])), b"sealed bytes"),
            },
            Record::Append {
                address: Address([3; 32]),
                envelope: envelope(1, None, b""),
            },
            Record::Delete {
                address: Address([1; 32]),
                seqs: vec![3, 1, 9],
            },
            Record::Delete {
                address: Address([1; 32]),
                seqs: vec![],
            },
            Record::Drop {
                address: Address([4; 32]),
                through_seq: 77,
            },
            Record::Moved {
                from: 16,
                address: Address([5; 32]),
                envelope: envelope(2, None, b"moved"),
            },
            Record::Batch {
                synced_through: 123_456,
            },
            Record::Void { padding: 3 },
            Record::Void { padding: 0 },
        ]
    }

    #[test]
    fn every_kind_round_trips_back_to_back() {
        let mut bytes = Vec::new();
        for record in records() {
            record.encode_into(&mut bytes);
        }
        let mut at = 0;
        let mut decoded = Vec::new();
        while at < bytes.len() {
            let (record, len) = decode(&bytes[at..]).expect("decodes");
            decoded.push(record);
            at += len;
        }
        assert_eq!(decoded, records());
    }

    #[test]
    fn the_hot_path_encoder_writes_the_same_bytes_as_a_record() {
        let address = Address([9; 32]);
        let envelope = envelope(5, Some(Address([8; 32])), &[6; 1024]);
        let mut fast = Vec::new();
        encode_append(&address, &envelope, &mut fast);
        assert_eq!(fast, Record::Append { address, envelope }.to_bytes());
    }

    #[test]
    fn every_cut_is_incomplete_and_every_flipped_bit_is_caught() {
        for record in records() {
            let bytes = record.to_bytes();
            for cut in 0..bytes.len() {
                assert!(
                    matches!(
                        decode(&bytes[..cut]),
                        Err(RecordError::Incomplete { .. } | RecordError::BadLength(_))
                    ),
                    "{record:?} cut at {cut}"
                );
            }
            for byte in 0..bytes.len() {
                for bit in 0..8 {
                    let mut damaged = bytes.clone();
                    damaged[byte] ^= 1 << bit;
                    assert!(
                        decode(&damaged).map(|(decoded, _)| decoded) != Ok(record.clone()),
                        "{record:?}: flipping bit {bit} of byte {byte} went unnoticed"
                    );
                    assert!(decode(&damaged).is_err(), "byte {byte} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn impossible_lengths_are_refused_from_the_length_field() {
        assert_eq!(
            decode(&[0, 0, 0, 0, 1, 2, 3, 4, 5]),
            Err(RecordError::BadLength(0))
        );
        let huge = (MAX_RECORD_LEN as u32 + 1).to_le_bytes();
        assert_eq!(
            decode(&[huge[0], huge[1], huge[2], huge[3]]),
            Err(RecordError::BadLength(MAX_RECORD_LEN as u32 + 1))
        );
    }

    #[test]
    fn a_matching_checksum_over_a_bad_layout_is_malformed() {
        // A delete whose count does not match its seqs, sealed properly.
        let mut bytes = vec![0; HEADER_LEN];
        bytes.push(KIND_DELETE);
        bytes.extend_from_slice(&[1; 32]);
        bytes.extend_from_slice(&5u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        seal(&mut bytes, 0);
        assert_eq!(decode(&bytes), Err(RecordError::Malformed("delete")));
        let mut unknown = vec![0; HEADER_LEN];
        unknown.push(99);
        seal(&mut unknown, 0);
        assert_eq!(decode(&unknown), Err(RecordError::UnknownKind(99)));
    }
}
