//! Every frame of the wire protocol.
//!
//! The order of [`Frame`]'s variants is the wire tag (a `u32`), so variants are
//! only ever appended, never reordered; the golden vectors in
//! `docs/protocol.md` guard this. Requests carry a client-chosen non-zero
//! `request_id` that the response echoes.

use serde::{Deserialize, Serialize};

use crate::bytes::{
    Blob, CapabilityHash, ContentHash, DeliveryCapability, FileId, FileSecret, FileSecretHash,
    MessageId, Nonce, PasswordVerifier, ServerId, Signature, Text, TokenId,
};
use crate::card::IdentityCard;
use crate::identity::{Address, DeviceCertificate, DeviceId, PublicKey};
use crate::relationship::{Decision, InboundPolicy, Relationship};

/// One protocol frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Tag 0, client → broker, first frame: the versions the client speaks.
    Hello(Hello),
    /// Tag 1, broker → client: the chosen version and a single-use challenge.
    Challenge(Challenge),
    /// Tag 2, client → broker: the signed challenge response.
    Auth(Auth),
    /// Tag 3, broker → client: authentication succeeded.
    AuthOk(AuthOk),
    /// Tag 4, client → broker, identity key sessions only: register a device
    /// of the authenticated identity.
    RegisterDevice(RegisterDevice),
    /// Tag 5, client → broker: publish the authenticated identity's card.
    PublishCard(PublishCard),
    /// Tag 6, client → broker: fetch the card of an address.
    FetchCard(FetchCard),
    /// Tag 7, broker → client: the card asked for.
    CardResult(CardResult),
    /// Tag 8, client → broker: store an envelope for 1..N recipients.
    Send(Send),
    /// Tag 9, broker → client: the send is durable for the listed recipients.
    SendAck(SendAck),
    /// Tag 10, broker → client: push of one stored envelope.
    Deliver(Deliver),
    /// Tag 11, client → broker: cumulative acknowledgement of delivered envelopes.
    Ack(Ack),
    /// Tag 12, client → broker: delete envelopes from the own mailbox.
    Delete(Delete),
    /// Tag 13, broker → client: a request without other result succeeded.
    Done(Done),
    /// Tag 14, either direction: an error with a stable code.
    Error(ErrorFrame),
    /// Tag 15, broker → client: the request belongs on another node.
    Redirect(Redirect),
    /// Tag 16, either direction: liveness probe.
    Ping(Ping),
    /// Tag 17, either direction: answer to [`Frame::Ping`].
    Pong(Pong),
    /// Tag 18, client → broker, identity key sessions only: register a
    /// delivery capability's hash with the authenticated identity's mailbox.
    RegisterCapability(RegisterCapability),
    /// Tag 19, client → broker, identity key sessions only: revoke a
    /// registered capability hash.
    RevokeCapability(RevokeCapability),
    /// Tag 20, client → broker: list the mailbox's registered capability hashes.
    ListCapabilities(ListCapabilities),
    /// Tag 21, broker → client: the answer to [`Frame::ListCapabilities`].
    Capabilities(Capabilities),
    /// Tag 22, client → broker, instead of `Auth`: open an anonymous session
    /// that names no identity and may only send sealed envelopes.
    Anonymous(Anonymous),
    /// Tag 23, client → broker, anonymous sessions only: store an envelope
    /// for one recipient, admitted by a delivery capability instead of the
    /// sender's identity. Answered by [`Frame::SendAck`].
    SealedSend(SealedSend),
    /// Tag 24, client → broker, authenticated sessions only: store a token
    /// (see [`crate::token`]). Answered by [`Frame::TokenCreated`].
    CreateToken(CreateToken),
    /// Tag 25, broker → client: the token is durable under this id.
    TokenCreated(TokenCreated),
    /// Tag 26, client → broker, authenticated or anonymous sessions: fetch a
    /// token by its id. Answered by [`Frame::TokenContent`].
    GetToken(GetToken),
    /// Tag 27, broker → client: the token asked for.
    TokenContent(TokenContent),
    /// Tag 28, client → broker, the token's owner only: delete a token.
    /// Answered by [`Frame::Done`].
    DeleteToken(DeleteToken),
    /// Tag 29, client → broker, identity key sessions only: set the
    /// authenticated identity's inbound policy.
    SetInboundPolicy(SetInboundPolicy),
    /// Tag 30, client → broker: ask the owner of a relationship template for
    /// a relationship. Answered by [`Frame::RelationshipChanged`].
    RequestRelationship(RequestRelationship),
    /// Tag 31, client → broker: accept, reject or terminate a relationship.
    /// Answered by [`Frame::RelationshipChanged`].
    DecideRelationship(DecideRelationship),
    /// Tag 32, broker → client: the relationship after a request or decision.
    RelationshipChanged(RelationshipChanged),
    /// Tag 33, client → broker: list the identity's relationships and policy.
    ListRelationships(ListRelationships),
    /// Tag 34, broker → client: the answer to [`Frame::ListRelationships`].
    Relationships(Relationships),
    /// Tag 35, client → broker, identity key sessions only: schedule the
    /// deletion of the authenticated identity after the broker's grace
    /// period. Answered by [`Frame::DeletionScheduled`].
    DeleteIdentity(DeleteIdentity),
    /// Tag 36, broker → client: when the identity will be purged.
    DeletionScheduled(DeletionScheduled),
    /// Tag 37, client → broker, identity key sessions only: cancel the
    /// identity's scheduled deletion. Answered by [`Frame::Done`], or
    /// `NotFound` when none is scheduled.
    CancelDeletion(CancelDeletion),
    /// Tag 38, client → broker, authenticated sessions only: announce a file
    /// (see [`crate::file`]). Answered by [`Frame::FileCreated`].
    CreateFile(CreateFile),
    /// Tag 39, broker → client: the file's id; its bytes may now be uploaded.
    FileCreated(FileCreated),
    /// Tag 40, client → broker, the file's owner only: how much of a file
    /// the broker holds. Answered by [`Frame::FileState`].
    FileStatus(FileStatus),
    /// Tag 41, broker → client: a file's upload progress, answering
    /// [`Frame::FileStatus`] and ending each upload stream.
    FileState(FileState),
    /// Tag 42, client → broker, the file's owner only: delete a file.
    /// Answered by [`Frame::Done`].
    DeleteFile(DeleteFile),
    /// Tag 43, client → broker, first frame of an upload stream: the raw
    /// bytes from `offset` follow. Answered on that stream by
    /// [`Frame::FileState`].
    UploadFile(UploadFile),
    /// Tag 44, client → broker, only frame of a download stream. Answered on
    /// that stream by [`Frame::FileData`] and the raw bytes.
    DownloadFile(DownloadFile),
    /// Tag 45, broker → client, first frame of a download stream's answer:
    /// the raw bytes from `offset` to the end follow.
    FileData(FileData),
    /// Tag 46, client → broker, identity key sessions only: remove a device
    /// of the authenticated identity, closing its sessions. Answered by
    /// [`Frame::Done`], or `NotFound` for a device that is not registered.
    UnregisterDevice(UnregisterDevice),
    /// Tag 47, client → broker: list the authenticated identity's registered
    /// devices. Answered by [`Frame::Devices`].
    ListDevices(ListDevices),
    /// Tag 48, broker → client: the answer to [`Frame::ListDevices`].
    Devices(Devices),
}

impl Frame {
    /// The wire tag of each variant, in order. Keep in sync with the enum.
    pub const TAG_NAMES: [&'static str; 49] = [
        "Hello",
        "Challenge",
        "Auth",
        "AuthOk",
        "RegisterDevice",
        "PublishCard",
        "FetchCard",
        "CardResult",
        "Send",
        "SendAck",
        "Deliver",
        "Ack",
        "Delete",
        "Done",
        "Error",
        "Redirect",
        "Ping",
        "Pong",
        "RegisterCapability",
        "RevokeCapability",
        "ListCapabilities",
        "Capabilities",
        "Anonymous",
        "SealedSend",
        "CreateToken",
        "TokenCreated",
        "GetToken",
        "TokenContent",
        "DeleteToken",
        "SetInboundPolicy",
        "RequestRelationship",
        "DecideRelationship",
        "RelationshipChanged",
        "ListRelationships",
        "Relationships",
        "DeleteIdentity",
        "DeletionScheduled",
        "CancelDeletion",
        "CreateFile",
        "FileCreated",
        "FileStatus",
        "FileState",
        "DeleteFile",
        "UploadFile",
        "DownloadFile",
        "FileData",
        "UnregisterDevice",
        "ListDevices",
        "Devices",
    ];

    /// The wire tag of this frame.
    pub fn tag(&self) -> u32 {
        match self {
            Frame::Hello(_) => 0,
            Frame::Challenge(_) => 1,
            Frame::Auth(_) => 2,
            Frame::AuthOk(_) => 3,
            Frame::RegisterDevice(_) => 4,
            Frame::PublishCard(_) => 5,
            Frame::FetchCard(_) => 6,
            Frame::CardResult(_) => 7,
            Frame::Send(_) => 8,
            Frame::SendAck(_) => 9,
            Frame::Deliver(_) => 10,
            Frame::Ack(_) => 11,
            Frame::Delete(_) => 12,
            Frame::Done(_) => 13,
            Frame::Error(_) => 14,
            Frame::Redirect(_) => 15,
            Frame::Ping(_) => 16,
            Frame::Pong(_) => 17,
            Frame::RegisterCapability(_) => 18,
            Frame::RevokeCapability(_) => 19,
            Frame::ListCapabilities(_) => 20,
            Frame::Capabilities(_) => 21,
            Frame::Anonymous(_) => 22,
            Frame::SealedSend(_) => 23,
            Frame::CreateToken(_) => 24,
            Frame::TokenCreated(_) => 25,
            Frame::GetToken(_) => 26,
            Frame::TokenContent(_) => 27,
            Frame::DeleteToken(_) => 28,
            Frame::SetInboundPolicy(_) => 29,
            Frame::RequestRelationship(_) => 30,
            Frame::DecideRelationship(_) => 31,
            Frame::RelationshipChanged(_) => 32,
            Frame::ListRelationships(_) => 33,
            Frame::Relationships(_) => 34,
            Frame::DeleteIdentity(_) => 35,
            Frame::DeletionScheduled(_) => 36,
            Frame::CancelDeletion(_) => 37,
            Frame::CreateFile(_) => 38,
            Frame::FileCreated(_) => 39,
            Frame::FileStatus(_) => 40,
            Frame::FileState(_) => 41,
            Frame::DeleteFile(_) => 42,
            Frame::UploadFile(_) => 43,
            Frame::DownloadFile(_) => 44,
            Frame::FileData(_) => 45,
            Frame::UnregisterDevice(_) => 46,
            Frame::ListDevices(_) => 47,
            Frame::Devices(_) => 48,
        }
    }

    /// The `request_id` of a request a client sends (on the session's
    /// stream, or as a file stream's header), `None` for every other frame:
    /// the handshake, `Ack`, `Ping`, `Pong`, `Error` and what only a broker
    /// sends.
    pub fn request_id(&self) -> Option<u64> {
        use Frame as F;
        Some(match self {
            F::RegisterDevice(f) => f.request_id,
            F::PublishCard(f) => f.request_id,
            F::FetchCard(f) => f.request_id,
            F::Send(f) => f.request_id,
            F::Delete(f) => f.request_id,
            F::RegisterCapability(f) => f.request_id,
            F::RevokeCapability(f) => f.request_id,
            F::ListCapabilities(f) => f.request_id,
            F::SealedSend(f) => f.request_id,
            F::CreateToken(f) => f.request_id,
            F::GetToken(f) => f.request_id,
            F::DeleteToken(f) => f.request_id,
            F::SetInboundPolicy(f) => f.request_id,
            F::RequestRelationship(f) => f.request_id,
            F::DecideRelationship(f) => f.request_id,
            F::ListRelationships(f) => f.request_id,
            F::DeleteIdentity(f) => f.request_id,
            F::CancelDeletion(f) => f.request_id,
            F::CreateFile(f) => f.request_id,
            F::FileStatus(f) => f.request_id,
            F::DeleteFile(f) => f.request_id,
            F::UploadFile(f) => f.request_id,
            F::DownloadFile(f) => f.request_id,
            F::UnregisterDevice(f) => f.request_id,
            F::ListDevices(f) => f.request_id,
            F::Hello(_)
            | F::Challenge(_)
            | F::Auth(_)
            | F::AuthOk(_)
            | F::CardResult(_)
            | F::SendAck(_)
            | F::Deliver(_)
            | F::Ack(_)
            | F::Done(_)
            | F::Error(_)
            | F::Redirect(_)
            | F::Ping(_)
            | F::Pong(_)
            | F::Capabilities(_)
            | F::Anonymous(_)
            | F::TokenCreated(_)
            | F::TokenContent(_)
            | F::RelationshipChanged(_)
            | F::Relationships(_)
            | F::DeletionScheduled(_)
            | F::FileCreated(_)
            | F::FileState(_)
            | F::FileData(_)
            | F::Devices(_) => return None,
        })
    }

    /// The `request_id` an answer a broker sends carries (the request it
    /// answers, or 0 for the connection), `None` for frames that answer
    /// nothing: requests, the handshake, `Deliver`, `Ack`, `Ping`, `Pong`.
    pub fn answer_id(&self) -> Option<u64> {
        use Frame as F;
        Some(match self {
            F::CardResult(f) => f.request_id,
            F::SendAck(f) => f.request_id,
            F::Done(f) => f.request_id,
            F::Error(f) => f.request_id,
            F::Redirect(f) => f.request_id,
            F::Capabilities(f) => f.request_id,
            F::TokenCreated(f) => f.request_id,
            F::TokenContent(f) => f.request_id,
            F::RelationshipChanged(f) => f.request_id,
            F::Relationships(f) => f.request_id,
            F::DeletionScheduled(f) => f.request_id,
            F::FileCreated(f) => f.request_id,
            F::FileState(f) => f.request_id,
            F::FileData(f) => f.request_id,
            F::Devices(f) => f.request_id,
            F::Hello(_)
            | F::Challenge(_)
            | F::Auth(_)
            | F::AuthOk(_)
            | F::RegisterDevice(_)
            | F::PublishCard(_)
            | F::FetchCard(_)
            | F::Send(_)
            | F::Deliver(_)
            | F::Ack(_)
            | F::Delete(_)
            | F::Ping(_)
            | F::Pong(_)
            | F::RegisterCapability(_)
            | F::RevokeCapability(_)
            | F::ListCapabilities(_)
            | F::Anonymous(_)
            | F::SealedSend(_)
            | F::CreateToken(_)
            | F::GetToken(_)
            | F::DeleteToken(_)
            | F::SetInboundPolicy(_)
            | F::RequestRelationship(_)
            | F::DecideRelationship(_)
            | F::ListRelationships(_)
            | F::DeleteIdentity(_)
            | F::CancelDeletion(_)
            | F::CreateFile(_)
            | F::FileStatus(_)
            | F::DeleteFile(_)
            | F::UploadFile(_)
            | F::DownloadFile(_)
            | F::UnregisterDevice(_)
            | F::ListDevices(_) => return None,
        })
    }

    /// Whether a broker accepts this tag from a client that has not
    /// authenticated: `Hello`, `Auth` and `Anonymous`.
    pub fn tag_allowed_before_auth(tag: u32) -> bool {
        matches!(tag, 0 | 2 | 22)
    }
}

/// Version negotiation; the broker picks the highest version both speak.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u8,
    /// Highest protocol version the client speaks.
    pub max_version: u8,
}

/// The broker's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The version used on this connection from now on.
    pub version: u8,
    /// The broker's stable id, bound into the auth signature.
    pub server_id: ServerId,
    /// 32 random bytes, valid once.
    pub nonce: Nonce,
    /// How long the nonce stays valid, in milliseconds (at most 60 000).
    pub expires_in_ms: u32,
}

/// The signed challenge response (see [`crate::auth`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The identity's signing key; the session's address is its hash.
    pub identity_key: PublicKey,
    /// The device certificate, or `None` when the identity key itself signs.
    pub device: Option<DeviceCertificate>,
    /// The device key's signature over the auth transcript.
    pub signature: Signature,
}

/// Authentication succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    /// The authenticated identity's address.
    pub address: Address,
    /// The authenticated device.
    pub device_id: DeviceId,
    /// The device's cursor: every envelope up to this sequence is acknowledged.
    pub acked_seq: u64,
}

/// Registers another device of the authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterDevice {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The device certificate, issued by the authenticated identity.
    pub certificate: DeviceCertificate,
}

/// Publishes the authenticated identity's card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishCard {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The card; it must belong to the authenticated identity.
    pub card: IdentityCard,
}

/// Asks for the card of `address`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchCard {
    /// Client-chosen request id.
    pub request_id: u64,
    /// Whose card.
    pub address: Address,
}

/// The card asked for; the client verifies it against the address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardResult {
    /// The request this answers.
    pub request_id: u64,
    /// The stored card.
    pub card: IdentityCard,
}

/// Stores one envelope for each recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// Client-chosen request id.
    pub request_id: u64,
    /// Time to live in seconds; the broker caps it at its configured maximum.
    pub ttl_secs: u32,
    /// 1..N distinct recipients.
    pub recipients: Vec<Address>,
    /// Opaque, end-to-end encrypted bytes.
    pub envelope: Blob,
}

/// Per-recipient outcome of a [`Send`]: stored recipients and failed ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAck {
    /// The request this answers.
    pub request_id: u64,
    /// The id the broker gave the message.
    pub message_id: MessageId,
    /// Recipients for which the envelope is durable, with its sequence number there.
    pub stored: Vec<Stored>,
    /// Recipients for which the send failed.
    pub failed: Vec<Failed>,
}

/// The envelope is durable in `address`'s mailbox at `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The recipient.
    pub address: Address,
    /// The envelope's sequence number in that mailbox.
    pub seq: u64,
}

/// The envelope was not stored for `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The recipient.
    pub address: Address,
    /// Why, as a stable [`ErrorCode`] value.
    pub code: u16,
    /// When retrying makes sense, after how many milliseconds.
    pub retry_after_ms: Option<u32>,
}

/// One envelope pushed to a device, in sequence order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver {
    /// Sequence number in the recipient's mailbox.
    pub seq: u64,
    /// The broker's id for the message.
    pub message_id: MessageId,
    /// The sending identity as authenticated by the broker.
    pub sender: Option<Address>,
    /// When the broker stored it, milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
    /// When it expires, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The opaque envelope.
    pub envelope: Blob,
}

/// Cumulative ack: every envelope with `seq <= up_to_seq` was processed by this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Highest processed sequence number.
    pub up_to_seq: u64,
}

/// Deletes envelopes from the authenticated identity's mailbox, for all its devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    /// Client-chosen request id.
    pub request_id: u64,
    /// Sequence numbers to delete; unknown ones are ignored.
    pub seqs: Vec<u64>,
}

/// A request succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The request this answers.
    pub request_id: u64,
}

/// An error with a stable code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The failed request, or 0 for a connection-level error.
    pub request_id: u64,
    /// A stable [`ErrorCode`] value; unknown codes must be handled as generic failures.
    pub code: u16,
    /// When retrying makes sense, after how many milliseconds.
    pub retry_after_ms: Option<u32>,
    /// Human-readable detail, for logs and people, never for program logic.
    pub message: Text,
}

/// The address's home is another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// The request this answers, or 0 for the session itself.
    pub request_id: u64,
    /// `host:port` of the node to reconnect to.
    pub node: Text,
}

/// Liveness probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed in the [`Pong`].
    pub nonce: u64,
}

/// Answer to [`Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
}

/// Registers a capability hash with the authenticated identity's mailbox.
/// Registering a hash that is already registered succeeds and changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCapability {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The hash of the capability (see [`crate::capability`]).
    pub capability_hash: CapabilityHash,
}

/// Revokes a capability hash of the authenticated identity's mailbox: sealed
/// sends presenting its capability are refused from then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeCapability {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The registered hash to revoke.
    pub capability_hash: CapabilityHash,
}

/// Asks for the authenticated identity's registered capability hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListCapabilities {
    /// Client-chosen request id.
    pub request_id: u64,
}

/// The registered capability hashes, in ascending byte order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The request this answers.
    pub request_id: u64,
    /// Every registered, unrevoked hash.
    pub hashes: Vec<CapabilityHash>,
}

/// Opens an anonymous session in answer to the challenge. It carries nothing:
/// the session names no identity, so the broker cannot link what is sent on
/// it to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anonymous {}

/// Stores one envelope for `recipient`, admitted by `capability`. The
/// envelope names and is signed by its sender inside its encryption; the
/// broker stores no sender for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSend {
    /// Client-chosen request id.
    pub request_id: u64,
    /// Time to live in seconds; the broker caps it at its configured maximum.
    pub ttl_secs: u32,
    /// The one recipient.
    pub recipient: Address,
    /// The capability the recipient handed to the sender; the broker checks
    /// that its hash is registered with the recipient's mailbox.
    pub capability: DeliveryCapability,
    /// Opaque, end-to-end encrypted bytes.
    pub envelope: Blob,
}

/// Stores a token owned by the authenticated identity. The broker picks the
/// id (in the owner's slot, see [`crate::token`]) and answers with
/// [`TokenCreated`] once the token is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateToken {
    /// Client-chosen request id.
    pub request_id: u64,
    /// Time to live in seconds; the broker caps it at its configured maximum.
    pub ttl_secs: u32,
    /// Opaque bytes, encrypted by the client; the broker never reads them.
    pub content: Blob,
    /// If set, fetching the token needs this verifier; the broker stores only
    /// its hash.
    pub password_verifier: Option<PasswordVerifier>,
}

/// The answer to [`CreateToken`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The request this answers.
    pub request_id: u64,
    /// The token's id: whoever holds it can fetch the token.
    pub token_id: TokenId,
    /// When the token expires, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Fetches a token by its id. No identity is needed: holding the id is the
/// permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetToken {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The token's id.
    pub token_id: TokenId,
    /// The verifier of the token's password, for a password-protected token.
    pub password_verifier: Option<PasswordVerifier>,
}

/// The answer to [`GetToken`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenContent {
    /// The request this answers.
    pub request_id: u64,
    /// The bytes stored with [`CreateToken`].
    pub content: Blob,
    /// When the token expires, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Deletes a token of the authenticated identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteToken {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The token's id.
    pub token_id: TokenId,
}

/// Sets the authenticated identity's inbound policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetInboundPolicy {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The new policy.
    pub policy: InboundPolicy,
}

/// Asks `owner` for a relationship, admitted by a delivery capability the
/// owner handed out in a relationship template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRelationship {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The template's owner.
    pub owner: Address,
    /// The capability from the template; the owner's node checks that its
    /// hash is registered with the owner's mailbox.
    pub capability: DeliveryCapability,
    /// Opaque, end-to-end encrypted introduction for the owner (may be empty).
    pub intro: Blob,
}

/// Applies a decision to the relationship with `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecideRelationship {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The other identity.
    pub peer: Address,
    /// What to do.
    pub decision: Decision,
}

/// The relationship after a request or decision, from the asking side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationshipChanged {
    /// The request this answers.
    pub request_id: u64,
    /// This side's view.
    pub relationship: Relationship,
}

/// Asks for the authenticated identity's relationships and inbound policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRelationships {
    /// Client-chosen request id.
    pub request_id: u64,
}

/// Every relationship record of the identity (ended ones included), by peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationships {
    /// The request this answers.
    pub request_id: u64,
    /// The mailbox's inbound policy.
    pub policy: InboundPolicy,
    /// This side's view of each relationship.
    pub relationships: Vec<Relationship>,
}

/// Schedules the deletion of the authenticated identity: once the broker's
/// grace period has passed, everything stored for it is deleted and its
/// address can never authenticate again. Asking again while a deletion is
/// scheduled changes nothing and is answered with the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteIdentity {
    /// Client-chosen request id.
    pub request_id: u64,
}

/// The answer to [`DeleteIdentity`]: the deletion is durable and scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionScheduled {
    /// The request this answers.
    pub request_id: u64,
    /// When the identity will be purged, milliseconds since the Unix epoch.
    /// Until then it works as before and may cancel.
    pub purge_at_ms: u64,
}

/// Cancels the authenticated identity's scheduled deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelDeletion {
    /// Client-chosen request id.
    pub request_id: u64,
}

/// Announces a file of `size` bytes (see [`crate::file`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateFile {
    /// Client-chosen, non-zero.
    pub request_id: u64,
    /// The exact number of bytes that will be uploaded.
    pub size: u64,
    /// BLAKE3 of those bytes, checked when the last one arrives.
    pub content_hash: ContentHash,
    /// The hash of the secret a downloader must present.
    pub secret_hash: FileSecretHash,
    /// Seconds until the broker deletes the file; capped by the broker.
    pub ttl_secs: u32,
}

/// The broker's answer to [`CreateFile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCreated {
    /// The request this answers.
    pub request_id: u64,
    /// The file's id, drawn in the owner's slot.
    pub file_id: FileId,
    /// When the broker deletes it, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Asks how much of one of the identity's files the broker holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Client-chosen, non-zero.
    pub request_id: u64,
    /// The file.
    pub file_id: FileId,
}

/// A file's upload progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// The request (or upload stream) this answers.
    pub request_id: u64,
    /// The file.
    pub file_id: FileId,
    /// The declared size.
    pub size: u64,
    /// Bytes the broker holds; an upload resumes here.
    pub received: u64,
    /// Whether every byte arrived and the content hash matched.
    pub complete: bool,
    /// When the broker deletes it, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The content hash declared at creation. A client resuming an upload
    /// in another process checks its source against it before it seals
    /// anything, so it never uploads other content under the same key.
    pub content_hash: ContentHash,
}

/// Deletes one of the identity's files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteFile {
    /// Client-chosen, non-zero.
    pub request_id: u64,
    /// The file.
    pub file_id: FileId,
}

/// Opens an upload stream; the raw bytes from `offset` follow the frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadFile {
    /// Client-chosen, echoed by the answer on this stream.
    pub request_id: u64,
    /// The file.
    pub file_id: FileId,
    /// Where the bytes start: the broker's `received`.
    pub offset: u64,
}

/// Opens a download stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadFile {
    /// Client-chosen, echoed by the answer on this stream.
    pub request_id: u64,
    /// The file.
    pub file_id: FileId,
    /// The capability's secret.
    pub secret: FileSecret,
    /// The first byte wanted; 0 for the whole file.
    pub offset: u64,
}

/// Heads a download stream's answer; the raw bytes follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The request this answers.
    pub request_id: u64,
    /// The file's size.
    pub size: u64,
    /// The first byte that follows.
    pub offset: u64,
    /// The content hash the upload was checked against.
    pub content_hash: ContentHash,
}

/// Removes a device of the authenticated identity: its certificate and its
/// cursor are deleted, its open sessions are closed, and it can no longer
/// authenticate (`DeviceNotRegistered`) until the identity registers it
/// again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterDevice {
    /// Client-chosen request id.
    pub request_id: u64,
    /// The device to remove: `blake3` of its public key.
    pub device_id: DeviceId,
}

/// Asks for the authenticated identity's registered devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDevices {
    /// Client-chosen request id.
    pub request_id: u64,
}

/// Every registered device of the identity, by device id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// The request this answers.
    pub request_id: u64,
    /// The certificates the identity registered, ascending by device id. The
    /// identity key itself, which needs no certificate, is not listed.
    pub devices: Vec<DeviceCertificate>,
}

macro_rules! error_codes {
    ($($(#[$meta:meta])* $name:ident = $value:literal, $retryable:literal;)*) => {
        /// Stable numeric error codes. Values never change meaning.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $($(#[$meta])* $name = $value,)*
        }

        impl ErrorCode {
            /// Every code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a wire value, if known.
            pub fn from_u16(value: u16) -> Option<Self> {
                match value {
                    $($value => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// Whether the same request may succeed if retried later.
            pub fn is_retryable(self) -> bool {
                match self {
                    $(ErrorCode::$name => $retryable,)*
                }
            }

            /// The code's name, as documented.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                }
            }
        }
    };
}

error_codes! {
    /// The frame's body does not decode.
    MalformedFrame = 1, false;
    /// The frame's length exceeds the limit.
    FrameTooLarge = 2, false;
    /// The protocol version is not supported.
    UnsupportedVersion = 3, false;
    /// The frame tag is unknown.
    UnknownFrameType = 4, false;
    /// The frame has bytes after its body.
    TrailingBytes = 5, false;
    /// The frame ended before its body did.
    TruncatedFrame = 6, false;
    /// A request carried `request_id` 0, which is reserved for answers
    /// about the connection; the request was not carried out. Answered with
    /// `request_id` 0, and the session goes on.
    InvalidRequestId = 7, false;
    /// A frame other than Hello, Auth or Anonymous arrived before
    /// authentication, or a frame that needs an identity arrived on an anonymous session.
    NotAuthenticated = 10, false;
    /// The auth response did not verify.
    AuthFailed = 11, false;
    /// The challenge expired before the response arrived.
    ChallengeExpired = 12, false;
    /// The challenge was already answered, or none was issued.
    ChallengeReused = 13, false;
    /// The connection did not authenticate within the deadline.
    AuthTimeout = 14, false;
    /// The device is not registered for this identity: never registered,
    /// or unregistered (revoked) by it.
    DeviceNotRegistered = 15, false;
    /// The device certificate is invalid.
    InvalidCertificate = 16, false;
    /// A frame arrived in a state where it makes no sense.
    UnexpectedFrame = 17, false;
    /// No card is stored for the address.
    UnknownAddress = 20, false;
    /// The card does not verify or does not belong to the sender.
    InvalidCard = 21, false;
    /// More recipients than the broker allows, or none, or duplicates.
    InvalidRecipients = 22, false;
    /// The envelope exceeds the size limit.
    EnvelopeTooLarge = 23, false;
    /// The TTL is zero.
    InvalidTtl = 24, false;
    /// The request names something that does not exist.
    NotFound = 25, false;
    /// The authenticated identity may not do this.
    Forbidden = 26, false;
    /// The delivery capability is not registered with the recipient's
    /// mailbox: never registered, or revoked.
    UnknownCapability = 27, false;
    /// The mailbox already holds as many capability hashes as the broker allows.
    TooManyCapabilities = 28, false;
    /// The recipient accepts envelopes only from identities it has an
    /// active relationship with (its inbound policy is `relationships-only`).
    NotConsented = 29, false;
    /// Too many requests; retry after the given time.
    RateLimited = 30, true;
    /// A storage quota is exhausted.
    QuotaExceeded = 31, false;
    /// The shard owning the recipient is unavailable; retry later.
    ShardUnavailable = 32, true;
    /// The broker is overloaded; retry later. Also the close code of an
    /// `Anonymous` beyond the anonymous-session caps, and of a connection
    /// whose client stopped reading.
    Overloaded = 33, true;
    /// The broker is shutting down; reconnect later.
    ShuttingDown = 34, true;
    /// The token's password verifier is wrong (the failed attempt is
    /// counted), or missing for a password-protected token (not counted).
    WrongPassword = 36, false;
    /// Too many wrong passwords: the token can no longer be fetched, not even
    /// with the right one (its owner may still delete it).
    TokenLocked = 37, false;
    /// The relationship's state does not allow this request or decision.
    InvalidTransition = 38, false;
    /// The envelope starts with the bytes reserved for broker notices.
    ReservedEnvelope = 39, false;
    /// The identity was deleted: its address can no longer authenticate,
    /// receive envelopes, publish or serve a card, or enter relationships.
    IdentityDeleted = 40, false;
    /// The file is larger than the broker accepts.
    FileTooLarge = 41, false;
    /// The uploaded bytes do not match the declared content hash; the
    /// upload was discarded and starts over at byte 0.
    ContentMismatch = 42, false;
    /// The file is not completely uploaded yet.
    FileIncomplete = 43, false;
    /// An upload stream does not start where the broker's copy ends, goes
    /// past the declared size, or another upload of the file is running.
    InvalidOffset = 44, false;
    /// Only a session the identity key itself authenticated may make this
    /// request, not a certified device: managing devices, deleting the
    /// identity or cancelling that, and changing capabilities or the
    /// inbound policy.
    IdentityKeyRequired = 45, false;
    /// An internal error.
    Internal = 50, true;
    /// Storage failed; nothing was acknowledged.
    StorageFailure = 51, true;
}

impl ErrorFrame {
    /// An error frame for `code`.
    pub fn new(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            request_id,
            code: code as u16,
            retry_after_ms: None,
            message: Text(message.into()),
        }
    }
}
