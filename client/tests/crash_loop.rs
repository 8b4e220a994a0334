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
