//! The schema and its migrations.
//!
//! The schema version is SQLite's `PRAGMA user_version`: 0 for a new (empty) database, `n`
//! once migration `n` has been applied. [`MIGRATIONS`] is the ordered list of steps; step
//! `n` (1-based) takes the database from version `n - 1` to `n`. [`crate::Store::open`]
//! applies every missing step, each in its own `IMMEDIATE` transaction that also sets
//! `user_version`, so a crash mid-migration leaves the database at the previous version and
//! the step is simply applied again on the next open. A database whose version is above
//! [`VERSION`] was written by a newer build and is refused ([`crate::StoreError::TooNew`]).
//!
//! # Adding a migration
//!
//! Append a [`Migration`] to [`MIGRATIONS`] with the next version number, e.g.
//!
//! ```text
//! Migration {
//!     version: 3,
//!     name: "certificates",
//!     sql: "CREATE TABLE certificates (...) STRICT;",
//! },
//! ```
//!
//! Never edit or reorder a step that has shipped: databases in the field are already past it.
//! The SQL must not contain `BEGIN`/`COMMIT` (the step already runs in a transaction) nor set
//! `user_version` (the runner does). Foreign keys are enforced (`PRAGMA foreign_keys=ON` on
//! every connection). Extend the `migrations` test with a database at the previous version.

/// `PRAGMA application_id` of a homerelay store: "HRLY". Set by migration 1; a database at
/// version ≥ 1 with another id belongs to another application and is refused.
pub const APPLICATION_ID: i32 = 0x4852_4C59;

/// One schema step.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The `user_version` after this step (its 1-based position in [`MIGRATIONS`]).
    pub version: u32,
    /// A short name, shown in errors.
    pub name: &'static str,
    /// The SQL, run with `execute_batch` inside the step's transaction.
    pub sql: &'static str,
}

/// Every schema step, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "meta and channels",
        sql: "
        PRAGMA application_id = 0x48524C59;
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY NOT NULL,
            value ANY
        ) STRICT;
        INSERT INTO meta (key, value) VALUES
            ('epoch', 0),
            ('max_channel_id', 0),
            ('created_at', CAST(unixepoch('subsec') * 1000 AS INTEGER));
        CREATE TABLE channels (
            addr_index INTEGER NOT NULL CHECK (addr_index BETWEEN 0 AND 65535),
            port       INTEGER NOT NULL CHECK (port BETWEEN 0 AND 65535),
            id         INTEGER NOT NULL UNIQUE CHECK (id >= 0),
            record     TEXT    NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (addr_index, port)
        ) STRICT, WITHOUT ROWID;
    ",
    },
    Migration {
        version: 2,
        name: "devices",
        // The device registry: one row per device, keyed by its internal number; the record is
        // JSON owned by the control plane (like a channel's). Live registrations are not
        // stored: they belong to connections, which a restart ends anyway.
        sql: "
            CREATE TABLE devices (
                number     TEXT    PRIMARY KEY NOT NULL CHECK (length(number) BETWEEN 1 AND 32),
                record     TEXT    NOT NULL,
                updated_at INTEGER NOT NULL
            ) STRICT, WITHOUT ROWID;
        ",
    },
];

/// The newest schema version this build knows.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

const _: () = {
    // Step n must say version n: catches a mis-numbered append at compile time.
    let mut i = 0;
    while i < MIGRATIONS.len() {
        assert!(MIGRATIONS[i].version as usize == i + 1);
        i += 1;
    }
};
