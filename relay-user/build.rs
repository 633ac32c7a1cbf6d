//! Builds the XDP program (`relay-ebpf`) for `bpfel-unknown-none` and places the object in
//! `OUT_DIR`, where `xdp.rs` embeds it.
//!
//! The eBPF crate needs `-Z build-std=core` from a compiler that matches its `core` source
//! exactly: Debian's rustc 1.96 with `rust-web-src`, linked into rustup as `homerelay-bpf` by
//! `scripts/bootstrap.sh`, plus bpf-linker in `$HOMERELAY_TOOLS/bin` (default
//! `/opt/homerelay-tools`). See docs/toolchain.md.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const TOOLCHAIN: &str = "homerelay-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=HOMERELAY_TOOLS");
    let tools = PathBuf::from(
        env::var_os("HOMERELAY_TOOLS").unwrap_or_else(|| "/opt/homerelay-tools".into()),
    );
    let linker = tools.join("bin").join("bpf-linker");
    if !linker.exists() && env::var_os("AYA_BUILD_SKIP").is_none() {
        return Err(anyhow!(
            "{} not found: run scripts/bootstrap.sh (as root) to install the eBPF toolchain",
            linker.display()
        ));
    }
    // The child cargo inherits this process's environment: put bpf-linker on PATH and allow
    // `-Z build-std` on the stable Debian compiler.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.join("bin")];
    paths.extend(env::split_paths(&path));
    let path = env::join_paths(paths).context("PATH")?;
    // SAFETY: build scripts are single-threaded at this point; nothing else reads the
    // environment concurrently.
    unsafe {
        env::set_var("PATH", path);
        env::set_var("RUSTC_BOOTSTRAP", "1");
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest
        .parent()
        .context("workspace root")?
        .join("relay-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed=../relay-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "relay-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(TOOLCHAIN),
    )
}
