//! Daemonizing: `add` re-executes itself as `__serve` in a new session and
//! waits on a pipe until the child reports the device LIVE or fails.
//!
//! The child writes lines: `id N` right after ADD_DEV (so the parent can
//! clean up if the child dies), `ready N` when a successor server has
//! prepared everything it can before taking over, then `ok N` or
//! `err MESSAGE`. EOF without
//! `ok` means the child died; the parent then reaps it and deletes the
//! half-made device, so a failed `add` leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::DeviceConfig;
use crate::error::{Error, Result};
use crate::{log, settings};

/// The child's end of the pipe. Dropping it closes the pipe.
pub struct Notifier(Option<File>);

impl Notifier {
    pub fn none() -> Self {
        Notifier(None)
    }

    /// # Safety
    /// `fd` must be an open file descriptor this process owns and no one else closes.
    pub unsafe fn from_fd(fd: i32) -> Self {
        // SAFETY: the caller hands over ownership of fd.
        Notifier(Some(unsafe { File::from_raw_fd(fd) }))
    }

    pub fn send(&mut self, line: &str) {
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    pub fn added(&mut self, dev_id: u32) {
        self.send(&format!("id {dev_id}"));
    }

    pub fn prepared(&mut self, dev_id: u32) {
        self.send(&format!("ready {dev_id}"));
    }

    pub fn live(&mut self, dev_id: u32) {
        self.send(&format!("ok {dev_id}"));
        self.0 = None;
    }

    pub fn failed(&mut self, err: &Error) {
        self.send(&format!("err {}", err.to_string().replace('\n', " ")));
        self.0 = None;
    }
}

/// Where daemonized servers write their log.
pub fn log_path() -> std::path::PathBuf {
    settings::run_dir().join("server.log")
}

/// Starts `ublk-bench __serve` detached and returns the device id once LIVE.
/// If it fails, the child is reaped and any half-made device deleted.
pub fn spawn_server(args: &[String], timeout: Duration) -> Result<u32> {
    let mut s = Spawned::start(args)?;
    let res = s.wait_live(timeout);
    if res.is_err() {
        s.kill_and_reap();
        if let Some(id) = s.dev_id {
            cleanup_half_made(id);
        }
    }
    res
}

/// A child `ublk-bench` process that reports on a pipe.
pub struct Spawned {
    pub child: Child,
    pipe: File,
    text: String,
    pub dev_id: Option<u32>,
}

impl Spawned {
    /// Runs `ublk-bench ARGS --notify-fd N` with its output in the server log.
    pub fn start(args: &[String]) -> Result<Self> {
        let (read_end, write_end) = pipe()?;
        let child = spawn_child(args, &write_end)?;
        drop(write_end);
        Ok(Spawned { child, pipe: File::from(read_end), text: String::new(), dev_id: None })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for `ok N` (Ok(N)), `err MSG`, EOF or the deadline.
    pub fn wait_live(&mut self, timeout: Duration) -> Result<u32> {
        self.wait_for("ok ", timeout)
    }

    /// Waits for `ready N` (a successor prepared) or for what ends `wait_live`.
    pub fn wait_prepared(&mut self, timeout: Duration) -> Result<u32> {
        self.wait_for("ready ", timeout)
    }

    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        let outcome = read_lines(&mut self.pipe, &mut self.text, prefix, deadline);
        for line in self.text.lines() {
            if let Some(id) = line.strip_prefix("id ").and_then(|s| s.parse().ok()) {
                self.dev_id = Some(id);
            }
            if let Some(id) = line.strip_prefix(prefix).and_then(|s| s.parse().ok()) {
                return Ok(id);
            }
        }
        let err = self.text.lines().find_map(|l| l.strip_prefix("err ")).map(str::to_owned);
        Err(match (err, outcome) {
            (Some(msg), _) => Error::Relayed(msg),
            (None, Err(e)) => e,
            (None, Ok(())) => Error::invalid(format!(
                "the server exited before the device went LIVE: see {}",
                log_path().display()
            )),
        })
    }

    pub fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(args: &[String], write_end: &OwnedFd) -> Result<Child> {
    std::fs::create_dir_all(settings::run_dir()).map_err(|e| Error::io("create run folder", e))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())
        .map_err(|e| Error::io("open server log", e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("find own executable", e))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(write_end);
    Command::new(exe)
        .args(args)
        .args(["--notify-fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io("dup log", e))?)
        .stderr(log)
        .spawn()
        .map_err(|e| Error::io("start the server process", e))
}

/// The arguments that start a server for a new device.
pub fn serve_args(cfg: &DeviceConfig) -> Vec<String> {
    vec!["__serve".into(), "--config".into(), serde_json::to_string(cfg).expect("config serializes")]
}

/// Reads until EOF, a `prefix` or final `ok`/`err` line, or the deadline.
fn read_lines(reader: &mut File, text: &mut String, prefix: &str, deadline: Instant) -> Result<()> {
    let mut buf = [0u8; 512];
    loop {
        if text.lines().any(|l| l.starts_with(prefix) || l.starts_with("ok ") || l.starts_with("err ")) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(reader, left) {
            return Err(Error::invalid(format!(
                "the server did not report LIVE within {}s: see {}",
                (deadline - Instant::now().min(deadline)).as_secs(),
                log_path().display()
            )));
        }
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read from the server", e)),
        }
    }
}

fn readable(f: &File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(f), events: libc::POLLIN, revents: 0 };
    // SAFETY: pfd is valid for the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) > 0 }
}

/// Deletes a device whose server died during start; the server is gone, so
/// DEL_DEV cannot wait on its references.
fn cleanup_half_made(dev_id: u32) {
    let cfg = settings::load(dev_id).ok();
    if let Ok(mut ctrl) = crate::ctrl::Ctrl::open().inspect_err(|e| log!("cleanup of device {dev_id}: {e}")) {
        let _ = ctrl.del(dev_id);
    }
    settings::remove(dev_id);
    if let Some(store) = cfg.and_then(|c| c.store) {
        let _ = std::fs::remove_file(store);
    }
}

/// A pipe whose read end is close-on-exec and whose write end is inherited.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&r), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((r, w))
}

/// Detaches the server from the caller's session and terminal.
pub fn detach() {
    // SAFETY: setsid has no memory preconditions; failure (already a leader) is harmless.
    unsafe { libc::setsid() };
}
