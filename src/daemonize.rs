//! Daemonizing: starting a server (or a supervisor) in the background and
//! waiting for it. `add` re-executes itself as `__serve` in a new session and
//! waits on a pipe until the child reports the device LIVE or fails.
//!
//! The child writes lines: `id N` right after ADD_DEV (so the parent can
//! clean up if the child dies), `ready N` when a successor server has
//! prepared everything it can before taking over, `handed N` when such a
//! successor was handed the device ([`Spawned::hand_over`]), then `ok N` or
//! `err MESSAGE`. EOF without
//! `ok` means the child died; the parent then reaps it and deletes the
//! half-made device, so a failed `add` leaves nothing behind.
//!
//! `recover` forks its server instead ([`fork_server`]): the child is this
//! very process image, already loaded and past its argument parsing, so a
//! cold recovery pays for one process start rather than two.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::config::DeviceConfig;
use crate::error::{Error, Result};
use crate::run_files;

/// The signal `restart` sends its prepared successor to hand it the device
/// ([`Spawned::hand_over`]). Blocked in every thread of a successor and read
/// from a signalfd (`server_process`); a standby never gets it.
pub const HANDOVER_SIGNAL: i32 = libc::SIGUSR2;

/// The child's end of the pipe. Dropping it closes the pipe.
pub struct Notifier(Option<File>);

impl Notifier {
    pub fn none() -> Self {
        Notifier(None)
    }

    /// Takes the write end of the parent's pipe, passed as `fd`, and marks
    /// it close-on-exec so that no server or standby we start inherits it:
    /// the parent must see EOF the moment this process dies.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor this process owns and no one else closes.
    pub unsafe fn from_fd(fd: i32) -> Self {
        // SAFETY: the caller hands over ownership of fd.
        let file = unsafe { File::from_raw_fd(fd) };
        set_cloexec(file.as_raw_fd(), true);
        Notifier(Some(file))
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

    pub fn handed(&mut self, dev_id: u32) {
        self.send(&format!("handed {dev_id}"));
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

/// Starts `ublk-bench __serve` (or `__supervise`) detached and returns the
/// device id once LIVE. If it fails, the child is reaped and any half-made
/// device deleted with the processes serving it.
pub fn spawn_server(args: &[String], timeout: Duration) -> Result<u32> {
    let mut s = Spawned::start(args)?;
    let res = s.wait_live(timeout);
    if res.is_err() {
        s.kill_and_reap();
        if let Some(id) = s.dev_id {
            crate::teardown::delete_half_made(id);
        }
    }
    res
}

/// A child `ublk-bench` process that reports on a pipe.
pub struct Spawned {
    pub child: Proc,
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
        Ok(Spawned::new(Proc::Exec(child), read_end))
    }

    fn new(child: Proc, read_end: OwnedFd) -> Self {
        Spawned { child, pipe: File::from(read_end), text: String::new(), dev_id: None }
    }

    pub fn pid(&self) -> i32 {
        self.child.id()
    }

    /// Waits for `id N` (the device exists) or for what ends `wait_live`.
    pub fn wait_added(&mut self, timeout: Duration) -> Result<u32> {
        self.wait_for("id ", timeout)
    }

    /// Waits for `ok N` (Ok(N)), `err MSG`, EOF or the deadline.
    pub fn wait_live(&mut self, timeout: Duration) -> Result<u32> {
        self.wait_for("ok ", timeout)
    }

    /// Waits for `ready N` (a successor prepared) or for what ends `wait_live`.
    pub fn wait_prepared(&mut self, timeout: Duration) -> Result<u32> {
        self.wait_for("ready ", timeout)
    }

    /// Hands the device to a prepared successor: it stops dying with this
    /// process, since from the moment the old server is told to go (or
    /// killed) it is the device's only server. Returns once it says so:
    /// true, or false when it already took the device over (the old server
    /// died meanwhile).
    pub fn hand_over(&mut self, timeout: Duration) -> Result<bool> {
        // SAFETY: kill takes plain integers; the child is ours and unreaped,
        // so its pid is still its own.
        if unsafe { libc::kill(self.pid(), HANDOVER_SIGNAL) } != 0 {
            return Err(Error::io("signal the new server", std::io::Error::last_os_error()));
        }
        match self.wait_for("handed ", timeout) {
            Ok(_) => Ok(true),
            Err(_) if self.text.lines().any(|l| l.starts_with("ok ")) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<u32> {
        let outcome = read_lines(&mut self.pipe, &mut self.text, prefix, timeout);
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
            (None, Ok(())) => Error::Refused(format!(
                "the server process {} ended ({}) before the device went LIVE: see {}",
                self.pid(),
                self.exit_status(),
                run_files::log_path().display()
            )),
        })
    }

    /// How the child ended, once its pipe said EOF (it is exiting).
    fn exit_status(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        "it closed its pipe".into()
    }

    pub fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process: started by exec, or forked from this one.
pub enum Proc {
    Exec(Child),
    Fork(i32),
}

impl Proc {
    pub fn id(&self) -> i32 {
        match self {
            Proc::Exec(c) => c.id() as i32,
            Proc::Fork(pid) => *pid,
        }
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Proc::Exec(c) => c.try_wait(),
            Proc::Fork(pid) => waitpid(*pid, libc::WNOHANG),
        }
    }

    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Proc::Exec(c) => c.wait(),
            Proc::Fork(pid) => waitpid(*pid, 0).map(|s| s.expect("waitpid without WNOHANG returns a status")),
        }
    }

    /// SIGKILL; the child is ours and unreaped, so its pid is still its own.
    pub fn kill(&mut self) -> std::io::Result<()> {
        match self {
            Proc::Exec(c) => c.kill(),
            // SAFETY: kill takes plain integers.
            Proc::Fork(pid) => match unsafe { libc::kill(*pid, libc::SIGKILL) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            },
        }
    }
}

fn waitpid(pid: i32, flags: i32) -> std::io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid int for the call.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            0 => return Ok(None),
            p if p == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Starts a detached server that runs `serve` in a child forked from this
/// process, with no exec: the same daemon as [`Spawned::start`] gives
/// (own session, working folder `/`, output in the server log, the notify
/// pipe), without a second process start. None when this process has more
/// than one thread, where a fork is unsafe: then use [`Spawned::start`].
pub fn fork_server(serve: impl FnOnce(Notifier) -> Result<()>) -> Result<Option<Spawned>> {
    if !single_threaded() {
        return Ok(None);
    }
    let (read_end, write_end) = pipe()?;
    run_files::ensure_run_dir()?;
    let log = run_files::open_append(&run_files::log_path()).map_err(|e| Error::io("open server log", e))?;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: this process has one thread (checked above), so the child's
    // copy of every lock and of the allocator is consistent.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork the server process", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            run_forked(log, write_end, serve)
        }
        pid => Ok(Some(Spawned::new(Proc::Fork(pid), read_end))),
    }
}

/// The forked child: becomes the daemon, serves, and exits; it never
/// returns into its parent's caller.
fn run_forked(log: File, write_end: OwnedFd, serve: impl FnOnce(Notifier) -> Result<()>) -> ! {
    let null = File::open("/dev/null");
    // SAFETY: dup2 onto the standard descriptors, from files we hold open.
    unsafe {
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
        }
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    drop((null, log));
    detach();
    set_cloexec(write_end.as_raw_fd(), true);
    let notify = Notifier(Some(File::from(write_end)));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(notify)));
    let code = match res {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("ublk-bench: error: {e}");
            1
        }
        Err(_) => 101,
    };
    std::process::exit(code)
}

/// True when this process runs one thread (`/proc/self/task` has one entry).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

fn spawn_child(args: &[String], write_end: &OwnedFd) -> Result<Child> {
    run_files::ensure_run_dir()?;
    let log = run_files::open_append(&run_files::log_path()).map_err(|e| Error::io("open server log", e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("find own executable", e))?;
    let fd = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .args(["--notify-fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io("dup log", e))?)
        .stderr(log);
    // SAFETY: runs in the forked child before exec and only calls fcntl,
    // which is async-signal-safe: the write end is passed on to this child
    // alone (every other process we start gets it closed at exec).
    unsafe {
        cmd.pre_exec(move || {
            set_cloexec(fd, false);
            Ok(())
        })
    };
    cmd.spawn().map_err(|e| Error::io("start the server process", e))
}

/// The arguments that start a server for a new device.
pub fn serve_args(cfg: &DeviceConfig) -> Vec<String> {
    vec!["__serve".into(), "--config".into(), serde_json::to_string(cfg).expect("config serializes")]
}

/// Reads until EOF, a `prefix` or final `ok`/`err` line, or `timeout`.
fn read_lines(reader: &mut File, text: &mut String, prefix: &str, timeout: Duration) -> Result<()> {
    let mut buf = [0u8; 512];
    let began = Instant::now();
    loop {
        if text.lines().any(|l| l.starts_with(prefix) || l.starts_with("ok ") || l.starts_with("err ")) {
            return Ok(());
        }
        let left = timeout.saturating_sub(began.elapsed());
        if left.is_zero() || !readable(reader, left) {
            return Err(Error::Refused(format!(
                "the server did not report within {:.1}s: see {}",
                began.elapsed().as_secs_f64(),
                run_files::log_path().display()
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

/// A pipe, both ends close-on-exec; `spawn_child` hands the write end to
/// one child only.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: i32, on: bool) {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl on a descriptor the caller owns; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
}

/// Detaches the server from the caller's session and terminal, and from
/// its working folder: a daemon holds no folder busy and writes nothing
/// (a core file included) where the user ran `add`. Every path in the
/// settings is absolute.
pub fn detach() {
    // SAFETY: setsid has no memory preconditions; failure (already a leader) is harmless.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
}
