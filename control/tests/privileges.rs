//! `homerelay run` with exactly the privileges of the shipped unit
//! (`deploy/systemd/homerelay.service`): an unprivileged uid, the unit's capability set as
//! ambient, inheritable and bounding set (read from the unit file, so the two cannot drift), no
//! new privileges — what systemd would give it. Inside the namespace testbed the daemon must
//! load and attach XDP (generic mode), pin its maps on a bpffs it owns, report READY=1 over
//! `NOTIFY_SOCKET`, allocate a channel over gRPC, and relay a call whose packets the XDP program
//! forwards (its pinned per-channel stats say so). Needs root (to build namespaces, mount a
//! bpffs and drop to the uid) and fails loudly without it; leaves nothing behind.
mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{WAIT, unit};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use relay_user::netns::{self, Host, Testbed, TestbedOptions};
use relay_user::xdp::PinnedStats;

/// The daemon's uid and gid: no account, no groups, nothing on this host belongs to it.
const UID: u32 = 64_991;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (namespaces, bpffs, dropping to a uid); run the README's test \
         command as root"
    );
}

/// The test's files: a directory with a private bpffs mounted in it; unmounted and removed on
/// drop.
struct Scratch {
    dir: PathBuf,
    bpffs: PathBuf,
    mounted: bool,
}

impl Scratch {
    fn create() -> Scratch {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("homerelay-privileges-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bpffs = dir.join("bpf");
        std::fs::create_dir(&bpffs).expect("bpffs mount point");
        let mut s = Scratch {
            dir,
            bpffs,
            mounted: false,
        };
        let (src, target, opts) = (
            CString::new("bpf").expect("no NUL"),
            CString::new(s.bpffs.as_os_str().as_encoded_bytes()).expect("no NUL"),
            // Like systemd's /sys/fs/bpf: root only, until handed to the service user.
            CString::new("mode=0700").expect("no NUL"),
        );
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        s.mounted = true;
        s
    }

    /// A directory in the scratch dir owned by the daemon's uid (mode 0700).
    fn owned_dir(&self, parent: &Path, name: &str) -> PathBuf {
        let d = parent.join(name);
        std::fs::create_dir_all(&d).expect("create dir");
        std::os::unix::fs::chown(&d, Some(UID), Some(UID)).expect("chown");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let target = CString::new(self.bpffs.as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: a valid NUL-terminated path; MNT_DETACH never blocks.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The daemon process; SIGKILLed on drop if still running.
struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits (up to `WAIT`) until the log, read by another thread, holds `needle`.
    fn log_contains(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + WAIT;
        while !self.log().contains(needle) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `homerelay run …` through `setpriv`, with the unit's capabilities, in the network namespace
/// at `netns_path` (and the host's mount namespace, where the test's bpffs is).
/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `mount_setattr(AT_FDCWD, path, AT_RECURSIVE, attr)`; async-signal-safe.
fn mount_setattr_recursive(path: &CString, attr: &MountAttr) -> libc::c_long {
    // SAFETY: `path` is NUL-terminated, `attr` a valid struct of the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            std::ptr::from_ref(attr),
            std::mem::size_of::<MountAttr>(),
        )
    }
}

/// Starts the daemon (through `setpriv`, which drops to the unit's user and capabilities) in
/// the network namespace at `netns_path`, and in a mount namespace of its own that emulates the
/// unit's file-system sandbox: everything read-only — `ProtectSystem=strict`, and with it
/// `/proc/sys` and `/sys` as `ProtectKernelTunables=` makes them — except `writable` (the test's
/// scratch directory with its bpffs, standing in for `StateDirectory=` and
/// `ReadWritePaths=/sys/fs/bpf`). The pins stay visible to the test: same bpffs instance.
fn spawn_daemon(
    caps: &[String],
    netns_path: &Path,
    writable: &Path,
    notify: &Path,
    args: &[String],
) -> Daemon {
    let caps_list = |sign: &str| {
        let mut v = vec!["-all".to_owned()];
        v.extend(caps.iter().map(|c| format!("{sign}{c}")));
        v.join(",")
    };
    let ns = File::open(netns_path).expect("open the relay namespace");
    let ns_fd = ns.as_raw_fd();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={}", caps_list("+")))
        .arg(format!("--ambient-caps={}", caps_list("+")))
        .arg(format!("--bounding-set={}", caps_list("+")))
        .arg("--no-new-privs")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(args)
        .env("NOTIFY_SOCKET", notify)
        .env("HOMERELAY_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOMERELAY_") && key != "HOMERELAY_LOG" {
            cmd.env_remove(key);
        }
    }
    let root = CString::new("/").expect("no NUL");
    let rw = CString::new(writable.as_os_str().as_encoded_bytes()).expect("no NUL");
    let read_only = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let read_write = MountAttr {
        attr_set: 0,
        attr_clr: MOUNT_ATTR_RDONLY,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: between fork and exec only async-signal-safe system calls (setns, unshare, mount,
    // mount_setattr, prctl) on data prepared before the fork; `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            let ok = libc::setns(ns_fd, libc::CLONE_NEWNET) == 0
                && libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) == 0
                // Its own mount first, so that it can be made writable again below.
                && libc::mount(
                    rw.as_ptr(),
                    rw.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == 0
                && mount_setattr_recursive(&root, &read_only) == 0
                && mount_setattr_recursive(&rw, &read_write) == 0
                && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0;
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start setpriv (util-linux)");
    drop(ns);
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    Daemon { child, log }
}

/// The next notification containing `assignment` (e.g. READY=1); panics with the daemon's log
/// if the daemon exits or nothing comes within the wait.
fn wait_for(socket: &UnixDatagram, assignment: &str, daemon: &mut Daemon) {
    let deadline = std::time::Instant::now() + WAIT;
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == assignment)
            {
                return;
            }
        }
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            // Let the reader thread drain stderr.
            std::thread::sleep(std::time::Duration::from_millis(100));
            panic!(
                "the daemon exited ({status}) before {assignment}:\n{}",
                daemon.log()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {assignment} within {WAIT:?}:\n{}",
            daemon.log()
        );
    }
}

/// The capability mask of `CapEff:` in /proc/PID/status.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex mask")
}

fn cap_bit(name: &str) -> u64 {
    let n = match name {
        "net_admin" => 12,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        "net_bind_service" => 10,
        "net_raw" => 13,
        other => panic!("capability {other} unknown to this test: add its number"),
    };
    1 << n
}

/// Sends `n` datagrams from `from` to `to` and receives each at `at`, from `expect_from`.
fn relay_through(
    from: &UdpSocket,
    to: SocketAddr,
    at: &UdpSocket,
    expect_from: SocketAddr,
    n: u32,
) {
    at.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut buf = [0u8; 256];
    for i in 0..n {
        // RTP (a source latches only with RTP or RTCP) numbered `i`.
        let packet = common::rtp(i as u8, 16 + (i as usize % 64));
        from.send_to(&packet, to).expect("send");
        let (len, src) = at.recv_from(&mut buf).expect("relayed within the timeout");
        assert_eq!((&buf[..len], src), (&packet[..], expect_from));
    }
}

/// Runs `f` with a client of the daemon's API, from inside the relay namespace (the API listens
/// on that namespace's loopback, 127.0.0.1:4080).
fn with_api<R: Send + 'static, F>(tb: &Testbed, f: impl FnOnce(Api) -> F + Send + 'static) -> R
where
    F: std::future::Future<Output = R>,
{
    tb.run_in(Host::Relay, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let api = common::within(ChannelServiceClient::connect(
                    "http://127.0.0.1:4080".to_owned(),
                ))
                .await
                .expect("connect to the daemon's API");
                f(api).await
            })
    })
}

type Api = ChannelServiceClient<tonic::transport::Channel>;

/// Waits until the API reports the channel on `port` in state FAST_PATH.
fn wait_fast_path(tb: &Testbed, port: u16, daemon: &Daemon) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let state = with_api(tb, move |mut api| async move {
            common::within(api.get(pb::GetRequest {
                channel: common::by_port(u32::from(port)),
            }))
            .await
            .expect("Get")
            .into_inner()
            .channel
            .expect("channel")
            .state
        });
        if state == pb::ChannelState::FastPath as i32 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "channel {port} did not reach FAST_PATH (state {state}):\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The daemon started as the unit would start it, with capabilities `caps`, and everything it
/// needs; dropped in field order (the daemon first).
struct Started {
    daemon: Daemon,
    notify: UnixDatagram,
    tb: Testbed,
    pin_dir: PathBuf,
    scratch: Scratch,
}

/// Prepares what the unit's directives and `ExecStartPre=` provide (a pin directory on bpffs
/// and a state directory owned by the service user, the notify socket), builds the testbed and
/// starts `homerelay run` with XDP required in its relay namespace.
fn start(caps: &[String]) -> Started {
    let scratch = Scratch::create();
    // The unit's ExecStartPre: the pin directory belongs to the service user.
    let pin_dir = scratch.owned_dir(&scratch.bpffs, "homerelay");
    std::fs::set_permissions(&scratch.bpffs, std::fs::Permissions::from_mode(0o711))
        .expect("chmod bpffs root 0711, like the unit's ExecStartPre");
    let state_dir = scratch.owned_dir(&scratch.dir, "state");
    let config = scratch.dir.join("homerelay.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\ninternet_address = \"{}\"\nlan_address = \"{}\"\n",
            netns::RELAY_HOME_ADDR,
            netns::RELAY_OFFICE_ADDR
        ),
    )
    .expect("write config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let notify_path = scratch.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    std::os::unix::fs::chown(&notify_path, Some(UID), Some(UID)).expect("chown notify socket");

    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let relay_ns = PathBuf::from("/var/run/netns").join(tb.ns(Host::Relay));
    let args: Vec<String> = [
        "run",
        "--config",
        config.to_str().expect("UTF-8 path"),
        "--xdp-iface",
        &format!("{},{}", netns::RELAY_IF_HOME, netns::RELAY_IF_OFFICE),
        "--xdp-mode",
        "generic",
        "--require-xdp",
        "--pin-dir",
        pin_dir.to_str().expect("UTF-8 path"),
        "--store",
        state_dir.join("homerelay.db").to_str().expect("UTF-8 path"),
        "--ports",
        "30528-30547",
        "--workers",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = spawn_daemon(caps, &relay_ns, &scratch.dir, &notify_path, &args);
    Started {
        daemon,
        notify,
        tb,
        pin_dir,
        scratch,
    }
}

#[test]
fn the_daemon_relays_through_xdp_with_only_the_units_privileges() {
    require_root();
    let caps = unit::capabilities();
    assert!(
        !caps.iter().any(|c| c == "sys_admin"),
        "the unit grants CAP_SYS_ADMIN"
    );

    let Started {
        mut daemon,
        notify,
        tb,
        pin_dir,
        scratch,
    } = start(&caps);
    wait_for(&notify, "READY=1", &mut daemon);

    // It runs as the uid with exactly the unit's capabilities, and with XDP (--require-xdp).
    let pid = daemon.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == UID.to_string()),
        "{uid_line}"
    );
    // … in the emulated file-system sandbox: /, /sys and /proc/sys read-only.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    for point in ["/", "/sys", "/proc", "/tmp"] {
        let Some(line) = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(point))
        else {
            continue;
        };
        let opts = line.split_whitespace().nth(5).unwrap_or_default();
        assert!(opts.starts_with("ro"), "{point} is writable: {line}");
    }
    let want = caps.iter().map(|c| cap_bit(c)).fold(0, |a, b| a | b);
    assert_eq!(
        effective_caps(pid),
        want,
        "effective capabilities are the unit's"
    );
    assert!(
        daemon.log_contains("XDP fast path + user space"),
        "{}",
        daemon.log()
    );

    // Allocate over gRPC, from inside the relay namespace (the API listens on its loopback).
    let home_addr: SocketAddr = (netns::HOME_ADDR, 5004).into();
    let office_addr: SocketAddr = (netns::OFFICE_ADDR, 6000).into();
    let port = with_api(&tb, move |mut api| async move {
        let leg = |rtp: SocketAddr, strict: bool| pb::LegSpec {
            rtp_address: rtp.to_string(),
            strict,
            ..Default::default()
        };
        let r = common::within(api.allocate(pb::AllocateRequest {
            call_leg: Some(pb::CallLeg {
                call_id: "privileges".into(),
                leg_tag: "t".into(),
            }),
            kind: pb::ChannelKind::SipDevice as i32,
            internet: Some(true),
            leg_a: Some(leg(home_addr, false)),
            leg_b: Some(leg(office_addr, true)),
            ..Default::default()
        }))
        .await
        .expect("Allocate");
        u16::try_from(r.into_inner().channel.expect("channel").port).expect("port")
    });

    let home = tb.run_in(Host::Home, move || {
        UdpSocket::bind(home_addr).expect("bind")
    });
    let office = tb.run_in(Host::Office, move || {
        UdpSocket::bind(office_addr).expect("bind")
    });
    let relay_home: SocketAddr = (netns::RELAY_HOME_ADDR, port).into();
    let relay_office: SocketAddr = (netns::RELAY_OFFICE_ADDR, port).into();
    // The first packets latch the home leg in user space; then the channel is in the XDP map.
    relay_through(&home, relay_home, &office, relay_office, 5);
    wait_fast_path(&tb, port, &daemon);
    relay_through(&office, relay_office, &home, relay_home, 50);
    relay_through(&home, relay_home, &office, relay_office, 50);

    // What the XDP program alone forwarded, from the maps the daemon pinned as its uid.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(pin_dir.join("HR_CHAN_STATE")).expect("pinned state map"),
    );
    assert_eq!(owner, UID, "the pins belong to the service user");
    let stats = PinnedStats::open(&pin_dir)
        .expect("open the pinned stats")
        .get(port)
        .expect("channel stats");
    assert!(
        stats.from_leg[0].packets >= 50 && stats.from_leg[1].packets >= 50,
        "XDP forwarded {:?} packets (from legs A, B); 50 each way were sent on the fast path:\n{}",
        stats.from_leg.map(|d| d.packets),
        daemon.log()
    );

    // SIGTERM, as systemd stops it: STOPPING=1, a clean exit, XDP detached.
    // SAFETY: kill has no memory preconditions; `pid` is our child, not reaped yet.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    wait_for(&notify, "STOPPING=1", &mut daemon);
    let exit = daemon.child.wait().expect("wait");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(exit.success(), "exit {exit}:\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("XDP may stay attached"), "{log}");
    drop(daemon);
    drop(tb);
    drop(scratch);
}

/// Each capability of the unit is needed: without any one of them the daemon cannot start its
/// fast path, and with `--require-xdp` it refuses to start (no READY=1) and says why.
#[test]
fn without_any_one_of_the_units_capabilities_the_fast_path_does_not_start() {
    require_root();
    let caps = unit::capabilities();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let Started {
            mut daemon,
            notify,
            tb: _tb,
            pin_dir: _,
            scratch: _scratch,
        } = start(&fewer);
        notify
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            let mut buf = [0u8; 4096];
            if let Ok(n) = notify.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(
                    !m.lines().any(|l| l == "READY=1"),
                    "ready without CAP_{}:\n{}",
                    missing.to_uppercase(),
                    daemon.log()
                );
            }
            if let Some(status) = daemon.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running without CAP_{}:\n{}",
                missing.to_uppercase(),
                daemon.log()
            );
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let log = daemon.log();
        assert!(!status.success(), "without CAP_{missing}:\n{log}");
        assert!(
            log.contains("starting the XDP fast path"),
            "without CAP_{missing} the fast path fails:\n{log}"
        );
        eprintln!(
            "without CAP_{}: {}",
            missing.to_uppercase(),
            log.lines()
                .skip_while(|l| !l.starts_with("Error"))
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(400)
                .collect::<String>()
        );
    }
}
