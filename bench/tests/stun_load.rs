//! `stun-load` end to end, briefly: the real daemon (`homerelay run` with `[stun]`, built here
//! by the cargo running this test) and coturn's `turnserver --stun-only` (Debian package
//! coturn, installed by scripts/bootstrap.sh), both profiles, every answer checked by the
//! generator (transaction id, XOR-MAPPED-ADDRESS = the request's source) and none invalid.
//! Correctness only — never a rate (BENCHMARKS.md has the numbers). Needs root for the
//! many-sources profile (sockets bound to `lo`), as the other privileged tests.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::path::PathBuf;
use std::process::Command;

/// The `homerelay` binary of this build profile, built if it is missing or stale (it belongs
/// to another package, so cargo does not build it for this test by itself).
fn homerelay() -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "--package",
            "control",
            "--bin",
            "homerelay",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    let out = cargo.output().unwrap();
    assert!(
        out.status.success(),
        "cargo build -p control --bin homerelay failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "homerelay")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the homerelay executable")
}

#[test]
fn stun_load_gets_only_valid_answers_from_homerelay_and_coturn() {
    let homerelay = homerelay();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stun-load.json");
    let run = Command::new(env!("CARGO_BIN_EXE_stun-load"))
        .args([
            "--rounds",
            "1",
            "--warmup",
            "0.2",
            "--duration",
            "0.5",
            "--sockets",
            "2",
            "--outstanding",
            "4",
            "--sources",
            "500",
            "--homerelay",
        ])
        .arg(&homerelay)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "stun-load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "2 profiles × 2 servers:\n{stdout}");
    for r in rounds {
        assert_eq!(r["invalid"], serde_json::json!({}), "{r}");
        assert!(r["responses"].as_u64().unwrap() > 0, "{r}");
        if r["server"] == "homerelay" {
            // A bare 20-byte Binding gets XOR-MAPPED-ADDRESS, SOFTWARE and FINGERPRINT.
            assert_eq!(r["mean_response_bytes"].as_f64(), Some(56.0), "{r}");
        }
    }
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 4, "each server started once per profile");
    for s in servers {
        assert!(!s["threads"].as_object().unwrap().is_empty(), "{s}");
    }
    assert_eq!(report["ratios"].as_array().unwrap().len(), 2);
    for s in report["summary"].as_array().unwrap() {
        assert_eq!(s["invalid"].as_u64(), Some(0), "{s}");
    }
}
