//! Cost of commits, for the figures in the crate docs. Prints durations, asserts only
//! correctness. Run with
//! `cargo test --release -p relay-store --test measure -- --ignored --nocapture`.

use std::time::Instant;

use relay_store::{ChannelOp, ChannelRow, Store};

fn put(i: u64) -> ChannelOp {
    ChannelOp::Put(ChannelRow {
        port: (i % 60_000) as u16,
        addr_index: (i / 60_000) as u16,
        id: i + 1,
        record: format!(
            r#"{{"call":"call-{i:08}","leg":"a","pad":"{}"}}"#,
            "x".repeat(160)
        ),
    })
}

#[test]
#[ignore = "measurement; run by hand with --release --nocapture"]
fn measure_single_and_batched_puts() {
    // On the target directory's file system, not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    let mut store = Store::open(&dir.path().join("single.db")).unwrap();
    let start = Instant::now();
    for i in 0..1000 {
        store.apply(&[put(i)]).unwrap();
    }
    let single = start.elapsed();
    assert_eq!(store.channels().unwrap().len(), 1000);

    let mut store = Store::open(&dir.path().join("batched.db")).unwrap();
    let start = Instant::now();
    for b in 0..10 {
        let ops: Vec<_> = (b * 100..(b + 1) * 100).map(put).collect();
        store.apply(&ops).unwrap();
    }
    let batched = start.elapsed();
    assert_eq!(store.channels().unwrap().len(), 1000);

    let start = Instant::now();
    for _ in 0..10 {
        store.start_instance().unwrap();
    }
    let epochs = start.elapsed();

    println!("1,000 puts, one transaction each: {single:?}");
    println!("1,000 puts in 10 batches of 100:  {batched:?}");
    println!("start_instance (fsync), mean of 10: {:?}", epochs / 10);
}
