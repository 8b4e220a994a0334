//! The command table: every frame a client may send, with its rules, and
//! the one dispatch that both kinds of client session (authenticated and
//! anonymous) and the peer listener go through.
//!
//! [`rules`] gives each frame kind its [`Rules`]: who may send it
//! ([`Access`]), where it is served ([`Served`]: here, or on the node that
//! owns the address it names), what limits its rate ([`Rate`]) and how a
//! session runs it ([`Runs`]). A session passes every frame it reads
//! through [`gate`], which checks the rules and the rate for its
//! [`Caller`] and answers a refused request with one typed [`Refusal`];
//! it then answers the connection-level frames itself and hands the
//! requests to [`apply`] (a `Send` to [`send::send`] directly, inside the
//! session's task). The peer listener hands the requests a node relays to
//! an owner node to [`apply_peer`], which serves them with the same
//! family code.
//!
//! One file per request family:
//! - [`send`]: `Send`, `SealedSend`, and their forwarded copies from a peer node.
//! - [`cards`]: `PublishCard`, `FetchCard`.
//! - [`capabilities`]: `RegisterCapability`, `RevokeCapability`, `ListCapabilities`.
//! - [`envelopes`]: `Delete`, of envelopes in the owner's mailbox.
//! - [`relationships`]: `SetInboundPolicy`, `RequestRelationship`,
//!   `DecideRelationship`, `ListRelationships`, and their consent changes on a peer node.
//! - [`tokens`]: `CreateToken`, `GetToken`, `DeleteToken`.
//! - [`files`]: `CreateFile`, `FileStatus`, `DeleteFile`, and the file
//!   streams that carry `UploadFile` and `DownloadFile`.
//! - [`devices`]: `RegisterDevice`, `UnregisterDevice`, `ListDevices`.
//! - [`deletion`]: `DeleteIdentity`, `CancelDeletion`, and the sweep that purges.
//! - [`rate`]: the rate limits the table names, and an anonymous session's budgets.
//!
//! **Architecture Invariant:** a client's request reaches its handler only
//! through [`gate`] (a file stream's header through [`gate_stream`]) on the
//! node the client is connected to; no session, stream or listener decides
//! by itself who may send a request kind. A peer node relays to
//! [`apply_peer`] only what its own gate admitted.

pub mod capabilities;
pub mod cards;
pub mod deletion;
pub mod devices;
pub mod envelopes;
pub mod files;
pub mod rate;
pub mod relationships;
pub mod send;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use backbone_protocol::fleet::PeerFrame;
use backbone_protocol::frame::{ErrorCode, ErrorFrame};
use backbone_protocol::{Address, Frame};

use crate::admission::Source;
use crate::shared::Shared;

/// Who may send a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated session, a certified device's included.
    Authenticated,
    /// Only a session the identity key itself authenticated; a certified
    /// device's session is refused with `IdentityKeyRequired`. These are
    /// the requests that decide which keys act for the identity, whether
    /// it goes on existing, and who may write to its mailbox as a whole: a
    /// stolen device must not be able to lock its owner out, keep itself
    /// registered, or open the mailbox to strangers.
    IdentityKey,
    /// Authenticated and anonymous sessions alike.
    Anyone,
    /// Only an anonymous session: the point of a `SealedSend` is that the
    /// broker does not know the sender, which it does on an authenticated one.
    AnonymousOnly,
    /// Nobody after the handshake: `Hello`, `Auth` and `Anonymous`
    /// (challenges are single use).
    HandshakeOnly,
}

/// Where a request is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// On the node the client is connected to (which owns the session's
    /// own address: a client is redirected to its owner node).
    Here,
    /// On the node that owns the address the request names (a recipient,
    /// a card's or token's address, a relationship's owner): relayed over
    /// a fleet link when that is another node, where [`apply_peer`] serves it.
    Owner,
}

/// What limits a request's rate, beyond the session's requests in flight.
/// On an anonymous session every request (and file stream) also counts
/// against the session's and its source's budgets ([`rate::AnonymousBudget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// Nothing more.
    Unlimited,
    /// `limits.send_rate` envelope copies per second per identity, checked
    /// by [`gate`].
    EnvelopeCopies,
    /// `limits.sealed_rate` per capability, checked on the recipient's
    /// owner node (a per-recipient failure in the `SendAck`).
    SealedPerCapability,
    /// `relationships.requests_per_minute` per requester and
    /// `limits.per_source.relationship_requests_per_minute` per source
    /// address, checked by [`gate`].
    RelationshipRequests,
}

/// How a session runs a frame it admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// The session answers it itself, in order (`Ping`, `Ack`).
    Connection,
    /// Inside the session's own task: a send spends nearly all its time
    /// waiting for its mailbox and the log, and a task per send costs a
    /// spawn, a schedule and a wake-up on another worker each time.
    InSession,
    /// As a task of its own, holding one of the session's request permits.
    Task,
    /// Only as the header of a stream of its own (file transfers).
    OwnStream,
}

/// The rules of one frame kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The frame kind's name, as refusals and logs show it.
    pub name: &'static str,
    /// Who may send it.
    pub access: Access,
    /// Where it is served.
    pub served: Served,
    /// What limits its rate.
    pub rate: Rate,
    /// How a session runs it.
    pub runs: Runs,
}

/// The command table: the rules of every frame a client may send, its
/// requests and the frames about the connection (`Ack`, `Ping`, `Pong`,
/// `Error`), `None` for the frames only a broker sends. The match is exhaustive, so a new
/// frame kind cannot be added without deciding its rules here.
pub fn rules(frame: &Frame) -> Option<Rules> {
    use Access::*;
    use Frame as F;
    use Rate::*;
    use Runs::*;
    use Served::*;
    let (access, served, rate, runs) = match frame {
        F::Send(_) => (Authenticated, Owner, EnvelopeCopies, InSession),
        F::SealedSend(_) => (AnonymousOnly, Owner, SealedPerCapability, Task),
        F::Ack(_) => (Authenticated, Here, Unlimited, Connection),
        F::Delete(_) => (Authenticated, Here, Unlimited, Task),
        F::Ping(_) => (Anyone, Here, Unlimited, Connection),
        // The answer to a broker's `Ping`, and a client reporting a problem.
        F::Pong(_) | F::Error(_) => (Anyone, Here, Unlimited, Connection),
        F::PublishCard(_) => (Authenticated, Here, Unlimited, Task),
        F::FetchCard(_) => (Anyone, Owner, Unlimited, Task),
        F::RegisterCapability(_) => (IdentityKey, Here, Unlimited, Task),
        F::RevokeCapability(_) => (IdentityKey, Here, Unlimited, Task),
        F::ListCapabilities(_) => (Authenticated, Here, Unlimited, Task),
        F::SetInboundPolicy(_) => (IdentityKey, Here, Unlimited, Task),
        F::RequestRelationship(_) => (Authenticated, Owner, RelationshipRequests, Task),
        F::DecideRelationship(_) => (Authenticated, Owner, Unlimited, Task),
        F::ListRelationships(_) => (Authenticated, Here, Unlimited, Task),
        F::CreateToken(_) => (Authenticated, Here, Unlimited, Task),
        F::GetToken(_) => (Anyone, Owner, Unlimited, Task),
        F::DeleteToken(_) => (Authenticated, Here, Unlimited, Task),
        F::CreateFile(_) => (Authenticated, Here, Unlimited, Task),
        F::FileStatus(_) => (Authenticated, Here, Unlimited, Task),
        F::DeleteFile(_) => (Authenticated, Here, Unlimited, Task),
        F::UploadFile(_) => (Authenticated, Here, Unlimited, OwnStream),
        F::DownloadFile(_) => (Anyone, Here, Unlimited, OwnStream),
        F::RegisterDevice(_) => (IdentityKey, Here, Unlimited, Task),
        F::UnregisterDevice(_) => (IdentityKey, Here, Unlimited, Task),
        F::ListDevices(_) => (Authenticated, Here, Unlimited, Task),
        F::DeleteIdentity(_) => (IdentityKey, Here, Unlimited, Task),
        F::CancelDeletion(_) => (IdentityKey, Here, Unlimited, Task),
        F::Hello(_) | F::Auth(_) | F::Anonymous(_) => (HandshakeOnly, Here, Unlimited, Connection),
        F::Challenge(_)
        | F::AuthOk(_)
        | F::CardResult(_)
        | F::SendAck(_)
        | F::Deliver(_)
        | F::Done(_)
        | F::Redirect(_)
        | F::Capabilities(_)
        | F::TokenCreated(_)
        | F::TokenContent(_)
        | F::RelationshipChanged(_)
        | F::Relationships(_)
        | F::DeletionScheduled(_)
        | F::FileCreated(_)
        | F::FileState(_)
        | F::FileData(_)
        | F::Devices(_) => return None,
    };
    Some(Rules {
        name: Frame::TAG_NAMES[frame.tag() as usize],
        access,
        served,
        rate,
        runs,
    })
}

/// Who sends a request: an authenticated session's identity, or an
/// anonymous session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An authenticated session.
    Identity {
        /// The session's address.
        address: Address,
        /// Whether a certified device authenticated, not the identity key.
        certified: bool,
        /// Where the connection comes from, `None` when it is exempt from
        /// per-source limits.
        source: Option<Source>,
    },
    /// An anonymous session: no identity, no mailbox.
    Anonymous,
}

/// Why a request is refused before it reaches its handler.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A request that needs an identity, on an anonymous session.
    #[error("{0} needs an authenticated session; this one is anonymous")]
    NotAuthenticated(&'static str),
    /// A request only the identity key may make, on a certified device's session.
    #[error("{0} needs a session of the identity key; this one is a certified device's")]
    IdentityKeyRequired(&'static str),
    /// A `SealedSend` on an authenticated session.
    #[error("{0} needs an anonymous session: on this one the broker knows the sender")]
    AnonymousOnly(&'static str),
    /// A file transfer's header on the session's stream.
    #[error("{0}: file transfers run on their own stream; open a new one for each")]
    OwnStream(&'static str),
    /// A handshake frame after the handshake.
    #[error("{0} after the handshake: challenges are single use")]
    HandshakeOver(&'static str),
    /// A frame only a broker sends.
    #[error("{0} is not a client request")]
    NotARequest(&'static str),
    /// A file stream that does not start with a file transfer's header.
    #[error("a file stream starts with UploadFile or DownloadFile, not {0}")]
    NotAStreamHeader(&'static str),
    /// A request with `request_id` 0, which answers about the connection
    /// carry, so an answer to it could not be told from them.
    #[error("{0} with request_id 0: requests need a non-zero id")]
    ZeroRequestId(&'static str),
    /// Over a rate limit; `retry_after` says when one more would pass.
    #[error("over {limit}")]
    RateLimited {
        /// The limit, for people ("100 envelope copies per second").
        limit: String,
        /// How long until one more request would pass.
        retry_after: Duration,
    },
}

impl Refusal {
    /// The code the refusal carries on the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::NotAuthenticated(_) => ErrorCode::NotAuthenticated,
            Refusal::IdentityKeyRequired(_) => ErrorCode::IdentityKeyRequired,
            Refusal::AnonymousOnly(_)
            | Refusal::OwnStream(_)
            | Refusal::NotARequest(_)
            | Refusal::NotAStreamHeader(_) => ErrorCode::UnexpectedFrame,
            Refusal::HandshakeOver(_) => ErrorCode::ChallengeReused,
            Refusal::ZeroRequestId(_) => ErrorCode::InvalidRequestId,
            Refusal::RateLimited { .. } => ErrorCode::RateLimited,
        }
    }

    /// The `Error` frame refusing `frame`, counted in
    /// `backbone_errors_total`: for its `request_id`, or 0 (the connection
    /// or the stream) for a frame without one and for a file stream that
    /// does not start with a transfer's header, which refuses the stream,
    /// not the request.
    pub fn answer(&self, frame: &Frame) -> Frame {
        let id = match self {
            Refusal::NotAStreamHeader(_) => 0,
            _ => frame.request_id().unwrap_or(0),
        };
        self.answer_id(id)
    }

    /// The `Error` frame of this refusal for `request_id`, counted in
    /// `backbone_errors_total`.
    pub fn answer_id(&self, request_id: u64) -> Frame {
        let code = self.code();
        metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
        let mut error = ErrorFrame::new(request_id, code, self.to_string());
        if let Refusal::RateLimited { retry_after, .. } = self {
            error.retry_after_ms =
                Some(retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        }
        Frame::Error(error)
    }
}

/// Admits a frame from `caller` by the table: its rules if the caller may
/// send it now, else why not. The rate limits the table names for a caller's
/// identity are checked (and spent) here, after the rules; an anonymous
/// session's budgets are its own ([`rate::AnonymousBudget`]).
pub fn gate(shared: &Shared, caller: &Caller, frame: &Frame) -> Result<Rules, Refusal> {
    let rules = admit(caller, frame)?;
    rate::check(shared, caller, rules.rate, frame)?;
    Ok(rules)
}

/// The rules of `frame` if `caller` may send it on its session's stream.
fn admit(caller: &Caller, frame: &Frame) -> Result<Rules, Refusal> {
    let Some(rules) = rules(frame) else {
        return Err(Refusal::NotARequest(Frame::TAG_NAMES[frame.tag() as usize]));
    };
    check_access(caller, frame, rules)?;
    if rules.runs == Runs::OwnStream {
        return Err(Refusal::OwnStream(rules.name));
    }
    Ok(rules)
}

/// Admits the header frame of a stream a client opened for a file
/// transfer: a frame the table runs on its own stream ([`Runs::OwnStream`])
/// that `caller` may send.
pub fn gate_stream(caller: &Caller, header: &Frame) -> Result<Rules, Refusal> {
    let Some(rules) = rules(header).filter(|rules| rules.runs == Runs::OwnStream) else {
        return Err(Refusal::NotAStreamHeader(
            Frame::TAG_NAMES[header.tag() as usize],
        ));
    };
    check_access(caller, header, rules)?;
    Ok(rules)
}

/// Refuses a request with id 0, and one `caller` may not send by `rules`.
fn check_access(caller: &Caller, frame: &Frame, rules: Rules) -> Result<(), Refusal> {
    if frame.request_id() == Some(0) {
        return Err(Refusal::ZeroRequestId(rules.name));
    }
    let anonymous = matches!(caller, Caller::Anonymous);
    match rules.access {
        Access::HandshakeOnly => Err(Refusal::HandshakeOver(rules.name)),
        Access::Authenticated | Access::IdentityKey if anonymous => {
            Err(Refusal::NotAuthenticated(rules.name))
        }
        Access::IdentityKey
            if matches!(
                caller,
                Caller::Identity {
                    certified: true,
                    ..
                }
            ) =>
        {
            Err(Refusal::IdentityKeyRequired(rules.name))
        }
        Access::AnonymousOnly if !anonymous => Err(Refusal::AnonymousOnly(rules.name)),
        _ => Ok(()),
    }
}

/// Runs a request [`gate`] admitted for `caller` and returns its answer.
/// Connection-level frames are the session's own and are answered with an
/// `Internal` error here.
pub async fn apply(shared: &Arc<Shared>, caller: Caller, request: Frame) -> Frame {
    match (caller, request) {
        (_, Frame::FetchCard(fetch)) => cards::fetch(shared, fetch).await,
        (_, Frame::GetToken(get)) => tokens::get(shared, get).await,
        (Caller::Anonymous, Frame::SealedSend(send)) => send::sealed(shared, send).await,
        (Caller::Identity { address, .. }, request) => {
            apply_identity(shared, address, request).await
        }
        (Caller::Anonymous, request) => internal(&request),
    }
}

/// The requests of an authenticated session's identity.
async fn apply_identity(shared: &Arc<Shared>, address: Address, request: Frame) -> Frame {
    match request {
        Frame::Send(send) => send::send(shared, address, send).await,
        Frame::Delete(delete) => envelopes::delete(shared, address, delete).await,
        Frame::PublishCard(publish) => cards::publish(shared, address, publish).await,
        Frame::RegisterCapability(register) => {
            capabilities::register(shared, address, register).await
        }
        Frame::RevokeCapability(revoke) => capabilities::revoke(shared, address, revoke).await,
        Frame::ListCapabilities(list) => capabilities::list(shared, address, list).await,
        Frame::SetInboundPolicy(set) => {
            relationships::set_policy(shared, address, set.request_id, set.policy).await
        }
        Frame::RequestRelationship(request) => {
            relationships::request(shared, address, request).await
        }
        Frame::DecideRelationship(decision) => {
            relationships::decide(shared, address, decision).await
        }
        Frame::ListRelationships(list) => {
            relationships::list(shared, address, list.request_id).await
        }
        Frame::DeleteIdentity(delete) => {
            deletion::schedule(shared, address, delete.request_id).await
        }
        Frame::CancelDeletion(cancel) => deletion::cancel(shared, address, cancel.request_id).await,
        Frame::CreateToken(create) => tokens::create(shared, address, create).await,
        Frame::DeleteToken(delete) => tokens::delete(shared, address, delete).await,
        Frame::CreateFile(create) => files::create(shared, address, create).await,
        Frame::FileStatus(status) => files::status(shared, address, status).await,
        Frame::DeleteFile(delete) => files::delete(shared, address, delete).await,
        Frame::RegisterDevice(register) => {
            devices::register(shared, address, register.request_id, register.certificate).await
        }
        Frame::UnregisterDevice(unregister) => {
            devices::unregister(shared, address, unregister.request_id, unregister.device_id).await
        }
        Frame::ListDevices(list) => devices::list(shared, address, list.request_id).await,
        other => internal(&other),
    }
}

/// The answer to a frame that [`gate`] would not have admitted for this
/// caller, or that the session answers itself: a bug, not the client's fault.
pub(crate) fn internal(frame: &Frame) -> Frame {
    error_frame(
        frame.request_id().unwrap_or(0),
        ErrorCode::Internal,
        format!(
            "{} reached the request dispatch",
            Frame::TAG_NAMES[frame.tag() as usize]
        ),
    )
}

/// Serves a request another node relayed to this one, the owner of the
/// address it names ([`Served::Owner`]), with the same family code as a
/// client's. A frame that is not such a request comes back as the error
/// (the listener serves the handover frames itself).
pub async fn apply_peer(shared: &Arc<Shared>, frame: PeerFrame) -> Result<PeerFrame, PeerFrame> {
    match frame {
        PeerFrame::Forward(forward) => Ok(send::forwarded(shared, forward).await),
        PeerFrame::SealedForward(forward) => Ok(send::sealed_forwarded(shared, forward).await),
        PeerFrame::FetchCard(fetch) => Ok(cards::answer_peer(shared, fetch).await),
        PeerFrame::GetToken(get) => Ok(tokens::answer_peer(shared, get).await),
        PeerFrame::Consent(consent) => Ok(relationships::answer_peer(shared, consent).await),
        other => Err(other),
    }
}

/// An `Error` frame answering `request_id`, counted by code.
pub(crate) fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Frame {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(ErrorFrame::new(request_id, code, message))
}

/// A `ShardUnavailable` refusal, with the fleet's retry hint.
pub(crate) fn shard_unavailable(shared: &Shared, id: u64, message: impl Into<String>) -> Frame {
    let mut frame = ErrorFrame::new(id, ErrorCode::ShardUnavailable, message);
    frame.retry_after_ms = Some(shared.fleet.retry_after_ms());
    metrics::counter!("backbone_errors_total", "code" => ErrorCode::ShardUnavailable.name())
        .increment(1);
    Frame::Error(frame)
}

/// Runs blocking store work off the async workers.
pub(crate) async fn blocking<T: std::marker::Send + 'static>(
    work: impl FnOnce() -> T + std::marker::Send + 'static,
) -> Result<T, (ErrorCode, String)> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        (
            ErrorCode::Internal,
            format!("blocking task failed: {error}"),
        )
    })
}

/// The answer to blocking store work: `ok` of its value, else its error.
pub(crate) fn respond<T>(
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

#[cfg(test)]
mod tests {
    use backbone_protocol::bytes::{Blob, CapabilityHash, FileId, TokenId};
    use backbone_protocol::frame::{
        Ack, DeleteIdentity, Done, FetchCard, GetToken, Hello, ListDevices, Ping,
        RegisterCapability, Send, UploadFile,
    };

    use super::*;

    const OWNER: Address = Address([1; 32]);
    /// The callers each case is checked for, in this order.
    const CALLERS: [Caller; 3] = [
        Caller::Identity {
            address: OWNER,
            certified: false,
            source: None,
        },
        Caller::Identity {
            address: OWNER,
            certified: true,
            source: None,
        },
        Caller::Anonymous,
    ];

    fn send(request_id: u64) -> Frame {
        Frame::Send(Send {
            request_id,
            ttl_secs: 60,
            recipients: vec![Address([2; 32])],
            envelope: Blob::from(vec![0; 16]),
        })
    }

    #[test]
    fn the_table_admits_each_frame_for_the_callers_its_access_names() {
        use ErrorCode::*;
        let ok = Ok(());
        // (frame, outcome for the identity key, a certified device, an
        // anonymous session)
        let cases: Vec<(Frame, [Result<(), ErrorCode>; 3])> = vec![
            (send(1), [ok, ok, Err(NotAuthenticated)]),
            (
                Frame::Ack(Ack { up_to_seq: 3 }),
                [ok, ok, Err(NotAuthenticated)],
            ),
            (Frame::Ping(Ping { nonce: 7 }), [ok, ok, ok]),
            (
                Frame::FetchCard(FetchCard {
                    request_id: 1,
                    address: OWNER,
                }),
                [ok, ok, ok],
            ),
            (
                Frame::GetToken(GetToken {
                    request_id: 1,
                    token_id: TokenId([3; 32]),
                    password_verifier: None,
                }),
                [ok, ok, ok],
            ),
            (
                Frame::ListDevices(ListDevices { request_id: 1 }),
                [ok, ok, Err(NotAuthenticated)],
            ),
            (
                Frame::DeleteIdentity(DeleteIdentity { request_id: 1 }),
                [ok, Err(IdentityKeyRequired), Err(NotAuthenticated)],
            ),
            (
                Frame::RegisterCapability(RegisterCapability {
                    request_id: 1,
                    capability_hash: CapabilityHash([4; 32]),
                }),
                [ok, Err(IdentityKeyRequired), Err(NotAuthenticated)],
            ),
            (
                Frame::UploadFile(UploadFile {
                    request_id: 1,
                    file_id: FileId([5; 32]),
                    offset: 0,
                }),
                [
                    Err(UnexpectedFrame),
                    Err(UnexpectedFrame),
                    Err(NotAuthenticated),
                ],
            ),
            (
                Frame::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                }),
                [Err(ChallengeReused); 3],
            ),
            (
                Frame::Done(Done { request_id: 1 }),
                [Err(UnexpectedFrame); 3],
            ),
            (send(0), [Err(InvalidRequestId); 3]),
        ];
        for (frame, expected) in cases {
            for (caller, expected) in CALLERS.iter().zip(expected) {
                let outcome = admit(caller, &frame).map(|_| ()).map_err(|r| r.code());
                assert_eq!(
                    outcome,
                    expected,
                    "{} from {caller:?}",
                    Frame::TAG_NAMES[frame.tag() as usize]
                );
            }
        }
    }

    #[test]
    fn a_file_stream_starts_with_a_transfer_header_the_caller_may_send() {
        use ErrorCode::*;
        let upload = Frame::UploadFile(UploadFile {
            request_id: 1,
            file_id: FileId([5; 32]),
            offset: 0,
        });
        let download = Frame::DownloadFile(backbone_protocol::frame::DownloadFile {
            request_id: 2,
            file_id: FileId([5; 32]),
            secret: backbone_protocol::bytes::FileSecret([6; 32]),
            offset: 0,
        });
        let zero = Frame::UploadFile(UploadFile {
            request_id: 0,
            file_id: FileId([5; 32]),
            offset: 0,
        });
        let ok = Ok(());
        let cases: Vec<(Frame, [Result<(), ErrorCode>; 3])> = vec![
            (upload, [ok, ok, Err(NotAuthenticated)]),
            (download, [ok, ok, ok]),
            (zero, [Err(InvalidRequestId); 3]),
            (send(1), [Err(UnexpectedFrame); 3]),
            (Frame::Ping(Ping { nonce: 1 }), [Err(UnexpectedFrame); 3]),
        ];
        let refusal = gate_stream(&CALLERS[0], &send(7)).expect_err("not a header");
        let Frame::Error(error) = refusal.answer(&send(7)) else {
            panic!("an error frame");
        };
        assert_eq!(
            error.request_id, 0,
            "a stream that is not a transfer is refused as a stream"
        );
        for (header, expected) in cases {
            for (caller, expected) in CALLERS.iter().zip(expected) {
                let outcome = gate_stream(caller, &header)
                    .map(|_| ())
                    .map_err(|r| r.code());
                assert_eq!(
                    outcome,
                    expected,
                    "{} from {caller:?}",
                    Frame::TAG_NAMES[header.tag() as usize]
                );
            }
        }
    }

    #[test]
    fn a_sealed_send_is_admitted_only_on_an_anonymous_session() {
        let sealed = Frame::SealedSend(backbone_protocol::frame::SealedSend {
            request_id: 9,
            ttl_secs: 60,
            recipient: OWNER,
            capability: backbone_protocol::bytes::DeliveryCapability([6; 32]),
            envelope: Blob::from(vec![1; 8]),
        });
        let codes: Vec<_> = CALLERS
            .iter()
            .map(|caller| {
                admit(caller, &sealed)
                    .map(|rules| rules.rate)
                    .map_err(|r| r.code())
            })
            .collect();
        assert_eq!(
            codes,
            [
                Err(ErrorCode::UnexpectedFrame),
                Err(ErrorCode::UnexpectedFrame),
                Ok(Rate::SealedPerCapability)
            ]
        );
    }

    #[test]
    fn a_refusal_answers_the_request_it_refuses_and_a_rate_limit_says_when_to_retry() {
        let refusal = admit(&Caller::Anonymous, &send(42)).expect_err("refused");
        let Frame::Error(error) = refusal.answer(&send(42)) else {
            panic!("an error frame");
        };
        assert_eq!(
            (error.request_id, error.code, error.retry_after_ms),
            (42, ErrorCode::NotAuthenticated as u16, None)
        );
        assert_eq!(
            error.message.0,
            "Send needs an authenticated session; this one is anonymous"
        );

        let limited = Refusal::RateLimited {
            limit: "10 envelope copies per second".into(),
            retry_after: Duration::from_micros(10),
        };
        let Frame::Error(error) = limited.answer_id(5) else {
            panic!("an error frame");
        };
        assert_eq!(
            (error.request_id, error.code, error.retry_after_ms),
            (5, ErrorCode::RateLimited as u16, Some(1)),
            "a wait under a millisecond is reported as one"
        );
        assert_eq!(error.message.0, "over 10 envelope copies per second");
    }

    #[test]
    fn the_requests_of_the_table_carry_a_request_id_and_its_connection_frames_none() {
        let frames = [
            send(1),
            Frame::Ack(Ack { up_to_seq: 1 }),
            Frame::Ping(Ping { nonce: 1 }),
            Frame::ListDevices(ListDevices { request_id: 1 }),
        ];
        for frame in frames {
            let rules = rules(&frame).expect("a client frame");
            assert_eq!(
                frame.request_id().is_some(),
                rules.runs != Runs::Connection,
                "{}",
                rules.name
            );
        }
    }
}
