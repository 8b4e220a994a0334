//! Property tests of the frame codec.
//!
//! Every [`Frame`] variant is generated from strategies that cover the whole
//! value space of its fields (fixed byte arrays, optional fields, lists,
//! blobs up to 2 KiB, arbitrary Unicode text), and the tests check:
//!
//! - an encoded frame decodes to itself and consumes exactly its bytes;
//! - every strict prefix of an encoding is `Incomplete`, never an error;
//! - arbitrary bytes never panic the decoder, in either phase;
//! - a frame with one byte of its version or body changed either decodes
//!   (and then re-encodes to exactly the changed bytes, because the layout
//!   is canonical) or fails with a typed [`DecodeError`].
//!
//! The node-to-node [`PeerFrame`]s get the same checks from the same field
//! strategies, at the end of the file.

use backbone_protocol::bytes::{
    Blob, CapabilityHash, DeliveryCapability, EncryptionKey, MessageId, Nonce, PasswordVerifier,
    RelationshipId, ServerId, Signature, Text, TokenId, VerifierHash,
};
use backbone_protocol::bytes::{ContentHash, FileId, FileSecretHash};
use backbone_protocol::codec::{
    MAX_FRAME_LEN, decode_frame, decode_peer_frame, encode_peer_frame, frame_to_vec,
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
use backbone_protocol::frame::{Devices, ListDevices, UnregisterDevice};
use backbone_protocol::relationship::{
    Decision, InboundPolicy, Relationship, Role, SideChange, State,
};
use backbone_protocol::{
    Address, DecodeError, Decoded, DeviceCertificate, DeviceId, Frame, IdentityCard, Phase,
    PublicKey,
};
use proptest::array::uniform;
use proptest::collection::vec;
use proptest::prelude::*;

/// The frame limit used by the tests: the protocol's hard cap, so that no
/// generated frame is rejected for size and the codec paths are what is tested.
const LIMIT: usize = MAX_FRAME_LEN;

// ----- Strategies for the field types -------------------------------------

fn address() -> impl Strategy<Value = Address> {
    uniform::<_, 32>(any::<u8>()).prop_map(Address)
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    uniform::<_, 32>(any::<u8>()).prop_map(DeviceId)
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    uniform::<_, 32>(any::<u8>()).prop_map(PublicKey)
}

fn signature() -> impl Strategy<Value = Signature> {
    uniform::<_, 64>(any::<u8>()).prop_map(Signature)
}

fn nonce() -> impl Strategy<Value = Nonce> {
    uniform::<_, 32>(any::<u8>()).prop_map(Nonce)
}

fn server_id() -> impl Strategy<Value = ServerId> {
    uniform::<_, 32>(any::<u8>()).prop_map(ServerId)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    uniform::<_, 16>(any::<u8>()).prop_map(MessageId)
}

fn encryption_key() -> impl Strategy<Value = EncryptionKey> {
    uniform::<_, 32>(any::<u8>()).prop_map(EncryptionKey)
}

fn blob() -> impl Strategy<Value = Blob> {
    vec(any::<u8>(), 0..2048).prop_map(Blob::from)
}

fn text() -> impl Strategy<Value = Text> {
    // Any Unicode scalar values, so multi-byte UTF-8 sequences are covered.
    any::<String>().prop_map(Text)
}

/// Structurally valid but not necessarily correctly signed: the codec does
/// not check signatures, so random bytes exercise it fully.
fn device_certificate() -> impl Strategy<Value = DeviceCertificate> {
    (public_key(), public_key(), any::<u64>(), signature()).prop_map(
        |(identity_key, device_key, issued_at_ms, signature)| DeviceCertificate {
            identity_key,
            device_key,
            issued_at_ms,
            signature,
        },
    )
}

fn identity_card() -> impl Strategy<Value = IdentityCard> {
    (public_key(), encryption_key(), any::<u64>(), signature()).prop_map(
        |(signing_key, encryption_key, created_at_ms, signature)| IdentityCard {
            signing_key,
            encryption_key,
            created_at_ms,
            signature,
        },
    )
}

// ----- Strategies for each frame struct ------------------------------------

fn hello() -> impl Strategy<Value = Hello> {
    (any::<u8>(), any::<u8>()).prop_map(|(min_version, max_version)| Hello {
        min_version,
        max_version,
    })
}

fn challenge() -> impl Strategy<Value = Challenge> {
    (any::<u8>(), server_id(), nonce(), any::<u32>()).prop_map(
        |(version, server_id, nonce, expires_in_ms)| Challenge {
            version,
            server_id,
            nonce,
            expires_in_ms,
        },
    )
}

fn auth() -> impl Strategy<Value = Auth> {
    (
        public_key(),
        proptest::option::of(device_certificate()),
        signature(),
    )
        .prop_map(|(identity_key, device, signature)| Auth {
            identity_key,
            device,
            signature,
        })
}

fn auth_ok() -> impl Strategy<Value = AuthOk> {
    (address(), device_id(), any::<u64>()).prop_map(|(address, device_id, acked_seq)| AuthOk {
        address,
        device_id,
        acked_seq,
    })
}

fn register_device() -> impl Strategy<Value = RegisterDevice> {
    (any::<u64>(), device_certificate()).prop_map(|(request_id, certificate)| RegisterDevice {
        request_id,
        certificate,
    })
}

fn publish_card() -> impl Strategy<Value = PublishCard> {
    (any::<u64>(), identity_card()).prop_map(|(request_id, card)| PublishCard { request_id, card })
}

fn fetch_card() -> impl Strategy<Value = FetchCard> {
    (any::<u64>(), address()).prop_map(|(request_id, address)| FetchCard {
        request_id,
        address,
    })
}

fn card_result() -> impl Strategy<Value = CardResult> {
    (any::<u64>(), identity_card()).prop_map(|(request_id, card)| CardResult { request_id, card })
}

fn send() -> impl Strategy<Value = Send> {
    (any::<u64>(), any::<u32>(), vec(address(), 0..8), blob()).prop_map(
        |(request_id, ttl_secs, recipients, envelope)| Send {
            request_id,
            ttl_secs,
            recipients,
            envelope,
        },
    )
}

fn capability_hash() -> impl Strategy<Value = CapabilityHash> {
    uniform::<_, 32>(any::<u8>()).prop_map(CapabilityHash)
}

fn register_capability() -> impl Strategy<Value = RegisterCapability> {
    (any::<u64>(), capability_hash()).prop_map(|(request_id, capability_hash)| RegisterCapability {
        request_id,
        capability_hash,
    })
}

fn revoke_capability() -> impl Strategy<Value = RevokeCapability> {
    (any::<u64>(), capability_hash()).prop_map(|(request_id, capability_hash)| RevokeCapability {
        request_id,
        capability_hash,
    })
}

fn list_capabilities() -> impl Strategy<Value = ListCapabilities> {
    any::<u64>().prop_map(|request_id| ListCapabilities { request_id })
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (any::<u64>(), vec(capability_hash(), 0..8))
        .prop_map(|(request_id, hashes)| Capabilities { request_id, hashes })
}

fn anonymous() -> impl Strategy<Value = Anonymous> {
    Just(Anonymous {})
}

fn sealed_send() -> impl Strategy<Value = SealedSend> {
    (
        any::<u64>(),
        any::<u32>(),
        address(),
        uniform::<_, 32>(any::<u8>()).prop_map(DeliveryCapability),
        blob(),
    )
        .prop_map(
            |(request_id, ttl_secs, recipient, capability, envelope)| SealedSend {
                request_id,
                ttl_secs,
                recipient,
                capability,
                envelope,
            },
        )
}

fn token_id() -> impl Strategy<Value = TokenId> {
    uniform::<_, 32>(any::<u8>()).prop_map(TokenId)
}

fn verifier() -> impl Strategy<Value = Option<PasswordVerifier>> {
    proptest::option::of(uniform::<_, 32>(any::<u8>()).prop_map(PasswordVerifier))
}

fn create_token() -> impl Strategy<Value = CreateToken> {
    (any::<u64>(), any::<u32>(), blob(), verifier()).prop_map(
        |(request_id, ttl_secs, content, password_verifier)| CreateToken {
            request_id,
            ttl_secs,
            content,
            password_verifier,
        },
    )
}

fn token_created() -> impl Strategy<Value = TokenCreated> {
    (any::<u64>(), token_id(), any::<u64>()).prop_map(|(request_id, token_id, expires_at_ms)| {
        TokenCreated {
            request_id,
            token_id,
            expires_at_ms,
        }
    })
}

fn relationship() -> impl Strategy<Value = Relationship> {
    (
        uniform::<_, 16>(any::<u8>()).prop_map(RelationshipId),
        address(),
        prop_oneof![Just(Role::Requester), Just(Role::Owner)],
        prop_oneof![
            Just(State::Pending),
            Just(State::Active),
            Just(State::Rejected),
            Just(State::Terminated)
        ],
        any::<u64>(),
    )
        .prop_map(|(id, peer, role, state, changed_at_ms)| Relationship {
            id,
            peer,
            role,
            state,
            changed_at_ms,
        })
}

fn policy() -> impl Strategy<Value = InboundPolicy> {
    prop_oneof![
        Just(InboundPolicy::Anyone),
        Just(InboundPolicy::RelationshipsOnly)
    ]
}

fn decision() -> impl Strategy<Value = Decision> {
    prop_oneof![
        Just(Decision::Accept),
        Just(Decision::Reject),
        Just(Decision::Terminate)
    ]
}

fn set_inbound_policy() -> impl Strategy<Value = SetInboundPolicy> {
    (any::<u64>(), policy())
        .prop_map(|(request_id, policy)| SetInboundPolicy { request_id, policy })
}

fn request_relationship() -> impl Strategy<Value = RequestRelationship> {
    (
        any::<u64>(),
        address(),
        uniform::<_, 32>(any::<u8>()).prop_map(DeliveryCapability),
        blob(),
    )
        .prop_map(
            |(request_id, owner, capability, intro)| RequestRelationship {
                request_id,
                owner,
                capability,
                intro,
            },
        )
}

fn decide_relationship() -> impl Strategy<Value = DecideRelationship> {
    (any::<u64>(), address(), decision()).prop_map(|(request_id, peer, decision)| {
        DecideRelationship {
            request_id,
            peer,
            decision,
        }
    })
}

fn get_token() -> impl Strategy<Value = GetToken> {
    (any::<u64>(), token_id(), verifier()).prop_map(|(request_id, token_id, password_verifier)| {
        GetToken {
            request_id,
            token_id,
            password_verifier,
        }
    })
}

fn token_content() -> impl Strategy<Value = TokenContent> {
    (any::<u64>(), blob(), any::<u64>()).prop_map(|(request_id, content, expires_at_ms)| {
        TokenContent {
            request_id,
            content,
            expires_at_ms,
        }
    })
}

fn delete_token() -> impl Strategy<Value = DeleteToken> {
    (any::<u64>(), token_id()).prop_map(|(request_id, token_id)| DeleteToken {
        request_id,
        token_id,
    })
}

fn relationship_changed() -> impl Strategy<Value = RelationshipChanged> {
    (any::<u64>(), relationship()).prop_map(|(request_id, relationship)| RelationshipChanged {
        request_id,
        relationship,
    })
}

fn list_relationships() -> impl Strategy<Value = ListRelationships> {
    any::<u64>().prop_map(|request_id| ListRelationships { request_id })
}

fn relationships() -> impl Strategy<Value = Relationships> {
    (any::<u64>(), policy(), vec(relationship(), 0..4)).prop_map(
        |(request_id, policy, relationships)| Relationships {
            request_id,
            policy,
            relationships,
        },
    )
}

fn delete_identity() -> impl Strategy<Value = DeleteIdentity> {
    any::<u64>().prop_map(|request_id| DeleteIdentity { request_id })
}

fn deletion_scheduled() -> impl Strategy<Value = DeletionScheduled> {
    (any::<u64>(), any::<u64>()).prop_map(|(request_id, purge_at_ms)| DeletionScheduled {
        request_id,
        purge_at_ms,
    })
}

fn cancel_deletion() -> impl Strategy<Value = CancelDeletion> {
    any::<u64>().prop_map(|request_id| CancelDeletion { request_id })
}

fn unregister_device() -> impl Strategy<Value = UnregisterDevice> {
    (any::<u64>(), device_id()).prop_map(|(request_id, device_id)| UnregisterDevice {
        request_id,
        device_id,
    })
}

fn list_devices() -> impl Strategy<Value = ListDevices> {
    any::<u64>().prop_map(|request_id| ListDevices { request_id })
}

fn devices() -> impl Strategy<Value = Devices> {
    (any::<u64>(), vec(device_certificate(), 0..4)).prop_map(|(request_id, devices)| Devices {
        request_id,
        devices,
    })
}

fn side_change() -> impl Strategy<Value = SideChange> {
    prop_oneof![
        (capability_hash(), blob()).prop_map(|(capability_hash, intro)| SideChange::Request {
            capability_hash,
            intro
        }),
        uniform::<_, 16>(any::<u8>()).prop_map(|id| SideChange::Requested {
            id: RelationshipId(id)
        }),
        (uniform::<_, 16>(any::<u8>()), decision(), any::<bool>()).prop_map(
            |(id, decision, by_peer)| SideChange::Decide {
                id: RelationshipId(id),
                decision,
                by_peer
            }
        ),
        uniform::<_, 16>(any::<u8>()).prop_map(|id| SideChange::PeerDeleted {
            id: RelationshipId(id)
        }),
    ]
}

fn stored() -> impl Strategy<Value = Stored> {
    (address(), any::<u64>()).prop_map(|(address, seq)| Stored { address, seq })
}

fn failed() -> impl Strategy<Value = Failed> {
    (address(), any::<u16>(), any::<Option<u32>>()).prop_map(|(address, code, retry_after_ms)| {
        Failed {
            address,
            code,
            retry_after_ms,
        }
    })
}

fn send_ack() -> impl Strategy<Value = SendAck> {
    (
        any::<u64>(),
        message_id(),
        vec(stored(), 0..8),
        vec(failed(), 0..8),
    )
        .prop_map(|(request_id, message_id, stored, failed)| SendAck {
            request_id,
            message_id,
            stored,
            failed,
        })
}

fn deliver() -> impl Strategy<Value = Deliver> {
    (
        any::<u64>(),
        message_id(),
        proptest::option::of(address()),
        any::<u64>(),
        any::<u64>(),
        blob(),
    )
        .prop_map(
            |(seq, message_id, sender, stored_at_ms, expires_at_ms, envelope)| Deliver {
                seq,
                message_id,
                sender,
                stored_at_ms,
                expires_at_ms,
                envelope,
            },
        )
}

fn ack() -> impl Strategy<Value = Ack> {
    any::<u64>().prop_map(|up_to_seq| Ack { up_to_seq })
}

fn delete() -> impl Strategy<Value = Delete> {
    (any::<u64>(), vec(any::<u64>(), 0..32))
        .prop_map(|(request_id, seqs)| Delete { request_id, seqs })
}

fn done() -> impl Strategy<Value = Done> {
    any::<u64>().prop_map(|request_id| Done { request_id })
}

fn error_frame() -> impl Strategy<Value = ErrorFrame> {
    (any::<u64>(), any::<u16>(), any::<Option<u32>>(), text()).prop_map(
        |(request_id, code, retry_after_ms, message)| ErrorFrame {
            request_id,
            code,
            retry_after_ms,
            message,
        },
    )
}

fn redirect() -> impl Strategy<Value = Redirect> {
    (any::<u64>(), text()).prop_map(|(request_id, node)| Redirect { request_id, node })
}

fn ping() -> impl Strategy<Value = Ping> {
    any::<u64>().prop_map(|nonce| Ping { nonce })
}

fn pong() -> impl Strategy<Value = Pong> {
    any::<u64>().prop_map(|nonce| Pong { nonce })
}

/// Any frame, each variant equally likely.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        challenge().prop_map(Frame::Challenge),
        auth().prop_map(Frame::Auth),
        auth_ok().prop_map(Frame::AuthOk),
        register_device().prop_map(Frame::RegisterDevice),
        publish_card().prop_map(Frame::PublishCard),
        fetch_card().prop_map(Frame::FetchCard),
        card_result().prop_map(Frame::CardResult),
        send().prop_map(Frame::Send),
        send_ack().prop_map(Frame::SendAck),
        deliver().prop_map(Frame::Deliver),
        ack().prop_map(Frame::Ack),
        delete().prop_map(Frame::Delete),
        done().prop_map(Frame::Done),
        error_frame().prop_map(Frame::Error),
        redirect().prop_map(Frame::Redirect),
        ping().prop_map(Frame::Ping),
        pong().prop_map(Frame::Pong),
        register_capability().prop_map(Frame::RegisterCapability),
        revoke_capability().prop_map(Frame::RevokeCapability),
        list_capabilities().prop_map(Frame::ListCapabilities),
        capabilities().prop_map(Frame::Capabilities),
        anonymous().prop_map(Frame::Anonymous),
        sealed_send().prop_map(Frame::SealedSend),
        create_token().prop_map(Frame::CreateToken),
        token_created().prop_map(Frame::TokenCreated),
        get_token().prop_map(Frame::GetToken),
        token_content().prop_map(Frame::TokenContent),
        delete_token().prop_map(Frame::DeleteToken),
        set_inbound_policy().prop_map(Frame::SetInboundPolicy),
        request_relationship().prop_map(Frame::RequestRelationship),
        decide_relationship().prop_map(Frame::DecideRelationship),
        relationship_changed().prop_map(Frame::RelationshipChanged),
        list_relationships().prop_map(Frame::ListRelationships),
        relationships().prop_map(Frame::Relationships),
        delete_identity().prop_map(Frame::DeleteIdentity),
        deletion_scheduled().prop_map(Frame::DeletionScheduled),
        cancel_deletion().prop_map(Frame::CancelDeletion),
        unregister_device().prop_map(Frame::UnregisterDevice),
        list_devices().prop_map(Frame::ListDevices),
        devices().prop_map(Frame::Devices),
    ]
}

// ----- Checks -----------------------------------------------------------------

/// Encodes `frame` and checks that it decodes to itself, using all its bytes.
fn check_round_trip(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = frame_to_vec(frame).map_err(|error| TestCaseError::fail(error.to_string()))?;
    let tag_bytes = frame.tag().to_le_bytes();
    prop_assert_eq!(&bytes[5..9], &tag_bytes[..], "the body starts with the tag");
    prop_assert_eq!(
        decode_frame(&bytes, LIMIT, Phase::Any),
        Ok(Decoded::Frame {
            frame: frame.clone(),
            consumed: bytes.len()
        })
    );
    Ok(())
}

/// A strategy for a valid frame's encoding, for the tests that corrupt it.
fn encoded_frame() -> impl Strategy<Value = Vec<u8>> {
    frame().prop_map(|frame| frame_to_vec(&frame).expect("generated frames are below the limit"))
}

/// Round trips, one test per variant so a failure names the variant at once.
macro_rules! round_trip_tests {
    ($($test:ident: $strategy:expr => $variant:path;)*) => {
        proptest! {
            $(
                #[test]
                fn $test(value in $strategy) {
                    check_round_trip(&$variant(value))?;
                }
            )*
        }
    };
}

round_trip_tests! {
    hello_round_trips: hello() => Frame::Hello;
    challenge_round_trips: challenge() => Frame::Challenge;
    auth_round_trips: auth() => Frame::Auth;
    auth_ok_round_trips: auth_ok() => Frame::AuthOk;
    register_device_round_trips: register_device() => Frame::RegisterDevice;
    publish_card_round_trips: publish_card() => Frame::PublishCard;
    fetch_card_round_trips: fetch_card() => Frame::FetchCard;
    card_result_round_trips: card_result() => Frame::CardResult;
    send_round_trips: send() => Frame::Send;
    send_ack_round_trips: send_ack() => Frame::SendAck;
    deliver_round_trips: deliver() => Frame::Deliver;
    ack_round_trips: ack() => Frame::Ack;
    delete_round_trips: delete() => Frame::Delete;
    done_round_trips: done() => Frame::Done;
    error_round_trips: error_frame() => Frame::Error;
    redirect_round_trips: redirect() => Frame::Redirect;
    ping_round_trips: ping() => Frame::Ping;
    pong_round_trips: pong() => Frame::Pong;
    register_capability_round_trips: register_capability() => Frame::RegisterCapability;
    revoke_capability_round_trips: revoke_capability() => Frame::RevokeCapability;
    list_capabilities_round_trips: list_capabilities() => Frame::ListCapabilities;
    capabilities_round_trips: capabilities() => Frame::Capabilities;
    anonymous_round_trips: anonymous() => Frame::Anonymous;
    sealed_send_round_trips: sealed_send() => Frame::SealedSend;
    create_token_round_trips: create_token() => Frame::CreateToken;
    token_created_round_trips: token_created() => Frame::TokenCreated;
    get_token_round_trips: get_token() => Frame::GetToken;
    token_content_round_trips: token_content() => Frame::TokenContent;
    delete_token_round_trips: delete_token() => Frame::DeleteToken;
    set_inbound_policy_round_trips: set_inbound_policy() => Frame::SetInboundPolicy;
    request_relationship_round_trips: request_relationship() => Frame::RequestRelationship;
    decide_relationship_round_trips: decide_relationship() => Frame::DecideRelationship;
    relationship_changed_round_trips: relationship_changed() => Frame::RelationshipChanged;
    list_relationships_round_trips: list_relationships() => Frame::ListRelationships;
    relationships_round_trips: relationships() => Frame::Relationships;
    delete_identity_round_trips: delete_identity() => Frame::DeleteIdentity;
    deletion_scheduled_round_trips: deletion_scheduled() => Frame::DeletionScheduled;
    cancel_deletion_round_trips: cancel_deletion() => Frame::CancelDeletion;
    unregister_device_round_trips: unregister_device() => Frame::UnregisterDevice;
    list_devices_round_trips: list_devices() => Frame::ListDevices;
    devices_round_trips: devices() => Frame::Devices;
}

proptest! {
    /// Arbitrary bytes are an error, `Incomplete` or (rarely) a frame, and
    /// never a panic, whichever phase the decoder is in.
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096)) {
        for phase in [Phase::Any, Phase::PreAuth] {
            if let Ok(Decoded::Frame { consumed, .. }) = decode_frame(&bytes, LIMIT, phase) {
                prop_assert!(consumed <= bytes.len());
            }
        }
    }

    /// Random bodies behind a well-formed header reach the body decoder, which
    /// random bytes alone rarely do because the length prefix is usually too large.
    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(
        tag in 0u32..20,
        rest in vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = Vec::with_capacity(9 + rest.len());
        bytes.extend_from_slice(&((1 + 4 + rest.len()) as u32).to_be_bytes());
        bytes.push(backbone_protocol::PROTOCOL_VERSION);
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&rest);
        for phase in [Phase::Any, Phase::PreAuth] {
            match decode_frame(&bytes, LIMIT, phase) {
                Ok(Decoded::Frame { consumed, .. }) => prop_assert_eq!(consumed, bytes.len()),
                Ok(Decoded::Incomplete { .. }) => {
                    prop_assert!(false, "a complete frame must not be Incomplete");
                }
                Err(_) => {}
            }
        }
    }

    /// Every strict prefix of a valid encoding asks for more bytes.
    #[test]
    fn every_strict_prefix_is_incomplete(bytes in encoded_frame()) {
        for cut in 0..bytes.len() {
            match decode_frame(&bytes[..cut], LIMIT, Phase::Any) {
                Ok(Decoded::Incomplete { needed }) => {
                    prop_assert!(needed > 0 && cut + needed <= bytes.len());
                }
                other => prop_assert!(false, "prefix of {} bytes gave {:?}", cut, other),
            }
        }
    }

    /// Changing one byte after the length prefix gives a typed error or a frame
    /// whose encoding is exactly the changed bytes.
    #[test]
    fn a_changed_byte_is_a_typed_error_or_a_canonical_frame(
        bytes in encoded_frame(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut changed = bytes.clone();
        // Position 4 is the version byte; the body follows it.
        let at = 4 + position.index(changed.len() - 4);
        changed[at] ^= flip;
        for phase in [Phase::Any, Phase::PreAuth] {
            match decode_frame(&changed, LIMIT, phase) {
                Ok(Decoded::Frame { frame, consumed }) => {
                    prop_assert_eq!(consumed, changed.len());
                    let again = frame_to_vec(&frame)
                        .map_err(|error| TestCaseError::fail(error.to_string()))?;
                    prop_assert_eq!(&again, &changed, "decoded frames re-encode to their bytes");
                }
                Ok(Decoded::Incomplete { .. }) => {
                    prop_assert!(false, "the length prefix was untouched, so the frame is complete");
                }
                Err(error) => {
                    // Every typed error maps to a stable wire code.
                    let _ = error.code();
                    if at == 4 {
                        prop_assert_eq!(
                            error,
                            DecodeError::UnsupportedVersion { version: bytes[4] ^ flip }
                        );
                    }
                }
            }
        }
    }

    /// Two frames back to back decode one after the other.
    #[test]
    fn concatenated_frames_decode_in_order(first in frame(), second in frame()) {
        let mut bytes = frame_to_vec(&first).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let first_len = bytes.len();
        bytes.extend(frame_to_vec(&second).map_err(|e| TestCaseError::fail(e.to_string()))?);
        prop_assert_eq!(
            decode_frame(&bytes, LIMIT, Phase::Any),
            Ok(Decoded::Frame { frame: first, consumed: first_len })
        );
        prop_assert_eq!(
            decode_frame(&bytes[first_len..], LIMIT, Phase::Any),
            Ok(Decoded::Frame { frame: second, consumed: bytes.len() - first_len })
        );
    }

    /// Before authentication exactly Hello, Auth and Anonymous pass; every
    /// other valid frame is rejected as `NotAuthenticated` without its body
    /// being decoded.
    #[test]
    fn pre_auth_phase_admits_only_hello_auth_and_anonymous(frame in frame()) {
        let bytes = frame_to_vec(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = decode_frame(&bytes, LIMIT, Phase::PreAuth);
        match frame {
            Frame::Hello(_) | Frame::Auth(_) | Frame::Anonymous(_) => prop_assert_eq!(
                decoded,
                Ok(Decoded::Frame { frame, consumed: bytes.len() })
            ),
            other => prop_assert_eq!(
                decoded,
                Err(DecodeError::NotAuthenticated { tag: other.tag() })
            ),
        }
    }
}

// ----- Node-to-node frames ---------------------------------------------------

fn peer_hello() -> impl Strategy<Value = PeerHello> {
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

fn transfer_token() -> impl Strategy<Value = TransferToken> {
    (
        token_id(),
        any::<u64>(),
        any::<u64>(),
        blob(),
        proptest::option::of(uniform::<_, 32>(any::<u8>()).prop_map(VerifierHash)),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                id,
                created_at_ms,
                expires_at_ms,
                content,
                verifier_hash,
                failed_attempts,
                locked,
            )| {
                TransferToken {
                    id,
                    created_at_ms,
                    expires_at_ms,
                    content,
                    verifier_hash,
                    failed_attempts,
                    locked,
                }
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
        proptest::option::of(identity_card()),
        vec(device_certificate(), 0..3),
        vec(capability_hash(), 0..3),
        vec(transfer_token(), 0..3),
        (
            proptest::option::of(policy()),
            vec(relationship(), 0..3),
            proptest::option::of(deletion()),
        ),
    )
        .prop_map(
            |(
                address,
                head,
                envelopes,
                cursors,
                card,
                devices,
                capabilities,
                tokens,
                (policy, relationships, deletion),
            )| MailboxTransfer {
                address,
                head,
                envelopes,
                cursors,
                card,
                devices,
                capabilities,
                tokens,
                policy,
                relationships,
                deletion,
            },
        )
}

fn deletion() -> impl Strategy<Value = Deletion> {
    prop_oneof![
        any::<u64>().prop_map(|purge_at_ms| Deletion::Scheduled { purge_at_ms }),
        (
            any::<u64>(),
            vec(
                (address(), uniform::<_, 16>(any::<u8>())).prop_map(|(peer, id)| PeerToTell {
                    peer,
                    relationship: RelationshipId(id),
                }),
                0..3
            )
        )
            .prop_map(|(purge_at_ms, to_tell)| Deletion::Purging {
                purge_at_ms,
                to_tell
            }),
        Just(Deletion::Deleted),
    ]
}

fn peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        peer_hello().prop_map(PeerFrame::Hello),
        peer_hello().prop_map(PeerFrame::Welcome),
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
        (any::<u64>(), vec(stored(), 0..4), vec(failed(), 0..4)).prop_map(
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
            prop_oneof![identity_card().prop_map(Ok), any::<u16>().prop_map(Err)]
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
        (
            any::<u64>(),
            message_id(),
            any::<u64>(),
            any::<u64>(),
            address(),
            capability_hash(),
            blob()
        )
            .prop_map(
                |(
                    request_id,
                    message_id,
                    stored_at_ms,
                    expires_at_ms,
                    recipient,
                    capability_hash,
                    envelope,
                )| {
                    PeerFrame::SealedForward(SealedForward {
                        request_id,
                        message_id,
                        stored_at_ms,
                        expires_at_ms,
                        recipient,
                        capability_hash,
                        envelope,
                    })
                }
            ),
        (any::<u64>(), token_id(), verifier()).prop_map(
            |(request_id, token_id, password_verifier)| PeerFrame::GetToken(PeerGetToken {
                request_id,
                token_id,
                password_verifier,
            })
        ),
        (any::<u64>(), address(), address(), side_change()).prop_map(
            |(request_id, address, peer, change)| PeerFrame::Consent(PeerConsent {
                request_id,
                address,
                peer,
                change,
            })
        ),
        (
            any::<u64>(),
            prop_oneof![
                (blob(), any::<u64>()).prop_map(Ok),
                any::<u16>().prop_map(Err)
            ]
        )
            .prop_map(
                |(request_id, result)| PeerFrame::TokenResult(PeerTokenResult {
                    request_id,
                    result,
                })
            ),
        (
            any::<u64>(),
            prop_oneof![
                relationship().prop_map(Ok),
                (any::<u16>(), text()).prop_map(Err)
            ]
        )
            .prop_map(
                |(request_id, result)| PeerFrame::ConsentResult(PeerConsentResult {
                    request_id,
                    result
                })
            ),
        (
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                blob(),
                any::<bool>()
            ),
            (
                any::<[u8; 32]>(),
                address(),
                any::<u64>(),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<bool>()
            )
        )
            .prop_map(|((request_id, epoch, offset, bytes, last), file)| {
                let (id, owner, size, content_hash, secret_hash, expires_at_ms, complete) = file;
                PeerFrame::ImportFile(ImportFile {
                    request_id,
                    epoch,
                    file: TransferFile {
                        id: FileId(id),
                        owner,
                        size,
                        content_hash: ContentHash(content_hash),
                        secret_hash: FileSecretHash(secret_hash),
                        expires_at_ms,
                        complete,
                    },
                    offset,
                    bytes,
                    last,
                })
            }),
    ]
}

fn encode_peer(frame: &PeerFrame) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_peer_frame(frame, &mut bytes).expect("generated frames are below the limit");
    bytes
}

proptest! {
    #[test]
    fn peer_frames_round_trip_and_prefixes_are_incomplete(frame in peer_frame()) {
        let bytes = encode_peer(&frame);
        prop_assert_eq!(
            decode_peer_frame(&bytes, MAX_FRAME_LEN),
            Ok(Some((frame.clone(), bytes.len())))
        );
        // The tag on the wire is `tag()`, and `TAG_NAMES` names the variant.
        prop_assert_eq!(u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]), frame.tag());
        let variant = format!("{}(", PeerFrame::TAG_NAMES[frame.tag() as usize]);
        let debug = format!("{frame:?}");
        prop_assert!(debug.starts_with(&variant), "{} is not a {}", debug, variant);
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
    fn a_changed_peer_frame_byte_is_a_typed_error_or_a_canonical_frame(
        frame in peer_frame(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let bytes = encode_peer(&frame);
        let mut changed = bytes.clone();
        let at = 4 + position.index(changed.len() - 4);
        changed[at] ^= flip;
        match decode_peer_frame(&changed, MAX_FRAME_LEN) {
            Ok(Some((decoded, used))) => {
                prop_assert_eq!(used, changed.len());
                prop_assert_eq!(encode_peer(&decoded), changed);
            }
            Ok(None) => prop_assert!(false, "the length prefix was untouched"),
            Err(_) => {}
        }
    }

    #[test]
    fn random_bytes_never_panic_the_peer_decoder(bytes in vec(any::<u8>(), 0..2048)) {
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
