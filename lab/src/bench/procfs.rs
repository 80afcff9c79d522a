//! What the benchmarks read about processes and the machine from `/proc`: resident memory
//! (`VmRSS`), CPU time (`utime + stime`), thread count and the load average.
//!
//! Memory and CPU are read from the outside, the same way for our binaries, HAProxy, nginx and
//! Redis, so that no process reports on itself and every figure means the same thing.

use anyhow::{anyhow, Context, Result};
use std::time::Duration;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// `utime + stime`, in clock ticks.
    pub cpu_ticks: u64,
    /// `Threads:`.
    pub threads: u64,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample(pid: u32) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(Sample {
        rss_kib: status_field(&status, "VmRSS:").unwrap_or(0),
        cpu_ticks: cpu_ticks(&stat).ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?,
        threads: status_field(&status, "Threads:").unwrap_or(0),
    })
}

/// `VmRSS` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    Ok(sample(pid)?.rss_kib)
}

/// CPU time (user + system) of `pid`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    Ok(ticks_to_duration(sample(pid)?.cpu_ticks))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 on every Linux we know of).
pub fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 100,
    }
}

/// Ticks as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let hz = clock_ticks_per_sec();
    Duration::from_micros(ticks.saturating_mul(1_000_000) / hz)
}

/// The three load averages from `/proc/loadavg`.
pub fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `load average 1.23 0.98 0.77` for headers of reports.
pub fn loadavg_line() -> String {
    match loadavg() {
        Some([a, b, c]) => format!("load average {a:.2} {b:.2} {c:.2} (1/5/15 min), {} cores", cores()),
        None => "load average unknown".to_owned(),
    }
}

/// Online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// The descriptor limit (soft) of `pid`, from `/proc/PID/limits`.
pub fn open_files_limit(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn status_field(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// Fields 14 and 15 (`utime`, `stime`) of a `stat` line. The command name (field 2) may hold
/// spaces and parentheses, so counting starts after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is field 14, i.e. the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU used by a set of processes between two points in time.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start_ticks: Vec<u64>,
    started: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring `pids` now (a pid that cannot be read counts from zero).
    pub fn start(pids: &[u32]) -> Self {
        let start_ticks = pids.iter().map(|&p| sample(p).map(|s| s.cpu_ticks).unwrap_or(0)).collect();
        Self { pids: pids.to_vec(), start_ticks, started: std::time::Instant::now() }
    }

    /// CPU time used by each pid since [`CpuMeter::start`], and the wall time that passed.
    pub fn read(&self) -> (Vec<Duration>, Duration) {
        let used = self
            .pids
            .iter()
            .zip(&self.start_ticks)
            .map(|(&p, &t0)| ticks_to_duration(sample(p).map(|s| s.cpu_ticks.saturating_sub(t0)).unwrap_or(0)))
            .collect();
        (used, self.started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0 5 1000 10";
        assert_eq!(cpu_ticks(line), Some(22));
    }

    #[test]
    fn our_own_process_can_be_read() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(s.threads >= 1);
        assert!(open_files_limit(std::process::id()).is_some());
    }
}
