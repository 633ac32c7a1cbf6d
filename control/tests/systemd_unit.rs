//! The shipped systemd unit, `deploy/systemd/homerelay.service`: its sandbox is scored by
//! `systemd-analyze security --offline=true` and must stay at or below the threshold in
//! `deploy/systemd/security-threshold`; and it keeps the settings the daemon relies on (notify
//! readiness with a watchdog, a dedicated user, the state directory, the capability set).
//! Needs `systemd-analyze` (Debian's `systemd` package, installed by scripts/bootstrap.sh); no
//! root and no running systemd.
mod common;

use std::process::Command;

use common::unit;

/// `… Overall exposure level for homerelay.service: 1.7 OK 🙂` → 1.7.
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.split_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn threshold() -> f64 {
    let path = unit::deploy_dir().join("security-threshold");
    let text = std::fs::read_to_string(&path).expect("read deploy/systemd/security-threshold");
    let value = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("a number in security-threshold");
    value
        .parse()
        .unwrap_or_else(|_| panic!("not a number in {}: {value}", path.display()))
}

#[test]
fn the_exposure_score_parser_reads_systemd_analyze_output() {
    let report = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\n\
                  → Overall exposure level for homerelay.service: 1.7 OK 🙂\n";
    assert_eq!(overall_exposure(report), Some(1.7));
    assert_eq!(overall_exposure("no score here"), None);
}

#[test]
fn the_unit_scores_at_most_the_security_threshold() {
    let limit = threshold();
    assert!(
        limit <= 2.5,
        "the threshold {limit} is above 2.5: the unit must stay tightly sandboxed"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit::unit_path())
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("run systemd-analyze (Debian package systemd; scripts/bootstrap.sh installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze failed:\n{report}");
    let score = overall_exposure(&report)
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    assert!(
        score <= limit,
        "homerelay.service scores {score}, above the threshold {limit} in \
         deploy/systemd/security-threshold: the unit lost some hardening.\n{report}"
    );
}

#[test]
fn the_unit_runs_a_dedicated_user_with_notify_and_a_watchdog() {
    assert_eq!(unit::value("Type").as_deref(), Some("notify"));
    assert!(unit::value("WatchdogSec").is_some(), "WatchdogSec= is set");
    assert_eq!(unit::value("User").as_deref(), Some("homerelay"));
    assert_eq!(unit::value("DynamicUser"), None, "pins need a stable uid");
    assert_eq!(unit::value("StateDirectory").as_deref(), Some("homerelay"));
    assert_eq!(unit::value("NoNewPrivileges").as_deref(), Some("yes"));
    assert!(
        unit::words("Environment")
            .contains(&"HOMERELAY_STORE=/var/lib/homerelay/homerelay.db".into()),
        "the state database is in the state directory"
    );
    let sysusers = std::fs::read_to_string(unit::deploy_dir().join("homerelay.sysusers"))
        .expect("read deploy/systemd/homerelay.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", "homerelay"])),
        "homerelay.sysusers creates the user:\n{sysusers}"
    );
}

#[test]
fn the_unit_grants_exactly_the_capabilities_it_needs() {
    assert_eq!(
        unit::capabilities(),
        ["bpf", "net_admin", "perfmon"],
        "a change of the capability set must be justified in the unit and deploy/README.md, \
         and shown by control/tests/privileges.rs"
    );
}
