//! The bodies of the fuzz targets, shared by the libFuzzer binaries in
//! `fuzz_targets/` and by the stable-toolchain `replay` driver.
//!
//! Each target takes arbitrary bytes and must never panic. Beyond "no
//! panic", the targets assert the codec's properties: a decoded frame
//! re-encodes to exactly the bytes it was decoded from (the layout is
//! canonical) and decodes again to an equal frame.

use backbone_protocol::auth::{self, TLS_EXPORTER_LEN, sign_auth};
use backbone_protocol::bytes::{Blob, EncryptionKey, MessageId, Nonce, ServerId, Text};
use backbone_protocol::codec::{self, MAX_FRAME_LEN, decode_frame, frame_to_vec};
use backbone_protocol::frame::{
    Ack, Auth, AuthOk, CardResult, Challenge, Delete, Deliver, Done, ErrorFrame, Failed, FetchCard,
    Hello, Ping, Pong, PublishCard, Redirect, RegisterDevice, Send, SendAck, Stored,
};
use backbone_protocol::{
    Address, Decoded, DeviceCertificate, ErrorCode, Frame, IdentityCard, Keypair, Phase,
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
                    assert!(matches!(frame, Frame::Hello(_) | Frame::Auth(_)));
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
    let envelope = Blob(vec![0xde, 0xad, 0xbe, 0xef]);
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
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

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
