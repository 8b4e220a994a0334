//! `RegisterCapability`, `RevokeCapability` and `ListCapabilities`: the
//! capabilities whose holders may send sealed envelopes to a mailbox. Only
//! the identity key registers and revokes them (see [`super::Access`]).

use std::sync::Arc;

use backbone_protocol::frame::{
    Capabilities, Done, ErrorCode, ListCapabilities, RegisterCapability, RevokeCapability,
};
use backbone_protocol::{Address, Frame};

use super::{blocking, error_frame, respond};
use crate::shared::Shared;

/// `owner` registers a capability for its mailbox, up to
/// `limits.max_capabilities`.
pub async fn register(shared: &Arc<Shared>, owner: Address, register: RegisterCapability) -> Frame {
    let id = register.request_id;
    let max = shared.config.limits.max_capabilities;
    let hash = register.capability_hash;
    let store = shared.directory.clone();
    // Synced before `Done`: a contact may be handed the capability as soon
    // as it is confirmed.
    let registered = blocking(move || {
        let added = store.register_capability(&owner, &hash, max)?;
        store.sync()?;
        Ok(added)
    })
    .await;
    respond(id, registered, |added| {
        if added {
            metrics::counter!("backbone_capabilities_registered_total").increment(1);
            Frame::Done(Done { request_id: id })
        } else {
            error_frame(
                id,
                ErrorCode::TooManyCapabilities,
                format!("this mailbox already holds {max} capabilities; revoke some first"),
            )
        }
    })
}

/// `owner` revokes one of its mailbox's capabilities.
pub async fn revoke(shared: &Arc<Shared>, owner: Address, revoke: RevokeCapability) -> Frame {
    let id = revoke.request_id;
    let hash = revoke.capability_hash;
    let store = shared.directory.clone();
    // Synced before `Done`: a revocation must survive a crash.
    let revoked = blocking(move || {
        let existed = store.revoke_capability(&owner, &hash)?;
        store.sync()?;
        Ok(existed)
    })
    .await;
    respond(id, revoked, |existed| {
        if existed {
            metrics::counter!("backbone_capabilities_revoked_total").increment(1);
            Frame::Done(Done { request_id: id })
        } else {
            error_frame(id, ErrorCode::NotFound, "no such capability is registered")
        }
    })
}

/// The hashes of `owner`'s capabilities.
pub async fn list(shared: &Arc<Shared>, owner: Address, list: ListCapabilities) -> Frame {
    let id = list.request_id;
    let store = shared.directory.clone();
    respond(
        id,
        blocking(move || store.capabilities(&owner)).await,
        |hashes| {
            Frame::Capabilities(Capabilities {
                request_id: id,
                hashes,
            })
        },
    )
}
