//! Many seeds of the simulation, each a different schedule of sends and
//! faults; a failure names its seed, and `SEED=<n>` replays just that one
//! (add `SIM_TRACE=1` to print every step).
//!
//! `SIM_SEEDS` sets how many seeds each of the six tests runs (default
//! 500: 3,000 in all); `SIM_SEED_BASE` moves the first one. Four tests draw
//! one exchange in two fifths of their seeds; the two `federated` tests
//! always draw two or three (their seeds carry [`iim_sim::FEDERATED`]), so
//! a run holds about 2,200 seeds of several exchanges.

use std::time::Instant;

fn seeds_per_test() -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500)
}

fn base() -> u64 {
    std::env::var("SIM_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Run `count` seeds from `first`; panic with every failing seed.
fn run_range(first: u64, count: u64) {
    if std::env::var_os("SEED").is_some() {
        // `replay` runs the one seed.
        return;
    }
    let started = Instant::now();
    let mut failures = Vec::new();
    let (mut sends, mut deliveries, mut steps, mut virtual_ms) = (0, 0, 0, 0);
    for seed in first..first + count {
        match iim_sim::run(seed, false) {
            Ok(s) => {
                sends += s.sends;
                deliveries += s.deliveries;
                steps += s.steps;
                virtual_ms += s.virtual_ms;
            }
            Err(v) => failures.push(v.to_string()),
        }
    }
    println!(
        "seeds {first}..{}: {sends} sends, {deliveries} deliveries, {steps} steps, {} s of virtual time in {:.1} s",
        first + count,
        virtual_ms / 1_000,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seeds_a() {
    let n = seeds_per_test();
    run_range(base(), n);
}

#[test]
fn seeds_b() {
    let n = seeds_per_test();
    run_range(base() + n, n);
}

#[test]
fn seeds_c() {
    let n = seeds_per_test();
    run_range(base() + 2 * n, n);
}

#[test]
fn seeds_d() {
    let n = seeds_per_test();
    run_range(base() + 3 * n, n);
}

#[test]
fn federated_a() {
    let n = seeds_per_test();
    run_range(iim_sim::FEDERATED + base(), n);
}

#[test]
fn federated_b() {
    let n = seeds_per_test();
    run_range(iim_sim::FEDERATED + base() + n, n);
}

/// `SEED=<n>`: run that seed alone, printing every step with `SIM_TRACE=1`.
#[test]
fn replay() {
    let Some(seed) = std::env::var("SEED").ok().and_then(|s| s.parse().ok()) else {
        return;
    };
    let trace = std::env::var_os("SIM_TRACE").is_some();
    if trace {
        // The cores' own logs, interleaved with the simulator's steps.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug")),
            )
            .without_time()
            .with_test_writer()
            .try_init();
    }
    match iim_sim::run(seed, trace) {
        Ok(s) => println!("seed {seed}: {s:?}"),
        Err(v) => panic!("{v}"),
    }
}

/// The same seed does the same thing.
#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77, 1_234] {
        let a = iim_sim::run(seed, false);
        let b = iim_sim::run(seed, false);
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("seed {seed} ran two ways: {a:?} / {b:?}"),
        }
    }
}
