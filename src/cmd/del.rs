//! `del`: delete one device or all. DEL_DEV stops the device, which aborts
//! the server's parked commands; the server then exits on its own and
//! DEL_DEV returns once its references are gone. We then make sure the
//! process is really gone and remove the device's files.

use std::time::Duration;

use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::server::delete_device;
use crate::{process, settings, supervisor};

pub fn run(id: Option<u32>, all: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    if all {
        let mut first_err = None;
        for id in ctrl::device_ids(&mut ctrl)? {
            if let Err(e) = del_one(&mut ctrl, id) {
                eprintln!("ublk-bench: del {id}: {e}");
                first_err.get_or_insert(e);
            }
        }
        return first_err.map_or(Ok(()), Err);
    }
    del_one(&mut ctrl, id.expect("clap requires -n or -a"))
}

pub fn del_one(ctrl: &mut Ctrl, dev_id: u32) -> Result<()> {
    let info = ctrl.info(dev_id).map_err(|e| match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENOENT) => Error::NoDevice(dev_id),
        _ => Error::io(format!("GET_DEV_INFO of device {dev_id}"), e),
    })?;
    let cfg = settings::load(dev_id).ok();
    // The supervisor goes first, so it does not recover what we delete.
    supervisor::stop(dev_id);
    delete_device(ctrl, dev_id, cfg.as_ref());
    if info.ublksrv_pid > 0 {
        process::reap_or_kill(info.ublksrv_pid, Duration::from_secs(10));
    }
    Ok(())
}
