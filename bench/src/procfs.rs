//! What the benchmark reads from `/proc`: CPU time of a process or of one
//! thread, resident memory, the machine. Reading files keeps the crate free
//! of `unsafe` (no `getrusage`/`sysconf` through libc).

use std::io;
use std::path::Path;
use std::process::Command;

/// `USER_HZ`: the unit of `utime`/`stime` in `/proc/*/stat`. Asked of
/// `getconf CLK_TCK`; 100 (the value on every Linux architecture in use) if
/// that fails.
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// CPU time in clock ticks, user and system (kernel) separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// `self - earlier`, field by field.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// `utime` and `stime` (fields 14 and 15) of a `stat` file. For a process
/// this covers all of its threads, live and exited.
pub fn stat_cpu_ticks(path: &Path) -> io::Result<CpuTicks> {
    let text = std::fs::read_to_string(path)?;
    parse_stat_cpu_ticks(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unexpected format", path.display()),
        )
    })
}

fn parse_stat_cpu_ticks(text: &str) -> Option<CpuTicks> {
    // The command name (field 2) is in parentheses and may hold spaces: the
    // fields after the last ')' start at field 3 (state).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(CpuTicks {
        user: fields.get(14 - 3)?.parse().ok()?,
        system: fields.get(15 - 3)?.parse().ok()?,
    })
}

/// CPU ticks of process `pid`.
pub fn process_cpu_ticks(pid: u32) -> io::Result<CpuTicks> {
    stat_cpu_ticks(Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU ticks of each thread of process `pid`, summed by thread name
/// (`comm`): which of the gateway's threads (shard, hub store, API) did
/// the work. Threads that exited are missing.
pub fn threads_cpu_ticks(pid: u32) -> io::Result<std::collections::BTreeMap<String, CpuTicks>> {
    let mut by_name = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = entry?.path();
        let (Ok(name), Ok(ticks)) = (
            std::fs::read_to_string(dir.join("comm")),
            stat_cpu_ticks(&dir.join("stat")),
        ) else {
            continue;
        };
        let t: &mut CpuTicks = by_name.entry(name.trim().to_owned()).or_default();
        t.user += ticks.user;
        t.system += ticks.system;
    }
    Ok(by_name)
}

/// Prints the gateway's CPU seconds per thread over a run, when both
/// readings were taken.
pub fn print_threads_cpu(
    before: Option<&std::collections::BTreeMap<String, CpuTicks>>,
    after: Option<&std::collections::BTreeMap<String, CpuTicks>>,
    clk_tck: u64,
) {
    if let Some((a, b)) = before.zip(after) {
        println!(
            "  gateway CPU-s by thread: {:?}",
            threads_cpu_delta(a, b, clk_tck)
        );
    }
}

/// CPU seconds per thread name between two [`threads_cpu_ticks`]
/// readings.
pub fn threads_cpu_delta(
    before: &std::collections::BTreeMap<String, CpuTicks>,
    after: &std::collections::BTreeMap<String, CpuTicks>,
    ticks_per_s: u64,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            let s = a.since(b).total() as f64 / ticks_per_s.max(1) as f64;
            (name.clone(), (s * 1000.0).round() / 1000.0)
        })
        .filter(|(_, s)| *s > 0.0)
        .collect()
}

/// CPU ticks of this process.
pub fn self_cpu_ticks() -> io::Result<CpuTicks> {
    stat_cpu_ticks(Path::new("/proc/self/stat"))
}

/// CPU ticks of thread `tid` of this process.
pub fn thread_cpu_ticks(tid: u32) -> io::Result<CpuTicks> {
    stat_cpu_ticks(Path::new(&format!("/proc/self/task/{tid}/stat")))
}

/// The calling thread's id (`/proc/thread-self` links to `<pid>/task/<tid>`).
pub fn current_tid() -> io::Result<u32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/thread-self"))
}

/// `VmRSS` of process `pid`, in bytes.
pub fn vm_rss_bytes(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// `RssAnon` of process `pid` (heap and other anonymous memory), in bytes.
pub fn rss_anon_bytes(pid: u32) -> io::Result<u64> {
    status_kib(pid, "RssAnon:").map(|kib| kib * 1024)
}

fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key} for {pid}")))
}

/// The `TCP:` line of `/proc/net/sockstat` (sockets in use, kernel memory in
/// pages), for the record.
pub fn tcp_sockstat() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .map(|l| l.trim().to_owned())
}

/// `/proc/loadavg` as written (1, 5, 15-minute load, runnable/total tasks).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.trim().to_owned())
        .unwrap_or_default()
}

/// Machine-wide (user+nice+system, steal) ticks from the `cpu` line of
/// `/proc/stat`: busy time of every process, ours and others', and time
/// the hypervisor gave to other guests.
pub fn machine_busy_and_steal_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, *v.get(7)?))
}

/// The first line of `/proc/version`.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/version")
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// Online CPUs as the process sees them.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_with_spaces() {
        let line = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        assert_eq!(
            parse_stat_cpu_ticks(line),
            Some(CpuTicks {
                user: 111,
                system: 222
            })
        );
    }

    #[test]
    fn own_figures_are_readable() {
        assert!(self_cpu_ticks().is_ok());
        let tid = current_tid().unwrap();
        assert!(thread_cpu_ticks(tid).is_ok());
        assert!(vm_rss_bytes(std::process::id()).unwrap() > 0);
        let threads = threads_cpu_ticks(std::process::id()).unwrap();
        assert!(!threads.is_empty());
        let later = threads.clone();
        assert!(threads_cpu_delta(&threads, &later, 100).is_empty());
    }
}
