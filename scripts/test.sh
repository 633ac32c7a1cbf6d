#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs every check and every test,
# the privileged data-plane tests (BPF, XDP, network namespaces) included. Needs root: those
# tests fail loudly without it rather than pass silently.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  # A root shell needs no sudo (a fresh Debian image has none); a user account with sudo
  # re-runs this script through it.
  if command -v sudo >/dev/null 2>&1; then exec sudo -E "$0" "$@"; fi
  echo "test.sh: run as root: the data-plane tests need BPF, XDP and network namespaces" >&2
  exit 1
fi
./scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never

echo "== rustfmt"
cargo fmt --all --check
echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== tests"
cargo test --locked --no-fail-fast 2>&1
