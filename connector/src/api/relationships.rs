//! `/api/v1/relationships`: the relationships and the inbound policy as the
//! Backbone holds them, relationship templates to hand out, requests with a
//! template, and decisions.

use axum::extract::State;
use axum::http::StatusCode;
use backbone_client::{ClientError, TokenError, TokenRef};
use backbone_protocol::ErrorCode;
use backbone_protocol::relationship::{Decision, InboundPolicy, Relationship, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::tokens::{expires_at, password_of};
use super::{ApiError, ApiJson, ApiPath, AppState, parse_address, ttl_or};
use crate::db::{Published, PublishedKind, RelationshipRecord};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(set_policy))
        .routes(routes!(list_templates, create_template))
        .routes(routes!(withdraw_template))
        .routes(routes!(request))
        .routes(routes!(decide))
}

/// The local record of one side's view of a relationship.
pub fn record_of(relationship: &Relationship) -> RelationshipRecord {
    RelationshipRecord {
        id: hex::encode(relationship.id.0),
        peer: relationship.peer.to_string(),
        role: match relationship.role {
            Role::Owner => "owner",
            Role::Requester => "requester",
        }
        .to_owned(),
        state: match relationship.state {
            backbone_protocol::relationship::State::Pending => "pending",
            backbone_protocol::relationship::State::Active => "active",
            backbone_protocol::relationship::State::Rejected => "rejected",
            backbone_protocol::relationship::State::Terminated => "terminated",
        }
        .to_owned(),
        changed_at_ms: relationship.changed_at_ms,
    }
}

/// The inbound policy and every relationship, as the Backbone holds them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RelationshipList {
    /// `anyone`, or `relationships-only`: then the Backbone refuses messages
    /// from identities without an active relationship.
    pub policy: String,
    /// This side's view of each relationship.
    pub relationships: Vec<RelationshipRecord>,
}

/// Lists the relationships live from the Backbone, and refreshes the local
/// copy with them.
#[utoipa::path(operation_id = "relationships_list", get, path = "/api/v1/relationships", responses(
    (status = 200, body = RelationshipList),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn list(State(state): State<AppState>) -> Result<ApiJson<RelationshipList>, ApiError> {
    let client = state.client()?;
    let (policy, relationships) = client.relationships().await?;
    let mut records = Vec::with_capacity(relationships.len());
    for relationship in &relationships {
        let record = record_of(relationship);
        // No event: a change is announced when its notice arrives, and this
        // only refreshes the copy that the notice would bring up to date.
        state.db.record_relationship(record.clone()).await?;
        records.push(record);
    }
    Ok(ApiJson(RelationshipList {
        policy: policy.as_str().to_owned(),
        relationships: records,
    }))
}

/// `PUT /api/v1/relationships/policy`, and its answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `anyone` or `relationships-only`.
    pub policy: String,
}

/// Sets the inbound policy at the Backbone.
#[utoipa::path(operation_id = "relationships_set_policy", put, path = "/api/v1/relationships/policy", request_body = Policy, responses(
    (status = 200, description = "The policy now in force", body = Policy),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn set_policy(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<Policy>,
) -> Result<ApiJson<Policy>, ApiError> {
    let policy: InboundPolicy = request
        .policy
        .parse()
        .map_err(|error| ApiError::invalid(format!("policy: {error}")))?;
    state.client()?.set_inbound_policy(policy).await?;
    Ok(ApiJson(Policy {
        policy: policy.as_str().to_owned(),
    }))
}

/// `POST /api/v1/relationships/templates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// How long the template can be used (seconds; default
    /// `messages.default_ttl`; the Backbone may cap it).
    pub ttl_secs: Option<u64>,
    /// A password that whoever uses the template must give too.
    pub password: Option<String>,
}

/// Publishes a relationship template: whoever holds its reference can ask
/// this identity for a relationship until it expires.
#[utoipa::path(operation_id = "relationships_create_template", post, path = "/api/v1/relationships/templates", request_body = CreateTemplate, responses(
    (status = 201, description = "Published; hand out `reference`", body = Published),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "A quota on the Backbone is full", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn create_template(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateTemplate>,
) -> Result<(StatusCode, ApiJson<Published>), ApiError> {
    let ttl = ttl_or(request.ttl_secs, state.config.messages.default_ttl)?;
    let password = password_of(request.password)?;
    let client = state.client()?;
    let created_at_ms = backbone_protocol::unix_millis_now();
    // The capability's hash is kept so that withdrawing the template can
    // revoke it; the capability itself lives only in the template's token.
    let (reference, capability) = client
        .create_relationship_template(ttl, password.as_deref())
        .await?;
    let record = state
        .db
        .record_template(
            Published {
                // The database numbers templates; this is replaced.
                id: String::new(),
                reference: reference.to_text(),
                password_protected: reference.has_password(),
                size: 0,
                name: None,
                created_at_ms,
                expires_at_ms: expires_at(created_at_ms, ttl),
            },
            hex::encode(capability.hash().0),
        )
        .await?;
    Ok((StatusCode::CREATED, ApiJson(record)))
}

/// Withdraws a template this Connector published: the delivery capability
/// behind it is revoked (requests through it are refused from then on,
/// also by anyone who fetched it already) and its token deleted.
#[utoipa::path(operation_id = "relationships_withdraw_template", delete, path = "/api/v1/relationships/templates/{id}", params(
    ("id" = String, Path, description = "The template's id, as listed"),
), responses(
    (status = 204, description = "Withdrawn"),
    (status = 404, description = "Not a template of this Connector", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn withdraw_template(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let (reference, capability_hash) = state
        .db
        .template(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no template {id}")))?;
    let client = state.client()?;
    if let Some(hash) = capability_hash {
        let bytes: [u8; 32] = hex::decode(&hash)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| {
                ApiError::internal(format!("template {id}: a corrupt capability hash"))
            })?;
        match client
            .revoke_capability(&backbone_client::CapabilityHash(bytes))
            .await
        {
            Ok(()) => {}
            // Revoked already (a withdrawal that failed half-way).
            Err(ClientError::Server { code, .. })
                if code == ErrorCode::UnknownCapability as u16 => {}
            Err(error) => return Err(error.into()),
        }
    }
    let token: TokenRef = reference
        .parse()
        .map_err(|error| ApiError::internal(format!("template {id}'s reference: {error}")))?;
    match client.delete_token(&token.id).await {
        // Expired or deleted already: the template is gone either way.
        Ok(()) | Err(ClientError::Token(TokenError::NotFound)) => {}
        Err(error) => return Err(error.into()),
    }
    state
        .db
        .delete_published(PublishedKind::Template, id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists the templates this Connector published.
#[utoipa::path(operation_id = "relationships_list_templates", get, path = "/api/v1/relationships/templates", responses(
    (status = 200, body = Vec<Published>),
))]
pub async fn list_templates(
    State(state): State<AppState>,
) -> Result<ApiJson<Vec<Published>>, ApiError> {
    Ok(ApiJson(
        state.db.list_published(PublishedKind::Template).await?,
    ))
}

/// `POST /api/v1/relationships/requests`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestRelationship {
    /// The template's reference (`bbt1:...`), as its owner handed it out.
    pub reference: String,
    /// The template's password, if it has one.
    pub password: Option<String>,
    /// An introduction for the owner, encrypted to it (default: empty).
    #[serde(default)]
    pub message: String,
}

/// Asks a template's owner for a relationship; it stays `pending` until the
/// owner decides.
#[utoipa::path(operation_id = "relationships_request", post, path = "/api/v1/relationships/requests", request_body = RequestRelationship, responses(
    (status = 201, description = "Requested", body = RelationshipRecord),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 403, description = "A wrong password, or a locked template", body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "No such template (or it expired)", body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "Already related, or the owner asked first", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn request(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RequestRelationship>,
) -> Result<(StatusCode, ApiJson<RelationshipRecord>), ApiError> {
    let reference: TokenRef = request
        .reference
        .parse()
        .map_err(|error| ApiError::bad_reference(format!("reference: {error}")))?;
    let password = password_of(request.password)?;
    let client = state.client()?;
    let relationship = client
        .request_relationship_with_template(
            &reference,
            password.as_deref(),
            request.message.as_bytes(),
        )
        .await?;
    let record = record_of(&relationship);
    state.db.record_relationship(record.clone()).await?;
    Ok((StatusCode::CREATED, ApiJson(record)))
}

/// Accepts, rejects or terminates the relationship with a peer.
#[utoipa::path(operation_id = "relationships_decide", post, path = "/api/v1/relationships/{peer}/{decision}", params(
    ("peer" = String, Path, description = "The other identity's address"),
    ("decision" = String, Path, description = "`accept` or `reject` (the owner, of a pending \
        request), or `terminate` (either side; the requester withdraws a pending request)"),
), responses(
    (status = 200, description = "This side's record afterwards", body = RelationshipRecord),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "No such decision, or no relationship with the peer", body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "Not allowed in the relationship's state", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn decide(
    State(state): State<AppState>,
    ApiPath((peer, decision)): ApiPath<(String, String)>,
) -> Result<ApiJson<RelationshipRecord>, ApiError> {
    let decision = match decision.as_str() {
        "accept" => Decision::Accept,
        "reject" => Decision::Reject,
        "terminate" => Decision::Terminate,
        other => {
            return Err(ApiError::not_found(format!(
                "no decision {other:?}: use accept, reject or terminate"
            )));
        }
    };
    let peer = parse_address(&peer)?;
    let relationship = state.client()?.decide_relationship(&peer, decision).await?;
    let record = record_of(&relationship);
    state.db.record_relationship(record.clone()).await?;
    Ok(ApiJson(record))
}

#[cfg(test)]
mod tests {
    use backbone_protocol::Keypair;
    use backbone_protocol::bytes::RelationshipId;
    use backbone_protocol::relationship::State;

    use super::*;

    #[test]
    fn a_record_names_role_and_state_as_the_api_documents_them() {
        let peer = Keypair::generate().address();
        let relationship = Relationship {
            id: RelationshipId([7; RelationshipId::LEN]),
            peer,
            role: Role::Requester,
            state: State::Terminated,
            changed_at_ms: 42,
        };
        assert_eq!(
            record_of(&relationship),
            RelationshipRecord {
                id: "07".repeat(RelationshipId::LEN),
                peer: peer.to_string(),
                role: "requester".into(),
                state: "terminated".into(),
                changed_at_ms: 42,
            }
        );
    }
}
