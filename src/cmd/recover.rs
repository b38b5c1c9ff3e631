//! `recover -n ID`: start a new daemonized server for a device whose server
//! died, and the `__serve --recover` side that does the takeover.

use std::time::Duration;

use crate::cmd::list::print_one;
use crate::ctrl::Ctrl;
use crate::daemon::{Notifier, Spawned};
use crate::error::{Error, Result};
use crate::process::{self, ProcId};
use crate::recovery::{Takeover, check_recoverable};
use crate::server::{Stop, no_device};
use crate::stats::now_ns;
use crate::supervisor::recover_args;
use crate::{log, settings, sys};

const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(dev_id: u32) -> Result<()> {
    let began = now_ns();
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    check_recoverable(&info)?;
    settings::load(dev_id)?;
    if info.state == sys::UBLK_S_DEV_LIVE && process::server_of(dev_id, info.ublksrv_pid).is_some() {
        return Err(Error::invalid(format!(
            "device {dev_id} is LIVE, served by pid {}: nothing to recover",
            info.ublksrv_pid
        )));
    }
    drop(ctrl);
    spawn_recovering(dev_id, "recover", began)?;
    print_one(dev_id, false)
}

/// Starts `__serve --recover` and waits until it reports the device LIVE.
pub fn spawn_recovering(dev_id: u32, method: &str, crash_seen: u64) -> Result<u32> {
    let mut s = Spawned::start(&recover_args(dev_id, method, Some(crash_seen), None))?;
    s.wait_live(LIVE_TIMEOUT).inspect_err(|_| s.kill_and_reap())
}

/// The recovering server. With `watch` it is a successor (a hot standby,
/// or `restart`'s new server): it gets everything ready, says `ready`, then
/// waits for that process to die before taking over.
pub fn serve(
    dev_id: u32,
    method: &str,
    crash_seen_ns: Option<u64>,
    watch: Option<ProcId>,
    mut notify: Notifier,
) -> Result<()> {
    let result = takeover(dev_id, method, crash_seen_ns, watch, &mut notify);
    let mut t = match result {
        Ok(t) => t,
        Err(e) => {
            log!("device {dev_id}: {method} failed: {e}");
            notify.failed(&e);
            return Err(e);
        }
    };
    notify.live(dev_id);
    log!("device {dev_id} LIVE again ({method})");
    t.record_events(Duration::from_secs(5));
    let (server, _backend) = t.into_server();
    let stop = server.wait();
    log!("device {dev_id}: {stop:?}");
    server.shutdown(stop == Stop::Signal)
}

fn takeover(
    dev_id: u32,
    method: &str,
    crash_seen_ns: Option<u64>,
    watch: Option<ProcId>,
    notify: &mut Notifier,
) -> Result<Takeover> {
    // Opened before the slow preparation: a server that dies meanwhile is
    // still seen, and one already gone (or its pid now another process's)
    // means take over at once.
    let watched = watch.map(|id| (id.pid, id.open()));
    let mut t = Takeover::prepare(dev_id, method)?;
    let crash_seen = match watched {
        Some((pid, fd)) => {
            t.phases.old_pid = Some(pid);
            die_with_parent(libc::SIGKILL);
            notify.prepared(dev_id);
            if let Some(fd) = fd {
                process::wait_pidfd(&fd, None);
            }
            Some(now_ns())
        }
        None => crash_seen_ns,
    };
    t.run(crash_seen)?;
    // The server it now is outlives whoever started it.
    die_with_parent(0);
    Ok(t)
}

/// A waiting successor is useless without whoever started it: SIGKILL makes
/// it die with its parent, 0 ends that once it serves the device.
fn die_with_parent(signal: i32) {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) };
}
