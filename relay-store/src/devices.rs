//! The device registry's rows: one per device, keyed by its internal number, with a record
//! (JSON) owned by the control plane.
//!
//! Invariant: every write is one transaction committed before the call returns (a device
//! created, changed or deleted is on disk when the API answers), and a failed write changes
//! nothing.
use std::path::PathBuf;
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension as _};

use crate::{BUSY_TIMEOUT, StoreError, unix_ms};

/// One stored device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// The device's internal number (1 to 32 bytes).
    pub number: String,
    /// The device record, JSON owned by the caller; stored as given.
    pub record: String,
}

/// A connection to the device registry (see [`crate::Store::devices`]). `Send`, not `Sync`.
#[derive(Debug)]
pub struct DeviceStore {
    conn: Connection,
    path: PathBuf,
}

impl DeviceStore {
    pub(crate) fn new(conn: Connection, path: PathBuf) -> Result<DeviceStore, StoreError> {
        let store = DeviceStore { conn, path };
        let err = |what| {
            let path = store.path.clone();
            move |source| StoreError::Sqlite { path, what, source }
        };
        store
            .conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(err("set busy_timeout"))?;
        store
            .conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(err("synchronous"))?;
        store
            .conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(err("foreign_keys"))?;
        Ok(store)
    }

    fn err(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Every device, ordered by number.
    pub fn list(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT number, record FROM devices ORDER BY number")
            .map_err(self.err("prepare list devices"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceRow {
                    number: r.get(0)?,
                    record: r.get(1)?,
                })
            })
            .map_err(self.err("list devices"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("read a device"))
    }

    /// The device with `number`, if any.
    pub fn get(&self, number: &str) -> Result<Option<DeviceRow>, StoreError> {
        self.conn
            .prepare_cached("SELECT number, record FROM devices WHERE number = ?1")
            .map_err(self.err("prepare get device"))?
            .query_row([number], |r| {
                Ok(DeviceRow {
                    number: r.get(0)?,
                    record: r.get(1)?,
                })
            })
            .optional()
            .map_err(self.err("get device"))
    }

    /// Inserts `row`; `false` (and nothing written) if its number is taken.
    pub fn insert(&mut self, row: &DeviceRow) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO devices (number, record, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (number) DO NOTHING",
            )
            .map_err(self.err("prepare insert device"))?
            .execute(rusqlite::params![
                row.number,
                row.record,
                unix_ms(SystemTime::now())
            ])
            .map_err(self.err("insert device"))?;
        Ok(n == 1)
    }

    /// Replaces the record of an existing device; `false` if there is none.
    pub fn update(&mut self, row: &DeviceRow) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("UPDATE devices SET record = ?2, updated_at = ?3 WHERE number = ?1")
            .map_err(self.err("prepare update device"))?
            .execute(rusqlite::params![
                row.number,
                row.record,
                unix_ms(SystemTime::now())
            ])
            .map_err(self.err("update device"))?;
        Ok(n == 1)
    }

    /// Deletes the device with `number`; whether there was one.
    pub fn delete(&mut self, number: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM devices WHERE number = ?1")
            .map_err(self.err("prepare delete device"))?
            .execute([number])
            .map_err(self.err("delete device"))?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use crate::Store;

    fn row(number: &str, record: &str) -> DeviceRow {
        DeviceRow {
            number: number.into(),
            record: record.into(),
        }
    }

    #[test]
    fn devices_are_created_changed_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("relay.db")).unwrap();
        let mut d = store.devices().unwrap();
        assert!(d.list().unwrap().is_empty());
        assert!(d.insert(&row("4711", "{\"a\":1}")).unwrap());
        assert!(
            !d.insert(&row("4711", "{\"a\":2}")).unwrap(),
            "number taken"
        );
        assert!(d.insert(&row("100", "{}")).unwrap());
        assert_eq!(d.get("4711").unwrap(), Some(row("4711", "{\"a\":1}")));
        assert!(d.update(&row("4711", "{\"a\":3}")).unwrap());
        assert!(!d.update(&row("999", "{}")).unwrap(), "no such device");
        assert_eq!(
            d.list().unwrap(),
            vec![row("100", "{}"), row("4711", "{\"a\":3}")]
        );
        assert!(d.delete("100").unwrap());
        assert!(!d.delete("100").unwrap());
        assert_eq!(d.get("100").unwrap(), None);
        // Out-of-range numbers are refused by the schema, not stored.
        assert!(d.insert(&row("", "{}")).is_err());
        assert!(d.insert(&row(&"9".repeat(33), "{}")).is_err());
        // Another connection (a restart) sees what was committed.
        drop(d);
        drop(store);
        let store = Store::open(&dir.path().join("relay.db")).unwrap();
        assert_eq!(
            store.devices().unwrap().list().unwrap(),
            vec![row("4711", "{\"a\":3}")]
        );
    }
}
