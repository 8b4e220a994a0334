//! Golden test vectors and the error-code table of `docs/protocol.md`.
//!
//! The specification carries two generated blocks:
//!
//! - between `<!-- vectors:begin -->` and `<!-- vectors:end -->`: hex
//!   encodings of every frame type and of the signed structures, built from
//!   fixed inputs (ed25519 signatures are deterministic, so they are stable);
//! - between `<!-- errors:begin -->` and `<!-- errors:end -->`: the table of
//!   [`ErrorCode::ALL`], with each code's meaning taken from its doc comment
//!   in `src/frame.rs`.
//!
//! [`protocol_md_generated_blocks_are_current`] regenerates both and fails if
//! the document differs, so a change to the wire format cannot land without
//! the specification changing with it. Run with `UPDATE_VECTORS=1` to rewrite
//! the blocks instead:
//!
//! ```text
//! UPDATE_VECTORS=1 cargo test -p backbone-protocol --test vectors
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;

use backbone_protocol::auth::{TLS_EXPORTER_LEN, auth_transcript, sign_auth};
use backbone_protocol::bytes::{
    Blob, DeliveryCapability, EncryptionKey, MessageId, Nonce, PasswordVerifier, RelationshipId,
    ServerId, Text, TokenId,
};
use backbone_protocol::bytes::{ContentHash, FileId, FileSecret};
use backbone_protocol::capability::CAPABILITY_HASH_CONTEXT;
use backbone_protocol::codec::{
    DecodeError, MAX_FRAME_LEN, decode_frame, decode_peer_frame, decode_value, encode_value,
    frame_to_vec,
};
use backbone_protocol::file::SECRET_HASH_CONTEXT;
use backbone_protocol::fleet::PeerFrame;
use backbone_protocol::frame::{
    Ack, Anonymous, AuthOk, CancelDeletion, Capabilities, CardResult, Challenge, CreateToken,
    DecideRelationship, Delete, DeleteIdentity, DeleteToken, DeletionScheduled, Deliver, Done,
    ErrorFrame, Failed, FetchCard, GetToken, Hello, ListCapabilities, ListRelationships, Ping,
    Pong, PublishCard, Redirect, RegisterCapability, RegisterDevice, RelationshipChanged,
    Relationships, RequestRelationship, RevokeCapability, SealedSend, Send, SendAck,
    SetInboundPolicy, Stored, TokenContent, TokenCreated,
};
use backbone_protocol::frame::{
    CreateFile, DeleteFile, DownloadFile, FileCreated, FileData, FileState, FileStatus, UploadFile,
};
use backbone_protocol::frame::{Devices, ListDevices, UnregisterDevice};
use backbone_protocol::identity::domain;
use backbone_protocol::relationship::{Decision, InboundPolicy, Relationship, Role, State};
use backbone_protocol::token::VERIFIER_HASH_CONTEXT;
use backbone_protocol::{
    Address, Decoded, DeviceCertificate, ErrorCode, Frame, IdentityCard, Keypair, Phase,
};

const VECTORS_BEGIN: &str = "<!-- vectors:begin -->";
const VECTORS_END: &str = "<!-- vectors:end -->";
const ERRORS_BEGIN: &str = "<!-- errors:begin -->";
const ERRORS_END: &str = "<!-- errors:end -->";

/// The fixed inputs every vector is built from. The names are the ones the
/// document uses.
struct Fixtures {
    /// `IDENTITY`: the identity key pair, secret `[0x01; 32]`.
    identity: Keypair,
    /// `DEVICE`: a second device of `IDENTITY`, secret `[0x02; 32]`.
    device: Keypair,
    /// `PEER`: another identity, secret `[0x03; 32]`.
    peer: Keypair,
    /// `NONCE`: `[0x11; 32]`.
    nonce: Nonce,
    /// `SERVER_ID`: `[0x22; 32]`.
    server_id: ServerId,
    /// `EXPORTER`: the TLS exporter value, `[0x33; 32]`.
    exporter: [u8; TLS_EXPORTER_LEN],
    /// `MESSAGE_ID`: `[0x44; 16]`.
    message_id: MessageId,
    /// `ENCRYPTION_KEY`: `[0x55; 32]`.
    encryption_key: EncryptionKey,
    /// `T`: 1 700 000 000 000 ms, a fixed point in time.
    time_ms: u64,
    /// `ENVELOPE`: the bytes `de ad be ef`.
    envelope: Blob,
    /// `CAPABILITY`: a delivery capability, `[0x66; 32]`.
    capability: DeliveryCapability,
    /// `VERIFIER`: a token password verifier, `[0x77; 32]`.
    verifier: PasswordVerifier,
    /// `TOKEN_ID`: a token id, `[0x88; 32]`.
    token_id: TokenId,
    /// `FILE_ID`: a file id, `[0x99; 32]`.
    file_id: FileId,
    /// `FILE_SECRET`: a file's download secret, `[0xaa; 32]`.
    file_secret: FileSecret,
    /// `CONTENT_HASH`: a file's content hash, `[0xbb; 32]`.
    content_hash: ContentHash,
}

impl Fixtures {
    fn new() -> Self {
        Self {
            identity: Keypair::from_secret_bytes([0x01; 32]),
            device: Keypair::from_secret_bytes([0x02; 32]),
            peer: Keypair::from_secret_bytes([0x03; 32]),
            nonce: Nonce([0x11; 32]),
            server_id: ServerId([0x22; 32]),
            exporter: [0x33; TLS_EXPORTER_LEN],
            message_id: MessageId([0x44; 16]),
            encryption_key: EncryptionKey([0x55; 32]),
            time_ms: 1_700_000_000_000,
            envelope: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
            capability: DeliveryCapability([0x66; 32]),
            verifier: PasswordVerifier([0x77; 32]),
            token_id: TokenId([0x88; 32]),
            file_id: FileId([0x99; 32]),
            file_secret: FileSecret([0xaa; 32]),
            content_hash: ContentHash([0xbb; 32]),
        }
    }

    /// `CERTIFICATE`: `IDENTITY` certifies `DEVICE` at `T`.
    fn certificate(&self) -> DeviceCertificate {
        DeviceCertificate::issue(&self.identity, self.device.public(), self.time_ms)
    }

    /// `CARD`: `IDENTITY`'s card with `ENCRYPTION_KEY`, created at `T`.
    fn card(&self) -> IdentityCard {
        IdentityCard::sign(&self.identity, self.encryption_key, self.time_ms)
    }
}

/// One frame vector: a description of its inputs and the frame.
struct FrameVector {
    title: &'static str,
    inputs: &'static str,
    frame: Frame,
}

/// Every frame vector, in tag order; Auth appears twice (with and without a
/// device certificate) because its layout differs.
fn frame_vectors(f: &Fixtures) -> Vec<FrameVector> {
    let identity_address = f.identity.address();
    let peer_address = f.peer.address();
    let vector = |title, inputs, frame| FrameVector {
        title,
        inputs,
        frame,
    };
    vec![
        vector(
            "Hello",
            "min_version 1, max_version 1",
            Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
            }),
        ),
        vector(
            "Challenge",
            "version 1, server_id SERVER_ID, nonce NONCE, expires_in_ms 60000",
            Frame::Challenge(Challenge {
                version: 1,
                server_id: f.server_id,
                nonce: f.nonce,
                expires_in_ms: 60_000,
            }),
        ),
        vector(
            "Auth (primary device)",
            "IDENTITY signs the auth transcript itself: identity_key IDENTITY, device None",
            Frame::Auth(sign_auth(
                f.identity.public(),
                &f.identity,
                None,
                &f.nonce,
                &f.exporter,
                &f.server_id,
            )),
        ),
        vector(
            "Auth (certified device)",
            "DEVICE signs the auth transcript: identity_key IDENTITY, device Some(CERTIFICATE)",
            Frame::Auth(sign_auth(
                f.identity.public(),
                &f.device,
                Some(f.certificate()),
                &f.nonce,
                &f.exporter,
                &f.server_id,
            )),
        ),
        vector(
            "AuthOk",
            "address = address of IDENTITY, device_id = device id of DEVICE, acked_seq 41",
            Frame::AuthOk(AuthOk {
                address: identity_address,
                device_id: f.device.public().device_id(),
                acked_seq: 41,
            }),
        ),
        vector(
            "RegisterDevice",
            "request_id 1, certificate CERTIFICATE",
            Frame::RegisterDevice(RegisterDevice {
                request_id: 1,
                certificate: f.certificate(),
            }),
        ),
        vector(
            "PublishCard",
            "request_id 2, card CARD",
            Frame::PublishCard(PublishCard {
                request_id: 2,
                card: f.card(),
            }),
        ),
        vector(
            "FetchCard",
            "request_id 3, address = address of IDENTITY",
            Frame::FetchCard(FetchCard {
                request_id: 3,
                address: identity_address,
            }),
        ),
        vector(
            "CardResult",
            "request_id 3, card CARD",
            Frame::CardResult(CardResult {
                request_id: 3,
                card: f.card(),
            }),
        ),
        vector(
            "Send",
            "request_id 4, ttl_secs 3600, recipients [address of PEER, address of IDENTITY], \
             envelope ENVELOPE",
            Frame::Send(Send {
                request_id: 4,
                ttl_secs: 3600,
                recipients: vec![peer_address, identity_address],
                envelope: f.envelope.clone(),
            }),
        ),
        vector(
            "SendAck",
            "request_id 4, message_id MESSAGE_ID, stored [{address of PEER, seq 7}], \
             failed [{address of IDENTITY, code 32 (ShardUnavailable), retry_after_ms Some(1500)}]",
            Frame::SendAck(SendAck {
                request_id: 4,
                message_id: f.message_id,
                stored: vec![Stored {
                    address: peer_address,
                    seq: 7,
                }],
                failed: vec![Failed {
                    address: identity_address,
                    code: ErrorCode::ShardUnavailable as u16,
                    retry_after_ms: Some(1500),
                }],
            }),
        ),
        vector(
            "Deliver",
            "seq 7, message_id MESSAGE_ID, sender Some(address of IDENTITY), stored_at_ms T, \
             expires_at_ms T + 3600000, envelope ENVELOPE",
            Frame::Deliver(Deliver {
                seq: 7,
                message_id: f.message_id,
                sender: Some(identity_address),
                stored_at_ms: f.time_ms,
                expires_at_ms: f.time_ms + 3_600_000,
                envelope: f.envelope.clone(),
            }),
        ),
        vector("Ack", "up_to_seq 7", Frame::Ack(Ack { up_to_seq: 7 })),
        vector(
            "Delete",
            "request_id 5, seqs [7, 8]",
            Frame::Delete(Delete {
                request_id: 5,
                seqs: vec![7, 8],
            }),
        ),
        vector("Done", "request_id 5", Frame::Done(Done { request_id: 5 })),
        vector(
            "Error",
            "request_id 6, code 30 (RateLimited), retry_after_ms Some(1000), message \"slow down\"",
            Frame::Error(ErrorFrame {
                request_id: 6,
                code: ErrorCode::RateLimited as u16,
                retry_after_ms: Some(1000),
                message: Text::from("slow down"),
            }),
        ),
        vector(
            "Redirect",
            "request_id 0, node \"node2.example:4433\"",
            Frame::Redirect(Redirect {
                request_id: 0,
                node: Text::from("node2.example:4433"),
            }),
        ),
        vector(
            "Ping",
            "nonce 0x0102030405060708",
            Frame::Ping(Ping {
                nonce: 0x0102_0304_0506_0708,
            }),
        ),
        vector(
            "Pong",
            "nonce 0x0102030405060708",
            Frame::Pong(Pong {
                nonce: 0x0102_0304_0506_0708,
            }),
        ),
        vector(
            "RegisterCapability",
            "request_id 8, capability_hash = hash(CAPABILITY)",
            Frame::RegisterCapability(RegisterCapability {
                request_id: 8,
                capability_hash: f.capability.hash(),
            }),
        ),
        vector(
            "RevokeCapability",
            "request_id 9, capability_hash = hash(CAPABILITY)",
            Frame::RevokeCapability(RevokeCapability {
                request_id: 9,
                capability_hash: f.capability.hash(),
            }),
        ),
        vector(
            "ListCapabilities",
            "request_id 10",
            Frame::ListCapabilities(ListCapabilities { request_id: 10 }),
        ),
        vector(
            "Capabilities",
            "request_id 10, hashes [hash(CAPABILITY)]",
            Frame::Capabilities(Capabilities {
                request_id: 10,
                hashes: vec![f.capability.hash()],
            }),
        ),
        vector("Anonymous", "no fields", Frame::Anonymous(Anonymous {})),
        vector(
            "SealedSend",
            "request_id 11, ttl_secs 3600, recipient PEER's address, capability CAPABILITY, envelope ENVELOPE",
            Frame::SealedSend(SealedSend {
                request_id: 11,
                ttl_secs: 3600,
                recipient: peer_address,
                capability: f.capability,
                envelope: f.envelope.clone(),
            }),
        ),
        vector(
            "CreateToken",
            "request_id 12, ttl_secs 600, content ENVELOPE, password_verifier VERIFIER",
            Frame::CreateToken(CreateToken {
                request_id: 12,
                ttl_secs: 600,
                content: f.envelope.clone(),
                password_verifier: Some(f.verifier),
            }),
        ),
        vector(
            "TokenCreated",
            "request_id 12, token_id TOKEN_ID, expires_at_ms T + 600000",
            Frame::TokenCreated(TokenCreated {
                request_id: 12,
                token_id: f.token_id,
                expires_at_ms: f.time_ms + 600_000,
            }),
        ),
        vector(
            "GetToken",
            "request_id 13, token_id TOKEN_ID, password_verifier VERIFIER",
            Frame::GetToken(GetToken {
                request_id: 13,
                token_id: f.token_id,
                password_verifier: Some(f.verifier),
            }),
        ),
        vector(
            "TokenContent",
            "request_id 13, content ENVELOPE, expires_at_ms T + 600000",
            Frame::TokenContent(TokenContent {
                request_id: 13,
                content: f.envelope.clone(),
                expires_at_ms: f.time_ms + 600_000,
            }),
        ),
        vector(
            "DeleteToken",
            "request_id 14, token_id TOKEN_ID",
            Frame::DeleteToken(DeleteToken {
                request_id: 14,
                token_id: f.token_id,
            }),
        ),
        vector(
            "SetInboundPolicy",
            "request_id 15, policy RelationshipsOnly",
            Frame::SetInboundPolicy(SetInboundPolicy {
                request_id: 15,
                policy: InboundPolicy::RelationshipsOnly,
            }),
        ),
        vector(
            "RequestRelationship",
            "request_id 16, owner PEER's address, capability CAPABILITY, intro ENVELOPE",
            Frame::RequestRelationship(RequestRelationship {
                request_id: 16,
                owner: peer_address,
                capability: f.capability,
                intro: f.envelope.clone(),
            }),
        ),
        vector(
            "DecideRelationship",
            "request_id 17, peer PEER's address, decision Accept",
            Frame::DecideRelationship(DecideRelationship {
                request_id: 17,
                peer: peer_address,
                decision: Decision::Accept,
            }),
        ),
        vector(
            "RelationshipChanged",
            "request_id 17, relationship { id 0x0b × 16, peer PEER's address, role Owner, state Active, changed_at_ms 1767225600000 }",
            Frame::RelationshipChanged(RelationshipChanged {
                request_id: 17,
                relationship: relationship(peer_address),
            }),
        ),
        vector(
            "ListRelationships",
            "request_id 18",
            Frame::ListRelationships(ListRelationships { request_id: 18 }),
        ),
        vector(
            "Relationships",
            "request_id 18, policy Anyone, relationships [the relationship above]",
            Frame::Relationships(Relationships {
                request_id: 18,
                policy: InboundPolicy::Anyone,
                relationships: vec![relationship(peer_address)],
            }),
        ),
        vector(
            "DeleteIdentity",
            "request_id 19",
            Frame::DeleteIdentity(DeleteIdentity { request_id: 19 }),
        ),
        vector(
            "DeletionScheduled",
            "request_id 19, purge_at_ms T + 604800000 (seven days)",
            Frame::DeletionScheduled(DeletionScheduled {
                request_id: 19,
                purge_at_ms: f.time_ms + 604_800_000,
            }),
        ),
        vector(
            "CancelDeletion",
            "request_id 20",
            Frame::CancelDeletion(CancelDeletion { request_id: 20 }),
        ),
        vector(
            "CreateFile",
            "request_id 21, size 1048576, content_hash CONTENT_HASH, secret_hash FILE_SECRET's hash, ttl_secs 86400",
            Frame::CreateFile(CreateFile {
                request_id: 21,
                size: 1_048_576,
                content_hash: f.content_hash,
                secret_hash: f.file_secret.hash(),
                ttl_secs: 86_400,
            }),
        ),
        vector(
            "FileCreated",
            "request_id 21, file_id FILE_ID, expires_at_ms T + 86400000",
            Frame::FileCreated(FileCreated {
                request_id: 21,
                file_id: f.file_id,
                expires_at_ms: f.time_ms + 86_400_000,
            }),
        ),
        vector(
            "FileStatus",
            "request_id 22, file_id FILE_ID",
            Frame::FileStatus(FileStatus {
                request_id: 22,
                file_id: f.file_id,
            }),
        ),
        vector(
            "FileState",
            "request_id 22, file_id FILE_ID, size 1048576, received 65552, complete false, expires_at_ms T + 86400000, content_hash CONTENT_HASH",
            Frame::FileState(FileState {
                request_id: 22,
                file_id: f.file_id,
                size: 1_048_576,
                received: 65_552,
                complete: false,
                expires_at_ms: f.time_ms + 86_400_000,
                content_hash: f.content_hash,
            }),
        ),
        vector(
            "DeleteFile",
            "request_id 23, file_id FILE_ID",
            Frame::DeleteFile(DeleteFile {
                request_id: 23,
                file_id: f.file_id,
            }),
        ),
        vector(
            "UploadFile",
            "request_id 24, file_id FILE_ID, offset 65552 (the raw bytes follow the frame)",
            Frame::UploadFile(UploadFile {
                request_id: 24,
                file_id: f.file_id,
                offset: 65_552,
            }),
        ),
        vector(
            "DownloadFile",
            "request_id 25, file_id FILE_ID, secret FILE_SECRET, offset 0",
            Frame::DownloadFile(DownloadFile {
                request_id: 25,
                file_id: f.file_id,
                secret: f.file_secret,
                offset: 0,
            }),
        ),
        vector(
            "FileData",
            "request_id 25, size 1048576, offset 0, content_hash CONTENT_HASH (the raw bytes follow the frame)",
            Frame::FileData(FileData {
                request_id: 25,
                size: 1_048_576,
                offset: 0,
                content_hash: f.content_hash,
            }),
        ),
        vector(
            "UnregisterDevice",
            "request_id 26, device_id = device id of DEVICE",
            Frame::UnregisterDevice(UnregisterDevice {
                request_id: 26,
                device_id: f.device.public().device_id(),
            }),
        ),
        vector(
            "ListDevices",
            "request_id 27",
            Frame::ListDevices(ListDevices { request_id: 27 }),
        ),
        vector(
            "Devices",
            "request_id 27, devices [CERTIFICATE]",
            Frame::Devices(Devices {
                request_id: 27,
                devices: vec![f.certificate()],
            }),
        ),
    ]
}

/// The `request_id` a vector's frame carries: a request's own, or the one a
/// response echoes (both matches in `protocol` list every variant).
fn carried_request_id(frame: &Frame) -> Option<u64> {
    frame.request_id().or_else(|| frame.answer_id())
}

/// The frame type's name, as the document writes it.
fn frame_name(frame: &Frame) -> &'static str {
    Frame::TAG_NAMES[frame.tag() as usize]
}

/// The (request, response) names of the vectors that share a `request_id`,
/// in vector order: the response answers the request.
fn answered_requests(vectors: &[FrameVector]) -> Vec<(&'static str, &'static str)> {
    let mut pairs = Vec::new();
    for (index, response) in vectors.iter().enumerate() {
        if response.frame.request_id().is_some() {
            continue;
        }
        let Some(id) = carried_request_id(&response.frame) else {
            continue;
        };
        if let Some(request) = vectors[..index]
            .iter()
            .find(|request| request.frame.request_id() == Some(id))
        {
            pairs.push((frame_name(&request.frame), frame_name(&response.frame)));
        }
    }
    pairs
}

/// The relationship of the vectors.
fn relationship(peer: Address) -> Relationship {
    Relationship {
        id: RelationshipId([0x0b; 16]),
        peer,
        role: Role::Owner,
        state: State::Active,
        changed_at_ms: 1_767_225_600_000,
    }
}

/// Lowercase hex, 32 bytes per line, so long values stay readable in the document.
fn hex_lines(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty)".to_owned();
    }
    bytes
        .chunks(32)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends a fenced block holding `name: value` lines; multi-line values
/// continue indented under their name.
fn push_block(out: &mut String, lines: &[(&str, Vec<u8>)]) {
    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    out.push_str("```text\n");
    for (name, bytes) in lines {
        let hex = hex_lines(bytes);
        let mut rows = hex.lines();
        let first = rows.next().unwrap_or_default();
        let _ = writeln!(out, "{name:<width$}  {first}");
        for row in rows {
            let _ = writeln!(out, "{:<width$}  {row}", "");
        }
    }
    out.push_str("```\n\n");
}

/// The whole generated vectors block.
fn vectors_block() -> String {
    let f = Fixtures::new();
    let mut out = String::new();
    out.push_str(
        "Generated by `protocol/tests/vectors.rs`; do not edit by hand. All values are hex.\n\n",
    );

    out.push_str("### Keys, addresses and device ids\n\n");
    for (name, secret, keypair) in [
        ("IDENTITY", 0x01u8, &f.identity),
        ("DEVICE", 0x02, &f.device),
        ("PEER", 0x03, &f.peer),
    ] {
        let public = keypair.public();
        let address = public.address();
        let text = address.to_string();
        let checksum = {
            let mut hasher = blake3::Hasher::new_derive_key("backbone address checksum v1");
            hasher.update(&address.0);
            hasher.finalize().as_bytes()[..4].to_vec()
        };
        let _ = writeln!(out, "{name}: secret key `[0x{secret:02x}; 32]`.\n");
        push_block(
            &mut out,
            &[
                ("secret key", keypair.secret_bytes().to_vec()),
                ("public key", public.0.to_vec()),
                ("address = blake3(public key)", address.0.to_vec()),
                ("checksum", checksum),
                (
                    "device id = blake3(public key)",
                    public.device_id().0.to_vec(),
                ),
            ],
        );
        let _ = writeln!(out, "Text form: `{text}`\n");
    }

    out.push_str("### Device certificate\n\n");
    let certificate = f.certificate();
    out.push_str(
        "CERTIFICATE: IDENTITY certifies DEVICE's key, `issued_at_ms` = T = 1700000000000. \
         The signature is IDENTITY's ed25519 signature over `domain || signed bytes`.\n\n",
    );
    push_block(
        &mut out,
        &[
            ("domain", domain::DEVICE_CERTIFICATE.to_vec()),
            (
                "signed bytes",
                DeviceCertificate::signed_bytes(
                    &certificate.identity_key,
                    &certificate.device_key,
                    certificate.issued_at_ms,
                ),
            ),
            ("signature", certificate.signature.0.to_vec()),
            (
                "encoding",
                encode_value(&certificate).expect("a certificate encodes"),
            ),
        ],
    );

    out.push_str("### Identity card\n\n");
    let card = f.card();
    out.push_str(
        "CARD: IDENTITY's card, `encryption_key` = ENCRYPTION_KEY = `[0x55; 32]`, \
         `created_at_ms` = T. The signature is IDENTITY's over `domain || signed bytes`.\n\n",
    );
    push_block(
        &mut out,
        &[
            ("domain", domain::IDENTITY_CARD.to_vec()),
            (
                "signed bytes",
                IdentityCard::signed_bytes(
                    &card.signing_key,
                    &card.encryption_key,
                    card.created_at_ms,
                ),
            ),
            ("signature", card.signature.0.to_vec()),
            ("encoding", encode_value(&card).expect("a card encodes")),
        ],
    );

    out.push_str("### Auth transcripts\n\n");
    out.push_str(
        "NONCE = `[0x11; 32]`, EXPORTER (the TLS exporter value) = `[0x33; 32]`, \
         SERVER_ID = `[0x22; 32]`. The signature is the device key's over \
         `domain || transcript`.\n\n",
    );
    for (title, signer) in [
        (
            "Primary device (IDENTITY signs as its own device)",
            &f.identity,
        ),
        ("Certified device (DEVICE signs)", &f.device),
    ] {
        let transcript = auth_transcript(
            &f.nonce,
            &f.exporter,
            &f.server_id,
            &f.identity.public(),
            &signer.public(),
        );
        let signature = signer.sign(domain::AUTH, &transcript);
        let _ = writeln!(out, "{title}:\n");
        push_block(
            &mut out,
            &[
                ("domain", domain::AUTH.to_vec()),
                ("transcript", transcript),
                ("signature", signature.0.to_vec()),
            ],
        );
    }

    out.push_str("### Delivery capability hash\n\n");
    out.push_str(
        "CAPABILITY = `[0x66; 32]`. Its hash is BLAKE3 in key-derivation mode with the \
         context string below: `blake3::derive_key(context, capability)`.\n\n",
    );
    push_block(
        &mut out,
        &[
            ("context", CAPABILITY_HASH_CONTEXT.as_bytes().to_vec()),
            ("capability", f.capability.0.to_vec()),
            ("hash", f.capability.hash().0.to_vec()),
        ],
    );

    out.push_str("### Token password verifier hash\n\n");
    out.push_str(
        "VERIFIER = `[0x77; 32]`. The broker stores BLAKE3 in key-derivation mode with the \
         context string below: `blake3::derive_key(context, verifier)`.\n\n",
    );
    push_block(
        &mut out,
        &[
            ("context", VERIFIER_HASH_CONTEXT.as_bytes().to_vec()),
            ("verifier", f.verifier.0.to_vec()),
            ("hash", f.verifier.hash().0.to_vec()),
        ],
    );

    out.push_str("### File secret hash\n\n");
    out.push_str(
        "FILE_SECRET = `[0xaa; 32]`. The broker stores BLAKE3 in key-derivation mode with the \
         context string below: `blake3::derive_key(context, secret)`.\n\n",
    );
    push_block(
        &mut out,
        &[
            ("context", SECRET_HASH_CONTEXT.as_bytes().to_vec()),
            ("secret", f.file_secret.0.to_vec()),
            ("hash", f.file_secret.hash().0.to_vec()),
        ],
    );

    out.push_str("### Frames\n\n");
    out.push_str(
        "Each vector is one complete frame, shown as its 5-byte header (length prefix and \
         version byte) and its body; the body's lines start at body offsets 0, 32, 64, ..., \
         as in the layout tables. MESSAGE_ID = `[0x44; 16]`, ENVELOPE = `de ad be ef`, \
         TOKEN_ID = `[0x88; 32]`, FILE_ID = `[0x99; 32]`, CONTENT_HASH = `[0xbb; 32]`.\n\n",
    );
    let vectors = frame_vectors(&f);
    let answers = answered_requests(&vectors)
        .iter()
        .map(|(request, response)| format!("`{response}` answers `{request}`"))
        .collect::<Vec<_>>();
    let _ = writeln!(
        out,
        "Every request vector has a `request_id` of its own. A response vector carries the \
         `request_id` of the request vector it answers: {}. `Error` answers none of them, and \
         `Redirect` carries 0, which concerns the connection.\n",
        answers.join(", ")
    );
    for vector in vectors {
        let bytes = frame_to_vec(&vector.frame).expect("vectors encode");
        let _ = writeln!(out, "#### Tag {}: {}\n", vector.frame.tag(), vector.title);
        let _ = writeln!(out, "Inputs: {}. {} bytes.\n", vector.inputs, bytes.len());
        push_block(
            &mut out,
            &[
                ("header", bytes[..5].to_vec()),
                ("body", bytes[5..].to_vec()),
            ],
        );
    }
    out
}

/// One error code's documented meaning, read from the `error_codes!`
/// invocation in `src/frame.rs`.
struct ErrorDoc {
    name: String,
    value: u16,
    retryable: bool,
    meaning: String,
}

/// Parses the `error_codes!` invocation: `/// meaning` lines followed by
/// `Name = value, retryable;`. Reading the source keeps the doc comments the
/// single place where a code's meaning is written.
fn error_docs() -> Vec<ErrorDoc> {
    let source = std::fs::read_to_string(manifest_dir().join("src/frame.rs"))
        .expect("src/frame.rs is readable");
    let start = source
        .find("error_codes! {")
        .expect("frame.rs invokes error_codes!");
    let mut docs = Vec::new();
    let mut meaning = Vec::new();
    for line in source[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(doc) = line.strip_prefix("///") {
            meaning.push(doc.trim().to_owned());
            continue;
        }
        let Some((name, rest)) = line.split_once('=') else {
            continue;
        };
        let (value, retryable) = rest
            .trim()
            .trim_end_matches(';')
            .split_once(',')
            .unwrap_or_else(|| panic!("unexpected error_codes! line: {line}"));
        docs.push(ErrorDoc {
            name: name.trim().to_owned(),
            value: value
                .trim()
                .parse()
                .expect("error code values are u16 literals"),
            retryable: retryable.trim() == "true",
            meaning: meaning.join(" "),
        });
        meaning.clear();
    }
    docs
}

/// The generated error table: one row per entry of [`ErrorCode::ALL`].
fn errors_block() -> String {
    let docs = error_docs();
    assert_eq!(
        docs.len(),
        ErrorCode::ALL.len(),
        "every code in error_codes! is parsed"
    );
    let mut out =
        String::from("| Name | Value | Retryable | Meaning |\n| --- | ---: | --- | --- |\n");
    for (code, doc) in ErrorCode::ALL.iter().zip(&docs) {
        assert_eq!(doc.name, code.name(), "parsed names follow ErrorCode::ALL");
        assert_eq!(doc.value, *code as u16, "parsed value of {}", code.name());
        assert_eq!(
            doc.retryable,
            code.is_retryable(),
            "parsed retryability of {}",
            code.name()
        );
        assert!(!doc.meaning.is_empty(), "{} has a doc comment", code.name());
        let retryable = if code.is_retryable() { "yes" } else { "no" };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            code.name(),
            *code as u16,
            retryable,
            doc.meaning
        );
    }
    out
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn protocol_md_path() -> PathBuf {
    manifest_dir().join("../docs/protocol.md")
}

/// The text between `begin` and `end` in `document`, and its byte range.
fn block_range(document: &str, begin: &str, end: &str) -> std::ops::Range<usize> {
    let start = document
        .find(begin)
        .unwrap_or_else(|| panic!("docs/protocol.md has no {begin} marker"))
        + begin.len();
    let stop = start
        + document[start..]
            .find(end)
            .unwrap_or_else(|| panic!("docs/protocol.md has no {end} marker after {begin}"));
    start..stop
}

/// The document with the block between `begin` and `end` replaced by `content`.
fn with_block(document: &str, begin: &str, end: &str, content: &str) -> String {
    let range = block_range(document, begin, end);
    format!(
        "{}\n{}\n{}",
        &document[..range.start],
        content.trim_end(),
        &document[range.end..]
    )
}

#[test]
fn protocol_md_generated_blocks_are_current() {
    let path = protocol_md_path();
    let current = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
        .replace("\r\n", "\n");
    let expected = with_block(&current, VECTORS_BEGIN, VECTORS_END, &vectors_block());
    let expected = with_block(&expected, ERRORS_BEGIN, ERRORS_END, &errors_block());
    if std::env::var_os("UPDATE_VECTORS").is_some_and(|value| value == "1") {
        if expected != current {
            std::fs::write(&path, &expected)
                .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
        }
        return;
    }
    for (begin, end) in [(VECTORS_BEGIN, VECTORS_END), (ERRORS_BEGIN, ERRORS_END)] {
        let found = &current[block_range(&current, begin, end)];
        let wanted = &expected[block_range(&expected, begin, end)];
        if found != wanted {
            let first_difference = found
                .lines()
                .zip(wanted.lines())
                .position(|(a, b)| a != b)
                .map_or("one block is a prefix of the other".to_owned(), |line| {
                    format!("first difference at line {} of the block", line + 1)
                });
            panic!(
                "docs/protocol.md is stale between {begin} and {end} ({first_difference}).\n\
                 If the change to the wire format is intended, regenerate with\n  \
                 UPDATE_VECTORS=1 cargo test -p backbone-protocol --test vectors"
            );
        }
    }
}

#[test]
fn every_frame_tag_has_a_vector_that_decodes_to_its_frame() {
    let f = Fixtures::new();
    let mut tags = Vec::new();
    for vector in frame_vectors(&f) {
        let bytes = frame_to_vec(&vector.frame).expect("vectors encode");
        assert_eq!(
            decode_frame(&bytes, MAX_FRAME_LEN, Phase::Any),
            Ok(Decoded::Frame {
                frame: vector.frame.clone(),
                consumed: bytes.len()
            }),
            "vector {}",
            vector.title
        );
        tags.push(vector.frame.tag());
    }
    tags.dedup();
    let all: Vec<u32> = (0..Frame::TAG_NAMES.len() as u32).collect();
    assert_eq!(tags, all, "one vector per tag, in tag order");
}

#[test]
fn vector_signatures_verify() {
    let f = Fixtures::new();
    let certificate = f.certificate();
    assert_eq!(certificate.verify_for(&f.identity.address()), Ok(()));
    assert_eq!(f.card().verify(&f.identity.address()), Ok(()));
    for vector in frame_vectors(&f) {
        if let Frame::Auth(auth) = &vector.frame {
            assert_eq!(
                backbone_protocol::auth::verify_auth(auth, &f.nonce, &f.exporter, &f.server_id),
                Ok(()),
                "vector {}",
                vector.title
            );
        }
    }
    let decoded: DeviceCertificate =
        decode_value(&encode_value(&certificate).expect("encodes")).expect("decodes");
    assert_eq!(decoded, certificate);
}

/// The byte-layout tables in the document give these body sizes (everything
/// after the version byte); this pins them to the code.
#[test]
fn body_sizes_match_the_documented_layouts() {
    let f = Fixtures::new();
    let body_len = |frame: &Frame| frame_to_vec(frame).expect("encodes").len() - 5;
    for vector in frame_vectors(&f) {
        let expected = match &vector.frame {
            Frame::Hello(_) => 6,
            Frame::Challenge(_) => 73,
            Frame::Auth(auth) => 101 + if auth.device.is_some() { 136 } else { 0 },
            Frame::AuthOk(_) => 76,
            Frame::RegisterDevice(_) | Frame::PublishCard(_) | Frame::CardResult(_) => 148,
            Frame::FetchCard(_) => 44,
            Frame::Send(send) => 32 + 32 * send.recipients.len() + send.envelope.0.len(),
            Frame::SendAck(ack) => {
                let failed: usize = ack
                    .failed
                    .iter()
                    .map(|failed| {
                        35 + if failed.retry_after_ms.is_some() {
                            4
                        } else {
                            0
                        }
                    })
                    .sum();
                44 + 40 * ack.stored.len() + failed
            }
            Frame::Deliver(deliver) => {
                53 + if deliver.sender.is_some() { 32 } else { 0 } + deliver.envelope.0.len()
            }
            Frame::Ack(_) | Frame::Done(_) | Frame::Ping(_) | Frame::Pong(_) => 12,
            Frame::Delete(delete) => 20 + 8 * delete.seqs.len(),
            Frame::Error(error) => {
                23 + if error.retry_after_ms.is_some() { 4 } else { 0 } + error.message.0.len()
            }
            Frame::Redirect(redirect) => 20 + redirect.node.0.len(),
            Frame::RegisterCapability(_) | Frame::RevokeCapability(_) => 44,
            Frame::ListCapabilities(_) => 12,
            Frame::Capabilities(list) => 20 + 32 * list.hashes.len(),
            Frame::Anonymous(_) => 4,
            Frame::SealedSend(send) => 88 + send.envelope.0.len(),
            Frame::CreateToken(create) => {
                25 + create.content.0.len()
                    + if create.password_verifier.is_some() {
                        32
                    } else {
                        0
                    }
            }
            Frame::TokenCreated(_) => 52,
            Frame::GetToken(get) => {
                45 + if get.password_verifier.is_some() {
                    32
                } else {
                    0
                }
            }
            Frame::TokenContent(content) => 28 + content.content.0.len(),
            Frame::DeleteToken(_) => 44,
            Frame::SetInboundPolicy(_) => 16,
            Frame::RequestRelationship(request) => 84 + request.intro.0.len(),
            Frame::DecideRelationship(_) => 48,
            Frame::RelationshipChanged(_) => 76,
            Frame::ListRelationships(_) => 12,
            Frame::Relationships(list) => 24 + 64 * list.relationships.len(),
            Frame::DeleteIdentity(_) | Frame::CancelDeletion(_) => 12,
            Frame::DeletionScheduled(_) => 20,
            Frame::CreateFile(_) => 88,
            Frame::FileCreated(_) => 52,
            Frame::FileStatus(_) => 44,
            Frame::FileState(_) => 101,
            Frame::DeleteFile(_) => 44,
            Frame::UploadFile(_) => 52,
            Frame::DownloadFile(_) => 84,
            Frame::FileData(_) => 60,
            Frame::UnregisterDevice(_) => 44,
            Frame::ListDevices(_) => 12,
            Frame::Devices(list) => 20 + 136 * list.devices.len(),
        };
        assert_eq!(
            body_len(&vector.frame),
            expected,
            "body size of {}",
            vector.title
        );
    }
}

/// The lowest tag `unknown` says a decoder refuses as an unknown frame type,
/// after checking that it refuses every tag above it (up to 1,000) and none
/// below it.
fn first_unknown_tag(unknown: impl Fn(u32) -> bool) -> u32 {
    let bound = (0..1_000)
        .find(|&tag| unknown(tag))
        .expect("some tag is unknown");
    assert!((bound..1_000).all(&unknown), "a tag above {bound} decodes");
    assert!(!(0..bound).any(&unknown));
    bound
}

/// A frame with version 1, `tag` and nothing after the tag.
fn bare_frame(tag: u32) -> Vec<u8> {
    let mut bytes = 5u32.to_be_bytes().to_vec();
    bytes.push(1);
    bytes.extend_from_slice(&tag.to_le_bytes());
    bytes
}

#[test]
fn protocol_md_states_the_tag_bounds_the_decoders_enforce() {
    let client = first_unknown_tag(|tag| {
        matches!(
            decode_frame(&bare_frame(tag), MAX_FRAME_LEN, Phase::Any),
            Err(DecodeError::UnknownFrameType { .. })
        )
    });
    let peer = first_unknown_tag(|tag| {
        matches!(
            decode_peer_frame(&bare_frame(tag), MAX_FRAME_LEN),
            Err(DecodeError::UnknownFrameType { .. })
        )
    });
    assert_eq!(client as usize, Frame::TAG_NAMES.len());
    assert_eq!(peer as usize, PeerFrame::TAG_NAMES.len());
    let document = std::fs::read_to_string(protocol_md_path()).expect("read docs/protocol.md");
    let words = document.split_whitespace().collect::<Vec<_>>().join(" ");
    for sentence in [
        format!("a tag of {client} or more (`UnknownFrameType`)"),
        format!("a tag of {peer} or more,"),
    ] {
        assert!(
            words.contains(&sentence),
            "docs/protocol.md should say \"{sentence}\""
        );
    }
    assert_eq!(
        words.matches("a tag of ").count(),
        2,
        "docs/protocol.md states a tag bound this test does not check"
    );
}

/// The success response the "Requests and responses" table of the document
/// gives for each request: the first name in backticks of each row's first
/// and second cells.
fn documented_responses(document: &str) -> std::collections::HashMap<String, String> {
    let start = document
        .find("## Requests and responses")
        .expect("docs/protocol.md has a Requests and responses section");
    let first_name = |cell: &str| {
        let mut parts = cell.split('`');
        parts.next();
        parts.next().map(str::to_owned)
    };
    document[start..]
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').collect();
            Some((first_name(cells.get(1)?)?, first_name(cells.get(2)?)?))
        })
        .collect()
}

/// No two vectors share a `request_id` unless one is a request and the other
/// the response the document's table gives for it, so an implementer can
/// tell the vectors apart by their ids and see each answer next to its
/// request. 0 is left to the connection-level `Redirect`.
#[test]
fn every_request_vector_has_its_own_request_id() {
    let f = Fixtures::new();
    let vectors = frame_vectors(&f);
    let document = std::fs::read_to_string(protocol_md_path()).expect("read docs/protocol.md");
    let responses = documented_responses(&document);
    assert_eq!(
        responses.get("FetchCard").map(String::as_str),
        Some("CardResult"),
        "the Requests and responses table is parsed"
    );
    let mut by_id: std::collections::BTreeMap<u64, Vec<&FrameVector>> = Default::default();
    for vector in &vectors {
        if let Some(id) = carried_request_id(&vector.frame) {
            by_id.entry(id).or_default().push(vector);
        }
    }
    for (id, sharing) in &by_id {
        let titles: Vec<&str> = sharing.iter().map(|vector| vector.title).collect();
        if *id == 0 {
            assert!(
                sharing
                    .iter()
                    .all(|vector| vector.frame.request_id().is_none()),
                "request_id 0 is refused on requests, yet {titles:?} carry it"
            );
            continue;
        }
        match sharing[..] {
            [_] => {}
            [request, response] => {
                assert!(
                    request.frame.request_id().is_some() && response.frame.request_id().is_none(),
                    "request_id {id} is shared by {titles:?}, which are not a request and its response"
                );
                let (request, response) = (frame_name(&request.frame), frame_name(&response.frame));
                assert_eq!(
                    responses.get(request).map(String::as_str),
                    Some(response),
                    "request_id {id}: {response} is not the documented answer to {request}"
                );
            }
            _ => panic!("request_id {id} is shared by {titles:?}"),
        }
    }
    assert!(
        !answered_requests(&vectors).is_empty(),
        "some response vectors answer their request vectors"
    );
}

/// Every fixture a frame vector's inputs name (a word in capitals such as
/// `TOKEN_ID`) is defined in the generated block, as `NAME = ...`,
/// `NAME: ...` or `NAME (...) = ...`.
#[test]
fn every_fixture_a_vector_names_is_defined() {
    let f = Fixtures::new();
    let block = vectors_block();
    for vector in frame_vectors(&f) {
        let names = vector
            .inputs
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| {
                !word.is_empty() && word.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            });
        for name in names {
            assert!(
                [" = ", ": ", " ("]
                    .iter()
                    .any(|follows| block.contains(&format!("{name}{follows}"))),
                "vector {} uses {name}, which the vectors block does not define",
                vector.title
            );
        }
    }
}
