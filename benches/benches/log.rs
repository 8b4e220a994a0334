//! The mailbox log: durable appends of 1 KiB envelopes (each completion
//! comes after the fdatasync that covers it), in batches of 64 with one
//! batch at a time and with four in flight (as many senders give the log),
//! and one envelope at a time; catch-up reads. Before criterion runs, a
//! latency run prints the percentiles of one envelope's durable append.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backbone_broker::store::log::checkpoint::{Checkpoints, Visit};
use backbone_broker::store::log::{LogConfig, LogStore};
use backbone_broker::store::{Append, MailboxLog, StoreError, StoredEnvelope};
use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The benches never checkpoint.
struct NoCheckpoints;

impl Checkpoints for NoCheckpoints {
    fn load_checkpoint(&self, _: &mut Visit<'_>) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    fn checkpointed(&self, _: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    fn write_checkpoint(&self, _: &[(Address, Option<Vec<u8>>)], _: u64) -> Result<(), StoreError> {
        Ok(())
    }
}

fn open(dir: &std::path::Path) -> LogStore {
    let config = LogConfig {
        dir: dir.join("log"),
        segment_bytes: 64 * 1024 * 1024,
        compact_below: 0.5,
        checkpoint_interval: Duration::from_secs(3600),
        no_sync: false,
    };
    LogStore::open(config, Arc::new(NoCheckpoints), 0)
        .expect("opens")
        .0
}

fn batch(seq: &mut u64, n: usize) -> Vec<Append> {
    (0..n)
        .map(|i| {
            *seq += 1;
            Append {
                address: Address([(i % 200) as u8; 32]),
                envelope: Arc::new(StoredEnvelope {
                    seq: *seq,
                    message_id: MessageId([7; 16]),
                    sender: Some(Address([1; 32])),
                    stored_at_ms: 0,
                    expires_at_ms: u64::MAX,
                    envelope: vec![0xab; 1024].into(),
                }),
            }
        })
        .collect()
}

/// Appends `batches` batches of `size`, at most `in_flight` at once, and
/// waits for the last completion.
fn run(log: &LogStore, seq: &mut u64, batches: u64, size: usize, in_flight: usize) {
    let (done, completed) = mpsc::channel();
    let mut outstanding = 0;
    for _ in 0..batches {
        if outstanding == in_flight {
            completed.recv().expect("completed");
            outstanding -= 1;
        }
        let done = done.clone();
        log.append(
            batch(seq, size),
            Box::new(move |result| {
                result.expect("durable");
                let _ = done.send(());
            }),
        );
        outstanding += 1;
    }
    for _ in 0..outstanding {
        completed.recv().expect("completed");
    }
}

fn latency_percentiles(log: &LogStore, seq: &mut u64) {
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..2_000 {
        let started = Instant::now();
        run(log, seq, 1, 1, 1);
        let _ = histogram.record(started.elapsed().as_micros() as u64);
    }
    println!(
        "log: one envelope's durable append over 2,000 runs: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.9),
        histogram.value_at_quantile(0.99),
        histogram.max()
    );
}

fn log(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    let mut seq = 0u64;
    latency_percentiles(&log, &mut seq);
    let mut group = c.benchmark_group("log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("durable_append_1", |b| {
        b.iter(|| run(&log, &mut seq, 1, 1, 1))
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("durable_append_batch_64", |b| {
        b.iter(|| run(&log, &mut seq, 1, 64, 1))
    });
    group.throughput(Throughput::Elements(64 * 16));
    group.bench_function("durable_append_batch_64_four_in_flight", |b| {
        b.iter(|| run(&log, &mut seq, 16, 64, 4))
    });
    group.throughput(Throughput::Elements(64));
    let address = Address([3; 32]);
    group.bench_function("read_64", |b| {
        b.iter(|| {
            let read = log.read_from(&address, 0, 64, 0).expect("reads");
            assert_eq!(read.len(), 64);
        })
    });
    // Expiry only drops index entries: a sweep of 1,000 envelopes.
    group.throughput(Throughput::Elements(1000));
    let expiring = Address([9; 32]);
    group.bench_function("expire_1000", |b| {
        b.iter_batched(
            || {
                let items: Vec<Append> = batch(&mut seq, 1000)
                    .into_iter()
                    .map(|item| Append {
                        address: expiring,
                        envelope: Arc::new(StoredEnvelope {
                            expires_at_ms: 10,
                            ..StoredEnvelope::clone(&item.envelope)
                        }),
                    })
                    .collect();
                let (done, completed) = mpsc::channel();
                log.append(
                    items,
                    Box::new(move |result| {
                        let _ = done.send(result);
                    }),
                );
                completed.recv().expect("completed").expect("durable");
            },
            |()| assert_eq!(log.expire(100, 1000).expect("expires"), 1000),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
    log.shutdown().expect("shuts down");
}

criterion_group!(benches, log);
criterion_main!(benches);
