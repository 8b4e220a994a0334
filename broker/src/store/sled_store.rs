//! The on-disk [`Store`], and the only module in the workspace that names `sled`.
//!
//! # Layout
//!
//! One sled database with these trees. Integers in keys are big-endian so
//! that sled's byte order is numeric order; `address` is the 32 raw bytes.
//!
//! | tree        | key                                          | value |
//! |-------------|----------------------------------------------|-------|
//! | `envelopes` | `address(32) ‖ seq(u64 BE)`                  | `expires_at_ms(u64 BE) ‖ encode_value(StoredEnvelope)` |
//! | `envelopes` | empty key                                    | how many envelopes the tree holds, `u64 BE` |
//! | `expiry`    | `expires_at_ms(u64 BE) ‖ address(32) ‖ seq(u64 BE)` | empty |
//! | `heads`     | `address(32)`                                | the mailbox's head once its highest envelope was removed, `u64 BE` |
//! | `cursors`   | `address(32) ‖ device_id(32)`                | acknowledged seq, `u64 BE` |
//! | `cards`     | `address(32)`                                | `encode_value(IdentityCard)` |
//! | `devices`   | `address(32) ‖ device_id(32)`                | `encode_value(DeviceCertificate)` |
//! | `capabilities` | `address(32) ‖ capability_hash(32)`       | empty: the key is the whole record |
//! | `tokens`    | `token_id(32)`                               | `encode_value(StoredToken)` |
//! | `token_owners` | `owner(32) ‖ token_id(32)`                | the token's `expires_at_ms(u64 BE)` |
//! | `token_expiry` | `expires_at_ms(u64 BE) ‖ token_id(32) ‖ owner(32)` | empty |
//! | `files`     | `file_id(32)`                                | `encode_value(StoredFile)`; the bytes are in `<data_dir>/files/` |
//! | `file_owners` | `owner(32) ‖ file_id(32)`                  | the file's `expires_at_ms(u64 BE)` |
//! | `file_expiry` | `expires_at_ms(u64 BE) ‖ file_id(32) ‖ owner(32)` | empty |
//! | `policies`  | `address(32)`                                | inbound policy: `0` anyone, `1` relationships-only |
//! | `relationships` | `address(32) ‖ peer(32)`                 | `encode_value(Relationship)`: the address's side |
//! | `deletions` | `address(32)`                                | `encode_value(Deletion)`: scheduled, purging, or the tombstone |
//! | `deletion_index` | `due_at_ms(u64 BE) ‖ address(32)`       | empty: a deletion with work left (a schedule, an unfinished purge) |
//! | `meta`      | `"server_id"`                                | the node's `ServerId`, 32 bytes |
//! | `meta`      | `"write_epoch"`                              | flushes so far, `u64 BE` (see "Detecting a damaged store") |
//! | `meta`      | `"node/" ‖ key`                              | node-level values ([`Store::put_meta`]), e.g. handoff progress |
//!
//! An envelope value starts with a copy of its expiry time so that reads can
//! skip expired envelopes, and deletes can find the expiry index entry,
//! without decoding the envelope.
//!
//! # Crash ordering
//!
//! sled makes each tree's batch atomic but not a batch across trees, and the
//! writes of [`Store::append_batch`] only become durable together at the flush
//! that ends it. A crash before that flush may keep any subset of them, so the
//! order of writes is chosen to make every partial state harmless:
//!
//! - Appends write the expiry entry before the envelope. An expiry entry
//!   whose envelope is missing (or has another expiry) is dropped by
//!   [`Store::expire`] without counting it; an envelope never lacks its index
//!   entry, so it cannot escape expiry.
//! - Deletes remove the envelope before its expiry entry, for the same reason.
//! - [`Store::head_seq`] is the larger of the head record and the highest
//!   stored seq. Appends write no head record (it was one more key per
//!   envelope on the hot path): while a mailbox's highest envelope is
//!   stored, it is the head. Deletes and expiry that remove a mailbox's
//!   highest stored envelope first raise the head record to it, so the head
//!   never falls back, and a crash that lost the record but kept the
//!   envelope loses nothing either.
//!
//! - Tokens follow the same rule: a token's expiry and owner index entries
//!   are written before the token and removed after it. A due expiry entry
//!   whose token is missing (or has another expiry) is dropped without
//!   counting it, together with the owner entry a crash may have left; an
//!   owner entry is counted against the quota only while its expiry time
//!   (kept in its value) has not passed.
//!
//! - File records follow the token rule exactly, with their own trees.
//! - Deletions too: a schedule writes its index entry before its record; a
//!   cancellation and a finished purge remove the record (or make it the
//!   bare tombstone) before the index entry. An index entry without a
//!   matching record is dropped by [`Store::due_deletions`].
//!
//! None of these writes was acknowledged before the crash, so losing them is
//! allowed; only their partial effects need care.
//!
//! # Detecting a damaged store
//!
//! sled checksums every record, but when it meets a record that fails its
//! checksum while recovering, it takes it for the torn tail of a crash and
//! silently ignores everything written after it, however much that was. So
//! a [`Store::flush`] first writes a counter, the *write epoch*, into the
//! `meta` tree, and once the flush has returned, records that epoch outside
//! sled in `backbone.epoch` next to sled's own files (at most every 100 ms:
//! writing it with every flush measurably slowed group commits, so after a
//! crash, damage to only the last 100 ms of writes can escape this check;
//! closing the store records its final epoch). On open, a store whose
//! epoch is below the recorded one has lost writes it had confirmed durable:
//! [`SledStore::open`] refuses it with [`StoreError::Damaged`] instead of
//! serving what survived.
//!
//! Damage can also cost a page in the middle of the log while later writes
//! survive. The `envelopes` tree therefore holds its own envelope count under
//! the empty key (no envelope key is shorter than 40 bytes), changed in the
//! same atomic sled batch as the envelopes it counts. On open the tree's keys
//! are counted once (a scan of the envelope tree, proportional to what is
//! stored) and a count that disagrees is refused as damage too. The file is written without `fsync` (a page-cache
//! write per flush): after a power cut it may lag behind the store, which only
//! weakens the check, never raises a false alarm. It has two checksummed slots
//! written alternately, so a torn write leaves the other one.
//!
//! # Fault injection
//!
//! Every sled write and flush in this module first passes a named fail point
//! ([`SledStore::fail_point`]). In test builds a test can make the n-th next
//! one fail with [`StoreError::Injected`]; in other builds the check is empty.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backbone_protocol::bytes::{CapabilityHash, FileId, ServerId, TokenId, VerifierHash};
use backbone_protocol::codec::{decode_value, encode_value};
use backbone_protocol::deletion::{self, Deletion, PeerToTell};
use backbone_protocol::relationship::{InboundPolicy, Relationship};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod records;

pub use records::{StoredRecord, decode_record};

use super::log::checkpoint::{Checkpoints, Visit};
use super::prelude::*;
use super::{
    FilePut, FileQuota, MailboxExport, StoreError, StoredEnvelope, StoredFile, StoredToken,
    TokenAttempt, merge_token,
};

const ADDRESS_LEN: usize = 32;
const SEQ_LEN: usize = 8;
const ENVELOPE_KEY_LEN: usize = ADDRESS_LEN + SEQ_LEN;
const EXPIRY_KEY_LEN: usize = 8 + ADDRESS_LEN + SEQ_LEN;
/// An expiry index key of tokens and files: `expires_at_ms ‖ id(32) ‖ owner`.
const ID_EXPIRY_KEY_LEN: usize = 8 + 32 + ADDRESS_LEN;
const DELETION_INDEX_KEY_LEN: usize = 8 + ADDRESS_LEN;
const SERVER_ID_KEY: &[u8] = b"server_id";
const EPOCH_KEY: &[u8] = b"write_epoch";
/// The key of the envelope count in the `envelopes` tree.
const COUNT_KEY: &[u8] = b"";
/// The most often the write epoch is written into sled.
const EPOCH_INTERVAL: Duration = Duration::from_millis(100);
/// The file, inside sled's directory, that records the last durable write epoch.
pub const EPOCH_FILE: &str = "backbone.epoch";
const EPOCH_MAGIC: &[u8; 8] = b"BBEPOCH1";
const EPOCH_SLOT_LEN: usize = 32;

/// Every fail point of this module, in the order they appear in it.
#[cfg(test)]
pub(crate) const FAIL_POINTS: &[&str] = &[
    "sync.files",
    "legacy.envelope",
    "legacy.expiry",
    "legacy.head",
    "cursor",
    "card",
    "device",
    "device.remove",
    "device.remove.cursor",
    "capability.register",
    "capability.revoke",
    "policy",
    "relationship",
    "import.capability",
    "token.expiry",
    "token.owner",
    "token",
    "token.attempt",
    "token.remove",
    "token.remove.owner",
    "token.remove.expiry",
    "token.stale.owner",
    "token.stale.expiry",
    "file.expiry",
    "file.owner",
    "file",
    "file.complete",
    "file.remove",
    "file.remove.owner",
    "file.remove.expiry",
    "file.stale.owner",
    "file.stale.expiry",
    "deletion.index",
    "deletion",
    "deletion.remove",
    "deletion.unindex",
    "import.policy",
    "import.relationship",
    "purge.pair",
    "purge.card",
    "purge.policy",
    "meta",
    "server_id",
    "checkpoint.index",
    "checkpoint.position",
    "epoch",
    "flush",
    "epoch.file",
];

/// How long [`SledStore::open`] waits for a just-closed store's lock to be released.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    /// The directory sled keeps its files in.
    path: std::path::PathBuf,
    /// Legacy: envelopes, their expiry index and heads of a data directory
    /// written before the mailbox log. Only the migration reads them, and
    /// empties them.
    envelopes: sled::Tree,
    expiry: sled::Tree,
    heads: sled::Tree,
    /// The log's index checkpoint: one value per mailbox.
    log_index: sled::Tree,
    cursors: sled::Tree,
    cards: sled::Tree,
    devices: sled::Tree,
    capabilities: sled::Tree,
    tokens: sled::Tree,
    token_owners: sled::Tree,
    token_expiry: sled::Tree,
    files: sled::Tree,
    file_owners: sled::Tree,
    file_expiry: sled::Tree,
    policies: sled::Tree,
    relationships: sled::Tree,
    deletions: sled::Tree,
    deletion_index: sled::Tree,
    meta: sled::Tree,
    /// Held while envelopes, the expiry index and heads are changed together
    /// (append, delete, expire), so a concurrent sweep never sees an expiry
    /// entry whose envelope is about to be written and drops it as stale.
    /// Holds the envelope count (see "Detecting a damaged store").
    mutation: Mutex<u64>,
    /// The last write epoch written into sled and when; the lock keeps
    /// epochs in sled in increasing order when several threads flush.
    epoch: Mutex<EpochState>,
    /// Held while a capability is registered, so two registrations cannot
    /// both pass the per-mailbox limit.
    capability_lock: Mutex<()>,
    /// Held while a device is registered, for the same reason.
    device_lock: Mutex<()>,
    /// Held while tokens and their index entries change, so a quota count
    /// and the write it admits, or a failed-attempt count and its update,
    /// are one step.
    token_lock: Mutex<()>,
    /// Held while a deletion record and its index entry change, so a
    /// cancellation and the start of a purge cannot both win.
    deletion_lock: Mutex<()>,
    /// `backbone.epoch` and the highest epoch recorded in it.
    epoch_file: Mutex<EpochFile>,
    #[cfg(test)]
    fail_points: FailPoints,
}

/// One raw record of the store, from [`SledStore::dump`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedRecord {
    /// The tree's name.
    pub tree: String,
    /// The raw key.
    pub key: Vec<u8>,
    /// The raw value.
    pub value: Vec<u8>,
}

/// The write epoch as last written into sled.
struct EpochState {
    last: u64,
    /// `None` until this process first writes it.
    written_at: Option<Instant>,
}

/// The file that records the highest write epoch known durable.
struct EpochFile {
    file: std::fs::File,
    recorded: u64,
}

/// Test-armed failures of sled writes (see "Fault injection").
#[cfg(test)]
#[derive(Default)]
struct FailPoints {
    /// Fail the write after this many more succeed.
    countdown: Mutex<Option<u32>>,
    /// Only fail at this fail point, if set.
    only: Mutex<Option<&'static str>>,
    /// Set when an armed failure fired; taken by [`SledStore::take_fired`].
    fired: Mutex<Option<&'static str>>,
    /// Every fail point passed, for the test that all are reachable.
    passed: Mutex<std::collections::BTreeSet<&'static str>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Corruption { .. } => StoreError::Corrupt {
                what: format!("sled reported corruption: {error}"),
            },
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in the directory `path`.
    ///
    /// sled runs in high-throughput mode with its periodic flush disabled:
    /// durability comes only from the explicit flushes of
    /// [`Store::append_batch`] and [`Store::flush`].
    ///
    /// If the directory's lock is held, opening retries for up to
    /// two seconds: sled 0.34 releases its file lock from a background
    /// thread some moments after the last handle is dropped
    /// (spacejam/sled#1234), so an immediate reopen in the same process (a
    /// restart in tests) would otherwise fail. A store held open by a live
    /// process still fails, with [`StoreError::Backend`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_lock_wait(path, LOCK_WAIT)
    }

    fn open_with_lock_wait(path: &Path, lock_wait: Duration) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let deadline = Instant::now() + lock_wait;
        let mut backoff = Duration::from_millis(5);
        let db = loop {
            match open_catching_panics(&config)? {
                Err(sled::Error::Io(error))
                    if is_lock_held(&error) && Instant::now() < deadline =>
                {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                result => break result?,
            }
        };
        let meta = db.open_tree("meta")?;
        let epoch = meta
            .get(EPOCH_KEY)?
            .map(|value| decode_u64(&value, "write epoch"))
            .transpose()?
            .unwrap_or(0);
        let (epoch_file, had_epoch_file) = open_epoch_file(&path.join(EPOCH_FILE), epoch)?;
        let envelopes = db.open_tree("envelopes")?;
        // Without an epoch file the store is new, from before these checks,
        // or an operator deleted the file to accept a damaged store's
        // surviving records: the count is taken afresh.
        let count = check_envelope_count(&envelopes, had_epoch_file)?;
        tracing::info!(envelopes = count, write_epoch = epoch, "store opened");
        let store = Self {
            path: path.to_owned(),
            envelopes,
            log_index: db.open_tree("log_index")?,
            expiry: db.open_tree("expiry")?,
            heads: db.open_tree("heads")?,
            cursors: db.open_tree("cursors")?,
            cards: db.open_tree("cards")?,
            devices: db.open_tree("devices")?,
            capabilities: db.open_tree("capabilities")?,
            tokens: db.open_tree("tokens")?,
            token_owners: db.open_tree("token_owners")?,
            token_expiry: db.open_tree("token_expiry")?,
            files: db.open_tree("files")?,
            file_owners: db.open_tree("file_owners")?,
            file_expiry: db.open_tree("file_expiry")?,
            policies: db.open_tree("policies")?,
            relationships: db.open_tree("relationships")?,
            deletions: db.open_tree("deletions")?,
            deletion_index: db.open_tree("deletion_index")?,
            meta,
            db,
            mutation: Mutex::new(count),
            epoch: Mutex::new(EpochState {
                last: epoch,
                written_at: None,
            }),
            capability_lock: Mutex::new(()),
            device_lock: Mutex::new(()),
            token_lock: Mutex::new(()),
            deletion_lock: Mutex::new(()),
            epoch_file: Mutex::new(epoch_file),
            #[cfg(test)]
            fail_points: FailPoints::default(),
        };
        // sled wrote its files without fsync: make what it recovered durable
        // before anything is built on it.
        store.sync_files()?;
        Ok(store)
    }

    /// Makes what sled has written durable: sled 0.34 ends its flushes with
    /// `sync_file_range`, which neither commits the metadata of newly
    /// allocated blocks nor flushes the drive's cache, and writes blob files
    /// (values too large for its segments) without any sync. So after a
    /// flush, its log file and every blob file are fdatasync'd, and the
    /// directories, so that new files are found after a power cut.
    fn sync_files(&self) -> Result<(), StoreError> {
        let io = |path: &Path, error: std::io::Error| {
            StoreError::Backend(format!("{}: {error}", path.display()))
        };
        self.fail_point("sync.files")?;
        for name in ["db", "conf"] {
            let file = self.path.join(name);
            if file.exists() {
                std::fs::File::open(&file)
                    .and_then(|file| file.sync_data())
                    .map_err(|error| io(&file, error))?;
            }
        }
        let blobs = self.path.join("blobs");
        if blobs.is_dir() {
            for entry in std::fs::read_dir(&blobs).map_err(|error| io(&blobs, error))? {
                let path = entry.map_err(|error| io(&blobs, error))?.path();
                std::fs::File::open(&path)
                    .and_then(|file| file.sync_data())
                    .map_err(|error| io(&path, error))?;
            }
            std::fs::File::open(&blobs)
                .and_then(|dir| dir.sync_all())
                .map_err(|error| io(&blobs, error))?;
        }
        std::fs::File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(|error| io(&self.path, error))
    }

    /// Legacy: the mailboxes with envelopes or a head in the trees of a data
    /// directory written before the mailbox log.
    pub fn legacy_mailboxes(&self) -> Result<Vec<Address>, StoreError> {
        let mut found = std::collections::BTreeSet::new();
        for tree in [&self.envelopes, &self.heads] {
            // Skip-scan from the first address (the count's empty key sorts
            // before it), reading one key per address.
            let mut next = Some([0u8; ADDRESS_LEN]);
            while let Some(start) = next {
                let Some(entry) = tree.range(start..).next() else {
                    break;
                };
                let (key, _) = entry?;
                let address: [u8; ADDRESS_LEN] = key
                    .get(..ADDRESS_LEN)
                    .and_then(|a| a.try_into().ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!("legacy key of {} bytes has no address", key.len()),
                    })?;
                found.insert(Address(address));
                next = successor(&address);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Legacy: a mailbox's envelopes, ascending, and its head, from the
    /// trees of a data directory written before the mailbox log.
    pub fn legacy_mailbox(
        &self,
        address: &Address,
    ) -> Result<(Vec<StoredEnvelope>, u64), StoreError> {
        let range = envelope_key(address, 0)..=envelope_key(address, u64::MAX);
        let envelopes = self
            .envelopes
            .range(range)
            .map(|entry| {
                let (key, value) = entry?;
                decode_envelope(&key, &value)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let top = envelopes.last().map_or(0, |envelope| envelope.seq);
        Ok((envelopes, self.stored_head(address)?.max(top)))
    }

    /// Legacy: removes a migrated mailbox's envelopes, index entries and
    /// head from the old trees. Not flushed.
    pub fn remove_legacy_mailbox(&self, address: &Address) -> Result<(), StoreError> {
        let mut count = self.lock_mutations();
        let range = envelope_key(address, 0)..=envelope_key(address, u64::MAX);
        let mut doomed = Vec::new();
        for entry in self.envelopes.range(range) {
            let (key, value) = entry?;
            let (_, seq) = split_envelope_key(&key)?;
            doomed.push((seq, envelope_expiry(&value)?));
        }
        if !doomed.is_empty() {
            self.fail_point("legacy.envelope")?;
            let keys = doomed.iter().map(|(seq, _)| envelope_key(address, *seq));
            self.remove_envelopes(&mut count, keys)?;
        }
        for (seq, expires_at_ms) in doomed {
            self.fail_point("legacy.expiry")?;
            self.expiry
                .remove(expiry_key(expires_at_ms, address, seq))?;
        }
        self.fail_point("legacy.head")?;
        self.heads.remove(address.0)?;
        Ok(())
    }

    /// Every record of every tree, default tree included: what a metadata
    /// audit compares against the documented list of stored fields (see
    /// `docs/security.md`). Reads everything.
    pub fn dump(&self) -> Result<Vec<DumpedRecord>, StoreError> {
        let mut records = Vec::new();
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            for entry in tree.iter() {
                let (key, value) = entry?;
                records.push(DumpedRecord {
                    tree: name.clone(),
                    key: key.to_vec(),
                    value: value.to_vec(),
                });
            }
        }
        Ok(records)
    }

    /// Removes every record of every tree, the server id included, as if
    /// the store had just been created, except the write epoch, which only
    /// grows (see "Detecting a damaged store"). Not flushed. The broker never
    /// calls it: it lets the `store_ops` fuzz target compare thousands of
    /// operation sequences a second with [`super::MemoryStore`] on one open
    /// store, where opening a fresh sled database takes milliseconds.
    pub fn clear(&self) -> Result<(), StoreError> {
        let mut count = self.lock_mutations();
        for tree in [
            &self.envelopes,
            &self.expiry,
            &self.heads,
            &self.log_index,
            &self.cursors,
            &self.cards,
            &self.devices,
            &self.capabilities,
            &self.tokens,
            &self.token_owners,
            &self.token_expiry,
            &self.files,
            &self.file_owners,
            &self.file_expiry,
            &self.policies,
            &self.relationships,
            &self.deletions,
            &self.deletion_index,
        ] {
            tree.clear()?;
        }
        for key in self.meta.iter().keys() {
            let key = key?;
            if key != EPOCH_KEY {
                self.meta.remove(key)?;
            }
        }
        *count = 0;
        Ok(())
    }

    /// Passes the fail point `site`: in test builds, fails if a test armed a
    /// failure that is due here.
    #[cfg_attr(not(test), allow(clippy::unused_self, unused_variables))]
    #[inline]
    fn fail_point(&self, site: &'static str) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let points = &self.fail_points;
            points.passed.lock().expect("fail points").insert(site);
            if points
                .only
                .lock()
                .expect("fail points")
                .is_some_and(|only| only != site)
            {
                return Ok(());
            }
            let mut countdown = points.countdown.lock().expect("fail points");
            match *countdown {
                Some(0) => {
                    *countdown = None;
                    *points.fired.lock().expect("fail points") = Some(site);
                    return Err(StoreError::Injected);
                }
                Some(n) => *countdown = Some(n - 1),
                None => {}
            }
        }
        Ok(())
    }

    /// Arms a failure: the write after `writes` more succeed fails, at any
    /// fail point or only at `only`.
    #[cfg(test)]
    pub(crate) fn fail_after(&self, writes: u32, only: Option<&'static str>) {
        *self.fail_points.only.lock().expect("fail points") = only;
        *self.fail_points.countdown.lock().expect("fail points") = Some(writes);
    }

    /// The fail point where an armed failure fired since the last call, if any.
    #[cfg(test)]
    pub(crate) fn take_fired(&self) -> Option<&'static str> {
        self.fail_points.fired.lock().expect("fail points").take()
    }

    /// Every fail point passed so far.
    #[cfg(test)]
    pub(crate) fn passed_fail_points(&self) -> std::collections::BTreeSet<&'static str> {
        self.fail_points.passed.lock().expect("fail points").clone()
    }

    /// Records `epoch` as durable in `backbone.epoch`, unless a higher one is.
    fn record_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let mut file = self
            .epoch_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if epoch <= file.recorded {
            return Ok(());
        }
        self.fail_point("epoch.file")?;
        write_epoch_slot(&file.file, epoch).map_err(|error| {
            StoreError::Backend(format!("cannot record the write epoch: {error}"))
        })?;
        file.recorded = epoch;
        Ok(())
    }

    fn lock_mutations(&self) -> MutexGuard<'_, u64> {
        // The lock guards no data of its own, so a panic while it was held
        // leaves nothing inconsistent behind it.
        self.mutation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stored_head(&self, address: &Address) -> Result<u64, StoreError> {
        self.heads
            .get(address.0)?
            .map(|value| decode_u64(&value, "mailbox head"))
            .transpose()
            .map(|head| head.unwrap_or(0))
    }

    /// Removes envelopes that exist, with the count, in one atomic batch.
    fn remove_envelopes(
        &self,
        count: &mut MutexGuard<'_, u64>,
        keys: impl Iterator<Item = [u8; ENVELOPE_KEY_LEN]>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut new_count = **count;
        for key in keys {
            batch.remove(&key[..]);
            new_count = new_count
                .checked_sub(1)
                .ok_or_else(|| StoreError::Corrupt {
                    what: "envelope count below zero".into(),
                })?;
        }
        batch.insert(COUNT_KEY, &new_count.to_be_bytes()[..]);
        self.envelopes.apply_batch(batch)?;
        **count = new_count;
        Ok(())
    }

    fn lock_tokens(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data of its own (see `lock_mutations`).
        self.token_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The file record `id`, expired or not.
    fn stored_file(&self, id: &FileId) -> Result<Option<StoredFile>, StoreError> {
        self.files
            .get(id.0)?
            .map(|value| decode(&value, "file"))
            .transpose()
    }

    /// Writes a file record with its index entries, the entries first (see
    /// "Crash ordering").
    fn write_file(&self, file: &StoredFile) -> Result<(), StoreError> {
        self.fail_point("file.expiry")?;
        self.file_expiry.insert(
            expiry_id_key(file.expires_at_ms, &file.id.0, &file.owner),
            &[][..],
        )?;
        self.fail_point("file.owner")?;
        self.file_owners.insert(
            pair_key(&file.owner, &file.id.0),
            &file.expires_at_ms.to_be_bytes()[..],
        )?;
        self.fail_point("file")?;
        self.files.insert(file.id.0, encode(file)?)?;
        Ok(())
    }

    /// Removes a file record and then its index entries.
    fn remove_file(&self, file: &StoredFile) -> Result<(), StoreError> {
        self.fail_point("file.remove")?;
        self.files.remove(file.id.0)?;
        self.fail_point("file.remove.owner")?;
        self.file_owners.remove(pair_key(&file.owner, &file.id.0))?;
        self.fail_point("file.remove.expiry")?;
        self.file_expiry
            .remove(expiry_id_key(file.expires_at_ms, &file.id.0, &file.owner))?;
        Ok(())
    }

    /// The ids in `owner`'s file index, with the expiry each entry records.
    fn file_entries(&self, owner: &Address) -> Result<Vec<(FileId, u64)>, StoreError> {
        let entries = owner_entries(&self.file_owners, owner, "file owner")?;
        Ok(entries
            .into_iter()
            .map(|(id, at)| (FileId(id), at))
            .collect())
    }

    /// The stored token `id`, expired or not.
    fn stored_token(&self, id: &TokenId) -> Result<Option<StoredToken>, StoreError> {
        self.tokens
            .get(id.0)?
            .map(|value| decode(&value, "token"))
            .transpose()
    }

    /// Writes a token with its index entries, the entries first (see
    /// "Crash ordering").
    fn write_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let expiry = token_expiry_key(token.expires_at_ms, &token.id, &token.owner);
        self.fail_point("token.expiry")?;
        self.token_expiry.insert(expiry, &[][..])?;
        self.fail_point("token.owner")?;
        self.token_owners.insert(
            pair_key(&token.owner, &token.id.0),
            &token.expires_at_ms.to_be_bytes()[..],
        )?;
        self.fail_point("token")?;
        self.tokens.insert(token.id.0, encode(token)?)?;
        Ok(())
    }

    /// Removes a token and then its index entries (see "Crash ordering").
    fn remove_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        self.fail_point("token.remove")?;
        self.tokens.remove(token.id.0)?;
        self.fail_point("token.remove.owner")?;
        self.token_owners
            .remove(pair_key(&token.owner, &token.id.0))?;
        self.fail_point("token.remove.expiry")?;
        self.token_expiry.remove(token_expiry_key(
            token.expires_at_ms,
            &token.id,
            &token.owner,
        ))?;
        Ok(())
    }

    /// The ids in `owner`'s token index, with the expiry time each entry records.
    fn token_entries(&self, owner: &Address) -> Result<Vec<(TokenId, u64)>, StoreError> {
        let entries = owner_entries(&self.token_owners, owner, "token owner")?;
        Ok(entries
            .into_iter()
            .map(|(id, at)| (TokenId(id), at))
            .collect())
    }

    fn lock_deletions(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data of its own (see `lock_mutations`).
        self.deletion_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the deletion record of `address` (held: `held`) with
    /// `record`, keeping the index in step: a new index entry before the
    /// record, a stale one removed after it (see "Crash ordering").
    fn write_deletion(
        &self,
        address: &Address,
        held: Option<&Deletion>,
        record: &Deletion,
    ) -> Result<(), StoreError> {
        let old_due = held.and_then(Deletion::due_at_ms);
        let new_due = record.due_at_ms();
        if let Some(due) = new_due
            && old_due != Some(due)
        {
            self.fail_point("deletion.index")?;
            self.deletion_index
                .insert(deletion_index_key(due, address), &[][..])?;
        }
        let value = encode(record)?;
        self.fail_point("deletion")?;
        self.deletions.insert(address.0, value)?;
        if let Some(due) = old_due
            && new_due != Some(due)
        {
            self.fail_point("deletion.unindex")?;
            self.deletion_index
                .remove(deletion_index_key(due, address))?;
        }
        Ok(())
    }

    /// Removes the deletion record of `address` (held: `held`), then its
    /// index entry.
    fn delete_deletion(&self, address: &Address, held: &Deletion) -> Result<(), StoreError> {
        self.fail_point("deletion.remove")?;
        self.deletions.remove(address.0)?;
        if let Some(due) = held.due_at_ms() {
            self.fail_point("deletion.unindex")?;
            self.deletion_index
                .remove(deletion_index_key(due, address))?;
        }
        Ok(())
    }
}

impl CursorStore for SledStore {
    fn cursor(&self, address: &Address, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.cursors
            .get(pair_key(address, &device.0))?
            .map(|value| decode_u64(&value, "cursor"))
            .transpose()
    }

    fn set_cursor(&self, address: &Address, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        let mut corrupt = false;
        self.fail_point("cursor")?;
        self.cursors
            .fetch_and_update(pair_key(address, &device.0), |old| {
                let merged = match old.map(|value| decode_u64(value, "cursor")) {
                    None => seq,
                    Some(Ok(existing)) => existing.max(seq),
                    Some(Err(_)) => {
                        corrupt = true;
                        return old.map(<[u8]>::to_vec);
                    }
                };
                corrupt = false;
                Some(merged.to_be_bytes().to_vec())
            })?;
        if corrupt {
            return Err(StoreError::Corrupt {
                what: "cursor: not a u64".into(),
            });
        }
        Ok(())
    }
}

impl CardStore for SledStore {
    fn put_card(&self, card: &IdentityCard) -> Result<(), StoreError> {
        self.fail_point("card")?;
        self.cards.insert(card.address().0, encode(card)?)?;
        Ok(())
    }

    fn card(&self, address: &Address) -> Result<Option<IdentityCard>, StoreError> {
        self.cards
            .get(address.0)?
            .map(|value| decode(&value, "identity card"))
            .transpose()
    }
}

impl DeviceStore for SledStore {
    fn put_device(
        &self,
        address: &Address,
        cert: &DeviceCertificate,
        max: usize,
    ) -> Result<bool, StoreError> {
        // The lock guards no data of its own (see `lock_mutations`).
        let _registering = self
            .device_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = pair_key(address, &cert.device_key.device_id().0);
        if !self.devices.contains_key(key)? {
            // At most `max` keys are read: the limit bounds the scan.
            let mut held = 0;
            for entry in self.devices.scan_prefix(address.0).take(max) {
                entry?;
                held += 1;
            }
            if held >= max {
                return Ok(false);
            }
        }
        self.fail_point("device")?;
        self.devices.insert(key, encode(cert)?)?;
        Ok(true)
    }

    fn remove_device(&self, address: &Address, device: &DeviceId) -> Result<bool, StoreError> {
        let key = pair_key(address, &device.0);
        // The certificate first: a crash before the cursor goes leaves a
        // cursor without a device, which lets nothing in.
        self.fail_point("device.remove")?;
        let existed = self.devices.remove(key)?.is_some();
        self.fail_point("device.remove.cursor")?;
        self.cursors.remove(key)?;
        Ok(existed)
    }

    fn devices(&self, address: &Address) -> Result<Vec<DeviceCertificate>, StoreError> {
        self.devices
            .scan_prefix(address.0)
            .map(|entry| decode(&entry?.1, "device certificate"))
            .collect()
    }

    fn device(
        &self,
        address: &Address,
        device: &DeviceId,
    ) -> Result<Option<DeviceCertificate>, StoreError> {
        self.devices
            .get(pair_key(address, &device.0))?
            .map(|value| decode(&value, "device certificate"))
            .transpose()
    }
}

impl CapabilityStore for SledStore {
    fn register_capability(
        &self,
        address: &Address,
        hash: &CapabilityHash,
        max: usize,
    ) -> Result<bool, StoreError> {
        // The lock guards no data of its own (see `lock_mutations`).
        let _registering = self
            .capability_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = pair_key(address, &hash.0);
        if self.capabilities.contains_key(key)? {
            return Ok(true);
        }
        // At most `max` keys are read: the limit bounds the scan.
        let mut held = 0;
        for entry in self.capabilities.scan_prefix(address.0) {
            entry?;
            held += 1;
            if held >= max {
                return Ok(false);
            }
        }
        if max == 0 {
            return Ok(false);
        }
        self.fail_point("capability.register")?;
        self.capabilities.insert(key, &[][..])?;
        Ok(true)
    }

    fn revoke_capability(
        &self,
        address: &Address,
        hash: &CapabilityHash,
    ) -> Result<bool, StoreError> {
        self.fail_point("capability.revoke")?;
        Ok(self
            .capabilities
            .remove(pair_key(address, &hash.0))?
            .is_some())
    }

    fn has_capability(&self, address: &Address, hash: &CapabilityHash) -> Result<bool, StoreError> {
        Ok(self.capabilities.contains_key(pair_key(address, &hash.0))?)
    }

    fn capabilities(&self, address: &Address) -> Result<Vec<CapabilityHash>, StoreError> {
        self.capabilities
            .scan_prefix(address.0)
            .map(|entry| {
                let (key, _) = entry?;
                key.get(ADDRESS_LEN..)
                    .and_then(|hash| hash.try_into().ok())
                    .map(CapabilityHash)
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!("capability key of {} bytes", key.len()),
                    })
            })
            .collect()
    }
}

impl TokenStore for SledStore {
    fn put_token(&self, token: &StoredToken, max: usize, now_ms: u64) -> Result<bool, StoreError> {
        let _tokens = self.lock_tokens();
        // At most `max` live entries are counted: the limit bounds the scan.
        let mut held = 0;
        for entry in self.token_owners.scan_prefix(token.owner.0) {
            let (key, value) = entry?;
            if key.get(ADDRESS_LEN..) == Some(&token.id.0[..])
                || decode_u64(&value, "token owner entry")? <= now_ms
            {
                continue;
            }
            held += 1;
            if held >= max {
                return Ok(false);
            }
        }
        if max == 0 {
            return Ok(false);
        }
        self.write_token(token)?;
        Ok(true)
    }

    fn token(&self, id: &TokenId, now_ms: u64) -> Result<Option<StoredToken>, StoreError> {
        Ok(self
            .stored_token(id)?
            .filter(|token| token.expires_at_ms > now_ms))
    }

    fn attempt_token(
        &self,
        id: &TokenId,
        verifier: &VerifierHash,
        max_attempts: u32,
        now_ms: u64,
    ) -> Result<TokenAttempt, StoreError> {
        let _tokens = self.lock_tokens();
        let Some(mut token) = self.token(id, now_ms)? else {
            return Ok(TokenAttempt::Missing);
        };
        let attempt = token.attempt(verifier, max_attempts);
        if matches!(attempt, TokenAttempt::Refused { .. }) {
            self.fail_point("token.attempt")?;
            self.tokens.insert(id.0, encode(&token)?)?;
        }
        Ok(attempt)
    }

    fn delete_token(&self, owner: &Address, id: &TokenId) -> Result<bool, StoreError> {
        let _tokens = self.lock_tokens();
        match self.stored_token(id)? {
            Some(token) if token.owner == *owner => {
                self.remove_token(&token)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn expire_tokens(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let _tokens = self.lock_tokens();
        // Every index key with expires_at_ms <= now_ms sorts below the 8-byte
        // prefix now_ms + 1.
        let due = match now_ms.checked_add(1) {
            Some(bound) => self.token_expiry.range(..bound.to_be_bytes()),
            None => self.token_expiry.iter(),
        };
        let mut doomed = Vec::new();
        let mut stale = Vec::new();
        for entry in due {
            let (index_key, _) = entry?;
            let (expires_at_ms, id, owner) = split_token_expiry_key(&index_key)?;
            match self.stored_token(&id)? {
                Some(token) if token.expires_at_ms == expires_at_ms => doomed.push(token),
                // A stale entry (see "Crash ordering") is dropped without counting it.
                held => stale.push((index_key, owner, id, held.is_none())),
            }
            if doomed.len() == limit {
                break;
            }
        }
        for token in &doomed {
            self.remove_token(token)?;
        }
        for (index_key, owner, id, token_missing) in stale {
            if token_missing {
                self.fail_point("token.stale.owner")?;
                self.token_owners.remove(pair_key(&owner, &id.0))?;
            }
            self.fail_point("token.stale.expiry")?;
            self.token_expiry.remove(&index_key)?;
        }
        Ok(doomed.len())
    }
}

impl FileStore for SledStore {
    fn put_file(
        &self,
        file: &StoredFile,
        quota: FileQuota,
        now_ms: u64,
    ) -> Result<FilePut, StoreError> {
        // The token lock also serialises file quota checks with their writes.
        let _files = self.lock_tokens();
        let mut held = Vec::new();
        for (id, expires_at_ms) in self.file_entries(&file.owner)? {
            if id == file.id || expires_at_ms <= now_ms {
                continue;
            }
            if let Some(record) = self.stored_file(&id)? {
                held.push(record);
            }
        }
        let outcome = quota.admits(&held, file);
        if outcome == FilePut::Stored {
            if let Some(old) = self.stored_file(&file.id)? {
                self.remove_file(&old)?;
            }
            self.write_file(file)?;
        }
        Ok(outcome)
    }

    fn file(&self, id: &FileId, now_ms: u64) -> Result<Option<StoredFile>, StoreError> {
        Ok(self
            .stored_file(id)?
            .filter(|file| file.expires_at_ms > now_ms))
    }

    fn complete_file(&self, id: &FileId) -> Result<bool, StoreError> {
        let _files = self.lock_tokens();
        let Some(mut file) = self.stored_file(id)? else {
            return Ok(false);
        };
        file.complete = true;
        self.fail_point("file.complete")?;
        self.files.insert(id.0, encode(&file)?)?;
        Ok(true)
    }

    fn delete_file(&self, owner: &Address, id: &FileId) -> Result<bool, StoreError> {
        let _files = self.lock_tokens();
        match self.stored_file(id)? {
            Some(file) if file.owner == *owner => {
                self.remove_file(&file)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn files_of(&self, owner: &Address) -> Result<Vec<StoredFile>, StoreError> {
        let mut files = Vec::new();
        for (id, _) in self.file_entries(owner)? {
            if let Some(file) = self.stored_file(&id)?.filter(|file| file.owner == *owner) {
                files.push(file);
            }
        }
        Ok(files)
    }

    fn file_exists(&self, id: &FileId) -> Result<bool, StoreError> {
        Ok(self.files.contains_key(id.0)?)
    }

    fn expire_files(&self, now_ms: u64, limit: usize) -> Result<Vec<FileId>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let _files = self.lock_tokens();
        let due = match now_ms.checked_add(1) {
            Some(bound) => self.file_expiry.range(..bound.to_be_bytes()),
            None => self.file_expiry.iter(),
        };
        let mut doomed = Vec::new();
        let mut stale = Vec::new();
        for entry in due {
            let (index_key, _) = entry?;
            let (expires_at_ms, id, owner) = split_expiry_id_key(&index_key, "file expiry key")?;
            let id = FileId(id);
            match self.stored_file(&id)? {
                Some(file) if file.expires_at_ms == expires_at_ms => doomed.push(file),
                held => stale.push((index_key, owner, id, held.is_none())),
            }
            if doomed.len() == limit {
                break;
            }
        }
        for file in &doomed {
            self.remove_file(file)?;
        }
        for (index_key, owner, id, file_missing) in stale {
            if file_missing {
                self.fail_point("file.stale.owner")?;
                self.file_owners.remove(pair_key(&owner, &id.0))?;
            }
            self.fail_point("file.stale.expiry")?;
            self.file_expiry.remove(&index_key)?;
        }
        Ok(doomed.into_iter().map(|file| file.id).collect())
    }
}

impl ConsentStore for SledStore {
    fn inbound_policy(&self, address: &Address) -> Result<Option<InboundPolicy>, StoreError> {
        self.policies
            .get(address.0)?
            .map(|value| decode_policy(&value))
            .transpose()
    }

    fn set_inbound_policy(
        &self,
        address: &Address,
        policy: InboundPolicy,
    ) -> Result<(), StoreError> {
        self.fail_point("policy")?;
        self.policies
            .insert(address.0, &[encode_policy(policy)][..])?;
        Ok(())
    }

    fn relationships(&self, address: &Address) -> Result<Vec<Relationship>, StoreError> {
        self.relationships
            .scan_prefix(address.0)
            .map(|entry| decode(&entry?.1, "relationship"))
            .collect()
    }

    fn put_relationship(
        &self,
        address: &Address,
        relationship: &Relationship,
    ) -> Result<(), StoreError> {
        let value = encode(relationship)?;
        self.fail_point("relationship")?;
        self.relationships
            .insert(pair_key(address, &relationship.peer.0), value)?;
        Ok(())
    }
}

impl DeletionStore for SledStore {
    fn deletion(&self, address: &Address) -> Result<Option<Deletion>, StoreError> {
        self.deletions
            .get(address.0)?
            .map(|value| decode(&value, "deletion"))
            .transpose()
    }

    fn schedule_deletion(
        &self,
        address: &Address,
        purge_at_ms: u64,
    ) -> Result<Deletion, StoreError> {
        let _deletions = self.lock_deletions();
        if let Some(held) = self.deletion(address)? {
            return Ok(held);
        }
        let record = Deletion::Scheduled { purge_at_ms };
        self.write_deletion(address, None, &record)?;
        Ok(record)
    }

    fn cancel_deletion(&self, address: &Address) -> Result<bool, StoreError> {
        let _deletions = self.lock_deletions();
        match self.deletion(address)? {
            Some(held @ Deletion::Scheduled { .. }) => {
                self.delete_deletion(address, &held)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn begin_purge(
        &self,
        address: &Address,
        now_ms: u64,
        to_tell: &[PeerToTell],
    ) -> Result<Option<Deletion>, StoreError> {
        let _deletions = self.lock_deletions();
        match self.deletion(address)? {
            Some(held @ Deletion::Scheduled { purge_at_ms }) if purge_at_ms <= now_ms => {
                let record = Deletion::Purging {
                    purge_at_ms,
                    to_tell: to_tell.to_vec(),
                };
                self.write_deletion(address, Some(&held), &record)?;
                Ok(Some(record))
            }
            Some(held) if held.is_tombstone() => Ok(Some(held)),
            _ => Ok(None),
        }
    }

    fn settle_purge(
        &self,
        address: &Address,
        still_to_tell: &[PeerToTell],
    ) -> Result<(), StoreError> {
        let _deletions = self.lock_deletions();
        if let Some(held @ Deletion::Purging { purge_at_ms, .. }) = self.deletion(address)? {
            let record = if still_to_tell.is_empty() {
                Deletion::Deleted
            } else {
                Deletion::Purging {
                    purge_at_ms,
                    to_tell: still_to_tell.to_vec(),
                }
            };
            self.write_deletion(address, Some(&held), &record)?;
        }
        Ok(())
    }

    fn due_deletions(&self, now_ms: u64, limit: usize) -> Result<Vec<Address>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let _deletions = self.lock_deletions();
        // Every index key with due_at_ms <= now_ms sorts below the 8-byte
        // prefix now_ms + 1.
        let due = match now_ms.checked_add(1) {
            Some(bound) => self.deletion_index.range(..bound.to_be_bytes()),
            None => self.deletion_index.iter(),
        };
        let mut found = Vec::new();
        let mut stale = Vec::new();
        for entry in due {
            let (key, _) = entry?;
            let (due_at_ms, address) = split_deletion_index_key(&key)?;
            match self.deletion(&address)? {
                Some(held) if held.due_at_ms() == Some(due_at_ms) => found.push(address),
                // A stale entry (see "Crash ordering").
                _ => stale.push(key),
            }
            if found.len() == limit {
                break;
            }
        }
        for key in stale {
            self.fail_point("deletion.unindex")?;
            self.deletion_index.remove(key)?;
        }
        Ok(found)
    }

    fn remove_deletion(&self, address: &Address) -> Result<(), StoreError> {
        let _deletions = self.lock_deletions();
        if let Some(held) = self.deletion(address)? {
            self.delete_deletion(address, &held)?;
        }
        Ok(())
    }
}

impl MetaStore for SledStore {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(meta_key(key))?.map(|value| value.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.fail_point("meta")?;
        self.meta.insert(meta_key(key), value)?;
        Ok(())
    }

    fn server_id(&self) -> Result<ServerId, StoreError> {
        if let Some(value) = self.meta.get(SERVER_ID_KEY)? {
            return decode_server_id(&value);
        }
        let fresh = ServerId::random();
        // Compare-and-swap so two first callers agree on one id.
        self.fail_point("server_id")?;
        match self
            .meta
            .compare_and_swap(SERVER_ID_KEY, None::<&[u8]>, Some(&fresh.0[..]))?
        {
            Ok(()) => {
                // The id is bound into auth signatures; it must not change
                // after a crash, so make it durable before handing it out.
                self.sync()?;
                Ok(fresh)
            }
            Err(raced) => match raced.current {
                Some(value) => decode_server_id(&value),
                None => Err(StoreError::Corrupt {
                    what: "server id vanished".into(),
                }),
            },
        }
    }
}

impl Directory for SledStore {
    fn addresses(&self, filter: &dyn Fn(&Address) -> bool) -> Result<Vec<Address>, StoreError> {
        let mut all = std::collections::BTreeSet::new();
        for tree in [
            &self.log_index,
            &self.cursors,
            &self.cards,
            &self.devices,
            &self.capabilities,
            &self.token_owners,
            &self.file_owners,
            &self.policies,
            &self.relationships,
            &self.deletions,
        ] {
            // Skip-scan: read one key, then seek past every key of its address.
            let mut next = Some([0u8; ADDRESS_LEN]);
            while let Some(start) = next {
                let Some(entry) = tree.range(start..).next() else {
                    break;
                };
                let (key, _) = entry?;
                let address = Address(
                    key.get(..ADDRESS_LEN)
                        .and_then(|a| a.try_into().ok())
                        .ok_or_else(|| StoreError::Corrupt {
                            what: format!("key of {} bytes has no address", key.len()),
                        })?,
                );
                if filter(&address) {
                    all.insert(address);
                }
                next = successor(&address.0);
            }
        }
        Ok(all.into_iter().collect())
    }

    fn export_directory(&self, address: &Address) -> Result<MailboxExport, StoreError> {
        let mut cursors = Vec::new();
        for entry in self.cursors.scan_prefix(address.0) {
            let (key, value) = entry?;
            let device =
                DeviceId(
                    key[ADDRESS_LEN..]
                        .try_into()
                        .map_err(|_| StoreError::Corrupt {
                            what: "cursor key".into(),
                        })?,
                );
            cursors.push((device, decode_u64(&value, "cursor")?));
        }
        let devices = self.devices(address)?;
        Ok(MailboxExport {
            address: *address,
            // The log's half: filled in by `store::export_mailbox`.
            head: 0,
            envelopes: Vec::new(),
            cursors,
            card: self.card(address)?,
            devices,
            capabilities: self.capabilities(address)?,
            tokens: self
                .token_entries(address)?
                .into_iter()
                .map(|(id, _)| self.stored_token(&id))
                .filter_map(Result::transpose)
                .collect::<Result<Vec<_>, StoreError>>()?,
            policy: self.inbound_policy(address)?,
            relationships: self.relationships(address)?,
            deletion: self.deletion(address)?,
        })
    }

    fn import_directory(&self, export: &MailboxExport) -> Result<(), StoreError> {
        let address = &export.address;
        for (device, seq) in &export.cursors {
            self.set_cursor(address, device, *seq)?;
        }
        if let Some(card) = &export.card {
            self.put_card(card)?;
        }
        // No limit: the previous owner applied it.
        for cert in &export.devices {
            self.put_device(address, cert, usize::MAX)?;
        }
        for hash in &export.capabilities {
            self.fail_point("import.capability")?;
            self.capabilities
                .insert(pair_key(address, &hash.0), &[][..])?;
        }
        let _tokens = self.lock_tokens();
        for token in &export.tokens {
            let merged = merge_token(self.stored_token(&token.id)?.as_ref(), token);
            self.write_token(&merged)?;
        }
        if let Some(policy) = export.policy {
            self.fail_point("import.policy")?;
            self.policies
                .insert(address.0, &[encode_policy(policy)][..])?;
        }
        for relationship in &export.relationships {
            let value = encode(relationship)?;
            self.fail_point("import.relationship")?;
            self.relationships
                .insert(pair_key(address, &relationship.peer.0), value)?;
        }
        if let Some(incoming) = &export.deletion {
            let _deletions = self.lock_deletions();
            let held = self.deletion(address)?;
            let merged = deletion::merge(held.as_ref(), incoming);
            if held.as_ref() != Some(&merged) {
                self.write_deletion(address, held.as_ref(), &merged)?;
            }
        }
        Ok(())
    }

    fn purge_directory(&self, address: &Address) -> Result<(), StoreError> {
        {
            let _tokens = self.lock_tokens();
            for (id, _) in self.token_entries(address)? {
                match self.stored_token(&id)? {
                    Some(token) if token.owner == *address => self.remove_token(&token)?,
                    // An owner entry a crash left without its token.
                    _ => {
                        self.fail_point("token.stale.owner")?;
                        self.token_owners.remove(pair_key(address, &id.0))?;
                    }
                }
            }
        }
        {
            let _files = self.lock_tokens();
            for (id, _) in self.file_entries(address)? {
                match self.stored_file(&id)? {
                    Some(file) if file.owner == *address => self.remove_file(&file)?,
                    _ => {
                        self.fail_point("file.stale.owner")?;
                        self.file_owners.remove(pair_key(address, &id.0))?;
                    }
                }
            }
        }
        for tree in [
            &self.cursors,
            &self.devices,
            &self.capabilities,
            &self.relationships,
        ] {
            for entry in tree.scan_prefix(address.0) {
                self.fail_point("purge.pair")?;
                tree.remove(entry?.0)?;
            }
        }
        self.fail_point("purge.card")?;
        self.cards.remove(address.0)?;
        self.fail_point("purge.policy")?;
        self.policies.remove(address.0)?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        // The epoch goes into sled at most every EPOCH_INTERVAL: a write per
        // flush would cost every sync a page update.
        self.flush_with_epoch(false)?;
        self.sync_files()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// The meta key of the position the log's index checkpoint covers.
const LOG_CHECKPOINT_KEY: &[u8] = b"log_checkpoint";

impl Checkpoints for SledStore {
    fn load_checkpoint(&self, visit: &mut Visit<'_>) -> Result<Option<u64>, StoreError> {
        let Some(position) = self.meta.get(LOG_CHECKPOINT_KEY)? else {
            return Ok(None);
        };
        for entry in self.log_index.iter() {
            let (key, value) = entry?;
            let address = Address(key.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                what: format!("log index key of {} bytes", key.len()),
            })?);
            visit(address, &value)?;
        }
        Ok(Some(decode_u64(&position, "log checkpoint position")?))
    }

    fn checkpointed(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.log_index.get(address.0)?.map(|value| value.to_vec()))
    }

    fn write_checkpoint(
        &self,
        mailboxes: &[(Address, Option<Vec<u8>>)],
        position: u64,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (address, value) in mailboxes {
            match value {
                Some(value) => batch.insert(&address.0[..], value.as_slice()),
                None => batch.remove(&address.0[..]),
            }
        }
        self.fail_point("checkpoint.index")?;
        self.log_index.apply_batch(batch)?;
        // The values durable before the position that says they cover it.
        self.sync()?;
        self.fail_point("checkpoint.position")?;
        self.meta
            .insert(LOG_CHECKPOINT_KEY, &position.to_be_bytes()[..])?;
        self.sync()
    }
}

impl Drop for SledStore {
    /// A store closed cleanly records its final epoch, so the last writes
    /// before a shutdown are covered by the damage check too.
    fn drop(&mut self) {
        if let Err(error) = self.flush_with_epoch(true) {
            tracing::warn!(%error, "final flush of the store failed");
        }
    }
}

impl SledStore {
    /// [`Store::flush`], writing the write epoch first when it is due (or
    /// when `force`d).
    fn flush_with_epoch(&self, force: bool) -> Result<(), StoreError> {
        let epoch = {
            let mut state = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
            let due = force
                || state
                    .written_at
                    .is_none_or(|at| at.elapsed() >= EPOCH_INTERVAL);
            if due {
                self.fail_point("epoch")?;
                self.meta
                    .insert(EPOCH_KEY, &(state.last + 1).to_be_bytes()[..])?;
                state.last += 1;
                state.written_at = Some(Instant::now());
            }
            due.then_some(state.last)
        };
        let started = Instant::now();
        self.fail_point("flush")?;
        let result = self.db.flush();
        metrics::histogram!("backbone_store_flush_seconds").record(started.elapsed().as_secs_f64());
        result?;
        // Everything written before this flush began is durable, the epoch
        // above included.
        match epoch {
            Some(epoch) => self.record_epoch(epoch),
            None => Ok(()),
        }
    }
}

/// Opens sled, turning a panic into [`StoreError::Damaged`]: sled 0.34 panics
/// instead of returning an error on some damaged data files (for example
/// "tried to serialize Uninitialized" while rebuilding its snapshot).
fn open_catching_panics(config: &sled::Config) -> Result<sled::Result<sled::Db>, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        StoreError::Damaged {
            what: format!(
                "sled could not recover its data files ({message}); restore the store from a backup"
            ),
        }
    })
}

/// Counts the envelope tree's keys and compares them with its recorded count
/// (see "Detecting a damaged store"); returns the count. Unless `enforce`,
/// or if the tree has no count yet, the tree's count is recorded as found.
fn check_envelope_count(envelopes: &sled::Tree, enforce: bool) -> Result<u64, StoreError> {
    let recorded = envelopes
        .get(COUNT_KEY)?
        .map(|value| decode_u64(&value, "envelope count"))
        .transpose()?;
    let mut counted = 0u64;
    for key in envelopes.iter().keys() {
        if key?.len() == ENVELOPE_KEY_LEN {
            counted += 1;
        }
    }
    match recorded {
        Some(recorded) if recorded != counted && enforce => Err(StoreError::Damaged {
            what: format!(
                "the envelope tree records {recorded} envelopes but holds {counted}: part of \
                 it is missing or was altered, most likely because a data file is damaged. \
                 Restore the store from a backup; to serve only what survived instead, keep \
                 a copy of the directory and delete {EPOCH_FILE} in it"
            ),
        }),
        Some(recorded) if recorded == counted => Ok(counted),
        // A new store (a first start is routine, not worth a warning), or
        // one whose legacy envelopes were all migrated into the log:
        // envelopes live there, and the legacy tree stays empty without a
        // count.
        None if counted == 0 => Ok(counted),
        // A store from before the count and the epoch file existed: there
        // is nothing to compare with, so the count found becomes the count.
        None if !enforce => {
            tracing::info!(
                counted,
                "recording the envelope count found in a store from before the count was kept"
            );
            envelopes.insert(COUNT_KEY, &counted.to_be_bytes()[..])?;
            Ok(counted)
        }
        // What the warning is for: the recorded count disagrees with the
        // envelopes found, and it is accepted only because the epoch file
        // is gone (an operator deleted it to serve what survived damage, as
        // `StoreError::Damaged` tells them to); or a store that keeps an
        // epoch file has lost its count.
        _ => {
            tracing::warn!(
                counted,
                ?recorded,
                "recording the envelope count found in the store, which disagrees with the \
                 count it had recorded: envelopes may have been lost to damage"
            );
            envelopes.insert(COUNT_KEY, &counted.to_be_bytes()[..])?;
            Ok(counted)
        }
    }
}

/// Opens `backbone.epoch` and checks the store against it: a store whose
/// write epoch is below the recorded one has lost confirmed writes. A missing
/// file is created (a new store, or one from before this check existed).
/// Also returns whether the file held an epoch.
fn open_epoch_file(path: &Path, store_epoch: u64) -> Result<(EpochFile, bool), StoreError> {
    let backend = |error: std::io::Error| {
        StoreError::Backend(format!("cannot use {}: {error}", path.display()))
    };
    let existing = match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(backend(error)),
    };
    let recorded = match existing.as_deref() {
        // Created but never written (a crash right after creating it).
        None | Some([]) => None,
        Some(bytes) => Some(read_epoch_slots(bytes).ok_or_else(|| StoreError::Damaged {
            what: format!(
                "{} has no valid write epoch; if the store itself is intact, delete that file",
                path.display()
            ),
        })?),
    };
    if let Some(recorded) = recorded
        && recorded > store_epoch
    {
        return Err(StoreError::Damaged {
            what: format!(
                "the store's write epoch is {store_epoch}, but flushes up to epoch {recorded} had \
                 completed: writes confirmed durable are missing, most likely because a data \
                 file is damaged (sled ignores everything after a record that fails its \
                 checksum). Restore the store from a backup; to serve only what survived \
                 instead, keep a copy of the directory and delete {}",
                path.display()
            ),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(backend)?;
    // Nothing is written here: the epoch sled shows right after recovery may
    // come from writes that were never flushed (they reached the file but
    // not durably), and sled may legitimately lose them after the next
    // crash. Only an epoch a completed flush covered is ever recorded.
    let had_epoch = existing.is_some_and(|bytes| !bytes.is_empty());
    let epoch_file = EpochFile {
        file,
        recorded: recorded.unwrap_or(0),
    };
    Ok((epoch_file, had_epoch))
}

/// Writes `epoch` into its slot (slots alternate by parity).
fn write_epoch_slot(file: &std::fs::File, epoch: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut slot = [0u8; EPOCH_SLOT_LEN];
    slot[..8].copy_from_slice(EPOCH_MAGIC);
    slot[8..16].copy_from_slice(&epoch.to_be_bytes());
    let check = blake3::hash(&slot[..16]);
    slot[16..].copy_from_slice(&check.as_bytes()[..16]);
    file.write_all_at(&slot, (epoch % 2) * EPOCH_SLOT_LEN as u64)
}

/// The highest epoch in a valid slot of `bytes`.
fn read_epoch_slots(bytes: &[u8]) -> Option<u64> {
    bytes
        .chunks_exact(EPOCH_SLOT_LEN)
        .take(2)
        .filter(|slot| {
            slot[..8] == EPOCH_MAGIC[..] && blake3::hash(&slot[..16]).as_bytes()[..16] == slot[16..]
        })
        .map(|slot| u64::from_be_bytes(slot[8..16].try_into().expect("8 bytes")))
        .max()
}

/// Whether sled failed to open because another handle holds the directory's
/// lock. sled 0.34 reports it as an `Other` I/O error with this message.
fn is_lock_held(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock
        || error.to_string().contains("could not acquire lock")
}

/// The smallest 32-byte key greater than every key starting with `prefix`,
/// `None` after the last address.
fn successor(prefix: &[u8; ADDRESS_LEN]) -> Option<[u8; ADDRESS_LEN]> {
    let mut next = *prefix;
    for byte in next.iter_mut().rev() {
        if *byte == u8::MAX {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(next);
        }
    }
    None
}

fn encode_policy(policy: InboundPolicy) -> u8 {
    match policy {
        InboundPolicy::Anyone => 0,
        InboundPolicy::RelationshipsOnly => 1,
    }
}

fn decode_policy(value: &[u8]) -> Result<InboundPolicy, StoreError> {
    match value {
        [0] => Ok(InboundPolicy::Anyone),
        [1] => Ok(InboundPolicy::RelationshipsOnly),
        other => Err(StoreError::Corrupt {
            what: format!("inbound policy record {other:?}"),
        }),
    }
}

/// Node-level values live in `meta` under `"node/" ‖ key`, apart from the server id.
fn meta_key(key: &str) -> Vec<u8> {
    [b"node/".as_slice(), key.as_bytes()].concat()
}

fn envelope_key(address: &Address, seq: u64) -> [u8; ENVELOPE_KEY_LEN] {
    let mut key = [0u8; ENVELOPE_KEY_LEN];
    key[..ADDRESS_LEN].copy_from_slice(&address.0);
    key[ADDRESS_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn split_envelope_key(key: &[u8]) -> Result<(Address, u64), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("envelope key of {} bytes", key.len()),
    };
    let (address, seq) = key.split_at_checked(ADDRESS_LEN).ok_or_else(corrupt)?;
    let address: [u8; ADDRESS_LEN] = address.try_into().map_err(|_| corrupt())?;
    let seq: [u8; SEQ_LEN] = seq.try_into().map_err(|_| corrupt())?;
    Ok((Address(address), u64::from_be_bytes(seq)))
}

fn expiry_key(expires_at_ms: u64, address: &Address, seq: u64) -> [u8; EXPIRY_KEY_LEN] {
    let mut key = [0u8; EXPIRY_KEY_LEN];
    key[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    key[8..].copy_from_slice(&envelope_key(address, seq));
    key
}

fn split_expiry_key(key: &[u8]) -> Result<(u64, Address, u64), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("expiry key of {} bytes", key.len()),
    };
    if key.len() != EXPIRY_KEY_LEN {
        return Err(corrupt());
    }
    let (expires_at_ms, rest) = key.split_at(8);
    let (address, seq) = split_envelope_key(rest)?;
    Ok((decode_u64(expires_at_ms, "expiry key")?, address, seq))
}

fn token_expiry_key(expires_at_ms: u64, id: &TokenId, owner: &Address) -> [u8; ID_EXPIRY_KEY_LEN] {
    expiry_id_key(expires_at_ms, &id.0, owner)
}

fn split_token_expiry_key(key: &[u8]) -> Result<(u64, TokenId, Address), StoreError> {
    let (expires_at_ms, id, owner) = split_expiry_id_key(key, "token expiry key")?;
    Ok((expires_at_ms, TokenId(id), owner))
}

/// The entries of an owner index (`owner ‖ id(32)` → `expires_at_ms`, the
/// token and file owner trees) under `owner`: each id with its expiry.
fn owner_entries(
    tree: &sled::Tree,
    owner: &Address,
    what: &str,
) -> Result<Vec<([u8; 32], u64)>, StoreError> {
    tree.scan_prefix(owner.0)
        .map(|entry| {
            let (key, value) = entry?;
            let id = key
                .get(ADDRESS_LEN..)
                .and_then(|id| id.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("{what} key of {} bytes", key.len()),
                })?;
            let expires_at_ms = value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                what: format!("{what} entry: {} bytes, not 8", value.len()),
            })?;
            Ok((id, u64::from_be_bytes(expires_at_ms)))
        })
        .collect()
}

/// `expires_at_ms(u64 BE) ‖ id(32) ‖ owner(32)`: a token or file expiry
/// index key.
fn expiry_id_key(expires_at_ms: u64, id: &[u8; 32], owner: &Address) -> [u8; ID_EXPIRY_KEY_LEN] {
    let mut key = [0u8; ID_EXPIRY_KEY_LEN];
    key[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    key[8..40].copy_from_slice(id);
    key[40..].copy_from_slice(&owner.0);
    key
}

fn split_expiry_id_key(key: &[u8], what: &str) -> Result<(u64, [u8; 32], Address), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("{what} of {} bytes", key.len()),
    };
    if key.len() != ID_EXPIRY_KEY_LEN {
        return Err(corrupt());
    }
    let (expires_at_ms, rest) = key.split_at(8);
    let (id, owner) = rest.split_at(32);
    Ok((
        decode_u64(expires_at_ms, what)?,
        id.try_into().map_err(|_| corrupt())?,
        Address(owner.try_into().map_err(|_| corrupt())?),
    ))
}

fn deletion_index_key(due_at_ms: u64, address: &Address) -> [u8; DELETION_INDEX_KEY_LEN] {
    let mut key = [0u8; DELETION_INDEX_KEY_LEN];
    key[..8].copy_from_slice(&due_at_ms.to_be_bytes());
    key[8..].copy_from_slice(&address.0);
    key
}

fn split_deletion_index_key(key: &[u8]) -> Result<(u64, Address), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("deletion index key of {} bytes", key.len()),
    };
    if key.len() != DELETION_INDEX_KEY_LEN {
        return Err(corrupt());
    }
    let (due_at_ms, address) = key.split_at(8);
    Ok((
        decode_u64(due_at_ms, "deletion index key")?,
        Address(address.try_into().map_err(|_| corrupt())?),
    ))
}

fn pair_key(address: &Address, device: &[u8; 32]) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..ADDRESS_LEN].copy_from_slice(&address.0);
    key[ADDRESS_LEN..].copy_from_slice(device);
    key
}

fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what: format!("{what}: {} bytes, not 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_server_id(bytes: &[u8]) -> Result<ServerId, StoreError> {
    let bytes: [u8; ServerId::LEN] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what: format!("server id of {} bytes", bytes.len()),
    })?;
    Ok(ServerId(bytes))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    encode_value(value).map_err(|error| StoreError::Encode(error.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    decode_value(bytes).map_err(|error| StoreError::Corrupt {
        what: format!("{what}: {error}"),
    })
}

fn encode_envelope(envelope: &StoredEnvelope) -> Result<Vec<u8>, StoreError> {
    let mut value = envelope.expires_at_ms.to_be_bytes().to_vec();
    value.extend_from_slice(&encode(envelope)?);
    Ok(value)
}

/// The expiry time copied in front of an envelope value.
fn envelope_expiry(value: &[u8]) -> Result<u64, StoreError> {
    match value.get(..8) {
        Some(prefix) => decode_u64(prefix, "envelope expiry"),
        None => Err(StoreError::Corrupt {
            what: format!("envelope value of {} bytes", value.len()),
        }),
    }
}

fn decode_envelope(key: &[u8], value: &[u8]) -> Result<StoredEnvelope, StoreError> {
    let (_, seq) = split_envelope_key(key)?;
    // Read first: it checks the value holds the 8 bytes the slice below skips.
    let expires_at_ms = envelope_expiry(value)?;
    let envelope: StoredEnvelope = decode(&value[8..], "envelope")?;
    if envelope.seq != seq || envelope.expires_at_ms != expires_at_ms {
        return Err(StoreError::Corrupt {
            what: format!("envelope under seq {seq} disagrees with its key or expiry prefix"),
        });
    }
    Ok(envelope)
}

#[cfg(test)]
pub(super) mod tests {

    use backbone_protocol::Keypair;
    use backbone_protocol::bytes::{EncryptionKey, MessageId};

    use super::*;

    fn envelope(seq: u64, expires_at_ms: u64) -> StoredEnvelope {
        StoredEnvelope {
            seq,
            message_id: MessageId([seq as u8; 16]),
            sender: Some(Address([0xaa; 32])),
            stored_at_ms: 1,
            expires_at_ms,
            envelope: vec![seq as u8; 100].into(),
        }
    }

    /// Writes envelopes (and a head) the way a store from before the
    /// mailbox log held them, through the legacy layout's own helpers.
    pub(in crate::store) fn write_legacy(
        store: &SledStore,
        address: &Address,
        envelopes: &[StoredEnvelope],
        head: Option<u64>,
    ) {
        let mut count = store.lock_mutations();
        for envelope in envelopes {
            store
                .expiry
                .insert(
                    expiry_key(envelope.expires_at_ms, address, envelope.seq),
                    &[][..],
                )
                .expect("expiry");
            store
                .envelopes
                .insert(
                    envelope_key(address, envelope.seq),
                    encode_envelope(envelope).expect("encodes"),
                )
                .expect("envelope");
            *count += 1;
        }
        store
            .envelopes
            .insert(COUNT_KEY, &count.to_be_bytes()[..])
            .expect("count");
        if let Some(head) = head {
            store
                .heads
                .insert(address.0, &head.to_be_bytes()[..])
                .expect("head");
        }
    }

    #[test]
    fn sled_store_keeps_everything_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Address([1; 32]);
        let identity = Keypair::from_secret_bytes([2; 32]);
        let card = IdentityCard::sign(&identity, EncryptionKey([3; 32]), 4);
        let device_key = Keypair::from_secret_bytes([5; 32]).public();
        let cert = DeviceCertificate::issue(&identity, device_key, 6);
        let device = device_key.device_id();

        let store = SledStore::open(dir.path()).expect("open");
        let server_id = store.server_id().expect("server id");
        store.set_cursor(&a, &device, 2).expect("cursor");
        store.put_card(&card).expect("card");
        assert_eq!(store.put_device(&identity.address(), &cert, 10), Ok(true));
        store
            .write_checkpoint(&[(a, Some(vec![1, 2, 3]))], 77)
            .expect("checkpoint");
        store.sync().expect("sync");
        drop(store);

        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.server_id(), Ok(server_id));
        assert_eq!(store.cursor(&a, &device), Ok(Some(2)));
        assert_eq!(store.card(&identity.address()), Ok(Some(card)));
        assert_eq!(store.device(&identity.address(), &device), Ok(Some(cert)));
        assert_eq!(store.checkpointed(&a), Ok(Some(vec![1, 2, 3])));
        let mut seen = Vec::new();
        assert_eq!(
            store.load_checkpoint(&mut |address, bytes| {
                seen.push((address, bytes.to_vec()));
                Ok(())
            }),
            Ok(Some(77))
        );
        assert_eq!(seen, vec![(a, vec![1, 2, 3])]);
        assert!(store.size_on_disk().expect("size") > 0);

        // A removal, once synced, survives the next restart too: the
        // device is gone with its cursor, a forgotten mailbox's checkpoint
        // value too.
        let owner = identity.address();
        store.set_cursor(&owner, &device, 3).expect("cursor");
        assert_eq!(store.remove_device(&owner, &device), Ok(true));
        store
            .write_checkpoint(&[(a, None)], 78)
            .expect("checkpoint");
        store.sync().expect("sync");
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.device(&owner, &device), Ok(None));
        assert_eq!(store.cursor(&owner, &device), Ok(None));
        assert_eq!(store.devices(&owner), Ok(vec![]));
        assert_eq!(store.checkpointed(&a), Ok(None));
    }

    #[test]
    fn a_cleared_store_is_empty_and_reopens_with_a_consistent_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Address([1; 32]);
        let store = SledStore::open(dir.path()).expect("open");
        let server_id = store.server_id().expect("server id");
        write_legacy(&store, &a, &[envelope(1, 1_000)], Some(3));
        store.put_meta("handoff", b"done").expect("meta");
        store.clear().expect("clear");
        assert_eq!(store.legacy_mailboxes(), Ok(vec![]));
        assert_eq!(store.meta("handoff"), Ok(None));
        assert_ne!(store.server_id(), Ok(server_id));
        write_legacy(&store, &a, &[envelope(1, 1_000)], None);
        drop(store);
        // The envelope count restarted with the tree, so the damage check on
        // open (which compares it with the keys) passes.
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.legacy_mailboxes(), Ok(vec![a]));
    }

    #[test]
    fn legacy_mailboxes_read_with_their_heads_and_leave_when_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let (a, b, c) = (Address([1; 32]), Address([2; 32]), Address([3; 32]));
        write_legacy(&store, &a, &[envelope(2, 10), envelope(5, 20)], None);
        // Every envelope of b was deleted: only its head record is left.
        write_legacy(&store, &b, &[], Some(9));
        write_legacy(&store, &c, &[envelope(1, 10)], Some(4));
        assert_eq!(store.legacy_mailboxes(), Ok(vec![a, b, c]));
        assert_eq!(
            store.legacy_mailbox(&a),
            Ok((vec![envelope(2, 10), envelope(5, 20)], 5))
        );
        assert_eq!(store.legacy_mailbox(&b), Ok((vec![], 9)));
        assert_eq!(store.legacy_mailbox(&c), Ok((vec![envelope(1, 10)], 4)));
        store.remove_legacy_mailbox(&a).expect("removes");
        store.remove_legacy_mailbox(&b).expect("removes");
        assert_eq!(store.legacy_mailboxes(), Ok(vec![c]));
        drop(store);
        // The count stayed consistent with the tree.
        let store = SledStore::open(dir.path()).expect("reopen");
        store.remove_legacy_mailbox(&c).expect("removes");
        assert_eq!(store.legacy_mailboxes(), Ok(vec![]));
        assert_eq!(store.expiry.len(), 0, "the expiry entries went too");
    }

    #[test]
    fn sled_store_reports_corrupt_records_as_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = Address([1; 32]);
        let device = DeviceId([2; 32]);
        store
            .cursors
            .insert(pair_key(&a, &device.0), &[1][..])
            .expect("insert");
        store.cards.insert(a.0, &[9; 5][..]).expect("insert");
        store
            .meta
            .insert(SERVER_ID_KEY, &[1; 3][..])
            .expect("insert");
        store
            .meta
            .insert(LOG_CHECKPOINT_KEY, &[1; 3][..])
            .expect("insert");
        assert!(matches!(
            store.cursor(&a, &device),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.set_cursor(&a, &device, 5),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(store.card(&a), Err(StoreError::Corrupt { .. })));
        assert!(matches!(store.server_id(), Err(StoreError::Corrupt { .. })));
        assert!(matches!(
            store.load_checkpoint(&mut |_, _| Ok(())),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_legacy_envelope_value_shorter_than_its_expiry_prefix_is_corrupt() {
        // Found by the stored_records fuzz target: reading envelopes without
        // their expiry first, a value of fewer than 8 bytes panicked instead
        // of being reported.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = Address([1; 32]);
        store
            .envelopes
            .insert(envelope_key(&a, 1), &[1, 2, 3][..])
            .expect("insert");
        assert!(matches!(
            store.legacy_mailbox(&a),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.remove_legacy_mailbox(&a),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn sled_store_refuses_a_second_open_of_the_same_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _store = SledStore::open(dir.path()).expect("open");
        assert!(matches!(
            SledStore::open_with_lock_wait(dir.path(), Duration::from_millis(20)),
            Err(StoreError::Backend(_))
        ));
    }
}

#[cfg(test)]
mod fault_tests {
    //! Fail points on every write and flush, and detection of a damaged store.

    use backbone_protocol::Keypair;
    use backbone_protocol::bytes::RelationshipId;
    use backbone_protocol::bytes::{EncryptionKey, MessageId, PasswordVerifier};
    use backbone_protocol::relationship::{Role, State};

    use super::*;

    fn envelope(seq: u64, expires_at_ms: u64) -> StoredEnvelope {
        StoredEnvelope {
            seq,
            message_id: MessageId([seq as u8; 16]),
            sender: None,
            stored_at_ms: 1,
            expires_at_ms,
            envelope: vec![seq as u8; 1024].into(),
        }
    }

    fn token(n: u8, owner: Address, expires_at_ms: u64) -> StoredToken {
        StoredToken {
            id: TokenId([n; 32]),
            owner,
            created_at_ms: 1,
            expires_at_ms,
            content: vec![n; 64],
            verifier_hash: None,
            failed_attempts: 0,
            locked: false,
        }
    }

    fn relationship(peer: Address, state: State) -> Relationship {
        Relationship {
            id: RelationshipId([4; 16]),
            peer,
            role: Role::Owner,
            state,
            changed_at_ms: 7,
        }
    }

    fn stored_file(n: u8, owner: Address, expires_at_ms: u64) -> StoredFile {
        StoredFile {
            id: FileId([n; 32]),
            owner,
            size: 100,
            content_hash: backbone_protocol::bytes::ContentHash([n; 32]),
            secret_hash: backbone_protocol::bytes::FileSecretHash([n; 32]),
            expires_at_ms,
            complete: false,
        }
    }

    /// Calls every writing method so that every fail point is passed; stops
    /// at the first error and returns it.
    fn workload(store: &SledStore) -> Result<(), StoreError> {
        let (a, b) = (Address([1; 32]), Address([2; 32]));
        let identity = Keypair::from_secret_bytes([2; 32]);
        let device_key = Keypair::from_secret_bytes([5; 32]).public();
        store.server_id()?;
        store.set_cursor(&a, &device_key.device_id(), 2)?;
        store.put_card(&IdentityCard::sign(&identity, EncryptionKey([3; 32]), 4))?;
        store.put_device(&b, &DeviceCertificate::issue(&identity, device_key, 6), 10)?;
        let removed = Keypair::from_secret_bytes([6; 32]).public();
        store.put_device(&b, &DeviceCertificate::issue(&identity, removed, 6), 10)?;
        store.remove_device(&b, &removed.device_id())?;
        // A mailbox migrated from the old layout.
        super::tests::write_legacy(store, &a, &[envelope(1, 100)], Some(3));
        store.remove_legacy_mailbox(&a)?;
        store.write_checkpoint(&[(a, Some(vec![1])), (b, None)], 10)?;
        store.import_directory(&MailboxExport {
            address: b,
            head: 9,
            envelopes: vec![envelope(1, 2_000), envelope(2, 2_000)],
            cursors: vec![(device_key.device_id(), 1)],
            card: None,
            devices: vec![],
            capabilities: vec![CapabilityHash([8; 32])],
            tokens: vec![token(1, b, 5_000)],
            policy: Some(InboundPolicy::RelationshipsOnly),
            relationships: vec![relationship(a, State::Active)],
            deletion: Some(Deletion::Scheduled { purge_at_ms: 400 }),
        })?;
        store.register_capability(&a, &CapabilityHash([7; 32]), 10)?;
        store.set_inbound_policy(&a, InboundPolicy::RelationshipsOnly)?;
        store.put_relationship(&a, &relationship(b, State::Pending))?;
        store.revoke_capability(&a, &CapabilityHash([7; 32]))?;
        let mut protected = token(2, a, 5_000);
        protected.verifier_hash = Some(PasswordVerifier([1; 32]).hash());
        store.put_token(&protected, 10, 0)?;
        store.attempt_token(&protected.id, &PasswordVerifier([2; 32]).hash(), 5, 0)?;
        store.put_token(&token(3, a, 200), 10, 0)?;
        store.delete_token(&a, &protected.id)?;
        // Index entries a crash left without their token.
        let lost = TokenId([4; 32]);
        store
            .token_expiry
            .insert(token_expiry_key(210, &lost, &a), &[][..])?;
        store
            .token_owners
            .insert(pair_key(&a, &lost.0), &210u64.to_be_bytes()[..])?;
        store.expire_tokens(300, 10)?;
        let quota = FileQuota {
            max_files: 10,
            max_bytes: 1 << 20,
        };
        store.put_file(&stored_file(1, a, 5_000), quota, 0)?;
        store.complete_file(&FileId([1; 32]))?;
        store.put_file(&stored_file(2, a, 200), quota, 0)?;
        store.put_file(&stored_file(3, b, 5_000), quota, 0)?;
        store.delete_file(&a, &FileId([1; 32]))?;
        // Index entries a crash left without their file.
        let lost = [4u8; 32];
        store
            .file_expiry
            .insert(expiry_id_key(210, &lost, &a), &[][..])?;
        store
            .file_owners
            .insert(pair_key(&a, &lost), &210u64.to_be_bytes()[..])?;
        store.expire_files(300, 10)?;
        store.put_card(&IdentityCard::sign(
            &Keypair::from_secret_bytes([9; 32]),
            EncryptionKey([3; 32]),
            4,
        ))?;
        store.set_cursor(&b, &device_key.device_id(), 2)?;
        // A deletion scheduled and cancelled, one purged to its tombstone,
        // and an index entry a crash left without its record.
        let c = Address([3; 32]);
        store.schedule_deletion(&c, 500)?;
        store.cancel_deletion(&c)?;
        store
            .deletion_index
            .insert(deletion_index_key(450, &c), &[][..])?;
        store.due_deletions(450, 10)?;
        let to_tell = [PeerToTell {
            peer: a,
            relationship: RelationshipId([4; 16]),
        }];
        store.begin_purge(&b, 450, &to_tell)?;
        store.purge_directory(&b)?;
        store.settle_purge(&b, &[])?;
        store.remove_deletion(&b)?;
        store.put_meta("progress", b"1")?;
        store.sync()
    }

    #[test]
    fn every_write_and_flush_passes_a_fail_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        workload(&store).expect("workload without faults");
        let passed = store.passed_fail_points();
        let all: std::collections::BTreeSet<&str> = FAIL_POINTS.iter().copied().collect();
        assert_eq!(
            passed, all,
            "the workload passes exactly the listed fail points"
        );
    }

    /// For each fail point, a failure there is reported to the caller (never
    /// swallowed), and after a restart the store opens, keeps every
    /// acknowledged append, and works.
    #[test]
    fn a_failure_at_any_fail_point_is_reported_and_leaves_a_working_store() {
        for &site in FAIL_POINTS {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SledStore::open(dir.path()).expect("open");
            store.fail_after(0, Some(site));
            let outcome = workload(&store);
            assert_eq!(outcome, Err(StoreError::Injected), "at {site}");
            assert_eq!(store.take_fired(), Some(site));
            drop(store);

            let store = SledStore::open(dir.path())
                .unwrap_or_else(|error| panic!("reopen after a failure at {site}: {error}"));
            let (a, device) = (Address([1; 32]), DeviceId([9; 32]));
            store
                .set_cursor(&a, &device, 7)
                .and_then(|()| store.sync())
                .unwrap_or_else(|error| panic!("a write after a failure at {site}: {error}"));
            assert_eq!(store.cursor(&a, &device), Ok(Some(7)));
            workload(&store).unwrap_or_else(|error| panic!("workload after {site}: {error}"));
        }
    }

    /// Flips 16 bytes at one offset of sled's data file.
    fn damage(dir: &Path, offset: u64) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("db"))
            .expect("open sled's data file");
        let mut bytes = [0u8; 16];
        file.read_exact_at(&mut bytes, offset).expect("read");
        for byte in &mut bytes {
            *byte ^= 0xff;
        }
        file.write_all_at(&bytes, offset).expect("write");
    }

    fn copy_dir(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_dir() {
                std::fs::create_dir_all(to.join(entry.file_name())).expect("mkdir");
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
            }
        }
    }

    /// The device ids of the damage test's records.
    fn device(n: u64) -> DeviceId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&n.to_be_bytes());
        DeviceId(id)
    }

    /// Every cursor the damage test wrote that reads back as written; one
    /// that reads back as anything else but absent fails the test.
    fn cursors(store: &SledStore, a: &Address) -> Result<u64, StoreError> {
        let mut intact = 0;
        for n in 1..=RECORDS {
            match store.cursor(a, &device(n))? {
                Some(seq) if seq == n => intact += 1,
                None => {}
                Some(other) => panic!("cursor {n} altered to {other}"),
            }
        }
        Ok(intact)
    }

    const RECORDS: u64 = 3_000;

    /// sled alone silently serves what precedes a damaged record. With the
    /// write epoch, damage to the data file mostly stops the open with
    /// `Damaged`; what is served is never altered, but sled may skip a
    /// damaged page and serve the rest without one record (a limit of the
    /// directory store, documented in `docs/operations.md`; envelopes are in
    /// the checksummed log, where the start refuses such damage).
    #[test]
    fn a_damaged_data_file_is_refused_at_open_never_served_altered() {
        let pristine = tempfile::tempdir().expect("tempdir");
        let a = Address([1; 32]);
        {
            let store = SledStore::open(pristine.path()).expect("open");
            for first in (1..=RECORDS).step_by(50) {
                for n in first..first + 50 {
                    store.set_cursor(&a, &device(n), n).expect("cursor");
                }
                store.sync().expect("sync");
            }
        }
        let len = std::fs::metadata(pristine.path().join("db"))
            .expect("db file")
            .len();
        let (mut refused, mut intact, mut lost) = (0, 0, 0);
        for step in 1..32 {
            let offset = len * step / 32;
            let dir = tempfile::tempdir().expect("tempdir");
            copy_dir(pristine.path(), dir.path());
            damage(dir.path(), offset);
            match SledStore::open(dir.path()) {
                Err(StoreError::Damaged { what }) => {
                    assert!(
                        what.contains("write epoch")
                            || what.contains("could not recover")
                            || what.contains("envelope tree records"),
                        "{what}"
                    );
                    refused += 1;
                    if !what.contains("could not recover") {
                        // The documented override: without the epoch file the
                        // store opens and serves what survived.
                        std::fs::remove_file(dir.path().join(EPOCH_FILE)).expect("remove");
                        let store = SledStore::open(dir.path()).expect("accepted damage");
                        match cursors(&store, &a) {
                            Ok(survivors) => assert!(survivors <= RECORDS),
                            Err(error) => assert!(matches!(error, StoreError::Corrupt { .. })),
                        }
                        drop(store);
                        SledStore::open(dir.path()).expect("and again after that");
                    }
                }
                // sled itself may notice, for example in its header.
                Err(StoreError::Corrupt { .. }) => refused += 1,
                Err(other) => panic!("damage at {offset} gave {other}"),
                Ok(store) => {
                    match cursors(&store, &a) {
                        Ok(stored) if stored == RECORDS => intact += 1,
                        Ok(stored) => {
                            eprintln!(
                                "damage at {offset} of {len} lost {} records",
                                RECORDS - stored
                            );
                            lost += 1;
                        }
                        // A damaged record found while reading is an error, not a loss.
                        Err(StoreError::Corrupt { .. }) => refused += 1,
                        Err(other) => panic!("reading after damage at {offset}: {other}"),
                    }
                }
            }
        }
        eprintln!("damaged copies: {refused} refused, {intact} intact, {lost} silently short");
        // Without the check, most of these offsets lose data silently (sled
        // truncates its log at the damaged record); the test must see that.
        assert!(
            refused >= 8 && lost <= refused / 4,
            "{refused} of 31 damaged copies refused ({intact} intact, {lost} silently short)"
        );
    }

    #[test]
    fn the_epoch_file_survives_a_torn_slot_and_rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Address([1; 32]);
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.set_cursor(&a, &device(1), 1).expect("cursor");
            store.sync().expect("sync");
            store.set_cursor(&a, &device(2), 2).expect("cursor");
            store.sync().expect("sync");
        }
        let path = dir.path().join(EPOCH_FILE);
        let mut bytes = std::fs::read(&path).expect("epoch file");
        assert_eq!(bytes.len(), 2 * EPOCH_SLOT_LEN);
        // Tear one slot: the other still holds a valid, lower epoch.
        bytes[EPOCH_SLOT_LEN + 20] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let store = SledStore::open(dir.path()).expect("one valid slot is enough");
        assert_eq!(store.cursor(&a, &device(2)), Ok(Some(2)));
        drop(store);
        std::fs::write(&path, [7u8; 64]).expect("write");
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Damaged { .. })
        ));
    }
}
