//! The bytes of stored files: one plain file per id under
//! `<data_dir>/files/`, named by the id in hex, outside the directory's hot
//! path (the records are in the directory; see [`crate::cmd::files`] for
//! the service and the order of writes between records and bytes).

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use backbone_protocol::bytes::FileId;
use dashmap::DashSet;
use tracing::warn;

use super::prelude::*;

/// The directory of file bytes, and the uploads running now.
#[derive(Debug)]
pub struct Files {
    dir: PathBuf,
    uploading: DashSet<FileId>,
}

/// Marks one file as being uploaded until dropped.
pub(crate) struct UploadGuard<'a> {
    files: &'a Files,
    id: FileId,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.files.uploading.remove(&self.id);
    }
}

impl Files {
    /// Opens (creating) `<data_dir>/files`.
    pub fn open(data_dir: &Path) -> std::io::Result<Files> {
        let dir = data_dir.join("files");
        std::fs::create_dir_all(&dir)?;
        Ok(Files {
            dir,
            uploading: DashSet::new(),
        })
    }

    /// Where the bytes of `id` live.
    pub fn path(&self, id: &FileId) -> PathBuf {
        self.dir.join(hex::encode(id.0))
    }

    /// How many bytes of `id` are on disk.
    pub async fn held(&self, id: &FileId) -> std::io::Result<u64> {
        match tokio::fs::metadata(self.path(id)).await {
            Ok(metadata) => Ok(metadata.len()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Deletes the bytes of `id`, if any.
    pub fn remove(&self, id: &FileId) {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => warn!(%error, "cannot delete a file's bytes"),
        }
    }

    /// Deletes bytes whose record is gone (a crash between deleting a record
    /// and its bytes) and anything else that is not a file's bytes. Returns
    /// how many it deleted.
    pub fn remove_orphans(&self, store: &dyn Directory) -> anyhow::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|name| hex::decode(name).ok())
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .map(FileId);
            let orphan = match id {
                Some(id) => !store.file_exists(&id)?,
                None => true,
            };
            if orphan {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes a handed-over part of `id` at `offset` and makes it durable;
    /// offset 0 starts the file over. Parts must come in order. Blocking.
    pub fn write_part(&self, id: &FileId, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .open(self.path(id))?;
        let held = file.metadata()?.len();
        if offset != held {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a part at byte {offset} of a file holding {held}"),
            ));
        }
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)?;
        file.sync_data()
    }

    /// Reads up to `len` bytes of `id` from `offset`. Blocking.
    pub fn read_part(&self, id: &FileId, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(self.path(id))?;
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Marks `id` as being uploaded until the guard is dropped; `None` if
    /// an upload of it is running already.
    pub(crate) fn begin_upload(&self, id: FileId) -> Option<UploadGuard<'_>> {
        self.uploading
            .insert(id)
            .then_some(UploadGuard { files: self, id })
    }
}

/// Deletes the bytes of files whose records expired (the expiry sweep
/// deleted the records).
pub fn remove_expired(files: &Files, ids: &[FileId]) {
    for id in ids {
        files.remove(id);
    }
    metrics::counter!("backbone_files_expired_total").increment(ids.len() as u64);
}
