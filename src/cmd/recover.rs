//! `recover -n ID`: start a new daemonized server for a device whose server
//! died, and the `__serve --recover` side that does the takeover.

use std::time::Duration;

use crate::clock::now_ns;
use crate::cmd::list::print_one;
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::daemon::Spawned;
use crate::error::{Error, Result};
use crate::process;
use crate::supervisor::recover_args;
use crate::{run_files, sys};

const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(dev_id: u32) -> Result<()> {
    let began = now_ns();
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    check_recoverable(&info)?;
    run_files::load(dev_id)?;
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
