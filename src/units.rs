//! Parsing of sizes ("64M", "1GiB", "4096") and durations ("30s", "1h 5m") given on the
//! command line.

use std::time::Duration;

/// Parses a byte size with an optional binary suffix: K, M, G, T (also KiB, KB, …; all powers
/// of 1024, as qemu-img does).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (try 4096, 64M or 10G)"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown size suffix {other:?} in {text:?} (use K, M, G or T)")),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("size {text:?} is too large"))
}

/// CPU numbers, as given on the command line.
#[derive(Clone, Debug)]
pub struct CpuList {
    pub cpus: Vec<usize>,
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let numbers: Vec<String> = self.cpus.iter().map(usize::to_string).collect();
        f.write_str(&numbers.join(","))
    }
}

/// Parses a CPU list as taskset and cpusets write it: "1", "0-3,6".
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let cpu = |number: &str| {
        number
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("{number:?} in {text:?} is not a CPU number (try 1 or 0-3,6)"))
    };
    let mut cpus = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (cpu(first)?, cpu(last)?);
                if first > last {
                    return Err(format!("CPU range {part:?} runs backwards"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(cpu(part)?),
        }
    }
    Ok(CpuList { cpus })
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration (try 30s, 10m, 24h): {e}"))
}

/// Parses an RFC 3339 time ("2026-11-25T12:00:00Z") into ns since the epoch.
pub fn parse_rfc3339_ns(text: &str) -> Result<u64, String> {
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))?;
    let since = time.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{text:?} is before 1970"))?;
    u64::try_from(since.as_nanos()).map_err(|_| format!("{text:?} is too far in the future"))
}

pub fn format_time_ns(ns: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("3").map(|l| l.cpus), Ok(vec![3]));
        assert_eq!(parse_cpu_list("0-2,6").map(|l| l.cpus), Ok(vec![0, 1, 2, 6]));
        assert_eq!(parse_cpu_list("0-2,6").map(|l| l.to_string()), Ok("0,1,2,6".into()));
        assert!(parse_cpu_list("2-1").unwrap_err().contains("runs backwards"));
        assert!(parse_cpu_list("one").unwrap_err().contains("is not a CPU number"));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("1,").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_rfc3339_ns("1970-01-02T00:00:01.5Z"), Ok(86_401_500_000_000));
        let ns = parse_rfc3339_ns("2026-11-25T12:00:00.5Z").unwrap();
        assert_eq!(format_time_ns(ns), "2026-11-25T12:00:00.500Z");
        assert!(parse_rfc3339_ns("yesterday").is_err());
    }

    #[test]
    fn durations_and_byte_formatting() {
        assert_eq!(parse_duration("1h 5m"), Ok(Duration::from_secs(3900)));
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
    }
}
