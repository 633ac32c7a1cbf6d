//! Clocks, CPU pinning and CPU accounting.
//!
//! Two views of the CPU a run costs, both over the sender's measurement window:
//! - per-core busy time, `wall - (idle + iowait)` from `/proc/stat` (on these machines the
//!   user/system/softirq split of the ticks is unreliable, the idle total is not) — the whole
//!   machine, so anything else running on it counts too;
//! - the run's own CPU: every thread of this process plus the `ksoftirqd` threads, from
//!   `/proc/<tid>/schedstat` (scheduler nanoseconds). Softirq work (XDP, forwarding on veth)
//!   is charged to the thread it interrupts, which here is almost always one of ours, so this
//!   view stays usable when other work shares the machine.
use anyhow::{Context, bail};
use serde::Serialize;

/// `CLOCK_MONOTONIC` in nanoseconds (the clock embedded in every probe).
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_REALTIME` in nanoseconds (the clock of AF_PACKET ring timestamps).
pub fn real_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `CLOCK_MONOTONIC` reaches `deadline_ns`.
pub fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with
    // TIMER_ABSTIME. An interrupted sleep just returns early, which callers tolerate.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// Makes timer wake-ups of the calling thread precise (1 ns slack instead of 50 µs), so a
/// paced sender is not bursty.
pub fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Pins the calling thread to `core` (threads it creates afterwards inherit the mask).
pub fn pin_to(core: usize) -> anyhow::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes within it (core is
    // bounds-checked against CPU_SETSIZE below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if core >= libc::CPU_SETSIZE as usize {
        bail!("core {core} out of range");
    }
    // SAFETY: see above.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 = the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pinning to core {core}"));
    }
    Ok(())
}

/// Number of online cores.
pub fn online_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One `/proc/stat` reading: per-core idle+iowait in clock ticks, at a `CLOCK_MONOTONIC` time.
#[derive(Clone, Debug)]
pub struct CpuSample {
    at_ns: u64,
    idle_ticks: Vec<u64>,
}

/// Busy time over a window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuBusy {
    pub window_s: f64,
    /// Busy fraction of each core (0..1).
    pub per_core: Vec<f64>,
    /// Sum over cores, in cores (0..=number of cores).
    pub total_cores: f64,
}

impl CpuSample {
    pub fn read() -> anyhow::Result<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let at_ns = mono_ns();
        let mut idle_ticks = Vec::new();
        for line in stat.lines() {
            let mut f = line.split_ascii_whitespace();
            let Some(name) = f.next() else { continue };
            if name == "cpu" || !name.starts_with("cpu") {
                continue;
            }
            // user nice system idle iowait ...
            let v: Vec<u64> = f.take(5).map(|x| x.parse().unwrap_or(0)).collect();
            if v.len() < 5 {
                bail!("unexpected /proc/stat line: {line}");
            }
            idle_ticks.push(v[3] + v[4]);
        }
        Ok(CpuSample { at_ns, idle_ticks })
    }

    /// Busy time per core between `self` and the later sample `end`.
    pub fn busy_until(&self, end: &CpuSample) -> CpuBusy {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let window_s = end.at_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        let per_core: Vec<f64> = self
            .idle_ticks
            .iter()
            .zip(&end.idle_ticks)
            .map(|(a, b)| {
                let idle_s = b.saturating_sub(*a) as f64 / hz;
                if window_s > 0.0 {
                    ((window_s - idle_s) / window_s).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let total_cores = per_core.iter().sum();
        CpuBusy {
            window_s,
            per_core,
            total_cores,
        }
    }
}

/// Nanoseconds thread `tid` of this process has run.
pub fn thread_cpu_ns(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    s.split_ascii_whitespace().next()?.parse().ok()
}

/// Every thread of this process with its CPU nanoseconds so far.
pub fn all_threads_cpu_ns() -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|tid| Some((tid, thread_cpu_ns(tid)?)))
        .collect()
}

/// Nanoseconds task `pid` (any process's thread) has run.
pub fn task_cpu_ns(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_ascii_whitespace().next()?.parse().ok()
}

/// The kernel's softirq threads (`ksoftirqd/N`): network work the kernel defers to them is
/// part of a data path's cost but runs outside this process.
pub fn ksoftirqd_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM ask the run to stop (so namespaces, XDP programs, pinned maps and
/// the `bpf_stats` sysctl are cleaned up on the normal path); a second signal kills at once.
pub fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only does an atomic store.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Raises the open-file limit to its hard maximum (thousands of relay sockets).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill in / read from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_has_one_entry_per_core() {
        let a = CpuSample::read().unwrap();
        assert_eq!(a.idle_ticks.len(), online_cores());
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = CpuSample::read().unwrap();
        let busy = a.busy_until(&b);
        assert!(busy.window_s > 0.02);
        assert!(busy.per_core.iter().all(|c| (0.0..=1.0).contains(c)));
        assert!(thread_cpu_ns(gettid()).is_some());
    }
}
