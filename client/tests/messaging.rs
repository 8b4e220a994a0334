//! Sending and delivery end to end: real broker, real client, real encryption.

mod support;

use std::time::Duration;

use backbone_client::ClientError;
use backbone_client::envelope::EnvelopeError;
use backbone_client::transport::{Credentials, RawConnection};
use backbone_protocol::bytes::{Blob, EncryptionKey};
use backbone_protocol::frame::{Ping, Send};
use backbone_protocol::{DeviceCertificate, ErrorCode, Frame, IdentityCard, Keypair};
use support::{Identity, TestBroker, assert_no_delivery, eventually, next_delivery};

const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_message_to_an_online_recipient_is_pushed_and_opened() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;

    let ack = alice_client
        .send(&[bob.address()], b"hello bob", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1);
    assert_eq!(ack.stored[0].address, bob.address());
    assert!(ack.failed.is_empty());

    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("in time")
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"hello bob");
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(message.delivery.sender, Some(alice.address()));
    assert_eq!(message.delivery.seq, ack.stored[0].seq);
    broker.shutdown().await;
}

#[tokio::test]
async fn the_broker_sees_only_padded_sizes() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    // 1 and 17 bytes fall in the 256-byte bucket (17 fills it exactly), 200
    // and 273 in the 512-byte one.
    let mut lengths = Vec::new();
    for len in [1, 17, 200, 273] {
        alice_client
            .send(&[bob.address()], &vec![b'x'; len], HOUR)
            .await
            .expect("sent");
        let message = tokio::time::timeout(WAIT, bob_client.next_message())
            .await
            .expect("in time")
            .expect("running")
            .expect("opens");
        assert_eq!(message.opened.plaintext.len(), len, "padding is stripped");
        lengths.push(message.delivery.envelope.len());
    }
    assert_eq!(lengths, [256, 256, 512, 512]);
    broker.shutdown().await;
}

#[tokio::test]
async fn an_offline_recipient_catches_up_in_order_on_connect() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    bob.connect(&broker).await; // publishes the card, then goes offline
    let alice_client = alice.connect(&broker).await;
    for n in 0..20u32 {
        alice_client
            .send(&[bob.address()], &n.to_le_bytes(), HOUR)
            .await
            .expect("sent");
    }
    let bob_client = bob.connect(&broker).await;
    for n in 0..20u32 {
        let message = bob_client
            .next_message()
            .await
            .expect("running")
            .expect("opens");
        assert_eq!(message.opened.plaintext, n.to_le_bytes());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn one_send_reaches_several_recipients_and_each_can_open_it() {
    let broker = TestBroker::start().await;
    let alice = Identity::new();
    let recipients: Vec<Identity> = (0..3).map(|_| Identity::new()).collect();
    let mut clients = Vec::new();
    for recipient in &recipients {
        clients.push(recipient.connect(&broker).await);
    }
    let alice_client = alice.connect(&broker).await;
    let addresses: Vec<_> = recipients.iter().map(Identity::address).collect();
    let ack = alice_client
        .send(&addresses, b"to all", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 3);
    for client in &clients {
        let message = client
            .next_message()
            .await
            .expect("running")
            .expect("opens");
        assert_eq!(message.opened.plaintext, b"to all");
        assert_eq!(message.opened.recipients.len(), 3);
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_send_to_an_address_without_a_card_is_an_unknown_address() {
    let broker = TestBroker::start().await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let nobody = Keypair::generate().address();
    let error = alice_client
        .send(&[nobody], b"x", HOUR)
        .await
        .expect_err("unknown");
    assert_eq!(error.code(), Some(ErrorCode::UnknownAddress), "{error}");
    assert!(error.to_string().contains("unknown address"), "{error}");
    broker.shutdown().await;
}

#[tokio::test]
async fn each_device_has_its_own_cursor() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let phone = bob.connect(&broker).await;
    let laptop_key = Keypair::generate();
    let certificate = DeviceCertificate::issue(&bob.signing, laptop_key.public(), 1);
    phone
        .register_device(certificate)
        .await
        .expect("registers the laptop");
    let mut laptop_options = bob.options(&broker);
    laptop_options.credentials = Credentials {
        identity_key: bob.signing.public(),
        device: laptop_key,
        certificate: Some(certificate),
    };

    let alice_client = alice.connect(&broker).await;
    for text in [&b"one"[..], b"two"] {
        alice_client
            .send(&[bob.address()], text, HOUR)
            .await
            .expect("sent");
    }
    // The phone reads and acks both.
    let mut last = 0;
    for _ in 0..2 {
        last = next_delivery(&phone, WAIT).await.seq;
    }
    phone.ack(last).await.expect("acks");

    // The laptop has its own cursor: it still gets both, and opens them.
    let laptop = backbone_client::Client::connect(laptop_options.clone())
        .await
        .expect("laptop connects");
    let first = laptop
        .next_message()
        .await
        .expect("running")
        .expect("opens");
    assert_eq!(first.opened.plaintext, b"one");
    laptop.ack(first.delivery.seq).await.expect("acks");
    let second = next_delivery(&laptop, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(laptop);

    // Reconnecting, the laptop resumes after its cursor: only "two" again.
    let laptop = backbone_client::Client::connect(laptop_options)
        .await
        .expect("laptop reconnects");
    assert_eq!(next_delivery(&laptop, WAIT).await.seq, second.seq);
    assert_no_delivery(&laptop, Duration::from_millis(300)).await;

    // The phone acked everything: nothing comes back to it after a reconnect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(phone);
    let phone = bob.connect(&broker).await;
    assert_no_delivery(&phone, Duration::from_millis(500)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn acknowledged_envelopes_survive_a_restart_and_acked_ones_stay_acked() {
    let mut broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    let mut acked_seqs = Vec::new();
    for n in 0..10u32 {
        let ack = alice_client
            .send(&[bob.address()], &n.to_le_bytes(), HOUR)
            .await
            .expect("sent");
        acked_seqs.push(ack.stored[0].seq);
    }
    // Bob processes the first three.
    for _ in 0..3 {
        let delivery = next_delivery(&bob_client, WAIT).await;
        bob_client.ack(delivery.seq).await.expect("acks");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop((alice_client, bob_client));
    broker.restart().await;

    let bob_client = bob.connect(&broker).await;
    for n in 3..10u32 {
        let message = bob_client
            .next_message()
            .await
            .expect("running")
            .expect("opens");
        assert_eq!(message.opened.plaintext, n.to_le_bytes());
        assert_eq!(message.delivery.seq, acked_seqs[n as usize]);
    }
    assert_no_delivery(&bob_client, Duration::from_millis(300)).await;

    // Sequence numbers go on from the durable head after the restart: the
    // log shows only durable envelopes, and only durable envelopes were
    // ever shown to a device, so no number a device saw is handed out again.
    let alice_client = alice.connect(&broker).await;
    let ack = alice_client
        .send(&[bob.address()], b"after", HOUR)
        .await
        .expect("sent");
    assert_eq!(
        ack.stored[0].seq,
        acked_seqs.last().expect("ten sends") + 1,
        "the next number after the restart"
    );
    let message = bob_client
        .next_message()
        .await
        .expect("running")
        .expect("opens");
    assert_eq!(
        message.opened.plaintext, b"after",
        "delivered across the gap"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn expired_envelopes_are_never_delivered_and_are_deleted() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    alice_client
        .send(&[bob.address()], b"short", Duration::from_secs(5))
        .await
        .expect("sent");
    alice_client
        .send(&[bob.address()], b"long", HOUR)
        .await
        .expect("sent");
    broker.advance_clock(Duration::from_secs(6));
    tokio::time::sleep(Duration::from_millis(300)).await; // several expiry sweeps

    let bob_client = bob.connect(&broker).await;
    let message = bob_client
        .next_message()
        .await
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"long");
    assert_no_delivery(&bob_client, Duration::from_millis(300)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn deleted_envelopes_are_gone_for_every_device() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    let first = alice_client
        .send(&[bob.address()], b"delete me", HOUR)
        .await
        .expect("sent")
        .stored[0]
        .seq;
    alice_client
        .send(&[bob.address()], b"keep me", HOUR)
        .await
        .expect("sent");

    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&bob.signing))
        .await
        .expect("auth");
    drop(raw);
    let bob_client = bob.connect(&broker).await;
    // Take the first push, delete it without acking, reconnect: only "keep me" remains.
    let delivery = next_delivery(&bob_client, WAIT).await;
    assert_eq!(delivery.seq, first);
    bob_client.delete(vec![first]).await.expect("deletes");
    drop(bob_client);
    let bob_client = bob.connect(&broker).await;
    let message = bob_client
        .next_message()
        .await
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"keep me");
    broker.shutdown().await;
}

#[tokio::test]
async fn malformed_and_oversize_requests_get_typed_errors_and_the_session_goes_on() {
    let broker = TestBroker::start_with(|config| {
        config.limits.max_envelope_size = bytesize::ByteSize::kib(4)
    })
    .await;
    let identity = Keypair::generate();
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&identity))
        .await
        .expect("auth");

    // A frame with an unknown tag: skipped with an error, the stream continues.
    let mut bad =
        backbone_protocol::codec::frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
    bad[5..9].copy_from_slice(&999u32.to_le_bytes());
    raw.send_raw(&bad).await.expect("sends");
    expect_error(&mut raw, ErrorCode::UnknownFrameType).await;

    // Trailing bytes inside a frame.
    let mut trailing =
        backbone_protocol::codec::frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("encodes");
    trailing.push(0);
    let len = (trailing.len() - 4) as u32;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    raw.send_raw(&trailing).await.expect("sends");
    expect_error(&mut raw, ErrorCode::TrailingBytes).await;

    // An envelope over the configured limit (but within the frame limit).
    let send = |recipients, size, ttl_secs| {
        Frame::Send(Send {
            request_id: 9,
            ttl_secs,
            recipients,
            envelope: Blob::from(vec![0; size]),
        })
    };
    raw.send(&send(vec![identity.address()], 5000, 60))
        .await
        .expect("sends");
    expect_error(&mut raw, ErrorCode::EnvelopeTooLarge).await;
    raw.send(&send(vec![], 10, 60)).await.expect("sends");
    expect_error(&mut raw, ErrorCode::InvalidRecipients).await;
    raw.send(&send(vec![identity.address(), identity.address()], 10, 60))
        .await
        .expect("sends");
    expect_error(&mut raw, ErrorCode::InvalidRecipients).await;
    raw.send(&send(vec![identity.address()], 10, 0))
        .await
        .expect("sends");
    expect_error(&mut raw, ErrorCode::InvalidTtl).await;

    // The session still works.
    raw.send(&Frame::Ping(Ping { nonce: 42 }))
        .await
        .expect("sends");
    match raw.recv().await.expect("pong") {
        Frame::Pong(pong) => assert_eq!(pong.nonce, 42),
        other => panic!("expected pong, got {other:?}"),
    }

    // A length prefix beyond the frame limit is fatal for the connection.
    raw.send_raw(&(64u32 * 1024 * 1024).to_be_bytes())
        .await
        .expect("sends");
    let error = loop {
        match raw.recv().await {
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert_eq!(error.code(), Some(ErrorCode::FrameTooLarge), "{error}");
    broker.shutdown().await;
}

/// `request_id` 0 is what answers about the connection carry: a request
/// with it is refused with `InvalidRequestId` (id 0) and not carried out,
/// on the session's stream and as a file stream's header.
#[tokio::test]
async fn a_request_with_id_zero_is_refused_and_not_carried_out() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&identity))
        .await
        .expect("auth");
    raw.send(&Frame::Send(Send {
        request_id: 0,
        ttl_secs: 60,
        recipients: vec![identity.address()],
        envelope: Blob::from(vec![7; 10]),
    }))
    .await
    .expect("sends");
    assert_invalid_request_id(
        tokio::time::timeout(WAIT, raw.recv())
            .await
            .expect("in time")
            .expect("frame"),
    );

    // A file stream whose header has id 0 gets the same answer on the stream.
    let (mut send, mut recv) = raw.connection().open_bi().await.expect("stream");
    let header = backbone_protocol::codec::frame_to_vec(&Frame::DownloadFile(
        backbone_protocol::frame::DownloadFile {
            request_id: 0,
            file_id: backbone_protocol::bytes::FileId([1; 32]),
            secret: backbone_protocol::bytes::FileSecret([2; 32]),
            offset: 0,
        },
    ))
    .expect("encodes");
    send.write_all(&header).await.expect("writes");
    send.finish().expect("finishes");
    let answer = tokio::time::timeout(WAIT, recv.read_to_end(4096))
        .await
        .expect("in time")
        .expect("an answer");
    match backbone_protocol::codec::decode_frame(&answer, 4096, backbone_protocol::Phase::Any) {
        Ok(backbone_protocol::Decoded::Frame { frame, .. }) => assert_invalid_request_id(frame),
        other => panic!("expected a frame on the stream, got {other:?}"),
    }

    // Nothing was stored: the mailbox is empty, and the session goes on.
    raw.send(&Frame::Ping(Ping { nonce: 5 }))
        .await
        .expect("sends");
    match tokio::time::timeout(WAIT, raw.recv())
        .await
        .expect("in time")
        .expect("pong")
    {
        Frame::Pong(pong) => assert_eq!(pong.nonce, 5),
        other => panic!("expected the Pong and no push, got {other:?}"),
    }
    raw.close().await;
    let owner = Identity {
        signing: identity,
        encryption: backbone_client::envelope::EncryptionKeypair::generate(),
    };
    let client = backbone_client::Client::connect(owner.options(&broker))
        .await
        .expect("connects");
    assert_no_delivery(&client, Duration::from_millis(500)).await;
    broker.shutdown().await;
}

/// Asserts that `frame` refuses a request with id 0: `InvalidRequestId`,
/// itself with id 0.
fn assert_invalid_request_id(frame: Frame) {
    match frame {
        Frame::Error(error) => {
            assert_eq!(error.request_id, 0);
            assert_eq!(
                error.code,
                ErrorCode::InvalidRequestId as u16,
                "{}",
                error.message
            );
        }
        other => panic!("expected InvalidRequestId, got {other:?}"),
    }
}

async fn expect_error(raw: &mut RawConnection, code: ErrorCode) {
    match tokio::time::timeout(WAIT, raw.recv())
        .await
        .expect("in time")
        .expect("frame")
    {
        Frame::Error(error) => assert_eq!(error.code, code as u16, "{}", error.message),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_device_that_never_acks_gets_at_most_the_push_window() {
    let broker = TestBroker::start_with(|config| config.limits.push_window = 8).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    for n in 0..100u32 {
        alice_client
            .send_envelope(&[bob.address()], n.to_le_bytes().to_vec(), HOUR)
            .await
            .expect("sent");
    }
    let mut seqs = Vec::new();
    for _ in 0..8 {
        seqs.push(next_delivery(&bob_client, WAIT).await.seq);
    }
    assert_no_delivery(&bob_client, Duration::from_millis(500)).await;
    // Acking opens the window again, in order.
    bob_client.ack(seqs[3]).await.expect("acks");
    let next = next_delivery(&bob_client, WAIT).await;
    assert_eq!(next.seq, seqs[7] + 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_mid_stream_loses_nothing_and_redelivers_nothing_acked() {
    let mut broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    let mut sent = Vec::new();
    for n in 0..30u32 {
        sent.push(
            alice_client
                .send_envelope(&[bob.address()], n.to_le_bytes().to_vec(), HOUR)
                .await
                .expect("sent")
                .stored[0]
                .seq,
        );
    }
    let mut received = Vec::new();
    for _ in 0..10 {
        let delivery = next_delivery(&bob_client, WAIT).await;
        bob_client.ack(delivery.seq).await.expect("acks");
        received.push(delivery.seq);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The broker restarts under the client: the client reconnects by itself.
    broker.restart().await;
    for n in 30..40u32 {
        sent.push(alice_client_send(&alice, &broker, &bob, n).await);
    }
    while received.len() < sent.len() {
        let delivery = next_delivery(&bob_client, Duration::from_secs(20)).await;
        bob_client.ack(delivery.seq).await.expect("acks");
        received.push(delivery.seq);
    }
    assert_eq!(received, sent, "every envelope exactly once, in order");
    assert_no_delivery(&bob_client, Duration::from_millis(300)).await;
    drop(alice_client);
    broker.shutdown().await;
}

async fn alice_client_send(alice: &Identity, broker: &TestBroker, bob: &Identity, n: u32) -> u64 {
    let client = backbone_client::Client::connect(alice.options(broker))
        .await
        .expect("connects");
    client
        .send_envelope(&[bob.address()], n.to_le_bytes().to_vec(), HOUR)
        .await
        .expect("sent")
        .stored[0]
        .seq
}

#[tokio::test]
async fn a_tampered_envelope_is_rejected_by_the_receiver() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let alice_client = alice.connect(&broker).await;
    let card = alice_client.fetch_card(&bob.address()).await.expect("card");
    let mut sealed = backbone_client::envelope::seal(
        &alice.signing,
        &[(bob.address(), card.encryption_key)],
        b"original",
        1,
    )
    .expect("seals");
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    alice_client
        .send_envelope(&[bob.address()], sealed, HOUR)
        .await
        .expect("broker stores opaque bytes");
    let (_, error) = bob_client
        .next_message()
        .await
        .expect("running")
        .expect_err("tampering detected");
    assert!(
        matches!(error, ClientError::Envelope(EnvelopeError::DecryptFailed)),
        "{error}"
    );

    // Sealed for someone else: mis-addressed.
    let carol = Identity::new();
    let misaddressed = backbone_client::envelope::seal(
        &alice.signing,
        &[(carol.address(), carol.encryption.public())],
        b"x",
        1,
    )
    .expect("seals");
    alice_client
        .send_envelope(&[bob.address()], misaddressed, HOUR)
        .await
        .expect("stored");
    let (_, error) = bob_client
        .next_message()
        .await
        .expect("running")
        .expect_err("not for bob");
    assert!(
        matches!(error, ClientError::Envelope(EnvelopeError::NotForMe)),
        "{error}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn forged_cards_are_refused_by_the_broker() {
    let broker = TestBroker::start().await;
    let identity = Keypair::generate();
    let mallory = Keypair::generate();
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&identity))
        .await
        .expect("auth");
    // A card for another identity.
    let foreign = IdentityCard::sign(&mallory, EncryptionKey([1; 32]), 1);
    raw.send(&Frame::PublishCard(backbone_protocol::frame::PublishCard {
        request_id: 1,
        card: foreign,
    }))
    .await
    .expect("sends");
    expect_error(&mut raw, ErrorCode::InvalidCard).await;
    // Its own card with the encryption key swapped after signing.
    let mut swapped = IdentityCard::sign(&identity, EncryptionKey([1; 32]), 1);
    swapped.encryption_key = EncryptionKey([2; 32]);
    raw.send(&Frame::PublishCard(backbone_protocol::frame::PublishCard {
        request_id: 2,
        card: swapped,
    }))
    .await
    .expect("sends");
    expect_error(&mut raw, ErrorCode::InvalidCard).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn idle_mailbox_actors_stop_so_memory_follows_active_mailboxes() {
    let broker =
        TestBroker::start_with(|config| config.mailbox.idle_timeout = Duration::from_millis(200))
            .await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let recipients: Vec<_> = (0..20).map(|_| Identity::new()).collect();
    for recipient in &recipients {
        recipient.connect(&broker).await;
    }
    for recipient in &recipients {
        alice_client
            .send_envelope(&[recipient.address()], vec![1], HOUR)
            .await
            .expect("sent");
    }
    assert!(broker.broker().active_mailboxes() >= 20);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Alice is still connected, and her mailbox's actor stopped all the same.
    assert_eq!(broker.broker().active_mailboxes(), 0);
    // A stopped mailbox comes back with its envelopes.
    let client = recipients[0].connect(&broker).await;
    next_delivery(&client, WAIT).await;
    drop(alice_client);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_connected_device_keeps_no_actor_and_still_gets_pushes() {
    let broker =
        TestBroker::start_with(|config| config.mailbox.idle_timeout = Duration::from_millis(200))
            .await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    // Subscribing started no actor: nothing was written to Bob's mailbox.
    assert_eq!(broker.broker().active_mailboxes(), 0);
    let alice_client = alice.connect(&broker).await;
    for round in 0..3u8 {
        let ack = alice_client
            .send_envelope(&[bob.address()], vec![round], HOUR)
            .await
            .expect("sent");
        let delivery = next_delivery(&bob_client, WAIT).await;
        assert_eq!(delivery.seq, ack.stored[0].seq);
        assert_eq!(delivery.envelope, &[round][..]);
        // Wait for Bob's actor to stop while he stays connected: the next
        // envelope starts a new one, which must push to him too.
        eventually("every actor stops", WAIT, async || {
            broker.broker().active_mailboxes() == 0
        })
        .await;
    }
    assert_no_delivery(&bob_client, Duration::from_millis(200)).await;
    // Both are still connected, so both mailboxes are watched; once they
    // leave, nothing is left behind.
    assert_eq!(broker.broker().watched_mailboxes(), 2);
    drop((alice_client, bob_client));
    eventually(
        "no watch is left after the sessions ended",
        WAIT,
        async || broker.broker().watched_mailboxes() == 0,
    )
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_forged_card_served_by_the_broker_is_rejected_by_the_client() {
    // The store plays a malicious broker: under Bob's address it serves a card
    // with Bob's signing key but Mallory's encryption key.
    let store = std::sync::Arc::new(backbone_broker::store::MemoryStore::new());
    let (alice, bob, mallory) = (Identity::new(), Identity::new(), Identity::new());
    let genuine = IdentityCard::sign(&bob.signing, bob.encryption.public(), 1);
    let forged = IdentityCard {
        encryption_key: mallory.encryption.public(),
        ..genuine
    };
    backbone_broker::store::CardStore::put_card(store.as_ref(), &forged).expect("stored");
    let broker = TestBroker::start_with_store(store).await;
    let alice_client = backbone_client::Client::connect(alice.options(&broker))
        .await
        .expect("connects");
    let error = alice_client
        .fetch_card(&bob.address())
        .await
        .expect_err("forged card refused");
    assert!(matches!(error, ClientError::Card(_)), "{error}");
    let error = alice_client
        .send(&[bob.address()], b"for bob only", HOUR)
        .await
        .expect_err("nothing sealed to mallory");
    assert!(matches!(error, ClientError::Card(_)), "{error}");
    broker.shutdown().await;
}
