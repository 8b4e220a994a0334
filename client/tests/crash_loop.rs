//! The crash loop: under continuous load, the real `backbone` process is
//! killed with SIGKILL at random moments, sometimes while it is still
//! recovering, and started again on the same data directory, over and over.
//! At the end the checker compares what senders had acknowledged with what
//! recipients received: no acknowledged envelope may be lost, nothing never
//! sent may arrive, nothing may arrive twice. Envelopes whose send was not
//! acknowledged may or may not arrive; they are counted.
//!
//! The default run does `CYCLES` cycles; `BACKBONE_CRASH_CYCLES=100` (see
//! `scripts/crash-loop`) runs the long variant. The load, the ledger and the
//! drain are shared with the power-loss loop (`fault_loop/mod.rs`).

#[path = "fleet_docker/check.rs"]
mod check;
mod fault_loop;
mod process;
mod support;

use std::time::Duration;

use fault_loop::{Broker, Load};
use process::UNSAFE_EARLY_ACK;
use rand::Rng;

/// Cycles in the default (CI) run.
const CYCLES: u32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_envelopes_survive_a_crash_loop() {
    let cycles = fault_loop::cycles("BACKBONE_CRASH_CYCLES", CYCLES);
    crash_loop(cycles, false).await.assert_every_promise_kept();
}

/// The same loop against a broker that acknowledges appends before writing
/// them (a test-only sabotage, see the `unsafe-early-ack` feature): the
/// checker must see acknowledged envelopes lost. A checker that passed here
/// would prove nothing above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_broker_that_acks_before_the_flush() {
    let outcome = crash_loop(4, true).await;
    assert!(
        outcome.verdict.lost > 0,
        "acking before the flush lost nothing across 4 crashes: {:?}",
        outcome.verdict
    );
}

/// A device's cursor moves are made durable only with the next checkpoint,
/// so a crash can take the last ones back: the device then reconnects
/// acknowledging more than the broker remembers, and the broker pushes
/// again what it has, which the client drops as repeats without acking
/// them. The broker must take the device's acknowledgement as its cursor;
/// before it did, the window filled with repeats nobody acked and nothing
/// new was ever pushed (the crash loop found it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_cursor_a_crash_took_back_still_gets_new_envelopes() {
    use backbone_client::Client;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("BACKBONE__LIMITS__PUSH_WINDOW", "4"),
        // No checkpoint before the crash: the cursor's moves are lost.
        ("BACKBONE__STORE__CHECKPOINT_INTERVAL", "1h"),
    ];
    let mut broker = Broker::start(&dir.path().join("data"), dir.path(), &env);
    let (alice, bob) = (support::Identity::new(), support::Identity::new());
    let options = |identity| fault_loop::options(broker.port(), &broker.ca(), identity);
    let sender = Client::connect(options(&alice)).await.expect("connects");
    sender.publish_card().await.expect("card");
    let receiver = Client::connect(options(&bob)).await.expect("connects");
    receiver.publish_card().await.expect("card");
    let wait = Duration::from_secs(10);
    for round in 0..10u8 {
        sender
            .send_envelope(&[bob.address()], vec![round], Duration::from_secs(3600))
            .await
            .expect("sent");
        let delivery = tokio::time::timeout(wait, receiver.next_delivery())
            .await
            .expect("delivered in time")
            .expect("running");
        receiver.ack(delivery.seq).await.expect("acks");
    }
    // Let the acks reach the broker, then crash it before any checkpoint.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill_9();
    broker.restart();
    broker.wait_listening();
    // The sender reconnects first (its requests fail until it has).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match sender
            .send_envelope(
                &[bob.address()],
                b"after".to_vec(),
                Duration::from_secs(3600),
            )
            .await
        {
            Ok(ack) if ack.stored.len() == 1 => break,
            outcome => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot send: {outcome:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let delivery = tokio::time::timeout(Duration::from_secs(20), receiver.next_delivery())
        .await
        .expect("the new envelope arrives although the cursor went back")
        .expect("running");
    assert_eq!(delivery.envelope, &b"after"[..]);
    assert_eq!(delivery.seq, 11);
    broker.kill_9();
}

/// Runs the loop for `cycles` crashes and returns the outcome.
async fn crash_loop(cycles: u32, early_ack: bool) -> fault_loop::Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let env: &[(&str, &str)] = if early_ack { UNSAFE_EARLY_ACK } else { &[] };
    let mut broker = Broker::start(&dir.path().join("data"), dir.path(), env);
    let load = Load::start(&broker).await;

    // The loop: run a while, SIGKILL; every other cycle, also kill the next
    // run during its recovery, before it listens.
    let mut rng = rand::rng();
    let mut early_kills = 0;
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        if early_ack {
            load.next_ack().await;
        }
        broker.kill_9();
        if cycle % 2 == 1 {
            broker.restart();
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            broker.kill_9();
            early_kills += 1;
        }
        broker.restart();
        broker.wait_listening();
    }
    let outcome = load.finish().await;
    if !early_ack
        && (!outcome.failures().is_empty() || std::env::var_os("BACKBONE_CRASH_KEEP").is_some())
    {
        // Keep the evidence: the data directory and every run's log.
        println!(
            "crash loop failed; data and logs kept in {}",
            dir.keep().display()
        );
    }
    outcome.print(&format!(
        "crash loop{}: {cycles} cycles ({early_kills} killed during recovery)",
        if early_ack {
            " (broker acking early)"
        } else {
            ""
        }
    ));
    outcome
}
