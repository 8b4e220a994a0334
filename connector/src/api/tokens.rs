//! `/api/v1/tokens`: small encrypted blobs published at the Backbone and
//! shared by reference (a link, a QR code), fetched by reference, listed and
//! deleted.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use backbone_client::{ClientError, TokenError, TokenRef};
use backbone_protocol::bytes::TokenId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::{ApiError, ApiJson, ApiPath, AppState, text_or_base64, ttl_or};
use crate::db::{Published, PublishedKind};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(fetch))
        .routes(routes!(delete))
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The content as text; or give `content_base64`.
    pub content_text: Option<String>,
    /// The content as base64 bytes; or give `content_text`.
    pub content_base64: Option<String>,
    /// How long the Backbone keeps it (seconds; default
    /// `messages.default_ttl`; the Backbone may cap it).
    pub ttl_secs: Option<u64>,
    /// A password that fetching needs too.
    pub password: Option<String>,
}

/// Publishes a token: the content is encrypted here under a fresh key that
/// only the returned reference holds.
#[utoipa::path(operation_id = "tokens_create", post, path = "/api/v1/tokens", request_body = CreateToken, responses(
    (status = 201, description = "Published; hand out `reference`", body = Published),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "This identity holds as many tokens as the Backbone allows", body = Problem, content_type = "application/problem+json"),
    (status = 413, body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateToken>,
) -> Result<(StatusCode, ApiJson<Published>), ApiError> {
    let content = text_or_base64(request.content_text, request.content_base64, "content")?;
    let ttl = ttl_or(request.ttl_secs, state.config.messages.default_ttl)?;
    let password = password_of(request.password)?;
    let client = state.client()?;
    let created_at_ms = backbone_protocol::unix_millis_now();
    let reference = client
        .create_token(&content, ttl, password.as_deref())
        .await?;
    let record = state
        .db
        .record_published(
            PublishedKind::Token,
            Published {
                id: hex::encode(reference.id.0),
                reference: reference.to_text(),
                password_protected: reference.has_password(),
                size: content.len() as u64,
                name: None,
                created_at_ms,
                expires_at_ms: expires_at(created_at_ms, ttl),
            },
        )
        .await?;
    Ok((StatusCode::CREATED, ApiJson(record)))
}

/// Lists the tokens this Connector published.
#[utoipa::path(operation_id = "tokens_list", get, path = "/api/v1/tokens", responses(
    (status = 200, body = Vec<Published>),
))]
pub async fn list(State(state): State<AppState>) -> Result<ApiJson<Vec<Published>>, ApiError> {
    Ok(ApiJson(
        state.db.list_published(PublishedKind::Token).await?,
    ))
}

/// `POST /api/v1/tokens/fetch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchToken {
    /// The token's reference (`bbt1:...`).
    pub reference: String,
    /// The password, for a password-protected token.
    pub password: Option<String>,
}

/// A fetched token's content.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenContent {
    /// The content in base64.
    pub content_base64: String,
    /// The content as text, when it is UTF-8.
    pub text: Option<String>,
}

/// Fetches and decrypts any token by its reference. A wrong password counts
/// against the token: after too many, the Backbone locks it.
#[utoipa::path(operation_id = "tokens_fetch", post, path = "/api/v1/tokens/fetch", request_body = FetchToken, responses(
    (status = 200, body = TokenContent),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 403, description = "A wrong or missing password, or a locked token", body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "No such token (or it expired)", body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "The reference's key does not open the content", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn fetch(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<FetchToken>,
) -> Result<ApiJson<TokenContent>, ApiError> {
    let reference: TokenRef = request
        .reference
        .parse()
        .map_err(|error| ApiError::bad_reference(format!("reference: {error}")))?;
    let password = password_of(request.password)?;
    let content = state
        .client()?
        .get_token(&reference, password.as_deref())
        .await?;
    Ok(ApiJson(TokenContent {
        content_base64: data_encoding::BASE64.encode(&content),
        text: String::from_utf8(content).ok(),
    }))
}

/// Deletes a token this Connector published, at the Backbone and here.
#[utoipa::path(operation_id = "tokens_delete", delete, path = "/api/v1/tokens/{id}", params(
    ("id" = String, Path, description = "The token's id (hex), as listed"),
), responses(
    (status = 204, description = "Deleted"),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "Not a token this Connector published", body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let token_id = hex::decode(&id)
        .ok()
        .and_then(|bytes| <[u8; TokenId::LEN]>::try_from(bytes).ok())
        .map(TokenId)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{id:?} is not a token id ({} hex characters)",
                2 * TokenId::LEN
            ))
        })?;
    // The database holds ids in lowercase hex.
    let id = hex::encode(token_id.0);
    if state
        .db
        .published(PublishedKind::Token, id.clone())
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "no token {id} published through this Connector"
        )));
    }
    match state.client()?.delete_token(&token_id).await {
        // Expired or deleted before: gone at the Backbone all the same.
        Ok(()) | Err(ClientError::Token(TokenError::NotFound)) => {}
        Err(error) => return Err(error.into()),
    }
    state.db.delete_published(PublishedKind::Token, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A password from a request: an empty one is refused rather than taken as
/// a password, since it is almost certainly a mistake for none.
pub(crate) fn password_of(password: Option<String>) -> Result<Option<String>, ApiError> {
    match password {
        Some(password) if password.is_empty() => Err(ApiError::invalid(
            "password must not be empty; leave it out for none",
        )),
        other => Ok(other),
    }
}

/// When something published at `created_at_ms` for `ttl` expires (Unix ms),
/// as requested: the Backbone may cap the TTL and drop it sooner.
pub(crate) fn expires_at(created_at_ms: u64, ttl: Duration) -> u64 {
    created_at_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}
