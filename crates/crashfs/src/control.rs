//! The control socket: one command a line, one answer a line (`ok ...` or `err ...`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::{Control, Fault, Model};

pub(crate) struct Listener {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

pub(crate) fn listen(path: &Path, control: Arc<Control>) -> io::Result<Listener> {
    // A socket left by a run that was killed would make bind fail; anything else is not ours.
    if std::fs::symlink_metadata(path).is_ok_and(|md| md.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let thread = thread::Builder::new().name("crashfs-control".into()).spawn(move || {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match stream {
                Ok(stream) => {
                    let control = control.clone();
                    let spawned =
                        thread::Builder::new().name("crashfs-client".into()).spawn(move || serve(stream, &control));
                    if let Err(e) = spawned {
                        log::error!("control socket: {e}");
                    }
                }
                Err(e) => log::error!("control socket: {e}"),
            }
        }
    })?;
    Ok(Listener { path: path.to_path_buf(), stopping, thread })
}

impl Listener {
    pub(crate) fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        // accept() only returns for a connection: make one.
        if UnixStream::connect(&self.path).is_ok() && self.thread.join().is_err() {
            log::error!("the control socket thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("removing {}: {e}", self.path.display());
        }
    }
}

fn serve(stream: UnixStream, control: &Control) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(e) => return log::error!("control socket: {e}"),
    };
    for line in BufReader::new(stream).lines() {
        let answer = match line {
            Ok(line) => answer(control, &line),
            Err(e) => return log::warn!("control socket: {e}"),
        };
        if writeln!(writer, "{answer}").is_err() {
            return;
        }
    }
}

const COMMANDS: &str = "crash [MODEL], stats, sync-all, fail OP NTH ERRNO once|forever, clear, counts";

fn answer(control: &Control, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        ["crash"] => control.crash(control.model).map(|report| report.to_string()),
        ["crash", model] => model.parse::<Model>().and_then(|model| control.crash(model)).map(|r| r.to_string()),
        ["stats"] => control.stats().map(|stats| stats.to_string()),
        ["sync-all"] => control.sync_all().map(|()| String::new()),
        ["fail", fault @ ..] => {
            let fault = fault.join(" ").parse::<Fault>();
            fault.and_then(|fault| control.inject(fault)).map(|()| String::new())
        }
        ["clear"] => {
            control.clear_faults();
            Ok(String::new())
        }
        ["counts"] => Ok(control.op_counts().to_string()),
        _ => return format!("err unknown command {line:?} ({COMMANDS})"),
    };
    match result {
        Ok(text) if text.is_empty() => "ok".to_string(),
        Ok(text) => format!("ok {text}"),
        Err(e) => format!("err {e}"),
    }
}

/// Sends one command to the control socket at `socket` and returns the answer line.
pub fn request(socket: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    writeln!(stream, "{command}")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}
