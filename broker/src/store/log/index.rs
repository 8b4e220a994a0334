//! The in-memory index of the mailbox log: for every mailbox with envelopes,
//! where each envelope's record is, when it expires and how long it is; the
//! mailbox's head; and an index by expiry time for the sweep.
//!
//! It only ever holds envelopes that are durable: the log's sync thread
//! applies a batch to it after the fdatasync that covers the batch. Readers
//! (catch-up, new-device sync, quota counts) therefore never see an
//! envelope a crash could take back.
//!
//! The index lives in memory and is **checkpointed** into the directory
//! store (see [`super::checkpoint`]): each mailbox changed since the last
//! checkpoint is written out whole, then the log position the checkpoint
//! covers. At start the checkpoint is loaded and the log after its position
//! is replayed. Replaying a record twice changes nothing, which is what
//! lets a checkpoint be written without stopping the log.
//!
//! Why not sled for the index itself: two sled inserts per envelope (the
//! entry and its expiry key) cost 32–43 µs of CPU per envelope here, against
//! a budget of a few µs for storage (`docs/benchmarks.md`, "Mailbox log").
//!
//! Memory: about 100 bytes per stored envelope (32 in the mailbox's list,
//! the rest in the expiry set), and a small record per mailbox with
//! envelopes; a mailbox whose envelopes are all gone leaves memory once a
//! checkpoint holds its head.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use backbone_protocol::Address;

/// Number of independently locked shards of mailboxes.
const SHARDS: usize = 64;

/// Where one envelope is, and what the index needs to know of it without
/// reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number in the mailbox.
    pub seq: u64,
    /// The log position of its record.
    pub position: u64,
    /// The record's length, header included.
    pub len: u32,
    /// The sealed envelope's length (what the quota counts).
    pub envelope_len: u32,
    /// When it expires, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// One mailbox in the index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxIndex {
    /// The highest sequence number ever durable in the mailbox.
    pub head: u64,
    /// Its envelopes, ascending by sequence number.
    pub entries: VecDeque<Entry>,
}

impl MailboxIndex {
    fn find(&self, seq: u64) -> Result<usize, usize> {
        // Appends come in order: look at the back first.
        match self.entries.back() {
            Some(last) if last.seq < seq => Err(self.entries.len()),
            _ => self.entries.binary_search_by_key(&seq, |entry| entry.seq),
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    mailboxes: HashMap<Address, MailboxIndex>,
    /// Mailboxes changed since the last checkpoint took them.
    dirty: HashSet<Address>,
}

/// What a change did to one entry, for the counters kept beside the index.
enum Change {
    Added(Entry),
    Removed(Entry),
}

/// The index of every mailbox; see the module documentation.
#[derive(Debug)]
pub struct Index {
    shards: Vec<Mutex<Shard>>,
    expiry: Mutex<BTreeSet<(u64, Address, u64)>>,
    /// Live record bytes per segment (by the segment's base), for compaction.
    live: Mutex<BTreeMap<u64, u64>>,
    /// Every log position up to this one is applied to the index.
    applied_through: AtomicU64,
    envelopes: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change under these locks is applied whole before any call that
    // could panic, so a poisoned lock still guards consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Index {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            expiry: Mutex::default(),
            live: Mutex::default(),
            applied_through: AtomicU64::new(0),
            envelopes: AtomicU64::new(0),
        }
    }
}

impl Index {
    fn shard(&self, address: &Address) -> MutexGuard<'_, Shard> {
        let index = u64::from_le_bytes(address.0[..8].try_into().expect("8 bytes")) as usize;
        lock(&self.shards[index % SHARDS])
    }

    /// Registers a segment, so that its live bytes are counted.
    pub fn add_segment(&self, base: u64) {
        lock(&self.live).entry(base).or_insert(0);
    }

    /// Forgets a removed segment.
    pub fn remove_segment(&self, base: u64) {
        lock(&self.live).remove(&base);
    }

    /// Live record bytes of each segment, by base.
    pub fn live_bytes(&self) -> BTreeMap<u64, u64> {
        lock(&self.live).clone()
    }

    /// Envelopes in the index.
    pub fn envelopes(&self) -> u64 {
        self.envelopes.load(Ordering::Relaxed)
    }

    /// The position through which the log is applied.
    pub fn applied_through(&self) -> u64 {
        self.applied_through.load(Ordering::SeqCst)
    }

    /// Records that everything before `position` is applied.
    pub fn set_applied_through(&self, position: u64) {
        self.applied_through.fetch_max(position, Ordering::SeqCst);
    }

    fn account(&self, address: &Address, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut live = lock(&self.live);
        let mut expiry = lock(&self.expiry);
        for change in changes {
            let (entry, added) = match change {
                Change::Added(entry) => (entry, true),
                Change::Removed(entry) => (entry, false),
            };
            if let Some((_, bytes)) = live.range_mut(..=entry.position).next_back() {
                if added {
                    *bytes += u64::from(entry.len);
                } else {
                    *bytes = bytes.saturating_sub(u64::from(entry.len));
                }
            }
            let key = (entry.expires_at_ms, *address, entry.seq);
            if added {
                expiry.insert(key);
                self.envelopes.fetch_add(1, Ordering::Relaxed);
            } else {
                expiry.remove(&key);
                self.envelopes.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds an envelope, or, with `moved_from`, moves one: compaction
    /// copied its record from `moved_from` to `entry.position`. An entry
    /// already there for the same sequence number is replaced (a record
    /// replayed again, or appended twice by an interrupted migration: the
    /// later record wins). A move applies only while the entry is still at
    /// `moved_from`: an envelope deleted or expired since, or moved by a
    /// newer copy, stays as it is.
    pub fn insert(&self, address: &Address, entry: Entry, moved_from: Option<u64>) {
        let mut changes = Vec::new();
        {
            let mut shard = self.shard(address);
            match moved_from {
                Some(from) => {
                    let Some(mailbox) = shard.mailboxes.get_mut(address) else {
                        return;
                    };
                    let Ok(at) = mailbox.find(entry.seq) else {
                        return;
                    };
                    let old = mailbox.entries[at];
                    if old.position != from {
                        return;
                    }
                    mailbox.entries[at] = entry;
                    changes.push(Change::Removed(old));
                    changes.push(Change::Added(entry));
                }
                None => {
                    let mailbox = shard.mailboxes.entry(*address).or_default();
                    mailbox.head = mailbox.head.max(entry.seq);
                    match mailbox.find(entry.seq) {
                        Ok(at) => {
                            let old = mailbox.entries[at];
                            if old == entry {
                                return;
                            }
                            mailbox.entries[at] = entry;
                            changes.push(Change::Removed(old));
                        }
                        Err(at) => mailbox.entries.insert(at, entry),
                    }
                    changes.push(Change::Added(entry));
                }
            }
            shard.dirty.insert(*address);
        }
        self.account(address, &changes);
    }

    /// Removes the listed envelopes; returns how many were there.
    pub fn delete(&self, address: &Address, seqs: &[u64]) -> usize {
        let mut changes = Vec::new();
        {
            let mut shard = self.shard(address);
            let Some(mailbox) = shard.mailboxes.get_mut(address) else {
                return 0;
            };
            for seq in seqs {
                if let Ok(at) = mailbox.find(*seq)
                    && let Some(entry) = mailbox.entries.remove(at)
                {
                    changes.push(Change::Removed(entry));
                }
            }
            if !changes.is_empty() {
                shard.dirty.insert(*address);
            }
        }
        self.account(address, &changes);
        changes.len()
    }

    /// Removes every envelope up to `through_seq`, keeping the head at least
    /// there; `u64::MAX` forgets the mailbox, head included (its purge, or
    /// its handover to another node).
    pub fn drop_through(&self, address: &Address, through_seq: u64) {
        let mut changes = Vec::new();
        {
            let mut shard = self.shard(address);
            if through_seq == u64::MAX {
                if let Some(mailbox) = shard.mailboxes.remove(address) {
                    changes.extend(mailbox.entries.into_iter().map(Change::Removed));
                }
                shard.dirty.insert(*address);
                drop(shard);
                self.account(address, &changes);
                return;
            }
            let mailbox = shard.mailboxes.entry(*address).or_default();
            while mailbox
                .entries
                .front()
                .is_some_and(|entry| entry.seq <= through_seq)
            {
                if let Some(entry) = mailbox.entries.pop_front() {
                    changes.push(Change::Removed(entry));
                }
            }
            mailbox.head = mailbox.head.max(through_seq);
            shard.dirty.insert(*address);
        }
        self.account(address, &changes);
    }

    /// Removes up to `limit` envelopes expired at `now_ms`, earliest first;
    /// returns how many.
    pub fn expire(&self, now_ms: u64, limit: usize) -> usize {
        let due: Vec<(u64, Address, u64)> = {
            let expiry = lock(&self.expiry);
            expiry
                .iter()
                .take_while(|(at, _, _)| *at <= now_ms)
                .take(limit)
                .copied()
                .collect()
        };
        let mut removed = 0;
        for (at, address, seq) in due {
            let mut changes = Vec::new();
            {
                let mut shard = self.shard(&address);
                if let Some(mailbox) = shard.mailboxes.get_mut(&address)
                    && let Ok(index) = mailbox.find(seq)
                    && mailbox.entries[index].expires_at_ms == at
                    && let Some(entry) = mailbox.entries.remove(index)
                {
                    changes.push(Change::Removed(entry));
                    shard.dirty.insert(address);
                }
            }
            removed += changes.len();
            self.account(&address, &changes);
        }
        removed
    }

    /// Up to `limit` entries of `address` from `from_seq` on, unexpired at
    /// `now_ms`, ascending.
    pub fn read(&self, address: &Address, from_seq: u64, limit: usize, now_ms: u64) -> Vec<Entry> {
        let shard = self.shard(address);
        let Some(mailbox) = shard.mailboxes.get(address) else {
            return Vec::new();
        };
        let start = mailbox.find(from_seq).unwrap_or_else(|at| at);
        mailbox
            .entries
            .range(start..)
            .filter(|entry| entry.expires_at_ms > now_ms)
            .take(limit)
            .copied()
            .collect()
    }

    /// The entry of one envelope.
    pub fn entry(&self, address: &Address, seq: u64) -> Option<Entry> {
        let shard = self.shard(address);
        let mailbox = shard.mailboxes.get(address)?;
        mailbox.find(seq).ok().map(|at| mailbox.entries[at])
    }

    /// The mailbox's head, if the index holds the mailbox.
    pub fn head(&self, address: &Address) -> Option<u64> {
        self.shard(address).mailboxes.get(address).map(|m| m.head)
    }

    /// Raises the mailbox's head (a head the checkpoint knew and memory did
    /// not, or one imported with a handover).
    pub fn raise_head(&self, address: &Address, head: u64) {
        if head == 0 {
            // No head to keep: creating an empty record would list the
            // mailbox as holding something.
            return;
        }
        let mut shard = self.shard(address);
        let mailbox = shard.mailboxes.entry(*address).or_default();
        if head > mailbox.head {
            mailbox.head = head;
            shard.dirty.insert(*address);
        }
    }

    /// Envelopes of the mailbox unexpired at `now_ms`, and their bytes.
    pub fn usage(&self, address: &Address, now_ms: u64) -> (u64, u64) {
        let shard = self.shard(address);
        let Some(mailbox) = shard.mailboxes.get(address) else {
            return (0, 0);
        };
        mailbox
            .entries
            .iter()
            .filter(|entry| entry.expires_at_ms > now_ms)
            .fold((0, 0), |(count, bytes), entry| {
                (count + 1, bytes + u64::from(entry.envelope_len))
            })
    }

    /// The lowest stored sequence number (expired but unswept included).
    pub fn oldest(&self, address: &Address) -> Option<u64> {
        let shard = self.shard(address);
        shard
            .mailboxes
            .get(address)
            .and_then(|mailbox| mailbox.entries.front())
            .map(|entry| entry.seq)
    }

    /// Every entry of the mailbox (for an export), ascending.
    pub fn entries(&self, address: &Address) -> Vec<Entry> {
        let shard = self.shard(address);
        shard
            .mailboxes
            .get(address)
            .map(|mailbox| mailbox.entries.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every mailbox address the index holds for which `filter` holds.
    pub fn addresses(&self, filter: &dyn Fn(&Address) -> bool) -> Vec<Address> {
        let mut found = Vec::new();
        for shard in &self.shards {
            found.extend(lock(shard).mailboxes.keys().filter(|a| filter(a)).copied());
        }
        found
    }

    /// Loads a mailbox from a checkpoint (at start, before replay).
    pub fn load(&self, address: Address, mailbox: MailboxIndex) {
        let changes: Vec<Change> = mailbox.entries.iter().copied().map(Change::Added).collect();
        self.shard(&address).mailboxes.insert(address, mailbox);
        self.account(&address, &changes);
    }

    /// Takes the mailboxes changed since the last call, with their state
    /// now (`None`: forgotten), for a checkpoint.
    pub fn take_dirty(&self) -> Vec<(Address, Option<MailboxIndex>)> {
        let mut taken = Vec::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            let dirty = std::mem::take(&mut shard.dirty);
            for address in dirty {
                let mailbox = shard.mailboxes.get(&address).cloned();
                taken.push((address, mailbox));
            }
        }
        taken
    }

    /// Marks mailboxes dirty again (a checkpoint that failed).
    pub fn mark_dirty(&self, addresses: impl IntoIterator<Item = Address>) {
        for address in addresses {
            self.shard(&address).dirty.insert(address);
        }
    }

    /// Drops from memory the mailboxes among `addresses` that hold no
    /// envelope and have not changed since a checkpoint wrote them: their
    /// head is in the checkpoint.
    pub fn evict_empty(&self, addresses: impl IntoIterator<Item = Address>) {
        for address in addresses {
            let mut shard = self.shard(&address);
            if !shard.dirty.contains(&address)
                && shard
                    .mailboxes
                    .get(&address)
                    .is_some_and(|mailbox| mailbox.entries.is_empty())
            {
                shard.mailboxes.remove(&address);
            }
        }
    }

    /// Entries whose records are in the segment `[base, end)`, with their
    /// mailboxes (for compaction).
    pub fn entries_in(&self, base: u64, end: u64) -> Vec<(Address, Entry)> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            for (address, mailbox) in &shard.mailboxes {
                found.extend(
                    mailbox
                        .entries
                        .iter()
                        .filter(|entry| (base..end).contains(&entry.position))
                        .map(|entry| (*address, *entry)),
                );
            }
        }
        found.sort_by_key(|(_, entry)| entry.position);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, position: u64, expires_at_ms: u64) -> Entry {
        Entry {
            seq,
            position,
            len: 100,
            envelope_len: 10,
            expires_at_ms,
        }
    }

    #[test]
    fn inserts_reads_deletes_and_expiry_keep_the_counters_true() {
        let index = Index::default();
        index.add_segment(0);
        index.add_segment(1_000);
        let a = Address([1; 32]);
        index.insert(&a, entry(1, 16, 50), None);
        index.insert(&a, entry(2, 116, 500), None);
        index.insert(&a, entry(3, 1_016, 500), None);
        assert_eq!(index.head(&a), Some(3));
        assert_eq!(index.usage(&a, 0), (3, 30));
        assert_eq!(index.usage(&a, 60), (2, 20), "seq 1 expired at 50");
        assert_eq!(
            index
                .read(&a, 2, 10, 0)
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(index.live_bytes(), BTreeMap::from([(0, 200), (1_000, 100)]));
        assert_eq!(index.delete(&a, &[2, 9]), 1);
        assert_eq!(index.live_bytes(), BTreeMap::from([(0, 100), (1_000, 100)]));
        assert_eq!(index.expire(60, 10), 1);
        assert_eq!(index.expire(60, 10), 0, "nothing twice");
        assert_eq!(index.envelopes(), 1);
        assert_eq!(index.head(&a), Some(3), "the head never falls back");
        index.drop_through(&a, 3);
        assert_eq!((index.envelopes(), index.head(&a)), (0, Some(3)));
        assert_eq!(
            index.expire(1_000, 10),
            0,
            "a dropped entry left the expiry set"
        );
    }

    #[test]
    fn replaying_a_record_again_changes_nothing_and_a_moved_record_only_moves_what_is_there() {
        let index = Index::default();
        index.add_segment(0);
        let a = Address([2; 32]);
        index.insert(&a, entry(1, 16, 500), None);
        index.insert(&a, entry(1, 16, 500), None);
        assert_eq!(index.envelopes(), 1);
        // Compaction moved it: the entry follows.
        index.insert(&a, entry(1, 900, 500), Some(16));
        assert_eq!(index.entry(&a, 1).map(|e| e.position), Some(900));
        // A second move record from an older copy does not apply.
        index.insert(&a, entry(1, 700, 500), Some(16));
        assert_eq!(index.entry(&a, 1).map(|e| e.position), Some(900));
        // A moved envelope that was deleted meanwhile does not come back.
        index.delete(&a, &[1]);
        index.insert(&a, entry(1, 1_100, 500), Some(900));
        assert_eq!(index.entry(&a, 1), None);
        assert_eq!(index.envelopes(), 0);
    }

    #[test]
    fn dirty_mailboxes_are_taken_once_and_empty_clean_ones_leave_memory() {
        let index = Index::default();
        let (a, b) = (Address([3; 32]), Address([4; 32]));
        index.insert(&a, entry(1, 16, 500), None);
        index.insert(&b, entry(7, 116, 500), None);
        let mut taken: Vec<Address> = index.take_dirty().into_iter().map(|(a, _)| a).collect();
        taken.sort_by_key(|address| address.0);
        assert_eq!(taken, [a, b]);
        assert!(index.take_dirty().is_empty());
        index.delete(&b, &[7]);
        let taken = index.take_dirty();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.as_ref().map(|m| m.head), Some(7));
        index.drop_through(&b, u64::MAX);
        assert_eq!(index.head(&b), None);
        assert_eq!(index.take_dirty(), vec![(b, None)], "a forgotten mailbox");
        index.raise_head(&b, 7);
        index.take_dirty();
        index.evict_empty([a, b]);
        assert_eq!(index.head(&b), None, "b's head now lives in the checkpoint");
        assert_eq!(index.head(&a), Some(1), "a still holds an envelope");
    }
}
