//! The handshake of a connection: `Hello`, the challenge, and `Auth` or
//! `Anonymous`, within `auth.deadline`; then the session's limits.

use std::sync::Arc;
use std::time::Instant;

use backbone_protocol::Frame;
use backbone_protocol::auth::{TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN};
use backbone_protocol::bytes::Nonce;
use backbone_protocol::codec::{PRE_AUTH_MAX_FRAME_LEN, Phase};
use backbone_protocol::frame::{AuthOk, Done, ErrorCode};
use backbone_protocol::handshake::{HandshakeParams, HandshakeStep, ServerHandshake};

use super::{OUT_QUEUE, Session};
use crate::admission::Ticket;
use crate::cmd::blocking;
use crate::fleet::Route;
use crate::shared::Shared;
use crate::wire::{FrameReader, Outbox, OutboxLimits, ReadError, outbox};

/// Why a handshake failed: the code the connection is closed with, and a
/// reason for people.
pub(super) type HandshakeError = (ErrorCode, String);

/// How a successful handshake continues.
pub(super) enum Handshake {
    /// The address lives here: serve it.
    Session(Session, FrameReader, Outbox),
    /// The client chose an anonymous session, already confirmed.
    Anonymous(FrameReader, Outbox),
    /// The address lives on another node: send a redirect to `node` (`host:port`).
    Redirect { out: Outbox, node: String },
}

/// Runs the handshake on the connection's first stream: `Hello`, the
/// challenge, then `Auth` (checked against the store: not deleted, the
/// device registered) or `Anonymous` (if `ticket` may hold an anonymous place).
pub(super) async fn authenticate(
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

fn storage_error(error: crate::store::StoreError) -> HandshakeError {
    (ErrorCode::StorageFailure, error.to_string())
}
