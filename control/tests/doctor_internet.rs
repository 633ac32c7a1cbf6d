//! `homerelay doctor`'s checks of what the Internet sees of a site, with the real binary on a
//! host behind a real NAT (`relay_user::natlab`) and coturn's `turnserver` (RFC 5780, two
//! addresses) as the ITSP's STUN server outside: the server is reachable, the public address is
//! the NAT's, and the NAT type is right — a full cone passes, a symmetric NAT fails with its fix
//! and makes doctor exit 1. A STUN server that does not answer fails `stun.reachable`.
//!
//! Needs root (namespaces, nftables) and coturn (scripts/bootstrap.sh); fails loudly without
//! them. TEST-NET addresses only; the lab is removed on drop.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_core::stun::client::Change;
use relay_user::natlab::{
    INSIDE_ADDR, NatKind, NatLab, Node, PUBLIC_ADDR, SERVER_ADDR, SERVER_ADDR_2,
};
use serde_json::Value;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, nftables)"
    );
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// coturn as an RFC 5780 STUN server on both Outside addresses, ports 3478 and 3479.
fn turnserver(lab: &NatLab, dir: &Path) -> Proc {
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    // Debian's /etc/turnserver.conf turns RFC 5780 off: an empty file of our own instead.
    std::fs::write(dir.join("turnserver.conf"), "").expect("conf");
    let log = std::fs::File::create(dir.join("turnserver.log")).expect("log");
    let child = Command::new("ip")
        .args(["netns", "exec", lab.ns(Node::Outside), "turnserver"])
        .args(["-c", &path("turnserver.conf"), "--stun-only", "--no-auth"])
        .args(["--listening-ip", &SERVER_ADDR.to_string()])
        .args(["--listening-ip", &SERVER_ADDR_2.to_string()])
        .args(["--listening-port", "3478", "--alt-listening-port", "3479"])
        .args(["--no-cli", "--no-tcp", "--no-tls", "--no-dtls"])
        .args([
            "--db",
            &path("turndb"),
            "--pidfile",
            &path("turnserver.pid"),
        ])
        .args(["--log-file", "stdout"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("turnserver (Debian package coturn; scripts/bootstrap.sh)");
    let proc = Proc(child);
    // Ready when it answers a Binding request from its own namespace.
    let start = Instant::now();
    loop {
        let answered = lab
            .run_in(Node::Outside, || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let s = tokio::net::UdpSocket::bind((SERVER_ADDR, 0)).await.ok()?;
                    control::stun_client::binding(
                        &s,
                        (SERVER_ADDR, 3478).into(),
                        Change::NONE,
                        control::stun_client::Retransmit::QUICK,
                    )
                    .await
                    .ok()
                })
            })
            .expect("run in Outside");
        if answered.is_some() {
            return proc;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "turnserver never answered: {}",
            std::fs::read_to_string(dir.join("turnserver.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `homerelay doctor --json` on Inside with `server` as the ITSP's STUN server; its checks by
/// name and its exit code.
fn doctor(lab: &NatLab, dir: &Path, server: &str) -> (Vec<Value>, i32) {
    let config = dir.join("homerelay.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\ninternet_address = \"{INSIDE_ADDR}\"\n\n\
             [public_address]\nitsp_stun_server = \"{server}\"\n"
        ),
    )
    .expect("config");
    let out = Command::new("ip")
        .args(["netns", "exec", lab.ns(Node::Inside)])
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(["doctor", "--json", "--config"])
        .arg(&config)
        // No daemon runs: the API answers nothing, at once.
        .args(["--server", "http://127.0.0.1:9"])
        .output()
        .expect("run homerelay doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let checks: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        checks.as_array().expect("an array of checks").clone(),
        out.status.code().expect("an exit code"),
    )
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:#?}"))
}

#[test]
fn doctor_reports_the_stun_server_the_public_address_and_the_nat_type() {
    require_root();
    for kind in [NatKind::EndpointIndependent, NatKind::Symmetric] {
        let lab = NatLab::create(kind).expect("NAT lab");
        let dir = tempfile::tempdir().expect("dir");
        let _server = turnserver(&lab, dir.path());
        let (checks, code) = doctor(&lab, dir.path(), &format!("{SERVER_ADDR}:3478"));

        let reach = check(&checks, "stun.reachable");
        assert_eq!(reach["status"], "pass", "{reach}");
        let public = check(&checks, "public_address");
        assert_eq!(public["status"], "pass", "{public}");
        assert!(
            public["detail"]
                .as_str()
                .unwrap()
                .starts_with(&PUBLIC_ADDR.to_string()),
            "{public}"
        );
        let nat = check(&checks, "nat.type");
        match kind {
            NatKind::EndpointIndependent => {
                assert_eq!(nat["status"], "pass", "{nat}");
                assert!(
                    nat["detail"].as_str().unwrap().starts_with("full-cone"),
                    "{nat}"
                );
                let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
                assert!(failed.is_empty(), "nothing fails here: {failed:#?}");
                assert_eq!(code, 0);
            }
            _ => {
                assert_eq!(nat["status"], "fail", "{nat}");
                assert!(
                    nat["detail"].as_str().unwrap().starts_with("symmetric"),
                    "{nat}"
                );
                assert!(
                    nat["fix"].as_str().unwrap().contains("router-config"),
                    "{nat}"
                );
                assert_eq!(code, 1, "a failed check makes doctor exit 1");
            }
        }
    }
}

#[test]
fn a_stun_server_that_does_not_answer_fails_reachability() {
    require_root();
    let lab = NatLab::create(NatKind::EndpointIndependent).expect("NAT lab");
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens there.
    let (checks, code) = doctor(&lab, dir.path(), &format!("{SERVER_ADDR_2}:3999"));
    let reach = check(&checks, "stun.reachable");
    assert_eq!(reach["status"], "fail", "{reach}");
    assert!(
        reach["fix"].as_str().unwrap().contains("firewall"),
        "{reach}"
    );
    let public = check(&checks, "public_address");
    assert_eq!(public["status"], "fail", "{public}");
    assert_eq!(code, 1);
}
