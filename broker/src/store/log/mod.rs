//! The mailbox log: every envelope is a record in an append-only,
//! checksummed segment log made durable with `fdatasync` (group commit),
//! indexed in memory, and checkpointed into the directory store.
//!
//! - [`record`]: a record's bytes (length, CRC-32, kind, body).
//! - [`segment`]: segment files and log positions.
//! - [`pipeline`]: the writer and sync threads (pipelined group commit).
//! - [`index`]: the in-memory index of durable envelopes, by mailbox and by
//!   expiry time.
//! - [`checkpoint`]: the index's checkpoints in the directory store.
//! - [`verify`]: finding and dropping damaged records (`backbone store
//!   verify` and `repair`).
//!
//! **Opening** loads the checkpoint, then replays the log after its
//! position. A torn tail — a last record cut short or garbled by a crash,
//! which no later batch record proves was durable — is cut off, with a log
//! line saying how many bytes; any other damage stops the start with an
//! error naming the file and offset.
//!
//! **Space.** Expiry and deletes only drop index entries. After each
//! checkpoint, a segment the checkpoint covers whose records are all dead is
//! deleted, and one whose live bytes fell under `compact_below` of its size
//! is compacted: its live records are copied forward (as `moved` records)
//! and it is deleted once a later checkpoint covers the copies. A crash at
//! any point leaves either the old records or their copies indexed.

pub mod checkpoint;
pub mod index;
pub mod pipeline;
pub mod record;
pub mod segment;
pub mod verify;

#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use backbone_protocol::Address;

use self::checkpoint::Checkpoints;
use self::index::{Entry, Index};
use self::pipeline::{Op, Pipeline};
use self::record::Record;
use self::segment::{Scanned, Scanner, Segments};
use super::failpoint::FailPoints;
use super::{Append, Completion, MailboxLog, MailboxUsage, StoreError, StoredEnvelope};

/// How the log is laid out and kept small.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Where the segment files are.
    pub dir: PathBuf,
    /// A segment is closed once it would grow past this.
    pub segment_bytes: u64,
    /// A covered segment whose live bytes are below this fraction of its
    /// size is compacted.
    pub compact_below: f64,
    /// How often the index is checkpointed (and compaction runs).
    pub checkpoint_interval: Duration,
    /// Skip `fdatasync` (test sabotage only; see `unsafe-no-sync`).
    pub no_sync: bool,
}

/// What opening the log found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The position the checkpoint covered.
    pub checkpoint: u64,
    /// Records replayed after it.
    pub replayed: u64,
    /// Bytes of a torn tail cut off.
    pub truncated: u64,
    /// Envelopes in the index afterwards.
    pub envelopes: u64,
}

/// What one compaction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Segments deleted because nothing in them was live.
    pub deleted: usize,
    /// Segments whose live records were copied forward.
    pub compacted: usize,
    /// Records copied.
    pub moved: usize,
}

/// The mailbox log; see the module documentation.
pub struct LogStore {
    segments: Arc<Segments>,
    index: Arc<Index>,
    pipeline: Pipeline,
    checkpoints: Arc<dyn Checkpoints>,
    config: LogConfig,
    fail: Arc<FailPoints>,
    /// The position the last durable checkpoint covers.
    checkpointed: AtomicU64,
    /// Segments whose live records were copied forward, by base.
    evacuated: Mutex<std::collections::BTreeSet<u64>>,
    /// One checkpoint (and compaction pass) at a time.
    maintenance: Mutex<()>,
    background: Mutex<Option<Background>>,
}

struct Background {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens (or creates) the log in `config.dir`: loads the checkpoint from
    /// `checkpoints`, replays the log after it (envelopes expired at
    /// `now_ms` are not indexed), cuts off a torn tail, and starts the write
    /// pipeline. Does not start the background checkpoints: see
    /// [`LogStore::start_background`].
    pub fn open(
        config: LogConfig,
        checkpoints: Arc<dyn Checkpoints>,
        now_ms: u64,
    ) -> Result<(Self, Recovery), StoreError> {
        Self::open_with(config, checkpoints, now_ms, Arc::default())
    }

    /// [`LogStore::open`] with fail points a test armed.
    pub fn open_with(
        config: LogConfig,
        checkpoints: Arc<dyn Checkpoints>,
        now_ms: u64,
        fail: Arc<FailPoints>,
    ) -> Result<(Self, Recovery), StoreError> {
        let segments = Arc::new(Segments::open(&config.dir, config.segment_bytes, &fail)?);
        let index = Arc::new(Index::default());
        for segment in segments.all() {
            index.add_segment(segment.base());
        }
        let checkpoint = checkpoints
            .load_checkpoint(&mut |address, bytes| {
                let mailbox = checkpoint::decode(bytes)?;
                if !mailbox.entries.is_empty() {
                    index.load(address, mailbox);
                }
                Ok(())
            })?
            .unwrap_or(0);
        let mut recovery = replay(
            &segments,
            &index,
            checkpoint,
            now_ms,
            config.segment_bytes,
            &fail,
        )?;
        recovery.checkpoint = checkpoint;
        check_positions(&segments, &index)?;
        recovery.envelopes = index.envelopes();
        // What replay indexed may be writes a crashed run made but never
        // synced (the page cache kept them): make them durable before they
        // are served, or a power cut now could take back envelopes devices
        // were given and acknowledged, and their numbers be handed out again.
        if let Some(last) = segments.last()
            && !config.no_sync
        {
            last.sync(&fail)?;
        }
        // A segment cut to its records at the last shutdown is preallocated
        // again, so that appends to it sync data only, not a growing size.
        if let Some(last) = segments.last()
            && last.file_len()? < config.segment_bytes
        {
            last.truncate(last.end(), Some(config.segment_bytes), &fail)?;
        }
        let end = segments.last().map_or(0, |segment| segment.end());
        index.set_applied_through(end);
        let pipeline = Pipeline::start(
            segments.clone(),
            index.clone(),
            fail.clone(),
            config.segment_bytes,
            config.no_sync,
        )?;
        metrics::gauge!("backbone_log_bytes").set(segments.bytes() as f64);
        Ok((
            Self {
                segments,
                index,
                pipeline,
                checkpoints,
                config,
                fail,
                checkpointed: AtomicU64::new(checkpoint),
                evacuated: Mutex::default(),
                maintenance: Mutex::new(()),
                background: Mutex::new(None),
            },
            recovery,
        ))
    }

    /// Starts a thread that checkpoints and compacts every
    /// `checkpoint_interval`, until [`LogStore::shutdown`].
    pub fn start_background(self: &Arc<Self>) {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (log, thread_stop) = (Arc::downgrade(self), stop.clone());
        let interval = self.config.checkpoint_interval;
        let thread = std::thread::Builder::new()
            .name("backbone-log-checkpoint".into())
            .spawn(move || {
                loop {
                    let (stopped, wake) = &*thread_stop;
                    let guard = stopped
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let (guard, _) = wake
                        .wait_timeout_while(guard, interval, |stopped| !*stopped)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if *guard {
                        return;
                    }
                    drop(guard);
                    let Some(log) = log.upgrade() else { return };
                    if let Err(error) = log.maintain() {
                        tracing::warn!(%error, "checkpointing or compacting the log failed");
                    }
                }
            });
        match thread {
            Ok(thread) => {
                *self
                    .background
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(Background { stop, thread })
            }
            Err(error) => tracing::error!(%error, "cannot start the log's checkpoint thread"),
        }
    }

    fn read_entry(&self, address: &Address, entry: &Entry) -> Result<StoredEnvelope, StoreError> {
        let bytes = self.segments.read_at(entry.position, entry.len as usize)?;
        let damaged = |what: String| StoreError::Damaged {
            what: format!(
                "log record at position {} ({address}, seq {}): {what}; run `backbone store verify`",
                entry.position, entry.seq
            ),
        };
        match record::decode(&bytes) {
            Ok((
                Record::Append {
                    address: found,
                    envelope,
                }
                | Record::Moved {
                    address: found,
                    envelope,
                    ..
                },
                _,
            )) if found == *address && envelope.seq == entry.seq => Ok(envelope),
            Ok(_) => Err(damaged("another record than the index expects".into())),
            Err(error) => Err(damaged(error.to_string())),
        }
    }

    /// Bytes the segment files take on disk, preallocated space included.
    pub fn bytes_on_disk(&self) -> u64 {
        self.segments.file_bytes()
    }

    /// Bytes of records in the segment files.
    pub fn record_bytes(&self) -> u64 {
        self.segments.bytes()
    }

    /// Every position before this one is durable.
    pub fn synced_through(&self) -> u64 {
        self.pipeline.synced_through()
    }

    /// Writes a checkpoint, then compacts what it covers.
    pub fn maintain(&self) -> Result<Compaction, StoreError> {
        let _one = self
            .maintenance
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.checkpoint_locked()?;
        let compaction = self.compact_locked()?;
        metrics::gauge!("backbone_log_bytes").set(self.segments.bytes() as f64);
        Ok(compaction)
    }

    /// Checkpoints the index now.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = self
            .maintenance
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.checkpoint_locked()
    }

    fn checkpoint_locked(&self) -> Result<(), StoreError> {
        // The position first, then the mailboxes: every mailbox changed by
        // a record before the position is dirty by then (see `index`).
        let position = self.index.applied_through();
        let dirty = self.index.take_dirty();
        let values: Vec<(Address, Option<Vec<u8>>)> = dirty
            .iter()
            .map(|(address, mailbox)| (*address, mailbox.as_ref().map(checkpoint::encode)))
            .collect();
        if let Err(error) = self.checkpoints.write_checkpoint(&values, position) {
            self.index
                .mark_dirty(dirty.iter().map(|(address, _)| *address));
            return Err(error);
        }
        self.checkpointed.store(position, Ordering::Release);
        self.index.evict_empty(
            dirty
                .iter()
                .filter(|(_, mailbox)| mailbox.as_ref().is_some_and(|m| m.entries.is_empty()))
                .map(|(address, _)| *address),
        );
        metrics::counter!("backbone_log_checkpoints_total").increment(1);
        Ok(())
    }

    fn compact_locked(&self) -> Result<Compaction, StoreError> {
        let covered = self.checkpointed.load(Ordering::Acquire);
        let live = self.index.live_bytes();
        let last = self.segments.last().map(|segment| segment.base());
        let mut report = Compaction::default();
        for segment in self.segments.all() {
            let base = segment.base();
            if Some(base) == last || segment.end() > covered {
                continue;
            }
            let live_bytes = live.get(&base).copied().unwrap_or(0);
            if live_bytes == 0 {
                self.segments.remove(base, &self.fail)?;
                self.index.remove_segment(base);
                self.evacuated
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&base);
                report.deleted += 1;
                metrics::counter!("backbone_log_segments_deleted_total").increment(1);
                continue;
            }
            let sparse = (live_bytes as f64) < self.config.compact_below * segment.len() as f64;
            let fresh = self
                .evacuated
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(base);
            if sparse && fresh {
                for (address, entry) in self.index.entries_in(base, segment.end()) {
                    let envelope = self.read_entry(&address, &entry)?;
                    self.pipeline.submit(
                        Op::Move {
                            from: entry.position,
                            address,
                            envelope,
                        },
                        Box::new(|_| {}),
                    );
                    report.moved += 1;
                }
                report.compacted += 1;
                metrics::counter!("backbone_log_segments_compacted_total").increment(1);
            } else if !sparse {
                self.evacuated
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&base);
            }
        }
        metrics::counter!("backbone_log_records_moved_total").increment(report.moved as u64);
        Ok(report)
    }

    /// Stops the background thread and the pipeline after what is queued,
    /// and writes a last checkpoint (so the next start replays little).
    pub fn shutdown(&self) -> Result<(), StoreError> {
        let background = self
            .background
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(background) = background {
            let (stopped, wake) = &*background.stop;
            *stopped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            wake.notify_all();
            let _ = background.thread.join();
        }
        let (done, wait) = std::sync::mpsc::channel();
        self.pipeline.submit(
            Op::Barrier,
            Box::new(move |result| {
                let _ = done.send(result);
            }),
        );
        let _ = wait.recv();
        self.pipeline.shutdown();
        self.checkpoint()?;
        // A stopped broker's data directory holds no preallocated zeros
        // (they would be copied by backups and counted by `du`); the next
        // start preallocates again.
        if let Some(last) = self.segments.last() {
            last.truncate(last.end(), None, &self.fail)?;
        }
        Ok(())
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Whether an fdatasync failed: the log refuses every write until it
    /// is opened again.
    pub fn failed(&self) -> bool {
        self.pipeline.failed()
    }

    /// The fail points of this log (tests arm them).
    pub fn fail_points(&self) -> &FailPoints {
        &self.fail
    }
}

impl MailboxLog for LogStore {
    fn append(&self, items: Vec<Append>, done: Completion) {
        #[cfg(feature = "unsafe-early-ack")]
        if early_ack::enabled() {
            done(Ok(items.len()));
            self.pipeline.submit(Op::Append(items), Box::new(|_| {}));
            return;
        }
        self.pipeline.submit(Op::Append(items), done);
    }

    fn delete(&self, address: Address, seqs: Vec<u64>, done: Completion) {
        self.pipeline.submit(Op::Delete { address, seqs }, done);
    }

    fn drop_mailbox(&self, address: Address, done: Completion) {
        self.pipeline.submit(
            Op::Drop {
                address,
                through_seq: u64::MAX,
            },
            done,
        );
    }

    fn import(
        &self,
        address: Address,
        envelopes: Vec<StoredEnvelope>,
        head: u64,
        done: Completion,
    ) {
        let head = head.max(envelopes.iter().map(|e| e.seq).max().unwrap_or(0));
        if let Err(error) = self.head_seq(&address).map(|held| {
            self.index.raise_head(&address, held.max(head));
        }) {
            return done(Err(error));
        }
        let items = envelopes
            .into_iter()
            .map(|envelope| Append {
                address,
                envelope: Arc::new(envelope),
            })
            .collect();
        self.pipeline.submit(Op::Append(items), done);
    }

    fn barrier(&self, done: Completion) {
        self.pipeline.submit(Op::Barrier, done);
    }

    fn read_from(
        &self,
        address: &Address,
        from_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.index
            .read(address, from_seq, limit, now_ms)
            .into_iter()
            .map(|entry| self.read_entry(address, &entry))
            .collect()
    }

    fn usage(&self, address: &Address, now_ms: u64) -> Result<MailboxUsage, StoreError> {
        let (envelopes, bytes) = self.index.usage(address, now_ms);
        Ok(MailboxUsage { envelopes, bytes })
    }

    fn head_seq(&self, address: &Address) -> Result<u64, StoreError> {
        if let Some(head) = self.index.head(address) {
            return Ok(head);
        }
        Ok(match self.checkpoints.checkpointed(address)? {
            Some(bytes) => checkpoint::decode(&bytes)?.head,
            None => 0,
        })
    }

    fn oldest_seq(&self, address: &Address) -> Result<Option<u64>, StoreError> {
        Ok(self.index.oldest(address))
    }

    fn export(&self, address: &Address) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.index
            .entries(address)
            .iter()
            .map(|entry| self.read_entry(address, entry))
            .collect()
    }

    fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        Ok(self.index.expire(now_ms, limit))
    }

    fn mailboxes(&self, filter: &dyn Fn(&Address) -> bool) -> Vec<Address> {
        self.index.addresses(filter)
    }

    fn envelope_count(&self) -> u64 {
        self.index.envelopes()
    }

    fn log_bytes_on_disk(&self) -> u64 {
        self.segments.file_bytes()
    }

    fn close(&self) -> Result<(), StoreError> {
        self.shutdown()
    }
}

/// Replays the log from `from` into `index`; cuts off a torn tail.
fn replay(
    segments: &Segments,
    index: &Index,
    from: u64,
    now_ms: u64,
    segment_bytes: u64,
    fail: &FailPoints,
) -> Result<Recovery, StoreError> {
    let mut recovery = Recovery::default();
    let all = segments.all();
    for (at, segment) in all.iter().enumerate() {
        if segment.end() <= from {
            continue;
        }
        let last = at + 1 == all.len();
        let mut scanner = Scanner::new(segment, from.max(segment.first_record()));
        loop {
            match scanner.next_record()? {
                Scanned::End => break,
                Scanned::Record {
                    position,
                    len,
                    record,
                } => {
                    recovery.replayed += 1;
                    apply_replayed(index, record, position, len as u32, now_ms);
                }
                Scanned::Bad(position, error) => {
                    if last && zeros_from(segment, position)? {
                        // The preallocated rest of the last segment.
                        segment.set_end(position);
                        break;
                    }
                    if !last || proven_durable(segment, position)? {
                        return Err(StoreError::Damaged {
                            what: format!(
                                "{} at offset {}: {error}; run `backbone store verify` and `backbone store repair`",
                                segment.path().display(),
                                position - segment.base()
                            ),
                        });
                    }
                    let cut = torn_len(segment, position)?;
                    segment.truncate(position, Some(segment_bytes), fail)?;
                    tracing::warn!(
                        file = %segment.path().display(),
                        offset = position - segment.base(),
                        bytes = cut,
                        %error,
                        "cut off a torn tail of the log (writes a crash interrupted, never acknowledged)"
                    );
                    recovery.truncated = cut;
                    break;
                }
            }
        }
    }
    Ok(recovery)
}

/// How many bytes a torn tail at `position` spans: up to the last nonzero
/// byte (the zeros after it are preallocated space).
fn torn_len(segment: &segment::Segment, position: u64) -> Result<u64, StoreError> {
    let rest = segment.read_at(position, (segment.end() - position) as usize)?;
    Ok(rest
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |last| last as u64 + 1))
}

/// Whether every byte of `segment` from `position` on is zero: the
/// preallocated space after the last record.
pub(crate) fn zeros_from(segment: &segment::Segment, position: u64) -> Result<bool, StoreError> {
    let mut at = position;
    let end = segment.end();
    while at < end {
        let len = (end - at).min(1 << 20) as usize;
        if segment.read_at(at, len)?.iter().any(|byte| *byte != 0) {
            return Ok(false);
        }
        at += len as u64;
    }
    Ok(true)
}

/// Whether a valid batch record after `position` in `segment` says that
/// everything up to past `position` had been made durable: then bad bytes
/// at `position` are damage, not a torn tail.
fn proven_durable(segment: &segment::Segment, position: u64) -> Result<bool, StoreError> {
    let rest = segment.read_at(position, (segment.end() - position) as usize)?;
    // A batch record: length field 13 (crc, kind, u64) and kind 4.
    const BATCH_LEN_FIELD: [u8; 4] = 13u32.to_le_bytes();
    for offset in 1..rest.len().saturating_sub(16) {
        if rest[offset..offset + 4] != BATCH_LEN_FIELD || rest[offset + 8] != 4 {
            continue;
        }
        if let Ok((Record::Batch { synced_through }, _)) = record::decode(&rest[offset..])
            && synced_through > position
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn apply_replayed(index: &Index, record: Record, position: u64, len: u32, now_ms: u64) {
    match record {
        Record::Append { address, envelope } => {
            if envelope.expires_at_ms > now_ms {
                index.insert(&address, pipeline::entry(&envelope, position, len), None);
            } else {
                index.raise_head(&address, envelope.seq);
            }
        }
        Record::Moved {
            from,
            address,
            envelope,
        } => index.insert(
            &address,
            pipeline::entry(&envelope, position, len),
            Some(from),
        ),
        Record::Delete { address, seqs } => {
            index.delete(&address, &seqs);
        }
        Record::Drop {
            address,
            through_seq,
        } => index.drop_through(&address, through_seq),
        Record::Batch { .. } | Record::Void { .. } => {}
    }
}

/// Every indexed entry must be in a segment that exists: a checkpoint
/// pointing elsewhere means the directory store lost writes.
fn check_positions(segments: &Segments, index: &Index) -> Result<(), StoreError> {
    let bases: Vec<(u64, u64)> = segments
        .all()
        .iter()
        .map(|segment| (segment.base(), segment.end()))
        .collect();
    for address in index.addresses(&|_| true) {
        for entry in index.entries(&address) {
            let inside = bases
                .iter()
                .any(|(base, end)| (*base..*end).contains(&entry.position));
            if !inside {
                return Err(StoreError::Damaged {
                    what: format!(
                        "the log index names position {} ({address}, seq {}) but no segment holds it",
                        entry.position, entry.seq
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Test-only sabotage, compiled in only with the `unsafe-early-ack` feature
/// (which the test suite enables and no release build has) and active only
/// with `BACKBONE_UNSAFE_EARLY_ACK=1`: appends are acknowledged before they
/// are written, and the writer holds each batch in memory for 250 ms before
/// writing it. It exists so the crash-loop test can show that its checker
/// catches a broker that acks before the write and its fdatasync.
#[cfg(feature = "unsafe-early-ack")]
mod early_ack {
    use std::sync::OnceLock;

    pub fn enabled() -> bool {
        static ENABLED: OnceLock<bool> = OnceLock::new();
        *ENABLED.get_or_init(|| {
            let on = std::env::var("BACKBONE_UNSAFE_EARLY_ACK").is_ok_and(|v| v == "1");
            if on {
                tracing::error!(
                    "BACKBONE_UNSAFE_EARLY_ACK=1: acknowledging appends before they are durable"
                );
            }
            on
        })
    }
}

/// Whether the test-only `unsafe-no-sync` sabotage is on: compiled in only
/// with the `unsafe-early-ack` feature and active only with
/// `BACKBONE_UNSAFE_NO_SYNC=1`. The log then never calls fdatasync, and the
/// power-loss test must catch it.
pub fn no_sync_sabotage() -> bool {
    #[cfg(feature = "unsafe-early-ack")]
    {
        let on = std::env::var("BACKBONE_UNSAFE_NO_SYNC").is_ok_and(|v| v == "1");
        if on {
            tracing::error!("BACKBONE_UNSAFE_NO_SYNC=1: the log never calls fdatasync");
        }
        on
    }
    #[cfg(not(feature = "unsafe-early-ack"))]
    false
}
