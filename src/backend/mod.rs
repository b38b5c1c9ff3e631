//! Backends: what a request does once the queue thread has read its
//! descriptor. One module per backend, all behind [`QueueBackend`], which the
//! queue loop takes as a generic parameter so the per-I/O call is static.
//!
//! A backend object is made per queue thread and used only by that thread.
//! The request's data is reached through [`Data`]: a per-tag buffer that the
//! kernel copies to or from the bio (copy mode), the `/dev/ublkcN` file
//! position of the request (user copy), where the backend moves the bytes
//! itself with one pread/pwrite and no copy of its own, or the request's own
//! pages as a fixed buffer of the queue ring (zero copy: nvme, file, ram).

pub mod chain;
pub mod claim;
pub mod emulated;
pub mod file;
pub mod null;
pub mod nvme;
pub mod ram;

use std::fs::File;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::config::{BackendKind, CopyMode, DeviceConfig, FileId};
use crate::error::{Error, Result};
use crate::request::{Data, Request};
use io_uring::{SubmissionQueue, cqueue, squeue};

/// The per-queue half of a backend, as the queue loop drives it.
///
/// The queue owns the `user_data` encoding of its ring. A backend that
/// pushes commands gives each the `user_data` `ud | kind`, where `ud` is
/// what the queue passed to `submit` for this tag and `kind` is the
/// backend's own, within [`KIND_MASK`]; the queue hands each such CQE to
/// `complete` with the tag and that `kind`.
pub trait QueueBackend {
    /// The queue ring's SQE size: 64 bytes (`squeue::Entry`) unless the
    /// backend sends commands that need 128 (NVMe passthrough). The ublk
    /// FETCH and COMMIT fit either.
    type Sqe: squeue::EntryMarker;
    /// The ring's CQE size: 16 bytes unless the backend's commands return 32.
    type Cqe: cqueue::EntryMarker;
    /// The most commands `submit` pushes for one request (the queue sizes
    /// its rings by it): 0 for a backend that finishes in the call.
    const MAX_COMMANDS: u32 = 1;

    /// Starts one request. Some(result) if it finished at once; None if it
    /// pushed commands into `sq` (tagged as above), to end in [`Self::complete`].
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut SubmissionQueue<'_, Self::Sqe>,
        ud: u64,
    ) -> Option<i32>;

    /// Takes the CQE of a command `submit` queued; the COMMIT result once
    /// the request is done (a request may need several commands).
    fn complete(&mut self, _tag: u16, _kind: u64, res: i32) -> Option<i32> {
        Some(res)
    }

    /// The earliest monotonic time (ns) a request held back is due at:
    /// a blocking queue sleeps no longer. None: nothing held (every
    /// backend but [`emulated::Emulated`]).
    #[inline]
    fn next_due(&self) -> Option<u64> {
        None
    }

    /// A held request due by `now` and its COMMIT result, earliest first.
    #[inline]
    fn pop_due(&mut self, _now: u64) -> Option<(u16, i32)> {
        None
    }
}

/// The `user_data` bits a backend may use to tell its commands apart.
pub const KIND_MASK: u64 = 0xffff << 16;

/// A backend that finishes every request in the call.
pub trait SyncBackend {
    /// Serves one request and returns bytes done (READ/WRITE) or 0, or -errno.
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32;
}

impl<T: SyncBackend> QueueBackend for T {
    type Sqe = squeue::Entry;
    type Cqe = cqueue::Entry;
    const MAX_COMMANDS: u32 = 0;

    fn submit(
        &mut self,
        _tag: u16,
        req: &Request,
        data: Data<'_>,
        _sq: &mut SubmissionQueue<'_, squeue::Entry>,
        _ud: u64,
    ) -> Option<i32> {
        Some(self.serve(req, data))
    }
}

/// Completion value for a request that moved `len` bytes.
pub fn done(len: u32) -> i32 {
    len as i32
}

/// `pwrite` all of `buf` to `fd` at `pos`; -errno on failure.
///
/// # Safety
/// `[buf, buf+len)` must be readable memory for the whole call.
pub unsafe fn pwrite_all(fd: RawFd, buf: *const u8, len: usize, pos: u64) -> i32 {
    // SAFETY: the caller guarantees [buf, buf+len) is readable for the call.
    all(len, |off| unsafe { libc::pwrite(fd, buf.add(off).cast(), len - off, (pos + off as u64) as i64) })
}

/// `pread` all of `len` bytes from `fd` at `pos` into `buf`; -errno on failure.
///
/// # Safety
/// `[buf, buf+len)` must be writable memory for the whole call.
pub unsafe fn pread_all(fd: RawFd, buf: *mut u8, len: usize, pos: u64) -> i32 {
    // SAFETY: the caller guarantees [buf, buf+len) is writable for the call.
    all(len, |off| unsafe { libc::pread(fd, buf.add(off).cast(), len - off, (pos + off as u64) as i64) })
}

/// Repeats a partial transfer `step(done_so_far)` until `len` bytes moved.
fn all(len: usize, mut step: impl FnMut(usize) -> isize) -> i32 {
    let mut off = 0usize;
    while off < len {
        let n = step(off);
        if n <= 0 {
            return neg_errno(n);
        }
        off += n as usize;
    }
    len as i32
}

fn neg_errno(n: isize) -> i32 {
    if n == 0 { -libc::EIO } else { -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) }
}

/// The device-wide half of a backend: made once per server process; the
/// queue layer makes one [`QueueBackend`] from it per queue thread.
pub enum DeviceBackend {
    Null,
    /// A mapped RAM store (user and copy modes).
    Ram(Arc<ram::RamStore>),
    /// A file served by io_uring commands: `file`, and `ram` in zero copy.
    File(Arc<file::Backing>),
    Nvme(Arc<nvme::Namespace>, Arc<File>),
}

impl DeviceBackend {
    /// The backend of a device: with `create` a new device's (a fresh
    /// zeroed RAM store), else an existing one's, keeping its data (a
    /// reused store, or recovery). `probed` is the nvme namespace if the
    /// caller has opened it already.
    pub fn new(cfg: &DeviceConfig, create: bool, probed: Option<(nvme::Namespace, File)>) -> Result<Self> {
        match cfg.backend {
            BackendKind::Null => Ok(DeviceBackend::Null),
            BackendKind::Nvme => {
                let (ns, file) = match probed {
                    Some(p) => p,
                    None => nvme::Namespace::probe_for(cfg)?,
                };
                Ok(DeviceBackend::Nvme(Arc::new(ns), Arc::new(file)))
            }
            BackendKind::Ram => Self::ram(cfg, create),
            BackendKind::File => Ok(DeviceBackend::File(Arc::new(file::Backing::open(cfg)?))),
        }
    }

    /// The file the device serves, as opened, and its path: a `file`'s, a
    /// RAM store, or an NVMe namespace's generic node; None for null.
    pub fn served_file(&self) -> Option<(&File, &std::path::Path)> {
        match self {
            DeviceBackend::Ram(store) => Some((store.file(), store.path())),
            DeviceBackend::File(b) => Some((b.file(), b.path())),
            DeviceBackend::Nvme(ns, file) => Some((file, &ns.char_dev)),
            DeviceBackend::Null => None,
        }
    }

    /// What [`Self::served_file`] is.
    pub fn file_id(&self) -> Option<FileId> {
        self.served_file().and_then(|(f, _)| f.metadata().ok()).map(|m| FileId::of(&m))
    }

    /// The RAM store, created or opened; mapped only for user and copy modes.
    fn ram(cfg: &DeviceConfig, create: bool) -> Result<Self> {
        let path = cfg.store.as_deref().ok_or_else(|| Error::invalid("ram backend without a store path"))?;
        let file = match create {
            true => ram::create_file(path, cfg.size)?,
            false => ram::open_checked(path, cfg.size, cfg.backing_id.as_ref(), cfg.dev_id)?,
        };
        let reserved = ram::reserve_as_asked(&file, path, cfg.size, create, cfg.sparse)?;
        Ok(match cfg.copy_mode {
            CopyMode::Zero => DeviceBackend::File(Arc::new(file::Backing::store(file, path, cfg.size))),
            _ => DeviceBackend::Ram(Arc::new(ram::RamStore::map(file, path, cfg.size, !reserved)?)),
        })
    }
}
