//! Tokens: small encrypted blobs shared through a side channel (a QR code, a
//! link), fetched by whoever holds their reference, without an identity.
//!
//! The creator encrypts the content under a fresh random key
//! ([`seal_content`]), stores the ciphertext with the broker and gets back a
//! [`TokenId`]. What it hands out is a [`TokenRef`], the text
//! `bbt1:<id>:<key>[:<salt>]` (hex fields): the id finds the token, the key
//! opens it, and the salt, present only for a password-protected token,
//! derives its password verifier. The broker sees the id and the
//! ciphertext, never the key or the password.
//!
//! **Passwords.** The verifier is Argon2id over the password, salted with a
//! domain string and 16 random bytes the creator draws ([`derive_verifier`]);
//! the broker stores only a hash of the verifier and counts wrong ones. Since
//! the salt travels in the reference and not to the broker, whoever reads
//! the broker's disk cannot even start guessing a password. The password
//! guards the token at the broker (someone who photographed the QR code
//! still needs it); the content key alone opens the content, so the
//! reference itself must stay as private as the content.
//!
//! Fetching works on an authenticated [`crate::Client`]
//! ([`crate::Client::get_token`]) or on an anonymous connection
//! ([`TokenFetcher`]), which tells the broker nothing about who fetches.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backbone_protocol::Frame;
use backbone_protocol::bytes::{PasswordVerifier, TokenId};
use backbone_protocol::frame::GetToken;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::error::ClientError;
use crate::transport::{ConnectConfig, RawConnection, unexpected};

/// The prefix of a token reference's text form; the `1` is its version.
pub const TOKEN_REF_PREFIX: &str = "bbt1";

/// The first byte of sealed token content: the format version.
pub const CONTENT_VERSION: u8 = 1;

/// The associated data bound into every sealed content (with its version).
const CONTENT_AAD: &[u8] = b"backbone token content v1";

/// The domain string in front of the random salt of [`derive_verifier`].
pub const PASSWORD_SALT_DOMAIN: &[u8] = b"backbone token password v1";

/// Argon2id cost: 19 MiB of memory, 2 passes, 1 lane (the OWASP
/// recommendation for Argon2id).
const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
const ARGON2_PASSES: u32 = 2;
const ARGON2_LANES: u32 = 1;

/// Bytes of a content key.
pub const KEY_LEN: usize = 32;
/// Bytes of a password salt.
pub const SALT_LEN: usize = 16;

/// Everything needed to fetch and open one token: share it as the text
/// [`TokenRef::to_text`] writes, parse it back with [`str::parse`].
///
/// A secret: `Debug` shows no part of it, and there is deliberately no
/// `Display`, so a reference is never formatted into a log by accident.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenRef {
    /// The token's id at the broker.
    pub id: TokenId,
    /// The key its content is sealed with.
    pub key: [u8; KEY_LEN],
    /// For a password-protected token, the salt of its password verifier.
    pub salt: Option<[u8; SALT_LEN]>,
}

impl fmt::Debug for TokenRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRef")
            .field("password", &self.salt.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenRef {
    /// The text form: `bbt1:<id hex>:<key hex>`, then `:<salt hex>` for a
    /// password-protected token. Lowercase hex, 64, 64 and 32 characters.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{TOKEN_REF_PREFIX}:{}:{}",
            hex::encode(self.id.0),
            hex::encode(self.key)
        );
        if let Some(salt) = &self.salt {
            text.push(':');
            text.push_str(&hex::encode(salt));
        }
        text
    }

    /// Whether fetching the token needs a password.
    pub fn has_password(&self) -> bool {
        self.salt.is_some()
    }
}

/// Why a token reference's text was rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseTokenRefError {
    /// The text does not start with `bbt1:`.
    #[error("a token reference starts with \"{TOKEN_REF_PREFIX}:\"")]
    WrongPrefix,
    /// Not 3 or 4 colon-separated fields.
    #[error("a token reference has 3 or 4 fields separated by ':', this one has {found}")]
    WrongFieldCount {
        /// Fields found.
        found: usize,
    },
    /// A field is not hex of the right length.
    #[error("the {field} of a token reference must be {expected} hex characters")]
    BadField {
        /// Which field: `id`, `key` or `salt`.
        field: &'static str,
        /// Hex characters expected.
        expected: usize,
    },
}

fn parse_field<const N: usize>(
    text: &str,
    field: &'static str,
) -> Result<[u8; N], ParseTokenRefError> {
    let error = ParseTokenRefError::BadField {
        field,
        expected: 2 * N,
    };
    let bytes = hex::decode(text).map_err(|_| error.clone())?;
    bytes.try_into().map_err(|_| error)
}

impl FromStr for TokenRef {
    type Err = ParseTokenRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = text.trim().split(':').collect();
        if fields[0] != TOKEN_REF_PREFIX {
            return Err(ParseTokenRefError::WrongPrefix);
        }
        if !(3..=4).contains(&fields.len()) {
            return Err(ParseTokenRefError::WrongFieldCount {
                found: fields.len(),
            });
        }
        Ok(TokenRef {
            id: TokenId(parse_field(fields[1], "id")?),
            key: parse_field(fields[2], "key")?,
            salt: fields
                .get(3)
                .map(|salt| parse_field(salt, "salt"))
                .transpose()?,
        })
    }
}

/// Why a token operation failed, beyond transport and generic broker errors.
#[derive(Debug, Error)]
pub enum TokenError {
    /// No such token: never created, deleted by its owner, or expired.
    /// (A delete by someone other than the owner gets this too.)
    #[error("no such token: never created, deleted, or expired")]
    NotFound,
    /// The password is wrong, or missing for a password-protected token.
    #[error("wrong or missing password for this token")]
    WrongPassword,
    /// Too many wrong passwords: the broker refuses the token for good.
    #[error("this token is locked after too many wrong passwords")]
    Locked,
    /// The content exceeds the broker's token size limit.
    #[error("token content too large: {0}")]
    TooLarge(String),
    /// A password was given for a reference without a salt: that token was
    /// created without a password.
    #[error("this token reference has no password salt: the token has no password")]
    NoPasswordExpected,
    /// The content does not decrypt with the reference's key: a wrong or
    /// damaged reference, or content that was altered.
    #[error("the token content does not decrypt with this reference's key")]
    Undecryptable,
    /// The password could not be run through the key derivation.
    #[error("password key derivation failed: {0}")]
    Kdf(String),
}

impl TokenError {
    /// The broker's code for this error, when it came from one.
    pub fn code(&self) -> Option<backbone_protocol::ErrorCode> {
        use backbone_protocol::ErrorCode;
        match self {
            TokenError::NotFound => Some(ErrorCode::NotFound),
            TokenError::WrongPassword => Some(ErrorCode::WrongPassword),
            TokenError::Locked => Some(ErrorCode::TokenLocked),
            TokenError::TooLarge(_) => Some(ErrorCode::EnvelopeTooLarge),
            _ => None,
        }
    }
}

/// Turns the broker's token refusals into [`TokenError`]s; other errors
/// pass through.
pub(crate) fn classify(error: ClientError) -> ClientError {
    use backbone_protocol::ErrorCode;
    let ClientError::Server { code, message, .. } = &error else {
        return error;
    };
    match ErrorCode::from_u16(*code) {
        Some(ErrorCode::NotFound) => TokenError::NotFound.into(),
        Some(ErrorCode::WrongPassword) => TokenError::WrongPassword.into(),
        Some(ErrorCode::TokenLocked) => TokenError::Locked.into(),
        Some(ErrorCode::EnvelopeTooLarge) => TokenError::TooLarge(message.clone()).into(),
        _ => error,
    }
}

/// The verifier of `password` for a token whose reference carries `salt`:
/// Argon2id (19 MiB, 2 passes, 1 lane, version 0x13), 32 bytes of output,
/// with the salt `"backbone token password v1" ‖ salt`. Slow on purpose
/// (tens of milliseconds): call it off the async runtime.
pub fn derive_verifier(
    password: &str,
    salt: &[u8; SALT_LEN],
) -> Result<PasswordVerifier, TokenError> {
    let params = argon2::Params::new(
        ARGON2_MEMORY_KIB,
        ARGON2_PASSES,
        ARGON2_LANES,
        Some(PasswordVerifier::LEN),
    )
    .map_err(|error| TokenError::Kdf(error.to_string()))?;
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salted = [PASSWORD_SALT_DOMAIN, &salt[..]].concat();
    let mut verifier = [0u8; PasswordVerifier::LEN];
    argon2
        .hash_password_into(password.as_bytes(), &salted, &mut verifier)
        .map_err(|error| TokenError::Kdf(error.to_string()))?;
    Ok(PasswordVerifier(verifier))
}

/// [`derive_verifier`] on the blocking thread pool.
pub(crate) async fn derive_verifier_off_runtime(
    password: &str,
    salt: [u8; SALT_LEN],
) -> Result<PasswordVerifier, ClientError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || derive_verifier(&password, &salt))
        .await
        .map_err(|error| ClientError::Io(format!("key derivation task failed: {error}")))?
        .map_err(ClientError::from)
}

/// The verifier a fetch presents: none without a password; an error for a
/// password given to a reference without a salt.
pub(crate) async fn verifier_for(
    reference: &TokenRef,
    password: Option<&str>,
) -> Result<Option<PasswordVerifier>, ClientError> {
    match (password, reference.salt) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(TokenError::NoPasswordExpected.into()),
        (Some(password), Some(salt)) => derive_verifier_off_runtime(password, salt).await.map(Some),
    }
}

/// Seals `plaintext` under `key`: `CONTENT_VERSION ‖ ChaCha20-Poly1305(key,
/// nonce 0, aad = CONTENT_VERSION ‖ "backbone token content v1")`. Each key
/// seals exactly one content, so the fixed nonce is never reused.
pub fn seal_content(key: &[u8; KEY_LEN], plaintext: &[u8]) -> Result<Vec<u8>, TokenError> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = [&[CONTENT_VERSION][..], CONTENT_AAD].concat();
    let sealed = cipher
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| TokenError::Undecryptable)?;
    Ok([&[CONTENT_VERSION][..], &sealed].concat())
}

/// Opens what [`seal_content`] sealed; [`TokenError::Undecryptable`] for
/// another key, another version, or altered bytes.
pub fn open_content(key: &[u8; KEY_LEN], sealed: &[u8]) -> Result<Vec<u8>, TokenError> {
    let Some((&version, ciphertext)) = sealed.split_first() else {
        return Err(TokenError::Undecryptable);
    };
    if version != CONTENT_VERSION {
        return Err(TokenError::Undecryptable);
    }
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = [&[version][..], CONTENT_AAD].concat();
    cipher
        .decrypt(
            &Nonce::default(),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| TokenError::Undecryptable)
}

/// Fetches tokens over an anonymous connection: the broker learns that
/// someone holding the id fetched it, not who. It does not reconnect; a
/// broken connection fails its requests, and the caller makes a new one.
pub struct TokenFetcher {
    connection: Mutex<RawConnection>,
    next_request: AtomicU64,
    request_timeout: Duration,
}

impl TokenFetcher {
    /// Connects and opens an anonymous session.
    pub async fn connect(connect: ConnectConfig) -> Result<TokenFetcher, ClientError> {
        let mut connection = RawConnection::connect(&connect).await?;
        connection.open_anonymous().await?;
        Ok(TokenFetcher {
            connection: Mutex::new(connection),
            next_request: AtomicU64::new(1),
            request_timeout: Duration::from_secs(30),
        })
    }

    /// Fetches and opens the token `reference` names. `password` is needed
    /// for a password-protected token; a wrong one counts against its limit.
    pub async fn get(
        &self,
        reference: &TokenRef,
        password: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let password_verifier = verifier_for(reference, password).await?;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::GetToken(GetToken {
            request_id: id,
            token_id: reference.id,
            password_verifier,
        });
        let mut connection = self.connection.lock().await;
        let exchange = async {
            connection.send(&frame).await?;
            loop {
                match connection.recv().await? {
                    Frame::TokenContent(content) if content.request_id == id => {
                        return Ok(content);
                    }
                    Frame::Error(error) if error.request_id == id || error.request_id == 0 => {
                        return Err(unexpected(Frame::Error(error)));
                    }
                    // Pongs and answers to requests that timed out earlier.
                    _ => continue,
                }
            }
        };
        let content = match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(result) => result.map_err(classify)?,
            Err(_) => return Err(ClientError::Timeout),
        };
        Ok(open_content(&reference.key, &content.content.0)?)
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.connection.into_inner().close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(salt: Option<[u8; SALT_LEN]>) -> TokenRef {
        TokenRef {
            id: TokenId([0xab; 32]),
            key: [0xcd; KEY_LEN],
            salt,
        }
    }

    #[test]
    fn a_reference_round_trips_through_its_text() {
        for salt in [None, Some([0xef; SALT_LEN])] {
            let reference = reference(salt);
            let text = reference.to_text();
            assert_eq!(text.parse::<TokenRef>(), Ok(reference), "{text}");
        }
        assert_eq!(
            reference(None).to_text(),
            format!("bbt1:{}:{}", "ab".repeat(32), "cd".repeat(32))
        );
    }

    #[test]
    fn bad_references_are_refused_with_the_reason() {
        let id = "ab".repeat(32);
        let key = "cd".repeat(32);
        let cases = [
            ("bbt2:x:y".to_owned(), ParseTokenRefError::WrongPrefix),
            (String::new(), ParseTokenRefError::WrongPrefix),
            (
                format!("bbt1:{id}"),
                ParseTokenRefError::WrongFieldCount { found: 2 },
            ),
            (
                format!("bbt1:{id}:{key}:00:00"),
                ParseTokenRefError::WrongFieldCount { found: 5 },
            ),
            (
                format!("bbt1:{}:{key}", "ab".repeat(31)),
                ParseTokenRefError::BadField {
                    field: "id",
                    expected: 64,
                },
            ),
            (
                format!("bbt1:{id}:{}", "zz".repeat(32)),
                ParseTokenRefError::BadField {
                    field: "key",
                    expected: 64,
                },
            ),
            (
                format!("bbt1:{id}:{key}:abc"),
                ParseTokenRefError::BadField {
                    field: "salt",
                    expected: 32,
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<TokenRef>(), Err(expected), "{text:?}");
        }
    }

    #[test]
    fn debug_shows_no_part_of_a_reference() {
        let shown = format!("{:?}", reference(Some([0xef; SALT_LEN])));
        assert!(
            !shown.contains("abab") && !shown.contains("cdcd") && !shown.contains("efef"),
            "{shown}"
        );
    }

    #[test]
    fn content_opens_only_with_its_key_and_unaltered() {
        let key = [7u8; KEY_LEN];
        let sealed = seal_content(&key, b"wifi: hunter2").expect("seals");
        assert_eq!(sealed[0], CONTENT_VERSION);
        assert_eq!(
            open_content(&key, &sealed).expect("opens"),
            b"wifi: hunter2"
        );
        assert!(matches!(
            open_content(&[8u8; KEY_LEN], &sealed),
            Err(TokenError::Undecryptable)
        ));
        let mut altered = sealed.clone();
        altered[5] ^= 1;
        assert!(matches!(
            open_content(&key, &altered),
            Err(TokenError::Undecryptable)
        ));
        let mut other_version = sealed;
        other_version[0] = 2;
        assert!(matches!(
            open_content(&key, &other_version),
            Err(TokenError::Undecryptable)
        ));
        assert!(matches!(
            open_content(&key, &[]),
            Err(TokenError::Undecryptable)
        ));
    }

    #[test]
    fn the_verifier_depends_on_password_and_salt_and_is_stable() {
        let salt = [1u8; SALT_LEN];
        let verifier = derive_verifier("correct horse", &salt).expect("derives");
        assert_eq!(
            derive_verifier("correct horse", &salt).expect("derives"),
            verifier
        );
        assert_ne!(
            derive_verifier("correct hors", &salt).expect("derives"),
            verifier
        );
        assert_ne!(
            derive_verifier("correct horse", &[2u8; SALT_LEN]).expect("derives"),
            verifier
        );
        // Pinned (also in docs/protocol.md): a change orphans every password.
        assert_eq!(
            hex::encode(
                derive_verifier("correct horse battery staple", &[0x99; SALT_LEN])
                    .expect("derives")
                    .0
            ),
            "274963c3cafc803778088bdcaff71f1280c8a3e19eaa47f77fd54950db38899a"
        );
    }
}
