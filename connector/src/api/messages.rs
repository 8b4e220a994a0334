//! `/api/v1/messages`: send a message, list and get messages, download an
//! attachment.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use backbone_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, parse_address, ttl_or};
use crate::content::{self, Content};
use crate::db::{Attachment, Direction, MessageFilter, MessageRecord, NewMessage, PublishedKind};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, send))
        .routes(routes!(get_one))
        .routes(routes!(attachment))
}

/// A message as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageView {
    /// The local id (for `GET /api/v1/messages/{id}` and paging).
    pub id: i64,
    /// `in` (received) or `out` (sent).
    pub direction: Direction,
    /// The Backbone's id of the message (hex).
    pub message_id: String,
    /// The sequence number in this identity's mailbox (received messages).
    pub seq: Option<u64>,
    /// The sender's address.
    pub sender: String,
    /// Every recipient the sender addressed.
    pub recipients: Vec<String>,
    /// When the sender sent it (Unix ms, as the sender says).
    pub sent_at_ms: u64,
    /// When the Backbone stored it (Unix ms; received messages).
    pub stored_at_ms: Option<u64>,
    /// When the Backbone drops it (Unix ms; received messages).
    pub expires_at_ms: Option<u64>,
    /// When this Connector recorded it (Unix ms).
    pub recorded_at_ms: u64,
    /// The content's media type.
    pub content_type: String,
    /// The content as text, when it is text.
    pub text: Option<String>,
    /// The content in base64.
    pub content_base64: String,
    /// Attached files: download them through
    /// `/api/v1/messages/{id}/attachments/{index}`.
    pub attachments: Vec<Attachment>,
}

impl From<&MessageRecord> for MessageView {
    fn from(record: &MessageRecord) -> Self {
        let message = &record.message;
        let text = message
            .content_type
            .starts_with("text/")
            .then(|| String::from_utf8(message.content.clone()).ok())
            .flatten();
        Self {
            id: record.id,
            direction: record.direction,
            message_id: message.broker_message_id.clone(),
            seq: message.seq,
            sender: message.sender.clone(),
            recipients: message.recipients.clone(),
            sent_at_ms: message.sent_at_ms,
            stored_at_ms: message.stored_at_ms,
            expires_at_ms: message.expires_at_ms,
            recorded_at_ms: record.recorded_at_ms,
            content_type: message.content_type.clone(),
            text,
            content_base64: data_encoding::BASE64.encode(&message.content),
            attachments: message.attachments.clone(),
        }
    }
}

impl MessageView {
    /// As the data of a `message.received` event.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a message view serialises")
    }
}

/// `POST /api/v1/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// The recipients' addresses (at least one).
    pub recipients: Vec<String>,
    /// The content as text; or give `content_base64`.
    pub text: Option<String>,
    /// The content as base64 bytes; or give `text`.
    pub content_base64: Option<String>,
    /// The content's media type (default: text for `text`,
    /// `application/octet-stream` for bytes).
    pub content_type: Option<String>,
    /// Files uploaded through `/api/v1/files` to attach, by id.
    #[serde(default)]
    pub attachments: Vec<String>,
    /// How long the Backbone keeps it for an offline recipient (seconds;
    /// default `messages.default_ttl`).
    pub ttl_secs: Option<u64>,
}

/// Where a sent message was stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Delivered {
    /// The recipient.
    pub address: String,
    /// The sequence number in the recipient's mailbox.
    pub seq: u64,
}

/// A recipient the Backbone refused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Refused {
    /// The recipient.
    pub address: String,
    /// The Backbone's stable error code.
    pub code: u16,
    /// The code's name.
    pub reason: String,
}

/// The answer to a send.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Sent {
    /// The message as recorded.
    pub message: MessageView,
    /// Recipients whose mailbox holds it durably.
    pub stored: Vec<Delivered>,
    /// Recipients the Backbone refused.
    pub failed: Vec<Refused>,
}

/// Sends a message: encrypted to each recipient's published key, signed by
/// this identity, and recorded once the Backbone has stored it durably.
#[utoipa::path(operation_id = "messages_send", post, path = "/api/v1/messages", request_body = SendMessage, responses(
    (status = 201, description = "Stored for at least one recipient", body = Sent),
    (status = 400, body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "A recipient or attachment is unknown", body = Problem, content_type = "application/problem+json"),
    (status = 413, body = Problem, content_type = "application/problem+json"),
    (status = 503, body = Problem, content_type = "application/problem+json"),
))]
pub async fn send(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<SendMessage>,
) -> Result<(StatusCode, ApiJson<Sent>), ApiError> {
    if request.recipients.is_empty() {
        return Err(ApiError::invalid(
            "recipients must name at least one address",
        ));
    }
    let mut recipients = Vec::with_capacity(request.recipients.len());
    for recipient in &request.recipients {
        let address = parse_address(recipient)?;
        if !recipients.contains(&address) {
            recipients.push(address);
        }
    }
    let (body, default_type) = match (request.text, request.content_base64) {
        (Some(text), None) => (text.into_bytes(), content::TEXT),
        (None, Some(base64)) => (
            data_encoding::BASE64
                .decode(base64.as_bytes())
                .map_err(|error| ApiError::invalid(format!("content_base64: {error}")))?,
            content::OCTETS,
        ),
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of text and content_base64",
            ));
        }
    };
    let content_type = request
        .content_type
        .unwrap_or_else(|| default_type.to_owned());
    if content_type.is_empty() || content_type.len() > 255 {
        return Err(ApiError::invalid(
            "content_type must have 1 to 255 characters",
        ));
    }
    let mut attachments = Vec::with_capacity(request.attachments.len());
    for file_id in request.attachments {
        let file = state
            .db
            .published(PublishedKind::File, file_id.clone())
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "attachment {file_id:?} is not a file uploaded through this Connector"
                ))
            })?;
        attachments.push(Attachment {
            reference: file.reference,
            name: file.name,
            size: file.size,
        });
    }
    let ttl = ttl_or(request.ttl_secs, state.config.messages.default_ttl)?;
    let content = Content {
        content_type,
        body,
        attachments,
    };
    let client = state.client()?;
    let sent_at_ms = backbone_protocol::unix_millis_now();
    let ack = client.send(&recipients, &content.encode(), ttl).await?;
    if ack.stored.is_empty() {
        // Nothing was stored: answer as the first refusal says, record nothing.
        let first = ack.failed.first();
        return Err(ApiError::from(backbone_client::ClientError::Server {
            code: first.map_or(ErrorCode::Internal as u16, |failed| failed.code),
            message: "the Backbone stored the message for no recipient".into(),
            retry_after_ms: first.and_then(|failed| failed.retry_after_ms),
        }));
    }
    let record = state
        .db
        .record_sent(NewMessage {
            broker_message_id: hex::encode(ack.message_id.as_bytes()),
            seq: None,
            sender: state.address.clone(),
            recipients: recipients.iter().map(ToString::to_string).collect(),
            sent_at_ms,
            stored_at_ms: None,
            expires_at_ms: None,
            content_type: content.content_type,
            content: content.body,
            attachments: content.attachments,
        })
        .await?;
    metrics::counter!("connector_messages_sent_total").increment(1);
    Ok((
        StatusCode::CREATED,
        ApiJson(Sent {
            message: MessageView::from(&record),
            stored: ack
                .stored
                .iter()
                .map(|stored| Delivered {
                    address: stored.address.to_string(),
                    seq: stored.seq,
                })
                .collect(),
            failed: ack
                .failed
                .iter()
                .map(|failed| Refused {
                    address: failed.address.to_string(),
                    code: failed.code,
                    reason: ErrorCode::from_u16(failed.code)
                        .map_or_else(|| "unknown".to_owned(), |code| format!("{code:?}")),
                })
                .collect(),
        }),
    ))
}

/// `GET /api/v1/messages` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only messages exchanged with this address.
    pub peer: Option<String>,
    /// Only `in` or `out`.
    pub direction: Option<Direction>,
    /// Only messages recorded at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only messages recorded before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// The page cursor: `next_after` of the previous page.
    pub after: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<u32>,
}

/// A page of messages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagePage {
    /// The messages, oldest first.
    pub messages: Vec<MessageView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Lists messages, oldest first, a page at a time.
#[utoipa::path(operation_id = "messages_list", get, path = "/api/v1/messages", params(ListParams), responses(
    (status = 200, body = MessagePage),
    (status = 400, body = Problem, content_type = "application/problem+json"),
))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<ApiJson<MessagePage>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    if let Some(peer) = &params.peer {
        parse_address(peer)?;
    }
    for (name, value) in [("since_ms", params.since_ms), ("until_ms", params.until_ms)] {
        if value.is_some_and(|ms| i64::try_from(ms).is_err()) {
            return Err(ApiError::invalid(format!(
                "{name} must be at most {}",
                i64::MAX
            )));
        }
    }
    let records = state
        .db
        .list_messages(MessageFilter {
            peer: params.peer,
            direction: params.direction,
            since_ms: params.since_ms,
            until_ms: params.until_ms,
            after_id: params.after,
            limit,
        })
        .await?;
    let next_after = (records.len() == limit as usize)
        .then(|| records.last().map(|record| record.id))
        .flatten();
    Ok(ApiJson(MessagePage {
        messages: records.iter().map(MessageView::from).collect(),
        next_after,
    }))
}

/// One message.
#[utoipa::path(operation_id = "messages_get_one", get, path = "/api/v1/messages/{id}", params(("id" = i64, Path, description = "The local id")), responses(
    (status = 200, body = MessageView),
    (status = 404, body = Problem, content_type = "application/problem+json"),
))]
pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<ApiJson<MessageView>, ApiError> {
    let record = state
        .db
        .message(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    Ok(ApiJson(MessageView::from(&record)))
}

/// Downloads a message's attachment from the Backbone, decrypted, streamed.
#[utoipa::path(operation_id = "messages_attachment", get, path = "/api/v1/messages/{id}/attachments/{index}", params(
    ("id" = i64, Path, description = "The message's local id"),
    ("index" = usize, Path, description = "The attachment's position, from 0"),
), responses(
    (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, body = Problem, content_type = "application/problem+json"),
))]
pub async fn attachment(
    State(state): State<AppState>,
    ApiPath((id, index)): ApiPath<(i64, usize)>,
) -> Result<Response, ApiError> {
    let record = state
        .db
        .message(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    let attachment =
        record.message.attachments.get(index).ok_or_else(|| {
            ApiError::not_found(format!("message {id} has no attachment {index}"))
        })?;
    let reference = attachment
        .reference
        .parse()
        .map_err(|error| ApiError::bad_reference(format!("the attachment's reference: {error}")))?;
    super::files::stream_download(&state, reference, attachment.name.clone()).await
}
