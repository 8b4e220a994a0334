//! Errors as `application/problem+json` (RFC 9457) with stable types.
//!
//! Every error the API returns is an [`ApiError`]: a status, a stable type
//! (`urn:backbone:connector:problem:<slug>`, listed in docs/connector.md),
//! a short title and a detail for people. Clients branch on the type, never
//! on the detail.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backbone_client::{ClientError, FileError, TokenError};
use backbone_protocol::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::DbError;

/// The prefix of every problem type.
pub const TYPE_PREFIX: &str = "urn:backbone:connector:problem:";

/// A problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// The stable type: `urn:backbone:connector:problem:<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// For `backbone-*` problems: the broker's stable error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backbone_code: Option<u16>,
    /// When retrying makes sense: after how many milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u32>,
}

/// An error answered to an API call.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    backbone_code: Option<u16>,
    retry_after_ms: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: String) -> Self {
        Self {
            status,
            slug,
            title,
            detail,
            backbone_code: None,
            retry_after_ms: None,
        }
    }

    /// 400: the request is malformed or a value is invalid.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "The request is invalid",
            detail.into(),
        )
    }

    /// 400: a token or file reference does not parse.
    pub fn bad_reference(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-reference",
            "The reference is malformed",
            detail.into(),
        )
    }

    /// 401: no valid API key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid API key is required",
            "send one of the configured API keys as `Authorization: Bearer <key>`".into(),
        )
    }

    /// 404: no such local record.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "No such resource",
            detail.into(),
        )
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "The method is not allowed on this path",
            "see /api/v1/openapi.json for the methods of each path".into(),
        )
    }

    /// 409: the request contradicts the current state.
    pub fn conflict(slug: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, slug, title, detail.into())
    }

    /// 429: too many uploads at once.
    pub fn busy(detail: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "Too many requests of this kind at once",
            detail.into(),
        );
        error.retry_after_ms = Some(1000);
        error
    }

    /// 413: the body is over the configured limit.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "The request body is too large",
            detail.into(),
        )
    }

    /// 503: the Backbone cannot be reached right now.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backbone-unavailable",
            "The Backbone cannot be reached",
            detail.into(),
        );
        error.retry_after_ms = Some(1000);
        error
    }

    /// 500: something failed inside the Connector (logged).
    pub fn internal(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(%detail, "internal error answering an API call");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "The Connector failed",
            detail,
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem's slug (the end of its type).
    pub fn slug(&self) -> &'static str {
        self.slug
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("connector_api_errors_total", "type" => self.slug).increment(1);
        let problem = Problem {
            kind: format!("{TYPE_PREFIX}{}", self.slug),
            title: self.title.into(),
            status: self.status.as_u16(),
            detail: self.detail,
            backbone_code: self.backbone_code,
            retry_after_ms: self.retry_after_ms,
        };
        let retry_after = self.retry_after_ms;
        let mut response = (self.status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(ms) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        ApiError::internal(error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::too_large(rejection.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "The body must be JSON",
                "send `Content-Type: application/json`".into(),
            ),
            other => ApiError::invalid(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        let detail = error.to_string();
        match error {
            ClientError::Server {
                code,
                retry_after_ms,
                ..
            } => {
                let (status, slug, title) = match ErrorCode::from_u16(code) {
                    Some(ErrorCode::UnknownAddress) => (
                        StatusCode::NOT_FOUND,
                        "unknown-address",
                        "No identity has this address on the Backbone",
                    ),
                    Some(ErrorCode::NotFound) => (
                        StatusCode::NOT_FOUND,
                        "backbone-not-found",
                        "The Backbone holds no such thing",
                    ),
                    Some(ErrorCode::Forbidden | ErrorCode::NotConsented) => (
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "The Backbone refused: not allowed",
                    ),
                    Some(ErrorCode::WrongPassword) => (
                        StatusCode::FORBIDDEN,
                        "wrong-password",
                        "The password is wrong",
                    ),
                    Some(ErrorCode::TokenLocked) => (
                        StatusCode::FORBIDDEN,
                        "token-locked",
                        "Too many wrong passwords: the token is locked",
                    ),
                    Some(ErrorCode::InvalidTransition) => (
                        StatusCode::CONFLICT,
                        "invalid-transition",
                        "Not allowed in the relationship's state",
                    ),
                    Some(ErrorCode::QuotaExceeded | ErrorCode::TooManyCapabilities) => (
                        StatusCode::CONFLICT,
                        "quota-exceeded",
                        "A quota on the Backbone is full",
                    ),
                    Some(ErrorCode::EnvelopeTooLarge | ErrorCode::FileTooLarge) => (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        "Larger than the Backbone accepts",
                    ),
                    Some(
                        ErrorCode::InvalidRecipients
                        | ErrorCode::InvalidTtl
                        | ErrorCode::InvalidOffset
                        | ErrorCode::ContentMismatch,
                    ) => (
                        StatusCode::BAD_REQUEST,
                        "invalid-request",
                        "The Backbone refused the request as invalid",
                    ),
                    Some(ErrorCode::RateLimited) => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate-limited",
                        "The Backbone asks to slow down",
                    ),
                    Some(
                        ErrorCode::Overloaded
                        | ErrorCode::ShardUnavailable
                        | ErrorCode::ShuttingDown
                        | ErrorCode::Internal
                        | ErrorCode::StorageFailure,
                    ) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "backbone-unavailable",
                        "The Backbone cannot serve this right now",
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "backbone-error",
                        "The Backbone answered with an error",
                    ),
                };
                let mut api = ApiError::new(status, slug, title, detail);
                api.backbone_code = Some(code);
                api.retry_after_ms = retry_after_ms;
                api
            }
            ClientError::Unreachable(_)
            | ClientError::Disconnected(_)
            | ClientError::Timeout
            | ClientError::Closed { .. }
            | ClientError::Redirect(_) => ApiError::unavailable(detail),
            ClientError::Card(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "invalid-card",
                "The peer's identity card did not verify",
                detail,
            ),
            ClientError::Token(token) => match token {
                TokenError::NotFound => ApiError::new(
                    StatusCode::NOT_FOUND,
                    "backbone-not-found",
                    "The Backbone holds no such thing",
                    detail,
                ),
                TokenError::WrongPassword | TokenError::NoPasswordExpected => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "wrong-password",
                    "The password is wrong",
                    detail,
                ),
                TokenError::Locked => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "token-locked",
                    "Too many wrong passwords: the token is locked",
                    detail,
                ),
                TokenError::TooLarge(_) => ApiError::too_large(detail),
                TokenError::Undecryptable | TokenError::Kdf(_) => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "undecryptable",
                    "The content could not be opened with the reference's key",
                    detail,
                ),
            },
            ClientError::File(FileError::Undecryptable) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "undecryptable",
                "The content could not be opened with the reference's key",
                detail,
            ),
            ClientError::File(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "backbone-error",
                "The Backbone sent a file that does not add up",
                detail,
            ),
            // A local file (an upload's temporary copy) could not be read.
            ClientError::Io(_) => ApiError::internal(detail),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "backbone-error",
                "Talking to the Backbone failed",
                detail,
            ),
        }
    }
}
