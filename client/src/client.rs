//! The persistent client: one background task keeps a connection to the
//! broker, reconnecting with jittered exponential backoff; requests are
//! matched to responses by id; pushed envelopes arrive on a stream, in
//! sequence order, without ones already acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backbone_protocol::bytes::{
    Blob, CapabilityHash, ContentHash, DeliveryCapability, FileId, FileSecret, MessageId, TokenId,
};
use backbone_protocol::frame::{
    Ack, CancelDeletion, CreateFile, CreateToken, DecideRelationship, Delete, DeleteFile,
    DeleteIdentity, DeleteToken, FetchCard, FileCreated, FileState, FileStatus, GetToken,
    ListCapabilities, ListDevices, ListRelationships, PublishCard, RegisterCapability,
    RegisterDevice, RequestRelationship, RevokeCapability, Send, SendAck, SetInboundPolicy,
    UnregisterDevice,
};
use backbone_protocol::relationship::{Decision, InboundPolicy, Notice, Relationship};
use backbone_protocol::{Address, DeviceCertificate, DeviceId, Frame, IdentityCard, Keypair};
use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::envelope::{self, EncryptionKeypair, Opened, Padding};
use crate::error::ClientError;
use crate::file::{self, FileFetcher, FileRef, FileSource};
use crate::token::{self, TokenRef};
use crate::transport::{ConnectConfig, Credentials, RawConnection, unexpected};

/// Reconnect backoff.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based): exponential, capped, with
    /// 50–100 % jitter so a fleet of clients does not reconnect in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        exponential.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// Everything a [`Client`] needs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Where and how to connect.
    pub connect: ConnectConfig,
    /// Device credentials.
    pub credentials: Credentials,
    /// The identity's signing key, needed to sign sealed envelopes (`send`).
    pub identity: Option<Keypair>,
    /// The identity's encryption key, needed to open envelopes (`next_message`).
    pub encryption: Option<EncryptionKeypair>,
    /// How long a request waits for its response.
    pub request_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Pushed envelopes buffered before the client stops reading from the broker.
    pub delivery_buffer: usize,
    /// How [`Client::send`] pads envelopes (by default to powers of two
    /// from 256 bytes, so the broker learns only a size bucket).
    pub padding: Padding,
    /// When [`Client::ack`]s go to the broker: gathered for a moment, not
    /// one `Ack` per delivery.
    pub acks: AckPolicy,
}

/// When a device's acknowledgements go to the broker. An `Ack` is
/// cumulative (everything up to a sequence number), so acks made in a short
/// while fold into one: it goes out once `delay` has passed since the
/// first ack not yet sent, once it covers `every` sequence numbers past the
/// last one sent, or with the next request written (whichever comes first).
/// During a catch-up of thousands of envelopes that is one `Ack` per
/// `every` instead of one per envelope. Acks are at-least-once either way:
/// a cursor move lost with the connection only means envelopes are pushed
/// again, and the client drops those it has handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPolicy {
    /// How long an ack may wait for more to fold into it; zero sends each
    /// at once. Keep it under QUIC's ack delay (25 ms) so that the
    /// transport's own acknowledgement rides on it.
    pub delay: Duration,
    /// An ack goes at once when it covers this many sequence numbers past
    /// the last one sent; keep it below the broker's push window
    /// (`limits.push_window`, 256 by default), or pushes wait for `delay`.
    pub every: u64,
}

impl Default for AckPolicy {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(10),
            every: 32,
        }
    }
}

/// The acks of one connection not yet written (see [`AckPolicy`]).
#[derive(Debug)]
struct PendingAck {
    policy: AckPolicy,
    /// The highest sequence number acked by the application.
    wanted: u64,
    /// The highest written to the broker on this connection.
    written: u64,
    /// When `wanted` must be written at the latest.
    due: Option<tokio::time::Instant>,
}

impl PendingAck {
    /// Nothing pending: `written` is what the connection has already sent.
    fn new(policy: AckPolicy, written: u64) -> Self {
        Self {
            policy,
            wanted: written,
            written,
            due: None,
        }
    }

    /// The application acked up to `seq`.
    fn record(&mut self, seq: u64, now: tokio::time::Instant) {
        self.wanted = self.wanted.max(seq);
        if self.wanted > self.written && self.due.is_none() {
            self.due = Some(now + self.policy.delay);
        }
    }

    /// The ack to write now, if one is due: its delay has passed, it covers
    /// `every` sequence numbers, or something else is being written anyway
    /// (`piggyback`).
    fn take(&mut self, now: tokio::time::Instant, piggyback: bool) -> Option<u64> {
        if self.wanted <= self.written {
            return None;
        }
        let due = piggyback
            || self.wanted - self.written >= self.policy.every
            || self.due.is_some_and(|due| due <= now);
        if !due {
            return None;
        }
        self.written = self.wanted;
        self.due = None;
        Some(self.wanted)
    }
}

/// The application's acks, shared with the connection task. An ack is a
/// store; it wakes the task only when the task has something to do about
/// it: the first ack past what the task has written arms the task's delay
/// timer, and one that covers [`AckPolicy::every`] past it is written at
/// once. (Sent through the command channel, every delivery's ack woke the
/// task.)
#[derive(Debug, Default)]
struct SharedAcks {
    /// The highest sequence number the application acked.
    wanted: AtomicU64,
    /// The highest the connection task has taken in (it writes it when
    /// due, and its delay timer runs meanwhile).
    seen: AtomicU64,
    /// The highest the connection task has written.
    written: AtomicU64,
    wake: Notify,
}

impl SharedAcks {
    /// The application acked up to `seq`.
    fn ack(&self, seq: u64, every: u64) {
        let before = self.wanted.fetch_max(seq, Ordering::SeqCst);
        if seq <= before {
            return;
        }
        let written = self.written.load(Ordering::SeqCst);
        // With `before > written` an earlier ack is pending, so the task
        // will look at `wanted` again (its timer runs, or a wake-up is
        // owed, or it has yet to check before it waits).
        if before <= written || seq - written >= every.max(1) {
            self.wake.notify_one();
        }
    }

    /// What the connection task takes in: the highest acked, if it is new.
    fn take_in(&self) -> Option<u64> {
        let wanted = self.wanted.load(Ordering::SeqCst);
        let seen = self.seen.swap(wanted, Ordering::SeqCst);
        (wanted > seen).then_some(wanted)
    }

    /// Whether an ack came after the last [`SharedAcks::take_in`].
    fn more(&self) -> bool {
        self.wanted.load(Ordering::SeqCst) > self.seen.load(Ordering::SeqCst)
    }

    /// The connection task has written (or is writing) up to `seq`.
    fn wrote(&self, seq: u64) {
        self.written.fetch_max(seq, Ordering::SeqCst);
    }
}

impl ClientOptions {
    /// Options for an identity authenticating as its own primary device.
    pub fn primary(
        connect: ConnectConfig,
        identity: Keypair,
        encryption: EncryptionKeypair,
    ) -> Self {
        Self {
            connect,
            credentials: Credentials::primary(&identity),
            identity: Some(identity),
            encryption: Some(encryption),
            request_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            delivery_buffer: 1024,
            padding: Padding::default(),
            acks: AckPolicy::default(),
        }
    }
}

/// Takes the card out of the broker's answer to a `FetchCard` for
/// `address`, verifies that it belongs to that address, and caches it.
pub(crate) fn cache_verified_card(
    cards: &std::sync::Mutex<HashMap<Address, IdentityCard>>,
    address: &Address,
    answer: Frame,
) -> Result<IdentityCard, ClientError> {
    let card = match answer {
        Frame::CardResult(result) => result.card,
        other => return Err(unexpected(other)),
    };
    card.verify(address)?;
    cards
        .lock()
        .expect("card cache lock")
        .insert(*address, card);
    Ok(card)
}

/// One envelope pushed by the broker, still sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Sequence number in this mailbox; ack it when processed.
    pub seq: u64,
    /// The broker's message id.
    pub message_id: MessageId,
    /// The sender as authenticated by the broker; `None` for a sealed send,
    /// whose sender only the envelope's signature names.
    pub sender: Option<Address>,
    /// When the broker stored it (Unix ms).
    pub stored_at_ms: u64,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
    /// The sealed bytes, a slice of the frame they came in (not a copy).
    pub envelope: Bytes,
}

impl Delivery {
    /// The broker notice this delivery carries, if it is one (its envelope
    /// starts with [`backbone_protocol::relationship::NOTICE_PREFIX`], which
    /// the broker never accepts from a client, so a peer cannot forge one).
    /// `Some(Err)` for a notice this client cannot decode.
    pub fn notice(&self) -> Option<Result<Notice, ClientError>> {
        Notice::from_envelope(&self.envelope).map(|decoded| {
            decoded.map_err(|error| ClientError::Protocol(format!("undecodable notice: {error}")))
        })
    }
}

/// What [`Client::next_event`] yields.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message from an identity, opened and verified.
    Message(Message),
    /// A notice from the broker about a peer (the delivery's `sender`), for
    /// example a relationship request or its acceptance.
    Notice(Delivery, Notice),
    /// A delivery that could not be opened or decoded (tampered, not for
    /// this identity, or from a newer client); the caller decides whether to ack it.
    Unreadable(Delivery, Arc<ClientError>),
}

/// A delivered and opened message.
#[derive(Clone, Debug)]
pub struct Message {
    /// The delivery it came in.
    pub delivery: Delivery,
    /// The verified contents.
    pub opened: Opened,
}

/// Connection state, observable through [`Client::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Connected and authenticated.
    Connected,
    /// Waiting to reconnect after a failure.
    Reconnecting,
    /// Stopped for good, with the reason.
    Stopped(String),
}

enum Command {
    Request {
        frame: Frame,
        reply: oneshot::Sender<Result<Frame, ClientError>>,
    },
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Frame, ClientError>>>>>;

/// A persistent, authenticated connection to a broker.
pub struct Client {
    options: ClientOptions,
    address: Address,
    commands: mpsc::Sender<Command>,
    acks: Arc<SharedAcks>,
    deliveries: Mutex<mpsc::Receiver<Delivery>>,
    status: watch::Receiver<Status>,
    next_request: AtomicU64,
    cards: std::sync::Mutex<HashMap<Address, IdentityCard>>,
    /// The live QUIC connection, for file streams; `None` while reconnecting.
    connection: watch::Receiver<Option<quinn::Connection>>,
    /// Why the broker ended the session for good, once it has.
    closed: Closed,
    task: tokio::task::JoinHandle<()>,
}

/// The broker's code and reason for ending the session for good (for
/// example, the identity was deleted), set once before the client stops.
type Closed = Arc<std::sync::OnceLock<(u16, String)>>;

/// The error for a request the client can no longer carry: the broker's
/// close when it ended the session for good, else `lost`.
fn stopped(closed: &Closed, lost: &str) -> ClientError {
    match closed.get() {
        Some((code, reason)) => ClientError::Closed {
            code: *code,
            reason: reason.clone(),
        },
        None => ClientError::Disconnected(lost.into()),
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects and authenticates; fails if the first attempt fails. Later
    /// disconnects are repaired in the background.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let (connection, _ok) =
            connect_following_redirects(&options.connect, &options.credentials).await?;
        let address = options.credentials.identity_key.address();
        let (commands, command_rx) = mpsc::channel(1024);
        let (delivery_tx, deliveries) = mpsc::channel(options.delivery_buffer);
        let (status_tx, status) = watch::channel(Status::Connected);
        let (connection_tx, current) = watch::channel(None);
        let closed = Closed::default();
        let acks = Arc::new(SharedAcks::default());
        let task = tokio::spawn(connection_loop(
            options.clone(),
            connection,
            FromClient {
                commands: command_rx,
                acks: acks.clone(),
            },
            delivery_tx,
            status_tx,
            connection_tx,
            closed.clone(),
        ));
        Ok(Client {
            options,
            address,
            commands,
            acks,
            deliveries: Mutex::new(deliveries),
            status,
            next_request: AtomicU64::new(1),
            cards: std::sync::Mutex::new(HashMap::new()),
            connection: current,
            closed,
            task,
        })
    }

    /// This client's identity address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The current connection status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The connection status as a [`watch::Receiver`]: every change is seen,
    /// even a reconnect that completes before anyone looks at
    /// [`Client::status`] (an app's status line, a test).
    pub fn status_changes(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until the client is connected (after a reconnect).
    pub async fn wait_connected(&self) -> Result<(), ClientError> {
        let mut status = self.status.clone();
        let result = status
            .wait_for(|s| !matches!(s, Status::Reconnecting))
            .await;
        match result.map(|s| s.clone()) {
            Ok(Status::Connected) => Ok(()),
            Ok(Status::Stopped(reason)) => Err(stopped(&self.closed, &reason)),
            _ => Err(stopped(&self.closed, "client stopped")),
        }
    }

    fn request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(&self, frame: Frame) -> Result<Frame, ClientError> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::Request { frame, reply })
            .await
            .map_err(|_| stopped(&self.closed, "client stopped"))?;
        match tokio::time::timeout(self.options.request_timeout, response).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(stopped(&self.closed, "connection lost")),
            Ok(Ok(result)) => result,
        }
    }

    async fn expect_done(&self, frame: Frame) -> Result<(), ClientError> {
        match self.request(frame).await? {
            Frame::Done(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Publishes this identity's card, built from its keys.
    pub async fn publish_card(&self) -> Result<IdentityCard, ClientError> {
        let identity = self.options.identity.as_ref().ok_or(ClientError::Protocol(
            "publishing a card needs the identity key".into(),
        ))?;
        let encryption = self
            .options
            .encryption
            .as_ref()
            .ok_or(ClientError::Protocol(
                "publishing a card needs the encryption key".into(),
            ))?;
        let card = IdentityCard::sign(
            identity,
            encryption.public(),
            backbone_protocol::unix_millis_now(),
        );
        self.expect_done(Frame::PublishCard(PublishCard {
            request_id: self.request_id(),
            card,
        }))
        .await?;
        Ok(card)
    }

    /// Registers another device of this identity: from then on it
    /// authenticates with its own key and `certificate`. Only a client
    /// authenticated with the identity key may do this (a device gets
    /// `IdentityKeyRequired`); an identity with the broker's maximum of
    /// devices gets `QuotaExceeded`.
    pub async fn register_device(&self, certificate: DeviceCertificate) -> Result<(), ClientError> {
        self.expect_done(Frame::RegisterDevice(RegisterDevice {
            request_id: self.request_id(),
            certificate,
        }))
        .await
    }

    /// Unregisters a device of this identity, for example a lost or stolen
    /// one: when this returns, the broker has durably forgotten it, closed
    /// its connections and refuses its key (`DeviceNotRegistered`). Only a
    /// client authenticated with the identity key may do this (a device gets
    /// `IdentityKeyRequired`); a device that is not registered is `NotFound`.
    ///
    /// The device's copy of the identity's encryption key stays with
    /// whoever holds the device: the broker no longer delivers to it, but
    /// envelopes obtained some other way still open with it.
    pub async fn unregister_device(&self, device: &DeviceId) -> Result<(), ClientError> {
        self.expect_done(Frame::UnregisterDevice(UnregisterDevice {
            request_id: self.request_id(),
            device_id: *device,
        }))
        .await
    }

    /// The certificates of this identity's registered devices, ascending by
    /// device id (the identity key itself is not listed: it needs none).
    pub async fn list_devices(&self) -> Result<Vec<DeviceCertificate>, ClientError> {
        match self
            .request(Frame::ListDevices(ListDevices {
                request_id: self.request_id(),
            }))
            .await?
        {
            Frame::Devices(list) => Ok(list.devices),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches the card of `address` and verifies it belongs to that address.
    /// Verified cards are cached for the client's lifetime.
    pub async fn fetch_card(&self, address: &Address) -> Result<IdentityCard, ClientError> {
        if let Some(card) = self.cards.lock().expect("card cache lock").get(address) {
            return Ok(*card);
        }
        let answer = self
            .request(Frame::FetchCard(FetchCard {
                request_id: self.request_id(),
                address: *address,
            }))
            .await?;
        cache_verified_card(&self.cards, address, answer)
    }

    /// Sends opaque bytes to `recipients` (no encryption: the caller's bytes as they are).
    pub async fn send_envelope(
        &self,
        recipients: &[Address],
        envelope: Vec<u8>,
        ttl: Duration,
    ) -> Result<SendAck, ClientError> {
        let ttl_secs = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        let frame = Frame::Send(Send {
            request_id: self.request_id(),
            ttl_secs,
            recipients: recipients.to_vec(),
            envelope: Blob::from(envelope),
        });
        match self.request(frame).await? {
            Frame::SendAck(ack) => Ok(ack),
            other => Err(unexpected(other)),
        }
    }

    /// Seals `plaintext` to every recipient's verified card, signs it, and sends it.
    pub async fn send(
        &self,
        recipients: &[Address],
        plaintext: &[u8],
        ttl: Duration,
    ) -> Result<SendAck, ClientError> {
        let identity = self.options.identity.as_ref().ok_or(ClientError::Protocol(
            "sending needs the identity key".into(),
        ))?;
        let mut keys = Vec::with_capacity(recipients.len());
        for recipient in recipients {
            keys.push((*recipient, self.fetch_card(recipient).await?.encryption_key));
        }
        let sealed = envelope::seal_with(
            identity,
            &keys,
            plaintext,
            backbone_protocol::unix_millis_now(),
            self.options.padding,
        )?;
        self.send_envelope(recipients, sealed, ttl).await
    }

    /// Registers `capability`'s hash with this identity's mailbox, so sealed
    /// sends presenting it are accepted. Hand the capability itself to one
    /// contact, inside an end-to-end encrypted message; the broker only ever
    /// sees its hash. Fails with `TooManyCapabilities` when the mailbox holds
    /// the broker's maximum.
    pub async fn register_capability(
        &self,
        capability: &DeliveryCapability,
    ) -> Result<CapabilityHash, ClientError> {
        let capability_hash = capability.hash();
        self.expect_done(Frame::RegisterCapability(RegisterCapability {
            request_id: self.request_id(),
            capability_hash,
        }))
        .await?;
        Ok(capability_hash)
    }

    /// Revokes a registered capability hash: sealed sends presenting its
    /// capability are refused with `UnknownCapability` from then on. Fails
    /// with `NotFound` when it is not registered.
    pub async fn revoke_capability(&self, hash: &CapabilityHash) -> Result<(), ClientError> {
        self.expect_done(Frame::RevokeCapability(RevokeCapability {
            request_id: self.request_id(),
            capability_hash: *hash,
        }))
        .await
    }

    /// The capability hashes registered with this identity's mailbox, ascending.
    pub async fn list_capabilities(&self) -> Result<Vec<CapabilityHash>, ClientError> {
        match self
            .request(Frame::ListCapabilities(ListCapabilities {
                request_id: self.request_id(),
            }))
            .await?
        {
            Frame::Capabilities(list) => Ok(list.hashes),
            other => Err(unexpected(other)),
        }
    }

    /// Stores `content` as a token for `ttl` (capped by the broker) and
    /// returns its reference, the secret to hand out (see [`crate::token`]).
    /// The content is encrypted here under a fresh key that only the
    /// reference holds. With a `password`, fetching needs it too; the broker
    /// learns only a hash of a slow-to-compute verifier.
    ///
    /// Fails with [`token::TokenError::TooLarge`] above the broker's size
    /// limit, and with `QuotaExceeded` when this identity holds as many
    /// tokens as the broker allows.
    pub async fn create_token(
        &self,
        content: &[u8],
        ttl: Duration,
        password: Option<&str>,
    ) -> Result<TokenRef, ClientError> {
        let key: [u8; token::KEY_LEN] = rand::random();
        let sealed = token::seal_content(&key, content)?;
        let (salt, password_verifier) = match password {
            Some(password) => {
                let salt: [u8; token::SALT_LEN] = rand::random();
                let verifier = token::derive_verifier_off_runtime(password, salt).await?;
                (Some(salt), Some(verifier))
            }
            None => (None, None),
        };
        let frame = Frame::CreateToken(CreateToken {
            request_id: self.request_id(),
            ttl_secs: u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX),
            content: Blob::from(sealed),
            password_verifier,
        });
        match self.request(frame).await.map_err(token::classify)? {
            Frame::TokenCreated(created) => Ok(TokenRef {
                id: created.token_id,
                key,
                salt,
            }),
            other => Err(token::classify(unexpected(other))),
        }
    }

    /// Fetches and opens the token `reference` names, as this identity (use
    /// a [`crate::TokenFetcher`] to fetch without one). A wrong `password`
    /// counts against the token's limit; after too many it is locked.
    pub async fn get_token(
        &self,
        reference: &TokenRef,
        password: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let password_verifier = token::verifier_for(reference, password).await?;
        let frame = Frame::GetToken(GetToken {
            request_id: self.request_id(),
            token_id: reference.id,
            password_verifier,
        });
        match self.request(frame).await.map_err(token::classify)? {
            Frame::TokenContent(content) => {
                Ok(token::open_content(&reference.key, &content.content.0)?)
            }
            other => Err(token::classify(unexpected(other))),
        }
    }

    /// Deletes a token this identity created. A token that does not exist,
    /// expired, or belongs to someone else fails alike with
    /// [`token::TokenError::NotFound`].
    pub async fn delete_token(&self, id: &TokenId) -> Result<(), ClientError> {
        self.expect_done(Frame::DeleteToken(DeleteToken {
            request_id: self.request_id(),
            token_id: *id,
        }))
        .await
        .map_err(token::classify)
    }

    /// The live connection, waiting (up to the request timeout) while the
    /// client reconnects.
    async fn live_connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut current = self.connection.clone();
        let wait = current.wait_for(|connection| {
            connection
                .as_ref()
                .is_some_and(|connection| connection.close_reason().is_none())
        });
        match tokio::time::timeout(self.options.request_timeout, wait).await {
            Ok(Ok(connection)) => Ok(connection.clone().expect("waited for a connection")),
            Ok(Err(_)) => Err(stopped(&self.closed, "client stopped")),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Announces a file of `size` sealed bytes hashing to `content_hash`,
    /// downloadable with the secret hashing to `secret_hash`. The low-level
    /// half of [`Client::put_file`], for callers that seal files themselves.
    pub async fn create_file(
        &self,
        size: u64,
        content_hash: ContentHash,
        secret_hash: backbone_protocol::bytes::FileSecretHash,
        ttl: Duration,
    ) -> Result<FileCreated, ClientError> {
        let frame = Frame::CreateFile(CreateFile {
            request_id: self.request_id(),
            size,
            content_hash,
            secret_hash,
            ttl_secs: u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX),
        });
        match self.request(frame).await? {
            Frame::FileCreated(created) => Ok(created),
            other => Err(unexpected(other)),
        }
    }

    /// How much of one of this identity's files the broker holds.
    pub async fn file_status(&self, id: &FileId) -> Result<FileState, ClientError> {
        let frame = Frame::FileStatus(FileStatus {
            request_id: self.request_id(),
            file_id: *id,
        });
        match self.request(frame).await? {
            Frame::FileState(state) => Ok(state),
            other => Err(unexpected(other)),
        }
    }

    /// Uploads sealed `bytes` of a file at `offset` (which must be where the
    /// broker's copy ends) on a stream of their own. The low-level half of
    /// [`Client::put_file`].
    pub async fn upload_file_part(
        &self,
        id: &FileId,
        offset: u64,
        bytes: &[u8],
    ) -> Result<FileState, ClientError> {
        let connection = self.live_connection().await?;
        file::upload_bytes(&connection, self.request_id(), *id, offset, bytes).await
    }

    /// Encrypts the file `source` under a fresh key, uploads it for `ttl`
    /// (capped by the broker) and returns the reference to share, inside a
    /// message, with whoever should download it.
    ///
    /// The upload resumes where the broker's copy ends whenever the
    /// connection breaks, so a file arrives whole across reconnects. If the
    /// source changes during the upload, the file announced is deleted
    /// (best effort; it expires anyway) and the new content goes up as a
    /// new file under a fresh key and secret, whose reference is returned:
    /// resuming under the old key would encrypt different content with the
    /// same key and nonces. A source that keeps changing fails with
    /// `SourceChanged` after three files. Fails with `FileTooLarge` above
    /// the broker's size limit and `QuotaExceeded` over this identity's
    /// file quota.
    pub async fn put_file(
        &self,
        source: FileSource,
        ttl: Duration,
    ) -> Result<FileRef, ClientError> {
        const FILES: u32 = 3;
        for _ in 0..FILES {
            let (reference, mut upload) = match self.announce(source.clone(), ttl).await {
                Ok(announced) => announced,
                // It shrank while it was read; nothing was created yet.
                Err(ClientError::SourceChanged) => continue,
                Err(error) => return Err(error),
            };
            match self.resume_upload(&reference, &mut upload).await {
                Ok(()) => return Ok(reference),
                Err(ClientError::SourceChanged) => {
                    debug!("the source changed during the upload; uploading it as a new file");
                    // Deleted before the next file is created, so that the
                    // abandoned one does not count against the quota.
                    if let Err(error) = self.delete_file(&reference.id).await {
                        debug!(%error, "the abandoned file could not be deleted; it expires");
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::SourceChanged)
    }

    /// The first half of [`Client::put_file`]: seals `source` under a fresh
    /// key to hash it, and creates the file at the broker without uploading
    /// anything. [`Client::resume_file_upload`] with the same, unchanged
    /// source uploads it, in this process or a later one.
    pub async fn announce_file(
        &self,
        source: FileSource,
        ttl: Duration,
    ) -> Result<FileRef, ClientError> {
        Ok(self.announce(source, ttl).await?.0)
    }

    /// Announces `source` under a fresh key and secret; returns its
    /// reference and the source bound to the content announced.
    async fn announce(
        &self,
        source: FileSource,
        ttl: Duration,
    ) -> Result<(FileRef, file::UploadSource), ClientError> {
        let key: [u8; file::KEY_LEN] = rand::random();
        let secret = FileSecret::random();
        let plain = file::PlainReader::open(source).await?;
        let (upload, content_hash) = file::UploadSource::announce(plain, key).await?;
        let created = self
            .create_file(upload.sealed_len(), content_hash, secret.hash(), ttl)
            .await?;
        let reference = FileRef {
            id: created.file_id,
            secret,
            key,
        };
        Ok((reference, upload))
    }

    /// Finishes uploading a file created earlier (by [`Client::put_file`]
    /// in a process that stopped, say) from the same `source`: uploads what
    /// the broker lacks, from where its copy ends. Sealing is deterministic
    /// for the reference's key, so only the missing bytes travel.
    ///
    /// The source is read once in full first and must seal to the size and
    /// content hash the file was announced with; each chunk is checked
    /// again as it is sent. A source that changed fails with
    /// [`ClientError::SourceChanged`] (also for a file already complete),
    /// and nothing sealed from it is sent: upload it anew as a new file.
    pub async fn resume_file_upload(
        &self,
        reference: &FileRef,
        source: FileSource,
    ) -> Result<(), ClientError> {
        let plain = file::PlainReader::open(source).await?;
        let mut upload = file::UploadSource::resumed(plain, reference.key);
        self.resume_upload(reference, &mut upload).await
    }

    /// Uploads what the broker lacks of `reference`'s file from `upload`,
    /// retrying after broken connections until it is complete.
    async fn resume_upload(
        &self,
        reference: &FileRef,
        upload: &mut file::UploadSource,
    ) -> Result<(), ClientError> {
        const ATTEMPTS: u32 = 30;
        let mut last_error = None;
        let mut started_over = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(self.options.backoff.delay(attempt.min(4))).await;
            }
            let state = match self.file_status(&reference.id).await {
                Ok(state) => state,
                Err(error) if error.is_retryable() => {
                    last_error = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            // Before the complete check, so that a resume with a changed
            // source is refused even when there is nothing left to send.
            let mut source = upload.bind(&state).await?;
            if state.complete {
                return Ok(());
            }
            let connection = match self.live_connection().await {
                Ok(connection) => connection,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            let uploaded = file::upload_sealed(
                &connection,
                self.request_id(),
                reference.id,
                state.received,
                &mut source,
            )
            .await;
            match uploaded {
                Ok(state) if state.complete => return Ok(()),
                // Part of it arrived: ask where to go on.
                Ok(_) => continue,
                // The broker's copy did not match the content hash and it
                // discarded everything. Every chunk sent was checked against
                // the announced one, so its copy was damaged (a crash can
                // tear the tail of what it held, or an earlier client sent
                // other bytes): sending the same sealed bytes again from
                // byte 0 reveals nothing new. Once: a second mismatch is the
                // broker's fault and fails.
                Err(error)
                    if !started_over
                        && error.code() == Some(backbone_protocol::ErrorCode::ContentMismatch) =>
                {
                    debug!("the broker's copy did not match; uploading again from byte 0");
                    started_over = true;
                }
                // A stream of the broken connection may still hold the
                // upload for a moment.
                Err(error)
                    if error.is_retryable()
                        || error.code() == Some(backbone_protocol::ErrorCode::InvalidOffset) =>
                {
                    debug!(%error, "file upload interrupted; resuming");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or(ClientError::Timeout))
    }

    /// Downloads and opens the file `reference` names, writing its
    /// plaintext to `sink`. Downloads on this client's connection, or, when
    /// the file lives on another node of the fleet, on an anonymous
    /// connection to that node. A broken download resumes at the last whole
    /// chunk; nothing unverified reaches `sink`.
    pub async fn get_file<W: AsyncWrite + Unpin>(
        &self,
        reference: &FileRef,
        sink: &mut W,
    ) -> Result<(), ClientError> {
        const ATTEMPTS: u32 = 10;
        let mut opener = None;
        let mut last_error = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(self.options.backoff.delay(attempt.min(4))).await;
            }
            let connection = match self.live_connection().await {
                Ok(connection) => connection,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            match file::download(&connection, self.request_id(), reference, &mut opener, sink).await
            {
                Ok(file::Fetched::Done) => return Ok(()),
                Ok(file::Fetched::Redirect(node)) => {
                    let mut connect = self.options.connect.clone();
                    connect.server = node;
                    return FileFetcher::new(connect).get(reference, sink).await;
                }
                Err(error) if error.is_retryable() => last_error = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or(ClientError::Timeout))
    }

    /// Deletes one of this identity's files, its bytes included.
    pub async fn delete_file(&self, id: &FileId) -> Result<(), ClientError> {
        self.expect_done(Frame::DeleteFile(DeleteFile {
            request_id: self.request_id(),
            file_id: *id,
        }))
        .await
    }

    /// The next pushed envelope, still sealed; `None` once the client stopped.
    pub async fn next_delivery(&self) -> Option<Delivery> {
        self.deliveries.lock().await.recv().await
    }

    /// The next pushed envelope as an [`Event`]: a message, opened and
    /// verified, or a broker notice, or an unreadable delivery. `None` once
    /// the client stopped.
    pub async fn next_event(&self) -> Option<Event> {
        let delivery = self.next_delivery().await?;
        if let Some(notice) = delivery.notice() {
            return Some(match notice {
                Ok(notice) => Event::Notice(delivery, notice),
                Err(error) => Event::Unreadable(delivery, Arc::new(error)),
            });
        }
        Some(match self.open(delivery) {
            Ok(message) => Event::Message(message),
            Err((delivery, error)) => Event::Unreadable(delivery, Arc::new(error)),
        })
    }

    /// The next pushed envelope, opened and verified. A tampered or
    /// mis-addressed envelope is an `Err`, and so is a broker notice
    /// (`ClientError::Protocol`; use [`Client::next_event`] to receive
    /// notices); the caller decides whether to ack it.
    pub async fn next_message(&self) -> Option<Result<Message, (Delivery, ClientError)>> {
        let delivery = self.next_delivery().await?;
        if delivery.notice().is_some() {
            return Some(Err((
                delivery,
                ClientError::Protocol(
                    "a broker notice, not a message (receive notices with next_event)".into(),
                ),
            )));
        }
        Some(self.open(delivery))
    }

    // The shape `next_message` has always returned, in a private helper.
    #[allow(clippy::result_large_err)]
    fn open(&self, delivery: Delivery) -> Result<Message, (Delivery, ClientError)> {
        let Some(encryption) = &self.options.encryption else {
            return Err((
                delivery,
                ClientError::Protocol("opening needs the encryption key".into()),
            ));
        };
        // The broker authenticated the sender; the signature inside must
        // agree. A sealed delivery has no broker-side sender: the signature
        // alone names and verifies it.
        let opened = match delivery.sender {
            Some(sender) => {
                envelope::open_expecting(&self.address, encryption, &delivery.envelope, &sender)
            }
            None => envelope::open(&self.address, encryption, &delivery.envelope),
        };
        match opened {
            Ok(opened) => Ok(Message { delivery, opened }),
            Err(error) => Err((delivery, error.into())),
        }
    }

    /// Sets this identity's inbound policy: under `RelationshipsOnly` the
    /// broker refuses envelopes from identities without an active
    /// relationship (`NotConsented`); sealed sends with a registered
    /// capability still arrive.
    pub async fn set_inbound_policy(&self, policy: InboundPolicy) -> Result<(), ClientError> {
        self.expect_done(Frame::SetInboundPolicy(SetInboundPolicy {
            request_id: self.request_id(),
            policy,
        }))
        .await
    }

    /// Asks `owner` for a relationship, presenting the delivery capability
    /// from its template. `intro` is sealed to the owner's verified card and
    /// signed, like a message; the owner's devices get it in the request's
    /// notice (see [`Client::open_intro`]). Returns this side's record, `Pending`.
    pub async fn request_relationship(
        &self,
        owner: &Address,
        capability: &DeliveryCapability,
        intro: &[u8],
    ) -> Result<Relationship, ClientError> {
        let identity = self.options.identity.as_ref().ok_or(ClientError::Protocol(
            "requesting a relationship needs the identity key".into(),
        ))?;
        let key = self.fetch_card(owner).await?.encryption_key;
        let sealed = envelope::seal_with(
            identity,
            &[(*owner, key)],
            intro,
            backbone_protocol::unix_millis_now(),
            self.options.padding,
        )?;
        self.relationship_request(Frame::RequestRelationship(RequestRelationship {
            request_id: self.request_id(),
            owner: *owner,
            capability: *capability,
            intro: Blob::from(sealed),
        }))
        .await
    }

    /// Publishes a relationship template: registers a fresh delivery
    /// capability with this identity's mailbox and stores it, with this
    /// identity's address, in a token (see [`crate::template`]). Share the
    /// returned reference; whoever holds it can ask for a relationship
    /// ([`Client::request_relationship_with_template`]) until the token
    /// expires. Revoke the capability to retire the template for good.
    pub async fn create_relationship_template(
        &self,
        ttl: Duration,
        password: Option<&str>,
    ) -> Result<(TokenRef, DeliveryCapability), ClientError> {
        let capability = DeliveryCapability::random();
        self.register_capability(&capability).await?;
        let template = crate::template::RelationshipTemplate {
            owner: self.address,
            capability,
        };
        let reference = self
            .create_token(&template.to_bytes(), ttl, password)
            .await?;
        Ok((reference, capability))
    }

    /// Fetches the template `reference` names and asks its owner for a
    /// relationship, with `intro` sealed to the owner.
    pub async fn request_relationship_with_template(
        &self,
        reference: &TokenRef,
        password: Option<&str>,
        intro: &[u8],
    ) -> Result<Relationship, ClientError> {
        let content = self.get_token(reference, password).await?;
        let template = crate::template::RelationshipTemplate::from_bytes(&content)
            .map_err(|error| ClientError::Protocol(error.to_string()))?;
        self.request_relationship(&template.owner, &template.capability, intro)
            .await
    }

    /// Opens the introduction of a relationship request notice about
    /// `requester`, verifying that the requester signed it.
    pub fn open_intro(&self, requester: &Address, intro: &[u8]) -> Result<Opened, ClientError> {
        let encryption = self
            .options
            .encryption
            .as_ref()
            .ok_or(ClientError::Protocol(
                "opening needs the encryption key".into(),
            ))?;
        Ok(envelope::open_expecting(
            &self.address,
            encryption,
            intro,
            requester,
        )?)
    }

    /// Accepts, rejects or terminates the relationship with `peer`; returns
    /// this side's record afterwards. Both sides' devices get a notice.
    pub async fn decide_relationship(
        &self,
        peer: &Address,
        decision: Decision,
    ) -> Result<Relationship, ClientError> {
        self.relationship_request(Frame::DecideRelationship(DecideRelationship {
            request_id: self.request_id(),
            peer: *peer,
            decision,
        }))
        .await
    }

    async fn relationship_request(&self, frame: Frame) -> Result<Relationship, ClientError> {
        match self.request(frame).await? {
            Frame::RelationshipChanged(changed) => Ok(changed.relationship),
            other => Err(unexpected(other)),
        }
    }

    /// This identity's inbound policy and its side of every relationship.
    pub async fn relationships(&self) -> Result<(InboundPolicy, Vec<Relationship>), ClientError> {
        match self
            .request(Frame::ListRelationships(ListRelationships {
                request_id: self.request_id(),
            }))
            .await?
        {
            Frame::Relationships(list) => Ok((list.policy, list.relationships)),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledges every delivery up to and including `seq` (cumulative).
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        if self.commands.is_closed() {
            return Err(stopped(&self.closed, "client stopped"));
        }
        self.acks.ack(seq, self.options.acks.every);
        Ok(())
    }

    /// Deletes envelopes from this identity's mailbox (for all its devices).
    pub async fn delete(&self, seqs: Vec<u64>) -> Result<(), ClientError> {
        self.expect_done(Frame::Delete(Delete {
            request_id: self.request_id(),
            seqs,
        }))
        .await
    }

    /// Asks the broker to delete this identity after its grace period;
    /// returns when (Unix ms). Until then the identity works as before and
    /// [`Client::cancel_deletion`] cancels. Then the broker deletes
    /// everything it stores for the identity (messages, devices, card,
    /// capabilities, tokens, relationships), tells the peers of its pending
    /// and active relationships, closes its connections with
    /// `IdentityDeleted`, and never lets this key authenticate again.
    /// Asking again while a deletion is scheduled answers the same time.
    pub async fn delete_identity(&self) -> Result<u64, ClientError> {
        match self
            .request(Frame::DeleteIdentity(DeleteIdentity {
                request_id: self.request_id(),
            }))
            .await?
        {
            Frame::DeletionScheduled(scheduled) => Ok(scheduled.purge_at_ms),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels this identity's scheduled deletion. Fails with `NotFound`
    /// when none is scheduled.
    pub async fn cancel_deletion(&self) -> Result<(), ClientError> {
        self.expect_done(Frame::CancelDeletion(CancelDeletion {
            request_id: self.request_id(),
        }))
        .await
    }
}

async fn connect_following_redirects(
    config: &ConnectConfig,
    credentials: &Credentials,
) -> Result<(RawConnection, backbone_protocol::frame::AuthOk), ClientError> {
    let mut config = config.clone();
    for _ in 0..4 {
        let mut connection = RawConnection::connect(&config).await?;
        match connection.authenticate(credentials).await {
            Ok(ok) => return Ok((connection, ok)),
            Err(ClientError::Redirect(node)) => {
                debug!(%node, "following redirect");
                // An explicit `server_name` applies to every node; without
                // one, the name comes from the new node's host.
                config.server = node;
            }
            Err(error) => return Err(error),
        }
    }
    Err(ClientError::Protocol("too many redirects".into()))
}

/// Whether a persistent client stops reconnecting after `error`: only when
/// trying again cannot help, because the broker refused this identity or
/// device (or deleted the identity), or its certificate is not the one
/// trusted. A broker that is
/// starting, stopping or crashing can fail a handshake in many other ways
/// (a stream closed mid-handshake, an unexpected frame, an error code that
/// is final for a single request): those are retried with backoff, or one
/// restart would silence a device for good.
fn gives_up_on(error: &ClientError) -> bool {
    match error {
        ClientError::CertificateMismatch(_) | ClientError::InvalidFingerprint(_) => true,
        ClientError::Server { code, .. } | ClientError::Closed { code, .. } => matches!(
            backbone_protocol::ErrorCode::from_u16(*code),
            Some(
                backbone_protocol::ErrorCode::AuthFailed
                    | backbone_protocol::ErrorCode::DeviceNotRegistered
                    | backbone_protocol::ErrorCode::InvalidCertificate
                    | backbone_protocol::ErrorCode::UnsupportedVersion
                    | backbone_protocol::ErrorCode::IdentityDeleted
            )
        ),
        _ => false,
    }
}

async fn connection_loop(
    options: ClientOptions,
    first: RawConnection,
    mut from_client: FromClient,
    deliveries: mpsc::Sender<Delivery>,
    status: watch::Sender<Status>,
    current: watch::Sender<Option<quinn::Connection>>,
    closed: Closed,
) {
    let mut connection = Some(first);
    let mut last_delivered = 0u64;
    let mut attempt = 0u32;
    loop {
        let raw = match connection.take() {
            Some(raw) => raw,
            None => {
                let _ = status.send(Status::Reconnecting);
                tokio::time::sleep(options.backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
                match connect_following_redirects(&options.connect, &options.credentials).await {
                    Ok((raw, _)) => raw,
                    Err(error) if !gives_up_on(&error) => {
                        debug!(%error, "reconnect failed; retrying");
                        continue;
                    }
                    Err(error) => {
                        warn!(%error, "reconnect failed for good");
                        remember_close(&closed, &error);
                        let _ = status.send(Status::Stopped(error.to_string()));
                        return;
                    }
                }
            }
        };
        attempt = 0;
        let _ = status.send(Status::Connected);
        let _ = current.send(Some(raw.connection().clone()));
        let outcome = run_connection(
            raw,
            options.acks,
            &mut from_client,
            &deliveries,
            &mut last_delivered,
        )
        .await;
        let _ = current.send(None);
        match outcome {
            Outcome::ClientDropped => return,
            // The broker ended the session for good (the identity was deleted).
            Outcome::Lost(error) if gives_up_on(&error) => {
                warn!(%error, "the broker closed the connection for good");
                remember_close(&closed, &error);
                let _ = status.send(Status::Stopped(error.to_string()));
                return;
            }
            Outcome::Lost(error) => debug!(%error, "connection lost; reconnecting"),
        }
    }
}

/// Keeps the broker's code and reason of a final refusal or close, so the
/// requests that come after it fail with them too.
fn remember_close(closed: &Closed, error: &ClientError) {
    match error {
        ClientError::Closed { code, reason } => {
            let _ = closed.set((*code, reason.clone()));
        }
        ClientError::Server { code, message, .. } => {
            let _ = closed.set((*code, message.clone()));
        }
        _ => {}
    }
}

/// What the application hands the connection task: requests, and acks.
struct FromClient {
    commands: mpsc::Receiver<Command>,
    acks: Arc<SharedAcks>,
}

enum Outcome {
    ClientDropped,
    Lost(ClientError),
}

async fn run_connection(
    raw: RawConnection,
    ack_policy: AckPolicy,
    from_client: &mut FromClient,
    deliveries: &mpsc::Sender<Delivery>,
    last_delivered: &mut u64,
) -> Outcome {
    let FromClient {
        commands,
        acks: shared_acks,
    } = from_client;
    let (connection, _endpoint, mut send, mut recv, mut buffer) = raw.into_parts();
    let pending: Pending = Arc::default();
    // The ack of the previous connection may have been lost with it: the
    // highest the application made goes first.
    let mut out = Vec::new();
    let _ = shared_acks.take_in();
    let last_acked = shared_acks.seen.load(Ordering::SeqCst);
    shared_acks.wrote(last_acked);
    if last_acked > 0 {
        let _ = backbone_protocol::codec::encode_frame(
            &Frame::Ack(Ack {
                up_to_seq: last_acked,
            }),
            &mut out,
        );
    }
    let delivered = Arc::new(AtomicU64::new(*last_delivered));
    let reader = {
        let (pending, deliveries, delivered) =
            (pending.clone(), deliveries.clone(), delivered.clone());
        tokio::spawn(async move {
            loop {
                loop {
                    match buffer.next_frame(backbone_protocol::codec::Phase::Any) {
                        Ok(Some(frame)) => {
                            if !dispatch(frame, &pending, &deliveries, &delivered).await {
                                return ClientError::Disconnected("client stopped".into());
                            }
                        }
                        Ok(None) => break,
                        Err(error) => return ClientError::Protocol(error.to_string()),
                    }
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => buffer.extend(&chunk.bytes),
                    Ok(None) => return ClientError::Disconnected("stream finished".into()),
                    // Keep the broker's close code: some end the session for good.
                    Err(quinn::ReadError::ConnectionLost(error)) => {
                        return ClientError::from_connection(error, "broker");
                    }
                    Err(error) => return ClientError::Disconnected(error.to_string()),
                }
            }
        })
    };
    tokio::pin!(reader);
    // The ack written above (if any) is the last the application made.
    let mut acks = PendingAck::new(ack_policy, last_acked);
    let ack_timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(ack_timer);
    let mut ack_timer_at = None;
    let outcome = loop {
        if let Some(seq) = shared_acks.take_in() {
            acks.record(seq, tokio::time::Instant::now());
        }
        if let Some(seq) = acks.take(tokio::time::Instant::now(), !out.is_empty()) {
            let _ = backbone_protocol::codec::encode_frame(
                &Frame::Ack(Ack { up_to_seq: seq }),
                &mut out,
            );
            shared_acks.wrote(seq);
        }
        if !out.is_empty() {
            match send.write_all(&out).await {
                Ok(()) => {}
                // Keep the broker's close code, as the reader does.
                Err(quinn::WriteError::ConnectionLost(error)) => {
                    break Outcome::Lost(ClientError::from_connection(error, "broker"));
                }
                Err(error) => break Outcome::Lost(ClientError::Disconnected(error.to_string())),
            }
            out.clear();
        }
        if let Some(due) = acks.due
            && ack_timer_at != Some(due)
        {
            ack_timer.as_mut().reset(due);
            ack_timer_at = Some(due);
        }
        // An ack that came since it was taken in above may have counted on
        // this task to look again (see `SharedAcks::ack`).
        if shared_acks.more() {
            continue;
        }
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else {
                    // Acks still gathering go out before the connection closes.
                    if let Some(seq) = shared_acks.take_in() {
                        acks.record(seq, tokio::time::Instant::now());
                    }
                    if let Some(seq) = acks.take(tokio::time::Instant::now(), true) {
                        let mut last = Vec::new();
                        let _ = backbone_protocol::codec::encode_frame(&Frame::Ack(Ack { up_to_seq: seq }), &mut last);
                        let _ = send.write_all(&last).await;
                    }
                    break Outcome::ClientDropped;
                };
                queue(command, &pending, &mut out);
                while out.len() < 256 * 1024 {
                    match commands.try_recv() {
                        Ok(command) => queue(command, &pending, &mut out),
                        Err(_) => break,
                    }
                }
            }
            // Taken in at the top of the loop.
            () = shared_acks.wake.notified() => {}
            () = &mut ack_timer, if acks.due.is_some() => {
                ack_timer_at = None;
            }
            error = &mut reader => {
                break Outcome::Lost(error.unwrap_or_else(|e| ClientError::Disconnected(e.to_string())));
            }
        }
    };
    // A loss seen first as a finished stream or a failed write may still
    // come from the broker closing the connection: keep its code then.
    let outcome = match outcome {
        Outcome::Lost(ClientError::Disconnected(lost)) => {
            match crate::transport::close_reason_soon(&connection).await {
                Some(reason) => Outcome::Lost(ClientError::from_connection(reason, "broker")),
                None => Outcome::Lost(ClientError::Disconnected(lost)),
            }
        }
        outcome => outcome,
    };
    *last_delivered = delivered.load(Ordering::Acquire);
    reader.abort();
    // Requests in flight when the broker ended the session for good fail
    // with its code; others are lost with the connection (and retried by
    // their callers as they see fit).
    let lost = || match &outcome {
        Outcome::Lost(error @ ClientError::Closed { code, reason }) if gives_up_on(error) => {
            ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            }
        }
        _ => ClientError::Disconnected("connection lost".into()),
    };
    for (_, reply) in pending.lock().expect("pending lock").drain() {
        let _ = reply.send(Err(lost()));
    }
    connection.close(quinn::VarInt::from_u32(0), b"");
    outcome
}

fn queue(command: Command, pending: &Pending, out: &mut Vec<u8>) {
    let Command::Request { frame, reply } = command;
    if let Some(id) = frame.request_id() {
        pending.lock().expect("pending lock").insert(id, reply);
    }
    if let Err(error) = backbone_protocol::codec::encode_frame(&frame, out) {
        warn!(%error, "cannot encode a request");
    }
}

/// Routes one frame from the broker; `false` when the client is gone.
async fn dispatch(
    frame: Frame,
    pending: &Pending,
    deliveries: &mpsc::Sender<Delivery>,
    delivered: &AtomicU64,
) -> bool {
    if let Frame::Deliver(deliver) = frame {
        // After a reconnect the broker resends from the persisted cursor;
        // what this client already handed out is not handed out twice.
        if deliver.seq <= delivered.load(Ordering::Acquire) {
            return true;
        }
        let seq = deliver.seq;
        let delivery = Delivery {
            seq: deliver.seq,
            message_id: deliver.message_id,
            sender: deliver.sender,
            stored_at_ms: deliver.stored_at_ms,
            expires_at_ms: deliver.expires_at_ms,
            envelope: deliver.envelope.0,
        };
        // Counted as handed out only once it is: the connection's end
        // aborts this task, possibly while it waits for room in the
        // channel, and a delivery dropped then must not be skipped as a
        // repeat when the broker sends it again.
        if deliveries.send(delivery).await.is_err() {
            return false;
        }
        delivered.store(seq, Ordering::Release);
        return true;
    }
    if let Frame::Ping(ping) = frame {
        debug!(nonce = ping.nonce, "ping from broker");
        return true;
    }
    match frame.answer_id() {
        Some(id) if id != 0 => {
            if let Some(reply) = pending.lock().expect("pending lock").remove(&id) {
                let _ = reply.send(Ok(frame));
            }
        }
        _ => {
            if let Frame::Error(error) = frame {
                warn!(code = error.code, message = %error.message, "broker reported a connection error");
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use backbone_protocol::ErrorCode;

    use super::*;

    fn server(code: ErrorCode) -> ClientError {
        ClientError::server(code as u16, String::new(), None)
    }

    #[test]
    fn a_persistent_client_gives_up_only_when_retrying_cannot_help() {
        for error in [
            ClientError::CertificateMismatch("other certificate".into()),
            ClientError::InvalidFingerprint("xyz".into()),
            server(ErrorCode::AuthFailed),
            server(ErrorCode::DeviceNotRegistered),
            server(ErrorCode::InvalidCertificate),
            server(ErrorCode::UnsupportedVersion),
            server(ErrorCode::IdentityDeleted),
            ClientError::Closed {
                code: ErrorCode::IdentityDeleted as u16,
                reason: "this identity was deleted".into(),
            },
        ] {
            assert!(gives_up_on(&error), "{error}");
        }
        // What a broker that is starting, stopping or crashing can cause.
        for error in [
            ClientError::Protocol("unexpected Pong frame".into()),
            ClientError::Tls("TLS exporter unavailable".into()),
            ClientError::Disconnected("stream closed".into()),
            ClientError::Unreachable("timed out".into()),
            ClientError::Timeout,
            ClientError::Redirect("10.0.0.2:7700".into()),
            server(ErrorCode::ChallengeExpired),
            server(ErrorCode::ShuttingDown),
            server(ErrorCode::Internal),
            ClientError::Closed {
                code: u16::MAX,
                reason: "unknown".into(),
            },
        ] {
            assert!(!gives_up_on(&error), "{error}");
        }
    }

    #[test]
    fn an_ack_wakes_the_connection_task_only_when_it_has_something_to_do() {
        use std::future::Future;
        fn woken(acks: &SharedAcks) -> bool {
            let wait = std::pin::pin!(acks.wake.notified());
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            wait.poll(&mut context).is_ready()
        }
        let acks = SharedAcks::default();
        acks.ack(1, 32);
        assert!(woken(&acks), "the first ack arms the task's timer");
        assert_eq!(acks.take_in(), Some(1));
        for seq in 2..=31 {
            acks.ack(seq, 32);
        }
        assert!(!woken(&acks), "gathered while the timer runs");
        assert!(acks.more(), "the task looks again before it waits");
        acks.ack(32, 32);
        assert!(woken(&acks), "32 past what was written: written at once");
        assert_eq!(acks.take_in(), Some(32));
        assert_eq!(acks.take_in(), None, "taken in once");
        assert!(!acks.more());
        acks.wrote(32);
        acks.ack(20, 32);
        assert!(!woken(&acks), "an older ack changes nothing");
        acks.ack(33, 32);
        assert!(woken(&acks), "the first past what was written");
    }

    #[test]
    fn acks_fold_until_their_delay_their_count_or_another_write() {
        let policy = AckPolicy {
            delay: Duration::from_millis(10),
            every: 4,
        };
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut acks = PendingAck::new(policy, 5);
        assert_eq!(acks.take(at(0), true), None, "nothing past what was sent");

        // Folded until the delay since the first one passes.
        acks.record(6, at(0));
        acks.record(7, at(3));
        assert_eq!(acks.due, Some(at(10)), "the first ack sets the deadline");
        assert_eq!(acks.take(at(9), false), None);
        assert_eq!(acks.take(at(10), false), Some(7));
        assert_eq!(acks.due, None);
        assert_eq!(acks.take(at(30), false), None, "sent once");

        // At `every` sequence numbers past the last sent, at once.
        acks.record(10, at(31));
        assert_eq!(acks.take(at(31), false), None, "3 past: waits");
        acks.record(11, at(32));
        assert_eq!(acks.take(at(32), false), Some(11), "4 past: goes");

        // With another write, whatever is pending rides along.
        acks.record(12, at(40));
        assert_eq!(acks.take(at(40), true), Some(12));

        // An older ack changes nothing; a zero delay sends each at once.
        acks.record(3, at(50));
        assert_eq!(acks.due, None);
        assert_eq!(acks.take(at(99), false), None);
        let mut at_once = PendingAck::new(
            AckPolicy {
                delay: Duration::ZERO,
                every: 32,
            },
            0,
        );
        at_once.record(1, at(0));
        assert_eq!(at_once.take(at(0), false), Some(1));
    }
}
