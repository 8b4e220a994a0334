//! Target `store_ops`: the input is a sequence of storage operations, each
//! applied to the broker's `MemoryStore` (the reference model, log and
//! directory in one) and to its on-disk stores (the mailbox log, `LogStore`,
//! with the `SledStore` directory holding its checkpoints), and every result
//! compared.
//!
//! The operations cover the mailbox log and the directory: appends, reads, usage,
//! heads, cursors, deletes and expiry of envelopes; cards and device
//! certificates; capability hashes with their per-mailbox limit; tokens
//! (create with the per-owner limit, fetch, password attempts with locking,
//! delete, expiry); file records (create with the quota, fetch, complete,
//! delete, list, expiry); inbound policies; relationships; identity
//! deletion (schedule, cancel, purge begun and settled, the due list);
//! mailbox export, import (of the mailbox's own export, at once and after
//! later operations) and purge; node meta values; flushes. A few
//! addresses, ids and small numbers make operations meet each other, and a
//! clock that only moves forward makes things expire.
//!
//! Operations follow the contract the broker keeps as a caller: sequence
//! numbers are assigned as a mailbox actor assigns them (one above the
//! head), token and file ids are fresh (the broker draws them at random),
//! cards and certificates are genuinely signed. Within that, every result
//! must be equal in both stores, and at the end of the input so must every
//! mailbox's export, every token and file, the due deletions and the list of
//! addresses. Importing a mailbox's own export must change nothing (the
//! trait promises imports are idempotent).
//!
//! The sled store is opened once per process in a temporary directory (in
//! `/dev/shm` where it exists, so flushes cost no disk writes) and cleared
//! before each input with `SledStore::clear`; opening sled for every input
//! would cost milliseconds. The log is opened afresh for each input in a
//! directory of its own beside it (a fresh log is cheap: one small
//! segment file and two threads).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use backbone_broker::store::both::Both;
use backbone_broker::store::log::{LogConfig, LogStore};
use backbone_broker::store::{
    Append, FileQuota, MailboxExport, MailboxLog, MemoryStore, SledStore, StoreError,
    StoredEnvelope, StoredFile, StoredToken,
};
use backbone_protocol::bytes::{
    CapabilityHash, ContentHash, EncryptionKey, FileId, FileSecret, MessageId, PasswordVerifier,
    RelationshipId, TokenId,
};
use backbone_protocol::deletion::PeerToTell;
use backbone_protocol::relationship::{InboundPolicy, Relationship, Role, State};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard, Keypair};

/// Identities (mailboxes) the operations use.
const IDENTITIES: usize = 4;
/// Device keys per identity.
const DEVICES: usize = 2;
/// Distinct token ids and file ids.
const IDS: u8 = 8;
/// Where the clock starts: far enough from zero that expiry times below
/// "now" and TTLs of zero are both reachable.
const START_MS: u64 = 1_000_000;

/// Signed material for the identities, made once per process: signing is
/// the slowest thing an operation would otherwise do.
struct Fixtures {
    addresses: Vec<Address>,
    /// Two cards per identity (created at 1 and 2).
    cards: Vec<[IdentityCard; 2]>,
    /// `DEVICES` certificates per identity.
    certificates: Vec<Vec<DeviceCertificate>>,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let identities: Vec<Keypair> = (0..IDENTITIES)
            .map(|i| Keypair::from_secret_bytes([0x10 + i as u8; 32]))
            .collect();
        Fixtures {
            addresses: identities.iter().map(Keypair::address).collect(),
            cards: identities
                .iter()
                .map(|key| {
                    [1, 2].map(|at| IdentityCard::sign(key, EncryptionKey([at as u8; 32]), at))
                })
                .collect(),
            certificates: identities
                .iter()
                .enumerate()
                .map(|(i, key)| {
                    (0..DEVICES)
                        .map(|d| {
                            let device =
                                Keypair::from_secret_bytes([0x40 + (i * DEVICES + d) as u8; 32]);
                            DeviceCertificate::issue(key, device.public(), 7)
                        })
                        .collect()
                })
                .collect(),
        }
    })
}

/// The process's sled store and the scratch directory it lives under.
fn sled() -> &'static Mutex<(Arc<SledStore>, PathBuf)> {
    static SLED: OnceLock<Mutex<(Arc<SledStore>, PathBuf)>> = OnceLock::new();
    SLED.get_or_init(|| {
        let directory = scratch_directory();
        let store = SledStore::open(&directory.join("store")).expect("open the sled store");
        Mutex::new((Arc::new(store), directory))
    })
}

/// A directory for this process's sled store: `backbone-fuzz-store-<pid>`
/// under `/dev/shm` (or the temporary directory). libFuzzer ends a process
/// without running destructors, so directories of processes that are gone
/// are removed here instead.
fn scratch_directory() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    const PREFIX: &str = "backbone-fuzz-store-";
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|name| name.strip_prefix(PREFIX)) else {
                continue;
            };
            if !PathBuf::from("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let directory = base.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("create the sled store's directory");
    directory
}

/// Reads the input a byte at a time; an input that runs out ends.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    fn below(&mut self, bound: usize) -> Option<usize> {
        Some(usize::from(self.byte()?) % bound)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
}

/// The two stores under comparison and what the input has used so far.
struct Pair<'a> {
    memory: MemoryStore,
    sled: &'a SledStore,
    log: LogStore,
    now_ms: u64,
    /// Token and file ids created, so each is created once.
    token_ids: BTreeSet<u8>,
    file_ids: BTreeSet<u8>,
    /// Exports taken, to import again later.
    saved: Vec<MailboxExport>,
    /// Operations applied, for the failure messages.
    operations: usize,
}

impl Pair<'_> {
    /// Runs `call` on both stores and asserts the results are equal.
    fn both<T: PartialEq + Debug>(
        &mut self,
        what: &str,
        call: impl Fn(Both<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let expected = call(Both {
            log: &self.memory,
            dir: &self.memory,
        });
        let got = call(Both {
            log: &self.log,
            dir: self.sled,
        });
        assert_eq!(
            got, expected,
            "operation {} ({what}): the sled store (left) differs from the memory store (right)",
            self.operations
        );
        got
    }
}

fn address(i: usize) -> Address {
    fixtures().addresses[i]
}

fn token_id(n: u8) -> TokenId {
    TokenId([0x80 + n; 32])
}

fn file_id(n: u8) -> FileId {
    FileId([0x90 + n; 32])
}

/// Target `store_ops`: see the module documentation.
pub fn store_ops_target(data: &[u8]) {
    run_store_ops(data);
}

/// Applies the operations `data` describes to both stores and compares
/// them; returns how many operations ran.
pub fn run_store_ops(data: &[u8]) -> usize {
    let held = sled().lock().unwrap_or_else(|poisoned| {
        // A failed assertion in an earlier input (the replay driver goes
        // on after one) poisons the lock; the store is cleared anyway.
        poisoned.into_inner()
    });
    let mut pair = fresh_pair(&held);
    let mut input = Input(data);
    while operation(&mut pair, &mut input).is_some() {
        pair.operations += 1;
    }
    compare_everything(&mut pair);
    let operations = pair.operations;
    pair.log.close().expect("close the log");
    operations
}

/// Both stores emptied: the sled directory cleared, a new log on it.
fn fresh_pair(held: &(Arc<SledStore>, PathBuf)) -> Pair<'_> {
    let (sled, scratch) = (&held.0, &held.1);
    sled.clear().expect("clear the sled store");
    let log_dir = scratch.join("log");
    let _ = std::fs::remove_dir_all(&log_dir);
    let config = LogConfig {
        dir: log_dir,
        // Small segments: an input of a few dozen appends rolls over to
        // new segments (reads and exports then cross segment ends), and
        // a fresh log preallocates 4 KiB instead of 1 MiB (which was a
        // tenth of the target's time).
        segment_bytes: 4096,
        compact_below: 0.5,
        checkpoint_interval: std::time::Duration::from_secs(3600),
        // Durability is the power-loss test's; this target checks logic.
        no_sync: true,
    };
    let (log, _) = LogStore::open(config, sled.clone(), START_MS).expect("open the log");
    Pair {
        memory: MemoryStore::new(),
        sled,
        log,
        now_ms: START_MS,
        token_ids: BTreeSet::new(),
        file_ids: BTreeSet::new(),
        saved: Vec::new(),
        operations: 0,
    }
}

/// Applies one operation; `None` when the input ran out.
fn operation(pair: &mut Pair<'_>, input: &mut Input<'_>) -> Option<()> {
    let fixtures = fixtures();
    let op = input.byte()?;
    match op % 32 {
        0 => {
            let count = 1 + input.below(4)?;
            let mut next: Vec<u64> = Vec::new();
            for i in 0..IDENTITIES {
                next.push(MailboxLog::head_seq(&pair.memory, &address(i)).expect("memory") + 1);
            }
            let mut items = Vec::new();
            for _ in 0..count {
                let mailbox = input.below(IDENTITIES)?;
                let ttl_ms = u64::from(input.byte()?) * 16;
                let len = input.below(16)?;
                let sender = input.below(IDENTITIES + 1)?;
                let seq = next[mailbox];
                next[mailbox] += 1;
                items.push(Append {
                    address: address(mailbox),
                    envelope: Arc::new(StoredEnvelope {
                        seq,
                        message_id: MessageId([seq as u8; 16]),
                        sender: (sender < IDENTITIES).then(|| address(sender)),
                        stored_at_ms: pair.now_ms,
                        expires_at_ms: pair.now_ms + ttl_ms,
                        envelope: vec![len as u8; len].into(),
                    }),
                });
            }
            pair.both("append_batch", |s| s.append_batch(&items)).ok();
        }
        1 => {
            let a = address(input.below(IDENTITIES)?);
            let from = u64::from(input.byte()? % 16);
            let limit = input.below(8)?;
            let now = pair.now_ms;
            pair.both("read_from", |s| s.read_from(&a, from, limit, now))
                .ok();
        }
        2 => {
            let a = address(input.below(IDENTITIES)?);
            let now = pair.now_ms;
            pair.both("usage", |s| s.usage(&a, now)).ok();
            pair.both("head_seq", |s| s.head_seq(&a)).ok();
            pair.both("oldest_seq", |s| s.oldest_seq(&a)).ok();
        }
        3 => {
            let a = address(input.below(IDENTITIES)?);
            let device = DeviceId([0xd0 + input.below(3)? as u8; 32]);
            let seq = u64::from(input.byte()? % 16);
            pair.both("set_cursor", |s| s.set_cursor(&a, &device, seq))
                .ok();
            pair.both("cursor", |s| s.cursor(&a, &device)).ok();
        }
        4 => {
            let a = address(input.below(IDENTITIES)?);
            let count = input.below(4)?;
            let mut seqs = Vec::new();
            for _ in 0..count {
                seqs.push(u64::from(input.byte()? % 16));
            }
            pair.both("delete", |s| s.delete(&a, &seqs)).ok();
        }
        5 => {
            pair.now_ms += u64::from(input.byte()?) * 16;
            let limit = input.below(8)?;
            let now = pair.now_ms;
            pair.both("expire", |s| s.expire(now, limit)).ok();
        }
        6 => {
            let i = input.below(IDENTITIES)?;
            let card = fixtures.cards[i][input.below(2)?];
            pair.both("put_card", |s| s.put_card(&card)).ok();
            let a = address(input.below(IDENTITIES)?);
            pair.both("card", |s| s.card(&a)).ok();
        }
        7 => {
            let i = input.below(IDENTITIES)?;
            let certificate = fixtures.certificates[i][input.below(DEVICES)?];
            // The broker stores a certificate under the session's address
            // after checking it; any address here exercises the keying.
            let a = address(input.below(IDENTITIES)?);
            pair.both("put_device", |s| s.put_device(&a, &certificate, 100))
                .ok();
            let device = certificate.device_key.device_id();
            pair.both("device", |s| s.device(&a, &device)).ok();
        }
        8 => {
            let a = address(input.below(IDENTITIES)?);
            let hash = CapabilityHash([input.below(4)? as u8; 32]);
            let max = input.below(4)?;
            pair.both("register_capability", |s| {
                s.register_capability(&a, &hash, max)
            })
            .ok();
        }
        9 => {
            let a = address(input.below(IDENTITIES)?);
            let hash = CapabilityHash([input.below(4)? as u8; 32]);
            pair.both("revoke_capability", |s| s.revoke_capability(&a, &hash))
                .ok();
            pair.both("has_capability", |s| s.has_capability(&a, &hash))
                .ok();
            pair.both("capabilities", |s| s.capabilities(&a)).ok();
        }
        10 => {
            let n = input.byte()? % IDS;
            let owner = address(input.below(IDENTITIES)?);
            let ttl_ms = u64::from(input.byte()?) * 16;
            let len = input.below(8)?;
            let password = input.below(3)?;
            let failed_attempts = u32::from(input.byte()? % 4);
            let max = input.below(4)?;
            if !pair.token_ids.insert(n) {
                // Ids are drawn at random by the broker: never reused.
                return Some(());
            }
            let token = StoredToken {
                id: token_id(n),
                owner,
                created_at_ms: pair.now_ms,
                expires_at_ms: pair.now_ms + ttl_ms,
                content: vec![n; len],
                verifier_hash: (password > 0)
                    .then(|| PasswordVerifier([password as u8; 32]).hash()),
                failed_attempts,
                locked: false,
            };
            let now = pair.now_ms;
            pair.both("put_token", |s| s.put_token(&token, max, now))
                .ok();
        }
        11 => {
            let id = token_id(input.byte()? % IDS);
            let now = pair.now_ms;
            pair.both("token", |s| s.token(&id, now)).ok();
        }
        12 => {
            let id = token_id(input.byte()? % IDS);
            let verifier = PasswordVerifier([input.below(3)? as u8; 32]).hash();
            let max_attempts = u32::from(input.byte()? % 4);
            let now = pair.now_ms;
            pair.both("attempt_token", |s| {
                s.attempt_token(&id, &verifier, max_attempts, now)
            })
            .ok();
        }
        13 => {
            let owner = address(input.below(IDENTITIES)?);
            let id = token_id(input.byte()? % IDS);
            pair.both("delete_token", |s| s.delete_token(&owner, &id))
                .ok();
        }
        14 => {
            pair.now_ms += u64::from(input.byte()?) * 16;
            let limit = input.below(8)?;
            let now = pair.now_ms;
            pair.both("expire_tokens", |s| s.expire_tokens(now, limit))
                .ok();
        }
        15 => {
            let n = input.byte()? % IDS;
            let owner = address(input.below(IDENTITIES)?);
            let size = u64::from(input.u16()?);
            let ttl_ms = u64::from(input.byte()?) * 16;
            let quota = FileQuota {
                max_files: input.below(4)?,
                max_bytes: u64::from(input.u16()?),
            };
            if !pair.file_ids.insert(n) {
                return Some(());
            }
            let file = StoredFile {
                id: file_id(n),
                owner,
                size,
                content_hash: ContentHash([n; 32]),
                secret_hash: FileSecret([n; 32]).hash(),
                expires_at_ms: pair.now_ms + ttl_ms,
                complete: false,
            };
            let now = pair.now_ms;
            pair.both("put_file", |s| s.put_file(&file, quota, now))
                .ok();
        }
        16 => {
            let id = file_id(input.byte()? % IDS);
            let now = pair.now_ms;
            pair.both("file", |s| s.file(&id, now)).ok();
            pair.both("file_exists", |s| s.file_exists(&id)).ok();
            let owner = address(input.below(IDENTITIES)?);
            pair.both("files_of", |s| s.files_of(&owner)).ok();
        }
        17 => {
            let id = file_id(input.byte()? % IDS);
            pair.both("complete_file", |s| s.complete_file(&id)).ok();
        }
        18 => {
            let owner = address(input.below(IDENTITIES)?);
            let id = file_id(input.byte()? % IDS);
            pair.both("delete_file", |s| s.delete_file(&owner, &id))
                .ok();
        }
        19 => {
            pair.now_ms += u64::from(input.byte()?) * 16;
            let limit = input.below(8)?;
            let now = pair.now_ms;
            pair.both("expire_files", |s| s.expire_files(now, limit))
                .ok();
        }
        20 => {
            let a = address(input.below(IDENTITIES)?);
            let policy = if input.below(2)? == 0 {
                InboundPolicy::Anyone
            } else {
                InboundPolicy::RelationshipsOnly
            };
            pair.both("set_inbound_policy", |s| s.set_inbound_policy(&a, policy))
                .ok();
            pair.both("inbound_policy", |s| s.inbound_policy(&a)).ok();
        }
        21 => {
            let a = address(input.below(IDENTITIES)?);
            let peer = address(input.below(IDENTITIES)?);
            let relationship = Relationship {
                id: RelationshipId([input.below(4)? as u8; 16]),
                peer,
                role: if input.below(2)? == 0 {
                    Role::Requester
                } else {
                    Role::Owner
                },
                state: [
                    State::Pending,
                    State::Active,
                    State::Rejected,
                    State::Terminated,
                ][input.below(4)?],
                changed_at_ms: pair.now_ms,
            };
            pair.both("put_relationship", |s| {
                s.put_relationship(&a, &relationship)
            })
            .ok();
            pair.both("relationships", |s| s.relationships(&a)).ok();
        }
        22 => {
            let a = address(input.below(IDENTITIES)?);
            let purge_at = pair.now_ms + u64::from(input.byte()?) * 16;
            pair.both("schedule_deletion", |s| s.schedule_deletion(&a, purge_at))
                .ok();
        }
        23 => {
            let a = address(input.below(IDENTITIES)?);
            pair.both("cancel_deletion", |s| s.cancel_deletion(&a)).ok();
            pair.both("deletion", |s| s.deletion(&a)).ok();
        }
        24 => {
            let a = address(input.below(IDENTITIES)?);
            let to_tell = peers_to_tell(input)?;
            let now = pair.now_ms;
            pair.both("begin_purge", |s| s.begin_purge(&a, now, &to_tell))
                .ok();
        }
        25 => {
            let a = address(input.below(IDENTITIES)?);
            let still = peers_to_tell(input)?;
            pair.both("settle_purge", |s| s.settle_purge(&a, &still))
                .ok();
        }
        26 => {
            pair.now_ms += u64::from(input.byte()?) * 16;
            let limit = input.below(8)?;
            let now = pair.now_ms;
            pair.both("due_deletions", |s| s.due_deletions(now, limit))
                .ok();
            let parity = input.below(3)?;
            pair.both("addresses", |s| {
                s.addresses(&|a: &Address| parity == 2 || usize::from(a.0[0] % 2) == parity)
            })
            .ok();
        }
        27 => {
            let a = address(input.below(IDENTITIES)?);
            if input.below(2)? == 0 {
                let export = pair
                    .both("export_mailbox", |s| s.export_mailbox(&a))
                    .expect("export");
                // Importing a mailbox's own export changes nothing.
                pair.both("import_mailbox (own)", |s| s.import_mailbox(&export))
                    .ok();
                assert_eq!(
                    pair.both("export_mailbox", |s| s.export_mailbox(&a)),
                    Ok(export.clone()),
                    "importing a mailbox's own export changed it"
                );
                pair.saved.push(export);
            } else if let Some(export) = pair.saved.pop() {
                // An export taken earlier, merged into a store that moved
                // on since: what a slot handover does when the slot comes
                // back to a node that still holds an older copy. (Only a
                // mailbox's own export is imported: an export's card and
                // devices belong to its address.)
                pair.both("import_mailbox (earlier)", |s| s.import_mailbox(&export))
                    .ok();
            }
        }
        28 => {
            let a = address(input.below(IDENTITIES)?);
            if input.below(2)? == 0 {
                pair.both("purge_mailbox", |s| s.purge_mailbox(&a)).ok();
            } else {
                pair.both("remove_deletion", |s| s.remove_deletion(&a)).ok();
            }
        }
        29 => {
            let key = ["handoff", "run", "node/x", ""][input.below(4)?];
            let value = vec![input.byte()?; input.below(4)?];
            pair.both("put_meta", |s| s.put_meta(key, &value)).ok();
            let key = ["handoff", "run", "node/x", ""][input.below(4)?];
            pair.both("meta", |s| s.meta(key)).ok();
        }
        30 => {
            pair.both("flush", |s| s.flush()).ok();
        }
        _ => {
            let a = address(input.below(IDENTITIES)?);
            pair.both("deletion", |s| s.deletion(&a)).ok();
            pair.both("export_mailbox", |s| s.export_mailbox(&a)).ok();
        }
    }
    Some(())
}

/// Up to three peers to tell, from the identities.
fn peers_to_tell(input: &mut Input<'_>) -> Option<Vec<PeerToTell>> {
    let count = input.below(4)?;
    let mut peers = Vec::new();
    for _ in 0..count {
        peers.push(PeerToTell {
            peer: address(input.below(IDENTITIES)?),
            relationship: RelationshipId([input.below(4)? as u8; 16]),
        });
    }
    Some(peers)
}

/// At the end of an input, everything either store holds must agree.
fn compare_everything(pair: &mut Pair<'_>) {
    for i in 0..IDENTITIES {
        let a = address(i);
        pair.both("final export_mailbox", |s| s.export_mailbox(&a))
            .ok();
        pair.both("final files_of", |s| s.files_of(&a)).ok();
        pair.both("final deletion", |s| s.deletion(&a)).ok();
    }
    for n in 0..IDS {
        let (token, file) = (token_id(n), file_id(n));
        pair.both("final token", |s| s.token(&token, 0)).ok();
        pair.both("final file", |s| s.file(&file, 0)).ok();
        pair.both("final file_exists", |s| s.file_exists(&file))
            .ok();
    }
    pair.both("final due_deletions", |s| s.due_deletions(u64::MAX, 64))
        .ok();
    pair.both("final addresses", |s| s.addresses(&|_: &Address| true))
        .ok();
}

/// Seeds: each operation once with typical arguments, then sequences that
/// make them meet: appends, reads, deletes and expiry on one mailbox; a
/// token created, attempted until it locks, deleted; a file created within
/// and over its quota, completed, expired; a deletion scheduled, begun,
/// settled; a mailbox exported and imported elsewhere, then purged.
pub fn store_ops_seeds() -> Vec<Vec<u8>> {
    let single: Vec<Vec<u8>> = (0..32u8)
        .map(|op| vec![op, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        .collect();
    let mut seeds = single.clone();
    seeds.push(single.concat());
    seeds.push(vec![
        0, 3, 0, 10, 4, 4, 0, 20, 5, 0, 0, 30, 6, 1, // three appends
        1, 0, 0, 7, // read them
        4, 0, 2, 2, 3, // delete two (the highest one included)
        2, 0, // usage and head
        5, 255, 7, // expire everything due
        2, 0, 1, 0, 0, 5,
    ]);
    seeds.push(vec![
        10, 1, 0, 200, 4, 1, 0, 3, // a password token
        12, 1, 2, 2, 12, 1, 2, 2, 12, 1, 2, 2, // wrong passwords until locked
        11, 1, 12, 1, 1, 2, // fetch, the right password
        13, 1, 1, 13, 0, 1, // deleted by a stranger, then the owner
        10, 2, 0, 1, 0, 0, 0, 1, 14, 2, 7, // a short-lived one expires
    ]);
    seeds.push(vec![
        15, 1, 0, 100, 0, 100, 2, 0, 1, // a file within the quota
        15, 2, 0, 100, 0, 100, 2, 150, 0, // over the byte quota
        17, 1, 16, 1, 0, 18, 1, 1, 19, 255, 7, 16, 2, 0,
    ]);
    seeds.push(vec![
        21, 0, 1, 1, 1, 1, // a relationship
        22, 0, 1, 23, 1, 22, 0, 0, // scheduled, cancelled elsewhere, scheduled now
        26, 1, 4, 2, 24, 0, 2, 1, 1, 2, 2, // due, begun with peers to tell
        25, 0, 1, 1, 1, 25, 0, 0, 26, 0, 4, 2, // settled partly, then fully
        28, 0, 1, 23, 0,
    ]);
    seeds.push(vec![
        0, 2, 1, 50, 4, 1, 1, 60, 4, 4, 3, 1, 1, 3, 6, 1, 0, 7, 1, 0, 1, 8, 1, 1, 3, 20, 1, 1, 10,
        3, 1, 100, 1, 0, 0, 4, 27, 1, 0, // export mailbox 1 (and import it)
        4, 1, 1, 1, 3, 1, 0xd1, 9, 27, 1, 1, // change it, then import the export again
        31, 1, 28, 1, 0, 31, 1, 29, 1, 9, 2, 1, 30,
    ]);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use backbone_broker::store::TokenStore;

    #[test]
    fn the_seeds_run_every_operation_and_agree() {
        let seeds = store_ops_seeds();
        for seed in &seeds {
            run_store_ops(seed);
        }
        // The concatenation of every single operation ran all 32.
        assert!(run_store_ops(&seeds[32]) >= 32);
    }

    #[test]
    fn a_divergence_is_caught() {
        // A token put only into the sled store makes the final comparison
        // fail: the check compares, it does not just run.
        let caught = std::panic::catch_unwind(|| {
            let held = sled()
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut pair = fresh_pair(&held);
            let token = StoredToken {
                id: token_id(1),
                owner: address(0),
                created_at_ms: 0,
                expires_at_ms: u64::MAX,
                content: Vec::new(),
                verifier_hash: None,
                failed_attempts: 0,
                locked: false,
            };
            pair.sled.put_token(&token, 1, 0).expect("put");
            compare_everything(&mut pair);
        });
        assert!(caught.is_err());
    }
}
