//! `homerelay run` under a service manager's notification protocol (`Type=notify`,
//! `WatchdogSec=`): the test plays systemd, binding the datagram socket named in `NOTIFY_SOCKET`
//! and asking for a watchdog (`WATCHDOG_USEC`). The daemon must say READY=1 first, then ping
//! WATCHDOG=1 repeatedly, and on SIGTERM say STOPPING=1 and exit cleanly, with no ping after
//! it. No root needed. Relay ports 42400–42419. Waits are bounded; nothing asserts on timing.
mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::WAIT;

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The next notification; panics with the daemon's log if none arrives within [`WAIT`].
fn next(socket: &UnixDatagram, log: &std::sync::Mutex<Vec<String>>) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no notification within {WAIT:?} ({e}); daemon log:\n{}",
            log.lock().expect("log lock").join("\n")
        ),
    }
}

fn has(message: &str, assignment: &str) -> bool {
    message.lines().any(|l| l == assignment)
}

#[test]
fn run_notifies_ready_pings_the_watchdog_and_notifies_stopping() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("homerelay-notify-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_homerelay"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--ports",
            "42400-42419",
            "--workers",
            "1",
            "--store",
            dir.0.join("homerelay.db").to_str().expect("utf-8 path"),
        ])
        .env_remove("HOMERELAY_CONFIG")
        .env_remove("WATCHDOG_PID")
        .env("HOMERELAY_LOG", "info")
        .env("NOTIFY_SOCKET", &path)
        // 200 ms: pings every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start homerelay run");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (stderr, log) = (daemon.stderr.take().expect("stderr"), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().expect("log lock").push(line);
            }
        })
    };

    let first = next(&socket, &log);
    assert!(
        has(&first, "READY=1"),
        "the first notification is READY=1: {first:?}"
    );
    // The data path started before READY=1 (its log line was written first; the reader thread
    // may still be catching up).
    let deadline = std::time::Instant::now() + WAIT;
    while !log
        .lock()
        .expect("log lock")
        .iter()
        .any(|l| l.contains("relaying on UDP 42400-42419"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "READY=1 without the data path's start in the log"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Two pings: the watchdog is periodic, not a one-off.
    for _ in 0..2 {
        let m = next(&socket, &log);
        assert!(
            has(&m, "WATCHDOG=1"),
            "a watchdog ping after READY=1: {m:?}"
        );
    }

    // SAFETY: signals the child this test started, by its pid.
    let rc = unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let stopping = loop {
        let m = next(&socket, &log);
        if !has(&m, "WATCHDOG=1") {
            break m;
        }
    };
    assert!(
        has(&stopping, "STOPPING=1"),
        "STOPPING=1 on SIGTERM: {stopping:?}"
    );
    let status = daemon.wait().expect("wait");
    reader.join().expect("log reader");
    let log = log.lock().expect("log lock").join("\n");
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    // Everything the daemon sent is queued by now: nothing after STOPPING=1.
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !has(&m, "WATCHDOG=1"),
            "a watchdog ping after STOPPING=1: {m:?}"
        );
    }
}
