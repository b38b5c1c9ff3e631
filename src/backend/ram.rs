//! `ram`: the store is a shared-memory file mapped MAP_SHARED, so its bytes
//! outlive the server process and a recovered server finds every
//! acknowledged write where it left it.
//!
//! Queue threads touch disjoint byte ranges only because the block layer
//! never has two overlapping requests in flight that both complete
//! successfully with defined content; the store itself takes no lock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::{Data, Request, SyncBackend, done, pread_all, pwrite_all};
use crate::error::{Error, Result};
use crate::sys;

/// The shared-memory store of one device.
pub struct RamStore {
    file: File,
    map: MmapRaw,
    size: u64,
    path: PathBuf,
}

impl RamStore {
    /// Creates a fresh zeroed store of `size` bytes at `path` (mode 0600).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("create RAM store {}", path.display()), e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("size RAM store {} to {size} bytes", path.display()), e))?;
        Self::map(file, path, size)
    }

    /// Opens an existing store, as a recovering server does; its size must match.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open RAM store {} (was it removed?)", path.display()), e))?;
        let have = file.metadata().map_err(|e| Error::io("stat RAM store", e))?.len();
        if have != size {
            return Err(Error::invalid(format!(
                "RAM store {} holds {have} bytes but the device has {size}",
                path.display()
            )));
        }
        Self::map(file, path, size)
    }

    fn map(file: File, path: &Path, size: u64) -> Result<Self> {
        let map = MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(|e| Error::io(format!("mmap RAM store {}", path.display()), e))?;
        Ok(RamStore { file, map, size, path: path.to_owned() })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Zeroes `[off, off+len)`: whole pages are punched out of the file, so
    /// a device-wide discard frees memory instead of touching every page.
    fn zero(&self, off: u64, len: u64) -> i32 {
        let page = 4096u64;
        let start = off.next_multiple_of(page).min(off + len);
        let end = ((off + len) / page * page).max(start);
        self.memset(off, start - off);
        self.memset(end, off + len - end);
        if end > start {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an fd we own.
            let r =
                unsafe { libc::fallocate(self.file.as_raw_fd(), mode, start as i64, (end - start) as i64) };
            if r != 0 {
                self.memset(start, end - start);
            }
        }
        0
    }

    fn memset(&self, off: u64, len: u64) {
        // SAFETY: callers checked off+len <= size; the map lives as long as self.
        unsafe { self.map.as_mut_ptr().add(off as usize).write_bytes(0, len as usize) };
    }

    fn in_range(&self, req: &Request) -> bool {
        req.offset.checked_add(req.len as u64).is_some_and(|end| end <= self.size)
    }
}

/// One queue's handle on the shared store.
pub struct RamQueue {
    store: Arc<RamStore>,
}

impl RamQueue {
    pub fn new(store: Arc<RamStore>) -> Self {
        RamQueue { store }
    }

    fn read(&self, req: &Request, data: Data<'_>) -> i32 {
        let src = self.ptr(req);
        match data {
            Data::Buf(buf) => {
                // SAFETY: src..src+len is inside the map (checked by in_range),
                // and buf is the tag's own buffer of at least max_io_buf_bytes.
                unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), req.len as usize) };
                done(req.len)
            }
            // SAFETY: src..src+len is inside the map (checked by in_range).
            Data::UserCopy { fd, pos } => unsafe { pwrite_all(fd, src, req.len as usize, pos) },
            Data::None | Data::Fixed { .. } | Data::Registered { .. } => -libc::EINVAL,
        }
    }

    fn write(&self, req: &Request, data: Data<'_>) -> i32 {
        let dst = self.ptr(req);
        match data {
            Data::Buf(buf) => {
                // SAFETY: as in read, with the direction reversed.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, req.len as usize) };
                done(req.len)
            }
            // SAFETY: dst..dst+len is inside the map (checked by in_range).
            Data::UserCopy { fd, pos } => unsafe { pread_all(fd, dst, req.len as usize, pos) },
            Data::None | Data::Fixed { .. } | Data::Registered { .. } => -libc::EINVAL,
        }
    }

    fn ptr(&self, req: &Request) -> *mut u8 {
        // SAFETY: only called after in_range, so the offset is inside the map.
        unsafe { self.store.map.as_mut_ptr().add(req.offset as usize) }
    }
}

impl SyncBackend for RamQueue {
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32 {
        if !self.store.in_range(req) {
            return -libc::EINVAL;
        }
        match req.op {
            sys::UBLK_IO_OP_READ => self.read(req, data),
            sys::UBLK_IO_OP_WRITE => self.write(req, data),
            sys::UBLK_IO_OP_FLUSH => 0,
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                self.store.zero(req.offset, req.len as u64)
            }
            _ => -libc::EOPNOTSUPP,
        }
    }
}
