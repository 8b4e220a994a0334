//! Sealed sender end to end: delivery capabilities, anonymous sessions, and
//! envelopes the broker stores without a sender.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backbone_broker::store::MemoryStore;
use backbone_broker::store::prelude::*;
use backbone_client::transport::RawConnection;
use backbone_client::{ClientError, DeliveryCapability, SealedOptions, SealedSender};
use backbone_protocol::bytes::{Blob, CapabilityHash, TokenId};
use backbone_protocol::frame::{
    Ack, CreateToken, Delete, DeleteToken, FetchCard, ListCapabilities, Ping, PublishCard,
    RegisterCapability, RevokeCapability, SealedSend, Send,
};
use backbone_protocol::{ErrorCode, Frame, IdentityCard};
use support::{Identity, TestBroker, TestFleet, next_delivery};

const TTL: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(10);

async fn sealed_sender(broker: &TestBroker, identity: &Identity) -> SealedSender {
    SealedSender::connect(
        broker.connect_config(),
        SealedOptions::new(identity.signing.clone()),
    )
    .await
    .expect("an anonymous session opens")
}

fn failure(ack: &backbone_protocol::frame::SendAck) -> (Option<ErrorCode>, Option<u32>) {
    assert!(ack.stored.is_empty(), "nothing stored: {ack:?}");
    let [failed] = ack.failed[..] else {
        panic!("one failed recipient: {ack:?}");
    };
    (ErrorCode::from_u16(failed.code), failed.retry_after_ms)
}

#[tokio::test]
async fn a_sealed_message_arrives_and_the_receiver_verifies_the_sender_which_the_broker_never_stored()
 {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let broker = TestBroker::start_with_store(store.clone()).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let capability = DeliveryCapability::random();
    let hash = bob_client
        .register_capability(&capability)
        .await
        .expect("registers");
    assert_eq!(hash, capability.hash());

    // Alice never connects as herself: only an anonymous session.
    let sender = sealed_sender(&broker, &alice).await;
    let ack = sender
        .send_sealed(&bob.address(), &capability, b"sealed hello", TTL)
        .await
        .expect("sends");
    assert!(ack.failed.is_empty(), "{ack:?}");
    assert_eq!(ack.stored.len(), 1);
    assert_eq!(ack.stored[0].address, bob.address());

    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("arrives in time")
        .expect("client runs")
        .expect("opens and verifies");
    assert_eq!(message.opened.plaintext, b"sealed hello");
    // The sender comes from the signature inside the envelope...
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(message.opened.sender_key, alice.signing.public());
    // ...and from nowhere else: the broker pushed no sender.
    assert_eq!(message.delivery.sender, None);

    // The stored record has no sender either, and no record anywhere in the
    // store names Alice: she has no mailbox, card or cursor.
    let stored = store
        .read_from(&bob.address(), 0, 10, 0)
        .expect("reads the store");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sender, None);
    assert_eq!(
        store.addresses(&|address| *address == alice.address()),
        Ok(vec![])
    );
    assert_eq!(
        store.mailboxes(&|address| *address == alice.address()),
        vec![]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn unknown_and_revoked_capabilities_are_refused_and_listing_shows_what_is_registered() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let (kept, revoked) = (DeliveryCapability::random(), DeliveryCapability::random());
    bob_client.register_capability(&kept).await.expect("kept");
    bob_client
        .register_capability(&revoked)
        .await
        .expect("revoked");
    // Registering again changes nothing.
    bob_client.register_capability(&kept).await.expect("again");
    let mut both = vec![kept.hash(), revoked.hash()];
    both.sort();
    assert_eq!(bob_client.list_capabilities().await.expect("lists"), both);

    let sender = sealed_sender(&broker, &alice).await;
    let send = |capability: DeliveryCapability| {
        let sender = &sender;
        let bob = bob.address();
        async move {
            sender
                .send_sealed(&bob, &capability, b"hi", TTL)
                .await
                .expect("answered")
        }
    };
    assert!(send(revoked).await.failed.is_empty());

    bob_client
        .revoke_capability(&revoked.hash())
        .await
        .expect("revokes");
    assert_eq!(
        bob_client.list_capabilities().await.expect("lists"),
        vec![kept.hash()]
    );
    assert_eq!(
        failure(&send(revoked).await),
        (Some(ErrorCode::UnknownCapability), None)
    );
    assert_eq!(
        failure(&send(DeliveryCapability::random()).await),
        (Some(ErrorCode::UnknownCapability), None)
    );
    // A capability is bound to its recipient's mailbox: Bob's capability does
    // not admit a send to Carol.
    let carol = Identity::new();
    let carol_client = carol.connect(&broker).await;
    let ack = sender
        .send_sealed(&carol.address(), &kept, b"hi", TTL)
        .await
        .expect("answered");
    assert_eq!(failure(&ack), (Some(ErrorCode::UnknownCapability), None));
    // Revoking what is not registered is NotFound.
    let error = bob_client
        .revoke_capability(&revoked.hash())
        .await
        .expect_err("already revoked");
    assert_eq!(error.code(), Some(ErrorCode::NotFound));
    assert!(send(kept).await.failed.is_empty());

    // The refused sends stored nothing: Bob gets exactly the two accepted ones.
    let first = next_delivery(&bob_client, WAIT).await;
    let second = next_delivery(&bob_client, WAIT).await;
    assert_eq!((first.seq, second.seq), (1, 2));
    support::assert_no_delivery(&bob_client, Duration::from_millis(300)).await;
    drop(carol_client);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_capability_over_its_rate_is_refused_with_a_retry_after() {
    let broker = TestBroker::start_with(|config| {
        config.limits.sealed_rate = 1;
        config.limits.sealed_burst = 2;
    })
    .await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let bob_client = bob.connect(&broker).await;
    let (busy, other) = (DeliveryCapability::random(), DeliveryCapability::random());
    bob_client.register_capability(&busy).await.expect("busy");
    bob_client.register_capability(&other).await.expect("other");
    let sender = sealed_sender(&broker, &alice).await;
    for _ in 0..2 {
        let ack = sender
            .send_sealed(&bob.address(), &busy, b"burst", TTL)
            .await
            .expect("answered");
        assert!(ack.failed.is_empty(), "{ack:?}");
    }
    let ack = sender
        .send_sealed(&bob.address(), &busy, b"over", TTL)
        .await
        .expect("answered");
    let (code, retry_after_ms) = failure(&ack);
    assert_eq!(code, Some(ErrorCode::RateLimited));
    assert!(
        retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 1000),
        "{retry_after_ms:?}"
    );
    // The budget is per capability: another one still passes.
    let ack = sender
        .send_sealed(&bob.address(), &other, b"other", TTL)
        .await
        .expect("answered");
    assert!(ack.failed.is_empty(), "{ack:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn an_anonymous_connection_over_its_rate_is_refused_with_a_retry_after() {
    let broker = TestBroker::start_with(|config| {
        config.limits.anonymous_rate = 2;
        config.limits.sealed_rate = 0;
    })
    .await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let _bob_client = bob.connect(&broker).await;
    let sender = sealed_sender(&broker, &alice).await;
    // Unknown capabilities count too: guessing is limited per connection.
    let guess = DeliveryCapability::random();
    for _ in 0..2 {
        let ack = sender
            .send_sealed_envelope(&bob.address(), &guess, vec![1; 16], TTL)
            .await
            .expect("answered");
        assert_eq!(failure(&ack).0, Some(ErrorCode::UnknownCapability));
    }
    let error = sender
        .send_sealed_envelope(&bob.address(), &guess, vec![1; 16], TTL)
        .await
        .expect_err("over the connection's rate");
    assert_eq!(error.code(), Some(ErrorCode::RateLimited));
    assert!(matches!(
        error,
        ClientError::Server {
            retry_after_ms: Some(_),
            ..
        }
    ));
    broker.shutdown().await;
}

#[tokio::test]
async fn an_anonymous_session_may_only_send_sealed_fetch_cards_and_ping() {
    let broker = TestBroker::start().await;
    let bob = Identity::new();
    let _bob_client = bob.connect(&broker).await;
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.open_anonymous().await.expect("anonymous");

    let card = IdentityCard::sign(&bob.signing, bob.encryption.public(), 1);
    let hash = CapabilityHash([5; 32]);
    let refused = [
        Frame::Send(Send {
            request_id: 1,
            ttl_secs: 60,
            recipients: vec![bob.address()],
            envelope: Blob::from(vec![1]),
        }),
        Frame::Delete(Delete {
            request_id: 2,
            seqs: vec![1],
        }),
        Frame::PublishCard(PublishCard {
            request_id: 3,
            card,
        }),
        Frame::RegisterCapability(RegisterCapability {
            request_id: 4,
            capability_hash: hash,
        }),
        Frame::RevokeCapability(RevokeCapability {
            request_id: 5,
            capability_hash: hash,
        }),
        Frame::ListCapabilities(ListCapabilities { request_id: 6 }),
        Frame::Ack(Ack { up_to_seq: 1 }),
        Frame::CreateToken(CreateToken {
            request_id: 7,
            ttl_secs: 60,
            content: Blob::from(vec![1]),
            password_verifier: None,
        }),
        Frame::DeleteToken(DeleteToken {
            request_id: 8,
            token_id: TokenId([1; 32]),
        }),
    ];
    for frame in refused {
        let id = match &frame {
            Frame::Ack(_) => 0,
            Frame::Send(f) => f.request_id,
            Frame::Delete(f) => f.request_id,
            Frame::PublishCard(f) => f.request_id,
            Frame::RegisterCapability(f) => f.request_id,
            Frame::RevokeCapability(f) => f.request_id,
            Frame::ListCapabilities(f) => f.request_id,
            Frame::CreateToken(f) => f.request_id,
            Frame::DeleteToken(f) => f.request_id,
            other => panic!("unexpected {other:?}"),
        };
        raw.send(&frame).await.expect("sends");
        match raw.recv().await.expect("answered") {
            Frame::Error(error) => {
                assert_eq!(error.request_id, id);
                assert_eq!(
                    ErrorCode::from_u16(error.code),
                    Some(ErrorCode::NotAuthenticated)
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // What an anonymous session may do still works after the refusals.
    raw.send(&Frame::Ping(Ping { nonce: 7 }))
        .await
        .expect("sends");
    assert!(matches!(raw.recv().await, Ok(Frame::Pong(pong)) if pong.nonce == 7));
    raw.send(&Frame::FetchCard(FetchCard {
        request_id: 8,
        address: bob.address(),
    }))
    .await
    .expect("sends");
    assert!(matches!(raw.recv().await, Ok(Frame::CardResult(result)) if result.request_id == 8));
    raw.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn an_authenticated_session_cannot_send_sealed() {
    let broker = TestBroker::start().await;
    let bob = Identity::new();
    let bob_client = bob.connect(&broker).await;
    let capability = DeliveryCapability::random();
    bob_client
        .register_capability(&capability)
        .await
        .expect("registers");

    // On an authenticated session the broker knows the sender, so a sealed
    // send there would only pretend to hide it.
    let alice = Identity::new();
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&backbone_client::Credentials::primary(&alice.signing))
        .await
        .expect("authenticates");
    raw.send(&Frame::SealedSend(SealedSend {
        request_id: 3,
        ttl_secs: 60,
        recipient: bob.address(),
        capability,
        envelope: Blob::from(vec![1; 8]),
    }))
    .await
    .expect("sends");
    loop {
        match raw.recv().await.expect("answered") {
            Frame::Error(error) => {
                assert_eq!(error.request_id, 3);
                assert_eq!(
                    ErrorCode::from_u16(error.code),
                    Some(ErrorCode::UnexpectedFrame)
                );
                break;
            }
            // The authenticated session's own (empty) mailbox pushes nothing,
            // but be tolerant of unrelated frames.
            Frame::Pong(_) => continue,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    raw.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_mailbox_holds_at_most_max_capabilities() {
    let broker = TestBroker::start_with(|config| config.limits.max_capabilities = 2).await;
    let bob = Identity::new();
    let bob_client = bob.connect(&broker).await;
    let capabilities: Vec<DeliveryCapability> =
        (0..3).map(|_| DeliveryCapability::random()).collect();
    for capability in &capabilities[..2] {
        bob_client
            .register_capability(capability)
            .await
            .expect("fits");
    }
    let error = bob_client
        .register_capability(&capabilities[2])
        .await
        .expect_err("over the limit");
    assert_eq!(error.code(), Some(ErrorCode::TooManyCapabilities));
    // An already registered one is not new, so it still succeeds at the limit.
    bob_client
        .register_capability(&capabilities[0])
        .await
        .expect("already registered");
    // Revoking makes room.
    bob_client
        .revoke_capability(&capabilities[0].hash())
        .await
        .expect("revokes");
    bob_client
        .register_capability(&capabilities[2])
        .await
        .expect("fits again");
    assert_eq!(
        bob_client.list_capabilities().await.expect("lists").len(),
        2
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_sealed_send_through_another_node_is_checked_and_stored_by_the_owner() {
    let fleet = TestFleet::start(2).await;
    let bob = fleet.identity_on(1);
    let bob_client = fleet.connect(&bob, 1).await;
    let capability = DeliveryCapability::random();
    bob_client
        .register_capability(&capability)
        .await
        .expect("registers");

    // Alice's anonymous session is on node 0; Bob's mailbox on node 1.
    let alice = Identity::new();
    let sender = SealedSender::connect(
        fleet.connect_config(0),
        SealedOptions::new(alice.signing.clone()),
    )
    .await
    .expect("anonymous session on node 0");
    let ack = sender
        .send_sealed(&bob.address(), &capability, b"across the fleet", TTL)
        .await
        .expect("sends");
    assert!(ack.failed.is_empty(), "{ack:?}");
    let message = tokio::time::timeout(WAIT, bob_client.next_message())
        .await
        .expect("arrives")
        .expect("client runs")
        .expect("opens");
    assert_eq!(message.opened.sender, alice.address());
    assert_eq!(message.delivery.sender, None);

    // The owner checks the capability: an unknown one is refused from node 0 too.
    let ack = sender
        .send_sealed(&bob.address(), &DeliveryCapability::random(), b"x", TTL)
        .await
        .expect("answered");
    assert_eq!(failure(&ack), (Some(ErrorCode::UnknownCapability), None));
    // And so is a revoked one, at once.
    bob_client
        .revoke_capability(&capability.hash())
        .await
        .expect("revokes");
    let ack = sender
        .send_sealed(&bob.address(), &capability, b"x", TTL)
        .await
        .expect("answered");
    assert_eq!(failure(&ack), (Some(ErrorCode::UnknownCapability), None));
    drop(bob_client);
    fleet.shutdown().await;
}
