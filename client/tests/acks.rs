//! The client gathers a device's acknowledgements (`AckPolicy`): a device
//! that acks every envelope of a catch-up one by one sends the broker a
//! handful of cumulative `Ack` frames, not one per envelope, and the cursor
//! still ends at the last one. Counted on a broker process's
//! `backbone_acks_received_total` (the broker's metrics are process-wide).

mod process;

use std::time::Duration;

use backbone_client::envelope::EncryptionKeypair;
use backbone_client::{AckPolicy, Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::Keypair;
use process::start_metered_broker;

/// Envelopes in the catch-up.
const ENVELOPES: u64 = 200;

/// The value of an unlabelled counter in a `/metrics` exposition.
fn counter(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in:\n{exposition}"))
        .trim()
        .parse()
        .expect("a count")
}

#[test]
fn a_catch_up_acked_one_by_one_reaches_the_broker_as_a_few_acks() {
    let broker = start_metered_broker();
    let (server, ca) = (&broker.server, &broker.ca);
    let options = |key: &Keypair| {
        let mut connect = ConnectConfig::new(server.clone(), Trust::CaFile(ca.clone()));
        connect.server_name = Some("localhost".into());
        let mut options =
            ClientOptions::primary(connect, key.clone(), EncryptionKeypair::generate());
        options.request_timeout = Duration::from_secs(10);
        options
    };
    let (alice, bob) = (Keypair::generate(), Keypair::generate());
    let policy = AckPolicy::default();
    let last = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let alice_client = Client::connect(options(&alice))
                .await
                .expect("alice connects");
            for n in 0..ENVELOPES {
                alice_client
                    .send_envelope(
                        &[bob.address()],
                        n.to_le_bytes().to_vec(),
                        Duration::from_secs(3600),
                    )
                    .await
                    .expect("a send");
            }
            // Bob was offline: his device catches up, acking each envelope
            // as it handles it.
            let bob_client = Client::connect(options(&bob)).await.expect("bob connects");
            let mut last = 0;
            for _ in 0..ENVELOPES {
                let delivery =
                    tokio::time::timeout(Duration::from_secs(10), bob_client.next_delivery())
                        .await
                        .expect("a push in time")
                        .expect("bob's client runs");
                last = delivery.seq;
                bob_client.ack(last).await.expect("acks");
            }
            // The last ack goes after its delay.
            tokio::time::sleep(policy.delay * 20).await;
            last
        });
    let exposition = process::http_get(&broker.metrics, "/metrics");
    let acked = counter(&exposition, "backbone_envelopes_acked_total");
    let frames = counter(&exposition, "backbone_acks_received_total");
    assert_eq!(
        acked, ENVELOPES,
        "every envelope acknowledged (the last one {last})"
    );
    // Acks made while the connection was busy fold into one, and an ack
    // waits at most `every` envelopes or `delay`: a handful of frames. One
    // per envelope (200) without the gathering.
    assert!(
        (1..=ENVELOPES / 4).contains(&frames),
        "{frames} Ack frames for {ENVELOPES} envelopes acked one by one"
    );
}
