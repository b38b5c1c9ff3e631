//! `restart -n ID`: planned handover with QUIESCE_DEV (Linux 6.16+). A new
//! server is started and prepared first (settings, backend, queue threads
//! and rings, as a hot standby); then QUIESCE_DEV makes the old server
//! drain, commit and exit, and the new one takes over at once. Clients see
//! a short stall and no error. A supervised device's supervisor (or its
//! standby) brings up the new server itself.
//!
//! A `--batch` device with -i is handed over by SIGKILL instead, once the
//! new server is ready: on 7.x, QUIESCE_DEV cancels a batch queue through
//! `ublk_batch_cancel_queue`, which sets `force_abort`, and until the new
//! server's first FETCH clears it the driver fails every new request with
//! EIO (ublk_drv.c, `ublk_prep_req`). The crash path cancels through
//! `ublk_batch_cancel_fn`, which only marks the queue canceling, so new
//! requests wait; -i reissues what the old server held. Without -i a kill
//! would fail the held requests, so such a device keeps QUIESCE_DEV.

use std::time::{Duration, Instant};

use crate::cmd::list::print_one;
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::daemon::Spawned;
use crate::error::{Error, Result};
use crate::process::{self, ProcId};
use crate::supervisor::recover_args;
use crate::{run_files, sys};

const QUIESCE_TIMEOUT_MS: u64 = 10_000;
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(dev_id: u32) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    check_recoverable(&info)?;
    if info.flags & sys::UBLK_F_QUIESCE == 0 {
        return Err(Error::Unsupported {
            feature: "UBLK_F_QUIESCE on this device",
            version: "6.16",
            hint: "the device must be created with -r on a kernel that has QUIESCE_DEV",
        });
    }
    if info.state != sys::UBLK_S_DEV_LIVE {
        return Err(Error::invalid(format!(
            "device {dev_id} is {}, not LIVE: use `ublk-bench recover -n {dev_id}`",
            sys::state_name(info.state)
        )));
    }
    let old = info.ublksrv_pid;
    let supervised = run_files::live_supervisor(dev_id).is_some();
    let old_server = process::server_of(dev_id, old);
    let mut successor = match (&old_server, supervised) {
        (Some((id, _)), false) => Some(prepared_successor(dev_id, *id)?),
        _ => None,
    };
    match &old_server {
        Some((_, fd)) if hand_over_by_kill(info.flags) => {
            process::kill_and_wait(fd, HANDOVER_TIMEOUT);
        }
        _ => {
            if info.flags & sys::UBLK_F_BATCH_IO != 0 {
                crate::log!(
                    "restart: device {dev_id} is --batch without -i: QUIESCE_DEV can fail a request \
                     submitted during the handover with EIO (kernel); a device made with -i hands over losslessly"
                );
            }
            if let Err(e) = ctrl.quiesce(dev_id, QUIESCE_TIMEOUT_MS) {
                successor.iter_mut().for_each(Spawned::kill_and_reap);
                return Err(Error::io("QUIESCE_DEV", e));
            }
            if let Some((_, fd)) = &old_server {
                wait_drained(fd, old);
            }
        }
    }
    match &mut successor {
        Some(s) => {
            s.wait_live(HANDOVER_TIMEOUT).inspect_err(|_| s.kill_and_reap())?;
        }
        None => wait_new_server(&mut ctrl, dev_id, old)?,
    }
    print_one(dev_id, false)
}

/// Batch queues with REISSUE: see the module comment.
fn hand_over_by_kill(flags: u64) -> bool {
    let both = sys::UBLK_F_BATCH_IO | sys::UBLK_F_USER_RECOVERY_REISSUE;
    flags & both == both
}

/// A new server, ready to take over the moment `old` exits.
fn prepared_successor(dev_id: u32, old: ProcId) -> Result<Spawned> {
    let mut s = Spawned::start(&recover_args(dev_id, "restart", None, Some(old)))?;
    s.wait_prepared(HANDOVER_TIMEOUT).inspect_err(|_| s.kill_and_reap())?;
    Ok(s)
}

/// Waits for the old server to drain and exit. One that is still there after
/// DRAIN_TIMEOUT (a tag it was serving during QUIESCE_DEV was parked again
/// instead of aborted, which happens now and then) is killed: the device
/// then recovers as from a crash, and with -i its in-flight I/O is reissued.
fn wait_drained(fd: &std::os::fd::OwnedFd, old: i32) {
    if !process::wait_pidfd(fd, Some(DRAIN_TIMEOUT)) {
        crate::log!(
            "restart: old server {old} did not exit within {DRAIN_TIMEOUT:?} of QUIESCE_DEV; killing it"
        );
        process::kill_and_wait(fd, HANDOVER_TIMEOUT);
    }
}

/// Polls until the device is LIVE under a pid other than `old`.
fn wait_new_server(ctrl: &mut Ctrl, dev_id: u32, old: i32) -> Result<()> {
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    while Instant::now() < deadline {
        let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
        if info.state == sys::UBLK_S_DEV_LIVE
            && info.ublksrv_pid != old
            && process::server_of(dev_id, info.ublksrv_pid).is_some()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Err(Error::invalid(format!(
        "device {dev_id}: no new server took over within {}s",
        HANDOVER_TIMEOUT.as_secs()
    )))
}
