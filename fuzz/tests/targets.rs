//! A short, deterministic run of every fuzz target (fixed seed, fixed case budget), as part of
//! `cargo test`. `HOMERELAY_FUZZ_CASES` / `HOMERELAY_FUZZ_SEED` change the budget and seed
//! (`scripts/fuzz.sh` runs them at length).
use homerelay_fuzz::{TARGETS, Target, cases_from_env, run, seed_from_env};

fn target(name: &str) -> &'static Target {
    TARGETS.iter().find(|t| t.name == name).expect("target")
}

fn short(name: &str, cases: u32) {
    let r = run(target(name), cases_from_env(cases), seed_from_env());
    eprintln!(
        "fuzz {name}: {} cases + {} seeds in {:.2?}",
        r.cases, r.seeds, r.elapsed
    );
}

#[test]
fn fuzz_forward() {
    short("forward", 3000);
}

#[test]
fn fuzz_quality() {
    short("quality", 3000);
}

#[test]
fn fuzz_cmsg() {
    short("cmsg", 5000);
}

#[test]
fn fuzz_convert() {
    short("convert", 3000);
}

#[test]
fn fuzz_config() {
    short("config", 2000);
}

#[test]
fn fuzz_spec() {
    short("spec", 3000);
}

#[test]
fn fuzz_allocator() {
    short("allocator", 1500);
}

#[test]
fn every_target_is_run_here() {
    let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "forward",
            "quality",
            "cmsg",
            "convert",
            "config",
            "spec",
            "allocator"
        ]
    );
}
