//! A FUSE filesystem that loses, on a simulated power cut, everything that
//! was never made durable: the idea of LazyFS, which Jepsen uses to find
//! missing fsyncs, for the broker's power-loss test (`client/tests/power_loss.rs`,
//! `scripts/power-loss`, `docs/reliability.md` "Power loss").
//!
//! # What it models
//!
//! A disk behind a volatile write cache, under the strict POSIX rules:
//!
//! - **Data.** A write is visible to every read at once, and durable only
//!   once an `fsync(2)` or `fdatasync(2)` of that file covers it (both make
//!   the file's contents and size durable). `close(2)` (FUSE `flush` and
//!   `release`) makes nothing durable, and neither does `sync_file_range(2)`:
//!   without a writeback cache the kernel writes through to the filesystem
//!   and has nothing left to send, so the model never hears of it. Sizes
//!   count as data: a truncation or an extension is undone by a cut unless
//!   the file was synced after it.
//! - **Names.** Creating, removing or renaming a file or directory is
//!   durable only once its directory is synced (`fsync` of a directory
//!   handle, FUSE `fsyncdir`); each directory on its own. A new file that
//!   was synced but whose directory was not is gone after a cut. This is the
//!   rule of fsync(2) ("Calling fsync() does not necessarily ensure that the
//!   entry in the directory containing the file has also reached disk"), and
//!   stricter than LazyFS, whose cache holds file data only. ext4 in
//!   `data=ordered` would commit such an entry with its next journal commit
//!   (every 5 s), but a store that relies on that is one unlucky second
//!   away from losing a file.
//! - **Everything else** (mode, owner, times) changes at once and survives
//!   a cut.
//!
//! A **power cut** throws away every change not yet durable: files go back to
//! their last synced contents and size, directories to their last synced
//! entries, and files whose creation was never made durable vanish. The
//! mount stays up and serves the durable state from then on; the kernel
//! caches nothing (zero TTLs, direct I/O), so it cannot serve anything older.
//!
//! Unlike LazyFS, which keeps its cache over a backing directory, the model
//! keeps the whole disk in memory: the durable state is then exactly what
//! the syncs covered, independent of the host filesystem's own caching; a
//! cut is a change in memory; and a test leaves nothing on the host disk.
//! The data of one test run (a few megabytes) fits easily.
//!
//! Only files and directories exist: no hard links, symlinks, device nodes,
//! extended attributes or locks through the filesystem (`flock` and POSIX
//! locks then work locally in the kernel, which is all one machine needs).
//! `fallocate` grows a file (mode 0) or does nothing (`FALLOC_FL_KEEP_SIZE`);
//! other modes are refused with `EOPNOTSUPP`.
//!
//! # Layout
//!
//! - [`disk`]: the model as a plain struct with no I/O ([`disk::Disk`]),
//!   tested deterministically.
//! - [`mount`]: the FUSE shell ([`mount::LossyFs`]) and the mount guard
//!   ([`mount::Mount`]) that tests use in-process: `power_cut()`,
//!   `sync_all()`, unmount on drop.
//! - The `backbone-lossyfs` binary mounts one and takes commands on a Unix
//!   socket (see its `--help`), for running a broker on it by hand.
//!
//! Mounting uses `fuser`'s pure-Rust path: as root it calls `mount(2)` itself
//! and needs neither libfuse nor `fusermount3`; it needs `/dev/fuse` and the
//! right to mount (root, or `CAP_SYS_ADMIN` in a container).

pub mod disk;
pub mod mount;

pub use disk::{CutReport, Disk, FsError, Usage};
pub use mount::{Mount, MountError};
