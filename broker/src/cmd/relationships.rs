//! Relationship requests and decisions, and inbound policies, across the fleet.
//!
//! Each side of a relationship is kept by its own mailbox actor, on the node
//! that owns its address (see `backbone_protocol::relationship`). A request
//! or decision changes the **other** side first, wherever it lives (this
//! node's mailbox actor, or the owner node through a
//! [`PeerFrame::Consent`]), and then the asking side, here: so a side that
//! says "active" never lacks a counterpart that agreed. Every change is
//! idempotent, so a failure in between (a link down, a crash) is repaired by
//! retrying the same request.

use std::sync::Arc;

use backbone_protocol::Address;
use backbone_protocol::bytes::Text;
use backbone_protocol::fleet::{PeerConsent, PeerConsentResult, PeerFrame};
use backbone_protocol::frame::{
    DecideRelationship, Done, ErrorCode, ErrorFrame, Frame, RelationshipChanged, Relationships,
    RequestRelationship,
};
use backbone_protocol::relationship::{self, Relationship, SideChange};

use crate::fleet::Route;
use crate::shared::Shared;

/// A refusal: a wire code and a reason.
pub type Refusal = (ErrorCode, String);

fn error(id: u64, (code, message): Refusal) -> Frame {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(ErrorFrame::new(id, code, message))
}

/// Applies `change` to `side`'s record of its relationship with `peer`, on
/// the node that owns `side`.
pub async fn apply(
    shared: &Arc<Shared>,
    side: Address,
    peer: Address,
    change: SideChange,
) -> Result<Relationship, Refusal> {
    match shared.fleet.route(&side) {
        Route::Local => apply_here(shared, side, peer, change).await,
        Route::Remote(node) => {
            let node = node.name.clone();
            let Some(links) = shared.fleet.links() else {
                return Err((ErrorCode::Internal, "no fleet links".into()));
            };
            let answer = links
                .request(&node, |request_id| {
                    PeerFrame::Consent(PeerConsent {
                        request_id,
                        address: side,
                        peer,
                        change,
                    })
                })
                .await;
            match answer {
                Ok(PeerFrame::ConsentResult(PeerConsentResult { result, .. })) => {
                    result.map_err(|(code, reason)| {
                        (
                            ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
                            reason.0,
                        )
                    })
                }
                Ok(_) => Err((
                    ErrorCode::Internal,
                    "unexpected answer from the owner node".into(),
                )),
                Err(error) => Err((
                    ErrorCode::ShardUnavailable,
                    format!("node {node} is unreachable: {error}"),
                )),
            }
        }
    }
}

/// [`apply`] for a side this node owns; also the peer link's handler.
pub async fn apply_here(
    shared: &Arc<Shared>,
    side: Address,
    peer: Address,
    change: SideChange,
) -> Result<Relationship, Refusal> {
    if !matches!(shared.fleet.route(&side), Route::Local) || shared.fleet.is_importing(&side) {
        return Err((
            ErrorCode::ShardUnavailable,
            "this node does not serve that address now".into(),
        ));
    }
    shared
        .registry
        .change_relationship(&side, peer, change)
        .await
        .map_err(|error| (error.code(), error.to_string()))
}

/// The answer to a [`PeerFrame::Consent`].
pub async fn answer_peer(shared: &Arc<Shared>, consent: PeerConsent) -> PeerFrame {
    let result = apply_here(shared, consent.address, consent.peer, consent.change).await;
    PeerFrame::ConsentResult(PeerConsentResult {
        request_id: consent.request_id,
        result: result.map_err(|(code, reason)| (code as u16, Text(reason))),
    })
}

/// `requester` asks `request.owner` for a relationship; its rate was
/// checked by [`super::gate`].
pub async fn request(
    shared: &Arc<Shared>,
    requester: Address,
    request: RequestRelationship,
) -> Frame {
    let id = request.request_id;
    if request.owner == requester {
        return error(
            id,
            (
                ErrorCode::InvalidRecipients,
                "an identity cannot ask itself for a relationship".into(),
            ),
        );
    }
    let limit = shared.config.limits.max_envelope_size;
    if request.intro.0.len() as u64 > limit.as_u64() {
        return error(
            id,
            (
                ErrorCode::EnvelopeTooLarge,
                format!("the introduction exceeds {limit}"),
            ),
        );
    }
    let change = SideChange::Request {
        capability_hash: request.capability.hash(),
        intro: request.intro,
    };
    let owner_side = match apply(shared, request.owner, requester, change).await {
        Ok(record) => record,
        Err(refusal) => return error(id, refusal),
    };
    let change = SideChange::Requested { id: owner_side.id };
    match apply(shared, requester, request.owner, change).await {
        Ok(relationship) => Frame::RelationshipChanged(RelationshipChanged {
            request_id: id,
            relationship,
        }),
        Err(refusal) => error(id, refusal),
    }
}

/// `side` decides about its relationship with `decision.peer`.
pub async fn decide(shared: &Arc<Shared>, side: Address, decision: DecideRelationship) -> Frame {
    let id = decision.request_id;
    let store = shared.directory.clone();
    let peer = decision.peer;
    let records = tokio::task::spawn_blocking(move || store.relationships(&side)).await;
    let record = match records {
        Ok(Ok(records)) => records.into_iter().find(|r| r.peer == peer),
        Ok(Err(e)) => return error(id, (ErrorCode::StorageFailure, e.to_string())),
        Err(e) => return error(id, (ErrorCode::Internal, e.to_string())),
    };
    let Some(record) = record else {
        return error(
            id,
            (
                ErrorCode::NotFound,
                "no relationship with this identity".into(),
            ),
        );
    };
    // Checked here first so a decision this side may not take never reaches
    // the other side; the actor checks again when applying it.
    if let Err(refusal) = relationship::decide(record.state, record.role, decision.decision) {
        return error(id, (ErrorCode::InvalidTransition, refusal.to_string()));
    }
    let theirs = SideChange::Decide {
        id: record.id,
        decision: decision.decision,
        by_peer: true,
    };
    match apply(shared, peer, side, theirs).await {
        Ok(_) => {}
        // The other side has no such record (never got it, or its identity
        // is gone or deleted): ending or refusing still takes effect on this
        // side, so consent can always be withdrawn. Accepting cannot.
        Err((ErrorCode::NotFound | ErrorCode::IdentityDeleted, _))
            if decision.decision != relationship::Decision::Accept => {}
        Err(refusal) => return error(id, refusal),
    }
    let ours = SideChange::Decide {
        id: record.id,
        decision: decision.decision,
        by_peer: false,
    };
    match apply(shared, side, peer, ours).await {
        Ok(relationship) => Frame::RelationshipChanged(RelationshipChanged {
            request_id: id,
            relationship,
        }),
        Err(refusal) => error(id, refusal),
    }
}

/// The identity's policy and relationship records.
pub async fn list(shared: &Arc<Shared>, address: Address, id: u64) -> Frame {
    let store = shared.directory.clone();
    let default = shared.config.relationships.default_inbound_policy;
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((
            store.inbound_policy(&address)?,
            store.relationships(&address)?,
        ))
    })
    .await;
    match read {
        Ok(Ok((policy, relationships))) => Frame::Relationships(Relationships {
            request_id: id,
            policy: policy.unwrap_or(default),
            relationships,
        }),
        Ok(Err(e)) => error(id, (ErrorCode::StorageFailure, e.to_string())),
        Err(e) => error(id, (ErrorCode::Internal, e.to_string())),
    }
}

/// Sets the identity's inbound policy.
pub async fn set_policy(
    shared: &Arc<Shared>,
    address: Address,
    id: u64,
    policy: relationship::InboundPolicy,
) -> Frame {
    match shared.registry.set_policy(&address, policy).await {
        Ok(()) => Frame::Done(Done { request_id: id }),
        Err(e) => error(id, (e.code(), e.to_string())),
    }
}

/// The refusal of an envelope that starts like a broker notice.
pub fn reserved() -> Refusal {
    (
        ErrorCode::ReservedEnvelope,
        "envelopes must not start with the bytes reserved for broker notices".into(),
    )
}
