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
use axum::{Json, Router};
use backbone_client::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, watch};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// Why receiving is stuck, if it is (set by the receive loop).
    pub stalled: Arc<std::sync::Mutex<Option<String>>>,
    /// Uploads in progress at once (each may stage `api.max_file_size` on disk).
    pub uploads: Arc<tokio::sync::Semaphore>,
}

/// How many uploads may be staged on disk at once.
pub const PARALLEL_UPLOADS: usize = 4;

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

/// The OpenAPI document's frame; the paths come from the handlers'
/// annotations as [`api_router`] registers them.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Backbone Connector",
        description = "An organisation's client of the Backbone: messages, relationships, \
                       tokens and files through a local database, with webhooks.",
        version = "1"
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

/// Every route with its documentation: routes are only ever registered
/// here, through `routes!`, so the router and the OpenAPI document cannot
/// disagree. With `auth`, every route but `/health` requires an API key.
pub fn api_router(auth: Option<AppState>) -> OpenApiRouter<AppState> {
    let mut keyed = OpenApiRouter::new()
        .routes(routes!(identity))
        .routes(routes!(openapi))
        .routes(routes!(metrics))
        .merge(messages::routes())
        .merge(relationships::routes())
        .merge(tokens::routes())
        .merge(files::routes())
        .merge(events::routes());
    if let Some(state) = auth {
        keyed = keyed.route_layer(axum::middleware::from_fn_with_state(state, require_api_key));
    }
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .merge(keyed)
}

/// The OpenAPI document.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_router(None).into_openapi()
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let json_limit = state.config.api.max_json_body.as_u64() as usize;
    let (router, _) = api_router(Some(state.clone())).split_for_parts();
    router
        .layer(axum::extract::DefaultBodyLimit::max(json_limit))
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
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
        .and_then(|value| value.split_once(' '))
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| Sha256::digest(key.trim().as_bytes()));
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
    /// `ok` when connected to the Backbone and receiving, `degraded` otherwise.
    pub status: String,
    /// Whether the connection to the Backbone is up.
    pub backbone_connected: bool,
    /// Why received envelopes cannot be recorded (and so are not
    /// acknowledged), if that is the case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_error: Option<String>,
}

/// Liveness and the Backbone connection; needs no API key.
#[utoipa::path(operation_id = "health", get, path = "/health", security(()), responses(
    (status = 200, description = "Connected to the Backbone and receiving", body = Health),
    (status = 503, description = "Not connected to the Backbone, or received envelopes cannot be recorded", body = Health),
))]
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let connected = state
        .backbone
        .borrow()
        .as_ref()
        .is_some_and(|client| client.status() == backbone_client::Status::Connected);
    let receive_error = state
        .stalled
        .lock()
        .ok()
        .and_then(|stalled| stalled.clone());
    let healthy = connected && receive_error.is_none();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if healthy { "ok" } else { "degraded" }.into(),
            backbone_connected: connected,
            receive_error,
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

/// This document.
#[utoipa::path(operation_id = "openapi", get, path = "/api/v1/openapi.json", responses(
    (status = 200, description = "The OpenAPI 3 document of this API", content_type = "application/json", body = Object),
    (status = 401, body = problem::Problem, content_type = "application/problem+json"),
))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

/// Prometheus metrics: requests refused by type, messages received and
/// sent, webhook deliveries by outcome, and the database's counts.
#[utoipa::path(operation_id = "metrics", get, path = "/metrics", responses(
    (status = 200, description = "The Prometheus text format", content_type = "text/plain", body = String),
    (status = 401, body = problem::Problem, content_type = "application/problem+json"),
))]
async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.db.counts().await {
        // Every known series is set, so that one that fell to zero says so.
        for name in [
            "messages_in",
            "messages_out",
            "deliveries_pending",
            "deliveries_delivered",
            "deliveries_failed",
        ] {
            let count = counts
                .iter()
                .find(|(counted, _)| counted == name)
                .map_or(0, |(_, count)| *count);
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
        // The wire carries TTLs as 32-bit seconds; the Backbone caps them lower.
        Some(secs) if secs > u64::from(u32::MAX) => Err(ApiError::invalid(format!(
            "ttl_secs must be at most {}",
            u32::MAX
        ))),
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
