//! The log's write pipeline: one thread writes batches, another makes them
//! durable, so that while one batch is being synced the next one fills
//! (pipelined group commit).
//!
//! - The **writer thread** takes every operation queued (up to
//!   [`MAX_BATCH_BYTES`]), encodes their records after a batch record into
//!   one buffer, and appends it to the last segment with one `pwrite`. It
//!   starts a new segment when the batch would not fit, after the sync
//!   thread has made the full one durable, so that a torn tail is only ever
//!   in the last segment.
//! - The **sync thread** takes every written batch queued, calls
//!   `fdatasync` once for all of them, then applies them to the index and
//!   completes their operations, in log order.
//! - When nothing else is queued and the sync thread has nothing in hand,
//!   the writer syncs and completes its batch itself: at a light load a
//!   batch is one envelope, and handing it to the sync thread only added a
//!   thread's wake-up to each (under load the sync thread always has a
//!   batch in hand, so the writer hands over and writes on).
//!
//! **Architecture Invariant:** an operation completes (a `SendAck` is sent,
//! a delete answers `Done`) only after an fdatasync that covers its records,
//! and the index, which every reader goes through, shows a record only from
//! then on.
//!
//! A failed write is cut off the segment and its operations fail; the log
//! goes on. A failed sync fails its operations and every later one: once
//! the kernel has reported a lost write, what is on disk is unknown until
//! the broker restarts and recovery reads it back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use backbone_protocol::Address;

use super::index::{Entry, Index};
use super::record::{self, Record};
use super::segment::Segments;
use crate::store::failpoint::FailPoints;
use crate::store::{Append, StoreError, StoredEnvelope};

/// The most bytes one write gathers.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How an operation ends.
pub type Completion = Box<dyn FnOnce(Result<usize, StoreError>) + Send>;

/// One operation on the log.
pub enum Op {
    /// Envelopes appended; completes with their count.
    Append(Vec<Append>),
    /// Envelopes deleted by their owner; completes with how many existed.
    Delete {
        /// The mailbox.
        address: Address,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Every envelope of a mailbox up to `through_seq` removed.
    Drop {
        /// The mailbox.
        address: Address,
        /// The highest sequence number removed.
        through_seq: u64,
    },
    /// A record compaction copies forward from `from`.
    Move {
        /// The position of the record copied.
        from: u64,
        /// The mailbox.
        address: Address,
        /// The envelope.
        envelope: StoredEnvelope,
    },
    /// Nothing to write: completes once everything before it is durable.
    Barrier,
}

struct Job {
    op: Op,
    done: Completion,
}

/// A job written to the log: the positions and lengths of its records.
struct Written {
    job: Job,
    records: Vec<(u64, u32)>,
}

struct WrittenBatch {
    segment: Arc<super::segment::Segment>,
    end: u64,
    jobs: Vec<Written>,
}

/// What the threads share.
struct State {
    segments: Arc<Segments>,
    index: Arc<Index>,
    fail: Arc<FailPoints>,
    segment_bytes: u64,
    /// Every position before this one is durable.
    synced_through: AtomicU64,
    /// Set once a sync failed: every operation fails from then on.
    failed: AtomicBool,
    /// Signalled after each sync.
    synced: (Mutex<()>, Condvar),
    /// Operations submitted and not yet taken by the writer.
    queued: AtomicUsize,
    /// Batches handed to the sync thread and not yet completed.
    in_sync: AtomicUsize,
    /// Skip fdatasync (test sabotage only).
    no_sync: bool,
}

/// The running pipeline.
pub struct Pipeline {
    /// `None` once shut down.
    requests: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    state: Arc<State>,
}

impl Pipeline {
    /// Starts the threads on `segments`, appending at the end of the last
    /// segment, which recovery has made durable up to its end.
    pub fn start(
        segments: Arc<Segments>,
        index: Arc<Index>,
        fail: Arc<FailPoints>,
        segment_bytes: u64,
        no_sync: bool,
    ) -> Result<Self, StoreError> {
        let synced_through = segments.last().map_or(0, |segment| segment.end());
        let state = Arc::new(State {
            segments,
            index,
            fail,
            segment_bytes,
            synced_through: AtomicU64::new(synced_through),
            failed: AtomicBool::new(false),
            synced: (Mutex::new(()), Condvar::new()),
            queued: AtomicUsize::new(0),
            in_sync: AtomicUsize::new(0),
            no_sync,
        });
        let (requests, jobs) = mpsc::channel::<Job>();
        let (written_tx, written_rx) = mpsc::channel::<WrittenBatch>();
        let writer_state = state.clone();
        let writer = std::thread::Builder::new()
            .name("backbone-log-writer".into())
            .spawn(move || write_loop(&writer_state, &jobs, &written_tx))
            .map_err(|error| {
                StoreError::Backend(format!("cannot start the log writer: {error}"))
            })?;
        let sync_state = state.clone();
        let syncer = std::thread::Builder::new()
            .name("backbone-log-sync".into())
            .spawn(move || sync_loop(&sync_state, &written_rx))
            .map_err(|error| StoreError::Backend(format!("cannot start the log sync: {error}")))?;
        Ok(Self {
            requests: Mutex::new(Some(requests)),
            threads: Mutex::new(vec![writer, syncer]),
            state,
        })
    }

    /// Queues `op`; `done` is called once it is durable and applied, or
    /// failed. Never blocks for long: the lock only guards the channel's
    /// sender against shutdown.
    pub fn submit(&self, op: Op, done: Completion) {
        let job = Job { op, done };
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        let refused = match &*lock(&self.requests) {
            Some(requests) => requests.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = refused {
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
            (job.done)(Err(StoreError::Closed));
        }
    }

    /// Every position before this one is durable.
    pub fn synced_through(&self) -> u64 {
        self.state.synced_through.load(Ordering::Acquire)
    }

    /// Whether a sync has failed (the log refuses every write since).
    pub fn failed(&self) -> bool {
        self.state.failed.load(Ordering::Acquire)
    }

    /// Stops the threads after everything queued is done.
    pub fn shutdown(&self) {
        // Closing the channel ends the writer, whose end ends the syncer.
        drop(lock(&self.requests).take());
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            let _ = thread.join();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The records of `op`, encoded into `out`; returns each record's offset in
/// `out` and length.
fn encode(op: &Op, out: &mut Vec<u8>) -> Vec<(usize, u32)> {
    let mut records = Vec::new();
    let mut push = |out: &mut Vec<u8>, write: &dyn Fn(&mut Vec<u8>)| {
        let start = out.len();
        write(out);
        records.push((start, (out.len() - start) as u32));
    };
    match op {
        Op::Append(items) => {
            for item in items {
                push(out, &|out| {
                    record::encode_append(&item.address, &item.envelope, out)
                });
            }
        }
        Op::Delete { address, seqs } => push(out, &|out| {
            Record::Delete {
                address: *address,
                seqs: seqs.clone(),
            }
            .encode_into(out)
        }),
        Op::Drop {
            address,
            through_seq,
        } => push(out, &|out| {
            Record::Drop {
                address: *address,
                through_seq: *through_seq,
            }
            .encode_into(out)
        }),
        Op::Move {
            from,
            address,
            envelope,
        } => push(out, &|out| {
            Record::Moved {
                from: *from,
                address: *address,
                envelope: envelope.clone(),
            }
            .encode_into(out)
        }),
        Op::Barrier => {}
    }
    records
}

fn write_loop(state: &State, jobs: &mpsc::Receiver<Job>, written: &mpsc::Sender<WrittenBatch>) {
    let mut buf = Vec::new();
    while let Ok(first) = jobs.recv() {
        // The early-ack sabotage has already acknowledged what is queued:
        // holding it in memory a while makes a crash in between lose it.
        #[cfg(feature = "unsafe-early-ack")]
        if super::early_ack::enabled() {
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        state.queued.fetch_sub(1, Ordering::SeqCst);
        let mut batch = vec![first];
        buf.clear();
        Record::Batch {
            synced_through: state.synced_through.load(Ordering::Acquire),
        }
        .encode_into(&mut buf);
        let mut offsets = vec![encode(&batch[0].op, &mut buf)];
        while buf.len() < MAX_BATCH_BYTES {
            let Ok(job) = jobs.try_recv() else { break };
            state.queued.fetch_sub(1, Ordering::SeqCst);
            offsets.push(encode(&job.op, &mut buf));
            batch.push(job);
        }
        if state.failed.load(Ordering::Acquire) {
            fail_all(batch.into_iter(), &failed_error());
            continue;
        }
        let segment = match current_segment(state, buf.len() as u64) {
            Ok(segment) => segment,
            Err(error) => {
                fail_all(batch.into_iter(), &error);
                continue;
            }
        };
        let before = segment.end();
        let start = match segment.append(&buf, &state.fail) {
            Ok(start) => start,
            Err(error) => {
                // Cut off whatever part of the batch reached the file, so
                // the log stays a sequence of whole records.
                if let Err(cut) = segment.truncate(before, Some(state.segment_bytes), &state.fail) {
                    tracing::error!(%cut, "cannot cut a failed write off the log; refusing writes");
                    state.failed.store(true, Ordering::Release);
                }
                fail_all(batch.into_iter(), &error);
                continue;
            }
        };
        metrics::histogram!("backbone_log_batch_bytes").record(buf.len() as f64);
        let appended: usize = batch
            .iter()
            .map(|job| match &job.op {
                Op::Append(items) => items.len(),
                _ => 0,
            })
            .sum();
        metrics::counter!("backbone_log_records_appended_total").increment(appended as u64);
        let jobs = batch
            .into_iter()
            .zip(offsets)
            .map(|(job, offsets)| Written {
                job,
                records: offsets
                    .into_iter()
                    .map(|(offset, len)| (start + offset as u64, len))
                    .collect(),
            })
            .collect();
        let end = start + buf.len() as u64;
        let batch = WrittenBatch { segment, end, jobs };
        // Nothing waits to be written and the sync thread has completed
        // everything handed to it: syncing here keeps the log's order and
        // spares the sync thread's wake-up. Only this thread hands batches
        // over, so `in_sync` cannot rise meanwhile.
        if state.queued.load(Ordering::SeqCst) == 0 && state.in_sync.load(Ordering::SeqCst) == 0 {
            sync_and_complete(state, vec![batch]);
        } else {
            state.in_sync.fetch_add(1, Ordering::SeqCst);
            if let Err(mpsc::SendError(batch)) = written.send(batch) {
                state.in_sync.fetch_sub(1, Ordering::SeqCst);
                fail_all(batch.jobs.into_iter().map(|w| w.job), &StoreError::Closed);
            }
        }
        // A buffer grown by one large batch is not kept.
        if buf.capacity() > 2 * MAX_BATCH_BYTES {
            buf = Vec::new();
        }
    }
}

/// The segment to write `len` more bytes to: the last one, or a new one
/// when they would not fit (and the last one holds something). A new
/// segment starts only once the last one is durable to its end.
fn current_segment(state: &State, len: u64) -> Result<Arc<super::segment::Segment>, StoreError> {
    let last = state
        .segments
        .last()
        .ok_or_else(|| StoreError::Backend("the log has no segment".into()))?;
    if last.is_empty() || last.len() + len <= state.segment_bytes {
        return Ok(last);
    }
    let end = last.end();
    let (guard, synced) = &state.synced;
    let mut guard = lock(guard);
    while state.synced_through.load(Ordering::Acquire) < end {
        if state.failed.load(Ordering::Acquire) {
            return Err(failed_error());
        }
        guard = synced
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    drop(guard);
    // The full segment keeps only its records: its preallocated rest goes,
    // and a torn tail can then only be in the new last segment.
    last.truncate(end, None, &state.fail)?;
    let segment = state
        .segments
        .create(end, state.segment_bytes, &state.fail)?;
    state.index.add_segment(end);
    metrics::counter!("backbone_log_segments_created_total").increment(1);
    Ok(segment)
}

fn failed_error() -> StoreError {
    StoreError::Backend(
        "an earlier fdatasync of the log failed: writes are refused until the broker restarts"
            .into(),
    )
}

fn fail_all(jobs: impl Iterator<Item = Job>, error: &StoreError) {
    for job in jobs {
        (job.done)(Err(error.clone()));
    }
}

fn sync_loop(state: &State, written: &mpsc::Receiver<WrittenBatch>) {
    while let Ok(first) = written.recv() {
        let mut batches = vec![first];
        while let Ok(more) = written.try_recv() {
            batches.push(more);
        }
        let count = batches.len();
        sync_and_complete(state, batches);
        // After the completions: the writer syncs a batch itself only once
        // every earlier one has completed.
        state.in_sync.fetch_sub(count, Ordering::SeqCst);
    }
}

/// Makes `batches` durable with one `fdatasync` per segment, then applies
/// them to the index and completes their operations, in log order.
fn sync_and_complete(state: &State, batches: Vec<WrittenBatch>) {
    // Every batch here is in the last segment or (just before a new
    // segment) fully in the one before: sync each file once.
    let started = Instant::now();
    let mut result = Ok(());
    if state.failed.load(Ordering::Acquire) {
        result = Err(failed_error());
    } else if !state.no_sync {
        let mut synced: Vec<u64> = Vec::new();
        for batch in &batches {
            let base = batch.segment.base();
            if !synced.contains(&base) {
                synced.push(base);
                if let Err(error) = batch.segment.sync(&state.fail) {
                    tracing::error!(%error, "fdatasync of the log failed; refusing writes until restart");
                    state.failed.store(true, Ordering::Release);
                    result = Err(error);
                    break;
                }
            }
        }
    }
    metrics::histogram!("backbone_log_sync_seconds").record(started.elapsed().as_secs_f64());
    if result.is_ok() {
        let end = batches.last().map_or(0, |batch| batch.end);
        state.synced_through.fetch_max(end, Ordering::AcqRel);
    }
    {
        let (guard, synced) = &state.synced;
        let _guard = lock(guard);
        synced.notify_all();
    }
    for batch in batches {
        match &result {
            Ok(()) => {
                // Applied, and the position recorded, before anyone
                // hears of it: a checkpoint taken after a completion
                // covers the completed operation.
                let outcomes: Vec<usize> = batch
                    .jobs
                    .iter()
                    .map(|written| apply(&state.index, written))
                    .collect();
                state.index.set_applied_through(batch.end);
                for (written, outcome) in batch.jobs.into_iter().zip(outcomes) {
                    (written.job.done)(Ok(outcome));
                }
            }
            Err(error) => fail_all(batch.jobs.into_iter().map(|w| w.job), error),
        }
    }
}

/// Applies a durable job to the index; returns its outcome (appended or
/// deleted count).
fn apply(index: &Index, written: &Written) -> usize {
    match &written.job.op {
        Op::Append(items) => {
            for (item, (position, len)) in items.iter().zip(&written.records) {
                index.insert(&item.address, entry(&item.envelope, *position, *len), None);
            }
            items.len()
        }
        Op::Delete { address, seqs } => index.delete(address, seqs),
        Op::Drop {
            address,
            through_seq,
        } => {
            index.drop_through(address, *through_seq);
            0
        }
        Op::Move {
            from,
            address,
            envelope,
        } => {
            let (position, len) = written.records[0];
            index.insert(address, entry(envelope, position, len), Some(*from));
            1
        }
        Op::Barrier => 0,
    }
}

/// The index entry of `envelope`'s record at `position`.
pub fn entry(envelope: &StoredEnvelope, position: u64, len: u32) -> Entry {
    Entry {
        seq: envelope.seq,
        position,
        len,
        envelope_len: envelope.envelope.len() as u32,
        expires_at_ms: envelope.expires_at_ms,
    }
}
