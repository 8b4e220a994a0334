//! Nothing reaches a device before it is durable. The store's reads see an
//! envelope as soon as the writer has inserted it, before the flush that
//! makes it durable; a crash in between takes it back and its sequence
//! number is handed out again. A device that had been shown it would then
//! skip the envelope that later gets that number. (The long crash loop,
//! `scripts/crash-loop`, found exactly that.) This test holds a flush open
//! and checks that a device catching up from the store is not shown the
//! envelope until the flush returns.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backbone_broker::store::{
    Append, MailboxExport, MemoryStore, Store, StoreError, StoredEnvelope,
};
use backbone_protocol::bytes::ServerId;
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard};
use support::{Identity, TestBroker, assert_no_delivery, next_delivery};

/// A memory store whose appends become visible, then wait at a gate (the
/// "flush") while the gate is closed.
#[derive(Default)]
struct GatedStore {
    inner: MemoryStore,
    closed: AtomicBool,
    gate: (Mutex<bool>, Condvar),
}

impl GatedStore {
    fn close(&self) {
        *self.gate.0.lock().expect("gate") = false;
        self.closed.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        *self.gate.0.lock().expect("gate") = true;
        self.gate.1.notify_all();
    }
}

impl Store for GatedStore {
    fn append_batch(&self, items: &[Append]) -> Result<(), StoreError> {
        self.inner.append_batch(items)?;
        if self.closed.load(Ordering::SeqCst) {
            let mut open = self.gate.0.lock().expect("gate");
            while !*open {
                open = self.gate.1.wait(open).expect("gate");
            }
        }
        Ok(())
    }
    fn read_from(
        &self,
        a: &Address,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.inner.read_from(a, from, limit, now)
    }
    fn head_seq(&self, a: &Address) -> Result<u64, StoreError> {
        self.inner.head_seq(a)
    }
    fn oldest_seq(&self, a: &Address) -> Result<Option<u64>, StoreError> {
        self.inner.oldest_seq(a)
    }
    fn cursor(&self, a: &Address, d: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.inner.cursor(a, d)
    }
    fn set_cursor(&self, a: &Address, d: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.inner.set_cursor(a, d, seq)
    }
    fn delete(&self, a: &Address, seqs: &[u64]) -> Result<usize, StoreError> {
        self.inner.delete(a, seqs)
    }
    fn expire(&self, now: u64, limit: usize) -> Result<usize, StoreError> {
        self.inner.expire(now, limit)
    }
    fn put_card(&self, card: &IdentityCard) -> Result<(), StoreError> {
        self.inner.put_card(card)
    }
    fn card(&self, a: &Address) -> Result<Option<IdentityCard>, StoreError> {
        self.inner.card(a)
    }
    fn put_device(&self, a: &Address, cert: &DeviceCertificate) -> Result<(), StoreError> {
        self.inner.put_device(a, cert)
    }
    fn device(&self, a: &Address, d: &DeviceId) -> Result<Option<DeviceCertificate>, StoreError> {
        self.inner.device(a, d)
    }
    fn addresses(&self, f: &dyn Fn(&Address) -> bool) -> Result<Vec<Address>, StoreError> {
        self.inner.addresses(f)
    }
    fn export_mailbox(&self, a: &Address) -> Result<MailboxExport, StoreError> {
        self.inner.export_mailbox(a)
    }
    fn import_mailbox(&self, export: &MailboxExport) -> Result<(), StoreError> {
        self.inner.import_mailbox(export)
    }
    fn purge_mailbox(&self, a: &Address) -> Result<(), StoreError> {
        self.inner.purge_mailbox(a)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.put_meta(key, value)
    }
    fn server_id(&self) -> Result<ServerId, StoreError> {
        self.inner.server_id()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_never_shown_an_envelope_before_its_flush_returns() {
    let store = Arc::new(GatedStore::default());
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
    store.close();
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
    assert_eq!(first.envelope, b"durable");
    assert_eq!(first.seq, 1);
    assert_no_delivery(&bob_client, Duration::from_millis(500)).await;

    // Once the flush returns, the envelope is acknowledged and delivered.
    store.open();
    let ack = sending.await.expect("task").expect("acknowledged");
    assert_eq!(ack.stored.len(), 1);
    let second = next_delivery(&bob_client, Duration::from_secs(10)).await;
    assert_eq!(second.envelope, b"not yet durable");
    assert_eq!(second.seq, 2);
    broker.shutdown().await;
}
