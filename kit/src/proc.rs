//! Running the real binaries: find them, start one with its output in a
//! log file, notice when it died (with the end of its log), stop it with
//! SIGTERM and a grace period or kill it without warning, and wait until
//! it listens.
//!
//! This is the one process launcher of the workspace: the process tests,
//! the deployments of [`crate::deploy`], the benchmarks and `iimctl demo`
//! all start children through [`Proc`]. It knows nothing about what a
//! child is for.

use anyhow::{Context, bail};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The daemons' names, as cargo builds them.
pub const EXCHANGE_BIN: &str = "iim-exchange";
pub const APPSERVER_BIN: &str = "iim-appserver";

/// Environment that would change how a daemon starts or logs: children
/// get their settings from their flags and config files only.
const SCRUBBED_ENV: [&str; 6] = [
    "RUST_LOG",
    "IIM_LOG_JSON",
    "IIM_DATABASE",
    "IIM_DATABASE_FILE",
    "IIM_EXCHANGE_CONFIG",
    "IIM_APPSERVER_CONFIG",
];

/// Where the workspace's binaries are (`target/<profile>`).
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The daemons built next to the running executable: a binary of the
    /// workspace lives in `target/<profile>`, a test executable in its
    /// `deps/`. `build` is the command that builds them, for the error.
    pub fn next_to_me(build: &str) -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("cannot locate the running executable")?;
        let mut dir = exe
            .parent()
            .context("the running executable has no directory")?;
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(up) = dir.parent()
        {
            dir = up;
        }
        Binaries::in_dir(dir.to_path_buf(), build)
    }

    /// The daemons in `dir`; an error naming `build` unless both are there.
    pub fn in_dir(dir: PathBuf, build: &str) -> anyhow::Result<Binaries> {
        let bins = Binaries { dir };
        for name in [EXCHANGE_BIN, APPSERVER_BIN] {
            let path = bins.path(name);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the binaries first (`{build}`)",
                    path.display()
                );
            }
        }
        Ok(bins)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The binary `name` of this directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    /// Built with `--release` (benchmark figures of debug builds mean
    /// nothing).
    pub fn is_release(&self) -> bool {
        self.dir.file_name().is_some_and(|n| n == "release")
    }

    /// A command for daemon `name` with `args`, its environment scrubbed of
    /// what would change how it starts ([`SCRUBBED_ENV`]), `RUST_LOG` set
    /// to `log_filter` (its default, info, when `None`) and no colours.
    pub fn daemon(&self, name: &str, args: &[String], log_filter: Option<&str>) -> Command {
        let mut cmd = Command::new(self.path(name));
        cmd.args(args).env("NO_COLOR", "1");
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        if let Some(f) = log_filter {
            cmd.env("RUST_LOG", f);
        }
        cmd
    }
}

/// A free loopback port (TCP or UDP, by `udp`) for a process to listen on.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768
/// and up here), where no outgoing connection can grab it between this
/// check and the process binding it, and handed out once per process (a
/// counter, started at a per-process offset so concurrent processes rarely
/// meet). Checked free by binding it.
pub fn free_port(udp: bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let offset = (std::process::id().wrapping_mul(7_919)) % SPAN;
        let _ = NEXT.compare_exchange(u32::MAX, offset, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        let free = if udp {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        } else {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        };
        if free {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process whose output goes to a log file; killed when dropped.
/// If the thread is panicking (a failing test), dropping it prints the log.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Its process id, for CPU and memory readings.
    pub pid: u32,
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd` as `name`: stdin closed, stdout and stderr into `log`
    /// (emptied first when `fresh`, appended to otherwise).
    pub fn start(name: &str, cmd: Command, log: &Path, fresh: bool) -> anyhow::Result<Proc> {
        Proc::spawn(name, cmd, log, fresh, None)
    }

    /// [`Proc::start`] with `input` written to its stdin, which is closed
    /// once it is written (the end of input).
    pub fn start_with_input(
        name: &str,
        cmd: Command,
        log: &Path,
        fresh: bool,
        input: String,
    ) -> anyhow::Result<Proc> {
        Proc::spawn(name, cmd, log, fresh, Some(input))
    }

    fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        fresh: bool,
        input: Option<String>,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let stdin = match input {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        };
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.as_std().get_program()))?;
        let pid = child.id().context("the child exited at once")?;
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                // A child that exits without reading it all is its business.
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
            log: log.to_owned(),
        })
    }

    /// An error naming this process and showing the end of its log if it
    /// has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                self.tail(20).trim_end()
            );
        }
        Ok(())
    }

    /// SIGKILL: no drain, no goodbye.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Send SIGTERM (a no-op if it is gone already).
    pub async fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !sent.is_ok_and(|s| s.success()) {
            tracing::debug!(name = %self.name, pid = self.pid, "kill -TERM failed (already gone?)");
        }
    }

    /// Its exit status once it exits, or `None` if it is still running
    /// after `within`.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<Option<ExitStatus>> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => Ok(None),
        }
    }

    /// SIGTERM, then wait up to `grace` for it to exit; SIGKILL after that.
    pub async fn terminate(&mut self, grace: Duration) -> Stopped {
        let started = Instant::now();
        let outcome = match self.child.try_wait() {
            Ok(Some(status)) => StopOutcome::AlreadyExited(status),
            Err(e) => StopOutcome::Lost(e.to_string()),
            Ok(None) => {
                self.sigterm().await;
                match self.wait(grace).await {
                    Ok(Some(status)) => StopOutcome::Exited(status),
                    Ok(None) => {
                        self.kill9().await;
                        StopOutcome::Killed(grace)
                    }
                    Err(e) => StopOutcome::Lost(e.to_string()),
                }
            }
        };
        Stopped {
            name: self.name.clone(),
            log: self.log.clone(),
            took: started.elapsed(),
            outcome,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log, indented, without colour.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// How [`Proc::terminate`] ended.
#[derive(Debug)]
pub enum StopOutcome {
    /// It exited on SIGTERM, with this status.
    Exited(ExitStatus),
    /// It had exited before it was asked to.
    AlreadyExited(ExitStatus),
    /// It was still running this long after SIGTERM and was killed.
    Killed(Duration),
    /// Its status could not be read.
    Lost(String),
}

/// A process stopped by [`Proc::terminate`].
#[derive(Debug)]
pub struct Stopped {
    pub name: String,
    pub log: PathBuf,
    pub took: Duration,
    pub outcome: StopOutcome,
}

impl Stopped {
    /// It exited on SIGTERM, successfully.
    pub fn clean(&self) -> bool {
        matches!(self.outcome, StopOutcome::Exited(s) if s.success())
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        match &self.outcome {
            StopOutcome::Exited(status) => write!(
                f,
                "{name} stopped in {:.1} s ({status})",
                self.took.as_secs_f32()
            ),
            StopOutcome::AlreadyExited(status) => write!(f, "{name} had already exited ({status})"),
            StopOutcome::Killed(grace) => write!(
                f,
                "{name} did not stop within {} s of SIGTERM and was killed; see {}",
                grace.as_secs(),
                self.log.display()
            ),
            StopOutcome::Lost(e) => write!(f, "{name}: cannot wait for it: {e}"),
        }
    }
}

/// Wait until something accepts TCP connections on `addr`, for at most
/// `within`. `alive` is asked between tries (whether the process that
/// should listen still runs); its error ends the wait.
pub async fn wait_listening(
    addr: SocketAddr,
    what: &str,
    within: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        alive()?;
        if Instant::now() > deadline {
            bail!(
                "{what} did not listen on {addr} within {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The last `n` lines of a log, indented, without colour.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {}\n", strip_ansi(l)))
        .collect()
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case a child logs
/// in colour despite NO_COLOR.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2025  INFO x"
        );
    }

    #[tokio::test]
    async fn a_child_is_logged_checked_and_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sh.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done",
        ]);
        let mut p = Proc::start("sh", cmd, &log, true).unwrap();
        crate::eventually!(10, "the child logged", p.log_text().contains("started"));
        p.check().unwrap();
        let stopped = p.terminate(Duration::from_secs(10)).await;
        assert!(stopped.clean(), "{stopped}");
        assert!(p.log_text().contains("bye"), "{}", p.log_text());
        let err = p.check().unwrap_err().to_string();
        assert!(
            err.contains("exited unexpectedly") && err.contains("bye"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ]);
        let mut p = Proc::start("stubborn", cmd, &dir.path().join("s.log"), true).unwrap();
        crate::eventually!(10, "the trap is set", p.log_text().contains("ready"));
        let stopped = p.terminate(Duration::from_millis(200)).await;
        assert!(
            matches!(stopped.outcome, StopOutcome::Killed(_)),
            "{stopped}"
        );
        assert!(!stopped.clean());
        assert!(stopped.to_string().contains("was killed"), "{stopped}");
    }
}
