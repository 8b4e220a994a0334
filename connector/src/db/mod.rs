//! The local SQLite database: messages received and sent, relationships,
//! templates, tokens and files this Connector made, the events it raised and
//! the webhook outbox.
//!
//! One connection, in WAL mode with `synchronous = FULL`, so a committed
//! transaction survives a power cut before the Connector acknowledges the
//! envelope it holds to the broker. Calls run on tokio's blocking pool
//! ([`Database::call`]); SQLite serialises writers anyway, and a connector's
//! write rate is that of its messages.
//!
//! By domain: `messages` (what was received and sent, recorded with its
//! events), `published` (relationships, templates, tokens, files), `outbox`
//! (the event log and the webhook deliveries); [`migrations`] the schema.

mod messages;
pub mod migrations;
mod outbox;
mod published;

pub use messages::{
    Attachment, Direction, Incoming, MessageFilter, MessageRecord, NewMessage, UnreadableEnvelope,
};
pub use outbox::{DeliveryRecord, DueDelivery, EventRecord, NewEvent};
pub use published::{Published, PublishedKind, RelationshipRecord};

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, params};

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
        assert_eq!(out[0].message.recipients, ["alice", "carol"]);
    }
}
