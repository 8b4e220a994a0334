//! The FUSE side: [`LossyFs`] answers the kernel's requests from a shared
//! [`Disk`], and [`Mount`] mounts it, cuts its power and unmounts it when
//! dropped.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::disk::{Attr, CutReport, Disk, FsError, Kind, SetAttr, Usage};

/// The kernel may cache nothing: after a cut, every lookup and every
/// attribute must come from the model again.
const TTL: Duration = Duration::ZERO;

/// Every open file bypasses the kernel's page cache. Reads then always see
/// the model (a page cached before a cut could otherwise outlive it), and
/// every write reaches the model at once. Without `FUSE_WRITEBACK_CACHE`
/// (never requested here) the kernel writes through anyway, so
/// `sync_file_range(2)` has nothing to send and the model never hears of it:
/// only `fsync`/`fdatasync` make data durable, as on a disk with a volatile
/// cache.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

/// Block size reported to `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// The filesystem the kernel talks to: a thin shell over the shared model.
#[derive(Debug, Clone)]
pub struct LossyFs {
    disk: Arc<Mutex<Disk>>,
}

impl LossyFs {
    /// A filesystem over `disk`.
    pub fn new(disk: Arc<Mutex<Disk>>) -> Self {
        Self { disk }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // The model stays consistent between calls: a panic inside one call
        // (a bug) must not take the whole mount down with poisoned locks.
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn errno(error: FsError) -> Errno {
    Errno::from_i32(error.errno())
}

fn file_attr(attr: &Attr) -> FileAttr {
    let (kind, nlink) = match attr.kind {
        Kind::File => (FileType::RegularFile, 1),
        Kind::Directory => (FileType::Directory, 2),
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind,
        perm: attr.perm,
        nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

fn time(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Permission bits of a `mode` after the caller's umask.
fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

fn reply_entry(reply: ReplyEntry, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
        Err(error) => reply.error(errno(error)),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
        Err(error) => reply.error(errno(error)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(error) => reply.error(errno(error)),
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.disk().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.disk().getattr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            perm: mode.map(|mode| perm(mode, 0)),
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        reply_attr(reply, self.disk().setattr(ino.0, &changes));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let owner = (req.uid(), req.gid());
        reply_entry(
            reply,
            self.disk().mkdir(parent.0, name, perm(mode, umask), owner),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.disk().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.disk().rmdir(parent.0, name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT are not modelled.
            return reply.error(errno(FsError::Unsupported));
        }
        reply_empty(
            reply,
            self.disk()
                .rename(parent.0, name, newparent.0, newname, no_replace),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC arrives as a separate setattr: the session does not ask
        // for FUSE_ATOMIC_O_TRUNC.
        match self.disk().open(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut disk = self.disk();
        let owner = (req.uid(), req.gid());
        let created = disk
            .create(parent.0, name, perm(mode, umask), owner)
            .and_then(|attr| disk.open(attr.ino).map(|()| attr));
        match created {
            Ok(attr) => reply.created(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(0),
                OPEN_FLAGS,
            ),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.disk().read(ino.0, offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.disk().write(ino.0, offset, data) {
            // FUSE writes are at most max_write (far below 4 GiB).
            Ok(()) => reply.written(data.len() as u32),
            Err(error) => reply.error(errno(error)),
        }
    }

    /// `close(2)` sends a flush: it makes nothing durable, as on a disk.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// The last close of a handle: makes nothing durable either.
    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.disk().release(ino.0);
        reply.ok();
    }

    /// `fsync(2)` and `fdatasync(2)` alike: the file's contents and size
    /// become durable (its name does not: that takes a sync of its directory).
    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.disk().fsync(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.disk().readdir(ino.0) {
            Ok(entries) => entries,
            Err(error) => return reply.error(errno(error)),
        };
        // `..` is given as the directory itself: the kernel fills in the real
        // parent for anything that looks at it, and the model keeps no parent
        // pointers.
        let dots = [
            (".".into(), ino.0, Kind::Directory),
            ("..".into(), ino.0, Kind::Directory),
        ];
        for (index, (name, child, kind)) in dots
            .into_iter()
            .chain(entries)
            .enumerate()
            .skip(offset as usize)
        {
            let kind = match kind {
                Kind::File => FileType::RegularFile,
                Kind::Directory => FileType::Directory,
            };
            // The offset handed back is where the next call resumes.
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// `fsync(2)` on a directory: its entries become durable.
    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.disk().fsync(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A nominal 1 TiB disk: the model lives in memory and has no real
        // limit, but programs that check free space need a sane answer.
        const BLOCKS: u64 = (1 << 40) / BLOCK as u64;
        const FILES: u64 = 1 << 32;
        let usage = self.disk().usage();
        let used = usage.bytes.div_ceil(u64::from(BLOCK));
        let free = BLOCKS.saturating_sub(used);
        let free_files = FILES.saturating_sub(usage.inodes);
        reply.statfs(BLOCKS, free, free, FILES, free_files, BLOCK, 255, BLOCK);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.disk().fallocate(ino.0, offset, length, mode));
    }
}

/// Why mounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// There is no FUSE device: the kernel lacks FUSE, or a container was
    /// started without `/dev/fuse`.
    #[error("/dev/fuse is missing: this machine or container offers no FUSE")]
    NoFuseDevice,
    /// The kernel refused the mount (no permission, no mount point, ...).
    #[error("mounting the lossy filesystem on {mountpoint} failed: {source}")]
    Mount {
        /// Where the mount was attempted.
        mountpoint: PathBuf,
        /// What the kernel (or fusermount) said.
        #[source]
        source: std::io::Error,
    },
}

/// A mounted lossy filesystem. Dropping it unmounts it, as
/// [`Mount::unmount`] does.
#[derive(Debug)]
pub struct Mount {
    disk: Arc<Mutex<Disk>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Mount {
    /// Mounts an empty lossy filesystem on `mountpoint` (an existing, empty
    /// directory), served by a background thread of this process.
    pub fn new(mountpoint: &Path) -> Result<Self, MountError> {
        if !Path::new("/dev/fuse").exists() {
            return Err(MountError::NoFuseDevice);
        }
        let disk = Arc::new(Mutex::new(Disk::new()));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("backbone-lossyfs".into()),
            MountOption::Subtype("lossyfs".into()),
            // The kernel checks permissions from the attributes, so the
            // model never has to.
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(LossyFs::new(disk.clone()), mountpoint, &config).map_err(
            |source| MountError::Mount {
                mountpoint: mountpoint.to_owned(),
                source,
            },
        )?;
        Ok(Self {
            disk,
            mountpoint: mountpoint.to_owned(),
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The power cut: everything not made durable is gone, at once. Stop the
    /// processes that use the mount first, and reap them: a process killed
    /// with SIGKILL in the middle of a FUSE request exits only once the
    /// request is answered, so after it is reaped none of its writes can
    /// land after the cut.
    pub fn power_cut(&self) -> CutReport {
        self.disk().power_cut()
    }

    /// Makes everything durable, like `sync(1)` followed by the disk
    /// emptying its cache.
    pub fn sync_all(&self) {
        self.disk().sync_all();
    }

    /// What the disk holds.
    pub fn usage(&self) -> Usage {
        self.disk().usage()
    }

    /// Whether the serving thread has ended (someone ran `umount`).
    pub fn is_finished(&self) -> bool {
        self.session
            .as_ref()
            .is_none_or(|session| session.guard.is_finished())
    }

    /// Unmounts and waits for the serving thread; if the mount is busy (a
    /// process still has a file open there), detaches it instead, so it goes
    /// away once that process lets go and nothing is left mounted.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let Err(error) = session.umount_and_join() else {
            return Ok(());
        };
        let lazy = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status()?;
        if lazy.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "unmounting {} failed ({error}), and so did umount -l ({lazy})",
                self.mountpoint.display()
            )))
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_now() {
            // Nothing better to do in a drop than to say so.
            eprintln!("backbone-lossyfs: {error}");
        }
    }
}
