//! The lossy filesystem mounted for real: the kernel's requests (create,
//! write, fsync, fdatasync, fsync of a directory, rename, truncate) reach
//! the model, and a power cut takes away what they left volatile. Each test
//! skips, saying so on stderr, where FUSE is missing or mounting is refused.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backbone_lossyfs::{Mount, MountError};

/// Mounts on `dir`, or explains on stderr why the test is skipped. Written
/// to the stderr handle itself, which the test harness does not capture, so
/// a skip shows in a normal `cargo test` run.
fn mount_or_skip(dir: &Path, test: &str) -> Option<Mount> {
    match Mount::new(dir) {
        Ok(mount) => Some(mount),
        Err(error @ (MountError::NoFuseDevice | MountError::Mount { .. })) => {
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {error}");
            None
        }
    }
}

fn fsync_dir(path: &Path) {
    File::open(path)
        .expect("open directory")
        .sync_all()
        .expect("fsync directory");
}

#[test]
fn a_power_cut_keeps_exactly_what_fsync_and_directory_fsync_covered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mount) = mount_or_skip(
        dir.path(),
        "a_power_cut_keeps_exactly_what_fsync_and_directory_fsync_covered",
    ) else {
        return;
    };
    let root = mount.mountpoint().to_owned();
    let store = root.join("store");
    std::fs::create_dir(&store).expect("mkdir");

    // A log whose first record is synced with fdatasync, the second not.
    let mut log = File::create(store.join("log")).expect("create");
    log.write_all(b"record 1;").expect("write");
    log.sync_data().expect("fdatasync");
    log.write_all(b"record 2;").expect("write");
    // A file whose data is synced but whose name never is.
    let orphan = File::create(store.join("orphan")).expect("create");
    orphan.write_all_at(b"data", 0).expect("write");
    orphan.sync_all().expect("fsync");
    drop(orphan);
    fsync_dir(&store);
    fsync_dir(&root);
    // Made after the directory sync: a rename and a new name, never synced.
    std::fs::rename(store.join("log"), store.join("log.old")).expect("rename");
    File::create(store.join("late")).expect("create late");
    // A truncation of a synced file, never synced.
    let mut synced = File::create(root.join("synced")).expect("create");
    synced.write_all(&[7; 10_000]).expect("write");
    synced.sync_all().expect("fsync");
    fsync_dir(&root);
    synced.set_len(3).expect("truncate");
    assert_eq!(std::fs::read(root.join("synced")).expect("read"), [7; 3]);
    assert_eq!(
        std::fs::read(store.join("log.old")).expect("read"),
        b"record 1;record 2;"
    );
    drop((log, synced));

    let report = mount.power_cut();

    assert_eq!(
        std::fs::read(store.join("log")).expect("log is back under its old name"),
        b"record 1;"
    );
    assert!(
        !store.join("log.old").exists(),
        "the rename was never synced"
    );
    assert!(!store.join("late").exists(), "its name was never synced");
    assert_eq!(
        std::fs::read(store.join("orphan")).expect("read"),
        b"data",
        "synced data under a name synced later"
    );
    assert_eq!(
        std::fs::read(root.join("synced")).expect("read"),
        [7; 10_000]
    );
    assert_eq!(
        (report.files_reverted, report.directories_reverted),
        (2, 1),
        "{report:?}"
    );

    // The mount goes on working after the cut.
    std::fs::write(store.join("after"), b"x").expect("write after the cut");
    mount.unmount().expect("unmount");
}

/// Whether anything is mounted on `path`.
fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|line| line.split(' ').nth(4) == path.to_str())
}

/// Kills the binary and detaches its mount if a test fails halfway (the
/// binary may also have exited and left the mount behind).
struct ChildGuard {
    child: Child,
    mountpoint: std::path::PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

fn command(socket: &Path, line: &str) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    writeln!(stream, "{line}").expect("send");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    answer.trim().to_owned()
}

/// The binary's control socket; its unmount also succeeds while a file on
/// the mount is still open.
#[test]
fn the_binary_cuts_and_unmounts_on_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).expect("mkdir");
    // Probe first, so the skip message is the same as the other test's.
    let Some(probe) = mount_or_skip(&mountpoint, "the_binary_cuts_and_unmounts_on_command") else {
        return;
    };
    probe.unmount().expect("unmount the probe");
    let socket = dir.path().join("control.sock");
    let mut guard = ChildGuard {
        child: Command::new(env!("CARGO_BIN_EXE_backbone-lossyfs"))
            .arg(&mountpoint)
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start backbone-lossyfs"),
        mountpoint: mountpoint.clone(),
    };
    let mut ready = String::new();
    BufReader::new(guard.child.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    assert!(ready.starts_with("mounted "), "{ready:?}");

    std::fs::write(mountpoint.join("kept"), b"kept").expect("write");
    assert_eq!(command(&socket, "sync"), "ok synced");
    let mut file = OpenOptions::new()
        .append(true)
        .open(mountpoint.join("kept"))
        .expect("open");
    file.write_all(b" and lost").expect("write");
    drop(file);
    std::fs::write(mountpoint.join("lost"), b"lost").expect("write");
    assert_eq!(
        command(&socket, "cut"),
        "ok cut: 2 files and 1 directories reverted, 1 inodes dropped, 8192 dirty bytes dropped"
    );
    assert_eq!(
        std::fs::read(mountpoint.join("kept")).expect("read"),
        b"kept"
    );
    assert!(!mountpoint.join("lost").exists());
    assert!(command(&socket, "usage").starts_with("ok inodes=2 "));
    assert!(command(&socket, "bogus").starts_with("error unknown command"));

    // A file still open makes the mount busy: it must be detached anyway.
    let held = File::open(mountpoint.join("kept")).expect("open");
    assert_eq!(command(&socket, "unmount"), "ok unmounting");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = guard.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "backbone-lossyfs did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&mountpoint), "still mounted");
    drop(held);
}
