//! Restart after SIGKILL with 1,000,000 envelopes (1 KiB) stored over
//! 100,000 mailboxes: how long the broker's stores take to open (the sled
//! directory, the checkpoint of the log's index, the replay of the log
//! after it), in two cases: no checkpoint at all (the whole log replayed,
//! the worst case), and a checkpoint just before the kill (nothing to
//! replay; the checkpoint's 100,000 mailbox values loaded).
//!
//! The writer is a child process (this binary, re-run with `--write`)
//! killed with SIGKILL, as a crashed broker would be. Not a criterion
//! bench: one run of each case is what a restart costs.
//!
//! ```sh
//! cargo bench -p backbone-benches --bench restart
//! ```
#![allow(missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backbone_broker::config::StoreConfig;
use backbone_broker::store::{Append, StoredEnvelope, open};
use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;

const MAILBOXES: u64 = 100_000;
const PER_MAILBOX: u64 = 10;
const BATCH: u64 = 1_000;
const IN_FLIGHT: usize = 8;

fn config() -> StoreConfig {
    StoreConfig {
        // No background checkpoint during the write: the first case
        // replays everything.
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreConfig::default()
    }
}

fn address(n: u64) -> Address {
    let mut bytes = [0; 32];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    Address(bytes)
}

/// The child: writes every envelope durably, checkpoints if asked, says
/// so, and waits to be killed.
fn write(dir: &Path, checkpoint: bool) {
    let (stores, _) = open::open(dir, &config(), 1).expect("opens");
    let started = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<Result<usize, backbone_broker::store::StoreError>>();
    let mut outstanding = 0;
    let total = MAILBOXES * PER_MAILBOX;
    for first in (0..total).step_by(BATCH as usize) {
        if outstanding == IN_FLIGHT {
            done_rx.recv().expect("completes").expect("appended");
            outstanding -= 1;
        }
        let items = (first..first + BATCH)
            .map(|n| Append {
                address: address(n % MAILBOXES),
                envelope: Arc::new(StoredEnvelope {
                    seq: n / MAILBOXES + 1,
                    message_id: MessageId([7; 16]),
                    sender: Some(address(u64::MAX)),
                    stored_at_ms: 1,
                    expires_at_ms: u64::MAX,
                    envelope: vec![0xab; 1024].into(),
                }),
            })
            .collect();
        let done = done_tx.clone();
        stores.log.append(
            items,
            Box::new(move |outcome| {
                let _ = done.send(outcome);
            }),
        );
        outstanding += 1;
    }
    for _ in 0..outstanding {
        done_rx.recv().expect("completes").expect("appended");
    }
    let written = started.elapsed();
    if checkpoint {
        let started = Instant::now();
        stores
            .disk_log
            .as_ref()
            .expect("a disk log")
            .checkpoint()
            .expect("checkpoints");
        eprintln!(
            "checkpoint of {MAILBOXES} mailboxes: {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "wrote {total} envelopes durably in {written:?} ({:.0}/s)",
        total as f64 / written.as_secs_f64()
    );
    println!("ready");
    std::thread::sleep(Duration::from_secs(3600));
}

fn case(checkpoint: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .arg("--write")
        .arg(dir.path())
        .arg(if checkpoint { "checkpoint" } else { "none" })
        .stdout(Stdio::piped())
        .spawn()
        .expect("the writer starts");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("reads");
    assert_eq!(line.trim(), "ready");
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let started = Instant::now();
    let (stores, opened) = open::open(dir.path(), &config(), 1).expect("reopens");
    let took = started.elapsed();
    let envelopes = opened.recovery.envelopes;
    assert_eq!(envelopes, MAILBOXES * PER_MAILBOX, "{opened:?}");
    println!(
        "restart/{}: stores open in {took:?}: {} records replayed after checkpoint position {} ({:.0} records/s), {envelopes} envelopes indexed",
        if checkpoint {
            "checkpoint_before_kill"
        } else {
            "no_checkpoint"
        },
        opened.recovery.replayed,
        opened.recovery.checkpoint,
        opened.recovery.replayed as f64 / took.as_secs_f64(),
    );
    stores.log.close().expect("closes");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--write") {
        write(Path::new(&args[at + 1]), args[at + 2] == "checkpoint");
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not run it.
    if !args.iter().any(|arg| arg == "--bench") {
        return;
    }
    case(false);
    case(true);
}
