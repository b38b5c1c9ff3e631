//! `file`: serves a regular file or block device by io_uring commands on the
//! queue's own ring, and so does `ram` in zero-copy mode (its store is such a
//! file, on shared memory, that ublk-bench created).
//!
//! Data: READ and WRITE become READ_FIXED / WRITE_FIXED on the file with the
//! request's own pages as fixed buffer `tag` (zero copy): the kernel copies
//! once between the file's page cache (or, with `--direct`, the disk) and the
//! bio, and this process maps nothing. With UBLK_F_AUTO_BUF_REG the pages are
//! registered before the request reaches us; otherwise a hard-linked chain
//! REGISTER_IO_BUF → READ/WRITE_FIXED → UNREGISTER_IO_BUF does it, as for nvme.
//! In copy mode plain READ / WRITE use the tag's buffer instead.
//!
//! DISCARD punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); WRITE_ZEROES
//! does too, or zeroes the range in place (ZERO_RANGE) when the block layer
//! asked to keep the blocks allocated (NOUNMAP), as the loop driver does.
//! FLUSH is an fsync (datasync) and a FUA write carries RWF_DSYNC, except on
//! a RAM store, whose medium is memory: FLUSH is then a no-op.
//!
//! A read or write that moves fewer bytes than asked fails the request with
//! -EIO: inside the file's size only a vanished or shrunk file does that, and
//! no retry would bring the bytes back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::chain::{Chains, KIND_IO, Registration};
use super::claim;
use super::limits::Limits;
use super::live_size::{LiveSize, Resizing, Room};
use super::{Backend, Device, DeviceBackend, Options, QueueBackend, QueueMaker};
use crate::config::{BackendKind, DeviceConfig, FileId, FileKind};
use crate::error::{Error, Result};
use crate::plan::{CopyRules, Transfer};
use crate::request::{Data, Request};
use crate::sys;
use crate::sys::Params;

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: a block device's logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// The file a device serves, opened read-write once per server process.
pub struct Backing {
    file: File,
    path: PathBuf,
    /// What is served: the file's first `size` bytes, which `resize` may
    /// change while the device runs.
    size: Arc<LiveSize>,
    /// FLUSH and FUA reach the file (fsync, RWF_DSYNC); false for a RAM store.
    durable: bool,
    /// tmpfs has no FALLOC_FL_ZERO_RANGE: WRITE_ZEROES punches there too.
    tmpfs: bool,
}

/// What `add file` learns about `--path` before any device exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Absolute, every link resolved, so `recover` finds the same file.
    pub path: PathBuf,
    /// What the file is: every later open by name must find the same one.
    pub id: FileId,
    /// Bytes the file (or block device) holds.
    pub size: u64,
    /// The smallest I/O the file takes: a block device's logical block
    /// size; with `direct`, a regular file's O_DIRECT alignment (its
    /// filesystem's disk's block size). None: any of ours.
    pub logical_block: Option<u32>,
}

/// Checks `--path` for the file backend: a regular file or block device that
/// opens read-write and holds at least one `block_size` block. Nothing is
/// created, truncated or written.
pub fn probe(path: &Path, direct: bool, block_size: u32) -> Result<Probe> {
    let full = path.canonicalize().map_err(|e| {
        Error::io(format!("--path {}: give an existing regular file or block device", path.display()), e)
    })?;
    let found = claim::find(&full).map_err(|e| Error::io(format!("open {}", full.display()), e))?;
    match found.id.kind {
        FileKind::File | FileKind::Block => {}
        FileKind::Other if full.is_dir() => {
            return Err(Error::invalid(format!(
                "--path {} is a directory: give a regular file or a block device",
                full.display()
            )));
        }
        _ => {
            return Err(Error::invalid(format!(
                "--path {} is neither a regular file nor a block device: give one of those",
                full.display()
            )));
        }
    }
    let file = found.open(rw_flags(direct)).map_err(|e| open_error(&full, direct, e))?;
    let (size, logical_block) = match found.id.kind {
        FileKind::Block => (bdev_u64(&file, BLKGETSIZE64, &full)?, Some(bdev_block(&file, &full)?)),
        _ => {
            let len = file.metadata().map_err(|e| Error::io(format!("stat {}", full.display()), e))?.len();
            (len, if direct { dio_align(&file, found.id.dev) } else { None })
        }
    };
    if size < block_size as u64 {
        return Err(Error::invalid(format!(
            "--path {} holds {size} bytes, less than one {block_size}-byte block: give a larger file",
            full.display()
        )));
    }
    Ok(Probe { path: full, id: found.id, size, logical_block })
}

/// The O_DIRECT alignment of a regular file: statx's STATX_DIOALIGN (6.1+),
/// else the logical block size of the disk its filesystem is on; None when
/// neither says (tmpfs, a network filesystem).
fn dio_align(file: &File, st_dev: u64) -> Option<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on an fd we own with an empty path (AT_EMPTY_PATH), writing into stx.
    let ok = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx)
    } == 0;
    if ok && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        return (stx.stx_dio_offset_align > 0).then_some(stx.stx_dio_offset_align);
    }
    let dir = format!("/sys/dev/block/{}:{}", libc::major(st_dev), libc::minor(st_dev));
    ["queue/logical_block_size", "../queue/logical_block_size"]
        .iter()
        .find_map(|f| std::fs::read_to_string(format!("{dir}/{f}")).ok())
        .and_then(|s| s.trim().parse().ok())
}

fn rw_flags(direct: bool) -> i32 {
    libc::O_RDWR | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 }
}

/// Why `path` did not open read-write, in words that say what to do.
fn open_error(path: &Path, direct: bool, e: std::io::Error) -> Error {
    let why = match e.raw_os_error() {
        Some(libc::EACCES | libc::EROFS | libc::EPERM | libc::ETXTBSY) => {
            "the file backend writes to it: give a file this user may write, on a writable filesystem"
        }
        Some(libc::EINVAL) if direct => "its filesystem refuses O_DIRECT: drop --direct",
        _ => "give a regular file or block device that opens read-write",
    };
    Error::io(format!("--path {} cannot be opened read-write ({why})", path.display()), e)
}

fn bdev_u64(file: &File, req: libc::c_ulong, path: &Path) -> Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut u64) } != 0 {
        return Err(Error::io(
            format!("BLKGETSIZE64 on {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(v)
}

fn bdev_block(file: &File, path: &Path) -> Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut v as *mut libc::c_int) } != 0 {
        return Err(Error::io(format!("BLKSSZGET on {}", path.display()), std::io::Error::last_os_error()));
    }
    Ok(v as u32)
}

/// The cache attributes of a `file` device. Writes may sit in the page cache
/// (or a disk's cache) until an fsync, so the device has a volatile cache and
/// FUA; only `--direct` on a block device whose own cache is write-through
/// has none. A cache the kernel does not report is assumed there.
pub fn cache_attrs(cfg: &DeviceConfig) -> u32 {
    let with_cache = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    let Some(path) = cfg.path.as_deref().filter(|_| cfg.direct) else { return with_cache };
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() && bdev_write_through(m.rdev()) => 0,
        _ => with_cache,
    }
}

/// With `--direct`: a block device's queue limits, or a regular file's
/// O_DIRECT memory alignment (statx STATX_DIOALIGN); None without `--direct`.
fn direct_limits(cfg: &DeviceConfig) -> Option<Limits> {
    let path = cfg.path.as_deref().filter(|_| cfg.direct)?;
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        return Limits::of_block_device(meta.rdev());
    }
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on an fd we own with an empty path (AT_EMPTY_PATH), writing into stx.
    let ok = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx)
    } == 0;
    (ok && stx.stx_mask & libc::STATX_DIOALIGN != 0).then(|| Limits::of_direct_file(stx.stx_dio_mem_align))?
}

/// `queue/write_cache` of the device `rdev` (a partition's is its disk's).
fn bdev_write_through(rdev: u64) -> bool {
    let dir = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    ["queue/write_cache", "../queue/write_cache"]
        .iter()
        .find_map(|f| std::fs::read_to_string(format!("{dir}/{f}")).ok())
        .is_some_and(|s| s.trim() == "write through")
}

impl Backing {
    /// Opens a `file` device's `--path` for serving; it must still hold the
    /// device's size (a recovering server finds it as `add` left it).
    /// It must also be the file the device was made with ([`claim`]).
    pub fn open(cfg: &DeviceConfig) -> Result<Self> {
        let path = cfg.path.as_deref().ok_or_else(|| Error::invalid("file backend without --path"))?;
        let b = Self::open_checked(path, cfg.size, cfg.direct, cfg.backing_id.as_ref(), cfg.dev_id)?;
        Ok(b.with_live_size(LiveSize::of_config(cfg, 0)?))
    }

    /// Opens `path` (a link in its last component is not followed) to serve
    /// its first `size` bytes.
    pub fn open_path(path: &Path, size: u64, direct: bool) -> Result<Self> {
        Self::open_checked(path, size, direct, None, None)
    }

    fn open_checked(
        path: &Path,
        size: u64,
        direct: bool,
        want: Option<&FileId>,
        dev_id: Option<u32>,
    ) -> Result<Self> {
        let found = claim::find(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        found.check(want, dev_id)?;
        if !matches!(found.id.kind, FileKind::File | FileKind::Block) {
            return Err(Error::Refused(format!(
                "{} is now a {}, not a regular file or block device: restore the file or delete the device",
                path.display(),
                found.id
            )));
        }
        let file = found.open(rw_flags(direct)).map_err(|e| open_error(path, direct, e))?;
        let meta = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let held = match meta.file_type().is_block_device() {
            true => bdev_u64(&file, BLKGETSIZE64, path)?,
            false => meta.len(),
        };
        if held < size {
            return Err(Error::invalid(format!(
                "{} now holds {held} bytes, less than the device's {size}: restore the file or delete the device",
                path.display()
            )));
        }
        Ok(Self::new(file, path, size, true))
    }

    /// Serves a RAM store by zero copy: no mapping; FLUSH has nothing to do.
    pub fn store(file: File, path: &Path, size: u64) -> Self {
        Self::new(file, path, size, false)
    }

    fn new(file: File, path: &Path, size: u64, durable: bool) -> Self {
        let tmpfs = on_tmpfs(&file);
        // The variable is for measuring what keeping tmpfs I/O inline saves.
        if tmpfs && std::env::var_os(TMPFS_PUNT_ENV).is_none() {
            keep_inline(&file, path);
        }
        Backing { file, path: path.to_owned(), size: LiveSize::private(size), durable, tmpfs }
    }

    /// Serves the size `size` holds, which `resize` may change.
    pub fn with_live_size(self, size: Arc<LiveSize>) -> Self {
        Backing { size, ..self }
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

    /// Whether the open file's status flags include `flag` (O_DIRECT, O_NONBLOCK).
    pub fn has_flag(&self, flag: i32) -> bool {
        // SAFETY: F_GETFL on an fd we own.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) & flag != 0 }
    }

    fn in_range(&self, req: &Request) -> bool {
        self.size.holds(req.offset, req.len)
    }
}

fn on_tmpfs(file: &File) -> bool {
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on an fd we own, writing into st.
    let ok = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0;
    ok && st.f_type == libc::TMPFS_MAGIC
}

/// Set (to anything) in a server's environment, tmpfs files are left as
/// opened, so their I/O goes through io-wq: for measuring [`keep_inline`].
pub const TMPFS_PUNT_ENV: &str = "UBLK_BENCH_TMPFS_PUNT";

/// Keeps io_uring READ and WRITE on a tmpfs file in the queue thread.
///
/// shmem's file has neither FMODE_NOWAIT nor FOP_BUFFER_WASYNC, so io_uring
/// cannot try it non-blocking and punts every READ and WRITE to an io-wq
/// worker thread (io_uring/rw.c: `io_file_supports_nowait`, and io_write's
/// WASYNC check). O_NONBLOCK on the file makes io_uring take it as
/// NOWAIT-capable (`io_file_get_flags`) and O_DIRECT passes the write check;
/// shmem's read_iter and write_iter look at neither flag (tmpfs allows
/// O_DIRECT since 6.6 and serves it from the page cache), so the I/O is the
/// same page-cache copy, done inline. Failing to set them costs speed only.
fn keep_inline(file: &File, path: &Path) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL / F_SETFL on an fd we own.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_DIRECT | libc::O_NONBLOCK) == 0
    };
    if !ok {
        crate::log!(
            "{}: could not set O_DIRECT|O_NONBLOCK ({}); its I/O goes through io-wq workers",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// One queue's handle on the file.
pub struct FileQueue {
    file: Arc<Backing>,
    /// Each tag's commands in flight; a request moves no bytes for FLUSH,
    /// DISCARD and WRITE_ZEROES.
    chains: Chains,
}

impl FileQueue {
    pub fn new(file: Arc<Backing>, depth: u16) -> Self {
        FileQueue { file, chains: Chains::new(depth) }
    }

    /// The one file command a request needs, or its result if it needs none.
    fn command(&self, req: &Request, data: &Data<'_>) -> std::result::Result<squeue::Entry, i32> {
        let fd = types::Fd(self.file.file.as_raw_fd());
        let (off, len) = (req.offset, req.len);
        let dsync = match req.flags & sys::UBLK_IO_F_FUA != 0 && self.file.durable {
            true => libc::RWF_DSYNC,
            false => 0,
        };
        Ok(match (req.op, data) {
            (sys::UBLK_IO_OP_READ, Data::Registered { index } | Data::Fixed { index, .. }) => {
                // A ublk buffer is addressed from 0, not by a user address.
                opcode::ReadFixed::new(fd, std::ptr::null_mut(), len, *index).offset(off).build()
            }
            (sys::UBLK_IO_OP_WRITE, Data::Registered { index } | Data::Fixed { index, .. }) => {
                opcode::WriteFixed::new(fd, std::ptr::null(), len, *index).offset(off).rw_flags(dsync).build()
            }
            (sys::UBLK_IO_OP_READ, Data::Buf(b)) if b.len() >= len as usize => {
                opcode::Read::new(fd, b.as_ptr() as *mut u8, len).offset(off).build()
            }
            (sys::UBLK_IO_OP_WRITE, Data::Buf(b)) if b.len() >= len as usize => {
                opcode::Write::new(fd, b.as_ptr(), len).offset(off).rw_flags(dsync).build()
            }
            (sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE, _) => return Err(-libc::EINVAL),
            (sys::UBLK_IO_OP_FLUSH, _) if !self.file.durable => return Err(0),
            (sys::UBLK_IO_OP_FLUSH, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            (sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES, _) => {
                opcode::Fallocate::new(fd, len as u64).offset(off).mode(self.zero_mode(req)).build()
            }
            _ => return Err(-libc::EOPNOTSUPP),
        })
    }

    /// fallocate mode for DISCARD / WRITE_ZEROES (see the module doc).
    fn zero_mode(&self, req: &Request) -> i32 {
        let keep_blocks = req.op == sys::UBLK_IO_OP_WRITE_ZEROES && req.flags & sys::UBLK_IO_F_NOUNMAP != 0;
        match keep_blocks && !self.file.tmpfs {
            true => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            false => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

impl QueueBackend for FileQueue {
    type Sqe = squeue::Entry;
    type Cqe = io_uring::cqueue::Entry;
    /// REGISTER_IO_BUF, the read or write, UNREGISTER_IO_BUF (explicit
    /// registration); one command otherwise.
    const MAX_COMMANDS: u32 = 3;

    /// Pushes the file command for `tag`, inside a REGISTER/UNREGISTER chain
    /// when zero copy registers buffers explicitly; Some(result) if the
    /// request needs no command or cannot be served.
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut io_uring::SubmissionQueue<'_, squeue::Entry>,
        ud: u64,
    ) -> Option<i32> {
        // A FLUSH carries no range: its sector is whatever the block layer
        // left there (blk_rq_init sets it to -1).
        if req.op != sys::UBLK_IO_OP_FLUSH && !self.file.in_range(req) {
            return Some(-libc::EINVAL);
        }
        let io = match self.command(req, &data) {
            Ok(sqe) => sqe.user_data(ud | KIND_IO),
            Err(res) => return Some(res),
        };
        let rw = matches!(req.op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
        let reg = match data {
            Data::Fixed { index, char_fd, qid, tag } if rw => Some(Registration { char_fd, qid, tag, index }),
            _ => None,
        };
        // SAFETY: the command's memory (the tag's buffer, or the request's
        // pages registered at slot `tag`) stays valid until its CQE: the
        // tag is not reused before we COMMIT it, after the last CQE.
        unsafe { self.chains.push(sq, (tag, if rw { req.len } else { 0 }), io, reg, ud) }
    }

    /// Takes one CQE of `tag`'s chain; the COMMIT result once all are in.
    fn complete(&mut self, tag: u16, kind: u64, res: i32) -> Option<i32> {
        self.chains.complete(tag, kind, res, |res, len| match res {
            e if e < 0 => e,
            n if n as u32 == len => n,
            _ => -libc::EIO, // short: see the module doc
        })
    }
}

/// The `file` backend: `--path` (and `--direct`) name what it serves.
pub struct FileBackend;

impl Backend for FileBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::File
    }

    fn name(&self) -> &'static str {
        "file"
    }

    fn default_size(&self) -> Option<u64> {
        None
    }

    fn copy_rules(&self) -> &'static CopyRules {
        &CopyRules {
            backend: "file",
            auto: &[Transfer::Zero, Transfer::Copy],
            refused: &[(Transfer::User, "would add a bounce copy")],
        }
    }

    fn options(&self) -> &'static [&'static str] {
        &["--path", "--direct"]
    }

    fn instead(&self) -> &'static str {
        " (file serves --path)"
    }

    /// Up to what its file holds now, as long as it is the same file.
    fn resizing(&self, dev_id: u32, cfg: &DeviceConfig) -> Result<Resizing> {
        let path = cfg.path.as_deref().ok_or_else(|| Error::invalid("file device without a path"))?;
        let probe = probe(path, cfg.direct, cfg.block_size)?;
        if let Some(want) = cfg.backing_id.filter(|want| !want.same(&probe.id)) {
            return Err(Error::Refused(format!(
                "{} is not the file the device was made with (a {want}, now a {}): put it back, or delete the \
                 device",
                path.display(),
                probe.id
            )));
        }
        let room = Room { file_bytes: Some(probe.size), min_one_block: true, ..Room::default() };
        Ok(Resizing { room, live: Some(LiveSize::open(dev_id)?), store: None })
    }

    fn needs(&self, o: &Options<'_>) -> Result<()> {
        match o.path {
            Some(_) => Ok(()),
            None => Err(Error::invalid(
                "the file backend needs --path FILE: a regular file or block device to serve",
            )),
        }
    }

    /// The file's size by default; --size may be smaller, never larger. A
    /// block device opened O_DIRECT needs requests of its own block size at least.
    fn configure(&self, cfg: &mut DeviceConfig, o: &Options<'_>) -> Result<()> {
        let path = o.path.expect("needs() wants --path");
        let probe = probe(path, o.direct, cfg.block_size)?;
        if let Some(size) = o.size.filter(|&s| s > probe.size) {
            return Err(Error::invalid(format!(
                "--size {size} exceeds --path {} ({} bytes): give at most {}, or leave --size out to serve the whole file",
                probe.path.display(),
                probe.size,
                probe.size
            )));
        }
        if let Some(lbs) = probe.logical_block.filter(|&b| o.direct && b > cfg.block_size) {
            if lbs > 4096 {
                return Err(Error::invalid(format!(
                    "--direct on {} needs I/O aligned to {lbs} bytes, more than the largest block size (4096): drop --direct",
                    probe.path.display()
                )));
            }
            cfg.block_size = lbs;
        }
        let bs = cfg.block_size as u64;
        // A tail shorter than a block is not served.
        cfg.size = o.size.unwrap_or(probe.size) / bs * bs;
        cfg.path = Some(probe.path);
        cfg.backing_id = Some(probe.id);
        cfg.direct = o.direct;
        Ok(())
    }

    /// A user's file may be small: one block is enough.
    fn validate(&self, cfg: &DeviceConfig) -> Result<()> {
        cfg.validate(cfg.block_size as u64, &format!("{} (one block)", cfg.block_size))
    }

    fn claimed_path<'a>(&self, cfg: &'a DeviceConfig) -> Option<&'a Path> {
        cfg.path.as_deref()
    }

    /// The cache; with `--direct`, what the backing device accepts of a
    /// request's memory (its pages reach it as they are).
    fn params(&self, cfg: &DeviceConfig, p: &mut Params) -> Result<()> {
        p.basic.attrs |= cache_attrs(cfg);
        if let Some(l) = direct_limits(cfg) {
            l.apply(p);
        }
        Ok(())
    }

    fn open(&self, cfg: &mut DeviceConfig, _transfer: Transfer, _create: bool) -> Result<DeviceBackend> {
        Ok(DeviceBackend::File(Arc::new(Backing::open(cfg)?)))
    }
}

impl Device for Arc<Backing> {
    fn served_file(&self) -> Option<(&File, &Path)> {
        Some((self.file(), self.path()))
    }

    fn with_queue<M: QueueMaker>(&self, depth: u16, m: M) -> M::Out {
        m.make(FileQueue::new(self.clone(), depth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CopyMode;

    fn cfg(path: &Path, direct: bool) -> DeviceConfig {
        DeviceConfig {
            backend: BackendKind::File,
            size: 4096,
            path: Some(path.to_owned()),
            direct,
            depth: 4,
            scheduler: None,
            max_io_bytes: 1 << 20,
            copy_mode: CopyMode::Zero,
            ..crate::config::tests::sample()
        }
    }

    #[test]
    fn a_file_has_a_volatile_cache_and_fua_even_with_direct() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let both = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        assert_eq!(cache_attrs(&cfg(f.path(), false)), both);
        // The filesystem's metadata and the disk under it may cache writes.
        assert_eq!(cache_attrs(&cfg(f.path(), true)), both);
    }

    #[test]
    fn probe_resolves_links_and_reads_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 3000]).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let p = probe(&link, false, 512).unwrap();
        assert_eq!((p.path, p.size, p.logical_block), (img.canonicalize().unwrap(), 3000, None));
        assert!(
            p.id.same(&FileId::of(&std::fs::metadata(&img).unwrap())),
            "the file's identity, not the link's"
        );
        let err = probe(&img, false, 4096).unwrap_err().to_string();
        assert!(err.contains("less than one 4096-byte block"), "{err}");
    }
}
