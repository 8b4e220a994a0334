//! Behaviour `docs/protocol.md` promises a client in another language, pinned
//! against a real broker: a send to an address that never authenticated is
//! stored, and its identity key then authenticates without registering
//! anything; frames only the broker sends are refused with `request_id` 0
//! and the session goes on; a session that sends nothing stays open on the
//! broker's QUIC keep-alives. And the defaults the document quotes for
//! those keep-alives and for the handshake's two time limits are the
//! configuration's.

mod support;

use std::time::Duration;

use backbone_broker::Config;
use backbone_client::transport::{Credentials, RawConnection};
use backbone_client::{AckPolicy, ConnectConfig, Trust};
use backbone_protocol::bytes::{Blob, MessageId};
use backbone_protocol::frame::{
    Deliver, ErrorFrame, FetchCard, ListDevices, Ping, SendAck, Stored,
};
use backbone_protocol::{ErrorCode, Frame, Keypair};
use support::{Identity, TestBroker};

const HOUR: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(10);

/// The next frame on `connection`, failing the test after [`WAIT`].
async fn next(connection: &mut RawConnection) -> Frame {
    tokio::time::timeout(WAIT, connection.recv())
        .await
        .expect("a frame arrives in time")
        .expect("the connection is open")
}

/// The next frame, which must be an `Error`; returns its request id and code.
async fn next_error(connection: &mut RawConnection) -> (u64, Option<ErrorCode>) {
    match next(connection).await {
        Frame::Error(error) => (error.request_id, ErrorCode::from_u16(error.code)),
        other => panic!("expected an Error, got {other:?}"),
    }
}

/// Sends a `Ping` and requires the very next frame to be its `Pong`: the
/// session goes on, and nothing sent before the `Ping` on the session's
/// reader loop was answered.
async fn ping_answered_next(connection: &mut RawConnection, nonce: u64) {
    connection
        .send(&Frame::Ping(Ping { nonce }))
        .await
        .expect("sends");
    match next(connection).await {
        Frame::Pong(pong) => assert_eq!(pong.nonce, nonce),
        other => panic!("expected the Pong, got {other:?}"),
    }
}

/// Broker-to-client frames, one with a `request_id` field and one without.
fn broker_frames() -> [Frame; 2] {
    [
        Frame::SendAck(SendAck {
            request_id: 9,
            message_id: MessageId([7; 16]),
            stored: Vec::new(),
            failed: Vec::new(),
        }),
        Frame::Deliver(Deliver {
            seq: 1,
            message_id: MessageId([7; 16]),
            sender: None,
            stored_at_ms: 1,
            expires_at_ms: 2,
            envelope: Blob::from(vec![1, 2, 3]),
        }),
    ]
}

#[tokio::test]
async fn a_send_to_an_address_that_never_authenticated_is_stored_for_it() {
    let broker = TestBroker::start().await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let newcomer = Keypair::generate();

    // Nothing is known of the newcomer: no card, no session, no device.
    let ack = alice_client
        .send_envelope(&[newcomer.address()], b"opaque".to_vec(), HOUR)
        .await
        .expect("sent");
    assert_eq!(
        ack.stored,
        vec![Stored {
            address: newcomer.address(),
            seq: 1
        }]
    );
    assert!(ack.failed.is_empty(), "{:?}", ack.failed);

    // Its identity key authenticates the first time without registering
    // anything, and gets what was stored for it.
    let mut newcomer_connection = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    let ok = newcomer_connection
        .authenticate(&Credentials::primary(&newcomer))
        .await
        .expect("the identity key needs no registration");
    assert_eq!(ok.address, newcomer.address());
    assert_eq!(ok.device_id, newcomer.public().device_id());
    assert_eq!(ok.device_id.0, newcomer.address().0);
    assert_eq!(ok.acked_seq, 0);
    match next(&mut newcomer_connection).await {
        Frame::Deliver(deliver) => {
            assert_eq!(deliver.seq, 1);
            assert_eq!(deliver.sender, Some(alice.address()));
            assert_eq!(deliver.envelope.0, &b"opaque"[..]);
        }
        other => panic!("expected the stored envelope, got {other:?}"),
    }

    // UnknownAddress is what a card lookup answers, not a send.
    newcomer_connection
        .send(&Frame::FetchCard(FetchCard {
            request_id: 1,
            address: newcomer.address(),
        }))
        .await
        .expect("sends");
    assert_eq!(
        next_error(&mut newcomer_connection).await,
        (1, Some(ErrorCode::UnknownAddress))
    );
    // And the identity key is no registered device.
    newcomer_connection
        .send(&Frame::ListDevices(ListDevices { request_id: 2 }))
        .await
        .expect("sends");
    match next(&mut newcomer_connection).await {
        Frame::Devices(devices) => {
            assert_eq!(devices.request_id, 2);
            assert!(devices.devices.is_empty());
        }
        other => panic!("expected Devices, got {other:?}"),
    }
    newcomer_connection.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn frames_only_the_broker_sends_are_refused_with_request_id_0_and_the_session_goes_on() {
    let broker = TestBroker::start().await;

    let mut authenticated = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    authenticated
        .authenticate(&Credentials::primary(&Keypair::generate()))
        .await
        .expect("authenticates");
    for frame in broker_frames() {
        authenticated.send(&frame).await.expect("sends");
        assert_eq!(
            next_error(&mut authenticated).await,
            (0, Some(ErrorCode::UnexpectedFrame)),
            "{frame:?} on an authenticated session"
        );
    }
    // A client's Error is not answered: the Pong comes next.
    authenticated
        .send(&Frame::Error(ErrorFrame::new(
            4,
            ErrorCode::Internal,
            "a client error",
        )))
        .await
        .expect("sends");
    ping_answered_next(&mut authenticated, 1).await;
    authenticated.close().await;

    let mut anonymous = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    anonymous.open_anonymous().await.expect("opens");
    for frame in broker_frames() {
        anonymous.send(&frame).await.expect("sends");
        assert_eq!(
            next_error(&mut anonymous).await,
            (0, Some(ErrorCode::UnexpectedFrame)),
            "{frame:?} on an anonymous session"
        );
    }
    ping_answered_next(&mut anonymous, 2).await;
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_session_that_sends_nothing_stays_open_on_the_brokers_keep_alives() {
    let broker = TestBroker::start_with(|config| {
        config.transport.idle_timeout = Duration::from_secs(1);
        config.transport.keep_alive = Duration::from_millis(200);
    })
    .await;
    // The client sends no keep-alives of its own within the test, and QUIC
    // applies the smaller idle timeout, the broker's 1 s.
    let mut config = broker.connect_config();
    config.keep_alive = HOUR;
    let mut connection = RawConnection::connect(&config).await.expect("connects");
    connection
        .authenticate(&Credentials::primary(&Keypair::generate()))
        .await
        .expect("authenticates");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        connection.connection().close_reason().is_none(),
        "closed after three idle timeouts of silence: {:?}",
        connection.connection().close_reason()
    );
    ping_answered_next(&mut connection, 3).await;
    connection.close().await;
    broker.shutdown().await;
}

/// Whole seconds, as the document writes durations.
fn secs(duration: Duration) -> String {
    assert_eq!(duration.subsec_nanos(), 0, "{duration:?} is whole seconds");
    format!("{} s", duration.as_secs())
}

#[test]
fn protocol_md_quotes_the_default_keep_alive_idle_timeout_and_auth_limits() {
    let defaults = Config::default();
    let (auth, transport) = (&defaults.auth, &defaults.transport);
    let client = ConnectConfig::new("127.0.0.1:7700", Trust::CaDer(Vec::new()));
    let document = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .expect("read docs/protocol.md");
    let words = document.split_whitespace().collect::<Vec<_>>().join(" ");

    // The broker's configuration caps the challenge's validity at 60 s.
    let ttl = |value: &str| {
        Config::load(
            None,
            [("BACKBONE__AUTH__CHALLENGE_TTL".to_owned(), value.to_owned())],
        )
    };
    assert!(ttl("60s").is_ok());
    assert!(ttl("61s").is_err());
    // "With the defaults the deadline always comes first."
    assert!(auth.deadline < auth.challenge_ttl);

    for sentence in [
        format!(
            "`transport.idle_timeout` (default {})",
            secs(transport.idle_timeout)
        ),
        format!(
            "`transport.keep_alive` (default {};",
            secs(transport.keep_alive)
        ),
        format!(
            "(`auth.challenge_ttl`, default {}, at most 60 s)",
            secs(auth.challenge_ttl)
        ),
        format!(
            "**The auth deadline** (`auth.deadline`, default {})",
            secs(auth.deadline)
        ),
        format!(
            "| Challenge validity (`auth.challenge_ttl`) | broker configuration, default {}, at most 60 s,",
            secs(auth.challenge_ttl)
        ),
        format!(
            "| Auth deadline (`auth.deadline`) | broker configuration, default {},",
            secs(auth.deadline)
        ),
        format!(
            "| QUIC keep-alive interval (`transport.keep_alive`) | broker configuration, default {} |",
            secs(transport.keep_alive)
        ),
        format!(
            "| QUIC idle timeout (`transport.idle_timeout`) | broker configuration, default {};",
            secs(transport.idle_timeout)
        ),
        format!(
            "The reference client sends a QUIC keep-alive after {} of quiet",
            secs(client.keep_alive)
        ),
        format!(
            "the reference client gathers them for up to {} ms or {} sequence numbers",
            AckPolicy::default().delay.as_millis(),
            AckPolicy::default().every
        ),
        format!(
            "(`push_window` envelopes unacknowledged, {} by default)",
            defaults.limits.push_window
        ),
    ] {
        assert!(
            words.contains(&sentence),
            "docs/protocol.md should say \"{sentence}\""
        );
    }
}
