//! A device's size as its servers serve it, which `resize` changes while
//! they run. One cell per device, `/run/ublk-bench/<id>.size`, mapped
//! shared by every server process of the device (the serving one, a hot
//! standby, a restart's successor) and by `resize`; a backend checks each
//! request's range against it with one relaxed load, so a server learns a
//! new size without a signal, a lock or a remap.
//!
//! Layout: the size in bytes (u64), then the map limit (u64): how many
//! bytes of a RAM store the user- and copy-mode servers map (a range
//! reserved past the store's end at map time, so a grown store needs no
//! new mapping); `resize` refuses to grow a mapped store past it.
//!
//! Order, so that no request is served outside what the backend holds
//! (`cmd::resize`): growing, the store is extended first, then this cell,
//! then UPDATE_SIZE; shrinking, UPDATE_SIZE first, then this cell, and the
//! store's tail goes last.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::config::DeviceConfig;
use crate::error::{Error, Result};
use crate::run_files;

const LEN: usize = 2 * size_of::<u64>();

/// What `resize` may make of a device, from its backend
/// ([`super::Backend::resizing`]), read before anything changes.
#[derive(Default)]
pub struct Resizing {
    pub room: Room,
    /// The cell the device's servers follow (None: they check no size).
    pub live: Option<LiveSize>,
    /// What `resize` grows and cuts (a RAM store).
    pub store: Option<Box<dyn ResizableStore>>,
}

/// What the machine allows a device to become.
#[derive(Debug, Default, Clone, Copy)]
pub struct Room {
    /// `file`: the bytes its file (or block device) holds now.
    pub file_bytes: Option<u64>,
    /// `ram`: bytes free where the store is.
    pub free: Option<u64>,
    /// `ram` in user or copy mode: how far its servers map the store.
    pub map_limit: Option<u64>,
    /// The smallest size is one block (`file`), not 1M.
    pub min_one_block: bool,
}

/// A backing store that follows the device's size.
pub trait ResizableStore {
    /// Extends it from `old` to `new` bytes (reserved as the device asks);
    /// on failure it is as it was.
    fn grow(&self, old: u64, new: u64) -> Result<()>;
    /// Cuts it to `new` bytes.
    fn cut(&self, new: u64) -> Result<()>;
}

pub struct LiveSize {
    /// LEN bytes, page aligned: two naturally aligned u64 cells.
    map: MmapRaw,
}

/// Where device `dev_id`'s cell is.
pub fn path(dev_id: u32) -> PathBuf {
    run_files::run_dir().join(format!("{dev_id}.size"))
}

/// Removes a cell left by a gone device with the id a new device got.
pub fn remove(dev_id: u32) {
    let _ = std::fs::remove_file(path(dev_id));
}

impl LiveSize {
    /// A cell of this process only (no device: tests, tools).
    pub fn private(size: u64) -> Arc<LiveSize> {
        Self::private_up_to(size, 0)
    }

    /// [`Self::private`] with a map limit, as a device's cell has one.
    pub fn private_up_to(size: u64, map_limit: u64) -> Arc<LiveSize> {
        let map = MmapOptions::new().len(LEN).map_anon().expect("an anonymous page maps");
        let live = LiveSize { map: map.into() };
        live.set(size);
        live.cell(1).store(map_limit, Ordering::Relaxed);
        Arc::new(live)
    }

    /// Device `dev_id`'s cell, made (of `size`) where none is: a new
    /// device's server removed a gone device's first ([`remove`]). A
    /// takeover opens the one there, which `resize` may have changed since
    /// the takeover read its settings.
    pub fn of_device(dev_id: u32, size: u64, map_limit: u64) -> Result<Arc<LiveSize>> {
        let p = path(dev_id);
        if !p.exists() {
            run_files::ensure_run_dir()?;
            let mut bytes = [0u8; LEN];
            bytes[..8].copy_from_slice(&size.to_ne_bytes());
            bytes[8..].copy_from_slice(&map_limit.max(size).to_ne_bytes());
            run_files::write_atomic(&p, &bytes)?;
        }
        Self::open(dev_id).map(Arc::new)
    }

    /// The cell of the device `cfg` describes (a private one without an
    /// id); `map_limit` is how far a mapped store may grow.
    pub fn of_config(cfg: &DeviceConfig, map_limit: u64) -> Result<Arc<LiveSize>> {
        match cfg.dev_id {
            Some(id) => Self::of_device(id, cfg.size, map_limit),
            None => Ok(Self::private(cfg.size)),
        }
    }

    /// Opens device `dev_id`'s cell as it is (`resize`).
    pub fn open(dev_id: u32) -> Result<LiveSize> {
        let p = path(dev_id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
        let len = file.metadata().map_err(|e| Error::io(format!("stat {}", p.display()), e))?.len();
        if len < LEN as u64 {
            return Err(Error::invalid(format!(
                "{} holds {len} bytes, not {LEN}: it is not a size cell; delete the device",
                p.display()
            )));
        }
        let map = MmapOptions::new()
            .len(LEN)
            .map_raw(&file)
            .map_err(|e| Error::io(format!("mmap {}", p.display()), e))?;
        Ok(LiveSize { map })
    }

    fn cell(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the map is LEN bytes, page aligned, and lives as long as
        // self; every process reaches the cells only atomically.
        unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(i) }
    }

    /// The size in bytes a request must end within.
    #[inline]
    pub fn get(&self) -> u64 {
        self.cell(0).load(Ordering::Relaxed)
    }

    /// Another process's queue threads see it at their next request; the
    /// kernel sends nothing past the old size until UPDATE_SIZE, which the
    /// caller sends after this (growing).
    pub fn set(&self, size: u64) {
        self.cell(0).store(size, Ordering::Release)
    }

    /// How far a mapped RAM store is mapped (at least the size at creation).
    pub fn map_limit(&self) -> u64 {
        self.cell(1).load(Ordering::Relaxed)
    }

    /// Whether `[offset, offset+len)` lies within the size.
    #[inline]
    pub fn holds(&self, offset: u64, len: u32) -> bool {
        offset.checked_add(len as u64).is_some_and(|end| end <= self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_cell_bounds_requests_by_its_current_size() {
        let s = LiveSize::private(8192);
        assert!(s.holds(4096, 4096) && !s.holds(4096, 4097) && !s.holds(u64::MAX, 1));
        s.set(16384);
        assert!(s.holds(8192, 8192), "grown: the new range is served");
        s.set(4096);
        assert!(!s.holds(4096, 512), "shrunk: the tail is refused");
        assert_eq!(s.map_limit(), 0);
    }
}
