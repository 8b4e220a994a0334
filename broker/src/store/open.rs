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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use backbone_protocol::Address;
    use backbone_protocol::bytes::MessageId;

    use super::*;
    use crate::store::StoredEnvelope;
    use crate::store::sled_store::tests::write_legacy;

    const NOW_MS: u64 = 1_000;

    fn envelope(seq: u64) -> StoredEnvelope {
        StoredEnvelope {
            seq,
            message_id: MessageId([seq as u8; 16]),
            sender: None,
            stored_at_ms: 1,
            expires_at_ms: u64::MAX,
            envelope: vec![seq as u8; 40].into(),
        }
    }

    /// Mailboxes of the old layout: envelopes and heads (one mailbox with
    /// only a head left, its envelopes deleted).
    fn old_layout() -> BTreeMap<Address, (Vec<StoredEnvelope>, u64)> {
        let mut mailboxes = BTreeMap::new();
        mailboxes.insert(Address([1; 32]), ((1..=5).map(envelope).collect(), 5));
        mailboxes.insert(Address([2; 32]), (vec![envelope(3), envelope(9)], 12));
        mailboxes.insert(Address([3; 32]), (Vec::new(), 7));
        mailboxes
    }

    fn write_old(data: &Path) {
        let store = SledStore::open(&paths(data).0).expect("opens");
        for (address, (envelopes, head)) in old_layout() {
            write_legacy(&store, &address, &envelopes, Some(head));
        }
        store.sync().expect("syncs");
    }

    /// Opens the stores as the broker does and checks that every envelope
    /// and head of the old layout is in the log, once, and none in sled.
    fn assert_migrated(data: &Path) {
        let (stores, _) = open(data, &StoreConfig::default(), NOW_MS).expect("opens");
        for (address, (envelopes, head)) in old_layout() {
            assert_eq!(stores.log.export(&address), Ok(envelopes), "{address}");
            assert_eq!(stores.log.head_seq(&address), Ok(head), "{address}");
        }
        stores.log.close().expect("closes");
        drop(stores);
        let store = SledStore::open(&paths(data).0).expect("opens");
        assert_eq!(store.legacy_mailboxes(), Ok(Vec::new()));
    }

    #[test]
    fn a_data_directory_from_before_the_log_is_migrated_at_the_first_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path());
        let (stores, opened) = open(dir.path(), &StoreConfig::default(), NOW_MS).expect("opens");
        assert_eq!(
            (opened.migrated_envelopes, opened.migrated_mailboxes),
            (7, 3)
        );
        stores.log.close().expect("closes");
        drop(stores);
        assert_migrated(dir.path());
    }

    /// A migration that fails at the n-th write or sync of either store
    /// (what a kill there leaves, or more: writes before it may have
    /// reached the disk) is finished by the next start, every envelope
    /// once, every head kept.
    #[test]
    fn a_migration_interrupted_at_any_write_is_finished_by_the_next_start() {
        for in_log in [false, true] {
            for n in 0.. {
                let dir = tempfile::tempdir().expect("tempdir");
                write_old(dir.path());
                let (store_path, log_path) = paths(dir.path());
                let fired = {
                    let directory = Arc::new(SledStore::open(&store_path).expect("opens"));
                    let config = LogConfig {
                        dir: log_path,
                        segment_bytes: 1 << 20,
                        compact_below: 0.5,
                        checkpoint_interval: std::time::Duration::from_secs(3600),
                        no_sync: false,
                    };
                    let (log, _) =
                        LogStore::open(config, directory.clone(), NOW_MS).expect("opens");
                    if in_log {
                        log.fail_points().fail_after(n, None);
                    } else {
                        directory.fail_after(n, None);
                    }
                    let outcome = migrate(&directory, &log);
                    let fired = if in_log {
                        log.fail_points().take_fired()
                    } else {
                        directory.take_fired()
                    };
                    assert_eq!(outcome.is_err(), fired.is_some(), "{outcome:?}");
                    fired
                };
                assert_migrated(dir.path());
                if fired.is_none() {
                    assert!(n > 2, "the migration passed only {n} fail points");
                    break;
                }
            }
        }
    }
}
