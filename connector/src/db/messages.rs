//! Messages received and sent, and envelopes that did not open: recording
//! what the Backbone pushed with its events (one transaction per batch),
//! listing and reading.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::outbox::{NewEvent, insert_event};
use super::published::{RelationshipRecord, relationship_in};
use super::{Database, DbError, now_ms};

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
/// [`Database::record_sent`]), and as recorded ([`MessageRecord::message`]).
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// A stored message: the message as recorded, and what the Connector adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRecord {
    /// The local id.
    pub id: i64,
    /// Received or sent.
    pub direction: Direction,
    /// When this Connector recorded it (Unix ms).
    pub recorded_at_ms: u64,
    /// The message.
    pub message: NewMessage,
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

impl Database {
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
            recorded_at_ms: row.get::<_, i64>(9)? as u64,
            message: NewMessage {
                broker_message_id: row.get(2)?,
                seq: row.get::<_, Option<i64>>(3)?.map(|seq| seq as u64),
                sender: row.get(4)?,
                recipients: serde_json::from_str(&recipients)
                    .map_err(|error| DbError::Corrupt(error.to_string()))?,
                sent_at_ms: row.get::<_, i64>(6)? as u64,
                stored_at_ms: row.get::<_, Option<i64>>(7)?.map(|at| at as u64),
                expires_at_ms: row.get::<_, Option<i64>>(8)?.map(|at| at as u64),
                content_type: row.get(10)?,
                content: row.get(11)?,
                attachments: serde_json::from_str(&attachments)
                    .map_err(|error| DbError::Corrupt(error.to_string()))?,
            },
        })
    })();
    Ok(record)
}
