//! The crash-safe embedded store of the homerelay control plane.
//!
//! The control plane persists its channel records here so that a restart of the daemon does
//! not end calls: the XDP maps are pinned in bpffs and survive a restart of the process, and
//! the restarted daemon reads its channels back from this store. Later the device registry
//! (devices, password verifiers, registrations) lives in the same database, added by a
//! schema migration (see [`schema`]).
//!
//! The store is synchronous (no async runtime): the control plane calls it from one
//! dedicated thread, which batches every command queued since the last write into one
//! [`Store::apply`] call (group commit).
//!
//! # Why SQLite in WAL mode
//!
//! The store is SQLite through `rusqlite` with the `bundled` feature:
//!
//! - **Nothing to install**: SQLite is compiled into the binary, no system library or
//!   version skew between hosts.
//! - **Schema migrations**: SQL plus `PRAGMA user_version` is a small, well-understood
//!   migration mechanism, and the device registry is relational (devices, verifiers,
//!   registrations, with foreign keys).
//! - **Inspectable**: operators can read the database with the `sqlite3` shell, even while the
//!   daemon runs (WAL readers do not block the writer).
//! - **Crash safety is SQLite's**: atomic transactions, recovery of a torn write-ahead log on
//!   open, tested far beyond anything a hand-written log would get.
//!
//! # Durability
//!
//! The database runs with `journal_mode=WAL` and `synchronous=NORMAL`. A commit appends to
//! the WAL without fsync; the WAL is fsynced at each checkpoint. So:
//!
//! - A committed transaction survives a crash of the **process** (panic, `kill -9`, OOM
//!   kill): the data is in the kernel's page cache, and the next open recovers the WAL. That
//!   is exactly what a restart needs, since the pinned XDP maps survive the same event.
//! - A **power loss** (or kernel crash) can lose the last transactions, never corrupt the
//!   database. A power loss also loses the pinned XDP maps and so every call: nothing is lost
//!   that could have been kept, and commits stay cheap (no fsync per batch).
//!
//! The one exception is the instance epoch: [`Store::start_instance`] commits it with
//! `synchronous=FULL` (the WAL is fsynced before it returns), so an epoch is never handed out
//! twice, even across a power loss. The parent directory is fsynced when the database file is
//! created.
//!
//! # Channel ids
//!
//! A channel id is `epoch << 40 | n` with `n` in `1..2^40`: [`Instance::channel_ids`] is the
//! range one run of the daemon may use. The epoch is incremented and fsynced before the run
//! hands out any id, so every run has its own range, and ids are unique across restarts,
//! crashes and power loss, even though the channel records themselves are only written with
//! `synchronous=NORMAL` (a lost record cannot matter: its id's epoch is still spent). Epochs
//! are below 2^23 so every id is below 2^63 and fits SQLite's signed INTEGER. 2^40 ids per
//! run is over 100 days at 100,000 allocations a second; a run that exhausts its range starts
//! a new instance. [`Store::max_channel_id`] is the highest id ever persisted (a high-water
//! mark kept in `meta`, not lowered by deletes); it is always below the current instance's
//! range, and the service may check that as a guard against a database restored from an old
//! backup (which would bring back an old epoch).
//!
//! # Locking
//!
//! [`Store::open`] takes an exclusive `flock` on `<database>.lock`, which records the
//! holder's pid: a second daemon fails at once with [`StoreError::InUse`] naming the pid,
//! and the kernel releases the lock when the holder dies. The lock file is left in place.
//!
//! # Measured cost
//!
//! Measured on the development machine (2 cores shared with other builds, ext4 on a virtual
//! disk, release build, four runs of
//! `cargo test --release -p relay-store --test measure -- --ignored --nocapture`), each put
//! a ~200-byte JSON record:
//!
//! - 1,000 puts, one transaction each: 87–159 ms (≈ 90–160 µs per commit, no fsync);
//! - 1,000 puts in 10 batches of 100: 2.8–3.8 ms (≈ 3 µs per put);
//! - [`Store::start_instance`] (one fsynced commit): 3–7 ms.
//!
//! These are not asserted anywhere. A commit costs 30–50 times a put inside a batch: the control
//! plane's store thread should group every queued command into one [`Store::apply`].

mod devices;
mod error;
mod lock;
pub mod schema;

use std::fs::{DirBuilder, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

pub use devices::{DeviceRow, DeviceStore};
pub use error::StoreError;
use lock::LockFile;

/// Channel ids are `epoch << ID_EPOCH_SHIFT | n`.
pub const ID_EPOCH_SHIFT: u32 = 40;

/// The largest epoch: ids stay below 2^63.
pub const MAX_EPOCH: u32 = (1 << (63 - ID_EPOCH_SHIFT)) - 1;

/// How long a write waits for a reader holding a lock (e.g. an operator's `sqlite3` shell).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One persisted channel, keyed by (`addr_index`, `port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    /// The RTP (even) port of the channel.
    pub port: u16,
    /// Index of the relay address the channel is on.
    pub addr_index: u16,
    /// The channel id, unique across all rows (see the crate docs for the id scheme).
    pub id: u64,
    /// The channel record, JSON owned by the caller; stored as given.
    pub record: String,
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOp {
    /// Inserts the row, or replaces the row at the same (`addr_index`, `port`). Fails the
    /// batch if another row already has the same id.
    Put(ChannelRow),
    /// Removes the row at (`addr_index`, `port`); a missing row is not an error.
    Delete { addr_index: u16, port: u16 },
}

/// One run of the daemon, from [`Store::start_instance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Incremented (and fsynced) at every start; never reused.
    pub epoch: u32,
    /// 16 random bytes, hex: tells runs apart in logs and to peers.
    pub id: String,
    pub started_at: SystemTime,
}

impl Instance {
    /// The channel ids this run may hand out: `epoch << 40 | n`, `n` in `1..2^40`.
    pub fn channel_ids(&self) -> Range<u64> {
        let base = u64::from(self.epoch) << ID_EPOCH_SHIFT;
        base + 1..base + (1 << ID_EPOCH_SHIFT)
    }
}

/// The open store: one SQLite connection plus the exclusive lock. `Send`, not `Sync`: owned
/// by the control plane's store thread.
#[derive(Debug)]
pub struct Store {
    // Field order matters: the connection closes (checkpointing the WAL) before the lock
    // is released.
    conn: Connection,
    path: PathBuf,
    _lock: LockFile,
}

impl Store {
    /// Opens or creates the database at `path`.
    ///
    /// Creates the parent directory (mode 0700) and the file (mode 0600; SQLite gives its
    /// `-wal` and `-shm` files the same mode) if missing, takes the exclusive lock on
    /// `<path>.lock`, sets `journal_mode=WAL`, `synchronous=NORMAL` and `foreign_keys=ON`, and
    /// migrates the schema to [`schema::VERSION`].
    ///
    /// # Errors
    ///
    /// [`StoreError::InUse`] if another `Store` holds the database; [`StoreError::TooNew`] if
    /// a newer build wrote it; [`StoreError::NotADatabase`] / [`StoreError::ForeignDatabase`]
    /// if the file is not a homerelay store; I/O and SQLite failures otherwise.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let io_err = |what, path: &Path, source| StoreError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| io_err("cannot create directory", parent, e))?;
        }

        let lock = LockFile::acquire(path)?;

        // Create the file ourselves for its mode (SQLite would use 0644 less the umask).
        let created = !path.exists();
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err("cannot open database", path, e))?;

        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(path, flags).map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                what: "open",
                source,
            })?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            _lock: lock,
        };
        store.configure()?;
        store.migrate()?;
        if created {
            // The new file's directory entry (and the WAL's) must reach the disk for the
            // epoch's fsync to mean anything after a power loss.
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("cannot sync directory", parent, e))?;
        }
        Ok(store)
    }

    /// A second connection to this database for the device registry, used by another thread
    /// than the channels' (SQLite serialises the writers; WAL lets readers run beside them).
    /// It lives under this store's lock, so the store must outlive it in spirit: open it
    /// from the running daemon's store, never from a second process.
    pub fn devices(&self) -> Result<DeviceStore, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|source| {
            StoreError::Sqlite {
                path: self.path.clone(),
                what: "open the device registry's connection",
                source,
            }
        })?;
        DeviceStore::new(conn, self.path.clone())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the database (always [`schema::VERSION`] once open).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.user_version()
    }

    /// Starts a new instance: increments the epoch in a transaction committed with a full
    /// fsync, records the instance in `meta`, and returns it.
    ///
    /// # Errors
    ///
    /// [`StoreError::EpochExhausted`] after 2^23 − 1 starts; SQLite and random-source
    /// failures.
    pub fn start_instance(&mut self) -> Result<Instance, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let started_at = SystemTime::now();

        self.pragma("synchronous", "FULL")?;
        let result = self.bump_epoch(&id, started_at);
        // Back to NORMAL whatever happened; a failure here would leave FULL, which is safe.
        let restored = self.pragma("synchronous", "NORMAL");
        let epoch = result?;
        restored?;
        Ok(Instance {
            epoch,
            id,
            started_at,
        })
    }

    fn bump_epoch(&mut self, id: &str, started_at: SystemTime) -> Result<u32, StoreError> {
        let path = &self.path;
        let sql_err = |what| {
            move |source| StoreError::Sqlite {
                path: path.clone(),
                what,
                source,
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("begin epoch transaction"))?;
        let old: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .map_err(sql_err("read epoch"))?;
        let epoch = u32::try_from(old)
            .ok()
            .and_then(|e| e.checked_add(1))
            .ok_or_else(|| StoreError::Corrupt {
                path: path.clone(),
                detail: format!("epoch {old} out of range"),
            })?;
        if epoch > MAX_EPOCH {
            return Err(StoreError::EpochExhausted {
                path: path.clone(),
                epoch: epoch - 1,
            });
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES
                 ('epoch', ?1), ('instance_id', ?2), ('instance_started_at', ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            rusqlite::params![epoch, id, unix_ms(started_at)],
        )
        .map_err(sql_err("write epoch"))?;
        tx.commit().map_err(sql_err("commit epoch"))?;
        Ok(epoch)
    }

    /// Every persisted channel, ordered by (`addr_index`, `port`).
    pub fn channels(&self) -> Result<Vec<ChannelRow>, StoreError> {
        let sql_err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            what: "read channels",
            source,
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT addr_index, port, id, record FROM channels ORDER BY addr_index, port",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(sql_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (addr_index, port, id, record) = row.map_err(sql_err)?;
            let corrupt = || StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("channel row ({addr_index}, {port}, id {id}) out of range"),
            };
            out.push(ChannelRow {
                addr_index: u16::try_from(addr_index).map_err(|_| corrupt())?,
                port: u16::try_from(port).map_err(|_| corrupt())?,
                id: u64::try_from(id).map_err(|_| corrupt())?,
                record,
            });
        }
        Ok(out)
    }

    /// The highest channel id ever persisted (0 if none); deletes do not lower it.
    pub fn max_channel_id(&self) -> Result<u64, StoreError> {
        let value: i64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'max_channel_id'",
                [],
                |r| r.get(0),
            )
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: "read max_channel_id",
                source,
            })?;
        u64::try_from(value).map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("max_channel_id {value} negative"),
        })
    }

    /// Applies `ops` in order, in one transaction: all of them or (on error) none.
    ///
    /// # Errors
    ///
    /// [`StoreError::Batch`] naming the failing operation (e.g. a put whose id another row
    /// has), [`StoreError::IdOutOfRange`] for an id of 2^63 or more; the batch is rolled back.
    pub fn apply(&mut self, ops: &[ChannelOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let path = &self.path;
        let sql_err = |what| {
            move |source| StoreError::Sqlite {
                path: path.clone(),
                what,
                source,
            }
        };
        let batch_err = |index| {
            move |source| StoreError::Batch {
                path: path.clone(),
                index,
                source,
            }
        };
        let now = unix_ms(SystemTime::now());
        // Dropping the transaction on an early return rolls it back.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("begin batch"))?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO channels (addr_index, port, id, record, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (addr_index, port) DO UPDATE SET
                         id = excluded.id, record = excluded.record,
                         updated_at = excluded.updated_at",
                )
                .map_err(sql_err("prepare put"))?;
            let mut delete = tx
                .prepare_cached("DELETE FROM channels WHERE addr_index = ?1 AND port = ?2")
                .map_err(sql_err("prepare delete"))?;
            let mut max_id = 0i64;
            for (index, op) in ops.iter().enumerate() {
                match op {
                    ChannelOp::Put(row) => {
                        let id = i64::try_from(row.id).map_err(|_| StoreError::IdOutOfRange {
                            path: path.clone(),
                            id: row.id,
                        })?;
                        max_id = max_id.max(id);
                        put.execute(rusqlite::params![
                            row.addr_index,
                            row.port,
                            id,
                            row.record,
                            now
                        ])
                        .map_err(batch_err(index))?;
                    }
                    ChannelOp::Delete { addr_index, port } => {
                        delete
                            .execute(rusqlite::params![addr_index, port])
                            .map_err(batch_err(index))?;
                    }
                }
            }
            if max_id > 0 {
                tx.execute(
                    "UPDATE meta SET value = max(value, ?1) WHERE key = 'max_channel_id'",
                    [max_id],
                )
                .map_err(sql_err("update max_channel_id"))?;
            }
        }
        tx.commit().map_err(sql_err("commit batch"))
    }

    /// Connection settings, and the first read of the file: a non-SQLite file fails here.
    fn configure(&mut self) -> Result<(), StoreError> {
        let not_db = |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                StoreError::NotADatabase {
                    path: self.path.clone(),
                    source,
                }
            }
            _ => StoreError::Sqlite {
                path: self.path.clone(),
                what: "read database header",
                source,
            },
        };
        self.conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(not_db)?;
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: "set busy_timeout",
                source,
            })?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: "set journal_mode=WAL",
                source,
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("journal_mode is {mode}, WAL could not be enabled"),
            });
        }
        self.pragma("synchronous", "NORMAL")?;
        self.pragma("foreign_keys", "ON")?;
        Ok(())
    }

    /// Brings the schema to [`schema::VERSION`], refusing foreign and newer databases.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let version = self.user_version()?;
        let app_id: i32 = self
            .conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: "read application_id",
                source,
            })?;
        if version == 0 {
            // A new database is empty; one with tables but no version is someone else's.
            let table: Option<String> = self
                .conn
                .query_row("SELECT name FROM sqlite_schema LIMIT 1", [], |r| r.get(0))
                .optional()
                .map_err(|source| StoreError::Sqlite {
                    path: self.path.clone(),
                    what: "list tables",
                    source,
                })?;
            if let Some(table) = table {
                return Err(StoreError::ForeignDatabase {
                    path: self.path.clone(),
                    detail: format!("unversioned, contains {table:?}"),
                });
            }
        } else if app_id != schema::APPLICATION_ID {
            return Err(StoreError::ForeignDatabase {
                path: self.path.clone(),
                detail: format!("application_id {app_id:#x}, user_version {version}"),
            });
        }
        if version > schema::VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                supported: schema::VERSION,
            });
        }
        for step in schema::MIGRATIONS.iter().skip(version as usize) {
            let err = |source| StoreError::Migration {
                path: self.path.clone(),
                version: step.version,
                name: step.name,
                source,
            };
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(err)?;
            tx.execute_batch(step.sql).map_err(err)?;
            tx.pragma_update(None, "user_version", step.version)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(())
    }

    fn user_version(&self) -> Result<u32, StoreError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: "read user_version",
                source,
            })?;
        // user_version is a signed 32-bit header field; a negative one is "from the future".
        Ok(u32::try_from(v).unwrap_or(u32::MAX))
    }

    fn pragma(&self, name: &'static str, value: &'static str) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, name, value)
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                what: name,
                source,
            })
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// The store moves to the control plane's store thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Store>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma_int(store: &Store, name: &str) -> i64 {
        store
            .conn
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn connection_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("relay.db")).unwrap();
        let journal: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        assert_eq!(pragma_int(&store, "synchronous"), 1, "NORMAL");
        assert_eq!(pragma_int(&store, "foreign_keys"), 1);
        assert_eq!(pragma_int(&store, "application_id"), 0x4852_4C59);

        // The spelling start_instance uses does select FULL, and it is undone afterwards.
        store.pragma("synchronous", "FULL").unwrap();
        assert_eq!(pragma_int(&store, "synchronous"), 2, "FULL");
        store.pragma("synchronous", "NORMAL").unwrap();
        store.start_instance().unwrap();
        assert_eq!(
            pragma_int(&store, "synchronous"),
            1,
            "NORMAL after an instance start"
        );
    }

    #[test]
    fn epoch_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("relay.db")).unwrap();
        store
            .conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'epoch'",
                [MAX_EPOCH - 1],
            )
            .unwrap();
        let last = store.start_instance().unwrap();
        assert_eq!(last.epoch, MAX_EPOCH);
        assert!(last.channel_ids().end - 1 <= i64::MAX as u64);
        let err = store.start_instance().unwrap_err();
        assert!(matches!(err, StoreError::EpochExhausted { .. }), "{err:?}");
        assert_eq!(pragma_int(&store, "synchronous"), 1);
    }
}
