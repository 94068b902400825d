//! The dependency policy (`policy/deps.toml`): the workspace follows it,
//! and the checker catches each kind of violation in a synthetic
//! `cargo metadata` document — through the library and through the
//! `deps-policy` binary that `scripts/test` runs.

use iim_tests::deps::{self, Policy, Rule};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn policy() -> Policy {
    Policy::load(&root().join("policy/deps.toml")).expect("policy/deps.toml")
}

const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

fn package(name: &str, source: Option<&str>, license: Option<&str>) -> Value {
    json!({
        "name": name,
        "version": "1.0.0",
        "id": format!("{name} 1.0.0"),
        "source": source,
        "license": license,
    })
}

/// A workspace member and a well-behaved crate, plus `extra`.
fn metadata(extra: Vec<Value>) -> Value {
    let mut packages = vec![
        package("iim", None, None),
        package("serde", Some(CRATES_IO), Some("MIT OR Apache-2.0")),
    ];
    packages.extend(extra);
    json!({ "packages": packages, "workspace_members": ["iim 1.0.0"] })
}

#[test]
fn the_workspace_follows_its_dependency_policy() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let platform = deps::host_platform().expect("host platform");
    let metadata = deps::metadata(&cargo, &root(), &platform).expect("cargo metadata");
    let violations = deps::check(&policy(), &metadata).expect("a metadata document");
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    assert!(list.is_empty(), "{}", list.join("\n"));
    // The check did look at the tree: rustls is in it, rustls-pemfile not.
    let names: Vec<&str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"rustls") && !names.contains(&"rustls-pemfile"));
}

#[test]
fn each_kind_of_violation_is_reported() {
    let clean = deps::check(&policy(), &metadata(vec![])).unwrap();
    assert!(clean.is_empty(), "{clean:?}");

    let bad = metadata(vec![
        package(
            "from-git",
            Some("git+https://example.com/x.git#abc"),
            Some("MIT"),
        ),
        package("outside", None, Some("MIT")),
        package("rustls-pemfile", Some(CRATES_IO), Some("MIT OR Apache-2.0")),
        package("openssl-sys", Some(CRATES_IO), Some("MIT")),
        package("copyleft", Some(CRATES_IO), Some("GPL-3.0-only")),
        package(
            "half-copyleft",
            Some(CRATES_IO),
            Some("MIT AND GPL-3.0-only"),
        ),
        package("license-file-only", Some(CRATES_IO), None),
        package("garbled", Some(CRATES_IO), Some("MIT OR (Apache-2.0")),
    ]);
    let found: Vec<(String, Rule)> = deps::check(&policy(), &bad)
        .unwrap()
        .into_iter()
        .map(|v| (v.package, v.rule))
        .collect();
    let expected: Vec<(String, Rule)> = [
        ("from-git", Rule::Source),
        ("outside", Rule::Source),
        ("rustls-pemfile", Rule::Banned),
        ("openssl-sys", Rule::Banned),
        ("copyleft", Rule::License),
        ("half-copyleft", Rule::License),
        ("license-file-only", Rule::License),
        ("garbled", Rule::License),
    ]
    .into_iter()
    .map(|(n, r)| (format!("{n} 1.0.0"), r))
    .collect();
    assert_eq!(found, expected);

    assert!(deps::check(&policy(), &json!({"packages": 1})).is_err());
}

#[test]
fn the_binary_fails_on_a_violation_and_passes_a_clean_tree() {
    let dir = tempfile::tempdir().unwrap();
    let run = |doc: &Value| {
        let file = dir.path().join("metadata.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_deps-policy"))
            .arg("--metadata")
            .arg(&file)
            .output()
            .expect("run deps-policy")
    };
    let out = run(&metadata(vec![]));
    assert!(out.status.success(), "{out:?}");

    let out = run(&metadata(vec![package(
        "native-tls",
        Some(CRATES_IO),
        Some("MIT OR Apache-2.0"),
    )]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("native-tls 1.0.0: banned"), "{stderr}");
}
