//! Target `session`: the real broker's request handlers, driven in-process
//! over a real loopback QUIC connection.
//!
//! A `Broker` with a `MemoryStore` is started once per process, and one
//! client connection authenticated as a fixed identity is held open across
//! inputs (the broker's request handling is async over quinn, not sans-IO,
//! so this is the only way to reach it). An input is a sequence of
//! segments, each a kind byte, a `u16` LE length and that many bytes:
//!
//! - even kind: the bytes as wire traffic on the session's frame stream,
//!   cut at the first incomplete frame or fatal error (an oversize length),
//!   so the connection survives and the next segment starts on a frame
//!   boundary, and closed with a `Ping` of a fresh nonce. Invalid frames
//!   that can be skipped are kept: the broker answers each with an error
//!   and reads on;
//! - odd kind: the bytes on a new file stream (an `UploadFile` or
//!   `DownloadFile` header and raw bytes, or anything else), then the
//!   stream's end.
//!
//! Segments run one after another: every answer to one is awaited before
//! the next is sent. A request naming the all-zero token or file id is sent
//! with the id of the token or file the session created last, since an
//! input cannot know the ids the broker draws; so fetching, deleting,
//! uploading and downloading reach things that exist.
//!
//! Properties: every frame the broker sends is one a broker may send; every
//! request gets exactly one answer, carrying its request id, of a type that
//! answers that request (or an `Error`); every skipped invalid frame gets an
//! error with id 0 and the decode error's code, and so does a request with
//! id 0 (code `InvalidRequestId`); every other frame a client
//! should not send gets an error with id 0; the `Ping` gets its `Pong`;
//! nothing else is answered; a file stream gets at most one answer frame,
//! with the header's request id (or 0), and a `FileData` is followed by
//! exactly the bytes it announces; the connection stays open; every answer
//! arrives within 10 seconds.
//!
//! What it does not reach: the handshake (see `auth_handshake`), anonymous
//! sessions, other identities' sessions and deliveries between them, a
//! fleet (peer links, redirects), crash recovery, and anything that needs
//! more time than an input takes (TTL expiry, deletion purges, idle mailbox
//! actors) except as the background sweeps happen to run. The broker's
//! state carries over from input to input (stored envelopes, tokens, files,
//! rate limits), so an input does not always replay alike. It runs at a few
//! hundred inputs a second, far fewer than the pure targets: see
//! `docs/reliability.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use backbone_broker::store::MemoryStore;
use backbone_broker::{Broker, Config, StartOptions};
use backbone_client::transport::{ConnectConfig, Credentials, RawConnection, Trust};
use backbone_protocol::bytes::{FileId, TokenId};
use backbone_protocol::codec::{self, DecodeError, FrameBuffer, MAX_FRAME_LEN, decode_frame};
use backbone_protocol::frame::Ping;
use backbone_protocol::{Decoded, ErrorCode, Frame, Keypair, Phase};

/// How long an input's answers may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker's frame limit in this harness (its default configuration's),
/// which the client side cuts the input's traffic with.
fn frame_limit() -> usize {
    Config::default().limits.max_frame_len()
}

/// The broker, the runtime it runs on, and the session's connection.
struct Harness {
    runtime: tokio::runtime::Runtime,
    /// Kept so the broker runs as long as the process.
    _broker: Broker,
    connection: RawConnection,
    /// The nonce of the next input's closing `Ping`.
    next_nonce: u64,
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| Mutex::new(Harness::start()))
}

impl Harness {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let data_dir = scratch_directory();
        let (broker, connection) = runtime.block_on(async {
            let mut config = Config::default();
            config.server.listen = "127.0.0.1:0".parse().expect("an address");
            config.server.data_dir = data_dir;
            config.metrics.listen = None;
            // Short TTLs keep what inputs store from piling up: the sweep
            // (every second) removes it.
            config.limits.max_ttl = Duration::from_secs(2);
            // Capability hashes never expire, so at the default limit
            // (1,000) the list grows with every input and encoding it
            // became most of the target's time (70 hashes: 0.7 ms each
            // answer, instrumented); a small limit keeps answers small
            // and lets inputs reach the limit's refusal.
            config.limits.max_capabilities = 16;
            let options = StartOptions {
                store: Some(backbone_broker::store::Stores::memory(std::sync::Arc::new(
                    MemoryStore::new(),
                ))),
                clock: None,
            };
            let broker = Broker::start(config, options)
                .await
                .expect("start the broker");
            let mut connect = ConnectConfig::new(
                broker.quic_addr.to_string(),
                Trust::CaFile(broker.cert_path.clone()),
            );
            connect.server_name = Some("localhost".into());
            let mut connection = RawConnection::connect(&connect)
                .await
                .expect("connect to the broker");
            connection
                .authenticate(&Credentials::primary(&Keypair::from_secret_bytes(
                    [0x51; 32],
                )))
                .await
                .expect("authenticate");
            (broker, connection)
        });
        Harness {
            runtime,
            _broker: broker,
            connection,
            next_nonce: 1,
        }
    }
}

/// A data directory for this process's broker, as `store_ops` makes its
/// sled directory (and for the same reason cleans up after dead processes).
fn scratch_directory() -> PathBuf {
    const PREFIX: &str = "backbone-fuzz-session-";
    let base = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|name| name.strip_prefix(PREFIX)) else {
                continue;
            };
            if !PathBuf::from("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let directory = base.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    directory
}

/// What one frame sent on the session's stream must be answered with. The
/// order of the variants is the order in which an `Error` with id 0 is
/// matched to them: a skipped frame's error carries its decode error's code,
/// which no other refusal does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Expected {
    /// A skipped invalid frame: an `Error` with id 0 and this code.
    Invalid(u16),
    /// A frame that is not a request (`Hello` after authentication, a frame
    /// only a broker sends): an `Error` with id 0.
    Refused,
    /// A request: its id, answered by an `Error` or one of these types.
    Request(u64, &'static [&'static str]),
    /// A `Ping`: its `Pong`.
    Pong(u64),
}

/// The answer `frame` must get from an authenticated session, or `None`
/// for frames the broker takes without answering.
fn expected_answer(frame: &Frame) -> Option<Expected> {
    use Frame as F;
    let request = |id, answers| Some(Expected::Request(id, answers));
    if frame.request_id() == Some(0) {
        // Request ids are non-zero: such a request is refused unread.
        return Some(Expected::Invalid(ErrorCode::InvalidRequestId as u16));
    }
    match frame {
        F::Ack(_) | F::Pong(_) | F::Error(_) => None,
        F::Ping(ping) => Some(Expected::Pong(ping.nonce)),
        F::Send(f) => request(f.request_id, &["SendAck"]),
        F::RegisterDevice(f) => request(f.request_id, &["Done"]),
        // Refused unless signed by the identity key, which a certified
        // device's session could not be; answered on this one.
        F::UnregisterDevice(f) => request(f.request_id, &["Done"]),
        F::ListDevices(f) => request(f.request_id, &["Devices"]),
        F::PublishCard(f) => request(f.request_id, &["Done"]),
        F::FetchCard(f) => request(f.request_id, &["CardResult", "Redirect"]),
        F::Delete(f) => request(f.request_id, &["Done"]),
        F::RegisterCapability(f) => request(f.request_id, &["Done"]),
        F::RevokeCapability(f) => request(f.request_id, &["Done"]),
        F::ListCapabilities(f) => request(f.request_id, &["Capabilities"]),
        // Refused on an authenticated session, with its own id.
        F::SealedSend(f) => request(f.request_id, &[]),
        F::UploadFile(f) => request(f.request_id, &[]),
        F::DownloadFile(f) => request(f.request_id, &[]),
        F::CreateToken(f) => request(f.request_id, &["TokenCreated"]),
        F::GetToken(f) => request(f.request_id, &["TokenContent", "Redirect"]),
        F::DeleteToken(f) => request(f.request_id, &["Done"]),
        F::SetInboundPolicy(f) => request(f.request_id, &["Done"]),
        F::RequestRelationship(f) => request(f.request_id, &["RelationshipChanged"]),
        F::DecideRelationship(f) => request(f.request_id, &["RelationshipChanged"]),
        F::ListRelationships(f) => request(f.request_id, &["Relationships"]),
        F::DeleteIdentity(f) => request(f.request_id, &["DeletionScheduled"]),
        F::CancelDeletion(f) => request(f.request_id, &["Done"]),
        F::CreateFile(f) => request(f.request_id, &["FileCreated"]),
        F::FileStatus(f) => request(f.request_id, &["FileState"]),
        F::DeleteFile(f) => request(f.request_id, &["Done"]),
        // Hello, Auth, Anonymous after authentication, and every frame only
        // a broker sends: refused with id 0.
        _ => Some(Expected::Refused),
    }
}

/// The frames a broker sends to a client.
const SERVER_FRAMES: &[&str] = &[
    "Challenge",
    "AuthOk",
    "CardResult",
    "SendAck",
    "Deliver",
    "Done",
    "Error",
    "Redirect",
    "Pong",
    "Capabilities",
    "TokenCreated",
    "TokenContent",
    "RelationshipChanged",
    "Relationships",
    "DeletionScheduled",
    "FileCreated",
    "FileState",
    "FileData",
    "Devices",
];

fn name(frame: &Frame) -> &'static str {
    Frame::TAG_NAMES[frame.tag() as usize]
}

/// One piece of a control segment: a frame, or an invalid frame the broker
/// skips (its bytes and the code of its decode error).
enum Piece<'a> {
    Frame(Frame),
    Invalid(&'a [u8], u16),
}

/// Cuts `bytes` to whole frames and skippable invalid ones, as the broker
/// reads them after authentication: up to the first incomplete frame or
/// fatal error.
fn cut(bytes: &[u8]) -> Vec<Piece<'_>> {
    let limit = frame_limit();
    let mut used = 0;
    let mut pieces = Vec::new();
    loop {
        let rest = &bytes[used..];
        match decode_frame(rest, limit, Phase::Any) {
            Ok(Decoded::Frame { frame, consumed }) => {
                pieces.push(Piece::Frame(frame));
                used += consumed;
            }
            Ok(Decoded::Incomplete { .. })
            | Err(DecodeError::FrameTooLarge { .. } | DecodeError::NotAuthenticated { .. }) => {
                return pieces;
            }
            Err(error) => {
                // The decoder rejects a bad version or tag from the header
                // alone, before the body has arrived: an input that ends
                // inside such a frame ends the session's bytes there.
                let len = 4 + u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                if len > rest.len() {
                    return pieces;
                }
                pieces.push(Piece::Invalid(&rest[..len], error.code() as u16));
                used += len;
            }
        }
    }
}

/// The ids of the token and file this session created last. An input
/// cannot know them in advance (the broker draws them), so a request that
/// names the all-zero id is sent with the last one instead: the fuzzer
/// reaches fetching, deleting, uploading and downloading what exists.
#[derive(Default)]
struct Created {
    token: Option<TokenId>,
    file: Option<FileId>,
}

impl Created {
    fn substitute(&self, frame: &mut Frame) {
        let token = |id: &mut TokenId| {
            if id.0 == [0; 32]
                && let Some(created) = self.token
            {
                *id = created;
            }
        };
        let file = |id: &mut FileId| {
            if id.0 == [0; 32]
                && let Some(created) = self.file
            {
                *id = created;
            }
        };
        match frame {
            Frame::GetToken(f) => token(&mut f.token_id),
            Frame::DeleteToken(f) => token(&mut f.token_id),
            Frame::FileStatus(f) => file(&mut f.file_id),
            Frame::DeleteFile(f) => file(&mut f.file_id),
            Frame::UploadFile(f) => file(&mut f.file_id),
            Frame::DownloadFile(f) => file(&mut f.file_id),
            _ => {}
        }
    }

    fn record(&mut self, answer: &Frame) {
        match answer {
            Frame::TokenCreated(created) => self.token = Some(created.token_id),
            Frame::FileCreated(created) => self.file = Some(created.file_id),
            _ => {}
        }
    }
}

/// Target `session`: see the module documentation.
pub fn session_target(data: &[u8]) {
    run_session(data);
}

/// Runs the segments of `data` against the broker, one after another;
/// returns how many answers were checked.
pub fn run_session(mut data: &[u8]) -> usize {
    let mut harness = harness()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let harness = &mut *harness;
    let Harness {
        runtime,
        connection,
        next_nonce,
        ..
    } = harness;
    runtime.block_on(async {
        let mut checked = 0;
        let mut created = Created::default();
        while let [kind, a, b, rest @ ..] = data {
            let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
            let (segment, rest) = rest.split_at(len);
            data = rest;
            if kind % 2 == 0 {
                checked += control(connection, segment, next_nonce, &mut created).await;
            } else {
                checked += file_stream(connection, segment, &created).await;
            }
        }
        checked
    })
}

/// Sends a control segment and a `Ping` on the session's stream and checks
/// every answer; returns how many there were.
async fn control(
    connection: &mut RawConnection,
    segment: &[u8],
    next_nonce: &mut u64,
    created: &mut Created,
) -> usize {
    let mut traffic = Vec::new();
    let mut pending: BTreeMap<Expected, usize> = BTreeMap::new();
    for piece in cut(segment) {
        match piece {
            Piece::Frame(mut frame) => {
                created.substitute(&mut frame);
                codec::encode_frame(&frame, &mut traffic).expect("a decoded frame encodes");
                if let Some(expected) = expected_answer(&frame) {
                    *pending.entry(expected).or_default() += 1;
                }
            }
            Piece::Invalid(bytes, code) => {
                traffic.extend_from_slice(bytes);
                *pending.entry(Expected::Invalid(code)).or_default() += 1;
            }
        }
    }
    // The Ping closes the segment: its Pong shows the broker read
    // everything before it (answers may still follow, from spawned tasks).
    let nonce = *next_nonce;
    *next_nonce += 1;
    codec::encode_frame(&Frame::Ping(Ping { nonce }), &mut traffic).expect("a Ping encodes");
    *pending.entry(Expected::Pong(nonce)).or_default() += 1;
    connection
        .send_raw(&traffic)
        .await
        .expect("the session's stream is open");

    // Typed answers settle their request at once. Errors are matched at
    // the end, when every answer is in: any request accepts an `Error`,
    // so an early guess could take the place of a typed answer still to
    // come for another request with the same id.
    let mut checked = 0;
    let mut outstanding: usize = pending.values().sum();
    let mut errors = Vec::new();
    while outstanding > 0 {
        let frame = tokio::time::timeout(ANSWER_TIMEOUT, connection.recv())
            .await
            .unwrap_or_else(|_| panic!("no answer within {ANSWER_TIMEOUT:?}: {pending:?}"))
            .unwrap_or_else(|error| panic!("the session ended: {error}; waiting for {pending:?}"));
        checked += 1;
        assert!(
            SERVER_FRAMES.contains(&name(&frame)),
            "the broker sent a {}",
            name(&frame)
        );
        match frame {
            // Pushes of envelopes sent to this identity; not answers.
            Frame::Deliver(_) => continue,
            Frame::Error(error) => errors.push((error.request_id, error.code)),
            typed => {
                let key = pending
                    .keys()
                    .copied()
                    .find(|expected| settles(expected, &typed))
                    .unwrap_or_else(|| {
                        panic!("an answer nothing asked for: {typed:?}; waiting for {pending:?}")
                    });
                take(&mut pending, key);
                created.record(&typed);
            }
        }
        outstanding -= 1;
    }
    for (id, code) in errors {
        let key = pending
            .keys()
            .copied()
            .find(|expected| match expected {
                Expected::Invalid(want) => id == 0 && code == *want,
                Expected::Refused => id == 0,
                Expected::Request(want, _) => id == *want,
                Expected::Pong(_) => false,
            })
            .unwrap_or_else(|| {
                panic!("an error nothing asked for: id {id}, code {code}; left: {pending:?}")
            });
        take(&mut pending, key);
    }
    assert!(pending.is_empty(), "unanswered: {pending:?}");
    checked
}

/// Whether the typed (non-`Error`) answer `frame` settles `expected`.
fn settles(expected: &Expected, frame: &Frame) -> bool {
    match (expected, frame) {
        (Expected::Pong(nonce), Frame::Pong(pong)) => pong.nonce == *nonce,
        (Expected::Request(id, answers), _) => {
            frame.answer_id() == Some(*id) && answers.contains(&name(frame))
        }
        _ => false,
    }
}

fn take(pending: &mut BTreeMap<Expected, usize>, key: Expected) {
    let count = pending.get_mut(&key).expect("a pending answer");
    *count -= 1;
    if *count == 0 {
        pending.remove(&key);
    }
}

/// Sends `segment` on a new file stream (its header's all-zero file id
/// replaced by the last created file's) and checks what comes back;
/// returns how many answers were checked.
async fn file_stream(connection: &mut RawConnection, segment: &[u8], created: &Created) -> usize {
    let mut segment = segment.to_vec();
    let mut header_id = None;
    if let Ok(Decoded::Frame {
        mut frame,
        consumed,
    }) = decode_frame(&segment, MAX_FRAME_LEN, Phase::Any)
    {
        header_id = match &frame {
            Frame::UploadFile(upload) => Some(upload.request_id),
            Frame::DownloadFile(download) => Some(download.request_id),
            _ => None,
        };
        created.substitute(&mut frame);
        let mut header = codec::frame_to_vec(&frame).expect("a decoded frame encodes");
        header.extend_from_slice(&segment[consumed..]);
        segment = header;
    }
    let (mut send, mut recv) = connection
        .connection()
        .open_bi()
        .await
        .expect("open a file stream");
    // The broker may refuse the header and stop reading before all is sent.
    let _ = send.write_all(&segment).await;
    let _ = send.finish();
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv.read_to_end(1 << 20))
        .await
        .expect("a file stream answered in time");
    let Ok(answer) = answer else {
        // Reset by the broker (a download whose bytes could not be read)
        // or too long; neither happens with this harness's files.
        panic!("a file stream ended badly: {answer:?}");
    };
    if answer.is_empty() {
        return 0;
    }
    let mut buffer = FrameBuffer::new(frame_limit());
    buffer.extend(&answer);
    let frame = match buffer.next_frame(Phase::Any) {
        Ok(Some(frame)) => frame,
        other => panic!("a file stream's answer is not a frame: {other:?}"),
    };
    let id = frame.answer_id();
    assert!(
        id == Some(0) || (id.is_some() && id == header_id),
        "a file stream answered {frame:?} to a header with id {header_id:?}"
    );
    let rest = buffer.take_buffered();
    match &frame {
        Frame::FileData(data) => assert_eq!(
            rest.len() as u64,
            data.size - data.offset,
            "a download carries the bytes it announces"
        ),
        Frame::FileState(state) => {
            assert!(state.received <= state.size);
            assert!(rest.is_empty(), "bytes after a file stream's answer");
        }
        Frame::Error(_) | Frame::Redirect(_) => {
            assert!(rest.is_empty(), "bytes after a file stream's answer");
        }
        other => panic!("a file stream answered with {}", name(other)),
    }
    1
}

/// A segment of a `session` input: kind, length, bytes.
fn segment(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut segment = vec![kind];
    segment.extend(
        u16::try_from(bytes.len())
            .expect("a short segment")
            .to_le_bytes(),
    );
    segment.extend_from_slice(bytes);
    segment
}

/// Seeds: every request the session serves, made to succeed where it can
/// (signed with the harness's identity, naming what it created): a card,
/// a device, a send to itself and its deletion, capabilities, a policy, a
/// relationship request, a token created, fetched and deleted, a file
/// created, uploaded, downloaded and deleted, a deletion scheduled and
/// cancelled; then invalid frames and frames a client must not send.
pub fn session_seeds() -> Vec<Vec<u8>> {
    use backbone_protocol::bytes::{
        Blob, ContentHash, DeliveryCapability, EncryptionKey, FileSecret, PasswordVerifier,
    };
    use backbone_protocol::frame::{
        Ack, CancelDeletion, CreateFile, CreateToken, Delete, DeleteFile, DeleteIdentity,
        DeleteToken, DownloadFile, FetchCard, FileStatus, GetToken, Hello, ListCapabilities,
        ListRelationships, PublishCard, RegisterCapability, RegisterDevice, RequestRelationship,
        RevokeCapability, Send, SetInboundPolicy, UploadFile,
    };
    use backbone_protocol::relationship::InboundPolicy;
    use backbone_protocol::{DeviceCertificate, IdentityCard};

    let identity = Keypair::from_secret_bytes([0x51; 32]);
    let me = identity.address();
    let other = Keypair::from_secret_bytes([0x52; 32]).address();
    let capability = DeliveryCapability([0x66; 32]);
    let secret = FileSecret([0xaa; 32]);
    let content = b"data";
    let frames = |frames: &[Frame]| -> Vec<u8> {
        let mut bytes = Vec::new();
        for frame in frames {
            codec::encode_frame(frame, &mut bytes).expect("seed frames encode");
        }
        segment(0, &bytes)
    };
    let file_stream = |header: Frame, raw: &[u8]| {
        let mut bytes = codec::frame_to_vec(&header).expect("seed frames encode");
        bytes.extend_from_slice(raw);
        segment(1, &bytes)
    };
    let zero_token = TokenId([0; 32]);
    let zero_file = FileId([0; 32]);
    let device = Keypair::from_secret_bytes([0x53; 32]).public();
    let mut unknown_tag =
        codec::frame_to_vec(&Frame::Ping(Ping { nonce: 1 })).expect("seed frames encode");
    unknown_tag[5..9].copy_from_slice(&200u32.to_le_bytes());
    vec![
        frames(&[
            Frame::PublishCard(PublishCard {
                request_id: 1,
                card: IdentityCard::sign(&identity, EncryptionKey([0x55; 32]), 1),
            }),
            Frame::FetchCard(FetchCard {
                request_id: 2,
                address: me,
            }),
            Frame::RegisterDevice(RegisterDevice {
                request_id: 3,
                certificate: DeviceCertificate::issue(&identity, device, 1),
            }),
        ]),
        frames(&[
            Frame::Send(Send {
                request_id: 4,
                ttl_secs: 1,
                recipients: vec![me, other],
                envelope: Blob::from(vec![1, 2, 3]),
            }),
            Frame::Ack(Ack { up_to_seq: 1 }),
            Frame::Delete(Delete {
                request_id: 5,
                seqs: vec![1, 2],
            }),
        ]),
        frames(&[
            Frame::RegisterCapability(RegisterCapability {
                request_id: 6,
                capability_hash: capability.hash(),
            }),
            Frame::ListCapabilities(ListCapabilities { request_id: 7 }),
            Frame::RevokeCapability(RevokeCapability {
                request_id: 8,
                capability_hash: capability.hash(),
            }),
            Frame::SetInboundPolicy(SetInboundPolicy {
                request_id: 9,
                policy: InboundPolicy::RelationshipsOnly,
            }),
            Frame::RequestRelationship(RequestRelationship {
                request_id: 10,
                owner: other,
                capability,
                intro: Blob::from(vec![4]),
            }),
            Frame::ListRelationships(ListRelationships { request_id: 11 }),
        ]),
        [
            frames(&[Frame::CreateToken(CreateToken {
                request_id: 12,
                ttl_secs: 1,
                content: Blob::from(vec![5; 8]),
                password_verifier: Some(PasswordVerifier([0x77; 32])),
            })]),
            frames(&[
                Frame::GetToken(GetToken {
                    request_id: 13,
                    token_id: zero_token,
                    password_verifier: Some(PasswordVerifier([0x78; 32])),
                }),
                Frame::GetToken(GetToken {
                    request_id: 14,
                    token_id: zero_token,
                    password_verifier: Some(PasswordVerifier([0x77; 32])),
                }),
                Frame::DeleteToken(DeleteToken {
                    request_id: 15,
                    token_id: zero_token,
                }),
            ]),
        ]
        .concat(),
        [
            frames(&[Frame::CreateFile(CreateFile {
                request_id: 16,
                size: content.len() as u64,
                content_hash: ContentHash::of(content),
                secret_hash: secret.hash(),
                ttl_secs: 1,
            })]),
            file_stream(
                Frame::UploadFile(UploadFile {
                    request_id: 17,
                    file_id: zero_file,
                    offset: 0,
                }),
                content,
            ),
            frames(&[Frame::FileStatus(FileStatus {
                request_id: 18,
                file_id: zero_file,
            })]),
            file_stream(
                Frame::DownloadFile(DownloadFile {
                    request_id: 19,
                    file_id: zero_file,
                    secret,
                    offset: 1,
                }),
                &[],
            ),
            frames(&[Frame::DeleteFile(DeleteFile {
                request_id: 20,
                file_id: zero_file,
            })]),
        ]
        .concat(),
        frames(&[
            Frame::DeleteIdentity(DeleteIdentity { request_id: 21 }),
            Frame::CancelDeletion(CancelDeletion { request_id: 22 }),
        ]),
        [
            frames(&[Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
            })]),
            segment(0, &unknown_tag),
            segment(0, &[0, 0, 0, 0]),
            file_stream(Frame::Ping(Ping { nonce: 3 }), &[]),
            segment(1, &[0, 0, 0, 2, 1]),
        ]
        .concat(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_list_is_answered_with_devices() {
        // Found by the long run: `ListDevices` (and `UnregisterDevice`)
        // were not in the harness's table of requests, so their answers
        // were taken for answers to nothing.
        let input: &[u8] = &[
            0, 11, 0, 0, 0, 0, 7, 1, 0, 0, 0, 0, 1, 1, 0, 17, 0, 0, 0, 0, 13, 1, 47, 0, 0, 0, 1, 0,
            0, 0, 0, 6, 170, 0, 0, 4, 0, 0, 0, 0, 0, 1, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 31, 168, 0, 45, 0, 0, 0, 0, 13,
            1, 16, 0, 0, 0, 3, 0, 0, 0, 0, 0, 4, 0, 1, 5, 0, 0, 254, 0, 2, 1,
        ];
        run_session(input);
    }

    #[test]
    fn an_input_ending_inside_a_frame_with_a_bad_header_ends_there() {
        // Found by CI's short run: a header the decoder refuses at once
        // (bad version) whose length runs past the input's end.
        run_session(&[0x32, 0x29, 0, 0, 0, 0, 0x2b, 0x2b]);
    }

    #[test]
    fn the_seeds_are_answered_as_expected() {
        // Each seed runs against the real broker; run_session asserts every
        // answer. The file seed uploads, and downloads from byte 1, what it
        // created.
        for seed in session_seeds() {
            assert!(run_session(&seed) > 0);
        }
    }

    #[test]
    fn an_answer_to_the_wrong_request_would_be_caught() {
        let pending = [Expected::Request(7, &["Done"][..])];
        let done = Frame::Done(backbone_protocol::frame::Done { request_id: 8 });
        assert!(!pending.iter().any(|expected| settles(expected, &done)));
        let done = Frame::Done(backbone_protocol::frame::Done { request_id: 7 });
        assert!(pending.iter().any(|expected| settles(expected, &done)));
    }
}
