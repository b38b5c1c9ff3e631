//! Backends: what a request does once the queue thread has read its
//! descriptor. One module per backend, all behind [`QueueBackend`], which the
//! queue loop takes as a generic parameter so the per-I/O call is static.
//!
//! A backend object is made per queue thread and used only by that thread.
//! The request's data is reached through [`Data`]: a per-tag buffer that the
//! kernel copies to or from the bio (copy mode), or the `/dev/ublkcN` file
//! position of the request (user copy), where the backend moves the bytes
//! itself with one pread/pwrite and no copy of its own.

pub mod null;
pub mod nvme;
pub mod ram;

use std::any::Any;
use std::fs::File;
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use crate::config::{BackendKind, DeviceConfig};
use crate::error::{Error, Result};
use crate::queue::{Queue, QueueSetup};
use crate::sys;
use io_uring::SubmissionQueue;
use io_uring::squeue::Entry128;

/// One request, decoded from its descriptor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    /// The descriptor's `UBLK_IO_F_*` bits where `op_flags` has them (bits
    /// 8-31; the op bits cleared), so `flags & sys::UBLK_IO_F_FUA` tests FUA.
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    pub fn from_desc(d: &sys::IoDesc) -> Self {
        Request { op: d.op(), flags: d.op_flags & !0xff, offset: d.start_sector << 9, len: d.nr_sectors << 9 }
    }
}

/// Where the request's bytes are.
pub enum Data<'a> {
    /// Copy mode: the tag's own buffer.
    Buf(&'a mut [u8]),
    /// User copy: `pread` (WRITE) or `pwrite` (READ) on `fd` at `pos`.
    UserCopy { fd: RawFd, pos: u64 },
    /// Zero copy: the request's pages are registered in the queue ring's
    /// buffer table at this index.
    Fixed { index: u16, char_fd: RawFd, qid: u16 },
    /// UBLK_F_AUTO_BUF_REG: the kernel registered the request's pages at this
    /// index before handing us the request, and drops them at COMMIT.
    Registered { index: u16 },
    /// No data reachable (null backend in user-copy mode never touches it).
    None,
}

/// The per-queue half of a backend, as the queue loop drives it.
pub trait QueueBackend {
    /// Starts one request. Some(result) if it finished at once; None if it
    /// went into `sq` tagged `BACKEND_BIT | tag`, to end in [`Self::complete`].
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut SubmissionQueue<'_, Entry128>,
    ) -> Option<i32>;

    /// Takes the CQE of a command `submit` queued; the COMMIT result once
    /// the request is done (a request may need several commands).
    fn complete(&mut self, _user_data: u64, res: i32) -> Option<i32> {
        Some(res)
    }
}

/// A backend that finishes every request in the call.
pub trait SyncBackend {
    /// Serves one request and returns bytes done (READ/WRITE) or 0, or -errno.
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32;
}

impl<T: SyncBackend> QueueBackend for T {
    fn submit(
        &mut self,
        _tag: u16,
        req: &Request,
        data: Data<'_>,
        _sq: &mut SubmissionQueue<'_, Entry128>,
    ) -> Option<i32> {
        Some(self.serve(req, data))
    }
}

impl QueueBackend for nvme::NvmeQueue {
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut SubmissionQueue<'_, Entry128>,
    ) -> Option<i32> {
        nvme::NvmeQueue::submit(self, tag, req, data, sq)
    }

    fn complete(&mut self, user_data: u64, res: i32) -> Option<i32> {
        nvme::NvmeQueue::complete(self, user_data, res)
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

/// The device-wide half of a backend: made once per server process, it
/// makes one [`QueueBackend`] per queue thread and starts that thread.
pub enum DeviceBackend {
    Null,
    Ram(Arc<ram::RamStore>),
    Nvme(Arc<nvme::Namespace>, Arc<File>),
}

impl DeviceBackend {
    /// Prepares a new device's backend (a fresh zeroed RAM store).
    pub fn create(cfg: &DeviceConfig) -> Result<Self> {
        match cfg.backend {
            BackendKind::Null => Ok(DeviceBackend::Null),
            BackendKind::Nvme => Self::nvme(cfg),
            BackendKind::Ram => {
                let path =
                    cfg.store.as_deref().ok_or_else(|| Error::invalid("ram backend without a store path"))?;
                Ok(DeviceBackend::Ram(Arc::new(ram::RamStore::create(path, cfg.size)?)))
            }
        }
    }

    fn nvme(cfg: &DeviceConfig) -> Result<Self> {
        let dev = cfg.nvme_dev.as_deref().ok_or_else(|| Error::invalid("nvme backend without --dev"))?;
        let (ns, file) = nvme::Namespace::probe(dev)?;
        Ok(DeviceBackend::Nvme(Arc::new(ns), Arc::new(file)))
    }

    /// Reopens an existing device's backend, keeping its data (recovery).
    pub fn open(cfg: &DeviceConfig) -> Result<Self> {
        match cfg.backend {
            BackendKind::Null => Ok(DeviceBackend::Null),
            BackendKind::Nvme => Self::nvme(cfg),
            BackendKind::Ram => {
                let path =
                    cfg.store.as_deref().ok_or_else(|| Error::invalid("ram backend without a store path"))?;
                Ok(DeviceBackend::Ram(Arc::new(ram::RamStore::open(path, cfg.size)?)))
            }
        }
    }

    /// Starts the thread `ublk{dev}q{qid}`. It pins itself, builds its ring
    /// and buffers and reports on `ready`; then waits for `/dev/ublkcN` on
    /// `bind`, maps it, posts every FETCH, reports again, and serves until
    /// aborted. Dropping `bind`'s sender before sending ends the thread.
    pub fn spawn_queue(&self, setup: QueueSetup, io: QueueChannels) -> Result<JoinHandle<Result<()>>> {
        let name = format!("ublk{}q{}", setup.dev_id, setup.qid);
        let spawn = |f: Box<dyn FnOnce() -> Result<()> + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|e| Error::io("spawn queue thread", e))
        };
        match self {
            DeviceBackend::Null => spawn(Box::new(move || run_queue(setup, null::NullQueue, io))),
            DeviceBackend::Ram(store) => {
                let q = ram::RamQueue::new(store.clone());
                spawn(Box::new(move || run_queue(setup, q, io)))
            }
            DeviceBackend::Nvme(ns, file) => {
                let q = nvme::NvmeQueue::new(ns.clone(), file.clone(), setup.depth);
                spawn(Box::new(move || run_queue(setup, q, io)))
            }
        }
    }
}

/// How the control thread talks to a queue thread during start-up.
pub struct QueueChannels {
    pub bind: Receiver<Arc<File>>,
    pub ready: Sender<Result<()>>,
}

/// The body of a queue thread, generic so the backend call is static.
///
/// A failure during start-up (an error or a panic) goes back to the control
/// thread on `ready`, which reports it and cleans up. Once every FETCH is
/// posted the queue is serving: an error or panic then aborts the process
/// after logging which queue and why. Ending the server at once is what lets
/// the kernel quiesce the device (or fail its I/O) and a standby, the
/// supervisor or `recover` take over; a server left with a dead queue would
/// hang that queue's I/O with the device still LIVE.
fn run_queue<B: QueueBackend>(setup: QueueSetup, backend: B, io: QueueChannels) -> Result<()> {
    let (dev_id, qid) = (setup.dev_id, setup.qid);
    let mut serving = false;
    let body = AssertUnwindSafe(|| match prepare_and_fetch(setup, backend, &io)? {
        Some(queue) => {
            serving = true;
            queue.run()
        }
        None => Ok(()),
    });
    let res = std::panic::catch_unwind(body).unwrap_or_else(|p| Err(panicked(p)));
    match &res {
        Err(e) if serving => fail_fast(dev_id, qid, e),
        Err(e) => {
            let _ = io.ready.send(Err(Error::Relayed(format!("queue {qid}: {e}"))));
        }
        Ok(()) => {}
    }
    crate::server::notify_queue_ended();
    res
}

/// The error a caught panic stands for, with its message.
fn panicked(payload: Box<dyn Any + Send>) -> Error {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    Error::Relayed(format!("panicked: {msg}"))
}

/// Logs why a serving queue failed and aborts the process (see `run_queue`).
fn fail_fast(dev_id: u32, qid: u16, e: &Error) -> ! {
    crate::log!(
        "device {dev_id} queue {qid} failed while serving: {e}; aborting the server so recovery can take over"
    );
    std::process::abort()
}

/// Ok(None) when the control thread gave up before binding (a standby
/// that was never needed).
fn prepare_and_fetch<B: QueueBackend>(
    setup: QueueSetup,
    backend: B,
    io: &QueueChannels,
) -> Result<Option<Queue<B>>> {
    let mut queue = Queue::new(setup, backend)?;
    let _ = io.ready.send(Ok(()));
    let Ok(char_dev) = io.bind.recv() else { return Ok(None) };
    queue.bind(char_dev)?;
    queue.fetch_all()?;
    let _ = io.ready.send(Ok(()));
    Ok(Some(queue))
}
