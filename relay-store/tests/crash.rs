//! Crash safety and cross-process locking. The parent test re-executes this test binary as
//! a child in a mode selected by `HR_STORE_CHILD` (the child `#[test]`s return at once
//! without it), then `kill -9`s it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use relay_store::{ChannelOp, ChannelRow, Store, StoreError};

const MODE: &str = "HR_STORE_CHILD";
const PATH: &str = "HR_STORE_PATH";
/// Rows put by each batch; row 0 of a batch is deleted by the next batch.
const ROWS: u64 = 4;

fn spawn_child(test: &str, mode: &str, path: &Path) -> (Child, BufReader<ChildStdout>) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1", "-q"])
        .env(MODE, mode)
        .env(PATH, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test binary");
    let stdout = child.stdout.take().expect("child stdout");
    (child, BufReader::new(stdout))
}

/// The next line starting with `prefix`, without it (libtest prints its own lines too).
fn next_tagged(out: &mut BufReader<ChildStdout>, prefix: &str) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("read child stdout") == 0 {
            return None;
        }
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return Some(rest.to_owned());
        }
    }
}

fn key(batch: u64, k: u64) -> (u16, u16) {
    let slot = batch * ROWS + k;
    ((slot >> 16) as u16, (slot & 0xffff) as u16)
}

fn expected_row(batch: u64, k: u64) -> ChannelRow {
    let (addr_index, port) = key(batch, k);
    let pad = char::from(b'a' + (batch % 26) as u8)
        .to_string()
        .repeat(200 + (batch % 50) as usize);
    ChannelRow {
        port,
        addr_index,
        id: batch * ROWS + k + 1,
        record: format!(r#"{{"batch":{batch},"k":{k},"pad":"{pad}"}}"#),
    }
}

/// Child mode "writer": commits batch after batch and reports each one once committed.
#[test]
fn child_writer() {
    if std::env::var(MODE).as_deref() != Ok("writer") {
        return;
    }
    let path = std::env::var_os(PATH).expect("HR_STORE_PATH");
    let mut store = Store::open(Path::new(&path)).expect("child open");
    // Bounded so an orphaned child ends; the parent kills it long before.
    for batch in 0..1_000_000u64 {
        let mut ops: Vec<_> = (0..ROWS)
            .map(|k| ChannelOp::Put(expected_row(batch, k)))
            .collect();
        if batch > 0 {
            let (addr_index, port) = key(batch - 1, 0);
            ops.push(ChannelOp::Delete { addr_index, port });
        }
        store.apply(&ops).expect("child apply");
        // Reported only once `apply` has returned, i.e. once the batch is committed.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "COMMITTED {batch}").expect("report");
        out.flush().expect("flush report");
    }
}

#[test]
fn committed_batches_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    // Start from a store with an instance, as the daemon would.
    let epoch = Store::open(&path).unwrap().start_instance().unwrap().epoch;

    let (mut child, mut out) = spawn_child("child_writer", "writer", &path);
    let mut reported = None;
    // Several WAL frames per batch: 500 batches take the WAL past its auto-checkpoint
    // (1000 pages), so the kill may also land after or during a checkpoint.
    for _ in 0..500 {
        let n: u64 = next_tagged(&mut out, "COMMITTED ")
            .expect("child ended early")
            .parse()
            .unwrap();
        assert_eq!(Some(n), reported.map_or(Some(0), |r: u64| Some(r + 1)));
        reported = Some(n);
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was not killed: {status}");
    // Lines already in the pipe are batches reported committed too.
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    for line in rest.lines() {
        if let Some(n) = line.strip_prefix("COMMITTED ") {
            reported = Some(n.parse().unwrap());
        }
    }
    let reported = reported.unwrap();

    // The kernel released the lock; the store opens and recovers the WAL.
    let mut store = Store::open(&path).unwrap();
    let rows = store.channels().unwrap();
    let by_id: BTreeMap<u64, &ChannelRow> = rows.iter().map(|r| (r.id, r)).collect();
    assert_eq!(by_id.len(), rows.len());

    // The batches present are a prefix 0..=last with last ≥ every reported batch, and each
    // is whole: rows 1.. present and intact, row 0 deleted by the next batch iff there is one.
    let last = (rows.len() as u64 - 1) / (ROWS - 1) - 1;
    assert!(
        last >= reported,
        "batch {reported} reported, only {last} present"
    );
    for batch in 0..=last {
        for k in 0..ROWS {
            let want = expected_row(batch, k);
            let got = by_id.get(&want.id);
            if k == 0 && batch < last {
                assert!(
                    got.is_none(),
                    "batch {batch}: row 0 not deleted by next batch"
                );
            } else {
                assert_eq!(got, Some(&&want), "batch {batch} row {k}");
            }
        }
    }
    assert_eq!(rows.len() as u64, (last + 1) * (ROWS - 1) + 1);
    assert_eq!(
        store.max_channel_id().unwrap(),
        expected_row(last, ROWS - 1).id
    );

    // SQLite agrees that the file is sound, and the epoch went on.
    let peek = rusqlite::Connection::open(&path).unwrap();
    let check: String = peek
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(peek);
    assert_eq!(store.start_instance().unwrap().epoch, epoch + 1);
}

/// Child mode "holder": holds the store open until its stdin closes.
#[test]
fn child_holder() {
    if std::env::var(MODE).as_deref() != Ok("holder") {
        return;
    }
    let path = std::env::var_os(PATH).expect("HR_STORE_PATH");
    let store = Store::open(Path::new(&path)).expect("child open");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "LOCKED {}", std::process::id()).expect("report");
        out.flush().expect("flush report");
    }
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).expect("read stdin");
    drop(store);
}

#[test]
fn open_held_by_another_process_fails_naming_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");

    for kill in [true, false] {
        let (mut child, mut out) = spawn_child("child_holder", "holder", &path);
        let pid: u32 = next_tagged(&mut out, "LOCKED ")
            .expect("child ended early")
            .parse()
            .unwrap();
        assert_eq!(pid, child.id());

        let err = Store::open(&path).unwrap_err();
        match &err {
            StoreError::InUse { pid: holder, .. } => assert_eq!(*holder, Some(pid)),
            other => panic!("expected InUse, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("pid {pid}")), "{msg}");
        assert!(msg.contains("relay.db.lock"), "{msg}");

        if kill {
            child.kill().unwrap();
        } else {
            drop(child.stdin.take()); // the child closes the store and exits
        }
        child.wait().unwrap();
        // Released by the kernel (kill -9) or by the holder (clean exit).
        drop(Store::open(&path).unwrap());
    }
}
