//! Sharding and the node-to-node protocol of a broker fleet.
//!
//! Every address belongs to one of [`SLOT_COUNT`] slots ([`slot_of`]); the
//! fleet map assigns each slot to one node. Nodes talk to each other over
//! mutually authenticated QUIC links carrying [`PeerFrame`]s, framed exactly
//! like client frames (`u32` BE length | version byte | body) but never mixed
//! with them: the peer listener is a separate endpoint.
//!
//! A link opens with [`PeerFrame::Hello`] from the dialing node, answered by
//! [`PeerFrame::Welcome`] when both nodes load the same fleet map (same epoch
//! and digest) or [`PeerFrame::Refuse`] when they do not; a refused link
//! carries no traffic, so nodes with different maps never misplace data.

use serde::{Deserialize, Serialize};

use crate::bytes::{
    Blob, CapabilityHash, ContentHash, FileId, FileSecretHash, MessageId, PasswordVerifier, Text,
    TokenId, VerifierHash,
};
use crate::card::IdentityCard;
use crate::deletion::Deletion;
use crate::frame::{Failed, Stored};
use crate::identity::{Address, DeviceCertificate, DeviceId};
use crate::relationship::{InboundPolicy, Relationship, SideChange};

/// The fixed number of slots the address space is divided into.
pub const SLOT_COUNT: u16 = 4096;

/// The ALPN protocol id of node-to-node links.
pub const PEER_ALPN: &[u8] = b"backbone-peer/1";

const SLOT_CONTEXT: &str = "backbone 2026 address slot v1";

/// The slot of an address: the first two bytes of a domain-separated BLAKE3
/// hash of the address, little-endian, modulo [`SLOT_COUNT`].
pub fn slot_of(address: &Address) -> u16 {
    let hash = blake3::derive_key(SLOT_CONTEXT, &address.0);
    u16::from_le_bytes([hash[0], hash[1]]) % SLOT_COUNT
}

/// One node-to-node frame. Variant order is the wire tag; only append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// Tag 0, dialer → acceptor: who is calling and which map it routes by.
    Hello(PeerHello),
    /// Tag 1, acceptor → dialer: same map; the link is open.
    Welcome(PeerHello),
    /// Tag 2, acceptor → dialer: the link is refused (for example a different map).
    Refuse(PeerRefuse),
    /// Tag 3, dialer → acceptor: store one envelope for recipients the acceptor owns.
    Forward(Forward),
    /// Tag 4, acceptor → dialer: the outcome of a [`PeerFrame::Forward`].
    ForwardAck(ForwardAck),
    /// Tag 5, dialer → acceptor: the card of an address the acceptor owns.
    FetchCard(PeerFetchCard),
    /// Tag 6, acceptor → dialer: the card, if stored.
    CardResult(PeerCardResult),
    /// Tag 7, dialer → acceptor: mailboxes of slots handed over to the acceptor.
    Import(Import),
    /// Tag 8, dialer → acceptor: every mailbox of the move has been imported.
    HandoffDone(HandoffDone),
    /// Tag 9, acceptor → dialer: the outcome of an [`PeerFrame::Import`] or
    /// [`PeerFrame::HandoffDone`], after the acceptor's flush.
    HandoffAck(HandoffAck),
    /// Tag 10, dialer → acceptor: store a sealed envelope for one recipient
    /// the acceptor owns, if its capability hash is registered there.
    /// Answered by [`PeerFrame::ForwardAck`].
    SealedForward(SealedForward),
    /// Tag 11, dialer → acceptor: fetch a token whose id routes to the
    /// acceptor (see [`crate::token`]). Answered by [`PeerFrame::TokenResult`].
    GetToken(PeerGetToken),
    /// Tag 12, acceptor → dialer: the token's content, or why not.
    TokenResult(PeerTokenResult),
    /// Tag 13, dialer → acceptor: apply a relationship change to the side
    /// (an address) the acceptor owns. Answered by [`PeerFrame::ConsentResult`].
    Consent(PeerConsent),
    /// Tag 14, acceptor → dialer: the outcome of a [`PeerFrame::Consent`].
    ConsentResult(PeerConsentResult),
    /// Tag 15, dialer → acceptor: part of a file of a slot handed over to
    /// the acceptor (after the mailboxes, before [`PeerFrame::HandoffDone`]).
    /// Answered by [`PeerFrame::HandoffAck`] once the bytes are durable.
    ImportFile(ImportFile),
}

/// One file of a moving slot, as its record travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferFile {
    /// The file's id (in the owner's slot).
    pub id: FileId,
    /// The identity that created it.
    pub owner: Address,
    /// The declared size.
    pub size: u64,
    /// The declared content hash.
    pub content_hash: ContentHash,
    /// The hash of the download secret.
    pub secret_hash: FileSecretHash,
    /// When it expires.
    pub expires_at_ms: u64,
    /// Whether it was completely uploaded and checked.
    pub complete: bool,
}

/// A run of a handed-over file's bytes. The parts of one file travel in
/// order from offset 0, and the last one (`last`) carries the record: the
/// acceptor stores the record only once every byte is durable, so a crash
/// midway leaves bytes without a record, which it deletes at its next
/// start, and the handover starts the file over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportFile {
    /// Chosen by the dialer.
    pub request_id: u64,
    /// The epoch of the map whose `[[move]]` this executes.
    pub epoch: u64,
    /// The file.
    pub file: TransferFile,
    /// Where `bytes` start; 0 starts the file over.
    pub offset: u64,
    /// The bytes (the uploaded prefix of an incomplete file).
    pub bytes: Blob,
    /// Whether this is the file's last part.
    pub last: bool,
}

/// A node introducing itself and its fleet map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    /// The node's name in the fleet map.
    pub node: Text,
    /// The map's epoch.
    pub epoch: u64,
    /// BLAKE3 digest of the map's canonical form.
    pub map_digest: [u8; 32],
}

/// Why a link was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRefuse {
    /// A human-readable reason, logged by both sides.
    pub reason: Text,
}

/// An envelope accepted by one node for recipients another node owns.
///
/// The accepting node has already validated the send and fixed the message
/// id and timestamps, so every shard stores the same values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Chosen by the dialer, echoed in the answer.
    pub request_id: u64,
    /// The broker-assigned message id.
    pub message_id: MessageId,
    /// The authenticated sender.
    pub sender: Option<Address>,
    /// When the accepting node took the send.
    pub stored_at_ms: u64,
    /// When the envelope expires.
    pub expires_at_ms: u64,
    /// Recipients the receiving node owns.
    pub recipients: Vec<Address>,
    /// The opaque envelope.
    pub envelope: Blob,
}

/// A sealed send accepted by one node for a recipient another node owns.
///
/// The capability check belongs to the owner, where the capability hashes
/// live, so the accepting node forwards the hash of the presented capability
/// (never the capability itself) and the owner checks it, applies the
/// per-capability rate limit, and stores the envelope with no sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedForward {
    /// Chosen by the dialer, echoed in the [`ForwardAck`].
    pub request_id: u64,
    /// The broker-assigned message id.
    pub message_id: MessageId,
    /// When the accepting node took the send.
    pub stored_at_ms: u64,
    /// When the envelope expires.
    pub expires_at_ms: u64,
    /// The recipient, owned by the receiving node.
    pub recipient: Address,
    /// The hash of the capability the sender presented.
    pub capability_hash: CapabilityHash,
    /// The opaque envelope.
    pub envelope: Blob,
}

/// A relationship change for `address`'s side, decided on the node of the
/// other side (`peer`), applied durably by `address`'s owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConsent {
    /// Chosen by the dialer, echoed in the answer.
    pub request_id: u64,
    /// The side to change, owned by the acceptor.
    pub address: Address,
    /// The other side.
    pub peer: Address,
    /// What to apply.
    pub change: SideChange,
}

/// The answer to a [`PeerConsent`]: `address`'s view after the change, or
/// a stable error code and a reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConsentResult {
    /// The request this answers.
    pub request_id: u64,
    /// The side's record after the change.
    pub result: Result<Relationship, (u16, Text)>,
}

/// The outcome of a [`Forward`], per recipient, after the owner's durable write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardAck {
    /// The [`Forward::request_id`] this answers.
    pub request_id: u64,
    /// Recipients for which the envelope is durable.
    pub stored: Vec<Stored>,
    /// Recipients for which it is not.
    pub failed: Vec<Failed>,
}

/// A card lookup routed to the address's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFetchCard {
    /// Chosen by the dialer.
    pub request_id: u64,
    /// Whose card.
    pub address: Address,
}

/// The answer to a [`PeerFetchCard`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCardResult {
    /// The request this answers.
    pub request_id: u64,
    /// The card, or an error code (for example `UnknownAddress`).
    pub result: Result<IdentityCard, u16>,
}

/// A token fetch relayed to the node that owns the token's slot. The
/// relaying node passes on what its client sent; the owner checks the
/// password and counts failures, so a token has one failure count in the
/// whole fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerGetToken {
    /// Chosen by the dialer.
    pub request_id: u64,
    /// The token's id.
    pub token_id: TokenId,
    /// The verifier the client presented, if any.
    pub password_verifier: Option<PasswordVerifier>,
}

/// The answer to a [`PeerGetToken`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTokenResult {
    /// The request this answers.
    pub request_id: u64,
    /// The content and its expiry time (Unix ms), or an error code (for
    /// example `NotFound`, `WrongPassword`, `TokenLocked`).
    pub result: Result<(Blob, u64), u16>,
}

/// One token of a mailbox being handed over. Importing merges: a token
/// already present keeps the higher failure count, and stays locked if
/// either copy is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferToken {
    /// The token's id (in the owner's slot).
    pub id: TokenId,
    /// When it was created.
    pub created_at_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// The opaque, client-encrypted content.
    pub content: Blob,
    /// The hash of its password verifier, for a password-protected token.
    pub verifier_hash: Option<VerifierHash>,
    /// Wrong passwords presented so far.
    pub failed_attempts: u32,
    /// Locked after too many wrong passwords.
    pub locked: bool,
}

/// One envelope of a mailbox being handed over, with its sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferEnvelope {
    /// Its sequence number in the mailbox (kept, so cursors stay valid).
    pub seq: u64,
    /// The broker-assigned message id.
    pub message_id: MessageId,
    /// The authenticated sender.
    pub sender: Option<Address>,
    /// When it was accepted.
    pub stored_at_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// The opaque envelope.
    pub envelope: Blob,
}

/// A mailbox, or a part of one, moving to its new owner. Importing merges:
/// envelopes are written under their sequence numbers, the head and cursors
/// only ever grow, so a part imported twice changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxTransfer {
    /// Whose mailbox.
    pub address: Address,
    /// The highest sequence number ever assigned.
    pub head: u64,
    /// Stored envelopes (possibly a part of them).
    pub envelopes: Vec<TransferEnvelope>,
    /// Each device's acknowledged sequence number.
    pub cursors: Vec<(DeviceId, u64)>,
    /// The identity card, if published.
    pub card: Option<IdentityCard>,
    /// Registered device certificates.
    pub devices: Vec<DeviceCertificate>,
    /// Registered delivery capability hashes.
    pub capabilities: Vec<CapabilityHash>,
    /// The tokens the mailbox's identity created (possibly a part of them).
    pub tokens: Vec<TransferToken>,
    /// The inbound policy, if the identity ever had one recorded.
    pub policy: Option<InboundPolicy>,
    /// The identity's side of each of its relationships.
    pub relationships: Vec<Relationship>,
    /// The identity's scheduled deletion or its tombstone: a tombstone
    /// moves even when nothing else about the address is left.
    pub deletion: Option<Deletion>,
}

/// Mailboxes of moving slots, sent by their previous owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// Chosen by the dialer.
    pub request_id: u64,
    /// The epoch of the map whose `[[move]]` this executes.
    pub epoch: u64,
    /// The mailboxes.
    pub mailboxes: Vec<MailboxTransfer>,
}

/// The previous owner has sent every mailbox of these slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffDone {
    /// Chosen by the dialer.
    pub request_id: u64,
    /// The epoch of the map whose `[[move]]` this completes.
    pub epoch: u64,
    /// The slots, as inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

/// The answer to [`Import`] and [`HandoffDone`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffAck {
    /// The request this answers.
    pub request_id: u64,
    /// `Ok` once durable, else a stable error code and a reason.
    pub result: Result<(), (u16, Text)>,
}

impl PeerFrame {
    /// The wire tag of each variant, in order. Keep in sync with the enum
    /// (a test checks every variant's name against its tag).
    pub const TAG_NAMES: [&'static str; 16] = [
        "Hello",
        "Welcome",
        "Refuse",
        "Forward",
        "ForwardAck",
        "FetchCard",
        "CardResult",
        "Import",
        "HandoffDone",
        "HandoffAck",
        "SealedForward",
        "GetToken",
        "TokenResult",
        "Consent",
        "ConsentResult",
        "ImportFile",
    ];

    /// The wire tag of this frame.
    pub fn tag(&self) -> u32 {
        match self {
            PeerFrame::Hello(_) => 0,
            PeerFrame::Welcome(_) => 1,
            PeerFrame::Refuse(_) => 2,
            PeerFrame::Forward(_) => 3,
            PeerFrame::ForwardAck(_) => 4,
            PeerFrame::FetchCard(_) => 5,
            PeerFrame::CardResult(_) => 6,
            PeerFrame::Import(_) => 7,
            PeerFrame::HandoffDone(_) => 8,
            PeerFrame::HandoffAck(_) => 9,
            PeerFrame::SealedForward(_) => 10,
            PeerFrame::GetToken(_) => 11,
            PeerFrame::TokenResult(_) => 12,
            PeerFrame::Consent(_) => 13,
            PeerFrame::ConsentResult(_) => 14,
            PeerFrame::ImportFile(_) => 15,
        }
    }

    /// The request id of a request or response, `None` for link control frames.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            PeerFrame::Import(f) => Some(f.request_id),
            PeerFrame::HandoffDone(f) => Some(f.request_id),
            PeerFrame::HandoffAck(f) => Some(f.request_id),
            PeerFrame::Forward(f) => Some(f.request_id),
            PeerFrame::ForwardAck(f) => Some(f.request_id),
            PeerFrame::FetchCard(f) => Some(f.request_id),
            PeerFrame::CardResult(f) => Some(f.request_id),
            PeerFrame::SealedForward(f) => Some(f.request_id),
            PeerFrame::GetToken(f) => Some(f.request_id),
            PeerFrame::TokenResult(f) => Some(f.request_id),
            PeerFrame::Consent(f) => Some(f.request_id),
            PeerFrame::ConsentResult(f) => Some(f.request_id),
            PeerFrame::ImportFile(f) => Some(f.request_id),
            PeerFrame::Hello(_) | PeerFrame::Welcome(_) | PeerFrame::Refuse(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_in_range_and_spread() {
        let mut counts = vec![0u32; SLOT_COUNT as usize];
        for i in 0u32..409_600 {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            let slot = slot_of(&Address(bytes));
            counts[slot as usize] += 1;
        }
        // 100 per slot on average; for a uniform hash a count outside 40..180
        // has odds below 1e-9 per slot, so a failure means it degenerated.
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            counts.iter().all(|&c| c > 40 && c < 180),
            "{min:?}..{max:?}"
        );
    }

    /// The `MailboxTransfer` layout docs/protocol.md gives, for its fields
    /// after the tokens: policy, relationships, deletion.
    #[test]
    fn a_mailbox_transfer_has_its_documented_layout() {
        use crate::bytes::RelationshipId;
        use crate::codec::encode_value;
        use crate::deletion::PeerToTell;
        use crate::relationship::{Role, State};

        let empty = MailboxTransfer {
            address: Address([1; 32]),
            head: 0,
            envelopes: vec![],
            cursors: vec![],
            card: None,
            devices: vec![],
            capabilities: vec![],
            tokens: vec![],
            policy: None,
            relationships: vec![],
            deletion: None,
        };
        let len = |transfer: &MailboxTransfer| encode_value(transfer).expect("encodes").len();
        assert_eq!(len(&empty), 91);
        let related = MailboxTransfer {
            policy: Some(InboundPolicy::RelationshipsOnly),
            relationships: vec![Relationship {
                id: RelationshipId([2; 16]),
                peer: Address([3; 32]),
                role: Role::Owner,
                state: State::Active,
                changed_at_ms: 4,
            }],
            ..empty.clone()
        };
        assert_eq!(len(&related), 91 + 4 + 64);
        let with = |deletion: Deletion| {
            len(&MailboxTransfer {
                deletion: Some(deletion),
                ..empty.clone()
            })
        };
        assert_eq!(with(Deletion::Scheduled { purge_at_ms: 5 }), 91 + 4 + 8);
        assert_eq!(
            with(Deletion::Purging {
                purge_at_ms: 5,
                to_tell: vec![PeerToTell {
                    peer: Address([3; 32]),
                    relationship: RelationshipId([2; 16]),
                }],
            }),
            91 + 4 + 8 + 8 + 48
        );
        assert_eq!(with(Deletion::Deleted), 91 + 4);
    }

    #[test]
    fn slot_is_stable() {
        // Changing the slot function moves every stored mailbox to another
        // node; these values pin it.
        assert_eq!(slot_of(&Address([0; 32])), 3237);
        assert_eq!(slot_of(&Address([7; 32])), 2007);
        assert_eq!(slot_of(&Address([255; 32])), 4055);
    }
}
