//! Files: large encrypted blobs, uploaded and downloaded on their own QUIC
//! streams, shared by a capability rather than a bare id.
//!
//! **Creating.** The owner (an authenticated identity) encrypts the file
//! itself, then announces it with `CreateFile`: its size, the BLAKE3 hash of
//! the bytes it will upload ([`ContentHash`]), a TTL, and the hash of a
//! fresh [`FileSecret`] ([`FileSecret::hash`]). The broker reserves the
//! size against the owner's quota, draws a [`FileId`] in the owner's slot
//! (like a token id, so the file lives on the owner's node and moves with
//! its mailbox) and answers `FileCreated`.
//!
//! **Uploading** is resumable. The client opens a new bidirectional stream,
//! writes an `UploadFile` frame naming the file and the offset it resumes
//! at, then the raw bytes from that offset, and finishes the stream. The
//! offset must equal the bytes the broker already holds (`FileStatus`
//! tells); the broker answers on the same stream with a `FileState`. When
//! the last byte arrives the broker checks the content hash: a mismatch
//! discards the upload (`ContentMismatch`); a match makes the file
//! complete, durable before the answer. `FileState` repeats the declared
//! content hash, so a client resuming an upload it did not announce can
//! check its source against it before sealing anything: sealing other
//! content under the same key would reuse the key's nonces.
//!
//! **Downloading** needs the capability: the id *and* the secret, which the
//! owner puts inside the (end-to-end encrypted) message that shares the
//! file. The client opens a stream and writes `DownloadFile` with both and
//! an offset; the broker answers with a `FileData` header and the raw bytes
//! from that offset to the end, then finishes the stream. An anonymous
//! session may download; holding the capability is the permission. The
//! broker stores only the secret's hash, so its disk alone grants nothing.
//!
//! The owner deletes a file with `DeleteFile`; the broker deletes it at its
//! expiry too.

use crate::identity::Address;
use crate::token::id_in_slot_of;

pub use crate::bytes::{ContentHash, FileId, FileSecret, FileSecretHash};

/// The BLAKE3 key-derivation context of [`FileSecret::hash`].
pub const SECRET_HASH_CONTEXT: &str = "backbone file secret v1";

impl FileId {
    /// A fresh id in `owner`'s slot, from the operating system's secure
    /// random source (see [`crate::token::token_id_in_slot_of`]).
    pub fn random_in_slot_of(owner: &Address) -> FileId {
        FileId(id_in_slot_of(owner, |bytes| rand::fill(&mut bytes[..])))
    }

    /// The address the file routes as: the node owning this address's slot
    /// holds the file.
    pub fn route_address(&self) -> Address {
        Address(self.0)
    }
}

impl FileSecret {
    /// The hash the broker stores and compares:
    /// `blake3::derive_key("backbone file secret v1", secret)`.
    pub fn hash(&self) -> FileSecretHash {
        FileSecretHash(blake3::derive_key(SECRET_HASH_CONTEXT, &self.0))
    }
}

impl FileSecretHash {
    /// Compares in constant time (through `blake3::Hash`'s equality).
    pub fn matches(&self, other: &FileSecretHash) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

impl ContentHash {
    /// The BLAKE3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &ContentHash) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

/// Why the bytes of an upload stream do not fit the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// The stream starts elsewhere than where the broker's copy ends.
    #[error("the upload must resume at byte {held}, not {offset}")]
    WrongOffset {
        /// Bytes the broker holds.
        held: u64,
        /// The offset the stream named.
        offset: u64,
    },
    /// The stream carries more bytes than the declared size leaves room for.
    #[error("the file was declared with {size} bytes; the upload goes past it")]
    PastTheEnd {
        /// The declared size.
        size: u64,
    },
    /// The file is complete; nothing more can be uploaded.
    #[error("the file is already complete")]
    Complete,
}

/// Checks an upload stream's start: `offset` must equal `held`, the bytes
/// the broker holds of a file of `size` bytes. Returns how many bytes the
/// stream may carry.
pub fn upload_room(size: u64, held: u64, offset: u64) -> Result<u64, UploadError> {
    // Holding more than the declared size cannot come from uploads (each is
    // cut at the size), but an empty file with bytes on disk must not get a
    // room of `0 - held` (found by the file_token_logic fuzz target).
    if held > size || (held == size && size > 0) {
        return Err(UploadError::Complete);
    }
    if offset != held {
        return Err(UploadError::WrongOffset { held, offset });
    }
    Ok(size - held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::slot_of;

    #[test]
    fn a_file_id_lands_in_its_owners_slot() {
        let owner = Address([0x42; 32]);
        let id = FileId::random_in_slot_of(&owner);
        assert_eq!(slot_of(&id.route_address()), slot_of(&owner));
    }

    #[test]
    fn the_secret_hash_is_pinned_and_compares() {
        // Changing the derivation makes every stored file undownloadable;
        // this vector (also in docs/protocol.md) pins it.
        let secret = FileSecret([0x77; 32]);
        assert_eq!(
            hex::encode(secret.hash().0),
            hex::encode(blake3::derive_key("backbone file secret v1", &[0x77; 32]))
        );
        assert!(secret.hash().matches(&secret.hash()));
        assert!(!secret.hash().matches(&FileSecret([0x78; 32]).hash()));
        assert_eq!(format!("{secret:?}"), "FileSecret(redacted)");
    }

    #[test]
    fn an_upload_resumes_exactly_where_the_held_bytes_end() {
        assert_eq!(upload_room(100, 0, 0), Ok(100));
        assert_eq!(upload_room(100, 40, 40), Ok(60));
        assert_eq!(
            upload_room(100, 40, 0),
            Err(UploadError::WrongOffset {
                held: 40,
                offset: 0
            })
        );
        assert_eq!(
            upload_room(100, 40, 41),
            Err(UploadError::WrongOffset {
                held: 40,
                offset: 41
            })
        );
        assert_eq!(upload_room(100, 100, 100), Err(UploadError::Complete));
        // An empty file is complete once its (empty) upload is checked.
        assert_eq!(upload_room(0, 0, 0), Ok(0));
        // More held than declared is complete, never a negative room.
        assert_eq!(upload_room(0, 5, 5), Err(UploadError::Complete));
        assert_eq!(upload_room(10, 12, 12), Err(UploadError::Complete));
    }

    #[test]
    fn the_content_hash_is_blake3() {
        assert_eq!(ContentHash::of(b"abc").0, *blake3::hash(b"abc").as_bytes());
        assert!(ContentHash::of(b"abc").matches(&ContentHash::of(b"abc")));
        assert!(!ContentHash::of(b"abc").matches(&ContentHash::of(b"abd")));
    }
}
