//! Opening a data directory's stores: the sled directory under `store/`,
//! the mailbox log under `log/`, and the one-time move of envelopes from a
//! data directory written before the log (where sled held them) into it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::log::{LogConfig, LogStore, Recovery};
use super::{Directory, MailboxLog, SledStore, StoreError, wait_for};
use crate::config::StoreConfig;

/// The broker's two stores.
#[derive(Clone)]
pub struct Stores {
    /// The mailbox log: envelopes.
    pub log: Arc<dyn MailboxLog>,
    /// The directory: everything else.
    pub directory: Arc<dyn Directory>,
    /// The on-disk log, for its maintenance and status (none for a memory store).
    pub disk_log: Option<Arc<LogStore>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// One in-memory store serving as both (tests, simulation).
    pub fn memory(store: Arc<super::MemoryStore>) -> Self {
        Self {
            log: store.clone(),
            directory: store,
            disk_log: None,
        }
    }
}

/// What opening found: the log's recovery and what was migrated.
#[derive(Clone, Debug, Default)]
pub struct Opened {
    /// The log's recovery.
    pub recovery: Recovery,
    /// Envelopes moved from the old layout.
    pub migrated_envelopes: u64,
    /// Mailboxes they belonged to.
    pub migrated_mailboxes: u64,
}

/// The paths of a data directory's stores.
pub fn paths(data_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (data_dir.join("store"), data_dir.join("log"))
}

/// Opens the stores of `data_dir`, migrating envelopes of an older layout,
/// and starts the log's background checkpoints. `no_sync` is the test-only
/// sabotage (see `store::log::no_sync_sabotage`).
pub fn open(
    data_dir: &Path,
    config: &StoreConfig,
    now_ms: u64,
) -> Result<(Stores, Opened), StoreError> {
    let (store_path, log_path) = paths(data_dir);
    let directory = Arc::new(SledStore::open(&store_path)?);
    let log_config = LogConfig {
        dir: log_path,
        segment_bytes: config.segment_size.as_u64(),
        compact_below: config.compact_below,
        checkpoint_interval: config.checkpoint_interval,
        no_sync: super::log::no_sync_sabotage(),
    };
    let (log, recovery) = LogStore::open(log_config, directory.clone(), now_ms)?;
    let log = Arc::new(log);
    let (migrated_envelopes, migrated_mailboxes) = migrate(&directory, &log)?;
    log.start_background();
    tracing::info!(
        checkpoint = recovery.checkpoint,
        replayed = recovery.replayed,
        envelopes = log.envelope_count(),
        "mailbox log opened"
    );
    Ok((
        Stores {
            log: log.clone(),
            directory,
            disk_log: Some(log),
        },
        Opened {
            recovery,
            migrated_envelopes,
            migrated_mailboxes,
        },
    ))
}

/// Moves every envelope the sled store still holds (a data directory
/// written before the mailbox log) into the log; returns how many, and of
/// how many mailboxes.
///
/// Crash-safe at every step: a mailbox's envelopes are appended to the log
/// (durably) and checkpointed before they leave sled, so a kill at any point
/// leaves them in sled, in the log, or in both; the next start moves what
/// is still in sled again, and a record appended twice is indexed once.
pub fn migrate(directory: &SledStore, log: &LogStore) -> Result<(u64, u64), StoreError> {
    let mailboxes = directory.legacy_mailboxes()?;
    if mailboxes.is_empty() {
        return Ok((0, 0));
    }
    let started = Instant::now();
    tracing::info!(
        mailboxes = mailboxes.len(),
        "moving envelopes from the store into the mailbox log (a data directory from before the log)"
    );
    let mut envelopes = 0u64;
    for address in &mailboxes {
        let (held, head) = directory.legacy_mailbox(address)?;
        envelopes += held.len() as u64;
        wait_for(|done| log.import(*address, held, head, done))?;
    }
    // Durable and checkpointed (heads included) before sled forgets them.
    log.checkpoint()?;
    for address in &mailboxes {
        directory.remove_legacy_mailbox(address)?;
    }
    directory.sync()?;
    tracing::info!(
        envelopes,
        mailboxes = mailboxes.len(),
        seconds = started.elapsed().as_secs_f64(),
        "moved the store's envelopes into the mailbox log"
    );
    Ok((envelopes, mailboxes.len() as u64))
}
