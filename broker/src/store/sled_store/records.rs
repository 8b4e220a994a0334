//! The sled store's records one at a time: [`decode_record`] reads any
//! `(tree, key, value)` the store can hold, with the same decoding helpers
//! the store's reads use, and [`StoredRecord::encode`] writes it back with
//! the helpers its writes use.
//!
//! Nothing on the broker's serving path calls these; they exist so the
//! record layout of the module documentation can be checked as a whole: a
//! test decodes every record a populated store holds and re-encodes it to
//! the same bytes, and the fuzz target `stored_records` feeds arbitrary
//! bytes to the same decoding, which must give a typed error or a record
//! that re-encodes to exactly its input.

use backbone_protocol::bytes::{CapabilityHash, FileId, ServerId, TokenId};
use backbone_protocol::deletion::Deletion;
use backbone_protocol::relationship::{InboundPolicy, Relationship};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard};

use super::{
    ADDRESS_LEN, COUNT_KEY, EPOCH_KEY, LOG_CHECKPOINT_KEY, SERVER_ID_KEY, decode, decode_envelope,
    decode_policy, decode_server_id, decode_u64, deletion_index_key, encode, encode_envelope,
    encode_policy, envelope_key, expiry_id_key, expiry_key, meta_key, pair_key,
    split_deletion_index_key, split_envelope_key, split_expiry_id_key, split_expiry_key,
};
use crate::store::{DumpedRecord, StoreError, StoredEnvelope, StoredFile, StoredToken};

/// The name sled gives its default tree, which the store never writes.
const DEFAULT_TREE: &str = "__sled__default";

/// One record of the sled store, decoded; each variant is one row of the
/// layout table in the module documentation, named after its tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredRecord {
    /// `envelopes`: one stored envelope.
    Envelope {
        /// The mailbox.
        address: Address,
        /// The envelope (its `seq` and expiry agree with the key and prefix).
        envelope: StoredEnvelope,
    },
    /// `envelopes`, empty key: how many envelopes the tree holds.
    EnvelopeCount(u64),
    /// `expiry`: an envelope's expiry index entry.
    Expiry {
        /// When the envelope expires.
        expires_at_ms: u64,
        /// Its mailbox.
        address: Address,
        /// Its sequence number.
        seq: u64,
    },
    /// `heads`: a mailbox's recorded head.
    Head {
        /// The mailbox.
        address: Address,
        /// The head sequence number.
        head: u64,
    },
    /// `cursors`: a device's acknowledged sequence number.
    Cursor {
        /// The mailbox.
        address: Address,
        /// The device.
        device: DeviceId,
        /// The acknowledged sequence number.
        seq: u64,
    },
    /// `cards`: an identity card.
    Card {
        /// The address it is stored under.
        address: Address,
        /// The card.
        card: IdentityCard,
    },
    /// `devices`: a registered device certificate.
    Device {
        /// The address it is stored under.
        address: Address,
        /// The device id it is stored under.
        device: DeviceId,
        /// The certificate.
        certificate: DeviceCertificate,
    },
    /// `capabilities`: a registered capability hash (the key is the record).
    Capability {
        /// The mailbox.
        address: Address,
        /// The hash.
        hash: CapabilityHash,
    },
    /// `tokens`: a token.
    Token {
        /// The id it is stored under.
        id: TokenId,
        /// The token.
        token: StoredToken,
    },
    /// `token_owners`: an owner's token index entry.
    TokenOwner {
        /// The owner.
        owner: Address,
        /// The token.
        id: TokenId,
        /// The token's expiry.
        expires_at_ms: u64,
    },
    /// `token_expiry`: a token's expiry index entry.
    TokenExpiry {
        /// When the token expires.
        expires_at_ms: u64,
        /// The token.
        id: TokenId,
        /// Its owner.
        owner: Address,
    },
    /// `files`: a file record.
    File {
        /// The id it is stored under.
        id: FileId,
        /// The record.
        file: StoredFile,
    },
    /// `file_owners`: an owner's file index entry.
    FileOwner {
        /// The owner.
        owner: Address,
        /// The file.
        id: FileId,
        /// The file's expiry.
        expires_at_ms: u64,
    },
    /// `file_expiry`: a file's expiry index entry.
    FileExpiry {
        /// When the file expires.
        expires_at_ms: u64,
        /// The file.
        id: FileId,
        /// Its owner.
        owner: Address,
    },
    /// `policies`: an address's inbound policy.
    Policy {
        /// The address.
        address: Address,
        /// Its policy.
        policy: InboundPolicy,
    },
    /// `relationships`: the address's side of one relationship.
    Relationship {
        /// The address.
        address: Address,
        /// The peer it is stored under.
        peer: Address,
        /// The relationship.
        relationship: Relationship,
    },
    /// `deletions`: an identity's deletion or tombstone.
    Deletion {
        /// The address.
        address: Address,
        /// The record.
        deletion: Deletion,
    },
    /// `deletion_index`: a deletion with work left.
    DeletionDue {
        /// When the work is due.
        due_at_ms: u64,
        /// The address.
        address: Address,
    },
    /// `log_index`: one mailbox's checkpointed log index (its layout is the
    /// log's, see `store::log::checkpoint`).
    LogIndex {
        /// The mailbox.
        address: Address,
        /// The encoded index.
        value: Vec<u8>,
    },
    /// `meta`, `"log_checkpoint"`: the log position the checkpoint covers.
    LogCheckpoint(u64),
    /// `meta`, `"server_id"`: the node's server id.
    ServerId(ServerId),
    /// `meta`, `"write_epoch"`: flushes so far.
    WriteEpoch(u64),
    /// `meta`, `"node/" ‖ key`: a node-level value, opaque to the store.
    NodeMeta {
        /// The key, without the `node/` prefix.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
}

/// A record that is not laid out as the store writes it: wrong key length,
/// a value where none belongs, an unknown tree or meta key.
fn layout(tree: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: format!("{tree} record: {what}"),
    }
}

/// A key of exactly `N` bytes.
fn fixed<const N: usize>(tree: &str, key: &[u8]) -> Result<[u8; N], StoreError> {
    key.try_into()
        .map_err(|_| layout(tree, format_args!("key of {} bytes, not {N}", key.len())))
}

/// A key `address(32) ‖ other(32)`.
fn pair(tree: &str, key: &[u8]) -> Result<(Address, [u8; 32]), StoreError> {
    let key: [u8; 64] = fixed(tree, key)?;
    let (address, other) = key.split_at(ADDRESS_LEN);
    Ok((
        Address(address.try_into().expect("32 of 64 bytes")),
        other.try_into().expect("32 of 64 bytes"),
    ))
}

/// An index entry, whose key is the whole record.
fn empty(tree: &str, value: &[u8]) -> Result<(), StoreError> {
    if value.is_empty() {
        Ok(())
    } else {
        Err(layout(
            tree,
            format_args!("a value of {} bytes where none belongs", value.len()),
        ))
    }
}

/// Decodes one record of the tree `tree` as the store reads it.
pub fn decode_record(tree: &str, key: &[u8], value: &[u8]) -> Result<StoredRecord, StoreError> {
    let record = match tree {
        "envelopes" if key == COUNT_KEY => {
            StoredRecord::EnvelopeCount(decode_u64(value, "envelope count")?)
        }
        "envelopes" => StoredRecord::Envelope {
            address: split_envelope_key(key)?.0,
            envelope: decode_envelope(key, value)?,
        },
        "expiry" => {
            let (expires_at_ms, address, seq) = split_expiry_key(key)?;
            empty(tree, value)?;
            StoredRecord::Expiry {
                expires_at_ms,
                address,
                seq,
            }
        }
        "heads" => StoredRecord::Head {
            address: Address(fixed(tree, key)?),
            head: decode_u64(value, "mailbox head")?,
        },
        "cursors" => {
            let (address, device) = pair(tree, key)?;
            StoredRecord::Cursor {
                address,
                device: DeviceId(device),
                seq: decode_u64(value, "cursor")?,
            }
        }
        "cards" => StoredRecord::Card {
            address: Address(fixed(tree, key)?),
            card: decode(value, "identity card")?,
        },
        "devices" => {
            let (address, device) = pair(tree, key)?;
            StoredRecord::Device {
                address,
                device: DeviceId(device),
                certificate: decode(value, "device certificate")?,
            }
        }
        "capabilities" => {
            let (address, hash) = pair(tree, key)?;
            empty(tree, value)?;
            StoredRecord::Capability {
                address,
                hash: CapabilityHash(hash),
            }
        }
        "tokens" => StoredRecord::Token {
            id: TokenId(fixed(tree, key)?),
            token: decode(value, "token")?,
        },
        "token_owners" => {
            let (owner, id) = pair(tree, key)?;
            StoredRecord::TokenOwner {
                owner,
                id: TokenId(id),
                expires_at_ms: decode_u64(value, "token owner entry")?,
            }
        }
        "token_expiry" => {
            let (expires_at_ms, id, owner) = split_expiry_id_key(key, "token expiry key")?;
            empty(tree, value)?;
            StoredRecord::TokenExpiry {
                expires_at_ms,
                id: TokenId(id),
                owner,
            }
        }
        "files" => StoredRecord::File {
            id: FileId(fixed(tree, key)?),
            file: decode(value, "file")?,
        },
        "file_owners" => {
            let (owner, id) = pair(tree, key)?;
            StoredRecord::FileOwner {
                owner,
                id: FileId(id),
                expires_at_ms: decode_u64(value, "file owner entry")?,
            }
        }
        "file_expiry" => {
            let (expires_at_ms, id, owner) = split_expiry_id_key(key, "file expiry key")?;
            empty(tree, value)?;
            StoredRecord::FileExpiry {
                expires_at_ms,
                id: FileId(id),
                owner,
            }
        }
        "policies" => StoredRecord::Policy {
            address: Address(fixed(tree, key)?),
            policy: decode_policy(value)?,
        },
        "relationships" => {
            let (address, peer) = pair(tree, key)?;
            StoredRecord::Relationship {
                address,
                peer: Address(peer),
                relationship: decode(value, "relationship")?,
            }
        }
        "deletions" => StoredRecord::Deletion {
            address: Address(fixed(tree, key)?),
            deletion: decode(value, "deletion")?,
        },
        "deletion_index" => {
            let (due_at_ms, address) = split_deletion_index_key(key)?;
            empty(tree, value)?;
            StoredRecord::DeletionDue { due_at_ms, address }
        }
        "log_index" => StoredRecord::LogIndex {
            address: Address(fixed(tree, key)?),
            value: {
                // Checked with the log's own decoder; kept as its bytes.
                crate::store::log::checkpoint::decode(value)?;
                value.to_vec()
            },
        },
        "meta" if key == LOG_CHECKPOINT_KEY => {
            StoredRecord::LogCheckpoint(decode_u64(value, "log checkpoint position")?)
        }
        "meta" if key == SERVER_ID_KEY => StoredRecord::ServerId(decode_server_id(value)?),
        "meta" if key == EPOCH_KEY => StoredRecord::WriteEpoch(decode_u64(value, "write epoch")?),
        "meta" => {
            let key = key
                .strip_prefix(b"node/")
                .ok_or_else(|| layout(tree, "an unknown meta key"))?;
            // `Store::meta` takes the key as a `&str`.
            let key = std::str::from_utf8(key)
                .map_err(|_| layout(tree, "a node key that is not UTF-8"))?;
            StoredRecord::NodeMeta {
                key: key.to_owned(),
                value: value.to_vec(),
            }
        }
        DEFAULT_TREE => return Err(layout(tree, "the store writes nothing here")),
        _ => return Err(layout(tree, "an unknown tree")),
    };
    Ok(record)
}

impl StoredRecord {
    /// The tree, key and value the store writes for this record.
    pub fn encode(&self) -> Result<DumpedRecord, StoreError> {
        let (tree, key, value): (&str, Vec<u8>, Vec<u8>) = match self {
            StoredRecord::Envelope { address, envelope } => (
                "envelopes",
                envelope_key(address, envelope.seq).to_vec(),
                encode_envelope(envelope)?,
            ),
            StoredRecord::EnvelopeCount(count) => (
                "envelopes",
                COUNT_KEY.to_vec(),
                count.to_be_bytes().to_vec(),
            ),
            StoredRecord::Expiry {
                expires_at_ms,
                address,
                seq,
            } => (
                "expiry",
                expiry_key(*expires_at_ms, address, *seq).to_vec(),
                Vec::new(),
            ),
            StoredRecord::Head { address, head } => {
                ("heads", address.0.to_vec(), head.to_be_bytes().to_vec())
            }
            StoredRecord::Cursor {
                address,
                device,
                seq,
            } => (
                "cursors",
                pair_key(address, &device.0).to_vec(),
                seq.to_be_bytes().to_vec(),
            ),
            StoredRecord::Card { address, card } => ("cards", address.0.to_vec(), encode(card)?),
            StoredRecord::Device {
                address,
                device,
                certificate,
            } => (
                "devices",
                pair_key(address, &device.0).to_vec(),
                encode(certificate)?,
            ),
            StoredRecord::Capability { address, hash } => (
                "capabilities",
                pair_key(address, &hash.0).to_vec(),
                Vec::new(),
            ),
            StoredRecord::Token { id, token } => ("tokens", id.0.to_vec(), encode(token)?),
            StoredRecord::TokenOwner {
                owner,
                id,
                expires_at_ms,
            } => (
                "token_owners",
                pair_key(owner, &id.0).to_vec(),
                expires_at_ms.to_be_bytes().to_vec(),
            ),
            StoredRecord::TokenExpiry {
                expires_at_ms,
                id,
                owner,
            } => (
                "token_expiry",
                expiry_id_key(*expires_at_ms, &id.0, owner).to_vec(),
                Vec::new(),
            ),
            StoredRecord::File { id, file } => ("files", id.0.to_vec(), encode(file)?),
            StoredRecord::FileOwner {
                owner,
                id,
                expires_at_ms,
            } => (
                "file_owners",
                pair_key(owner, &id.0).to_vec(),
                expires_at_ms.to_be_bytes().to_vec(),
            ),
            StoredRecord::FileExpiry {
                expires_at_ms,
                id,
                owner,
            } => (
                "file_expiry",
                expiry_id_key(*expires_at_ms, &id.0, owner).to_vec(),
                Vec::new(),
            ),
            StoredRecord::Policy { address, policy } => {
                ("policies", address.0.to_vec(), vec![encode_policy(*policy)])
            }
            StoredRecord::Relationship {
                address,
                peer,
                relationship,
            } => (
                "relationships",
                pair_key(address, &peer.0).to_vec(),
                encode(relationship)?,
            ),
            StoredRecord::Deletion { address, deletion } => {
                ("deletions", address.0.to_vec(), encode(deletion)?)
            }
            StoredRecord::DeletionDue { due_at_ms, address } => (
                "deletion_index",
                deletion_index_key(*due_at_ms, address).to_vec(),
                Vec::new(),
            ),
            StoredRecord::LogIndex { address, value } => {
                ("log_index", address.0.to_vec(), value.clone())
            }
            StoredRecord::LogCheckpoint(position) => (
                "meta",
                LOG_CHECKPOINT_KEY.to_vec(),
                position.to_be_bytes().to_vec(),
            ),
            StoredRecord::ServerId(id) => ("meta", SERVER_ID_KEY.to_vec(), id.0.to_vec()),
            StoredRecord::WriteEpoch(epoch) => {
                ("meta", EPOCH_KEY.to_vec(), epoch.to_be_bytes().to_vec())
            }
            StoredRecord::NodeMeta { key, value } => ("meta", meta_key(key), value.clone()),
        };
        Ok(DumpedRecord {
            tree: tree.to_owned(),
            key,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use backbone_protocol::Keypair;
    use backbone_protocol::bytes::{
        ContentHash, EncryptionKey, FileSecret, MessageId, PasswordVerifier, RelationshipId,
    };
    use backbone_protocol::relationship::{Role, State};

    use super::*;
    use crate::store::FileQuota;
    use crate::store::log::checkpoint::Checkpoints;
    use crate::store::prelude::*;

    /// A store holding at least one record of every kind.
    fn populated(store: &super::super::SledStore) {
        let owner = Keypair::from_secret_bytes([1; 32]);
        let address = owner.address();
        let peer = Address([2; 32]);
        let envelope = |seq| StoredEnvelope {
            seq,
            message_id: MessageId([seq as u8; 16]),
            sender: Some(peer),
            stored_at_ms: 10,
            expires_at_ms: 1_000,
            envelope: vec![seq as u8; 5].into(),
        };
        // Legacy envelopes (and a head) of a store from before the log.
        super::super::tests::write_legacy(store, &address, &[envelope(1), envelope(2)], Some(3));
        let mut index = crate::store::log::index::MailboxIndex {
            head: 7,
            ..Default::default()
        };
        index.entries.push_back(crate::store::log::index::Entry {
            seq: 7,
            position: 40,
            len: 90,
            envelope_len: 10,
            expires_at_ms: 99,
        });
        store
            .write_checkpoint(
                &[(address, Some(crate::store::log::checkpoint::encode(&index)))],
                5,
            )
            .expect("checkpoint");
        let device = Keypair::from_secret_bytes([3; 32]).public();
        store
            .set_cursor(&address, &device.device_id(), 1)
            .expect("cursor");
        store
            .put_card(&IdentityCard::sign(&owner, EncryptionKey([4; 32]), 5))
            .expect("card");
        store
            .put_device(&address, &DeviceCertificate::issue(&owner, device, 6), 100)
            .expect("device");
        store
            .register_capability(&address, &CapabilityHash([7; 32]), 10)
            .expect("capability");
        let token = StoredToken {
            id: TokenId([8; 32]),
            owner: address,
            created_at_ms: 1,
            expires_at_ms: 2_000,
            content: vec![9; 3],
            verifier_hash: Some(PasswordVerifier([10; 32]).hash()),
            failed_attempts: 1,
            locked: false,
        };
        store.put_token(&token, 10, 0).expect("token");
        let file = StoredFile {
            id: FileId([11; 32]),
            owner: address,
            size: 100,
            content_hash: ContentHash([12; 32]),
            secret_hash: FileSecret([13; 32]).hash(),
            expires_at_ms: 3_000,
            complete: false,
        };
        let quota = FileQuota {
            max_files: 10,
            max_bytes: 1 << 20,
        };
        store.put_file(&file, quota, 0).expect("file");
        store
            .set_inbound_policy(&address, InboundPolicy::RelationshipsOnly)
            .expect("policy");
        store
            .put_relationship(
                &address,
                &Relationship {
                    id: RelationshipId([14; 16]),
                    peer,
                    role: Role::Owner,
                    state: State::Active,
                    changed_at_ms: 15,
                },
            )
            .expect("relationship");
        store.schedule_deletion(&address, 5_000).expect("deletion");
        store.put_meta("handoff", b"done").expect("meta");
        store.server_id().expect("server id");
        store.sync().expect("flush");
    }

    #[test]
    fn every_record_of_a_populated_store_decodes_and_re_encodes_to_its_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::super::SledStore::open(dir.path()).expect("open");
        populated(&store);
        let mut kinds = HashSet::new();
        for dumped in store.dump().expect("dump") {
            if dumped.tree == DEFAULT_TREE {
                continue;
            }
            let record = decode_record(&dumped.tree, &dumped.key, &dumped.value)
                .unwrap_or_else(|error| panic!("{dumped:?}: {error}"));
            assert_eq!(record.encode(), Ok(dumped.clone()));
            kinds.insert(std::mem::discriminant(&record));
        }
        // Every variant appears: a record kind the store writes but this
        // module cannot decode would have failed above, and a variant with
        // no record here would be a layout the store no longer writes.
        assert_eq!(kinds.len(), 23);
    }

    #[test]
    fn malformed_records_are_typed_errors() {
        let corrupt = |tree: &str, key: &[u8], value: &[u8]| {
            matches!(
                decode_record(tree, key, value),
                Err(StoreError::Corrupt { .. })
            )
        };
        assert!(corrupt("heads", &[0; 31], &[0; 8]));
        assert!(corrupt("heads", &[0; 32], &[0; 7]));
        assert!(corrupt("expiry", &[0; 48], &[1]));
        assert!(corrupt("policies", &[0; 32], &[2]));
        assert!(corrupt("meta", b"elsewhere", b""));
        assert!(corrupt("no such tree", b"", b""));
        assert!(corrupt("cards", &[0; 32], b"not a card"));
    }
}
