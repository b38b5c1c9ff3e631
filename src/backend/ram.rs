//! `ram`: the store is a file on shared memory (`/dev/shm` by default) that
//! ublk-bench creates and owns, so its bytes outlive the server process and a
//! recovered server finds every acknowledged write where it left it.
//!
//! With zero copy (the default where the kernel has it) the store is served
//! like any file by `file::FileQueue`, and no server maps it: a dying server
//! has no store pages to unmap, and a standby maps nothing either. This module
//! keeps the store's creation and ownership, and the mapped path of the user
//! and copy modes (kept for older kernels and for comparison).
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

use super::{SyncBackend, done, pread_all, pwrite_all};
use crate::error::{Error, Result};
use crate::request::{Data, Request};
use crate::sys;

/// The shared-memory store of one device.
pub struct RamStore {
    file: File,
    map: MmapRaw,
    size: u64,
    path: PathBuf,
}

/// Creates a fresh zeroed store file of `size` bytes at `path`, mode 0600.
/// The path must not exist (O_EXCL, and O_NOFOLLOW for a dangling link):
/// ublk-bench never truncates a file it did not make.
pub fn create_file(path: &Path, size: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(format!(
                "RAM store {} already exists: pick another --store, remove it, or add --reuse-store to serve its contents",
                path.display()
            )),
            _ => Error::io(format!("create RAM store {}", path.display()), e),
        })?;
    if let Err(e) = file.set_len(size) {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(format!("size RAM store {} to {size} bytes", path.display()), e));
    }
    Ok(file)
}

/// Opens an existing store file, as a recovering server or `--reuse-store`
/// does; it must be a regular file (not a link) of exactly `size` bytes.
pub fn open_file(path: &Path, size: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(format!("open RAM store {} (was it removed?)", path.display()), e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat RAM store", e))?;
    check_existing(path, &meta, Some(size))?;
    Ok(file)
}

impl RamStore {
    /// A fresh store at `path`, mapped (user and copy modes).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Self::map(create_file(path, size)?, path, size)
    }

    /// An existing store at `path`, mapped.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        Self::map(open_file(path, size)?, path, size)
    }

    /// Maps `file` MAP_SHARED: the user and copy modes move bytes through the map.
    pub fn map(file: File, path: &Path, size: u64) -> Result<Self> {
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

/// Checks a store the user named with `--reuse-store`: a regular file
/// whose size is `size` (when given). Returns its size.
pub fn check_existing(path: &Path, meta: &std::fs::Metadata, size: Option<u64>) -> Result<u64> {
    if !meta.file_type().is_file() {
        return Err(Error::invalid(format!(
            "RAM store {} is not a regular file: give a file path for --store",
            path.display()
        )));
    }
    match size {
        Some(want) if want != meta.len() => Err(Error::invalid(format!(
            "RAM store {} holds {} bytes but the device has {want}: give --size {} or another store",
            path.display(),
            meta.len(),
            meta.len()
        ))),
        _ => Ok(meta.len()),
    }
}

/// Makes a `--store` path absolute with a canonical folder (so `recover`
/// and `del` from anywhere find the same file) and checks it before any
/// device exists: a new store must not exist yet; a reused one must be a
/// regular file of the right size. Returns the path and, when reused, the
/// store's size.
pub fn resolve_store(path: &Path, reuse: bool, size: Option<u64>) -> Result<(PathBuf, Option<u64>)> {
    let name = path.file_name().filter(|n| *n != "." && *n != "..").ok_or_else(|| {
        Error::invalid(format!("--store {} names no file: give a file path", path.display()))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir.canonicalize().map_err(|e| {
        Error::io(format!("--store {}: its folder {} must exist", path.display(), dir.display()), e)
    })?;
    let full = dir.join(name);
    match (std::fs::symlink_metadata(&full), reuse) {
        (Ok(meta), true) => Ok((full.clone(), Some(check_existing(&full, &meta, size)?))),
        (Ok(_), false) => Err(Error::invalid(format!(
            "--store {} already exists: ublk-bench only creates new stores; pick another path, or add \
             --reuse-store to serve its contents",
            full.display()
        ))),
        (Err(e), true) => Err(Error::io(format!("--reuse-store: cannot use {}", full.display()), e)),
        (Err(_), false) => Ok((full, None)),
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
            // A length the tag's buffer cannot hold is the kernel's error, not
            // a copy past the buffer's end.
            Data::Buf(buf) if buf.len() >= req.len as usize => {
                // SAFETY: src..src+len is inside the map (checked by in_range),
                // and buf holds len bytes (checked just above).
                unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), req.len as usize) };
                done(req.len)
            }
            // SAFETY: src..src+len is inside the map (checked by in_range).
            Data::UserCopy { fd, pos } => unsafe { pwrite_all(fd, src, req.len as usize, pos) },
            Data::Buf(_) | Data::None | Data::Fixed { .. } | Data::Registered { .. } => -libc::EINVAL,
        }
    }

    fn write(&self, req: &Request, data: Data<'_>) -> i32 {
        let dst = self.ptr(req);
        match data {
            Data::Buf(buf) if buf.len() >= req.len as usize => {
                // SAFETY: as in read, with the direction reversed.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, req.len as usize) };
                done(req.len)
            }
            // SAFETY: dst..dst+len is inside the map (checked by in_range).
            Data::UserCopy { fd, pos } => unsafe { pread_all(fd, dst, req.len as usize, pos) },
            Data::Buf(_) | Data::None | Data::Fixed { .. } | Data::Registered { .. } => -libc::EINVAL,
        }
    }

    fn ptr(&self, req: &Request) -> *mut u8 {
        // SAFETY: only called after in_range, so the offset is inside the map.
        unsafe { self.store.map.as_mut_ptr().add(req.offset as usize) }
    }
}

impl SyncBackend for RamQueue {
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32 {
        // A FLUSH carries no range (its sector may be -1).
        if req.op != sys::UBLK_IO_OP_FLUSH && !self.store.in_range(req) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Copy mode: a request longer than the tag's buffer is refused before
    /// any byte moves; neither the bytes after the buffer nor the store change.
    #[test]
    fn copy_mode_requests_longer_than_the_tag_buffer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RamStore::create(&dir.path().join("store"), 1 << 20).unwrap());
        let mut q = RamQueue::new(store);
        let mut mem = vec![0xaau8; 16384];
        let (buf, after) = mem.split_at_mut(4096);
        buf.fill(0x55);
        let write = Request { op: sys::UBLK_IO_OP_WRITE, flags: 0, offset: 8192, len: 4096 };
        assert_eq!(q.serve(&write, Data::Buf(buf)), 4096);
        for op in [sys::UBLK_IO_OP_READ, sys::UBLK_IO_OP_WRITE] {
            let long = Request { op, flags: 0, offset: 8192, len: 8192 };
            assert_eq!(q.serve(&long, Data::Buf(buf)), -libc::EINVAL, "op {op}");
        }
        assert!(after.iter().all(|&b| b == 0xaa), "a READ wrote past the tag's buffer");
        let mut back = vec![0u8; 8192];
        let read = Request { op: sys::UBLK_IO_OP_READ, flags: 0, offset: 8192, len: 8192 };
        assert_eq!(q.serve(&read, Data::Buf(&mut back)), 8192);
        assert!(back[..4096].iter().all(|&b| b == 0x55), "the block written within the buffer");
        assert!(back[4096..].iter().all(|&b| b == 0), "a WRITE took bytes from past the tag's buffer");
    }
}
