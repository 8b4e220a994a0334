//! Delivery capabilities for sealed sends.
//!
//! A recipient creates a [`DeliveryCapability`] (32 random bytes) on its own
//! device, hands it to one contact inside an end-to-end encrypted message,
//! and registers only its [`CapabilityHash`] with its mailbox. The contact
//! presents the capability with each `SealedSend` on an anonymous session;
//! the broker hashes it and accepts the envelope only if the recipient has
//! that hash registered. The broker therefore never learns which contact
//! holds which capability, and the recipient revokes one contact's access by
//! revoking one hash.
//!
//! The hash is `blake3::derive_key("backbone delivery capability v1",
//! capability)`: domain-separated from every other hash of the protocol, and
//! a one-way function, so the registered hashes the broker stores do not let
//! it (or whoever reads its disk) send as a contact.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

pub use crate::bytes::{CapabilityHash, DeliveryCapability};

/// The BLAKE3 key-derivation context of [`DeliveryCapability::hash`].
pub const CAPABILITY_HASH_CONTEXT: &str = "backbone delivery capability v1";

/// A capability or hash in text form is not 64 hex characters.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("expected 64 hex characters (32 bytes), got {len} characters")]
pub struct ParseCapabilityError {
    /// Characters in the rejected text, after trimming.
    pub len: usize,
}

fn parse_32(text: &str) -> Result<[u8; 32], ParseCapabilityError> {
    let text = text.trim();
    let error = ParseCapabilityError { len: text.len() };
    let bytes = hex::decode(text).map_err(|_| error.clone())?;
    bytes.try_into().map_err(|_| error)
}

impl DeliveryCapability {
    /// The hash registered with the recipient's mailbox.
    pub fn hash(&self) -> CapabilityHash {
        CapabilityHash(blake3::derive_key(CAPABILITY_HASH_CONTEXT, &self.0))
    }

    /// The secret as 64 lowercase hex characters, to hand to a contact.
    /// Deliberately a named method rather than `Display`, so the secret is
    /// never formatted by accident.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the form [`DeliveryCapability::to_hex`] writes.
    pub fn from_hex(text: &str) -> Result<Self, ParseCapabilityError> {
        parse_32(text).map(Self)
    }
}

impl fmt::Display for CapabilityHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for CapabilityHash {
    type Err = ParseCapabilityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_32(text).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // Changing the derivation orphans every registered capability; this
        // vector (also in docs/protocol.md) pins it.
        let capability = DeliveryCapability([0x66; 32]);
        assert_eq!(
            capability.hash().to_string(),
            "3c56b41e54fa2f9a5c3d7e917190e0e4a8c90bab55d6d311a17e17e1aa23e666"
        );
    }

    #[test]
    fn text_forms_round_trip_and_bad_text_is_refused() {
        let capability = DeliveryCapability::random();
        assert_eq!(
            DeliveryCapability::from_hex(&capability.to_hex()),
            Ok(capability)
        );
        let hash = capability.hash();
        assert_eq!(hash.to_string().parse(), Ok(hash));
        assert_eq!(
            "abc".parse::<CapabilityHash>(),
            Err(ParseCapabilityError { len: 3 })
        );
        assert_eq!(
            DeliveryCapability::from_hex(&"zz".repeat(32)),
            Err(ParseCapabilityError { len: 64 })
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let capability = DeliveryCapability([0xab; 32]);
        let shown = format!("{capability:?}");
        assert_eq!(shown, "DeliveryCapability(redacted)");
        assert!(!format!("{:?}", capability.hash()).contains("abab"));
    }
}
