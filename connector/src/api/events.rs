//! Events: the Server-Sent Events stream and the event log behind it, and
//! the webhook deliveries (listed, and retried when they failed).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState};
use crate::db::{DeliveryRecord, EventRecord};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(stream))
        .routes(routes!(deliveries))
        .routes(routes!(retry_delivery))
}

/// Where an event stream or page starts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Only events after this position. The stream starts at the newest
    /// event without it (or at `Last-Event-ID`); a page at the first.
    pub after: Option<i64>,
    /// Page size, 1 to 500 (default 100; pages only).
    pub limit: Option<u32>,
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// The events, oldest first.
    pub events: Vec<EventRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Lists recorded events, oldest first, a page at a time.
#[utoipa::path(operation_id = "events_list", get, path = "/api/v1/events", params(EventParams), responses(
    (status = 200, body = EventPage),
    (status = 400, body = Problem, content_type = "application/problem+json"),
))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<EventParams>,
) -> Result<ApiJson<EventPage>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    let events = state
        .db
        .events_after(params.after.unwrap_or(0), limit)
        .await?;
    let next_after = (events.len() == limit as usize)
        .then(|| events.last().map(|event| event.position))
        .flatten();
    Ok(ApiJson(EventPage { events, next_after }))
}

/// The event stream (Server-Sent Events): each event's `id` is its
/// position, its `event` its kind and its `data` the event as JSON. A
/// client that reconnects with `Last-Event-ID` (or `after`) gets what it
/// missed first.
#[utoipa::path(operation_id = "events_stream", get, path = "/api/v1/events/stream", params(EventParams), responses(
    (status = 200, description = "An endless stream of events", content_type = "text/event-stream", body = EventRecord),
    (status = 400, body = Problem, content_type = "application/problem+json"),
))]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<EventParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let last_event_id = headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be an event position"))
        })
        .transpose()?;
    let start = match last_event_id.or(params.after) {
        Some(position) => position,
        None => state.db.last_event_position().await?,
    };
    let stream = futures_util::stream::unfold(
        (state, start, Vec::<EventRecord>::new().into_iter()),
        |(mut state, mut position, mut pending)| async move {
            loop {
                if let Some(event) = pending.next() {
                    position = event.position;
                    let sse = Event::default()
                        .id(event.position.to_string())
                        .event(event.kind.clone())
                        .json_data(&event)
                        .unwrap_or_else(|_| Event::default().comment("unserialisable event"));
                    return Some((Ok(sse), (state, position, pending)));
                }
                match state.db.events_after(position, 100).await {
                    Ok(events) if !events.is_empty() => {
                        pending = events.into_iter();
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "reading events for a stream");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                // Nothing new: wait for the next event (or the Connector to stop).
                let newest = *state.events.borrow_and_update();
                if newest <= position && state.events.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Which deliveries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// Only deliveries in this state: `pending`, `delivered` or `failed`.
    pub state: Option<String>,
    /// At most this many, 1 to 500 (default 100), newest first.
    pub limit: Option<u32>,
}

/// Lists webhook deliveries, newest first.
#[utoipa::path(operation_id = "events_deliveries", get, path = "/api/v1/webhooks/deliveries", params(DeliveryParams), responses(
    (status = 200, body = Vec<DeliveryRecord>),
    (status = 400, body = Problem, content_type = "application/problem+json"),
))]
pub async fn deliveries(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<DeliveryParams>,
) -> Result<ApiJson<Vec<DeliveryRecord>>, ApiError> {
    if let Some(wanted) = &params.state
        && !matches!(wanted.as_str(), "pending" | "delivered" | "failed")
    {
        return Err(ApiError::invalid(
            "state must be pending, delivered or failed",
        ));
    }
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    Ok(ApiJson(state.db.deliveries(params.state, limit).await?))
}

/// Queues a failed delivery again, due at once (with a fresh retry window).
#[utoipa::path(operation_id = "events_retry_delivery", post, path = "/api/v1/webhooks/deliveries/{id}/retry", params(("id" = i64, Path, description = "The delivery's id")), responses(
    (status = 200, description = "The delivery, pending again (or unchanged if it had not failed)", body = DeliveryRecord),
    (status = 404, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "The endpoint is no longer configured", body = Problem, content_type = "application/problem+json"),
))]
pub async fn retry_delivery(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<ApiJson<DeliveryRecord>, ApiError> {
    let endpoints = state.endpoints();
    let delivery = state
        .db
        .retry_delivery(id, endpoints.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    if !endpoints.contains(&delivery.endpoint) {
        return Err(ApiError::conflict(
            "endpoint-gone",
            "The delivery's endpoint is no longer configured",
            format!("delivery {id} was to an endpoint that is no longer configured"),
        ));
    }
    state.webhooks.notify_one();
    Ok(ApiJson(delivery))
}
