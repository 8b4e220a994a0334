//! The Backbone wire protocol, sans IO.
//!
//! This crate knows bytes, keys and signatures; it never touches a socket, a
//! runtime or a disk. Both the broker and the client build on it, and
//! `docs/protocol.md` is its specification.
//!
//! Layout:
//! - [`bytes`]: fixed-size byte newtypes (keys, signatures, ids) and [`bytes::Blob`].
//! - [`identity`]: key pairs, [`identity::Address`] with its checksummed text
//!   form, device certificates.
//! - [`card`]: the self-certifying [`card::IdentityCard`].
//! - [`capability`]: delivery capabilities for sealed sends and their hash.
//! - [`token`]: token ids in their creator's slot, password verifier hashes.
//! - [`auth`]: the bytes a device signs to answer an auth challenge.
//! - [`handshake`]: the broker's side of the auth handshake as a sans-IO
//!   state machine ([`handshake::ServerHandshake`]).
//! - [`frame`]: every frame on the wire and the stable [`frame::ErrorCode`]s.
//! - [`fleet`]: slots of the address space and the node-to-node frames.
//! - [`relationship`]: relationships, consent, the inbound policy and broker
//!   notices, as pure functions.
//! - [`deletion`]: the states of an identity's deletion and the tombstone.
//! - [`codec`]: framing and the single place that names the serialization
//!   library, with hard size limits.

pub mod auth;
pub mod bytes;
pub mod capability;
pub mod card;
pub mod codec;
pub mod deletion;
pub mod file;
pub mod fleet;
pub mod frame;
pub mod handshake;
pub mod identity;
pub mod relationship;
pub mod token;

pub use card::IdentityCard;
pub use codec::{DecodeError, Decoded, Phase};
pub use frame::{ErrorCode, Frame};
pub use identity::{Address, DeviceCertificate, DeviceId, Keypair, PublicKey};

/// The wire protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// The ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"backbone/1";

/// Current time as milliseconds since the Unix epoch.
///
/// A convenience for callers; protocol logic itself takes time as a parameter.
pub fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
