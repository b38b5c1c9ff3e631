//! `add --supervise` / `--standby`: a small process that owns the server as
//! its child, watches it through a pidfd and, when it dies while the device
//! still exists, brings up a new server at once.
//!
//! - Cold (`--supervise`): after the crash it forks a recovering server
//!   (no exec, as `recover` does).
//! - Hot (`--standby`): a standby child has already mapped the backend and
//!   built its queue rings; it watches the server's pidfd itself and takes
//!   over the moment the server dies. The supervisor then makes the next
//!   standby. If the standby fails, the supervisor falls back to cold.
//!
//! A server that exits after deleting its device (SIGTERM, `del`) ends the
//! supervisor. Too many crashes in a window make it give up and leave the
//! device QUIESCED for a person to look at. SIGTERM ends the supervisor and
//! its standby, never the server: `del` sends it before DEL_DEV.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::clock::now_ns;
use crate::config::DeviceConfig;
use crate::ctrl::Ctrl;
use crate::daemonize::{self, Notifier, Spawned};
use crate::error::{Error, Result};
use crate::process::{self, ProcId};
use crate::{log, run_files, server_process, sys};

/// Give up after this many crashes within [`CRASH_WINDOW`].
pub const MAX_CRASHES: usize = 50;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

struct Supervisor {
    dev_id: u32,
    server: Spawned,
    standby: Option<Spawned>,
    use_standby: bool,
    crashes: VecDeque<Instant>,
    signals: OwnedFd,
}

/// Runs the supervisor of a new device; `notify` is `add`'s pipe.
pub fn run(cfg: &DeviceConfig, use_standby: bool, mut notify: Notifier) -> Result<()> {
    let signals = signalfd()?;
    let mut server = Spawned::start(&daemonize::serve_args(cfg))?;
    // `add` learns the id at once, so it can clean up if we die.
    if let Ok(id) = server.wait_added(LIVE_TIMEOUT) {
        notify.added(id);
    }
    let dev_id = match server.wait_live(LIVE_TIMEOUT) {
        Ok(id) => id,
        Err(e) => {
            notify.failed(&e);
            server.kill_and_reap();
            return Err(e);
        }
    };
    run_files::save_supervisor(dev_id)?;
    let mut sup =
        Supervisor { dev_id, server, standby: None, use_standby, crashes: VecDeque::new(), signals };
    sup.refresh_standby();
    notify.live(dev_id);
    log!("supervisor of device {dev_id}: watching server pid {}", sup.server.pid());
    let res = sup.watch();
    sup.end_standby();
    let _ = std::fs::remove_file(run_files::supervisor_path(dev_id));
    res
}

impl Supervisor {
    fn watch(&mut self) -> Result<()> {
        loop {
            if !self.wait_server_exit()? {
                log!("supervisor of device {}: SIGTERM, leaving", self.dev_id);
                return Ok(());
            }
            let crash_seen = now_ns();
            let status = self.server.child.wait().map_err(|e| Error::io("reap server", e))?;
            if !self.device_needs_server() {
                log!("supervisor of device {}: server ended ({status}), device gone; leaving", self.dev_id);
                return Ok(());
            }
            log!(
                "supervisor of device {}: server pid {} died ({status}), recovering",
                self.dev_id,
                self.server.pid()
            );
            if self.too_many_crashes() {
                return Err(Error::Recovery(format!(
                    "device {} crashed {MAX_CRASHES} times within {}s: giving up, device left QUIESCED; \
                     run `ublk-bench recover -n {0}` or `ublk-bench del -n {0}`",
                    self.dev_id,
                    CRASH_WINDOW.as_secs()
                )));
            }
            self.replace_server(crash_seen)?;
            self.refresh_standby();
        }
    }

    /// Blocks until the server exits (true) or SIGTERM/SIGINT arrives (false).
    fn wait_server_exit(&self) -> Result<bool> {
        // Our own child: its pid cannot be reused before we reap it.
        let pidfd = process::child_pidfd(self.server.pid())
            .ok_or_else(|| Error::Recovery("server pid vanished".into()))?;
        let mut fds = [
            libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: fds is a valid array of two pollfds for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Ok(fds[1].revents == 0);
        }
    }

    /// QUIESCED, FAIL_IO, or LIVE with a dead server: someone must serve it.
    fn device_needs_server(&self) -> bool {
        let Ok(mut ctrl) = Ctrl::open() else { return false };
        match ctrl.info(self.dev_id) {
            Ok(info) => info.state != sys::UBLK_S_DEV_DEAD && run_files::path(self.dev_id).exists(),
            Err(_) => false,
        }
    }

    fn too_many_crashes(&mut self) -> bool {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW) {
            self.crashes.pop_front();
        }
        self.crashes.len() > MAX_CRASHES
    }

    /// The standby if it took over, else a cold `__serve --recover`.
    fn replace_server(&mut self, crash_seen: u64) -> Result<()> {
        if let Some(mut standby) = self.standby.take() {
            match standby.wait_live(LIVE_TIMEOUT) {
                Ok(_) => {
                    log!("supervisor of device {}: standby pid {} took over", self.dev_id, standby.pid());
                    self.server = standby;
                    return Ok(());
                }
                Err(e) => {
                    log!("supervisor of device {}: standby failed ({e}); cold restart", self.dev_id);
                    standby.kill_and_reap();
                }
            }
        }
        let mut fresh = self.start_cold(crash_seen)?;
        fresh.wait_live(LIVE_TIMEOUT).inspect_err(|_| fresh.kill_and_reap())?;
        log!("supervisor of device {}: new server pid {} LIVE", self.dev_id, fresh.pid());
        self.server = fresh;
        Ok(())
    }

    /// A cold server, forked from this process as `recover` forks its own:
    /// an exec would add a whole program start to every crash's gap. Where
    /// a fork is unsafe (more than one thread) it is started with exec.
    fn start_cold(&self, crash_seen: u64) -> Result<Spawned> {
        // Read now, not at start-up: settings may change while we watch.
        let cfg = run_files::load(self.dev_id).ok();
        let (dev_id, signals) = (self.dev_id, self.signals.as_raw_fd());
        let forked = daemonize::fork_server(move |notify| {
            // SAFETY: the child's copy of our signalfd, closed once here;
            // the server waits for its stop signals itself.
            unsafe { libc::close(signals) };
            server_process::takeover(dev_id, "supervise", Some(crash_seen), None, cfg, notify)
        })?;
        match forked {
            Some(server) => Ok(server),
            None => Spawned::start(&recover_args(self.dev_id, "supervise", Some(crash_seen), None)),
        }
    }

    fn refresh_standby(&mut self) {
        if !self.use_standby {
            return;
        }
        let Some(server) = ProcId::of(self.server.pid()) else { return };
        let args = recover_args(self.dev_id, "standby", None, Some(server));
        match Spawned::start(&args) {
            Ok(s) => self.standby = Some(s),
            Err(e) => log!("supervisor of device {}: no standby: {e}", self.dev_id),
        }
    }

    fn end_standby(&mut self) {
        if let Some(mut s) = self.standby.take() {
            s.kill_and_reap();
        }
    }
}

/// Arguments for a recovering server: cold (`crash_seen`) or a successor
/// that takes over once `watch` exits.
pub fn recover_args(
    dev_id: u32,
    method: &str,
    crash_seen: Option<u64>,
    watch: Option<ProcId>,
) -> Vec<String> {
    let mut a =
        vec!["__serve".into(), "--recover".into(), dev_id.to_string(), "--method".into(), method.into()];
    if let Some(t) = crash_seen {
        a.extend(["--crash-seen-ns".into(), t.to_string()]);
    }
    if let Some(p) = watch {
        a.extend(["--watch-pid".into(), p.pid.to_string(), "--watch-start".into(), p.start.to_string()]);
    }
    a
}

/// A signalfd for SIGTERM and SIGINT, blocked for normal delivery.
fn signalfd() -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls
    // only read it.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(Error::io("signalfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
