//! I/O fault injection: the n-th operation of a kind fails with a chosen errno, once or from
//! then on, without being carried out. Every operation is counted, armed or not.

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::Error;

/// A file-system operation a fault can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A FUSE write request, or a copy_file_range request (it writes too).
    Write,
    /// fsync(2) of a file or a directory.
    Fsync,
    /// fdatasync(2) of a file or a directory.
    Fdatasync,
    /// fallocate(2), any mode.
    Fallocate,
    /// rename(2) and renameat2(2).
    Rename,
    /// A size change: truncate(2), ftruncate(2), open(2) with O_TRUNC of an existing file.
    Truncate,
}

impl Op {
    pub const ALL: [Op; 6] = [Op::Write, Op::Fsync, Op::Fdatasync, Op::Fallocate, Op::Rename, Op::Truncate];

    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Fsync => "fsync",
            Op::Fdatasync => "fdatasync",
            Op::Fallocate => "fallocate",
            Op::Rename => "rename",
            Op::Truncate => "truncate",
        }
    }

    /// The fsync request for `datasync`: fdatasync(2) or fsync(2).
    pub(crate) fn sync(datasync: bool) -> Op {
        if datasync {
            Op::Fdatasync
        } else {
            Op::Fsync
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = Error;

    fn from_str(s: &str) -> Result<Op, Error> {
        Op::ALL.into_iter().find(|op| op.name() == s).ok_or_else(|| Error::UnknownOp(s.to_string()))
    }
}

/// Whether a fault fails one operation or every one from the n-th on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persist {
    /// Only the n-th operation fails; the ones after it are carried out.
    Once,
    /// The n-th operation and every later one fail, until the faults are cleared.
    Forever,
}

impl fmt::Display for Persist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Persist::Once => "once",
            Persist::Forever => "forever",
        })
    }
}

impl FromStr for Persist {
    type Err = Error;

    fn from_str(s: &str) -> Result<Persist, Error> {
        match s {
            "once" => Ok(Persist::Once),
            "forever" => Ok(Persist::Forever),
            _ => Err(Error::BadFault(format!("{s:?} is neither once nor forever"))),
        }
    }
}

/// The `nth` operation of kind `op` (1 = the next one) fails with `errno`; with
/// `Persist::Forever`, every one after it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub op: Op,
    pub nth: u64,
    pub errno: i32,
    pub persist: Persist,
}

impl Fault {
    /// Rejects what no operation can fail with: `nth` 0, and errnos the kernel would refuse
    /// (not in 1..512) or take as "not implemented, never ask again" (ENOSYS).
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.nth == 0 {
            return Err(Error::BadFault("nth counts from 1 (the next operation)".into()));
        }
        if !(1..512).contains(&self.errno) {
            return Err(Error::BadFault(format!("errno {} is not in 1..512", self.errno)));
        }
        if self.errno == libc::ENOSYS {
            return Err(Error::BadFault("ENOSYS would make the kernel stop sending the operation for good".into()));
        }
        Ok(())
    }
}

/// `OP NTH ERRNO once|forever`, as the control socket's `fail` command takes it.
impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ", self.op, self.nth)?;
        match errno_name(self.errno) {
            Some(name) => f.write_str(name)?,
            None => write!(f, "{}", self.errno)?,
        }
        write!(f, " {}", self.persist)
    }
}

impl FromStr for Fault {
    type Err = Error;

    /// `OP NTH ERRNO once|forever`; ERRNO is a number or a name (`EIO`, `ENOSPC`, ...).
    fn from_str(s: &str) -> Result<Fault, Error> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let [op, nth, errno, persist] = words.as_slice() else {
            return Err(Error::BadFault(format!("{s:?}: expected OP NTH ERRNO once|forever")));
        };
        let fault = Fault {
            op: op.parse()?,
            nth: nth.parse().map_err(|_| Error::BadFault(format!("{nth:?} is not a count")))?,
            errno: parse_errno(errno)?,
            persist: persist.parse()?,
        };
        fault.check()?;
        Ok(fault)
    }
}

const ERRNO_NAMES: [(&str, i32); 16] = [
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EDQUOT", libc::EDQUOT),
    ("EROFS", libc::EROFS),
    ("EFBIG", libc::EFBIG),
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("EAGAIN", libc::EAGAIN),
    ("EINTR", libc::EINTR),
    ("ENOMEM", libc::ENOMEM),
    ("EBUSY", libc::EBUSY),
    ("EINVAL", libc::EINVAL),
    ("EBADF", libc::EBADF),
    ("ENOENT", libc::ENOENT),
    ("EEXIST", libc::EEXIST),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
];

fn errno_name(errno: i32) -> Option<&'static str> {
    ERRNO_NAMES.iter().find(|(_, n)| *n == errno).map(|(name, _)| *name)
}

fn parse_errno(s: &str) -> Result<i32, Error> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    ERRNO_NAMES.iter().find(|(name, _)| name.eq_ignore_ascii_case(s)).map(|(_, n)| *n).ok_or_else(|| {
        let names: Vec<&str> = ERRNO_NAMES.iter().map(|(name, _)| *name).collect();
        Error::BadFault(format!("unknown errno {s:?} (a number or one of {})", names.join(", ")))
    })
}

/// How many operations of each kind the file system has carried out (or failed) since it was
/// mounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub write: u64,
    pub fsync: u64,
    pub fdatasync: u64,
    pub fallocate: u64,
    pub rename: u64,
    pub truncate: u64,
}

impl OpCounts {
    pub fn get(&self, op: Op) -> u64 {
        match op {
            Op::Write => self.write,
            Op::Fsync => self.fsync,
            Op::Fdatasync => self.fdatasync,
            Op::Fallocate => self.fallocate,
            Op::Rename => self.rename,
            Op::Truncate => self.truncate,
        }
    }

    fn get_mut(&mut self, op: Op) -> &mut u64 {
        match op {
            Op::Write => &mut self.write,
            Op::Fsync => &mut self.fsync,
            Op::Fdatasync => &mut self.fdatasync,
            Op::Fallocate => &mut self.fallocate,
            Op::Rename => &mut self.rename,
            Op::Truncate => &mut self.truncate,
        }
    }
}

/// `write=N fsync=N fdatasync=N fallocate=N rename=N truncate=N`
impl fmt::Display for OpCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{op}={}", self.get(op))?;
        }
        Ok(())
    }
}

impl FromStr for OpCounts {
    type Err = Error;

    /// What `Display` writes (the control socket's answer to `counts`, without `ok`).
    fn from_str(s: &str) -> Result<OpCounts, Error> {
        let bad = || Error::BadCounts(s.to_string());
        let mut counts = OpCounts::default();
        let mut seen = 0;
        for word in s.split_whitespace() {
            let (op, n) = word.split_once('=').ok_or_else(bad)?;
            *counts.get_mut(op.parse().map_err(|_| bad())?) = n.parse().map_err(|_| bad())?;
            seen += 1;
        }
        if seen != Op::ALL.len() {
            return Err(bad());
        }
        Ok(counts)
    }
}

/// The counts and the armed fault, behind the mount's fault lock.
#[derive(Default)]
pub(crate) struct Faults {
    counts: OpCounts,
    /// The fault and the count of its kind when it was armed.
    armed: Option<(Fault, u64)>,
}

impl Faults {
    pub(crate) fn inject(&mut self, fault: Fault) -> Result<(), Error> {
        fault.check()?;
        self.armed = Some((fault, self.counts.get(fault.op)));
        Ok(())
    }

    pub(crate) fn clear(&mut self) {
        self.armed = None;
    }

    pub(crate) fn counts(&self) -> OpCounts {
        self.counts.clone()
    }

    /// Counts one operation of kind `op`, and fails it if the armed fault says so.
    pub(crate) fn hit(&mut self, op: Op) -> io::Result<()> {
        let count = self.counts.get_mut(op);
        *count += 1;
        let Some((fault, base)) = self.armed else { return Ok(()) };
        if fault.op != op {
            return Ok(());
        }
        let k = *count - base;
        if k == fault.nth || (k > fault.nth && fault.persist == Persist::Forever) {
            log::info!("injected fault: {op} #{k} fails with errno {}", fault.errno);
            return Err(io::Error::from_raw_os_error(fault.errno));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_print() {
        let fault: Fault = "fdatasync 3 ENOSPC forever".parse().unwrap();
        assert_eq!(fault, Fault { op: Op::Fdatasync, nth: 3, errno: libc::ENOSPC, persist: Persist::Forever });
        assert_eq!(fault.to_string(), "fdatasync 3 ENOSPC forever");
        assert_eq!("write 1 5 once".parse::<Fault>().unwrap().errno, libc::EIO);
        assert_eq!("write 1 eio once".parse::<Fault>().unwrap().errno, libc::EIO);
        for bad in ["write 0 EIO once", "write 1 0 once", "write 1 38 once", "write 1 512 once", "write 1 EIO twice"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        assert!("sync 1 EIO once".parse::<Fault>().is_err());
        for op in Op::ALL {
            assert_eq!(op.to_string().parse::<Op>().unwrap(), op);
        }
    }

    #[test]
    fn counts_print_and_parse() {
        let counts = OpCounts { write: 1, fsync: 2, fdatasync: 3, fallocate: 4, rename: 5, truncate: 6 };
        assert_eq!(counts.to_string(), "write=1 fsync=2 fdatasync=3 fallocate=4 rename=5 truncate=6");
        assert_eq!(counts.to_string().parse::<OpCounts>().unwrap(), counts);
        assert!("write=1".parse::<OpCounts>().is_err());
    }

    #[test]
    fn the_nth_operation_from_inject_fails() {
        let mut faults = Faults::default();
        faults.hit(Op::Write).unwrap();
        faults.inject(Fault { op: Op::Write, nth: 2, errno: libc::EIO, persist: Persist::Once }).unwrap();
        faults.hit(Op::Fsync).unwrap();
        faults.hit(Op::Write).unwrap();
        assert_eq!(faults.hit(Op::Write).unwrap_err().raw_os_error(), Some(libc::EIO));
        faults.hit(Op::Write).unwrap();
        faults.inject(Fault { op: Op::Write, nth: 1, errno: libc::ENOSPC, persist: Persist::Forever }).unwrap();
        for _ in 0..3 {
            assert_eq!(faults.hit(Op::Write).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        }
        faults.clear();
        faults.hit(Op::Write).unwrap();
        assert_eq!(faults.counts().write, 8);
        assert_eq!(faults.counts().fsync, 1);
    }
}
