//! The log and the directory seen as one blocking store, with the envelope
//! methods of a store that holds both: for tests, fuzz targets and tools
//! that compare a pair of stores with another (the memory store is both),
//! never for the broker's serving path, whose writes are asynchronous.

use std::collections::BTreeSet;

use backbone_protocol::Address;

use super::{
    Append, Directory, MailboxExport, MailboxLog, MailboxUsage, StoreError, StoredEnvelope,
    export_mailbox, import_mailbox, wait_for,
};

/// A mailbox log and a directory, used together; directory methods are
/// reached through `Deref`.
#[derive(Clone, Copy)]
pub struct Both<'a> {
    /// The mailbox log.
    pub log: &'a (dyn MailboxLog + 'static),
    /// The directory.
    pub dir: &'a (dyn Directory + 'static),
}

impl std::ops::Deref for Both<'_> {
    type Target = dyn Directory;
    fn deref(&self) -> &Self::Target {
        self.dir
    }
}

impl Both<'_> {
    /// Appends and waits until durable.
    pub fn append_batch(&self, items: &[Append]) -> Result<(), StoreError> {
        wait_for(|done| self.log.append(items.to_vec(), done)).map(|_| ())
    }

    /// Deletes and waits until durable; returns how many existed.
    pub fn delete(&self, address: &Address, seqs: &[u64]) -> Result<usize, StoreError> {
        wait_for(|done| self.log.delete(*address, seqs.to_vec(), done))
    }

    /// [`MailboxLog::read_from`].
    pub fn read_from(
        &self,
        address: &Address,
        from_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.log.read_from(address, from_seq, limit, now_ms)
    }

    /// [`MailboxLog::usage`].
    pub fn usage(&self, address: &Address, now_ms: u64) -> Result<MailboxUsage, StoreError> {
        self.log.usage(address, now_ms)
    }

    /// [`MailboxLog::head_seq`].
    pub fn head_seq(&self, address: &Address) -> Result<u64, StoreError> {
        self.log.head_seq(address)
    }

    /// [`MailboxLog::oldest_seq`].
    pub fn oldest_seq(&self, address: &Address) -> Result<Option<u64>, StoreError> {
        self.log.oldest_seq(address)
    }

    /// [`MailboxLog::expire`].
    pub fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.log.expire(now_ms, limit)
    }

    /// Everything stored for `address`.
    pub fn export_mailbox(&self, address: &Address) -> Result<MailboxExport, StoreError> {
        export_mailbox(self.log, self.dir, address)
    }

    /// Merges `export` into both and waits until the log's half is durable.
    pub fn import_mailbox(&self, export: &MailboxExport) -> Result<(), StoreError> {
        wait_for(|done| import_mailbox(self.log, self.dir, export, done)).map(|_| ())
    }

    /// Removes everything of `address` but its deletion record.
    pub fn purge_mailbox(&self, address: &Address) -> Result<(), StoreError> {
        self.dir.purge_directory(address)?;
        wait_for(|done| self.log.drop_mailbox(*address, done)).map(|_| ())
    }

    /// Every address either store holds something for.
    pub fn addresses(&self, filter: &dyn Fn(&Address) -> bool) -> Result<Vec<Address>, StoreError> {
        let mut all: BTreeSet<Address> = self.dir.addresses(filter)?.into_iter().collect();
        all.extend(self.log.mailboxes(filter));
        Ok(all.into_iter().collect())
    }

    /// Syncs the directory and waits for the log.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.dir.sync()?;
        wait_for(|done| self.log.barrier(done)).map(|_| ())
    }
}
