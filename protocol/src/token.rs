//! Tokens: encrypted blobs shared through a side channel (a QR code, a
//! link), fetched by whoever holds their id.
//!
//! An authenticated identity stores a token (`CreateToken`); the broker
//! picks its [`TokenId`] and answers with it. Anyone holding the id fetches
//! the token (`GetToken`), on an authenticated or an anonymous session;
//! the owner deletes it (`DeleteToken`), and it expires at its TTL.
//!
//! **Where a token lives.** The broker draws the id at random *in its
//! creator's slot*: it draws 32 random bytes until `slot_of(Address(id))`
//! equals `slot_of(creator)` ([`token_id_in_slot_of`]). A token therefore
//! lives on its creator's home node, moves with the creator's mailbox when
//! the slot changes owner, and any node finds that node by routing the id
//! as if it were an address. The constraint costs 12 of the id's 256
//! random bits; 244 unguessable bits remain.
//!
//! **Passwords** are checked by the broker without it learning them: the
//! client derives a [`PasswordVerifier`] from the password with a slow KDF
//! (the client's business, see `docs/protocol.md`), sends the verifier, and
//! the broker keeps only [`PasswordVerifier::hash`], a domain-separated
//! BLAKE3 hash, which it compares in constant time.

use crate::fleet::slot_of;
use crate::identity::Address;

pub use crate::bytes::{PasswordVerifier, TokenId, VerifierHash};

/// The BLAKE3 key-derivation context of [`PasswordVerifier::hash`].
pub const VERIFIER_HASH_CONTEXT: &str = "backbone token verifier v1";

/// Draws token ids from `random` until one falls into `owner`'s slot, and
/// returns it. `random` fills its argument with fresh random bytes (the
/// broker passes the operating system's secure source).
///
/// With 4096 slots this takes 4096 draws on average; the chance of needing
/// more than 100 000 is below 10⁻¹⁰.
pub fn token_id_in_slot_of(owner: &Address, random: impl FnMut(&mut [u8; 32])) -> TokenId {
    TokenId(id_in_slot_of(owner, random))
}

/// Draws 32 bytes from `random` until they route, as an address, to
/// `owner`'s slot. Token and file ids are drawn this way.
pub(crate) fn id_in_slot_of(owner: &Address, mut random: impl FnMut(&mut [u8; 32])) -> [u8; 32] {
    let slot = slot_of(owner);
    loop {
        let mut id = [0u8; 32];
        random(&mut id);
        if slot_of(&Address(id)) == slot {
            return id;
        }
    }
}

impl TokenId {
    /// A fresh id in `owner`'s slot, from the operating system's secure
    /// random source (see [`token_id_in_slot_of`]).
    pub fn random_in_slot_of(owner: &Address) -> TokenId {
        token_id_in_slot_of(owner, |bytes| rand::fill(&mut bytes[..]))
    }

    /// The address the token routes as: the node owning this address's slot
    /// holds the token.
    pub fn route_address(&self) -> Address {
        Address(self.0)
    }
}

impl PasswordVerifier {
    /// The hash the broker stores and compares:
    /// `blake3::derive_key("backbone token verifier v1", verifier)`.
    pub fn hash(&self) -> VerifierHash {
        VerifierHash(blake3::derive_key(VERIFIER_HASH_CONTEXT, &self.0))
    }
}

impl VerifierHash {
    /// Compares in constant time (through `blake3::Hash`'s equality), so the
    /// time a comparison takes does not tell how many bytes matched.
    pub fn matches(&self, other: &VerifierHash) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic byte stream: BLAKE3 in XOF mode over a seed.
    fn stream(seed: u8) -> impl FnMut(&mut [u8; 32]) {
        let mut reader = blake3::Hasher::new().update(&[seed]).finalize_xof();
        move |bytes| reader.fill(bytes)
    }

    #[test]
    fn a_token_id_lands_in_its_owners_slot() {
        for n in 0..16u8 {
            let owner = Address([n; 32]);
            let id = token_id_in_slot_of(&owner, stream(n));
            assert_eq!(slot_of(&id.route_address()), slot_of(&owner), "owner {n}");
        }
        let owner = Address([0x42; 32]);
        let id = TokenId::random_in_slot_of(&owner);
        assert_eq!(slot_of(&id.route_address()), slot_of(&owner));
    }

    #[test]
    fn the_search_skips_ids_of_other_slots() {
        // The first draw of this stream is in another slot than the owner's,
        // so the function must keep drawing: a version that returned the
        // first draw would fail here.
        let owner = Address([1; 32]);
        let mut first = [0u8; 32];
        stream(9)(&mut first);
        assert_ne!(slot_of(&Address(first)), slot_of(&owner));
        let id = token_id_in_slot_of(&owner, stream(9));
        assert_ne!(id.0, first);
        assert_eq!(slot_of(&id.route_address()), slot_of(&owner));
    }

    #[test]
    fn the_verifier_hash_is_pinned_and_compares() {
        // Changing the derivation locks out every stored password; this
        // vector (also in docs/protocol.md) pins it.
        let verifier = PasswordVerifier([0x77; 32]);
        assert_eq!(
            hex::encode(verifier.hash().0),
            "caf3654ca8b105c8fa5f5b862cd4577fee584c0a989e122ea17ca4c537f4ba8d"
        );
        assert!(verifier.hash().matches(&verifier.hash()));
        assert!(
            !verifier
                .hash()
                .matches(&PasswordVerifier([0x78; 32]).hash())
        );
    }

    #[test]
    fn debug_never_shows_token_secrets() {
        let shown = format!(
            "{:?} {:?} {:?}",
            TokenId([0xab; 32]),
            PasswordVerifier([0xab; 32]),
            PasswordVerifier([0xab; 32]).hash()
        );
        assert!(!shown.contains("abab"), "{shown}");
        assert!(shown.contains("TokenId(redacted)"));
    }
}
