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

use crate::backend::claim::Claim;
use crate::backend::{self, DeviceBackend};
use crate::clock::now_ns;
use crate::config::{CopyMode, DeviceConfig};
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::error::{Error, Result};
use crate::fault::{self, Fault};
use crate::plan::{self, Plan, Transfer};
use crate::process;
use crate::run_files::{self, Phases};
use crate::server::{Server, Stop};
use crate::sys::{self, DevInfo, Params};

/// How long a takeover waits for the kernel to finish with the dead server.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long START_USER_RECOVERY is retried on -EBUSY.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Takeover {
    pub server: Server,
    backend: DeviceBackend,
    pub phases: Phases,
    /// The test hook `pause-after-start-recovery:MS` (fault.rs).
    pause_after_start: Option<u64>,
}

impl Takeover {
    /// Loads the settings, maps the backend and readies every queue thread.
    pub fn prepare(dev_id: u32, method: &str) -> Result<Self> {
        let began_ns = now_ns();
        Takeover::prepare_with(dev_id, run_files::load(dev_id)?, method, began_ns)
    }

    /// [`Takeover::prepare`] with the settings already loaded (by the
    /// `recover` process this server was forked from).
    /// The settings are checked against the kernel's device first: a file
    /// that disagrees is refused before anything is mapped or sent.
    pub fn prepare_with(dev_id: u32, mut cfg: DeviceConfig, method: &str, began_ns: u64) -> Result<Self> {
        let pause_after_start = match fault::from_env()? {
            Some(Fault::PauseAfterStartRecovery(ms)) => Some(ms),
            _ => None,
        };
        let mut ctrl = Ctrl::open()?;
        let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
        let params = ctrl.get_params(dev_id).map_err(|e| Error::kernel("GET_PARAMS", e))?;
        check_settings(dev_id, &mut cfg, &info, &params)?;
        let plan = Plan::of_device(info.flags);
        let backend = backend::of(cfg.backend).open(&mut cfg, plan.transfer, false)?;
        let mut server = Server::adopt(ctrl, info, plan, cfg);
        server.prepare(&backend)?;
        let phases = Phases {
            dev_id,
            method: method.into(),
            pid: std::process::id(),
            began_ns,
            prepared_ns: now_ns(),
            ..Default::default()
        };
        Ok(Takeover { server, backend, phases, pause_after_start })
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
        if let Some(ms) = self.pause_after_start {
            crate::log!("device {dev_id}: START_USER_RECOVERY returned; pausing {ms} ms (fault hook)");
            std::thread::sleep(Duration::from_millis(ms));
        }
        self.server.attach()?;
        self.phases.fetch_posted_ns = now_ns();
        let pid = std::process::id() as i32;
        self.server.ctrl.end_recovery(dev_id, pid).map_err(|e| Error::kernel("END_USER_RECOVERY", e))?;
        self.phases.end_recovery_ns = now_ns();
        self.server.publish_stats();
        Ok(())
    }

    /// Records the first request served (waiting up to `wait`) and appends
    /// the phases to the events file. A stop that comes first ends the wait
    /// at once and is returned, for the caller to act on: a device deleted
    /// right after its recovery must not wait for a request that never comes.
    pub fn record_events(&mut self, wait: Duration) -> Option<Stop> {
        let stop = self.server.wait_first_served(wait);
        let t = self.server.first_served.load(Ordering::Relaxed);
        self.phases.first_served_ns = (t != 0).then_some(t);
        if let Err(e) = run_files::append_event(&self.phases) {
            crate::log!("device {}: could not write events: {e}", self.phases.dev_id);
        }
        stop
    }

    pub fn into_server(self) -> (Server, DeviceBackend) {
        (self.server, self.backend)
    }
}

/// Refuses settings that contradict the device as the kernel has it
/// (GET_DEV_INFO, GET_PARAMS): a server built from them would fetch the
/// wrong tags, map the wrong size or move data the wrong way. Every
/// mismatch is named. A copy mode of `auto` (never written by `add`, which
/// records the mode it chose) takes the kernel's.
pub fn check_settings(dev_id: u32, cfg: &mut DeviceConfig, info: &DevInfo, params: &Params) -> Result<()> {
    if cfg.copy_mode == CopyMode::Auto {
        cfg.copy_mode = Transfer::of_flags(info.flags).mode();
    }
    let wrong = plan::mismatches(cfg, info, params);
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Error::Recovery(format!(
        "device {dev_id}: the settings file {} does not match the device in the kernel: {}; nothing was sent \
         and the device stays {}: put the right settings back, or delete the device with `ublk-bench del -n {dev_id}`",
        run_files::path(dev_id).display(),
        wrong.join("; "),
        sys::state_name(info.state)
    )))
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
                return Err(Error::Recovery(format!(
                    "device {dev_id} is DEAD (stopped): delete it with `ublk-bench del -n {dev_id}`"
                )));
            }
            _ if info.ublksrv_pid != std::process::id() as i32
                && process::server_of(dev_id, info.ublksrv_pid).is_some() =>
            {
                return Err(Error::Recovery(format!(
                    "device {dev_id} is LIVE, served by pid {}: nothing to recover (use `ublk-bench restart -n {dev_id}` for a planned handover)",
                    info.ublksrv_pid
                )));
            }
            _ if Instant::now() >= deadline => {
                return Err(Error::Recovery(format!(
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
            Err(e) => return Err(Error::kernel("START_USER_RECOVERY", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Recovery;

    /// A 64 MiB, depth 64, one-queue device with user copy and REISSUE, as
    /// the kernel reports it, and the settings that match it.
    fn device() -> (DeviceConfig, DevInfo, Params) {
        let cfg = DeviceConfig {
            dev_id: Some(3),
            copy_mode: CopyMode::User,
            recovery: Recovery::Reissue,
            ..crate::config::tests::sample()
        };
        let info = DevInfo {
            dev_id: 3,
            nr_hw_queues: 1,
            queue_depth: 64,
            flags: sys::UBLK_F_USER_COPY | Recovery::Reissue.flags() | sys::UBLK_F_QUIESCE,
            ..Default::default()
        };
        let mut params = Params::default();
        params.basic.dev_sectors = cfg.size >> 9;
        params.basic.logical_bs_shift = 9;
        (cfg, info, params)
    }

    #[test]
    fn matching_settings_pass_and_auto_takes_the_kernels_mode() {
        let (mut cfg, info, params) = device();
        assert!(check_settings(3, &mut cfg, &info, &params).is_ok());
        cfg.copy_mode = CopyMode::Auto;
        check_settings(3, &mut cfg, &info, &params).unwrap();
        assert_eq!(cfg.copy_mode, CopyMode::User);
    }

    #[test]
    fn every_contradiction_is_named_with_both_values() {
        let (cfg, info, params) = device();
        let cases = [
            (DeviceConfig { depth: 128, ..cfg.clone() }, "depth 128 in the file, 64 in the kernel"),
            (
                DeviceConfig { size: 32 << 20, ..cfg.clone() },
                "size 33554432 in the file, 67108864 in the kernel",
            ),
            (
                DeviceConfig { copy_mode: CopyMode::Zero, ..cfg.clone() },
                "copy mode zero in the file, user in the kernel",
            ),
            (DeviceConfig { queues: 2, ..cfg.clone() }, "queues 2 in the file, 1 in the kernel"),
            (
                DeviceConfig { block_size: 4096, ..cfg.clone() },
                "block size 4096 in the file, 512 in the kernel",
            ),
            (
                DeviceConfig { recovery: Recovery::Plain, ..cfg.clone() },
                "recovery flags 0x8 in the file, 0x18",
            ),
            (DeviceConfig { batch: true, ..cfg.clone() }, "batch true in the file, false in the kernel"),
            (DeviceConfig { dev_id: Some(4), ..cfg.clone() }, "device id 4 in the file, 3 in the kernel"),
        ];
        for (mut bad, want) in cases {
            let err = check_settings(3, &mut bad, &info, &params).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("3.json") && err.contains("del -n 3"),
                "{want}: {err}"
            );
        }
        let mut two = DeviceConfig { depth: 128, size: 32 << 20, ..cfg };
        let err = check_settings(3, &mut two, &info, &params).unwrap_err();
        assert!(matches!(err, Error::Recovery(_)), "a recovery refusal, not bad input: {err:?}");
        let err = err.to_string();
        assert!(err.contains("depth 128") && err.contains("size 33554432"), "{err}");
    }
}
