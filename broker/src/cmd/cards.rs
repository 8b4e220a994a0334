//! `PublishCard` and `FetchCard`: an identity's card, published by its
//! owner, fetched by anyone (a sealed sender needs the recipient's card)
//! from the node that owns the address.

use std::sync::Arc;

use backbone_protocol::fleet::{PeerCardResult, PeerFetchCard, PeerFrame};
use backbone_protocol::frame::{CardResult, Done, ErrorCode, FetchCard, PublishCard};
use backbone_protocol::{Address, Frame, IdentityCard};
use tracing::warn;

use super::{blocking, error_frame, respond, shard_unavailable};
use crate::fleet::Route;
use crate::shared::Shared;
use crate::store::StoreError;
use crate::store::prelude::*;

/// `owner` publishes its card, which must be signed by its key.
pub async fn publish(shared: &Arc<Shared>, owner: Address, publish: PublishCard) -> Frame {
    let id = publish.request_id;
    if let Err(error) = publish.card.verify(&owner) {
        return error_frame(id, ErrorCode::InvalidCard, error.to_string());
    }
    let store = shared.directory.clone();
    respond(
        id,
        blocking(move || store.put_card(&publish.card)).await,
        |()| Frame::Done(Done { request_id: id }),
    )
}

/// Answers a card lookup, for authenticated and anonymous sessions alike.
pub async fn fetch(shared: &Arc<Shared>, fetch: FetchCard) -> Frame {
    let id = fetch.request_id;
    if let Route::Remote(node) = shared.fleet.route(&fetch.address) {
        return fetch_remote(shared, &node.name, id, fetch.address).await;
    }
    if shared.fleet.is_importing(&fetch.address) {
        return shard_unavailable(shared, id, "this card is being handed over to this node");
    }
    let store = shared.directory.clone();
    match blocking(move || card_here(store.as_ref(), &fetch.address)).await {
        Ok(Ok(card)) => Frame::CardResult(CardResult {
            request_id: id,
            card,
        }),
        Ok(Err(code)) => error_frame(id, code, card_refusal(code)),
        Err((code, message)) => error_frame(id, code, message),
    }
}

/// The card of `address` from this node's store, as a card lookup answers
/// it (a client's here, or a peer node's): `UnknownAddress` without one,
/// `IdentityDeleted` once the identity's purge has begun. Blocking.
pub fn card_here(store: &dyn Directory, address: &Address) -> Result<IdentityCard, ErrorCode> {
    let stored = || -> Result<Result<IdentityCard, ErrorCode>, StoreError> {
        if store
            .deletion(address)?
            .is_some_and(|deletion| deletion.is_tombstone())
        {
            return Ok(Err(ErrorCode::IdentityDeleted));
        }
        Ok(store.card(address)?.ok_or(ErrorCode::UnknownAddress))
    };
    stored().unwrap_or_else(|error| {
        warn!(%error, "reading a card failed");
        Err(ErrorCode::StorageFailure)
    })
}

fn card_refusal(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownAddress => "no card for this address",
        ErrorCode::IdentityDeleted => "this identity was deleted",
        _ => "the card could not be read",
    }
}

/// A card lookup relayed to `node`, the owner of `address`.
async fn fetch_remote(shared: &Shared, node: &str, id: u64, address: Address) -> Frame {
    let Some(links) = shared.fleet.links() else {
        return error_frame(id, ErrorCode::Internal, "no fleet links");
    };
    let answer = links
        .request(node, |request_id| {
            PeerFrame::FetchCard(PeerFetchCard {
                request_id,
                address,
            })
        })
        .await;
    match answer {
        Ok(PeerFrame::CardResult(PeerCardResult {
            result: Ok(card), ..
        })) => Frame::CardResult(CardResult {
            request_id: id,
            card,
        }),
        Ok(PeerFrame::CardResult(PeerCardResult {
            result: Err(code), ..
        })) => {
            let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal);
            let message = format!("card lookup on node {node} failed");
            if code == ErrorCode::ShardUnavailable {
                shard_unavailable(shared, id, message)
            } else {
                error_frame(id, code, message)
            }
        }
        Ok(_) => error_frame(
            id,
            ErrorCode::Internal,
            "unexpected answer from the owner node",
        ),
        Err(error) => shard_unavailable(shared, id, error.to_string()),
    }
}

/// The answer to a card lookup another node relays to this one: the card
/// if this node owns the address (and is not still receiving it).
pub async fn answer_peer(shared: &Arc<Shared>, fetch: PeerFetchCard) -> PeerFrame {
    let result = if !matches!(shared.fleet.route(&fetch.address), Route::Local)
        || shared.fleet.is_importing(&fetch.address)
    {
        Err(ErrorCode::ShardUnavailable as u16)
    } else {
        let store = shared.directory.clone();
        let address = fetch.address;
        match blocking(move || card_here(store.as_ref(), &address)).await {
            Ok(card) => card.map_err(|code| code as u16),
            Err(_) => Err(ErrorCode::Internal as u16),
        }
    };
    PeerFrame::CardResult(PeerCardResult {
        request_id: fetch.request_id,
        result,
    })
}
