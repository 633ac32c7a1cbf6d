//! `homerelay demo`: the product working end to end on one machine, in a few seconds.
//!
//! It builds the namespace testbed ([`relay_user::netns`]: a phone behind a NAT router, the
//! relay host, an office phone; TEST-NET addresses), starts the real daemon (`homerelay run`,
//! this very executable) inside the relay namespace with the XDP fast path on the relay's three
//! interfaces and phone registration on TCP 4062, makes each phone behind the NAT a remote
//! device of the relay and registers it through the NAT ([`remote`]), allocates one channel per
//! call for the registered device over the gRPC API (an internet call, because the phone
//! registered from outside), lets both phones talk 20 ms G.711 RTP through the relay, prints a
//! line per channel every second (state, the address the relay latched for the phone behind the
//! NAT, packets and bytes each way, and how many of them the XDP program forwarded), releases
//! the channels over gRPC, unregisters the phones, prints a summary, stops the daemon with
//! SIGTERM and deletes everything it created.
//!
//! The invariant a reader must know: **whatever happens — an error, Ctrl-C, SIGTERM — the demo
//! leaves nothing behind.** Everything it creates is owned by [`Resources`], torn down in
//! dependency order (daemon, XDP programs, pin directory, namespaces) on every path. SIGINT and
//! SIGTERM only set a flag that every loop checks. The daemon runs in its own process group, so
//! a Ctrl-C in the terminal reaches the demo alone, which then shuts the daemon down in order;
//! should the demo die without unwinding (`panic = "abort"`, SIGKILL), the daemon gets SIGTERM
//! from the kernel (`PR_SET_PDEATHSIG`), and the next demo or testbed removes namespaces and
//! pin directories whose process is gone.
//!
//! Why the daemon is started with `setns(2)` before `exec` rather than `ip netns exec`: the
//! latter also unshares the mount namespace and mounts a fresh sysfs over `/sys`, which hides
//! `/sys/fs/bpf`; the daemon would pin its maps in a private bpffs that the demo can neither
//! read (per-path counters) nor remove. With only the network namespace switched, the daemon
//! shares the host's bpffs like in production. The gRPC API stays on 127.0.0.1 *inside* the
//! relay namespace (the default listen address, no authentication needed); the demo reaches it
//! from a thread that entered that namespace.
mod media;
mod remote;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use proto::v1::device_service_client::DeviceServiceClient;
use relay_common::{ChannelStats, LEG_A, LEG_B};
use relay_user::netns::{self, Host, Testbed, TestbedOptions};
use relay_user::xdp::{PassGuard, XdpMode, attach_pass_program};
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::{self, Client, Connection};
use crate::config::DEFAULT_LISTEN;
use media::{Direction, Media, PACKET_LEN};
use relay_user::xdp::PinnedStats as FastPathStats;

/// `homerelay demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the phones talk, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// XDP mode of the relay: native (in the veth driver) or generic (skb).
    #[arg(long, value_enum, default_value_t = DemoXdpMode::Native)]
    pub xdp_mode: DemoXdpMode,
    /// Simultaneous calls, one relay channel each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub calls: u16,
}

/// The XDP modes the demo can show (`auto` would hide which one ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoXdpMode {
    Native,
    Generic,
}

impl DemoXdpMode {
    fn mode(self) -> XdpMode {
        match self {
            DemoXdpMode::Native => XdpMode::Native,
            DemoXdpMode::Generic => XdpMode::Generic,
        }
    }
}

/// The relay's interfaces the fast path runs on.
const RELAY_IFACES: [&str; 3] = [
    netns::RELAY_IF_HOME,
    netns::RELAY_IF_OFFICE,
    netns::RELAY_IF_NAT,
];
/// The home phone's RTP port (call `i` uses this + 2i), behind the NAT.
const HOME_PHONE_PORT: u16 = 5004;
/// The office phone's RTP port (call `i` uses this + 2i).
const OFFICE_PHONE_PORT: u16 = 6000;
/// SSRCs of the two phones' streams (call `i` adds `i`): "HO" and "OF".
const HOME_SSRC: u32 = 0x484f_0000;
const OFFICE_SSRC: u32 = 0x4f46_0000;
/// Where the daemon pins its maps: this prefix and the demo's pid.
const PIN_DIR_PREFIX: &str = "/sys/fs/bpf/homerelay-demo-";
/// Name of the daemon's configuration file in the temporary directory: this, the demo's pid,
/// `.toml`.
const CONFIG_FILE_PREFIX: &str = "homerelay-demo-";
/// Longest wait for the daemon's API to report SERVING.
const HEALTH_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for one API call.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Time given to packets in flight after the phones stop sending.
const DRAIN: Duration = Duration::from_millis(300);
/// Longest wait for the daemon to exit after SIGTERM before it is killed.
const DAEMON_STOP: Duration = Duration::from_secs(10);
/// The phones' registration port (plain TCP) on the relay's address towards the NAT, as
/// [`DAEMON_CONFIG`] sets it.
const REGISTRATION_PORT: u16 = 4062;

/// Set by SIGINT and SIGTERM; every loop of the demo checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The signal that set [`INTERRUPTED`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Async-signal-safe: atomic stores only.
    SIGNAL.store(signal, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sigaction` is plain data; all-zero is a valid (empty) value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is a valid sigaction; the handler only stores to an atomic.
        let rc = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs the demo (see the module documentation). Needs root.
///
/// Interrupted by SIGINT or SIGTERM, it cleans up and then exits the process with status
/// 128 + the signal number, as a shell reports a process the signal ended.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "homerelay demo needs root: it creates network namespaces, loads XDP programs and \
             pins BPF maps (try `sudo homerelay demo`)"
        );
    }
    install_signal_handlers()?;
    remove_stale_files();
    let mut resources = Resources::default();
    let result = demo(&args, &mut resources);
    if let Err(e) = &result {
        println!();
        println!("The demo stopped: {e:#}");
    }
    let problems = resources.teardown();
    if INTERRUPTED.load(Ordering::SeqCst) {
        for p in &problems {
            eprintln!("cleanup: {p}");
        }
        std::process::exit(128 + SIGNAL.load(Ordering::SeqCst));
    }
    result?;
    if !problems.is_empty() {
        bail!("cleaning up: {}", problems.join("; "));
    }
    Ok(())
}

fn demo(args: &DemoArgs, res: &mut Resources) -> anyhow::Result<()> {
    let calls = usize::from(args.calls);
    let mode = args.xdp_mode.mode();
    print_header(args);

    let tb = res
        .testbed
        .insert(Testbed::create(TestbedOptions { nat: true })?);
    println!(
        "Created network namespaces {}{{home,relay,office,nat,hbn}}.",
        tb.prefix()
    );
    check_interrupted()?;
    if mode == XdpMode::Native {
        // Native XDP on veth drops frames redirected to a peer that runs no XDP program.
        for iface in RELAY_IFACES {
            let peer = netns::relay_peer(iface)
                .ok_or_else(|| anyhow!("{iface} is not one of the relay's interfaces"))?;
            let guard = tb.run_in(peer.host, move || {
                attach_pass_program(peer.iface, XdpMode::Native)
            })?;
            res.pass_guards.push(guard);
        }
        println!(
            "Attached XDP_PASS programs to the relay's veth peers (native XDP on veth needs one \
             on the receiving end)."
        );
    }

    // The phones' sockets, each created inside its own namespace.
    let mut phones = Vec::with_capacity(calls);
    for i in 0..calls {
        let offset = 2 * i as u16;
        let home: SocketAddr = (netns::HOME_BEHIND_NAT_ADDR, HOME_PHONE_PORT + offset).into();
        let office: SocketAddr = (netns::OFFICE_ADDR, OFFICE_PHONE_PORT + offset).into();
        let home_sock = tb
            .run_in(Host::HomeBehindNat, move || UdpSocket::bind(home))
            .with_context(|| format!("binding the home phone's socket {home}"))?;
        let office_sock = tb
            .run_in(Host::Office, move || UdpSocket::bind(office))
            .with_context(|| format!("binding the office phone's socket {office}"))?;
        phones.push(Phones {
            home,
            office,
            home_sock,
            office_sock,
        });
    }

    let pid = std::process::id();
    let pin_dir = PathBuf::from(format!("{PIN_DIR_PREFIX}{pid}"));
    res.pin_dir = Some(pin_dir.clone());
    let config_file = std::env::temp_dir().join(format!("{CONFIG_FILE_PREFIX}{pid}.toml"));
    res.config_file = Some(config_file.clone());
    std::fs::write(&config_file, DAEMON_CONFIG)
        .with_context(|| format!("writing {}", config_file.display()))?;
    let daemon_args = daemon_args(mode, &config_file, &pin_dir);
    println!();
    println!(
        "Starting the relay daemon in the relay namespace (gRPC API on {DEFAULT_LISTEN} there), \
         with {}:",
        config_file.display()
    );
    for line in DAEMON_CONFIG.lines() {
        println!("    {line}");
    }
    println!("  homerelay {}", daemon_args.join(" "));
    let relay_ns = PathBuf::from("/var/run/netns").join(tb.ns(Host::Relay));
    let daemon = res.daemon.insert(Daemon::spawn(&daemon_args, &relay_ns)?);
    let watch = daemon.watch();

    let session = Session {
        args: args.clone(),
        phones,
        home_ns: tb.ns(Host::HomeBehindNat).to_owned(),
        daemon: watch,
        pin_dir,
    };
    let handle = tb.spawn_in(Host::Relay, move || session.run());
    match handle.join() {
        Ok(result) => result,
        Err(_) => Err(anyhow!("the API session thread panicked")),
    }
}

fn print_header(args: &DemoArgs) {
    let (lo, hi) = netns::NAT_PORT_RANGE;
    let mode = args.xdp_mode.mode().name();
    let calls = args.calls;
    let seconds = args.seconds;
    println!(
        "homerelay demo: {calls} call(s) through the relay for {seconds} s, XDP in {mode} mode."
    );
    println!();
    println!("Each machine is a network namespace joined to the next by a veth pair (TEST-NET");
    println!("addresses, nothing leaves this host):");
    println!();
    println!(
        "  home phone ──────── NAT router ─────────────────────────── relay ────────────────────────────── office phone"
    );
    let nat = format!("{} | {}", netns::NAT_LAN_ADDR, netns::NAT_WAN_ADDR);
    let relay = format!("{} | {}", netns::RELAY_NAT_ADDR, netns::RELAY_OFFICE_ADDR);
    let (home, office) = (netns::HOME_BEHIND_NAT_ADDR, netns::OFFICE_ADDR);
    println!("  {home:<19} {nat:<38} {relay:<36} {office}");
    let masquerade = format!("rewrites source ports to {lo}-{hi}");
    let daemon = format!("homerelay run, XDP on {}", RELAY_IFACES.join(", "));
    println!("  {:<19} {masquerade:<38} {daemon}", "(private address)");
    println!();
    println!(
        "Each home phone is a remote device of the relay (an OpenStage phone, numbers from 4711):"
    );
    println!("the demo adds it over gRPC (DeviceService: a strong password, internet registration");
    println!(
        "allowed); the phone registers through its NAT router on TCP {REGISTRATION_PORT} (SCRAM-SHA-256 login)"
    );
    println!(
        "and stays registered until the end. The relay records the router's public mapping and,"
    );
    println!("as the phone is outside the office network, counts its calls as internet calls.");
    println!();
    println!("Per call, one relay channel (an even UDP port for RTP, the odd one above for RTCP),");
    println!("allocated for the registered home phone:");
    println!("  leg A: the home phone. It announces its private address, which nobody can reach;");
    println!("         the relay latches the NAT's public address and port from its first packet.");
    println!("  leg B: the office phone, its address given to the relay (strict: nothing else is");
    println!("         accepted on that leg).");
    println!(
        "Both phones send G.711: one {PACKET_LEN}-byte RTP packet every 20 ms. The office phone starts"
    );
    println!("talking once it hears the home phone (until then the relay cannot know where the");
    println!("home phone really is).");
    println!();
}

/// The daemon's configuration file: the relay addresses each leg's phone talks to, and the
/// phones' registration. The rest is on the command line, to show the flags.
const DAEMON_CONFIG: &str = "\
[relay]
# The relay's address on the link to the NAT router (leg A, the Internet side).
internet_address = \"198.51.100.129\"
# The relay's LAN address (leg B, the office side).
lan_address = \"192.0.2.1\"

[devices]
# The office LAN is internal; a phone registering from anywhere else is external.
internal_networks = [\"192.0.2.0/24\"]
# The smallest work factor of the password verifiers, to keep the demo quick (the default,
# 600000, costs each phone a noticeable fraction of a second per login).
password_iterations = 4096

[registration]
# The remote phones register here (plain TCP), on the relay's Internet-side address.
listen = \"198.51.100.129:4062\"
";

fn daemon_args(mode: XdpMode, config_file: &Path, pin_dir: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--config".into(),
        config_file.display().to_string(),
        "--xdp-iface".into(),
        RELAY_IFACES.join(","),
        "--xdp-mode".into(),
        mode.name().into(),
        "--require-xdp".into(),
        "--pin-dir".into(),
        pin_dir.display().to_string(),
        "--listen".into(),
        DEFAULT_LISTEN.to_string(),
        "--store".into(),
        store_of(config_file).display().to_string(),
        "--log".into(),
        "info".into(),
    ]
}

/// The demo daemon's state database, beside its configuration file.
fn store_of(config_file: &Path) -> PathBuf {
    config_file.with_extension("db")
}

/// Everything the demo creates, torn down in dependency order by [`Resources::teardown`] (or
/// on drop).
#[derive(Default)]
struct Resources {
    daemon: Option<Daemon>,
    pass_guards: Vec<PassGuard>,
    pin_dir: Option<PathBuf>,
    config_file: Option<PathBuf>,
    testbed: Option<Testbed>,
}

impl Resources {
    /// Stops the daemon, detaches the XDP_PASS programs, removes the pin directory and the
    /// namespaces; says what it did; returns what went wrong. Idempotent.
    fn teardown(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        let mut problems = Vec::new();
        if let Some(daemon) = self.daemon.take() {
            match daemon.stop() {
                Ok(status) if status.success() => {
                    done.push("daemon stopped by SIGTERM (exit status 0)".to_owned());
                }
                // Stopped before it had installed its own handler (a Ctrl-C at start-up).
                Ok(status) if status.signal() == Some(libc::SIGTERM) => {
                    done.push("daemon stopped by SIGTERM (while starting)".to_owned());
                }
                Ok(status) => problems.push(format!("the daemon exited with {status}")),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        if !self.pass_guards.is_empty() {
            self.pass_guards.clear();
            done.push("XDP_PASS programs detached".to_owned());
        }
        if let Some(dir) = self.pin_dir.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => done.push(format!("pinned maps {} removed", dir.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("removing {}: {e}", dir.display())),
            }
        }
        if let Some(config) = self.config_file.take() {
            let db = store_of(&config);
            let mut files = vec![config];
            // The state database and SQLite's files beside it.
            for suffix in ["", "-wal", "-shm", ".lock"] {
                files.push(PathBuf::from(format!("{}{suffix}", db.display())));
            }
            for file in files {
                match std::fs::remove_file(&file) {
                    Ok(()) => done.push(format!("{} removed", file.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => problems.push(format!("removing {}: {e}", file.display())),
                }
            }
        }
        if let Some(tb) = self.testbed.take() {
            let prefix = tb.prefix().to_owned();
            drop(tb);
            let left = namespaces_with_prefix(&prefix);
            if left.is_empty() {
                done.push(format!("namespaces {prefix}* deleted"));
            } else {
                problems.push(format!("namespaces left behind: {}", left.join(", ")));
            }
        }
        if !done.is_empty() {
            println!();
            println!("Cleaned up: {}.", done.join("; "));
        }
        problems
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("cleanup: {p}");
        }
    }
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The pid in a demo pin directory name (`homerelay-demo-<pid>`).
fn pin_dir_owner(name: &str) -> Option<u32> {
    let prefix = Path::new(PIN_DIR_PREFIX).file_name()?.to_str()?;
    name.strip_prefix(prefix)?.parse().ok()
}

/// The pid in a demo configuration file name (`homerelay-demo-<pid>.toml`).
fn config_file_owner(name: &str) -> Option<u32> {
    name.strip_prefix(CONFIG_FILE_PREFIX)?
        .strip_suffix(".toml")?
        .parse()
        .ok()
}

/// Removes the pin directories and configuration files of demos whose process is gone
/// (killed before it could clean up).
fn remove_stale_files() {
    type Owner = fn(&str) -> Option<u32>;
    let places: [(Option<&Path>, Owner); 2] = [
        (Path::new(PIN_DIR_PREFIX).parent(), pin_dir_owner),
        (Some(&std::env::temp_dir()), config_file_owner),
    ];
    for (parent, owner) in places {
        let Some(Ok(dir)) = parent.map(std::fs::read_dir) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                log::warn!("removing stale {}: {e}", path.display());
            }
        }
    }
}

/// The daemon process.
struct Daemon {
    child: Arc<Mutex<Child>>,
    log: Option<JoinHandle<()>>,
}

/// Lets another thread see whether the daemon has exited.
#[derive(Clone)]
struct DaemonWatch(Arc<Mutex<Child>>);

impl DaemonWatch {
    fn exited(&self) -> Option<ExitStatus> {
        let mut child = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        child.try_wait().ok().flatten()
    }
}

impl Daemon {
    /// Starts this executable with `args` in the network namespace at `netns_path` (and in the
    /// host's mount namespace), in its own process group, with SIGTERM as its parent-death
    /// signal. Its log lines are shown prefixed with `daemon:`.
    ///
    /// Must be called from the thread that outlives the daemon (the main thread): the kernel
    /// sends the parent-death signal when the *thread* that forked it exits.
    fn spawn(args: &[String], netns_path: &Path) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe().context("finding the homerelay executable")?;
        let ns =
            File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
        let ns_fd = ns.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The demo's settings only: no configuration file or token from the environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HOMERELAY_") {
                cmd.env_remove(key);
            }
        }
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
        // (setns, setpgid, prctl) and allocates nothing; `ns_fd` stays open until `spawn`
        // returns because `ns` is dropped after it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                    || libc::setpgid(0, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        drop(ns);
        let stderr = child.stderr.take();
        let log = stderr.map(|stderr| {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    println!("  daemon: {}", daemon_log_line(&line));
                }
            })
        });
        Ok(Daemon {
            child: Arc::new(Mutex::new(child)),
            log,
        })
    }

    fn watch(&self) -> DaemonWatch {
        DaemonWatch(Arc::clone(&self.child))
    }

    /// SIGTERM, then waits up to [`DAEMON_STOP`]; kills it if it does not exit by then.
    fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let watch = self.watch();
        let pid = {
            let child = watch
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            child.id()
        };
        let result = match watch.exited() {
            Some(status) => Ok(status),
            None => {
                let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
                // SAFETY: kill has no memory preconditions; `pid` is our child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let deadline = Instant::now() + DAEMON_STOP;
                loop {
                    if let Some(status) = watch.exited() {
                        break Ok(status);
                    }
                    if Instant::now() > deadline {
                        let mut child = watch
                            .0
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let _ = child.kill();
                        let _ = child.wait();
                        break Err(anyhow!(
                            "the daemon did not stop within {DAEMON_STOP:?} of SIGTERM and was killed"
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        if let Some(log) = self.log.take() {
            let _ = log.join();
        }
        result
    }
}

/// A daemon log line for the demo's output: `2026-12-03T18:31:41.771316Z  INFO control::server:
/// message` → `message` (`WARN message` for levels other than INFO); other lines as they are.
fn daemon_log_line(line: &str) -> String {
    let Some((level, message)) = tracing_line(line).or_else(|| bracketed_line(line)) else {
        return line.to_owned();
    };
    match level {
        "INFO" => message.to_owned(),
        level => format!("{level} {message}"),
    }
}

/// The daemon's log format (tracing's): `2026-12-03T18:31:41.771316Z  INFO target: message`.
fn tracing_line(line: &str) -> Option<(&str, &str)> {
    let (timestamp, rest) = line.split_once(' ')?;
    if !timestamp.ends_with('Z') || !timestamp.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let (level, rest) = rest.trim_start().split_once(' ')?;
    let (_target, message) = rest.trim_start().split_once(": ")?;
    Some((level, message))
}

/// The bracketed format (`[timestamp LEVEL target] message`) of earlier versions.
fn bracketed_line(line: &str) -> Option<(&str, &str)> {
    let (head, message) = line.strip_prefix('[')?.split_once("] ")?;
    Some((head.split_whitespace().nth(1).unwrap_or("INFO"), message))
}

/// The two phones of one call.
#[derive(Debug)]
struct Phones {
    /// The home phone's own (private) address.
    home: SocketAddr,
    office: SocketAddr,
    home_sock: UdpSocket,
    office_sock: UdpSocket,
}

/// One allocated call.
#[derive(Debug)]
struct Call {
    number: usize,
    port: u16,
    /// The registered home phone the channel is for (its internal number).
    device: String,
    /// Counted as an internet call.
    internet: bool,
    /// The home phone's channel address: the relay's address on the link to the NAT.
    relay_home: SocketAddr,
    /// The office phone's channel address: the relay's LAN address.
    relay_office: SocketAddr,
    reached_fast_path: bool,
    /// The home phone's address as the relay latched it.
    latched: Option<String>,
}

/// The part of the demo that talks to the daemon: runs on a thread inside the relay's network
/// namespace, where the API listens on loopback.
struct Session {
    args: DemoArgs,
    phones: Vec<Phones>,
    /// The HomeBehindNat namespace (`ip netns` name): the home phones register from there.
    home_ns: String,
    daemon: DaemonWatch,
    pin_dir: PathBuf,
}

impl Session {
    fn run(self) -> anyhow::Result<()> {
        // One thread: every socket of the client is created here, inside the relay namespace.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(self.drive())
    }

    async fn drive(self) -> anyhow::Result<()> {
        let url = format!("http://{DEFAULT_LISTEN}");
        wait_healthy(&self.daemon, &url).await?;
        let (channel, token) = client::connect_channel(&Connection {
            server: url,
            token: None,
            token_file: None,
            token_flag: None,
            ca_cert: None,
            cert: None,
            key: None,
            json: false,
        })
        .await?;
        let mut api = ChannelServiceClient::with_interceptor(channel.clone(), token.clone());
        let mut device_api = DeviceServiceClient::with_interceptor(channel, token);
        let pool = rpc("PoolStatus", api.pool_status(pb::PoolStatusRequest {})).await?;
        let layout = pool.layout.clone().unwrap_or_default();
        println!(
            "The relay is up (grpc.health.v1: SERVING): data path {}, layout {} (UDP {}-{}, {} \
             channels).",
            pool.data_path, layout.name, layout.first_port, layout.last_port, layout.capacity
        );
        if !pool.fast_path_unavailable.is_empty() {
            bail!(
                "the fast path is not running: {}",
                pool.fast_path_unavailable
            );
        }

        let events = rpc("Watch", api.watch(pb::WatchRequest { kinds: vec![] })).await?;
        let watcher = tokio::spawn(print_events(events));

        let (remote_phones, registered) = self.register_phones(&mut api, &mut device_api).await?;

        println!();
        let mut calls = Vec::with_capacity(self.phones.len());
        for (i, (phones, (number, external))) in self.phones.iter().zip(&registered).enumerate() {
            let call = allocate(&mut api, i + 1, phones, number).await?;
            if call.internet != *external {
                bail!(
                    "channel {} for phone {number} is {}an internet call, but the phone \
                     registered from {}",
                    call.port,
                    if call.internet { "" } else { "not " },
                    if *external { "outside" } else { "inside" }
                );
            }
            calls.push(call);
        }

        let mut media = Media::default();
        for (i, (call, phones)) in calls.iter().zip(&self.phones).enumerate() {
            let heard = Arc::new(AtomicBool::new(false));
            let clone = |s: &UdpSocket| s.try_clone().context("cloning a phone's socket");
            media.start(
                Direction {
                    from: clone(&phones.home_sock)?,
                    to: call.relay_home,
                    at: clone(&phones.office_sock)?,
                    expect_from: call.relay_office,
                    ssrc: HOME_SSRC + i as u32,
                },
                None,
                Some(Arc::clone(&heard)),
            )?;
            media.start(
                Direction {
                    from: clone(&phones.office_sock)?,
                    to: call.relay_office,
                    at: clone(&phones.home_sock)?,
                    expect_from: call.relay_home,
                    ssrc: OFFICE_SSRC + i as u32,
                },
                Some(heard),
                None,
            )?;
        }

        let fast = match FastPathStats::open(&self.pin_dir) {
            Ok(f) => Some(f),
            Err(e) => {
                println!(
                    "(cannot read the fast path's counters, the XDP share is not shown: {e:#})"
                );
                None
            }
        };
        println!();
        println!(
            "Talking for {} s. Every second, per channel: its state (gRPC Get), where the relay",
            self.args.seconds
        );
        println!(
            "sees the home phone, the packets and bytes it forwarded each way (gRPC: both data"
        );
        println!(
            "paths), and how many of those packets the XDP program forwarded (its pinned map)."
        );
        println!("{}", live_header());
        let start = Instant::now();
        let mut interrupted = false;
        'live: for t in 1..=self.args.seconds {
            let tick = start + Duration::from_secs(u64::from(t));
            while Instant::now() < tick {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    interrupted = true;
                    break 'live;
                }
                let left = tick.saturating_duration_since(Instant::now());
                tokio::time::sleep(left.min(Duration::from_millis(100))).await;
            }
            for call in &mut calls {
                // The fast path's share first: both only grow, so it never exceeds the total.
                let xdp = fast.as_ref().and_then(|f| f.get(call.port).ok());
                let channel = get(&mut api, call.port).await?;
                call.observe(&channel);
                println!("{}", live_row(t, call, &channel, xdp.as_ref()));
            }
        }

        let counts = tokio::task::spawn_blocking(move || media.stop(DRAIN))
            .await
            .context("stopping the phones")?;
        // What XDP forwarded, read before the channels are released.
        let xdp: Vec<Option<ChannelStats>> = calls
            .iter()
            .map(|c| fast.as_ref().and_then(|f| f.get(c.port).ok()))
            .collect();
        println!();
        let mut finals = Vec::with_capacity(calls.len());
        for call in &mut calls {
            let released = rpc(
                "Release",
                api.release(pb::ReleaseRequest {
                    channel: Some(by_port(call.port)),
                }),
            )
            .await?;
            let channel = released.channel.unwrap_or_default();
            call.observe(&channel);
            println!(
                "Released channel {} over gRPC (call {}); its final counters are in the reply.",
                call.port, call.number
            );
            finals.push(channel.stats.unwrap_or_default());
        }
        // Let the RELEASED events through before the stream is dropped.
        tokio::time::sleep(Duration::from_millis(200)).await;
        watcher.abort();
        println!();
        let mut registrations_ok = true;
        for (number, ended) in remote_phones.unregister_all().await {
            match ended {
                Ok(()) => println!(
                    "Phone {number} unregistered; it stayed registered throughout its call."
                ),
                Err(e) => {
                    registrations_ok = false;
                    println!("Phone {number}'s registration ended early: {e:#}");
                }
            }
        }

        let summary = Summary {
            calls: &calls,
            counts: &counts,
            xdp: &xdp,
            finals: &finals,
        };
        print!("{}", summary.text());
        if interrupted {
            bail!("interrupted");
        }
        if !registrations_ok {
            bail!("a phone's registration ended before the demo did");
        }
        summary.check()
    }
    /// Makes each home phone a remote device of the relay (DeviceService), shows that the relay
    /// refuses a channel for one that is not registered yet, and registers each from behind
    /// the NAT, kept registered by [`remote::RemotePhones`]. Per phone, in call order: its
    /// number and whether the relay holds it as registered from outside.
    async fn register_phones(
        &self,
        api: &mut Client,
        device_api: &mut remote::DeviceClient,
    ) -> anyhow::Result<(remote::RemotePhones, Vec<(String, bool)>)> {
        let relay_registration: SocketAddr = (netns::RELAY_NAT_ADDR, REGISTRATION_PORT).into();
        println!();
        println!(
            "The home phones become remote devices (gRPC DeviceService), then register from \
             behind the NAT on {relay_registration}:"
        );
        let mut devices = Vec::with_capacity(self.phones.len());
        for (i, phones) in self.phones.iter().enumerate() {
            let device = remote::Device::new(i + 1, phones.home)?;
            let created = remote::create(device_api, &device).await?;
            println!(
                "  CreateDevice {} ({}, MAC {}): authentication on, password {}, internet \
                 registration {}",
                created.number,
                device_type_name(created.r#type),
                created.mac,
                if created.weak_password.is_empty() {
                    "strong".to_owned()
                } else {
                    format!("weak ({})", created.weak_password.join("; "))
                },
                if created.internet_registration {
                    "on"
                } else {
                    "off"
                },
            );
            devices.push(device);
        }
        // The rule the channels depend on: no channel for a remote phone that is not registered.
        if let Some((device, phones)) = devices.first().zip(self.phones.first()) {
            let request = allocate_request(1, phones, &device.number);
            match tokio::time::timeout(RPC_TIMEOUT, api.allocate(request)).await {
                Err(_) => bail!("Allocate: no answer within {RPC_TIMEOUT:?}"),
                Ok(Ok(_)) => bail!(
                    "the relay allocated a channel for phone {} before it registered",
                    device.number
                ),
                Ok(Err(s)) => println!(
                    "  Allocate for phone {} before it registered → refused: {} ({:?})",
                    device.number,
                    s.message(),
                    s.code()
                ),
            }
        }
        let mut remote_phones = remote::RemotePhones::new(self.home_ns.clone(), relay_registration);
        let mut registered = Vec::with_capacity(devices.len());
        for device in &devices {
            check_interrupted()?;
            let phone = remote_phones.register(device).await?;
            // What the relay's registry holds now, as an operator would look it up.
            let held = remote::registration(device_api, &device.number)
                .await?
                .ok_or_else(|| {
                    anyhow!(
                        "phone {} registered, but the registry has no registration for it",
                        device.number
                    )
                })?;
            println!(
                "  phone {} registered over {}: the relay sees it at {}, the NAT router's public \
                 mapping\n{:13}(it announced {}); {}; keepalive every {} s",
                phone.number,
                held.transport.to_uppercase(),
                phone.public,
                "",
                held.local_address,
                if held.external {
                    "external, so its calls are internet calls"
                } else {
                    "internal"
                },
                phone.keepalive_s,
            );
            if held.public_address != phone.public.to_string() {
                bail!(
                    "phone {} was told it registered from {}, but the registry holds {}",
                    device.number,
                    phone.public,
                    held.public_address
                );
            }
            registered.push((device.number.clone(), held.external));
        }
        Ok((remote_phones, registered))
    }
}

impl Call {
    fn observe(&mut self, channel: &pb::Channel) {
        if channel.state == pb::ChannelState::FastPath as i32 {
            self.reached_fast_path = true;
        }
        let rtp = channel
            .leg_a
            .as_ref()
            .and_then(|l| l.rtp.clone())
            .unwrap_or_default();
        if rtp.latched && !rtp.address.is_empty() {
            self.latched = Some(rtp.address);
        }
    }
}

fn by_port(port: u16) -> pb::ChannelRef {
    pb::ChannelRef {
        target: Some(pb::channel_ref::Target::Port(u32::from(port))),
    }
}

/// Awaits an API call for at most [`RPC_TIMEOUT`]; a one-line error names the call.
async fn rpc<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => bail!("{what}: no answer within {RPC_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("{what}: {} ({:?})", s.message(), s.code()),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Polls the standard health service until the channel service is SERVING.
async fn wait_healthy(daemon: &DaemonWatch, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + HEALTH_WAIT;
    let endpoint = Endpoint::from_shared(url.to_owned())
        .context("the API URL")?
        .connect_timeout(Duration::from_secs(1));
    loop {
        check_interrupted()?;
        if let Some(status) = daemon.exited() {
            bail!("the daemon exited ({status}) before its API was up; its log is above");
        }
        if let Ok(channel) = endpoint.connect().await {
            let request = tonic_health::pb::HealthCheckRequest {
                service: pb::channel_service_server::SERVICE_NAME.to_owned(),
            };
            let mut health = HealthClient::new(channel);
            let check = health.check(request);
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), check).await {
                if r.get_ref().status == ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon's API did not report SERVING within {HEALTH_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Allocate request of call `number`: leg A the home phone `device` (announced private
/// address, learnt from traffic), leg B the office phone (strict).
fn allocate_request(number: usize, phones: &Phones, device: &str) -> pb::AllocateRequest {
    // No relay address in the request: the configured one of each leg.
    let leg = |rtp: SocketAddr, strict: bool| pb::LegSpec {
        rtp_address: rtp.to_string(),
        rtcp_address: String::new(),
        strict,
        relay_address: String::new(),
    };
    pb::AllocateRequest {
        call_leg: Some(pb::CallLeg {
            call_id: format!("demo-call-{number}"),
            leg_tag: "home".into(),
        }),
        kind: pb::ChannelKind::SystemDevice as i32,
        // The device's registration decides whether the call is an internet call.
        internet: None,
        leg_a: Some(leg(phones.home, false)),
        leg_b: Some(leg(phones.office, true)),
        timeout: None,
        latching: None,
        clock_rate: 0,
        latch_any_payload: false,
        device: device.to_owned(),
    }
}

/// Allocates call `number`'s channel for the registered home phone `device` (see
/// [`allocate_request`]).
async fn allocate(
    api: &mut Client,
    number: usize,
    phones: &Phones,
    device: &str,
) -> anyhow::Result<Call> {
    let response = rpc(
        "Allocate",
        api.allocate(allocate_request(number, phones, device)),
    )
    .await?;
    let channel = response.channel.unwrap_or_default();
    let port = u16::try_from(channel.port).context("the relay returned a port above 65535")?;
    let call = Call {
        number,
        port,
        device: device.to_owned(),
        internet: channel.internet,
        relay_home: (netns::RELAY_NAT_ADDR, port).into(),
        relay_office: (netns::RELAY_OFFICE_ADDR, port).into(),
        reached_fast_path: false,
        latched: None,
    };
    println!(
        "Call {number}: Allocate (kind system_device, device {device}) → channel {port} (RTP \
         {port}, RTCP {}), {}.",
        port + 1,
        if channel.internet {
            "an internet call"
        } else {
            "not an internet call"
        }
    );
    println!(
        "  leg A  home phone   announced {} (not reachable: learnt from traffic), talks to {}",
        phones.home, call.relay_home
    );
    println!(
        "  leg B  office phone {} (strict), talks to {}",
        phones.office, call.relay_office
    );
    Ok(call)
}

async fn get(api: &mut Client, port: u16) -> anyhow::Result<pb::Channel> {
    let r = rpc(
        "Get",
        api.get(pb::GetRequest {
            channel: Some(by_port(port)),
        }),
    )
    .await?;
    r.channel
        .ok_or_else(|| anyhow!("Get: no channel in the reply"))
}

/// Prints the Watch stream's events until it ends or the task is aborted.
async fn print_events(mut events: tonic::Streaming<pb::WatchResponse>) {
    while let Ok(Some(e)) = events.message().await {
        println!("{}", event_line(&e));
    }
}

/// `CHANNEL_STATE_FAST_PATH` → `FAST_PATH`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// `DEVICE_TYPE_OPENSTAGE_HFA` → `OpenStage HFA`.
fn device_type_name(t: i32) -> String {
    crate::devices_api::device_type_from_pb(t)
        .map_or_else(|_| t.to_string(), |t| t.display_name().to_owned())
}

fn state_name(state: i32) -> String {
    pb::ChannelState::try_from(state).map_or_else(
        |_| state.to_string(),
        |s| short(s.as_str_name(), "CHANNEL_STATE_"),
    )
}

fn event_line(e: &pb::WatchResponse) -> String {
    let port = e.channel.as_ref().map_or(0, |c| c.port);
    let kind = pb::EventType::try_from(e.r#type).map_or_else(
        |_| e.r#type.to_string(),
        |t| short(t.as_str_name(), "EVENT_TYPE_"),
    );
    let mut line = format!("  event  channel {port}  {kind}");
    if let Some(l) = &e.latch {
        let who = match pb::LegId::try_from(l.leg) {
            Ok(pb::LegId::A) => "leg A (home phone)",
            Ok(pb::LegId::B) => "leg B (office phone)",
            _ => "leg ?",
        };
        let what = match pb::Component::try_from(l.component) {
            Ok(pb::Component::Rtcp) => "RTCP",
            _ => "RTP",
        };
        let _ = write!(line, "  {who} {what} from {}", l.address);
    }
    if e.r#type == pb::EventType::FastPath as i32 {
        line.push_str("  (the XDP program forwards it from now on)");
    }
    line
}

fn live_header() -> String {
    format!(
        "{:>5}  {:>4}  {:<5}  {:<9}  {:<27}  {:<36}  {}",
        "time",
        "call",
        "port",
        "state",
        "home phone seen at",
        "home → office: pkts, bytes, by XDP",
        "office → home: pkts, bytes, by XDP"
    )
}

fn kb(bytes: u64) -> String {
    format!("{:.1} kB", bytes as f64 / 1000.0)
}

fn direction_cell(d: Option<&pb::DirectionStats>, xdp: Option<u64>) -> String {
    let d = d.cloned().unwrap_or_default();
    let xdp = xdp.map_or_else(|| "?".to_owned(), |x| x.to_string());
    format!("{:>6}  {:>9}  xdp {:>6}", d.packets, kb(d.bytes), xdp)
}

fn live_row(t: u32, call: &Call, channel: &pb::Channel, xdp: Option<&ChannelStats>) -> String {
    let rtp = channel
        .leg_a
        .as_ref()
        .and_then(|l| l.rtp.clone())
        .unwrap_or_default();
    let seen = if rtp.latched {
        rtp.address
    } else {
        "(not latched yet)".to_owned()
    };
    let stats = channel.stats.unwrap_or_default();
    format!(
        "{:>4}s  {:>4}  {:<5}  {:<9}  {:<27}  {:<36}  {}",
        t,
        call.number,
        call.port,
        state_name(channel.state),
        seen,
        direction_cell(
            stats.from_a.as_ref(),
            xdp.map(|x| x.from_leg[LEG_A].packets)
        ),
        direction_cell(
            stats.from_b.as_ref(),
            xdp.map(|x| x.from_leg[LEG_B].packets)
        ),
    )
}

/// The end of the demo: what the phones counted and what the relay forwarded.
struct Summary<'a> {
    calls: &'a [Call],
    /// Per call: home → office, then office → home (the order the directions were started).
    counts: &'a media::Counts,
    /// Per call: what the fast path forwarded.
    xdp: &'a [Option<ChannelStats>],
    /// Per call: the relay's final counters (the Release reply).
    finals: &'a [pb::ChannelStats],
}

impl Summary<'_> {
    fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out);
        let _ = writeln!(out, "Summary");
        let (mut sent, mut received, mut forwarded, mut by_xdp) = (0u64, 0u64, 0u64, 0u64);
        let mut xdp_known = true;
        for (i, call) in self.calls.iter().enumerate() {
            let _ = writeln!(
                out,
                "  call {}, channel {} (phone {}{}): home phone latched at {}; {}",
                call.number,
                call.port,
                call.device,
                if call.internet { ", internet call" } else { "" },
                call.latched.as_deref().unwrap_or("(never latched)"),
                if call.reached_fast_path {
                    "reached FAST_PATH"
                } else {
                    "never reached FAST_PATH"
                }
            );
            let totals = [
                self.finals[i].from_a.unwrap_or_default(),
                self.finals[i].from_b.unwrap_or_default(),
            ];
            for (d, (name, leg)) in [("home → office", LEG_A), ("office → home", LEG_B)]
                .into_iter()
                .enumerate()
            {
                let (s, r) = self.counts[2 * i + d];
                let relayed = totals[leg].packets;
                let xdp = self.xdp[i].map(|x| x.from_leg[leg].packets);
                let lost = s.saturating_sub(r.packets);
                let path = match xdp {
                    Some(x) => format!("{x} by XDP, {} in user space", relayed.saturating_sub(x)),
                    None => {
                        xdp_known = false;
                        "paths unknown".to_owned()
                    }
                };
                let mut line = format!(
                    "    {name}: {s} sent, {} received, {lost} lost; the relay forwarded {relayed} ({path})",
                    r.packets
                );
                if r.duplicates > 0 || r.foreign > 0 {
                    let _ = write!(
                        line,
                        "; {} duplicates, {} unexpected",
                        r.duplicates, r.foreign
                    );
                }
                let _ = writeln!(out, "{line}");
                sent += s;
                received += r.packets;
                forwarded += relayed;
                by_xdp += xdp.unwrap_or(0);
            }
        }
        let lost = sent.saturating_sub(received);
        let pct = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                100.0 * part as f64 / whole as f64
            }
        };
        let _ = writeln!(
            out,
            "  total: {sent} packets sent, {received} received, {lost} lost ({:.2} %)",
            pct(lost, sent)
        );
        if xdp_known {
            let _ = writeln!(
                out,
                "  fast path: XDP forwarded {by_xdp} of the relay's {forwarded} packets ({:.1} %); \
                 user space forwarded\n  the rest, the packets before a channel moved to the \
                 fast path (the first one latches the home phone).",
                pct(by_xdp, forwarded)
            );
        }
        out
    }

    /// An error if the demo did not show the product working: a channel that never reached
    /// the fast path, or a direction where nothing arrived.
    fn check(&self) -> anyhow::Result<()> {
        for (i, call) in self.calls.iter().enumerate() {
            if !call.reached_fast_path {
                bail!("channel {} never reached the fast path", call.port);
            }
            for d in 0..2 {
                if self.counts[2 * i + d].1.packets == 0 {
                    bail!("nothing arrived on channel {}", call.port);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_log_lines_lose_timestamp_and_target() {
        assert_eq!(
            daemon_log_line("[2025-11-26T17:07:00.123Z INFO  control::server] gRPC API on x"),
            "gRPC API on x"
        );
        assert_eq!(
            daemon_log_line("[2025-11-26T17:07:00.123Z WARN  relay_user::relay] careful"),
            "WARN careful"
        );
        assert_eq!(daemon_log_line("Error: boom"), "Error: boom");
        assert_eq!(
            daemon_log_line(
                "2026-12-03T18:31:41.790072Z  INFO control::server: gRPC API on 127.0.0.1:4080"
            ),
            "gRPC API on 127.0.0.1:4080"
        );
        assert_eq!(
            daemon_log_line("2026-12-03T18:31:41.790072Z  WARN homerelay: no answer: retrying"),
            "WARN no answer: retrying"
        );
        assert_eq!(
            daemon_log_line("2026 was a year: not a log line"),
            "2026 was a year: not a log line"
        );
    }

    #[test]
    fn pin_dirs_are_recognised_by_owner() {
        assert_eq!(pin_dir_owner("homerelay-demo-1234"), Some(1234));
        assert_eq!(pin_dir_owner("homerelay-demo-x"), None);
        assert_eq!(pin_dir_owner("homerelay"), None);
        assert_eq!(pin_dir_owner("homerelay-pass-1-0"), None);
        assert_eq!(config_file_owner("homerelay-demo-1234.toml"), Some(1234));
        assert_eq!(config_file_owner("homerelay-demo-1234"), None);
    }

    #[test]
    fn the_daemon_configuration_names_the_testbed_addresses() {
        let config = crate::config::Config::from_toml(DAEMON_CONFIG).expect("valid");
        assert_eq!(
            config.relay_addresses(),
            [Some(netns::RELAY_NAT_ADDR), Some(netns::RELAY_OFFICE_ADDR)]
        );
        // The home phones register where their media goes; the office is inside, they are not.
        assert_eq!(
            config.registration.listen,
            Some((netns::RELAY_NAT_ADDR, REGISTRATION_PORT).into())
        );
        let internal = relay_core::device::networks::Networks::parse(
            config.devices.internal_networks.iter().map(String::as_str),
        )
        .expect("networks");
        use relay_core::device::networks::Origin;
        assert_eq!(
            internal.classify(netns::OFFICE_ADDR.into()),
            Origin::Internal
        );
        assert_eq!(
            internal.classify(netns::NAT_WAN_ADDR.into()),
            Origin::External
        );
    }

    #[test]
    fn the_daemon_gets_the_demo_settings() {
        let args = daemon_args(
            XdpMode::Native,
            Path::new("/tmp/homerelay-demo-7.toml"),
            Path::new("/sys/fs/bpf/homerelay-demo-7"),
        );
        assert_eq!(
            args.join(" "),
            "run --config /tmp/homerelay-demo-7.toml --xdp-iface r-home,r-office,r-nat --xdp-mode native --require-xdp --pin-dir \
             /sys/fs/bpf/homerelay-demo-7 --listen 127.0.0.1:4080 --store /tmp/homerelay-demo-7.db --log info"
        );
    }

    #[test]
    fn rows_show_state_latched_address_and_paths() {
        let call = Call {
            number: 1,
            port: 30612,
            device: "4711".into(),
            internet: true,
            relay_home: "198.51.100.129:30612".parse().expect("addr"),
            relay_office: "192.0.2.1:30612".parse().expect("addr"),
            reached_fast_path: false,
            latched: None,
        };
        let channel = pb::Channel {
            port: 30612,
            state: pb::ChannelState::FastPath as i32,
            leg_a: Some(pb::Leg {
                rtp: Some(pb::Endpoint {
                    address: "198.51.100.130:41234".into(),
                    latched: true,
                }),
                ..Default::default()
            }),
            stats: Some(pb::ChannelStats {
                from_a: Some(pb::DirectionStats {
                    packets: 50,
                    bytes: 8600,
                    last_seen: None,
                    ..Default::default()
                }),
                from_b: None,
            }),
            ..Default::default()
        };
        let mut xdp = ChannelStats::default();
        xdp.from_leg[LEG_A].packets = 49;
        let row = live_row(2, &call, &channel, Some(&xdp));
        assert!(row.contains("FAST_PATH"), "{row}");
        assert!(row.contains("198.51.100.130:41234"), "{row}");
        assert!(row.contains("50     8.6 kB  xdp     49"), "{row}");
        assert!(row.ends_with("0     0.0 kB  xdp      0"), "{row}");
    }
}
