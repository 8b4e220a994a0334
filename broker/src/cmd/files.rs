//! The file service: create, upload (resumable), download, status, delete,
//! expiry (see `backbone_protocol::file` for the protocol).
//!
//! A file's record is in the store (`files`, indexed by owner and expiry);
//! its bytes are one plain file per id under `<data_dir>/files/`, named by
//! the id in hex, outside sled's hot path. The bytes are written as they
//! arrive; how many the broker holds is the length of that file, so an
//! upload resumes where the disk copy ends without a store write per
//! chunk. The content hash, checked over the whole disk copy when the last
//! byte arrives, catches anything a crash left half-written: on a mismatch
//! the bytes are discarded and the upload starts over.
//!
//! Order of writes: a record is written before its bytes exist and deleted
//! before its bytes are, so bytes never outlive their record except after a
//! crash between the two; [`crate::store::Files::remove_orphans`] deletes those at start.
//!
//! Ids route like addresses (drawn in the owner's slot), so a download
//! asked of a node that does not hold the file is answered with a
//! `Redirect` to the node that does; the client downloads there.
//!
//! Secrets are never logged; only their hash is stored.

use std::io::SeekFrom;

use std::sync::Arc;

use backbone_protocol::ErrorCode;
use backbone_protocol::bytes::{FileId, Text};
use backbone_protocol::codec::{self, Phase};
use backbone_protocol::file::{UploadError, upload_room};
use backbone_protocol::frame::{
    CreateFile, DeleteFile, Done, DownloadFile, ErrorFrame, FileCreated, FileData, FileState,
    FileStatus, Redirect, UploadFile,
};
use backbone_protocol::{Address, Frame};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tracing::warn;

use crate::cmd::Caller;
use crate::fleet::Route;
use crate::shared::Shared;
use crate::store::{FilePut, FileQuota, StoredFile};
use crate::wire::{FrameReader, ReadError};

/// Bytes read from disk or a stream at a time.
const CHUNK: usize = 256 * 1024;

/// Largest header frame on a file stream.
const MAX_HEADER_LEN: usize = 4096;

/// Why a request failed: a stable code and a message for people.
type Refusal = (ErrorCode, String);

fn error_frame(request_id: u64, (code, message): Refusal) -> Frame {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(ErrorFrame::new(request_id, code, message))
}

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    (code, message.into())
}

fn storage(error: crate::store::StoreError) -> Refusal {
    warn!(%error, "file storage failed");
    (ErrorCode::StorageFailure, error.to_string())
}

fn disk(error: std::io::Error) -> Refusal {
    warn!(%error, "file bytes could not be read or written");
    (ErrorCode::StorageFailure, format!("file storage: {error}"))
}

/// Runs blocking storage work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| {
            refusal(
                ErrorCode::Internal,
                format!("blocking task failed: {error}"),
            )
        })?
        .map_err(storage)
}

/// The owner's unexpired file `id`, or `NotFound` (also when another
/// identity owns it: an owner-only request says nothing of other files).
async fn owned(shared: &Shared, owner: Address, id: FileId) -> Result<StoredFile, Refusal> {
    let (store, now) = (shared.directory.clone(), (shared.clock)());
    match blocking(move || store.file(&id, now)).await? {
        Some(file) if file.owner == owner => Ok(file),
        _ => Err(refusal(
            ErrorCode::NotFound,
            "no such file of this identity",
        )),
    }
}

async fn state(shared: &Shared, request_id: u64, file: &StoredFile) -> Result<Frame, Refusal> {
    let received = shared.files.held(&file.id).await.map_err(disk)?;
    Ok(Frame::FileState(FileState {
        request_id,
        file_id: file.id,
        size: file.size,
        received: received.min(file.size),
        complete: file.complete,
        expires_at_ms: file.expires_at_ms,
        content_hash: file.content_hash,
    }))
}

/// Records a file for `owner` (an authenticated session's identity, served
/// on its home node) and answers `FileCreated` once the record is durable.
pub async fn create(shared: &Arc<Shared>, owner: Address, create: CreateFile) -> Frame {
    let id = create.request_id;
    match create_file(shared, owner, create).await {
        Ok(frame) => frame,
        Err(refused) => error_frame(id, refused),
    }
}

async fn create_file(
    shared: &Arc<Shared>,
    owner: Address,
    create: CreateFile,
) -> Result<Frame, Refusal> {
    let config = &shared.config.files;
    if create.size > config.max_size.as_u64() {
        return Err(refusal(
            ErrorCode::FileTooLarge,
            format!("files are at most {}", config.max_size),
        ));
    }
    if create.ttl_secs == 0 {
        return Err(refusal(
            ErrorCode::InvalidTtl,
            "ttl must be at least one second",
        ));
    }
    if !matches!(shared.fleet.route(&owner), Route::Local) || shared.fleet.is_importing(&owner) {
        return Err(refusal(
            ErrorCode::ShardUnavailable,
            "this identity's slot is moving between nodes; retry shortly",
        ));
    }
    let now = (shared.clock)();
    let ttl_ms = (u64::from(create.ttl_secs) * 1000).min(config.max_ttl.as_millis() as u64);
    let file = StoredFile {
        id: FileId::random_in_slot_of(&owner),
        owner,
        size: create.size,
        content_hash: create.content_hash,
        secret_hash: create.secret_hash,
        expires_at_ms: now + ttl_ms,
        complete: false,
    };
    let quota = FileQuota {
        max_files: config.max_files_per_identity,
        max_bytes: config.max_bytes_per_identity.as_u64(),
    };
    let store = shared.directory.clone();
    let record = file.clone();
    let put = blocking(move || {
        let put = store.put_file(&record, quota, now)?;
        if put == FilePut::Stored {
            store.sync()?;
        }
        Ok(put)
    })
    .await?;
    match put {
        FilePut::Stored => {
            metrics::counter!("backbone_files_created_total").increment(1);
            Ok(Frame::FileCreated(FileCreated {
                request_id: create.request_id,
                file_id: file.id,
                expires_at_ms: file.expires_at_ms,
            }))
        }
        FilePut::TooManyFiles => Err(refusal(
            ErrorCode::QuotaExceeded,
            format!(
                "this identity already holds {} files; delete some first",
                quota.max_files
            ),
        )),
        FilePut::TooManyBytes => Err(refusal(
            ErrorCode::QuotaExceeded,
            format!(
                "this identity's files would exceed {}; delete some first",
                config.max_bytes_per_identity
            ),
        )),
    }
}

/// Answers how much of one of `owner`'s files the broker holds.
pub async fn status(shared: &Arc<Shared>, owner: Address, status: FileStatus) -> Frame {
    let id = status.request_id;
    let result = async {
        let file = owned(shared, owner, status.file_id).await?;
        state(shared, id, &file).await
    };
    result
        .await
        .unwrap_or_else(|refused| error_frame(id, refused))
}

/// Deletes one of `owner`'s files: the record (flushed), then the bytes.
pub async fn delete(shared: &Arc<Shared>, owner: Address, delete: DeleteFile) -> Frame {
    let id = delete.request_id;
    let file_id = delete.file_id;
    let store = shared.directory.clone();
    let deleted = blocking(move || {
        let deleted = store.delete_file(&owner, &file_id)?;
        if deleted {
            store.sync()?;
        }
        Ok(deleted)
    })
    .await;
    match deleted {
        Ok(true) => {
            shared.files.remove(&file_id);
            metrics::counter!("backbone_files_deleted_total").increment(1);
            Frame::Done(Done { request_id: id })
        }
        Ok(false) => error_frame(
            id,
            refusal(ErrorCode::NotFound, "no such file of this identity"),
        ),
        Err(refused) => error_frame(id, refused),
    }
}

/// Serves one file stream a client opened next to its first stream: reads
/// its header frame, which the command table admits for `caller`
/// ([`crate::cmd::gate_stream`]: an anonymous session may only download),
/// then uploads or downloads. The session's request loop accepts the
/// streams (`session::requests::next_request`).
pub async fn serve_stream(
    shared: Arc<Shared>,
    caller: Caller,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv, MAX_HEADER_LEN);
    let header = tokio::time::timeout(shared.config.auth.deadline, reader.next(Phase::Any)).await;
    let answer = match header {
        Err(_) => error_frame(0, refusal(ErrorCode::AuthTimeout, "no header in time")),
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Frame(error))) => error_frame(
            0,
            (
                error.decode_error().code(),
                error.decode_error().to_string(),
            ),
        ),
        Ok(Ok(header)) => match crate::cmd::gate_stream(&caller, &header) {
            Err(refused) => refused.answer(&header),
            Ok(_) => match (caller, header) {
                (Caller::Identity { address: owner, .. }, Frame::UploadFile(upload)) => {
                    let id = upload.request_id;
                    let (recv, first) = reader.into_parts();
                    match receive(&shared, owner, upload, recv, first).await {
                        Ok(frame) => frame,
                        Err(refused) => error_frame(id, refused),
                    }
                }
                (_, Frame::DownloadFile(download)) => {
                    let id = download.request_id;
                    match transmit(&shared, download, &mut send).await {
                        Ok(()) => {
                            let _ = send.finish();
                            return;
                        }
                        Err(Some(refused)) => error_frame(id, refused),
                        // The stream broke mid-way; nothing more can be said on it.
                        Err(None) => return,
                    }
                }
                (_, other) => crate::cmd::internal(&other),
            },
        },
    };
    answer_stream(send, answer).await;
}

/// Ends a file stream with `answer` (a state, or why not), letting it
/// reach the client before the stream is dropped.
pub async fn answer_stream(mut send: quinn::SendStream, answer: Frame) {
    let mut bytes = Vec::new();
    if codec::encode_frame(&answer, &mut bytes).is_ok() && send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// Receives an upload stream's bytes into the file, and checks the content
/// once the last byte is in. Answers with the file's state.
async fn receive(
    shared: &Arc<Shared>,
    owner: Address,
    upload: UploadFile,
    mut recv: quinn::RecvStream,
    first: Vec<u8>,
) -> Result<Frame, Refusal> {
    let file = owned(shared, owner, upload.file_id).await?;
    let route = file.id.route_address();
    if !matches!(shared.fleet.route(&route), Route::Local) || shared.fleet.is_importing(&route) {
        return Err(refusal(
            ErrorCode::ShardUnavailable,
            "this file's slot is moving between nodes; retry shortly",
        ));
    }
    let Some(_guard) = shared.files.begin_upload(file.id) else {
        return Err(refusal(
            ErrorCode::InvalidOffset,
            "another upload of this file is running; ask FileStatus and resume after it",
        ));
    };
    let held = shared.files.held(&file.id).await.map_err(disk)?;
    let room = match upload_room(file.size, held, upload.offset) {
        Ok(room) if !file.complete => room,
        Ok(_) | Err(UploadError::Complete) => {
            return Err(refusal(
                ErrorCode::InvalidOffset,
                UploadError::Complete.to_string(),
            ));
        }
        Err(error) => return Err(refusal(ErrorCode::InvalidOffset, error.to_string())),
    };
    let path = shared.files.path(&file.id);
    let mut disk_file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(disk)?;
    let mut written = 0u64;
    let mut chunk = first;
    let overflow = loop {
        if !chunk.is_empty() {
            if written + chunk.len() as u64 > room {
                break true;
            }
            disk_file.write_all(&chunk).await.map_err(disk)?;
            written += chunk.len() as u64;
            metrics::counter!("backbone_file_received_bytes_total").increment(chunk.len() as u64);
        }
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(next)) => chunk = next.bytes.to_vec(),
            // Finished, reset or the connection lost: keep what arrived.
            Ok(None) | Err(_) => break false,
        }
    };
    if overflow {
        // Nothing of this stream is kept: the file ends where it started.
        disk_file.set_len(held).await.map_err(disk)?;
        return Err(refusal(
            ErrorCode::InvalidOffset,
            UploadError::PastTheEnd { size: file.size }.to_string(),
        ));
    }
    disk_file.sync_data().await.map_err(disk)?;
    drop(disk_file);
    if held + written < file.size {
        return state(shared, upload.request_id, &file).await;
    }
    let content = file.content_hash;
    let matches = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(&path)?)?;
        Ok(backbone_protocol::bytes::ContentHash(*hasher.finalize().as_bytes()).matches(&content))
    })
    .await
    .map_err(|error| {
        refusal(
            ErrorCode::Internal,
            format!("blocking task failed: {error}"),
        )
    })?
    .map_err(disk)?;
    if !matches {
        shared.files.remove(&file.id);
        metrics::counter!("backbone_file_uploads_mismatched_total").increment(1);
        return Err(refusal(
            ErrorCode::ContentMismatch,
            "the uploaded bytes do not match the declared content hash; they were discarded, \
             upload again from byte 0",
        ));
    }
    let (store, id) = (shared.directory.clone(), file.id);
    let recorded = blocking(move || {
        let recorded = store.complete_file(&id)?;
        store.sync()?;
        Ok(recorded)
    })
    .await?;
    if !recorded {
        // Deleted while the last bytes arrived.
        shared.files.remove(&file.id);
        return Err(refusal(ErrorCode::NotFound, "the file was deleted"));
    }
    metrics::counter!("backbone_files_completed_total").increment(1);
    Ok(Frame::FileState(FileState {
        request_id: upload.request_id,
        file_id: file.id,
        size: file.size,
        received: file.size,
        complete: true,
        expires_at_ms: file.expires_at_ms,
        content_hash: file.content_hash,
    }))
}

/// Sends a download stream's header and bytes. `Err(Some(_))` is a refusal
/// to answer on the stream; `Err(None)` means the stream broke mid-way.
async fn transmit(
    shared: &Arc<Shared>,
    download: DownloadFile,
    send: &mut quinn::SendStream,
) -> Result<(), Option<Refusal>> {
    let id = download.request_id;
    let route = download.file_id.route_address();
    if let Route::Remote(node) = shared.fleet.route(&route) {
        metrics::counter!("backbone_redirects_total").increment(1);
        let redirect = Frame::Redirect(Redirect {
            request_id: id,
            node: Text(node.public.clone()),
        });
        return write_frame(send, &redirect).await.map_err(|()| None);
    }
    if shared.fleet.is_importing(&route) {
        return Err(Some(refusal(
            ErrorCode::ShardUnavailable,
            "this file is being handed over to this node; retry shortly",
        )));
    }
    let (store, now, file_id) = (shared.directory.clone(), (shared.clock)(), download.file_id);
    let file = match blocking(move || store.file(&file_id, now)).await {
        Ok(Some(file)) => file,
        Ok(None) => return Err(Some(refusal(ErrorCode::NotFound, "no such file"))),
        Err(refused) => return Err(Some(refused)),
    };
    if !file.secret_hash.matches(&download.secret.hash()) {
        metrics::counter!("backbone_file_downloads_refused_total").increment(1);
        return Err(Some(refusal(
            ErrorCode::Forbidden,
            "the secret does not match this file: downloading needs the capability the \
             uploader shared",
        )));
    }
    if !file.complete {
        return Err(Some(refusal(
            ErrorCode::FileIncomplete,
            "the file is not completely uploaded yet",
        )));
    }
    if download.offset > file.size {
        return Err(Some(refusal(
            ErrorCode::InvalidOffset,
            format!("the file has {} bytes", file.size),
        )));
    }
    // Opened before the header goes out: a file deleted in between is
    // refused cleanly, and once open its bytes stay readable to the end.
    let mut disk_file = tokio::fs::File::open(shared.files.path(&file.id))
        .await
        .map_err(|error| Some(disk(error)))?;
    disk_file
        .seek(SeekFrom::Start(download.offset))
        .await
        .map_err(|error| Some(disk(error)))?;
    let header = Frame::FileData(FileData {
        request_id: id,
        size: file.size,
        offset: download.offset,
        content_hash: file.content_hash,
    });
    write_frame(send, &header).await.map_err(|()| None)?;
    let mut remaining = file.size - download.offset;
    let mut buf = vec![0u8; CHUNK];
    while remaining > 0 {
        let want = remaining.min(CHUNK as u64) as usize;
        let read = disk_file.read(&mut buf[..want]).await.map_err(|error| {
            warn!(%error, "file bytes could not be read");
            None
        })?;
        if read == 0 {
            warn!("a complete file's bytes are shorter than its size");
            // Reset rather than finish, so the client cannot take a short
            // file for a whole one.
            let _ = send.reset(quinn::VarInt::from_u32(ErrorCode::StorageFailure as u32));
            return Err(None);
        }
        send.write_all(&buf[..read]).await.map_err(|_| None)?;
        remaining -= read as u64;
        metrics::counter!("backbone_file_sent_bytes_total").increment(read as u64);
    }
    Ok(())
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), ()> {
    let mut bytes = Vec::new();
    codec::encode_frame(frame, &mut bytes).map_err(|_| ())?;
    send.write_all(&bytes).await.map_err(|_| ())
}
