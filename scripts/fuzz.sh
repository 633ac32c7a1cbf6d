#!/usr/bin/env bash
# The long fuzz run (docs/testing.md): every fuzz target of `fuzz/` (and the registration
# targets in relay-core/tests/register_fuzz.rs, the STUN path's in stun_props.rs and stun_client_props.rs) with HOMERELAY_FUZZ_CASES
# cases each, and the XDP/user-space differential test with HOMERELAY_DIFF_ROUNDS rounds of
# HOMERELAY_DIFF_FRAMES frames, from one seed (HOMERELAY_FUZZ_SEED, printed; a failure names
# it, and the same seed reproduces it). The differential test needs root (BPF_PROG_TEST_RUN,
# network namespaces). `cargo test` runs the same targets briefly from a fixed seed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_INCREMENTAL=0
export HOMERELAY_FUZZ_CASES="${HOMERELAY_FUZZ_CASES:-300000}"
export HOMERELAY_FUZZ_SEED="${HOMERELAY_FUZZ_SEED:-$(date +%s)}"
export HOMERELAY_DIFF_ROUNDS="${HOMERELAY_DIFF_ROUNDS:-200}"
export HOMERELAY_DIFF_FRAMES="${HOMERELAY_DIFF_FRAMES:-500}"
export HOMERELAY_DIFF_SEED="${HOMERELAY_DIFF_SEED:-$HOMERELAY_FUZZ_SEED}"
echo "fuzz.sh: seed $HOMERELAY_FUZZ_SEED, $HOMERELAY_FUZZ_CASES cases per target," \
  "$HOMERELAY_DIFF_ROUNDS x $HOMERELAY_DIFF_FRAMES differential frames" >&2
start=$(date +%s)
cargo test --locked -p homerelay-fuzz --test targets -- --nocapture --test-threads 2
cargo test --locked -p relay-core --test register_fuzz -- --nocapture --test-threads 2
cargo test --locked -p relay-core --test stun_props -- --nocapture --test-threads 2
cargo test --locked -p relay-core --test stun_client_props -- --nocapture --test-threads 2
cargo test --locked -p relay-user --test xdp_differential -- --nocapture --test-threads 1
echo "fuzz.sh: done in $(( $(date +%s) - start )) s" >&2
