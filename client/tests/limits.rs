//! Abuse limits against a real broker: the per-identity send rate, the cap
//! on unauthenticated connections, and QUIC address validation (Retry).

mod support;

use std::time::Duration;

use backbone_client::transport::RawConnection;
use backbone_client::{Client, ClientError};
use backbone_protocol::ErrorCode;
use support::{Identity, TestBroker, next_delivery};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn an_identity_over_its_send_rate_is_refused_with_retry_after() {
    let broker = TestBroker::start_with(|config| {
        config.limits.max_recipients = 3;
        config.limits.send_rate = 2;
        config.limits.send_burst = 3;
    })
    .await;
    let (alice, bob, carol) = (Identity::new(), Identity::new(), Identity::new());
    bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    let carol_client = carol.connect(&broker).await;

    // The burst is three copies: two sends to one recipient and one more.
    for _ in 0..3 {
        alice_client
            .send_envelope(&[bob.address()], vec![1], HOUR)
            .await
            .expect("within the burst");
    }
    let error = alice_client
        .send_envelope(&[bob.address()], vec![1], HOUR)
        .await
        .expect_err("over the rate");
    assert_eq!(error.code(), Some(ErrorCode::RateLimited), "{error}");
    let ClientError::Server {
        retry_after_ms: Some(wait),
        ..
    } = error
    else {
        panic!("no retry-after: {error:?}");
    };
    assert!(
        (1..=500).contains(&wait),
        "one copy at 2/s is due within 500 ms: {wait}"
    );

    // Another identity has its own budget, fan-out counts every copy.
    let error = carol_client
        .send_envelope(&[bob.address(), alice.address()], vec![1], HOUR)
        .await
        .map(|_| ())
        .and(
            carol_client
                .send_envelope(&[bob.address(), alice.address()], vec![1], HOUR)
                .await
                .map(|_| ()),
        )
        .expect_err("four copies exceed a burst of three");
    assert_eq!(error.code(), Some(ErrorCode::RateLimited));

    // After the advertised wait, alice may send again.
    tokio::time::sleep(Duration::from_millis(u64::from(wait) + 20)).await;
    alice_client
        .send_envelope(&[bob.address()], vec![1], HOUR)
        .await
        .expect("allowed again after retry-after");
    broker.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_connections_are_capped() {
    let broker = TestBroker::start_with(|config| {
        config.limits.max_unauthenticated = 1;
        config.auth.deadline = Duration::from_secs(30);
    })
    .await;
    // A connection that never authenticates holds the only pre-auth place.
    let idle = RawConnection::connect(&broker.connect_config())
        .await
        .expect("first connection");
    let alice = Identity::new();
    let refused = Client::connect(alice.options(&broker)).await;
    assert!(
        refused.is_err(),
        "a second unauthenticated connection is refused"
    );

    // Once it goes away, clients get in again (the close reaches the broker
    // asynchronously, so allow a few attempts).
    drop(idle);
    let mut attempts = 0;
    let client = loop {
        match Client::connect(alice.options(&broker)).await {
            Ok(client) => break client,
            Err(error) if attempts < 50 => {
                attempts += 1;
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("still refused: {error}"),
        }
    };
    // Authenticated connections do not count against the pre-auth cap.
    let bob = Identity::new();
    let second = Client::connect(bob.options(&broker)).await;
    assert!(
        second.is_ok(),
        "an authenticated connection frees its place"
    );
    drop((client, second));
    broker.shutdown().await;
}

#[tokio::test]
async fn address_validation_is_required_above_the_connection_rate() {
    // retry_above_rate = 0: every new client must answer a QUIC Retry first.
    let broker = TestBroker::start_with(|config| config.limits.retry_above_rate = 0).await;
    let alice = Identity::new();
    let client = alice.connect(&broker).await;
    client
        .publish_card()
        .await
        .expect("works over the validated connection");
    assert!(broker.broker().retries() >= 1, "a Retry was sent");
    broker.shutdown().await;

    // Below the rate, no Retry: one round trip less.
    let broker = TestBroker::start().await;
    alice.connect(&broker).await;
    assert_eq!(broker.broker().retries(), 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_cannot_open_streams_without_end() {
    let broker = TestBroker::start().await;
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    // The configured streams come with authentication (before it, one).
    let alice = Identity::new();
    raw.authenticate(&backbone_client::transport::Credentials::primary(
        &alice.signing,
    ))
    .await
    .expect("authenticates");
    let limit = broker.config.transport.max_concurrent_bidi_streams;
    let connection = raw.connection().clone();
    let mut open = Vec::new();
    // The first stream is the one `connect` opened for the protocol.
    for _ in 1..limit {
        let (mut send, recv) = connection.open_bi().await.expect("within the limit");
        // A stream exists for the peer only once something is sent on it.
        send.write_all(&[0]).await.expect("write");
        open.push((send, recv));
    }
    let beyond = tokio::time::timeout(Duration::from_millis(500), connection.open_bi()).await;
    assert!(
        beyond.is_err(),
        "a stream beyond transport.max_concurrent_bidi_streams opened"
    );
    drop(open);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_reads_does_not_hold_up_others() {
    let broker = TestBroker::start_with(|config| config.limits.send_rate = 0).await;
    let (stuck, alice, bob) = (Identity::new(), Identity::new(), Identity::new());
    // The stuck device authenticates and then never reads its stream again.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&backbone_client::transport::Credentials::primary(
        &stuck.signing,
    ))
    .await
    .expect("authenticates");
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    // Far more than the push window and the stream's flow-control window.
    let big = vec![7u8; 32 * 1024];
    for _ in 0..400 {
        alice_client
            .send_envelope(&[stuck.address()], big.clone(), HOUR)
            .await
            .expect("stored for the stuck device");
    }
    // Bob still gets his messages at once.
    let ack = alice_client
        .send_envelope(&[bob.address()], b"still flowing".to_vec(), HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1);
    let delivery = support::next_delivery(&bob_client, Duration::from_secs(5)).await;
    assert_eq!(delivery.envelope, &b"still flowing"[..]);
    drop(raw);
    broker.shutdown().await;
}

/// The codes of the recipients a send failed for.
fn failed_codes(ack: &backbone_protocol::frame::SendAck) -> Vec<Option<ErrorCode>> {
    ack.failed
        .iter()
        .map(|failed| ErrorCode::from_u16(failed.code))
        .collect()
}

#[tokio::test]
async fn a_full_mailbox_refuses_more_until_envelopes_are_deleted_or_expire() {
    let broker = TestBroker::start_with(|config| {
        config.limits.mailbox_max_envelopes = 3;
        config.limits.mailbox_max_bytes = bytesize::ByteSize::b(1_000);
        config.expiry.interval = Duration::from_millis(20);
    })
    .await;
    let (alice, bob, carol) = (Identity::new(), Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    carol.connect(&broker).await;

    // Three envelopes fill bob's count; the fourth is refused for bob only,
    // while carol, in the same send, still gets hers.
    for _ in 0..3 {
        let ack = alice_client
            .send_envelope(&[bob.address()], vec![1; 10], HOUR)
            .await
            .expect("send");
        assert!(ack.failed.is_empty(), "{ack:?}");
    }
    let ack = alice_client
        .send_envelope(&[bob.address(), carol.address()], vec![1; 10], HOUR)
        .await
        .expect("send");
    assert_eq!(failed_codes(&ack), [Some(ErrorCode::QuotaExceeded)]);
    assert_eq!(ack.failed[0].address, bob.address());
    assert_eq!(ack.failed[0].retry_after_ms, None, "not retryable as such");
    assert_eq!(ack.stored.len(), 1);
    assert_eq!(ack.stored[0].address, carol.address());

    // Bob deletes one envelope: there is room for exactly one more.
    let first = next_delivery(&bob_client, Duration::from_secs(5)).await;
    bob_client.delete(vec![first.seq]).await.expect("delete");
    let ack = alice_client
        .send_envelope(&[bob.address()], vec![1; 10], HOUR)
        .await
        .expect("send");
    assert!(ack.failed.is_empty(), "room after a delete: {ack:?}");
    let ack = alice_client
        .send_envelope(&[bob.address()], vec![1; 10], HOUR)
        .await
        .expect("send");
    assert_eq!(failed_codes(&ack), [Some(ErrorCode::QuotaExceeded)]);

    // The byte limit: carol's mailbox holds one 10-byte envelope, so 990
    // more bytes fit and 991 do not.
    let ack = alice_client
        .send_envelope(&[carol.address()], vec![2; 991], HOUR)
        .await
        .expect("send");
    assert_eq!(failed_codes(&ack), [Some(ErrorCode::QuotaExceeded)]);
    let ack = alice_client
        .send_envelope(&[carol.address()], vec![2; 990], HOUR)
        .await
        .expect("send");
    assert!(ack.failed.is_empty(), "exactly at the byte limit: {ack:?}");

    // Expiry frees room too: short-lived envelopes fill dave's mailbox,
    // expire, and after the broker's recount interval he accepts again.
    let dave = Identity::new();
    dave.connect(&broker).await;
    for _ in 0..3 {
        let ack = alice_client
            .send_envelope(&[dave.address()], vec![3; 10], Duration::from_secs(1))
            .await
            .expect("send");
        assert!(ack.failed.is_empty(), "{ack:?}");
    }
    let ack = alice_client
        .send_envelope(&[dave.address()], vec![3; 10], HOUR)
        .await
        .expect("send");
    assert_eq!(failed_codes(&ack), [Some(ErrorCode::QuotaExceeded)]);
    broker.advance_clock(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ack = alice_client
            .send_envelope(&[dave.address()], vec![3; 10], HOUR)
            .await
            .expect("send");
        if ack.failed.is_empty() {
            break;
        }
        assert_eq!(failed_codes(&ack), [Some(ErrorCode::QuotaExceeded)]);
        assert!(
            tokio::time::Instant::now() < deadline,
            "expired envelopes never made room"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.shutdown().await;
}

/// The path MTU a fresh connection settles on within `wait`.
async fn settled_mtu(broker: &TestBroker, mtu_discovery: bool, wait: Duration) -> u16 {
    let mut config = broker.connect_config();
    config.mtu_discovery = mtu_discovery;
    let connection = RawConnection::connect(&config).await.expect("connects");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mtu = connection.connection().stats().path.current_mtu;
        if mtu > 1200 || tokio::time::Instant::now() >= deadline {
            return mtu;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn mtu_discovery_is_off_by_default_and_probes_when_both_sides_turn_it_on() {
    // Off: connections stay at QUIC's 1,200-byte minimum (on loopback a probe
    // takes a round trip of microseconds, so half a second would show one).
    let broker = TestBroker::start().await;
    assert_eq!(
        settled_mtu(&broker, false, Duration::from_millis(500)).await,
        1200
    );
    broker.shutdown().await;

    let broker = TestBroker::start_with(|config| config.transport.mtu_discovery = true).await;
    let mtu = settled_mtu(&broker, true, Duration::from_secs(10)).await;
    assert!(mtu > 1200, "no probe raised the MTU: {mtu}");
    broker.shutdown().await;
}
