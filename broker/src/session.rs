//! One client connection: handshake, authentication, requests, delivery.
//!
//! The client opens one bidirectional stream and everything flows over it:
//! requests and their responses (matched by `request_id`) and pushed
//! [`Deliver`] frames. The reader loop dispatches requests: sends run inside
//! the session's task, other requests as tasks of their own, all bounded by
//! a semaphore, so a client that floods requests stops being read and QUIC
//! flow control pushes back. A delivery task per session pushes
//! envelopes in sequence order with at most `push_window` unacknowledged.
//!
//! Every authenticated session is listed in [`LiveSessions`] under its
//! address (and its device, for a certified device), so that the purge of a
//! deleted identity, or the removal of a device, can close its connections
//! and wait until they are over.
//!
//! A client may instead answer the challenge with `Anonymous`: the session
//! then names no identity (none is recorded in its span either), has no
//! mailbox and no delivery task, and serves only `SealedSend`, `FetchCard`
//! (a sealed sender needs the recipient's card), `GetToken` (holding a
//! token's id is the permission) and `Ping`. Every other request is refused
//! with `NotAuthenticated` and the session goes on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use backbone_protocol::auth::{TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN};
use backbone_protocol::bytes::{Blob, MessageId, Nonce, Text};
use backbone_protocol::codec::{BufferError, PRE_AUTH_MAX_FRAME_LEN, Phase};
use backbone_protocol::fleet::{PeerCardResult, PeerFetchCard, PeerFrame};
use backbone_protocol::frame::{
    AuthOk, Capabilities, CardResult, Deliver, Done, DownloadFile, ErrorCode, ErrorFrame,
    FetchCard, Pong, Redirect, SealedSend, Send, SendAck, UploadFile,
};
use backbone_protocol::handshake::{HandshakeParams, HandshakeStep, ServerHandshake};
use backbone_protocol::{Address, DeviceId, Frame, IdentityCard};
use dashmap::DashMap;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, info_span, warn};

use crate::admission::{Source, Ticket};
use crate::fleet::Route;
use crate::mailbox::PushQueue;
use crate::relationships;
use crate::route::{StoreTemplate, store_everywhere, store_sealed};
use crate::server::Shared;
use crate::store::prelude::*;
use crate::store::{StoreError, StoredEnvelope, WriteHandle};
use crate::wire::{FrameReader, Outbox, OutboxLimits, ReadError, outbox};

/// Queue of outgoing frames per connection; the bytes they hold are bounded
/// by the connection's output budget (see [`Outbox`]).
const OUT_QUEUE: usize = 1024;

/// How long a redirected connection stays open for the client to read the redirect.
const REDIRECT_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes the connection with an error code as the QUIC application close code.
fn close(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    connection.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
}

/// An `Error` frame answering `request_id`, counted by code.
pub(crate) fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Frame {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(ErrorFrame::new(request_id, code, message))
}

/// Extra time, beyond `server.shutdown_grace`, that closing sessions (an
/// identity's purge, a device's unregistration) waits for them to finish
/// their requests.
pub(crate) const SESSION_END_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// An authenticated session.
struct Session {
    address: Address,
    device: DeviceId,
    /// Whether a certified device authenticated, rather than the identity
    /// key itself; such a session is refused the requests that
    /// [`Frame::needs_identity_key`].
    certified: bool,
    acked_seq: u64,
    /// Where the connection comes from, for per-source limits.
    source: Source,
    /// The source is exempt from per-source limits.
    exempt: bool,
    /// Lists the session under its address until the last task holding
    /// the session (its requests, its delivery) is done.
    _live: LiveSession,
}

/// The authenticated sessions of each address, with their connections.
#[derive(Default)]
pub struct LiveSessions {
    next_id: AtomicU64,
    by_address: Arc<DashMap<Address, HashMap<u64, Listed>>>,
}

/// One listed session: its connection, the certified device it belongs to
/// (`None` for the identity key), and a channel whose sender the session
/// holds, so that it closes when the session is over.
struct Listed {
    connection: quinn::Connection,
    device: Option<DeviceId>,
    over: watch::Receiver<()>,
}

/// A session's place in [`LiveSessions`]; leaves it when dropped.
struct LiveSession {
    address: Address,
    id: u64,
    by_address: Arc<DashMap<Address, HashMap<u64, Listed>>>,
    _over: watch::Sender<()>,
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.by_address.remove_if_mut(&self.address, |_, sessions| {
            sessions.remove(&self.id);
            sessions.is_empty()
        });
    }
}

impl LiveSessions {
    fn register(
        &self,
        address: Address,
        device: Option<DeviceId>,
        connection: &quinn::Connection,
    ) -> LiveSession {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (over_tx, over) = watch::channel(());
        self.by_address.entry(address).or_default().insert(
            id,
            Listed {
                connection: connection.clone(),
                device,
                over,
            },
        );
        LiveSession {
            address,
            id,
            by_address: self.by_address.clone(),
            _over: over_tx,
        }
    }

    /// Closes every connection of `address` with `code` and waits, at most
    /// `limit`, until each of its sessions is over: its requests in
    /// progress finished and its delivery stopped. Returns how many
    /// sessions there were.
    pub async fn close_all(
        &self,
        address: &Address,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        self.close_where(address, |_| true, code, reason, limit)
            .await
    }

    /// [`LiveSessions::close_all`] for the sessions of one certified
    /// `device` of `address` only; the identity key's sessions and other
    /// devices' go on.
    pub async fn close_device(
        &self,
        address: &Address,
        device: &DeviceId,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        self.close_where(
            address,
            |listed| listed.device.as_ref() == Some(device),
            code,
            reason,
            limit,
        )
        .await
    }

    async fn close_where(
        &self,
        address: &Address,
        chosen: impl Fn(&Listed) -> bool,
        code: ErrorCode,
        reason: &str,
        limit: std::time::Duration,
    ) -> usize {
        let sessions: Vec<(quinn::Connection, watch::Receiver<()>)> = self
            .by_address
            .get(address)
            .map(|sessions| {
                sessions
                    .values()
                    .filter(|listed| chosen(listed))
                    .map(|listed| (listed.connection.clone(), listed.over.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (connection, _) in &sessions {
            close(connection, code, reason);
        }
        let count = sessions.len();
        let all_over = async {
            for (_, mut over) in sessions {
                // Fails once the session dropped its sender: it is over.
                while over.changed().await.is_ok() {}
            }
        };
        if tokio::time::timeout(limit, all_over).await.is_err() {
            warn!(code = code.name(), "sessions still busy after closing them");
        }
        count
    }
}

/// Serves one incoming connection to the end. `ticket` holds its places
/// (see [`crate::admission`]) and gives them back when the connection ends.
///
/// `auth.deadline` runs from the first packet: a QUIC/TLS handshake that
/// never completes holds its place no longer than one that completes and
/// never authenticates.
///
/// Not an `async fn`: the state of a connection's task lasts as long as the
/// connection, and an `async fn` would keep its arguments in it for good
/// (`quinn::Incoming` alone is 384 bytes, kept twice, with the block below).
/// The QUIC handshake's future is boxed for the same reason: it is dropped
/// once the handshake is over.
pub fn serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    mut ticket: Ticket,
) -> impl Future<Output = ()> + std::marker::Send {
    let remote = incoming.remote_address();
    let span = info_span!("conn", %remote, address = tracing::field::Empty);
    let deadline = tokio::time::Instant::now() + shared.config.auth.deadline;
    let handshake = Box::pin(tokio::time::timeout_at(deadline, incoming));
    async move {
        let connection = match handshake.await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                debug!(%error, "handshake failed");
                metrics::counter!("backbone_handshakes_failed_total", "reason" => "tls")
                    .increment(1);
                return;
            }
            Err(_) => {
                // Dropping the handshake closes the connection.
                debug!("handshake not completed in time");
                metrics::counter!("backbone_handshakes_failed_total", "reason" => "timeout")
                    .increment(1);
                return;
            }
        };
        metrics::gauge!("backbone_connections").increment(1.0);
        run(&shared, &connection, &mut ticket, deadline).await;
        metrics::gauge!("backbone_connections").decrement(1.0);
    }
    .instrument(span)
}

async fn run(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    ticket: &mut Ticket,
    deadline: tokio::time::Instant,
) {
    let mut shutdown = shared.shutdown.clone();
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(deadline, authenticate(shared, connection, ticket)) => handshake,
        _ = shutdown.wait_for(|stop| *stop) => {
            return close(connection, ErrorCode::ShuttingDown, "broker is shutting down");
        }
    };
    let (session, reader, out) = match handshake {
        Err(_) => {
            metrics::counter!("backbone_handshakes_failed_total", "reason" => "auth_timeout")
                .increment(1);
            return close(
                connection,
                ErrorCode::AuthTimeout,
                "not authenticated in time",
            );
        }
        Ok(Err((code, reason))) => {
            metrics::counter!("backbone_handshakes_failed_total", "reason" => "refused")
                .increment(1);
            return close(connection, code, &reason);
        }
        Ok(Ok(Handshake::Redirect { out, node })) => {
            metrics::counter!("backbone_redirects_total").increment(1);
            let redirect = Frame::Redirect(Redirect {
                request_id: 0,
                node: Text(node),
            });
            if out.send(redirect).await.is_ok() {
                drop(out);
                // The client closes once it has read the redirect; closing
                // first could discard the frame.
                let _ = tokio::time::timeout(REDIRECT_LINGER, connection.closed()).await;
            }
            return connection.close(quinn::VarInt::from_u32(0), b"redirected");
        }
        Ok(Ok(Handshake::Anonymous(reader, out))) => {
            debug!("anonymous session");
            metrics::gauge!("backbone_anonymous_sessions").increment(1.0);
            let source = (!ticket.exempt()).then_some(ticket.source());
            // Boxed: its state is larger than an authenticated session's,
            // and every connection's task would otherwise be sized for it.
            Box::pin(serve_anonymous(shared, connection, source, reader, out)).await;
            metrics::gauge!("backbone_anonymous_sessions").decrement(1.0);
            return;
        }
        Ok(Ok(Handshake::Session(session, reader, out))) => (session, reader, out),
    };
    tracing::Span::current().record("address", tracing::field::display(&session.address));
    metrics::gauge!("backbone_sessions").increment(1.0);
    serve_authenticated(shared, connection, session, reader, out).await;
    metrics::gauge!("backbone_sessions").decrement(1.0);
}

type HandshakeError = (ErrorCode, String);

/// How a successful handshake continues.
enum Handshake {
    /// The address lives here: serve it.
    Session(Session, FrameReader, Outbox),
    /// The client chose an anonymous session, already confirmed.
    Anonymous(FrameReader, Outbox),
    /// The address lives on another node: send a redirect to `node` (`host:port`).
    Redirect { out: Outbox, node: String },
}

async fn authenticate(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    ticket: &mut Ticket,
) -> Result<Handshake, HandshakeError> {
    let (send, recv) = connection
        .accept_bi()
        .await
        .map_err(|error| (ErrorCode::UnexpectedFrame, format!("no stream: {error}")))?;
    // Small until the client is known: a connection that never
    // authenticates cannot make the broker hold more than this.
    let mut reader = FrameReader::new(recv, PRE_AUTH_MAX_FRAME_LEN);
    let limits = &shared.config.limits;
    let out = outbox(
        connection.clone(),
        send,
        OutboxLimits {
            frames: OUT_QUEUE,
            budget: limits.anonymous_output_budget.as_u64() as usize,
            stall_timeout: limits.output_stall_timeout,
        },
    );

    let mut tls_exporter = [0u8; TLS_EXPORTER_LEN];
    connection
        .export_keying_material(&mut tls_exporter, TLS_EXPORTER_LABEL, b"")
        .map_err(|_| (ErrorCode::Internal, "TLS exporter unavailable".into()))?;
    let mut handshake = ServerHandshake::new(HandshakeParams {
        server_id: shared.server_id,
        nonce: Nonce::random(),
        // The configuration caps the time to live at 60 s.
        challenge_ttl_ms: u32::try_from(shared.config.auth.challenge_ttl.as_millis())
            .unwrap_or(u32::MAX),
        tls_exporter,
    });
    // The handshake's clock: milliseconds since the stream was accepted.
    let started = Instant::now();
    let verified = loop {
        let frame = next_pre_auth(&mut reader).await?;
        let now_ms = started.elapsed().as_millis() as u64;
        match handshake
            .handle(frame, now_ms)
            .map_err(|error| (error.code(), error.to_string()))?
        {
            HandshakeStep::SendChallenge(challenge) => {
                send_frame(&out, Frame::Challenge(challenge)).await?;
            }
            HandshakeStep::Authenticated(verified) => break verified,
            HandshakeStep::Anonymous => {
                if let Err(refusal) = ticket.anonymous() {
                    metrics::counter!("backbone_connections_refused_total", "reason" => refusal.label())
                        .increment(1);
                    return Err((ErrorCode::Overloaded, refusal.to_string()));
                }
                crate::transport::grant_anonymous(connection, &shared.config.transport);
                reader.set_max_frame_len(shared.max_frame_len);
                // `Done` for request 0, the session itself, confirms it.
                send_frame(&out, Frame::Done(Done { request_id: 0 })).await?;
                return Ok(Handshake::Anonymous(reader, out));
            }
        }
    };
    let address = verified.address;
    if let Route::Remote(node) = shared.fleet.route(&address) {
        return Ok(Handshake::Redirect {
            out,
            node: node.public.clone(),
        });
    }
    if shared.fleet.is_importing(&address) {
        return Err((
            ErrorCode::ShardUnavailable,
            "this mailbox is being handed over to this node; retry shortly".into(),
        ));
    }
    let device = verified.device_id;
    let certified = verified.certified;
    // Listed before the tombstone is checked: a purge that begins after
    // this check finds the session and closes it, one that began before
    // is seen by the check.
    let live = shared
        .sessions
        .register(address, certified.then_some(device), connection);
    let store = shared.directory.clone();
    let acked_seq = blocking(move || -> Result<Option<u64>, (ErrorCode, String)> {
        if store
            .deletion(&address)
            .map_err(storage_error)?
            .is_some_and(|deletion| deletion.is_tombstone())
        {
            return Err((
                ErrorCode::IdentityDeleted,
                "this identity was deleted".into(),
            ));
        }
        if certified
            && store
                .device(&address, &device)
                .map_err(storage_error)?
                .is_none()
        {
            return Err((
                ErrorCode::DeviceNotRegistered,
                "device is not registered".into(),
            ));
        }
        store.cursor(&address, &device).map_err(storage_error)
    })
    .await??
    .unwrap_or(0);
    ticket.authenticated();
    crate::transport::grant_authenticated(connection, &shared.config.transport);
    reader.set_max_frame_len(shared.max_frame_len);
    out.set_budget(limits.output_budget.as_u64() as usize);
    send_frame(
        &out,
        Frame::AuthOk(AuthOk {
            address,
            device_id: device,
            acked_seq,
        }),
    )
    .await?;
    Ok(Handshake::Session(
        Session {
            address,
            device,
            certified,
            acked_seq,
            source: ticket.source(),
            exempt: ticket.exempt(),
            _live: live,
        },
        reader,
        out,
    ))
}

/// The file streams a client opens next to its first stream. The request
/// loop accepts them (a task per connection just to accept them cost about
/// 1 KB of every idle connection) and serves each in a task of its own.
struct FileStreams {
    /// The session's identity; `None` for an anonymous session, which may
    /// only download.
    owner: Option<Address>,
    /// An anonymous session's request budgets, which every stream counts
    /// against like a request.
    budget: Option<Arc<AnonymousBudget>>,
    /// Until the connection stops accepting streams.
    open: bool,
}

impl FileStreams {
    fn new(owner: Option<Address>) -> Self {
        Self {
            owner,
            budget: None,
            open: true,
        }
    }

    fn anonymous(budget: Arc<AnonymousBudget>) -> Self {
        Self {
            owner: None,
            budget: Some(budget),
            open: true,
        }
    }

    fn accepted(
        &mut self,
        shared: &Arc<Shared>,
        stream: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
    ) {
        match stream {
            Ok((send, recv)) => {
                if let Some(refusal) = self
                    .budget
                    .as_ref()
                    .and_then(|budget| budget.refusal(shared, 0))
                {
                    drop(recv);
                    tokio::spawn(crate::files::answer_stream(send, refusal).in_current_span());
                    return;
                }
                tokio::spawn(
                    crate::files::serve_stream(shared.clone(), self.owner, send, recv)
                        .in_current_span(),
                );
            }
            Err(error) => {
                debug!(%error, "no more file streams");
                self.open = false;
            }
        }
    }
}

/// The next request of a session, or `None` when the session ends: the
/// client closed, the broker shuts down, the stream cannot be read on, or
/// the answer to a skipped invalid frame cannot be sent. An invalid frame
/// that can be skipped is answered with its error and reading goes on.
/// File streams the client opens meanwhile are accepted and served.
///
/// While the connection's output is at its budget (the client does not
/// read its answers), no request is read: QUIC flow control then stops the
/// client, and the outbox's writer closes a connection that never drains.
async fn next_request(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    reader: &mut FrameReader,
    out: &Outbox,
    files: &mut FileStreams,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Frame> {
    loop {
        tokio::select! {
            room = out.room() => room.ok()?,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        let frame = tokio::select! {
            frame = reader.next(Phase::Any) => frame,
            stream = connection.accept_bi(), if files.open => {
                files.accepted(shared, stream);
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        match frame {
            Ok(frame) if frame.request_id() == Some(0) => {
                // 0 is what answers about the connection carry, so an answer
                // to this request could not be told from them.
                let name = Frame::TAG_NAMES[frame.tag() as usize];
                out.send(error_frame(
                    0,
                    ErrorCode::InvalidRequestId,
                    format!("{name} with request_id 0: requests need a non-zero id"),
                ))
                .await
                .ok()?;
            }
            Ok(frame) => return Some(frame),
            Err(ReadError::Closed) => return None,
            Err(ReadError::Frame(BufferError::Skipped(error))) => {
                debug!(%error, "invalid frame skipped");
                out.send(error_frame(0, error.code(), error.to_string()))
                    .await
                    .ok()?;
            }
            Err(ReadError::Frame(BufferError::Fatal(error))) => {
                close(connection, error.code(), &error.to_string());
                return None;
            }
        }
    }
}

/// The session's source for per-source limits, `None` when it is exempt.
fn source_of(session: &Session) -> Option<Source> {
    (!session.exempt).then_some(session.source)
}

fn storage_error(error: crate::store::StoreError) -> (ErrorCode, String) {
    (ErrorCode::StorageFailure, error.to_string())
}

async fn blocking<T: std::marker::Send + 'static>(
    work: impl FnOnce() -> T + std::marker::Send + 'static,
) -> Result<T, (ErrorCode, String)> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        (
            ErrorCode::Internal,
            format!("blocking task failed: {error}"),
        )
    })
}

async fn next_pre_auth(reader: &mut FrameReader) -> Result<Frame, HandshakeError> {
    match reader.next(Phase::PreAuth).await {
        Ok(frame) => Ok(frame),
        Err(ReadError::Closed) => Err((ErrorCode::UnexpectedFrame, "stream closed".into())),
        Err(ReadError::Frame(error)) => Err((
            error.decode_error().code(),
            error.decode_error().to_string(),
        )),
    }
}

async fn send_frame(out: &Outbox, frame: Frame) -> Result<(), HandshakeError> {
    out.send(frame)
        .await
        .map_err(|_| (ErrorCode::Internal, "connection writer stopped".into()))
}

async fn serve_authenticated(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    session: Session,
    mut reader: FrameReader,
    out: Outbox,
) {
    let session = Arc::new(session);
    let mut files = FileStreams::new(Some(session.address));
    let (ack_tx, ack_rx) = watch::channel(session.acked_seq);
    let delivery = tokio::spawn(
        deliver(shared.clone(), session.clone(), out.clone(), ack_rx).in_current_span(),
    );
    let permits = Arc::new(Semaphore::new(shared.config.limits.max_inflight_requests));
    let mut shutdown = shared.shutdown.clone();
    // Sends run inside this task, not as a task each: a send spends nearly
    // all its time waiting for its mailbox and the log, and a task per send
    // costs a spawn, a schedule and a wake-up on another worker each time.
    // They progress whenever this task waits: for the next frame, for a
    // permit, for room in the outbox.
    let send_metrics = SessionMetrics::get();
    // Made at the first send: an empty `FuturesUnordered` already holds a
    // stub task as large as a send's future, which an idle connection
    // would pay for.
    let mut sends = None;
    loop {
        let next = std::pin::pin!(next_request(
            shared,
            connection,
            &mut reader,
            &out,
            &mut files,
            &mut shutdown,
        ));
        let Some(frame) = while_sending(&mut sends, next).await else {
            break;
        };
        match frame {
            Frame::Send(send) => {
                let Some(permit) =
                    while_sending(&mut sends, std::pin::pin!(permits.clone().acquire_owned()))
                        .await
                        .ok()
                else {
                    break;
                };
                sends
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(answer_send(
                        shared,
                        &session,
                        &out,
                        send_metrics,
                        send,
                        permit,
                    ));
            }
            Frame::Ack(ack) => {
                send_metrics.acks.increment(1);
                ack_tx.send_modify(|acked| *acked = (*acked).max(ack.up_to_seq));
            }
            Frame::Ping(ping) => {
                let pong = std::pin::pin!(out.send(Frame::Pong(Pong { nonce: ping.nonce })));
                let _ = while_sending(&mut sends, pong).await;
            }
            Frame::Pong(_) => {}
            Frame::Error(error) => {
                debug!(code = error.code, message = %error.message, "client reported an error")
            }
            request => {
                let Some(permit) =
                    while_sending(&mut sends, std::pin::pin!(permits.clone().acquire_owned()))
                        .await
                        .ok()
                else {
                    break;
                };
                let (shared, session, out) = (shared.clone(), session.clone(), out.clone());
                tokio::spawn(
                    async move {
                        let response = handle_request(&shared, &session, request).await;
                        let _ = out.send(response).await;
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
        }
    }
    // Let in-flight requests finish (bounded by the shutdown grace), then stop.
    let all = shared.config.limits.max_inflight_requests as u32;
    let _ = tokio::time::timeout(shared.config.server.shutdown_grace, async {
        if let Some(sends) = &mut sends {
            while sends.next().await.is_some() {}
        }
        permits.acquire_many(all).await
    })
    .await;
    drop(ack_tx);
    let _ = delivery.await;
    if *shared.shutdown.borrow() {
        close(
            connection,
            ErrorCode::ShuttingDown,
            "broker is shutting down",
        );
    }
}

/// The metrics sessions record per envelope, looked up once: looking a
/// metric up allocates in the exporter's registry, which per envelope was a
/// fifth of the broker's allocations.
struct SessionMetrics {
    /// A send's time from its checks to its answer.
    send_seconds: metrics::Histogram,
    accepted: metrics::Counter,
    /// `Ack` frames received.
    acks: metrics::Counter,
    push_delay: metrics::Histogram,
    pushed: metrics::Counter,
    acked: metrics::Counter,
}

impl SessionMetrics {
    /// The process's handles, looked up at the first session and shared by
    /// all: handles held per session would cost every idle connection a few
    /// hundred bytes. The recorder is installed before any session (the
    /// binary installs it at start, `Broker::start` before it listens), so
    /// the first lookup finds it; a process that installs one only after
    /// its first session keeps these handles recording nowhere.
    fn get() -> &'static Self {
        static METRICS: std::sync::OnceLock<SessionMetrics> = std::sync::OnceLock::new();
        METRICS.get_or_init(|| Self {
            send_seconds: metrics::histogram!("backbone_send_seconds", "kind" => "send"),
            accepted: metrics::counter!("backbone_envelopes_accepted_total"),
            acks: metrics::counter!("backbone_acks_received_total"),
            push_delay: metrics::histogram!("backbone_push_delay_seconds"),
            pushed: metrics::counter!("backbone_envelopes_pushed_total"),
            acked: metrics::counter!("backbone_envelopes_acked_total"),
        })
    }
}

/// Awaits `future` while driving the session's sends in progress, so that
/// they complete while the session waits for anything else.
///
/// The future is pinned by the caller and only borrowed here, so that the
/// session's state holds it once (a future moved in and pinned again would
/// take its size twice in every idle connection's task).
async fn while_sending<F: Future>(
    sends: &mut Option<FuturesUnordered<impl Future<Output = ()>>>,
    mut future: Pin<&mut F>,
) -> F::Output {
    let Some(sends) = sends else {
        return future.await;
    };
    loop {
        tokio::select! {
            biased;
            Some(()) = sends.next(), if !sends.is_empty() => {}
            output = &mut future => return output,
        }
    }
}

/// One send of an authenticated session, from its checks to its answer in
/// the outbox; holds one of the session's request permits.
async fn answer_send(
    shared: &Arc<Shared>,
    session: &Session,
    out: &Outbox,
    metrics: &SessionMetrics,
    send: Send,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let response = handle_send(shared, session, send).await;
    metrics.send_seconds.record(started.elapsed().as_secs_f64());
    if let Frame::SendAck(ack) = &response {
        metrics.accepted.increment(ack.stored.len() as u64);
    }
    count_refused_copies("send", &response);
    let _ = out.send(response).await;
    drop(permit);
}

/// Counts the envelope copies a `Send` or `SealedSend` answer refuses, by
/// code: the whole request once when it is refused, else each recipient
/// listed as failed.
fn count_refused_copies(kind: &'static str, answer: &Frame) {
    let count = |code: u16| {
        let code = ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name);
        metrics::counter!("backbone_sends_refused_total", "kind" => kind, "code" => code)
            .increment(1);
    };
    match answer {
        Frame::Error(error) => count(error.code),
        Frame::SendAck(ack) => ack.failed.iter().for_each(|failed| count(failed.code)),
        _ => {}
    }
}

async fn handle_send(shared: &Arc<Shared>, session: &Session, send: Send) -> Frame {
    let limits = &shared.config.limits;
    let id = send.request_id;
    if send.recipients.is_empty() || send.recipients.len() > limits.max_recipients {
        return error_frame(
            id,
            ErrorCode::InvalidRecipients,
            format!("between 1 and {} recipients", limits.max_recipients),
        );
    }
    let unique: HashSet<_> = send.recipients.iter().collect();
    if unique.len() != send.recipients.len() {
        return error_frame(id, ErrorCode::InvalidRecipients, "duplicate recipient");
    }
    if send.envelope.0.len() as u64 > limits.max_envelope_size.as_u64() {
        return error_frame(
            id,
            ErrorCode::EnvelopeTooLarge,
            format!("envelope exceeds {}", limits.max_envelope_size),
        );
    }
    if send.ttl_secs == 0 {
        return error_frame(id, ErrorCode::InvalidTtl, "ttl must be at least one second");
    }
    if backbone_protocol::relationship::is_reserved(&send.envelope.0) {
        let (code, message) = relationships::reserved();
        return error_frame(id, code, message);
    }
    if let Some(limiter) = &shared.send_limiter {
        let copies = std::num::NonZeroU32::new(send.recipients.len() as u32)
            .unwrap_or(std::num::NonZeroU32::MIN);
        if let Ok(Err(not_until)) = limiter.check_key_n(&session.address, copies) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
            let mut frame = ErrorFrame::new(
                id,
                ErrorCode::RateLimited,
                format!("over {} envelope copies per second", limits.send_rate),
            );
            frame.retry_after_ms = Some(wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
            metrics::counter!("backbone_errors_total", "code" => ErrorCode::RateLimited.name())
                .increment(1);
            return Frame::Error(frame);
        }
    }
    let ttl_ms = (u64::from(send.ttl_secs) * 1000).min(limits.max_ttl.as_millis() as u64);
    let stored_at_ms = (shared.clock)();
    let message_id = MessageId::random();
    let template = StoreTemplate {
        message_id,
        sender: Some(session.address),
        stored_at_ms,
        expires_at_ms: stored_at_ms + ttl_ms,
        envelope: send.envelope.0,
    };
    let (stored, failed) = store_everywhere(shared, send.recipients, template).await;
    Frame::SendAck(SendAck {
        request_id: id,
        message_id,
        stored,
        failed,
    })
}

async fn handle_request(shared: &Arc<Shared>, session: &Session, request: Frame) -> Frame {
    let store = shared.directory.clone();
    let address = session.address;
    if session.certified && request.needs_identity_key() {
        return error_frame(
            request_id_of(&request),
            ErrorCode::IdentityKeyRequired,
            format!(
                "{} needs a session of the identity key; this one is a certified device's",
                Frame::TAG_NAMES[request.tag() as usize]
            ),
        );
    }
    match request {
        Frame::PublishCard(publish) => {
            let id = publish.request_id;
            if let Err(error) = publish.card.verify(&address) {
                return error_frame(id, ErrorCode::InvalidCard, error.to_string());
            }
            respond(
                id,
                blocking(move || store.put_card(&publish.card)).await,
                |()| Frame::Done(Done { request_id: id }),
            )
        }
        Frame::FetchCard(fetch) => fetch_card(shared, fetch).await,
        Frame::RegisterCapability(register) => {
            let id = register.request_id;
            let max = shared.config.limits.max_capabilities;
            let hash = register.capability_hash;
            // Flushed before `Done`: a contact may be handed the capability
            // as soon as it is confirmed.
            let registered = blocking(move || {
                let added = store.register_capability(&address, &hash, max)?;
                store.sync()?;
                Ok(added)
            })
            .await;
            respond(id, registered, |added| {
                if added {
                    metrics::counter!("backbone_capabilities_registered_total").increment(1);
                    Frame::Done(Done { request_id: id })
                } else {
                    error_frame(
                        id,
                        ErrorCode::TooManyCapabilities,
                        format!("this mailbox already holds {max} capabilities; revoke some first"),
                    )
                }
            })
        }
        Frame::RevokeCapability(revoke) => {
            let id = revoke.request_id;
            let hash = revoke.capability_hash;
            // Flushed before `Done`: a revocation must survive a crash.
            let revoked = blocking(move || {
                let existed = store.revoke_capability(&address, &hash)?;
                store.sync()?;
                Ok(existed)
            })
            .await;
            respond(id, revoked, |existed| {
                if existed {
                    metrics::counter!("backbone_capabilities_revoked_total").increment(1);
                    Frame::Done(Done { request_id: id })
                } else {
                    error_frame(id, ErrorCode::NotFound, "no such capability is registered")
                }
            })
        }
        Frame::ListCapabilities(list) => {
            let id = list.request_id;
            respond(
                id,
                blocking(move || store.capabilities(&address)).await,
                |hashes| {
                    Frame::Capabilities(Capabilities {
                        request_id: id,
                        hashes,
                    })
                },
            )
        }
        Frame::SetInboundPolicy(set) => {
            relationships::set_policy(shared, address, set.request_id, set.policy).await
        }
        Frame::RequestRelationship(request) => {
            relationships::request(shared, address, source_of(session), request).await
        }
        Frame::DecideRelationship(decision) => {
            relationships::decide(shared, address, decision).await
        }
        Frame::ListRelationships(list) => {
            relationships::list(shared, address, list.request_id).await
        }
        Frame::SealedSend(send) => error_frame(
            send.request_id,
            ErrorCode::UnexpectedFrame,
            "SealedSend needs an anonymous session: on this one the broker knows the sender",
        ),
        Frame::DeleteIdentity(delete) => {
            crate::deletion::schedule(shared, address, delete.request_id).await
        }
        Frame::CancelDeletion(cancel) => {
            crate::deletion::cancel(shared, address, cancel.request_id).await
        }
        Frame::CreateToken(create) => crate::token::create(shared, address, create).await,
        Frame::GetToken(get) => crate::token::get(shared, get).await,
        Frame::DeleteToken(delete) => crate::token::delete(shared, address, delete).await,
        Frame::CreateFile(create) => crate::files::create(shared, address, create).await,
        Frame::FileStatus(status) => crate::files::status(shared, address, status).await,
        Frame::DeleteFile(delete) => crate::files::delete(shared, address, delete).await,
        Frame::UploadFile(UploadFile { request_id, .. })
        | Frame::DownloadFile(DownloadFile { request_id, .. }) => error_frame(
            request_id,
            ErrorCode::UnexpectedFrame,
            "file transfers run on their own stream: open a new one for each",
        ),
        Frame::RegisterDevice(register) => {
            crate::devices::register(shared, address, register.request_id, register.certificate)
                .await
        }
        Frame::UnregisterDevice(unregister) => {
            crate::devices::unregister(shared, address, unregister.request_id, unregister.device_id)
                .await
        }
        Frame::ListDevices(list) => crate::devices::list(shared, address, list.request_id).await,
        Frame::Delete(delete) => {
            let id = delete.request_id;
            match shared.writer.delete(address, delete.seqs).await {
                Ok(count) => {
                    metrics::counter!("backbone_envelopes_deleted_total").increment(count as u64);
                    if count > 0 {
                        shared.registry.freed(&address);
                    }
                    Frame::Done(Done { request_id: id })
                }
                Err(error) => error_frame(id, ErrorCode::StorageFailure, error.to_string()),
            }
        }
        Frame::Hello(_) | Frame::Auth(_) | Frame::Anonymous(_) => error_frame(
            0,
            ErrorCode::ChallengeReused,
            "already authenticated; challenges are single use",
        ),
        other => error_frame(
            0,
            ErrorCode::UnexpectedFrame,
            format!(
                "{} is not a client request",
                Frame::TAG_NAMES[other.tag() as usize]
            ),
        ),
    }
}

/// Answers a card lookup, for authenticated and anonymous sessions alike.
async fn fetch_card(shared: &Arc<Shared>, fetch: FetchCard) -> Frame {
    let id = fetch.request_id;
    if let Route::Remote(node) = shared.fleet.route(&fetch.address) {
        return fetch_remote_card(shared, &node.name, id, fetch.address).await;
    }
    if shared.fleet.is_importing(&fetch.address) {
        return shard_unavailable(shared, id, "this card is being handed over to this node");
    }
    let store = shared.directory.clone();
    match blocking(move || card_here(store.as_ref(), &fetch.address)).await {
        Ok(Ok(card)) => Frame::CardResult(CardResult {
            request_id: id,
            card,
        }),
        Ok(Err(code)) => error_frame(id, code, card_refusal(code)),
        Err((code, message)) => error_frame(id, code, message),
    }
}

/// The card of `address` from this node's store, as a card lookup answers
/// it (a client's here, or a peer node's): `UnknownAddress` without one,
/// `IdentityDeleted` once the identity's purge has begun. Blocking.
pub fn card_here(store: &dyn Directory, address: &Address) -> Result<IdentityCard, ErrorCode> {
    let stored = || -> Result<Result<IdentityCard, ErrorCode>, StoreError> {
        if store
            .deletion(address)?
            .is_some_and(|deletion| deletion.is_tombstone())
        {
            return Ok(Err(ErrorCode::IdentityDeleted));
        }
        Ok(store.card(address)?.ok_or(ErrorCode::UnknownAddress))
    };
    stored().unwrap_or_else(|error| {
        warn!(%error, "reading a card failed");
        Err(ErrorCode::StorageFailure)
    })
}

fn card_refusal(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownAddress => "no card for this address",
        ErrorCode::IdentityDeleted => "this identity was deleted",
        _ => "the card could not be read",
    }
}

/// Serves an anonymous session: sealed sends, card lookups, token fetches
/// and pings, until the client closes or the broker shuts down. Requests run
/// as tasks, at most `limits.anonymous_max_inflight_requests` at once, each
/// counted against the session's and its source's request budgets
/// ([`AnonymousBudget`]).
async fn serve_anonymous(
    shared: &Arc<Shared>,
    connection: &quinn::Connection,
    source: Option<Source>,
    mut reader: FrameReader,
    out: Outbox,
) {
    let budget = Arc::new(AnonymousBudget::new(shared, source));
    let inflight = shared.config.limits.anonymous_max_inflight_requests;
    let permits = Arc::new(Semaphore::new(inflight));
    let mut shutdown = shared.shutdown.clone();
    let mut files = FileStreams::anonymous(budget.clone());
    loop {
        let Some(frame) = next_request(
            shared,
            connection,
            &mut reader,
            &out,
            &mut files,
            &mut shutdown,
        )
        .await
        else {
            break;
        };
        let request = match frame {
            Frame::Ping(ping) => {
                let _ = out.send(Frame::Pong(Pong { nonce: ping.nonce })).await;
                continue;
            }
            Frame::Pong(_) => continue,
            Frame::Error(error) => {
                debug!(code = error.code, message = %error.message, "client reported an error");
                continue;
            }
            request @ (Frame::SealedSend(_) | Frame::FetchCard(_) | Frame::GetToken(_)) => {
                if let Some(refusal) = budget.refusal(shared, request_id_of(&request)) {
                    if matches!(request, Frame::SealedSend(_)) {
                        metrics::counter!("backbone_sealed_refused_total", "reason" => "connection_rate")
                            .increment(1);
                    }
                    if out.send(refusal).await.is_err() {
                        break;
                    }
                    continue;
                }
                request
            }
            Frame::Hello(_) | Frame::Auth(_) | Frame::Anonymous(_) => {
                let refusal = error_frame(
                    0,
                    ErrorCode::ChallengeReused,
                    "the handshake is over; challenges are single use",
                );
                if out.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
            other => {
                let name = Frame::TAG_NAMES[other.tag() as usize];
                // A request (or an `Ack`) needs an identity; a frame only a
                // broker sends is refused as on an authenticated session.
                let refusal = if other.request_id().is_some() || matches!(other, Frame::Ack(_)) {
                    error_frame(
                        request_id_of(&other),
                        ErrorCode::NotAuthenticated,
                        format!("{name} needs an authenticated session; this one is anonymous"),
                    )
                } else {
                    error_frame(
                        0,
                        ErrorCode::UnexpectedFrame,
                        format!("{name} is not a client request"),
                    )
                };
                if out.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (shared, out) = (shared.clone(), out.clone());
        tokio::spawn(
            async move {
                let response = match request {
                    Frame::SealedSend(send) => {
                        let started = Instant::now();
                        let response = handle_sealed_send(&shared, send).await;
                        metrics::histogram!("backbone_send_seconds", "kind" => "sealed")
                            .record(started.elapsed().as_secs_f64());
                        count_refused_copies("sealed", &response);
                        response
                    }
                    Frame::FetchCard(fetch) => fetch_card(&shared, fetch).await,
                    Frame::GetToken(get) => crate::token::get(&shared, get).await,
                    other => error_frame(
                        request_id_of(&other),
                        ErrorCode::Internal,
                        "unhandled anonymous request",
                    ),
                };
                let _ = out.send(response).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
    let _ = tokio::time::timeout(
        shared.config.server.shutdown_grace,
        permits.acquire_many(inflight as u32),
    )
    .await;
    if *shared.shutdown.borrow() {
        close(
            connection,
            ErrorCode::ShuttingDown,
            "broker is shutting down",
        );
    }
}

/// The request budgets of an anonymous session: its own
/// (`limits.anonymous_rate`) and the one it shares with every anonymous
/// session of its source (`limits.per_source.anonymous_rate`). File
/// streams count as requests.
struct AnonymousBudget {
    connection: Option<governor::DefaultDirectRateLimiter>,
    /// The session's source, unless it is exempt.
    source: Option<Source>,
}

impl AnonymousBudget {
    fn new(shared: &Shared, source: Option<Source>) -> Self {
        Self {
            connection: shared.anonymous_quota.map(governor::RateLimiter::direct),
            source,
        }
    }

    /// The refusal of one more request, if it is over a budget.
    fn refusal(&self, shared: &Shared, request_id: u64) -> Option<Frame> {
        let limits = &shared.config.limits;
        let (not_until, message) = if let Some(limiter) = &self.connection
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
            let message = format!(
                "over {} requests per second on this anonymous connection",
                limits.anonymous_rate
            );
            (wait, message)
        } else if let (Some(limiter), Some(source)) =
            (&shared.source_anonymous_limiter, &self.source)
            && let Err(not_until) = limiter.check_key(source)
        {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
            let message = format!(
                "over {} anonymous requests per second from this address",
                limits.per_source.anonymous_rate
            );
            (wait, message)
        } else {
            return None;
        };
        let mut frame = ErrorFrame::new(request_id, ErrorCode::RateLimited, message);
        frame.retry_after_ms = Some(not_until.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        metrics::counter!("backbone_errors_total", "code" => ErrorCode::RateLimited.name())
            .increment(1);
        Some(Frame::Error(frame))
    }
}

/// The request id a refusal of `frame` answers, 0 for frames without one.
fn request_id_of(frame: &Frame) -> u64 {
    frame.request_id().unwrap_or(0)
}

/// A sealed send: the same envelope and TTL checks as [`handle_send`] (the
/// connection's own rate limit is checked before), then [`store_sealed`], which checks the
/// capability on the recipient's owner node. A refused capability or a
/// capability over its rate is a per-recipient failure in the `SendAck`
/// (that is how the owner node reports it), not an `Error` frame.
async fn handle_sealed_send(shared: &Arc<Shared>, send: SealedSend) -> Frame {
    let limits = &shared.config.limits;
    let id = send.request_id;
    if send.envelope.0.len() as u64 > limits.max_envelope_size.as_u64() {
        return error_frame(
            id,
            ErrorCode::EnvelopeTooLarge,
            format!("envelope exceeds {}", limits.max_envelope_size),
        );
    }
    if send.ttl_secs == 0 {
        return error_frame(id, ErrorCode::InvalidTtl, "ttl must be at least one second");
    }
    if backbone_protocol::relationship::is_reserved(&send.envelope.0) {
        let (code, message) = relationships::reserved();
        return error_frame(id, code, message);
    }
    let ttl_ms = (u64::from(send.ttl_secs) * 1000).min(limits.max_ttl.as_millis() as u64);
    let stored_at_ms = (shared.clock)();
    let message_id = MessageId::random();
    let template = StoreTemplate {
        message_id,
        // The point of a sealed send: the broker stores no sender.
        sender: None,
        stored_at_ms,
        expires_at_ms: stored_at_ms + ttl_ms,
        envelope: send.envelope.0,
    };
    let (stored, failed) =
        store_sealed(shared, send.recipient, send.capability.hash(), template).await;
    metrics::counter!("backbone_envelopes_accepted_total").increment(stored.len() as u64);
    Frame::SendAck(SendAck {
        request_id: id,
        message_id,
        stored,
        failed,
    })
}

async fn fetch_remote_card(shared: &Shared, node: &str, id: u64, address: Address) -> Frame {
    let Some(links) = shared.fleet.links() else {
        return error_frame(id, ErrorCode::Internal, "no fleet links");
    };
    let answer = links
        .request(node, |request_id| {
            PeerFrame::FetchCard(PeerFetchCard {
                request_id,
                address,
            })
        })
        .await;
    match answer {
        Ok(PeerFrame::CardResult(PeerCardResult {
            result: Ok(card), ..
        })) => Frame::CardResult(CardResult {
            request_id: id,
            card,
        }),
        Ok(PeerFrame::CardResult(PeerCardResult {
            result: Err(code), ..
        })) => {
            let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal);
            let message = format!("card lookup on node {node} failed");
            if code == ErrorCode::ShardUnavailable {
                shard_unavailable(shared, id, message)
            } else {
                error_frame(id, code, message)
            }
        }
        Ok(_) => error_frame(
            id,
            ErrorCode::Internal,
            "unexpected answer from the owner node",
        ),
        Err(error) => shard_unavailable(shared, id, error.to_string()),
    }
}

fn shard_unavailable(shared: &Shared, id: u64, message: impl Into<String>) -> Frame {
    let mut frame = ErrorFrame::new(id, ErrorCode::ShardUnavailable, message);
    frame.retry_after_ms = Some(shared.fleet.retry_after_ms());
    metrics::counter!("backbone_errors_total", "code" => ErrorCode::ShardUnavailable.name())
        .increment(1);
    Frame::Error(frame)
}

fn respond<T>(
    id: u64,
    result: Result<Result<T, crate::store::StoreError>, (ErrorCode, String)>,
    ok: impl FnOnce(T) -> Frame,
) -> Frame {
    match result {
        Ok(Ok(value)) => ok(value),
        Ok(Err(error)) => error_frame(id, ErrorCode::StorageFailure, error.to_string()),
        Err((code, message)) => error_frame(id, code, message),
    }
}

/// Pushes the mailbox to one device: first what is stored after its cursor,
/// then live envelopes, in sequence order, never more than `push_window`
/// unacknowledged. Ends when the session's ack channel closes.
/// One device session's share of `backbone_push_pending_envelopes`: the
/// envelopes up to the durable head it has not acknowledged. Taken back
/// when the session ends.
struct PendingGauge {
    /// The gauge's handle, looked up once per session rather than per push.
    gauge: metrics::Gauge,
    reported: u64,
}

impl PendingGauge {
    fn new() -> Self {
        Self {
            gauge: metrics::gauge!("backbone_push_pending_envelopes"),
            reported: 0,
        }
    }

    fn set(&mut self, pending: u64) {
        if pending > self.reported {
            self.gauge.increment((pending - self.reported) as f64);
        } else if pending < self.reported {
            self.gauge.decrement((self.reported - pending) as f64);
        }
        self.reported = pending;
    }
}

impl Drop for PendingGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

async fn deliver(
    shared: Arc<Shared>,
    session: Arc<Session>,
    out: Outbox,
    mut acks: watch::Receiver<u64>,
) {
    let window = shared.config.limits.push_window;
    let live = PushQueue::new(window);
    let subscriber = shared.registry.next_subscriber_id();
    let address = session.address;
    // Only envelopes up to the durable head are ever pushed: the store's
    // reads also see envelopes inserted but not yet flushed, which a crash
    // may still take back (and their sequence numbers be handed out again).
    let subscription = match shared
        .registry
        .subscribe(&address, subscriber, live.clone())
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => {
            warn!(%error, "cannot subscribe to mailbox");
            let _ = out
                .send(error_frame(0, error.code(), error.to_string()))
                .await;
            return;
        }
    };
    let mut known_head = subscription.durable();
    let mut acked = session.acked_seq;
    let mut sent = acked;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut cursor = CursorWriter::new(shared.writer.clone(), address, session.device);
    let mut pending = PendingGauge::new();
    let lag = metrics::histogram!("backbone_device_push_lag_envelopes");
    let pushes = SessionMetrics::get();
    // One timer for the session, moved only when the cursor's next write
    // time changes: a timer made afresh on every push and ack costs a
    // registration and a removal each. Made when first needed, so an idle
    // session does not hold one.
    let mut cursor_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut cursor_timer_at = None;

    'session: loop {
        pending.set(known_head.saturating_sub(acked));
        // Catch up from the store while behind and the window has room.
        while sent < known_head && in_flight.len() < window {
            let store = shared.log.clone();
            let behind = usize::try_from(known_head - sent).unwrap_or(usize::MAX);
            let limit = (window - in_flight.len()).min(behind);
            let (from, now) = (sent + 1, (shared.clock)());
            let batch = match tokio::task::spawn_blocking(move || {
                store.read_from(&address, from, limit, now)
            })
            .await
            {
                Ok(Ok(batch)) => batch,
                Ok(Err(error)) => {
                    warn!(%error, "reading the mailbox failed");
                    break 'session;
                }
                Err(_) => break 'session,
            };
            let ready: Vec<_> = batch
                .into_iter()
                .take_while(|envelope| envelope.seq <= known_head)
                .collect();
            if ready.is_empty() {
                // Nothing durable is left below the head (expired or deleted).
                sent = known_head;
                break;
            }
            for envelope in ready {
                sent = envelope.seq;
                in_flight.push_back(envelope.seq);
                if out
                    .send(deliver_frame(&shared, pushes, &envelope))
                    .await
                    .is_err()
                {
                    break 'session;
                }
            }
        }
        let cursor_due = cursor.waiting_until();
        if let Some(due) = cursor_due
            && cursor_timer_at != Some(due)
        {
            match &mut cursor_timer {
                Some(timer) => timer.as_mut().reset(due),
                None => cursor_timer = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            cursor_timer_at = Some(due);
        }
        tokio::select! {
            envelope = live.recv() => {
                known_head = known_head.max(envelope.seq);
                if envelope.seq == sent + 1 && in_flight.len() < window {
                    sent = envelope.seq;
                    if envelope.expires_at_ms > (shared.clock)() {
                        in_flight.push_back(envelope.seq);
                        if out.send(deliver_frame(&shared, pushes, &envelope)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            changed = acks.changed() => {
                if changed.is_err() {
                    break;
                }
                let claimed = *acks.borrow_and_update();
                if claimed > sent {
                    // The device has more than this session pushed: it got
                    // them in an earlier session, and its cursor's last
                    // move was lost with a crash (cursor moves are synced
                    // only with checkpoints). Skip what it has, up to the
                    // durable head; waiting for an ack of a redelivery it
                    // drops as a repeat would stall the window for good.
                    sent = sent.max(claimed.min(known_head));
                }
                let up_to = claimed.min(sent);
                if up_to > acked {
                    let newly = in_flight.iter().take_while(|seq| **seq <= up_to).count();
                    in_flight.drain(..newly);
                    pushes.acked.increment(newly as u64);
                    acked = up_to;
                    lag.record(known_head.saturating_sub(acked) as f64);
                    cursor.ack(up_to);
                }
            }
            result = cursor.written(), if cursor.is_writing() => {
                if let Err(error) = result {
                    warn!(%error, "persisting a cursor failed");
                }
                cursor.next_if_due();
            }
            () = async { cursor_timer.as_mut().expect("armed with a due time").await },
                if cursor_due.is_some() => {
                cursor_timer_at = None;
                cursor.next();
            }
        }
        if live.take_lagged() {
            // Live envelopes were dropped for this slow device: catch up from
            // the store, up to the durable head.
            known_head = known_head.max(subscription.durable());
        }
    }
    cursor.finish();
    drop(subscription);
}

/// A cursor write queued at the writer, awaiting its outcome.
type CursorWrite = Pin<Box<dyn Future<Output = Result<(), StoreError>> + std::marker::Send>>;

/// How often a device's cursor is written to the directory at most. A
/// cursor move is not synced on its own (it becomes durable with the next
/// checkpoint, every `store.checkpoint_interval`), and a lost move only
/// means envelopes are delivered again, which clients drop as repeats; so
/// holding a busy device's acks this long costs no durability and saves
/// most of its directory writes. A session's last move is queued at once
/// when it ends ([`CursorWriter::finish`]).
const CURSOR_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A device's cursor on its way to the store: at most one write in flight
/// and one per [`CURSOR_WRITE_INTERVAL`], the acks that arrive meanwhile
/// folded into the next one, so a device acking every envelope costs a few
/// store writes a second, not one per envelope.
struct CursorWriter {
    writer: WriteHandle,
    address: Address,
    device: DeviceId,
    /// The highest seq acked and not yet handed to the writer.
    wanted: Option<u64>,
    in_flight: Option<CursorWrite>,
    /// When the last write was queued.
    last_write: Option<tokio::time::Instant>,
}

impl CursorWriter {
    fn new(writer: WriteHandle, address: Address, device: DeviceId) -> Self {
        Self {
            writer,
            address,
            device,
            wanted: None,
            in_flight: None,
            last_write: None,
        }
    }

    /// Records an ack; it is queued at once unless a write is in flight or
    /// the last one was queued less than [`CURSOR_WRITE_INTERVAL`] ago.
    fn ack(&mut self, up_to: u64) {
        self.wanted = Some(self.wanted.map_or(up_to, |wanted| wanted.max(up_to)));
        self.next_if_due();
    }

    fn is_writing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// When acks wait for the interval to pass (and no write is in
    /// flight), the time the next write may be queued.
    fn waiting_until(&self) -> Option<tokio::time::Instant> {
        if self.wanted.is_none() || self.in_flight.is_some() {
            return None;
        }
        Some(
            self.last_write
                .map_or_else(tokio::time::Instant::now, |last| {
                    last + CURSOR_WRITE_INTERVAL
                }),
        )
    }

    /// Queues the folded acks if no write is in flight and the interval
    /// has passed.
    fn next_if_due(&mut self) {
        let due = self
            .last_write
            .is_none_or(|last| last.elapsed() >= CURSOR_WRITE_INTERVAL);
        if self.in_flight.is_none() && due {
            self.next();
        }
    }

    /// The write in flight's outcome; pending forever when there is none.
    async fn written(&mut self) -> Result<(), StoreError> {
        match &mut self.in_flight {
            Some(write) => {
                let result = write.await;
                self.in_flight = None;
                result
            }
            None => std::future::pending().await,
        }
    }

    /// Queues the folded acks, if any.
    fn next(&mut self) {
        if let Some(seq) = self.wanted.take() {
            let write = self.writer.set_cursor(self.address, self.device, seq);
            self.in_flight = Some(Box::pin(write));
            self.last_write = Some(tokio::time::Instant::now());
        }
    }

    /// Queues what is still unwritten now, so it is ordered before anything
    /// submitted after the session ends (an identity's purge), and logs the
    /// outcomes in the background.
    fn finish(mut self) {
        let last = self.wanted.take().map(|seq| -> CursorWrite {
            Box::pin(self.writer.set_cursor(self.address, self.device, seq))
        });
        let writes: Vec<CursorWrite> = self.in_flight.take().into_iter().chain(last).collect();
        if writes.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for write in writes {
                if let Err(error) = write.await {
                    warn!(%error, "persisting a cursor failed");
                }
            }
        });
    }
}

fn deliver_frame(shared: &Shared, metrics: &SessionMetrics, envelope: &StoredEnvelope) -> Frame {
    let now = (shared.clock)();
    metrics
        .push_delay
        .record(now.saturating_sub(envelope.stored_at_ms) as f64 / 1000.0);
    metrics.pushed.increment(1);
    Frame::Deliver(Deliver {
        seq: envelope.seq,
        message_id: envelope.message_id,
        sender: envelope.sender,
        stored_at_ms: envelope.stored_at_ms,
        expires_at_ms: envelope.expires_at_ms,
        envelope: Blob(envelope.envelope.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Writer};

    #[tokio::test]
    async fn cursor_writes_fold_the_acks_of_a_write_in_flight_and_finish_queues_the_last() {
        let store = Arc::new(MemoryStore::new());
        let (writer, handle) = Writer::start(store.clone(), store.clone());
        let (address, device) = (Address([1; 32]), DeviceId([2; 32]));
        let mut cursor = CursorWriter::new(handle.clone(), address, device);

        cursor.ack(1);
        cursor.ack(2);
        cursor.ack(3);
        assert!(cursor.is_writing());
        assert_eq!(cursor.written().await, Ok(()));
        // Only the first ack was written; 2 and 3 wait, folded into one.
        assert_eq!(store.cursor(&address, &device), Ok(Some(1)));
        assert!(!cursor.is_writing());
        // They wait for the interval since the first write, then go as one.
        let due = cursor.waiting_until().expect("acks wait");
        cursor.next_if_due();
        assert!(!cursor.is_writing(), "not before the interval is over");
        tokio::time::sleep_until(due).await;
        cursor.next_if_due();
        assert!(cursor.is_writing());
        cursor.ack(4);
        // A write in flight: 4 waits.
        assert!(cursor.is_writing());
        assert_eq!(cursor.waiting_until(), None);
        // The session ends with 3 in flight and 4 still wanted: both are
        // queued before anything submitted after it.
        cursor.finish();
        handle.flush().await.expect("flushes");
        assert_eq!(store.cursor(&address, &device), Ok(Some(4)));

        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .expect("join")
            .expect("shutdown");
    }
}
