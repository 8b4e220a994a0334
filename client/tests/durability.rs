//! Nothing reaches a device before it is durable. The store's reads see an
//! envelope as soon as the writer has inserted it, before the flush that
//! makes it durable; a crash in between takes it back and its sequence
//! number is handed out again. A device that had been shown it would then
//! skip the envelope that later gets that number. (The long crash loop,
//! `scripts/crash-loop`, found exactly that.) This test holds a flush open
//! (`MemoryStore::hold_appends`) and checks that a device catching up from
//! the store is not shown the envelope until the flush returns.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backbone_broker::store::MemoryStore;
use support::{Identity, TestBroker, assert_no_delivery, next_delivery};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_never_shown_an_envelope_before_its_flush_returns() {
    let store = Arc::new(MemoryStore::new());
    let broker = TestBroker::start_with_store(store.clone()).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = Arc::new(alice.connect(&broker).await);

    // One durable envelope, delivered and acknowledged.
    alice_client
        .send_envelope(
            &[bob.address()],
            b"durable".to_vec(),
            Duration::from_secs(3600),
        )
        .await
        .expect("sent");

    // The next one is written but its flush does not return.
    store.hold_appends();
    let sending = {
        let (client, to) = (alice_client.clone(), bob.address());
        tokio::spawn(async move {
            client
                .send_envelope(
                    &[to],
                    b"not yet durable".to_vec(),
                    Duration::from_secs(3600),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !sending.is_finished(),
        "the send is acknowledged only after the flush"
    );

    // Bob connects now and catches up from the store: he gets the durable
    // envelope and nothing else while the flush is open.
    let bob_client = bob.connect(&broker).await;
    let first = next_delivery(&bob_client, Duration::from_secs(10)).await;
    assert_eq!(first.envelope, &b"durable"[..]);
    assert_eq!(first.seq, 1);
    assert_no_delivery(&bob_client, Duration::from_millis(500)).await;

    // Once the flush returns, the envelope is acknowledged and delivered.
    store.release_appends();
    let ack = sending.await.expect("task").expect("acknowledged");
    assert_eq!(ack.stored.len(), 1);
    let second = next_delivery(&bob_client, Duration::from_secs(10)).await;
    assert_eq!(second.envelope, &b"not yet durable"[..]);
    assert_eq!(second.seq, 2);
    broker.shutdown().await;
}
