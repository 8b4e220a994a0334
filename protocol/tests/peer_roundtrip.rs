//! Property tests of the node-to-node frames: every [`PeerFrame`] variant
//! round-trips, every strict prefix asks for more bytes, and arbitrary or
//! corrupted input is a typed error, never a panic.

use backbone_protocol::bytes::{Blob, EncryptionKey, MessageId, Signature, Text};
use backbone_protocol::codec::{MAX_FRAME_LEN, decode_peer_frame, encode_peer_frame};
use backbone_protocol::fleet::{
    Forward, ForwardAck, HandoffAck, HandoffDone, Import, MailboxTransfer, PeerCardResult,
    PeerFetchCard, PeerFrame, PeerHello, PeerRefuse, TransferEnvelope,
};
use backbone_protocol::frame::{Failed, Stored};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard, PublicKey};
use proptest::array::uniform;
use proptest::collection::vec;
use proptest::prelude::*;

fn address() -> impl Strategy<Value = Address> {
    uniform::<_, 32>(any::<u8>()).prop_map(Address)
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    uniform::<_, 32>(any::<u8>()).prop_map(PublicKey)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    uniform::<_, 16>(any::<u8>()).prop_map(MessageId)
}

fn blob() -> impl Strategy<Value = Blob> {
    vec(any::<u8>(), 0..512).prop_map(Blob)
}

fn text() -> impl Strategy<Value = Text> {
    any::<String>().prop_map(Text)
}

fn signature() -> impl Strategy<Value = Signature> {
    uniform::<_, 64>(any::<u8>()).prop_map(Signature)
}

fn card() -> impl Strategy<Value = IdentityCard> {
    (
        public_key(),
        uniform::<_, 32>(any::<u8>()),
        any::<u64>(),
        signature(),
    )
        .prop_map(
            |(signing_key, key, created_at_ms, signature)| IdentityCard {
                signing_key,
                encryption_key: EncryptionKey(key),
                created_at_ms,
                signature,
            },
        )
}

fn certificate() -> impl Strategy<Value = DeviceCertificate> {
    (public_key(), public_key(), any::<u64>(), signature()).prop_map(
        |(identity_key, device_key, issued_at_ms, signature)| DeviceCertificate {
            identity_key,
            device_key,
            issued_at_ms,
            signature,
        },
    )
}

fn hello() -> impl Strategy<Value = PeerHello> {
    (text(), any::<u64>(), uniform::<_, 32>(any::<u8>())).prop_map(|(node, epoch, map_digest)| {
        PeerHello {
            node,
            epoch,
            map_digest,
        }
    })
}

fn transfer_envelope() -> impl Strategy<Value = TransferEnvelope> {
    (
        any::<u64>(),
        message_id(),
        proptest::option::of(address()),
        any::<u64>(),
        any::<u64>(),
        blob(),
    )
        .prop_map(
            |(seq, message_id, sender, stored_at_ms, expires_at_ms, envelope)| TransferEnvelope {
                seq,
                message_id,
                sender,
                stored_at_ms,
                expires_at_ms,
                envelope,
            },
        )
}

fn mailbox() -> impl Strategy<Value = MailboxTransfer> {
    (
        address(),
        any::<u64>(),
        vec(transfer_envelope(), 0..4),
        vec(
            (
                uniform::<_, 32>(any::<u8>()).prop_map(DeviceId),
                any::<u64>(),
            ),
            0..3,
        ),
        proptest::option::of(card()),
        vec(certificate(), 0..3),
    )
        .prop_map(
            |(address, head, envelopes, cursors, card, devices)| MailboxTransfer {
                address,
                head,
                envelopes,
                cursors,
                card,
                devices,
            },
        )
}

fn peer_frame() -> impl Strategy<Value = PeerFrame> {
    let stored = (address(), any::<u64>()).prop_map(|(address, seq)| Stored { address, seq });
    let failed = (address(), any::<u16>(), any::<Option<u32>>()).prop_map(
        |(address, code, retry_after_ms)| Failed {
            address,
            code,
            retry_after_ms,
        },
    );
    prop_oneof![
        hello().prop_map(PeerFrame::Hello),
        hello().prop_map(PeerFrame::Welcome),
        text().prop_map(|reason| PeerFrame::Refuse(PeerRefuse { reason })),
        (
            any::<u64>(),
            message_id(),
            proptest::option::of(address()),
            any::<u64>(),
            any::<u64>(),
            vec(address(), 0..4),
            blob()
        )
            .prop_map(
                |(
                    request_id,
                    message_id,
                    sender,
                    stored_at_ms,
                    expires_at_ms,
                    recipients,
                    envelope,
                )| {
                    PeerFrame::Forward(Forward {
                        request_id,
                        message_id,
                        sender,
                        stored_at_ms,
                        expires_at_ms,
                        recipients,
                        envelope,
                    })
                }
            ),
        (any::<u64>(), vec(stored, 0..4), vec(failed, 0..4)).prop_map(
            |(request_id, stored, failed)| PeerFrame::ForwardAck(ForwardAck {
                request_id,
                stored,
                failed,
            })
        ),
        (any::<u64>(), address()).prop_map(|(request_id, address)| PeerFrame::FetchCard(
            PeerFetchCard {
                request_id,
                address
            }
        )),
        (
            any::<u64>(),
            prop_oneof![card().prop_map(Ok), any::<u16>().prop_map(Err)]
        )
            .prop_map(
                |(request_id, result)| PeerFrame::CardResult(PeerCardResult { request_id, result })
            ),
        (any::<u64>(), any::<u64>(), vec(mailbox(), 0..3)).prop_map(
            |(request_id, epoch, mailboxes)| PeerFrame::Import(Import {
                request_id,
                epoch,
                mailboxes,
            })
        ),
        (
            any::<u64>(),
            any::<u64>(),
            vec((any::<u16>(), any::<u16>()), 0..4)
        )
            .prop_map(
                |(request_id, epoch, slots)| PeerFrame::HandoffDone(HandoffDone {
                    request_id,
                    epoch,
                    slots,
                })
            ),
        (
            any::<u64>(),
            prop_oneof![Just(Ok(())), (any::<u16>(), text()).prop_map(Err)]
        )
            .prop_map(|(request_id, result)| PeerFrame::HandoffAck(HandoffAck {
                request_id,
                result,
            })),
    ]
}

fn encode(frame: &PeerFrame) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_peer_frame(frame, &mut bytes).expect("generated frames are below the limit");
    bytes
}

proptest! {
    #[test]
    fn peer_frames_round_trip_and_prefixes_are_incomplete(frame in peer_frame()) {
        let bytes = encode(&frame);
        prop_assert_eq!(
            decode_peer_frame(&bytes, MAX_FRAME_LEN),
            Ok(Some((frame.clone(), bytes.len())))
        );
        for cut in 0..bytes.len() {
            prop_assert_eq!(decode_peer_frame(&bytes[..cut], MAX_FRAME_LEN), Ok(None));
        }
        // Two frames back to back decode one at a time.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        prop_assert_eq!(
            decode_peer_frame(&two, MAX_FRAME_LEN),
            Ok(Some((frame, bytes.len())))
        );
    }

    #[test]
    fn a_changed_byte_is_a_typed_error_or_a_canonical_frame(
        frame in peer_frame(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let bytes = encode(&frame);
        let mut changed = bytes.clone();
        let at = 4 + position.index(changed.len() - 4);
        changed[at] ^= flip;
        match decode_peer_frame(&changed, MAX_FRAME_LEN) {
            Ok(Some((decoded, used))) => {
                prop_assert_eq!(used, changed.len());
                prop_assert_eq!(encode(&decoded), changed);
            }
            Ok(None) => prop_assert!(false, "the length prefix was untouched"),
            Err(_) => {}
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        if let Ok(Some((_, used))) = decode_peer_frame(&bytes, MAX_FRAME_LEN) {
            prop_assert!(used <= bytes.len());
        }
    }
}

#[test]
fn an_oversized_length_is_refused_before_reading_the_body() {
    let mut bytes = (1024u32 * 1024).to_be_bytes().to_vec();
    bytes.push(backbone_protocol::PROTOCOL_VERSION);
    assert!(decode_peer_frame(&bytes, 4096).is_err());
}
