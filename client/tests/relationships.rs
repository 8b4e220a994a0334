//! Relationships, consent and inbound policies end to end: requests through a
//! template's capability, decisions, notices to both sides, the
//! `relationships-only` policy refusing strangers, and a sealed send's
//! capability counting as consent.

mod support;

use std::time::Duration;

use backbone_client::transport::RawConnection;
use backbone_client::{
    Client, ClientError, DeliveryCapability, Event, SealedOptions, SealedSender,
};
use backbone_protocol::bytes::Blob;
use backbone_protocol::frame::{SealedSend, Send, SendAck};
use backbone_protocol::relationship::{
    Decision, InboundPolicy, NOTICE_PREFIX, Notice, Relationship, Role, State,
};
use backbone_protocol::{Address, ErrorCode, Frame};
use support::{Identity, TestBroker, TestFleet};

const TTL: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(10);

/// The next event, failing the test after [`WAIT`].
async fn next_event(client: &Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("an event arrives in time")
        .expect("the client runs")
}

/// The next event, which must be a relationship notice about `peer`.
async fn next_notice(client: &Client, peer: &Address) -> (Relationship, Option<Blob>) {
    match next_event(client).await {
        Event::Notice(
            delivery,
            Notice::Relationship {
                relationship,
                intro,
            },
        ) => {
            assert_eq!(delivery.sender, Some(*peer), "a notice names its peer");
            assert_eq!(relationship.peer, *peer);
            client.ack(delivery.seq).await.expect("acks");
            (relationship, intro)
        }
        other => panic!("expected a relationship notice, got {other:?}"),
    }
}

/// The next event, which must be a message from `sender` with `text`.
async fn expect_message(client: &Client, sender: &Address, text: &[u8]) {
    match next_event(client).await {
        Event::Message(message) => {
            assert_eq!(message.opened.sender, *sender);
            assert_eq!(message.opened.plaintext, text);
            client.ack(message.delivery.seq).await.expect("acks");
        }
        other => panic!("expected a message, got {other:?}"),
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

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(value) => panic!("expected a refusal, got {value:?}"),
        Err(error) => error.code(),
    }
}

/// Bob publishes a template: registers a capability that he would hand out
/// inside a token (the token service carries it; here it is passed directly).
async fn template(owner: &Client) -> DeliveryCapability {
    let capability = DeliveryCapability::random();
    owner
        .register_capability(&capability)
        .await
        .expect("registers");
    capability
}

#[tokio::test]
async fn a_stranger_is_refused_until_the_owner_accepts_and_again_after_termination() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
    let (a, b) = (alice.address(), bob.address());

    let (policy, none) = bob_client.relationships().await.expect("lists");
    assert_eq!(policy, InboundPolicy::Anyone, "the default policy");
    assert!(none.is_empty());
    bob_client
        .set_inbound_policy(InboundPolicy::RelationshipsOnly)
        .await
        .expect("sets the policy");

    // A stranger is refused, with a typed error and nothing stored.
    let ack = alice_client.send(&[b], b"hi", TTL).await.expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));
    // Bob's own devices still reach his mailbox.
    let own = bob_client
        .send(&[b], b"note to self", TTL)
        .await
        .expect("sent");
    assert!(own.failed.is_empty(), "{own:?}");
    expect_message(&bob_client, &b, b"note to self").await;

    // Alice asks, through Bob's template, with an introduction.
    let capability = template(&bob_client).await;
    let mine = alice_client
        .request_relationship(&b, &capability, b"Alice from the conference")
        .await
        .expect("requests");
    assert_eq!(
        (mine.peer, mine.role, mine.state),
        (b, Role::Requester, State::Pending)
    );
    let (theirs, intro) = next_notice(&bob_client, &a).await;
    assert_eq!(
        (theirs.id, theirs.role, theirs.state),
        (mine.id, Role::Owner, State::Pending)
    );
    let intro = bob_client
        .open_intro(&a, &intro.expect("a request carries the introduction").0)
        .expect("the introduction opens and Alice signed it");
    assert_eq!(intro.plaintext, b"Alice from the conference");
    // Alice's own devices learn of it too.
    let (echo, _) = next_notice(&alice_client, &b).await;
    assert_eq!(echo, mine);

    // Pending is not consent.
    let ack = alice_client
        .send(&[b], b"hi?", TTL)
        .await
        .expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));

    // Bob accepts; both sides are told, and Alice gets through.
    let accepted = bob_client
        .decide_relationship(&a, Decision::Accept)
        .await
        .expect("accepts");
    assert_eq!(accepted.state, State::Active);
    assert_eq!(next_notice(&alice_client, &b).await.0.state, State::Active);
    assert_eq!(next_notice(&bob_client, &a).await.0.state, State::Active);
    let ack = alice_client
        .send(&[b], b"hello Bob", TTL)
        .await
        .expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    expect_message(&bob_client, &a, b"hello Bob").await;
    let (_, listed) = alice_client.relationships().await.expect("lists");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].peer, listed[0].state), (b, State::Active));

    // Alice ends it: Bob's mailbox refuses her again.
    let ended = alice_client
        .decide_relationship(&b, Decision::Terminate)
        .await
        .expect("terminates");
    assert_eq!(ended.state, State::Terminated);
    assert_eq!(
        next_notice(&bob_client, &a).await.0.state,
        State::Terminated
    );
    let ack = alice_client
        .send(&[b], b"still there?", TTL)
        .await
        .expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));
}

#[tokio::test]
async fn wrong_moves_are_typed_errors_and_a_rejected_requester_may_ask_again() {
    let broker = TestBroker::start_with(|config| {
        config.relationships.default_inbound_policy = InboundPolicy::RelationshipsOnly;
    })
    .await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
    let (a, b) = (alice.address(), bob.address());

    // The configured default applies to identities that never chose.
    let ack = alice_client.send(&[b], b"hi", TTL).await.expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));

    // A capability Bob never registered, or revoked, admits no request.
    let forged = DeliveryCapability::random();
    assert_eq!(
        code(alice_client.request_relationship(&b, &forged, b"").await),
        Some(ErrorCode::UnknownCapability)
    );
    let revoked = template(&bob_client).await;
    bob_client
        .revoke_capability(&revoked.hash())
        .await
        .expect("revokes");
    assert_eq!(
        code(alice_client.request_relationship(&b, &revoked, b"").await),
        Some(ErrorCode::UnknownCapability)
    );
    // Nobody asks themselves, and there is nothing to decide without a request.
    let capability = template(&bob_client).await;
    assert_eq!(
        code(bob_client.request_relationship(&b, &capability, b"").await),
        Some(ErrorCode::InvalidRecipients)
    );
    assert_eq!(
        code(bob_client.decide_relationship(&a, Decision::Accept).await),
        Some(ErrorCode::NotFound)
    );

    let first = alice_client
        .request_relationship(&b, &capability, b"")
        .await
        .expect("requests");
    // Asking again while pending is answered with the same request.
    let again = alice_client
        .request_relationship(&b, &capability, b"")
        .await
        .expect("repeats");
    assert_eq!(again.id, first.id);
    // Only the owner decides on a request.
    assert_eq!(
        code(alice_client.decide_relationship(&b, Decision::Accept).await),
        Some(ErrorCode::InvalidTransition)
    );
    // The owner rejects rather than terminates a pending request.
    assert_eq!(
        code(
            bob_client
                .decide_relationship(&a, Decision::Terminate)
                .await
        ),
        Some(ErrorCode::InvalidTransition)
    );
    let rejected = bob_client
        .decide_relationship(&a, Decision::Reject)
        .await
        .expect("rejects");
    assert_eq!(rejected.state, State::Rejected);
    // Final: no decision changes it.
    for decision in [Decision::Accept, Decision::Reject, Decision::Terminate] {
        assert_eq!(
            code(bob_client.decide_relationship(&a, decision).await),
            Some(ErrorCode::InvalidTransition),
            "{decision:?}"
        );
    }
    let (_, mine) = alice_client.relationships().await.expect("lists");
    assert_eq!(
        mine[0].state,
        State::Rejected,
        "the requester's side agrees"
    );
    let ack = alice_client.send(&[b], b"hi", TTL).await.expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));

    // A new request is a new relationship.
    let second = alice_client
        .request_relationship(&b, &capability, b"")
        .await
        .expect("asks again");
    assert_ne!(second.id, first.id);
    assert_eq!(second.state, State::Pending);
    // Alice, also relationships-only, may not be asked by Bob while her
    // request to him is pending: he decides on hers instead.
    let alices = template(&alice_client).await;
    assert_eq!(
        code(bob_client.request_relationship(&a, &alices, b"").await),
        Some(ErrorCode::InvalidTransition)
    );
    bob_client
        .decide_relationship(&a, Decision::Accept)
        .await
        .expect("accepts");
    // Active consent runs both ways.
    let ack = bob_client.send(&[a], b"welcome", TTL).await.expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let ack = alice_client.send(&[b], b"thanks", TTL).await.expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
}

#[tokio::test]
async fn a_delivery_capability_counts_as_consent_for_sealed_sends() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    bob_client
        .set_inbound_policy(InboundPolicy::RelationshipsOnly)
        .await
        .expect("sets the policy");
    let capability = template(&bob_client).await;
    let sender = SealedSender::connect(
        broker.connect_config(),
        SealedOptions::new(alice.signing.clone()),
    )
    .await
    .expect("an anonymous session opens");
    let ack = sender
        .send_sealed(&bob.address(), &capability, b"sealed, with consent", TTL)
        .await
        .expect("sends");
    assert!(ack.failed.is_empty(), "{ack:?}");
    match next_event(&bob_client).await {
        Event::Message(message) => {
            assert_eq!(message.opened.plaintext, b"sealed, with consent");
            assert_eq!(message.opened.sender, alice.address());
        }
        other => panic!("expected the sealed message, got {other:?}"),
    }
    // Without a registered capability there is no way in.
    let ack = sender
        .send_sealed(&bob.address(), &DeliveryCapability::random(), b"x", TTL)
        .await
        .expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::UnknownCapability));
}

#[tokio::test]
async fn envelopes_that_look_like_broker_notices_are_refused() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
    let mut forged = NOTICE_PREFIX.to_vec();
    forged.extend_from_slice(b"relationship accepted, honest");
    let answer = alice_client
        .send_envelope(&[bob.address()], forged.clone(), TTL)
        .await;
    assert_eq!(code(answer), Some(ErrorCode::ReservedEnvelope));

    // The same through a raw anonymous session's sealed send.
    let capability = template(&bob_client).await;
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.open_anonymous().await.expect("anonymous");
    raw.send(&Frame::SealedSend(SealedSend {
        request_id: 1,
        ttl_secs: 60,
        recipient: bob.address(),
        capability,
        envelope: Blob::from(forged.clone()),
    }))
    .await
    .expect("sends");
    match raw.recv().await.expect("answered") {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::ReservedEnvelope as u16),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // And on a raw authenticated session, bypassing the client library.
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&backbone_client::Credentials::primary(&alice.signing))
        .await
        .expect("auth");
    raw.send(&Frame::Send(Send {
        request_id: 1,
        ttl_secs: 60,
        recipients: vec![bob.address()],
        envelope: Blob::from(forged),
    }))
    .await
    .expect("sends");
    match raw.recv().await.expect("answered") {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::ReservedEnvelope as u16),
        other => panic!("expected a refusal, got {other:?}"),
    }
    support::assert_no_delivery(&bob_client, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn relationship_requests_are_rate_limited_per_requester() {
    let broker = TestBroker::start_with(|config| {
        config.relationships.requests_per_minute = 1;
        config.relationships.request_burst = 2;
    })
    .await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let mut owners = Vec::new();
    for _ in 0..3 {
        let owner = Identity::new();
        let client = owner.connect(&broker).await;
        let capability = template(&client).await;
        owners.push((owner.address(), capability, client));
    }
    for (owner, capability, _) in &owners[..2] {
        alice_client
            .request_relationship(owner, capability, b"")
            .await
            .expect("within the burst");
    }
    let (owner, capability, owner_client) = &owners[2];
    match alice_client
        .request_relationship(owner, capability, b"")
        .await
    {
        Err(ClientError::Server {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(ErrorCode::from_u16(code), Some(ErrorCode::RateLimited));
            assert!(
                retry_after_ms.is_some_and(|ms| ms > 1000),
                "{retry_after_ms:?}"
            );
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    // The refused request left nothing behind at the owner.
    let (_, records) = owner_client.relationships().await.expect("lists");
    assert!(records.is_empty(), "{records:?}");
}

#[tokio::test]
async fn policies_and_relationships_survive_a_restart() {
    let mut broker = TestBroker::start().await;
    let (alice, bob, carol) = (Identity::new(), Identity::new(), Identity::new());
    let (a, b) = (alice.address(), bob.address());
    {
        let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
        bob_client
            .set_inbound_policy(InboundPolicy::RelationshipsOnly)
            .await
            .expect("sets");
        let capability = template(&bob_client).await;
        alice_client
            .request_relationship(&b, &capability, b"")
            .await
            .expect("requests");
        bob_client
            .decide_relationship(&a, Decision::Accept)
            .await
            .expect("accepts");
    }
    broker.restart().await;
    let (alice_client, carol_client) = (alice.connect(&broker).await, carol.connect(&broker).await);
    let ack = alice_client.send(&[b], b"after", TTL).await.expect("sent");
    assert!(ack.failed.is_empty(), "the relationship survived: {ack:?}");
    let ack = carol_client
        .send(&[b], b"me too", TTL)
        .await
        .expect("answered");
    assert_eq!(
        refused(&ack),
        Some(ErrorCode::NotConsented),
        "the policy survived"
    );
}

#[tokio::test]
async fn a_relationship_spans_two_nodes_of_a_fleet() {
    let fleet = TestFleet::start(2).await;
    fleet.wait_links_up().await;
    let (alice, bob) = (fleet.identity_on(0), fleet.identity_on(1));
    let (a, b) = (alice.address(), bob.address());
    let (alice_client, bob_client) = (fleet.connect(&alice, 0).await, fleet.connect(&bob, 1).await);
    bob_client
        .set_inbound_policy(InboundPolicy::RelationshipsOnly)
        .await
        .expect("sets");
    let ack = alice_client.send(&[b], b"hi", TTL).await.expect("answered");
    assert_eq!(
        refused(&ack),
        Some(ErrorCode::NotConsented),
        "refused on Bob's node"
    );

    let capability = template(&bob_client).await;
    let mine = alice_client
        .request_relationship(&b, &capability, b"across nodes")
        .await
        .expect("requests across the link");
    let (theirs, intro) = next_notice(&bob_client, &a).await;
    assert_eq!(theirs.id, mine.id);
    let opened = bob_client
        .open_intro(&a, &intro.expect("intro").0)
        .expect("opens");
    assert_eq!(opened.plaintext, b"across nodes");
    next_notice(&alice_client, &b).await;

    bob_client
        .decide_relationship(&a, Decision::Accept)
        .await
        .expect("accepts across the link");
    assert_eq!(next_notice(&alice_client, &b).await.0.state, State::Active);
    let ack = alice_client.send(&[b], b"hello", TTL).await.expect("sent");
    assert!(ack.failed.is_empty(), "{ack:?}");
}

#[tokio::test]
async fn a_policy_whose_flush_failed_is_enforced_as_stored() {
    let store = std::sync::Arc::new(backbone_broker::store::MemoryStore::new());
    let broker = TestBroker::start_with_store(store.clone()).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let (alice_client, bob_client) = (alice.connect(&broker).await, bob.connect(&broker).await);
    let b = bob.address();

    // The policy is written but its flush fails: Bob is told it failed,
    // and the store may hold it anyway (here it does).
    store.inject_flush_failures(1);
    assert_eq!(
        code(
            bob_client
                .set_inbound_policy(InboundPolicy::RelationshipsOnly)
                .await
        ),
        Some(ErrorCode::StorageFailure)
    );
    let (policy, _) = bob_client.relationships().await.expect("lists");
    assert_eq!(policy, InboundPolicy::RelationshipsOnly, "what is stored");
    // The mailbox admits by what is stored, not by what it held before.
    let ack = alice_client.send(&[b], b"hi", TTL).await.expect("answered");
    assert_eq!(refused(&ack), Some(ErrorCode::NotConsented));
    broker.shutdown().await;
}
