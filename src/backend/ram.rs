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
//!
//! Space: a store on a tmpfs is sparse until written, and a store write
//! through the map into a hole on a full tmpfs is a SIGBUS that kills the
//! server (and every recovered server again, on the same write). So `add`
//! reserves the whole store ([`reserve`], fallocate) and the map is used
//! only while every page is backed. With `--sparse`, or once a reservation
//! failed (a discard's hole could not be filled again, a reused store could
//! not be reserved), the store is *guarded*: every request goes through the
//! store's fd (pread/pwrite, which tmpfs answers with ENOSPC), never the
//! map, so a full tmpfs fails that request and nothing else.
//!
//! Protection information (`--integrity`): the store file holds the data,
//! then each block's metadata in block order, so it outlives the server
//! with the data it protects. A new store's metadata starts unwritten
//! ([`integrity::UNWRITTEN`]), as do blocks discarded or written without PI.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::claim;
use super::file::Backing;
use super::live_size::{LiveSize, ResizableStore, Resizing, Room};
use super::{
    Backend, Device, DeviceBackend, Options, QueueMaker, SyncBackend, UNWRITTEN_META, done, fill_fd,
    pread_all, pwrite_all,
};
use crate::config::{BackendKind, CopyMode, DeviceConfig, FileId, FileKind};
use crate::error::{Error, Result};
use crate::integrity::{self, MetaLayout};
use crate::plan::{CopyRules, Transfer};
use crate::request::{Data, Request};
use crate::sys;

/// The shared-memory store of one device.
pub struct RamStore {
    file: File,
    /// The store and, past its end, the range it may grow into
    /// (`live_size`): pages past the file's end are never touched.
    map: MmapRaw,
    size: Arc<LiveSize>,
    /// `--integrity`: each block's metadata, in the file from `meta_base`
    /// (the data's size: such a store is never resized).
    meta: Option<MetaLayout>,
    meta_base: u64,
    path: PathBuf,
    /// Some page may be a hole: serve through the fd, not the map (module doc).
    guarded: AtomicBool,
}

/// Bytes a guarded queue moves per step between `/dev/ublkcN` and the store.
const BOUNCE: usize = 64 << 10;
/// A zero page for the unaligned edges of a guarded discard.
static ZEROES: [u8; 4096] = [0; 4096];

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

/// Allocates every page of the store (fallocate), so that no later write
/// finds a hole on a full file system. Holes only: existing data stays.
pub fn reserve(file: &File, path: &Path, size: u64) -> Result<()> {
    fallocate(file, 0, size).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) => Error::invalid(format!(
            "RAM store {}: no room to reserve its {size} bytes (ENOSPC): free space there, give a smaller \
             --size, or add --sparse to serve it unreserved (writes then fail with ENOSPC when it fills)",
            path.display()
        )),
        _ => Error::io(format!("reserve the {size} bytes of RAM store {}", path.display()), e),
    })
}

/// Reserves a store as its device asks (`--sparse` or not) and says
/// whether every page is now backed. A new store that does not fit is
/// removed and the start fails; an existing one (recovery, `--reuse-store`)
/// that cannot be reserved is served guarded rather than not at all.
pub fn reserve_as_asked(file: &File, path: &Path, size: u64, created: bool, sparse: bool) -> Result<bool> {
    if sparse {
        return Ok(false);
    }
    // A store that already has a block for every byte (the usual case on
    // recovery) needs no fallocate, which walks every page: a cold
    // restart would wait for it.
    use std::os::unix::fs::MetadataExt;
    if !created && file.metadata().is_ok_and(|m| m.blocks().saturating_mul(512) >= size) {
        return Ok(true);
    }
    match reserve(file, path, size) {
        Ok(()) => Ok(true),
        Err(e) if created => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
        Err(e) => {
            crate::log!("{e}; serving it guarded (ENOSPC when full)");
            Ok(false)
        }
    }
}

/// The store file's length: `size` data bytes and their metadata.
pub fn store_len(size: u64, meta: Option<MetaLayout>) -> u64 {
    size + meta.map_or(0, |m| m.bytes(size))
}

/// The metadata layout of a device's store (None without `--integrity`).
fn meta_of(cfg: &DeviceConfig) -> Option<MetaLayout> {
    cfg.integrity.map(|i| i.layout(cfg.block_size))
}

/// fallocate mode 0 of `[off, off+len)`.
fn fallocate(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an fd we own.
    match unsafe { libc::fallocate(file.as_raw_fd(), 0, off as i64, len as i64) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Opens an existing store file, as a recovering server or `--reuse-store`
/// does; it must be a regular file (not a link) of exactly `size` bytes.
pub fn open_file(path: &Path, size: u64) -> Result<File> {
    open_checked(path, size, None, None)
}

/// [`open_file`] of device `dev_id`'s store, which must also be the file
/// the device was made with, `want` ([`super::claim`]).
pub fn open_checked(path: &Path, size: u64, want: Option<&FileId>, dev_id: Option<u32>) -> Result<File> {
    let found = claim::find(path)
        .map_err(|e| Error::io(format!("open RAM store {} (was it removed?)", path.display()), e))?;
    found.check(want, dev_id)?;
    let file = match found.id.kind {
        FileKind::File => found.open(libc::O_RDWR | libc::O_CLOEXEC),
        _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let file =
        file.map_err(|e| Error::io(format!("open RAM store {} (is it a regular file?)", path.display()), e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat RAM store", e))?;
    check_existing(path, &meta, Some(size))?;
    Ok(file)
}

impl RamStore {
    /// A fresh store at `path`, reserved and mapped (user and copy modes).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = create_file(path, size)?;
        if let Err(e) = reserve(&file, path, size) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::map(file, path, size, false)
    }

    /// An existing store at `path`, reserved where it can be, and mapped.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let file = open_file(path, size)?;
        let reserved = reserve_as_asked(&file, path, size, false, false)?;
        Self::map(file, path, size, !reserved)
    }

    /// Maps `file` MAP_SHARED: the user and copy modes move bytes through
    /// the map, unless `guarded` (the store may have holes: module doc).
    pub fn map(file: File, path: &Path, size: u64, guarded: bool) -> Result<Self> {
        Self::map_live(file, path, LiveSize::private(size), None, guarded)
    }

    /// [`Self::map`] of a store whose size `resize` may change: the map
    /// covers the limit the cell gives, so a grown store is already mapped.
    /// With `meta` the map is the data and its metadata after it.
    pub fn map_live(
        file: File,
        path: &Path,
        size: Arc<LiveSize>,
        meta: Option<MetaLayout>,
        guarded: bool,
    ) -> Result<Self> {
        let meta_base = size.get();
        let len = match meta {
            Some(_) => store_len(meta_base, meta),
            None => meta_base.max(size.map_limit()),
        };
        let len = usize::try_from(len).map_err(|_| Error::invalid("RAM store too large to map"))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| Error::io(format!("mmap RAM store {}", path.display()), e))?;
        let guarded = AtomicBool::new(guarded);
        Ok(RamStore { file, map, size, meta, meta_base, path: path.to_owned(), guarded })
    }

    /// Requests must not touch the map: some page may be a hole.
    pub fn guarded(&self) -> bool {
        self.guarded.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.size.get()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file as opened.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Zeroes `[off, off+len)`: whole pages are punched out of the file, so
    /// a device-wide discard is quick. A reserved store gets them back at
    /// once (the reservation stands); where that fails the store becomes
    /// guarded, so no later request faults on the hole. A guarded store
    /// keeps its holes, freeing the memory, and zeroes the unaligned edges
    /// through the fd.
    fn zero(&self, off: u64, len: u64) -> i32 {
        let page = 4096u64;
        let start = off.next_multiple_of(page).min(off + len);
        let end = ((off + len) / page * page).max(start);
        let guarded = self.guarded();
        for (at, n) in [(off, start - off), (end, off + len - end)] {
            let r = if guarded { self.write_zeroes(at, n) } else { self.memset(at, n) };
            if r < 0 {
                return r;
            }
        }
        if end > start {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an fd we own.
            let r =
                unsafe { libc::fallocate(self.file.as_raw_fd(), mode, start as i64, (end - start) as i64) };
            if r != 0 {
                return if guarded {
                    self.write_zeroes(start, end - start)
                } else {
                    self.memset(start, end - start)
                };
            }
            if !guarded && fallocate(&self.file, start, end - start).is_err() {
                self.guarded.store(true, Ordering::Relaxed);
                crate::log!(
                    "RAM store {}: a discarded range could not be reserved again; serving it guarded (ENOSPC when full)",
                    self.path.display()
                );
            }
        }
        0
    }

    /// Zeroes a range through the fd (guarded: it may be a hole).
    fn write_zeroes(&self, off: u64, len: u64) -> i32 {
        fill_fd(self.file.as_raw_fd(), &ZEROES, off, len)
    }

    /// Only on a reserved store (no holes, so no fault).
    fn memset(&self, off: u64, len: u64) -> i32 {
        self.fill_map(off, len, 0)
    }

    /// Sets `[off, off+len)` of the file to `byte` through the map.
    fn fill_map(&self, off: u64, len: u64, byte: u8) -> i32 {
        // SAFETY: callers checked off+len is inside the file, which the map
        // covers; the map lives as long as self.
        unsafe { self.map.as_mut_ptr().add(off as usize).write_bytes(byte, len as usize) };
        0
    }

    /// The file range of the metadata of data `[off, off+len)`.
    fn meta_range(&self, meta: MetaLayout, off: u64, len: u64) -> (u64, u64) {
        (self.meta_base + meta.bytes(off), meta.bytes(len))
    }

    /// Marks the metadata of data `[off, off+len)` unwritten (module doc).
    fn unwrite_meta(&self, off: u64, len: u64) -> i32 {
        let Some(meta) = self.meta else { return 0 };
        let (at, n) = self.meta_range(meta, off, len);
        match self.guarded() {
            true => fill_fd(self.file.as_raw_fd(), &UNWRITTEN_META, at, n),
            false => self.fill_map(at, n, integrity::UNWRITTEN),
        }
    }

    fn in_range(&self, req: &Request) -> bool {
        self.size.holds(req.offset, req.len)
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
    /// A guarded store's staging between `/dev/ublkcN` and the store's fd
    /// (user copy); made on first use, so a reserved store never pays for it.
    bounce: Vec<u8>,
}

impl RamQueue {
    pub fn new(store: Arc<RamStore>) -> Self {
        RamQueue { store, bounce: Vec::new() }
    }

    /// Read or write through the store's fd: no access to the map, so a
    /// hole on a full file system is an ENOSPC (write), never a fault.
    fn guarded_io(&mut self, req: &Request, data: Data<'_>, write: bool) -> i32 {
        let store = self.store.file.as_raw_fd();
        let len = req.len as usize;
        let r = match data {
            // SAFETY: buf holds len bytes (checked in serve).
            Data::Buf(buf) if write => unsafe { pwrite_all(store, buf.as_ptr(), len, req.offset) },
            // SAFETY: as above, written by the store's pread.
            Data::Buf(buf) => unsafe { pread_all(store, buf.as_mut_ptr(), len, req.offset) },
            Data::UserCopy { fd, pos } if write => self.bounce_copy((fd, pos), (store, req.offset), len),
            Data::UserCopy { fd, pos } => self.bounce_copy((store, req.offset), (fd, pos), len),
            Data::None | Data::Fixed { .. } | Data::Registered { .. } => -libc::EINVAL,
        };
        if r < 0 { r } else { done(req.len) }
    }

    /// Moves `len` bytes from one fd and position to another through the
    /// bounce buffer; the bytes moved or -errno.
    fn bounce_copy(&mut self, from: (RawFd, u64), to: (RawFd, u64), len: usize) -> i32 {
        if self.bounce.is_empty() {
            self.bounce = vec![0; BOUNCE];
        }
        let b = self.bounce.as_mut_ptr();
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(BOUNCE);
            // SAFETY: bounce is ours and BOUNCE >= n bytes long.
            let r = unsafe {
                match pread_all(from.0, b, n, from.1 + done as u64) {
                    r if r < 0 => r,
                    _ => pwrite_all(to.0, b, n, to.1 + done as u64),
                }
            };
            if r < 0 {
                return r;
            }
            done += n;
        }
        done as i32
    }

    /// `--integrity`: moves the request's metadata between `/dev/ublkcN`
    /// (user copy, the plan's rule) and the store, after its data. A write
    /// that came without PI (the block layer's generate turned off) leaves
    /// its blocks' metadata unwritten, so no stale tuple fails a later read.
    fn move_meta(&mut self, req: &Request, user: Option<(RawFd, u64)>, write: bool) -> i32 {
        let Some(meta) = self.store.meta else { return 0 };
        if req.flags & sys::UBLK_IO_F_INTEGRITY == 0 {
            return if write { self.store.unwrite_meta(req.offset, req.len as u64) } else { 0 };
        }
        let Some((fd, pos)) = user else { return -libc::EINVAL };
        let (at, n) = self.store.meta_range(meta, req.offset, req.len as u64);
        let (pos, n) = (pos | sys::UBLKSRV_IO_INTEGRITY_FLAG, n as usize);
        if self.store.guarded() {
            let store = self.store.file.as_raw_fd();
            return match write {
                true => self.bounce_copy((fd, pos), (store, at), n),
                false => self.bounce_copy((store, at), (fd, pos), n),
            };
        }
        // SAFETY: meta_range of an in_range request is inside the file,
        // which the map covers.
        let p = unsafe { self.store.map.as_mut_ptr().add(at as usize) };
        // SAFETY: [p, p+n) is inside the map (above), which outlives the call.
        unsafe { if write { pread_all(fd, p, n, pos) } else { pwrite_all(fd, p, n, pos) } }
    }

    fn read(&self, req: &Request, data: Data<'_>) -> i32 {
        let src = self.ptr(req);
        match data {
            Data::Buf(buf) => {
                // SAFETY: src..src+len is inside the map (checked by in_range),
                // and buf holds len bytes (checked in serve).
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
        // A FLUSH carries no range (its sector may be -1).
        if req.op != sys::UBLK_IO_OP_FLUSH && !self.store.in_range(req) {
            return -libc::EINVAL;
        }
        // Copy mode: a length the tag's buffer cannot hold is the kernel's
        // error, refused here for every path (mapped or guarded) before any
        // byte moves.
        let rw = matches!(req.op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
        if rw && matches!(&data, Data::Buf(buf) if buf.len() < req.len as usize) {
            return -libc::EINVAL;
        }
        let guarded = self.store.guarded();
        let user = match &data {
            Data::UserCopy { fd, pos } => Some((*fd, *pos)),
            _ => None,
        };
        let r = match req.op {
            sys::UBLK_IO_OP_READ if guarded => self.guarded_io(req, data, false),
            sys::UBLK_IO_OP_WRITE if guarded => self.guarded_io(req, data, true),
            sys::UBLK_IO_OP_READ => self.read(req, data),
            sys::UBLK_IO_OP_WRITE => self.write(req, data),
            sys::UBLK_IO_OP_FLUSH => 0,
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                match self.store.zero(req.offset, req.len as u64) {
                    0 => self.store.unwrite_meta(req.offset, req.len as u64),
                    e => e,
                }
            }
            _ => -libc::EOPNOTSUPP,
        };
        match (r >= 0, req.op) {
            (true, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) if self.store.meta.is_some() => {
                match self.move_meta(req, user, req.op == sys::UBLK_IO_OP_WRITE) {
                    m if m < 0 => m,
                    _ => r,
                }
            }
            _ => r,
        }
    }
}

/// The `ram` backend: its options are the store's.
pub struct Ram;

impl Backend for Ram {
    fn kind(&self) -> BackendKind {
        BackendKind::Ram
    }

    fn name(&self) -> &'static str {
        "ram"
    }

    fn default_size(&self) -> Option<u64> {
        Some(256 << 20)
    }

    /// Zero copy serves the store as a file and maps nothing; user and copy
    /// stay selectable, for comparison.
    fn copy_rules(&self) -> &'static CopyRules {
        &CopyRules { backend: "ram", auto: &[Transfer::Zero, Transfer::User, Transfer::Copy], refused: &[] }
    }

    fn options(&self) -> &'static [&'static str] {
        &["--store", "--sparse"]
    }

    fn instead(&self) -> &'static str {
        " (ram keeps its data in --store)"
    }

    /// `--store` is checked and made absolute here; a reused one gives the
    /// size and is identified now (a new one by the server that makes it).
    /// Only a store ublk-bench makes is its to remove.
    fn configure(&self, cfg: &mut DeviceConfig, o: &Options<'_>) -> Result<()> {
        cfg.sparse = o.sparse;
        cfg.store_created = !o.reuse_store;
        let Some(path) = o.store else { return Ok(()) };
        let meta = meta_of(cfg);
        let (path, store_len) = resolve_store(path, o.reuse_store, o.size.map(|s| store_len(s, meta)))?;
        let store_size = match (store_len, meta) {
            (Some(len), Some(m)) => Some(m.data_of(len).ok_or_else(|| {
                Error::invalid(format!(
                    "RAM store {} ({len} bytes) is no store of --integrity with {} bytes per {}-byte block: \
                     give the --integrity and --block-size it was made with",
                    path.display(),
                    m.per_block,
                    1u64 << m.block_shift
                ))
            })?),
            (len, _) => len,
        };
        if o.reuse_store {
            let found = claim::find(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
            cfg.backing_id = Some(found.id);
        }
        cfg.size = o.size.or(store_size).unwrap_or(cfg.size);
        cfg.store = Some(path);
        Ok(())
    }

    /// The store grows into the free space (and, mapped, up to how far its
    /// servers map it) and is cut when the device shrinks.
    fn resizing(&self, dev_id: u32, cfg: &DeviceConfig) -> Result<Resizing> {
        let path = cfg.store.as_deref().ok_or_else(|| Error::invalid("ram device without a store"))?;
        let live = LiveSize::open(dev_id)?;
        let room = Room {
            free: Some(free_bytes(path.parent().unwrap_or(Path::new("/")))?),
            map_limit: (cfg.copy_mode != CopyMode::Zero).then(|| live.map_limit()),
            ..Room::default()
        };
        let file = open_checked(path, cfg.size, cfg.backing_id.as_ref(), cfg.dev_id)?;
        let store = StoreResize { file, path: path.to_owned(), sparse: cfg.sparse };
        Ok(Resizing { room, live: Some(live), store: Some(Box::new(store)) })
    }

    fn preflight(&self, cfg: &DeviceConfig) -> Result<()> {
        check_store_space(cfg)
    }

    fn claimed_path<'a>(&self, cfg: &'a DeviceConfig) -> Option<&'a Path> {
        cfg.store.as_deref()
    }

    /// The store, created (at `/dev/shm/ublk-bench-<id>` unless named) or
    /// opened; mapped only for user and copy modes.
    fn open(&self, cfg: &mut DeviceConfig, transfer: Transfer, create: bool) -> Result<DeviceBackend> {
        if create && cfg.store.is_none() {
            cfg.store = cfg.dev_id.map(|id| format!("/dev/shm/ublk-bench-{id}").into());
        }
        let path = cfg.store.as_deref().ok_or_else(|| Error::invalid("ram backend without a store path"))?;
        let meta = meta_of(cfg);
        let len = store_len(cfg.size, meta);
        let file = match create {
            true => create_file(path, len)?,
            false => open_checked(path, len, cfg.backing_id.as_ref(), cfg.dev_id)?,
        };
        let reserved = reserve_as_asked(&file, path, len, create, cfg.sparse)?;
        if create && meta.is_some() {
            let r = fill_fd(file.as_raw_fd(), &UNWRITTEN_META, cfg.size, len - cfg.size);
            if r < 0 {
                let _ = std::fs::remove_file(path);
                let e = std::io::Error::from_raw_os_error(-r);
                return Err(Error::io(format!("write the metadata of RAM store {}", path.display()), e));
            }
        }
        let size = LiveSize::of_config(cfg, fs_bytes(path).unwrap_or(0))?;
        Ok(match transfer {
            Transfer::Zero => {
                DeviceBackend::File(Arc::new(Backing::store(file, path, cfg.size).with_live_size(size)))
            }
            _ => DeviceBackend::Ram(Arc::new(RamStore::map_live(file, path, size, meta, !reserved)?)),
        })
    }

    fn keeps_metadata(&self) -> bool {
        true
    }
}

impl Device for Arc<RamStore> {
    fn served_file(&self) -> Option<(&File, &Path)> {
        Some((self.file(), self.path()))
    }

    fn with_queue<M: QueueMaker>(&self, _depth: u16, m: M) -> M::Out {
        m.make(RamQueue::new(self.clone()))
    }
}

/// The size of the file system `path` is on: no store there grows past it.
fn fs_bytes(path: &Path) -> Option<u64> {
    statvfs(path.parent()?).ok().map(|st| st.f_blocks.saturating_mul(st.f_frsize))
}

/// Bytes free for an unprivileged user in the file system of `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    statvfs(dir).map(|st| st.f_bavail.saturating_mul(st.f_frsize))
}

fn statvfs(dir: &Path) -> Result<libc::statvfs> {
    let c = std::ffi::CString::new(dir.to_string_lossy().as_bytes())
        .map_err(|_| Error::invalid("bad store path"))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(format!("statvfs {}", dir.display()), std::io::Error::last_os_error()));
    }
    Ok(st)
}

/// A store as `resize` changes it.
struct StoreResize {
    file: File,
    path: PathBuf,
    sparse: bool,
}

impl ResizableStore for StoreResize {
    /// Reserved unless the device is `--sparse`: a mapped store must have no hole.
    fn grow(&self, old: u64, new: u64) -> Result<()> {
        let path = self.path.display();
        self.file.set_len(new).map_err(|e| Error::io(format!("grow RAM store {path}"), e))?;
        if self.sparse {
            return Ok(());
        }
        fallocate(&self.file, old, new - old).map_err(|e| {
            let _ = self.file.set_len(old);
            Error::io(format!("reserve {} more bytes for RAM store {path}", new - old), e)
        })
    }

    fn cut(&self, new: u64) -> Result<()> {
        self.file
            .set_len(new)
            .map_err(|e| Error::io(format!("cut RAM store {} to {new} bytes", self.path.display()), e))
    }
}

fn store_dir(cfg: &DeviceConfig) -> PathBuf {
    match &cfg.store {
        Some(p) => p.parent().map(PathBuf::from).unwrap_or_else(|| ".".into()),
        None => "/dev/shm".into(),
    }
}

/// The store fits where it goes, before anything is created.
fn check_store_space(cfg: &DeviceConfig) -> Result<()> {
    let dir = store_dir(cfg);
    let free = free_bytes(&dir)?;
    let len = store_len(cfg.size, meta_of(cfg));
    if len > free {
        return Err(Error::invalid(format!(
            "size {} does not fit in {} ({} bytes free): give a smaller --size or another --store",
            len,
            dir.display(),
            free
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copy mode: a request longer than the tag's buffer is refused before
    /// any byte moves; neither the bytes after the buffer nor the store
    /// change. The same for a reserved (mapped) and a guarded store.
    #[test]
    fn copy_mode_requests_longer_than_the_tag_buffer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mapped = RamStore::create(&dir.path().join("mapped"), 1 << 20).unwrap();
        let file = create_file(&dir.path().join("guarded"), 1 << 20).unwrap();
        let guarded = RamStore::map(file, &dir.path().join("guarded"), 1 << 20, true).unwrap();
        assert!(guarded.guarded() && !mapped.guarded());
        for store in [mapped, guarded] {
            refuses_requests_longer_than_the_buffer(RamQueue::new(Arc::new(store)));
        }
    }

    /// A mapped store grown (file extended, then the size cell) is served
    /// past its old end through the map made before, keeping the data
    /// below; shrunk (the cell first), the tail is refused.
    #[test]
    fn a_mapped_store_follows_its_live_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let file = create_file(&path, 1 << 20).unwrap();
        reserve(&file, &path, 1 << 20).unwrap();
        let live = LiveSize::private_up_to(1 << 20, 4 << 20);
        let store = Arc::new(RamStore::map_live(file, &path, live.clone(), None, false).unwrap());
        let mut q = RamQueue::new(store.clone());
        let mut buf = vec![0x5au8; 4096];
        let at = |op, offset| Request { op, flags: 0, offset, len: 4096 };
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_WRITE, 8192), Data::Buf(&mut buf)), 4096);
        let high = (3 << 20) - 4096;
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_WRITE, high), Data::Buf(&mut buf)), -libc::EINVAL);
        store.file().set_len(4 << 20).unwrap();
        reserve(store.file(), &path, 4 << 20).unwrap();
        live.set(4 << 20);
        buf.fill(0xa5);
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_WRITE, high), Data::Buf(&mut buf)), 4096, "grown");
        let mut back = vec![0u8; 4096];
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_READ, high), Data::Buf(&mut back)), 4096);
        assert!(back.iter().all(|&b| b == 0xa5), "the grown range reads back");
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_READ, 8192), Data::Buf(&mut back)), 4096);
        assert!(back.iter().all(|&b| b == 0x5a), "the data below the old size is kept");
        live.set(1 << 20);
        assert_eq!(q.serve(&at(sys::UBLK_IO_OP_READ, high), Data::Buf(&mut back)), -libc::EINVAL, "shrunk");
    }

    fn refuses_requests_longer_than_the_buffer(mut q: RamQueue) {
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
