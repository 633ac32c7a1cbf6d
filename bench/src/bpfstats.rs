//! The XDP program's own cost, from the kernel's BPF run-time statistics
//! (`kernel.bpf_stats_enabled=1`, then `run_time_ns`/`run_cnt` from `bpftool prog show -j`).
//! Statistics cost two clock reads per program run, so they are enabled only for a dedicated
//! run, never for the throughput or CPU runs.
use anyhow::{Context, bail};
use relay_user::netns::{Host, Testbed};
use serde::Serialize;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Enables BPF run-time statistics; dropping it restores the previous setting.
#[derive(Debug)]
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> anyhow::Result<StatsEnabled> {
        let previous = std::fs::read_to_string(SYSCTL).context("reading bpf_stats_enabled")?;
        sysctl("1")?;
        Ok(StatsEnabled {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = sysctl(&self.previous) {
            eprintln!("warning: cannot restore kernel.bpf_stats_enabled: {e:#}");
        }
    }
}

fn sysctl(value: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("sysctl")
        .args(["-q", "-w", &format!("kernel.bpf_stats_enabled={value}")])
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl kernel.bpf_stats_enabled={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Ids of the XDP programs attached to `ifaces` inside `host`'s namespace.
pub fn xdp_prog_ids(tb: &Testbed, host: Host, ifaces: &[&str]) -> anyhow::Result<Vec<u32>> {
    let out = tb.exec(host, &["bpftool", "net", "show", "-j"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool net show")?;
    let mut ids = Vec::new();
    for entry in v.as_array().into_iter().flatten() {
        for x in entry
            .get("xdp")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            let dev = x.get("devname").and_then(|d| d.as_str()).unwrap_or("");
            if let (true, Some(id)) = (ifaces.contains(&dev), x.get("id").and_then(|i| i.as_u64()))
            {
                ids.push(id as u32);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Cumulative run time and run count of programs `ids`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgStats {
    pub fn read(ids: &[u32]) -> anyhow::Result<ProgStats> {
        let mut total = ProgStats::default();
        for id in ids {
            let out = std::process::Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string(), "-j"])
                .output()
                .context("running bpftool")?;
            if !out.status.success() {
                bail!(
                    "bpftool prog show id {id}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            total.run_time_ns += field("run_time_ns");
            total.run_cnt += field("run_cnt");
        }
        Ok(total)
    }

    /// Nanoseconds per program run between `self` and the later reading `end`.
    pub fn ns_per_run_until(&self, end: &ProgStats) -> Option<f64> {
        let runs = end.run_cnt.checked_sub(self.run_cnt)?;
        let ns = end.run_time_ns.checked_sub(self.run_time_ns)?;
        (runs > 0).then(|| ns as f64 / runs as f64)
    }
}
