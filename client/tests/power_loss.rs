//! The power-loss loop: the crash loop's load (`fault_loop/mod.rs`) against
//! the real `backbone` process whose data directory is on the lossy
//! filesystem (`lossyfs/`), a FUSE mount that keeps every write not yet
//! covered by fsync/fdatasync, and every name change not covered by an fsync
//! of its directory, in a volatile cache. Each cycle: load for a while,
//! SIGKILL the broker, cut the power (the cache is gone), start the broker
//! again on the same mount. At the end the checker requires what the crash
//! loop requires: no acknowledged copy lost, nothing unexpected, nothing
//! twice. The last line printed is `lost N`.
//!
//! Before the loop, the broker's first start (its TLS key, store and server
//! id) is made durable as a whole (`sync_all`), as a disk would have written
//! it back long before any power cut: the loop tests the envelopes, and the
//! start-up files are a separate matter (see `docs/reliability.md`).
//!
//! The tests need `/dev/fuse` and the right to mount (root); without them
//! they say so on stderr and pass. `scripts/power-loss N` runs N cycles. A
//! failing run keeps the data directory (copied off the mount) and every
//! run's log, as the crash loop does (`BACKBONE_CRASH_KEEP=1`: always).

#[path = "fleet_docker/check.rs"]
mod check;
mod fault_loop;
mod process;
mod support;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use backbone_lossyfs::Mount;
use fault_loop::{Broker, Load, Outcome};
use process::UNSAFE_SKIP_DURABILITY;
use rand::Rng;

/// Cycles in the default run.
const CYCLES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_envelopes_survive_power_loss() {
    let cycles = fault_loop::cycles("BACKBONE_POWER_LOSS_CYCLES", CYCLES);
    if let Some(outcome) = power_loss(cycles, false).await {
        outcome.assert_every_promise_kept();
    }
}

/// The same loop against a broker that skips durability
/// (`UNSAFE_SKIP_DURABILITY`), cutting the power right after an
/// acknowledgement: the checker must see acknowledged envelopes lost. A
/// checker that passed here would prove nothing above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_broker_that_skips_durability() {
    let Some(outcome) = power_loss(3, true).await else {
        return;
    };
    assert!(
        outcome.verdict.lost > 0,
        "a broker skipping durability lost nothing across 3 power cuts: {:?}",
        outcome.verdict
    );
}

/// Runs the loop for `cycles` power cuts and returns the outcome, or `None`
/// (after saying why on stderr) where the lossy filesystem cannot be mounted.
async fn power_loss(cycles: u32, skip_durability: bool) -> Option<Outcome> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).expect("mount point");
    let mount = match Mount::new(&mountpoint) {
        Ok(mount) => mount,
        Err(error) => {
            // Straight to the stderr handle, which the test harness does not
            // capture: a skip must show in a normal `cargo test` run.
            let _ = writeln!(
                std::io::stderr(),
                "power-loss test skipped: {error} (it needs /dev/fuse and the right to mount)"
            );
            return None;
        }
    };
    let data = mountpoint.join("data");
    let env: &[(&str, &str)] = if skip_durability {
        UNSAFE_SKIP_DURABILITY
    } else {
        &[]
    };
    let mut broker = Broker::start(&data, dir.path(), env);
    mount.sync_all();
    let load = Load::start(&broker).await;

    let mut rng = rand::rng();
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        if skip_durability {
            load.next_ack().await;
        }
        // Reaped before the cut, so no write of this run lands after it.
        broker.kill_9();
        let cut = mount.power_cut();
        println!(
            "cut {cycle}: {} files and {} directories reverted, {} inodes dropped, {} dirty bytes dropped",
            cut.files_reverted,
            cut.directories_reverted,
            cut.inodes_dropped,
            cut.dirty_bytes_dropped
        );
        broker.restart();
        broker.wait_listening();
    }
    let outcome = load.finish().await;
    broker.kill_9();
    if !skip_durability
        && (!outcome.failures().is_empty() || std::env::var_os("BACKBONE_CRASH_KEEP").is_some())
    {
        // Keep the evidence: the data directory as the last run left it
        // (copied off the mount, which goes away) and every run's log.
        copy_tree(&data, &dir.path().join("data"));
        println!(
            "power-loss loop failed; data and logs kept in {}",
            dir.keep().display()
        );
    }
    mount.unmount().expect("unmount");
    outcome.print(&format!(
        "power-loss loop{}: {cycles} power cuts",
        if skip_durability {
            " (broker skipping durability)"
        } else {
            ""
        }
    ));
    Some(outcome)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}
