//! The README's first command, `scripts/demo`, is `iimctl demo`: a whole
//! deployment on SQLite with generated certificates, a send across three
//! app servers checked in their logs, a restart, and chat. It must keep
//! working: run it as a newcomer would, in a directory of its own.

use iim_kit::proc::Binaries;
use std::time::Duration;

#[tokio::test]
async fn the_demo_runs_to_the_end() {
    let bins = Binaries::next_to_me("cargo build --workspace --bins").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // `daemon` scrubs the environment of what would change how iim starts.
    let mut cmd = bins.daemon("iimctl", &[], None);
    cmd.arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the demo finishes within four minutes")
        .expect("iimctl runs");
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("Done"), "{report}");
}
