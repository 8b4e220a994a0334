//! Byte newtypes with a fixed wire layout.
//!
//! Fixed-size values travel as their raw bytes with no length prefix;
//! variable-size bytes ([`Blob`]) travel as a `u64` little-endian length and the
//! bytes. Deserialization of a [`Blob`] borrows from the input first, so a
//! forged length is rejected as truncated input before anything is allocated.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

macro_rules! fixed_bytes {
    ($(#[$meta:meta])* $name:ident, $len:expr) => {
        fixed_bytes!(@common $(#[$meta])* $name, $len);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }
    };
    // A secret: the same layout, but `Debug` never shows the bytes, so a
    // secret cannot reach a log through a `{:?}` of the frame carrying it.
    (secret $(#[$meta:meta])* $name:ident, $len:expr) => {
        fixed_bytes!(@common $(#[$meta])* $name, $len);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(redacted)", stringify!($name))
            }
        }
    };
    (@common $(#[$meta:meta])* $name:ident, $len:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// A value filled from the operating system's secure random source.
            pub fn random() -> Self {
                let mut bytes = [0u8; $len];
                rand::fill(&mut bytes[..]);
                Self(bytes)
            }
        }

        impl From<[u8; $len]> for $name {
            fn from(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut tuple = serializer.serialize_tuple($len)?;
                for byte in &self.0 {
                    tuple.serialize_element(byte)?;
                }
                tuple.end()
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct FixedVisitor;
                impl<'de> Visitor<'de> for FixedVisitor {
                    type Value = [u8; $len];
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} bytes", $len)
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                        let mut out = [0u8; $len];
                        for (index, slot) in out.iter_mut().enumerate() {
                            *slot = seq
                                .next_element()?
                                .ok_or_else(|| de::Error::invalid_length(index, &self))?;
                        }
                        Ok(out)
                    }
                }
                deserializer.deserialize_tuple($len, FixedVisitor).map($name)
            }
        }
    };
}

fixed_bytes!(
    /// An ed25519 signature.
    Signature,
    64
);
fixed_bytes!(
    /// A 32-byte single-use random challenge.
    Nonce,
    32
);
fixed_bytes!(
    /// The broker node's stable identifier, bound into auth signatures.
    ServerId,
    32
);
fixed_bytes!(
    /// A broker-assigned message id, unique per accepted send.
    MessageId,
    16
);
fixed_bytes!(
    /// An X25519 public key used to seal envelopes to an identity.
    EncryptionKey,
    32
);
fixed_bytes!(
    secret
    /// A delivery capability: 32 random bytes a recipient hands to one
    /// contact, who presents them with each sealed send. Only its hash
    /// ([`CapabilityHash`], see [`crate::capability`]) is registered with
    /// the broker. Secret: `Debug` prints `DeliveryCapability(redacted)`.
    DeliveryCapability,
    32
);
fixed_bytes!(
    /// The hash of a [`DeliveryCapability`], registered with the recipient's
    /// mailbox (see [`crate::capability`]).
    CapabilityHash,
    32
);

fixed_bytes!(
    secret
    /// A token's id: 32 random bytes chosen by the broker (see
    /// [`crate::token`]). Whoever holds it may fetch the token, so it is a
    /// bearer secret: `Debug` prints `TokenId(redacted)`.
    TokenId,
    32
);
fixed_bytes!(
    secret
    /// What a client derives from a token's password (see [`crate::token`])
    /// and presents instead of the password. Secret: `Debug` prints
    /// `PasswordVerifier(redacted)`.
    PasswordVerifier,
    32
);
fixed_bytes!(
    secret
    /// The hash of a [`PasswordVerifier`] that the broker stores with a
    /// password-protected token. `Debug` never prints it either.
    VerifierHash,
    32
);
fixed_bytes!(
    /// A relationship's id, chosen by the owner's node when the request
    /// arrives; both sides record it (see [`crate::relationship`]).
    RelationshipId,
    16
);

fixed_bytes!(
    /// A file's id: 32 random bytes chosen by the broker in the owner's slot
    /// (see [`crate::file`]). Not enough on its own to download the file.
    FileId,
    32
);
fixed_bytes!(
    secret
    /// The secret half of a file's download capability (see [`crate::file`]):
    /// 32 random bytes the uploader puts in the message that shares the
    /// file. Secret: `Debug` prints `FileSecret(redacted)`.
    FileSecret,
    32
);
fixed_bytes!(
    /// The hash of a [`FileSecret`] that the broker stores with the file.
    FileSecretHash,
    32
);
fixed_bytes!(
    /// The BLAKE3 hash of a file's (encrypted) content, declared when the
    /// file is created and checked when its last byte arrives.
    ContentHash,
    32
);

/// Variable-length opaque bytes (envelopes, addresses of other nodes).
///
/// Shared, not copied: a clone is a reference count, so one envelope can go
/// to the log, to every recipient and to every push without its bytes being
/// copied. A `Blob` decoded from a large frame is a slice of that frame's
/// bytes (see [`crate::codec`]), not a copy of them.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Blob(pub Bytes);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Envelope bytes are never printed: logs must not carry ciphertext.
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Blob {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Bytes::from(bytes))
    }
}

impl From<Bytes> for Blob {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl From<&[u8]> for Blob {
    fn from(bytes: &[u8]) -> Self {
        Self(Bytes::copy_from_slice(bytes))
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BlobVisitor;
        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                // A slice of the frame being decoded, when the codec
                // decodes from shared bytes; else a copy.
                Ok(crate::codec::shared_slice(v).unwrap_or_else(|| Bytes::copy_from_slice(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(Bytes::from(v))
            }
        }
        deserializer.deserialize_bytes(BlobVisitor).map(Blob)
    }
}

/// Short UTF-8 text (error messages, node addresses), borrowed on decode like [`Blob`].
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct Text(pub String);

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("UTF-8 text")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(v.to_owned())
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(v)
            }
        }
        deserializer.deserialize_str(TextVisitor).map(Text)
    }
}
