//! An in-memory [`Store`] with the same semantics as the sled store.
//!
//! Everything lives in ordered maps behind one mutex, which keeps every
//! operation trivially atomic. It is meant for fast tests and deterministic
//! simulation: nothing survives the process, `flush` does nothing, and
//! [`MemoryStore::inject_append_failures`] makes appends fail on demand.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use backbone_protocol::bytes::{CapabilityHash, FileId, ServerId, TokenId, VerifierHash};
use backbone_protocol::deletion::{self, Deletion, PeerToTell};
use backbone_protocol::relationship::{InboundPolicy, Relationship};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, IdentityCard};

use super::log::checkpoint::{Checkpoints, Visit};
use super::prelude::*;
use super::{
    Append, Completion, FilePut, FileQuota, MailboxExport, MailboxUsage, StoreError,
    StoredEnvelope, StoredFile, StoredToken, TokenAttempt, merge_token,
};

/// The mailbox log and the directory, held entirely in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// While `Some`, appends wait there, not durable and invisible to
    /// reads (see [`MemoryStore::hold_appends`]).
    held: Mutex<Option<Vec<HeldBatch>>>,
}

/// A batch of appends waiting for [`MemoryStore::release_appends`].
type HeldBatch = (Vec<Append>, Completion);

#[derive(Debug, Default)]
struct Inner {
    envelopes: BTreeMap<(Address, u64), StoredEnvelope>,
    /// `(expires_at_ms, address, seq)`, the same order as the sled expiry index.
    expiry: BTreeSet<(u64, Address, u64)>,
    heads: HashMap<Address, u64>,
    cursors: HashMap<(Address, DeviceId), u64>,
    cards: HashMap<Address, IdentityCard>,
    devices: HashMap<(Address, DeviceId), DeviceCertificate>,
    capabilities: BTreeSet<(Address, CapabilityHash)>,
    tokens: BTreeMap<TokenId, StoredToken>,
    /// `(expires_at_ms, id)`, the order of the sled token expiry index.
    token_expiry: BTreeSet<(u64, TokenId)>,
    files: BTreeMap<FileId, StoredFile>,
    /// `(expires_at_ms, id)`, the order of the sled file expiry index.
    file_expiry: BTreeSet<(u64, FileId)>,
    policies: HashMap<Address, InboundPolicy>,
    /// Keyed by (address, peer), so one address's records are one range.
    relationships: BTreeMap<(Address, Address), Relationship>,
    deletions: HashMap<Address, Deletion>,
    /// `(due_at_ms, address)` of every deletion with work left, the order
    /// of the sled deletion index.
    deletion_index: BTreeSet<(u64, Address)>,
    server_id: Option<ServerId>,
    meta: HashMap<String, Vec<u8>>,
    /// The log index checkpoint's values and the position it covers.
    log_index: BTreeMap<Address, Vec<u8>>,
    log_checkpoint: Option<u64>,
    /// How many upcoming `append_batch` calls fail with [`StoreError::Injected`].
    failing_appends: u32,
    /// How many upcoming `flush` calls fail with [`StoreError::Injected`].
    failing_flushes: u32,
    /// Successful `append_batch` calls so far.
    append_batches: u64,
}

/// The relationship records of `address`, ascending by peer.
fn relationship_range<'a>(
    relationships: &'a BTreeMap<(Address, Address), Relationship>,
    address: &Address,
) -> impl Iterator<Item = &'a Relationship> {
    relationships
        .range((*address, Address([0; 32]))..=(*address, Address([0xff; 32])))
        .map(|(_, relationship)| relationship)
}

/// The capability hashes of `address`, ascending.
fn capability_range<'a>(
    capabilities: &'a BTreeSet<(Address, CapabilityHash)>,
    address: &Address,
) -> impl Iterator<Item = &'a (Address, CapabilityHash)> {
    capabilities.range((*address, CapabilityHash([0; 32]))..=(*address, CapabilityHash([0xff; 32])))
}

impl Inner {
    /// The certificates registered for `address`, ascending by device id
    /// (the order of the sled store's keys).
    fn devices_of(&self, address: &Address) -> Vec<DeviceCertificate> {
        let mut devices: Vec<(DeviceId, DeviceCertificate)> = self
            .devices
            .iter()
            .filter(|((owner, _), _)| owner == address)
            .map(|((_, device), cert)| (*device, *cert))
            .collect();
        devices.sort_by_key(|(device, _)| *device);
        devices.into_iter().map(|(_, cert)| cert).collect()
    }

    /// Inserts `token`, replacing any token with its id and its expiry entry.
    fn insert_token(&mut self, token: StoredToken) {
        if let Some(old) = self.tokens.get(&token.id) {
            self.token_expiry.remove(&(old.expires_at_ms, old.id));
        }
        self.token_expiry.insert((token.expires_at_ms, token.id));
        self.tokens.insert(token.id, token);
    }

    fn remove_token(&mut self, id: &TokenId) -> Option<StoredToken> {
        let token = self.tokens.remove(id)?;
        self.token_expiry.remove(&(token.expires_at_ms, token.id));
        Some(token)
    }

    fn remove_file(&mut self, id: &FileId) -> Option<StoredFile> {
        let file = self.files.remove(id)?;
        self.file_expiry.remove(&(file.expires_at_ms, file.id));
        Some(file)
    }

    fn files_of<'a>(&'a self, owner: &'a Address) -> impl Iterator<Item = &'a StoredFile> {
        self.files.values().filter(move |file| file.owner == *owner)
    }

    fn tokens_of<'a>(&'a self, owner: &'a Address) -> impl Iterator<Item = &'a StoredToken> {
        self.tokens
            .values()
            .filter(move |token| token.owner == *owner)
    }

    /// Stores `record` for `address`, moving its index entry with it.
    fn put_deletion(&mut self, address: Address, record: Deletion) {
        if let Some(due) = self.deletions.get(&address).and_then(Deletion::due_at_ms) {
            self.deletion_index.remove(&(due, address));
        }
        if let Some(due) = record.due_at_ms() {
            self.deletion_index.insert((due, address));
        }
        self.deletions.insert(address, record);
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `count` calls to [`MailboxLog::append`] fail with
    /// [`StoreError::Injected`] without writing anything, to exercise error paths.
    pub fn inject_append_failures(&self, count: u32) {
        if let Ok(mut inner) = self.lock() {
            inner.failing_appends = count;
        }
    }

    /// Makes the next `count` calls to [`Directory::sync`] fail with
    /// [`StoreError::Injected`]; what was written before stays written: a
    /// flush whose outcome the caller cannot know.
    pub fn inject_flush_failures(&self, count: u32) {
        if let Ok(mut inner) = self.lock() {
            inner.failing_flushes = count;
        }
    }

    /// Until [`MemoryStore::release_appends`], appends are held: not
    /// durable yet, so invisible to reads and not completed — the state of
    /// a write whose fdatasync has not returned.
    pub fn hold_appends(&self) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Vec::new);
    }

    /// Makes the held appends durable (visible and completed), in order, and
    /// lets later ones through.
    pub fn release_appends(&self) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for (items, done) in held {
            done(self.apply_appends(&items));
        }
    }

    /// How many `append_batch` calls have succeeded; each stands for one flush.
    pub fn append_batches(&self) -> u64 {
        self.lock().map(|inner| inner.append_batches).unwrap_or(0)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // A poisoned lock means a panic mid-operation; the maps may be
        // half-updated, so refuse to serve them rather than guess.
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }
}

/// The ids of a time index (`(time, id)`, in time order) that are due at
/// `now_ms`, at most `limit` of them, oldest first.
fn due<Id: Copy>(index: &BTreeSet<(u64, Id)>, now_ms: u64, limit: usize) -> Vec<Id> {
    index
        .iter()
        .take_while(|(at_ms, _)| *at_ms <= now_ms)
        .take(limit)
        .map(|(_, id)| *id)
        .collect()
}

impl MemoryStore {
    /// Applies appends under the lock: the memory log's "durable".
    fn apply_appends(&self, items: &[Append]) -> Result<usize, StoreError> {
        let mut inner = self.lock()?;
        for item in items {
            let envelope = &item.envelope;
            let key = (item.address, envelope.seq);
            if let Some(old) = inner.envelopes.insert(key, StoredEnvelope::clone(envelope)) {
                // Overwriting a seq must not leave its old expiry entry behind.
                inner
                    .expiry
                    .remove(&(old.expires_at_ms, item.address, old.seq));
            }
            inner
                .expiry
                .insert((envelope.expires_at_ms, item.address, envelope.seq));
            let head = inner.heads.entry(item.address).or_insert(0);
            *head = (*head).max(envelope.seq);
        }
        inner.append_batches += 1;
        Ok(items.len())
    }
}

impl MailboxLog for MemoryStore {
    fn append(&self, items: Vec<Append>, done: Completion) {
        {
            let mut inner = match self.lock() {
                Ok(inner) => inner,
                Err(error) => return done(Err(error)),
            };
            if inner.failing_appends > 0 {
                inner.failing_appends -= 1;
                drop(inner);
                return done(Err(StoreError::Injected));
            }
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            // Not durable yet: invisible to reads until released.
            held.get_or_insert_with(Vec::new).push((items, done));
            return;
        }
        drop(held);
        done(self.apply_appends(&items));
    }

    fn delete(&self, address: Address, seqs: Vec<u64>, done: Completion) {
        let deleted = self.lock().map(|mut inner| {
            let mut deleted = 0;
            for seq in seqs {
                if let Some(old) = inner.envelopes.remove(&(address, seq)) {
                    inner.expiry.remove(&(old.expires_at_ms, address, seq));
                    deleted += 1;
                }
            }
            deleted
        });
        done(deleted);
    }

    fn drop_mailbox(&self, address: Address, done: Completion) {
        let dropped = self.lock().map(|mut inner| {
            let keys: Vec<(Address, u64)> = inner
                .envelopes
                .range((address, 0)..=(address, u64::MAX))
                .map(|(key, _)| *key)
                .collect();
            for key in &keys {
                if let Some(old) = inner.envelopes.remove(key) {
                    inner.expiry.remove(&(old.expires_at_ms, key.0, key.1));
                }
            }
            // Forgotten, head included, as the log's drop does.
            inner.heads.remove(&address);
            keys.len()
        });
        done(dropped);
    }

    fn import(
        &self,
        address: Address,
        envelopes: Vec<StoredEnvelope>,
        head: u64,
        done: Completion,
    ) {
        let items: Vec<Append> = envelopes
            .into_iter()
            .map(|envelope| Append {
                address,
                envelope: std::sync::Arc::new(envelope),
            })
            .collect();
        let imported = self.apply_appends(&items).and_then(|count| {
            // A head of 0 is no head: recording it would list an address
            // that holds nothing.
            if head > 0 {
                let mut inner = self.lock()?;
                let held = inner.heads.entry(address).or_insert(0);
                *held = (*held).max(head);
            }
            Ok(count)
        });
        done(imported);
    }

    fn barrier(&self, done: Completion) {
        done(Ok(0));
    }

    fn read_from(
        &self,
        address: &Address,
        from_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .envelopes
            .range((*address, from_seq)..=(*address, u64::MAX))
            .map(|(_, envelope)| envelope)
            .filter(|envelope| envelope.expires_at_ms > now_ms)
            .take(limit)
            .cloned()
            .collect())
    }

    fn usage(&self, address: &Address, now_ms: u64) -> Result<MailboxUsage, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .envelopes
            .range((*address, 0)..=(*address, u64::MAX))
            .map(|(_, envelope)| envelope)
            .filter(|envelope| envelope.expires_at_ms > now_ms)
            .fold(MailboxUsage::default(), |usage, envelope| MailboxUsage {
                envelopes: usage.envelopes + 1,
                bytes: usage.bytes + envelope.envelope.len() as u64,
            }))
    }

    fn head_seq(&self, address: &Address) -> Result<u64, StoreError> {
        Ok(self.lock()?.heads.get(address).copied().unwrap_or(0))
    }

    fn oldest_seq(&self, address: &Address) -> Result<Option<u64>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .envelopes
            .range((*address, 0)..=(*address, u64::MAX))
            .next()
            .map(|((_, seq), _)| *seq))
    }

    fn export(&self, address: &Address) -> Result<Vec<StoredEnvelope>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .envelopes
            .range((*address, 0)..=(*address, u64::MAX))
            .map(|(_, envelope)| envelope.clone())
            .collect())
    }

    fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut inner = self.lock()?;
        let due: Vec<(u64, Address, u64)> = inner
            .expiry
            .iter()
            .take_while(|(expires_at_ms, _, _)| *expires_at_ms <= now_ms)
            .take(limit)
            .copied()
            .collect();
        for entry in &due {
            inner.expiry.remove(entry);
            inner.envelopes.remove(&(entry.1, entry.2));
        }
        Ok(due.len())
    }

    fn mailboxes(&self, filter: &dyn Fn(&Address) -> bool) -> Vec<Address> {
        let Ok(inner) = self.lock() else {
            return Vec::new();
        };
        let all: BTreeSet<Address> = inner
            .envelopes
            .keys()
            .map(|(address, _)| *address)
            .chain(inner.heads.keys().copied())
            .filter(|address| filter(address))
            .collect();
        all.into_iter().collect()
    }

    fn envelope_count(&self) -> u64 {
        self.lock().map_or(0, |inner| inner.envelopes.len() as u64)
    }

    fn log_bytes_on_disk(&self) -> u64 {
        0
    }

    fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Checkpoints for MemoryStore {
    fn load_checkpoint(&self, visit: &mut Visit<'_>) -> Result<Option<u64>, StoreError> {
        let inner = self.lock()?;
        let Some(position) = inner.log_checkpoint else {
            return Ok(None);
        };
        for (address, value) in &inner.log_index {
            visit(*address, value)?;
        }
        Ok(Some(position))
    }

    fn checkpointed(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.log_index.get(address).cloned())
    }

    fn write_checkpoint(
        &self,
        mailboxes: &[(Address, Option<Vec<u8>>)],
        position: u64,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        for (address, value) in mailboxes {
            match value {
                Some(value) => inner.log_index.insert(*address, value.clone()),
                None => inner.log_index.remove(address),
            };
        }
        inner.log_checkpoint = Some(position);
        Ok(())
    }
}

impl CursorStore for MemoryStore {
    fn cursor(&self, address: &Address, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        Ok(self.lock()?.cursors.get(&(*address, *device)).copied())
    }

    fn set_cursor(&self, address: &Address, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let cursor = inner.cursors.entry((*address, *device)).or_insert(seq);
        *cursor = (*cursor).max(seq);
        Ok(())
    }
}

impl CardStore for MemoryStore {
    fn put_card(&self, card: &IdentityCard) -> Result<(), StoreError> {
        self.lock()?.cards.insert(card.address(), *card);
        Ok(())
    }

    fn card(&self, address: &Address) -> Result<Option<IdentityCard>, StoreError> {
        Ok(self.lock()?.cards.get(address).copied())
    }
}

impl DeviceStore for MemoryStore {
    fn put_device(
        &self,
        address: &Address,
        cert: &DeviceCertificate,
        max: usize,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let key = (*address, cert.device_key.device_id());
        if !inner.devices.contains_key(&key) && inner.devices_of(address).len() >= max {
            return Ok(false);
        }
        inner.devices.insert(key, *cert);
        Ok(true)
    }

    fn remove_device(&self, address: &Address, device: &DeviceId) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        inner.cursors.remove(&(*address, *device));
        Ok(inner.devices.remove(&(*address, *device)).is_some())
    }

    fn devices(&self, address: &Address) -> Result<Vec<DeviceCertificate>, StoreError> {
        Ok(self.lock()?.devices_of(address))
    }

    fn device(
        &self,
        address: &Address,
        device: &DeviceId,
    ) -> Result<Option<DeviceCertificate>, StoreError> {
        Ok(self.lock()?.devices.get(&(*address, *device)).copied())
    }
}

impl CapabilityStore for MemoryStore {
    fn register_capability(
        &self,
        address: &Address,
        hash: &CapabilityHash,
        max: usize,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.capabilities.contains(&(*address, *hash)) {
            return Ok(true);
        }
        let held = capability_range(&inner.capabilities, address).count();
        if held >= max {
            return Ok(false);
        }
        inner.capabilities.insert((*address, *hash));
        Ok(true)
    }

    fn revoke_capability(
        &self,
        address: &Address,
        hash: &CapabilityHash,
    ) -> Result<bool, StoreError> {
        Ok(self.lock()?.capabilities.remove(&(*address, *hash)))
    }

    fn has_capability(&self, address: &Address, hash: &CapabilityHash) -> Result<bool, StoreError> {
        Ok(self.lock()?.capabilities.contains(&(*address, *hash)))
    }

    fn capabilities(&self, address: &Address) -> Result<Vec<CapabilityHash>, StoreError> {
        let inner = self.lock()?;
        Ok(capability_range(&inner.capabilities, address)
            .map(|(_, hash)| *hash)
            .collect())
    }
}

impl TokenStore for MemoryStore {
    fn put_token(&self, token: &StoredToken, max: usize, now_ms: u64) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let held = inner
            .tokens_of(&token.owner)
            .filter(|held| held.expires_at_ms > now_ms && held.id != token.id)
            .count();
        if held >= max {
            return Ok(false);
        }
        inner.insert_token(token.clone());
        Ok(true)
    }

    fn token(&self, id: &TokenId, now_ms: u64) -> Result<Option<StoredToken>, StoreError> {
        Ok(self
            .lock()?
            .tokens
            .get(id)
            .filter(|token| token.expires_at_ms > now_ms)
            .cloned())
    }

    fn attempt_token(
        &self,
        id: &TokenId,
        verifier: &VerifierHash,
        max_attempts: u32,
        now_ms: u64,
    ) -> Result<TokenAttempt, StoreError> {
        let mut inner = self.lock()?;
        let Some(token) = inner
            .tokens
            .get_mut(id)
            .filter(|token| token.expires_at_ms > now_ms)
        else {
            return Ok(TokenAttempt::Missing);
        };
        Ok(token.attempt(verifier, max_attempts))
    }

    fn delete_token(&self, owner: &Address, id: &TokenId) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner
            .tokens
            .get(id)
            .is_none_or(|token| token.owner != *owner)
        {
            return Ok(false);
        }
        Ok(inner.remove_token(id).is_some())
    }

    fn expire_tokens(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut inner = self.lock()?;
        let due = due(&inner.token_expiry, now_ms, limit);
        for id in &due {
            inner.remove_token(id);
        }
        Ok(due.len())
    }
}

impl FileStore for MemoryStore {
    fn put_file(
        &self,
        file: &StoredFile,
        quota: FileQuota,
        now_ms: u64,
    ) -> Result<FilePut, StoreError> {
        let mut inner = self.lock()?;
        let held = inner
            .files_of(&file.owner)
            .filter(|held| held.expires_at_ms > now_ms && held.id != file.id);
        let outcome = quota.admits(held, file);
        if outcome == FilePut::Stored {
            inner.remove_file(&file.id);
            inner.file_expiry.insert((file.expires_at_ms, file.id));
            inner.files.insert(file.id, file.clone());
        }
        Ok(outcome)
    }

    fn file(&self, id: &FileId, now_ms: u64) -> Result<Option<StoredFile>, StoreError> {
        Ok(self
            .lock()?
            .files
            .get(id)
            .filter(|file| file.expires_at_ms > now_ms)
            .cloned())
    }

    fn complete_file(&self, id: &FileId) -> Result<bool, StoreError> {
        Ok(match self.lock()?.files.get_mut(id) {
            Some(file) => {
                file.complete = true;
                true
            }
            None => false,
        })
    }

    fn delete_file(&self, owner: &Address, id: &FileId) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.files.get(id).is_none_or(|file| file.owner != *owner) {
            return Ok(false);
        }
        Ok(inner.remove_file(id).is_some())
    }

    fn files_of(&self, owner: &Address) -> Result<Vec<StoredFile>, StoreError> {
        Ok(self.lock()?.files_of(owner).cloned().collect())
    }

    fn file_exists(&self, id: &FileId) -> Result<bool, StoreError> {
        Ok(self.lock()?.files.contains_key(id))
    }

    fn expire_files(&self, now_ms: u64, limit: usize) -> Result<Vec<FileId>, StoreError> {
        let mut inner = self.lock()?;
        let due = due(&inner.file_expiry, now_ms, limit);
        for id in &due {
            inner.remove_file(id);
        }
        Ok(due)
    }
}

impl ConsentStore for MemoryStore {
    fn inbound_policy(&self, address: &Address) -> Result<Option<InboundPolicy>, StoreError> {
        Ok(self.lock()?.policies.get(address).copied())
    }

    fn set_inbound_policy(
        &self,
        address: &Address,
        policy: InboundPolicy,
    ) -> Result<(), StoreError> {
        self.lock()?.policies.insert(*address, policy);
        Ok(())
    }

    fn relationships(&self, address: &Address) -> Result<Vec<Relationship>, StoreError> {
        let inner = self.lock()?;
        Ok(relationship_range(&inner.relationships, address)
            .copied()
            .collect())
    }

    fn put_relationship(
        &self,
        address: &Address,
        relationship: &Relationship,
    ) -> Result<(), StoreError> {
        self.lock()?
            .relationships
            .insert((*address, relationship.peer), *relationship);
        Ok(())
    }
}

impl DeletionStore for MemoryStore {
    fn deletion(&self, address: &Address) -> Result<Option<Deletion>, StoreError> {
        Ok(self.lock()?.deletions.get(address).cloned())
    }

    fn schedule_deletion(
        &self,
        address: &Address,
        purge_at_ms: u64,
    ) -> Result<Deletion, StoreError> {
        let mut inner = self.lock()?;
        if let Some(held) = inner.deletions.get(address) {
            return Ok(held.clone());
        }
        let record = Deletion::Scheduled { purge_at_ms };
        inner.put_deletion(*address, record.clone());
        Ok(record)
    }

    fn cancel_deletion(&self, address: &Address) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        match inner.deletions.get(address) {
            Some(Deletion::Scheduled { purge_at_ms }) => {
                let due = *purge_at_ms;
                inner.deletions.remove(address);
                inner.deletion_index.remove(&(due, *address));
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
        let mut inner = self.lock()?;
        match inner.deletions.get(address) {
            Some(Deletion::Scheduled { purge_at_ms }) if *purge_at_ms <= now_ms => {
                let record = Deletion::Purging {
                    purge_at_ms: *purge_at_ms,
                    to_tell: to_tell.to_vec(),
                };
                inner.put_deletion(*address, record.clone());
                Ok(Some(record))
            }
            Some(held) if held.is_tombstone() => Ok(Some(held.clone())),
            _ => Ok(None),
        }
    }

    fn settle_purge(
        &self,
        address: &Address,
        still_to_tell: &[PeerToTell],
    ) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(Deletion::Purging { purge_at_ms, .. }) = inner.deletions.get(address) {
            let record = if still_to_tell.is_empty() {
                Deletion::Deleted
            } else {
                Deletion::Purging {
                    purge_at_ms: *purge_at_ms,
                    to_tell: still_to_tell.to_vec(),
                }
            };
            inner.put_deletion(*address, record);
        }
        Ok(())
    }

    fn due_deletions(&self, now_ms: u64, limit: usize) -> Result<Vec<Address>, StoreError> {
        let inner = self.lock()?;
        Ok(due(&inner.deletion_index, now_ms, limit))
    }

    fn remove_deletion(&self, address: &Address) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(due) = inner
            .deletions
            .remove(address)
            .and_then(|held| held.due_at_ms())
        {
            inner.deletion_index.remove(&(due, *address));
        }
        Ok(())
    }
}

impl MetaStore for MemoryStore {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.lock()?.meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn server_id(&self) -> Result<ServerId, StoreError> {
        Ok(*self.lock()?.server_id.get_or_insert_with(ServerId::random))
    }
}

impl Directory for MemoryStore {
    fn addresses(&self, filter: &dyn Fn(&Address) -> bool) -> Result<Vec<Address>, StoreError> {
        let inner = self.lock()?;
        let all: BTreeSet<Address> = inner
            .log_index
            .keys()
            .copied()
            .chain(inner.cursors.keys().map(|(address, _)| *address))
            .chain(inner.cards.keys().copied())
            .chain(inner.devices.keys().map(|(address, _)| *address))
            .chain(inner.capabilities.iter().map(|(address, _)| *address))
            .chain(inner.tokens.values().map(|token| token.owner))
            .chain(inner.files.values().map(|file| file.owner))
            .chain(inner.policies.keys().copied())
            .chain(inner.relationships.keys().map(|(address, _)| *address))
            .chain(inner.deletions.keys().copied())
            .filter(|address| filter(address))
            .collect();
        Ok(all.into_iter().collect())
    }

    fn export_directory(&self, address: &Address) -> Result<MailboxExport, StoreError> {
        let inner = self.lock()?;
        let mut cursors: Vec<(DeviceId, u64)> = inner
            .cursors
            .iter()
            .filter(|((owner, _), _)| owner == address)
            .map(|((_, device), seq)| (*device, *seq))
            .collect();
        cursors.sort();
        Ok(MailboxExport {
            address: *address,
            // The log's half: filled in by `store::export_mailbox`.
            head: 0,
            envelopes: Vec::new(),
            cursors,
            card: inner.cards.get(address).copied(),
            devices: inner.devices_of(address),
            capabilities: capability_range(&inner.capabilities, address)
                .map(|(_, hash)| *hash)
                .collect(),
            tokens: inner.tokens_of(address).cloned().collect(),
            policy: inner.policies.get(address).copied(),
            relationships: relationship_range(&inner.relationships, address)
                .copied()
                .collect(),
            deletion: inner.deletions.get(address).cloned(),
        })
    }

    fn import_directory(&self, export: &MailboxExport) -> Result<(), StoreError> {
        let address = export.address;
        let mut inner = self.lock()?;
        for (device, seq) in &export.cursors {
            let cursor = inner.cursors.entry((address, *device)).or_insert(*seq);
            *cursor = (*cursor).max(*seq);
        }
        if let Some(card) = export.card {
            inner.cards.insert(address, card);
        }
        for cert in &export.devices {
            inner
                .devices
                .insert((address, cert.device_key.device_id()), *cert);
        }
        for hash in &export.capabilities {
            inner.capabilities.insert((address, *hash));
        }
        for token in &export.tokens {
            let merged = merge_token(inner.tokens.get(&token.id), token);
            inner.insert_token(merged);
        }
        if let Some(policy) = export.policy {
            inner.policies.insert(address, policy);
        }
        for relationship in &export.relationships {
            inner
                .relationships
                .insert((address, relationship.peer), *relationship);
        }
        if let Some(incoming) = &export.deletion {
            let merged = deletion::merge(inner.deletions.get(&address), incoming);
            inner.put_deletion(address, merged);
        }
        Ok(())
    }

    fn purge_directory(&self, address: &Address) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner.cursors.retain(|(owner, _), _| owner != address);
        inner.cards.remove(address);
        inner.devices.retain(|(owner, _), _| owner != address);
        inner.capabilities.retain(|(owner, _)| owner != address);
        let doomed: Vec<TokenId> = inner.tokens_of(address).map(|token| token.id).collect();
        for id in &doomed {
            inner.remove_token(id);
        }
        let doomed: Vec<FileId> = inner.files_of(address).map(|file| file.id).collect();
        for id in &doomed {
            inner.remove_file(id);
        }
        inner.policies.remove(address);
        inner.relationships.retain(|(owner, _), _| owner != address);
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if inner.failing_flushes > 0 {
            inner.failing_flushes -= 1;
            return Err(StoreError::Injected);
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        // Nothing is on disk.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::StoredEnvelope;
    use backbone_protocol::bytes::MessageId;

    fn item(seq: u64) -> Append {
        Append {
            address: Address([1; 32]),
            envelope: Arc::new(StoredEnvelope {
                seq,
                message_id: MessageId([0; 16]),
                sender: None,
                stored_at_ms: 0,
                expires_at_ms: 10,
                envelope: vec![1, 2, 3].into(),
            }),
        }
    }

    fn append(store: &MemoryStore, items: Vec<Append>) -> Result<usize, StoreError> {
        crate::store::wait_for(|done| store.append(items, done))
    }

    #[test]
    fn memory_store_injected_failures_write_nothing_and_then_stop() {
        let store = MemoryStore::new();
        store.inject_append_failures(2);
        assert_eq!(append(&store, vec![item(1)]), Err(StoreError::Injected));
        assert_eq!(append(&store, vec![item(1)]), Err(StoreError::Injected));
        assert_eq!(store.head_seq(&Address([1; 32])), Ok(0));
        assert_eq!(store.expire(u64::MAX, 10), Ok(0));
        assert_eq!(store.append_batches(), 0);
        assert_eq!(append(&store, vec![item(1)]), Ok(1));
        assert_eq!(store.head_seq(&Address([1; 32])), Ok(1));
        assert_eq!(store.append_batches(), 1);
    }

    #[test]
    fn held_appends_are_invisible_and_incomplete_until_released() {
        let store = std::sync::Arc::new(MemoryStore::new());
        store.hold_appends();
        let (done, completed) = std::sync::mpsc::channel();
        store.append(
            vec![item(1)],
            Box::new(move |outcome| {
                let _ = done.send(outcome);
            }),
        );
        assert!(completed.try_recv().is_err(), "not durable yet");
        assert_eq!(store.head_seq(&Address([1; 32])), Ok(0));
        assert_eq!(store.read_from(&Address([1; 32]), 0, 10, 0), Ok(vec![]));
        store.release_appends();
        assert_eq!(completed.recv(), Ok(Ok(1)));
        assert_eq!(store.head_seq(&Address([1; 32])), Ok(1));
    }

    #[test]
    fn memory_store_overwriting_a_seq_replaces_its_expiry_entry() {
        let store = MemoryStore::new();
        append(&store, vec![item(1)]).expect("append");
        let mut later = StoredEnvelope::clone(&item(1).envelope);
        later.expires_at_ms = 100;
        append(
            &store,
            vec![Append {
                address: Address([1; 32]),
                envelope: Arc::new(later),
            }],
        )
        .expect("append");
        assert_eq!(store.expire(50, 10), Ok(0));
        assert_eq!(
            store
                .read_from(&Address([1; 32]), 0, 10, 50)
                .map(|e| e.len()),
            Ok(1)
        );
    }
}
