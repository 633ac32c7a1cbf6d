//! Round trips, batch atomicity, epochs, locking within one process, bad files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use relay_store::{ChannelOp, ChannelRow, Store, StoreError, schema};

fn row(addr_index: u16, port: u16, id: u64, record: &str) -> ChannelRow {
    ChannelRow {
        port,
        addr_index,
        id,
        record: record.to_owned(),
    }
}

#[test]
fn put_delete_reopen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/relay.db");
    {
        let mut store = Store::open(&path).unwrap();
        assert!(store.channels().unwrap().is_empty());
        assert_eq!(store.max_channel_id().unwrap(), 0);
        store
            .apply(&[
                ChannelOp::Put(row(0, 30274, 7, r#"{"call":"a"}"#)),
                ChannelOp::Put(row(1, 30274, 8, r#"{"call":"b"}"#)),
                ChannelOp::Put(row(0, 30276, 9, r#"{"call":"c"}"#)),
            ])
            .unwrap();
        store
            .apply(&[
                ChannelOp::Delete {
                    addr_index: 0,
                    port: 30276,
                },
                // Replace in place: same key, new id and record.
                ChannelOp::Put(row(1, 30274, 10, r#"{"call":"b2"}"#)),
                // Deleting a missing row is not an error.
                ChannelOp::Delete {
                    addr_index: 5,
                    port: 1,
                },
            ])
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.channels().unwrap(),
        vec![
            row(0, 30274, 7, r#"{"call":"a"}"#),
            row(1, 30274, 10, r#"{"call":"b2"}"#),
        ]
    );
    // The high-water mark is not lowered by deletes or replacements.
    assert_eq!(store.max_channel_id().unwrap(), 10);
    assert_eq!(store.schema_version().unwrap(), schema::VERSION);
}

#[test]
fn failing_batch_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let mut store = Store::open(&path).unwrap();
    store
        .apply(&[ChannelOp::Put(row(0, 100, 1, "{}"))])
        .unwrap();

    let err = store
        .apply(&[
            ChannelOp::Put(row(0, 102, 2, r#"{"n":2}"#)),
            ChannelOp::Delete {
                addr_index: 0,
                port: 100,
            },
            ChannelOp::Put(row(0, 104, 3, r#"{"n":3}"#)),
            // Duplicate id of the row put at index 0.
            ChannelOp::Put(row(0, 106, 2, r#"{"n":4}"#)),
        ])
        .unwrap_err();
    match &err {
        StoreError::Batch { index, .. } => assert_eq!(*index, 3),
        other => panic!("expected a batch error, got {other:?}"),
    }
    assert!(err.to_string().contains("relay.db"), "{err}");
    assert_eq!(store.channels().unwrap(), vec![row(0, 100, 1, "{}")]);
    assert_eq!(store.max_channel_id().unwrap(), 1);

    // An id that does not fit SQLite's INTEGER also rolls back what came before it.
    let err = store
        .apply(&[
            ChannelOp::Put(row(0, 102, 2, "{}")),
            ChannelOp::Put(row(0, 104, u64::MAX, "{}")),
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::IdOutOfRange { .. }), "{err:?}");
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.channels().unwrap(), vec![row(0, 100, 1, "{}")]);
}

#[test]
fn epoch_strictly_increases_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let mut last = 0;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut store = Store::open(&path).unwrap();
        for _ in 0..2 {
            let instance = store.start_instance().unwrap();
            assert!(instance.epoch > last, "{} after {last}", instance.epoch);
            last = instance.epoch;
            assert_eq!(instance.id.len(), 32);
            assert!(instance.id.bytes().all(|b| b.is_ascii_hexdigit()));
            let range = instance.channel_ids();
            assert_eq!(range.start, (u64::from(instance.epoch) << 40) + 1);
            assert_eq!(range.end, u64::from(instance.epoch + 1) << 40);
            ids.push(instance.id);
        }
    }
    assert_eq!(last, 6);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "instance ids repeat");
}

#[test]
fn second_open_in_process_is_refused_with_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = Store::open(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    match &err {
        StoreError::InUse { pid, lock, .. } => {
            assert_eq!(*pid, Some(std::process::id()));
            assert_eq!(lock, &dir.path().join("relay.db.lock"));
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("in use"), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("relay.db.lock"), "{msg}");
    drop(store);
    Store::open(&path).unwrap();
}

#[test]
fn creates_private_directory_and_files_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("a/b");
    let path = parent.join("relay.db");
    let store = Store::open(&path).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&parent), 0o700);
    assert_eq!(mode(&dir.path().join("a")), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("a/b/relay.db.lock")), 0o600);
    // The WAL exists while the store is open, with the database's mode.
    assert_eq!(mode(&parent.join("relay.db-wal")), 0o600);
    assert_eq!(mode(&parent.join("relay.db-shm")), 0o600);

    // Another connection (an operator's sqlite3 shell) sees WAL mode and can read.
    let peek = rusqlite::Connection::open(&path).unwrap();
    let journal: String = peek
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let version: u32 = peek
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::VERSION);
    drop(store);
}

#[test]
fn garbage_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    fs::write(
        &path,
        b"this is not a database, just some text\n".repeat(200),
    )
    .unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("relay.db"), "{msg}");
    assert!(msg.contains("not a SQLite database"), "{msg}");
    // The file is left as it was.
    assert!(
        fs::read(&path)
            .unwrap()
            .starts_with(b"this is not a database")
    );
}

#[test]
fn truncated_database_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    {
        let mut store = Store::open(&path).unwrap();
        let ops: Vec<_> = (0..500u16)
            .map(|i| ChannelOp::Put(row(0, i, u64::from(i) + 1, &"x".repeat(300))))
            .collect();
        store.apply(&ops).unwrap();
    }
    // Keep the header, damage the rest.
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "{}", bytes.len());
    for b in &mut bytes[4096..] {
        *b = 0xa5;
    }
    fs::write(&path, &bytes).unwrap();
    // Whether the damage shows at open or at the first read, it is an error.
    if let Ok(store) = Store::open(&path) {
        assert!(store.channels().is_err());
    }
}

#[test]
fn foreign_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
            .unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("other.db"), "{err}");

    let path = dir.path().join("versioned.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 1;")
            .unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err:?}");
}
