//! `reg-load` end to end, briefly: every mode registers and unregisters phones over new
//! connections with zero failures, the report adds up, and the phones of `tls-resumed` resume
//! their TLS sessions. Correctness only — never a rate (BENCHMARKS.md has the numbers).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::process::Command;

#[test]
fn reg_load_runs_every_mode_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reg-load.json");
    let run = Command::new(env!("CARGO_BIN_EXE_reg-load"))
        .args([
            "--iterations",
            "4096",
            "--devices",
            "8",
            "--clients",
            "4",
            "--warmup",
            "0.5",
            "--duration",
            "1",
            "--rounds",
            "2",
            "--key",
            "ecdsa-p256",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "reg-load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 6, "2 rounds × 3 modes:\n{stdout}");
    for r in rounds {
        assert_eq!(r["errors"], serde_json::json!({}), "{r}");
        assert!(r["registrations"].as_u64().unwrap() > 0, "{r}");
        assert!(r["register"]["p99_us"].as_f64().unwrap() > 0.0, "{r}");
        let resumed = r["resumed_fraction"].as_f64().unwrap();
        match r["mode"].as_str().unwrap() {
            "tls" | "tcp" => assert_eq!(resumed, 0.0, "{r}"),
            // Each phone's first visit (in the warm-up) is a full handshake; later ones resume.
            "tls-resumed" => assert!(resumed > 0.0, "{r}"),
            other => panic!("unknown mode {other}"),
        }
    }
    let summary = report["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 3);
    for s in summary {
        assert_eq!(s["errors"].as_u64(), Some(0), "{s}");
    }
    assert_eq!(report["ratio_to_tcp"]["tcp"].as_f64(), Some(1.0));
}
