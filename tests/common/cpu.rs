//! CPU time from /proc: what a process, or some of the machine's cores, spent.
#![allow(dead_code)] // the tests and the benches use different parts

use std::fs;
use std::ops::Range;
use std::time::Duration;

fn from_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// CPU time (user + system) process `pid` has used so far, all its threads.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    from_ticks(fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap())
}

/// Time `cores` have spent busy so far, whoever ran on them: user, nice, system, irq and
/// softirq time (not idle, I/O wait or time stolen by the hypervisor).
pub fn cores_busy(cores: Range<usize>) -> Duration {
    let stat = fs::read_to_string("/proc/stat").unwrap();
    let ticks = stat
        .lines()
        .filter_map(|line| {
            // "cpu0 user nice system idle iowait irq softirq steal …"; the first line, "cpu "
            // (all cores), has no number and is skipped.
            let (core, times) = line.strip_prefix("cpu")?.split_once(' ')?;
            let core: usize = core.parse().ok()?;
            let times: Vec<u64> = times.split_whitespace().map(|t| t.parse().unwrap()).collect();
            cores.contains(&core).then(|| times[0] + times[1] + times[2] + times[5] + times[6])
        })
        .sum();
    from_ticks(ticks)
}
