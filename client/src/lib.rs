//! Client library for the Backbone broker.
//!
//! Connect with a key, publish your card, send end-to-end encrypted messages
//! to addresses, and receive pushed messages on a persistent QUIC connection
//! that reconnects and resumes by itself.
//!
//! # Example
//!
//! Alice and Bob each generate an identity (a signing key, whose hash is the
//! address, and an encryption key), connect, and publish their cards; Alice
//! then sends Bob a message, which only Bob's key can open.
//!
//! ```
//! use std::time::Duration;
//!
//! use backbone_client::envelope::EncryptionKeypair;
//! use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
//! use backbone_protocol::Keypair;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A real broker on a free port with a throw-away data dir; in real use
//! # // it runs elsewhere and `addr` and `cert` come from its operator.
//! # let dir = tempfile::tempdir()?;
//! # let mut config = backbone_broker::Config::default();
//! # config.server.listen = "127.0.0.1:0".parse()?;
//! # config.server.data_dir = dir.path().to_owned();
//! # config.metrics.listen = None;
//! # let broker = backbone_broker::Broker::start(config, Default::default()).await?;
//! # let addr = broker.quic_addr.to_string();
//! # let cert = broker.cert_path.clone();
//! // `addr` is the broker's `host:port`, `cert` the certificate file it serves.
//! let connect_config = || {
//!     let mut config = ConnectConfig::new(addr.clone(), Trust::CaFile(cert.clone()));
//!     // The broker's generated certificate is issued for `localhost`.
//!     config.server_name = Some("localhost".into());
//!     config
//! };
//!
//! let (alice_key, bob_key) = (Keypair::generate(), Keypair::generate());
//! let bob_address = bob_key.address();
//! let alice = Client::connect(ClientOptions::primary(
//!     connect_config(),
//!     alice_key,
//!     EncryptionKeypair::generate(),
//! ))
//! .await?;
//! let bob = Client::connect(ClientOptions::primary(
//!     connect_config(),
//!     bob_key,
//!     EncryptionKeypair::generate(),
//! ))
//! .await?;
//! // A card publishes an identity's encryption key, signed by its identity key;
//! // senders fetch and verify it to seal envelopes to that identity.
//! alice.publish_card().await?;
//! bob.publish_card().await?;
//!
//! let ttl = Duration::from_secs(3600);
//! alice.send(&[bob_address], b"hello", ttl).await?;
//!
//! let message = bob.next_message().await.expect("the client is running");
//! let message = message.map_err(|(_delivery, error)| error)?;
//! assert_eq!(message.opened.plaintext, b"hello");
//! assert_eq!(message.opened.sender, alice.address());
//! // Acks are cumulative and move this device's cursor: it is not sent again.
//! bob.ack(message.delivery.seq).await?;
//! # drop((alice, bob));
//! # broker.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Layout:
//! - [`client`]: the persistent [`Client`].
//! - [`transport`]: TLS trust, [`transport::RawConnection`] and the auth handshake.
//! - [`envelope`]: sealing and opening envelopes (HPKE + ChaCha20-Poly1305, ed25519).
//! - [`sealed`]: [`SealedSender`], an anonymous connection that sends sealed
//!   envelopes admitted by a [`DeliveryCapability`] the recipient handed out.
//! - [`token`]: tokens shared through a side channel: [`TokenRef`], content
//!   sealing, password verifiers, and [`TokenFetcher`] for anonymous fetches.
//! - [`keyfile`]: key files on disk.
//! - [`error`][]: [`ClientError`].

pub mod client;
pub mod envelope;
pub mod error;
pub mod file;
pub mod keyfile;
pub mod sealed;
pub mod template;
pub mod token;
pub mod transport;

pub use backbone_protocol::capability::{CapabilityHash, DeliveryCapability};
pub use client::{AckPolicy, Backoff, Client, ClientOptions, Delivery, Event, Message, Status};
pub use error::ClientError;
pub use file::{FileError, FileFetcher, FileRef, FileSource};
pub use sealed::{SealedOptions, SealedSender};
pub use template::RelationshipTemplate;
pub use token::{TokenError, TokenFetcher, TokenRef};
pub use transport::{ConnectConfig, Credentials, Trust};
