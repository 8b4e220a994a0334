//! The crash loop: under continuous load, the real `backbone` process is
//! killed with SIGKILL at random moments, sometimes while it is still
//! recovering, and started again on the same data directory, over and over.
//! At the end the checker compares what senders had acknowledged with what
//! recipients received: no acknowledged envelope may be lost, nothing never
//! sent may arrive, nothing may arrive twice. Envelopes whose send was not
//! acknowledged may or may not arrive; they are counted.
//!
//! The default run does `CYCLES` cycles; `BACKBONE_CRASH_CYCLES=100` (see
//! `scripts/crash-loop`) runs the long variant.

#[path = "fleet_docker/check.rs"]
mod check;
mod process;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use check::{Ledger, PayloadId};
use process::{BrokerProcess, free_udp_port, spawn_broker};
use rand::Rng;
use support::Identity;
use tokio::sync::watch;

/// Cycles in the default (CI) run.
const CYCLES: u32 = 6;
const SENDERS: usize = 3;
const RECIPIENTS: usize = 4;
/// Pause between two sends of one sender.
const SEND_EVERY: Duration = Duration::from_millis(5);
/// Marks this run's payloads: 8 bytes of run id, then sender and counter.
const PAYLOAD_LEN: usize = 8 + 4 + 8;

fn encode(run: u64, id: PayloadId) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAYLOAD_LEN);
    bytes.extend_from_slice(&run.to_le_bytes());
    bytes.extend_from_slice(&id.sender.to_le_bytes());
    bytes.extend_from_slice(&id.counter.to_le_bytes());
    bytes
}

fn decode(run: u64, bytes: &[u8]) -> Option<PayloadId> {
    if bytes.len() != PAYLOAD_LEN || bytes[..8] != run.to_le_bytes() {
        return None;
    }
    Some(PayloadId {
        sender: u32::from_le_bytes(bytes[8..12].try_into().ok()?),
        counter: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
    })
}

fn options(port: u16, ca: &std::path::Path, identity: &Identity) -> ClientOptions {
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(ca.into()));
    connect.server_name = Some("localhost".into());
    connect.connect_timeout = Duration::from_secs(2);
    // A client learns that its broker died from the next broker's stateless
    // reset, which answers its next packet: with the default 10 s keep-alive
    // a quiet recipient could still sit on a dead connection when the drain
    // below stops waiting, and its undelivered envelopes would count as lost.
    connect.keep_alive = Duration::from_secs(1);
    let mut options = ClientOptions::primary(
        connect,
        identity.signing.clone(),
        identity.encryption.clone(),
    );
    options.request_timeout = Duration::from_secs(3);
    // Likewise the default backoff grows to 10 s after a few failed
    // reconnects (a broker that is down, or killed while starting).
    options.backoff.max = Duration::from_secs(1);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_envelopes_survive_a_crash_loop() {
    let cycles: u32 = std::env::var("BACKBONE_CRASH_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CYCLES);
    let verdict = crash_loop(cycles, false).await;
    assert!(
        verdict.acked > 100,
        "too little was acknowledged: {verdict:?}"
    );
    let failures = verdict.failures();
    assert!(failures.is_empty(), "{failures:?}");
}

/// The same loop against a broker that acknowledges appends before writing
/// them (a test-only sabotage, see the `unsafe-early-ack` feature): the
/// checker must see acknowledged envelopes lost. A checker that passed here
/// would prove nothing above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_broker_that_acks_before_the_flush() {
    let verdict = crash_loop(4, true).await;
    assert!(
        verdict.lost > 0,
        "acking before the flush lost nothing across 4 crashes: {verdict:?}"
    );
}

/// Runs the loop for `cycles` crashes and returns the checker's verdict.
async fn crash_loop(cycles: u32, early_ack: bool) -> check::Verdict {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_udp_port();
    let start = |n: u32| {
        spawn_broker(
            &data,
            port,
            dir.path().join(format!("broker-{n}.log")),
            "127.0.0.1:0",
            "info",
            &[(
                "BACKBONE_UNSAFE_EARLY_ACK",
                if early_ack { "1" } else { "0" },
            )],
        )
    };
    let mut broker: BrokerProcess = start(0);
    broker.wait_listening();
    let ca = data.join("tls/cert.pem");
    let run: u64 = rand::random();
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    let recipients: Vec<Identity> = (0..RECIPIENTS).map(|_| Identity::new()).collect();
    let addresses: Vec<_> = recipients.iter().map(Identity::address).collect();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    // Even recipients stay connected (pushes, reconnects after each crash);
    // odd ones connect only after the loop and read everything from the
    // store, so a write that never became durable shows as a loss there.
    // A receiving client that stops for good (its reconnects gave up)
    // records why: the receiving side then loses everything after it.
    let stopped_clients = Arc::new(Mutex::new(Vec::<String>::new()));
    let receive = |index: usize, client: Client| {
        let (ledger, stopped_clients) = (ledger.clone(), stopped_clients.clone());
        tokio::spawn(async move {
            while let Some(delivery) = client.next_delivery().await {
                match decode(run, &delivery.envelope) {
                    Some(id) => ledger.lock().expect("ledger").delivered((id, index)),
                    None => ledger.lock().expect("ledger").undecodable(),
                }
                let _ = client.ack(delivery.seq).await;
            }
            stopped_clients
                .lock()
                .expect("stopped")
                .push(format!("recipient {index}: {:?}", client.status()));
        })
    };
    for (index, identity) in recipients.iter().enumerate().step_by(2) {
        let client = Client::connect(options(port, &ca, identity))
            .await
            .expect("recipient connects");
        tasks.push(receive(index, client));
    }
    let mut senders = Vec::new();
    for sender in 0..SENDERS as u32 {
        let client = Client::connect(options(port, &ca, &Identity::new()))
            .await
            .expect("sender connects");
        let (ledger, addresses, mut stopped) = (ledger.clone(), addresses.clone(), stopped.clone());
        senders.push(tokio::spawn(async move {
            let mut counter = 0u64;
            while !*stopped.borrow_and_update() {
                counter += 1;
                let id = PayloadId { sender, counter };
                {
                    let mut ledger = ledger.lock().expect("ledger");
                    for recipient in 0..addresses.len() {
                        ledger.sent((id, recipient));
                    }
                }
                if let Ok(ack) = client
                    .send_envelope(&addresses, encode(run, id), Duration::from_secs(3600))
                    .await
                {
                    let mut ledger = ledger.lock().expect("ledger");
                    for stored in ack.stored {
                        let recipient = addresses
                            .iter()
                            .position(|a| *a == stored.address)
                            .expect("a recipient of this send");
                        ledger.acked((id, recipient));
                    }
                }
                tokio::time::sleep(SEND_EVERY).await;
            }
        }));
    }
    drop(stopped);

    // The loop: run a while, SIGKILL; every other cycle, also kill the next
    // run during its recovery, before it listens.
    let mut rng = rand::rng();
    let mut runs = 0;
    let mut early_kills = 0;
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        if early_ack {
            // Kill right after an acknowledgement, inside the window where
            // the sabotaged broker has acked but not yet written.
            let acked = ledger.lock().expect("ledger").verdict().acked;
            let deadline = Instant::now() + Duration::from_secs(5);
            while ledger.lock().expect("ledger").verdict().acked == acked
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        broker.kill_9();
        if cycle % 2 == 1 {
            runs += 1;
            broker = start(runs);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            broker.kill_9();
            early_kills += 1;
        }
        runs += 1;
        broker = start(runs);
        broker.wait_listening();
    }
    let _ = stop.send(true);
    for sender in senders {
        let _ = tokio::time::timeout(Duration::from_secs(10), sender).await;
    }

    for (index, identity) in recipients.iter().enumerate().skip(1).step_by(2) {
        let client = Client::connect(options(port, &ca, identity))
            .await
            .expect("offline recipient connects");
        tasks.push(receive(index, client));
    }

    // Drain.
    let drain_started = Instant::now();
    let mut last_count = (0, Instant::now());
    loop {
        let (done, count) = {
            let ledger = ledger.lock().expect("ledger");
            (ledger.all_acked_delivered(), ledger.delivery_count())
        };
        if count != last_count.0 {
            last_count = (count, Instant::now());
        }
        // Done: everything acknowledged arrived and 2 s passed quietly; or
        // nothing arrived for 8 s (what is missing then is lost); or 60 s.
        let quiet = last_count.1.elapsed();
        if (done && quiet > Duration::from_secs(2))
            || quiet > Duration::from_secs(8)
            || drain_started.elapsed() > Duration::from_secs(60)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        task.abort();
    }
    let stopped = stopped_clients.lock().expect("stopped").clone();
    assert!(
        stopped.is_empty(),
        "receiving clients stopped reconnecting for good, so everything after was lost: {stopped:?}"
    );
    let verdict = ledger.lock().expect("ledger").verdict();
    if !early_ack
        && (!verdict.failures().is_empty() || std::env::var_os("BACKBONE_CRASH_KEEP").is_some())
    {
        // Keep the evidence: the data directory and every run's log, and the
        // lost payloads' bytes, which sit unencrypted in the store's files
        // if they were ever written there.
        let kept = dir.keep();
        println!(
            "crash loop failed; data and logs kept in {}",
            kept.display()
        );
        for (id, recipient) in &verdict.lost_examples {
            println!(
                "lost: {id:?} to recipient {recipient} ({}), payload {}",
                addresses[*recipient],
                hex::encode(encode(run, *id))
            );
        }
    }
    println!(
        "crash loop{}: {cycles} cycles ({early_kills} killed during recovery): {}",
        if early_ack {
            " (broker acking early)"
        } else {
            ""
        },
        verdict.summary()
    );
    verdict
}
