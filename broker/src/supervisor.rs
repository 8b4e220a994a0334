//! The root of the supervision tree and the expiry actor.
//!
//! ```text
//! RootSupervisor
//! ├── ExpiryActor            periodic sweep through the expiry indexes (envelopes, tokens)
//! └── MailboxActor × N       one per active address, spawned on demand by the Registry
//! ```
//!
//! A failed expiry actor is restarted; a failed mailbox actor is logged and
//! dropped from the registry, and the next caller spawns a fresh one that
//! re-reads its head from the store (nothing acknowledged lives only in memory).
//!
//! Due identity deletions are swept on the same `expiry.interval`, but by a
//! task of their own (`crate::cmd::deletion::sweep`) rather than by this actor: a
//! purge needs the whole broker (mailbox actors, sessions, fleet links), not
//! only the store, and it resumes from the store after any failure.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::mailbox::{MailboxContext, MailboxState, Registry};
use crate::store::prelude::*;

/// The root supervisor.
pub struct RootSupervisor;

impl RootSupervisor {
    /// Starts the tree: the root, its expiry actor, and the registry whose
    /// mailbox actors the root supervises.
    pub async fn start(
        mailboxes: Arc<MailboxContext>,
        expiry: ExpiryArgs,
    ) -> Result<(ActorRef<RootMsg>, Registry), ractor::SpawnErr> {
        let (root, _) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                mailboxes: mailboxes.clone(),
                expiry,
            },
        )
        .await?;
        let registry = Registry::new(mailboxes, Some(root.get_cell()));
        Ok((root, registry))
    }
}

/// Arguments of the root supervisor.
pub struct RootArgs {
    /// Shared mailbox context (for cleaning up failed mailboxes).
    pub mailboxes: Arc<MailboxContext>,
    /// Expiry settings.
    pub expiry: ExpiryArgs,
}

/// State of the root supervisor.
pub struct RootState {
    mailboxes: Arc<MailboxContext>,
    expiry: ExpiryArgs,
    expiry_actor: ActorRef<ExpiryMsg>,
}

/// Messages to the root supervisor: none besides supervision events.
#[derive(Debug)]
pub enum RootMsg {}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (expiry_actor, _) =
            Actor::spawn_linked(None, ExpiryActor, args.expiry.clone(), myself.get_cell()).await?;
        Ok(RootState {
            mailboxes: args.mailboxes,
            expiry: args.expiry,
            expiry_actor,
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                if cell.get_id() == state.expiry_actor.get_id() {
                    tracing::error!(%error, "expiry actor failed; restarting it");
                    let (actor, _) = Actor::spawn_linked(
                        None,
                        ExpiryActor,
                        state.expiry.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                    state.expiry_actor = actor;
                } else {
                    tracing::error!(%error, "mailbox actor failed; it will be respawned on demand");
                    state.mailboxes.forget_actor(cell.get_id());
                }
            }
            SupervisionEvent::ActorTerminated(cell, mut last, _) => {
                // A mailbox actor that stopped cleanly has already left the
                // registry (its post_stop does that) unless it was killed;
                // its last state names its address, so it is removed by key.
                // Only an actor that left no state costs a scan of them all.
                match last
                    .as_mut()
                    .and_then(|last| last.take::<MailboxState>().ok())
                {
                    Some(last) => state.mailboxes.forget(last.mailbox()),
                    None => state.mailboxes.forget_actor(cell.get_id()),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Settings of the expiry actor.
#[derive(Clone)]
pub struct ExpiryArgs {
    /// The directory: token and file records.
    pub directory: Arc<dyn Directory>,
    /// The mailbox log: envelopes.
    pub log: Arc<dyn MailboxLog>,
    /// Sweep period.
    pub interval: Duration,
    /// Most deletions per storage call.
    pub batch: usize,
    /// The clock, in Unix milliseconds (injectable for tests).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Where expired files' bytes are deleted.
    pub files: Arc<crate::store::Files>,
}

/// Deletes expired envelopes, tokens and files through the store's expiry
/// indexes (and expired files' bytes).
pub struct ExpiryActor;

/// Messages of the expiry actor.
#[derive(Debug)]
pub enum ExpiryMsg {
    /// Run one sweep.
    Sweep,
}

impl Actor for ExpiryActor {
    type Msg = ExpiryMsg;
    type State = ExpiryArgs;
    type Arguments = ExpiryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.interval, || ExpiryMsg::Sweep);
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ExpiryMsg::Sweep => {
                let now = (state.clock)();
                loop {
                    let log = state.log.clone();
                    let batch = state.batch;
                    // A sweep takes locks of the log's index: off the runtime.
                    let deleted =
                        tokio::task::spawn_blocking(move || log.expire(now, batch)).await??;
                    metrics::counter!("backbone_envelopes_expired_total").increment(deleted as u64);
                    if deleted < batch {
                        break;
                    }
                }
                loop {
                    let store = state.directory.clone();
                    let batch = state.batch;
                    let deleted =
                        tokio::task::spawn_blocking(move || store.expire_tokens(now, batch))
                            .await??;
                    metrics::counter!("backbone_tokens_expired_total").increment(deleted as u64);
                    if deleted < batch {
                        break;
                    }
                }
                loop {
                    let store = state.directory.clone();
                    let batch = state.batch;
                    let expired =
                        tokio::task::spawn_blocking(move || store.expire_files(now, batch))
                            .await??;
                    crate::store::file_bytes::remove_expired(&state.files, &expired);
                    if expired.len() < batch {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::{MailboxError, MailboxQuota};
    use crate::store::tests::{address, envelope};
    use crate::store::{MemoryStore, Writer};
    use backbone_protocol::Address;
    use backbone_protocol::relationship::InboundPolicy;

    /// A registry linked to a running root supervisor, as the broker runs
    /// them, over a memory store.
    struct Tree {
        registry: Arc<Registry>,
        context: Arc<MailboxContext>,
        supervisor: ActorRef<RootMsg>,
        writer: Writer,
        _dir: tempfile::TempDir,
    }

    impl Tree {
        async fn start(idle_timeout: Duration) -> Self {
            Self::start_with(idle_timeout, MailboxQuota::default()).await
        }

        async fn start_with(idle_timeout: Duration, quota: MailboxQuota) -> Self {
            let memory = Arc::new(MemoryStore::default());
            Self::start_over(idle_timeout, quota, memory.clone(), memory).await
        }

        /// A tree over `store` and `log`.
        async fn start_over(
            idle_timeout: Duration,
            quota: MailboxQuota,
            store: Arc<dyn Directory>,
            log: Arc<dyn MailboxLog>,
        ) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let (writer, handle) = Writer::start(log.clone(), store.clone());
            let context = Arc::new(MailboxContext {
                directory: store.clone(),
                log: log.clone(),
                writer: handle,
                idle_timeout,
                actors: dashmap::DashMap::new(),
                watches: Arc::default(),
                quota,
                clock: Arc::new(|| 0),
                default_policy: InboundPolicy::Anyone,
                notice_ttl: Duration::from_secs(60),
                assigned: dashmap::DashMap::new(),
                forgotten: Default::default(),
            });
            let expiry = ExpiryArgs {
                directory: store,
                log,
                interval: Duration::from_secs(600),
                batch: 100,
                clock: Arc::new(|| 0),
                files: Arc::new(crate::store::Files::open(dir.path()).expect("files")),
            };
            let (supervisor, registry) = RootSupervisor::start(context.clone(), expiry)
                .await
                .expect("supervisor");
            Self {
                registry: Arc::new(registry),
                context,
                supervisor,
                writer,
                _dir: dir,
            }
        }

        async fn append(&self, to: Address) -> u64 {
            self.try_append(to).await.expect("append")
        }

        async fn try_append(&self, to: Address) -> Result<u64, MailboxError> {
            self.registry.append(&to, envelope(0, 0, u64::MAX)).await
        }

        fn actor_id(&self, of: &Address) -> Option<ractor::ActorId> {
            self.context
                .actors
                .get(of)
                .map(|mailbox| mailbox.actor().get_id())
        }

        async fn until_gone(&self, of: &Address, limit: Duration) {
            let deadline = tokio::time::Instant::now() + limit;
            while self.context.actors.contains_key(of) {
                assert!(tokio::time::Instant::now() < deadline, "the actor stayed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn stop(self) {
            self.supervisor.stop(None);
            let writer = self.writer;
            tokio::task::spawn_blocking(move || writer.shutdown())
                .await
                .expect("join")
                .expect("shutdown");
        }
    }

    #[tokio::test]
    async fn a_killed_mailbox_actor_leaves_the_registry_and_only_that_one() {
        let tree = Tree::start(Duration::from_secs(600)).await;
        let (a, b) = (address(1), address(2));
        tree.append(a).await;
        tree.append(b).await;
        assert_eq!(tree.registry.active(), 2);

        // Killed: its post_stop does not run, so the supervisor removes it.
        let killed = tree
            .context
            .actors
            .get(&a)
            .expect("a's actor")
            .actor()
            .clone();
        killed.kill();
        tree.until_gone(&a, Duration::from_secs(10)).await;
        assert!(
            tree.context.actors.contains_key(&b),
            "b's actor is untouched"
        );
        // The next write starts a fresh actor that numbers on.
        assert_eq!(tree.append(a).await, 2);
        assert_ne!(tree.actor_id(&a), Some(killed.get_id()));
        tree.stop().await;
    }

    #[tokio::test]
    async fn a_mailbox_actor_lives_while_written_and_stops_one_idle_timeout_after() {
        let timeout = Duration::from_secs(1);
        let tree = Tree::start(timeout).await;
        let a = address(1);
        tree.append(a).await;
        let first = tree.actor_id(&a).expect("started");
        // Writes well within the timeout of each other, for 2.5 timeouts.
        let started = tokio::time::Instant::now();
        let mut last_write = started;
        while started.elapsed() < timeout * 5 / 2 {
            tokio::time::sleep(timeout / 4).await;
            // Taken before the write: the actor notes its activity while
            // handling it, before `append` returns, so the time after the
            // return would be late by the reply's latency.
            last_write = tokio::time::Instant::now();
            tree.append(a).await;
            assert_eq!(tree.actor_id(&a), Some(first), "stopped while written");
        }
        tree.until_gone(&a, timeout * 10).await;
        assert!(
            last_write.elapsed() >= timeout,
            "stopped {:?} after the last write",
            last_write.elapsed()
        );
        tree.stop().await;
    }

    #[tokio::test]
    async fn a_new_actor_counts_what_its_mailbox_holds_before_admitting_a_write() {
        let timeout = Duration::from_millis(50);
        let quota = MailboxQuota {
            max_envelopes: 2,
            max_bytes: 0,
        };
        let tree = Tree::start_with(timeout, quota).await;
        let (a, b) = (address(1), address(2));
        for to in [a, b] {
            tree.append(to).await;
            tree.append(to).await;
        }
        tree.until_gone(&a, Duration::from_secs(10)).await;
        tree.until_gone(&b, Duration::from_secs(10)).await;
        // Started for the write: the count comes with its start.
        assert!(matches!(
            tree.try_append(a).await,
            Err(MailboxError::QuotaExceeded(_))
        ));
        // Started for something else first: the write counts then.
        tree.registry
            .set_policy(&b, InboundPolicy::Anyone)
            .await
            .expect("sets the policy");
        assert!(matches!(
            tree.try_append(b).await,
            Err(MailboxError::QuotaExceeded(_))
        ));
        tree.stop().await;
    }

    /// A mailbox log whose appends complete only when released: the memory
    /// store's, held back.
    struct HeldLog {
        inner: Arc<MemoryStore>,
        held: std::sync::Mutex<Vec<(Vec<crate::store::Append>, crate::store::Completion)>>,
    }

    impl HeldLog {
        fn held(&self) -> usize {
            self.held.lock().expect("lock").len()
        }

        /// Hands every held append to the memory store, in order.
        fn release(&self) {
            for (items, done) in self.held.lock().expect("lock").drain(..) {
                self.inner.append(items, done);
            }
        }
    }

    impl MailboxLog for HeldLog {
        fn append(&self, items: Vec<crate::store::Append>, done: crate::store::Completion) {
            self.held.lock().expect("lock").push((items, done));
        }
        fn delete(&self, address: Address, seqs: Vec<u64>, done: crate::store::Completion) {
            self.inner.delete(address, seqs, done)
        }
        fn drop_mailbox(&self, address: Address, done: crate::store::Completion) {
            self.inner.drop_mailbox(address, done)
        }
        fn import(
            &self,
            address: Address,
            envelopes: Vec<crate::store::StoredEnvelope>,
            head: u64,
            done: crate::store::Completion,
        ) {
            self.inner.import(address, envelopes, head, done)
        }
        fn barrier(&self, done: crate::store::Completion) {
            self.inner.barrier(done)
        }
        fn read_from(
            &self,
            address: &Address,
            from_seq: u64,
            limit: usize,
            now_ms: u64,
        ) -> Result<Vec<crate::store::StoredEnvelope>, crate::store::StoreError> {
            self.inner.read_from(address, from_seq, limit, now_ms)
        }
        fn usage(
            &self,
            address: &Address,
            now_ms: u64,
        ) -> Result<crate::store::MailboxUsage, crate::store::StoreError> {
            self.inner.usage(address, now_ms)
        }
        fn head_seq(&self, address: &Address) -> Result<u64, crate::store::StoreError> {
            self.inner.head_seq(address)
        }
        fn oldest_seq(&self, address: &Address) -> Result<Option<u64>, crate::store::StoreError> {
            self.inner.oldest_seq(address)
        }
        fn export(
            &self,
            address: &Address,
        ) -> Result<Vec<crate::store::StoredEnvelope>, crate::store::StoreError> {
            self.inner.export(address)
        }
        fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, crate::store::StoreError> {
            self.inner.expire(now_ms, limit)
        }
        fn mailboxes(&self, filter: &dyn Fn(&Address) -> bool) -> Vec<Address> {
            self.inner.mailboxes(filter)
        }
        fn envelope_count(&self) -> u64 {
            self.inner.envelope_count()
        }
        fn log_bytes_on_disk(&self) -> u64 {
            self.inner.log_bytes_on_disk()
        }
        fn close(&self) -> Result<(), crate::store::StoreError> {
            self.inner.close()
        }
    }

    /// Appends complete on the log's thread without a message to the actor;
    /// a retirement must still wait for the mailbox's writes in flight,
    /// hear when the last one completes, and only then answer and stop.
    #[tokio::test]
    async fn a_retirement_waits_for_the_writes_in_flight_and_stops_after_the_last() {
        let memory = Arc::new(MemoryStore::default());
        let log = Arc::new(HeldLog {
            inner: memory.clone(),
            held: std::sync::Mutex::default(),
        });
        let quota = MailboxQuota {
            max_envelopes: 10,
            max_bytes: 0,
        };
        let tree =
            Tree::start_over(Duration::from_secs(600), quota, memory.clone(), log.clone()).await;
        let a = address(1);
        let registry = tree.registry.clone();
        // One after the other reaches the log, so their numbers are known.
        let mut appends = Vec::new();
        for held in 1..=2 {
            let registry = registry.clone();
            appends.push(tokio::spawn(async move {
                registry.append(&a, envelope(0, 0, u64::MAX)).await
            }));
            while log.held() < held {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        memory.schedule_deletion(&a, 0).expect("scheduled");
        let retirement = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.retire(&a, 1).await })
        };
        // The tombstone is written, but two appends are still in flight.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!retirement.is_finished(), "answered with writes in flight");
        assert!(
            tree.context.actors.contains_key(&a),
            "stopped with writes in flight"
        );

        log.release();
        let tombstone = tokio::time::timeout(Duration::from_secs(10), retirement)
            .await
            .expect("answered once the writes completed")
            .expect("joins")
            .expect("retires");
        assert!(tombstone.is_some_and(|deletion| deletion.is_tombstone()));
        let mut seqs = Vec::new();
        for append in appends {
            seqs.push(append.await.expect("joins").expect("durable"));
        }
        assert_eq!(seqs, [1, 2]);
        tree.until_gone(&a, Duration::from_secs(10)).await;
        assert!(
            tree.context.assigned.is_empty(),
            "numbers handed out are forgotten once durable"
        );
        tree.stop().await;
    }

    /// Sessions append to running mailboxes' cores directly while their
    /// actors stop when idle and are killed: every append still gets its
    /// own number, none is skipped, and the log holds each once. (Fails
    /// most runs if a forgotten core may still number, or if an actor
    /// started before another was forgotten is registered.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_get_every_number_once_across_idle_stops_and_kills() {
        const WRITERS: u64 = 8;
        const EACH: u64 = 1000;
        // Idle checks every 10 ms (the shortest): an actor stops in every
        // pause of its writers below and is killed in between.
        let tree = Arc::new(Tree::start(Duration::from_millis(1)).await);
        let mailboxes = [address(1), address(2), address(3)];
        let mut writers = tokio::task::JoinSet::new();
        for to in mailboxes {
            for writer in 0..WRITERS {
                let tree = tree.clone();
                writers.spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..EACH {
                        seqs.push((to, tree.append(to).await));
                        if (i + writer) % 40 == 0 {
                            tokio::time::sleep(Duration::from_millis(15)).await;
                        }
                    }
                    seqs
                });
            }
        }
        let writers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let killer = {
            let (tree, writers_done) = (tree.clone(), writers_done.clone());
            tokio::spawn(async move {
                let mut kills = 0;
                while !writers_done.load(std::sync::atomic::Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    for to in mailboxes {
                        let running = tree.context.actors.get(&to).map(|m| m.actor().clone());
                        if let Some(actor) = running {
                            actor.kill();
                            kills += 1;
                        }
                    }
                }
                kills
            })
        };
        let handed_out: Vec<(Address, u64)> =
            writers.join_all().await.into_iter().flatten().collect();
        writers_done.store(true, std::sync::atomic::Ordering::Release);
        let kills = killer.await.expect("killer");
        assert!(kills > 0, "no actor was ever killed");
        let expected: Vec<u64> = (1..=WRITERS * EACH).collect();
        for to in mailboxes {
            let mut seqs: Vec<u64> = handed_out
                .iter()
                .filter(|(of, _)| *of == to)
                .map(|(_, seq)| *seq)
                .collect();
            seqs.sort_unstable();
            let twice: Vec<u64> = seqs
                .windows(2)
                .filter(|w| w[0] == w[1])
                .map(|w| w[0])
                .collect();
            let skipped = expected
                .iter()
                .filter(|seq| seqs.binary_search(seq).is_err())
                .count();
            assert!(
                seqs == expected,
                "numbers handed out twice: {twice:?}; {skipped} skipped"
            );
            let log = &tree.context.log;
            assert_eq!(log.head_seq(&to).expect("head"), WRITERS * EACH);
            assert_eq!(
                log.usage(&to, 0).expect("usage").envelopes,
                WRITERS * EACH,
                "every envelope stored once"
            );
        }
        Arc::into_inner(tree).expect("the last hold").stop().await;
    }
}
