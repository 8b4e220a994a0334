//! End-to-end encrypted, signed envelopes for one or more recipients.
//!
//! The broker stores and forwards exactly the bytes built here and learns
//! nothing from them beyond their length and the recipient addresses it
//! already routes by. One envelope is stored for every recipient of a send,
//! so the message is encrypted once under a random single-use content key
//! `K`, and `K` is sealed to each recipient's encryption key with HPKE.
//!
//! # Byte layout (version 2)
//!
//! All integers are little-endian. Lengths are in bytes.
//!
//! ```text
//! envelope   = header || body
//! header     = version (1, = 0x02)
//!              || count (u16, 1..=MAX_RECIPIENTS)
//!              || slot * count
//! slot       = address (32) || enc (32) || sealed_key (48)
//! body       = ChaCha20-Poly1305(key = K, nonce = 12 zero bytes,
//!                                aad = header, plaintext = inner)
//!              (length = length(inner) + 16)
//! inner      = sender_key (32) || sent_at_ms (u64) || signature (64)
//!              || plaintext_len (u32) || plaintext || padding
//! padding    = zero bytes, as many as make the whole envelope the size of
//!              its bucket (see [`Padding`]); checked to be zero on open
//! ```
//!
//! Version 1, which [`open`] still reads, has no `plaintext_len` and no
//! padding: `inner = sender_key || sent_at_ms || signature || plaintext`.
//!
//! # Padding
//!
//! The broker sees every envelope's length. By default ([`Padding::default`])
//! the whole envelope is padded to the next power of two, at least 256 bytes,
//! so a stored or transmitted length tells only that bucket. The padding is
//! inside the AEAD body, so it is authenticated like the message, and it is
//! stripped on open.
//!
//! - `K` is 32 random bytes, fresh for every envelope.
//! - `address` is a recipient's 32-byte address. Addresses in one header are
//!   distinct.
//! - `enc || sealed_key` is, for that recipient, the output of HPKE
//!   (RFC 9180) base mode `SealBase(pkR, info, aad, K)` with the suite
//!   DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20Poly1305 (KEM 0x0020,
//!   KDF 0x0001, AEAD 0x0003), where `pkR` is the recipient's X25519
//!   encryption key from its identity card, `info` is the ASCII string
//!   `backbone envelope v1` ([`HPKE_INFO`]) and `aad` is the recipient's
//!   32-byte address. `enc` is the 32-byte encapsulated key, `sealed_key` is
//!   `K` encrypted (32 bytes) followed by the 16-byte tag.
//! - `sender_key` is the sender's ed25519 identity public key; the sender's
//!   address is `blake3(sender_key)`.
//! - `sent_at_ms` is the sender's clock, milliseconds since the Unix epoch.
//! - `signature` is the sender's ed25519 signature over
//!   `"backbone/v1/envelope\0" || blake3(header) (32) || sent_at_ms (u64) || plaintext`
//!   (the first part is [`SIGNATURE_DOMAIN`], including its trailing NUL byte).
//!
//! The header is authenticated twice: as the body's AEAD associated data, so
//! nobody without `K` can alter a slot, and through the signature, so a
//! recipient (who does know `K`) cannot re-address the sender's message to
//! someone else. A recipient that finds its address in a verified header
//! knows the sender really addressed the message to it.
//!
//! The smallest valid envelope has one recipient and an empty plaintext:
//! `3 + 112 + 104 + 16 = 235` bytes. Each further recipient adds 112 bytes.
//!
//! An envelope carries no replay protection of its own: the same bytes
//! opened twice give the same message. Callers that care deduplicate on the
//! broker's message id or on `(sender, sent_at_ms)`.

use std::fmt;

use backbone_protocol::bytes::{EncryptionKey, Signature};
use backbone_protocol::{Address, Keypair, PublicKey};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use thiserror::Error;

type HpkeKem = hpke::kem::X25519HkdfSha256;
type HpkeKdf = hpke::kdf::HkdfSha256;
type HpkeAead = hpke::aead::ChaCha20Poly1305;

/// The envelope format version this module writes.
pub const VERSION: u8 = 0x02;

/// The earlier format version, without padding, which [`open`] still reads.
pub const VERSION_1: u8 = 0x01;

/// How [`seal_with`] pads envelopes, so their length reveals only a size bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// No padding: the envelope's length reveals the plaintext's.
    None,
    /// The whole envelope is padded to the next power of two, and to at
    /// least `min` bytes.
    PowersOfTwo {
        /// The smallest bucket.
        min: usize,
    },
}

impl Default for Padding {
    /// Powers of two from 256 bytes.
    fn default() -> Self {
        Padding::PowersOfTwo { min: 256 }
    }
}

impl Padding {
    /// The length an envelope of `unpadded` bytes is padded to.
    pub fn padded_len(self, unpadded: usize) -> usize {
        match self {
            Padding::None => unpadded,
            Padding::PowersOfTwo { min } => unpadded
                .max(min)
                .checked_next_power_of_two()
                .unwrap_or(unpadded),
        }
    }
}

/// The most recipients one envelope may name.
///
/// This is a hard limit of the format, chosen well above any broker's
/// configured `max_recipients` so the broker's limit is the one users meet.
pub const MAX_RECIPIENTS: usize = 1024;

/// The signature domain of envelopes (see [`backbone_protocol::identity::domain`]).
pub const SIGNATURE_DOMAIN: &[u8] = b"backbone/v1/envelope\0";

/// The HPKE `info` string that binds sealed content keys to this format.
pub const HPKE_INFO: &[u8] = b"backbone envelope v1";

/// Length of the fixed header prefix: version and recipient count.
const PREFIX_LEN: usize = 1 + 2;
/// Length of the HPKE encapsulated key.
const ENC_LEN: usize = 32;
/// Length of the content key.
const CONTENT_KEY_LEN: usize = 32;
/// Length of a Poly1305 tag.
const TAG_LEN: usize = 16;
/// Length of the HPKE-sealed content key.
const SEALED_KEY_LEN: usize = CONTENT_KEY_LEN + TAG_LEN;
/// Length of one recipient slot.
const SLOT_LEN: usize = 32 + ENC_LEN + SEALED_KEY_LEN;
/// Length of the inner prefix: sender key, timestamp and signature.
const INNER_PREFIX_LEN: usize = 32 + 8 + 64;
/// Length of the plaintext length field of version 2.
const LENGTH_LEN: usize = 4;
/// Length of the smallest possible body (empty plaintext, version 1).
const MIN_BODY_LEN: usize = INNER_PREFIX_LEN + TAG_LEN;

/// Length of the header of an envelope with `count` recipients.
///
/// `count` is at most [`MAX_RECIPIENTS`] wherever this is called, so the
/// arithmetic cannot overflow.
const fn header_len(count: usize) -> usize {
    PREFIX_LEN + count * SLOT_LEN
}

/// An X25519 key pair that envelopes are sealed to.
///
/// The public half is published in the identity's card. The type
/// deliberately has no `Debug` that would print the secret.
#[derive(Clone)]
pub struct EncryptionKeypair {
    secret: <HpkeKem as hpke::Kem>::PrivateKey,
    public: <HpkeKem as hpke::Kem>::PublicKey,
}

impl EncryptionKeypair {
    /// A fresh key pair from the operating system's secure random source.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret[..]);
        Self::from_secret_bytes(secret)
    }

    /// Rebuilds a key pair from its 32 secret bytes (an X25519 scalar).
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        // X25519 accepts every 32-byte string as a secret (it is clamped on
        // use), so the only possible error, a wrong length, cannot happen.
        let secret = <HpkeKem as hpke::Kem>::PrivateKey::from_bytes(&secret)
            .expect("every 32-byte string is an X25519 secret key");
        let public = HpkeKem::sk_to_pk(&secret);
        Self { secret, public }
    }

    /// The 32 secret bytes, for saving to a key file.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes().into()
    }

    /// The public half, as published in the identity card.
    pub fn public(&self) -> EncryptionKey {
        EncryptionKey(self.public.to_bytes().into())
    }
}

impl fmt::Debug for EncryptionKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKeypair(public: {:?})", self.public())
    }
}

/// A verified, decrypted envelope.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's address: `blake3(sender_key)`.
    pub sender: Address,
    /// The sender's identity key, which signed the envelope.
    pub sender_key: PublicKey,
    /// When the sender says it sent the message, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// Every recipient the sender addressed, in header order (includes the opener).
    pub recipients: Vec<Address>,
    /// The message.
    pub plaintext: Vec<u8>,
}

impl fmt::Debug for Opened {
    // The plaintext is never printed, so that logging an `Opened` cannot leak
    // message content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("sender", &self.sender)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("recipients", &self.recipients)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

/// Why an envelope could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum EnvelopeError {
    /// The bytes do not follow the envelope layout; the text says where.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The envelope was written in a format version this client does not know.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// A send with no recipients was asked for.
    #[error("an envelope needs at least one recipient")]
    NoRecipients,
    /// More recipients than [`MAX_RECIPIENTS`].
    #[error("an envelope can name at most {MAX_RECIPIENTS} recipients")]
    TooManyRecipients,
    /// The same recipient address was given twice.
    #[error("recipient {0} is listed twice")]
    DuplicateRecipient(Address),
    /// A recipient's encryption key cannot be used (it is a low-order point).
    #[error("the encryption key of recipient {0} is invalid")]
    InvalidRecipientKey(Address),
    /// The cipher refused to encrypt; only possible for absurdly large plaintexts.
    #[error("could not encrypt the envelope")]
    EncryptFailed,
    /// The plaintext is longer than the format's 32-bit length field allows.
    #[error("the plaintext is too long for an envelope")]
    PlaintextTooLong,
    /// The envelope does not name this address: it was mis-addressed.
    #[error("the envelope is not addressed to this identity")]
    NotForMe,
    /// The content key or the body did not decrypt: the envelope was
    /// tampered with, or sealed to another encryption key.
    #[error("the envelope does not decrypt (tampered, or sealed to another key)")]
    DecryptFailed,
    /// The sender's signature does not verify, or the sender key is invalid.
    #[error("the sender's signature does not verify")]
    BadSignature,
    /// The envelope is genuine but comes from someone other than expected.
    #[error("the envelope comes from {actual}, not the expected {expected}")]
    SenderMismatch {
        /// The sender the caller expected.
        expected: Address,
        /// The sender who actually signed.
        actual: Address,
    },
}

/// Seals `plaintext` from `sender` to every recipient, padded by
/// [`Padding::default`].
///
/// Each recipient is its address and its encryption key, which the caller
/// takes from that address's verified [`backbone_protocol::IdentityCard`].
pub fn seal(
    sender: &Keypair,
    recipients: &[(Address, EncryptionKey)],
    plaintext: &[u8],
    sent_at_ms: u64,
) -> Result<Vec<u8>, EnvelopeError> {
    seal_with(
        sender,
        recipients,
        plaintext,
        sent_at_ms,
        Padding::default(),
    )
}

/// [`seal`] with the given padding.
pub fn seal_with(
    sender: &Keypair,
    recipients: &[(Address, EncryptionKey)],
    plaintext: &[u8],
    sent_at_ms: u64,
    padding: Padding,
) -> Result<Vec<u8>, EnvelopeError> {
    seal_signed_by(
        sender.public(),
        sender,
        recipients,
        plaintext,
        sent_at_ms,
        Layout::Version2(padding),
    )
}

/// Which format [`seal_signed_by`] writes.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// The current format, with this padding.
    Version2(Padding),
    /// The old unpadded format; only tests write it, to check it still opens.
    #[cfg(test)]
    Version1,
}

/// [`seal_with`], with the claimed sender key separate from the key that
/// signs (they differ only in tests that forge envelopes), in either layout.
fn seal_signed_by(
    claimed_sender: PublicKey,
    signer: &Keypair,
    recipients: &[(Address, EncryptionKey)],
    plaintext: &[u8],
    sent_at_ms: u64,
    layout: Layout,
) -> Result<Vec<u8>, EnvelopeError> {
    if recipients.is_empty() {
        return Err(EnvelopeError::NoRecipients);
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::TooManyRecipients);
    }
    let mut sorted: Vec<Address> = recipients.iter().map(|(address, _)| *address).collect();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(EnvelopeError::DuplicateRecipient(pair[0]));
    }

    let mut content_key = [0u8; CONTENT_KEY_LEN];
    rand::fill(&mut content_key[..]);

    let count = u16::try_from(recipients.len()).map_err(|_| EnvelopeError::TooManyRecipients)?;
    let plaintext_len =
        u32::try_from(plaintext.len()).map_err(|_| EnvelopeError::PlaintextTooLong)?;
    let (version, length_len, padding) = match layout {
        Layout::Version2(padding) => (VERSION, LENGTH_LEN, padding),
        #[cfg(test)]
        Layout::Version1 => (VERSION_1, 0, Padding::None),
    };
    let unpadded =
        header_len(recipients.len()) + INNER_PREFIX_LEN + length_len + plaintext.len() + TAG_LEN;
    let padded = padding.padded_len(unpadded);
    let mut envelope = Vec::with_capacity(padded);
    envelope.push(version);
    envelope.extend_from_slice(&count.to_le_bytes());
    let mut rng = rand::rng();
    for (address, key) in recipients {
        let invalid = || EnvelopeError::InvalidRecipientKey(*address);
        let public =
            <HpkeKem as hpke::Kem>::PublicKey::from_bytes(key.as_bytes()).map_err(|_| invalid())?;
        let (enc, sealed_key) = hpke::single_shot_seal::<HpkeAead, HpkeKdf, HpkeKem, _>(
            &OpModeS::Base,
            &public,
            HPKE_INFO,
            &content_key,
            &address.0,
            &mut rng,
        )
        .map_err(|_| invalid())?;
        envelope.extend_from_slice(&address.0);
        envelope.extend_from_slice(&enc.to_bytes());
        envelope.extend_from_slice(&sealed_key);
    }
    let header_end = envelope.len();

    let signature = signer.sign(
        SIGNATURE_DOMAIN,
        &signed_bytes(&envelope[..header_end], sent_at_ms, plaintext),
    );
    let mut inner = Vec::with_capacity(padded - header_end - TAG_LEN);
    inner.extend_from_slice(claimed_sender.as_bytes());
    inner.extend_from_slice(&sent_at_ms.to_le_bytes());
    inner.extend_from_slice(signature.as_bytes());
    if length_len > 0 {
        inner.extend_from_slice(&plaintext_len.to_le_bytes());
    }
    inner.extend_from_slice(plaintext);
    inner.resize(padded - header_end - TAG_LEN, 0);

    let body = body_cipher(&content_key)
        .encrypt(
            &body_nonce(),
            Payload {
                msg: &inner,
                aad: &envelope[..header_end],
            },
        )
        .map_err(|_| EnvelopeError::EncryptFailed)?;
    envelope.extend_from_slice(&body);
    Ok(envelope)
}

/// Opens an envelope addressed to `me`, whose encryption key is `my_key`.
///
/// Checks, in order: the layout, that `me` is a recipient, the sealed content
/// key, the body, and the sender's signature. Never panics, and allocates no
/// more than a small multiple of the input's length, whatever the input.
pub fn open(
    me: &Address,
    my_key: &EncryptionKeypair,
    envelope: &[u8],
) -> Result<Opened, EnvelopeError> {
    let parsed = parse(envelope)?;
    let slot = parsed.slot_of(me).ok_or(EnvelopeError::NotForMe)?;

    let enc = <HpkeKem as hpke::Kem>::EncappedKey::from_bytes(slot.enc)
        .map_err(|_| EnvelopeError::DecryptFailed)?;
    let content_key = hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(
        &OpModeR::Base,
        &my_key.secret,
        &enc,
        HPKE_INFO,
        slot.sealed_key,
        &me.0,
    )
    .map_err(|_| EnvelopeError::DecryptFailed)?;
    let content_key: [u8; CONTENT_KEY_LEN] = content_key
        .try_into()
        .map_err(|_| EnvelopeError::DecryptFailed)?;

    let inner = body_cipher(&content_key)
        .decrypt(
            &body_nonce(),
            Payload {
                msg: parsed.body,
                aad: parsed.header,
            },
        )
        .map_err(|_| EnvelopeError::DecryptFailed)?;
    let (sender_key, rest) = inner
        .split_first_chunk::<32>()
        .ok_or(EnvelopeError::Malformed("inner too short"))?;
    let (sent_at_ms, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(EnvelopeError::Malformed("inner too short"))?;
    let (signature, rest) = rest
        .split_first_chunk::<64>()
        .ok_or(EnvelopeError::Malformed("inner too short"))?;
    let plaintext = match parsed.version {
        VERSION_1 => rest,
        _ => {
            let (length, rest) = rest
                .split_first_chunk::<LENGTH_LEN>()
                .ok_or(EnvelopeError::Malformed("inner too short"))?;
            let length = u32::from_le_bytes(*length) as usize;
            if length > rest.len() {
                return Err(EnvelopeError::Malformed("plaintext length beyond the body"));
            }
            let (plaintext, padding) = rest.split_at(length);
            if padding.iter().any(|&byte| byte != 0) {
                return Err(EnvelopeError::Malformed("non-zero padding"));
            }
            plaintext
        }
    };
    let sender_key = PublicKey(*sender_key);
    let sent_at_ms = u64::from_le_bytes(*sent_at_ms);

    sender_key
        .verify(
            SIGNATURE_DOMAIN,
            &signed_bytes(parsed.header, sent_at_ms, plaintext),
            &Signature(*signature),
        )
        .map_err(|_| EnvelopeError::BadSignature)?;

    Ok(Opened {
        sender: sender_key.address(),
        sender_key,
        sent_at_ms,
        recipients: parsed.slots().map(|slot| slot.address).collect(),
        plaintext: plaintext.to_vec(),
    })
}

/// [`open`], then checks that the envelope comes from `expected_sender`.
pub fn open_expecting(
    me: &Address,
    my_key: &EncryptionKeypair,
    envelope: &[u8],
    expected_sender: &Address,
) -> Result<Opened, EnvelopeError> {
    let opened = open(me, my_key, envelope)?;
    if opened.sender != *expected_sender {
        return Err(EnvelopeError::SenderMismatch {
            expected: *expected_sender,
            actual: opened.sender,
        });
    }
    Ok(opened)
}

/// The message the sender signs (after the domain): `blake3(header) || sent_at_ms || plaintext`.
fn signed_bytes(header: &[u8], sent_at_ms: u64, plaintext: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(32 + 8 + plaintext.len());
    signed.extend_from_slice(blake3::hash(header).as_bytes());
    signed.extend_from_slice(&sent_at_ms.to_le_bytes());
    signed.extend_from_slice(plaintext);
    signed
}

fn body_cipher(content_key: &[u8; CONTENT_KEY_LEN]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(content_key))
}

/// The body's nonce: all zeros.
///
/// A fixed nonce is safe here because every content key is fresh random and
/// encrypts exactly one message, so no (key, nonce) pair is ever reused.
fn body_nonce() -> Nonce {
    Nonce::default()
}

/// An envelope split into its parts, with every length checked.
struct Parsed<'a> {
    version: u8,
    header: &'a [u8],
    body: &'a [u8],
}

/// One recipient slot, borrowed from the header.
struct Slot<'a> {
    address: Address,
    enc: &'a [u8],
    sealed_key: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn slots(&self) -> impl Iterator<Item = Slot<'a>> + use<'a> {
        self.header[PREFIX_LEN..]
            .chunks_exact(SLOT_LEN)
            .map(|slot| {
                let (address, rest) = slot.split_at(32);
                let (enc, sealed_key) = rest.split_at(ENC_LEN);
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(address);
                Slot {
                    address: Address(bytes),
                    enc,
                    sealed_key,
                }
            })
    }

    fn slot_of(&self, me: &Address) -> Option<Slot<'a>> {
        self.slots().find(|slot| slot.address == *me)
    }
}

/// Checks the layout: version, recipient count and lengths, distinct addresses.
fn parse(envelope: &[u8]) -> Result<Parsed<'_>, EnvelopeError> {
    let (&version, rest) = envelope
        .split_first()
        .ok_or(EnvelopeError::Malformed("empty"))?;
    if version != VERSION && version != VERSION_1 {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let (count, _) = rest
        .split_first_chunk::<2>()
        .ok_or(EnvelopeError::Malformed("truncated recipient count"))?;
    let count = usize::from(u16::from_le_bytes(*count));
    if count == 0 {
        return Err(EnvelopeError::Malformed("no recipients"));
    }
    if count > MAX_RECIPIENTS {
        return Err(EnvelopeError::TooManyRecipients);
    }
    let header_len = header_len(count);
    if envelope.len() < header_len {
        return Err(EnvelopeError::Malformed("truncated recipient slots"));
    }
    let (header, body) = envelope.split_at(header_len);
    if body.len() < MIN_BODY_LEN {
        return Err(EnvelopeError::Malformed("truncated body"));
    }
    let parsed = Parsed {
        version,
        header,
        body,
    };
    // `count` is bounded by MAX_RECIPIENTS and the slots were length-checked
    // against the input, so this allocation is small and input-backed.
    let mut addresses: Vec<Address> = parsed.slots().map(|slot| slot.address).collect();
    addresses.sort_unstable();
    if addresses.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(EnvelopeError::Malformed("duplicate recipient"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    struct Party {
        signing: Keypair,
        encryption: EncryptionKeypair,
    }

    impl Party {
        fn new(seed: u8) -> Self {
            Self {
                signing: Keypair::from_secret_bytes([seed; 32]),
                encryption: EncryptionKeypair::from_secret_bytes([seed.wrapping_add(100); 32]),
            }
        }

        fn address(&self) -> Address {
            self.signing.address()
        }

        fn recipient(&self) -> (Address, EncryptionKey) {
            (self.address(), self.encryption.public())
        }

        fn open(&self, envelope: &[u8]) -> Result<Opened, EnvelopeError> {
            open(&self.address(), &self.encryption, envelope)
        }
    }

    #[test]
    fn a_single_recipient_opens_what_was_sealed() {
        let (alice, bob) = (Party::new(1), Party::new(2));
        let envelope = seal_with(
            &alice.signing,
            &[bob.recipient()],
            b"hello bob",
            1_234,
            Padding::None,
        )
        .unwrap();
        assert_eq!(
            envelope.len(),
            header_len(1) + INNER_PREFIX_LEN + LENGTH_LEN + 9 + TAG_LEN
        );
        assert_eq!(envelope[0], VERSION);
        assert_eq!(envelope[1..3], 1u16.to_le_bytes());
        assert_eq!(envelope[3..35], bob.address().0);

        let opened = bob.open(&envelope).unwrap();
        assert_eq!(
            opened,
            Opened {
                sender: alice.address(),
                sender_key: alice.signing.public(),
                sent_at_ms: 1_234,
                recipients: vec![bob.address()],
                plaintext: b"hello bob".to_vec(),
            }
        );
        assert_eq!(
            open_expecting(&bob.address(), &bob.encryption, &envelope, &alice.address()),
            Ok(opened)
        );
    }

    #[test]
    fn every_recipient_of_a_multi_recipient_envelope_opens_it() {
        let alice = Party::new(1);
        let recipients: Vec<Party> = (2..7).map(Party::new).collect();
        let list: Vec<_> = recipients.iter().map(Party::recipient).collect();
        let envelope = seal_with(&alice.signing, &list, b"to all", 99, Padding::None).unwrap();
        assert_eq!(
            envelope.len(),
            header_len(5) + INNER_PREFIX_LEN + LENGTH_LEN + 6 + TAG_LEN
        );
        let addresses: Vec<Address> = recipients.iter().map(Party::address).collect();
        for party in &recipients {
            let opened = party.open(&envelope).unwrap();
            assert_eq!(opened.plaintext, b"to all");
            assert_eq!(opened.sender, alice.address());
            assert_eq!(opened.recipients, addresses);
        }
    }

    #[test]
    fn an_empty_plaintext_gives_the_smallest_envelope() {
        let (alice, bob) = (Party::new(1), Party::new(2));
        let envelope =
            seal_with(&alice.signing, &[bob.recipient()], b"", 0, Padding::None).unwrap();
        assert_eq!(envelope.len(), 239);
        assert_eq!(bob.open(&envelope).unwrap().plaintext, b"");
        // Padded, the smallest envelope is the smallest bucket.
        let padded = seal(&alice.signing, &[bob.recipient()], b"", 0).unwrap();
        assert_eq!(padded.len(), 256);
        assert_eq!(bob.open(&padded).unwrap().plaintext, b"");
    }

    #[test]
    fn padded_lengths_reveal_only_the_bucket() {
        let (alice, bob, carol) = (Party::new(1), Party::new(2), Party::new(3));
        let mut lengths = std::collections::BTreeSet::new();
        for len in (0..5_000)
            .step_by(97)
            .chain([1_000, 1_777, 1_778, 1_779, 1_780])
        {
            let plaintext = vec![0x5a; len];
            for recipients in [
                vec![bob.recipient()],
                vec![bob.recipient(), carol.recipient()],
            ] {
                let envelope = seal(&alice.signing, &recipients, &plaintext, 1).unwrap();
                assert!(envelope.len().is_power_of_two() && envelope.len() >= 256);
                let unpadded = header_len(recipients.len()) + INNER_PREFIX_LEN + LENGTH_LEN;
                assert!(envelope.len() >= unpadded + len + TAG_LEN);
                assert!(envelope.len() < 2 * (unpadded + len + TAG_LEN).max(256));
                assert_eq!(bob.open(&envelope).unwrap().plaintext, plaintext);
                lengths.insert(envelope.len());
            }
        }
        assert_eq!(
            lengths.into_iter().collect::<Vec<_>>(),
            [256, 512, 1024, 2048, 4096, 8192]
        );
        // The exact bucket edge: 1,779 bytes of plaintext fill 2,048 exactly.
        let edge = header_len(1) + INNER_PREFIX_LEN + LENGTH_LEN + TAG_LEN;
        let fits = seal(
            &alice.signing,
            &[bob.recipient()],
            &vec![1; 2_048 - edge],
            1,
        )
        .unwrap();
        assert_eq!(fits.len(), 2_048);
        let over = seal(
            &alice.signing,
            &[bob.recipient()],
            &vec![1; 2_049 - edge],
            1,
        )
        .unwrap();
        assert_eq!(over.len(), 4_096);
        let custom = seal_with(
            &alice.signing,
            &[bob.recipient()],
            b"x",
            1,
            Padding::PowersOfTwo { min: 4_096 },
        )
        .unwrap();
        assert_eq!(custom.len(), 4_096);
    }

    #[test]
    fn version_1_envelopes_still_open() {
        let (alice, bob) = (Party::new(1), Party::new(2));
        let old = seal_signed_by(
            alice.signing.public(),
            &alice.signing,
            &[bob.recipient()],
            b"from an older client",
            8,
            Layout::Version1,
        )
        .unwrap();
        assert_eq!(old[0], VERSION_1);
        assert_eq!(old.len(), header_len(1) + INNER_PREFIX_LEN + 20 + TAG_LEN);
        let opened = bob.open(&old).unwrap();
        assert_eq!(opened.plaintext, b"from an older client");
        assert_eq!(opened.sender, alice.address());
        // The version byte is signed: relabelling it breaks the envelope.
        let mut relabelled = old.clone();
        relabelled[0] = VERSION;
        assert!(bob.open(&relabelled).is_err());
    }

    #[test]
    fn a_third_party_cannot_open() {
        let (alice, bob, eve) = (Party::new(1), Party::new(2), Party::new(3));
        let envelope = seal(&alice.signing, &[bob.recipient()], b"secret", 1).unwrap();
        assert_eq!(eve.open(&envelope), Err(EnvelopeError::NotForMe));
        // Claiming Bob's address without Bob's key does not help either.
        assert_eq!(
            open(&bob.address(), &eve.encryption, &envelope),
            Err(EnvelopeError::DecryptFailed)
        );
    }

    #[test]
    fn a_wrong_expected_sender_is_reported() {
        let (alice, bob, carol) = (Party::new(1), Party::new(2), Party::new(3));
        let envelope = seal(&alice.signing, &[bob.recipient()], b"hi", 1).unwrap();
        assert_eq!(
            open_expecting(&bob.address(), &bob.encryption, &envelope, &carol.address()),
            Err(EnvelopeError::SenderMismatch {
                expected: carol.address(),
                actual: alice.address()
            })
        );
    }

    #[test]
    fn flipping_any_byte_is_detected() {
        let (alice, bob, carol) = (Party::new(1), Party::new(2), Party::new(3));
        let envelope = seal(
            &alice.signing,
            &[bob.recipient(), carol.recipient()],
            b"abc",
            7,
        )
        .unwrap();
        for position in 0..envelope.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut tampered = envelope.clone();
                tampered[position] ^= flip;
                assert!(
                    bob.open(&tampered).is_err(),
                    "flip {flip:#x} at {position} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_slot_from_another_envelope_does_not_fit() {
        let (alice, bob) = (Party::new(1), Party::new(2));
        let first = seal(&alice.signing, &[bob.recipient()], b"one", 1).unwrap();
        let second = seal(&alice.signing, &[bob.recipient()], b"two", 2).unwrap();
        let mut spliced = first.clone();
        spliced[PREFIX_LEN..header_len(1)].copy_from_slice(&second[PREFIX_LEN..header_len(1)]);
        assert_eq!(bob.open(&spliced), Err(EnvelopeError::DecryptFailed));
    }

    #[test]
    fn a_signature_by_someone_else_claiming_the_sender_key_is_rejected() {
        let (alice, bob, mallory) = (Party::new(1), Party::new(2), Party::new(3));
        let forged = seal_signed_by(
            alice.signing.public(),
            &mallory.signing,
            &[bob.recipient()],
            b"x",
            5,
            Layout::Version2(Padding::default()),
        )
        .unwrap();
        assert_eq!(bob.open(&forged), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn a_recipient_cannot_readdress_a_message() {
        // Bob knows the content key, so he can rebuild a valid body for a
        // new header sent only to Carol; the signature still binds the
        // original header, so Carol rejects it.
        let (alice, bob, carol) = (Party::new(1), Party::new(2), Party::new(3));
        let original = seal(
            &alice.signing,
            &[bob.recipient(), carol.recipient()],
            b"for both",
            3,
        )
        .unwrap();
        let parsed = parse(&original).unwrap();
        let bob_slot = parsed.slot_of(&bob.address()).unwrap();
        let enc = <HpkeKem as hpke::Kem>::EncappedKey::from_bytes(bob_slot.enc).unwrap();
        let content_key: [u8; 32] = hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(
            &OpModeR::Base,
            &bob.encryption.secret,
            &enc,
            HPKE_INFO,
            bob_slot.sealed_key,
            &bob.address().0,
        )
        .unwrap()
        .try_into()
        .unwrap();
        let inner = body_cipher(&content_key)
            .decrypt(
                &body_nonce(),
                Payload {
                    msg: parsed.body,
                    aad: parsed.header,
                },
            )
            .unwrap();

        let mut readdressed = vec![VERSION, 1, 0];
        readdressed
            .extend_from_slice(&parsed.header[PREFIX_LEN + SLOT_LEN..PREFIX_LEN + 2 * SLOT_LEN]);
        let body = body_cipher(&content_key)
            .encrypt(
                &body_nonce(),
                Payload {
                    msg: &inner,
                    aad: &readdressed,
                },
            )
            .unwrap();
        readdressed.extend_from_slice(&body);
        assert_eq!(carol.open(&readdressed), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (alice, bob, carol) = (Party::new(1), Party::new(2), Party::new(3));
        let envelope = seal(
            &alice.signing,
            &[bob.recipient(), carol.recipient()],
            b"truncate me",
            7,
        )
        .unwrap();
        for len in 0..envelope.len() {
            assert!(
                bob.open(&envelope[..len]).is_err(),
                "truncated to {len} bytes opened"
            );
        }
        let mut extended = envelope.clone();
        extended.push(0);
        assert_eq!(bob.open(&extended), Err(EnvelopeError::DecryptFailed));
    }

    #[test]
    fn layout_errors_are_specific() {
        let bob = Party::new(2);
        assert_eq!(bob.open(&[]), Err(EnvelopeError::Malformed("empty")));
        assert_eq!(
            bob.open(&[3, 1, 0]),
            Err(EnvelopeError::UnsupportedVersion(3))
        );
        assert_eq!(
            bob.open(&[1, 1]),
            Err(EnvelopeError::Malformed("truncated recipient count"))
        );
        assert_eq!(
            bob.open(&[1, 0, 0]),
            Err(EnvelopeError::Malformed("no recipients"))
        );
        assert_eq!(
            bob.open(&[1, 0xff, 0xff]),
            Err(EnvelopeError::TooManyRecipients)
        );
        assert_eq!(
            bob.open(&[1, 1, 0]),
            Err(EnvelopeError::Malformed("truncated recipient slots"))
        );

        let mut duplicated = vec![1, 2, 0];
        for _ in 0..2 {
            duplicated.extend_from_slice(&bob.address().0);
            duplicated.extend_from_slice(&[0; ENC_LEN + SEALED_KEY_LEN]);
        }
        duplicated.extend_from_slice(&[0; MIN_BODY_LEN]);
        assert_eq!(
            bob.open(&duplicated),
            Err(EnvelopeError::Malformed("duplicate recipient"))
        );
    }

    #[test]
    fn sealing_checks_the_recipient_list() {
        let (alice, bob) = (Party::new(1), Party::new(2));
        assert_eq!(
            seal(&alice.signing, &[], b"", 0),
            Err(EnvelopeError::NoRecipients)
        );
        assert_eq!(
            seal(&alice.signing, &[bob.recipient(), bob.recipient()], b"", 0),
            Err(EnvelopeError::DuplicateRecipient(bob.address()))
        );
        let too_many: Vec<_> = (0..=MAX_RECIPIENTS)
            .map(|index| {
                let mut address = [0u8; 32];
                address[..8].copy_from_slice(&(index as u64).to_le_bytes());
                (Address(address), bob.encryption.public())
            })
            .collect();
        assert_eq!(
            seal(&alice.signing, &too_many, b"", 0),
            Err(EnvelopeError::TooManyRecipients)
        );
        // The all-zero point is of low order: HPKE refuses to encapsulate to it.
        assert_eq!(
            seal(
                &alice.signing,
                &[(bob.address(), EncryptionKey([0; 32]))],
                b"",
                0
            ),
            Err(EnvelopeError::InvalidRecipientKey(bob.address()))
        );
    }

    #[test]
    fn encryption_keys_round_trip_through_their_secret_bytes() {
        let key = EncryptionKeypair::generate();
        let again = EncryptionKeypair::from_secret_bytes(key.secret_bytes());
        assert_eq!(again.public(), key.public());
        assert_ne!(EncryptionKeypair::generate().public(), key.public());
        let debug = format!("{key:?}");
        assert!(!debug.contains(&hex::encode(key.secret_bytes())));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, RngCore, SeedableRng};

        let (alice, bob) = (Party::new(1), Party::new(2));
        let valid = seal(&alice.signing, &[bob.recipient()], b"seed", 1).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..2_000 {
            let input = match round % 3 {
                // Pure noise, sometimes with a plausible version and count.
                0 => {
                    let mut bytes = vec![0u8; rng.random_range(0..600)];
                    rng.fill_bytes(&mut bytes);
                    if let Some(first) = bytes.first_mut() {
                        *first = VERSION;
                    }
                    bytes
                }
                1 => {
                    let mut bytes = vec![0u8; rng.random_range(0..64)];
                    rng.fill_bytes(&mut bytes);
                    bytes
                }
                // A valid envelope with a few random bytes overwritten.
                _ => {
                    let mut bytes = valid.clone();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..bytes.len());
                        bytes[at] = rng.random();
                    }
                    bytes
                }
            };
            // Any result is fine, as long as it is not a panic; a random
            // input that opens would be a forgery.
            assert!(bob.open(&input).is_err() || input == valid);
        }
    }
}
