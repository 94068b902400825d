//! `deps-policy`: checks the workspace's dependencies against
//! `policy/deps.toml` (sources, licenses, banned crates) offline, from
//! `cargo metadata --locked --offline`. Exits 1 listing each violation.
//!
//! `deps-policy [--policy FILE] [--metadata FILE] [--platform TRIPLE]`:
//! `--metadata` checks a saved `cargo metadata` document instead.

use iim_tests::deps::{self, Policy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("deps-policy: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<usize, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_owned();
    let mut policy_path = root.join("policy/deps.toml");
    let mut metadata_path: Option<PathBuf> = None;
    let mut platform = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--policy" => policy_path = value()?.into(),
            "--metadata" => metadata_path = Some(value()?.into()),
            "--platform" => platform = Some(value()?),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    let policy = Policy::load(&policy_path)?;
    let metadata = match metadata_path {
        Some(p) => {
            let text = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => {
            let platform = match platform {
                Some(p) => p,
                None => deps::host_platform()?,
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            deps::metadata(&cargo, &root, &platform)?
        }
    };
    let violations = deps::check(&policy, &metadata)?;
    let checked = metadata["packages"].as_array().map_or(0, Vec::len);
    for v in &violations {
        eprintln!("deps-policy: {v}");
    }
    if violations.is_empty() {
        println!(
            "deps-policy: {checked} packages follow {}",
            policy_path.display()
        );
    } else {
        eprintln!(
            "deps-policy: {} violation(s) of {}",
            violations.len(),
            policy_path.display()
        );
    }
    Ok(violations.len())
}
