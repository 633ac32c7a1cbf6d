//! Schema migrations: from every known version to the newest, and refusal of newer ones.

use std::fs;

use relay_store::{ChannelOp, ChannelRow, Store, StoreError, schema};

fn user_version(path: &std::path::Path) -> u32 {
    let conn = rusqlite::Connection::open(path).expect("open with rusqlite");
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("read user_version")
}

#[test]
fn v0_databases_migrate_to_newest() {
    let dir = tempfile::tempdir().unwrap();

    // No file at all.
    let missing = dir.path().join("missing.db");
    drop(Store::open(&missing).unwrap());
    assert_eq!(user_version(&missing), schema::VERSION);

    // An empty file (what `touch` leaves).
    let empty = dir.path().join("empty.db");
    fs::write(&empty, b"").unwrap();
    drop(Store::open(&empty).unwrap());
    assert_eq!(user_version(&empty), schema::VERSION);

    // A SQLite database at user_version 0 with no tables.
    let fresh = dir.path().join("fresh.db");
    {
        let conn = rusqlite::Connection::open(&fresh).unwrap();
        conn.execute_batch("VACUUM").unwrap();
    }
    assert_eq!(user_version(&fresh), 0);
    let mut store = Store::open(&fresh).unwrap();
    assert_eq!(store.schema_version().unwrap(), schema::VERSION);
    assert_eq!(store.start_instance().unwrap().epoch, 1);
}

#[test]
fn v1_database_migrates_to_newest_keeping_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        // Built by hand with step 1 only, as a build that knew only v1 would have.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL").unwrap();
        conn.execute_batch(schema::MIGRATIONS[0].sql).unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 1;
             UPDATE meta SET value = 4 WHERE key = 'epoch';
             INSERT INTO channels VALUES (2, 30300, 77, '{\"v\":1}', 0);",
        )
        .unwrap();
    }
    assert_eq!(user_version(&path), 1);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), schema::VERSION);
    assert_eq!(
        store.channels().unwrap(),
        vec![ChannelRow {
            port: 30300,
            addr_index: 2,
            id: 77,
            record: r#"{"v":1}"#.to_owned(),
        }]
    );
    assert_eq!(store.start_instance().unwrap().epoch, 5);
    store
        .apply(&[ChannelOp::Delete {
            addr_index: 2,
            port: 30300,
        }])
        .unwrap();
    // Step 2 added the (empty) device registry.
    let mut devices = store.devices().unwrap();
    assert!(devices.list().unwrap().is_empty());
    let row = relay_store::DeviceRow {
        number: "4711".into(),
        record: "{}".into(),
    };
    assert!(devices.insert(&row).unwrap());
}

#[test]
fn database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    drop(Store::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", schema::VERSION + 1)
            .unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    match &err {
        StoreError::TooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, schema::VERSION + 1);
            assert_eq!(*supported, schema::VERSION);
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("relay.db"), "{msg}");
    assert!(msg.contains("newer"), "{msg}");
    // Refused without touching it.
    assert_eq!(user_version(&path), schema::VERSION + 1);
}

#[test]
fn migration_list_is_numbered_in_order() {
    for (i, step) in schema::MIGRATIONS.iter().enumerate() {
        assert_eq!(step.version as usize, i + 1, "{}", step.name);
    }
    assert_eq!(schema::VERSION as usize, schema::MIGRATIONS.len());
}
