//! Files: encrypted here, uploaded in resumable parts, downloaded by whoever
//! holds a [`FileRef`] (see `backbone_protocol::file` for the protocol).
//!
//! **Encryption.** A file is sealed under a fresh 32-byte key in chunks of
//! [`PLAIN_CHUNK`] plaintext bytes, each with ChaCha20-Poly1305 (the STREAM
//! construction): chunk `i`'s nonce is `i` as a big-endian `u64`, three zero
//! bytes, and `1` for the last chunk or `0` for the others; the associated
//! data is `"backbone file v1"`. Every file has at least one chunk (an empty
//! file is one empty last chunk), so the sealed size is the plain size plus
//! 16 bytes per chunk. Reordering, dropping or truncating chunks fails to
//! open; the broker sees only sealed bytes and their BLAKE3 hash.
//!
//! Sealing is deterministic for a key, so an upload resumes at any byte by
//! sealing again from the chunk holding it: nothing is kept on disk.
//!
//! **One plaintext per key and chunk.** Sealing again is safe only over the
//! same plaintext: chunk `i`'s nonce is `i`, so sealing another plaintext
//! as chunk `i` under the same key and sending it reuses the key and nonce
//! (the XOR of the two plaintexts leaks, and that chunk can be forged). A
//! source can change between or during upload attempts, and whatever was
//! written to a stream may have reached the broker even if it did not keep
//! it, so the invariant is: **no chunk of a file is ever sealed over two
//! different plaintexts and sent.** An `UploadSource` enforces it. One
//! pass over the source seals it and keeps the BLAKE3 hash of every sealed
//! chunk: at announcement (the same pass computes the content hash), or,
//! to resume in another process, a pass checked against the content hash
//! the broker reports (`FileState::content_hash`). Every chunk sealed for
//! the upload is compared with its hash before any of its bytes are
//! written; a difference, or a source shorter or longer than announced,
//! ends the attempt with [`ClientError::SourceChanged`], and the changed
//! chunk never leaves. A changed source then goes up as a new file under a
//! fresh key (`Client::put_file`) or is refused (`Client::resume_file_upload`).
//!
//! **Sharing.** The [`FileRef`] (id, download secret, key) travels inside an
//! end-to-end encrypted message; its text form is `bbf1:<id>:<secret>:<key>`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use backbone_protocol::Frame;
use backbone_protocol::bytes::{ContentHash, FileId, FileSecret};
use backbone_protocol::codec::{self, FrameBuffer, Phase};
use backbone_protocol::frame::{DownloadFile, FileState, UploadFile};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::error::ClientError;
use crate::transport::{ConnectConfig, RawConnection, unexpected};

/// Plaintext bytes per sealed chunk.
pub const PLAIN_CHUNK: usize = 64 * 1024;
/// Bytes the AEAD adds to each chunk.
pub const TAG_LEN: usize = 16;
/// Bytes of a full sealed chunk.
pub const SEALED_CHUNK: u64 = (PLAIN_CHUNK + TAG_LEN) as u64;
/// Bytes of a file key.
pub const KEY_LEN: usize = 32;
/// The text form's prefix, naming its version.
pub const FILE_REF_PREFIX: &str = "bbf1";

const AAD: &[u8] = b"backbone file v1";
/// Largest answer frame on a file stream.
const MAX_ANSWER_LEN: usize = 4096;

/// Everything needed to download and open one file.
///
/// A secret: `Debug` shows no part of it and there is no `Display`, so a
/// reference is never formatted into a log by accident.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileRef {
    /// The file's id at the broker.
    pub id: FileId,
    /// The download secret; the broker stores only its hash.
    pub secret: FileSecret,
    /// The key the content is sealed with; the broker never sees it.
    pub key: [u8; KEY_LEN],
}

impl fmt::Debug for FileRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRef").finish_non_exhaustive()
    }
}

impl FileRef {
    /// The text form: `bbf1:<id hex>:<secret hex>:<key hex>`, lowercase hex
    /// of 64 characters each.
    pub fn to_text(&self) -> String {
        format!(
            "{FILE_REF_PREFIX}:{}:{}:{}",
            hex::encode(self.id.0),
            hex::encode(self.secret.0),
            hex::encode(self.key)
        )
    }
}

/// Why a file reference's text was rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseFileRefError {
    /// The text does not start with `bbf1:`.
    #[error("a file reference starts with \"{FILE_REF_PREFIX}:\"")]
    WrongPrefix,
    /// Not 4 colon-separated fields.
    #[error("a file reference has 4 fields separated by ':', this one has {found}")]
    WrongFieldCount {
        /// Fields found.
        found: usize,
    },
    /// A field is not 64 hex characters.
    #[error("the {field} of a file reference must be 64 hex characters")]
    BadField {
        /// Which field: `id`, `secret` or `key`.
        field: &'static str,
    },
}

impl FromStr for FileRef {
    type Err = ParseFileRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = text.trim().split(':').collect();
        if fields.first() != Some(&FILE_REF_PREFIX) {
            return Err(ParseFileRefError::WrongPrefix);
        }
        let [_, id, secret, key] = fields[..] else {
            return Err(ParseFileRefError::WrongFieldCount {
                found: fields.len(),
            });
        };
        let field = |text: &str, field: &'static str| -> Result<[u8; 32], ParseFileRefError> {
            hex::decode(text)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(ParseFileRefError::BadField { field })
        };
        Ok(FileRef {
            id: FileId(field(id, "id")?),
            secret: FileSecret(field(secret, "secret")?),
            key: field(key, "key")?,
        })
    }
}

/// What went wrong with a file on this side of the wire.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FileError {
    /// A downloaded chunk did not open under the reference's key: another
    /// key, or bytes altered, reordered or cut short.
    #[error("the file's bytes do not open with this reference's key (altered or truncated)")]
    Undecryptable,
    /// The download ended before the size the broker announced.
    #[error("the download ended after {got} of {expected} bytes")]
    Truncated {
        /// Sealed bytes received.
        got: u64,
        /// Sealed bytes announced.
        expected: u64,
    },
    /// The broker answered with sealed bytes of an impossible length.
    #[error("a sealed file of {0} bytes is impossible")]
    BadSize(u64),
    /// A download was to resume past the end of the file.
    #[error("cannot resume at byte {position} of a sealed file of {sealed_len} bytes")]
    BadPosition {
        /// Where it was to resume.
        position: u64,
        /// The sealed file's size.
        sealed_len: u64,
    },
}

/// How many chunks a file of `plain_len` bytes is sealed in.
pub fn chunk_count(plain_len: u64) -> u64 {
    plain_len.div_ceil(PLAIN_CHUNK as u64).max(1)
}

/// The sealed size of a file of `plain_len` bytes.
pub fn sealed_len(plain_len: u64) -> u64 {
    plain_len + chunk_count(plain_len) * TAG_LEN as u64
}

/// The plain size of a file sealed into `sealed` bytes, if that is possible.
pub fn plain_len(sealed: u64) -> Option<u64> {
    let chunks = sealed.div_ceil(SEALED_CHUNK).max(1);
    let plain = sealed.checked_sub(chunks * TAG_LEN as u64)?;
    (sealed_len(plain) == sealed).then_some(plain)
}

fn nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce.into()
}

/// Seals chunk `index` of a file; `last` for its final chunk.
pub fn seal_chunk(key: &[u8; KEY_LEN], index: u64, last: bool, plain: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(key.into())
        .encrypt(
            &nonce(index, last),
            Payload {
                msg: plain,
                aad: AAD,
            },
        )
        .expect("ChaCha20-Poly1305 seals any chunk shorter than 256 GiB")
}

/// Opens sealed chunks as their bytes arrive, in order, starting at a chunk
/// boundary; refuses anything altered, reordered or cut short.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    sealed_len: u64,
    /// Sealed bytes consumed so far, from the start of the file.
    position: u64,
    pending: Vec<u8>,
}

impl Opener {
    /// An opener for a file of `sealed_len` sealed bytes, starting at
    /// `position`, which must be a chunk boundary inside the file (or its end).
    pub fn new(key: &[u8; KEY_LEN], sealed_len: u64, position: u64) -> Result<Self, FileError> {
        if plain_len(sealed_len).is_none() || !position.is_multiple_of(SEALED_CHUNK) {
            return Err(FileError::BadSize(sealed_len));
        }
        // Past the end, `push` would compute the bytes left as a negative
        // number (found by the file_token_logic fuzz target).
        if position > sealed_len {
            return Err(FileError::BadPosition {
                position,
                sealed_len,
            });
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(key.into()),
            sealed_len,
            position,
            pending: Vec::with_capacity(SEALED_CHUNK as usize),
        })
    }

    /// Sealed bytes opened so far: where a download resumes.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Feeds sealed bytes; appends the plaintext of each chunk completed.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), FileError> {
        while !bytes.is_empty() {
            let chunk_len = SEALED_CHUNK.min(self.sealed_len - self.position) as usize;
            if chunk_len == 0 {
                return Err(FileError::Undecryptable);
            }
            let take = (chunk_len - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == chunk_len {
                let index = self.position / SEALED_CHUNK;
                let last = self.position + chunk_len as u64 == self.sealed_len;
                let plain = self
                    .cipher
                    .decrypt(
                        &nonce(index, last),
                        Payload {
                            msg: &self.pending,
                            aad: AAD,
                        },
                    )
                    .map_err(|_| FileError::Undecryptable)?;
                out.extend_from_slice(&plain);
                self.position += chunk_len as u64;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Checks that the whole file arrived.
    pub fn finish(&self) -> Result<(), FileError> {
        if self.position == self.sealed_len {
            Ok(())
        } else {
            Err(FileError::Truncated {
                got: self.position + self.pending.len() as u64,
                expected: self.sealed_len,
            })
        }
    }
}

/// Where a file's plaintext comes from.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// A file on disk (read twice: to hash, then to upload).
    Path(PathBuf),
    /// Bytes in memory.
    Bytes(Arc<[u8]>),
}

/// Reads a source's plaintext chunk by chunk.
pub(crate) struct PlainReader {
    source: FileSource,
    file: Option<tokio::fs::File>,
    len: u64,
}

impl PlainReader {
    pub(crate) async fn open(source: FileSource) -> Result<Self, ClientError> {
        let (file, len) = match &source {
            FileSource::Path(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|error| ClientError::Io(format!("{}: {error}", path.display())))?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|error| ClientError::Io(error.to_string()))?
                    .len();
                (Some(file), len)
            }
            FileSource::Bytes(bytes) => (None, bytes.len() as u64),
        };
        Ok(Self { source, file, len })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The plaintext of chunk `index`.
    async fn chunk(&mut self, index: u64) -> Result<Vec<u8>, ClientError> {
        let start = index * PLAIN_CHUNK as u64;
        let end = (start + PLAIN_CHUNK as u64).min(self.len);
        let want = end.saturating_sub(start) as usize;
        match (&self.source, &mut self.file) {
            (FileSource::Bytes(bytes), _) => {
                Ok(bytes[start as usize..start as usize + want].to_vec())
            }
            (FileSource::Path(_), Some(file)) => {
                let io = |error: std::io::Error| ClientError::Io(error.to_string());
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(io)?;
                let mut buf = vec![0u8; want];
                match file.read_exact(&mut buf).await {
                    Ok(_) => Ok(buf),
                    // Shorter than when it was opened: the file changed.
                    Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Err(ClientError::SourceChanged)
                    }
                    Err(error) => Err(io(error)),
                }
            }
            (FileSource::Path(path), None) => {
                Err(ClientError::Io(format!("{} is not open", path.display())))
            }
        }
    }

    /// The source's length now. A file can grow after it was opened; its
    /// open handle still names the same file even if the path was replaced.
    async fn current_len(&self) -> Result<u64, ClientError> {
        match &self.file {
            Some(file) => Ok(file
                .metadata()
                .await
                .map_err(|error| ClientError::Io(error.to_string()))?
                .len()),
            None => Ok(self.len),
        }
    }

    /// The sealed chunk `index`. Private: an upload seals only through a
    /// [`Bound`] source, which checks each chunk against the announced one.
    async fn sealed_chunk(
        &mut self,
        key: &[u8; KEY_LEN],
        index: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let last = index + 1 == chunk_count(self.len);
        let plain = self.chunk(index).await?;
        Ok(seal_chunk(key, index, last, &plain))
    }

    /// Seals the whole source under `key` once: its content hash and the
    /// hash of each sealed chunk, from the same bytes.
    async fn seal_pass(&mut self, key: &[u8; KEY_LEN]) -> Result<Announced, ClientError> {
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::new();
        for index in 0..chunk_count(self.len) {
            let sealed = self.sealed_chunk(key, index).await?;
            whole.update(&sealed);
            chunks.push(blake3::hash(&sealed));
        }
        Ok(Announced {
            content_hash: ContentHash(*whole.finalize().as_bytes()),
            chunks,
        })
    }
}

/// What a file was announced with: its content hash and the BLAKE3 hash of
/// each of its sealed chunks (32 bytes per 64 KiB chunk, 0.05 % of the
/// file, kept in memory for the upload).
///
/// Per-chunk hashes rather than a second full pass before each attempt:
/// a pass before an attempt cannot see a change made during the attempt,
/// while checking each chunk just before it is sent catches any change,
/// whenever it was made, at the first chunk it touches, so one pass per
/// process is enough. Equal hashes of sealed chunks mean equal sealed
/// bytes, and for one key and nonce equal sealed bytes mean equal
/// plaintext, so a chunk that passes is exactly the announced one.
struct Announced {
    content_hash: ContentHash,
    chunks: Vec<blake3::Hash>,
}

/// A file's source, to upload under its reference's key: it seals for the
/// upload only the content the file was announced with (see the module
/// documentation).
pub(crate) struct UploadSource {
    plain: PlainReader,
    key: [u8; KEY_LEN],
    /// Known once a pass sealed the source: at announcement in this
    /// process, or at the first [`UploadSource::bind`] of a resume.
    announced: Option<Announced>,
}

impl UploadSource {
    /// Seals `plain` under `key` in one pass, for announcing it; returns the
    /// source, bound to what it read, and the content hash to declare.
    pub(crate) async fn announce(
        mut plain: PlainReader,
        key: [u8; KEY_LEN],
    ) -> Result<(Self, ContentHash), ClientError> {
        let announced = plain.seal_pass(&key).await?;
        let content_hash = announced.content_hash;
        let source = Self {
            plain,
            key,
            announced: Some(announced),
        };
        Ok((source, content_hash))
    }

    /// A source to finish a file announced elsewhere (another process, a
    /// crashed one) with; checked at its first [`UploadSource::bind`].
    pub(crate) fn resumed(plain: PlainReader, key: [u8; KEY_LEN]) -> Self {
        Self {
            plain,
            key,
            announced: None,
        }
    }

    /// The size to declare: the sealed length of the source as read.
    pub(crate) fn sealed_len(&self) -> u64 {
        sealed_len(self.plain.len())
    }

    /// Binds the source to the file `state` describes, so that chunks can
    /// be sealed for its upload.
    ///
    /// A source announced in this process is bound by its own pass: the
    /// content hash it declared came from that pass, and nothing the broker
    /// reports changes what may be sealed. A resumed source is checked
    /// once, by a full pass: it must have the declared size and seal to the
    /// declared content hash, else `SourceChanged` and nothing is sealed
    /// for the upload. A broker cannot make a changed source pass: it would
    /// have to name the hash of a sealing under a key it never holds.
    pub(crate) async fn bind(&mut self, state: &FileState) -> Result<Bound<'_>, ClientError> {
        let announced = match self.announced.take() {
            Some(announced) => announced,
            None => {
                if sealed_len(self.plain.len()) != state.size {
                    return Err(ClientError::SourceChanged);
                }
                let announced = self.plain.seal_pass(&self.key).await?;
                if !announced.content_hash.matches(&state.content_hash) {
                    return Err(ClientError::SourceChanged);
                }
                announced
            }
        };
        Ok(Bound {
            announced: self.announced.insert(announced),
            plain: &mut self.plain,
            key: &self.key,
        })
    }
}

/// A source bound to its announced content: the only way to seal chunks
/// for an upload.
pub(crate) struct Bound<'a> {
    plain: &'a mut PlainReader,
    key: &'a [u8; KEY_LEN],
    announced: &'a Announced,
}

impl Bound<'_> {
    fn chunk_count(&self) -> u64 {
        self.announced.chunks.len() as u64
    }

    /// Chunk `index`, sealed again from the source, if it is the announced
    /// chunk; `SourceChanged` otherwise, before any of it is sent.
    async fn sealed_chunk(&mut self, index: u64) -> Result<Vec<u8>, ClientError> {
        let announced = usize::try_from(index)
            .ok()
            .and_then(|index| self.announced.chunks.get(index))
            .ok_or(ClientError::SourceChanged)?;
        let sealed = self.plain.sealed_chunk(self.key, index).await?;
        if blake3::hash(&sealed) != *announced {
            return Err(ClientError::SourceChanged);
        }
        // A file that grew still reads as announced up to its old length,
        // but it is not the file announced any more: checked once, at the
        // chunk the new bytes would belong to.
        if index + 1 == self.chunk_count() && self.plain.current_len().await? != self.plain.len() {
            return Err(ClientError::SourceChanged);
        }
        Ok(sealed)
    }
}

fn stream_error(error: impl fmt::Display) -> ClientError {
    ClientError::Disconnected(format!("file stream: {error}"))
}

/// Reads the single answer frame a file stream ends with.
async fn read_answer(recv: &mut quinn::RecvStream) -> Result<Frame, ClientError> {
    let bytes = recv
        .read_to_end(MAX_ANSWER_LEN)
        .await
        .map_err(stream_error)?;
    let mut buffer = FrameBuffer::new(MAX_ANSWER_LEN);
    buffer.extend(&bytes);
    match buffer.next_frame(Phase::Any) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(ClientError::Disconnected(
            "the file stream ended without an answer".into(),
        )),
        Err(error) => Err(ClientError::Protocol(error.to_string())),
    }
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), ClientError> {
    let mut bytes = Vec::new();
    codec::encode_frame(frame, &mut bytes)
        .map_err(|error| ClientError::Protocol(error.to_string()))?;
    send.write_all(&bytes).await.map_err(stream_error)
}

/// Uploads raw (already sealed) bytes at `offset` on a new stream, and
/// returns the broker's answer.
pub(crate) async fn upload_bytes(
    connection: &quinn::Connection,
    request_id: u64,
    file_id: FileId,
    offset: u64,
    bytes: &[u8],
) -> Result<FileState, ClientError> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    let header = Frame::UploadFile(UploadFile {
        request_id,
        file_id,
        offset,
    });
    write_frame(&mut send, &header).await?;
    send.write_all(bytes).await.map_err(stream_error)?;
    let _ = send.finish();
    file_state(read_answer(&mut recv).await?)
}

/// Seals and uploads `source` from sealed byte `offset` to the end on a new
/// stream, and returns the broker's answer. A chunk that is not the
/// announced one ends the stream before any of its bytes are written
/// (`SourceChanged`); the bytes before it are the announced ones.
pub(crate) async fn upload_sealed(
    connection: &quinn::Connection,
    request_id: u64,
    file_id: FileId,
    offset: u64,
    source: &mut Bound<'_>,
) -> Result<FileState, ClientError> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    let header = Frame::UploadFile(UploadFile {
        request_id,
        file_id,
        offset,
    });
    write_frame(&mut send, &header).await?;
    let mut skip = (offset % SEALED_CHUNK) as usize;
    for index in offset / SEALED_CHUNK..source.chunk_count() {
        // The whole chunk is checked even when only its tail is sent: the
        // broker may hold, or have seen, any prefix of it.
        let sealed = match source.sealed_chunk(index).await {
            Ok(sealed) => sealed,
            Err(error) => {
                // Reset rather than finish: the broker keeps what arrived
                // (all announced bytes) and the attempt ends at once.
                let _ = send.reset(quinn::VarInt::from_u32(0));
                return Err(error);
            }
        };
        if let Err(error) = send.write_all(&sealed[skip.min(sealed.len())..]).await {
            // The broker may have refused the upload and stopped reading:
            // its answer says why.
            return match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                read_answer(&mut recv),
            )
            .await
            {
                Ok(Ok(answer)) => file_state(answer),
                _ => Err(stream_error(error)),
            };
        }
        skip = 0;
    }
    let _ = send.finish();
    file_state(read_answer(&mut recv).await?)
}

fn file_state(answer: Frame) -> Result<FileState, ClientError> {
    match answer {
        Frame::FileState(state) => Ok(state),
        other => Err(unexpected(other)),
    }
}

/// How a download attempt ended.
pub(crate) enum Fetched {
    /// Every byte arrived and opened.
    Done,
    /// The file is on another node.
    Redirect(String),
}

/// Downloads `file` on a new stream of `connection` from the opener's
/// position, writing plaintext to `sink` as chunks open.
pub(crate) async fn download<W: AsyncWrite + Unpin>(
    connection: &quinn::Connection,
    request_id: u64,
    file: &FileRef,
    opener: &mut Option<Opener>,
    sink: &mut W,
) -> Result<Fetched, ClientError> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    let offset = opener.as_ref().map_or(0, Opener::position);
    let request = Frame::DownloadFile(DownloadFile {
        request_id,
        file_id: file.id,
        secret: file.secret,
        offset,
    });
    write_frame(&mut send, &request).await?;
    let _ = send.finish();
    let mut buffer = FrameBuffer::new(MAX_ANSWER_LEN);
    let header = loop {
        match buffer.next_frame(Phase::Any) {
            Ok(Some(frame)) => break frame,
            Ok(None) => {}
            Err(error) => return Err(ClientError::Protocol(error.to_string())),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => buffer.extend(&chunk.bytes),
            Ok(None) => {
                return Err(ClientError::Disconnected(
                    "the file stream ended without an answer".into(),
                ));
            }
            Err(error) => return Err(stream_error(error)),
        }
    };
    let data = match header {
        Frame::FileData(data) => data,
        Frame::Redirect(redirect) => return Ok(Fetched::Redirect(redirect.node.0)),
        other => return Err(unexpected(other)),
    };
    if data.offset != offset {
        return Err(ClientError::Protocol(format!(
            "asked for byte {offset}, the broker sent from {}",
            data.offset
        )));
    }
    let opener = match opener {
        Some(opener) => opener,
        None => opener.insert(Opener::new(&file.key, data.size, 0)?),
    };
    let mut plain = Vec::with_capacity(2 * PLAIN_CHUNK);
    let mut bytes = buffer.take_buffered();
    loop {
        opener.push(&bytes, &mut plain)?;
        if !plain.is_empty() {
            sink.write_all(&plain)
                .await
                .map_err(|error| ClientError::Io(error.to_string()))?;
            plain.clear();
        }
        match recv.read_chunk(256 * 1024, true).await {
            Ok(Some(chunk)) => bytes = chunk.bytes.to_vec(),
            Ok(None) => break,
            Err(error) => return Err(stream_error(error)),
        }
    }
    opener.finish()?;
    sink.flush()
        .await
        .map_err(|error| ClientError::Io(error.to_string()))?;
    Ok(Fetched::Done)
}

/// Downloads files over an anonymous connection: the broker learns that
/// someone holding the capability downloaded it, not who. Follows the
/// broker's redirect to the node holding the file.
pub struct FileFetcher {
    connect: ConnectConfig,
}

impl FileFetcher {
    /// A fetcher connecting with `connect` (server and trust).
    pub fn new(connect: ConnectConfig) -> Self {
        Self { connect }
    }

    /// Downloads and opens `file`, writing its plaintext to `sink`.
    pub async fn get<W: AsyncWrite + Unpin>(
        &self,
        file: &FileRef,
        sink: &mut W,
    ) -> Result<(), ClientError> {
        let mut opener = None;
        let mut server = self.connect.server.clone();
        // One redirect is expected at most (to the file's node); more is a loop.
        for _ in 0..3 {
            let mut connect = self.connect.clone();
            connect.server = server;
            let mut raw = RawConnection::connect(&connect).await?;
            raw.open_anonymous().await?;
            let fetched = download(raw.connection(), 1, file, &mut opener, sink).await;
            raw.close().await;
            match fetched? {
                Fetched::Done => return Ok(()),
                Fetched::Redirect(node) => server = node,
            }
        }
        Err(ClientError::Protocol("too many redirects".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_all(key: &[u8; KEY_LEN], sealed: &[u8]) -> Result<Vec<u8>, FileError> {
        let mut opener = Opener::new(key, sealed.len() as u64, 0)?;
        let mut out = Vec::new();
        // Odd piece sizes, so chunks arrive split across pushes.
        for piece in sealed.chunks(7919) {
            opener.push(piece, &mut out)?;
        }
        opener.finish()?;
        Ok(out)
    }

    fn seal_all(key: &[u8; KEY_LEN], plain: &[u8]) -> Vec<u8> {
        let chunks = chunk_count(plain.len() as u64);
        let mut sealed = Vec::new();
        for index in 0..chunks {
            let start = (index as usize * PLAIN_CHUNK).min(plain.len());
            let end = (start + PLAIN_CHUNK).min(plain.len());
            sealed.extend(seal_chunk(
                key,
                index,
                index + 1 == chunks,
                &plain[start..end],
            ));
        }
        sealed
    }

    #[test]
    fn files_of_every_awkward_size_seal_and_open() {
        let key = [7u8; KEY_LEN];
        for len in [
            0,
            1,
            PLAIN_CHUNK - 1,
            PLAIN_CHUNK,
            PLAIN_CHUNK + 1,
            3 * PLAIN_CHUNK + 5,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = seal_all(&key, &plain);
            assert_eq!(sealed.len() as u64, sealed_len(len as u64), "len {len}");
            assert_eq!(plain_len(sealed.len() as u64), Some(len as u64));
            assert_eq!(open_all(&key, &sealed), Ok(plain), "len {len}");
        }
    }

    #[test]
    fn altered_reordered_or_cut_files_do_not_open() {
        let key = [7u8; KEY_LEN];
        let plain = vec![9u8; 2 * PLAIN_CHUNK + 10];
        let sealed = seal_all(&key, &plain);
        let mut altered = sealed.clone();
        altered[100] ^= 1;
        assert_eq!(open_all(&key, &altered), Err(FileError::Undecryptable));
        assert_eq!(
            open_all(&[8u8; KEY_LEN], &sealed),
            Err(FileError::Undecryptable)
        );
        // Cut at a chunk boundary: the new last chunk was sealed as "not last".
        let cut = &sealed[..2 * SEALED_CHUNK as usize];
        assert_eq!(open_all(&key, cut), Err(FileError::Undecryptable));
        // Swap the first two chunks.
        let n = SEALED_CHUNK as usize;
        let swapped = [&sealed[n..2 * n], &sealed[..n], &sealed[2 * n..]].concat();
        assert_eq!(open_all(&key, &swapped), Err(FileError::Undecryptable));
        // Fewer bytes than announced.
        let mut opener = Opener::new(&key, sealed.len() as u64, 0).expect("size");
        opener
            .push(&sealed[..sealed.len() - 1], &mut Vec::new())
            .expect("the complete chunks open");
        assert!(matches!(opener.finish(), Err(FileError::Truncated { .. })));
    }

    fn state_of(key: &[u8; KEY_LEN], plain: &[u8]) -> FileState {
        let sealed = seal_all(key, plain);
        FileState {
            request_id: 1,
            file_id: FileId([1; 32]),
            size: sealed.len() as u64,
            received: 0,
            complete: false,
            expires_at_ms: 0,
            content_hash: ContentHash::of(&sealed),
        }
    }

    fn rewrite(path: &std::path::Path, at: usize, bytes: &[u8]) {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("opens");
        file.seek(SeekFrom::Start(at as u64)).expect("seeks");
        file.write_all(bytes).expect("writes");
    }

    #[tokio::test]
    async fn an_upload_seals_only_the_announced_chunks() {
        let key = [7u8; KEY_LEN];
        let plain: Vec<u8> = (0..4 * PLAIN_CHUNK + 10).map(|i| (i % 251) as u8).collect();
        let sealed = seal_all(&key, &plain);
        let chunk = |index: usize| {
            let start = index * SEALED_CHUNK as usize;
            sealed[start..(start + SEALED_CHUNK as usize).min(sealed.len())].to_vec()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("source");
        std::fs::write(&path, &plain).expect("writes");
        let reader = PlainReader::open(FileSource::Path(path.clone()))
            .await
            .expect("opens");
        let (mut upload, content_hash) = UploadSource::announce(reader, key)
            .await
            .expect("announces");
        assert_eq!(content_hash, ContentHash::of(&sealed));
        assert_eq!(upload.sealed_len(), sealed.len() as u64);

        // Chunk 2 changes after the announcement: the chunks before and
        // after it still seal as announced, chunk 2 is refused.
        rewrite(&path, 2 * PLAIN_CHUNK + 5, b"changed");
        let mut bound = upload
            .bind(&state_of(&key, &plain))
            .await
            .expect("announced here");
        for index in [0, 1, 3] {
            assert_eq!(
                bound.sealed_chunk(index).await.ok(),
                Some(chunk(index as usize))
            );
        }
        assert!(matches!(
            bound.sealed_chunk(2).await,
            Err(ClientError::SourceChanged)
        ));
        // Changed back, it is the announced chunk again.
        rewrite(
            &path,
            2 * PLAIN_CHUNK + 5,
            &plain[2 * PLAIN_CHUNK + 5..][..7],
        );
        assert_eq!(bound.sealed_chunk(2).await.ok(), Some(chunk(2)));

        // A longer file: the last chunk still reads as announced, but the
        // file is not the one announced.
        let mut longer = plain.clone();
        longer.push(1);
        std::fs::write(&path, &longer).expect("writes");
        assert!(matches!(
            bound.sealed_chunk(4).await,
            Err(ClientError::SourceChanged)
        ));
        // A shorter one: the last chunk cannot be read whole.
        std::fs::write(&path, &plain[..plain.len() - 1]).expect("writes");
        assert!(matches!(
            bound.sealed_chunk(4).await,
            Err(ClientError::SourceChanged)
        ));
    }

    #[tokio::test]
    async fn a_resumed_source_must_seal_to_the_declared_size_and_hash() {
        let key = [7u8; KEY_LEN];
        let plain: Vec<u8> = (0..2 * PLAIN_CHUNK + 10).map(|i| (i % 251) as u8).collect();
        let state = state_of(&key, &plain);
        let resumed = |bytes: Vec<u8>| async move {
            let reader = PlainReader::open(FileSource::Bytes(Arc::from(bytes)))
                .await
                .expect("opens");
            UploadSource::resumed(reader, key)
        };

        let mut changed = plain.clone();
        changed[PLAIN_CHUNK + 3] ^= 1;
        let mut upload = resumed(changed).await;
        assert!(matches!(
            upload.bind(&state).await,
            Err(ClientError::SourceChanged)
        ));
        let mut upload = resumed(plain[1..].to_vec()).await;
        assert!(matches!(
            upload.bind(&state).await,
            Err(ClientError::SourceChanged)
        ));
        // The same content under another key is another sealing.
        let mut other_key = UploadSource::resumed(
            PlainReader::open(FileSource::Bytes(Arc::from(plain.clone())))
                .await
                .expect("opens"),
            [8u8; KEY_LEN],
        );
        assert!(matches!(
            other_key.bind(&state).await,
            Err(ClientError::SourceChanged)
        ));

        let mut upload = resumed(plain.clone()).await;
        let mut bound = upload.bind(&state).await.expect("the same content");
        let sealed = seal_all(&key, &plain);
        assert_eq!(
            bound.sealed_chunk(2).await.ok().as_deref(),
            Some(&sealed[2 * SEALED_CHUNK as usize..])
        );
    }

    #[test]
    fn impossible_sizes_are_refused() {
        // 1..=16 sealed bytes cannot hold a chunk's tag and any content.
        assert_eq!(plain_len(5), None);
        assert_eq!(plain_len(16), Some(0));
        assert_eq!(plain_len(SEALED_CHUNK + 3), None);
        assert!(Opener::new(&[0; KEY_LEN], 5, 0).is_err());
        assert!(Opener::new(&[0; KEY_LEN], 100, 3).is_err());
    }

    #[test]
    fn an_opener_cannot_start_past_the_end() {
        // Found by the file_token_logic fuzz target: an opener made at
        // chunk 1 of a one-chunk file panicked on its first push (the bytes
        // left went below zero).
        assert_eq!(
            Opener::new(&[0; KEY_LEN], 16, SEALED_CHUNK).err(),
            Some(FileError::BadPosition {
                position: SEALED_CHUNK,
                sealed_len: 16
            })
        );
        // At the end is fine: a finished download resumes with nothing left.
        let sealed_len = sealed_len(PLAIN_CHUNK as u64);
        let opener = Opener::new(&[0; KEY_LEN], sealed_len, SEALED_CHUNK).expect("at the end");
        assert_eq!(opener.finish(), Ok(()));
    }

    #[test]
    fn a_reference_round_trips_through_text_and_debug_hides_it() {
        let file = FileRef {
            id: FileId([1; 32]),
            secret: FileSecret([2; 32]),
            key: [3; 32],
        };
        let text = file.to_text();
        assert!(text.starts_with("bbf1:0101"));
        assert_eq!(text.parse::<FileRef>(), Ok(file));
        assert!(!format!("{file:?}").contains("0202"));
        assert_eq!(
            "bbt1:00".parse::<FileRef>(),
            Err(ParseFileRefError::WrongPrefix)
        );
        assert_eq!(
            "bbf1:00:11".parse::<FileRef>(),
            Err(ParseFileRefError::WrongFieldCount { found: 3 })
        );
        let bad = format!("bbf1:{}:zz:{}", "00".repeat(32), "00".repeat(32));
        assert_eq!(
            bad.parse::<FileRef>(),
            Err(ParseFileRefError::BadField { field: "secret" })
        );
    }
}
