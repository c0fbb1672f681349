//! The daemon's logger: env_logger behind a rate limit, so that nothing a guest or a frontend
//! does can fill the host's disk with log lines (at error, warn and info; debug and trace,
//! which only an operator turns on, pass unlimited). Every call site of every crate (the vhost and
//! virtio crates log on their own) may print a few lines a second on each thread; the rest are
//! counted and summed up in one line when the site speaks again, at the next sweep, or at
//! exit. A thread serves one queue (its worker and its applier) or one client connection, so
//! keying by thread limits each queue and each kind of message on its own: a flood on one
//! queue never hides another queue's lines.

use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// The most verbose level the limit applies to: what is logged unless RUST_LOG asks for more.
const DEFAULT_MOST_VERBOSE: Level = Level::Info;
/// Lines one call site may print per thread in a window.
const BURST: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);
/// A site silent this long is forgotten, so threads that come and go do not grow the table.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// One call site on one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SiteKey {
    file: Option<&'static str>,
    line: Option<u32>,
    thread: ThreadId,
}

#[derive(Debug)]
struct Site {
    window_start: Instant,
    printed: u32,
    suppressed: u64,
    last_seen: Instant,
    /// How to say what was suppressed: the site's level, target and place.
    level: Level,
    target: String,
    place: String,
}

/// Lines held back at one site, to be reported in one line.
#[derive(Debug, PartialEq, Eq)]
struct Suppressed {
    count: u64,
    level: Level,
    target: String,
    place: String,
    over: Duration,
}

impl Suppressed {
    fn log_to(&self, inner: &dyn Log) {
        inner.log(
            &Record::builder()
                .level(self.level)
                .target(&self.target)
                .args(format_args!(
                    "suppressed {} more lines from {} in the last {:.1}s",
                    self.count,
                    self.place,
                    self.over.as_secs_f64()
                ))
                .build(),
        );
    }
}

impl Site {
    /// Ends the window: what it held back, if anything.
    fn close_window(&mut self, now: Instant) -> Option<Suppressed> {
        let suppressed = (self.suppressed > 0).then(|| Suppressed {
            count: self.suppressed,
            level: self.level,
            target: self.target.clone(),
            place: self.place.clone(),
            over: now.duration_since(self.window_start),
        });
        self.window_start = now;
        self.printed = 0;
        self.suppressed = 0;
        suppressed
    }
}

/// The bookkeeping, apart from any logger so it can be tested with its own clock.
#[derive(Debug, Default)]
struct Limiter {
    sites: Mutex<HashMap<SiteKey, Site>>,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    print: bool,
    /// Report this first: the lines the site held back in the window that just ended.
    report: Option<Suppressed>,
}

impl Limiter {
    fn admit(&self, key: SiteKey, record: &Record<'_>, now: Instant) -> Verdict {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let site = sites.entry(key).or_insert_with(|| Site {
            window_start: now,
            printed: 0,
            suppressed: 0,
            last_seen: now,
            level: record.level(),
            target: record.target().to_owned(),
            place: format!("{}:{}", record.file().unwrap_or("?"), record.line().unwrap_or(0)),
        });
        site.last_seen = now;
        let report = if now.duration_since(site.window_start) >= WINDOW { site.close_window(now) } else { None };
        let print = site.printed < BURST;
        if print {
            site.printed += 1;
        } else {
            site.suppressed += 1;
        }
        Verdict { print, report }
    }

    /// Closes every window that has ended (all of them with `everything`, at exit) and
    /// forgets sites silent for long; returns what they held back.
    fn sweep(&self, now: Instant, everything: bool) -> Vec<Suppressed> {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let reports = sites
            .values_mut()
            .filter(|site| everything || now.duration_since(site.window_start) >= WINDOW)
            .filter_map(|site| site.close_window(now))
            .collect();
        sites.retain(|_, site| now.duration_since(site.last_seen) < FORGET_AFTER);
        reports
    }
}

struct RateLimitedLogger {
    inner: env_logger::Logger,
    limiter: Limiter,
}

impl RateLimitedLogger {
    /// Reports what the sites held back: the ended windows, or everything (at exit).
    fn report_suppressed(&self, everything: bool) {
        for report in self.limiter.sweep(Instant::now(), everything) {
            report.log_to(&self.inner);
        }
    }
}

impl Log for RateLimitedLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        // Debug and trace lines are there only when the operator turned them on (RUST_LOG) to
        // see everything, such as the benchmark reading one timing per control command.
        if record.level() > DEFAULT_MOST_VERBOSE {
            self.inner.log(record);
            return;
        }
        let key = SiteKey { file: record.file_static(), line: record.line(), thread: std::thread::current().id() };
        let verdict = self.limiter.admit(key, record, Instant::now());
        if let Some(report) = verdict.report {
            report.log_to(&self.inner);
        }
        if verdict.print {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.report_suppressed(true);
        self.inner.flush();
    }
}

/// Installs the logger (filter from RUST_LOG, `warn` by default) and a thread that reports
/// suppressed lines once their window has ended. `log::logger().flush()` at exit reports the
/// rest.
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).build();
    let max_level = inner.filter();
    // The logger lives as long as the process; the sweeper shares it without a lock.
    let logger: &'static RateLimitedLogger =
        Box::leak(Box::new(RateLimitedLogger { inner, limiter: Limiter::default() }));
    if log::set_logger(logger).is_err() {
        return;
    }
    log::set_max_level(max_level);
    let sweeper = std::thread::Builder::new().name("rewind-log-sweep".into()).spawn(move || loop {
        std::thread::sleep(WINDOW);
        logger.report_suppressed(false);
    });
    if let Err(e) = sweeper {
        log::warn!("cannot start the log sweeper; suppressed lines are reported when their site logs again: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_at(line: u32) -> Record<'static> {
        Record::builder()
            .level(Level::Warn)
            .target("rewind::test")
            .file_static(Some("src/x.rs"))
            .line(Some(line))
            .args(format_args!("x"))
            .build()
    }

    fn key(line: u32) -> SiteKey {
        SiteKey { file: Some("src/x.rs"), line: Some(line), thread: std::thread::current().id() }
    }

    #[test]
    fn a_flood_prints_a_burst_per_window_and_reports_the_rest() {
        let limiter = Limiter::default();
        let start = Instant::now();
        let record = record_at(7);
        let printed = (0..1000).filter(|_| limiter.admit(key(7), &record, start).print).count();
        assert_eq!(printed, BURST as usize);
        // Another site is not held back by the flood.
        assert!(limiter.admit(key(8), &record_at(8), start).print);

        let next = limiter.admit(key(7), &record, start + WINDOW);
        assert!(next.print);
        let report = next.report.expect("the held-back lines are reported");
        assert_eq!(report.count, 1000 - BURST as u64);
        assert_eq!(report.place, "src/x.rs:7");
        assert_eq!(report.level, Level::Warn);
    }

    #[test]
    fn sweeps_report_ended_windows_and_everything_at_exit() {
        let limiter = Limiter::default();
        let start = Instant::now();
        let record = record_at(1);
        for _ in 0..(BURST + 3) {
            limiter.admit(key(1), &record, start);
        }
        assert!(limiter.sweep(start + WINDOW / 2, false).is_empty(), "the window has not ended");
        let reports = limiter.sweep(start + WINDOW / 2, true);
        assert_eq!(reports.iter().map(|r| r.count).collect::<Vec<_>>(), [3]);
        assert!(limiter.sweep(start + WINDOW * 2, true).is_empty(), "each line is reported once");

        for _ in 0..(BURST + 2) {
            limiter.admit(key(1), &record, start + WINDOW * 2);
        }
        let reports = limiter.sweep(start + WINDOW * 3, false);
        assert_eq!(reports.iter().map(|r| r.count).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn silent_sites_are_forgotten() {
        let limiter = Limiter::default();
        let start = Instant::now();
        limiter.admit(key(1), &record_at(1), start);
        limiter.sweep(start + FORGET_AFTER, false);
        assert!(limiter.sites.lock().unwrap().is_empty());
    }
}
