//! Authentication against a real broker: success and every failure mode.

mod support;

use std::time::Duration;

use backbone_client::ClientError;
use backbone_client::transport::{Credentials, RawConnection};
use backbone_protocol::auth::sign_auth;
use backbone_protocol::bytes::Signature;
use backbone_protocol::frame::{Auth, Challenge, Hello, Ping};
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
