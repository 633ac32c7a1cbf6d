#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs every check and every test,
# the privileged data-plane tests (BPF, XDP, network namespaces) included. Needs root: those
# tests fail loudly without it rather than pass silently.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: run as root (sudo scripts/test.sh): the data-plane tests need BPF, XDP and network namespaces" >&2
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
