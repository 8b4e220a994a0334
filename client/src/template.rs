//! Relationship templates: what an owner shares so that others can ask for a
//! relationship with it (see `backbone_protocol::relationship`).
//!
//! A template is the owner's address and a delivery capability registered
//! with the owner's mailbox, stored as the content of a [`crate::token`], so
//! only holders of the token's reference (a QR code, a link) can read it.
//! The broker sees a token and a capability hash; it cannot tell that they
//! make a template. Revoking the capability retires the template.

use backbone_protocol::Address;
use backbone_protocol::capability::DeliveryCapability;
use thiserror::Error;

/// The first bytes of a template's encoding.
const MAGIC: &[u8; 8] = b"BBTMPL01";
/// The encoding's length: magic, address, capability.
const LEN: usize = 8 + 32 + 32;

/// An owner's invitation to ask for a relationship.
#[derive(Clone, PartialEq, Eq)]
pub struct RelationshipTemplate {
    /// Whom to ask.
    pub owner: Address,
    /// What admits the request (a secret: `Debug` does not print it).
    pub capability: DeliveryCapability,
}

impl std::fmt::Debug for RelationshipTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelationshipTemplate")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Bytes that are not a relationship template.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "not a relationship template ({len} bytes; a template is {LEN} bytes starting with BBTMPL01)"
)]
pub struct TemplateError {
    /// The rejected content's length.
    pub len: usize,
}

impl RelationshipTemplate {
    /// The token content: `BBTMPL01`, the owner's address, the capability.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.owner.0);
        bytes.extend_from_slice(&self.capability.0);
        bytes
    }

    /// Parses [`RelationshipTemplate::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TemplateError> {
        let error = TemplateError { len: bytes.len() };
        if bytes.len() != LEN || !bytes.starts_with(MAGIC) {
            return Err(error);
        }
        let owner: [u8; 32] = bytes[8..40].try_into().map_err(|_| error.clone())?;
        let capability: [u8; 32] = bytes[40..].try_into().map_err(|_| error)?;
        Ok(Self {
            owner: Address(owner),
            capability: DeliveryCapability(capability),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_round_trip_and_other_bytes_are_refused() {
        let template = RelationshipTemplate {
            owner: Address([3; 32]),
            capability: DeliveryCapability([4; 32]),
        };
        let bytes = template.to_bytes();
        assert_eq!(
            RelationshipTemplate::from_bytes(&bytes),
            Ok(template.clone())
        );
        assert!(RelationshipTemplate::from_bytes(&bytes[..71]).is_err());
        assert!(RelationshipTemplate::from_bytes(b"the spare key is under the mat").is_err());
        let mut other = bytes;
        other[0] = b'X';
        assert_eq!(
            RelationshipTemplate::from_bytes(&other),
            Err(TemplateError { len: 72 })
        );
        assert!(
            !format!("{template:?}").contains("0404"),
            "the capability stays out of Debug"
        );
    }
}
