//! The local SQLite database: messages received and sent, relationships,
//! templates, tokens and files this Connector made, the events it raised and
//! the webhook outbox.
//!
//! One connection, in WAL mode with `synchronous = FULL`, so a committed
//! transaction survives a power cut before the Connector acknowledges the
//! envelope it holds to the broker. Calls run on tokio's blocking pool
//! ([`Database::call`]); SQLite serialises writers anyway, and a connector's
//! write rate is that of its messages.

pub mod migrations;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The schema could not be brought up to date.
    #[error("database schema: {0}")]
    Migration(#[from] migrations::MigrationError),
    /// A stored JSON column did not parse (the database was edited by hand).
    #[error("database: a stored record is corrupt: {0}")]
    Corrupt(String),
    /// The database belongs to another identity than the key file's.
    #[error(
        "the database in this data_dir belongs to identity {database}, but the key file is \
         {key}'s: point storage.key_file and storage.data_dir at one identity's files"
    )]
    WrongIdentity {
        /// The identity the database was made for.
        database: String,
        /// The key file's identity.
        key: String,
    },
    /// The blocking task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
}

/// The database handle; cheap to clone.
#[derive(Clone)]
pub struct Database {
    connection: Arc<Mutex<Connection>>,
}

/// Which way a message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Received from a peer.
    In,
    /// Sent by this Connector.
    Out,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    fn parse(text: &str) -> Result<Self, DbError> {
        match text {
            "in" => Ok(Direction::In),
            "out" => Ok(Direction::Out),
            other => Err(DbError::Corrupt(format!("direction {other:?}"))),
        }
    }
}

/// A file attached to a message: its reference carries the key that
/// decrypts it, so only the message's recipients can download it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attachment {
    /// The file's reference (`bbf1:...`).
    pub reference: String,
    /// The file's name, as the sender gave it.
    pub name: Option<String>,
    /// The plaintext size in bytes.
    pub size: u64,
}

/// A message to record (see [`Database::record_received`] and
/// [`Database::record_sent`]).
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// The broker's id of the message (hex).
    pub broker_message_id: String,
    /// The sequence number in this identity's mailbox (received messages).
    pub seq: Option<u64>,
    /// The sender's address.
    pub sender: String,
    /// Every recipient the sender addressed.
    pub recipients: Vec<String>,
    /// When the sender sent it (Unix ms).
    pub sent_at_ms: u64,
    /// When the broker stored it (received messages).
    pub stored_at_ms: Option<u64>,
    /// When the broker drops it.
    pub expires_at_ms: Option<u64>,
    /// The content's media type.
    pub content_type: String,
    /// The content.
    pub content: Vec<u8>,
    /// Attached files.
    pub attachments: Vec<Attachment>,
}

/// A pushed envelope that could not be opened (tampered, not for this
/// identity, a notice of a newer broker), kept as it came.
#[derive(Clone, Debug)]
pub struct UnreadableEnvelope {
    /// The broker's id of the message (hex).
    pub broker_message_id: String,
    /// The sequence number in this identity's mailbox.
    pub seq: u64,
    /// The sender as the broker authenticated it (none for a sealed send).
    pub sender: Option<String>,
    /// When the broker stored it (Unix ms).
    pub stored_at_ms: u64,
    /// The sealed bytes.
    pub envelope: Vec<u8>,
    /// Why it could not be opened.
    pub error: String,
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRecord {
    /// The local id.
    pub id: i64,
    /// Received or sent.
    pub direction: Direction,
    /// The broker's id (hex).
    pub broker_message_id: String,
    /// The mailbox sequence number (received messages).
    pub seq: Option<u64>,
    /// The sender.
    pub sender: String,
    /// The recipients.
    pub recipients: Vec<String>,
    /// When the sender sent it (Unix ms).
    pub sent_at_ms: u64,
    /// When the broker stored it (received messages).
    pub stored_at_ms: Option<u64>,
    /// When the broker drops it.
    pub expires_at_ms: Option<u64>,
    /// When this Connector recorded it (Unix ms).
    pub recorded_at_ms: u64,
    /// The content's media type.
    pub content_type: String,
    /// The content.
    pub content: Vec<u8>,
    /// Attached files.
    pub attachments: Vec<Attachment>,
}

/// Which messages [`Database::list_messages`] returns.
#[derive(Clone, Debug, Default)]
pub struct MessageFilter {
    /// Only those exchanged with this address.
    pub peer: Option<String>,
    /// Only this direction.
    pub direction: Option<Direction>,
    /// Only those recorded at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only those recorded before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// Only those with a local id above this (the page cursor).
    pub after_id: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

/// A relationship as this side last saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RelationshipRecord {
    /// The relationship's id, shared by both sides (hex).
    pub id: String,
    /// The other identity's address.
    pub peer: String,
    /// `owner` (of the template) or `requester`.
    pub role: String,
    /// `pending`, `active`, `rejected` or `terminated`.
    pub state: String,
    /// When it last changed (Unix ms).
    pub changed_at_ms: u64,
}

/// A token, template or file this Connector published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Published {
    /// The token's or file's id (hex); for a template, its local number.
    pub id: String,
    /// The reference to hand out (`bbt1:...` or `bbf1:...`); it carries the
    /// key, so treat it as a secret.
    pub reference: String,
    /// Whether fetching it needs a password (tokens and templates).
    pub password_protected: bool,
    /// The content's size in bytes (tokens and files).
    pub size: u64,
    /// The file's name (files).
    pub name: Option<String>,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// When the broker drops it (Unix ms).
    pub expires_at_ms: u64,
}

/// Kinds of [`Published`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishedKind {
    /// Relationship templates.
    Template,
    /// Tokens.
    Token,
    /// Files.
    File,
}

impl PublishedKind {
    fn table(self) -> &'static str {
        match self {
            PublishedKind::Template => "templates",
            PublishedKind::Token => "tokens",
            PublishedKind::File => "files",
        }
    }
}

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

fn now_ms() -> u64 {
    backbone_protocol::unix_millis_now()
}

impl Database {
    /// Opens (creating if needed) `connector.db` in `dir` and migrates it.
    pub async fn open(dir: &Path) -> Result<Self, DbError> {
        let path = dir.join("connector.db");
        let connection = tokio::task::spawn_blocking(move || -> Result<Connection, DbError> {
            let mut connection = Connection::open(&path)?;
            connection.pragma_update(None, "journal_mode", "WAL")?;
            // FULL: a commit is on disk (WAL synced) before it returns, which
            // the ack to the broker relies on.
            connection.pragma_update(None, "synchronous", "FULL")?;
            connection.pragma_update(None, "foreign_keys", "ON")?;
            // Every statement is prepared once and kept (about thirty).
            connection.set_prepared_statement_cache_capacity(64);
            connection.busy_timeout(std::time::Duration::from_secs(5))?;
            migrations::migrate(&mut connection)?;
            Ok(connection)
        })
        .await
        .map_err(|error| DbError::Task(error.to_string()))??;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R, DbError>
    where
        F: FnOnce(&mut Connection) -> Result<R, DbError> + Send + 'static,
        R: Send + 'static,
    {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection
                .lock()
                .map_err(|_| DbError::Task("the database lock is poisoned".into()))?;
            f(&mut connection)
        })
        .await
        .map_err(|error| DbError::Task(error.to_string()))?
    }

    /// Binds the database to `address` on first use, and refuses another
    /// identity's key afterwards: mixing two identities' messages in one
    /// database would corrupt both histories.
    pub async fn claim_identity(&self, address: String) -> Result<(), DbError> {
        self.call(move |connection| {
            connection
                .prepare_cached("INSERT OR IGNORE INTO meta (key, value) VALUES ('identity', ?1)")?
                .execute(params![address])?;
            let owner: String = connection
                .prepare_cached("SELECT value FROM meta WHERE key = 'identity'")?
                .query_row([], |row| row.get(0))?;
            if owner == address {
                Ok(())
            } else {
                Err(DbError::WrongIdentity {
                    database: owner,
                    key: address,
                })
            }
        })
        .await
    }

    /// Records what the Backbone pushed, in one transaction (one sync to
    /// disk for the whole batch): each message, unreadable envelope or
    /// relationship change with its event and its webhook deliveries. An
    /// item recorded before (pushed again because its ack was lost) is
    /// skipped and raises no second event. Returns the newest event's
    /// position, if the batch raised one.
    pub async fn record_incoming(
        &self,
        batch: Vec<Incoming>,
        endpoints: Vec<String>,
    ) -> Result<Option<i64>, DbError> {
        self.call(move |connection| {
            // The ack to the Backbone relies on this commit being synced:
            // say so here, whatever an earlier write left set.
            connection.pragma_update(None, "synchronous", "FULL")?;
            let transaction = connection.transaction()?;
            let mut newest = None;
            for item in &batch {
                let position = match item {
                    Incoming::Message(message) => received_in(&transaction, message, &endpoints)?
                        .map(|(_, position)| position),
                    Incoming::Unreadable(envelope) => {
                        unreadable_in(&transaction, envelope, &endpoints)?
                    }
                    Incoming::Relationship(relationship, event) => {
                        relationship_in(&transaction, relationship, Some(event), &endpoints)?
                    }
                };
                newest = position.or(newest);
            }
            transaction.commit()?;
            Ok(newest)
        })
        .await
    }

    /// Records one received message (see [`Database::record_incoming`]):
    /// its local id and its event's position, or `None` if it was recorded
    /// before.
    pub async fn record_received(
        &self,
        message: NewMessage,
        endpoints: Vec<String>,
    ) -> Result<Option<(i64, i64)>, DbError> {
        self.call(move |connection| {
            let transaction = connection.transaction()?;
            let recorded = received_in(&transaction, &message, &endpoints)?;
            transaction.commit()?;
            Ok(recorded)
        })
        .await
    }

    /// Records a message this Connector sent.
    pub async fn record_sent(&self, message: NewMessage) -> Result<MessageRecord, DbError> {
        self.call(move |connection| {
            let transaction = connection.transaction()?;
            let id = insert_message(&transaction, Direction::Out, &message)?
                .ok_or_else(|| DbError::Corrupt("the broker reused a message id".into()))?;
            let record = message_by_id(&transaction, id)?
                .ok_or_else(|| DbError::Corrupt("a message vanished".into()))?;
            transaction.commit()?;
            Ok(record)
        })
        .await
    }

    /// Records a relationship as seen now (a newer record is kept over an
    /// older one), without an event: what the API learns when it lists or
    /// decides relationships.
    pub async fn record_relationship(
        &self,
        relationship: RelationshipRecord,
    ) -> Result<(), DbError> {
        self.call(move |connection| {
            let transaction = connection.transaction()?;
            relationship_in(&transaction, &relationship, None, &[])?;
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    /// One message by its local id.
    pub async fn message(&self, id: i64) -> Result<Option<MessageRecord>, DbError> {
        self.call(move |connection| message_by_id(connection, id))
            .await
    }

    /// Messages matching `filter`, oldest first.
    pub async fn list_messages(
        &self,
        filter: MessageFilter,
    ) -> Result<Vec<MessageRecord>, DbError> {
        self.call(move |connection| {
            let mut sql = String::from(
                "SELECT id, direction, broker_message_id, seq, sender, recipients, sent_at_ms,
                        stored_at_ms, expires_at_ms, recorded_at_ms, content_type, content,
                        attachments
                 FROM messages WHERE id > ?1",
            );
            let mut values: Vec<rusqlite::types::Value> = vec![filter.after_id.unwrap_or(0).into()];
            if let Some(peer) = &filter.peer {
                values.push(peer.clone().into());
                sql.push_str(&format!(
                    " AND id IN (SELECT message FROM message_peers WHERE peer = ?{})",
                    values.len()
                ));
            }
            if let Some(direction) = filter.direction {
                values.push(direction.as_str().to_owned().into());
                sql.push_str(&format!(" AND direction = ?{}", values.len()));
            }
            if let Some(since) = filter.since_ms {
                values.push((since as i64).into());
                sql.push_str(&format!(" AND recorded_at_ms >= ?{}", values.len()));
            }
            if let Some(until) = filter.until_ms {
                values.push((until as i64).into());
                sql.push_str(&format!(" AND recorded_at_ms < ?{}", values.len()));
            }
            values.push(i64::from(filter.limit).into());
            sql.push_str(&format!(" ORDER BY id LIMIT ?{}", values.len()));
            let mut statement = connection.prepare_cached(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), read_message)?;
            let mut messages = Vec::new();
            for row in rows {
                messages.push(row??);
            }
            Ok(messages)
        })
        .await
    }

    /// Records a token, template or file this Connector published.
    pub async fn record_published(
        &self,
        kind: PublishedKind,
        record: Published,
    ) -> Result<Published, DbError> {
        self.call(move |connection| {
            let table = kind.table();
            match kind {
                PublishedKind::Template => {
                    connection.prepare_cached(
                        "INSERT INTO templates (reference, password_protected, created_at_ms, expires_at_ms)
                         VALUES (?1, ?2, ?3, ?4)")?.execute(
                        params![
                            record.reference,
                            record.password_protected,
                            record.created_at_ms as i64,
                            record.expires_at_ms as i64
                        ])?;
                    let id = connection.last_insert_rowid();
                    Ok(Published {
                        id: id.to_string(),
                        ..record
                    })
                }
                PublishedKind::Token => {
                    connection.prepare_cached(
                        &format!(
                            "INSERT OR REPLACE INTO {table} (id, reference, password_protected, size,
                                 created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                        ))?.execute(
                        params![
                            record.id,
                            record.reference,
                            record.password_protected,
                            record.size as i64,
                            record.created_at_ms as i64,
                            record.expires_at_ms as i64
                        ])?;
                    Ok(record)
                }
                PublishedKind::File => {
                    connection.prepare_cached(
                        &format!(
                            "INSERT OR REPLACE INTO {table} (id, reference, name, size,
                                 created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                        ))?.execute(
                        params![
                            record.id,
                            record.reference,
                            record.name,
                            record.size as i64,
                            record.created_at_ms as i64,
                            record.expires_at_ms as i64
                        ])?;
                    Ok(record)
                }
            }
        })
        .await
    }

    /// The tokens, templates or files this Connector published.
    pub async fn list_published(&self, kind: PublishedKind) -> Result<Vec<Published>, DbError> {
        self.select_published(kind, None).await
    }

    /// One token or file this Connector published, by id (hex, lowercase).
    pub async fn published(
        &self,
        kind: PublishedKind,
        id: String,
    ) -> Result<Option<Published>, DbError> {
        Ok(self
            .select_published(kind, Some(id.to_ascii_lowercase()))
            .await?
            .pop())
    }

    async fn select_published(
        &self,
        kind: PublishedKind,
        id: Option<String>,
    ) -> Result<Vec<Published>, DbError> {
        self.call(move |connection| {
            let sql = match kind {
                PublishedKind::Template => {
                    "SELECT CAST(id AS TEXT), reference, password_protected, 0, NULL,
                            created_at_ms, expires_at_ms FROM templates
                     WHERE ?1 IS NULL OR CAST(id AS TEXT) = ?1 ORDER BY id"
                }
                PublishedKind::Token => {
                    "SELECT id, reference, password_protected, size, NULL, created_at_ms,
                            expires_at_ms FROM tokens
                     WHERE ?1 IS NULL OR id = ?1 ORDER BY created_at_ms"
                }
                PublishedKind::File => {
                    "SELECT id, reference, 0, size, name, created_at_ms, expires_at_ms
                     FROM files WHERE ?1 IS NULL OR id = ?1 ORDER BY created_at_ms"
                }
            };
            let mut statement = connection.prepare_cached(sql)?;
            let rows = statement.query_map(params![id], read_published)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Forgets a token or file this Connector published.
    pub async fn delete_published(&self, kind: PublishedKind, id: String) -> Result<bool, DbError> {
        self.call(move |connection| {
            let changed = connection
                .prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", kind.table()))?
                .execute(params![id])?;
            Ok(changed > 0)
        })
        .await
    }

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

    /// Counts for the metrics: messages by direction, deliveries by state.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, DbError> {
        self.call(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT 'messages_' || direction, COUNT(*) FROM messages GROUP BY direction
                 UNION ALL
                 SELECT 'deliveries_' || state, COUNT(*) FROM webhook_deliveries GROUP BY state",
            )?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
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

/// What the Backbone pushed, as [`Database::record_incoming`] records it.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// A message, opened.
    Message(NewMessage),
    /// An envelope that did not open.
    Unreadable(UnreadableEnvelope),
    /// A relationship notice, with its event.
    Relationship(RelationshipRecord, NewEvent),
}

fn received_in(
    transaction: &rusqlite::Transaction<'_>,
    message: &NewMessage,
    endpoints: &[String],
) -> Result<Option<(i64, i64)>, DbError> {
    let Some(id) = insert_message(transaction, Direction::In, message)? else {
        return Ok(None);
    };
    let stored = message_by_id(transaction, id)?
        .ok_or_else(|| DbError::Corrupt("a message vanished".into()))?;
    let event = NewEvent {
        source: format!("message:{}", message.broker_message_id),
        kind: "message.received",
        peer: message.sender.clone(),
        data: crate::api::messages::MessageView::from(&stored).to_json(),
    };
    let position = insert_event(transaction, &event, endpoints)?;
    Ok(Some((id, position)))
}

fn unreadable_in(
    transaction: &rusqlite::Transaction<'_>,
    envelope: &UnreadableEnvelope,
    endpoints: &[String],
) -> Result<Option<i64>, DbError> {
    let changed = transaction
        .prepare_cached(
            "INSERT INTO unreadable (broker_message_id, seq, sender, stored_at_ms, envelope,
                 error, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (broker_message_id) DO NOTHING",
        )?
        .execute(params![
            envelope.broker_message_id,
            envelope.seq as i64,
            envelope.sender,
            envelope.stored_at_ms as i64,
            envelope.envelope,
            envelope.error,
            now_ms() as i64
        ])?;
    if changed == 0 {
        return Ok(None);
    }
    let event = NewEvent {
        source: format!("unreadable:{}", envelope.broker_message_id),
        kind: "message.unreadable",
        peer: envelope.sender.clone().unwrap_or_default(),
        data: serde_json::json!({
            "message_id": envelope.broker_message_id,
            "seq": envelope.seq,
            "sender": envelope.sender,
            "stored_at_ms": envelope.stored_at_ms,
            "error": envelope.error,
        }),
    };
    Ok(Some(insert_event(transaction, &event, endpoints)?))
}

/// Upserts a relationship (a newer record wins) and, with `event`, records
/// the event unless its source was recorded before (then nothing changes).
fn relationship_in(
    transaction: &rusqlite::Transaction<'_>,
    relationship: &RelationshipRecord,
    event: Option<&NewEvent>,
    endpoints: &[String],
) -> Result<Option<i64>, DbError> {
    if let Some(event) = event {
        let seen: Option<i64> = transaction
            .prepare_cached("SELECT id FROM events WHERE source = ?1")?
            .query_row(params![event.source], |row| row.get(0))
            .optional()?;
        if seen.is_some() {
            return Ok(None);
        }
    }
    transaction
        .prepare_cached(
            "INSERT INTO relationships (id, peer, role, state, changed_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET peer = ?2, role = ?3, state = ?4,
                 changed_at_ms = ?5
             WHERE excluded.changed_at_ms >= relationships.changed_at_ms",
        )?
        .execute(params![
            relationship.id,
            relationship.peer,
            relationship.role,
            relationship.state,
            relationship.changed_at_ms as i64
        ])?;
    match event {
        Some(event) => Ok(Some(insert_event(transaction, event, endpoints)?)),
        None => Ok(None),
    }
}

fn insert_message(
    transaction: &rusqlite::Transaction<'_>,
    direction: Direction,
    message: &NewMessage,
) -> Result<Option<i64>, DbError> {
    let recipients = serde_json::to_string(&message.recipients)
        .map_err(|error| DbError::Corrupt(error.to_string()))?;
    let attachments = serde_json::to_string(&message.attachments)
        .map_err(|error| DbError::Corrupt(error.to_string()))?;
    let changed = transaction.prepare_cached(
        "INSERT INTO messages (direction, broker_message_id, seq, sender, recipients, sent_at_ms,
             stored_at_ms, expires_at_ms, recorded_at_ms, content_type, content, attachments)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (direction, broker_message_id) DO NOTHING")?.execute(
        params![
            direction.as_str(),
            message.broker_message_id,
            message.seq.map(|seq| seq as i64),
            message.sender,
            recipients,
            message.sent_at_ms as i64,
            message.stored_at_ms.map(|at| at as i64),
            message.expires_at_ms.map(|at| at as i64),
            now_ms() as i64,
            message.content_type,
            message.content,
            attachments
        ])?;
    if changed == 0 {
        return Ok(None);
    }
    let id = transaction.last_insert_rowid();
    let peers: Vec<&String> = match direction {
        Direction::In => vec![&message.sender],
        Direction::Out => message.recipients.iter().collect(),
    };
    for peer in peers {
        transaction
            .prepare_cached("INSERT OR IGNORE INTO message_peers (peer, message) VALUES (?1, ?2)")?
            .execute(params![peer, id])?;
    }
    Ok(Some(id))
}

fn insert_event(
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

fn message_by_id(connection: &Connection, id: i64) -> Result<Option<MessageRecord>, DbError> {
    connection
        .prepare_cached(
            "SELECT id, direction, broker_message_id, seq, sender, recipients, sent_at_ms,
                    stored_at_ms, expires_at_ms, recorded_at_ms, content_type, content, attachments
             FROM messages WHERE id = ?1",
        )?
        .query_row(params![id], read_message)
        .optional()?
        .transpose()
}

/// A message row; the outer error is SQLite's, the inner one a corrupt JSON column.
fn read_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<MessageRecord, DbError>> {
    let direction: String = row.get(1)?;
    let recipients: String = row.get(5)?;
    let attachments: String = row.get(12)?;
    let record = (|| {
        Ok(MessageRecord {
            id: row.get(0)?,
            direction: Direction::parse(&direction)?,
            broker_message_id: row.get(2)?,
            seq: row.get::<_, Option<i64>>(3)?.map(|seq| seq as u64),
            sender: row.get(4)?,
            recipients: serde_json::from_str(&recipients)
                .map_err(|error| DbError::Corrupt(error.to_string()))?,
            sent_at_ms: row.get::<_, i64>(6)? as u64,
            stored_at_ms: row.get::<_, Option<i64>>(7)?.map(|at| at as u64),
            expires_at_ms: row.get::<_, Option<i64>>(8)?.map(|at| at as u64),
            recorded_at_ms: row.get::<_, i64>(9)? as u64,
            content_type: row.get(10)?,
            content: row.get(11)?,
            attachments: serde_json::from_str(&attachments)
                .map_err(|error| DbError::Corrupt(error.to_string()))?,
        })
    })();
    Ok(record)
}

fn read_published(row: &rusqlite::Row<'_>) -> rusqlite::Result<Published> {
    Ok(Published {
        id: row.get(0)?,
        reference: row.get(1)?,
        password_protected: row.get(2)?,
        size: row.get::<_, i64>(3)? as u64,
        name: row.get(4)?,
        created_at_ms: row.get::<_, i64>(5)? as u64,
        expires_at_ms: row.get::<_, i64>(6)? as u64,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, sender: &str) -> NewMessage {
        NewMessage {
            broker_message_id: id.into(),
            seq: Some(1),
            sender: sender.into(),
            recipients: vec!["me".into()],
            sent_at_ms: 1,
            stored_at_ms: Some(2),
            expires_at_ms: Some(3),
            content_type: "text/plain; charset=utf-8".into(),
            content: b"hi".to_vec(),
            attachments: vec![],
        }
    }

    #[tokio::test]
    async fn a_message_pushed_twice_is_recorded_once_with_one_event_and_one_delivery_per_endpoint()
    {
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::open(dir.path()).await.expect("open");
        let endpoints = vec!["http://a/".to_owned(), "http://b/".to_owned()];
        let first = db
            .record_received(message("m1", "alice"), endpoints.clone())
            .await
            .expect("record");
        assert!(first.is_some());
        let again = db
            .record_received(message("m1", "alice"), endpoints.clone())
            .await
            .expect("record again");
        assert_eq!(again, None);
        assert_eq!(db.events_after(0, 10).await.expect("events").len(), 1);
        assert_eq!(db.deliveries(None, 10).await.expect("deliveries").len(), 2);
    }

    #[tokio::test]
    async fn a_database_refuses_another_identity() {
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::open(dir.path()).await.expect("open");
        db.claim_identity("bb1alice".into())
            .await
            .expect("first claim");
        db.claim_identity("bb1alice".into())
            .await
            .expect("same again");
        drop(db);
        let db = Database::open(dir.path()).await.expect("reopen");
        let error = db
            .claim_identity("bb1mallory".into())
            .await
            .expect_err("another identity");
        assert!(matches!(error, DbError::WrongIdentity { .. }), "{error}");
    }

    #[tokio::test]
    async fn deliveries_are_due_in_order_per_endpoint_and_peer() {
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::open(dir.path()).await.expect("open");
        let endpoints = vec!["http://a/".to_owned()];
        for (id, sender) in [("m1", "alice"), ("m2", "alice"), ("m3", "bob")] {
            db.record_received(message(id, sender), endpoints.clone())
                .await
                .expect("record");
        }
        let now = now_ms() + 1;
        let due = db
            .due_deliveries(endpoints.clone(), now, 10)
            .await
            .expect("due");
        let peers: Vec<_> = due.iter().map(|d| d.delivery.peer.as_str()).collect();
        assert_eq!(peers, ["alice", "bob"], "one per peer, the oldest first");
        // Alice's first fails and waits: her second must wait behind it.
        let alice_first = due[0].delivery.id;
        db.delivery_attempt_failed(alice_first, "503".into(), Some(now + 60_000))
            .await
            .expect("fail");
        let due = db
            .due_deliveries(endpoints.clone(), now, 10)
            .await
            .expect("due");
        let peers: Vec<_> = due.iter().map(|d| d.delivery.peer.as_str()).collect();
        assert_eq!(peers, ["bob"]);
        // Given up: the next one for Alice becomes due; a retry requeues it.
        db.delivery_attempt_failed(alice_first, "503".into(), None)
            .await
            .expect("give up");
        let due = db
            .due_deliveries(endpoints.clone(), now, 10)
            .await
            .expect("due");
        assert_eq!(due[0].delivery.peer, "alice");
        assert_ne!(due[0].delivery.id, alice_first);
        let failed = db
            .deliveries(Some("failed".into()), 10)
            .await
            .expect("failed");
        assert_eq!(failed.len(), 1);
        let retried = db
            .retry_delivery(alice_first, endpoints.clone())
            .await
            .expect("retry");
        assert_eq!(retried.map(|d| d.state), Some("pending".to_owned()));
        // Endpoints no longer configured are not delivered to.
        assert!(
            db.due_deliveries(vec!["http://other/".into()], now, 10)
                .await
                .expect("due")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn messages_page_and_filter_by_peer_and_direction() {
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::open(dir.path()).await.expect("open");
        for (id, sender) in [("m1", "alice"), ("m2", "bob"), ("m3", "alice")] {
            db.record_received(message(id, sender), vec![])
                .await
                .expect("record");
        }
        let mut sent = message("s1", "me");
        sent.recipients = vec!["alice".into(), "carol".into()];
        db.record_sent(sent).await.expect("sent");
        let alice = db
            .list_messages(MessageFilter {
                peer: Some("alice".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(alice.len(), 3);
        let page = db
            .list_messages(MessageFilter {
                peer: Some("alice".into()),
                after_id: Some(alice[0].id),
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("page");
        assert_eq!(page, vec![alice[1].clone()]);
        let out = db
            .list_messages(MessageFilter {
                direction: Some(Direction::Out),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("out");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].recipients, ["alice", "carol"]);
    }
}
