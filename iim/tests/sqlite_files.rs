//! The SQLite database holds every message: it and its -wal and -shm files
//! are created readable by their owner only, whatever the umask. (Its own
//! test binary: the umask is process-wide.)

#![cfg(unix)]

use iim::registry::{Registry, Role, ServerState};
use iim::types::ServerId;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn new_sqlite_database_and_its_wal_files_are_private_under_a_permissive_umask() {
    // SAFETY: umask only swaps the process's file mode mask; nothing else in
    // this binary creates files concurrently.
    let old = unsafe { libc::umask(0o000) };
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("messages.db");
    let url = format!("sqlite://{}", db.display());
    let reg = Registry::connect(&url).await.expect("open a new database");
    // A write, so the WAL is in use.
    reg.begin_epoch(ServerId(1), Role::App, "a:1", ServerState::Up, 1)
        .await
        .expect("write");
    // A file of our own under the same umask shows the umask is in effect.
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"x").expect("probe file");
    unsafe { libc::umask(old) };
    assert_eq!(mode(&probe), 0o666, "the umask was not permissive");

    for suffix in ["", "-wal", "-shm"] {
        let path = dir.path().join(format!("messages.db{suffix}"));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    drop(reg);
}
