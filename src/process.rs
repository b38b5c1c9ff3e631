//! Watching processes we do not own (daemonized servers) through pidfds.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd for `pid`, or None if the process is gone.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative return is a fresh fd owned by us.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `fd` exits; false on timeout.
pub fn wait_pidfd(fd: &OwnedFd, timeout: Option<Duration>) -> bool {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: pfd is valid for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return r > 0;
        }
    }
}

/// True if `pid` runs; a zombie (exited, not yet reaped) counts as dead.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence; pid > 0 excludes groups.
    if pid <= 0 || unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Waits up to `timeout` for `pid` to exit, then SIGKILLs it.
pub fn reap_or_kill(pid: i32, timeout: Duration) {
    let Some(fd) = pidfd(pid) else { return };
    if !wait_pidfd(&fd, Some(timeout)) {
        // SAFETY: plain syscall; the pidfd pins the pid so we cannot hit a reused one.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SIGKILL,
                0,
                0,
            )
        };
        wait_pidfd(&fd, Some(Duration::from_secs(5)));
    }
}
