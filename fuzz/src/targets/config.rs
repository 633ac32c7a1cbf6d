//! The configuration file (`Config::from_toml`) on arbitrary text: the commented example
//! (`deploy/homerelay.toml`) mutated, files assembled from the real sections, keys and
//! boundary values, and plain bytes. Never a panic; an error names `(file)` or a key path made
//! of the configuration's own section and key names (`relay.ports`, `xdp.interfaces[1]`).
use control::config::Config;

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "config",
    run,
    seeds,
};

const SECTIONS: &[&str] = &[
    "relay",
    "xdp",
    "pool",
    "api",
    "api.tls",
    "events",
    "metrics",
    "store",
    "devices",
    "registration",
    "stun",
    "public_address",
];
/// Every key the configuration has (sections included: a whole section can be mistyped).
const KEYS: &[&str] = &[
    "relay",
    "xdp",
    "pool",
    "api",
    "tls",
    "events",
    "metrics",
    "store",
    "layout",
    "ports",
    "capacity",
    "workers",
    "internet_address",
    "lan_address",
    "allow_local_peers",
    "devices",
    "registration",
    "stun",
    "other_address",
    "rate_per_source",
    "burst_per_source",
    "max_sources",
    "tls_listen",
    "tls_cert",
    "tls_key",
    "https_listen",
    "lockout_device_failures",
    "lockout_source_failures",
    "lockout_first",
    "lockout_max",
    "firmware_minimums",
    "openstage_hfa",
    "internal_networks",
    "password_iterations",
    "min_password_length",
    "interfaces",
    "mode",
    "pin_dir",
    "require",
    "upstream_kbps",
    "codec",
    "quarantine",
    "media_timeout",
    "listen",
    "require_auth",
    "token_file",
    "cert",
    "key",
    "client_ca",
    "buffer",
    "enabled",
    "path",
    "public_address",
    "itsp_stun_server",
    "stun_server",
    "refresh",
    "local_address",
    "static_address",
];
const VALUES: &[&str] = &[
    "\"s\"",
    "\"x\"",
    "\"custom\"",
    "\"20000-29999\"",
    "\"30001-30000\"",
    "\"0-65535\"",
    "\"1024-1025\"",
    "0",
    "1",
    "-1",
    "1025",
    "4294967296",
    "99999999999999999999",
    "1e400",
    "nan",
    "true",
    "\"\"",
    "\"10s\"",
    "\"0s\"",
    "\"100000h\"",
    "\"1.2.3.4\"",
    "\"::1\"",
    "\"127.0.0.1:4080\"",
    "\"0.0.0.0:4080\"",
    "\"0.0.0.0:8802\"",
    "\"127.0.0.1:9464\"",
    "[]",
    "[\"eth0\"]",
    "[\"eth0\", \"eth0\"]",
    "[\"a-very-long-interface-name\"]",
    "[1, \"x\"]",
    "{}",
    "{ x = 1 }",
    "\"g711\"",
    "\"opus\"",
    "\"auto\"",
    "\"native\"",
    "\"/nonexistent\"",
    "1979-05-27T07:32:00Z",
    "\"stun.example.net:3478\"",
    "\"[2001:db8::1]:3478\"",
    "\"500ms\"",
];

fn assembled(i: &mut Input) -> String {
    let mut text = String::new();
    for _ in 0..i.below(24) {
        match i.below(5) {
            0 => {
                let s = i.pick(SECTIONS);
                text.push_str(&format!("[{s}]\n"));
            }
            1 => {
                let s = i.pick(SECTIONS);
                let k = i.pick(KEYS);
                let v = i.pick(VALUES);
                text.push_str(&format!("{s}.{k} = {v}\n"));
            }
            _ => {
                let k = i.pick(KEYS);
                let v = i.pick(VALUES);
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
    text
}

fn check_key(key: &str, text: &str) {
    if key == "(file)" {
        return;
    }
    let segs: Vec<&str> = key.split('.').collect();
    for (n, seg) in segs.iter().enumerate() {
        // `interfaces[1]`: a list element.
        let name = seg.split('[').next().unwrap_or(seg);
        let index_ok = seg[name.len()..].split_terminator(']').all(|ix| {
            ix.strip_prefix('[')
                .is_some_and(|n| n.parse::<usize>().is_ok())
        });
        // The last one may be a key the file has and the configuration does not know.
        let written = n + 1 == segs.len() && !name.is_empty() && text.contains(name);
        assert!(
            (KEYS.contains(&name) || written) && index_ok,
            "error key {key:?} is not a configuration key (text {text:?})"
        );
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let text = match i.below(3) {
        0 => assembled(&mut i),
        _ => String::from_utf8_lossy(i.rest()).into_owned(),
    };
    if let Err(e) = Config::from_toml(&text) {
        assert!(!e.message.is_empty(), "empty message for {:?}", e.key);
        check_key(&e.key, &text);
        assert_eq!(e.to_string(), format!("{}: {}", e.key, e.message));
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let example = include_str!("../../../deploy/homerelay.toml");
    let mut raw = vec![1u8, 0];
    raw.extend_from_slice(example.as_bytes());
    let mut minimal = vec![1u8, 0];
    minimal.extend_from_slice(b"[relay]\nports = \"30000-30100\"\ncapacity = 10\n[xdp]\ninterfaces = [\"eth0\"]\nrequire = true\n");
    vec![
        raw,
        minimal,
        vec![0, 0, 20, 0, 1, 0, 3, 0, 0, 0, 9, 0, 4, 0],
    ]
}
