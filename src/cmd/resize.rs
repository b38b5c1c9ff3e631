//! `resize -n ID --size S`: a LIVE device's capacity changes while it is
//! served (UPDATE_SIZE, Linux 6.16; the device must have been made with
//! UBLK_F_UPDATE_SIZE). `null` takes any size; `ram` grows or shrinks its
//! store, keeping the data below the new size; `file` serves up to its
//! file's size (the file itself is never changed). `nvme` is refused.
//!
//! Every check comes before the kernel or the store is touched. The order
//! then keeps every request inside what the backend holds
//! ([`crate::backend::live_size`]): growing, the store is extended (and
//! reserved unless `--sparse`), the servers' size cell set, then
//! UPDATE_SIZE; shrinking, UPDATE_SIZE, the cell, then the requests already
//! in flight drain and the store's tail is cut. The settings file takes the
//! new size, so every later server (recover, restart, standby, supervisor)
//! comes up at it and agrees with the kernel's GET_PARAMS.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend;
use crate::backend::live_size::{self, Resizing, Room};
use crate::cmd::list::print_one;
use crate::config::{self, DeviceConfig};
use crate::ctrl::{Ctrl, no_device};
use crate::error::{Error, Result};
use crate::recovery::check_settings;
use crate::{fault, run_files, sys};

/// How long a shrink waits for requests in flight to end before it cuts
/// the store's tail (a request is served in microseconds; a device under
/// steady load may never be idle, so the wait is bounded).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

pub fn run(dev_id: u32, size: u64) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.info(dev_id).map_err(|e| no_device(dev_id, e))?;
    let features = fault::mask_features(ctrl.features()?, fault::from_env()?);
    check_kernel(dev_id, features, info.flags)?;
    if info.state != sys::UBLK_S_DEV_LIVE {
        return Err(Error::Refused(format!(
            "device {dev_id} is {}, not LIVE: its server must run to learn a new size; run \
             `ublk-bench recover -n {dev_id}` first",
            sys::state_name(info.state)
        )));
    }
    // One resize at a time, from reading the size on: the store, the cell
    // and the kernel change in step. (A null device has no cell, and
    // nothing to keep in step.)
    let _lock = lock(dev_id)?;
    let mut cfg = run_files::load(dev_id)?;
    let params = ctrl.get_params(dev_id).map_err(|e| Error::kernel("GET_PARAMS", e))?;
    check_settings(dev_id, &mut cfg, &info, &params)?;
    let Resizing { room, live, store } = backend::of(cfg.backend).resizing(dev_id, &cfg)?;
    check_size(dev_id, &cfg, size, &room)?;
    let old = cfg.size;
    if size == old {
        println!("device {dev_id} is already {size} bytes");
        return Ok(());
    }
    cfg.size = size;
    let set_live = |to: u64| live.as_ref().map(|l| l.set(to));
    if size > old {
        if let Some(s) = &store {
            s.grow(old, size)?;
        }
        set_live(size);
        if let Err(e) = ctrl.update_size(dev_id, size >> 9) {
            set_live(old);
            if let Some(s) = &store {
                let _ = s.cut(old);
            }
            return Err(Error::kernel("UPDATE_SIZE", e));
        }
        run_files::save(dev_id, &cfg)?;
    } else {
        ctrl.update_size(dev_id, size >> 9).map_err(|e| Error::kernel("UPDATE_SIZE", e))?;
        run_files::save(dev_id, &cfg)?;
        set_live(size);
        if let Some(s) = &store {
            drain(dev_id);
            s.cut(size)?;
        }
    }
    print_one(dev_id, false)
}

/// The kernel must have UPDATE_SIZE, and the device must have been made
/// with it (the kernel would change the size of one made without, whose
/// server cannot follow).
pub fn check_kernel(dev_id: u32, features: u64, flags: u64) -> Result<()> {
    if features & sys::UBLK_F_UPDATE_SIZE == 0 {
        return Err(Error::Unsupported {
            feature: "UBLK_F_UPDATE_SIZE",
            version: "6.16",
            hint: "a device's size cannot change on it; make a new device with the --size wanted",
        });
    }
    if flags & sys::UBLK_F_UPDATE_SIZE == 0 {
        return Err(Error::Refused(format!(
            "device {dev_id} was made without UBLK_F_UPDATE_SIZE (by an older ublk-bench or kernel), so its \
             size cannot change: make a new device with the --size wanted"
        )));
    }
    Ok(())
}

/// Whether device `dev_id` (settings `cfg`) may become `new` bytes, and
/// if not, what to give instead.
pub fn check_size(dev_id: u32, cfg: &DeviceConfig, new: u64, room: &Room) -> Result<()> {
    if let Some(i) = &cfg.integrity {
        return Err(Error::invalid(format!(
            "device {dev_id} keeps protection information ({}) after its data in the store: resize takes \
             devices without --integrity; make a new device with the --size wanted",
            i.describe()
        )));
    }
    let bs = cfg.block_size as u64;
    let (min, min_name) = match room.min_one_block {
        true => (bs, format!("{bs} (one block)")),
        false => (config::MIN_SIZE, "1M".into()),
    };
    if new < min || new > config::MAX_SIZE {
        return Err(Error::invalid(format!(
            "size {new} is out of range: give --size between {min_name} and 1P"
        )));
    }
    if !new.is_multiple_of(bs) {
        return Err(Error::invalid(format!(
            "size {new} is not a multiple of the device's block size {bs}: round it, e.g. --size {}",
            new / bs * bs
        )));
    }
    if let Some(held) = room.file_bytes.filter(|&held| new > held) {
        return Err(Error::invalid(format!(
            "size {new} exceeds {} ({held} bytes): give at most {}, or grow the file first",
            cfg.path.as_deref().unwrap_or(Path::new("the file")).display(),
            held / bs * bs
        )));
    }
    let grow = new.saturating_sub(cfg.size);
    if let Some(free) = room.free.filter(|&free| grow > free) {
        return Err(Error::invalid(format!(
            "growing the RAM store by {grow} bytes does not fit ({free} bytes free there): give a smaller --size \
             or free space"
        )));
    }
    if let Some(limit) = room.map_limit.filter(|&limit| new > limit) {
        return Err(Error::invalid(format!(
            "size {new} is past the {limit} bytes the {} copy servers of device {dev_id} map the store for: \
             give at most {limit}",
            cfg.copy_mode.name()
        )));
    }
    Ok(())
}

/// Takes the device's resize lock (the size cell's flock), or says who
/// has it; None where the device has no cell.
fn lock(dev_id: u32) -> Result<Option<File>> {
    let p = live_size::path(dev_id);
    let f = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", p.display()), e)),
    };
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Refused(format!(
            "another resize of device {dev_id} is running: wait for it, then try again"
        )));
    }
    Ok(Some(f))
}

/// Waits (up to [`DRAIN_TIMEOUT`]) for a moment with no request in flight
/// on the device: a request the server took before it learned the smaller
/// size has then ended, and the store's tail is no one's.
fn drain(dev_id: u32) {
    let p = format!("/sys/block/ublkb{dev_id}/inflight");
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while Instant::now() < deadline {
        let idle = std::fs::read_to_string(&p).is_ok_and(|s| s.split_whitespace().all(|n| n == "0"));
        if idle {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, CopyMode};

    fn dev(backend: BackendKind) -> DeviceConfig {
        DeviceConfig {
            backend,
            size: 64 << 20,
            copy_mode: CopyMode::Zero,
            path: (backend == BackendKind::File).then(|| "/srv/disk.img".into()),
            ..config::tests::sample()
        }
    }

    fn refused(cfg: &DeviceConfig, new: u64, room: Room) -> String {
        check_size(3, cfg, new, &room).expect_err(&format!("{new} was taken")).to_string()
    }

    #[test]
    fn sizes_within_the_backend_are_taken() {
        let ram = Room { free: Some(1 << 30), map_limit: Some(1 << 30), ..Default::default() };
        for new in [1 << 20, 32 << 20, 64 << 20, 512 << 20] {
            check_size(3, &dev(BackendKind::Ram), new, &ram).unwrap();
        }
        check_size(3, &dev(BackendKind::Null), 1 << 50, &Room::default()).unwrap();
        let file = Room { file_bytes: Some(100 << 20), min_one_block: true, ..Default::default() };
        check_size(3, &dev(BackendKind::File), 100 << 20, &file).unwrap();
        check_size(3, &dev(BackendKind::File), 512, &file).unwrap();
    }

    #[test]
    fn bad_sizes_are_refused_with_what_to_give() {
        let none = Room::default();
        let null = dev(BackendKind::Null);
        assert!(refused(&null, 4096, none).contains("give --size between 1M and 1P"));
        assert!(refused(&null, (1 << 50) + 512, none).contains("out of range"));
        let odd = refused(&DeviceConfig { block_size: 4096, ..null.clone() }, (8 << 20) + 512, none);
        assert!(
            odd.contains("not a multiple of the device's block size 4096") && odd.contains("--size 8388608")
        );
        let file = Room { file_bytes: Some(100 << 20), ..Default::default() };
        let past = refused(&dev(BackendKind::File), 101 << 20, file);
        assert!(
            past.contains("exceeds /srv/disk.img (104857600 bytes)") && past.contains("at most 104857600")
        );
        let full = Room { free: Some(16 << 20), ..Default::default() };
        let err = refused(&dev(BackendKind::Ram), 96 << 20, full);
        assert!(err.contains("by 33554432 bytes does not fit (16777216 bytes free"), "{err}");
        // Shrinking needs no room.
        check_size(3, &dev(BackendKind::Ram), 32 << 20, &full).unwrap();
        let mapped = DeviceConfig { copy_mode: CopyMode::User, ..dev(BackendKind::Ram) };
        let map = Room { free: Some(1 << 40), map_limit: Some(128 << 20), ..Default::default() };
        assert!(refused(&mapped, 256 << 20, map).contains("past the 134217728 bytes the user copy servers"));
        let pi = crate::integrity::Integrity::new(crate::integrity::PiFormat::T10difType1, None).unwrap();
        let err = refused(&DeviceConfig { integrity: Some(pi), ..dev(BackendKind::Ram) }, 32 << 20, none);
        assert!(err.contains("protection information") && err.contains("without --integrity"), "{err}");
        let nvme =
            backend::of(BackendKind::Nvme).resizing(3, &dev(BackendKind::Nvme)).err().unwrap().to_string();
        assert!(nvme.contains("NVMe namespace") && nvme.contains("make a new nvme device"), "{nvme}");
    }

    #[test]
    fn a_kernel_or_device_without_update_size_is_refused() {
        let f = sys::UBLK_F_UPDATE_SIZE;
        check_kernel(3, f, f).unwrap();
        let old_kernel = check_kernel(3, 0, 0).unwrap_err().to_string();
        assert!(old_kernel.contains("UBLK_F_UPDATE_SIZE") && old_kernel.contains("6.16"), "{old_kernel}");
        let old_device = check_kernel(3, f, 0).unwrap_err().to_string();
        assert!(old_device.contains("device 3 was made without UBLK_F_UPDATE_SIZE"), "{old_device}");
    }
}
