//! `recover -n ID`: start a new daemonized server for a device whose server
//! died, and wait until it reports the device LIVE.
//!
//! The server is forked from this process ([`daemonize::fork_server`]) and
//! takes the settings read here, so a cold recovery starts one process, not
//! two, and reads its settings once.

use std::time::Duration;

use crate::clock::now_ns;
use crate::cmd::list::print_one;
use crate::ctrl::{Ctrl, check_recoverable, no_device};
use crate::daemonize::{self, Spawned};
use crate::error::{Error, Result};
use crate::supervisor::recover_args;
use crate::{process, run_files, server_process, sys};

const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(dev_id: u32) -> Result<()> {
    let began = now_ns();
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    check_recoverable(&info)?;
    let cfg = run_files::load(dev_id)?;
    if info.state == sys::UBLK_S_DEV_LIVE && process::server_of(dev_id, info.ublksrv_pid).is_some() {
        return Err(Error::Recovery(format!(
            "device {dev_id} is LIVE, served by pid {}: nothing to recover",
            info.ublksrv_pid
        )));
    }
    drop(ctrl);
    let forked = daemonize::fork_server(|notify| {
        server_process::takeover(dev_id, "recover", Some(began), None, Some(cfg), notify)
    })?;
    let mut server = match forked {
        Some(s) => s,
        None => Spawned::start(&recover_args(dev_id, "recover", Some(began), None))?,
    };
    server.wait_live(LIVE_TIMEOUT).inspect_err(|_| server.kill_and_reap())?;
    print_one(dev_id, false)
}
