//! Identity deletion end to end: scheduling and cancelling, the purge after
//! the grace period (every record of the identity gone from the data
//! directory but its tombstone), the tombstone refusing the key and every
//! way of reaching the address, peers told (on the same node and across a
//! fleet, also when the peer's node was down), and deletions surviving a
//! restart and moving with their slot.

mod support;

use std::time::Duration;

use backbone_broker::store::SledStore;
use backbone_broker::store::prelude::*;
use backbone_client::transport::RawConnection;
use backbone_client::{
    Client, ClientError, Credentials, DeliveryCapability, Event, Status, TokenError, TokenFetcher,
};
use backbone_protocol::bytes::Blob;
use backbone_protocol::deletion::Deletion;
use backbone_protocol::frame::{RequestRelationship, SealedSend, SendAck};
use backbone_protocol::relationship::{Decision, InboundPolicy, Notice, Relationship, Role, State};
use backbone_protocol::{Address, DeviceCertificate, ErrorCode, Frame, Keypair};
use support::{Identity, TestBroker, TestFleet, eventually};

/// Long enough that nothing expires when the tests move the clock by hours.
const TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const WAIT: Duration = Duration::from_secs(15);
const GRACE: Duration = Duration::from_secs(3600);

fn with_grace(config: &mut backbone_broker::Config) {
    config.identity.deletion_grace = GRACE;
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(value) => panic!("expected a refusal, got {value:?}"),
        Err(error) => error.code(),
    }
}

/// The one recipient's failure code of a send.
fn refused(ack: &SendAck) -> Option<ErrorCode> {
    assert!(ack.stored.is_empty(), "nothing stored: {ack:?}");
    let [failed] = ack.failed[..] else {
        panic!("one failed recipient: {ack:?}");
    };
    ErrorCode::from_u16(failed.code)
}

/// Whether `identity` is refused at authentication with `IdentityDeleted`.
async fn refused_at_auth(config: &backbone_client::ConnectConfig, identity: &Identity) -> bool {
    let mut raw = RawConnection::connect(config).await.expect("connects");
    let mut result = raw
        .authenticate(&Credentials::primary(&identity.signing))
        .await;
    // Through a node that is not the identity's home: follow the redirect.
    if let Err(ClientError::Redirect(node)) = &result {
        let mut config = config.clone();
        config.server = node.clone();
        raw = RawConnection::connect(&config).await.expect("connects");
        result = raw
            .authenticate(&Credentials::primary(&identity.signing))
            .await;
    }
    match result {
        Ok(_) => false,
        Err(error) => {
            assert_eq!(error.code(), Some(ErrorCode::IdentityDeleted), "{error}");
            true
        }
    }
}

/// The next event, which must be an `IdentityDeleted` notice about `peer`.
async fn deleted_notice(client: &Client, peer: &Address) -> Relationship {
    loop {
        let event = tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("an event arrives in time")
            .expect("the client runs");
        match event {
            Event::Notice(delivery, Notice::IdentityDeleted { relationship }) => {
                assert_eq!(delivery.sender, Some(*peer), "the notice names its peer");
                assert_eq!(relationship.peer, *peer);
                client.ack(delivery.seq).await.expect("acks");
                return relationship;
            }
            // Earlier relationship notices and messages are not what this waits for.
            Event::Notice(delivery, Notice::Relationship { .. }) => {
                client.ack(delivery.seq).await.expect("acks");
            }
            Event::Message(message) => client.ack(message.delivery.seq).await.expect("acks"),
            Event::Unreadable(delivery, error) => {
                panic!("unreadable delivery {}: {error}", delivery.seq)
            }
        }
    }
}

/// `requester` asks `owner` for a relationship through a fresh template
/// capability; `owner` accepts it when `accept`.
async fn relate(requester: &Client, owner: &Client, accept: bool) {
    let capability = DeliveryCapability::random();
    owner
        .register_capability(&capability)
        .await
        .expect("registers a template");
    requester
        .request_relationship(&owner.address(), &capability, b"hello")
        .await
        .expect("requests");
    if accept {
        owner
            .decide_relationship(&requester.address(), Decision::Accept)
            .await
            .expect("accepts");
    }
}

#[tokio::test]
async fn a_scheduled_identity_keeps_working_and_a_cancelled_deletion_leaves_it_intact() {
    let broker = TestBroker::start_with(with_grace).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
    assert_eq!(
        code(alice_client.cancel_deletion().await),
        Some(ErrorCode::NotFound),
        "nothing to cancel yet"
    );

    let asked_at = broker.clock.load(std::sync::atomic::Ordering::SeqCst);
    let purge_at = alice_client.delete_identity().await.expect("scheduled");
    assert_eq!(purge_at, asked_at + GRACE.as_millis() as u64);
    // Asking again, later, answers the same time.
    broker.advance_clock(Duration::from_secs(60));
    assert_eq!(
        alice_client.delete_identity().await.expect("answered"),
        purge_at
    );

    // During the grace period the identity works as before.
    let ack = bob_client
        .send(&[alice.address()], b"still there?", TTL)
        .await
        .expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let message = alice_client
        .next_message()
        .await
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"still there?");
    let ack = alice_client
        .send(&[bob.address()], b"yes", TTL)
        .await
        .expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    alice_client.publish_card().await.expect("publishes");

    alice_client.cancel_deletion().await.expect("cancels");
    assert_eq!(
        code(alice_client.cancel_deletion().await),
        Some(ErrorCode::NotFound)
    );
    // Long past the time it would have been purged: nothing happened.
    broker.advance_clock(2 * GRACE);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alice_client.status(), Status::Connected);
    drop(alice_client);
    let alice_client = alice.connect(&broker).await;
    let card = bob_client
        .fetch_card(&alice.address())
        .await
        .expect("her card is served");
    assert_eq!(card.address(), alice.address());
    // The message is still stored: a new device of hers gets it again.
    let device = Keypair::generate();
    alice_client
        .register_device(DeviceCertificate::issue(&alice.signing, device.public(), 1))
        .await
        .expect("registers a device");
    let mut options = alice.options(&broker);
    options.credentials = Credentials {
        identity_key: alice.signing.public(),
        device: device.clone(),
        certificate: Some(DeviceCertificate::issue(&alice.signing, device.public(), 1)),
    };
    let second = Client::connect(options)
        .await
        .expect("the new device connects");
    let again = second.next_delivery().await.expect("running");
    assert_eq!(again.sender, Some(bob.address()));

    // A new request starts a new grace period, from now.
    let now = broker.clock.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        alice_client.delete_identity().await.expect("scheduled"),
        now + GRACE.as_millis() as u64
    );
}

/// The purge, on a real sled store: a connected client is closed and gives
/// up, peers are told, and afterwards no record of the data directory is
/// keyed by or holds the address, except the tombstone and other
/// identities' own records about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_the_identity_is_gone_from_the_data_directory() {
    let broker = TestBroker::start_with(with_grace).await;
    let (alice, bob, carol) = (Identity::new(), Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let bob_client = bob.connect(&broker).await;
    let carol_client = carol.connect(&broker).await;
    let (a, b, c) = (alice.address(), bob.address(), carol.address());

    // Everything an identity can have stored: a device, a capability, a
    // token, a policy, envelopes and a cursor, and relationships (an
    // active one with Bob, a pending request to Carol).
    let device = Keypair::generate();
    let certificate = DeviceCertificate::issue(&alice.signing, device.public(), 1);
    alice_client
        .register_device(certificate)
        .await
        .expect("registers a device");
    let capability = DeliveryCapability::random();
    alice_client
        .register_capability(&capability)
        .await
        .expect("registers a capability");
    let token = alice_client
        .create_token(b"alice's note", TTL, None)
        .await
        .expect("creates a token");
    alice_client
        .set_inbound_policy(InboundPolicy::Anyone)
        .await
        .expect("sets a policy");
    let file = alice_client
        .put_file(
            backbone_client::FileSource::Bytes(b"alice's file".to_vec().into()),
            TTL,
        )
        .await
        .expect("uploads a file");
    let file_bytes = broker.dir.path().join("files").join(hex::encode(file.id.0));
    assert!(file_bytes.exists());
    relate(&alice_client, &bob_client, true).await;
    relate(&alice_client, &carol_client, false).await;
    for text in [&b"one"[..], b"two"] {
        let ack = bob_client.send(&[a], text, TTL).await.expect("sent");
        assert!(ack.failed.is_empty(), "{ack:?}");
    }
    let ack = alice_client
        .send(&[b], b"from alice", TTL)
        .await
        .expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let mut last = 0;
    for _ in 0..2 {
        let delivery = tokio::time::timeout(WAIT, alice_client.next_delivery())
            .await
            .expect("in time")
            .expect("running");
        last = last.max(delivery.seq);
    }
    alice_client.ack(last).await.expect("acks");

    alice_client.delete_identity().await.expect("scheduled");
    broker.advance_clock(GRACE);

    // The connected client is closed with IdentityDeleted and gives up.
    eventually("the deleted identity's client stops", WAIT, async || {
        matches!(alice_client.status(), Status::Stopped(reason) if reason.contains("identity was deleted"))
    })
    .await;
    // Both peers are told, whichever side asked; their sides end.
    let bobs = deleted_notice(&bob_client, &a).await;
    assert_eq!((bobs.role, bobs.state), (Role::Owner, State::Terminated));
    let carols = deleted_notice(&carol_client, &a).await;
    assert_eq!(
        (carols.role, carols.state),
        (Role::Owner, State::Terminated)
    );
    let (_, listed) = bob_client.relationships().await.expect("lists");
    assert_eq!(listed, vec![bobs]);
    assert_eq!(
        code(
            bob_client
                .decide_relationship(&a, Decision::Terminate)
                .await
        ),
        Some(ErrorCode::InvalidTransition),
        "already ended"
    );
    assert!(refused_at_auth(&broker.connect_config(), &alice).await);
    // Her token went with her.
    let fetcher = TokenFetcher::connect(broker.connect_config())
        .await
        .expect("anonymous session");
    assert!(matches!(
        fetcher.get(&token, None).await,
        Err(ClientError::Token(TokenError::NotFound))
    ));
    fetcher.close().await;
    // So did her file, record and bytes.
    let mut sink = Vec::new();
    assert_eq!(
        code(bob_client.get_file(&file, &mut sink).await),
        Some(ErrorCode::NotFound)
    );
    assert!(!file_bytes.exists(), "her file's bytes are still on disk");
    assert_eq!(
        std::fs::read_dir(broker.dir.path().join("files"))
            .expect("the file directory")
            .count(),
        0
    );

    // What Bob and Carol hold about her stays theirs: the relationship
    // records, the notices, her message to Bob.
    drop((alice_client, bob_client, carol_client));
    // Stopped, but its data directory kept until the end of the test.
    let mut broker = broker;
    broker
        .broker
        .take()
        .expect("running")
        .shutdown()
        .await
        .expect("clean shutdown");
    let store = SledStore::open(&broker.dir.path().join("store")).expect("opens the store");
    let records = store.dump().expect("dump");
    let contains = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let (mut tombstones, mut theirs) = (0, 0);
    for record in &records {
        let holds =
            |needle: &[u8]| contains(&record.key, needle) || contains(&record.value, needle);
        // Her own secrets and records are nowhere.
        for (what, needle) in [
            ("her identity key", &alice.signing.public().as_bytes()[..]),
            ("her device", &device.public().device_id().0[..]),
            ("her capability's hash", &capability.hash().0[..]),
            ("her token", &token.id.0[..]),
            ("her file", &file.id.0[..]),
        ] {
            assert!(!holds(needle), "{what} is still in {}", record.tree);
        }
        if !holds(&a.0) {
            continue;
        }
        if record.tree == "deletions" && record.key == a.0 {
            tombstones += 1;
            let held = store.deletion(&a).expect("reads");
            assert_eq!(held, Some(Deletion::Deleted), "a bare tombstone");
            continue;
        }
        assert!(
            record.key.starts_with(&b.0) || record.key.starts_with(&c.0),
            "a record of hers is left in {}: key {}",
            record.tree,
            hex::encode(&record.key)
        );
        theirs += 1;
    }
    assert_eq!(tombstones, 1, "exactly one tombstone");
    // Their relationship records (the notices and her message to Bob are
    // envelopes in the mailbox log, not sled records).
    assert!(
        theirs >= 2,
        "the scan saw their records about her: {theirs}"
    );
    drop(store);
    // And in the mailbox log: no envelope, no head.
    let (stores, _) = backbone_broker::store::open::open(
        broker.dir.path(),
        &backbone_broker::config::StoreConfig::default(),
        backbone_protocol::unix_millis_now(),
    )
    .expect("opens the stores");
    let export =
        backbone_broker::store::export_mailbox(stores.log.as_ref(), stores.directory.as_ref(), &a)
            .expect("export");
    assert_eq!(export.head, 0);
    assert!(export.envelopes.is_empty() && export.tokens.is_empty());
    assert_eq!(export.deletion, Some(Deletion::Deleted));
    assert_eq!(stores.directory.due_deletions(u64::MAX, 10), Ok(vec![]));
    stores.log.close().expect("closes");
}

#[tokio::test]
async fn every_way_to_reach_a_deleted_identity_is_refused() {
    let broker =
        TestBroker::start_with(|config| config.identity.deletion_grace = Duration::ZERO).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let bob_client = bob.connect(&broker).await;
    let capability = DeliveryCapability::random();
    alice_client
        .register_capability(&capability)
        .await
        .expect("registers a capability");
    let a = alice.address();
    // Bob has her card cached from before.
    bob_client.fetch_card(&a).await.expect("her card");

    alice_client.delete_identity().await.expect("scheduled");
    eventually("she is purged", WAIT, async || {
        refused_at_auth(&broker.connect_config(), &alice).await
    })
    .await;

    // A send is refused for her with a typed error and not stored.
    let ack = bob_client
        .send(&[a], b"hello?", TTL)
        .await
        .expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::IdentityDeleted));
    // Her card is not served.
    let other = Identity::new().connect(&broker).await;
    assert_eq!(
        code(other.fetch_card(&a).await),
        Some(ErrorCode::IdentityDeleted)
    );
    // A sealed send with a capability she handed out, and a relationship
    // request through her template, raw so no card lookup comes first.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.open_anonymous().await.expect("anonymous");
    raw.send(&Frame::SealedSend(SealedSend {
        request_id: 1,
        ttl_secs: 60,
        recipient: a,
        capability,
        envelope: Blob::from(vec![1; 64]),
    }))
    .await
    .expect("sends");
    match raw.recv().await.expect("answered") {
        Frame::SendAck(ack) => assert_eq!(refused(&ack), Some(ErrorCode::IdentityDeleted)),
        other => panic!("expected a SendAck, got {other:?}"),
    }
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&bob.signing))
        .await
        .expect("auth");
    raw.send(&Frame::RequestRelationship(RequestRelationship {
        request_id: 2,
        owner: a,
        capability,
        intro: Blob::default(),
    }))
    .await
    .expect("sends");
    match raw.recv().await.expect("answered") {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::IdentityDeleted as u16),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Her own key can never come back.
    assert_eq!(
        code(Client::connect(alice.options(&broker)).await.map(|_| ())),
        Some(ErrorCode::IdentityDeleted)
    );
}

#[tokio::test]
async fn requests_caught_by_the_purge_fail_with_identity_deleted() {
    let broker =
        TestBroker::start_with(|config| config.identity.deletion_grace = Duration::ZERO).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = std::sync::Arc::new(alice.connect(&broker).await);
    let _bob_client = bob.connect(&broker).await;
    let b = bob.address();
    // Sends keep going, so some are in flight when the purge ends her
    // session and others come after the client stopped.
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let client = alice_client.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(error) = client.send_envelope(&[b], vec![1; 64], TTL).await {
                        return error;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    alice_client.delete_identity().await.expect("scheduled");
    for sender in senders {
        let error = tokio::time::timeout(WAIT, sender)
            .await
            .expect("the sends end")
            .expect("task");
        assert_eq!(error.code(), Some(ErrorCode::IdentityDeleted), "{error}");
    }
    assert!(matches!(alice_client.status(), Status::Stopped(_)));
    assert_eq!(
        code(alice_client.fetch_card(&b).await),
        Some(ErrorCode::IdentityDeleted),
        "a request after the stop names the reason too"
    );
}

#[tokio::test]
async fn a_scheduled_deletion_survives_a_restart_and_is_carried_out_after_it() {
    let mut broker = TestBroker::start_with(with_grace).await;
    let alice = Identity::new();
    let purge_at = {
        let client = alice.connect(&broker).await;
        client.delete_identity().await.expect("scheduled")
    };
    broker.restart().await;
    let client = alice.connect(&broker).await;
    assert_eq!(
        client.delete_identity().await.expect("answered"),
        purge_at,
        "still scheduled, for the same time"
    );
    drop(client);
    broker.restart().await;
    broker.advance_clock(GRACE);
    eventually("she is purged after the restart", WAIT, async || {
        refused_at_auth(&broker.connect_config(), &alice).await
    })
    .await;
    // And the tombstone survives the next one.
    broker.restart().await;
    assert!(refused_at_auth(&broker.connect_config(), &alice).await);
}

/// Alice on node 0 has an active relationship with Bob on node 1 and a
/// pending one with Carol on node 1 too. When her purge comes, node 1 is
/// down: her data goes anyway, and the peers are told once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_another_node_are_told_even_if_that_node_was_down() {
    let mut fleet = TestFleet::start_with(2, |_, config| with_grace(config)).await;
    fleet.wait_links_up().await;
    let (alice, bob, carol) = (
        fleet.identity_on(0),
        fleet.identity_on(1),
        fleet.identity_on(1),
    );
    let a = alice.address();
    let alice_client = fleet.connect(&alice, 0).await;
    let (bob_client, carol_client) = (fleet.connect(&bob, 1).await, fleet.connect(&carol, 1).await);
    relate(&alice_client, &bob_client, true).await;
    relate(&alice_client, &carol_client, false).await;
    alice_client.delete_identity().await.expect("scheduled");
    drop(alice_client);
    drop((bob_client, carol_client));

    fleet.stop(1).await;
    fleet.nodes[0].advance_clock(GRACE);
    eventually("she is purged while node 1 is down", WAIT, async || {
        refused_at_auth(&fleet.connect_config(0), &alice).await
    })
    .await;

    fleet.nodes[1].restart().await;
    fleet.wait_links_up().await;
    let (bob_client, carol_client) = (fleet.connect(&bob, 1).await, fleet.connect(&carol, 1).await);
    let bobs = deleted_notice(&bob_client, &a).await;
    assert_eq!(bobs.state, State::Terminated);
    let carols = deleted_notice(&carol_client, &a).await;
    assert_eq!(carols.state, State::Terminated);
    // Sends from node 1 to her address are refused by her node (bytes: a
    // sealed send would stop at her card), and her key is refused through
    // either node.
    let ack = bob_client
        .send_envelope(&[a], vec![2; 64], TTL)
        .await
        .expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::IdentityDeleted));
    assert!(refused_at_auth(&fleet.connect_config(1), &alice).await);
    let other = fleet.connect(&fleet.identity_on(1), 1).await;
    assert_eq!(
        code(other.fetch_card(&a).await),
        Some(ErrorCode::IdentityDeleted),
        "through a peer FetchCard"
    );
    // Once every peer is told (right after the last notice), the
    // tombstone is bare.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.stop(0).await;
    let store =
        SledStore::open(&fleet.nodes[0].dir.path().join("store")).expect("opens node 0's store");
    assert_eq!(store.deletion(&a), Ok(Some(Deletion::Deleted)));
}

/// An identity whose address falls in `slots`.
fn identity_in(slots: std::ops::RangeInclusive<u16>) -> Identity {
    loop {
        let identity = Identity::new();
        if slots.contains(&backbone_protocol::fleet::slot_of(&identity.address())) {
            return identity;
        }
    }
}

/// A third node takes over slots holding a deleted identity (only its
/// tombstone is left) and a scheduled one: the new owner refuses the first
/// and purges the second when its time comes; the old owner keeps neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_and_a_scheduled_deletion_move_with_their_slot() {
    // Epoch 1: node-0 owns 0-2047, node-1 owns 2048-4095.
    let mut fleet = TestFleet::start_with(2, |_, config| with_grace(config)).await;
    fleet.wait_links_up().await;
    let (gone, leaving) = (identity_in(1024..=2047), identity_in(1024..=2047));
    fleet
        .connect(&gone, 0)
        .await
        .delete_identity()
        .await
        .expect("scheduled");
    fleet.nodes[0].advance_clock(GRACE);
    eventually("the first is purged on node 0", WAIT, async || {
        refused_at_auth(&fleet.connect_config(0), &gone).await
    })
    .await;
    let purge_at = fleet
        .connect(&leaving, 0)
        .await
        .delete_identity()
        .await
        .expect("scheduled");

    // Epoch 2: node-2 owns 1024-2047, moved from node-0.
    fleet.grow_by_node_2_taking_1024_2047().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.nodes[0].broker().fleet_status()["handoffs"][0]["state"] != "done" {
        assert!(tokio::time::Instant::now() < deadline, "the handover ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The tombstone moved: node 2 refuses the deleted identity.
    assert!(refused_at_auth(&fleet.connect_config(2), &gone).await);
    // The schedule moved: the same time, and the purge happens there.
    let client = fleet.connect(&leaving, 2).await;
    assert_eq!(client.delete_identity().await.expect("answered"), purge_at);
    drop(client);
    fleet.nodes[2].advance_clock(3 * GRACE);
    eventually("the second is purged on node 2", WAIT, async || {
        refused_at_auth(&fleet.connect_config(2), &leaving).await
    })
    .await;

    // Node 0 kept no deletion record of the moved slots.
    fleet.stop(0).await;
    let store =
        SledStore::open(&fleet.nodes[0].dir.path().join("store")).expect("opens node 0's store");
    assert_eq!(store.deletion(&gone.address()), Ok(None));
    assert_eq!(store.deletion(&leaving.address()), Ok(None));
}
