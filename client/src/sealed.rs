//! Sealed sending: envelopes the broker stores without knowing who sent them.
//!
//! A [`SealedSender`] holds an *anonymous* connection: it answers the
//! broker's challenge with `Anonymous` instead of `Auth`, so the broker never
//! learns which identity is on it. Each send presents a
//! [`DeliveryCapability`] the recipient handed to this sender beforehand (in
//! an end-to-end encrypted message), and the broker accepts the envelope only
//! if the recipient registered that capability's hash. The sender's identity
//! travels only inside the envelope: its key and signature are under the
//! encryption, so the recipient verifies who sent it and the broker stores no
//! sender.
//!
//! Sends on one connection are linkable to each other (and to the
//! connection's IP address and port). A sender that wants two sends to be
//! unlinkable uses a new [`SealedSender`] for each: every connection binds
//! its own UDP socket unless [`ConnectConfig::endpoint`] shares one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backbone_protocol::bytes::{Blob, DeliveryCapability};
use backbone_protocol::frame::{FetchCard, SealedSend, SendAck};
use backbone_protocol::{Address, Frame, IdentityCard, Keypair};
use tokio::sync::Mutex;

use crate::client::cache_verified_card;
use crate::envelope::{self, Padding};
use crate::error::ClientError;
use crate::transport::{ConnectConfig, RawConnection, unexpected};

/// What a [`SealedSender`] needs besides where to connect.
#[derive(Clone, Debug)]
pub struct SealedOptions {
    /// The identity that signs inside each envelope. It never reaches the
    /// broker: the connection is anonymous, and the key and signature are
    /// inside the envelope's encryption.
    pub identity: Keypair,
    /// How envelopes are padded (by default to powers of two from 256 bytes).
    pub padding: Padding,
    /// How long a request waits for its response.
    pub request_timeout: Duration,
}

impl SealedOptions {
    /// Defaults for `identity`.
    pub fn new(identity: Keypair) -> Self {
        Self {
            identity,
            padding: Padding::default(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// An anonymous connection that sends sealed envelopes. It does not
/// reconnect: a broken connection fails its requests, and the caller makes a
/// new sender (which is also a new, unlinkable connection).
pub struct SealedSender {
    options: SealedOptions,
    connection: Mutex<RawConnection>,
    next_request: AtomicU64,
    cards: std::sync::Mutex<HashMap<Address, IdentityCard>>,
}

impl SealedSender {
    /// Connects and opens an anonymous session.
    pub async fn connect(
        connect: ConnectConfig,
        options: SealedOptions,
    ) -> Result<SealedSender, ClientError> {
        let mut connection = RawConnection::connect(&connect).await?;
        connection.open_anonymous().await?;
        Ok(SealedSender {
            options,
            connection: Mutex::new(connection),
            next_request: AtomicU64::new(1),
            cards: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The address of the identity that signs inside the envelopes (never
    /// sent to the broker).
    pub fn address(&self) -> Address {
        self.options.identity.address()
    }

    /// Sends one request and waits for the response with its id; requests
    /// on one sender run one at a time.
    async fn request(&self, frame: Frame, id: u64) -> Result<Frame, ClientError> {
        let mut connection = self.connection.lock().await;
        let exchange = async {
            connection.send(&frame).await?;
            loop {
                match connection.recv().await? {
                    Frame::CardResult(result) if result.request_id == id => {
                        return Ok(Frame::CardResult(result));
                    }
                    Frame::SendAck(ack) if ack.request_id == id => return Ok(Frame::SendAck(ack)),
                    Frame::Error(error) if error.request_id == id || error.request_id == 0 => {
                        return Ok(Frame::Error(error));
                    }
                    // Pongs and answers to requests that timed out earlier.
                    _ => continue,
                }
            }
        };
        match tokio::time::timeout(self.options.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Fetches the card of `address` over the anonymous connection and
    /// verifies it belongs to that address; verified cards are cached.
    pub async fn fetch_card(&self, address: &Address) -> Result<IdentityCard, ClientError> {
        if let Some(card) = self.cards.lock().expect("card cache lock").get(address) {
            return Ok(*card);
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::FetchCard(FetchCard {
            request_id: id,
            address: *address,
        });
        let answer = self.request(frame, id).await?;
        cache_verified_card(&self.cards, address, answer)
    }

    /// Seals `plaintext` to `recipient`'s verified card, signed by this
    /// sender's identity, and sends it admitted by `capability`.
    ///
    /// The per-recipient outcome is in the [`SendAck`]: `stored`, or
    /// `failed` with `UnknownCapability` (not registered, or revoked),
    /// `RateLimited` (the capability's budget, with a retry-after),
    /// `QuotaExceeded` or `ShardUnavailable`.
    pub async fn send_sealed(
        &self,
        recipient: &Address,
        capability: &DeliveryCapability,
        plaintext: &[u8],
        ttl: Duration,
    ) -> Result<SendAck, ClientError> {
        let card = self.fetch_card(recipient).await?;
        let sealed = envelope::seal_with(
            &self.options.identity,
            &[(*recipient, card.encryption_key)],
            plaintext,
            backbone_protocol::unix_millis_now(),
            self.options.padding,
        )?;
        self.send_sealed_envelope(recipient, capability, sealed, ttl)
            .await
    }

    /// Sends already sealed bytes (no encryption here), admitted by `capability`.
    pub async fn send_sealed_envelope(
        &self,
        recipient: &Address,
        capability: &DeliveryCapability,
        envelope: Vec<u8>,
        ttl: Duration,
    ) -> Result<SendAck, ClientError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::SealedSend(SealedSend {
            request_id: id,
            ttl_secs: u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX),
            recipient: *recipient,
            capability: *capability,
            envelope: Blob::from(envelope),
        });
        match self.request(frame, id).await? {
            Frame::SendAck(ack) => Ok(ack),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.connection.into_inner().close().await;
    }
}
