//! The identity card: how a sender learns a recipient's encryption key.
//!
//! A card is self-certifying: it carries the identity's signing key, whose
//! blake3 hash must equal the address it was fetched for, and that key's
//! signature over the rest. The broker stores and serves cards but can only
//! withhold one, never forge one.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bytes::{EncryptionKey, Signature};
use crate::identity::{Address, Keypair, PublicKey, SignatureError, domain};

/// An identity's public card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityCard {
    /// The identity's ed25519 signing key; its blake3 hash is the address.
    pub signing_key: PublicKey,
    /// The X25519 key that envelopes to this identity are sealed to.
    pub encryption_key: EncryptionKey,
    /// Creation time, milliseconds since the Unix epoch. A newer card replaces an older one.
    pub created_at_ms: u64,
    /// The signing key's signature over [`IdentityCard::signed_bytes`].
    pub signature: Signature,
}

/// Why a card was rejected.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum CardError {
    /// The card's signing key does not hash to the address it was fetched for.
    #[error("card does not belong to the requested address")]
    AddressMismatch,
    /// The card's signature does not verify.
    #[error("card signature is invalid: {0}")]
    Signature(#[from] SignatureError),
}

impl IdentityCard {
    /// Creates and signs a card for `identity`.
    pub fn sign(identity: &Keypair, encryption_key: EncryptionKey, created_at_ms: u64) -> Self {
        let signing_key = identity.public();
        let signed = Self::signed_bytes(&signing_key, &encryption_key, created_at_ms);
        Self {
            signing_key,
            encryption_key,
            created_at_ms,
            signature: identity.sign(domain::IDENTITY_CARD, &signed),
        }
    }

    /// `signing_key || encryption_key || created_at_ms (u64 LE)`.
    pub fn signed_bytes(
        signing_key: &PublicKey,
        encryption_key: &EncryptionKey,
        created_at_ms: u64,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(72);
        out.extend_from_slice(signing_key.as_bytes());
        out.extend_from_slice(encryption_key.as_bytes());
        out.extend_from_slice(&created_at_ms.to_le_bytes());
        out
    }

    /// The address this card belongs to.
    pub fn address(&self) -> Address {
        self.signing_key.address()
    }

    /// Checks the card's own signature.
    pub fn verify_signature(&self) -> Result<(), CardError> {
        let signed =
            Self::signed_bytes(&self.signing_key, &self.encryption_key, self.created_at_ms);
        self.signing_key
            .verify(domain::IDENTITY_CARD, &signed, &self.signature)?;
        Ok(())
    }

    /// Checks that the card belongs to `address` and that its signature holds.
    pub fn verify(&self, address: &Address) -> Result<(), CardError> {
        if self.address() != *address {
            return Err(CardError::AddressMismatch);
        }
        self.verify_signature()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_verifies_for_its_own_address_only() {
        let identity = Keypair::from_secret_bytes([9; 32]);
        let card = IdentityCard::sign(&identity, EncryptionKey([5; 32]), 42);
        assert_eq!(card.verify(&identity.address()), Ok(()));
        let other = Keypair::from_secret_bytes([8; 32]).address();
        assert_eq!(card.verify(&other), Err(CardError::AddressMismatch));
    }

    #[test]
    fn a_forged_card_is_rejected() {
        let identity = Keypair::from_secret_bytes([9; 32]);
        let mut card = IdentityCard::sign(&identity, EncryptionKey([5; 32]), 42);
        // The broker swapping in its own encryption key breaks the signature.
        card.encryption_key = EncryptionKey([6; 32]);
        assert_eq!(
            card.verify(&identity.address()),
            Err(CardError::Signature(SignatureError::BadSignature))
        );
        // A card signed by another key but claiming this signing key fails too.
        let mallory = Keypair::from_secret_bytes([10; 32]);
        let mut stolen = IdentityCard::sign(&mallory, EncryptionKey([5; 32]), 42);
        stolen.signing_key = identity.public();
        assert!(stolen.verify(&identity.address()).is_err());
    }
}
