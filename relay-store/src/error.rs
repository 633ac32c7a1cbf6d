//! [`StoreError`]: every failure names the file and what was being done.

use std::io;
use std::path::PathBuf;

/// A failure of the store. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system operation (directory, lock file, database file) failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot create directory".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Another process (or another `Store` in this process) holds the store.
    #[error(
        "store {path} is in use by another process ({holder}); lock file {lock}",
        holder = match pid { Some(pid) => format!("pid {pid}"), None => "pid unknown".to_owned() }
    )]
    InUse {
        path: PathBuf,
        lock: PathBuf,
        /// The pid recorded in the lock file by the holder, if it could be read.
        pid: Option<u32>,
    },

    /// The file is not a SQLite database, or its header is damaged.
    #[error("{path} is not a SQLite database or is corrupt: {source}")]
    NotADatabase {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The file is a SQLite database, but not one written by homerelay.
    #[error("{path} is a SQLite database of another application ({detail}); refusing to use it")]
    ForeignDatabase { path: PathBuf, detail: String },

    /// The database was written by a newer homerelay (schema version unknown to this build).
    #[error(
        "{path} has schema version {found}, newer than the newest this build knows ({supported}); \
         run a newer homerelay or restore a backup"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A schema migration failed; the database stays at `version - 1`.
    #[error("{path}: migration to schema version {version} ({name}) failed: {source}")]
    Migration {
        path: PathBuf,
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// Operation `index` of a batch failed (e.g. a duplicate channel id); nothing of the
    /// batch was written.
    #[error("{path}: batch rolled back, operation {index} failed: {source}")]
    Batch {
        path: PathBuf,
        index: usize,
        #[source]
        source: rusqlite::Error,
    },

    /// Any other SQLite failure.
    #[error("{path}: {what} failed: {source}")]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// A value read from the database is out of range or of the wrong type.
    #[error("{path}: corrupt data: {detail}")]
    Corrupt { path: PathBuf, detail: String },

    /// A channel id does not fit the id scheme (ids are below 2^63).
    #[error("{path}: channel id {id} is out of range (ids are below 2^63)")]
    IdOutOfRange { path: PathBuf, id: u64 },

    /// Every epoch has been used (more than 2^23 − 1 instance starts).
    #[error("{path}: instance epoch exhausted ({epoch} starts)")]
    EpochExhausted { path: PathBuf, epoch: u32 },

    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
}
