//! In-process end to end: a broker on loopback with its sled store in a
//! temporary directory, and two clients of the real client library. One
//! iteration is one opaque 1 KiB envelope from the sender's `send_envelope`
//! to its push arriving at the recipient (and the recipient's ack), so the
//! time covers QUIC and TLS both ways, the mailbox actor, the durable group
//! commit and the push: the latency of one message on an idle broker.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use backbone_broker::{Broker, Config, StartOptions};
use backbone_client::envelope::EncryptionKeypair;
use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::Keypair;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TTL: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(10);

fn connect(broker: &Broker) -> ClientOptions {
    let mut connect = ConnectConfig::new(
        broker.quic_addr.to_string(),
        Trust::CaFile(broker.cert_path.clone()),
    );
    connect.server_name = Some("localhost".into());
    ClientOptions::primary(connect, Keypair::generate(), EncryptionKeypair::generate())
}

fn send_to_push(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, sender, recipient, to) = runtime.block_on(async {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.server.data_dir = dir.path().to_owned();
        config.metrics.listen = None;
        // One sender at full speed would trip the per-identity send limit.
        config.limits.send_rate = 0;
        let broker = Broker::start(config, StartOptions::default())
            .await
            .expect("broker starts");
        let sender = Client::connect(connect(&broker))
            .await
            .expect("sender connects");
        let recipient_options = connect(&broker);
        let to = recipient_options
            .identity
            .as_ref()
            .expect("primary identity")
            .address();
        let recipient = Client::connect(recipient_options)
            .await
            .expect("recipient connects");
        (broker, sender, recipient, to)
    });
    let envelope = vec![0xab; 1024];

    let mut group = c.benchmark_group("e2e");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_to_push_1k", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    let ack = sender
                        .send_envelope(&[to], envelope.clone(), TTL)
                        .await
                        .expect("send acknowledged");
                    assert_eq!(ack.stored.len(), 1, "stored for the recipient");
                    let delivery = tokio::time::timeout(WAIT, recipient.next_delivery())
                        .await
                        .expect("pushed in time")
                        .expect("recipient running");
                    assert_eq!(delivery.envelope.len(), envelope.len());
                    recipient.ack(delivery.seq).await.expect("ack queued");
                }
                started.elapsed()
            })
        })
    });
    group.finish();

    runtime.block_on(async {
        drop((sender, recipient));
        broker.shutdown().await.expect("clean shutdown");
    });
}

criterion_group!(benches, send_to_push);
criterion_main!(benches);
