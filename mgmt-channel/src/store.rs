//! Desired state: an embedded SQLite database (`state.db` under the state
//! directory). Each resource is one row holding its JSON, so adding a field
//! needs no migration; events are a second table, and single settings of
//! the host (the card image in use) a third.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};

use crate::model::{now_ms, Event, Kind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("row {id}: {source}")]
    Json {
        id: String,
        source: serde_json::Error,
    },
}

pub struct Store {
    db: Connection,
}

/// Events kept; older ones are dropped as new ones arrive.
const EVENTS_KEPT: i64 = 10_000;

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS resources (
                 id TEXT PRIMARY KEY,
                 kind TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 time_ms INTEGER NOT NULL,
                 resource TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 message TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS settings (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL);",
        )?;
        Ok(Store { db })
    }

    pub fn get<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<Option<T>, StoreError> {
        let body: Option<String> = self
            .db
            .query_row(
                "SELECT body FROM resources WHERE id = ?1 AND kind = ?2",
                params![id, kind.name()],
                |row| row.get(0),
            )
            .optional()?;
        body.map(|b| decode(id, &b)).transpose()
    }

    /// Every resource of a kind, oldest first.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>, StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT id, body FROM resources WHERE kind = ?1 ORDER BY created_ms, id")?;
        let rows = stmt.query_map(params![kind.name()], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(decode(&id, &body)?);
        }
        Ok(out)
    }

    /// Inserts or replaces a resource.
    pub fn put<T: Serialize>(&self, kind: Kind, id: &str, value: &T) -> Result<(), StoreError> {
        let body = serde_json::to_string(value).map_err(|source| StoreError::Json {
            id: id.to_string(),
            source,
        })?;
        self.db.execute(
            "INSERT INTO resources (id, kind, created_ms, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            params![id, kind.name(), now_ms() as i64, body],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .execute("DELETE FROM resources WHERE id = ?1", params![id])?
            > 0)
    }

    /// A host-wide setting, e.g. `firmware_image`.
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn record_event(
        &self,
        resource: &str,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO events (time_ms, resource, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![now_ms() as i64, resource, kind, message],
        )?;
        self.db.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            params![EVENTS_KEPT],
        )?;
        Ok(())
    }

    /// Events after `since` (a `seq`), oldest first, at most `limit`,
    /// optionally only about `resource`.
    pub fn events(
        &self,
        since: i64,
        resource: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT seq, time_ms, resource, kind, message FROM events
             WHERE seq > ?1 AND (?2 IS NULL OR resource = ?2)
             ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![since, resource, limit], |row| {
            Ok(Event {
                seq: row.get(0)?,
                time_ms: row.get::<_, i64>(1)? as u64,
                resource: row.get(2)?,
                kind: row.get(3)?,
                message: row.get(4)?,
            })
        })?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }
}

fn decode<T: DeserializeOwned>(id: &str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|source| StoreError::Json {
        id: id.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Subnet;

    #[test]
    fn resources_and_events_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let subnet = Subnet {
            id: "subnet-1".into(),
            cidr: "10.0.1.0/24".into(),
            gateway: "10.0.1.1".into(),
            created_ms: 1,
        };
        {
            let store = Store::open(&path).unwrap();
            store.put(Kind::Subnet, &subnet.id, &subnet).unwrap();
            store
                .record_event("subnet-1", "created", "10.0.1.0/24")
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.get::<Subnet>(Kind::Subnet, "subnet-1").unwrap(),
            Some(subnet)
        );
        assert_eq!(store.get::<Subnet>(Kind::Volume, "subnet-1").unwrap(), None);
        assert_eq!(store.list::<Subnet>(Kind::Subnet).unwrap().len(), 1);
        let events = store.events(0, None, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "created");
        assert!(store.delete("subnet-1").unwrap());
        assert!(!store.delete("subnet-1").unwrap());
        store.set_setting("firmware_image", "/a").unwrap();
        store.set_setting("firmware_image", "/b").unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.setting("firmware_image").unwrap().as_deref(),
            Some("/b")
        );
        assert_eq!(store.setting("other").unwrap(), None);
    }
}
