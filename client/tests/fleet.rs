//! A sharded fleet on loopback: several real brokers sharing a fleet map and
//! a fleet CA, clients entering through any node.

mod support;

use std::time::Duration;

use backbone_broker::fleet::LinkState;
use backbone_protocol::ErrorCode;
use support::{TestFleet, next_delivery};

const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn clients_are_redirected_home_and_sends_cross_nodes() {
    let fleet = TestFleet::start(3).await;
    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let carol = fleet.identity_on(2);
    // Everyone enters through a node that is not their home.
    let bob_client = fleet.connect(&bob, 2).await;
    let carol_client = fleet.connect(&carol, 0).await;
    let alice_client = fleet.connect(&alice, 1).await;

    // Fetching bob's card from alice's home node (0) goes to bob's (1).
    let ack = alice_client
        .send(&[bob.address()], b"across the fleet", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("in time")
        .expect("running")
        .expect("opens");
    assert_eq!(message.opened.plaintext, b"across the fleet");
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(message.delivery.seq, ack.stored[0].seq);

    // One send to a local and two remote recipients: one message id, durable
    // on every owner before the ack.
    let recipients = [alice.address(), bob.address(), carol.address()];
    let ack = alice_client
        .send(&recipients, b"to everyone", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 3, "{ack:?}");
    for client in [&alice_client, &bob_client, &carol_client] {
        let delivery = next_delivery(client, WAIT).await;
        assert_eq!(delivery.message_id, ack.message_id);
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_down_owner_fails_only_its_recipients_and_recovers() {
    let mut fleet = TestFleet::start(3).await;
    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let carol = fleet.identity_on(2);
    fleet.connect(&bob, 1).await;
    fleet.connect(&carol, 2).await;
    let alice_client = fleet.connect(&alice, 0).await;
    alice_client
        .send(&[bob.address()], b"before", HOUR)
        .await
        .expect("sent");

    fleet.stop(1).await;
    // The link notices the node is gone (it said goodbye on shutdown).
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.nodes[0]
        .broker()
        .link_states()
        .iter()
        .any(|(name, state)| name == "node-1" && *state == LinkState::Up)
    {
        assert!(tokio::time::Instant::now() < deadline, "link stays up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ack = alice_client
        .send(&[bob.address(), carol.address()], b"while down", HOUR)
        .await
        .expect("the send itself is answered");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    assert_eq!(ack.stored[0].address, carol.address());
    assert_eq!(ack.failed.len(), 1, "{ack:?}");
    let failed = ack.failed[0];
    assert_eq!(failed.address, bob.address());
    assert_eq!(failed.code, ErrorCode::ShardUnavailable as u16);
    assert_eq!(failed.retry_after_ms, Some(1000));

    // Back up: the retry goes through, and bob gets both stored messages.
    fleet.nodes[1].restart().await;
    fleet.wait_links_up().await;
    let ack = alice_client
        .send(&[bob.address()], b"after", HOUR)
        .await
        .expect("sent");
    assert_eq!(ack.stored.len(), 1, "{ack:?}");
    let bob_client = fleet.connect(&bob, 1).await;
    let mut texts = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(WAIT, bob_client.next_message())
            .await
            .expect("in time")
            .expect("running")
            .expect("opens");
        texts.push(message.opened.plaintext);
    }
    assert_eq!(texts, vec![b"before".to_vec(), b"after".to_vec()]);
    fleet.shutdown().await;
}

#[tokio::test]
async fn nodes_with_different_maps_refuse_to_route_to_each_other() {
    // Node 1 loads the same slots under another epoch: a map mismatch.
    let fleet = TestFleet::start_with(2, |index, config| {
        if index == 1 {
            let file = config.fleet.file.clone().expect("fleet file");
            let text = std::fs::read_to_string(&file)
                .expect("map")
                .replace("epoch = 1", "epoch = 2");
            let other = file.with_file_name("fleet-epoch-2.toml");
            std::fs::write(&other, text).expect("write");
            config.fleet.file = Some(other);
        }
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let reason = loop {
        let states = fleet.nodes[0].broker().link_states();
        if let [(_, LinkState::Refused(reason))] = &states[..] {
            break reason.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reason.contains("fleet map mismatch"), "{reason}");
    assert!(reason.contains("epoch 2"), "{reason}");

    let alice = fleet.identity_on(0);
    let bob = fleet.identity_on(1);
    let alice_client = fleet.connect(&alice, 0).await;
    let ack = alice_client
        .send_envelope(&[bob.address()], b"opaque".to_vec(), HOUR)
        .await
        .expect("answered");
    assert!(ack.stored.is_empty(), "{ack:?}");
    assert_eq!(ack.failed[0].code, ErrorCode::ShardUnavailable as u16);
    let error = alice_client
        .fetch_card(&bob.address())
        .await
        .expect_err("no route to bob's card");
    assert_eq!(error.code(), Some(ErrorCode::ShardUnavailable), "{error}");
    fleet.shutdown().await;
}
