//! The dependency policy (`policy/deps.toml`) and its check against
//! `cargo metadata`: where packages come from, the licenses they are used
//! under, and crates that must not be in the tree. Offline and without
//! `cargo deny`, so CI needs no network; `bin/deps-policy` runs it.

use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::path::Path;

/// `policy/deps.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Allowed `source` strings of non-workspace packages.
    pub sources: Vec<String>,
    /// Allowed SPDX license ids.
    pub licenses: Vec<String>,
    #[serde(default)]
    pub banned: Vec<Banned>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Banned {
    pub name: String,
    pub reason: String,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One package breaking one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `name version`.
    pub package: String,
    pub rule: Rule,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Source,
    License,
    Banned,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = match self.rule {
            Rule::Source => "source",
            Rule::License => "license",
            Rule::Banned => "banned",
        };
        write!(f, "{}: {rule}: {}", self.package, self.detail)
    }
}

/// Checks every package of a `cargo metadata --format-version 1` document.
/// Err when the document is not one.
pub fn check(policy: &Policy, metadata: &Value) -> Result<Vec<Violation>, String> {
    let packages = metadata["packages"]
        .as_array()
        .ok_or("metadata has no packages array")?;
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .ok_or("metadata has no workspace_members array")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut out = Vec::new();
    for p in packages {
        let name = p["name"].as_str().ok_or("a package without a name")?;
        let version = p["version"].as_str().unwrap_or("?");
        let id = p["id"].as_str().unwrap_or_default();
        let mut violation = |rule, detail: String| {
            out.push(Violation {
                package: format!("{name} {version}"),
                rule,
                detail,
            })
        };
        let member = members.contains(&id);
        match p["source"].as_str() {
            None if member => {}
            None => violation(
                Rule::Source,
                "a path dependency outside the workspace".to_owned(),
            ),
            Some(s) if policy.sources.iter().any(|a| a == s) => {}
            Some(s) => violation(Rule::Source, format!("from {s}, not an allowed source")),
        }
        if let Some(b) = policy.banned.iter().find(|b| b.name == name) {
            violation(Rule::Banned, b.reason.clone());
        }
        if member {
            // The workspace's own crates carry the workspace's license.
            continue;
        }
        match p["license"].as_str() {
            None | Some("") => violation(
                Rule::License,
                "no SPDX license expression (license-file only)".to_owned(),
            ),
            Some(expr) => match license_allowed(expr, &policy.licenses) {
                Ok(true) => {}
                Ok(false) => violation(Rule::License, format!("{expr:?} is not allowed")),
                Err(e) => violation(Rule::License, format!("{expr:?}: {e}")),
            },
        }
    }
    Ok(out)
}

/// Whether an SPDX license expression can be satisfied with `allowed`.
/// `A OR B` needs one, `A AND B` both, `A WITH exception` counts as `A`,
/// and the old `A/B` form reads as `A OR B`.
pub fn license_allowed(expr: &str, allowed: &[String]) -> Result<bool, String> {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        allowed,
    };
    let ok = parser.or()?;
    if parser.at != tokens.len() {
        return Err(format!("unexpected {:?}", tokens[parser.at]));
    }
    Ok(ok)
}

struct Parser<'a> {
    tokens: &'a [&'a str],
    at: usize,
    allowed: &'a [String],
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.tokens.get(self.at).copied()
    }

    fn next(&mut self) -> Result<&'a str, String> {
        let t = self.peek().ok_or("the expression ends too early")?;
        self.at += 1;
        Ok(t)
    }

    fn or(&mut self) -> Result<bool, String> {
        let mut ok = self.and()?;
        while self.peek() == Some("OR") {
            self.at += 1;
            ok |= self.and()?;
        }
        Ok(ok)
    }

    fn and(&mut self) -> Result<bool, String> {
        let mut ok = self.with()?;
        while self.peek() == Some("AND") {
            self.at += 1;
            ok &= self.with()?;
        }
        Ok(ok)
    }

    fn with(&mut self) -> Result<bool, String> {
        let ok = self.primary()?;
        if self.peek() == Some("WITH") {
            self.at += 1;
            // An exception only grants more: the license decides.
            self.id()?;
        }
        Ok(ok)
    }

    fn primary(&mut self) -> Result<bool, String> {
        if self.peek() == Some("(") {
            self.at += 1;
            let ok = self.or()?;
            match self.next()? {
                ")" => Ok(ok),
                t => Err(format!("expected ')', found {t:?}")),
            }
        } else {
            let id = self.id()?;
            Ok(self.allowed.iter().any(|a| a == id))
        }
    }

    fn id(&mut self) -> Result<&'a str, String> {
        match self.next()? {
            t @ ("(" | ")" | "AND" | "OR" | "WITH") => Err(format!("unexpected {t:?}")),
            t => Ok(t),
        }
    }
}

/// Runs `cargo metadata --locked --offline` for the workspace at `root`,
/// filtered to `platform` (the packages a build there may use; the others'
/// manifests may not be on this machine).
pub fn metadata(cargo: &str, root: &Path, platform: &str) -> Result<Value, String> {
    let out = std::process::Command::new(cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--format-version",
            "1",
            "--filter-platform",
            platform,
        ])
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))
}

/// The host triple, from `rustc -vV`.
pub fn host_platform() -> Result<String, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = std::process::Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run {rustc}: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV printed no host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::license_allowed;

    #[test]
    fn license_expressions() {
        let allowed: Vec<String> = ["MIT", "Apache-2.0", "Unicode-3.0"]
            .map(String::from)
            .to_vec();
        let ok = |e: &str| license_allowed(e, &allowed).unwrap();
        assert!(ok("MIT"));
        assert!(ok("MIT OR Apache-2.0"));
        assert!(ok("GPL-3.0 OR MIT"));
        assert!(ok("MIT/Apache-2.0"));
        assert!(ok("Apache-2.0 / MIT"));
        assert!(ok("(MIT OR Apache-2.0) AND Unicode-3.0"));
        assert!(ok("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"));
        assert!(!ok("GPL-3.0"));
        assert!(!ok("MIT AND GPL-3.0"));
        assert!(!ok("(MIT OR Apache-2.0) AND BSD-3-Clause"));
        assert!(!ok("GPL-2.0 WITH Classpath-exception-2.0"));
        for bad in ["", "MIT OR", "(MIT", "MIT)", "AND MIT", "MIT WITH"] {
            assert!(license_allowed(bad, &allowed).is_err(), "{bad:?}");
        }
    }
}
