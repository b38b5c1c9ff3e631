//! Deleting a device with everything ublk-bench made for it: its
//! supervisor (which takes its standby along), the device itself, its run
//! files and its store, and its server process. Used by `del` and by `add`
//! when a start fails half-way.
//!
//! Every process is identified before it is signalled (see `process`): the
//! supervisor by the start time its record holds, the server by holding
//! `/dev/ublkcN` open. A stale record never leads to a stranger.

use std::time::Duration;

use crate::config::DeviceConfig;
use crate::ctrl::{self, Ctrl, no_device};
use crate::error::{Error, Result};
use crate::process;
use crate::run_files;
use crate::sys::{self, DevInfo};

/// How long a supervisor or server gets to exit before SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the supervisor of `dev_id` to leave (it ends its standby first) and
/// waits for it; a stale record is only removed.
pub fn stop_supervisor(dev_id: u32) {
    if let Some((_, fd)) = run_files::live_supervisor(dev_id) {
        process::signal(&fd, libc::SIGTERM);
        process::reap_or_kill(&fd, EXIT_TIMEOUT);
    }
    let _ = std::fs::remove_file(run_files::supervisor_path(dev_id));
}

/// Deletes device `dev_id`. Without `force`, a device that is open (mounted,
/// or held by a process) is refused before anything changes. Returns once
/// the device, its files and its processes are gone; if DEL_DEV fails, the
/// settings and the store stay for another try.
pub fn delete(ctrl: &mut Ctrl, dev_id: u32, force: bool) -> Result<()> {
    let cfg = run_files::load(dev_id).ok();
    let info = match ctrl.info(dev_id).map_err(|e| no_device(dev_id, e)) {
        Ok(info) => info,
        Err(Error::NoDevice(_)) if cfg.is_some() => return forget(dev_id, cfg.as_ref()),
        Err(e) => return Err(e),
    };
    let server = process::server_of(dev_id, info.ublksrv_pid);
    if !force {
        stop_if_unused(ctrl, &info)?;
    }
    // The supervisor goes before DEL_DEV, so it does not recover what we delete.
    stop_supervisor(dev_id);
    let users = if force { openers(dev_id) } else { vec![] };
    if users.is_empty() {
        del_dev(ctrl, dev_id, cfg.as_ref()).map_err(|e| del_failed(dev_id, e))?;
    } else {
        // DEL_DEV would wait for every user to let go (an unmount): stop the
        // device now and let the kernel free it then.
        let _ = ctrl.stop(dev_id);
        ctrl.del_async(dev_id).map_err(|e| del_failed(dev_id, e))?;
        run_files::remove_all(dev_id, cfg.as_ref());
        eprintln!(
            "ublk-bench: device {dev_id} stopped and deleted while in use ({}); the kernel frees it \
             once the last user lets go",
            users.join(", ")
        );
    }
    if let Some((_, fd)) = server {
        process::reap_or_kill(&fd, EXIT_TIMEOUT);
    }
    Ok(())
}

/// DEL_DEV, then, once it succeeded, the run files and the store: the one
/// place a device and its files go together (`del`, a server's own stop).
pub fn del_dev(ctrl: &mut Ctrl, dev_id: u32, cfg: Option<&DeviceConfig>) -> std::io::Result<()> {
    ctrl.del(dev_id)?;
    run_files::remove_all(dev_id, cfg);
    Ok(())
}

/// Deletes a device whose start failed: its server (a ublk-bench process
/// holding `/dev/ublkcN`, perhaps started by a supervisor that died) is
/// killed first, since a half-made server may never answer DEL_DEV.
pub fn delete_half_made(dev_id: u32) {
    for pid in process::openers(&ctrl::char_path(dev_id)) {
        if let Some((_, fd)) = process::server_of(dev_id, pid) {
            process::kill_and_wait(&fd, EXIT_TIMEOUT);
        }
    }
    let mut ctrl = match Ctrl::open() {
        Ok(c) => c,
        Err(e) => return crate::log!("cleanup of device {dev_id}: {e}"),
    };
    match delete(&mut ctrl, dev_id, true) {
        // The failed server may have deleted it already (DEL_DEV_ASYNC).
        Ok(()) | Err(Error::NoDevice(_)) => {}
        Err(e) => crate::log!("cleanup of device {dev_id}: {e}"),
    }
}

/// A device the kernel finished deleting after an interrupted DEL_DEV:
/// only our files are left.
fn forget(dev_id: u32, cfg: Option<&DeviceConfig>) -> Result<()> {
    stop_supervisor(dev_id);
    run_files::remove_all(dev_id, cfg);
    eprintln!("ublk-bench: device {dev_id} no longer exists; removed the files ublk-bench kept for it");
    Ok(())
}

fn del_failed(dev_id: u32, e: std::io::Error) -> Error {
    let why = match e.raw_os_error() {
        Some(libc::EINTR) | Some(libc::ECANCELED) => {
            format!("interrupted while the kernel waited for the last user of /dev/ublkc{dev_id} to let go")
        }
        _ => e.to_string(),
    };
    Error::Refused(format!(
        "DEL_DEV of device {dev_id} failed ({why}): its settings and store are kept; \
         run `ublk-bench del -n {dev_id}` again"
    ))
}

/// Stops the device only if nothing has `/dev/ublkbN` open: with the
/// kernel's TRY_STOP_DEV (7.0, UBLK_F_SAFE_STOP_DEV), which checks and
/// stops in one step, else by looking for openers ourselves.
fn stop_if_unused(ctrl: &mut Ctrl, info: &DevInfo) -> Result<()> {
    let dev_id = info.dev_id;
    let safe_stop = info.flags & sys::UBLK_F_SAFE_STOP_DEV != 0 && std::env::var_os(NO_SAFE_STOP).is_none();
    if !safe_stop {
        let users = openers(dev_id);
        return match users.is_empty() {
            true => Ok(()),
            false => Err(in_use(dev_id, &users, "checked /proc and sysfs: this kernel has no TRY_STOP_DEV")),
        };
    }
    match ctrl.try_stop(dev_id) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(in_use(dev_id, &openers(dev_id), "the kernel's TRY_STOP_DEV refused"))
        }
        // ENODEV: the disk is not there (never started, or already stopped).
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(Error::kernel(format!("TRY_STOP_DEV of device {dev_id}"), e)),
    }
}

/// Test hook: behave as on a kernel without TRY_STOP_DEV.
pub const NO_SAFE_STOP: &str = "UBLK_BENCH_NO_SAFE_STOP";

fn in_use(dev_id: u32, users: &[String], how: &str) -> Error {
    let who = if users.is_empty() { "open".to_string() } else { users.join(", ") };
    Error::Refused(format!(
        "device {dev_id} is in use ({who}; {how}): unmount or close it first, or delete it anyway \
         with `ublk-bench del -n {dev_id} --force` (its open files then see I/O errors)"
    ))
}

/// Who has `/dev/ublkbN` open: processes, mounts and stacked devices.
pub fn openers(dev_id: u32) -> Vec<String> {
    let block = ctrl::block_path(dev_id);
    let mut users: Vec<String> =
        process::openers(&block).into_iter().map(|p| format!("pid {p} {}", process::comm(p))).collect();
    let name = format!("ublkb{dev_id}");
    if let Ok(devno) = std::fs::read_to_string(format!("/sys/block/{name}/dev")) {
        users.extend(mount_points(devno.trim()).into_iter().map(|m| format!("mounted at {m}")));
    }
    let holders = std::fs::read_dir(format!("/sys/block/{name}/holders")).into_iter().flatten().flatten();
    users.extend(holders.map(|h| format!("held by {}", h.file_name().to_string_lossy())));
    users
}

/// Mount points of the block device `major:minor`, from mountinfo.
fn mount_points(devno: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&devno)).then(|| f.get(4).unwrap_or(&"?").to_string())
        })
        .collect()
}
