//! Readings from /proc for the benchmark binaries: CPU time and memory of
//! a process.

/// Clock ticks per second (`getconf CLK_TCK`; 100 if it cannot be asked).
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in clock ticks; `None` if /proc cannot tell.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(n(11)? + n(12)?)
}

/// A `Vm*` line of /proc/<pid>/status (`VmRSS`, `VmHWM`, …), in KiB; 0 if
/// unreadable.
pub fn vm_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time a process uses from `start` on.
pub struct CpuMeter {
    pid: u32,
    ticks: u64,
    tck: f64,
}

impl CpuMeter {
    pub fn start(pid: u32, tck: f64) -> CpuMeter {
        CpuMeter {
            pid,
            ticks: cpu_ticks(pid).unwrap_or(0),
            tck,
        }
    }

    /// CPU microseconds used since `start` (0 if /proc cannot tell).
    pub fn micros(&self) -> f64 {
        let now = cpu_ticks(self.pid).unwrap_or(self.ticks);
        now.saturating_sub(self.ticks) as f64 * 1e6 / self.tck
    }
}
