//! The write paths of the hot path, behind one handle: appends and deletes
//! go to the mailbox log (which batches and syncs them itself), and cursor
//! moves go to one thread that writes them to the directory.
//!
//! Cursor moves are the one directory write per acknowledgement, so they
//! are gathered: the thread takes every move queued, keeps the highest per
//! device, writes those, and then rests for [`GATHER`] before it looks
//! again, so that at a light load it wakes a few dozen times a second, not
//! once per move. A move is queued and forgotten: nobody waits for it (a
//! failed one is logged here), as it is not synced on its own and a lost
//! move only means an envelope is delivered again. A flush request applies
//! the moves queued before it first and then syncs the directory, so it
//! covers them (an identity's purge relies on that), and then waits for the
//! log to make everything queued before it durable too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use backbone_protocol::{Address, DeviceId};
use tokio::sync::oneshot;

use super::{Append, Directory, MailboxLog, StoreError, completed};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// How long the cursor thread rests after writing what it found, letting
/// moves queue up meanwhile: a move queued while it rests does not wake it.
/// A flush waits at most this much longer.
pub const GATHER: Duration = Duration::from_millis(20);

enum Request {
    SetCursor {
        address: Address,
        device: DeviceId,
        seq: u64,
    },
    Flush {
        done: Reply<()>,
    },
    Shutdown,
}

/// Owns the cursor thread; [`Writer::shutdown`] stops it cleanly.
#[derive(Debug)]
pub struct Writer {
    requests: mpsc::Sender<Request>,
    thread: JoinHandle<Result<(), StoreError>>,
}

/// Submits writes; cheap to clone.
#[derive(Clone)]
pub struct WriteHandle {
    requests: mpsc::Sender<Request>,
    log: Arc<dyn MailboxLog>,
}

impl std::fmt::Debug for WriteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteHandle").finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the cursor thread, named `backbone-cursor-writer`, over
    /// `directory`, with appends and deletes going to `log`.
    ///
    /// # Panics
    ///
    /// If the operating system cannot create a thread, like [`std::thread::spawn`].
    pub fn start(log: Arc<dyn MailboxLog>, directory: Arc<dyn Directory>) -> (Writer, WriteHandle) {
        let (requests, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("backbone-cursor-writer".into())
            .spawn(move || run(directory.as_ref(), &queue))
            .expect("the OS can create the cursor writer thread");
        let handle = WriteHandle {
            requests: requests.clone(),
            log,
        };
        (Writer { requests, thread }, handle)
    }

    /// Writes every cursor move queued so far, syncs the directory, and
    /// joins the thread. Blocks; from async code call it through
    /// `spawn_blocking`. Returns the error of the final sync, if any.
    pub fn shutdown(self) -> Result<(), StoreError> {
        // If the thread is already gone, joining reports why.
        let _ = self.requests.send(Request::Shutdown);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(StoreError::Backend("cursor writer thread panicked".into())))
    }
}

impl WriteHandle {
    /// Appends `items` and completes once they are durable.
    pub async fn append(&self, items: Vec<Append>) -> Result<(), StoreError> {
        completed(|done| self.log.append(items, done))
            .await
            .map(|_| ())
    }

    /// Queues `items` and calls `then` with the outcome once they are
    /// durable: on the log's sync thread, so it must be quick and must not
    /// block (an actor's `cast` is). Calls for the appends of one caller
    /// come in submission order. Never blocks.
    pub fn submit_append_then(
        &self,
        items: Vec<Append>,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.log
            .append(items, Box::new(move |outcome| then(outcome.map(|_| ()))));
    }

    /// Queues a move of `device`'s cursor in `address`'s mailbox forward to
    /// `seq`, ordered before anything submitted after it (an identity's
    /// purge waits for its sessions, then flushes). Nobody waits for the
    /// write: the thread logs a failure.
    pub fn set_cursor(&self, address: Address, device: DeviceId, seq: u64) {
        // If the thread is gone, so is the broker's store.
        let _ = self.requests.send(Request::SetCursor {
            address,
            device,
            seq,
        });
    }

    /// Deletes `seqs` from `address`'s mailbox once durable; returns how
    /// many existed.
    pub async fn delete(&self, address: Address, seqs: Vec<u64>) -> Result<usize, StoreError> {
        completed(|done| self.log.delete(address, seqs, done)).await
    }

    /// Completes once everything submitted before it is durable: the
    /// cursor moves and directory writes, then the log.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|done| Request::Flush { done }).await?;
        completed(|done| self.log.barrier(done)).await.map(|_| ())
    }

    /// Queues a request at once and returns the wait for its answer.
    fn call<T: Send + 'static, F: FnOnce(Reply<T>) -> Request>(
        &self,
        request: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + use<T, F> {
        let (done, answer) = oneshot::channel();
        // If the thread is gone the request, and `done` with it, is dropped,
        // which the receiver sees as an error.
        let _ = self.requests.send(request(done));
        async move { answer.await.unwrap_or(Err(StoreError::Closed)) }
    }
}

/// The cursor thread's loop; returns the result of the final sync.
fn run(directory: &dyn Directory, queue: &mpsc::Receiver<Request>) -> Result<(), StoreError> {
    let _span = tracing::info_span!("cursor_writer").entered();
    loop {
        // A closed channel (every handle gone) ends the thread like a shutdown.
        let first = queue.recv().unwrap_or(Request::Shutdown);
        let mut requests = vec![first];
        while let Ok(more) = queue.try_recv() {
            requests.push(more);
        }
        let mut moves: Moves = HashMap::new();
        let mut shutdown = false;
        for request in requests {
            match request {
                Request::SetCursor {
                    address,
                    device,
                    seq,
                } => {
                    let wanted = moves.entry((address, device)).or_insert(seq);
                    *wanted = (*wanted).max(seq);
                }
                Request::Flush { done } => {
                    // The moves queued before the flush, then the sync.
                    write_moves(directory, std::mem::take(&mut moves));
                    let _ = done.send(directory.sync());
                }
                Request::Shutdown => shutdown = true,
            }
        }
        write_moves(directory, moves);
        if shutdown {
            return directory.sync();
        }
        std::thread::sleep(GATHER);
    }
}

/// The highest cursor per device of one drain.
type Moves = HashMap<(Address, DeviceId), u64>;

fn write_moves(directory: &dyn Directory, moves: Moves) {
    for ((address, device), seq) in moves {
        if let Err(error) = directory.set_cursor(&address, &device, seq) {
            tracing::warn!(%error, "persisting a cursor failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;
    use crate::store::{MemoryStore, StoredEnvelope};
    use backbone_protocol::bytes::MessageId;

    #[tokio::test]
    async fn cursor_moves_are_written_and_a_flush_covers_what_was_queued_before_it() {
        let store = Arc::new(MemoryStore::new());
        let (writer, handle) = Writer::start(store.clone(), store.clone());
        let (address, device) = (Address([1; 32]), DeviceId([2; 32]));
        handle.set_cursor(address, device, 3);
        handle.set_cursor(address, device, 2);
        // A lower move never takes a cursor back.
        handle.flush().await.expect("flushes");
        assert_eq!(store.cursor(&address, &device), Ok(Some(3)));
        // Appends and deletes go to the log.
        let envelope = StoredEnvelope {
            seq: 1,
            message_id: MessageId([1; 16]),
            sender: None,
            stored_at_ms: 0,
            expires_at_ms: u64::MAX,
            envelope: vec![1].into(),
        };
        handle
            .append(vec![Append {
                address,
                envelope: Arc::new(envelope),
            }])
            .await
            .expect("appends");
        assert_eq!(store.head_seq(&address), Ok(1));
        assert_eq!(handle.delete(address, vec![1, 2]).await, Ok(1));
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .expect("join")
            .expect("shutdown");
    }

    #[tokio::test]
    async fn a_failed_sync_is_reported_to_the_flush() {
        let store = Arc::new(MemoryStore::new());
        let (writer, handle) = Writer::start(store.clone(), store.clone());
        store.inject_flush_failures(1);
        assert_eq!(handle.flush().await, Err(StoreError::Injected));
        assert_eq!(handle.flush().await, Ok(()));
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .expect("join")
            .expect("shutdown");
    }
}
