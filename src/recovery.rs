//! Crash recovery: a new server takes over a device whose server died.
//!
//! Sequence (ublk-abi.md §4.3): wait until the device is QUIESCED or
//! FAIL_IO, START_USER_RECOVERY (retrying -EBUSY while the dead server's
//! `/dev/ublkcN` is still being released), open `/dev/ublkcN`, FETCH every
//! tag, END_USER_RECOVERY with our pid. Held and reissued I/O then flows.
//!
//! [`Takeover::prepare`] does everything that does not need the dead
//! server gone: settings, backend mapping, queue threads with rings and
//! buffers. A hot standby runs it long before the crash; a cold restart runs
//! it right after. Each takeover appends its phase timestamps (monotonic ns)
//! as one JSON line to `/run/ublk-bench/<id>.events`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backend::DeviceBackend;
use crate::backend::claim::Claim;
use crate::clock::now_ns;
use crate::config::DeviceConfig;
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::error::{Error, Result};
use crate::process;
use crate::run_files::{self, Phases};
use crate::server::Server;
use crate::sys::{self, DevInfo};

/// How long a takeover waits for the kernel to finish with the dead server.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long START_USER_RECOVERY is retried on -EBUSY.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Takeover {
    pub server: Server,
    backend: DeviceBackend,
    pub phases: Phases,
}

impl Takeover {
    /// Loads the settings, maps the backend and readies every queue thread.
    pub fn prepare(dev_id: u32, method: &str) -> Result<Self> {
        let began_ns = now_ns();
        Takeover::prepare_with(dev_id, run_files::load(dev_id)?, method, began_ns)
    }

    /// [`Takeover::prepare`] with the settings already loaded (by the
    /// `recover` process this server was forked from).
    pub fn prepare_with(dev_id: u32, cfg: DeviceConfig, method: &str, began_ns: u64) -> Result<Self> {
        let backend = DeviceBackend::new(&cfg, false, None)?;
        let mut server = Server::adopt(dev_id, cfg)?;
        server.prepare(&backend)?;
        let phases = Phases {
            dev_id,
            method: method.into(),
            pid: std::process::id(),
            began_ns,
            prepared_ns: now_ns(),
            ..Default::default()
        };
        Ok(Takeover { server, backend, phases })
    }

    /// Takes the device over once the dead server is released.
    pub fn run(&mut self, crash_seen_ns: Option<u64>) -> Result<()> {
        self.phases.crash_seen_ns = crash_seen_ns;
        let dev_id = self.server.dev_id;
        let info = wait_recoverable(&mut self.server.ctrl, dev_id, QUIESCE_TIMEOUT)?;
        self.phases.old_pid = self.phases.old_pid.or((info.ublksrv_pid > 0).then_some(info.ublksrv_pid));
        self.phases.quiesced_ns = now_ns();
        // The old server is gone, and with it its claim on the backing file:
        // taken before START_USER_RECOVERY, so a refusal leaves the device QUIESCED.
        self.server.hold(Claim::take_over(&self.backend, dev_id)?);
        start_recovery(&mut self.server.ctrl, dev_id, START_TIMEOUT)?;
        self.phases.start_recovery_ns = now_ns();
        self.server.attach()?;
        self.phases.fetch_posted_ns = now_ns();
        let pid = std::process::id() as i32;
        self.server.ctrl.end_recovery(dev_id, pid).map_err(|e| Error::io("END_USER_RECOVERY", e))?;
        self.phases.end_recovery_ns = now_ns();
        self.server.publish_stats();
        Ok(())
    }

    /// Records the first request served (waiting up to `wait`) and appends
    /// the phases to the events file.
    pub fn record_events(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let first = &self.server.first_served;
        while first.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            // Coarse: this runs while the client's held I/O is being served.
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = first.load(Ordering::Relaxed);
        self.phases.first_served_ns = (t != 0).then_some(t);
        if let Err(e) = run_files::append_event(&self.phases) {
            crate::log!("device {}: could not write events: {e}", self.phases.dev_id);
        }
    }

    pub fn into_server(self) -> (Server, DeviceBackend) {
        (self.server, self.backend)
    }
}

/// Polls GET_DEV_INFO (every 100 µs, bounded) until QUIESCED or FAIL_IO.
/// A LIVE device whose server still runs is an error, not a wait.
pub fn wait_recoverable(ctrl: &mut Ctrl, dev_id: u32, timeout: Duration) -> Result<DevInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
        check_recoverable(&info)?;
        match info.state {
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => return Ok(info),
            sys::UBLK_S_DEV_DEAD => {
                return Err(Error::invalid(format!(
                    "device {dev_id} is DEAD (stopped): delete it with `ublk-bench del -n {dev_id}`"
                )));
            }
            _ if info.ublksrv_pid != std::process::id() as i32
                && process::server_of(dev_id, info.ublksrv_pid).is_some() =>
            {
                return Err(Error::invalid(format!(
                    "device {dev_id} is LIVE, served by pid {}: nothing to recover (use `ublk-bench restart -n {dev_id}` for a planned handover)",
                    info.ublksrv_pid
                )));
            }
            _ if Instant::now() >= deadline => {
                return Err(Error::invalid(format!(
                    "device {dev_id} did not reach QUIESCED within {}s after its server died",
                    timeout.as_secs()
                )));
            }
            _ => std::thread::sleep(Duration::from_micros(100)),
        }
    }
}

/// START_USER_RECOVERY, retrying -EBUSY with a short backoff (100 µs to
/// 500 µs): the dead server's file is released within milliseconds of
/// QUIESCED, and every sleep past that moment is added to the client's gap.
pub fn start_recovery(ctrl: &mut Ctrl, dev_id: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_micros(100);
    loop {
        match ctrl.start_recovery(dev_id) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_micros(500));
            }
            Err(e) => return Err(Error::io("START_USER_RECOVERY", e)),
        }
    }
}
