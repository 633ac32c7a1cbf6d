#!/usr/bin/env bash
# The README's run command: installs what is missing, builds the relay (the XDP object
# included) and starts it with its built-in default configuration. Extra arguments go to
# `homerelay run` (see `homerelay run --help`), e.g. `--xdp-iface eth0`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  # A root shell needs no sudo (a fresh Debian image has none); a user account with sudo
  # re-runs this script through it.
  if command -v sudo >/dev/null 2>&1; then exec sudo -E "$0" "$@"; fi
  echo "run.sh: run as root: installing the toolchain and loading XDP need it" >&2
  exit 1
fi
./scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release -p control
exec ./target/release/homerelay run "$@"
