//! Target `stored_records`: arbitrary bytes decoded as one record of one of
//! the sled store's trees with `backbone_broker::store::decode_record`, which
//! reads a record with the same helpers the store's reads use (envelope
//! values with their expiry prefix, keys of every layout, `encode_value`
//! records, policies, counters, the server id, node meta keys).
//!
//! Properties: decoding never panics; it fails only with
//! `StoreError::Corrupt` (a record is data, never a backend failure); and a
//! record that decodes re-encodes, with the helpers the store's writes use,
//! to exactly the tree, key and value it was decoded from, so every stored
//! byte is accounted for and no two encodings mean the same record.

use backbone_broker::store::{
    DumpedRecord, StoreError, StoredEnvelope, StoredFile, StoredRecord, StoredToken, decode_record,
};
use backbone_protocol::bytes::{
    CapabilityHash, ContentHash, EncryptionKey, FileId, FileSecret, MessageId, PasswordVerifier,
    RelationshipId, ServerId, TokenId,
};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::relationship::{InboundPolicy, Relationship, Role, State};
use backbone_protocol::{Address, DeviceCertificate, IdentityCard, Keypair};

/// The trees an input chooses from: every tree of the store, sled's default
/// tree (which the store never writes) and one that does not exist.
const TREES: [&str; 20] = [
    "envelopes",
    "expiry",
    "heads",
    "cursors",
    "cards",
    "devices",
    "capabilities",
    "tokens",
    "token_owners",
    "token_expiry",
    "files",
    "file_owners",
    "file_expiry",
    "policies",
    "relationships",
    "deletions",
    "deletion_index",
    "meta",
    "__sled__default",
    "unknown",
];

/// Target `stored_records`: byte 0 picks the tree (mod 20), byte 1 is the
/// key's length, then the key, then the value (the rest).
pub fn stored_records_target(data: &[u8]) {
    decode_stored_record(data);
}

/// Decodes and checks the record `data` describes; returns it if it decoded.
pub fn decode_stored_record(data: &[u8]) -> Option<StoredRecord> {
    let [tree, key_len, rest @ ..] = data else {
        return None;
    };
    let tree = TREES[usize::from(*tree) % TREES.len()];
    let (key, value) = rest.split_at_checked(usize::from(*key_len))?;
    match decode_record(tree, key, value) {
        Ok(record) => {
            let encoded = record.encode();
            assert!(
                encoded
                    == Ok(DumpedRecord {
                        tree: tree.to_owned(),
                        key: key.to_vec(),
                        value: value.to_vec(),
                    }),
                "{record:?} re-encodes to {encoded:?}"
            );
            Some(record)
        }
        Err(error) => {
            assert!(
                matches!(error, StoreError::Corrupt { .. }),
                "decoding failed with {error:?}, not as corrupt data"
            );
            None
        }
    }
}

/// One record of every kind, with fixed contents.
fn sample_records() -> Vec<StoredRecord> {
    let owner = Keypair::from_secret_bytes([1; 32]);
    let address = owner.address();
    let peer = Address([2; 32]);
    let device = Keypair::from_secret_bytes([3; 32]).public();
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
    let file = StoredFile {
        id: FileId([11; 32]),
        owner: address,
        size: 100,
        content_hash: ContentHash([12; 32]),
        secret_hash: FileSecret([13; 32]).hash(),
        expires_at_ms: 3_000,
        complete: true,
    };
    vec![
        StoredRecord::Envelope {
            address,
            envelope: StoredEnvelope {
                seq: 7,
                message_id: MessageId([4; 16]),
                sender: Some(peer),
                stored_at_ms: 10,
                expires_at_ms: 1_000,
                envelope: vec![5; 6].into(),
            },
        },
        StoredRecord::EnvelopeCount(3),
        StoredRecord::Expiry {
            expires_at_ms: 1_000,
            address,
            seq: 7,
        },
        StoredRecord::Head { address, head: 9 },
        StoredRecord::Cursor {
            address,
            device: device.device_id(),
            seq: 6,
        },
        StoredRecord::Card {
            address,
            card: IdentityCard::sign(&owner, EncryptionKey([4; 32]), 5),
        },
        StoredRecord::Device {
            address,
            device: device.device_id(),
            certificate: DeviceCertificate::issue(&owner, device, 6),
        },
        StoredRecord::Capability {
            address,
            hash: CapabilityHash([7; 32]),
        },
        StoredRecord::TokenOwner {
            owner: address,
            id: token.id,
            expires_at_ms: token.expires_at_ms,
        },
        StoredRecord::TokenExpiry {
            expires_at_ms: token.expires_at_ms,
            id: token.id,
            owner: address,
        },
        StoredRecord::Token {
            id: token.id,
            token,
        },
        StoredRecord::FileOwner {
            owner: address,
            id: file.id,
            expires_at_ms: file.expires_at_ms,
        },
        StoredRecord::FileExpiry {
            expires_at_ms: file.expires_at_ms,
            id: file.id,
            owner: address,
        },
        StoredRecord::File { id: file.id, file },
        StoredRecord::Policy {
            address,
            policy: InboundPolicy::RelationshipsOnly,
        },
        StoredRecord::Relationship {
            address,
            peer,
            relationship: Relationship {
                id: RelationshipId([14; 16]),
                peer,
                role: Role::Requester,
                state: State::Pending,
                changed_at_ms: 15,
            },
        },
        StoredRecord::Deletion {
            address,
            deletion: Deletion::Purging {
                purge_at_ms: 5_000,
                to_tell: vec![PeerToTell {
                    peer,
                    relationship: RelationshipId([14; 16]),
                }],
            },
        },
        StoredRecord::DeletionDue {
            due_at_ms: 5_000,
            address,
        },
        StoredRecord::ServerId(ServerId([16; 32])),
        StoredRecord::WriteEpoch(17),
        StoredRecord::NodeMeta {
            key: "run".into(),
            value: 2u64.to_be_bytes().to_vec(),
        },
    ]
}

/// The input that describes `record`.
fn input_of(record: &DumpedRecord) -> Vec<u8> {
    let tree = TREES
        .iter()
        .position(|tree| *tree == record.tree)
        .expect("a known tree");
    let mut input = vec![tree as u8, record.key.len() as u8];
    input.extend_from_slice(&record.key);
    input.extend_from_slice(&record.value);
    input
}

/// Seeds: one record of every kind, encoded by the store's writing helpers,
/// and a few more shapes of the same (an envelope without a sender, a
/// deletion scheduled and one done, a locked token without a password).
pub fn stored_records_seeds() -> Vec<Vec<u8>> {
    let mut records = sample_records();
    if let StoredRecord::Envelope { address, envelope } = &records[0] {
        records.push(StoredRecord::Envelope {
            address: *address,
            envelope: StoredEnvelope {
                sender: None,
                envelope: Default::default(),
                ..envelope.clone()
            },
        });
    }
    let address = Address([1; 32]);
    records.push(StoredRecord::Deletion {
        address,
        deletion: Deletion::Scheduled { purge_at_ms: 1 },
    });
    records.push(StoredRecord::Deletion {
        address,
        deletion: Deletion::Deleted,
    });
    records.push(StoredRecord::Token {
        id: TokenId([1; 32]),
        token: StoredToken {
            id: TokenId([1; 32]),
            owner: address,
            created_at_ms: 0,
            expires_at_ms: u64::MAX,
            content: Vec::new(),
            verifier_hash: None,
            failed_attempts: u32::MAX,
            locked: true,
        },
    });
    records
        .iter()
        .map(|record| input_of(&record.encode().expect("sample records encode")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_decodes_to_its_record() {
        let records = sample_records();
        let seeds = stored_records_seeds();
        for (record, seed) in records.iter().zip(&seeds) {
            assert_eq!(decode_stored_record(seed).as_ref(), Some(record));
        }
        // Every variant of the store's records has a seed.
        let kinds: std::collections::HashSet<_> =
            records.iter().map(std::mem::discriminant).collect();
        assert_eq!(kinds.len(), 21);
    }

    #[test]
    fn damaged_seeds_are_refused_as_corrupt() {
        for mut seed in stored_records_seeds() {
            // One byte short: every layout but the opaque node meta value
            // has a fixed-length part or a length that now points past the
            // end.
            if matches!(
                decode_stored_record(&seed),
                Some(StoredRecord::NodeMeta { .. })
            ) {
                continue;
            }
            seed.pop();
            assert_eq!(decode_stored_record(&seed), None);
        }
    }
}
