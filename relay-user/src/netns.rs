//! A throw-away network-namespace testbed: a home device, the relay, an office device and,
//! optionally, a home device behind a NAT router, joined by veth pairs.
//!
//! ```text
//!  Home 198.51.100.10/25 (home0) ── (r-home) 198.51.100.1/25  Relay  192.0.2.1/24 (r-office) ── (office0) 192.0.2.10/24 Office
//!                                           198.51.100.129/25 (r-nat)
//!                                                 │
//!                                   (n-wan) 198.51.100.130/25  Nat  203.0.113.1/24 (n-lan) ── (hbn0) 203.0.113.10/24 HomeBehindNat
//! ```
//!
//! The invariant a reader must know: **everything a [`Testbed`] creates lives inside namespaces
//! named with its own prefix (`hr-<pid>-<n>-`), and dropping the testbed deletes them** (the
//! veths go with them). Creation is all-or-nothing: a failed step deletes what was made so far.
//! Namespaces left behind by a process that died without unwinding (`panic = "abort"`, a
//! signal) are deleted by the next [`Testbed::create`] whose process finds that pid gone.
//!
//! What the relay's fast path needs from the testbed, and why:
//! - fixed locally-administered MACs and permanent neighbour entries on both ends of every
//!   link: `bpf_fib_lookup` answers "no neighbour" until the kernel has resolved the next hop;
//! - TX checksum offload off on every veth: packets from local sockets otherwise carry only a
//!   partial UDP checksum, which an incremental checksum update turns into a wrong one;
//! - `rp_filter` off everywhere.
//!
//! Relay keeps the stock `net.ipv4.ip_forward=0`: a relay host is not a router, and what works
//! only with forwarding on does not work for users. The "no relay" baseline of the benchmark
//! (Home → Office by plain kernel forwarding) switches it on for its own run
//! ([`Testbed::set_forwarding`]). Nat routes (`ip_forward=1`).
//!
//! In the Nat namespace an nftables masquerade rewrites source ports into 40000-49999, so a
//! socket bound to port 5004 behind the NAT reaches the relay as `198.51.100.130:4xxxx`.
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, bail};

/// Where `ip netns` keeps its namespace handles.
const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Home's interface (towards Relay).
pub const HOME_IF: &str = "home0";
/// Office's interface (towards Relay).
pub const OFFICE_IF: &str = "office0";
/// Nat's Internet-side interface (towards Relay).
pub const NAT_WAN_IF: &str = "n-wan";
/// Nat's LAN-side interface (towards HomeBehindNat).
pub const NAT_LAN_IF: &str = "n-lan";
/// HomeBehindNat's interface (towards Nat).
pub const HOME_BEHIND_NAT_IF: &str = "hbn0";
/// Relay's interface towards Home (the Internet side).
pub const RELAY_IF_HOME: &str = "r-home";
/// Relay's interface towards Office (the LAN).
pub const RELAY_IF_OFFICE: &str = "r-office";
/// Relay's interface towards Nat (the Internet side, second subnet).
pub const RELAY_IF_NAT: &str = "r-nat";

/// Home's address.
pub const HOME_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Relay's Internet-side address (on [`RELAY_IF_HOME`]); the one Internet peers talk to.
pub const RELAY_HOME_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Relay's LAN address (on [`RELAY_IF_OFFICE`]).
pub const RELAY_OFFICE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Relay's address on the link to Nat (on [`RELAY_IF_NAT`]).
pub const RELAY_NAT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 129);
/// Office's address.
pub const OFFICE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Nat's public address (on [`NAT_WAN_IF`]): the source the relay sees for HomeBehindNat.
pub const NAT_WAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 130);
/// Nat's LAN address (on [`NAT_LAN_IF`]), HomeBehindNat's default gateway.
pub const NAT_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// HomeBehindNat's (private) address.
pub const HOME_BEHIND_NAT_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Source ports Nat's masquerade maps to (inclusive).
pub const NAT_PORT_RANGE: (u16, u16) = (40000, 49999);

/// A machine of the testbed, each in its own network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A device on the Internet side, with a public address.
    Home,
    /// The relay: addresses on every link, forwarding off (the stock default).
    Relay,
    /// A device on the relay's LAN.
    Office,
    /// A NAT router on the Internet side (only with [`TestbedOptions::nat`]).
    Nat,
    /// A device behind [`Host::Nat`] (only with [`TestbedOptions::nat`]).
    HomeBehindNat,
}

impl Host {
    /// Every host, in creation order.
    pub const ALL: [Host; 5] = [
        Host::Home,
        Host::Relay,
        Host::Office,
        Host::Nat,
        Host::HomeBehindNat,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Host::Home => "home",
            Host::Relay => "relay",
            Host::Office => "office",
            Host::Nat => "nat",
            Host::HomeBehindNat => "hbn",
        }
    }

    /// The host's main address: for Relay the Internet-side one ([`RELAY_HOME_ADDR`]), for Nat
    /// the public one ([`NAT_WAN_ADDR`]).
    pub const fn addr(self) -> Ipv4Addr {
        match self {
            Host::Home => HOME_ADDR,
            Host::Relay => RELAY_HOME_ADDR,
            Host::Office => OFFICE_ADDR,
            Host::Nat => NAT_WAN_ADDR,
            Host::HomeBehindNat => HOME_BEHIND_NAT_ADDR,
        }
    }

    fn needs_nat(self) -> bool {
        matches!(self, Host::Nat | Host::HomeBehindNat)
    }
}

/// One end of a veth link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkEnd {
    pub host: Host,
    pub iface: &'static str,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: [u8; 6],
}

/// A veth pair. `near` is the end closer to the relay (the relay's own end where it has one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub near: LinkEnd,
    pub far: LinkEnd,
}

/// MAC `02:00:00:00:<link>:<side>` (locally administered, unicast).
const fn mac(link: u8, side: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, link, side]
}

/// Every link of the testbed; the last two exist only with [`TestbedOptions::nat`].
pub const LINKS: [Link; 4] = [
    Link {
        near: LinkEnd {
            host: Host::Relay,
            iface: RELAY_IF_HOME,
            addr: RELAY_HOME_ADDR,
            prefix_len: 25,
            mac: mac(1, 1),
        },
        far: LinkEnd {
            host: Host::Home,
            iface: HOME_IF,
            addr: HOME_ADDR,
            prefix_len: 25,
            mac: mac(1, 2),
        },
    },
    Link {
        near: LinkEnd {
            host: Host::Relay,
            iface: RELAY_IF_OFFICE,
            addr: RELAY_OFFICE_ADDR,
            prefix_len: 24,
            mac: mac(2, 1),
        },
        far: LinkEnd {
            host: Host::Office,
            iface: OFFICE_IF,
            addr: OFFICE_ADDR,
            prefix_len: 24,
            mac: mac(2, 2),
        },
    },
    Link {
        near: LinkEnd {
            host: Host::Relay,
            iface: RELAY_IF_NAT,
            addr: RELAY_NAT_ADDR,
            prefix_len: 25,
            mac: mac(3, 1),
        },
        far: LinkEnd {
            host: Host::Nat,
            iface: NAT_WAN_IF,
            addr: NAT_WAN_ADDR,
            prefix_len: 25,
            mac: mac(3, 2),
        },
    },
    Link {
        near: LinkEnd {
            host: Host::Nat,
            iface: NAT_LAN_IF,
            addr: NAT_LAN_ADDR,
            prefix_len: 24,
            mac: mac(4, 1),
        },
        far: LinkEnd {
            host: Host::HomeBehindNat,
            iface: HOME_BEHIND_NAT_IF,
            addr: HOME_BEHIND_NAT_ADDR,
            prefix_len: 24,
            mac: mac(4, 2),
        },
    },
];

/// The end of the link opposite the relay interface `relay_iface` (the peer veth that needs
/// an XDP_PASS program in native mode), if `relay_iface` is one of the relay's interfaces.
pub fn relay_peer(relay_iface: &str) -> Option<LinkEnd> {
    LINKS
        .iter()
        .find(|l| l.near.host == Host::Relay && l.near.iface == relay_iface)
        .map(|l| l.far)
}

/// Default route of each host that has one (Relay is directly connected to everything).
const DEFAULT_ROUTES: [(Host, Ipv4Addr); 4] = [
    (Host::Home, RELAY_HOME_ADDR),
    (Host::Office, RELAY_OFFICE_ADDR),
    (Host::Nat, RELAY_NAT_ADDR),
    (Host::HomeBehindNat, NAT_LAN_ADDR),
];

/// What to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestbedOptions {
    /// Also create Nat and HomeBehindNat.
    pub nat: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        Self { nat: true }
    }
}

/// A set of namespaces wired as described in the module documentation. Dropping it deletes them.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    opts: TestbedOptions,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created: Vec<(Host, String)>,
}

static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    /// Builds the testbed. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
    pub fn create(opts: TestbedOptions) -> anyhow::Result<Testbed> {
        let pid = std::process::id();
        remove_stale_namespaces();
        let n = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
        let mut tb = Testbed {
            prefix: format!("hr-{pid}-{n}-"),
            opts,
            created: Vec::new(),
        };
        // On error `tb` is dropped here, deleting whatever was created.
        tb.build()
            .with_context(|| format!("creating testbed {}", tb.prefix))?;
        Ok(tb)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let hosts: Vec<Host> = self.hosts().collect();
        for &host in &hosts {
            let name = format!("{}{}", self.prefix, host.suffix());
            run(&["ip", "netns", "add", &name], None)?;
            self.created.push((host, name));
        }
        for &host in &hosts {
            self.ip(host, &["link", "set", "lo", "up"])?;
        }
        for link in self.links() {
            let (near, far) = (link.near, link.far);
            let far_ns = self.ns(far.host).to_owned();
            let near_mac = mac_string(near.mac);
            let far_mac = mac_string(far.mac);
            self.ip(
                near.host,
                &[
                    "link", "add", "name", near.iface, "address", &near_mac, "type", "veth",
                    "peer", "name", far.iface, "address", &far_mac, "netns", &far_ns,
                ],
            )?;
            for (end, other) in [(near, far), (far, near)] {
                let cidr = format!("{}/{}", end.addr, end.prefix_len);
                self.ip(end.host, &["addr", "add", &cidr, "dev", end.iface])?;
                self.ip(end.host, &["link", "set", end.iface, "up"])?;
                self.ip(
                    end.host,
                    &[
                        "neigh",
                        "replace",
                        &other.addr.to_string(),
                        "lladdr",
                        &mac_string(other.mac),
                        "dev",
                        end.iface,
                        "nud",
                        "permanent",
                    ],
                )?;
                self.exec(end.host, &["ethtool", "-K", end.iface, "tx", "off"])?;
            }
        }
        for (host, via) in DEFAULT_ROUTES {
            if self.has(host) {
                self.ip(host, &["route", "add", "default", "via", &via.to_string()])?;
            }
        }
        for &host in &hosts {
            let mut argv = vec![
                "sysctl".to_owned(),
                "-q".to_owned(),
                "-w".to_owned(),
                "net.ipv4.conf.all.rp_filter=0".to_owned(),
                "net.ipv4.conf.default.rp_filter=0".to_owned(),
            ];
            for link in self.links() {
                for end in [link.near, link.far] {
                    if end.host == host {
                        argv.push(format!("net.ipv4.conf.{}.rp_filter=0", end.iface));
                    }
                }
            }
            if host == Host::Nat {
                argv.push("net.ipv4.ip_forward=1".to_owned());
            }
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            self.exec(host, &argv)?;
        }
        if self.opts.nat {
            let (lo, hi) = NAT_PORT_RANGE;
            let rules = format!(
                "table ip homerelay_nat {{\n\
                 \tchain postrouting {{\n\
                 \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                 \t\toifname \"{NAT_WAN_IF}\" meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}\n\
                 \t\toifname \"{NAT_WAN_IF}\" masquerade\n\
                 \t}}\n\
                 }}\n"
            );
            let ns = self.ns(Host::Nat).to_owned();
            run(
                &["ip", "netns", "exec", &ns, "nft", "-f", "-"],
                Some(rules.as_bytes()),
            )?;
        }
        Ok(())
    }

    /// Switches IPv4 forwarding (`net.ipv4.ip_forward`) on or off in `host`'s namespace. Only
    /// for what is about forwarding itself (the benchmark's "no relay" baseline).
    pub fn set_forwarding(&self, host: Host, on: bool) -> anyhow::Result<()> {
        let arg = format!("net.ipv4.ip_forward={}", u8::from(on));
        self.exec(host, &["sysctl", "-q", "-w", &arg]).map(|_| ())
    }

    /// The hosts this testbed has.
    pub fn hosts(&self) -> impl Iterator<Item = Host> + '_ {
        Host::ALL
            .into_iter()
            .filter(|h| self.opts.nat || !h.needs_nat())
    }

    /// The links this testbed has.
    pub fn links(&self) -> impl Iterator<Item = Link> + '_ {
        LINKS
            .into_iter()
            .filter(|l| self.has(l.near.host) && self.has(l.far.host))
    }

    /// Whether `host` exists in this testbed (Nat and HomeBehindNat need `nat: true`).
    pub fn has(&self, host: Host) -> bool {
        self.opts.nat || !host.needs_nat()
    }

    /// The prefix shared by this testbed's namespace names (`hr-<pid>-<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace name of `host`.
    ///
    /// # Panics
    /// If `host` is not part of this testbed (Nat or HomeBehindNat without `nat: true`).
    pub fn ns(&self, host: Host) -> &str {
        match self.created.iter().find(|(h, _)| *h == host) {
            Some((_, name)) => name,
            None => panic!(
                "host {host:?} is not part of testbed {} (nat: false?)",
                self.prefix
            ),
        }
    }

    /// The main address of `host` (see [`Host::addr`]).
    pub fn addr(host: Host) -> Ipv4Addr {
        host.addr()
    }

    /// The interface index of `iface` inside `host`'s namespace.
    pub fn ifindex(&self, host: Host, iface: &str) -> anyhow::Result<u32> {
        let name = std::ffi::CString::new(iface).context("interface name contains NUL")?;
        let idx = self.try_run_in(host, move || {
            // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })?;
        if idx == 0 {
            bail!("no interface {iface} in {}", self.ns(host));
        }
        Ok(idx)
    }

    /// Runs `f` on a new thread that has entered `host`'s network namespace; returns its result.
    ///
    /// Sockets created by `f` belong to that namespace for their whole life, whichever thread
    /// uses them later. A panic in `f` (or failing to enter the namespace) is propagated.
    pub fn run_in<R: Send + 'static>(
        &self,
        host: Host,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        match self.spawn_in(host, f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Self::run_in`], but failing to enter the namespace is an error, not a panic.
    pub fn try_run_in<R: Send + 'static>(
        &self,
        host: Host,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let ns = self.open(host)?;
        let handle = std::thread::Builder::new()
            .name(format!("ns-{}", host.suffix()))
            .spawn(move || enter(&ns).map(|()| f()))
            .context("spawning a thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Spawns a thread in `host`'s namespace (for long-running senders, receivers, relays).
    ///
    /// # Panics
    /// The thread panics (visible at `join`) if it cannot enter the namespace.
    pub fn spawn_in<R: Send + 'static>(
        &self,
        host: Host,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> JoinHandle<R> {
        let ns = self.open(host);
        let spawned = std::thread::Builder::new()
            .name(format!("ns-{}", host.suffix()))
            .spawn(move || {
                if let Err(e) = ns.and_then(|ns| enter(&ns)) {
                    panic!("cannot enter the namespace of {host:?}: {e:#}");
                }
                f()
            });
        match spawned {
            Ok(handle) => handle,
            Err(e) => panic!("cannot spawn a thread: {e}"),
        }
    }

    /// Runs a command inside `host`'s namespace (`ip netns exec`) and returns its stdout.
    pub fn exec(&self, host: Host, argv: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.ns(host)];
        full.extend_from_slice(argv);
        run(&full, None)
    }

    fn ip(&self, host: Host, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "-n", self.ns(host)];
        full.extend_from_slice(args);
        run(&full, None)
    }

    fn open(&self, host: Host) -> anyhow::Result<File> {
        open_named(self.ns(host))
    }
}

pub(crate) fn open_named(name: &str) -> anyhow::Result<File> {
    let path = format!("{NETNS_RUN_DIR}/{name}");
    File::open(&path).with_context(|| format!("opening {path}"))
}

/// Runs `f` on a new thread inside the named network namespace (`ip netns` name, e.g.
/// [`Testbed::ns`]) and returns its result; for code that outlives a borrow of the testbed.
pub fn run_in_named<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> anyhow::Result<R> {
    let ns = open_named(name)?;
    let handle = std::thread::Builder::new()
        .name("ns-named".into())
        .spawn(move || enter(&ns).map(|()| f()))
        .context("spawning a thread")?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for (_, name) in self.created.drain(..).rev() {
            if let Err(e) = run(&["ip", "netns", "del", &name], None) {
                log::warn!("testbed cleanup: {e:#}");
            }
        }
    }
}

/// Moves the calling thread into the network namespace `ns`.
pub(crate) fn enter(ns: &File) -> anyhow::Result<()> {
    // SAFETY: setns only reads the descriptor, which `ns` keeps open for the call; it changes
    // the network namespace of this thread alone.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Deletes `hr-<pid>-<n>-*` namespaces whose process no longer exists: a process that aborted
/// (the release profile uses `panic = "abort"`) or was killed never ran its `Drop`.
fn remove_stale_namespaces() {
    let suffixes: Vec<&str> = Host::ALL.iter().map(|h| h.suffix()).collect();
    remove_stale_namespaces_of("hr-", &suffixes);
}

/// Deletes namespaces named `<prefix><pid>-<n>-<suffix>` (one of `suffixes`) whose process no
/// longer exists. Shared by every namespace lab of this crate, each with its own prefix.
pub(crate) fn remove_stale_namespaces_of(prefix: &str, suffixes: &[&str]) {
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = stale_owner(name, prefix, suffixes) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = run(&["ip", "netns", "del", name], None) {
            log::warn!("removing stale namespace: {e:#}");
        }
    }
}

/// The pid in a lab namespace name `<prefix><pid>-<n>-<suffix>`.
fn stale_owner(name: &str, prefix: &str, suffixes: &[&str]) -> Option<u32> {
    let mut parts = name.strip_prefix(prefix)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    let suffix = parts.next()?;
    suffixes.contains(&suffix).then_some(pid)
}

fn mac_string(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Runs `argv`, feeding `stdin`; returns stdout, or an error with the command and its stderr.
pub(crate) fn run(argv: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    let (prog, args) = argv.split_first().context("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .with_context(|| format!("writing to `{}`", argv.join(" ")))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_are_recognised_exactly() {
        let suffixes: Vec<&str> = Host::ALL.iter().map(|h| h.suffix()).collect();
        let owner = |name| stale_owner(name, "hr-", &suffixes);
        assert_eq!(owner("hr-1234-0-relay"), Some(1234));
        assert_eq!(owner("hr-1234-17-hbn"), Some(1234));
        assert_eq!(owner("hr-1234-x-relay"), None);
        assert_eq!(owner("hr-1234-0-other"), None);
        assert_eq!(owner("someone-else"), None);
        assert_eq!(owner("hrnat-1234-0-relay"), None);
    }

    #[test]
    fn links_are_consistent() {
        for l in LINKS {
            assert_ne!(l.near.mac, l.far.mac);
            assert_eq!(l.near.prefix_len, l.far.prefix_len);
            // Both ends share a subnet.
            let mask = u32::MAX << (32 - l.near.prefix_len);
            assert_eq!(u32::from(l.near.addr) & mask, u32::from(l.far.addr) & mask);
        }
        assert_eq!(
            relay_peer(RELAY_IF_OFFICE).map(|e| e.iface),
            Some(OFFICE_IF)
        );
        assert_eq!(relay_peer(NAT_LAN_IF), None);
    }
}
