//! `homerelay doctor`'s fast-path checks (`bpf.*`, `xdp.*`): what the kernel needs for the XDP
//! fast path on this host, whether the program loads and forwards here, and what each
//! configured interface offers it.
//!
//! The invariant a reader must know: **doctor never attaches, detaches or replaces a program
//! and never opens a relay's maps.** It proves the program on a private copy
//! (`relay_user::xdp_probe`: own maps, frames through `BPF_PROG_TEST_RUN`), reads interfaces
//! with queries only (`relay_user::xdp_links`), and when a relay holds the configured pin
//! directory it reports what that relay has attached instead. As in the rest of doctor, each
//! check is a function of what it looks at; [`checks`] gathers the inputs.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use relay_user::xdp::XdpMode;
use relay_user::xdp_links::{AttachMode, Attached, LinkInfo, XdpFeatures};
use relay_user::xdp_probe::{ProbeError, ProbeReport, ProbeStage};

use super::{Check, Status, read_sysctl};
use crate::config::Config;

/// A kernel version (`uname -r`'s leading numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// Linux 5.11: BPF memory is charged to the memory cgroup from here on, not to
/// `RLIMIT_MEMLOCK`, and the program's newest helper (`bpf_ktime_get_coarse_ns`) exists.
pub const BPF_MEMCG_KERNEL: KernelVersion = KernelVersion {
    major: 5,
    minor: 11,
    patch: 0,
};

impl KernelVersion {
    /// From a release string: `6.1.0-18-amd64`, `5.10.0`, `4.18.0-513.el8.x86_64`, `6.8`.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let numbers = release
            .trim()
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .next()?;
        let mut it = numbers.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(KernelVersion {
            major,
            minor,
            patch,
        })
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A byte count for people: `512 KiB`, `19.8 MiB`, `2.0 GiB`.
fn size(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB => format!("{:.1} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b if b >= KIB => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

/// The running kernel against what the fast path needs.
pub fn bpf_kernel(release: &str) -> Check {
    const NAME: &str = "bpf.kernel";
    match KernelVersion::parse(release) {
        None => Check::warn(
            NAME,
            format!("cannot read a version from the kernel release {release:?}"),
            "the fast path needs Linux 5.11 or newer; xdp.program shows whether this kernel \
             loads it",
        ),
        Some(v) if v < BPF_MEMCG_KERNEL => Check::warn(
            NAME,
            format!(
                "Linux {release} is older than 5.11: the program uses a helper of 5.11 \
                 (bpf_ktime_get_coarse_ns), and BPF memory counts against RLIMIT_MEMLOCK"
            ),
            "use Linux 5.11 or newer (a distribution kernel with backports may still load it: \
             see xdp.program)",
        ),
        Some(_) => Check::pass(
            NAME,
            format!(
                "Linux {release}: every helper the program uses; BPF memory is charged to the \
                 memory cgroup"
            ),
        ),
    }
}

/// Whether the JIT compiles the program: `jitted` is what the kernel says of the loaded program
/// (the probe's copy, or the running relay's), `sysctl` is `net.core.bpf_jit_enable`, which
/// only the host's network namespace shows. Without the JIT the kernel interprets the program.
pub fn bpf_jit(jitted: Option<bool>, sysctl: Option<&str>) -> Check {
    const NAME: &str = "bpf.jit";
    let fix = "sysctl -w net.core.bpf_jit_enable=1 in the host's network namespace (and the same \
               line in /etc/sysctl.d/homerelay.conf)";
    match (jitted, sysctl.map(str::trim)) {
        (Some(true), _) => Check::pass(NAME, "the JIT compiles the program"),
        (Some(false), _) | (None, Some("0")) => Check::warn(
            NAME,
            "the BPF JIT is off: the kernel interprets the program, at a multiple of the CPU \
             per packet",
            fix,
        ),
        (None, Some("1" | "2")) => Check::pass(NAME, "the BPF JIT is on (net.core.bpf_jit_enable)"),
        (None, _) => Check::warn(
            NAME,
            "cannot tell whether the BPF JIT is on (no program loaded to ask, and \
             net.core.bpf_jit_enable shows only in the host's network namespace)",
            "check net.core.bpf_jit_enable in the host's network namespace: 1 is on",
        ),
    }
}

/// Capability bits (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capabilities of this process (`CapEff` of `/proc/self/status`) against what
/// loading and test-running the program needs; `unprivileged_bpf_disabled` is the sysctl,
/// named when capabilities are missing.
pub fn bpf_privileges(cap_eff: Option<u64>, unprivileged_bpf_disabled: Option<&str>) -> Check {
    const NAME: &str = "bpf.privileges";
    let Some(caps) = cap_eff else {
        return Check::warn(
            NAME,
            "cannot read this process's capabilities",
            "run doctor as root",
        );
    };
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return Check::pass(
            NAME,
            "doctor may load the program, test-run it and list attached programs \
             (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
        );
    }
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, never for CAP_NET_ADMIN.
    let covered = |cap: u32| has(cap) || (cap != CAP_NET_ADMIN && has(CAP_SYS_ADMIN));
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|&(cap, _)| !covered(cap))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        return Check::pass(
            NAME,
            "doctor may load and test-run the program (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); \
             without CAP_SYS_ADMIN it cannot name programs other processes attached",
        );
    }
    let sysctl = unprivileged_bpf_disabled
        .map(|v| format!(" (kernel.unprivileged_bpf_disabled = {})", v.trim()))
        .unwrap_or_default();
    Check::fail(
        NAME,
        format!(
            "doctor lacks {}{sysctl}: it cannot load the program to check it",
            missing.join(", ")
        ),
        "run doctor as root (sudo homerelay doctor …); the relay itself needs CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON, which deploy/systemd/homerelay.service grants",
    )
}

/// Where the pin directory stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinDirState {
    /// It exists on a bpffs.
    OnBpffs,
    /// It does not exist yet; the relay creates it on the bpffs at `.0`.
    ToCreate(PathBuf),
    /// Below `/sys/fs/bpf`, where no bpffs is mounted.
    NoBpffs,
    /// It (or the directory it would be created in) is on another file system.
    NotBpffs,
}

/// The bpffs the relay pins its maps on (`xdp.pin_dir`).
pub fn bpf_fs(pin_dir: &Path, state: &PinDirState) -> Check {
    const NAME: &str = "bpf.fs";
    let dir = pin_dir.display();
    match state {
        PinDirState::OnBpffs => Check::pass(NAME, format!("pin directory {dir} is on a bpffs")),
        PinDirState::ToCreate(on) => Check::pass(
            NAME,
            format!(
                "pin directory {dir} is created at start, on the bpffs at {}",
                on.display()
            ),
        ),
        PinDirState::NoBpffs => Check::warn(
            NAME,
            "no bpffs is mounted on /sys/fs/bpf: homerelay run mounts one only when it runs as \
             root; under the systemd unit (no CAP_SYS_ADMIN) the fast path cannot start",
            "mount -t bpf bpf /sys/fs/bpf (systemd does at boot; a container needs the host's \
             /sys/fs/bpf mounted in)",
        ),
        PinDirState::NotBpffs => Check::fail(
            NAME,
            format!("pin directory {dir} is not on a bpffs: the relay cannot pin its maps there"),
            "set xdp.pin_dir below /sys/fs/bpf, or mount a bpffs there (mount -t bpf bpf DIR)",
        ),
    }
}

/// An `RLIMIT_MEMLOCK` soft limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemlockLimit {
    Unlimited,
    Bytes(u64),
}

/// The tightest memory limit of a cgroup and its ancestors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The cgroup whose limit leaves the least room.
    pub path: String,
    pub max: u64,
    pub current: u64,
}

/// What the memory check judges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemlockFacts {
    pub kernel: Option<KernelVersion>,
    /// `None`: not readable.
    pub limit: Option<MemlockLimit>,
    /// Whose limits these are: "this process", "the running relay (pid 42)".
    pub whose: String,
    /// What the program and its maps take.
    pub need: u64,
    /// `need` was measured (fdinfo of the loaded maps), not estimated.
    pub measured: bool,
    /// `None`: no memory limit applies.
    pub cgroup: Option<CgroupMemory>,
    /// The maps are loaded already (a running relay holds them): they are charged.
    pub loaded: bool,
}

/// Memory for the BPF maps: before Linux 5.11 it counts against `RLIMIT_MEMLOCK` (the daemon
/// does not raise it: the unit's `LimitMEMLOCK=infinity` or a shell's `ulimit -l` must), from
/// 5.11 on against the memory cgroup (`memory.max`, or `memory.limit_in_bytes` in cgroup v1).
pub fn bpf_memlock(f: &MemlockFacts) -> Check {
    const NAME: &str = "bpf.memlock";
    let need = format!(
        "the program and its maps take {} ({})",
        size(f.need),
        if f.measured { "measured" } else { "estimated" }
    );
    let memcg = f.kernel.is_some_and(|k| k >= BPF_MEMCG_KERNEL);
    if memcg {
        if let Some(c) = &f.cgroup {
            let room = c.max.saturating_sub(c.current);
            if !f.loaded && room < f.need {
                return Check::fail(
                    NAME,
                    format!(
                        "{need}, but cgroup {} of {} allows {} and uses {}: loading fails",
                        c.path,
                        f.whose,
                        size(c.max),
                        size(c.current)
                    ),
                    "raise the service's memory limit (systemctl set-property homerelay.service \
                     MemoryMax=…, or the container's limit) by at least that much",
                );
            }
            if f.loaded && c.current >= c.max / 10 * 9 {
                return Check::warn(
                    NAME,
                    format!(
                        "cgroup {} of {} uses {} of its {}: little room left",
                        c.path,
                        f.whose,
                        size(c.current),
                        size(c.max)
                    ),
                    "raise the service's memory limit (systemctl set-property homerelay.service \
                     MemoryMax=…)",
                );
            }
            return Check::pass(
                NAME,
                format!(
                    "{need}, charged to the memory cgroup (Linux ≥ 5.11; RLIMIT_MEMLOCK does not \
                     apply): cgroup {} allows {}, uses {}",
                    c.path,
                    size(c.max),
                    size(c.current)
                ),
            );
        }
        return Check::pass(
            NAME,
            format!(
                "{need}, charged to the memory cgroup (Linux ≥ 5.11; RLIMIT_MEMLOCK does not \
                 apply), which sets no limit for {}",
                f.whose
            ),
        );
    }
    let fix = "LimitMEMLOCK=infinity in the service's unit (deploy/systemd/homerelay.service \
               has it), or `ulimit -l unlimited` before homerelay run; the daemon does not \
               raise the limit itself";
    match f.limit {
        Some(MemlockLimit::Unlimited) => Check::pass(
            NAME,
            format!("{need}; RLIMIT_MEMLOCK of {} is unlimited", f.whose),
        ),
        Some(MemlockLimit::Bytes(limit)) if limit >= f.need || f.loaded => Check::pass(
            NAME,
            format!("{need}; RLIMIT_MEMLOCK of {} is {}", f.whose, size(limit)),
        ),
        Some(MemlockLimit::Bytes(limit)) => Check::fail(
            NAME,
            format!(
                "{need}, but RLIMIT_MEMLOCK of {} is {}: kernels before 5.11 count BPF memory \
                 against it, so the maps cannot be created",
                f.whose,
                size(limit)
            ),
            fix,
        ),
        None => Check::warn(
            NAME,
            format!("{need}; cannot read RLIMIT_MEMLOCK of {}", f.whose),
            fix,
        ),
    }
}

/// The soft `Max locked memory` of a `/proc/PID/limits` file.
pub fn parse_memlock_limit(limits: &str) -> Option<MemlockLimit> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let soft = line
        .strip_prefix("Max locked memory")?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(MemlockLimit::Unlimited),
        n => n.parse().ok().map(MemlockLimit::Bytes),
    }
}

/// A cgroup memory limit file's value: `max` (v2) or a number; `None` for no limit (v1 writes
/// "no limit" as a number near 2^63).
pub fn parse_memory_limit(s: &str) -> Option<u64> {
    match s.trim() {
        "max" => None,
        n => n.parse::<u64>().ok().filter(|&v| v < 1 << 62),
    }
}

/// Where a process's memory cgroup is, from `/proc/PID/cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupPath {
    /// The unified hierarchy (`0::/system.slice/homerelay.service`).
    V2(String),
    /// The v1 memory controller's hierarchy (`4:memory:/docker/…`).
    V1Memory(String),
}

/// The memory cgroup of a `/proc/PID/cgroup` file: v1's memory controller where mounted (it
/// then carries the limits), else the unified hierarchy.
pub fn parse_cgroup(content: &str) -> Option<CgroupPath> {
    let mut v2 = None;
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(CgroupPath::V2(path.to_owned()));
        } else if controllers.split(',').any(|c| c == "memory") {
            return Some(CgroupPath::V1Memory(path.to_owned()));
        }
    }
    v2
}

/// The tightest memory limit on `path` and its ancestors, read from the cgroup file system.
fn cgroup_memory(path: &CgroupPath) -> Option<CgroupMemory> {
    let (base, max_file, current_file, rel) = match path {
        CgroupPath::V2(p) => {
            let base = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                "/sys/fs/cgroup"
            } else {
                "/sys/fs/cgroup/unified"
            };
            (base, "memory.max", "memory.current", p)
        }
        CgroupPath::V1Memory(p) => (
            "/sys/fs/cgroup/memory",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            p,
        ),
    };
    let mut best: Option<CgroupMemory> = None;
    let mut cur = Some(Path::new(rel.as_str()));
    while let Some(p) = cur {
        let dir = Path::new(base).join(p.strip_prefix("/").unwrap_or(p));
        let max = std::fs::read_to_string(dir.join(max_file))
            .ok()
            .and_then(|s| parse_memory_limit(&s));
        let current = std::fs::read_to_string(dir.join(current_file))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let (Some(max), Some(current)) = (max, current) {
            let room = max.saturating_sub(current);
            if best
                .as_ref()
                .is_none_or(|b| b.max.saturating_sub(b.current) > room)
            {
                best = Some(CgroupMemory {
                    path: p.display().to_string(),
                    max,
                    current,
                });
            }
        }
        cur = p.parent();
    }
    best
}

/// The pid holding an `flock` on the file `(major, minor, inode)` in a `/proc/locks` listing
/// (`1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF`; waiters, `->`, are skipped).
pub fn lock_holder(locks: &str, major: u32, minor: u32, inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") || fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = fields.get(4)?.parse().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let ino: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && ino == inode).then_some(pid)
    })
}

/// What the program check reports on.
#[derive(Debug)]
pub enum ProgramFacts<'a> {
    /// A relay holds the pin directory: what it has attached, by configured interface.
    Running {
        pid: u32,
        pin_dir: &'a Path,
        attached: Vec<(String, Attached)>,
    },
    /// No relay holds it: the private copy's result, and whether its frames ran on loopback
    /// because no configured interface exists.
    Probed {
        result: &'a Result<ProbeReport, ProbeError>,
        on_loopback: bool,
    },
}

/// A long message (a verifier log) cut to its first line and its last three.
fn shorten(message: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    if lines.len() <= 6 {
        return lines.join(" / ");
    }
    format!(
        "{} / … / {}",
        lines[0],
        lines[lines.len() - 3..].join(" / ")
    )
}

/// Whether the XDP program loads, passes the verifier and forwards on this kernel — or, when a
/// relay runs it, where.
pub fn xdp_program(f: &ProgramFacts<'_>, release: &str) -> Check {
    const NAME: &str = "xdp.program";
    match f {
        ProgramFacts::Running {
            pid,
            pin_dir,
            attached,
        } => {
            if attached.is_empty() {
                return Check::fail(
                    NAME,
                    format!(
                        "the running relay (pid {pid}) holds {} but runs the program on none of \
                         the configured interfaces",
                        pin_dir.display()
                    ),
                    "read the relay's log: it says why (\"user space only (…)\"); correct that \
                     and restart the relay",
                );
            }
            let on: Vec<String> = attached
                .iter()
                .map(|(iface, a)| format!("{iface} ({}, id {})", a.mode.name(), a.prog_id))
                .collect();
            Check::pass(
                NAME,
                format!(
                    "the running relay (pid {pid}, pin directory {}) runs it on {}; not loaded \
                     again (doctor leaves a running relay alone)",
                    pin_dir.display(),
                    on.join(", ")
                ),
            )
        }
        ProgramFacts::Probed {
            result: Ok(report),
            on_loopback,
        } => {
            let runs: Vec<String> = report
                .runs
                .iter()
                .map(|r| {
                    format!(
                        "{} → {} {}",
                        r.ingress,
                        r.egress,
                        relay_user::xdp_probe::action_name(r.forwarded)
                    )
                })
                .collect();
            Check::pass(
                NAME,
                format!(
                    "loads and passes the verifier on Linux {release}{}; through \
                     BPF_PROG_TEST_RUN{} a test channel's frame is forwarded ({}) with \
                     addresses, ports, TTL and checksums rewritten, a frame to a port without a \
                     channel comes out XDP_PASS untouched; nothing attached",
                    report
                        .verified_instructions
                        .map(|n| format!(" ({n} instructions verified)"))
                        .unwrap_or_default(),
                    if *on_loopback {
                        " on lo (no configured interface exists)"
                    } else {
                        ""
                    },
                    runs.join(", ")
                ),
            )
        }
        ProgramFacts::Probed {
            result: Err(e),
            on_loopback: _,
        } => {
            let eperm = matches!(e.errno, Some(libc::EPERM) | Some(libc::EACCES));
            let fix = match e.stage {
                ProbeStage::BpfFs if eperm => {
                    "run doctor as root: it loads its copy of the program with maps in a \
                     throw-away directory on the bpffs"
                }
                ProbeStage::BpfFs => {
                    "mount -t bpf bpf /sys/fs/bpf (systemd does at boot), and run doctor as root"
                }
                ProbeStage::Maps if eperm => {
                    "run doctor as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; in a \
                     container its seccomp profile must allow bpf(2); before Linux 5.11 raise \
                     RLIMIT_MEMLOCK too (see bpf.memlock)"
                }
                ProbeStage::Maps => {
                    "the kernel refused the maps (see the error): the fast path needs Linux \
                     5.11 or newer built with CONFIG_BPF_SYSCALL; until then user space carries \
                     all media"
                }
                ProbeStage::Verify if eperm => {
                    "grant CAP_PERFMON besides CAP_BPF (or run as root): the verifier allows \
                     the program's packet-pointer arithmetic only to a trusted loader"
                }
                ProbeStage::Verify => {
                    "this kernel's verifier refuses the program: use Linux 5.11 or newer; until \
                     then user space carries all media (leave xdp.interfaces empty to say so)"
                }
                ProbeStage::Setup | ProbeStage::TestRun => {
                    "the program loaded but could not be test-run (see the error); report it \
                     with the output of homerelay doctor --json"
                }
                ProbeStage::Forwarding => {
                    "the fast path would forward wrongly on this kernel: leave xdp.interfaces \
                     empty (user space carries all media) and report it with the output of \
                     homerelay doctor --json"
                }
            };
            let what = match e.stage {
                ProbeStage::BpfFs => "no bpffs for the program's maps",
                ProbeStage::Maps => "the program's maps cannot be created",
                ProbeStage::Verify => "the verifier refuses the program",
                ProbeStage::Setup => "the probe's maps cannot be prepared",
                ProbeStage::TestRun => "BPF_PROG_TEST_RUN failed",
                ProbeStage::Forwarding => "the program does not forward as specified",
            };
            Check::fail(
                NAME,
                format!("{what} on Linux {release}: {}", shorten(&e.message)),
                fix,
            )
        }
    }
}

/// What one configured interface's check judges.
#[derive(Clone, Debug)]
pub struct InterfaceFacts<'a> {
    /// As configured (`xdp.interfaces`).
    pub name: &'a str,
    /// `None`: no such interface in doctor's network namespace.
    pub link: Option<&'a LinkInfo>,
    /// `xdp.mode`.
    pub mode: XdpMode,
    /// How many interfaces are configured: with more than one the fast path redirects.
    pub interfaces: usize,
    /// The pid of the relay holding the pin directory, if one runs.
    pub relay: Option<u32>,
    /// Names of loaded programs by id (empty without CAP_SYS_ADMIN).
    pub programs: &'a HashMap<u32, String>,
}

const GENERIC_MODE: &str = "xdp.mode = \"generic\" (--xdp-mode generic)";

fn describe(link: &LinkInfo) -> String {
    if link.is_veth() {
        return match &link.peer {
            Some(p) => match &p.view {
                Some(v) => format!(
                    "veth, peer {} ({})",
                    v.name,
                    v.netns.as_deref().unwrap_or("this namespace")
                ),
                None => format!(
                    "veth, peer ifindex {} in a namespace not found (id {})",
                    p.ifindex,
                    p.netnsid.unwrap_or(-1)
                ),
            },
            None => "veth".into(),
        };
    }
    let driver = link.driver.as_deref().unwrap_or("unknown");
    match link.xdp_features {
        Some(x) => format!("driver {driver}, XDP features: {}", x.names()),
        None => format!(
            "driver {driver} (this kernel does not report XDP features: Linux 6.3 and newer do)"
        ),
    }
}

/// One configured interface: present, what runs or would run on it and in which mode, and the
/// traps of native mode — a driver that cannot send redirected frames, a veth whose peer
/// drops them (no XDP program there), and partial checksums from local senders behind a veth,
/// which the native fast path's incremental checksum update breaks (TESTBED.md). Generic mode
/// has none of these.
pub fn xdp_interface(f: &InterfaceFacts<'_>) -> Check {
    let name = format!("xdp.iface.{}", f.name);
    let Some(link) = f.link else {
        return Check::fail(
            name,
            format!("no interface {:?} in this network namespace", f.name),
            "correct xdp.interfaces (--xdp-iface; `ip link` lists the interfaces), or run \
             doctor in the relay's network namespace",
        );
    };
    let what = describe(link);
    let program = |id: u32| match f.programs.get(&id) {
        Some(n) => format!("{n} (id {id})"),
        None => format!("program id {id}"),
    };
    let ours = |id: u32| f.programs.get(&id).map(|n| n == relay_common::XDP_PROGRAM);
    let mut issues: Vec<(Status, String, String)> = Vec::new();
    let (mode, how) = match f.relay {
        Some(pid) => match link.xdp.iter().find(|a| ours(a.prog_id) != Some(false)) {
            Some(a) => (
                a.mode,
                format!(
                    "{} attached in {} mode by the running relay (pid {pid})",
                    program(a.prog_id),
                    a.mode.name()
                ),
            ),
            None => {
                let other = link
                    .xdp
                    .first()
                    .map(|a| format!(" ({} is attached instead)", program(a.prog_id)))
                    .unwrap_or_default();
                return Check::fail(
                    name,
                    format!("{what}: the running relay (pid {pid}) has no fast path here{other}"),
                    "read the relay's log: it says why (\"user space only (…)\"); correct that \
                     and restart the relay",
                );
            }
        },
        None => {
            if let Some(a) = link.xdp.first() {
                let fix = if ours(a.prog_id) == Some(true) {
                    format!(
                        "another relay (with another pin directory) runs it, or one that ended \
                         left it attached: stop that relay, or detach it (ip link set dev {} \
                         xdp off)",
                        f.name
                    )
                } else {
                    format!(
                        "detach it if nothing needs it (ip link set dev {0} xdp off), or leave \
                         {0} out of xdp.interfaces",
                        f.name
                    )
                };
                return Check::fail(
                    name,
                    format!(
                        "{what}: {} is attached in {} mode and no relay of this configuration \
                         runs: homerelay run cannot attach its program here",
                        program(a.prog_id),
                        a.mode.name()
                    ),
                    fix,
                );
            }
            let no_native = link
                .xdp_features
                .filter(|x| !x.has(XdpFeatures::BASIC))
                .map(|x| x.names());
            match (f.mode, no_native) {
                (XdpMode::Generic, _) => (
                    AttachMode::Generic,
                    "homerelay run attaches in generic mode (xdp.mode)".to_owned(),
                ),
                (XdpMode::Native, Some(features)) => {
                    return Check::fail(
                        name,
                        format!(
                            "{what}: the driver has no native XDP (features: {features}) and \
                             xdp.mode is native: homerelay run cannot attach"
                        ),
                        format!("use generic mode: {GENERIC_MODE}, or auto"),
                    );
                }
                (_, Some(_)) => {
                    issues.push((
                        Status::Warn,
                        "the driver has no native XDP: auto falls back to generic mode, which \
                         costs more CPU per packet"
                            .into(),
                        format!(
                            "for native speed, a NIC whose driver has XDP; {GENERIC_MODE} makes \
                             the choice explicit"
                        ),
                    ));
                    (
                        AttachMode::Generic,
                        "homerelay run attaches in generic mode (auto)".to_owned(),
                    )
                }
                (mode, None) => (
                    AttachMode::Native,
                    format!(
                        "homerelay run attaches in native mode ({})",
                        if mode == XdpMode::Auto {
                            "auto"
                        } else {
                            "xdp.mode"
                        }
                    ),
                ),
            }
        }
    };
    if mode == AttachMode::Native {
        native_traps(f, link, &mut issues);
    }
    let worst = issues
        .iter()
        .map(|(s, _, _)| *s)
        .max_by_key(|s| match s {
            Status::Pass => 0,
            Status::Warn => 1,
            Status::Fail => 2,
        })
        .unwrap_or(Status::Pass);
    let mut detail = format!("{what}; {how}");
    for (_, text, _) in &issues {
        detail.push_str("; ");
        detail.push_str(text);
    }
    let fixes: Vec<&str> = issues.iter().map(|(_, _, fix)| fix.as_str()).collect();
    match worst {
        Status::Pass => Check::pass(name, detail),
        Status::Warn => Check::warn(name, detail, fixes.join("; ")),
        Status::Fail => Check::fail(name, detail, fixes.join("; ")),
    }
}

/// The traps of native mode on `link` (see [`xdp_interface`]).
fn native_traps(
    f: &InterfaceFacts<'_>,
    link: &LinkInfo,
    issues: &mut Vec<(Status, String, String)>,
) {
    let redirects = f.interfaces > 1;
    if redirects
        && link
            .xdp_features
            .is_some_and(|x| !x.has(XdpFeatures::REDIRECT))
    {
        issues.push((
            Status::Fail,
            "the driver cannot carry out XDP_REDIRECT in native mode: frames for another \
             interface are dropped"
                .into(),
            format!("use generic mode: {GENERIC_MODE}"),
        ));
    }
    let view = link.peer.as_ref().and_then(|p| p.view.as_ref());
    if !link.is_veth() {
        if redirects
            && link
                .xdp_features
                .is_some_and(|x| !x.has(XdpFeatures::NDO_XMIT))
        {
            issues.push((
                Status::Fail,
                format!(
                    "the driver cannot send redirected frames (no ndo_xdp_xmit): frames the \
                     fast path redirects to {} are dropped",
                    f.name
                ),
                format!("use generic mode: {GENERIC_MODE}"),
            ));
        }
        return;
    }
    // A veth hands what the fast path sends out of it (XDP_TX, or XDP_REDIRECT to it) to its
    // peer, which in native mode must run an XDP program (or have GRO on) to take it; the
    // kernel reports that as this end's ndo-xmit feature.
    let peer = view.map_or("its peer".to_owned(), |v| v.name.clone());
    let can_send = match link.xdp_features {
        Some(x) => Some(x.has(XdpFeatures::NDO_XMIT)),
        None => view.map(|v| !v.xdp.is_empty()),
    };
    let send_fix = format!(
        "use generic mode: {GENERIC_MODE}; or attach an XDP program to {peer} (one that passes \
         everything is enough), or turn GRO on there (ethtool -K {peer} gro on)"
    );
    match can_send {
        Some(true) => {}
        Some(false) => issues.push((
            Status::Fail,
            format!(
                "{peer} has no XDP program: in native mode the frames the fast path sends out of \
                 {} are dropped",
                f.name
            ),
            send_fix,
        )),
        None => issues.push((
            Status::Warn,
            "cannot see whether its peer runs an XDP program (its namespace was not found): \
             without one, the frames the fast path sends out of it in native mode are dropped"
                .into(),
            send_fix,
        )),
    }
    let checksum_fix = format!(
        "turn TX checksum offload off where local senders' packets enter (ethtool -K {peer} tx \
         off), or use generic mode: {GENERIC_MODE}"
    );
    match view.and_then(|v| v.tx_checksum) {
        Some(false) => {}
        Some(true) => issues.push((
            Status::Warn,
            format!(
                "TX checksum offload is on at {peer}: UDP packets that local sockets behind it \
                 send carry a partial checksum, which the native fast path's rewrite turns into \
                 a wrong one"
            ),
            checksum_fix,
        )),
        None => issues.push((
            Status::Warn,
            "cannot see TX checksum offload at its peer: if it is on, packets that local \
             sockets behind it send carry a partial checksum, which the native fast path's \
             rewrite turns into a wrong one"
                .into(),
            checksum_fix,
        )),
    }
}

/// Everything the fast-path checks look at, gathered from this host (blocking).
struct FastPathHost {
    release: String,
    jitted: Option<bool>,
    jit_sysctl: Option<String>,
    cap_eff: Option<u64>,
    unprivileged_bpf_disabled: Option<String>,
    pin_state: PinDirState,
    relay: Option<u32>,
    links: Vec<(String, Option<LinkInfo>)>,
    programs: HashMap<u32, String>,
    program: ProgramSource,
    memlock: MemlockFacts,
}

/// Where the program check's facts come from.
enum ProgramSource {
    /// A relay (this pid) holds the pin directory: doctor only looks.
    Relay(u32),
    /// The probe's result, and whether it ran on loopback.
    Probe(Result<ProbeReport, ProbeError>, bool),
}

fn kernel_release() -> String {
    // SAFETY: `utsname` is plain data; zeroed is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates the release field.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn pin_dir_state(dir: &Path) -> PinDirState {
    use relay_user::xdp_probe::is_bpffs;
    if dir.exists() {
        return if is_bpffs(dir) {
            PinDirState::OnBpffs
        } else {
            PinDirState::NotBpffs
        };
    }
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        return PinDirState::NoBpffs;
    }
    match dir.ancestors().skip(1).find(|a| a.exists()) {
        Some(a) if is_bpffs(a) => PinDirState::ToCreate(a.to_path_buf()),
        _ => PinDirState::NotBpffs,
    }
}

/// The pid of the process holding the `flock` on `dir` (a running relay), not this one.
fn relay_holding(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    lock_holder(
        &locks,
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino(),
    )
    .filter(|&pid| pid != std::process::id())
}

fn gather_fast_path(config: &Config) -> FastPathHost {
    let release = kernel_release();
    let pin_dir = &config.xdp.pin_dir;
    let relay = relay_holding(pin_dir);
    let links: Vec<(String, Option<LinkInfo>)> = config
        .xdp
        .interfaces
        .iter()
        .map(|i| (i.clone(), relay_user::xdp_links::inspect(i).ok().flatten()))
        .collect();
    let loaded = relay_user::xdp_links::loaded_programs();
    let programs: HashMap<u32, String> =
        loaded.iter().map(|(&id, p)| (id, p.name.clone())).collect();
    let program = match relay {
        Some(pid) => ProgramSource::Relay(pid),
        None => {
            let present: Vec<String> = links
                .iter()
                .filter(|(_, l)| l.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            let on_loopback = present.is_empty();
            let on = if on_loopback {
                vec!["lo".to_owned()]
            } else {
                present
            };
            ProgramSource::Probe(relay_user::xdp_probe::probe(&on), on_loopback)
        }
    };
    let proc_dir = relay.map_or("/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    let whose = relay.map_or("this process".to_owned(), |pid| {
        format!("the running relay (pid {pid})")
    });
    let jitted = match &program {
        ProgramSource::Probe(Ok(report), _) => report.jitted,
        ProgramSource::Probe(Err(_), _) => None,
        ProgramSource::Relay(_) => links
            .iter()
            .filter_map(|(_, l)| l.as_ref())
            .flat_map(|l| &l.xdp)
            .filter_map(|a| loaded.get(&a.prog_id))
            .find(|p| p.name == relay_common::XDP_PROGRAM)
            .map(|p| p.jitted),
    };
    let (need, measured) = match &program {
        ProgramSource::Probe(Ok(report), _) => (report.memory, true),
        _ => (
            relay_user::xdp_probe::map_memory_estimate(relay_user::xdp_probe::possible_cpus()),
            false,
        ),
    };
    let memlock = MemlockFacts {
        kernel: KernelVersion::parse(&release),
        limit: std::fs::read_to_string(format!("{proc_dir}/limits"))
            .ok()
            .and_then(|s| parse_memlock_limit(&s)),
        whose,
        need,
        measured,
        cgroup: std::fs::read_to_string(format!("{proc_dir}/cgroup"))
            .ok()
            .and_then(|s| parse_cgroup(&s))
            .and_then(|p| cgroup_memory(&p)),
        loaded: relay.is_some(),
    };
    FastPathHost {
        jitted,
        jit_sysctl: read_sysctl("/proc/sys/net/core/bpf_jit_enable"),
        cap_eff: read_sysctl("/proc/self/status").and_then(|s| cap_eff(&s)),
        unprivileged_bpf_disabled: read_sysctl("/proc/sys/kernel/unprivileged_bpf_disabled"),
        pin_state: pin_dir_state(pin_dir),
        release,
        relay,
        links,
        programs,
        program,
        memlock,
    }
}

/// The fast-path checks for the configured XDP interfaces (none without any).
pub async fn checks(config: &Config) -> Vec<Check> {
    if config.xdp.interfaces.is_empty() {
        return Vec::new();
    }
    let gathered = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || gather_fast_path(&config)).await
    };
    let host = match gathered {
        Ok(h) => h,
        Err(e) => {
            return vec![Check::fail(
                "xdp.program",
                format!("the fast-path checks stopped: {e}"),
                "report it with the output of homerelay doctor --json",
            )];
        }
    };
    let mut out = vec![
        bpf_kernel(&host.release),
        bpf_jit(host.jitted, host.jit_sysctl.as_deref()),
        bpf_privileges(host.cap_eff, host.unprivileged_bpf_disabled.as_deref()),
        bpf_fs(&config.xdp.pin_dir, &host.pin_state),
        bpf_memlock(&host.memlock),
    ];
    let program = match &host.program {
        ProgramSource::Probe(result, on_loopback) => ProgramFacts::Probed {
            result,
            on_loopback: *on_loopback,
        },
        ProgramSource::Relay(pid) => ProgramFacts::Running {
            pid: *pid,
            pin_dir: &config.xdp.pin_dir,
            attached: host
                .links
                .iter()
                .filter_map(|(name, l)| {
                    let a = l.as_ref()?.xdp.iter().find(|a| {
                        host.programs
                            .get(&a.prog_id)
                            .is_none_or(|n| n == relay_common::XDP_PROGRAM)
                    })?;
                    Some((name.clone(), *a))
                })
                .collect(),
        },
    };
    out.push(xdp_program(&program, &host.release));
    for (name, link) in &host.links {
        out.push(xdp_interface(&InterfaceFacts {
            name,
            link: link.as_ref(),
            mode: config.xdp.mode,
            interfaces: host.links.len(),
            relay: host.relay,
            programs: &host.programs,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_release_strings() {
        let v = |s| KernelVersion::parse(s);
        assert_eq!(
            v("6.18.44-fc-v1147"),
            Some(KernelVersion {
                major: 6,
                minor: 18,
                patch: 44
            })
        );
        assert_eq!(
            v("5.10.0-28-amd64").map(|k| (k.major, k.minor)),
            Some((5, 10))
        );
        assert_eq!(v("4.18.0-513.el8.x86_64").map(|k| k.patch), Some(0));
        assert_eq!(v("6.8").map(|k| k.to_string()).as_deref(), Some("6.8.0"));
        assert_eq!(v("6.1-rc3").map(|k| k.minor), Some(1));
        assert_eq!(v("linux"), None);
        assert_eq!(v(""), None);
        assert_eq!(v("6"), None);
        assert!(v("5.11.0").unwrap() >= BPF_MEMCG_KERNEL);
        assert!(v("5.10.200").unwrap() < BPF_MEMCG_KERNEL);

        assert_eq!(bpf_kernel("6.1.0-18-amd64").status, Status::Pass);
        let old = bpf_kernel("5.4.0-150-generic");
        assert_eq!(old.status, Status::Warn);
        assert!(
            old.fix.as_deref().is_some_and(|f| f.contains("5.11")),
            "{old:?}"
        );
        assert_eq!(bpf_kernel("custom").status, Status::Warn);
    }

    #[test]
    fn the_jit_and_the_privileges() {
        assert_eq!(bpf_jit(Some(true), None).status, Status::Pass);
        assert_eq!(
            bpf_jit(Some(true), Some("0")).status,
            Status::Pass,
            "the program says"
        );
        let off = bpf_jit(Some(false), Some("1\n"));
        assert_eq!(off.status, Status::Warn);
        assert!(
            off.fix
                .as_deref()
                .is_some_and(|f| f.contains("bpf_jit_enable=1"))
        );
        assert_eq!(bpf_jit(None, Some("0\n")).status, Status::Warn);
        assert_eq!(bpf_jit(None, Some("1\n")).status, Status::Pass);
        assert_eq!(bpf_jit(None, None).status, Status::Warn);

        let caps = |list: &[u32]| list.iter().map(|c| 1u64 << c).sum::<u64>();
        assert_eq!(
            bpf_privileges(Some(u64::MAX >> 23), None).status,
            Status::Pass
        );
        assert_eq!(
            bpf_privileges(Some(caps(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])), None).status,
            Status::Pass
        );
        let user = bpf_privileges(Some(0), Some("2\n"));
        assert_eq!(user.status, Status::Fail);
        assert!(
            user.detail.contains("CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON")
                && user.detail.contains("unprivileged_bpf_disabled = 2"),
            "{user:?}"
        );
        assert!(
            user.fix
                .as_deref()
                .is_some_and(|f| f.contains("run doctor as root"))
        );
        let no_perfmon = bpf_privileges(Some(caps(&[CAP_BPF, CAP_NET_ADMIN])), None);
        assert_eq!(no_perfmon.status, Status::Fail);
        assert!(
            no_perfmon.detail.contains("lacks CAP_PERFMON:"),
            "{no_perfmon:?}"
        );
        assert_eq!(
            bpf_privileges(Some(caps(&[CAP_SYS_ADMIN])), None).status,
            Status::Fail,
            "XDP needs CAP_NET_ADMIN too"
        );
        assert_eq!(
            cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n"),
            Some(0x1ff_feff_ffff)
        );
        assert_eq!(cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn the_pin_directory_needs_a_bpffs() {
        let dir = Path::new("/sys/fs/bpf/homerelay");
        assert_eq!(bpf_fs(dir, &PinDirState::OnBpffs).status, Status::Pass);
        assert_eq!(
            bpf_fs(dir, &PinDirState::ToCreate("/sys/fs/bpf".into())).status,
            Status::Pass
        );
        let unmounted = bpf_fs(dir, &PinDirState::NoBpffs);
        assert_eq!(unmounted.status, Status::Warn);
        assert!(
            unmounted
                .fix
                .as_deref()
                .is_some_and(|f| f.starts_with("mount -t bpf bpf /sys/fs/bpf"))
        );
        let elsewhere = bpf_fs(Path::new("/var/lib/homerelay/pins"), &PinDirState::NotBpffs);
        assert_eq!(elsewhere.status, Status::Fail);
        assert!(
            elsewhere
                .fix
                .as_deref()
                .is_some_and(|f| f.contains("xdp.pin_dir"))
        );
    }

    fn memlock_facts() -> MemlockFacts {
        MemlockFacts {
            kernel: KernelVersion::parse("6.1.0"),
            limit: Some(MemlockLimit::Bytes(8 << 20)),
            whose: "this process".into(),
            need: 20 << 20,
            measured: true,
            cgroup: None,
            loaded: false,
        }
    }

    #[test]
    fn bpf_memory_is_judged_by_the_cgroup_from_5_11_and_by_memlock_before() {
        // 5.11 and later: an 8 MiB RLIMIT_MEMLOCK does not matter, a tight cgroup does.
        let f = memlock_facts();
        let c = bpf_memlock(&f);
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("20.0 MiB (measured)") && c.detail.contains("no limit"));
        let tight = MemlockFacts {
            cgroup: Some(CgroupMemory {
                path: "/system.slice/homerelay.service".into(),
                max: 64 << 20,
                current: 50 << 20,
            }),
            ..memlock_facts()
        };
        let c = bpf_memlock(&tight);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("MemoryMax")));
        let roomy = MemlockFacts {
            cgroup: Some(CgroupMemory {
                path: "/".into(),
                max: 1 << 30,
                current: 100 << 20,
            }),
            ..memlock_facts()
        };
        assert_eq!(bpf_memlock(&roomy).status, Status::Pass);
        // A running relay's maps are charged already; a cgroup near its limit is a warning.
        let full = MemlockFacts {
            loaded: true,
            ..tight.clone()
        };
        assert_eq!(bpf_memlock(&full).status, Status::Pass);
        let nearly = MemlockFacts {
            loaded: true,
            cgroup: Some(CgroupMemory {
                path: "/x".into(),
                max: 100 << 20,
                current: 95 << 20,
            }),
            ..memlock_facts()
        };
        assert_eq!(bpf_memlock(&nearly).status, Status::Warn);

        // Before 5.11: RLIMIT_MEMLOCK must hold the maps; the daemon does not raise it.
        let old = MemlockFacts {
            kernel: KernelVersion::parse("5.10.0"),
            limit: Some(MemlockLimit::Bytes(64 << 10)),
            ..memlock_facts()
        };
        let c = bpf_memlock(&old);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("64 KiB"), "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("LimitMEMLOCK=infinity") && f.contains("ulimit -l")),
            "{c:?}"
        );
        for limit in [MemlockLimit::Unlimited, MemlockLimit::Bytes(32 << 20)] {
            let ok = MemlockFacts {
                limit: Some(limit),
                ..old.clone()
            };
            assert_eq!(bpf_memlock(&ok).status, Status::Pass);
        }
        let unknown = MemlockFacts {
            kernel: None,
            limit: None,
            ..old.clone()
        };
        assert_eq!(bpf_memlock(&unknown).status, Status::Warn);
        assert_eq!(
            bpf_memlock(&MemlockFacts {
                loaded: true,
                ..old
            })
            .status,
            Status::Pass
        );
    }

    #[test]
    fn limits_cgroups_and_locks_are_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         8388608              8388608              bytes     \n";
        assert_eq!(
            parse_memlock_limit(limits),
            Some(MemlockLimit::Bytes(8 << 20))
        );
        assert_eq!(
            parse_memlock_limit(
                "Max locked memory         unlimited            unlimited            bytes\n"
            ),
            Some(MemlockLimit::Unlimited)
        );
        assert_eq!(parse_memlock_limit("Max open files 1 1 files\n"), None);

        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_memory_limit("lots"), None);

        assert_eq!(
            parse_cgroup("0::/system.slice/homerelay.service\n"),
            Some(CgroupPath::V2("/system.slice/homerelay.service".into()))
        );
        assert_eq!(
            parse_cgroup("9:name=systemd:/\n4:memory:/docker/abc\n0::/\n"),
            Some(CgroupPath::V1Memory("/docker/abc".into()))
        );
        assert_eq!(
            parse_cgroup("5:cpu,memory:/a\n"),
            Some(CgroupPath::V1Memory("/a".into()))
        );
        assert_eq!(parse_cgroup("garbage\n"), None);

        let locks = "1: POSIX  ADVISORY  WRITE 100 fd:01:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 5151 00:2a:1234 0 EOF\n";
        assert_eq!(lock_holder(locks, 0, 0x2a, 1234), Some(4242));
        assert_eq!(lock_holder(locks, 0, 0x2a, 1235), None);
        assert_eq!(
            lock_holder(locks, 0xfd, 1, 77),
            None,
            "POSIX locks are not the relay's"
        );
        assert_eq!(lock_holder("", 0, 0, 0), None);
    }

    fn veth(features: u64, peer_xdp: bool, peer_tx_checksum: Option<bool>) -> LinkInfo {
        use relay_user::xdp_links::{Peer, PeerView};
        LinkInfo {
            name: "r-home".into(),
            ifindex: 5,
            kind: Some("veth".into()),
            driver: Some("veth".into()),
            xdp: Vec::new(),
            xdp_features: Some(XdpFeatures(features)),
            tx_checksum: Some(false),
            peer: Some(Peer {
                ifindex: 2,
                netnsid: Some(0),
                view: Some(PeerView {
                    name: "home0".into(),
                    netns: Some("/var/run/netns/home".into()),
                    xdp: if peer_xdp {
                        vec![Attached {
                            mode: AttachMode::Native,
                            prog_id: 9,
                        }]
                    } else {
                        Vec::new()
                    },
                    tx_checksum: peer_tx_checksum,
                }),
            }),
        }
    }

    fn nic(features: Option<u64>) -> LinkInfo {
        LinkInfo {
            name: "eth0".into(),
            ifindex: 2,
            kind: None,
            driver: Some("ixgbe".into()),
            xdp: Vec::new(),
            xdp_features: features.map(XdpFeatures),
            tx_checksum: Some(true),
            peer: None,
        }
    }

    fn iface<'a>(
        link: Option<&'a LinkInfo>,
        mode: XdpMode,
        programs: &'a HashMap<u32, String>,
    ) -> InterfaceFacts<'a> {
        InterfaceFacts {
            name: link.map_or("eth9", |l| l.name.as_str()),
            link,
            mode,
            interfaces: 1,
            relay: None,
            programs,
        }
    }

    const BASIC: u64 = XdpFeatures::BASIC | XdpFeatures::REDIRECT;
    const ALL: u64 = BASIC | XdpFeatures::NDO_XMIT;

    #[test]
    fn an_interface_is_judged_by_what_would_run_on_it() {
        let none = HashMap::new();
        let missing = xdp_interface(&iface(None, XdpMode::Auto, &none));
        assert_eq!(
            (missing.name.as_ref(), missing.status),
            ("xdp.iface.eth9", Status::Fail)
        );
        assert!(
            missing
                .fix
                .as_deref()
                .is_some_and(|f| f.contains("xdp.interfaces"))
        );

        // A veth whose peer runs no XDP program: fine in generic mode, dropping in native.
        let bare = veth(BASIC, false, Some(false));
        let c = xdp_interface(&iface(Some(&bare), XdpMode::Generic, &none));
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("peer home0") && c.detail.contains("generic mode"));
        for mode in [XdpMode::Auto, XdpMode::Native] {
            let c = xdp_interface(&iface(Some(&bare), mode, &none));
            assert_eq!(c.status, Status::Fail, "{c:?}");
            assert!(c.detail.contains("home0 has no XDP program"), "{c:?}");
            assert!(
                c.fix
                    .as_deref()
                    .is_some_and(|f| f.contains("--xdp-mode generic")),
                "{c:?}"
            );
        }
        let served = veth(ALL, true, Some(false));
        let c = xdp_interface(&iface(Some(&served), XdpMode::Auto, &none));
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("native mode"), "{c:?}");
        let offload_on = veth(ALL, true, Some(true));
        let c = xdp_interface(&iface(Some(&offload_on), XdpMode::Auto, &none));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("ethtool -K home0 tx off"))
        );
        // Without the kernel's features, the peer's own attachment says it.
        let mut old_kernel = veth(0, true, Some(false));
        old_kernel.xdp_features = None;
        assert_eq!(
            xdp_interface(&iface(Some(&old_kernel), XdpMode::Native, &none)).status,
            Status::Pass
        );
        let mut unseen = veth(ALL, false, None);
        if let Some(p) = unseen.peer.as_mut() {
            p.view = None;
        }
        let c = xdp_interface(&iface(Some(&unseen), XdpMode::Auto, &none));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("namespace not found"), "{c:?}");

        // A NIC without native XDP: refused in native mode, generic under auto.
        let plain = nic(Some(0));
        let c = xdp_interface(&iface(Some(&plain), XdpMode::Native, &none));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("generic")));
        assert_eq!(
            xdp_interface(&iface(Some(&plain), XdpMode::Auto, &none)).status,
            Status::Warn
        );
        assert_eq!(
            xdp_interface(&iface(Some(&plain), XdpMode::Generic, &none)).status,
            Status::Pass
        );
        // With two interfaces a native NIC must redirect and take redirected frames.
        let basic_only = nic(Some(XdpFeatures::BASIC));
        let two = InterfaceFacts {
            interfaces: 2,
            ..iface(Some(&basic_only), XdpMode::Auto, &none)
        };
        let c = xdp_interface(&two);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("XDP_REDIRECT") && c.detail.contains("ndo_xdp_xmit"));
        assert_eq!(
            xdp_interface(&iface(Some(&basic_only), XdpMode::Auto, &none)).status,
            Status::Pass,
            "one interface: XDP_TX only"
        );
        let full = nic(Some(ALL));
        assert_eq!(
            xdp_interface(&InterfaceFacts {
                interfaces: 2,
                ..iface(Some(&full), XdpMode::Native, &none)
            })
            .status,
            Status::Pass
        );
        assert_eq!(
            xdp_interface(&iface(Some(&nic(None)), XdpMode::Auto, &none)).status,
            Status::Pass
        );
    }

    #[test]
    fn attached_programs_are_reported_never_replaced() {
        let programs: HashMap<u32, String> = [
            (40, relay_common::XDP_PROGRAM.to_owned()),
            (41, "xdp_firewall".to_owned()),
        ]
        .into();
        let mut link = veth(ALL, true, Some(false));
        link.xdp = vec![Attached {
            mode: AttachMode::Generic,
            prog_id: 41,
        }];
        // Someone else's program, no relay: homerelay could not attach.
        let c = xdp_interface(&iface(Some(&link), XdpMode::Auto, &programs));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("xdp_firewall (id 41)"), "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("ip link set dev r-home xdp off"))
        );
        // The running relay's program: reported with its mode.
        link.xdp[0].prog_id = 40;
        let running = InterfaceFacts {
            relay: Some(777),
            ..iface(Some(&link), XdpMode::Auto, &programs)
        };
        let c = xdp_interface(&running);
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(
            c.detail.contains(
                "homerelay_xdp (id 40) attached in generic mode by the running \
                               relay (pid 777)"
            ),
            "{c:?}"
        );
        // A running relay without its program here.
        link.xdp.clear();
        let c = xdp_interface(&InterfaceFacts {
            relay: Some(777),
            ..iface(Some(&link), XdpMode::Auto, &programs)
        });
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("relay's log")));
        // A relay's traps apply to what it runs: native on a veth whose peer has no program.
        link.xdp = vec![Attached {
            mode: AttachMode::Native,
            prog_id: 40,
        }];
        link.xdp_features = Some(XdpFeatures(BASIC));
        let c = xdp_interface(&InterfaceFacts {
            relay: Some(777),
            ..iface(Some(&link), XdpMode::Generic, &programs)
        });
        assert_eq!(c.status, Status::Fail, "{c:?}");
    }

    #[test]
    fn the_program_check_names_the_fix_for_each_failure() {
        use relay_user::xdp_probe::{ProbeRun, XDP_PASS, XDP_REDIRECT};
        let ok: Result<ProbeReport, ProbeError> = Ok(ProbeReport {
            verified_instructions: Some(2985),
            jitted: Some(true),
            memory: 20 << 20,
            runs: vec![ProbeRun {
                ingress: "eth0".into(),
                egress: "eth1".into(),
                forwarded: XDP_REDIRECT,
                unknown: XDP_PASS,
            }],
        });
        let c = xdp_program(
            &ProgramFacts::Probed {
                result: &ok,
                on_loopback: false,
            },
            "6.1.0",
        );
        assert_eq!(c.status, Status::Pass);
        assert!(c.detail.contains("eth0 → eth1 XDP_REDIRECT"), "{c:?}");
        let failed = |stage, errno, message: &str| {
            let r: Result<ProbeReport, ProbeError> = Err(ProbeError {
                stage,
                message: message.into(),
                errno,
            });
            xdp_program(
                &ProgramFacts::Probed {
                    result: &r,
                    on_loopback: false,
                },
                "5.4.0",
            )
        };
        let c = failed(
            ProbeStage::Maps,
            Some(libc::EPERM),
            "map HR_CHANNELS: EPERM",
        );
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("CAP_BPF") && f.contains("RLIMIT_MEMLOCK")),
            "{c:?}"
        );
        let log: String = (0..40).map(|i| format!("insn {i}\n")).collect();
        let c = failed(ProbeStage::Verify, Some(libc::EINVAL), &log);
        assert!(
            c.detail
                .contains("insn 0 / … / insn 37 / insn 38 / insn 39"),
            "{c:?}"
        );
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("5.11")));
        let c = failed(ProbeStage::BpfFs, Some(libc::EACCES), "mkdir");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.starts_with("run doctor as root"))
        );
        let c = failed(ProbeStage::BpfFs, Some(libc::ENODEV), "mount");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.starts_with("mount -t bpf bpf /sys/fs/bpf"))
        );
        let c = failed(ProbeStage::Forwarding, None, "UDP checksum wrong");
        assert!(c.detail.contains("UDP checksum wrong"));

        let pin = Path::new("/sys/fs/bpf/homerelay");
        let c = xdp_program(
            &ProgramFacts::Running {
                pid: 9,
                pin_dir: pin,
                attached: vec![(
                    "eth0".into(),
                    Attached {
                        mode: AttachMode::Native,
                        prog_id: 40,
                    },
                )],
            },
            "6.1.0",
        );
        assert_eq!(c.status, Status::Pass);
        assert!(c.detail.contains("eth0 (native, id 40)"), "{c:?}");
        let c = xdp_program(
            &ProgramFacts::Running {
                pid: 9,
                pin_dir: pin,
                attached: Vec::new(),
            },
            "6.1.0",
        );
        assert_eq!(c.status, Status::Fail);
    }
}
