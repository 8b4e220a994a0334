//! One client connection: handshake, authentication, requests, delivery.
//!
//! The client opens one bidirectional stream and everything flows over it:
//! requests and their responses (matched by `request_id`) and pushed
//! `Deliver` frames. The reader loop passes every frame through the command
//! table ([`crate::cmd::gate`]) and runs what it admits: sends inside the
//! session's task, other requests as tasks of their own, all bounded by a
//! semaphore, so a client that floods requests stops being read and QUIC
//! flow control pushes back. A delivery task per session pushes envelopes
//! in sequence order with at most `push_window` unacknowledged.
//!
//! - `handshake`: `Hello`, the challenge, `Auth` or `Anonymous`.
//! - `requests`: reading requests, and the file streams opened beside them.
//! - `authenticated`: an authenticated session's request loop.
//! - `anonymous`: an anonymous session's request loop and its budgets.
//! - `delivery`: pushes to one device, and its cursor.
//!
//! Every authenticated session is listed in
//! [`LiveSessions`](crate::shared::LiveSessions) under its address (and its
//! device, for a certified device), so that the purge of a deleted
//! identity, or the removal of a device, can close its connections and wait
//! until they are over.
//!
//! A client may instead answer the challenge with `Anonymous`: the session
//! then names no identity (none is recorded in its span either), has no
//! mailbox and no delivery task, and is served only what the command table
//! allows anyone ([`crate::cmd::Access::Anyone`] and `AnonymousOnly`). Every
//! other request is refused with `NotAuthenticated` and the session goes on.

mod anonymous;
mod authenticated;
mod delivery;
mod handshake;
mod requests;

use std::future::Future;
use std::sync::Arc;

use backbone_protocol::bytes::Text;
use backbone_protocol::frame::{ErrorCode, Redirect};
use backbone_protocol::{Address, DeviceId, Frame};
use tracing::{Instrument, debug, info_span};

use self::anonymous::serve_anonymous;
use self::authenticated::serve_authenticated;
use self::handshake::{Handshake, authenticate};
use crate::admission::{Source, Ticket};
use crate::cmd::Caller;
use crate::shared::Shared;
use crate::shared::live::{LiveSession, close};

/// Queue of outgoing pieces per connection (1,024 frames, a push being
/// two pieces); the bytes they hold are bounded by the connection's output
/// budget (see [`Outbox`]).
const OUT_QUEUE: usize = 2048;

/// How long a redirected connection stays open for the client to read the redirect.
const REDIRECT_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// An authenticated session.
struct Session {
    address: Address,
    device: DeviceId,
    /// Whether a certified device authenticated, rather than the identity
    /// key itself; such a session is refused the requests only the
    /// identity key may make ([`crate::cmd::Access::IdentityKey`]).
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

impl Session {
    /// The session as the command table sees it.
    fn caller(&self) -> Caller {
        Caller::Identity {
            address: self.address,
            certified: self.certified,
            source: (!self.exempt).then_some(self.source),
        }
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
