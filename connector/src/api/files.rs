//! `/api/v1/files`: large files, encrypted here and uploaded to the Backbone
//! (to attach to messages or to share by reference), their status, and
//! downloads, streamed and decrypted, of this Connector's files or of any
//! file by reference.
//!
//! Uploads are streamed to a temporary file under
//! `<storage.data_dir>/uploads` first, because the client library reads a
//! file twice (once to hash it for the announcement, once to upload it);
//! the request body is never held in memory whole.

use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use backbone_client::{ClientError, FileRef, FileSource};
use backbone_protocol::ErrorCode;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinError, JoinHandle};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::tokens::expires_at;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, ttl_or};
use crate::db::{Published, PublishedKind};

/// The size of the pipe between a download and its response, and of the
/// first chunk read before answering.
const DOWNLOAD_BUFFER: usize = 64 * 1024;

/// The buffer in front of a temporary upload file: fewer, larger writes on
/// tokio's blocking pool than one per body frame.
const UPLOAD_BUFFER: usize = 256 * 1024;

/// The longest file name accepted or put in a header, in characters.
const MAX_NAME_CHARS: usize = 255;

/// The routes of this module. Uploads take the raw body, which
/// `DefaultBodyLimit` does not bound: `receive` counts the bytes against
/// `api.max_file_size` itself.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, upload))
        .routes(routes!(fetch))
        .routes(routes!(status, delete))
        .routes(routes!(download))
}

/// `POST /api/v1/files` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// The file's name, kept with it and given to recipients of messages it
    /// is attached to (1 to 255 characters, no control characters).
    pub name: Option<String>,
    /// How long the Backbone keeps it (seconds; default
    /// `messages.default_ttl`; the Backbone may cap it).
    pub ttl_secs: Option<u64>,
}

/// Uploads a file: the request body, of any content type, is encrypted here
/// under a fresh key and uploaded to the Backbone. Attach it to messages by
/// its id, or hand out its reference.
#[utoipa::path(operation_id = "files_upload", post, path = "/api/v1/files", params(UploadParams), request_body(
    content = Vec<u8>,
    content_type = "application/octet-stream",
    description = "The file's bytes, with any content type",
), responses(
    (status = 201, description = "Uploaded whole", body = Published),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "This identity's file quota is full", body = Problem, content_type = "application/problem+json"),
    (status = 413, description = "Larger than `api.max_file_size` or than the Backbone accepts", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn upload(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, ApiJson<Published>), ApiError> {
    let ttl = ttl_or(params.ttl_secs, state.config.messages.default_ttl)?;
    let name = name_of(params.name)?;
    let limit = state.config.api.max_file_size;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.as_u64()) {
        return Err(too_large(limit));
    }
    // Before the body is read: there is no point storing it without a
    // connection to upload it on, or beyond the uploads staged at once.
    let client = state.client()?;
    let _staging = state.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::busy(format!(
            "{} uploads are in progress; retry when one has finished",
            super::PARALLEL_UPLOADS
        ))
    })?;
    let dir = state.config.storage.data_dir.join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|error| ApiError::internal(format!("creating {}: {error}", dir.display())))?;
    let temporary =
        TemporaryFile(dir.join(format!("{}.part", hex::encode(rand::random::<[u8; 16]>()))));
    let size = receive(body, &temporary.0, limit).await?;
    let created_at_ms = backbone_protocol::unix_millis_now();
    let reference = client
        .put_file(FileSource::Path(temporary.0.clone()), ttl)
        .await?;
    // The Backbone may cap the TTL: ask it when the file expires, and fall
    // back to the TTL asked for rather than fail an upload that succeeded.
    let expires_at_ms = match client.file_status(&reference.id).await {
        Ok(file) => file.expires_at_ms,
        Err(error) => {
            tracing::debug!(%error, "the status of a file just uploaded is unknown");
            expires_at(created_at_ms, ttl)
        }
    };
    let record = state
        .db
        .record_published(
            PublishedKind::File,
            Published {
                id: hex::encode(reference.id.0),
                reference: reference.to_text(),
                password_protected: false,
                size,
                name,
                created_at_ms,
                expires_at_ms,
            },
        )
        .await?;
    drop(temporary);
    metrics::counter!("connector_files_uploaded_total").increment(1);
    Ok((StatusCode::CREATED, ApiJson(record)))
}

/// Lists the files this Connector uploaded.
#[utoipa::path(operation_id = "files_list", get, path = "/api/v1/files", responses(
    (status = 200, body = Vec<Published>),
))]
pub async fn list(State(state): State<AppState>) -> Result<ApiJson<Vec<Published>>, ApiError> {
    Ok(ApiJson(state.db.list_published(PublishedKind::File).await?))
}

/// A file this Connector uploaded, as the Backbone holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileStatus {
    /// The file as recorded here.
    pub file: Published,
    /// The encrypted bytes the Backbone holds (of `sealed_size`).
    pub received: u64,
    /// The encrypted size: the plaintext's size plus the encryption's
    /// overhead.
    pub sealed_size: u64,
    /// Whether every byte arrived and matched what was announced.
    pub complete: bool,
    /// When the Backbone deletes it (Unix ms).
    pub expires_at_ms: u64,
}

/// The status of a file this Connector uploaded.
#[utoipa::path(operation_id = "files_status", get, path = "/api/v1/files/{id}", params(
    ("id" = String, Path, description = "The file's id (hex), as listed"),
), responses(
    (status = 200, body = FileStatus),
    (status = 404, description = "Not a file uploaded through this Connector, or expired", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn status(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<FileStatus>, ApiError> {
    let (file, reference) = uploaded(&state, &id).await?;
    let held = state.client()?.file_status(&reference.id).await?;
    Ok(ApiJson(FileStatus {
        file,
        received: held.received,
        sealed_size: held.size,
        complete: held.complete,
        expires_at_ms: held.expires_at_ms,
    }))
}

/// Downloads a file this Connector uploaded, decrypted, streamed.
#[utoipa::path(operation_id = "files_download", get, path = "/api/v1/files/{id}/content", params(
    ("id" = String, Path, description = "The file's id (hex), as listed"),
), responses(
    (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn download(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (file, reference) = uploaded(&state, &id).await?;
    stream_download(&state, reference, file.name).await
}

/// `POST /api/v1/files/fetch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchFile {
    /// The file's reference (`bbf1:...`).
    pub reference: String,
}

/// Downloads any file by its reference (one a peer shared, say), decrypted,
/// streamed.
#[utoipa::path(operation_id = "files_fetch", post, path = "/api/v1/files/fetch", request_body = FetchFile, responses(
    (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "No such file (or it expired)", body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "The reference's key does not open the file", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn fetch(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<FetchFile>,
) -> Result<Response, ApiError> {
    let reference: FileRef = request
        .reference
        .parse()
        .map_err(|error| ApiError::bad_reference(format!("reference: {error}")))?;
    stream_download(&state, reference, None).await
}

/// Deletes a file this Connector uploaded, at the Backbone and here.
#[utoipa::path(operation_id = "files_delete", delete, path = "/api/v1/files/{id}", params(
    ("id" = String, Path, description = "The file's id (hex), as listed"),
), responses(
    (status = 204, description = "Deleted"),
    (status = 404, description = "Not a file uploaded through this Connector", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let (file, reference) = uploaded(&state, &id).await?;
    match state.client()?.delete_file(&reference.id).await {
        Ok(()) => {}
        // Expired or deleted before: gone at the Backbone all the same.
        Err(error) if error.code() == Some(ErrorCode::NotFound) => {}
        Err(error) => return Err(error.into()),
    }
    state
        .db
        .delete_published(PublishedKind::File, file.id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams the decrypted file `reference` names as the response.
///
/// The download runs in a task that writes into a pipe. The first chunk is
/// read before answering, so that a failure before any byte (an unknown
/// file, a wrong secret) is answered as a problem; a failure after it can
/// only abort the response, which the body's last item does by yielding an
/// error, so that a client never takes a cut-off file for a whole one.
pub async fn stream_download(
    state: &AppState,
    reference: FileRef,
    name: Option<String>,
) -> Result<Response, ApiError> {
    let client = state.client()?;
    let (mut reader, mut writer) = tokio::io::duplex(DOWNLOAD_BUFFER);
    // The writer is dropped when the task ends, which ends the reader.
    let mut download = Download(tokio::spawn(async move {
        client.get_file(&reference, &mut writer).await
    }));
    let mut first = vec![0u8; DOWNLOAD_BUFFER];
    let read = reader
        .read(&mut first)
        .await
        .map_err(|error| ApiError::internal(format!("reading a download: {error}")))?;
    let body = if read == 0 {
        match download.finish().await {
            Ok(Ok(())) => Body::empty(),
            Ok(Err(error)) => return Err(error.into()),
            Err(error) => {
                return Err(ApiError::internal(format!(
                    "the download task failed: {error}"
                )));
            }
        }
    } else {
        first.truncate(read);
        let head = futures_util::stream::once(std::future::ready(Ok(Bytes::from(first))));
        let rest = tokio_util::io::ReaderStream::with_capacity(reader, DOWNLOAD_BUFFER);
        let tail = futures_util::stream::once(async move {
            let failure = match download.finish().await {
                Ok(Ok(())) => return None,
                Ok(Err(error)) => error.to_string(),
                Err(error) => format!("the download task failed: {error}"),
            };
            tracing::warn!(%failure, "a file download failed after its first bytes; aborting the response");
            Some(Err(std::io::Error::other(failure)))
        })
        .filter_map(std::future::ready);
        Body::from_stream(head.chain(rest).chain(tail))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // The content is whatever a peer sent: never let a browser guess at it,
    // and keep decrypted secrets out of caches.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(disposition) = name.as_deref().and_then(content_disposition) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

/// A download task, aborted if its response is dropped (the HTTP client
/// went away) before it ends.
struct Download(JoinHandle<Result<(), ClientError>>);

impl Download {
    /// Waits for the task's end.
    async fn finish(&mut self) -> Result<Result<(), ClientError>, JoinError> {
        (&mut self.0).await
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A temporary upload file, removed when dropped: on success, on every
/// error, and when the request is cancelled mid-way. Removing one file is
/// quick enough to do synchronously in `drop`.
struct TemporaryFile(PathBuf);

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.0)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), %error, "a temporary upload could not be removed");
        }
    }
}

/// Writes `body` to a new file at `path`; returns its size. Fails with
/// `too-large` as soon as it passes `limit`.
async fn receive(body: Body, path: &Path, limit: bytesize::ByteSize) -> Result<u64, ApiError> {
    let io = |error: std::io::Error| {
        ApiError::internal(format!("writing the upload to {}: {error}", path.display()))
    };
    let file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut writer = tokio::io::BufWriter::with_capacity(UPLOAD_BUFFER, file);
    let mut stream = body.into_data_stream();
    let mut size: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|error| ApiError::invalid(format!("the upload broke off: {error}")))?;
        size = size.saturating_add(chunk.len() as u64);
        if size > limit.as_u64() {
            return Err(too_large(limit));
        }
        writer.write_all(&chunk).await.map_err(io)?;
    }
    writer.flush().await.map_err(io)?;
    Ok(size)
}

fn too_large(limit: bytesize::ByteSize) -> ApiError {
    ApiError::too_large(format!(
        "the file is larger than api.max_file_size ({limit})"
    ))
}

/// A file this Connector uploaded, and its reference, by id.
async fn uploaded(state: &AppState, id: &str) -> Result<(Published, FileRef), ApiError> {
    // The database holds ids in lowercase hex.
    let file = state
        .db
        .published(PublishedKind::File, id.to_ascii_lowercase())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no file {id:?} uploaded through this Connector"))
        })?;
    let reference = file.reference.parse().map_err(|error| {
        ApiError::internal(format!(
            "the stored reference of file {id} is corrupt: {error}"
        ))
    })?;
    Ok((file, reference))
}

/// A file name from a request.
fn name_of(name: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(name) = name else {
        return Ok(None);
    };
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ApiError::invalid(format!(
            "name must have 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name must not contain control characters",
        ));
    }
    Ok(Some(name))
}

/// `attachment; filename="..."` for a file name from anywhere (a peer's
/// message included): control characters and path separators become `_`,
/// the plain `filename` is ASCII without quotes, and a name that is not
/// plain ASCII also goes whole, percent-encoded, in `filename*` (RFC 6266).
fn content_disposition(name: &str) -> Option<HeaderValue> {
    let cleaned: String = name
        .chars()
        .take(MAX_NAME_CHARS)
        .map(|c| {
            if c.is_control() || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if cleaned.trim().is_empty() {
        return None;
    }
    let ascii: String = cleaned
        .chars()
        .map(|c| if c.is_ascii() && c != '"' { c } else { '_' })
        .collect();
    let mut value = format!("attachment; filename=\"{ascii}\"");
    if ascii != cleaned {
        value.push_str("; filename*=UTF-8''");
        for byte in cleaned.bytes() {
            if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
                value.push(char::from(byte));
            } else {
                value.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disposition(name: &str) -> Option<String> {
        content_disposition(name).map(|value| value.to_str().expect("ASCII").to_owned())
    }

    #[test]
    fn a_plain_name_is_quoted_as_it_is() {
        assert_eq!(
            disposition("report 2026.pdf").as_deref(),
            Some("attachment; filename=\"report 2026.pdf\"")
        );
    }

    #[test]
    fn quotes_separators_and_control_characters_cannot_escape_the_header() {
        assert_eq!(
            disposition("../a\"b\r\nSet-Cookie: x").as_deref(),
            Some(
                "attachment; filename=\".._a_b__Set-Cookie: x\"; \
                 filename*=UTF-8''.._a%22b__Set-Cookie%3A%20x"
            )
        );
    }

    #[test]
    fn a_name_beyond_ascii_also_goes_percent_encoded() {
        assert_eq!(
            disposition("Grüße.txt").as_deref(),
            Some("attachment; filename=\"Gr__e.txt\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe.txt")
        );
    }

    #[test]
    fn a_blank_name_gives_no_header() {
        assert_eq!(disposition(" "), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(name_of(None).expect("none").is_none());
        assert!(name_of(Some(String::new())).is_err());
        assert!(name_of(Some("a\u{7}b".into())).is_err());
        assert!(name_of(Some("x".repeat(MAX_NAME_CHARS + 1))).is_err());
        assert_eq!(
            name_of(Some("notes.md".into())).expect("valid"),
            Some("notes.md".to_owned())
        );
    }
    /// A broker on loopback, and the state of a Connector connected to it
    /// (handlers are called directly, without the HTTP server).
    async fn connected() -> (backbone_broker::Broker, AppState, tempfile::TempDir) {
        use std::sync::Arc;

        use backbone_client::envelope::EncryptionKeypair;
        use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};

        let dir = tempfile::tempdir().expect("dir");
        let mut config = backbone_broker::Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.server.data_dir = dir.path().join("broker");
        config.metrics.listen = None;
        let broker = backbone_broker::Broker::start(config, Default::default())
            .await
            .expect("the broker starts");
        let mut connect = ConnectConfig::new(
            broker.quic_addr.to_string(),
            Trust::CaFile(broker.cert_path.clone()),
        );
        connect.server_name = Some("localhost".into());
        let identity = backbone_protocol::Keypair::generate();
        let address = identity.address().to_string();
        let client = Client::connect(ClientOptions::primary(
            connect,
            identity,
            EncryptionKeypair::generate(),
        ))
        .await
        .expect("connects");
        let mut config = crate::config::Config::default();
        config.storage.data_dir = dir.path().join("connector");
        config.api.max_file_size = bytesize::ByteSize::kib(300);
        std::fs::create_dir_all(&config.storage.data_dir).expect("data dir");
        let db = crate::db::Database::open(&config.storage.data_dir)
            .await
            .expect("db");
        let state = AppState {
            config: Arc::new(config),
            db,
            backbone: tokio::sync::watch::channel(Some(Arc::new(client))).1,
            address,
            events: tokio::sync::watch::channel(0).1,
            webhooks: Arc::new(tokio::sync::Notify::new()),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            key_hashes: Arc::new(Vec::new()),
            stalled: Arc::new(std::sync::Mutex::new(None)),
            uploads: Arc::new(tokio::sync::Semaphore::new(super::super::PARALLEL_UPLOADS)),
        };
        (broker, state, dir)
    }

    async fn body_of(response: Response) -> Result<Vec<u8>, String> {
        let mut stream = response.into_body().into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(|error| error.to_string())?);
        }
        Ok(bytes)
    }

    async fn upload_bytes(state: &AppState, bytes: Vec<u8>) -> Result<Published, ApiError> {
        upload(
            State(state.clone()),
            ApiQuery(UploadParams {
                name: Some("a \"b\".bin".into()),
                ttl_secs: Some(600),
            }),
            HeaderMap::new(),
            Body::from(bytes),
        )
        .await
        .map(|(_, ApiJson(published))| published)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_go_up_and_come_back_down_and_failures_are_problems() {
        let (_broker, state, dir) = connected().await;
        let uploads = dir.path().join("connector/uploads");
        let file: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let published = upload_bytes(&state, file.clone()).await.expect("upload");
        assert_eq!(published.size, file.len() as u64);
        assert_eq!(std::fs::read_dir(&uploads).expect("uploads").count(), 0);
        let response = download(State(state.clone()), ApiPath(published.id.clone()))
            .await
            .expect("download");
        assert_eq!(
            response.headers()[header::CONTENT_DISPOSITION],
            "attachment; filename=\"a _b_.bin\"; filename*=UTF-8''a%20%22b%22.bin"
        );
        assert!(body_of(response).await.expect("whole") == file);
        let ApiJson(status_of) = status(State(state.clone()), ApiPath(published.id.clone()))
            .await
            .expect("status");
        assert!(status_of.complete);

        // An empty file.
        let empty = upload_bytes(&state, Vec::new())
            .await
            .expect("empty upload");
        let response = download(State(state.clone()), ApiPath(empty.id.clone()))
            .await
            .expect("download empty");
        assert_eq!(body_of(response).await.expect("empty"), Vec::<u8>::new());

        // Over api.max_file_size: refused, and nothing is left behind.
        let error = upload_bytes(&state, vec![0; 300 * 1024 + 1])
            .await
            .expect_err("too large");
        assert_eq!(error.slug(), "too-large");
        assert_eq!(std::fs::read_dir(&uploads).expect("uploads").count(), 0);

        // A wrong secret fails before the first byte: a problem, not a 200.
        let mut wrong: FileRef = published.reference.parse().expect("reference");
        wrong.secret.0[0] ^= 1;
        let error = fetch(
            State(state.clone()),
            ApiJson(FetchFile {
                reference: wrong.to_text(),
            }),
        )
        .await
        .expect_err("wrong secret");
        assert_eq!(error.slug(), "forbidden", "{error:?}");
        // A wrong key fails on the first chunk, also before any byte.
        let mut wrong: FileRef = published.reference.parse().expect("reference");
        wrong.key[0] ^= 1;
        let error = stream_download(&state, wrong, None)
            .await
            .expect_err("wrong key");
        assert_eq!(error.slug(), "undecryptable", "{error:?}");

        // Deleted: gone here and at the Backbone.
        let deleted = delete(State(state.clone()), ApiPath(published.id.clone()))
            .await
            .expect("delete");
        assert_eq!(deleted, StatusCode::NO_CONTENT);
        let error = status(State(state.clone()), ApiPath(published.id.clone()))
            .await
            .map(|ApiJson(held)| held)
            .expect_err("deleted");
        assert_eq!(error.slug(), "not-found");
        let error = stream_download(&state, published.reference.parse().expect("ref"), None)
            .await
            .expect_err("deleted at the Backbone");
        assert_eq!(error.slug(), "backbone-not-found", "{error:?}");
        let ApiJson(listed) = list(State(state.clone())).await.expect("list");
        assert_eq!(listed, vec![empty]);
    }
}
