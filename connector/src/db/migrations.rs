//! The database's schema, as numbered migrations. `PRAGMA user_version`
//! holds the number of migrations applied; each runs in its own transaction,
//! so a crash leaves the database at one version or the next. Migrations are
//! only ever appended: a released one is never edited.

use rusqlite::Connection;

/// Every migration, in order. Index `i` takes the database from version `i`
/// to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: messages (and envelopes that could not be opened), relationships,
    // templates, tokens, files, events and the webhook outbox. Ids that
    // page (messages, events) are AUTOINCREMENT, so that an id is never
    // reused after rows are deleted and cursors never skip.
    r#"
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        broker_message_id TEXT NOT NULL,
        seq INTEGER,
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        sent_at_ms INTEGER NOT NULL,
        stored_at_ms INTEGER,
        expires_at_ms INTEGER,
        recorded_at_ms INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        content BLOB NOT NULL,
        attachments TEXT NOT NULL,
        UNIQUE (direction, broker_message_id)
    );
    CREATE TABLE message_peers (
        peer TEXT NOT NULL,
        message INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        PRIMARY KEY (peer, message)
    ) WITHOUT ROWID;
    CREATE INDEX messages_by_time ON messages (recorded_at_ms);

    CREATE TABLE unreadable (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        broker_message_id TEXT NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        sender TEXT,
        stored_at_ms INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        error TEXT NOT NULL,
        recorded_at_ms INTEGER NOT NULL
    );

    CREATE TABLE relationships (
        id TEXT PRIMARY KEY,
        peer TEXT NOT NULL,
        role TEXT NOT NULL,
        state TEXT NOT NULL,
        changed_at_ms INTEGER NOT NULL
    );
    CREATE TABLE templates (
        id INTEGER PRIMARY KEY,
        reference TEXT NOT NULL,
        password_protected INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        reference TEXT NOT NULL,
        password_protected INTEGER NOT NULL,
        size INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        reference TEXT NOT NULL,
        name TEXT,
        size INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        peer TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY,
        event INTEGER NOT NULL REFERENCES events(id),
        endpoint TEXT NOT NULL,
        peer TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms INTEGER NOT NULL,
        last_error TEXT,
        created_at_ms INTEGER NOT NULL,
        delivered_at_ms INTEGER,
        UNIQUE (event, endpoint)
    );
    CREATE INDEX deliveries_pending ON webhook_deliveries (state, endpoint, peer, id);

    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 2: the hash of the delivery capability behind each relationship
    // template, so that withdrawing a template revokes it.
    r#"
    ALTER TABLE templates ADD COLUMN capability_hash TEXT;
    "#,
];

/// The schema version this build writes.
pub const CURRENT: usize = MIGRATIONS.len();

/// Errors of [`migrate`].
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The database was written by a newer Connector.
    #[error(
        "the database is at schema version {found}, newer than this build's {CURRENT}: \
         run the newer backbone-connector"
    )]
    Newer {
        /// The version found.
        found: usize,
    },
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Brings the database to [`CURRENT`].
pub fn migrate(connection: &mut Connection) -> Result<(), MigrationError> {
    let found: usize =
        connection.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    if found > CURRENT {
        return Err(MigrationError::Newer { found });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op_and_a_newer_database_is_refused() {
        let mut connection = Connection::open_in_memory().expect("open");
        migrate(&mut connection).expect("first");
        migrate(&mut connection).expect("again");
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version as usize, CURRENT);
        connection
            .pragma_update(None, "user_version", (CURRENT + 1) as i64)
            .expect("bump");
        assert!(matches!(
            migrate(&mut connection),
            Err(MigrationError::Newer { .. })
        ));
    }
}
