//! `file put|get|status|delete`: large files, encrypted and resumable.

use std::path::{Path, PathBuf};

use anyhow::Context;
use backbone_client::{ClientError, FileFetcher, FileRef, FileSource};
use serde::Serialize;

use super::args::{FileCommand, ServerArgs};
use super::connect::{connect, connect_config};
use super::output::Output;
use super::token::Deleted;

/// The lines of `file put --json`, told apart by `event`: `announced` as
/// soon as the broker recorded the file (so an interrupted upload can be
/// resumed with its reference), then `uploaded`.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Put {
    Announced { reference: String },
    Uploaded { reference: String, path: String },
}

/// `file get --out PATH --json`.
#[derive(Serialize)]
struct Downloaded {
    out: String,
    size: u64,
}

/// `file status --json`.
#[derive(Serialize)]
struct Status {
    received: u64,
    size: u64,
    complete: bool,
}

/// `file ...`.
pub(crate) async fn file(output: Output, command: FileCommand) -> anyhow::Result<()> {
    let parse = |text: &str| {
        text.parse::<FileRef>()
            .context("file reference (as `file put` printed it)")
    };
    match command {
        FileCommand::Put {
            server,
            path,
            ttl,
            resume,
        } => {
            let source = FileSource::Path(path.clone());
            let resumed = resume.as_deref().map(parse).transpose()?;
            let client = connect(&server).await?;
            let reference = match resumed {
                Some(reference) => reference,
                None => {
                    let reference = client.announce_file(source.clone(), ttl).await?;
                    let announced = Put::Announced {
                        reference: reference.to_text(),
                    };
                    output.result(&announced, || reference.to_text())?;
                    reference
                }
            };
            if let Err(error) = client.resume_file_upload(&reference, source).await {
                let path = path.display();
                let context = match (&error, resumed) {
                    // The reference stays valid: the original content would
                    // still resume it.
                    (ClientError::SourceChanged, Some(_)) => format!(
                        "cannot resume: {path} is not what this reference was announced with; \
                         run `file put {path}` without --resume, which prints a new reference"
                    ),
                    (ClientError::SourceChanged, None) => {
                        // The reference printed above cannot be completed
                        // from the file as it is now: delete its file (best
                        // effort; it expires anyway) so it holds no quota.
                        let _ = client.delete_file(&reference.id).await;
                        format!(
                            "{path} changed during the upload; the reference printed is void \
                             and its file deleted: run `file put {path}` again"
                        )
                    }
                    _ => format!("uploading {path} (finish it with --resume and the reference)"),
                };
                return Err(anyhow::Error::new(error).context(context));
            }
            let uploaded = Put::Uploaded {
                reference: reference.to_text(),
                path: path.display().to_string(),
            };
            output.result(&uploaded, String::new)?;
            output.note(format_args!(
                "uploaded {}; the reference downloads and decrypts it: share it only with \
                 whoever should read the file",
                path.display()
            ));
        }
        FileCommand::Get {
            connect: connect_args,
            key,
            reference,
            out,
        } => {
            let reference = parse(&reference)?;
            if output.is_json() && out.is_none() {
                anyhow::bail!(
                    "`file get --json` needs --out: the file's content is not JSON, so it \
                     cannot go to standard output"
                );
            }
            let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = match &out {
                Some(path) => Box::new(
                    tokio::fs::File::create(part_path(path))
                        .await
                        .with_context(|| format!("creating {}", part_path(path).display()))?,
                ),
                None => Box::new(tokio::io::stdout()),
            };
            match key {
                Some(key) => {
                    let server = ServerArgs {
                        connect: connect_args,
                        key,
                    };
                    let client = connect(&server).await?;
                    client.get_file(&reference, &mut sink).await?;
                }
                None => {
                    FileFetcher::new(connect_config(&connect_args)?)
                        .get(&reference, &mut sink)
                        .await?;
                }
            }
            drop(sink);
            if let Some(path) = &out {
                std::fs::rename(part_path(path), path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                let downloaded = Downloaded {
                    out: path.display().to_string(),
                    size: std::fs::metadata(path)
                        .with_context(|| format!("reading {}", path.display()))?
                        .len(),
                };
                output.result(&downloaded, String::new)?;
            }
        }
        FileCommand::Status { server, reference } => {
            let reference = parse(&reference)?;
            let client = connect(&server).await?;
            let state = client.file_status(&reference.id).await?;
            let status = Status {
                received: state.received,
                size: state.size,
                complete: state.complete,
            };
            output.result(&status, || {
                format!(
                    "{} {} {}",
                    status.received,
                    status.size,
                    if status.complete {
                        "complete"
                    } else {
                        "incomplete"
                    }
                )
            })?;
        }
        FileCommand::Delete { server, reference } => {
            let parsed = parse(&reference)?;
            let client = connect(&server).await?;
            client.delete_file(&parsed.id).await?;
            let deleted = Deleted {
                reference,
                deleted: true,
            };
            output.result(&deleted, String::new)?;
            output.note("deleted the file");
        }
    }
    Ok(())
}

/// Where `file get --out PATH` writes until the download is complete.
fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}
