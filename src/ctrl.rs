//! Control plane: commands to `/dev/ublk-control` over an SQE128 io_uring.
//!
//! One `Ctrl` per thread (the ring is not shared). Every command is
//! synchronous: it is submitted and its single completion awaited. Buffers
//! passed to the kernel live on the caller's stack for the whole call, which
//! covers the command's lifetime because we wait for its CQE before returning.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::error::{Error, Result};
use crate::sys::{self, CtrlCmd, DevInfo, Params};

pub const CONTROL_PATH: &str = "/dev/ublk-control";

pub struct Ctrl {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fd: File,
    cancel_on: Option<&'static AtomicBool>,
}

/// user_data of a cancel request; commands use their opcode.
const CANCEL_TAG: u64 = u64::MAX;

impl Ctrl {
    /// Opens `/dev/ublk-control`, with errors a person can act on.
    pub fn open() -> Result<Self> {
        let fd = OpenOptions::new().read(true).write(true).open(CONTROL_PATH).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ENOENT) => Error::NoDriver,
                Some(libc::EACCES) | Some(libc::EPERM) => Error::NotRoot,
                _ => Error::io(format!("open {CONTROL_PATH}"), e),
            }
        })?;
        let ring =
            IoUring::builder().build(4).map_err(|e| Error::io("io_uring setup for the control ring", e))?;
        Ok(Ctrl { ring, fd, cancel_on: None })
    }

    /// Submits one control command and returns its CQE result (>= 0) or the errno.
    fn cmd(&mut self, op: u32, cmd: CtrlCmd) -> io::Result<i32> {
        let mut payload = [0u8; 80];
        // SAFETY: CtrlCmd is repr(C), 32 bytes, plain data; payload has room for it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                &cmd as *const CtrlCmd as *const u8,
                payload.as_mut_ptr(),
                size_of::<CtrlCmd>(),
            )
        };
        let sqe = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op)
            .cmd(payload)
            .build()
            .user_data(op as u64);
        // SAFETY: the buffer `cmd.addr` points at is owned by our caller, who
        // keeps it alive until this function returns, and we return only after
        // the command's completion has been reaped.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("control ring full"))?;
        let mut cancelled = false;
        loop {
            // A signal ends the wait with EINTR, or with the count submitted
            // when this call also submitted something.
            match self.ring.submit_and_wait(1) {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => return Err(e),
                _ => {}
            }
            while let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                if cqe.user_data() == op as u64 {
                    return if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res) };
                }
            }
            if !cancelled && self.cancel_on.is_some_and(|f| f.load(Ordering::Relaxed)) {
                cancelled = self.cancel(op as u64);
            }
        }
    }

    /// Control commands that may sleep (DEL_DEV waits for the last user of
    /// `/dev/ublkcN`) run in an io_uring worker, which a signal to this
    /// process does not reach. Once `flag` is set (by a signal handler), a
    /// wait interrupted by a signal cancels the command instead: io_uring
    /// then interrupts the worker, and the command ends with -EINTR.
    pub fn cancel_when(&mut self, flag: &'static AtomicBool) {
        self.cancel_on = Some(flag);
    }

    fn cancel(&mut self, user_data: u64) -> bool {
        let sqe = opcode::AsyncCancel::new(user_data).build().user_data(CANCEL_TAG);
        // SAFETY: a cancel request carries no buffer.
        unsafe { self.ring.submission().push(&sqe.into()) }.is_ok()
    }

    fn dev_cmd<T>(&mut self, op: u32, dev_id: u32, buf: Option<&mut T>, data: u64) -> io::Result<i32> {
        let (addr, len) = match buf {
            Some(b) => (b as *mut T as u64, size_of::<T>() as u16),
            None => (0, 0),
        };
        let cmd = CtrlCmd { dev_id, queue_id: sys::QUEUE_ID_NONE, len, addr, data, ..Default::default() };
        self.cmd(op, cmd)
    }

    /// Every `UBLK_F_*` flag the running kernel supports.
    pub fn features(&mut self) -> Result<u64> {
        let mut f: u64 = 0;
        self.dev_cmd(sys::UBLK_U_CMD_GET_FEATURES, 0, Some(&mut f), 0)
            .map_err(|e| Error::io("GET_FEATURES (kernel older than 6.5?)", e))?;
        Ok(f)
    }

    /// ADD_DEV. On success `info` holds what the kernel granted.
    pub fn add(&mut self, info: &mut DevInfo) -> io::Result<()> {
        let id = info.dev_id;
        self.dev_cmd(sys::UBLK_U_CMD_ADD_DEV, id, Some(info), 0).map(|_| ())
    }

    pub fn set_params(&mut self, dev_id: u32, params: &mut Params) -> io::Result<()> {
        params.len = size_of::<Params>() as u32;
        self.dev_cmd(sys::UBLK_U_CMD_SET_PARAMS, dev_id, Some(params), 0).map(|_| ())
    }

    pub fn get_params(&mut self, dev_id: u32) -> io::Result<Params> {
        let mut p = Params { len: size_of::<Params>() as u32, ..Default::default() };
        self.dev_cmd(sys::UBLK_U_CMD_GET_PARAMS, dev_id, Some(&mut p), 0)?;
        Ok(p)
    }

    /// START_DEV blocks until every tag has been fetched: call it from a
    /// thread other than the queue threads.
    pub fn start(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_START_DEV, dev_id, None, pid as u64).map(|_| ())
    }

    pub fn stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_STOP_DEV, dev_id, None, 0).map(|_| ())
    }

    /// TRY_STOP_DEV (7.0): STOP_DEV unless the block device is open (-EBUSY).
    pub fn try_stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_TRY_STOP_DEV, dev_id, None, 0).map(|_| ())
    }

    /// DEL_DEV waits until every reference to `/dev/ublkcN` is gone, so the
    /// caller must not hold one.
    pub fn del(&mut self, dev_id: u32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_DEL_DEV, dev_id, None, 0).map(|_| ())
    }

    pub fn del_async(&mut self, dev_id: u32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_DEL_DEV_ASYNC, dev_id, None, 0).map(|_| ())
    }

    pub fn info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut info = DevInfo::default();
        self.dev_cmd(sys::UBLK_U_CMD_GET_DEV_INFO, dev_id, Some(&mut info), 0)?;
        Ok(info)
    }

    /// The CPUs blk-mq maps to queue `qid`, in a mask of `nr_cpu_ids` bits
    /// at least (shorter ones the kernel refuses).
    pub fn queue_affinity(&mut self, dev_id: u32, qid: u16, nr_cpu_ids: usize) -> io::Result<Vec<usize>> {
        let mut mask = vec![0u64; sys::cpu_mask_words(nr_cpu_ids)];
        let len = u16::try_from(mask.len() * 8).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let cmd = CtrlCmd {
            dev_id,
            queue_id: sys::QUEUE_ID_NONE,
            len,
            addr: mask.as_mut_ptr() as u64,
            data: qid as u64,
            ..Default::default()
        };
        // `mask` lives until `cmd` returns, which waits for the completion.
        self.cmd(sys::UBLK_U_CMD_GET_QUEUE_AFFINITY, cmd)?;
        Ok(sys::mask_cpus(&mask))
    }

    pub fn start_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_START_USER_RECOVERY, dev_id, None, 0).map(|_| ())
    }

    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_END_USER_RECOVERY, dev_id, None, pid as u64).map(|_| ())
    }

    /// UPDATE_SIZE: the device's capacity becomes `sectors` (512 bytes
    /// each). The kernel does not check that the device was made with
    /// UBLK_F_UPDATE_SIZE and changes the capacity of a started device
    /// only (-ENODEV before START_DEV): the caller checks both.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_UPDATE_SIZE, dev_id, None, sectors).map(|_| ())
    }

    pub fn quiesce(&mut self, dev_id: u32, timeout_ms: u64) -> io::Result<()> {
        self.dev_cmd::<u8>(sys::UBLK_U_CMD_QUIESCE_DEV, dev_id, None, timeout_ms).map(|_| ())
    }
}

/// Where the driver lists its devices: one `ublkcN` entry per device.
pub const SYSFS_CLASS: &str = "/sys/class/ublk-char";
/// Ids probed with GET_DEV_INFO when sysfs is unreadable: the kernel hands
/// out the lowest free id, so devices without `-n` sit at the bottom.
pub const PROBE_IDS: u32 = 1024;

/// Ids of every ublk device, sorted. From sysfs; where that is unreadable
/// (not mounted, a container), from the `/dev/ublkcN` nodes and ids
/// 0..PROBE_IDS, each confirmed by GET_DEV_INFO.
pub fn device_ids(ctrl: &mut Ctrl) -> Result<Vec<u32>> {
    enumerate(Path::new(SYSFS_CLASS), Path::new("/dev"), |id| ctrl.info(id).is_ok())
}

/// [`device_ids`] with the folders and the probe as parameters.
pub fn enumerate(sysfs: &Path, dev: &Path, mut exists: impl FnMut(u32) -> bool) -> Result<Vec<u32>> {
    match ids_in(sysfs) {
        Ok(ids) => return Ok(ids),
        Err(e) => eprintln!(
            "ublk-bench: cannot read {} ({e}): probing /dev/ublkc* and ids 0-{} instead",
            sysfs.display(),
            PROBE_IDS - 1
        ),
    }
    let nodes = ids_in(dev).map_err(|e| {
        Error::io(
            format!(
                "enumerate devices: neither {} nor {} is readable (mount sysfs)",
                sysfs.display(),
                dev.display()
            ),
            e,
        )
    })?;
    let mut ids: Vec<u32> = nodes.into_iter().chain(0..PROBE_IDS).filter(|&id| exists(id)).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The N of every `ublkcN` entry in `dir`, sorted.
fn ids_in(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(id) = entry?.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")?.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub fn char_path(dev_id: u32) -> String {
    format!("/dev/ublkc{dev_id}")
}

pub fn block_path(dev_id: u32) -> String {
    format!("/dev/ublkb{dev_id}")
}

/// The error for a control command on `dev_id` that failed: ENODEV or
/// ENOENT mean there is no such device, and say so.
pub fn no_device(dev_id: u32, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENOENT) => Error::NoDevice(dev_id),
        _ => Error::kernel(format!("GET_DEV_INFO of device {dev_id}"), e),
    }
}

/// Refuses a device that was created without USER_RECOVERY.
pub fn check_recoverable(info: &DevInfo) -> Result<()> {
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        return Err(Error::Recovery(format!(
            "device {} was created without -r (USER_RECOVERY): it cannot be recovered; delete it and add it again with -r",
            info.dev_id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_entries_give_the_ids() {
        let sys = tempfile::tempdir().unwrap();
        for name in ["ublkc7", "ublkc2", "ublkc10", "other", "ublkcx"] {
            std::fs::create_dir(sys.path().join(name)).unwrap();
        }
        let ids =
            enumerate(sys.path(), Path::new("/nonexistent"), |_| panic!("no probe with sysfs")).unwrap();
        assert_eq!(ids, vec![2, 7, 10]);
    }

    #[test]
    fn without_sysfs_nodes_and_low_ids_are_probed() {
        let dev = tempfile::tempdir().unwrap();
        for name in ["ublkc3", "ublkc5000", "ublkc9999", "ublkb3", "null"] {
            std::fs::write(dev.path().join(name), b"").unwrap();
        }
        let live = [3, 5, 5000];
        let mut probed = Vec::new();
        let ids = enumerate(Path::new("/nonexistent/ublk-char"), dev.path(), |id| {
            probed.push(id);
            live.contains(&id)
        })
        .unwrap();
        // 9999 has a stale node but no device; 5 has a device but no node.
        assert_eq!(ids, vec![3, 5, 5000]);
        assert!(probed.contains(&9999) && probed.contains(&(PROBE_IDS - 1)), "probed {} ids", probed.len());
    }

    #[test]
    fn nothing_readable_is_an_error() {
        let err = enumerate(Path::new("/nonexistent/a"), Path::new("/nonexistent/b"), |_| true).unwrap_err();
        assert!(err.to_string().contains("mount sysfs"), "{err}");
    }
}
