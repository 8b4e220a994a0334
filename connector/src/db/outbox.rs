//! The event log and the webhook outbox: events in the order they were
//! recorded, and one delivery per event and endpoint.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Database, DbError, now_ms};

/// An event: an incoming message or a relationship change, in the order
/// this Connector recorded them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventRecord {
    /// The position in the event log, for `Last-Event-ID` and paging.
    pub position: i64,
    /// The event's stable id, for deduplication by receivers.
    pub event_id: String,
    /// `message.received` or `relationship.changed`.
    pub kind: String,
    /// The peer the event concerns.
    pub peer: String,
    /// When it was recorded (Unix ms).
    pub created_at_ms: u64,
    /// The event's data (the message or the relationship).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// An event to record with [`Database::record_received`] or
/// [`Database::record_relationship`].
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// What raised it, unique per event: `message:<broker message id>` or
    /// `notice:<broker message id>`, so that an envelope pushed again
    /// raises no second event.
    pub source: String,
    /// `message.received` or `relationship.changed`.
    pub kind: &'static str,
    /// The peer the event concerns.
    pub peer: String,
    /// The event's data.
    pub data: serde_json::Value,
}

/// One event's delivery to one webhook endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryRecord {
    /// The delivery's id (for retrying it).
    pub id: i64,
    /// The endpoint's URL.
    pub endpoint: String,
    /// The event's position.
    pub event_position: i64,
    /// The event's id.
    pub event_id: String,
    /// The peer the event concerns (deliveries are in order per peer).
    pub peer: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (Unix ms; pending deliveries).
    pub next_attempt_at_ms: u64,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When the delivery was queued (Unix ms): when its event was
    /// recorded, or when it was last retried through the API. `max_age`
    /// counts from here.
    pub created_at_ms: u64,
    /// When it was delivered (Unix ms).
    pub delivered_at_ms: Option<u64>,
}

/// A delivery due now, with what the worker needs to send it.
#[derive(Clone, Debug)]
pub struct DueDelivery {
    /// The delivery.
    pub delivery: DeliveryRecord,
    /// The event to POST.
    pub event: EventRecord,
}

impl Database {
    /// Events after `position`, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        position: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, DbError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, event_id, kind, peer, created_at_ms, payload FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![position, limit], read_event)?;
            let mut events = Vec::new();
            for row in rows {
                events.push(row??);
            }
            Ok(events)
        })
        .await
    }

    /// The last event's position (0 when there is none).
    pub async fn last_event_position(&self) -> Result<i64, DbError> {
        self.call(|connection| {
            Ok(connection
                .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM events")?
                .query_row([], |row| row.get(0))?)
        })
        .await
    }

    /// Deliveries that are due at `now_ms`: for each endpoint and peer, the
    /// oldest pending delivery, if its attempt is due (so deliveries stay in
    /// order per peer), only for `endpoints` (those configured now).
    pub async fn due_deliveries(
        &self,
        endpoints: Vec<String>,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, DbError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT d.id, d.endpoint, d.event, e.event_id, d.peer, d.state, d.attempts,
                        d.next_attempt_at_ms, d.last_error, d.created_at_ms, d.delivered_at_ms,
                        e.id, e.event_id, e.kind, e.peer, e.created_at_ms, e.payload
                 FROM webhook_deliveries d JOIN events e ON e.id = d.event
                 WHERE d.state = 'pending' AND d.next_attempt_at_ms <= ?1
                   AND d.endpoint IN (SELECT value FROM json_each(?3))
                   AND d.id = (SELECT MIN(o.id) FROM webhook_deliveries o
                               WHERE o.state = 'pending' AND o.endpoint = d.endpoint
                                 AND o.peer = d.peer)
                 ORDER BY d.id LIMIT ?2",
            )?;
            let endpoints = serde_json::to_string(&endpoints)
                .map_err(|error| DbError::Corrupt(error.to_string()))?;
            let rows = statement.query_map(params![now_ms as i64, limit, endpoints], |row| {
                let delivery = read_delivery(row)?;
                let event = read_event_at(row, 11)?;
                Ok((delivery, event))
            })?;
            let mut due = Vec::new();
            for row in rows {
                let (delivery, event) = row?;
                due.push(DueDelivery {
                    delivery,
                    event: event?,
                });
            }
            Ok(due)
        })
        .await
    }

    /// The earliest time a delivery becomes due: over the oldest pending
    /// delivery of each endpoint and peer (the only ones
    /// [`Database::due_deliveries`] returns), to one of `endpoints`, except
    /// the deliveries `in_flight`.
    pub async fn next_due_ms(
        &self,
        endpoints: Vec<String>,
        in_flight: Vec<i64>,
    ) -> Result<Option<u64>, DbError> {
        self.call(move |connection| {
            let endpoints = serde_json::to_string(&endpoints)
                .map_err(|error| DbError::Corrupt(error.to_string()))?;
            let in_flight = serde_json::to_string(&in_flight)
                .map_err(|error| DbError::Corrupt(error.to_string()))?;
            let next: Option<i64> = connection
                .prepare_cached(
                    "SELECT MIN(d.next_attempt_at_ms) FROM webhook_deliveries d
                 WHERE d.state = 'pending'
                   AND d.endpoint IN (SELECT value FROM json_each(?1))
                   AND d.id NOT IN (SELECT value FROM json_each(?2))
                   AND d.id = (SELECT MIN(o.id) FROM webhook_deliveries o
                               WHERE o.state = 'pending' AND o.endpoint = d.endpoint
                                 AND o.peer = d.peer)",
                )?
                .query_row(params![endpoints, in_flight], |row| row.get(0))?;
            Ok(next.map(|at| at.max(0) as u64))
        })
        .await
    }

    /// Marks the pending deliveries to endpoints no longer configured as
    /// failed (listed through the API), so they do not wait unseen forever.
    /// Returns how many.
    pub async fn fail_unconfigured(&self, endpoints: Vec<String>) -> Result<usize, DbError> {
        self.call(move |connection| {
            let endpoints = serde_json::to_string(&endpoints)
                .map_err(|error| DbError::Corrupt(error.to_string()))?;
            Ok(connection
                .prepare_cached(
                    "UPDATE webhook_deliveries SET state = 'failed',
                     last_error = 'the endpoint is no longer configured'
                 WHERE state = 'pending'
                   AND endpoint NOT IN (SELECT value FROM json_each(?1))",
                )?
                .execute(params![endpoints])?)
        })
        .await
    }

    /// Marks a delivery done.
    pub async fn delivery_succeeded(&self, id: i64) -> Result<(), DbError> {
        self.call(move |connection| {
            without_sync(connection, |connection| {
                connection
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1,
                         delivered_at_ms = ?2, last_error = NULL WHERE id = ?1",
                    )?
                    .execute(params![id, now_ms() as i64])?;
                Ok(())
            })
        })
        .await
    }

    /// Records a failed attempt: retried at `retry_at_ms`, or marked failed
    /// when that is `None` (the delivery is too old to retry).
    pub async fn delivery_attempt_failed(
        &self,
        id: i64,
        error: String,
        retry_at_ms: Option<u64>,
    ) -> Result<(), DbError> {
        self.call(move |connection| {
            without_sync(connection, |connection| {
                match retry_at_ms {
                Some(at) => connection
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = ?2,
                         next_attempt_at_ms = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, error, at as i64])?,
                None => connection
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET state = 'failed', attempts = attempts + 1,
                         last_error = ?2 WHERE id = ?1",
                    )?
                    .execute(params![id, error])?,
            };
                Ok(())
            })
        })
        .await
    }

    /// Deliveries in `state` (all when `None`), newest first, at most `limit`.
    pub async fn deliveries(
        &self,
        state: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, DbError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT d.id, d.endpoint, d.event, e.event_id, d.peer, d.state, d.attempts,
                        d.next_attempt_at_ms, d.last_error, d.created_at_ms, d.delivered_at_ms
                 FROM webhook_deliveries d JOIN events e ON e.id = d.event
                 WHERE ?1 IS NULL OR d.state = ?1 ORDER BY d.id DESC LIMIT ?2",
            )?;
            let rows = statement.query_map(params![state, limit], read_delivery)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Puts a failed delivery to one of `endpoints` back in the queue, due
    /// now, with a fresh `max_age` window (`created_at_ms` is reset). Returns
    /// the delivery, or `None` if there is no such delivery; a delivery that
    /// is not failed, or is to another endpoint, is returned unchanged.
    pub async fn retry_delivery(
        &self,
        id: i64,
        endpoints: Vec<String>,
    ) -> Result<Option<DeliveryRecord>, DbError> {
        self.call(move |connection| {
            let endpoints = serde_json::to_string(&endpoints)
                .map_err(|error| DbError::Corrupt(error.to_string()))?;
            connection
                .prepare_cached(
                    "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at_ms = ?2,
                     created_at_ms = ?2
                 WHERE id = ?1 AND state = 'failed'
                   AND endpoint IN (SELECT value FROM json_each(?3))",
                )?
                .execute(params![id, now_ms() as i64, endpoints])?;
            Ok(connection
                .prepare_cached(
                    "SELECT d.id, d.endpoint, d.event, e.event_id, d.peer, d.state, d.attempts,
                            d.next_attempt_at_ms, d.last_error, d.created_at_ms, d.delivered_at_ms
                     FROM webhook_deliveries d JOIN events e ON e.id = d.event WHERE d.id = ?1",
                )?
                .query_row(params![id], read_delivery)
                .optional()?)
        })
        .await
    }
}
/// Runs `write` with `synchronous = NORMAL`: its commit reaches the
/// write-ahead log but is not synced to disk on its own; the next `FULL`
/// commit (the next received envelope) or checkpoint syncs it. For webhook
/// outcomes only: a power cut may forget that a delivery happened, and it
/// is then made again, which at-least-once delivery allows. A process
/// crash forgets nothing (the log is in the page cache). It spares a sync
/// per delivery, which would otherwise bound one peer's webhooks (sent one
/// after another) at the disk's sync rate.
fn without_sync<R>(
    connection: &mut Connection,
    write: impl FnOnce(&mut Connection) -> Result<R, DbError>,
) -> Result<R, DbError> {
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    let result = write(connection);
    connection.pragma_update(None, "synchronous", "FULL")?;
    result
}

pub(super) fn insert_event(
    transaction: &rusqlite::Transaction<'_>,
    event: &NewEvent,
    endpoints: &[String],
) -> Result<i64, DbError> {
    let event_id = format!("evt_{}", hex::encode(rand::random::<[u8; 16]>()));
    let now = now_ms() as i64;
    transaction
        .prepare_cached(
            "INSERT INTO events (event_id, source, kind, peer, created_at_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            event_id,
            event.source,
            event.kind,
            event.peer,
            now,
            event.data.to_string()
        ])?;
    let position = transaction.last_insert_rowid();
    for endpoint in endpoints {
        transaction
            .prepare_cached(
                "INSERT INTO webhook_deliveries (event, endpoint, peer, state, next_attempt_at_ms,
                 created_at_ms) VALUES (?1, ?2, ?3, 'pending', ?4, ?4)",
            )?
            .execute(params![position, endpoint, event.peer, now])?;
    }
    Ok(position)
}

fn read_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<EventRecord, DbError>> {
    read_event_at(row, 0)
}

fn read_event_at(
    row: &rusqlite::Row<'_>,
    at: usize,
) -> rusqlite::Result<Result<EventRecord, DbError>> {
    let payload: String = row.get(at + 5)?;
    let data = match serde_json::from_str(&payload) {
        Ok(data) => data,
        Err(error) => return Ok(Err(DbError::Corrupt(error.to_string()))),
    };
    Ok(Ok(EventRecord {
        position: row.get(at)?,
        event_id: row.get(at + 1)?,
        kind: row.get(at + 2)?,
        peer: row.get(at + 3)?,
        created_at_ms: row.get::<_, i64>(at + 4)? as u64,
        data,
    }))
}

fn read_delivery(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        id: row.get(0)?,
        endpoint: row.get(1)?,
        event_position: row.get(2)?,
        event_id: row.get(3)?,
        peer: row.get(4)?,
        state: row.get(5)?,
        attempts: row.get(6)?,
        next_attempt_at_ms: row.get::<_, i64>(7)? as u64,
        last_error: row.get(8)?,
        created_at_ms: row.get::<_, i64>(9)? as u64,
        delivered_at_ms: row.get::<_, Option<i64>>(10)?.map(|at| at as u64),
    })
}
