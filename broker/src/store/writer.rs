//! The group-commit writer: one OS thread that owns every store mutation on
//! the hot path, so that one flush covers many appends.
//!
//! Requests arrive over a `std::sync::mpsc` channel, which never blocks the
//! sender, so the async side can submit from a tokio task or an actor handler
//! without stalling the runtime; answers go back through tokio oneshot
//! channels. The thread loops:
//!
//! 1. block until a request arrives;
//! 2. take everything else already queued without blocking, up to
//!    [`MAX_BATCH_APPENDS`] appended envelopes;
//! 3. apply the requests in arrival order, gathering all appends into one
//!    [`Store::append_batch`] call, which flushes once for the whole batch,
//!    and setting cursor moves aside;
//! 4. answer the appends and flushes, then apply the cursor moves set aside
//!    and answer the rest.
//!
//! Gathering appends past a delete is safe because the two touch different
//! keys, except when a delete names an envelope appended earlier in the same
//! batch: then the appends gathered so far are committed first, so the delete
//! sees them. A batch is all-or-nothing for its waiters: if an append fails,
//! every append and flush waiter of that batch gets the error, and appends
//! later in the batch are not attempted, so a mailbox never gets a gap
//! followed by a durable envelope from the same batch.
//!
//! Cursor moves touch no key an append or a delete touches, so they wait
//! until the batch's appends are answered: every connected device acks what
//! it receives, and an append's answer should not wait for those writes. A
//! flush request applies the cursor moves queued before it first, so it
//! still covers them (an identity's purge relies on that).
//!
//! Cursor moves and deletes answer with their own result once applied. They
//! are durable only after a later flush (a cursor move applied before a flush
//! request of its batch, a delete before the batch's flush, are covered by
//! that one); see the invariants in [`super`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use backbone_protocol::{Address, DeviceId};
use tokio::sync::oneshot;

use super::{Append, Store, StoreError};

/// The most appended envelopes one batch gathers before it is committed.
pub const MAX_BATCH_APPENDS: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Where an append's outcome goes.
enum Done {
    /// A oneshot someone awaits.
    Reply(Reply<()>),
    /// Called on the writer thread (see [`WriteHandle::submit_append_then`]).
    Then(Then),
}

impl Done {
    fn send(self, result: Result<(), StoreError>) {
        match self {
            Done::Reply(done) => {
                let _ = done.send(result);
            }
            Done::Then(mut then) => {
                if let Some(call) = then.0.take() {
                    call(result);
                }
            }
        }
    }
}

type Callback = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A completion callback that is called exactly once: with the outcome, or
/// with [`StoreError::Closed`] if its request is dropped unanswered (the
/// writer thread is gone), as a dropped oneshot would tell its receiver.
struct Then(Option<Callback>);

impl Drop for Then {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            call(Err(StoreError::Closed));
        }
    }
}

enum Request {
    Append {
        items: Vec<Append>,
        done: Done,
    },
    SetCursor {
        address: Address,
        device: DeviceId,
        seq: u64,
        done: Reply<()>,
    },
    Delete {
        address: Address,
        seqs: Vec<u64>,
        done: Reply<usize>,
    },
    Flush {
        done: Reply<()>,
    },
    Shutdown,
}

/// Owns the writer thread; [`Writer::shutdown`] stops it cleanly.
///
/// Dropping a `Writer` without calling `shutdown` leaves the thread running
/// until every [`WriteHandle`] has been dropped too.
#[derive(Debug)]
pub struct Writer {
    requests: mpsc::Sender<Request>,
    thread: JoinHandle<Result<(), StoreError>>,
}

/// Submits writes to the writer thread. Cheap to clone; never blocks.
#[derive(Clone, Debug)]
pub struct WriteHandle {
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Envelopes are never printed; the kind of request is enough.
        f.write_str(match self {
            Request::Append { .. } => "Append",
            Request::SetCursor { .. } => "SetCursor",
            Request::Delete { .. } => "Delete",
            Request::Flush { .. } => "Flush",
            Request::Shutdown => "Shutdown",
        })
    }
}

impl Writer {
    /// Starts the writer thread, named `backbone-store-writer`, over `store`.
    ///
    /// # Panics
    ///
    /// If the operating system cannot create a thread, like [`std::thread::spawn`].
    pub fn start(store: Arc<dyn Store>) -> (Writer, WriteHandle) {
        let (requests, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("backbone-store-writer".into())
            .spawn(move || run(store.as_ref(), &queue))
            .expect("the OS can create the store writer thread");
        let handle = WriteHandle {
            requests: requests.clone(),
        };
        (Writer { requests, thread }, handle)
    }

    /// Commits every request queued so far, flushes, and joins the thread.
    ///
    /// Blocks; from async code call it through `spawn_blocking`. Requests
    /// submitted after this returns are answered with [`StoreError::Closed`].
    /// Returns the error of the final flush, if any.
    pub fn shutdown(self) -> Result<(), StoreError> {
        // If the thread is already gone, joining reports why.
        let _ = self.requests.send(Request::Shutdown);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(StoreError::Backend("store writer thread panicked".into())))
    }
}

impl WriteHandle {
    /// Appends `items` and completes once the flush covering them has returned.
    pub async fn append(&self, items: Vec<Append>) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        self.submit_append(items, done);
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Queues `items` and answers on `done` once the flush covering them has
    /// returned, for callers that cannot await (actor handlers). Never blocks.
    pub fn submit_append(&self, items: Vec<Append>, done: Reply<()>) {
        self.submit(items, Done::Reply(done));
    }

    /// Queues `items` and calls `then` with the outcome once the flush
    /// covering them has returned: on the writer thread, so it must be quick
    /// and must not block (an actor's `cast` is). Calls for the appends of
    /// one caller come in submission order. Saves the caller a task waiting
    /// on a oneshot. Never blocks.
    pub fn submit_append_then(
        &self,
        items: Vec<Append>,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.submit(items, Done::Then(Then(Some(Box::new(then)))));
    }

    fn submit(&self, items: Vec<Append>, done: Done) {
        if let Err(mpsc::SendError(Request::Append { done, .. })) =
            self.requests.send(Request::Append { items, done })
        {
            done.send(Err(StoreError::Closed));
        }
    }

    /// Moves `device`'s cursor in `address`'s mailbox forward to `seq`, in order
    /// with the other writes. The request is queued when this is called, not
    /// when the future is first polled, so a caller that spawns the wait
    /// still has its write ordered before anything it submits later (an
    /// identity's purge waits for its sessions, then flushes the writer).
    pub fn set_cursor(
        &self,
        address: Address,
        device: DeviceId,
        seq: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<> {
        self.call(move |done| Request::SetCursor {
            address,
            device,
            seq,
            done,
        })
    }

    /// Deletes `seqs` from `address`'s mailbox, in order with the other writes;
    /// returns how many existed.
    pub async fn delete(&self, address: Address, seqs: Vec<u64>) -> Result<usize, StoreError> {
        self.call(|done| Request::Delete {
            address,
            seqs,
            done,
        })
        .await
    }

    /// Completes once everything submitted before it is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|done| Request::Flush { done }).await
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

/// The writer thread's loop; returns the result of the final flush.
fn run(store: &dyn Store, queue: &mpsc::Receiver<Request>) -> Result<(), StoreError> {
    let _span = tracing::info_span!("store_writer").entered();
    let mut shutting_down = false;
    loop {
        // After a shutdown request, only what is already queued is committed.
        let first = if shutting_down {
            queue.try_recv().ok()
        } else {
            queue.recv().ok()
        };
        let Some(first) = first else { break };
        let mut batch = Batch::default();
        shutting_down |= batch.push(first);
        while batch.appended < MAX_BATCH_APPENDS {
            match queue.try_recv() {
                Ok(request) => shutting_down |= batch.push(request),
                Err(_) => break,
            }
        }
        batch.commit(store);
    }
    let result = store.flush();
    if let Err(error) = &result {
        tracing::error!(%error, "final store flush failed");
    }
    result
}

/// The requests taken off the queue in one go.
#[derive(Default)]
struct Batch {
    requests: Vec<Request>,
    /// Envelopes appended by `requests`.
    appended: usize,
}

impl Batch {
    /// Adds a request; returns true if it asks the thread to shut down.
    fn push(&mut self, request: Request) -> bool {
        match request {
            Request::Shutdown => return true,
            Request::Append { ref items, .. } => self.appended += items.len(),
            _ => {}
        }
        self.requests.push(request);
        false
    }

    /// Applies the requests in order with as few flushes as possible, then answers them.
    #[cfg_attr(not(feature = "unsafe-early-ack"), allow(unused_mut))]
    fn commit(mut self, store: &dyn Store) {
        #[cfg(feature = "unsafe-early-ack")]
        if early_ack::enabled() {
            self.ack_appends_early();
        }
        let mut commit = Commit {
            store,
            pending: Vec::new(),
            pending_keys: HashSet::new(),
            cursors: Vec::new(),
            flush_needed: false,
            durable: Ok(()),
        };
        let mut answers = Vec::with_capacity(self.requests.len());
        for request in self.requests {
            match request {
                Request::Append { items, done } => {
                    // Even an empty append waits for the batch's flush.
                    commit.flush_needed = true;
                    let keys = items.iter().map(|item| (item.address, item.envelope.seq));
                    commit.pending_keys.extend(keys);
                    commit.pending.extend(items);
                    answers.push(Answer::Durable(done));
                }
                Request::SetCursor {
                    address,
                    device,
                    seq,
                    done,
                } => commit.cursors.push((address, device, seq, done)),
                Request::Delete {
                    address,
                    seqs,
                    done,
                } => {
                    if seqs
                        .iter()
                        .any(|seq| commit.pending_keys.contains(&(address, *seq)))
                    {
                        commit.write_pending();
                    }
                    answers.push(Answer::Count(done, store.delete(&address, &seqs)));
                }
                Request::Flush { done } => {
                    // The flush covers the cursor moves queued before it.
                    answers.extend(commit.move_cursors());
                    commit.flush_needed = true;
                    answers.push(Answer::Durable(Done::Reply(done)));
                }
                // `push` keeps shutdown requests out of a batch.
                Request::Shutdown => {}
            }
        }
        if commit.flush_needed {
            commit.write_pending();
        }
        if let Err(error) = &commit.durable {
            tracing::error!(%error, requests = answers.len(), "store batch failed");
        }
        // Appends are answered before the remaining cursor moves are
        // applied: a cursor move needs no flush of its own (it becomes
        // durable with the next one), so appends do not wait for it.
        let (durable, others): (Vec<_>, Vec<_>) = answers
            .into_iter()
            .partition(|answer| matches!(answer, Answer::Durable(_)));
        for answer in durable {
            answer.send(&commit.durable);
        }
        let moved = commit.move_cursors();
        for answer in others.into_iter().chain(moved) {
            answer.send(&commit.durable);
        }
    }
}

/// Test-only sabotage, compiled in only with the `unsafe-early-ack` feature
/// (which the test suite enables and no release build has) and active only
/// with `BACKBONE_UNSAFE_EARLY_ACK=1`: appends are acknowledged before they
/// are written, and written a moment later. It exists so the crash-loop test
/// can show that its checker catches a broker that acks before the flush.
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

#[cfg(feature = "unsafe-early-ack")]
impl Batch {
    fn ack_appends_early(&mut self) {
        for request in &mut self.requests {
            if let Request::Append { done, .. } = request {
                let (unheard, _) = oneshot::channel();
                std::mem::replace(done, Done::Reply(unheard)).send(Ok(()));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Appends gathered but not yet written, and the batch's outcome so far.
struct Commit<'a> {
    store: &'a dyn Store,
    pending: Vec<Append>,
    pending_keys: HashSet<(Address, u64)>,
    /// Cursor moves not yet applied, in arrival order.
    cursors: Vec<(Address, DeviceId, u64, Reply<()>)>,
    /// Some waiter needs a flush that has not happened yet.
    flush_needed: bool,
    durable: Result<(), StoreError>,
}

impl Commit<'_> {
    /// Writes and flushes the gathered appends (or just flushes if there are
    /// none), unless an earlier part of the batch already failed: then they
    /// are dropped and share that error.
    fn write_pending(&mut self) {
        if self.durable.is_ok() {
            self.durable = if self.pending.is_empty() {
                self.store.flush()
            } else {
                metrics::histogram!("backbone_store_batch_size").record(self.pending.len() as f64);
                self.store.append_batch(&self.pending)
            };
        }
        self.pending.clear();
        self.pending_keys.clear();
        self.flush_needed = false;
    }
}

impl Commit<'_> {
    /// Applies the cursor moves gathered so far; returns their answers.
    fn move_cursors(&mut self) -> Vec<Answer> {
        self.cursors
            .drain(..)
            .map(|(address, device, seq, done)| {
                Answer::Unit(done, self.store.set_cursor(&address, &device, seq))
            })
            .collect()
    }
}

/// How to answer one request once its batch is done.
enum Answer {
    /// Appends and flushes: the batch's durability outcome.
    Durable(Done),
    /// Cursor moves: their own result.
    Unit(Reply<()>, Result<(), StoreError>),
    /// Deletes: their own result.
    Count(Reply<usize>, Result<usize, StoreError>),
}

impl Answer {
    /// Answers the request; `durable` is its batch's durability outcome.
    fn send(self, durable: &Result<(), StoreError>) {
        match self {
            Answer::Durable(done) => done.send(durable.clone()),
            Answer::Unit(done, result) => {
                let _ = done.send(result);
            }
            Answer::Count(done, result) => {
                let _ = done.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use backbone_protocol::bytes::{CapabilityHash, MessageId, ServerId, TokenId, VerifierHash};
    use backbone_protocol::deletion::{Deletion, PeerToTell};
    use backbone_protocol::relationship::{InboundPolicy, Relationship};
    use backbone_protocol::{DeviceCertificate, IdentityCard};

    use super::*;
    use crate::store::{
        MailboxExport, MailboxUsage, MemoryStore, StoredEnvelope, StoredToken, TokenAttempt,
    };

    /// A [`MemoryStore`] that counts `append_batch` calls, can make each one
    /// slow like a real fsync, and can hold the first one until released.
    #[derive(Default)]
    struct CountingStore {
        inner: MemoryStore,
        append_batches: AtomicUsize,
        flushes: AtomicUsize,
        delay: Duration,
        /// `append_batch` reports here, then waits for one message on `release`.
        gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
        /// The 1-based `append_batch` call that fails with [`StoreError::Injected`].
        fail_call: Option<usize>,
        /// What was applied, in order: "append_batch", "cursor", "flush".
        events: Mutex<Vec<&'static str>>,
        /// When set, `set_cursor` waits for one message on it first.
        cursor_gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl CountingStore {
        /// Returns the store, a receiver told when the first append_batch is
        /// entered, and a sender that lets it continue.
        fn gated(fail_call: Option<usize>) -> (Arc<Self>, mpsc::Receiver<()>, mpsc::Sender<()>) {
            let (entered_tx, entered) = mpsc::channel();
            let (release, release_rx) = mpsc::channel();
            let gate = Mutex::new(Some((entered_tx, release_rx)));
            let store = Self {
                gate,
                fail_call,
                ..Self::default()
            };
            (Arc::new(store), entered, release)
        }
    }

    impl Store for CountingStore {
        fn append_batch(&self, items: &[Append]) -> Result<(), StoreError> {
            let call = self.append_batches.fetch_add(1, Ordering::SeqCst) + 1;
            let gate = self.gate.lock().expect("gate lock").take();
            if let Some((entered, release)) = gate {
                entered.send(()).expect("test is waiting");
                release.recv().expect("test releases the gate");
            }
            std::thread::sleep(self.delay);
            if self.fail_call == Some(call) {
                self.inner.inject_append_failures(1);
            }
            self.events.lock().expect("events").push("append_batch");
            self.inner.append_batch(items)
        }
        fn read_from(
            &self,
            a: &Address,
            from: u64,
            limit: usize,
            now: u64,
        ) -> Result<Vec<StoredEnvelope>, StoreError> {
            self.inner.read_from(a, from, limit, now)
        }
        fn usage(&self, address: &Address, now_ms: u64) -> Result<MailboxUsage, StoreError> {
            self.inner.usage(address, now_ms)
        }
        fn head_seq(&self, address: &Address) -> Result<u64, StoreError> {
            self.inner.head_seq(address)
        }
        fn oldest_seq(&self, address: &Address) -> Result<Option<u64>, StoreError> {
            self.inner.oldest_seq(address)
        }
        fn cursor(&self, address: &Address, device: &DeviceId) -> Result<Option<u64>, StoreError> {
            self.inner.cursor(address, device)
        }
        fn set_cursor(
            &self,
            address: &Address,
            device: &DeviceId,
            seq: u64,
        ) -> Result<(), StoreError> {
            if let Some(gate) = self.cursor_gate.lock().expect("gate lock").take() {
                gate.recv().expect("test releases the cursor gate");
            }
            self.events.lock().expect("events").push("cursor");
            self.inner.set_cursor(address, device, seq)
        }
        fn delete(&self, address: &Address, seqs: &[u64]) -> Result<usize, StoreError> {
            self.inner.delete(address, seqs)
        }
        fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
            self.inner.expire(now_ms, limit)
        }
        fn put_card(&self, card: &IdentityCard) -> Result<(), StoreError> {
            self.inner.put_card(card)
        }
        fn card(&self, address: &Address) -> Result<Option<IdentityCard>, StoreError> {
            self.inner.card(address)
        }
        fn put_device(
            &self,
            address: &Address,
            cert: &DeviceCertificate,
            max: usize,
        ) -> Result<bool, StoreError> {
            self.inner.put_device(address, cert, max)
        }
        fn remove_device(&self, address: &Address, device: &DeviceId) -> Result<bool, StoreError> {
            self.inner.remove_device(address, device)
        }
        fn devices(&self, address: &Address) -> Result<Vec<DeviceCertificate>, StoreError> {
            self.inner.devices(address)
        }
        fn device(
            &self,
            address: &Address,
            device: &DeviceId,
        ) -> Result<Option<DeviceCertificate>, StoreError> {
            self.inner.device(address, device)
        }
        fn register_capability(
            &self,
            address: &Address,
            hash: &CapabilityHash,
            max: usize,
        ) -> Result<bool, StoreError> {
            self.inner.register_capability(address, hash, max)
        }
        fn revoke_capability(
            &self,
            address: &Address,
            hash: &CapabilityHash,
        ) -> Result<bool, StoreError> {
            self.inner.revoke_capability(address, hash)
        }
        fn has_capability(
            &self,
            address: &Address,
            hash: &CapabilityHash,
        ) -> Result<bool, StoreError> {
            self.inner.has_capability(address, hash)
        }
        fn capabilities(&self, address: &Address) -> Result<Vec<CapabilityHash>, StoreError> {
            self.inner.capabilities(address)
        }
        fn put_token(
            &self,
            token: &StoredToken,
            max: usize,
            now_ms: u64,
        ) -> Result<bool, StoreError> {
            self.inner.put_token(token, max, now_ms)
        }
        fn token(&self, id: &TokenId, now_ms: u64) -> Result<Option<StoredToken>, StoreError> {
            self.inner.token(id, now_ms)
        }
        fn attempt_token(
            &self,
            id: &TokenId,
            verifier: &VerifierHash,
            max_attempts: u32,
            now_ms: u64,
        ) -> Result<TokenAttempt, StoreError> {
            self.inner.attempt_token(id, verifier, max_attempts, now_ms)
        }
        fn delete_token(&self, owner: &Address, id: &TokenId) -> Result<bool, StoreError> {
            self.inner.delete_token(owner, id)
        }
        fn expire_tokens(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
            self.inner.expire_tokens(now_ms, limit)
        }
        fn put_file(
            &self,
            file: &crate::store::StoredFile,
            quota: crate::store::FileQuota,
            now_ms: u64,
        ) -> Result<crate::store::FilePut, StoreError> {
            self.inner.put_file(file, quota, now_ms)
        }
        fn file(
            &self,
            id: &backbone_protocol::bytes::FileId,
            now_ms: u64,
        ) -> Result<Option<crate::store::StoredFile>, StoreError> {
            self.inner.file(id, now_ms)
        }
        fn complete_file(&self, id: &backbone_protocol::bytes::FileId) -> Result<bool, StoreError> {
            self.inner.complete_file(id)
        }
        fn delete_file(
            &self,
            owner: &Address,
            id: &backbone_protocol::bytes::FileId,
        ) -> Result<bool, StoreError> {
            self.inner.delete_file(owner, id)
        }
        fn files_of(&self, owner: &Address) -> Result<Vec<crate::store::StoredFile>, StoreError> {
            self.inner.files_of(owner)
        }
        fn file_exists(&self, id: &backbone_protocol::bytes::FileId) -> Result<bool, StoreError> {
            self.inner.file_exists(id)
        }
        fn expire_files(
            &self,
            now_ms: u64,
            limit: usize,
        ) -> Result<Vec<backbone_protocol::bytes::FileId>, StoreError> {
            self.inner.expire_files(now_ms, limit)
        }
        fn inbound_policy(&self, address: &Address) -> Result<Option<InboundPolicy>, StoreError> {
            self.inner.inbound_policy(address)
        }
        fn set_inbound_policy(
            &self,
            address: &Address,
            policy: InboundPolicy,
        ) -> Result<(), StoreError> {
            self.inner.set_inbound_policy(address, policy)
        }
        fn relationships(&self, address: &Address) -> Result<Vec<Relationship>, StoreError> {
            self.inner.relationships(address)
        }
        fn put_relationship(
            &self,
            address: &Address,
            relationship: &Relationship,
        ) -> Result<(), StoreError> {
            self.inner.put_relationship(address, relationship)
        }
        fn deletion(&self, address: &Address) -> Result<Option<Deletion>, StoreError> {
            self.inner.deletion(address)
        }
        fn schedule_deletion(
            &self,
            address: &Address,
            purge_at_ms: u64,
        ) -> Result<Deletion, StoreError> {
            self.inner.schedule_deletion(address, purge_at_ms)
        }
        fn cancel_deletion(&self, address: &Address) -> Result<bool, StoreError> {
            self.inner.cancel_deletion(address)
        }
        fn begin_purge(
            &self,
            address: &Address,
            now_ms: u64,
            to_tell: &[PeerToTell],
        ) -> Result<Option<Deletion>, StoreError> {
            self.inner.begin_purge(address, now_ms, to_tell)
        }
        fn settle_purge(
            &self,
            address: &Address,
            still_to_tell: &[PeerToTell],
        ) -> Result<(), StoreError> {
            self.inner.settle_purge(address, still_to_tell)
        }
        fn due_deletions(&self, now_ms: u64, limit: usize) -> Result<Vec<Address>, StoreError> {
            self.inner.due_deletions(now_ms, limit)
        }
        fn addresses(&self, f: &dyn Fn(&Address) -> bool) -> Result<Vec<Address>, StoreError> {
            self.inner.addresses(f)
        }
        fn export_mailbox(&self, address: &Address) -> Result<MailboxExport, StoreError> {
            self.inner.export_mailbox(address)
        }
        fn import_mailbox(&self, export: &MailboxExport) -> Result<(), StoreError> {
            self.inner.import_mailbox(export)
        }
        fn purge_mailbox(&self, address: &Address) -> Result<(), StoreError> {
            self.inner.purge_mailbox(address)
        }
        fn remove_deletion(&self, address: &Address) -> Result<(), StoreError> {
            self.inner.remove_deletion(address)
        }
        fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.meta(key)
        }
        fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_meta(key, value)
        }
        fn server_id(&self) -> Result<ServerId, StoreError> {
            self.inner.server_id()
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.events.lock().expect("events").push("flush");
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.inner.flush()
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            self.inner.size_on_disk()
        }
    }

    fn item(address: Address, seq: u64) -> Append {
        Append {
            address,
            envelope: Arc::new(StoredEnvelope {
                seq,
                message_id: MessageId([seq as u8; 16]),
                sender: None,
                stored_at_ms: 0,
                expires_at_ms: u64::MAX,
                envelope: vec![1; 16],
            }),
        }
    }

    fn submit(
        handle: &WriteHandle,
        items: Vec<Append>,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, answer) = oneshot::channel();
        handle.submit_append(items, done);
        answer
    }

    /// A writer over a [`CountingStore::gated`] store whose first batch (seq
    /// 1 appended to one address) waits in the store until `release` is
    /// sent, so that everything queued meanwhile forms the next batch.
    struct Held {
        store: Arc<CountingStore>,
        writer: Writer,
        handle: WriteHandle,
        /// The first append's answer.
        first: oneshot::Receiver<Result<(), StoreError>>,
        release: mpsc::Sender<()>,
    }

    fn held_first_batch(fail_call: Option<usize>, a: Address) -> Held {
        let (store, entered, release) = CountingStore::gated(fail_call);
        let (writer, handle) = Writer::start(store.clone());
        let first = submit(&handle, vec![item(a, 1)]);
        entered.recv().expect("first batch started");
        Held {
            store,
            writer,
            handle,
            first,
            release,
        }
    }

    /// Runs `future` to completion on a fresh current-thread runtime.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn store_writer_commits_concurrent_appends_in_few_flushes() {
        const TASKS: u64 = 100;
        const APPENDS_PER_TASK: u64 = 10;
        let store = Arc::new(CountingStore {
            delay: Duration::from_millis(2),
            ..CountingStore::default()
        });
        let (writer, handle) = Writer::start(store.clone());
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let address = Address([task as u8; 32]);
                    for seq in 1..=APPENDS_PER_TASK {
                        handle.append(vec![item(address, seq)]).await?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task"), Ok(()));
        }
        let appends = (TASKS * APPENDS_PER_TASK) as usize;
        let batches = store.append_batches.load(Ordering::SeqCst);
        assert!(
            batches * 5 <= appends,
            "{batches} flushes for {appends} appends"
        );
        for task in 0..TASKS {
            let address = Address([task as u8; 32]);
            assert_eq!(store.head_seq(&address), Ok(APPENDS_PER_TASK));
            let stored = store.read_from(&address, 0, usize::MAX, 0).expect("read");
            assert_eq!(stored.len() as u64, APPENDS_PER_TASK);
        }
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .expect("join")
            .expect("shutdown");
    }

    #[test]
    fn store_writer_reports_a_failed_batch_to_every_waiter() {
        let a = Address([1; 32]);
        // The first batch holds the thread while the second one queues up.
        let Held {
            store,
            writer,
            handle,
            first,
            release,
        } = held_first_batch(Some(2), a);
        let queued: Vec<_> = (2..=20)
            .map(|seq| submit(&handle, vec![item(a, seq)]))
            .collect();
        let (flush_done, flush_answer) = oneshot::channel();
        handle
            .requests
            .send(Request::Flush { done: flush_done })
            .expect("send");
        release.send(()).expect("release");

        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        for answer in queued {
            assert_eq!(
                answer.blocking_recv().expect("answer"),
                Err(StoreError::Injected)
            );
        }
        assert_eq!(
            flush_answer.blocking_recv().expect("answer"),
            Err(StoreError::Injected)
        );
        // One append_batch for the whole failed batch, and nothing of it written.
        assert_eq!(store.append_batches.load(Ordering::SeqCst), 2);
        assert_eq!(store.head_seq(&a), Ok(1));
        // The writer keeps going after a failed batch.
        assert_eq!(
            submit(&handle, vec![item(a, 2)])
                .blocking_recv()
                .expect("answer"),
            Ok(())
        );
        assert_eq!(store.head_seq(&a), Ok(2));
        writer.shutdown().expect("shutdown");
    }

    #[test]
    fn store_writer_applies_a_delete_after_the_append_it_names() {
        let a = Address([1; 32]);
        let device = DeviceId([2; 32]);
        let Held {
            store,
            writer,
            handle,
            first,
            release,
        } = held_first_batch(None, a);
        // One batch: append 2, delete 2, cursor, append 3, delete 1 (already durable).
        let append_two = submit(&handle, vec![item(a, 2)]);
        let (delete_two, cursor, append_three, delete_one) = block_on(async {
            let delete_two = tokio::spawn({
                let handle = handle.clone();
                async move { handle.delete(a, vec![2]).await }
            });
            tokio::task::yield_now().await;
            let cursor = tokio::spawn({
                let handle = handle.clone();
                async move { handle.set_cursor(a, device, 2).await }
            });
            tokio::task::yield_now().await;
            let append_three = submit(&handle, vec![item(a, 3)]);
            let delete_one = tokio::spawn({
                let handle = handle.clone();
                async move { handle.delete(a, vec![1]).await }
            });
            tokio::task::yield_now().await;
            release.send(()).expect("release");
            (
                delete_two.await,
                cursor.await,
                append_three.await,
                delete_one.await,
            )
        });
        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(append_two.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(delete_two.expect("task"), Ok(1));
        assert_eq!(cursor.expect("task"), Ok(()));
        assert_eq!(append_three.expect("answer"), Ok(()));
        assert_eq!(delete_one.expect("task"), Ok(1));
        let left: Vec<u64> = store
            .read_from(&a, 0, 10, 0)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, vec![3]);
        assert_eq!(store.cursor(&a, &device), Ok(Some(2)));
        assert_eq!(store.head_seq(&a), Ok(3));
        // First batch, then the second split once at the conflicting delete.
        assert_eq!(store.append_batches.load(Ordering::SeqCst), 3);
        writer.shutdown().expect("shutdown");
    }

    #[test]
    fn store_writer_answers_appends_without_waiting_for_cursor_moves_of_their_batch() {
        let a = Address([1; 32]);
        let device = DeviceId([2; 32]);
        let Held {
            store,
            writer,
            handle,
            first,
            release,
        } = held_first_batch(None, a);
        let (cursor_release, cursor_gate) = mpsc::channel();
        *store.cursor_gate.lock().expect("gate lock") = Some(cursor_gate);
        // One batch: a cursor move, then an append.
        let cursor = handle.set_cursor(a, device, 1);
        let second = submit(&handle, vec![item(a, 2)]);
        release.send(()).expect("release");
        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        // Answered while the cursor move is still held in the store.
        assert_eq!(second.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(store.cursor(&a, &device), Ok(None));
        cursor_release.send(()).expect("release the cursor");
        assert_eq!(block_on(cursor), Ok(()));
        assert_eq!(store.cursor(&a, &device), Ok(Some(1)));
        writer.shutdown().expect("shutdown");
    }

    #[test]
    fn store_writer_flush_covers_the_cursor_moves_queued_before_it() {
        let a = Address([1; 32]);
        let device = DeviceId([2; 32]);
        let Held {
            store,
            writer,
            handle,
            first,
            release,
        } = held_first_batch(None, a);
        // One batch: a cursor move, a flush, an append.
        let cursor = handle.set_cursor(a, device, 1);
        let (flush_done, flush_answer) = oneshot::channel();
        handle
            .requests
            .send(Request::Flush { done: flush_done })
            .expect("send");
        let second = submit(&handle, vec![item(a, 2)]);
        release.send(()).expect("release");
        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(flush_answer.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(second.blocking_recv().expect("answer"), Ok(()));
        assert_eq!(block_on(cursor), Ok(()));
        // The second append_batch is the batch's flush (appends flush
        // themselves): the cursor move was applied before it.
        let events = store.events.lock().expect("events").clone();
        assert_eq!(events, ["append_batch", "cursor", "append_batch"]);
        writer.shutdown().expect("shutdown");
    }

    #[test]
    fn store_writer_calls_back_in_submission_order_and_never_forgets_a_callback() {
        let a = Address([1; 32]);
        let Held {
            writer,
            handle,
            first,
            release,
            ..
        } = held_first_batch(None, a);
        let (called, calls) = mpsc::channel();
        for seq in 2..=20 {
            let called = called.clone();
            handle.submit_append_then(vec![item(a, seq)], move |result| {
                called.send((seq, result)).expect("test listens");
            });
        }
        release.send(()).expect("release");
        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        let order: Vec<_> = (2..=20).map(|_| calls.recv().expect("called")).collect();
        assert_eq!(order, (2..=20).map(|seq| (seq, Ok(()))).collect::<Vec<_>>());
        writer.shutdown().expect("shutdown");

        // After the thread is gone, the callback still hears about it.
        handle.submit_append_then(vec![item(a, 21)], move |result| {
            called.send((21, result)).expect("test listens");
        });
        assert_eq!(calls.recv().expect("called"), (21, Err(StoreError::Closed)));
        // And one dropped unanswered is called with `Closed` too.
        let (dropped_tx, dropped) = mpsc::channel();
        drop(Done::Then(Then(Some(Box::new(move |result| {
            dropped_tx.send(result).expect("test listens");
        })))));
        assert_eq!(dropped.recv().expect("called"), Err(StoreError::Closed));
    }

    #[test]
    fn store_writer_shutdown_commits_everything_queued_then_refuses() {
        let a = Address([1; 32]);
        let Held {
            store,
            writer,
            handle,
            first,
            release,
        } = held_first_batch(None, a);
        let queued: Vec<_> = (2..=2_000)
            .map(|seq| submit(&handle, vec![item(a, seq)]))
            .collect();
        release.send(()).expect("release");
        writer.shutdown().expect("shutdown");
        assert_eq!(first.blocking_recv().expect("answer"), Ok(()));
        for answer in queued {
            assert_eq!(answer.blocking_recv().expect("answer"), Ok(()));
        }
        assert_eq!(store.head_seq(&a), Ok(2_000));
        // 1999 queued appends exceed one batch's cap.
        assert_eq!(store.append_batches.load(Ordering::SeqCst), 3);
        assert!(
            store.flushes.load(Ordering::SeqCst) >= 1,
            "shutdown flushes"
        );

        assert_eq!(
            submit(&handle, vec![item(a, 2_001)])
                .blocking_recv()
                .expect("answer"),
            Err(StoreError::Closed)
        );
        assert_eq!(block_on(handle.flush()), Err(StoreError::Closed));
        assert_eq!(block_on(handle.delete(a, vec![1])), Err(StoreError::Closed));
    }
}
