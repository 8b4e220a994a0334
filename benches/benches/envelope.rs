//! End-to-end encryption cost: sealing and opening a 1 KiB envelope.
#![allow(missing_docs)]

use backbone_client::envelope::{EncryptionKeypair, open, seal};
use backbone_protocol::Keypair;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn envelopes(c: &mut Criterion) {
    let sender = Keypair::from_secret_bytes([1; 32]);
    let recipients: Vec<(Keypair, EncryptionKeypair)> = (0..10u8)
        .map(|n| {
            (
                Keypair::from_secret_bytes([n + 2; 32]),
                EncryptionKeypair::generate(),
            )
        })
        .collect();
    let plaintext = vec![0x42u8; 1024];
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    for count in [1usize, 10] {
        let keys: Vec<_> = recipients[..count]
            .iter()
            .map(|(k, e)| (k.address(), e.public()))
            .collect();
        group.bench_function(format!("seal_1k_{count}_recipients"), |b| {
            b.iter(|| seal(&sender, black_box(&keys), black_box(&plaintext), 1).expect("seals"))
        });
    }
    let (me, my_key) = &recipients[0];
    let sealed = seal(&sender, &[(me.address(), my_key.public())], &plaintext, 1).expect("seals");
    group.bench_function("open_1k", |b| {
        b.iter(|| open(&me.address(), my_key, black_box(&sealed)).expect("opens"))
    });
    group.finish();
}

criterion_group!(benches, envelopes);
criterion_main!(benches);
