//! `homerelay demo`, run as a newcomer would: the built binary, as root. Checks what its output
//! claims (each home phone registered through the NAT, no channel before it did, its channel an
//! internet call; the channel reached the fast path, the relay latched the NAT's translated
//! address, no packet was lost either way; the phones unregistered), asks the running demo's
//! daemon itself (`homerelay devices list`, `homerelay channels list` in the demo's relay
//! namespace) whether the phones are registered from outside and their channels are internet
//! calls, and checks that it leaves nothing behind — no namespace, no pinned maps, no
//! configuration file — also when interrupted with Ctrl-C (SIGINT). Needs root and fails loudly
//! without it. No timing assertions; a hang guard only.
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous bound on a whole demo run: reached only when something hangs.
const HANG_GUARD: Duration = Duration::from_secs(180);
/// The NAT router's public address (the source the relay sees for the home phones), its
/// masquerade's port range, and the home phones' own (private) address.
const NAT_PUBLIC: &str = "198.51.100.130";
const NAT_PORTS: std::ops::RangeInclusive<u16> = 40000..=49999;
const HOME_PHONE: &str = "203.0.113.10";
/// Internal number of call 1's home phone; call `i` has this + i - 1.
const FIRST_NUMBER: usize = 4711;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, XDP, BPF); run the README's test command as root"
    );
}

fn demo(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_homerelay"));
    c.arg("demo")
        .args(args)
        .env_remove("HOMERELAY_CONFIG")
        .env_remove("HOMERELAY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A running demo whose stdout lines arrive on `lines` and whose stderr is collected.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(mut c: Command) -> Running {
        let mut child = c.spawn().expect("start homerelay demo");
        let out = child.stdout.take().expect("stdout piped");
        let mut err = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// Collects stdout until `pred` matches a line; `false` if the output ended first.
    fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + HANG_GUARD;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.stdout.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }

    /// Waits for the process to exit; returns its status, all of stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + HANG_GUARD;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "homerelay demo did not finish within {HANG_GUARD:?}:\n{}",
                    self.stdout.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.stdout.extend(self.lines.iter());
        let stderr = self.stderr.join().unwrap_or_default();
        (status, self.stdout.join("\n"), stderr)
    }
}

/// Asserts that the demo with `pid` left no namespace, pin directory or configuration file.
fn assert_nothing_left(pid: u32) {
    let prefix = format!("hr-{pid}-");
    let left: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let pins = format!("/sys/fs/bpf/homerelay-demo-{pid}");
    assert!(!std::path::Path::new(&pins).exists(), "{pins} left behind");
    let config = std::env::temp_dir().join(format!("homerelay-demo-{pid}.toml"));
    assert!(!config.exists(), "{} left behind", config.display());
}

/// The number right before `word` in `line` (`"152 sent, 0 lost"`, `"lost"` → 0).
fn number_before(line: &str, word: &str) -> u64 {
    let head = line
        .split(&format!(" {word}"))
        .next()
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    let digits: String = head
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before {word:?} in {line:?}"))
}

/// Ports of every `198.51.100.130:PORT` in `out` (the NAT's public address).
fn nat_ports(out: &str) -> Vec<u16> {
    out.split("198.51.100.130:")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// A line of the live table: it starts with the elapsed time, `3s`.
fn is_live_row(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .and_then(|t| t.strip_suffix('s'))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Internal number of call `call`'s home phone (calls count from 1).
fn phone(call: usize) -> String {
    (FIRST_NUMBER + call - 1).to_string()
}

/// The home phone's own media address in call `call`: 5004, 5006... on its private address.
fn announced(call: usize) -> String {
    format!("{HOME_PHONE}:{}", 5004 + 2 * (call - 1))
}

/// The channel the demo says it allocated for call `call` (`Call 1: Allocate (kind
/// system_device, device 4711) → channel 30612 (...), an internet call.`), checking the line
/// names the call's phone and an internet call.
fn allocated_port(out: &str, call: usize) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("Call {call}: Allocate (")))
        .unwrap_or_else(|| panic!("no Allocate line for call {call}:\n{out}"));
    assert!(
        line.contains(&format!("device {})", phone(call))),
        "the channel is allocated for the registered phone: {line}"
    );
    assert!(line.ends_with(", an internet call."), "{line}");
    let after = line
        .split("→ channel ")
        .nth(1)
        .unwrap_or_else(|| panic!("no channel in {line:?}"));
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port in {line:?}"))
}

/// What the output says about the remote phones: created, refused a channel before they
/// registered, registered through the NAT from outside, a channel each for the device as an
/// internet call, unregistered cleanly at the end.
fn check_registration_output(out: &str, calls: usize) {
    let lines: Vec<&str> = out.lines().collect();
    let refused: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("before it registered → refused"))
        .collect();
    assert_eq!(refused.len(), 1, "one refused Allocate is shown:\n{out}");
    assert!(
        refused[0].contains(&format!("Allocate for phone {} ", phone(1)))
            && refused[0].contains("not registered")
            && refused[0].contains("FailedPrecondition"),
        "the relay refuses a channel for an unregistered phone: {}",
        refused[0]
    );
    assert!(!out.contains("ended early"), "{out}");
    for call in 1..=calls {
        let number = phone(call);
        assert!(
            lines.iter().any(|l| {
                l.trim_start()
                    .starts_with(&format!("CreateDevice {number} (OpenStage HFA, "))
                    && l.ends_with("password strong, internet registration on")
            }),
            "phone {number} created with a strong password and internet registration:\n{out}"
        );
        let at = lines
            .iter()
            .position(|l| {
                l.trim_start()
                    .starts_with(&format!("phone {number} registered over TCP: "))
            })
            .unwrap_or_else(|| panic!("phone {number} never registered:\n{out}"));
        assert!(
            lines[at].contains(&format!("the relay sees it at {NAT_PUBLIC}:")),
            "registered through the NAT: {}",
            lines[at]
        );
        let next = lines.get(at + 1).copied().unwrap_or_default();
        assert!(
            next.contains(&format!("(it announced {})", announced(call)))
                && next.contains("external, so its calls are internet calls"),
            "registered from outside: {next}"
        );
        allocated_port(out, call);
        assert!(
            lines.iter().any(|l| l.contains(&format!(
                "(phone {number}, internet call): home phone latched at"
            ))),
            "the summary names the phone and the internet call:\n{out}"
        );
        assert!(
            lines.iter().any(|l| *l
                == format!(
                    "Phone {number} unregistered; it stayed registered throughout its call."
                )),
            "phone {number} unregistered cleanly:\n{out}"
        );
    }
}

/// `homerelay ARGS --json` against the demo's daemon: in the demo's relay namespace, where
/// the daemon's API listens on loopback.
fn ask_daemon(relay_ns: &str, args: &[&str]) -> serde_json::Value {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", relay_ns])
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(args)
        .args(["--json", "--server", "http://127.0.0.1:4080"])
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOMERELAY_") {
            c.env_remove(key);
        }
    }
    let o = c.output().expect("run the homerelay CLI");
    assert!(
        o.status.success(),
        "homerelay {args:?} in {relay_ns}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "homerelay {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// The running demo's daemon, asked while the phones talk (`out`: the demo's output so far):
/// each phone is registered over TCP from outside at the NAT's public address, announcing its
/// private one; each channel is an internet call on the port the demo allocated for the phone.
fn check_daemon(out: &str, calls: usize) {
    let prefix = out
        .lines()
        .find_map(|l| l.strip_prefix("Created network namespaces "))
        .and_then(|rest| rest.split('{').next())
        .unwrap_or_else(|| panic!("the demo names its namespaces:\n{out}"));
    let relay_ns = format!("{prefix}relay");

    let devices = ask_daemon(&relay_ns, &["devices", "list"]);
    let devices = devices.as_array().expect("a list of devices");
    assert_eq!(
        devices.len(),
        calls,
        "one device per home phone: {devices:?}"
    );
    for (i, d) in devices.iter().enumerate() {
        let call = i + 1;
        assert_eq!(d["number"], phone(call), "{d}");
        assert_eq!(d["type"], "openstage_hfa", "{d}");
        assert_eq!(d["authentication"], true, "{d}");
        assert_eq!(d["internet_registration"], true, "{d}");
        assert_eq!(d["weak_password"], serde_json::json!([]), "{d}");
        let r = &d["registration"];
        assert_eq!(r["transport"], "tcp", "registered: {d}");
        assert_eq!(r["external"], true, "from outside the office: {d}");
        assert_eq!(r["local_address"], announced(call), "{d}");
        let public: std::net::SocketAddr = r["public_address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("a public address: {d}"));
        assert_eq!(public.ip().to_string(), NAT_PUBLIC, "{d}");
        assert!(NAT_PORTS.contains(&public.port()), "{d}");
        assert!(
            out.contains(&format!("the relay sees it at {public},")),
            "the demo shows the mapping the registry holds ({public}):\n{out}"
        );
    }

    let channels = ask_daemon(&relay_ns, &["channels", "list"]);
    let channels = channels.as_array().expect("a list of channels");
    assert_eq!(channels.len(), calls, "one channel per call: {channels:?}");
    for call in 1..=calls {
        let port = allocated_port(out, call);
        let c = channels
            .iter()
            .find(|c| c["port"] == port)
            .unwrap_or_else(|| panic!("no channel {port} for call {call}: {channels:?}"));
        assert_eq!(c["call_id"], format!("demo-call-{call}"), "{c}");
        assert_eq!(c["kind"], "system_device", "{c}");
        assert_eq!(c["internet"], true, "an internet call: {c}");
    }
}

/// The checks every successful run must pass, for `calls` calls.
fn check_output(out: &str, calls: usize) {
    check_registration_output(out, calls);
    // Live rows show the state the API reports, and the summary says each channel got there.
    assert!(
        out.lines()
            .any(|l| is_live_row(l) && l.contains("FAST_PATH")),
        "no live row in state FAST_PATH:\n{out}"
    );
    let reached = out
        .lines()
        .filter(|l| l.ends_with("reached FAST_PATH"))
        .count();
    assert_eq!(
        reached, calls,
        "every channel reaches the fast path:\n{out}"
    );

    // The relay latched the NAT's translated address and port, never the private one.
    let latched: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("home phone latched at"))
        .collect();
    assert_eq!(latched.len(), calls, "{out}");
    for line in latched {
        assert!(
            line.contains("latched at 198.51.100.130:"),
            "not the NAT's address: {line}"
        );
    }
    let ports = nat_ports(out);
    assert!(!ports.is_empty(), "{out}");
    for port in ports {
        assert!(
            (40000..=49999).contains(&port),
            "port {port} is outside the NAT's masquerade range:\n{out}"
        );
    }

    // Zero loss both ways: the office phone starts once it hears the home phone, so not even
    // the packets before the latch may go missing.
    for direction in ["home → office:", "office → home:"] {
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.trim_start().starts_with(direction))
            .collect();
        assert_eq!(lines.len(), calls, "{direction} lines:\n{out}");
        for line in lines {
            assert!(number_before(line, "sent") > 0, "{line}");
            assert_eq!(number_before(line, "lost"), 0, "{line}");
            assert_eq!(
                number_before(line, "received"),
                number_before(line, "sent"),
                "{line}"
            );
        }
    }
    assert!(out.contains("total: "), "{out}");
    assert!(out.contains(" 0 lost (0.00 %)"), "{out}");
    assert!(
        out.contains("Cleaned up: daemon stopped by SIGTERM"),
        "{out}"
    );
}

fn run_and_check(args: &[&str], calls: usize) {
    require_root();
    let mut running = Running::start(demo(args));
    let pid = running.child.id();
    // While the phones talk: what the daemon itself holds. A failed check still lets the demo
    // finish and clean up before the test fails.
    let live = running.wait_for_line(is_live_row);
    let so_far = running.stdout.join("\n");
    let daemon_checked = live.then(|| std::panic::catch_unwind(|| check_daemon(&so_far, calls)));
    let (status, out, err) = running.finish();
    if let Some(Err(failed)) = daemon_checked {
        std::panic::resume_unwind(failed);
    }
    assert!(
        status.success(),
        "homerelay demo {args:?} failed ({status}):\n{out}\n--- stderr ---\n{err}"
    );
    check_output(&out, calls);
    assert_nothing_left(pid);
}

#[test]
fn demo_in_generic_mode() {
    run_and_check(&["--seconds", "3", "--xdp-mode", "generic"], 1);
}

#[test]
fn demo_in_native_mode_with_two_calls() {
    run_and_check(
        &["--seconds", "3", "--xdp-mode", "native", "--calls", "2"],
        2,
    );
}

#[test]
fn ctrl_c_during_the_demo_still_cleans_up() {
    require_root();
    let mut running = Running::start(demo(&["--seconds", "60"]));
    let pid = running.child.id();
    let live = running.wait_for_line(is_live_row);
    // SAFETY: kill has no memory preconditions; `pid` is our child, not reaped yet.
    unsafe { libc::kill(libc::pid_t::try_from(pid).expect("pid"), libc::SIGINT) };
    let (status, out, err) = running.finish();
    assert!(live, "no live row before the output ended:\n{out}\n{err}");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGINT),
        "an interrupted demo exits as SIGINT would have ended it:\n{out}"
    );
    assert!(out.contains("The demo stopped: interrupted"), "{out}");
    assert!(
        out.contains("Released channel"),
        "released over gRPC:\n{out}"
    );
    assert!(
        out.contains(&format!("Phone {} unregistered", phone(1))),
        "the phone unregisters before the daemon stops:\n{out}"
    );
    assert!(
        out.contains("Cleaned up: daemon stopped by SIGTERM"),
        "{out}\n{err}"
    );
    assert_nothing_left(pid);
}

#[test]
fn demo_needs_root_and_says_so() {
    require_root();
    let mut c = demo(&["--seconds", "1"]);
    c.uid(65534).gid(65534);
    let (pid, status, out, err) = {
        let running = Running::start(c);
        let pid = running.child.id();
        let (status, out, err) = running.finish();
        (pid, status, out, err)
    };
    assert!(!status.success(), "{out}");
    assert!(err.contains("homerelay demo needs root"), "{err}");
    assert!(out.is_empty(), "nothing happens without root: {out}");
    assert_nothing_left(pid);
}
