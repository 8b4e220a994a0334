//! The log against its files: durability order, replay, torn tails,
//! damage, compaction and fail points.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone_protocol::Address;
use backbone_protocol::bytes::MessageId;

use super::checkpoint::Checkpoints;
use super::{LogConfig, LogStore};
use crate::store::failpoint::FailPoints;
use crate::store::{Append, MailboxLog, StoreError, StoredEnvelope};

/// The covered position and each mailbox's value.
type Saved = (Option<u64>, BTreeMap<Address, Vec<u8>>);

/// Checkpoints in memory, shared across reopenings of one test's log.
#[derive(Default)]
pub(crate) struct MemoryCheckpoints {
    state: Mutex<Saved>,
    /// Fail the next write (a directory store that lost its disk).
    pub(crate) fail_next_write: std::sync::atomic::AtomicBool,
}

impl Checkpoints for MemoryCheckpoints {
    fn load_checkpoint(
        &self,
        visit: &mut super::checkpoint::Visit<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let state = self.state.lock().expect("state");
        for (address, bytes) in &state.1 {
            visit(*address, bytes)?;
        }
        Ok(state.0)
    }

    fn checkpointed(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state.lock().expect("state").1.get(address).cloned())
    }

    fn write_checkpoint(
        &self,
        mailboxes: &[(Address, Option<Vec<u8>>)],
        position: u64,
    ) -> Result<(), StoreError> {
        if self
            .fail_next_write
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::Injected);
        }
        let mut state = self.state.lock().expect("state");
        for (address, bytes) in mailboxes {
            match bytes {
                Some(bytes) => state.1.insert(*address, bytes.clone()),
                None => state.1.remove(address),
            };
        }
        state.0 = Some(position);
        Ok(())
    }
}

pub(crate) fn config(dir: &std::path::Path, segment_bytes: u64) -> LogConfig {
    LogConfig {
        dir: dir.join("log"),
        segment_bytes,
        compact_below: 0.5,
        checkpoint_interval: Duration::from_secs(3600),
        no_sync: false,
    }
}

fn envelope(seq: u64, expires_at_ms: u64, len: usize) -> StoredEnvelope {
    StoredEnvelope {
        seq,
        message_id: MessageId([seq as u8; 16]),
        sender: None,
        stored_at_ms: 1,
        expires_at_ms,
        envelope: vec![seq as u8; len].into(),
    }
}

fn address(n: u8) -> Address {
    Address([n; 32])
}

/// Runs `op` on the log and waits for its completion.
fn wait(op: impl FnOnce(super::pipeline::Completion)) -> Result<usize, StoreError> {
    let (done, result) = std::sync::mpsc::channel();
    op(Box::new(move |outcome| {
        let _ = done.send(outcome);
    }));
    result.recv().expect("completed")
}

fn append(
    log: &LogStore,
    address: Address,
    envelopes: &[StoredEnvelope],
) -> Result<usize, StoreError> {
    let items = envelopes
        .iter()
        .map(|envelope| Append {
            address,
            envelope: Arc::new(envelope.clone()),
        })
        .collect();
    wait(|done| log.append(items, done))
}

fn seqs(log: &LogStore, address: &Address, now_ms: u64) -> Vec<u64> {
    log.read_from(address, 0, usize::MAX, now_ms)
        .expect("reads")
        .iter()
        .map(|envelope| envelope.seq)
        .collect()
}

fn open(
    dir: &std::path::Path,
    checkpoints: &Arc<MemoryCheckpoints>,
    segment_bytes: u64,
) -> LogStore {
    LogStore::open(config(dir, segment_bytes), checkpoints.clone(), 0)
        .expect("opens")
        .0
}

#[test]
fn appended_envelopes_read_back_and_survive_reopening_with_and_without_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let (a, b) = (address(1), address(2));
    {
        let log = open(dir.path(), &checkpoints, 1 << 20);
        let batch: Vec<_> = (1..=5).map(|seq| envelope(seq, 1_000, 100)).collect();
        assert_eq!(append(&log, a, &batch), Ok(5));
        assert_eq!(append(&log, b, &[envelope(1, 10, 3)]), Ok(1));
        assert_eq!(seqs(&log, &a, 0), [1, 2, 3, 4, 5]);
        assert_eq!(
            log.read_from(&a, 3, 2, 0).expect("reads")[0],
            envelope(3, 1_000, 100)
        );
        assert_eq!(wait(|done| log.delete(a, vec![2, 4, 9], done)), Ok(2));
        assert_eq!(seqs(&log, &a, 0), [1, 3, 5]);
        assert_eq!(seqs(&log, &b, 20), Vec::<u64>::new(), "expired at 10");
        let usage = log.usage(&a, 0).expect("usage");
        assert_eq!((usage.envelopes, usage.bytes), (3, 300));
        // Dropped without a checkpoint: the next start replays everything.
    }
    {
        let log = open(dir.path(), &checkpoints, 1 << 20);
        assert_eq!(seqs(&log, &a, 0), [1, 3, 5]);
        assert_eq!(log.head_seq(&a), Ok(5));
        assert_eq!(log.head_seq(&b), Ok(1));
        log.checkpoint().expect("checkpoints");
        assert_eq!(wait(|done| log.delete(a, vec![1, 3, 5], done)), Ok(3));
        log.shutdown().expect("shuts down");
    }
    let log = open(dir.path(), &checkpoints, 1 << 20);
    assert_eq!(seqs(&log, &a, 0), Vec::<u64>::new());
    assert_eq!(log.head_seq(&a), Ok(5), "the head outlives every envelope");
    assert_eq!(log.head_seq(&address(3)), Ok(0));
}

#[test]
fn a_clean_shutdown_leaves_no_preallocated_tail_and_the_next_start_preallocates_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let segment_bytes = 1 << 20;
    let file = dir.path().join("log").join(format!("{:020}.log", 0));
    let file_len = || std::fs::metadata(&file).expect("the segment").len();
    let a = address(1);
    let log = open(dir.path(), &checkpoints, segment_bytes);
    assert_eq!(file_len(), segment_bytes, "a new segment is preallocated");
    assert_eq!(append(&log, a, &[envelope(1, 1_000, 100)]), Ok(1));
    log.shutdown().expect("shuts down");
    assert_eq!(
        file_len(),
        log.record_bytes(),
        "cut to its records at shutdown"
    );
    assert!(file_len() < 1_000);

    let log = open(dir.path(), &checkpoints, segment_bytes);
    assert_eq!(file_len(), segment_bytes, "preallocated again at start");
    assert_eq!(append(&log, a, &[envelope(2, 1_000, 100)]), Ok(1));
    drop(log);
    // Killed with the tail preallocated: the zeros are found, not damage.
    let log = open(dir.path(), &checkpoints, segment_bytes);
    assert_eq!(seqs(&log, &a, 0), [1, 2]);
    assert_eq!(append(&log, a, &[envelope(3, 1_000, 100)]), Ok(1));
    log.shutdown().expect("shuts down");
    let log = open(dir.path(), &checkpoints, segment_bytes);
    assert_eq!(seqs(&log, &a, 0), [1, 2, 3]);
}

/// Writes `bytes` at `position` of the segment file at `path`, whose base
/// is 0 (the tests' logs fit in one segment).
fn scribble(path: &std::path::Path, position: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opens");
    file.write_all_at(bytes, position).expect("writes");
}

#[test]
fn a_torn_tail_is_cut_off_and_what_was_durable_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let a = address(1);
    let (path, end) = {
        let log = open(dir.path(), &checkpoints, 1 << 20);
        append(&log, a, &[envelope(1, 1_000, 50), envelope(2, 1_000, 50)]).expect("appends");
        let segment = log.segments.last().expect("segment");
        (segment.path().to_owned(), segment.end())
    };
    let durable = std::fs::read(&path).expect("reads");
    // A crash in the middle of the next write: 300 bytes of a record reached
    // the file, in its preallocated space.
    let mut next = Vec::new();
    super::record::encode_append(&a, &envelope(3, 1_000, 500), &mut next);
    scribble(&path, end, &next[..300]);
    let (log, recovery) =
        LogStore::open(config(dir.path(), 1 << 20), checkpoints.clone(), 0).expect("opens");
    assert_eq!(recovery.truncated, 300);
    assert_eq!(
        std::fs::read(&path).expect("reads"),
        durable,
        "cut back exactly, space kept"
    );
    assert_eq!(seqs(&log, &a, 0), [1, 2]);
    // And the log goes on from there.
    append(&log, a, &[envelope(3, 1_000, 5)]).expect("appends");
    assert_eq!(seqs(&log, &a, 0), [1, 2, 3]);
    let end = log.segments.last().expect("segment").end();

    // A garbled last record (its length arrived, some of its bytes not) too.
    drop(log);
    scribble(&path, end - 3, &[0xEE]);
    let (log, recovery) =
        LogStore::open(config(dir.path(), 1 << 20), checkpoints.clone(), 0).expect("opens");
    assert!(recovery.truncated > 0);
    assert_eq!(seqs(&log, &a, 0), [1, 2]);

    // A clean end (preallocated zeros) is no torn tail.
    drop(log);
    let (_, recovery) =
        LogStore::open(config(dir.path(), 1 << 20), checkpoints.clone(), 0).expect("opens");
    assert_eq!(recovery.truncated, 0);
}

/// Flips a bit of the sealed envelope bytes of the record at `position`
/// (after its 9-byte header and kind and 93 bytes of fields).
fn flip_envelope_bit(path: &std::path::Path, position: u64) {
    let at = position as usize + 9 + 93 + 10;
    let bytes = std::fs::read(path).expect("reads");
    scribble(path, at as u64, &[bytes[at] ^ 0x01]);
}

#[test]
fn damage_that_a_later_batch_proves_durable_stops_the_start_and_repair_drops_only_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let (a, b) = (address(1), address(2));
    let (path, position) = {
        let log = open(dir.path(), &checkpoints, 1 << 20);
        append(&log, a, &[envelope(1, 1_000, 50)]).expect("appends");
        log.checkpoint().expect("checkpoints");
        append(&log, b, &[envelope(1, 1_000, 50)]).expect("appends");
        let position = log.index.entry(&b, 1).expect("indexed").position;
        // Later writes, each starting with a batch record that says the
        // damaged one was durable.
        append(&log, a, &[envelope(2, 1_000, 50)]).expect("appends");
        append(&log, a, &[envelope(3, 1_000, 50)]).expect("appends");
        (
            log.segments.last().expect("segment").path().to_owned(),
            position,
        )
    };
    flip_envelope_bit(&path, position);
    let error = LogStore::open(config(dir.path(), 1 << 20), checkpoints.clone(), 0)
        .map(|_| ())
        .expect_err("damage stops the start");
    let StoreError::Damaged { what } = &error else {
        panic!("not damage: {error:?}");
    };
    assert!(
        what.contains(&path.display().to_string()) && what.contains(&format!("offset {position}")),
        "{what}"
    );

    let log_dir = dir.path().join("log");
    let damages = super::verify::verify(&log_dir, checkpoints.as_ref()).expect("verifies");
    assert_eq!(damages.len(), 1, "{damages:?}");
    assert_eq!(damages[0].offset, position);
    assert!(!damages[0].tail);
    assert!(damages[0].mailboxes.is_empty(), "after the checkpoint");
    assert_eq!(damages[0].possibly, Some(b));
    super::verify::repair(&log_dir, checkpoints.as_ref(), &damages).expect("repairs");
    assert!(
        super::verify::verify(&log_dir, checkpoints.as_ref())
            .expect("verifies")
            .is_empty()
    );
    let log = open(dir.path(), &checkpoints, 1 << 20);
    assert_eq!(seqs(&log, &a, 0), [1, 2, 3], "the other records are intact");
    assert_eq!(
        seqs(&log, &b, 0),
        Vec::<u64>::new(),
        "only the damaged one is gone"
    );
}

#[test]
fn damage_before_the_checkpoint_fails_the_read_and_verify_names_the_mailbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let (a, b) = (address(1), address(2));
    let (path, position) = {
        let log = open(dir.path(), &checkpoints, 1 << 20);
        append(&log, a, &[envelope(1, 1_000, 50)]).expect("appends");
        append(&log, b, &[envelope(1, 1_000, 50)]).expect("appends");
        log.checkpoint().expect("checkpoints");
        let position = log.index.entry(&b, 1).expect("indexed").position;
        (
            log.segments.last().expect("segment").path().to_owned(),
            position,
        )
    };
    flip_envelope_bit(&path, position);
    let log = open(dir.path(), &checkpoints, 1 << 20);
    assert!(matches!(
        log.read_from(&b, 0, 10, 0),
        Err(StoreError::Damaged { .. })
    ));
    assert_eq!(seqs(&log, &a, 0), [1]);
    drop(log);
    let log_dir = dir.path().join("log");
    let damages = super::verify::verify(&log_dir, checkpoints.as_ref()).expect("verifies");
    assert_eq!(damages.len(), 1, "{damages:?}");
    assert_eq!(damages[0].mailboxes.iter().collect::<Vec<_>>(), [&b]);
    assert_eq!(
        super::verify::repair(&log_dir, checkpoints.as_ref(), &damages),
        Ok(1),
        "one envelope dropped from the index"
    );
    let log = open(dir.path(), &checkpoints, 1 << 20);
    assert_eq!(seqs(&log, &b, 0), Vec::<u64>::new());
    assert_eq!(
        log.head_seq(&b),
        Ok(1),
        "its number is not handed out again"
    );
}

#[test]
fn compaction_deletes_dead_segments_and_moves_live_records_without_reviving_deleted_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let a = address(1);
    let log = open(dir.path(), &checkpoints, 4096);
    for seq in 1..=40 {
        append(&log, a, &[envelope(seq, 1_000, 400)]).expect("appends");
    }
    let segments_before = log.segments.all().len();
    assert!(segments_before >= 4, "{segments_before} segments");
    // Delete all but every tenth envelope.
    let doomed: Vec<u64> = (1..=40).filter(|seq| seq % 10 != 0).collect();
    assert_eq!(wait(|done| log.delete(a, doomed, done)), Ok(36));
    let bytes_before = log.bytes_on_disk();
    let first = log.maintain().expect("maintains");
    assert!(first.deleted > 0 || first.compacted > 0, "{first:?}");
    // The copies are durable once a barrier after them is; then the next
    // pass deletes the evacuated segments.
    wait(|done| log.barrier(done)).expect("barrier");
    log.maintain().expect("maintains");
    assert!(
        log.bytes_on_disk() * 3 < bytes_before,
        "{} of {bytes_before} bytes left",
        log.bytes_on_disk()
    );
    assert_eq!(seqs(&log, &a, 0), [10, 20, 30, 40]);
    // An envelope deleted after its move was written stays deleted on replay.
    assert_eq!(wait(|done| log.delete(a, vec![20], done)), Ok(1));
    drop(log);
    let log = open(dir.path(), &checkpoints, 4096);
    assert_eq!(seqs(&log, &a, 0), [10, 30, 40]);
    assert_eq!(log.head_seq(&a), Ok(40));
}

#[test]
fn disk_use_follows_live_envelopes_under_mixed_ttls() {
    // Rounds of sends to many mailboxes, one in ten long-lived and the rest
    // expiring one round later, with expiry and maintenance (checkpoint,
    // compaction) after each round as the broker runs them: the log must
    // stay within a bound of the live bytes however long it runs, not grow
    // with everything ever written.
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    const SEGMENT: u64 = 64 * 1024;
    const LEN: usize = 1024;
    let log = open(dir.path(), &checkpoints, SEGMENT);
    let mut seq = 0;
    let mut live_long = 0u64;
    let mut written = 0u64;
    for round in 1..=60u64 {
        for mailbox in 0..20u8 {
            seq += 1;
            let long = seq % 10 == 0;
            let expires = if long { u64::MAX } else { round + 1 };
            append(&log, address(mailbox), &[envelope(seq, expires, LEN)]).expect("appends");
            written += LEN as u64;
            if long {
                live_long += 1;
            }
        }
        log.expire(round, usize::MAX).expect("expires");
        wait(|done| log.barrier(done)).expect("barrier");
        log.maintain().expect("maintains");
    }
    // Live: the long-lived ones and the last round's short ones. Records
    // carry ~100 bytes besides the envelope. A closed segment is compacted
    // once less than `compact_below` of it is live, so every closed one
    // left is at least that full: the bound is the live records over that
    // fraction, plus the segment being written (preallocated) and one
    // awaiting compaction. (Which segments end up just above the fraction
    // depends on how batches fell, so a tighter bound holds only by luck.)
    let live_bytes = (live_long + 18) * LEN as u64;
    let compact_below = config(dir.path(), SEGMENT).compact_below;
    let bound = ((live_bytes * 11 / 10) as f64 / compact_below) as u64 + 2 * SEGMENT;
    assert!(
        written > 2 * bound,
        "the test writes far more than it keeps"
    );
    // Let the last passes' copies become durable and covered, so the
    // segments they evacuated go. How many passes that takes depends on
    // when each batch's completion landed (more on a loaded machine); a log
    // that kept what it should drop never settles under the bound.
    for _ in 0..10 {
        wait(|done| log.barrier(done)).expect("barrier");
        log.maintain().expect("maintains");
        if log.bytes_on_disk() <= bound {
            break;
        }
    }
    let on_disk = log.bytes_on_disk();
    assert!(
        on_disk <= bound,
        "{on_disk} bytes on disk for {live_bytes} live"
    );
    assert_eq!(log.envelope_count(), live_long + 18);
}

#[test]
fn a_checkpoint_that_fails_leaves_the_mailboxes_for_the_next_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let a = address(1);
    let log = open(dir.path(), &checkpoints, 1 << 20);
    append(&log, a, &[envelope(1, 1_000, 10)]).expect("appends");
    checkpoints
        .fail_next_write
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(log.checkpoint(), Err(StoreError::Injected));
    log.checkpoint().expect("checkpoints");
    assert!(checkpoints.checkpointed(&a).expect("reads").is_some());
}

#[test]
fn a_failed_write_fails_its_operations_and_the_log_goes_on_but_a_failed_sync_stops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let fail = Arc::new(FailPoints::default());
    let a = address(1);
    let (log, _) = LogStore::open_with(
        config(dir.path(), 1 << 20),
        checkpoints.clone(),
        0,
        fail.clone(),
    )
    .expect("opens");
    append(&log, a, &[envelope(1, 1_000, 10)]).expect("appends");
    fail.fail_after(0, Some("log.write"));
    assert_eq!(
        append(&log, a, &[envelope(2, 1_000, 10)]),
        Err(StoreError::Injected)
    );
    assert_eq!(fail.take_fired(), Some("log.write"));
    append(&log, a, &[envelope(3, 1_000, 10)]).expect("the log goes on");
    assert_eq!(seqs(&log, &a, 0), [1, 3]);

    fail.fail_after(0, Some("log.sync"));
    assert_eq!(
        append(&log, a, &[envelope(4, 1_000, 10)]),
        Err(StoreError::Injected)
    );
    assert!(
        append(&log, a, &[envelope(5, 1_000, 10)]).is_err(),
        "after a failed fdatasync nothing is written"
    );
    assert_eq!(seqs(&log, &a, 0), [1, 3], "nothing unsynced was indexed");
    drop(log);
    // A restart reads back what is on disk: the unsynced record may or may
    // not be there (here the write did reach the file), never a gap.
    let log = open(dir.path(), &checkpoints, 1 << 20);
    let after = seqs(&log, &a, 0);
    assert!(after == [1, 3] || after == [1, 3, 4], "{after:?}");
}

#[test]
fn every_fail_point_of_the_log_is_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    let fail = Arc::new(FailPoints::default());
    let a = address(1);
    {
        let (log, _) = LogStore::open_with(
            config(dir.path(), 2048),
            checkpoints.clone(),
            0,
            fail.clone(),
        )
        .expect("opens");
        for seq in 1..=10 {
            append(&log, a, &[envelope(seq, 1_000, 400)]).expect("appends");
        }
        wait(|done| log.delete(a, (1..=10).collect(), done)).expect("deletes");
        log.maintain().expect("maintains");
    }
    // A torn tail to cut.
    let path = Arc::new(
        LogStore::open(config(dir.path(), 2048), checkpoints.clone(), 0)
            .expect("opens")
            .0,
    )
    .segments
    .last()
    .expect("segment")
    .path()
    .to_owned();
    let mut bytes = std::fs::read(&path).expect("reads");
    bytes.extend_from_slice(&[7; 20]);
    std::fs::write(&path, bytes).expect("writes");
    LogStore::open_with(
        config(dir.path(), 2048),
        checkpoints.clone(),
        0,
        fail.clone(),
    )
    .expect("opens");
    let passed = fail.passed();
    for site in [
        "log.write",
        "log.sync",
        "log.create",
        "log.sync_dir",
        "log.delete",
        "log.truncate",
    ] {
        assert!(passed.contains(site), "{site} never reached: {passed:?}");
    }
}
