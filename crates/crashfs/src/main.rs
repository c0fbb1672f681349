//! crashfs mount --backing DIR --mountpoint DIR [--control SOCKET] [--model MODEL]
//! crashfs ctl SOCKET COMMAND...

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use crashfs::{Model, Mount};

const USAGE: &str = "usage:
  crashfs mount --backing DIR --mountpoint DIR [--control SOCKET] [--model MODEL]
      serves until SIGTERM, SIGINT or SIGHUP, then unmounts; MODEL is data,
      data-and-metadata (the default), torn or torn:SEED
  crashfs ctl SOCKET COMMAND...
      sends one command (crash [MODEL], stats, sync-all, fail OP NTH ERRNO
      once|forever, clear, counts) and prints the answer; exits 1 if the answer
      is an error
environment: CRASHFS_LOG=error|warn|info|debug (default warn)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("mount") => mount(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("ctl") => ctl(&args[1..]),
        _ => Err(anyhow!("{USAGE}")),
    };
    result.unwrap_or_else(|e| {
        eprintln!("crashfs: {e:#}");
        ExitCode::from(2)
    })
}

fn ctl(args: &[String]) -> Result<ExitCode> {
    let [socket, command @ ..] = args else { bail!("{USAGE}") };
    if command.is_empty() {
        bail!("{USAGE}");
    }
    let answer = crashfs::request(socket.as_ref(), &command.join(" ")).with_context(|| format!("asking {socket}"))?;
    println!("{answer}");
    Ok(if answer.starts_with("ok") { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn mount(args: &[String]) -> Result<()> {
    let (mut backing, mut mountpoint, mut socket, mut model) = (None, None, None, Model::default());
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--backing" => backing = Some(PathBuf::from(value()?)),
            "--mountpoint" => mountpoint = Some(PathBuf::from(value()?)),
            "--control" => socket = Some(PathBuf::from(value()?)),
            "--model" => model = value()?.parse()?,
            _ => bail!("unknown argument {flag}\n{USAGE}"),
        }
    }
    let (Some(backing), Some(mountpoint)) = (backing, mountpoint) else { bail!("{USAGE}") };
    log::set_logger(&LOGGER).map_err(|e| anyhow!("{e}"))?;
    log::set_max_level(log_level());

    // Blocked before any thread starts, so that every thread inherits the mask and the
    // signals wait for sigtimedwait below instead of killing the process with the mount up.
    let signals = signal_set()?;
    let mut mount = Mount::start(&backing, &mountpoint, model)?;
    if let Some(socket) = &socket {
        mount.listen(socket)?;
    }
    eprintln!("crashfs: {} mounted on {} (model {model})", backing.display(), mountpoint.display());
    loop {
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        // SAFETY: `signals` is an initialised set; a null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) };
        if signal > 0 {
            break;
        }
        if !mount.is_mounted() {
            bail!("{} was unmounted from outside", mountpoint.display());
        }
    }
    mount.unmount()?;
    Ok(())
}

fn signal_set() -> Result<libc::sigset_t> {
    // SAFETY: sigemptyset initialises the set we own before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("blocking signals: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn log_level() -> log::LevelFilter {
    match std::env::var("CRASHFS_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Warn,
    }
}

struct StderrLog;
static LOGGER: StderrLog = StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("crashfs: {} {}: {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}
