//! homerelay's fuzz targets: each is a plain function over `&[u8]` that decodes its input into
//! a case (a channel and packets, a request, a configuration text, an operation sequence...),
//! runs the code under test and **panics** when a property fails. A target never panics on any
//! input unless the code under test is wrong.
//!
//! The engine is [`run`]: random inputs and mutations of each target's seed inputs, from a
//! fixed seed, for a budget of cases (proptest, so a failure is shrunk to a small input and
//! printed). `cargo test` runs every target briefly (`tests/targets.rs`); `scripts/fuzz.sh`
//! runs them at length (`HOMERELAY_FUZZ_CASES`, `HOMERELAY_FUZZ_SEED`). See docs/testing.md.
//!
//! Why not libFuzzer (`cargo fuzz`): it needs a nightly compiler with the sanitizer runtimes.
//! The one rustup toolchain a fresh machine has is stable, and Debian's rustc that the
//! bootstrap installs ships no sanitizer runtime, so such a build would not be reproducible from
//! the project's own scripts. The targets take bytes, so a libFuzzer harness can call them
//! unchanged where a nightly toolchain exists.
#![allow(
    clippy::unwrap_used,
    reason = "fuzz targets: a failed unwrap is a finding, reported by the runner"
)]

pub mod input;
pub mod targets;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};

pub use input::{Input, mutate};

/// One fuzz target: its name, the function and the inputs mutations start from.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    targets::forward::TARGET,
    targets::quality::TARGET,
    targets::cmsg::TARGET,
    targets::convert::TARGET,
    targets::config::TARGET,
    targets::spec::TARGET,
    targets::allocator::TARGET,
];

/// What a run did.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub cases: u32,
    pub elapsed: Duration,
    pub seeds: usize,
}

/// The seed of the runs' random generator: `HOMERELAY_FUZZ_SEED` (a number) or a fixed one.
pub fn seed_from_env() -> u64 {
    std::env::var("HOMERELAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x686f_6d65_7265_6c61)
}

/// The case budget: `HOMERELAY_FUZZ_CASES` if set, else `default`.
pub fn cases_from_env(default: u32) -> u32 {
    std::env::var("HOMERELAY_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs `target` on `cases` inputs drawn from a generator seeded with `seed`: half fresh
/// random bytes, half mutations of one of its seeds (every seed also runs unmutated first).
/// Panics with the (shrunk) failing input when the target panics.
pub fn run(target: &Target, cases: u32, seed: u64) -> Report {
    let start = Instant::now();
    let seeds = (target.seeds)();
    for s in &seeds {
        (target.run)(s);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + target.name.len().min(24)]
        .copy_from_slice(&target.name.as_bytes()[..target.name.len().min(24)]);
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let n_seeds = seeds.len();
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..768),
        prop::option::weighted(0.5, 0..n_seeds.max(1)),
    );
    let f = target.run;
    let result = runner.run(&strategy, |(bytes, pick)| {
        let input = match pick {
            Some(i) if n_seeds > 0 => mutate(&seeds[i], &bytes),
            _ => bytes,
        };
        f(&input);
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {} failed (seed {seed}): {e}", target.name);
    }
    Report {
        cases,
        elapsed: start.elapsed(),
        seeds: n_seeds,
    }
}
