//! The model: a disk behind a volatile cache, as a plain struct with no I/O.
//!
//! Every inode has a *current* state, which reads see, and a *durable*
//! state, which is what a power cut leaves. Writes change only the current
//! state; [`Disk::fsync`] copies one inode's current state to its durable
//! state; [`Disk::power_cut`] throws every current state away.
//!
//! - A file's durable state is its contents and size. Writes go into dirty
//!   pages over the durable pages (copy on write, so a sync costs what was
//!   written since the last one, not the file's size).
//! - A directory's durable state is its set of entries (name to inode).
//!   Creating, removing or renaming an entry changes the current set only,
//!   so a new file that was synced but whose directory was not is gone after
//!   a cut, and an unlinked or renamed one is back. Each directory is synced
//!   on its own: a rename between two directories of which only the target
//!   was synced leaves the file under both names after a cut (POSIX promises
//!   nothing better, and a careful program syncs both).
//! - Attributes other than the size (mode, owner, times) change at once and
//!   survive a cut: no program here depends on them either way.
//!
//! Inode numbers are never reused, so the kernel can never mistake an inode
//! created after a cut for one that the cut took away.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

/// An inode number, as FUSE uses them.
pub type Ino = u64;

/// The root directory's inode number (fixed by FUSE).
pub const ROOT: Ino = 1;

/// The unit of copy on write.
const PAGE: u64 = 4096;

/// What an operation on the model can fail with; [`FsError::errno`] gives
/// the code the kernel passes on to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// No such inode, or no such name in the directory.
    #[error("no such file or directory")]
    NotFound,
    /// The name is taken.
    #[error("file exists")]
    Exists,
    /// A directory was needed.
    #[error("not a directory")]
    NotDirectory,
    /// A file was needed.
    #[error("is a directory")]
    IsDirectory,
    /// rmdir, or a rename over a directory, that still has entries.
    #[error("directory not empty")]
    NotEmpty,
    /// Meaningless arguments, such as moving a directory into itself.
    #[error("invalid argument")]
    Invalid,
    /// Something the model does not implement (a fallocate mode, an
    /// exchanging rename); the caller gets `EOPNOTSUPP`, never a silent no-op.
    #[error("operation not supported")]
    Unsupported,
}

impl FsError {
    /// The errno for this error.
    pub fn errno(self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::NotDirectory => libc::ENOTDIR,
            Self::IsDirectory => libc::EISDIR,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::Invalid => libc::EINVAL,
            Self::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

/// File or directory: the only kinds the model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// An inode's attributes, as `getattr` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// File or directory.
    pub kind: Kind,
    /// Size in bytes (a directory reports 0).
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access, as set by `setattr` (reads do not update it).
    pub atime: SystemTime,
    /// Last change of the contents.
    pub mtime: SystemTime,
    /// Last change of the inode.
    pub ctime: SystemTime,
}

/// The changes of one `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub perm: Option<u16>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size: truncates or extends with zeros.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SystemTime>,
    /// New modification time.
    pub mtime: Option<SystemTime>,
}

/// What a power cut threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose contents or size went back to their last sync.
    pub files_reverted: usize,
    /// Directories whose entries went back to their last sync.
    pub directories_reverted: usize,
    /// Inodes that no durable entry reached any more, dropped.
    pub inodes_dropped: usize,
    /// Bytes in dirty pages that were never synced.
    pub dirty_bytes_dropped: u64,
}

/// Counts for `statfs` and the control channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Inodes the model holds (current or durable).
    pub inodes: u64,
    /// Pages held, durable and dirty, times the page size.
    pub bytes: u64,
    /// Bytes in dirty pages (not yet synced).
    pub dirty_bytes: u64,
}

/// The disk: every inode, with its current and durable state.
#[derive(Debug)]
pub struct Disk {
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
}

#[derive(Debug)]
struct Inode {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Open handles: an unlinked file stays readable until the last closes.
    open: u32,
    body: Body,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Directory(DirData),
}

#[derive(Debug, Default)]
struct DirData {
    entries: BTreeMap<OsString, Ino>,
    durable: BTreeMap<OsString, Ino>,
}

type Page = Box<[u8]>;

/// A file's pages. A missing page reads as zeros (a hole).
#[derive(Debug, Default)]
struct FileData {
    size: u64,
    durable_size: u64,
    durable: BTreeMap<u64, Page>,
    /// Pages written since the last sync; they shadow `durable`.
    dirty: BTreeMap<u64, Page>,
    /// The lowest size the file was cut down to since the last sync: durable
    /// pages from there on are hidden (they read as zeros if the file grows
    /// again), and a sync drops them.
    truncated_to: Option<u64>,
}

impl FileData {
    /// The page as reads see it; `None` reads as zeros.
    fn page(&self, index: u64) -> Option<&Page> {
        if let Some(page) = self.dirty.get(&index) {
            return Some(page);
        }
        if self.truncated_to.is_some_and(|cut| index * PAGE >= cut) {
            return None;
        }
        self.durable.get(&index)
    }

    fn dirty_page(&mut self, index: u64) -> &mut Page {
        if !self.dirty.contains_key(&index) {
            let copy = self
                .page(index)
                .cloned()
                .unwrap_or_else(|| vec![0; PAGE as usize].into_boxed_slice());
            self.dirty.insert(index, copy);
        }
        self.dirty.get_mut(&index).expect("inserted above")
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let take = (PAGE as usize - within).min((end - at) as usize);
            match self.page(index) {
                Some(page) => out.extend_from_slice(&page[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            at += take as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let take = (PAGE as usize - within).min(data.len() - done);
            self.dirty_page(index)[within..within + take].copy_from_slice(&data[done..done + take]);
            done += take;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    /// Truncates or extends. Everything past `size` reads as zeros
    /// afterwards, which is what lets an extension just move the size.
    fn set_size(&mut self, size: u64) {
        if size < self.size {
            drop(self.dirty.split_off(&size.div_ceil(PAGE)));
            if !size.is_multiple_of(PAGE) {
                self.dirty_page(size / PAGE)[(size % PAGE) as usize..].fill(0);
            }
            self.truncated_to = Some(self.truncated_to.map_or(size, |cut| cut.min(size)));
        }
        self.size = size;
    }

    fn dirty_bytes(&self) -> u64 {
        self.dirty.len() as u64 * PAGE
    }

    fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.truncated_to.is_none() && self.size == self.durable_size
    }

    fn sync(&mut self) {
        if let Some(cut) = self.truncated_to.take() {
            drop(self.durable.split_off(&cut.div_ceil(PAGE)));
            if let Some(page) = self.durable.get_mut(&(cut / PAGE)) {
                page[(cut % PAGE) as usize..].fill(0);
            }
        }
        self.durable.append(&mut self.dirty);
        self.durable_size = self.size;
    }

    fn revert(&mut self) {
        self.dirty.clear();
        self.truncated_to = None;
        self.size = self.durable_size;
    }
}

impl Default for Disk {
    fn default() -> Self {
        Self::new()
    }
}

impl Disk {
    /// An empty disk: a root directory whose (empty) entries are durable.
    pub fn new() -> Self {
        let mut disk = Self {
            inodes: HashMap::new(),
            next_ino: ROOT,
        };
        disk.allocate(0o755, 0, 0, Body::Directory(DirData::default()));
        disk
    }

    fn allocate(&mut self, perm: u16, uid: u32, gid: u32, body: Body) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.inodes.insert(
            ino,
            Inode {
                perm,
                uid,
                gid,
                atime: now,
                mtime: now,
                ctime: now,
                open: 0,
                body,
            },
        );
        ino
    }

    fn inode(&self, ino: Ino) -> Result<&Inode, FsError> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn inode_mut(&mut self, ino: Ino) -> Result<&mut Inode, FsError> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn file(&self, ino: Ino) -> Result<&FileData, FsError> {
        match &self.inode(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Directory(_) => Err(FsError::IsDirectory),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> Result<&mut FileData, FsError> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Directory(_) => Err(FsError::IsDirectory),
        }
    }

    fn dir(&self, ino: Ino) -> Result<&DirData, FsError> {
        match &self.inode(ino)?.body {
            Body::Directory(dir) => Ok(dir),
            Body::File(_) => Err(FsError::NotDirectory),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut DirData, FsError> {
        match &mut self.inode_mut(ino)?.body {
            Body::Directory(dir) => Ok(dir),
            Body::File(_) => Err(FsError::NotDirectory),
        }
    }

    fn touch(&mut self, ino: Ino) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            inode.mtime = now;
            inode.ctime = now;
        }
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        let inode = self.inode(ino)?;
        let (kind, size) = match &inode.body {
            Body::File(file) => (Kind::File, file.size),
            Body::Directory(_) => (Kind::Directory, 0),
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
        })
    }

    /// The attributes of the entry `name` in the directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        let ino = *self
            .dir(parent)?
            .entries
            .get(name)
            .ok_or(FsError::NotFound)?;
        self.getattr(ino)
    }

    /// The entries of a directory, sorted by name (without `.` and `..`).
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(OsString, Ino, Kind)>, FsError> {
        self.dir(ino)?
            .entries
            .iter()
            .map(|(name, &child)| Ok((name.clone(), child, self.getattr(child)?.kind)))
            .collect()
    }

    fn add_entry(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        owner: (u32, u32),
        body: Body,
    ) -> Result<Attr, FsError> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.allocate(perm, owner.0, owner.1, body);
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch(parent);
        self.getattr(ino)
    }

    /// Creates an empty file `name` in `parent`, owned by `owner` (uid, gid).
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        owner: (u32, u32),
    ) -> Result<Attr, FsError> {
        let body = Body::File(FileData::default());
        self.add_entry(parent, name, perm, owner, body)
    }

    /// Creates an empty directory `name` in `parent`.
    pub fn mkdir(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        owner: (u32, u32),
    ) -> Result<Attr, FsError> {
        let body = Body::Directory(DirData::default());
        self.add_entry(parent, name, perm, owner, body)
    }

    /// Counts an open handle: an unlinked file lives until its last release.
    pub fn open(&mut self, ino: Ino) -> Result<(), FsError> {
        self.inode_mut(ino)?.open += 1;
        Ok(())
    }

    /// Drops an open handle (and the inode, if nothing refers to it any more).
    pub fn release(&mut self, ino: Ino) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.open = inode.open.saturating_sub(1);
            self.collect(ino);
        }
    }

    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    pub fn read(&self, ino: Ino, offset: u64, len: u64) -> Result<Vec<u8>, FsError> {
        Ok(self.file(ino)?.read(offset, len))
    }

    /// Writes `data` at `offset`, growing the file if it ends past its size
    /// (a gap reads as zeros). Visible at once, durable only after a sync.
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), FsError> {
        offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::Invalid)?;
        self.file_mut(ino)?.write(offset, data);
        self.touch(ino);
        Ok(())
    }

    /// Applies `changes` and returns the new attributes.
    pub fn setattr(&mut self, ino: Ino, changes: &SetAttr) -> Result<Attr, FsError> {
        if let Some(size) = changes.size {
            self.file_mut(ino)?.set_size(size);
            self.touch(ino);
        }
        let inode = self.inode_mut(ino)?;
        if let Some(perm) = changes.perm {
            inode.perm = perm;
        }
        if let Some(uid) = changes.uid {
            inode.uid = uid;
        }
        if let Some(gid) = changes.gid {
            inode.gid = gid;
        }
        if let Some(atime) = changes.atime {
            inode.atime = atime;
        }
        if let Some(mtime) = changes.mtime {
            inode.mtime = mtime;
        }
        inode.ctime = SystemTime::now();
        self.getattr(ino)
    }

    /// `fallocate(2)`: mode 0 grows the file to at least `offset + len`
    /// (allocation itself is not modelled, so the new range reads as zeros
    /// like any extension); with `keep_size` it changes nothing. Other modes
    /// (punching or zeroing holes, collapsing) are refused as unsupported.
    pub fn fallocate(&mut self, ino: Ino, offset: u64, len: u64, mode: i32) -> Result<(), FsError> {
        let end = offset.checked_add(len).ok_or(FsError::Invalid)?;
        let file = self.file_mut(ino)?;
        match mode {
            0 if end > file.size => file.set_size(end),
            0 => {}
            libc::FALLOC_FL_KEEP_SIZE => {}
            _ => return Err(FsError::Unsupported),
        }
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file, or `fsync` of a directory: makes the
    /// inode's current state durable (a file's contents and size; a
    /// directory's entries, not the inodes they name).
    pub fn fsync(&mut self, ino: Ino) -> Result<(), FsError> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(file) => file.sync(),
            Body::Directory(dir) => dir.durable = dir.entries.clone(),
        }
        Ok(())
    }

    /// Syncs every inode, as `sync(1)` would: the whole current state
    /// becomes durable.
    pub fn sync_all(&mut self) {
        let all: Vec<Ino> = self.inodes.keys().copied().collect();
        for ino in all {
            self.fsync(ino).expect("listed inode");
        }
    }

    /// Removes the file entry `name` from `parent`.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?.ino;
        self.file(ino)?;
        self.remove_entry(parent, name, ino)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?.ino;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(FsError::NotEmpty);
        }
        self.remove_entry(parent, name, ino)
    }

    fn remove_entry(&mut self, parent: Ino, name: &OsStr, ino: Ino) -> Result<(), FsError> {
        self.dir_mut(parent)?.entries.remove(name);
        self.touch(parent);
        if let Ok(inode) = self.inode_mut(ino) {
            inode.ctime = SystemTime::now();
        }
        self.collect(ino);
        Ok(())
    }

    /// `rename(2)`: moves `name` in `parent` to `new_name` in `new_parent`,
    /// replacing what is there unless `no_replace`.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let moved = self.lookup(parent, name)?;
        let replaced = match self.dir(new_parent)?.entries.get(new_name) {
            None => None,
            Some(_) if no_replace => return Err(FsError::Exists),
            Some(&target) => Some(self.getattr(target)?),
        };
        if let Some(target) = &replaced {
            if target.ino == moved.ino {
                // The same inode under both names: POSIX says do nothing.
                return Ok(());
            }
            match (moved.kind, target.kind) {
                (Kind::Directory, Kind::File) => return Err(FsError::NotDirectory),
                (Kind::File, Kind::Directory) => return Err(FsError::IsDirectory),
                (Kind::Directory, Kind::Directory) if !self.dir(target.ino)?.entries.is_empty() => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
        }
        if moved.kind == Kind::Directory && self.is_within(new_parent, moved.ino) {
            return Err(FsError::Invalid);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), moved.ino);
        self.touch(parent);
        self.touch(new_parent);
        if let Some(target) = replaced {
            self.collect(target.ino);
        }
        Ok(())
    }

    /// Whether `ino` is `ancestor` or below it in the current tree.
    fn is_within(&self, ino: Ino, ancestor: Ino) -> bool {
        let mut stack = vec![ancestor];
        while let Some(next) = stack.pop() {
            if next == ino {
                return true;
            }
            if let Ok(dir) = self.dir(next) {
                stack.extend(dir.entries.values().copied());
            }
        }
        false
    }

    /// Drops `ino` if no handle is open and no directory entry, current or
    /// durable, names it: nothing can reach it again, not even after a cut.
    fn collect(&mut self, ino: Ino) {
        if ino == ROOT || self.inodes.get(&ino).is_none_or(|inode| inode.open > 0) {
            return;
        }
        let named = self.inodes.values().any(|inode| match &inode.body {
            Body::Directory(dir) => {
                dir.entries.values().any(|&child| child == ino)
                    || dir.durable.values().any(|&child| child == ino)
            }
            Body::File(_) => false,
        });
        if !named {
            self.inodes.remove(&ino);
        }
    }

    /// The power cut: every inode goes back to its durable state, and the
    /// inodes that durable entries no longer reach from the root are gone.
    pub fn power_cut(&mut self) -> CutReport {
        let mut report = CutReport::default();
        for inode in self.inodes.values_mut() {
            inode.open = 0;
            match &mut inode.body {
                Body::File(file) => {
                    if !file.is_clean() {
                        report.files_reverted += 1;
                        report.dirty_bytes_dropped += file.dirty_bytes();
                    }
                    file.revert();
                }
                Body::Directory(dir) => {
                    if dir.entries != dir.durable {
                        report.directories_reverted += 1;
                        dir.entries = dir.durable.clone();
                    }
                }
            }
        }
        let mut reachable = HashSet::from([ROOT]);
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if let Ok(dir) = self.dir(ino) {
                for &child in dir.entries.values() {
                    if reachable.insert(child) {
                        stack.push(child);
                    }
                }
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| reachable.contains(ino));
        report.inodes_dropped = before - self.inodes.len();
        report
    }

    /// What the disk holds.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage {
            inodes: self.inodes.len() as u64,
            ..Usage::default()
        };
        for inode in self.inodes.values() {
            if let Body::File(file) = &inode.body {
                usage.dirty_bytes += file.dirty_bytes();
                usage.bytes += file.durable.len() as u64 * PAGE + file.dirty_bytes();
            }
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OWNER: (u32, u32) = (0, 0);

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// A disk with a durable file `f` in the root holding `contents`.
    fn disk_with_synced_file(contents: &[u8]) -> (Disk, Ino) {
        let mut disk = Disk::new();
        let f = disk
            .create(ROOT, name("f"), 0o644, OWNER)
            .expect("create")
            .ino;
        disk.write(f, 0, contents).expect("write");
        disk.fsync(f).expect("fsync file");
        disk.fsync(ROOT).expect("fsync dir");
        (disk, f)
    }

    /// Truncates or extends, as `ftruncate(2)` does.
    fn set_size(disk: &mut Disk, ino: Ino, size: u64) {
        let changes = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        disk.setattr(ino, &changes).expect("set size");
    }

    fn contents(disk: &Disk, ino: Ino) -> Vec<u8> {
        disk.read(ino, 0, u64::MAX).expect("read")
    }

    fn names(disk: &Disk, dir: Ino) -> Vec<String> {
        let entries = disk.readdir(dir).expect("readdir");
        entries
            .into_iter()
            .map(|(name, _, _)| name.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn writes_are_read_at_once_and_lost_in_a_cut_without_an_fsync() {
        let (mut disk, f) = disk_with_synced_file(b"durable");
        disk.write(f, 7, b" and more").expect("write");
        assert_eq!(contents(&disk, f), b"durable and more");
        let report = disk.power_cut();
        assert_eq!(contents(&disk, f), b"durable");
        assert_eq!(
            report,
            CutReport {
                files_reverted: 1,
                directories_reverted: 0,
                inodes_dropped: 0,
                dirty_bytes_dropped: PAGE,
            }
        );
    }

    #[test]
    fn an_fsync_keeps_what_was_written_before_it_and_nothing_after() {
        let (mut disk, f) = disk_with_synced_file(b"");
        disk.write(f, 0, b"first").expect("write");
        disk.fsync(f).expect("fsync");
        disk.write(f, 0, b"FIRST, second").expect("write");
        disk.power_cut();
        assert_eq!(contents(&disk, f), b"first");
        assert!(
            disk.power_cut() == CutReport::default(),
            "a second cut finds nothing"
        );
    }

    #[test]
    fn sparse_writes_read_zeros_in_the_gap_before_and_after_a_cut() {
        let (mut disk, f) = disk_with_synced_file(b"head");
        disk.write(f, 3 * PAGE + 10, b"tail").expect("write");
        let expected = [b"head".as_slice(), &vec![0; 3 * PAGE as usize + 6], b"tail"].concat();
        assert_eq!(contents(&disk, f), expected);
        assert_eq!(disk.getattr(f).expect("attr").size, 3 * PAGE + 14);
        disk.fsync(f).expect("fsync");
        disk.power_cut();
        assert_eq!(contents(&disk, f), expected);
    }

    #[test]
    fn a_truncation_is_undone_by_a_cut_unless_synced() {
        let (mut disk, f) = disk_with_synced_file(&[7; 10_000]);
        set_size(&mut disk, f, 5);
        assert_eq!(contents(&disk, f), [7; 5]);
        disk.power_cut();
        assert_eq!(contents(&disk, f), [7; 10_000]);

        set_size(&mut disk, f, 5);
        disk.fsync(f).expect("fsync");
        disk.power_cut();
        assert_eq!(contents(&disk, f), [7; 5]);
    }

    #[test]
    fn a_file_cut_down_and_grown_again_reads_zeros_where_the_old_bytes_were() {
        let (mut disk, f) = disk_with_synced_file(&[7; 10_000]);
        set_size(&mut disk, f, 5);
        set_size(&mut disk, f, 9_000);
        disk.write(f, 8_000, b"x").expect("write");
        let mut expected = vec![0; 9_000];
        expected[..5].fill(7);
        expected[8_000] = b'x';
        assert_eq!(contents(&disk, f), expected);
        disk.fsync(f).expect("fsync");
        disk.power_cut();
        assert_eq!(contents(&disk, f), expected);
    }

    #[test]
    fn fallocate_grows_the_file_unless_asked_to_keep_its_size() {
        let (mut disk, f) = disk_with_synced_file(b"abc");
        disk.fallocate(f, 0, 100, libc::FALLOC_FL_KEEP_SIZE)
            .expect("keep size");
        assert_eq!(disk.getattr(f).expect("attr").size, 3);
        disk.fallocate(f, 50, 50, 0).expect("grow");
        assert_eq!(contents(&disk, f), [b"abc".as_slice(), &[0; 97]].concat());
        assert_eq!(
            disk.fallocate(
                f,
                0,
                10,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            ),
            Err(FsError::Unsupported)
        );
        disk.power_cut();
        assert_eq!(contents(&disk, f), b"abc", "the growth was never synced");
    }

    #[test]
    fn a_new_file_survives_a_cut_only_once_its_directory_is_synced() {
        let mut disk = Disk::new();
        let f = disk
            .create(ROOT, name("new"), 0o644, OWNER)
            .expect("create")
            .ino;
        disk.write(f, 0, b"data").expect("write");
        disk.fsync(f).expect("fsync file");
        let report = disk.power_cut();
        assert_eq!(names(&disk, ROOT), Vec::<String>::new());
        assert_eq!((report.directories_reverted, report.inodes_dropped), (1, 1));
        assert_eq!(disk.getattr(f), Err(FsError::NotFound));

        let f = disk
            .create(ROOT, name("new"), 0o644, OWNER)
            .expect("create")
            .ino;
        disk.write(f, 0, b"data").expect("write");
        disk.fsync(ROOT).expect("fsync dir");
        disk.power_cut();
        assert_eq!(names(&disk, ROOT), ["new"]);
        assert_eq!(
            contents(&disk, f),
            b"",
            "the entry was synced, the data was not"
        );
    }

    #[test]
    fn a_synced_directory_entry_does_not_make_the_new_directorys_entries_durable() {
        let mut disk = Disk::new();
        let sub = disk
            .mkdir(ROOT, name("sub"), 0o755, OWNER)
            .expect("mkdir")
            .ino;
        disk.create(sub, name("f"), 0o644, OWNER).expect("create");
        disk.fsync(ROOT).expect("fsync root");
        disk.power_cut();
        assert_eq!(names(&disk, ROOT), ["sub"]);
        assert_eq!(names(&disk, sub), Vec::<String>::new());
    }

    #[test]
    fn unlinks_and_renames_are_undone_by_a_cut_unless_the_directory_is_synced() {
        let (mut disk, f) = disk_with_synced_file(b"data");
        disk.create(ROOT, name("g"), 0o644, OWNER).expect("create");
        disk.fsync(ROOT).expect("fsync");
        disk.unlink(ROOT, name("g")).expect("unlink");
        disk.rename(ROOT, name("f"), ROOT, name("renamed"), false)
            .expect("rename");
        assert_eq!(names(&disk, ROOT), ["renamed"]);
        disk.power_cut();
        assert_eq!(names(&disk, ROOT), ["f", "g"]);
        assert_eq!(contents(&disk, f), b"data");

        disk.rename(ROOT, name("f"), ROOT, name("g"), false)
            .expect("rename over");
        disk.fsync(ROOT).expect("fsync");
        disk.power_cut();
        assert_eq!(names(&disk, ROOT), ["g"]);
        assert_eq!(disk.lookup(ROOT, name("g")).expect("g").ino, f);
    }

    #[test]
    fn a_rename_between_directories_is_durable_in_each_directory_on_its_own() {
        let mut disk = Disk::new();
        let a = disk
            .mkdir(ROOT, name("a"), 0o755, OWNER)
            .expect("mkdir")
            .ino;
        let b = disk
            .mkdir(ROOT, name("b"), 0o755, OWNER)
            .expect("mkdir")
            .ino;
        let f = disk.create(a, name("f"), 0o644, OWNER).expect("create").ino;
        disk.sync_all();
        disk.rename(a, name("f"), b, name("f"), false)
            .expect("rename");
        disk.fsync(b).expect("fsync target only");
        disk.power_cut();
        assert_eq!(disk.lookup(a, name("f")).expect("still in a").ino, f);
        assert_eq!(disk.lookup(b, name("f")).expect("also in b").ino, f);
    }

    #[test]
    fn namespace_errors_are_the_posix_ones() {
        let (mut disk, _) = disk_with_synced_file(b"");
        let sub = disk
            .mkdir(ROOT, name("sub"), 0o755, OWNER)
            .expect("mkdir")
            .ino;
        disk.create(sub, name("inner"), 0o644, OWNER)
            .expect("create");
        let cases = [
            (
                disk.lookup(ROOT, name("missing")).map(|_| ()),
                FsError::NotFound,
            ),
            (
                disk.create(ROOT, name("f"), 0o644, OWNER).map(|_| ()),
                FsError::Exists,
            ),
            (
                disk.mkdir(ROOT, name("sub"), 0o755, OWNER).map(|_| ()),
                FsError::Exists,
            ),
            (disk.unlink(ROOT, name("sub")), FsError::IsDirectory),
            (disk.rmdir(ROOT, name("f")), FsError::NotDirectory),
            (disk.rmdir(ROOT, name("sub")), FsError::NotEmpty),
            (
                disk.rename(ROOT, name("f"), ROOT, name("sub"), false),
                FsError::IsDirectory,
            ),
            (
                disk.rename(ROOT, name("sub"), sub, name("x"), false),
                FsError::Invalid,
            ),
            (
                disk.rename(ROOT, name("f"), sub, name("inner"), true),
                FsError::Exists,
            ),
            (
                disk.create(
                    disk.lookup(ROOT, name("f")).expect("f").ino,
                    name("x"),
                    0o644,
                    OWNER,
                )
                .map(|_| ()),
                FsError::NotDirectory,
            ),
        ];
        for (index, (result, expected)) in cases.into_iter().enumerate() {
            assert_eq!(result, Err(expected), "case {index}");
        }
    }

    #[test]
    fn an_unlinked_open_file_stays_readable_until_released() {
        let (mut disk, f) = disk_with_synced_file(b"data");
        disk.open(f).expect("open");
        disk.unlink(ROOT, name("f")).expect("unlink");
        disk.fsync(ROOT).expect("fsync");
        assert_eq!(contents(&disk, f), b"data");
        disk.release(f);
        assert_eq!(disk.read(f, 0, 4), Err(FsError::NotFound));
        assert_eq!(disk.usage().inodes, 1, "only the root is left");
    }

    #[test]
    fn sync_all_makes_everything_durable() {
        let mut disk = Disk::new();
        let sub = disk
            .mkdir(ROOT, name("sub"), 0o755, OWNER)
            .expect("mkdir")
            .ino;
        let f = disk
            .create(sub, name("f"), 0o644, OWNER)
            .expect("create")
            .ino;
        disk.write(f, 0, b"data").expect("write");
        assert_eq!(disk.usage().dirty_bytes, PAGE);
        disk.sync_all();
        assert_eq!(disk.usage().dirty_bytes, 0);
        assert_eq!(disk.power_cut(), CutReport::default());
        assert_eq!(
            contents(&disk, disk.lookup(sub, name("f")).expect("f").ino),
            b"data"
        );
    }

    /// One operation on a single file, for the property test below.
    #[derive(Clone, Debug)]
    enum FileOp {
        Write { offset: u64, len: usize, byte: u8 },
        SetSize(u64),
        Grow { offset: u64, len: u64 },
        Sync,
        Cut,
    }

    fn file_op() -> impl Strategy<Value = FileOp> {
        // Offsets around a few pages, so writes, holes and truncations
        // cross page boundaries often.
        let offset = 0..3 * PAGE + 100;
        prop_oneof![
            4 => (offset.clone(), 1..2 * PAGE as usize, any::<u8>())
                .prop_map(|(offset, len, byte)| FileOp::Write { offset, len, byte }),
            2 => offset.clone().prop_map(FileOp::SetSize),
            1 => (offset, 0..PAGE).prop_map(|(offset, len)| FileOp::Grow { offset, len }),
            2 => Just(FileOp::Sync),
            1 => Just(FileOp::Cut),
        ]
    }

    proptest! {
        /// The paged file against a reference of two plain byte vectors,
        /// the current and the durable contents.
        #[test]
        fn a_file_matches_a_reference_of_current_and_durable_bytes(
            ops in proptest::collection::vec(file_op(), 1..40)
        ) {
            let (mut disk, f) = disk_with_synced_file(b"");
            let (mut current, mut durable) = (Vec::<u8>::new(), Vec::<u8>::new());
            for op in ops {
                match op {
                    FileOp::Write { offset, len, byte } => {
                        disk.write(f, offset, &vec![byte; len]).expect("write");
                        let end = offset as usize + len;
                        if current.len() < end {
                            current.resize(end, 0);
                        }
                        current[offset as usize..end].fill(byte);
                    }
                    FileOp::SetSize(size) => {
                        set_size(&mut disk, f, size);
                        current.resize(size as usize, 0);
                    }
                    FileOp::Grow { offset, len } => {
                        disk.fallocate(f, offset, len, 0).expect("fallocate");
                        let end = (offset + len) as usize;
                        if current.len() < end {
                            current.resize(end, 0);
                        }
                    }
                    FileOp::Sync => {
                        disk.fsync(f).expect("fsync");
                        durable = current.clone();
                    }
                    FileOp::Cut => {
                        disk.power_cut();
                        current = durable.clone();
                    }
                }
                prop_assert_eq!(contents(&disk, f), current.clone());
                prop_assert_eq!(disk.getattr(f).expect("attr").size, current.len() as u64);
            }
            disk.power_cut();
            prop_assert_eq!(contents(&disk, f), durable);
        }
    }
}
