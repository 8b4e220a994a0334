//! Storage cost: appending 1 KiB envelopes with one flush per batch (the group
//! commit the writer performs), and an expiry sweep through the index.
#![allow(missing_docs)]

use std::sync::Arc;

use backbone_broker::store::{Append, SledStore, Store, StoredEnvelope};
use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn envelope(seq: u64, expires_at_ms: u64) -> Arc<StoredEnvelope> {
    Arc::new(StoredEnvelope {
        seq,
        message_id: MessageId([7; 16]),
        sender: Some(Address([1; 32])),
        stored_at_ms: 0,
        expires_at_ms,
        envelope: vec![0xab; 1024],
    })
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&dir.path().join("bench")).expect("opens");
    let mut group = c.benchmark_group("store");
    for batch in [1usize, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        let mut seq = 0u64;
        group.bench_function(format!("append_flush_batch_{batch}"), |b| {
            b.iter(|| {
                let items: Vec<Append> = (0..batch)
                    .map(|i| {
                        seq += 1;
                        Append {
                            address: Address([(i % 200) as u8; 32]),
                            envelope: envelope(seq, u64::MAX),
                        }
                    })
                    .collect();
                store.append_batch(&items).expect("appends");
            })
        });
    }
    // A store of its own, so the sweep's cost does not depend on what the
    // append benches above left in the trees.
    let expiry_dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&expiry_dir.path().join("bench")).expect("opens");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("expire_1000", |b| {
        let mut seq = 1_000_000_000u64;
        b.iter_batched(
            || {
                let items: Vec<Append> = (0..1000)
                    .map(|_| {
                        seq += 1;
                        Append {
                            address: Address([9; 32]),
                            envelope: envelope(seq, 10),
                        }
                    })
                    .collect();
                store.append_batch(&items).expect("appends");
            },
            |()| assert_eq!(store.expire(100, 1000).expect("expires"), 1000),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
