//! `restart -n ID`: planned handover with QUIESCE_DEV (Linux 6.16+). A new
//! server is started and prepared first (settings, backend, queue threads
//! and rings, as a hot standby); then QUIESCE_DEV makes the old server
//! drain, commit and exit, and the new one takes over at once. Clients see
//! a short stall and no error. A supervised device's supervisor (or its
//! standby) brings up the new server itself. Without a supervisor, a server
//! that is not recognised as ublk-bench's is refused before anything is sent.
//!
//! The successor dies with `restart` until it is handed the device, just
//! before QUIESCE_DEV; from then on it outlives `restart` (a Ctrl-C there
//! leaves it taking over, and says so). A successor that fails after
//! QUIESCE_DEV is replaced by a cold recovery, with a line on stderr; the
//! device ends LIVE, or without a server and a message naming `recover`.
//! An old server that does not drain in time is killed, and stderr says
//! [`DRAIN_KILLED`].
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

use crate::clock::now_ns;
use crate::cmd::list::print_one;
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::daemonize::{self, Spawned};
use crate::error::{Error, Result};
use crate::fault::{self, Fault};
use crate::plan::Plan;
use crate::process::{self, ProcId};
use crate::supervisor::recover_args;
use crate::{run_files, server_process, sys};

const QUIESCE_TIMEOUT_MS: u64 = 10_000;
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What `restart` says when the old server had to be killed: tests look for it.
pub const DRAIN_KILLED: &str = "handover fell back to SIGKILL";

pub fn run(dev_id: u32) -> Result<()> {
    let fault = fault::from_env()?;
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    check_recoverable(&info)?;
    let plan = Plan::of_device(info.flags);
    if !plan.quiesce() {
        return Err(Error::Unsupported {
            feature: "UBLK_F_QUIESCE on this device",
            version: "6.16",
            hint: "the device must be created with -r on a kernel that has QUIESCE_DEV",
        });
    }
    if info.state != sys::UBLK_S_DEV_LIVE {
        return Err(Error::Recovery(format!(
            "device {dev_id} is {}, not LIVE: use `ublk-bench recover -n {dev_id}`",
            sys::state_name(info.state)
        )));
    }
    let old = info.ublksrv_pid;
    let supervised = run_files::live_supervisor(dev_id).is_some();
    let old_server = process::server_of(dev_id, old);
    if old_server.is_none() && !supervised {
        // Nobody would bring up a new server: QUIESCE_DEV would only take
        // the device from the one it has.
        return Err(Error::Recovery(format!(
            "device {dev_id} is served by pid {old} ({}), which is not a ublk-bench server holding {}: \
             restart cannot hand it over, and nothing was sent; the device stays LIVE under it",
            process::comm(old),
            crate::ctrl::char_path(dev_id)
        )));
    }
    let mut successor = match (&old_server, supervised) {
        (Some((id, _)), false) => Some(prepared_successor(dev_id, *id)?),
        _ => None,
    };
    // From here a Ctrl-C is answered, not obeyed blindly: before
    // QUIESCE_DEV it takes the successor along, after it leaves it serving.
    process::catch_interrupts();
    if let Some(s) = &mut successor {
        match s.hand_over(HANDOVER_TIMEOUT) {
            Ok(true) => {}
            // The old server died meanwhile and the successor took over.
            Ok(false) => return print_one(dev_id, false),
            Err(e) => {
                s.kill_and_reap();
                return Err(if process::interrupted() { interrupted_before_quiesce(dev_id, old) } else { e });
            }
        }
    }
    if process::interrupted() {
        successor.iter_mut().for_each(Spawned::kill_and_reap);
        return Err(interrupted_before_quiesce(dev_id, old));
    }
    match &old_server {
        Some((_, fd)) if hand_over_by_kill(&plan) => {
            process::kill_and_wait(fd, HANDOVER_TIMEOUT);
        }
        _ => {
            if plan.batch {
                crate::log!(
                    "restart: device {dev_id} is --batch without -i: QUIESCE_DEV can fail a request \
                     submitted during the handover with EIO (kernel); a device made with -i hands over losslessly"
                );
            }
            if let Err(e) = ctrl.quiesce(dev_id, QUIESCE_TIMEOUT_MS) {
                if still_served_by(&mut ctrl, dev_id, old) {
                    successor.iter_mut().for_each(Spawned::kill_and_reap);
                    return Err(Error::kernel(
                        format!("QUIESCE_DEV (device {dev_id} stays LIVE under pid {old})"),
                        e,
                    ));
                }
                crate::log!(
                    "restart: QUIESCE_DEV of device {dev_id}: {e}; its server is leaving all the same"
                );
            }
            let sig = match fault {
                Some(Fault::InterruptAfterQuiesce) => libc::SIGINT,
                Some(Fault::KillAfterQuiesce) => libc::SIGKILL,
                _ => 0,
            };
            if sig != 0 {
                crate::log!("restart: {} asks for signal {sig} now", fault::FAULT_ENV);
                // SAFETY: raise takes a plain integer.
                unsafe { libc::raise(sig) };
            }
            if let Some((_, fd)) = &old_server {
                wait_drained(fd, old);
            }
        }
    }
    if process::interrupted() {
        return Err(interrupted_after_quiesce(dev_id, successor.as_ref().map(Spawned::pid)));
    }
    match &mut successor {
        Some(s) => {
            if let Err(e) = s.wait_live(HANDOVER_TIMEOUT) {
                if process::interrupted() {
                    return Err(interrupted_after_quiesce(dev_id, Some(s.pid())));
                }
                s.kill_and_reap();
                crate::log!(
                    "restart: the new server pid {} failed after the old one was told to go ({e}); \
                     recovering device {dev_id} cold",
                    s.pid()
                );
                recover_cold(dev_id).map_err(|cold| {
                    Error::Refused(format!(
                        "device {dev_id}: the new server failed ({e}) and so did a cold recovery ({cold}): \
                         the device has no server; run `ublk-bench recover -n {dev_id}`"
                    ))
                })?;
                crate::log!("restart: device {dev_id} recovered cold after the failed handover");
            }
        }
        None => wait_new_server(&mut ctrl, dev_id, old).map_err(|e| match process::interrupted() {
            true => interrupted_after_quiesce(dev_id, None),
            false => e,
        })?,
    }
    print_one(dev_id, false)
}

/// True while the device is LIVE under `old`, a running ublk-bench server.
fn still_served_by(ctrl: &mut Ctrl, dev_id: u32, old: i32) -> bool {
    ctrl.info(dev_id).is_ok_and(|i| {
        i.state == sys::UBLK_S_DEV_LIVE && i.ublksrv_pid == old && process::server_of(dev_id, old).is_some()
    })
}

fn interrupted_before_quiesce(dev_id: u32, old: i32) -> Error {
    Error::Refused(format!(
        "restart of device {dev_id} interrupted before QUIESCE_DEV: nothing was sent, the device stays LIVE \
         under pid {old}"
    ))
}

/// Ctrl-C after QUIESCE_DEV: the successor (which no longer dies with us)
/// or the supervisor carries on; the user is told how to check and what to
/// run if it did not.
fn interrupted_after_quiesce(dev_id: u32, successor: Option<i32>) -> Error {
    let who =
        successor.map_or("the supervisor's new server".to_string(), |p| format!("the new server pid {p}"));
    Error::Refused(format!(
        "restart of device {dev_id} interrupted after QUIESCE_DEV: {who} takes the device over on its own; \
         check with `ublk-bench list -n {dev_id}`, and if it shows QUIESCED run `ublk-bench recover -n {dev_id}`"
    ))
}

/// A cold recovery, as `recover` runs it: a server forked from this
/// process (single-threaded here), or started by exec where a fork is unsafe.
fn recover_cold(dev_id: u32) -> Result<()> {
    let began = now_ns();
    let forked = daemonize::fork_server(|notify| {
        server_process::takeover(dev_id, "recover", Some(began), None, None, notify)
    })?;
    let mut server = match forked {
        Some(s) => s,
        None => Spawned::start(&recover_args(dev_id, "recover", Some(began), None))?,
    };
    server.wait_live(HANDOVER_TIMEOUT).inspect_err(|_| server.kill_and_reap())?;
    Ok(())
}

/// Batch queues with REISSUE: see the module comment.
fn hand_over_by_kill(plan: &Plan) -> bool {
    plan.batch && plan.reissue()
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
            "restart: warning: old server {old} did not exit within {DRAIN_TIMEOUT:?} of QUIESCE_DEV; \
             killing it ({DRAIN_KILLED}: held I/O is reissued with -i, failed without)"
        );
        process::kill_and_wait(fd, HANDOVER_TIMEOUT);
    }
}

/// Polls until the device is LIVE under a pid other than `old`.
fn wait_new_server(ctrl: &mut Ctrl, dev_id: u32, old: i32) -> Result<()> {
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    while Instant::now() < deadline && !process::interrupted() {
        let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
        if info.state == sys::UBLK_S_DEV_LIVE
            && info.ublksrv_pid != old
            && process::server_of(dev_id, info.ublksrv_pid).is_some()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Err(Error::Refused(format!(
        "device {dev_id}: no new server took over within {}s of QUIESCE_DEV (see {}): check with \
         `ublk-bench list -n {dev_id}`, and if it shows QUIESCED run `ublk-bench recover -n {dev_id}`",
        HANDOVER_TIMEOUT.as_secs(),
        run_files::log_path().display()
    )))
}
