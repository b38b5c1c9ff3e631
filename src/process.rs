//! Processes we did not start ourselves (daemonized servers, supervisors),
//! reached through pidfds and only after proof of identity.
//!
//! A pid read from a file or from the kernel may belong to a stranger by the
//! time we act on it: the process it named died and the number was reused.
//! So a pid is only ever signalled through a pidfd opened first and then
//! checked: a pidfd pins its process (the number cannot be reused while it
//! is open), and the process behind it is ours only if its start time (and,
//! for a device's server, its open `/dev/ublkcN`) matches what we recorded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The name every ublk-bench process runs under (`/proc/PID/comm`).
pub const COMM: &str = "ublk-bench";

/// A process as recorded: its pid and its start time in clock ticks after
/// boot (`/proc/PID/stat` field 22). No two processes share both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// The process now running under `pid`, if any.
    pub fn of(pid: i32) -> Option<ProcId> {
        let stat = Stat::read(pid)?;
        Some(ProcId { pid, start: stat.start })
    }

    pub fn me() -> ProcId {
        ProcId::of(std::process::id() as i32).expect("/proc/self/stat is readable")
    }

    /// A pidfd for the recorded process, or None if it is gone (a process
    /// with another start time under the same pid is a stranger). A zombie
    /// still counts: its parent has not reaped it yet, and its pidfd will
    /// report the exit at once.
    pub fn open(&self) -> Option<OwnedFd> {
        let fd = pidfd(self.pid)?;
        (ProcId::of(self.pid).as_ref() == Some(self)).then_some(fd)
    }
}

/// What we read of `/proc/PID/stat`.
struct Stat {
    comm: String,
    state: char,
    start: u64,
}

impl Stat {
    fn read(pid: i32) -> Option<Stat> {
        if pid <= 0 {
            return None;
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Stat::parse(&text)
    }

    /// The command name sits in parentheses and may hold spaces or ')', so
    /// the fields after it are found from the last ')'.
    fn parse(text: &str) -> Option<Stat> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_string();
        let mut rest = text.get(close + 1..)?.split_whitespace();
        let state = rest.next()?.chars().next()?;
        // Fields 3.. follow; starttime is field 22, the 20th after the state.
        let start = rest.nth(18)?.parse().ok()?;
        Some(Stat { comm, state, start })
    }
}

/// A pidfd for `pid`, or None if the process is gone. Only safe to signal
/// through once the process behind it has been identified.
fn pidfd(pid: i32) -> Option<OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative return is a fresh fd owned by us.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd for our own child `pid`: a child cannot be reused before we reap it.
pub fn child_pidfd(pid: i32) -> Option<OwnedFd> {
    pidfd(pid)
}

/// The server of device `dev_id` that the kernel names (`ublksrv_pid`), if
/// it still runs: a ublk-bench process holding `/dev/ublkcN` open. The
/// kernel keeps reporting a dead server's pid while the device waits for
/// recovery, and that number may since belong to anyone.
pub fn server_of(dev_id: u32, pid: i32) -> Option<(ProcId, OwnedFd)> {
    let fd = pidfd(pid)?;
    let stat = Stat::read(pid)?;
    let ours = stat.comm == COMM && !matches!(stat.state, 'Z' | 'X') && holds_file(pid, &char_path(dev_id));
    ours.then_some((ProcId { pid, start: stat.start }, fd))
}

fn char_path(dev_id: u32) -> String {
    format!("/dev/ublkc{dev_id}")
}

/// True if `pid` has `path` open.
pub fn holds_file(pid: i32, path: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == path))
}

/// Pids of every process that has `path` open.
pub fn openers(path: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    let mut pids: Vec<i32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| holds_file(pid, path))
        .collect();
    pids.sort_unstable();
    pids
}

/// The command name of `pid`, for messages.
pub fn comm(pid: i32) -> String {
    Stat::read(pid).map_or_else(|| "?".into(), |s| s.comm)
}

/// Sends `sig` through a pidfd whose process has been identified.
pub fn signal(fd: &OwnedFd, sig: i32) -> bool {
    // SAFETY: plain syscall on a pidfd we own; the pidfd pins the process.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, 0, 0) == 0 }
}

/// Waits until the process behind `fd` exits; false on timeout.
pub fn wait_pidfd(fd: &OwnedFd, timeout: Option<Duration>) -> bool {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: pfd is valid for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return r > 0;
        }
    }
}

/// Waits up to `timeout` for the process behind `fd` to exit, then SIGKILLs
/// it and waits for that too.
pub fn reap_or_kill(fd: &OwnedFd, timeout: Duration) {
    if !wait_pidfd(fd, Some(timeout)) {
        kill_and_wait(fd, Duration::from_secs(5));
    }
}

/// SIGKILLs the process behind `fd` and waits up to `timeout` for it to exit.
pub fn kill_and_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    signal(fd, libc::SIGKILL);
    wait_pidfd(fd, Some(timeout))
}

/// Set once SIGINT or SIGTERM arrived, after [`catch_interrupts`].
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM only set [`INTERRUPTED`], with no SA_RESTART, so a
/// blocking call the signal lands in returns (EINTR) and the command stops
/// at its next check and cleans up (`del`, `downtime`).
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is plain data; the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let mut fields = vec!["0"; 50];
        fields[18] = "123456";
        let text = format!("42 (a b) c)) S {}", fields.join(" "));
        let s = Stat::parse(&text).unwrap();
        assert_eq!((s.comm.as_str(), s.state, s.start), ("a b) c)", 'S', 123456));
    }

    #[test]
    fn own_identity_checks_out_and_a_stale_one_does_not() {
        let me = ProcId::me();
        assert!(me.open().is_some());
        let stale = ProcId { start: me.start + 1, ..me };
        assert!(stale.open().is_none(), "a different start time is a different process");
        assert!(ProcId::of(-1).is_none());
    }

    #[test]
    fn a_foreign_process_is_not_a_server() {
        // This test binary is not called ublk-bench and holds no /dev/ublkcN.
        assert!(server_of(7, std::process::id() as i32).is_none());
    }
}
