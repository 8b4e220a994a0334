//! The REST API: JSON under `/api/v1`, API keys on every route but
//! `/health`, errors as `application/problem+json`, and the OpenAPI
//! document generated from the handlers at `/api/v1/openapi.json`.
//!
//! One file per resource: [`messages`], [`relationships`], [`tokens`],
//! [`files`], [`events`] (the event stream and webhook deliveries); this
//! module holds the shared state, the extractors and the router.

pub mod events;
pub mod files;
pub mod messages;
pub mod problem;
pub mod relationships;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use backbone_client::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, watch};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

pub use problem::ApiError;

use crate::config::Config;
use crate::db::Database;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// The local database.
    pub db: Database,
    /// The connection to the Backbone, once made.
    pub backbone: watch::Receiver<Option<Arc<Client>>>,
    /// The identity's address.
    pub address: String,
    /// The last event's position, for the event stream to wait on.
    pub events: watch::Receiver<i64>,
    /// Woken when a webhook delivery is queued or retried.
    pub webhooks: Arc<Notify>,
    /// The Prometheus registry's renderer.
    pub metrics: PrometheusHandle,
    /// The API keys' SHA-256 hashes.
    pub key_hashes: Arc<Vec<[u8; 32]>>,
}

impl AppState {
    /// The Backbone connection, or 503 while there is none yet.
    pub fn client(&self) -> Result<Arc<Client>, ApiError> {
        self.backbone.borrow().clone().ok_or_else(|| {
            ApiError::unavailable("the Connector has not connected to the Backbone yet")
        })
    }

    /// The webhook endpoints' URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.config
            .webhooks
            .endpoints
            .iter()
            .map(|endpoint| endpoint.url.clone())
            .collect()
    }
}

/// A JSON body; a bad one is a problem document, not axum's plain text.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Query parameters, rejected as a problem document.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters, rejected as a problem document.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Backbone Connector",
        description = "An organisation's client of the Backbone: messages, relationships, \
                       tokens and files through a local database, with webhooks.",
        version = "1"
    ),
    paths(
        health,
        identity,
        messages::send,
        messages::list,
        messages::get_one,
        messages::attachment,
        relationships::list,
        relationships::set_policy,
        relationships::create_template,
        relationships::list_templates,
        relationships::request,
        relationships::decide,
        tokens::create,
        tokens::list,
        tokens::fetch,
        tokens::delete,
        files::upload,
        files::list,
        files::status,
        files::download,
        files::fetch,
        files::delete,
        events::stream,
        events::list,
        events::deliveries,
        events::retry_delivery,
    ),
    components(schemas(problem::Problem)),
    modifiers(&ApiKeyScheme),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of the keys whose hashes `api.api_keys` lists."))
                    .build(),
            ),
        );
    }
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let json_limit = state.config.api.max_json_body.as_u64() as usize;
    let file_limit = state.config.api.max_file_size.as_u64() as usize;
    let files = Router::new()
        .route("/api/v1/files", get(files::list).post(files::upload))
        .layer(axum::extract::DefaultBodyLimit::max(file_limit));
    let api = Router::new()
        .route("/api/v1/identity", get(identity))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(messages::routes())
        .merge(relationships::routes())
        .merge(tokens::routes())
        .merge(files::routes())
        .merge(events::routes())
        .layer(axum::extract::DefaultBodyLimit::max(json_limit))
        .merge(files)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

/// Checks `Authorization: Bearer <key>` against the configured hashes, in
/// constant time (every configured hash is compared).
async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| Sha256::digest(key.trim().as_bytes()));
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized());
    };
    let mut accepted = subtle::Choice::from(0);
    for hash in state.key_hashes.iter() {
        accepted |= hash.ct_eq(presented.as_slice());
    }
    if !bool::from(accepted) {
        return Err(ApiError::unauthorized());
    }
    Ok(next.run(request).await)
}

/// `/health`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when connected to the Backbone, `degraded` otherwise.
    pub status: String,
    /// Whether the connection to the Backbone is up.
    pub backbone_connected: bool,
}

/// Liveness and the Backbone connection; needs no API key.
#[utoipa::path(operation_id = "health", get, path = "/health", security(()), responses(
    (status = 200, description = "Connected to the Backbone", body = Health),
    (status = 503, description = "Not connected to the Backbone", body = Health),
))]
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let connected = state
        .backbone
        .borrow()
        .as_ref()
        .is_some_and(|client| client.status() == backbone_client::Status::Connected);
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if connected { "ok" } else { "degraded" }.into(),
            backbone_connected: connected,
        }),
    )
}

/// The identity this Connector holds.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Identity {
    /// The identity's address: peers send to it.
    pub address: String,
    /// The Backbone server it connects to.
    pub backbone: String,
}

/// The Connector's identity.
#[utoipa::path(operation_id = "identity", get, path = "/api/v1/identity", responses(
    (status = 200, body = Identity),
    (status = 401, body = problem::Problem, content_type = "application/problem+json"),
))]
async fn identity(State(state): State<AppState>) -> Json<Identity> {
    Json(Identity {
        address: state.address.clone(),
        backbone: state.config.backbone.server.clone(),
    })
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.db.counts().await {
        for (name, count) in counts {
            metrics::gauge!(format!("connector_{name}")).set(count as f64);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// A TTL in seconds from a request, or the configured default.
pub fn ttl_or(ttl_secs: Option<u64>, default: Duration) -> Result<Duration, ApiError> {
    match ttl_secs {
        None => Ok(default),
        Some(0) => Err(ApiError::invalid("ttl_secs must be at least 1")),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}

/// Bytes from a request: `text` (UTF-8) or `base64`, exactly one.
pub fn text_or_base64(
    text: Option<String>,
    base64: Option<String>,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    match (text, base64) {
        (Some(text), None) => Ok(text.into_bytes()),
        (None, Some(base64)) => data_encoding::BASE64
            .decode(base64.as_bytes())
            .map_err(|error| ApiError::invalid(format!("{what}_base64 is not base64: {error}"))),
        _ => Err(ApiError::invalid(format!(
            "give exactly one of {what}_text and {what}_base64"
        ))),
    }
}

/// An address from a request.
pub fn parse_address(text: &str) -> Result<backbone_protocol::Address, ApiError> {
    text.parse()
        .map_err(|error| ApiError::invalid(format!("{text:?} is not an address: {error}")))
}
