//! Client library for the Backbone broker.
//!
//! Connect with a key, publish your card, send end-to-end encrypted messages
//! to addresses, and receive pushed messages on a persistent QUIC connection
//! that reconnects and resumes by itself.
//!
//! Layout:
//! - [`client`]: the persistent [`Client`].
//! - [`transport`]: TLS trust, [`transport::RawConnection`] and the auth handshake.
//! - [`envelope`]: sealing and opening envelopes (HPKE + ChaCha20-Poly1305, ed25519).
//! - [`keyfile`]: key files on disk.
//! - [`error`][]: [`ClientError`].

pub mod client;
pub mod envelope;
pub mod error;
pub mod keyfile;
pub mod transport;

pub use client::{Backoff, Client, ClientOptions, Delivery, Message, Status};
pub use error::ClientError;
pub use transport::{ConnectConfig, Credentials, Trust};
