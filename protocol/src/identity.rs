//! Identities, addresses, devices.
//!
//! An identity is an ed25519 key pair. Its [`Address`] is the blake3 hash of
//! the public key, so the broker can route by address without learning who
//! is behind it. A device holds its own key pair; a [`DeviceCertificate`] is
//! the identity's signature over the device's public key.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bytes::Signature;

/// Domain separation prefixes: every signature in the protocol signs
/// `domain || message`, so a signature made for one purpose never verifies
/// for another.
pub mod domain {
    /// Device certificates.
    pub const DEVICE_CERTIFICATE: &[u8] = b"backbone/v1/device-certificate\0";
    /// Identity cards.
    pub const IDENTITY_CARD: &[u8] = b"backbone/v1/identity-card\0";
    /// Auth challenge responses.
    pub const AUTH: &[u8] = b"backbone/v1/auth\0";
}

/// The text prefix of every address.
pub const ADDRESS_PREFIX: &str = "bb1";

/// An ed25519 public key as it travels on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

/// Errors from checking a signature.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum SignatureError {
    /// The 32 bytes are not a valid ed25519 point.
    #[error("public key is not a valid ed25519 key")]
    InvalidKey,
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
}

impl PublicKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The address of the identity whose signing key this is.
    pub fn address(&self) -> Address {
        Address(*blake3::hash(self.as_bytes()).as_bytes())
    }

    /// The device id of the device whose key this is.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(*blake3::hash(self.as_bytes()).as_bytes())
    }

    /// Checks `signature` over `domain || message`.
    pub fn verify(
        &self,
        domain: &[u8],
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        let key =
            VerifyingKey::from_bytes(self.as_bytes()).map_err(|_| SignatureError::InvalidKey)?;
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        key.verify_strict(&signed, &ed25519_dalek::Signature::from_bytes(&signature.0))
            .map_err(|_| SignatureError::BadSignature)
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.as_bytes()))
    }
}

/// An ed25519 key pair: an identity key or a device key.
///
/// The secret half never leaves the client; the type deliberately has no
/// `Debug` that would print it.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key pair from the operating system's secure random source.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed[..]);
        Self::from_secret_bytes(seed)
    }

    /// Rebuilds a key pair from its 32 secret bytes.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    /// The 32 secret bytes, for saving to a key file.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey::from(self.0.verifying_key().to_bytes())
    }

    /// The address of this key as an identity key.
    pub fn address(&self) -> Address {
        self.public().address()
    }

    /// Signs `domain || message`.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Signature {
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        Signature(self.0.sign(&signed).to_bytes())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair(public: {:?})", self.public())
    }
}

/// The pseudonymous address of an identity: `blake3(identity public key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address(pub [u8; 32]);

/// The id of one device of an identity: `blake3(device public key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 32]);

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for DeviceId {
    /// 64 lowercase hex characters: how people name a device to unregister it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A device id in text form is not 64 hex characters.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[error("a device id is 64 hex characters (32 bytes), got {len} characters")]
pub struct DeviceIdParseError {
    /// Characters in the rejected text, after trimming.
    pub len: usize,
}

impl FromStr for DeviceId {
    type Err = DeviceIdParseError;

    /// Parses the form `Display` writes, in either case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let error = DeviceIdParseError { len: text.len() };
        let bytes = hex::decode(text).map_err(|_| error.clone())?;
        bytes.try_into().map(DeviceId).map_err(|_| error)
    }
}

/// Why a text address was rejected.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum AddressParseError {
    /// The text does not start with `bb1`.
    #[error("address must start with \"{ADDRESS_PREFIX}\"")]
    WrongPrefix,
    /// A character outside the base32hex alphabet, or a bad length.
    #[error("address is not valid base32hex text of the right length")]
    BadEncoding,
    /// The checksum does not match: most likely a typo.
    #[error("address checksum does not match (mistyped address?)")]
    ChecksumMismatch,
}

impl Address {
    fn checksum(&self) -> [u8; 4] {
        let mut hasher = blake3::Hasher::new_derive_key("backbone address checksum v1");
        hasher.update(&self.0);
        let hash = hasher.finalize();
        let mut out = [0u8; 4];
        out.copy_from_slice(&hash.as_bytes()[..4]);
        out
    }
}

impl fmt::Display for Address {
    /// `bb1` followed by lowercase base32hex (RFC 4648, no padding) of the 32
    /// address bytes and a 4-byte checksum.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 36];
        raw[..32].copy_from_slice(&self.0);
        raw[32..].copy_from_slice(&self.checksum());
        write!(
            f,
            "{ADDRESS_PREFIX}{}",
            data_encoding::BASE32_DNSSEC.encode(&raw)
        )
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl FromStr for Address {
    type Err = AddressParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let rest = text
            .get(..ADDRESS_PREFIX.len())
            .filter(|prefix| prefix.eq_ignore_ascii_case(ADDRESS_PREFIX))
            .map(|_| &text[ADDRESS_PREFIX.len()..])
            .ok_or(AddressParseError::WrongPrefix)?;
        let raw = data_encoding::BASE32_DNSSEC
            .decode(rest.to_ascii_lowercase().as_bytes())
            .map_err(|_| AddressParseError::BadEncoding)?;
        if raw.len() != 36 {
            return Err(AddressParseError::BadEncoding);
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&raw[..32]);
        let address = Address(bytes);
        if address.checksum()[..] != raw[32..] {
            return Err(AddressParseError::ChecksumMismatch);
        }
        Ok(address)
    }
}

/// A device's key, certified by the identity key it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificate {
    /// The identity's signing key.
    pub identity_key: PublicKey,
    /// The device's own signing key.
    pub device_key: PublicKey,
    /// When the identity issued the certificate, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// The identity key's signature over [`DeviceCertificate::signed_bytes`].
    pub signature: Signature,
}

/// Why a device certificate was rejected.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum CertificateError {
    /// The identity key's signature does not verify.
    #[error("device certificate signature is invalid: {0}")]
    Signature(#[from] SignatureError),
    /// The certificate names a different identity than expected.
    #[error("device certificate belongs to another identity")]
    WrongIdentity,
}

impl DeviceCertificate {
    /// Issues a certificate for `device_key`, signed by `identity`.
    pub fn issue(identity: &Keypair, device_key: PublicKey, issued_at_ms: u64) -> Self {
        let identity_key = identity.public();
        let signed = Self::signed_bytes(&identity_key, &device_key, issued_at_ms);
        Self {
            identity_key,
            device_key,
            issued_at_ms,
            signature: identity.sign(domain::DEVICE_CERTIFICATE, &signed),
        }
    }

    /// `identity_key || device_key || issued_at_ms (u64 LE)`.
    pub fn signed_bytes(
        identity_key: &PublicKey,
        device_key: &PublicKey,
        issued_at_ms: u64,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(72);
        out.extend_from_slice(identity_key.as_bytes());
        out.extend_from_slice(device_key.as_bytes());
        out.extend_from_slice(&issued_at_ms.to_le_bytes());
        out
    }

    /// Checks the identity's signature.
    pub fn verify(&self) -> Result<(), CertificateError> {
        let signed = Self::signed_bytes(&self.identity_key, &self.device_key, self.issued_at_ms);
        self.identity_key
            .verify(domain::DEVICE_CERTIFICATE, &signed, &self.signature)?;
        Ok(())
    }

    /// Checks the signature and that the certificate belongs to `address`.
    pub fn verify_for(&self, address: &Address) -> Result<(), CertificateError> {
        if self.identity_key.address() != *address {
            return Err(CertificateError::WrongIdentity);
        }
        self.verify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_text_round_trips_and_is_case_insensitive() {
        let address = Keypair::from_secret_bytes([7; 32]).address();
        let text = address.to_string();
        assert!(text.starts_with("bb1"));
        assert_eq!(text.len(), 3 + 58);
        assert_eq!(text.parse::<Address>(), Ok(address));
        assert_eq!(text.to_ascii_uppercase().parse::<Address>(), Ok(address));
    }

    #[test]
    fn a_mistyped_address_is_rejected() {
        let text = Keypair::from_secret_bytes([7; 32]).address().to_string();
        let mut chars: Vec<char> = text.chars().collect();
        chars[10] = if chars[10] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(
            typo.parse::<Address>(),
            Err(AddressParseError::ChecksumMismatch)
        );
        assert_eq!(
            "xx1abc".parse::<Address>(),
            Err(AddressParseError::WrongPrefix)
        );
        assert_eq!(
            "bb1abc".parse::<Address>(),
            Err(AddressParseError::BadEncoding)
        );
        assert_eq!(
            "bb1!!!".parse::<Address>(),
            Err(AddressParseError::BadEncoding)
        );
        assert_eq!("".parse::<Address>(), Err(AddressParseError::WrongPrefix));
        assert_eq!(
            text[..text.len() - 2].parse::<Address>(),
            Err(AddressParseError::BadEncoding)
        );
    }

    #[test]
    fn device_id_text_round_trips_and_rejects_other_lengths() {
        let id = Keypair::from_secret_bytes([2; 32]).public().device_id();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<DeviceId>(), Ok(id));
        assert_eq!(format!(" {} ", text.to_ascii_uppercase()).parse(), Ok(id));
        assert_eq!(
            text[..62].parse::<DeviceId>(),
            Err(DeviceIdParseError { len: 62 })
        );
        assert_eq!(
            "zz".repeat(32).parse::<DeviceId>(),
            Err(DeviceIdParseError { len: 64 })
        );
    }

    #[test]
    fn address_is_blake3_of_the_public_key() {
        let key = Keypair::from_secret_bytes([1; 32]);
        assert_eq!(
            key.address().0,
            *blake3::hash(key.public().as_bytes()).as_bytes()
        );
    }

    #[test]
    fn device_certificate_verifies_and_detects_forgery() {
        let identity = Keypair::from_secret_bytes([1; 32]);
        let device = Keypair::from_secret_bytes([2; 32]);
        let cert = DeviceCertificate::issue(&identity, device.public(), 1_000);
        assert_eq!(cert.verify_for(&identity.address()), Ok(()));

        let stranger = Keypair::from_secret_bytes([3; 32]);
        assert_eq!(
            cert.verify_for(&stranger.address()),
            Err(CertificateError::WrongIdentity)
        );

        let mut forged = cert;
        forged.device_key = stranger.public();
        assert_eq!(
            forged.verify(),
            Err(CertificateError::Signature(SignatureError::BadSignature))
        );

        // A certificate "issued" by the device itself for the identity's address fails.
        let mut self_signed = DeviceCertificate::issue(&device, device.public(), 1_000);
        self_signed.identity_key = identity.public();
        assert!(self_signed.verify().is_err());
    }

    #[test]
    fn signatures_are_domain_separated() {
        let key = Keypair::from_secret_bytes([4; 32]);
        let signature = key.sign(domain::AUTH, b"message");
        assert_eq!(
            key.public().verify(domain::AUTH, b"message", &signature),
            Ok(())
        );
        assert_eq!(
            key.public()
                .verify(domain::IDENTITY_CARD, b"message", &signature),
            Err(SignatureError::BadSignature)
        );
    }
}
