//! Authentication against a real broker: success and every failure mode,
//! devices and their revocation, and the requests only the identity key
//! may make.

mod support;

use std::time::Duration;

use backbone_client::ClientError;
use backbone_client::transport::{Credentials, RawConnection};
use backbone_protocol::auth::sign_auth;
use backbone_protocol::bytes::Signature;
use backbone_protocol::frame::{Auth, Challenge, Hello, Ping};
use backbone_protocol::relationship::InboundPolicy;
use backbone_protocol::{DeviceCertificate, ErrorCode, Frame, Keypair, PROTOCOL_VERSION};
use support::TestBroker;

fn hello() -> Frame {
    Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    })
}

/// Sends Hello, takes the challenge and signs a valid response (not sent).
async fn challenge_and_sign(
    connection: &mut RawConnection,
    identity: &Keypair,
) -> (Challenge, Auth) {
    connection.send(&hello()).await.expect("sends");
    let Frame::Challenge(challenge) = connection.recv().await.expect("challenge") else {
        panic!("no challenge")
    };
    let exporter = connection.tls_exporter().expect("exporter");
    let auth = sign_auth(
        identity.public(),
        identity,
        None,
        &challenge.nonce,
        &exporter,
        &challenge.server_id,
    );
    (challenge, auth)
}

/// The connection was closed by the broker with `code`.
async fn expect_closed_with(connection: &mut RawConnection, code: ErrorCode) {
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match connection.recv().await {
                Ok(_) => continue,
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("broker closes the connection in time");
    assert_eq!(error.code(), Some(code), "{error}");
}

#[tokio::test]
async fn a_primary_device_authenticates_and_learns_its_address() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let ok = connection
        .authenticate(&Credentials::primary(&identity))
        .await
        .expect("authenticates");
    assert_eq!(ok.address, identity.address());
    assert_eq!(ok.acked_seq, 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_bad_signature_is_refused() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let (_, mut auth) = challenge_and_sign(&mut connection, &identity).await;
    auth.signature = Signature([7; 64]);
    connection.send(&Frame::Auth(auth)).await.expect("sends");
    expect_closed_with(&mut connection, ErrorCode::AuthFailed).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_response_replayed_on_another_connection_is_refused() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let mut first = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let (_, auth) = challenge_and_sign(&mut first, &identity).await;
    first.send(&Frame::Auth(auth.clone())).await.expect("sends");
    assert!(matches!(
        first.recv().await.expect("auth ok"),
        Frame::AuthOk(_)
    ));

    // An eavesdropper replays the same response on its own connection.
    let mut second = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    second.send(&hello()).await.expect("sends");
    assert!(matches!(
        second.recv().await.expect("challenge"),
        Frame::Challenge(_)
    ));
    second
        .send(&Frame::Auth(auth.clone()))
        .await
        .expect("sends");
    expect_closed_with(&mut second, ErrorCode::AuthFailed).await;

    // Reusing it on the first connection is refused too: challenges are single use.
    first.send(&Frame::Auth(auth)).await.expect("sends");
    match first.recv().await.expect("error frame") {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::ChallengeReused as u16),
        other => panic!("expected an error, got {other:?}"),
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn an_expired_challenge_is_refused() {
    let broker =
        TestBroker::start_with(|config| config.auth.challenge_ttl = Duration::from_millis(200))
            .await;
    let identity = Keypair::generate();
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let (challenge, auth) = challenge_and_sign(&mut connection, &identity).await;
    assert_eq!(challenge.expires_in_ms, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    connection.send(&Frame::Auth(auth)).await.expect("sends");
    expect_closed_with(&mut connection, ErrorCode::ChallengeExpired).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_frame_before_auth_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    connection
        .send(&Frame::Ping(Ping { nonce: 1 }))
        .await
        .expect("sends");
    expect_closed_with(&mut connection, ErrorCode::NotAuthenticated).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_auth_deadline() {
    let broker =
        TestBroker::start_with(|config| config.auth.deadline = Duration::from_millis(300)).await;
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    // Open the stream (QUIC opens it lazily on first data) but never authenticate.
    connection.send_raw(&[]).await.expect("sends");
    expect_closed_with(&mut connection, ErrorCode::AuthTimeout).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_slowloris_client_that_never_opens_a_stream_is_closed_too() {
    let broker =
        TestBroker::start_with(|config| config.auth.deadline = Duration::from_millis(300)).await;
    let connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let reason = tokio::time::timeout(Duration::from_secs(5), connection.connection().closed())
        .await
        .expect("closed in time");
    let error = ClientError::Closed {
        code: match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                close.error_code.into_inner() as u16
            }
            other => panic!("unexpected close {other}"),
        },
        reason: String::new(),
    };
    assert_eq!(error.code(), Some(ErrorCode::AuthTimeout));
    broker.shutdown().await;
}

#[tokio::test]
async fn devices_must_be_registered_and_certified_by_their_identity() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let device = Keypair::generate();
    let certificate = DeviceCertificate::issue(&identity, device.public(), 1);
    let as_device = Credentials {
        identity_key: identity.public(),
        device: device.clone(),
        certificate: Some(certificate),
    };

    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let error = connection
        .authenticate(&as_device)
        .await
        .expect_err("unregistered device is refused");
    assert_eq!(
        error.code(),
        Some(ErrorCode::DeviceNotRegistered),
        "{error}"
    );

    // A certificate issued by another identity is refused outright.
    let mallory = Keypair::generate();
    let forged = Credentials {
        identity_key: identity.public(),
        device: device.clone(),
        certificate: Some(DeviceCertificate::issue(&mallory, device.public(), 1)),
    };
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let error = connection
        .authenticate(&forged)
        .await
        .expect_err("forged certificate is refused");
    assert_eq!(error.code(), Some(ErrorCode::InvalidCertificate), "{error}");

    // The identity registers the device; now it authenticates with its own key.
    let owner = backbone_client::Client::connect(backbone_client::ClientOptions {
        credentials: Credentials::primary(&identity),
        ..support::Identity {
            signing: identity.clone(),
            encryption: backbone_client::envelope::EncryptionKeypair::generate(),
        }
        .options(&broker)
    })
    .await
    .expect("owner connects");
    owner.register_device(certificate).await.expect("registers");
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let ok = connection
        .authenticate(&as_device)
        .await
        .expect("registered device authenticates");
    assert_eq!(ok.address, identity.address());
    assert_eq!(ok.device_id, device.public().device_id());
    assert_ne!(ok.device_id, identity.public().device_id());
    broker.shutdown().await;
}

#[tokio::test]
async fn a_wrong_certificate_or_fingerprint_is_a_certificate_mismatch() {
    let broker = TestBroker::start().await;
    let mut config = broker.connect_config();
    config.trust = backbone_client::Trust::Fingerprint("00".repeat(32));
    let error = RawConnection::connect(&config)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(error, ClientError::CertificateMismatch(_)),
        "{error}"
    );

    config.trust = backbone_client::Trust::Fingerprint(broker.broker().fingerprint.clone());
    let identity = Keypair::generate();
    let mut connection = RawConnection::connect(&config)
        .await
        .expect("pinned fingerprint connects");
    connection
        .authenticate(&Credentials::primary(&identity))
        .await
        .expect("authenticates");
    broker.shutdown().await;
}

/// A second device of `identity`: its certificate and its credentials.
fn device_of(identity: &Keypair, device: &Keypair) -> (DeviceCertificate, Credentials) {
    let certificate = DeviceCertificate::issue(identity, device.public(), 1);
    let credentials = Credentials {
        identity_key: identity.public(),
        device: device.clone(),
        certificate: Some(certificate),
    };
    (certificate, credentials)
}

/// A persistent client of `owner`'s certified device: no identity key,
/// only the device key and the identity's encryption key.
async fn connect_device(
    broker: &TestBroker,
    owner: &support::Identity,
    credentials: Credentials,
) -> backbone_client::Client {
    let mut options = owner.options(broker);
    options.credentials = credentials;
    options.identity = None;
    backbone_client::Client::connect(options)
        .await
        .expect("the device connects")
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.expect_err("refused").code()
}

/// A lost or stolen device, revoked by the identity key: its open
/// connection is closed at once, its key is refused from then on with a
/// typed error, and its cursor is gone; the identity's own session goes on.
#[tokio::test]
async fn an_unregistered_device_is_disconnected_and_refused_from_then_on() {
    let broker = TestBroker::start().await;
    let (owner, sender) = (support::Identity::new(), support::Identity::new());
    let owner_client = owner.connect(&broker).await;
    let sender_client = sender.connect(&broker).await;
    let phone = Keypair::generate();
    let (certificate, as_phone) = device_of(&owner.signing, &phone);
    owner_client
        .register_device(certificate)
        .await
        .expect("registers the phone");

    // The phone is connected and has acknowledged an envelope.
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    connection
        .authenticate(&as_phone)
        .await
        .expect("authenticates");
    let ack = sender_client
        .send(
            &[owner.address()],
            b"before the theft",
            Duration::from_secs(3600),
        )
        .await
        .expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let seq = loop {
        if let Frame::Deliver(deliver) = connection.recv().await.expect("a push") {
            break deliver.seq;
        }
    };
    connection
        .send(&Frame::Ack(backbone_protocol::frame::Ack {
            up_to_seq: seq,
        }))
        .await
        .expect("acks");
    // Once its cursor is stored, a second connection of the phone reads it
    // (and stays open too).
    let mut second = None;
    support::eventually(
        "the phone's cursor is stored",
        Duration::from_secs(5),
        async || {
            let mut another = RawConnection::connect(&broker.connect_config())
                .await
                .expect("connects");
            let ok = another
                .authenticate(&as_phone)
                .await
                .expect("authenticates");
            second = Some(another);
            ok.acked_seq == seq
        },
    )
    .await;
    let mut second = second.expect("a second connection");

    owner_client
        .unregister_device(&phone.public().device_id())
        .await
        .expect("unregisters the phone");
    // Its open connections were closed by then, with the typed code.
    expect_closed_with(&mut connection, ErrorCode::DeviceNotRegistered).await;
    expect_closed_with(&mut second, ErrorCode::DeviceNotRegistered).await;
    // A new connection of it is refused.
    let mut again = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let error = again
        .authenticate(&as_phone)
        .await
        .expect_err("the unregistered phone is refused");
    assert_eq!(
        error.code(),
        Some(ErrorCode::DeviceNotRegistered),
        "{error}"
    );
    // The identity key's session was not touched, and lists no device.
    assert_eq!(owner_client.list_devices().await.expect("lists"), vec![]);

    // Registered again, the same key starts over: its old cursor is gone.
    owner_client
        .register_device(certificate)
        .await
        .expect("registers the phone again");
    let mut connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let ok = connection
        .authenticate(&as_phone)
        .await
        .expect("authenticates");
    assert_eq!(ok.acked_seq, 0);
    broker.shutdown().await;
}

/// A persistent client of a device stops for good once its device is
/// unregistered, and says why.
#[tokio::test]
async fn a_persistent_client_of_an_unregistered_device_stops_with_the_reason() {
    let broker = TestBroker::start().await;
    let owner = support::Identity::new();
    let owner_client = owner.connect(&broker).await;
    let laptop = Keypair::generate();
    let (certificate, as_laptop) = device_of(&owner.signing, &laptop);
    owner_client
        .register_device(certificate)
        .await
        .expect("registers the laptop");
    let laptop_client = connect_device(&broker, &owner, as_laptop).await;
    owner_client
        .unregister_device(&laptop.public().device_id())
        .await
        .expect("unregisters the laptop");
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let backbone_client::Status::Stopped(_) = laptop_client.status() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(stopped.is_ok(), "the laptop's client still runs");
    assert_eq!(
        code(laptop_client.list_devices().await),
        Some(ErrorCode::DeviceNotRegistered)
    );
    broker.shutdown().await;
}

/// A certified device may read and act in the mailbox, but not decide which
/// keys act for the identity, whether it exists, or who may write to it.
#[tokio::test]
async fn only_the_identity_key_manages_devices_deletion_capabilities_and_policy() {
    let broker = TestBroker::start().await;
    let owner = support::Identity::new();
    let owner_client = owner.connect(&broker).await;
    let (phone, tablet) = (Keypair::generate(), Keypair::generate());
    let (phone_certificate, as_phone) = device_of(&owner.signing, &phone);
    let (tablet_certificate, _) = device_of(&owner.signing, &tablet);
    owner_client
        .register_device(phone_certificate)
        .await
        .expect("registers the phone");
    owner_client
        .register_device(tablet_certificate)
        .await
        .expect("registers the tablet");
    let phone_client = connect_device(&broker, &owner, as_phone).await;

    // Each refused with the typed code, and the phone's session goes on.
    let stranger = DeviceCertificate::issue(&owner.signing, Keypair::generate().public(), 1);
    let capability = backbone_client::DeliveryCapability::random();
    let refused = [
        code(phone_client.register_device(stranger).await),
        code(
            phone_client
                .unregister_device(&tablet.public().device_id())
                .await,
        ),
        code(
            phone_client
                .unregister_device(&phone.public().device_id())
                .await,
        ),
        code(phone_client.delete_identity().await),
        code(phone_client.cancel_deletion().await),
        code(phone_client.register_capability(&capability).await),
        code(phone_client.revoke_capability(&capability.hash()).await),
        code(
            phone_client
                .set_inbound_policy(InboundPolicy::RelationshipsOnly)
                .await,
        ),
    ];
    assert_eq!(refused, [Some(ErrorCode::IdentityKeyRequired); 8]);
    assert_eq!(phone_client.status(), backbone_client::Status::Connected);

    // None of it happened: both devices are registered, no capability, the
    // default policy, and no deletion to cancel.
    let mut expected = vec![phone_certificate, tablet_certificate];
    expected.sort_by_key(|certificate| certificate.device_key.device_id());
    assert_eq!(owner_client.list_devices().await.expect("lists"), expected);
    assert_eq!(
        owner_client.list_capabilities().await.expect("lists"),
        vec![]
    );
    assert_eq!(
        owner_client.relationships().await.expect("lists").0,
        InboundPolicy::Anyone
    );
    assert_eq!(
        code(owner_client.cancel_deletion().await),
        Some(ErrorCode::NotFound)
    );
    // What a device does day to day still works.
    assert_eq!(phone_client.list_devices().await.expect("lists"), expected);
    assert_eq!(
        phone_client.list_capabilities().await.expect("lists"),
        vec![]
    );
    phone_client.delete(vec![1]).await.expect("deletes");

    // The identity key may do each of them; a scheduled deletion stays
    // out of the phone's reach too.
    owner_client
        .register_capability(&capability)
        .await
        .expect("registers a capability");
    owner_client
        .set_inbound_policy(InboundPolicy::RelationshipsOnly)
        .await
        .expect("sets the policy");
    owner_client
        .delete_identity()
        .await
        .expect("schedules the deletion");
    assert_eq!(
        code(phone_client.cancel_deletion().await),
        Some(ErrorCode::IdentityKeyRequired)
    );
    owner_client.cancel_deletion().await.expect("cancels");
    owner_client
        .revoke_capability(&capability.hash())
        .await
        .expect("revokes the capability");
    owner_client
        .unregister_device(&tablet.public().device_id())
        .await
        .expect("unregisters the tablet");
    assert_eq!(
        owner_client.list_devices().await.expect("lists"),
        vec![phone_certificate]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn unregistering_a_device_that_is_not_registered_is_not_found() {
    let broker = TestBroker::start().await;
    let owner = support::Identity::new();
    let owner_client = owner.connect(&broker).await;
    let never = Keypair::generate().public().device_id();
    assert_eq!(
        code(owner_client.unregister_device(&never).await),
        Some(ErrorCode::NotFound)
    );
    // The identity key is no registered device either: it needs no
    // certificate, and one for it is refused.
    assert_eq!(
        code(
            owner_client
                .unregister_device(&owner.signing.public().device_id())
                .await
        ),
        Some(ErrorCode::NotFound)
    );
    let itself = DeviceCertificate::issue(&owner.signing, owner.signing.public(), 1);
    assert_eq!(
        code(owner_client.register_device(itself).await),
        Some(ErrorCode::InvalidCertificate)
    );
    // A device unregistered once is not found the second time.
    let device = Keypair::generate();
    let (certificate, _) = device_of(&owner.signing, &device);
    owner_client
        .register_device(certificate)
        .await
        .expect("registers");
    let id = device.public().device_id();
    owner_client
        .unregister_device(&id)
        .await
        .expect("unregisters");
    assert_eq!(
        code(owner_client.unregister_device(&id).await),
        Some(ErrorCode::NotFound)
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn an_identity_registers_at_most_max_devices() {
    let broker = TestBroker::start_with(|config| config.limits.max_devices = 2).await;
    let owner = support::Identity::new();
    let owner_client = owner.connect(&broker).await;
    let keys = [
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    ];
    let [first, second, third] = keys.each_ref().map(|key| device_of(&owner.signing, key).0);
    owner_client.register_device(first).await.expect("first");
    owner_client.register_device(second).await.expect("second");
    assert_eq!(
        code(owner_client.register_device(third).await),
        Some(ErrorCode::QuotaExceeded)
    );
    // A registered device gets a new certificate however full the identity is.
    let reissued = DeviceCertificate::issue(&owner.signing, keys[1].public(), 2);
    owner_client
        .register_device(reissued)
        .await
        .expect("reissues");
    // Unregistering one makes room.
    owner_client
        .unregister_device(&keys[0].public().device_id())
        .await
        .expect("unregisters");
    owner_client.register_device(third).await.expect("third");
    broker.shutdown().await;
}
