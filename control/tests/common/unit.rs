//! The shipped systemd unit, `deploy/systemd/homerelay.service`, read as tests need it: the
//! values of a key (every line of it, space-separated lists split), and its capabilities in the
//! spelling `setpriv(1)` takes, so privileged tests run the daemon with exactly the unit's set.
use std::path::PathBuf;

/// `deploy/systemd` in the repository.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// The unit file's path.
pub fn unit_path() -> PathBuf {
    deploy_dir().join("homerelay.service")
}

/// Every `key=value` line of the unit's `[Service]` section, in order.
pub fn service_entries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(unit_path()).expect("read the unit file");
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        if section != "[Service]" {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

/// The values of `key` in `[Service]`, each line's space-separated words together.
pub fn words(key: &str) -> Vec<String> {
    service_entries()
        .into_iter()
        .filter(|(k, _)| k == key)
        .flat_map(|(_, v)| {
            v.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<String>>()
        })
        .collect()
}

/// The single value of `key` in `[Service]`.
pub fn value(key: &str) -> Option<String> {
    service_entries()
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// `CAP_BPF CAP_NET_ADMIN` → `["bpf", "net_admin"]`, sorted.
pub fn setpriv_caps(caps: &[String]) -> Vec<String> {
    let mut out: Vec<String> = caps
        .iter()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("not a capability name: {c}"))
                .to_ascii_lowercase()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The unit's ambient capabilities, which must equal its bounding set (setpriv spelling).
pub fn capabilities() -> Vec<String> {
    let ambient = setpriv_caps(&words("AmbientCapabilities"));
    let bounding = setpriv_caps(&words("CapabilityBoundingSet"));
    assert_eq!(
        ambient,
        bounding,
        "AmbientCapabilities= and CapabilityBoundingSet= differ in {}",
        unit_path().display()
    );
    ambient
}
