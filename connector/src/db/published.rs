//! Relationships as last seen, and the templates, tokens and files this
//! Connector published.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::outbox::{NewEvent, insert_event};
use super::{Database, DbError};

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

impl Database {
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

    /// Records a token, template or file this Connector published.
    pub async fn record_published(
        &self,
        kind: PublishedKind,
        record: Published,
    ) -> Result<Published, DbError> {
        self.call(move |connection| {
            let table = kind.table();
            match kind {
                // A template whose capability is not known (see
                // `record_template` for one that can be withdrawn).
                PublishedKind::Template => insert_template(connection, record, None),
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

    /// Records a relationship template with the hash of the delivery
    /// capability behind it (hex), so that it can be withdrawn.
    pub async fn record_template(
        &self,
        record: Published,
        capability_hash: String,
    ) -> Result<Published, DbError> {
        self.call(move |connection| insert_template(connection, record, Some(capability_hash)))
            .await
    }

    /// A template's reference and its capability's hash (none for a
    /// template recorded before hashes were kept).
    pub async fn template(&self, id: String) -> Result<Option<(String, Option<String>)>, DbError> {
        self.call(move |connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT reference, capability_hash FROM templates WHERE CAST(id AS TEXT) = ?1",
                )?
                .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?)
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
}
/// Upserts a relationship (a newer record wins) and, with `event`, records
/// the event unless its source was recorded before (then nothing changes).
pub(super) fn relationship_in(
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

fn insert_template(
    connection: &rusqlite::Connection,
    record: Published,
    capability_hash: Option<String>,
) -> Result<Published, DbError> {
    connection
        .prepare_cached(
            "INSERT INTO templates (reference, password_protected, created_at_ms, expires_at_ms,
                 capability_hash) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            record.reference,
            record.password_protected,
            record.created_at_ms as i64,
            record.expires_at_ms as i64,
            capability_hash
        ])?;
    Ok(Published {
        id: connection.last_insert_rowid().to_string(),
        ..record
    })
}
