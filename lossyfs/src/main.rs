//! `backbone-lossyfs`: mounts a lossy filesystem and takes commands on a
//! Unix socket. See the crate documentation for what it models.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use backbone_lossyfs::Mount;
use clap::Parser;

/// Mounts a filesystem that keeps every write not yet covered by
/// fsync/fdatasync (and every name change not covered by an fsync of its
/// directory) in a volatile cache, and throws that cache away on a simulated
/// power cut.
///
/// Commands, one line each on the control socket, each answered with one
/// line starting with `ok` or `error`:
///
///   cut       the power cut: everything not durable is gone
///   sync      make everything durable (like sync(1))
///   usage     inodes, bytes held, bytes not yet durable
///   unmount   unmount and exit
///
/// For example: `echo cut | socat - UNIX-CONNECT:/tmp/lossy.sock`.
/// `umount MOUNTPOINT` also ends it.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// An existing empty directory to mount on.
    mountpoint: PathBuf,
    /// Where to create the control socket.
    #[arg(long)]
    control: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mount = Mount::new(&args.mountpoint)?;
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .with_context(|| format!("binding {}", args.control.display()))?;
    // Accept without blocking, so an external `umount` (the serving thread
    // ends) also ends this loop.
    listener.set_nonblocking(true)?;
    println!(
        "mounted {}, control socket {}",
        args.mountpoint.display(),
        args.control.display()
    );
    let result = serve(&mount, &listener);
    let _ = std::fs::remove_file(&args.control);
    if !mount.is_finished() {
        mount.unmount().context("unmounting")?;
    }
    result
}

fn serve(mount: &Mount, listener: &UnixListener) -> anyhow::Result<()> {
    while !mount.is_finished() {
        match listener.accept() {
            Ok((stream, _)) => {
                if handle(mount, stream)? == Next::Unmount {
                    return Ok(());
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => return Err(error).context("accepting a control connection"),
        }
    }
    Ok(())
}

#[derive(PartialEq)]
enum Next {
    Continue,
    Unmount,
}

/// Answers the commands of one control connection until it closes.
fn handle(mount: &Mount, stream: UnixStream) -> anyhow::Result<Next> {
    stream.set_nonblocking(false)?;
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let answer = match line?.trim() {
            "cut" => {
                let report = mount.power_cut();
                format!(
                    "ok cut: {} files and {} directories reverted, {} inodes dropped, {} dirty bytes dropped",
                    report.files_reverted,
                    report.directories_reverted,
                    report.inodes_dropped,
                    report.dirty_bytes_dropped
                )
            }
            "sync" => {
                mount.sync_all();
                "ok synced".to_owned()
            }
            "usage" => {
                let usage = mount.usage();
                format!(
                    "ok inodes={} bytes={} dirty_bytes={}",
                    usage.inodes, usage.bytes, usage.dirty_bytes
                )
            }
            "unmount" => {
                writeln!(writer, "ok unmounting")?;
                return Ok(Next::Unmount);
            }
            other => format!("error unknown command {other:?} (cut, sync, usage, unmount)"),
        };
        writeln!(writer, "{answer}")?;
    }
    Ok(Next::Continue)
}
