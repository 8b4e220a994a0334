//! The bodies of the fuzz targets, shared by the libFuzzer binaries in
//! `fuzz_targets/` and by the `replay` driver.
//!
//! Each target takes arbitrary bytes and must never panic. Beyond "no
//! panic", each asserts the properties of what it exercises:
//!
//! - `decode_frame`, `decode_peer_frame`: a decoded client or peer frame
//!   re-encodes to exactly the bytes it was decoded from (the layout is
//!   canonical) and decodes again to an equal frame;
//! - `verify_card_and_auth`: verification results agree with each other;
//! - `auth_handshake`: the broker's handshake state machine against a
//!   reference model (see [`run_auth_handshake`]);
//! - `open_envelope`: nothing opens that the fixed sender did not sign;
//! - `frame_buffer` ([`frame_buffer`]): the receive buffer fed in chunks
//!   against a reference decoding of the whole stream;
//! - `references` ([`references`]): text forms print back canonically;
//! - `key_file` ([`key_file`]): key files re-serialise to equal keys;
//! - `stored_records` ([`stored_records`]): stored records re-encode to
//!   their bytes;
//! - `store_ops` ([`store_ops`]): the sled store against the memory store;
//! - `file_token_logic` ([`file_token_logic`]): the pure parts of the
//!   broker's and client's token and file handling;
//! - `session` ([`session`]): the real broker's request handlers over a
//!   loopback QUIC connection, every answer checked.

pub mod file_token_logic;
pub mod frame_buffer;
pub mod key_file;
pub mod references;
pub mod session;
pub mod store_ops;
pub mod stored_records;

use backbone_client::envelope::{self, EncryptionKeypair, Padding};
use backbone_protocol::auth::{self, AuthError, TLS_EXPORTER_LEN, sign_auth};
use backbone_protocol::bytes::{
    Blob, DeliveryCapability, EncryptionKey, MessageId, Nonce, PasswordVerifier, RelationshipId,
    ServerId, Signature, Text, TokenId,
};
use backbone_protocol::bytes::{ContentHash, FileId, FileSecret};
use backbone_protocol::codec::{
    self, MAX_FRAME_LEN, decode_frame, decode_peer_frame, encode_peer_frame, frame_to_vec,
};
use backbone_protocol::deletion::{Deletion, PeerToTell};
use backbone_protocol::fleet::{
    Forward, ForwardAck, HandoffAck, HandoffDone, Import, MailboxTransfer, PeerCardResult,
    PeerConsent, PeerConsentResult, PeerFetchCard, PeerFrame, PeerGetToken, PeerHello, PeerRefuse,
    PeerTokenResult, SealedForward, TransferEnvelope, TransferToken,
};
use backbone_protocol::fleet::{ImportFile, TransferFile};
use backbone_protocol::frame::{
    Ack, Anonymous, Auth, AuthOk, CancelDeletion, Capabilities, CardResult, Challenge, CreateToken,
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
use backbone_protocol::handshake::{
    HandshakeParams, HandshakeState, HandshakeStep, ServerHandshake, Verified,
};
use backbone_protocol::relationship::{
    Decision, InboundPolicy, Relationship, Role, SideChange, State,
};
use backbone_protocol::{
    Address, Decoded, DeviceCertificate, ErrorCode, Frame, IdentityCard, Keypair, PROTOCOL_VERSION,
    Phase,
};

/// A small frame limit, as a broker configured for small envelopes would use,
/// so that the limit check is exercised as well as the hard cap.
const SMALL_LIMIT: usize = 4096;

/// The fixed challenge the `verify_card_and_auth` target checks `Auth` frames
/// against, so that seed inputs signed for it reach the success path.
pub const FIXED_NONCE: Nonce = Nonce([0x11; 32]);
/// The TLS exporter value paired with [`FIXED_NONCE`].
pub const FIXED_EXPORTER: [u8; TLS_EXPORTER_LEN] = [0x33; TLS_EXPORTER_LEN];
/// The server id paired with [`FIXED_NONCE`].
pub const FIXED_SERVER_ID: ServerId = ServerId([0x22; 32]);

/// Target `decode_frame`: decodes `data` as a stream of frames, in both
/// phases and under two limits, and checks every frame it yields.
pub fn decode_frame_target(data: &[u8]) {
    for phase in [Phase::Any, Phase::PreAuth] {
        for limit in [MAX_FRAME_LEN, SMALL_LIMIT] {
            decode_stream(data, limit, phase);
        }
    }
}

/// Decodes frames one after another until the input is used up, incomplete
/// or invalid, as a connection's read loop does.
fn decode_stream(mut data: &[u8], limit: usize, phase: Phase) {
    loop {
        match decode_frame(data, limit, phase) {
            Ok(Decoded::Frame { frame, consumed }) => {
                assert!(consumed >= codec::HEADER_LEN && consumed <= data.len());
                assert!(
                    consumed - 4 <= limit,
                    "a frame above the limit was accepted"
                );
                if phase == Phase::PreAuth {
                    assert!(matches!(
                        frame,
                        Frame::Hello(_) | Frame::Auth(_) | Frame::Anonymous(_)
                    ));
                }
                check_re_encoding(&frame, &data[..consumed]);
                data = &data[consumed..];
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > 0, "Incomplete must ask for at least one byte");
                return;
            }
            Err(error) => {
                // Every decode error maps to a stable wire code.
                let _ = error.code();
                return;
            }
        }
    }
}

/// A decoded frame re-encodes to the exact bytes it came from, and those
/// decode to an equal frame.
fn check_re_encoding(frame: &Frame, original: &[u8]) {
    let encoded = frame_to_vec(frame).expect("a decoded frame re-encodes");
    assert_eq!(encoded, original, "the encoding is canonical");
    assert_eq!(
        decode_frame(&encoded, MAX_FRAME_LEN, Phase::Any),
        Ok(Decoded::Frame {
            frame: frame.clone(),
            consumed: encoded.len()
        }),
        "a re-encoded frame decodes to itself"
    );
}

/// Target `verify_card_and_auth`: decodes `data` as an [`IdentityCard`], a
/// [`DeviceCertificate`] and an [`Auth`] with [`codec::decode_value`], and runs
/// the verification functions on whatever decodes.
pub fn verify_card_and_auth_target(data: &[u8]) {
    if let Ok(card) = codec::decode_value::<IdentityCard>(data) {
        let own = card.verify(&card.address());
        // A card that verifies for its own address verifies by signature alone.
        assert_eq!(own.is_ok(), card.verify_signature().is_ok());
        // Checking against an unrelated address exercises the mismatch path.
        let _ = card.verify(&Address(card.encryption_key.0));
    }
    if let Ok(certificate) = codec::decode_value::<DeviceCertificate>(data) {
        let plain = certificate.verify();
        let for_identity = certificate.verify_for(&certificate.identity_key.address());
        assert_eq!(plain, for_identity, "verify_for its own identity is verify");
        let _ = certificate.verify_for(&certificate.device_key.address());
    }
    if let Ok(auth) = codec::decode_value::<Auth>(data) {
        verify_auth_frame(&auth, &FIXED_NONCE, &FIXED_EXPORTER, &FIXED_SERVER_ID);
    }
    // The input may also carry its own challenge: nonce, exporter and server
    // id (96 bytes) followed by the Auth.
    if let Some((challenge, rest)) = data.split_first_chunk::<96>()
        && let Ok(auth) = codec::decode_value::<Auth>(rest)
    {
        let (nonce, rest) = challenge.split_first_chunk::<32>().expect("96 > 32");
        let (exporter, server_id) = rest.split_first_chunk::<32>().expect("64 > 32");
        let server_id: [u8; 32] = server_id.try_into().expect("96 - 64 = 32");
        verify_auth_frame(&auth, &Nonce(*nonce), exporter, &ServerId(server_id));
    }
}

fn verify_auth_frame(
    auth: &Auth,
    nonce: &Nonce,
    exporter: &[u8; TLS_EXPORTER_LEN],
    server_id: &ServerId,
) {
    let result = auth::verify_auth(auth, nonce, exporter, server_id);
    let _ = auth::claimed_device_key(auth);
    if result.is_ok() {
        // Success implies a valid certificate for the claimed identity.
        if let Some(certificate) = &auth.device {
            assert!(certificate.verify_for(&auth.identity_key.address()).is_ok());
        }
    }
}

/// Valid inputs for `decode_frame`: one encoding of every frame type, built
/// from fixed keys, plus all of them back to back.
pub fn decode_frame_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_frames()
        .iter()
        .map(|frame| frame_to_vec(frame).expect("sample frames encode"))
        .collect();
    seeds.push(seeds.concat());
    seeds
}

/// Valid inputs for `verify_card_and_auth`: a card, a certificate, Auth
/// frames signed for the fixed challenge, and one with its challenge in front.
pub fn verify_card_and_auth_seeds() -> Vec<Vec<u8>> {
    let identity = Keypair::from_secret_bytes([1; 32]);
    let device = Keypair::from_secret_bytes([2; 32]);
    let certificate = DeviceCertificate::issue(&identity, device.public(), 1_700_000_000_000);
    let card = IdentityCard::sign(&identity, EncryptionKey([0x55; 32]), 1_700_000_000_000);
    let primary = primary_auth(&identity);
    let secondary = sign_auth(
        identity.public(),
        &device,
        Some(certificate),
        &FIXED_NONCE,
        &FIXED_EXPORTER,
        &FIXED_SERVER_ID,
    );
    let mut with_challenge = Vec::new();
    with_challenge.extend_from_slice(FIXED_NONCE.as_bytes());
    with_challenge.extend_from_slice(&FIXED_EXPORTER);
    with_challenge.extend_from_slice(FIXED_SERVER_ID.as_bytes());
    with_challenge.extend(codec::encode_value(&secondary).expect("encodes"));
    vec![
        codec::encode_value(&card).expect("encodes"),
        codec::encode_value(&certificate).expect("encodes"),
        codec::encode_value(&primary).expect("encodes"),
        codec::encode_value(&secondary).expect("encodes"),
        with_challenge,
    ]
}

fn primary_auth(identity: &Keypair) -> Auth {
    sign_auth(
        identity.public(),
        identity,
        None,
        &FIXED_NONCE,
        &FIXED_EXPORTER,
        &FIXED_SERVER_ID,
    )
}

/// One frame of every type, with fixed contents.
fn sample_frames() -> Vec<Frame> {
    let identity = Keypair::from_secret_bytes([1; 32]);
    let device = Keypair::from_secret_bytes([2; 32]);
    let address = identity.address();
    let certificate = DeviceCertificate::issue(&identity, device.public(), 1_700_000_000_000);
    let card = IdentityCard::sign(&identity, EncryptionKey([0x55; 32]), 1_700_000_000_000);
    let envelope = Blob::from(vec![0xde, 0xad, 0xbe, 0xef]);
    let capability = DeliveryCapability([0x66; 32]);
    vec![
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
        }),
        Frame::Challenge(Challenge {
            version: 1,
            server_id: FIXED_SERVER_ID,
            nonce: FIXED_NONCE,
            expires_in_ms: 60_000,
        }),
        Frame::Auth(primary_auth(&identity)),
        Frame::AuthOk(AuthOk {
            address,
            device_id: device.public().device_id(),
            acked_seq: 41,
        }),
        Frame::RegisterDevice(RegisterDevice {
            request_id: 1,
            certificate,
        }),
        Frame::PublishCard(PublishCard {
            request_id: 2,
            card,
        }),
        Frame::FetchCard(FetchCard {
            request_id: 3,
            address,
        }),
        Frame::CardResult(CardResult {
            request_id: 3,
            card,
        }),
        Frame::Send(Send {
            request_id: 4,
            ttl_secs: 3600,
            recipients: vec![address, device.address()],
            envelope: envelope.clone(),
        }),
        Frame::SendAck(SendAck {
            request_id: 4,
            message_id: MessageId([0x44; 16]),
            stored: vec![Stored { address, seq: 7 }],
            failed: vec![Failed {
                address: device.address(),
                code: ErrorCode::ShardUnavailable as u16,
                retry_after_ms: Some(1500),
            }],
        }),
        Frame::Deliver(Deliver {
            seq: 7,
            message_id: MessageId([0x44; 16]),
            sender: Some(address),
            stored_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_003_600_000,
            envelope,
        }),
        Frame::Ack(Ack { up_to_seq: 7 }),
        Frame::Delete(Delete {
            request_id: 5,
            seqs: vec![7, 8],
        }),
        Frame::Done(Done { request_id: 5 }),
        Frame::Error(ErrorFrame {
            request_id: 6,
            code: ErrorCode::RateLimited as u16,
            retry_after_ms: Some(1000),
            message: Text::from("slow down"),
        }),
        Frame::Redirect(Redirect {
            request_id: 0,
            node: Text::from("node2.example:4433"),
        }),
        Frame::Ping(Ping { nonce: 9 }),
        Frame::Pong(Pong { nonce: 9 }),
        Frame::RegisterCapability(RegisterCapability {
            request_id: 8,
            capability_hash: capability.hash(),
        }),
        Frame::RevokeCapability(RevokeCapability {
            request_id: 9,
            capability_hash: capability.hash(),
        }),
        Frame::ListCapabilities(ListCapabilities { request_id: 10 }),
        Frame::Capabilities(Capabilities {
            request_id: 10,
            hashes: vec![capability.hash()],
        }),
        Frame::Anonymous(Anonymous {}),
        Frame::SealedSend(SealedSend {
            request_id: 11,
            ttl_secs: 3600,
            recipient: address,
            capability,
            envelope: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
        }),
        Frame::CreateToken(CreateToken {
            request_id: 12,
            ttl_secs: 600,
            content: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
            password_verifier: Some(PasswordVerifier([0x77; 32])),
        }),
        Frame::TokenCreated(TokenCreated {
            request_id: 12,
            token_id: TokenId([0x88; 32]),
            expires_at_ms: 1_700_000_600_000,
        }),
        Frame::GetToken(GetToken {
            request_id: 13,
            token_id: TokenId([0x88; 32]),
            password_verifier: None,
        }),
        Frame::TokenContent(TokenContent {
            request_id: 13,
            content: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
            expires_at_ms: 1_700_000_600_000,
        }),
        Frame::DeleteToken(DeleteToken {
            request_id: 14,
            token_id: TokenId([0x88; 32]),
        }),
        Frame::SetInboundPolicy(SetInboundPolicy {
            request_id: 15,
            policy: InboundPolicy::RelationshipsOnly,
        }),
        Frame::RequestRelationship(RequestRelationship {
            request_id: 16,
            owner: address,
            capability,
            intro: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
        }),
        Frame::DecideRelationship(DecideRelationship {
            request_id: 17,
            peer: address,
            decision: Decision::Accept,
        }),
        Frame::RelationshipChanged(RelationshipChanged {
            request_id: 17,
            relationship: Relationship {
                id: RelationshipId([0x0b; 16]),
                peer: address,
                role: Role::Owner,
                state: State::Active,
                changed_at_ms: 1_700_000_000_000,
            },
        }),
        Frame::ListRelationships(ListRelationships { request_id: 18 }),
        Frame::Relationships(Relationships {
            request_id: 18,
            policy: InboundPolicy::Anyone,
            relationships: vec![Relationship {
                id: RelationshipId([0x0b; 16]),
                peer: address,
                role: Role::Owner,
                state: State::Active,
                changed_at_ms: 1_700_000_000_000,
            }],
        }),
        Frame::DeleteIdentity(DeleteIdentity { request_id: 19 }),
        Frame::DeletionScheduled(DeletionScheduled {
            request_id: 19,
            purge_at_ms: 1_700_604_800_000,
        }),
        Frame::CancelDeletion(CancelDeletion { request_id: 20 }),
        Frame::CreateFile(CreateFile {
            request_id: 19,
            size: 1 << 20,
            content_hash: ContentHash([0xbb; 32]),
            secret_hash: FileSecret([0xaa; 32]).hash(),
            ttl_secs: 86_400,
        }),
        Frame::FileCreated(FileCreated {
            request_id: 19,
            file_id: FileId([0x99; 32]),
            expires_at_ms: 1_700_000_000_000,
        }),
        Frame::FileStatus(FileStatus {
            request_id: 20,
            file_id: FileId([0x99; 32]),
        }),
        Frame::FileState(FileState {
            request_id: 20,
            file_id: FileId([0x99; 32]),
            size: 1 << 20,
            received: 65_552,
            complete: false,
            expires_at_ms: 1_700_000_000_000,
            content_hash: ContentHash([0xbb; 32]),
        }),
        Frame::DeleteFile(DeleteFile {
            request_id: 21,
            file_id: FileId([0x99; 32]),
        }),
        Frame::UploadFile(UploadFile {
            request_id: 22,
            file_id: FileId([0x99; 32]),
            offset: 65_552,
        }),
        Frame::DownloadFile(DownloadFile {
            request_id: 23,
            file_id: FileId([0x99; 32]),
            secret: FileSecret([0xaa; 32]),
            offset: 0,
        }),
        Frame::FileData(FileData {
            request_id: 23,
            size: 1 << 20,
            offset: 0,
            content_hash: ContentHash([0xbb; 32]),
        }),
        Frame::UnregisterDevice(UnregisterDevice {
            request_id: 24,
            device_id: device.public().device_id(),
        }),
        Frame::ListDevices(ListDevices { request_id: 25 }),
        Frame::Devices(Devices {
            request_id: 25,
            devices: vec![certificate],
        }),
    ]
}

/// The challenge time to live of the `auth_handshake` target. Short, so that
/// the clock steps of an input (at most 65 535 ms each) reach it easily.
pub const HANDSHAKE_TTL_MS: u32 = 1000;

/// The machine the `auth_handshake` target drives: the fixed challenge of
/// [`FIXED_NONCE`], [`FIXED_EXPORTER`] and [`FIXED_SERVER_ID`].
fn fixed_handshake() -> ServerHandshake {
    ServerHandshake::new(HandshakeParams {
        server_id: FIXED_SERVER_ID,
        nonce: FIXED_NONCE,
        challenge_ttl_ms: HANDSHAKE_TTL_MS,
        tls_exporter: FIXED_EXPORTER,
    })
}

/// Target `auth_handshake`: [`run_auth_handshake`], whose result only the
/// tests need.
pub fn auth_handshake_target(data: &[u8]) {
    run_auth_handshake(data);
}

/// How an `auth_handshake` input ended.
#[derive(Debug, PartialEq, Eq)]
pub struct HandshakeOutcome {
    /// Frames handed to the machine.
    pub frames: usize,
    /// The machine's final state.
    pub state: HandshakeState,
}

/// Interprets `data` as a connection's pre-auth traffic and feeds it into a
/// [`ServerHandshake`] with a fixed nonce, server id and TLS exporter,
/// checking every answer against an independent reference model.
///
/// The input is a sequence of steps, each starting with an op byte:
///
/// - `op % 4 == 0`: advance the clock by the next two bytes (`u16` LE) in
///   milliseconds;
/// - `op % 4 == 1` or `3`: decode one frame from what follows, in
///   [`Phase::PreAuth`] under a 4 KiB limit, as the broker reads an
///   unauthenticated client, and hand it to the machine;
/// - `op % 4 == 2`: the same in [`Phase::Any`], so the machine also sees
///   frames the broker's decoder would have refused.
///
/// The input ends at its end, at an incomplete frame, or at a decode error
/// (the broker closes the connection there). Properties: nothing panics; a
/// challenge is issued only for a `Hello` that includes version 1, and only
/// once; `Authenticated` comes only after exactly one challenge, only before
/// the time to live elapsed, only for an `Auth` that `verify_auth`
/// independently accepts for the fixed nonce, exporter and server id, with
/// the address and device that `Auth` names, and at most once; an anonymous
/// session opens only for `Anonymous` after exactly one challenge and before
/// the time to live elapsed, and is never followed by authentication; every refusal
/// carries the code the model expects; after a refusal the machine stays
/// failed and after success it stays authenticated (or anonymous).
pub fn run_auth_handshake(mut data: &[u8]) -> HandshakeOutcome {
    let mut handshake = fixed_handshake();
    let mut model = HandshakeState::AwaitingHello;
    let mut now_ms: u64 = 0;
    let mut frames = 0;
    let mut challenges = 0;
    let mut authentications = 0;
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        let phase = match op % 4 {
            0 => {
                let Some((step, rest)) = data.split_first_chunk::<2>() else {
                    break;
                };
                now_ms += u64::from(u16::from_le_bytes(*step));
                data = rest;
                continue;
            }
            2 => Phase::Any,
            _ => Phase::PreAuth,
        };
        let Ok(Decoded::Frame { frame, consumed }) = decode_frame(data, SMALL_LIMIT, phase) else {
            break;
        };
        data = &data[consumed..];
        frames += 1;

        let expected = expected_handshake_step(model, &frame, now_ms);
        let before = handshake.state();
        assert_eq!(
            before, model,
            "the machine and the model agree on the state"
        );
        match handshake.handle(frame, now_ms) {
            Ok(HandshakeStep::SendChallenge(challenge)) => {
                assert_eq!(expected, Ok(ModelStep::Challenge));
                assert_eq!(before, HandshakeState::AwaitingHello);
                challenges += 1;
                assert_eq!(challenges, 1, "one challenge per handshake");
                assert_eq!(
                    challenge,
                    Challenge {
                        version: PROTOCOL_VERSION,
                        server_id: FIXED_SERVER_ID,
                        nonce: FIXED_NONCE,
                        expires_in_ms: HANDSHAKE_TTL_MS,
                    }
                );
                model = HandshakeState::AwaitingAuth {
                    issued_at_ms: now_ms,
                };
            }
            Ok(HandshakeStep::Anonymous) => {
                let HandshakeState::AwaitingAuth { issued_at_ms } = before else {
                    panic!("anonymous from {before:?}");
                };
                assert_eq!(challenges, 1, "anonymous without exactly one challenge");
                assert!(now_ms - issued_at_ms <= u64::from(HANDSHAKE_TTL_MS));
                assert_eq!(expected, Ok(ModelStep::Anonymous));
                model = HandshakeState::Anonymous;
            }
            Ok(HandshakeStep::Authenticated(verified)) => {
                let HandshakeState::AwaitingAuth { issued_at_ms } = before else {
                    panic!("authenticated from {before:?}");
                };
                assert_eq!(challenges, 1, "authenticated without exactly one challenge");
                assert_eq!(authentications, 0, "authenticated twice");
                assert!(now_ms - issued_at_ms <= u64::from(HANDSHAKE_TTL_MS));
                // `expected` holds `verify_auth`'s own verdict on this Auth.
                assert_eq!(expected, Ok(ModelStep::Authenticated(verified)));
                authentications += 1;
                model = HandshakeState::Authenticated;
            }
            Err(error) => {
                assert_eq!(Err(error.code()), expected, "{error}");
                if !matches!(
                    before,
                    HandshakeState::Authenticated | HandshakeState::Anonymous
                ) {
                    model = HandshakeState::Failed;
                }
            }
        }
        let after = handshake.state();
        assert_eq!(after, model, "the machine and the model agree on the state");
        if matches!(
            before,
            HandshakeState::Authenticated | HandshakeState::Anonymous | HandshakeState::Failed
        ) {
            assert_eq!(after, before, "an ended handshake stays ended");
        }
    }
    HandshakeOutcome {
        frames,
        state: handshake.state(),
    }
}

/// The reference model's answer to a frame.
#[derive(Debug, PartialEq, Eq)]
enum ModelStep {
    Challenge,
    Authenticated(Verified),
    Anonymous,
}

/// What the handshake must answer to `frame` in `state` at `now_ms`, written
/// independently of the machine from the handshake's description in
/// `docs/protocol.md`.
fn expected_handshake_step(
    state: HandshakeState,
    frame: &Frame,
    now_ms: u64,
) -> Result<ModelStep, ErrorCode> {
    match (state, frame) {
        (HandshakeState::Authenticated | HandshakeState::Anonymous | HandshakeState::Failed, _) => {
            Err(ErrorCode::ChallengeReused)
        }
        (HandshakeState::AwaitingHello, Frame::Hello(hello)) => {
            if hello.min_version <= PROTOCOL_VERSION && PROTOCOL_VERSION <= hello.max_version {
                Ok(ModelStep::Challenge)
            } else {
                Err(ErrorCode::UnsupportedVersion)
            }
        }
        (HandshakeState::AwaitingAuth { issued_at_ms }, Frame::Auth(answer)) => {
            if now_ms - issued_at_ms > u64::from(HANDSHAKE_TTL_MS) {
                return Err(ErrorCode::ChallengeExpired);
            }
            match auth::verify_auth(answer, &FIXED_NONCE, &FIXED_EXPORTER, &FIXED_SERVER_ID) {
                Ok(()) => Ok(ModelStep::Authenticated(Verified {
                    address: answer.identity_key.address(),
                    device_id: answer
                        .device
                        .map_or(answer.identity_key, |certificate| certificate.device_key)
                        .device_id(),
                    certified: answer.device.is_some(),
                })),
                Err(AuthError::Certificate(_)) => Err(ErrorCode::InvalidCertificate),
                Err(AuthError::Signature(_)) => Err(ErrorCode::AuthFailed),
            }
        }
        (HandshakeState::AwaitingAuth { issued_at_ms }, Frame::Anonymous(_)) => {
            if now_ms - issued_at_ms > u64::from(HANDSHAKE_TTL_MS) {
                Err(ErrorCode::ChallengeExpired)
            } else {
                Ok(ModelStep::Anonymous)
            }
        }
        (HandshakeState::AwaitingHello | HandshakeState::AwaitingAuth { .. }, _) => {
            Err(ErrorCode::UnexpectedFrame)
        }
    }
}

/// Inputs for `auth_handshake`: complete handshakes with genuinely signed
/// `Auth` frames (primary and certified device, answered at once and exactly
/// at the time to live), and each refusal: expired, replayed for another
/// nonce, forged certificate, bad signature, out of order, wrong version, a
/// second `Auth`, a frame the pre-auth decoder refuses.
pub fn auth_handshake_seeds() -> Vec<Vec<u8>> {
    let identity = Keypair::from_secret_bytes([1; 32]);
    let device = Keypair::from_secret_bytes([2; 32]);
    let stranger = Keypair::from_secret_bytes([6; 32]);
    let hello = handshake_frame(Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    }));
    let primary = handshake_frame(Frame::Auth(primary_auth(&identity)));
    let certified_auth = |certificate| {
        handshake_frame(Frame::Auth(sign_auth(
            identity.public(),
            &device,
            Some(certificate),
            &FIXED_NONCE,
            &FIXED_EXPORTER,
            &FIXED_SERVER_ID,
        )))
    };
    let certified = certified_auth(DeviceCertificate::issue(
        &identity,
        device.public(),
        1_700_000_000_000,
    ));
    let forged = certified_auth(DeviceCertificate::issue(
        &stranger,
        device.public(),
        1_700_000_000_000,
    ));
    let replayed = handshake_frame(Frame::Auth(sign_auth(
        identity.public(),
        &identity,
        None,
        &Nonce([0x99; 32]),
        &FIXED_EXPORTER,
        &FIXED_SERVER_ID,
    )));
    let mut bad_signature = primary_auth(&identity);
    bad_signature.signature = Signature([7; 64]);
    let bad_signature = handshake_frame(Frame::Auth(bad_signature));
    let wrong_version = handshake_frame(Frame::Hello(Hello {
        min_version: 2,
        max_version: 3,
    }));
    let mut ping = handshake_frame(Frame::Ping(Ping { nonce: 1 }));
    // Op 2: decoded in Phase::Any, so the Ping reaches the machine.
    ping[0] = 2;
    let anonymous = handshake_frame(Frame::Anonymous(Anonymous {}));
    let in_time = clock_step(u16::try_from(HANDSHAKE_TTL_MS).expect("fits"));
    let too_late = clock_step(u16::try_from(HANDSHAKE_TTL_MS + 1).expect("fits"));
    [
        vec![&hello, &primary],
        vec![&hello, &certified],
        vec![&hello, &in_time, &primary],
        vec![&hello, &too_late, &primary],
        vec![&hello, &replayed],
        vec![&hello, &forged],
        vec![&hello, &bad_signature],
        vec![&hello, &primary, &primary],
        vec![&hello, &hello, &primary],
        vec![&primary, &hello, &primary],
        vec![&wrong_version, &hello, &primary],
        vec![&hello, &ping, &primary],
        vec![&hello, &anonymous],
        vec![&hello, &in_time, &anonymous],
        vec![&hello, &too_late, &anonymous],
        vec![&hello, &anonymous, &primary],
        vec![&anonymous, &hello, &anonymous],
    ]
    .into_iter()
    .map(|steps| steps.into_iter().flatten().copied().collect())
    .collect()
}

/// An `auth_handshake` step that hands `frame` to the machine (op 1).
fn handshake_frame(frame: Frame) -> Vec<u8> {
    let mut step = vec![1];
    step.extend(frame_to_vec(&frame).expect("seed frames encode"));
    step
}

/// An `auth_handshake` step that advances the clock by `ms` (op 0).
fn clock_step(ms: u16) -> Vec<u8> {
    let mut step = vec![0];
    step.extend(ms.to_le_bytes());
    step
}

/// Target `decode_peer_frame`: decodes `data` as a stream of node-to-node
/// frames under two limits and checks every frame it yields, as
/// [`decode_frame_target`] does for client frames.
pub fn decode_peer_frame_target(data: &[u8]) {
    for limit in [MAX_FRAME_LEN, SMALL_LIMIT] {
        decode_peer_stream(data, limit);
    }
}

/// Decodes peer frames one after another until the input is used up,
/// incomplete or invalid, as a node-to-node link's read loop does.
fn decode_peer_stream(mut data: &[u8], limit: usize) {
    loop {
        match decode_peer_frame(data, limit) {
            Ok(Some((frame, consumed))) => {
                assert!(consumed >= codec::HEADER_LEN && consumed <= data.len());
                assert!(
                    consumed - 4 <= limit,
                    "a frame above the limit was accepted"
                );
                check_peer_re_encoding(&frame, &data[..consumed]);
                data = &data[consumed..];
            }
            Ok(None) => return,
            Err(error) => {
                let _ = error.code();
                return;
            }
        }
    }
}

/// A decoded peer frame re-encodes to the exact bytes it came from, and
/// those decode to an equal frame.
fn check_peer_re_encoding(frame: &PeerFrame, original: &[u8]) {
    let mut encoded = Vec::new();
    encode_peer_frame(frame, &mut encoded).expect("a decoded peer frame re-encodes");
    assert_eq!(encoded, original, "the encoding is canonical");
    assert_eq!(
        decode_peer_frame(&encoded, MAX_FRAME_LEN),
        Ok(Some((frame.clone(), encoded.len()))),
        "a re-encoded peer frame decodes to itself"
    );
}

/// Valid inputs for `decode_peer_frame`: one encoding of every peer frame
/// type, plus all of them back to back.
pub fn decode_peer_frame_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_peer_frames()
        .iter()
        .map(|frame| {
            let mut bytes = Vec::new();
            encode_peer_frame(frame, &mut bytes).expect("sample peer frames encode");
            bytes
        })
        .collect();
    // A variant of a frame's contents that the one-per-type samples miss.
    let identity = Keypair::from_secret_bytes([1; 32]);
    let peer_deleted = PeerFrame::Consent(PeerConsent {
        request_id: 8,
        address: identity.address(),
        peer: Keypair::from_secret_bytes([3; 32]).address(),
        change: SideChange::PeerDeleted {
            id: RelationshipId([0x0b; 16]),
        },
    });
    let mut bytes = Vec::new();
    encode_peer_frame(&peer_deleted, &mut bytes).expect("the sample peer frame encodes");
    seeds.push(bytes);
    seeds.push(seeds.concat());
    seeds
}

/// One node-to-node frame of every type, with fixed contents.
fn sample_peer_frames() -> Vec<PeerFrame> {
    let identity = Keypair::from_secret_bytes([1; 32]);
    let device = Keypair::from_secret_bytes([2; 32]);
    let address = identity.address();
    let certificate = DeviceCertificate::issue(&identity, device.public(), 1_700_000_000_000);
    let card = IdentityCard::sign(&identity, EncryptionKey([0x55; 32]), 1_700_000_000_000);
    let hello = PeerHello {
        node: Text::from("node1"),
        epoch: 3,
        map_digest: [0x66; 32],
    };
    let envelope = Blob::from(vec![0xde, 0xad, 0xbe, 0xef]);
    vec![
        PeerFrame::Hello(hello.clone()),
        PeerFrame::Welcome(hello),
        PeerFrame::Refuse(PeerRefuse {
            reason: Text::from("different fleet map"),
        }),
        PeerFrame::Forward(Forward {
            request_id: 1,
            message_id: MessageId([0x44; 16]),
            sender: Some(address),
            stored_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_003_600_000,
            recipients: vec![address, device.address()],
            envelope: envelope.clone(),
        }),
        PeerFrame::ForwardAck(ForwardAck {
            request_id: 1,
            stored: vec![Stored { address, seq: 7 }],
            failed: vec![Failed {
                address: device.address(),
                code: ErrorCode::QuotaExceeded as u16,
                retry_after_ms: None,
            }],
        }),
        PeerFrame::FetchCard(PeerFetchCard {
            request_id: 2,
            address,
        }),
        PeerFrame::CardResult(PeerCardResult {
            request_id: 2,
            result: Ok(card),
        }),
        PeerFrame::Import(Import {
            request_id: 3,
            epoch: 4,
            mailboxes: vec![MailboxTransfer {
                address,
                head: 8,
                envelopes: vec![TransferEnvelope {
                    seq: 8,
                    message_id: MessageId([0x45; 16]),
                    sender: None,
                    stored_at_ms: 1_700_000_000_000,
                    expires_at_ms: 1_700_003_600_000,
                    envelope,
                }],
                cursors: vec![(device.public().device_id(), 7)],
                card: Some(card),
                devices: vec![certificate],
                capabilities: vec![DeliveryCapability([0x66; 32]).hash()],
                tokens: vec![TransferToken {
                    id: TokenId([0x88; 32]),
                    created_at_ms: 1_700_000_000_000,
                    expires_at_ms: 1_700_000_600_000,
                    content: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
                    verifier_hash: Some(PasswordVerifier([0x77; 32]).hash()),
                    failed_attempts: 2,
                    locked: false,
                }],
                policy: Some(InboundPolicy::RelationshipsOnly),
                relationships: vec![Relationship {
                    id: RelationshipId([0x0b; 16]),
                    peer: address,
                    role: Role::Owner,
                    state: State::Active,
                    changed_at_ms: 1_700_000_000_000,
                }],
                deletion: Some(Deletion::Purging {
                    purge_at_ms: 1_700_604_800_000,
                    to_tell: vec![PeerToTell {
                        peer: address,
                        relationship: RelationshipId([0x0b; 16]),
                    }],
                }),
            }],
        }),
        PeerFrame::HandoffDone(HandoffDone {
            request_id: 4,
            epoch: 4,
            slots: vec![(0, 2047), (4000, 4095)],
        }),
        PeerFrame::HandoffAck(HandoffAck {
            request_id: 4,
            result: Err((ErrorCode::StorageFailure as u16, Text::from("disk full"))),
        }),
        PeerFrame::SealedForward(SealedForward {
            request_id: 5,
            message_id: MessageId([0x46; 16]),
            stored_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_003_600_000,
            recipient: address,
            capability_hash: DeliveryCapability([0x66; 32]).hash(),
            envelope: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
        }),
        PeerFrame::GetToken(PeerGetToken {
            request_id: 6,
            token_id: TokenId([0x88; 32]),
            password_verifier: Some(PasswordVerifier([0x77; 32])),
        }),
        PeerFrame::TokenResult(PeerTokenResult {
            request_id: 6,
            result: Ok((Blob::from(vec![0xde, 0xad, 0xbe, 0xef]), 1_700_000_600_000)),
        }),
        PeerFrame::Consent(PeerConsent {
            request_id: 7,
            address,
            peer: address,
            change: SideChange::Request {
                capability_hash: DeliveryCapability([0x66; 32]).hash(),
                intro: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
            },
        }),
        PeerFrame::ConsentResult(PeerConsentResult {
            request_id: 7,
            result: Ok(Relationship {
                id: RelationshipId([0x0b; 16]),
                peer: address,
                role: Role::Owner,
                state: State::Active,
                changed_at_ms: 1_700_000_000_000,
            }),
        }),
        PeerFrame::ImportFile(ImportFile {
            request_id: 8,
            epoch: 2,
            file: TransferFile {
                id: FileId([0x99; 32]),
                owner: address,
                size: 4,
                content_hash: ContentHash([0xbb; 32]),
                secret_hash: FileSecret([0xaa; 32]).hash(),
                expires_at_ms: 1_700_000_600_000,
                complete: true,
            },
            offset: 0,
            bytes: Blob::from(vec![0xde, 0xad, 0xbe, 0xef]),
            last: true,
        }),
    ]
}

/// The sender of every `open_envelope` seed.
fn envelope_sender() -> Keypair {
    Keypair::from_secret_bytes([0x41; 32])
}

/// The recipient the `open_envelope` target opens as.
fn envelope_recipient() -> (Address, EncryptionKeypair) {
    let identity = Keypair::from_secret_bytes([0x42; 32]);
    (
        identity.address(),
        EncryptionKeypair::from_secret_bytes([0x43; 32]),
    )
}

/// What the seeds' sender signed: `(sent_at_ms, plaintext)`. Envelopes are
/// sealed with fresh random keys, so a corpus from another run holds other
/// bytes; what it cannot hold is another signed message.
const SIGNED_MESSAGES: &[(u64, &[u8])] = &[
    (1, b""),
    (2, b"hello"),
    (
        3,
        b"a longer message that spans more than one block of the cipher stream",
    ),
];

/// Target `open_envelope`: opens `data` as the fixed recipient. Nothing may
/// panic, and an envelope that opens must carry the fixed sender's
/// signature over one of [`SIGNED_MESSAGES`]: anything else would be a forgery.
pub fn open_envelope_target(data: &[u8]) {
    let (me, key) = envelope_recipient();
    if let Ok(opened) = envelope::open(&me, &key, data) {
        assert_eq!(opened.sender, envelope_sender().address(), "forged sender");
        assert!(
            SIGNED_MESSAGES
                .iter()
                .any(|(at, text)| *at == opened.sent_at_ms && *text == opened.plaintext),
            "an envelope opened with a message the sender never signed"
        );
        assert!(opened.recipients.contains(&me));
    }
}

/// Seeds for `open_envelope`: each signed message sealed to the recipient,
/// padded and unpadded, alone and with a second recipient.
pub fn open_envelope_seeds() -> Vec<Vec<u8>> {
    let sender = envelope_sender();
    let (me, key) = envelope_recipient();
    let other = (
        Keypair::from_secret_bytes([0x44; 32]).address(),
        EncryptionKeypair::from_secret_bytes([0x45; 32]).public(),
    );
    let mut seeds = Vec::new();
    for (at, text) in SIGNED_MESSAGES {
        for padding in [Padding::default(), Padding::None] {
            for recipients in [vec![(me, key.public())], vec![(me, key.public()), other]] {
                seeds.push(
                    envelope::seal_with(&sender, &recipients, text, *at, padding)
                        .expect("seal a seed"),
                );
            }
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_seeds_open_and_pass_the_target() {
        let (me, key) = envelope_recipient();
        let seeds = open_envelope_seeds();
        assert_eq!(seeds.len(), SIGNED_MESSAGES.len() * 4);
        for seed in &seeds {
            assert!(envelope::open(&me, &key, seed).is_ok());
            open_envelope_target(seed);
        }
    }

    #[test]
    fn the_envelope_target_catches_an_unexpected_message() {
        let (me, key) = envelope_recipient();
        let sealed =
            envelope::seal(&envelope_sender(), &[(me, key.public())], b"not a seed", 9).unwrap();
        let caught = std::panic::catch_unwind(|| open_envelope_target(&sealed));
        assert!(
            caught.is_err(),
            "a message the sender never signed went unnoticed"
        );
    }

    #[test]
    fn seeds_cover_every_frame_type_and_pass_the_targets() {
        let seeds = decode_frame_seeds();
        assert_eq!(seeds.len(), Frame::TAG_NAMES.len() + 1);
        for seed in &seeds {
            decode_frame_target(seed);
        }
        for seed in verify_card_and_auth_seeds() {
            verify_card_and_auth_target(&seed);
        }
        for seed in decode_peer_frame_seeds() {
            decode_peer_frame_target(&seed);
        }
    }

    #[test]
    fn handshake_seeds_reach_success_and_every_refusal() {
        use HandshakeState::{Anonymous, Authenticated, Failed};
        let outcomes: Vec<HandshakeOutcome> = auth_handshake_seeds()
            .iter()
            .map(|seed| run_auth_handshake(seed))
            .collect();
        let expected = [
            (2, Authenticated), // primary device
            (2, Authenticated), // certified device
            (2, Authenticated), // answered exactly at the time to live
            (2, Failed),        // expired
            (2, Failed),        // signed for another nonce
            (2, Failed),        // forged certificate
            (2, Failed),        // bad signature
            (3, Authenticated), // the second Auth is refused
            (3, Failed),        // second Hello
            (3, Failed),        // Auth before Hello
            (3, Failed),        // wrong version
            (3, Failed),        // Ping instead of Auth
            (2, Anonymous),     // anonymous session
            (2, Anonymous),     // anonymous exactly at the time to live
            (2, Failed),        // anonymous too late
            (3, Anonymous),     // an Auth after Anonymous is refused
            (3, Failed),        // Anonymous before Hello
        ]
        .map(|(frames, state)| HandshakeOutcome { frames, state });
        assert_eq!(outcomes, expected);
    }

    #[test]
    fn the_handshake_target_stops_at_a_frame_the_broker_would_not_accept() {
        // A Ping decoded as the broker does (pre-auth) ends the input.
        let mut ping = handshake_frame(Frame::Ping(Ping { nonce: 1 }));
        ping.extend(auth_handshake_seeds().swap_remove(0));
        assert_eq!(
            run_auth_handshake(&ping),
            HandshakeOutcome {
                frames: 0,
                state: HandshakeState::AwaitingHello
            }
        );
    }

    #[test]
    fn peer_seeds_cover_every_peer_frame_type() {
        // One seed per tag, in tag order: a new peer frame type (a longer
        // `PeerFrame::TAG_NAMES`) fails here until it has a seed.
        let tags: Vec<usize> = sample_peer_frames()
            .iter()
            .map(|frame| frame.tag() as usize)
            .collect();
        assert_eq!(tags, (0..PeerFrame::TAG_NAMES.len()).collect::<Vec<_>>());
    }

    #[test]
    fn seed_auth_frames_verify_against_the_fixed_challenge() {
        let identity = Keypair::from_secret_bytes([1; 32]);
        let auth = primary_auth(&identity);
        assert_eq!(
            auth::verify_auth(&auth, &FIXED_NONCE, &FIXED_EXPORTER, &FIXED_SERVER_ID),
            Ok(())
        );
    }
}
