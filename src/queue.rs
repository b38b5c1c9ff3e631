//! Data plane: one thread per hardware queue.
//!
//! Tag ownership: after FETCH a tag belongs to the kernel. Its CQE (result
//! `UBLK_IO_RES_OK`) hands it to us with a request in `descs[tag]`; we serve
//! it and send COMMIT_AND_FETCH, which hands it back. A CQE of
//! `UBLK_IO_RES_ABORT` ends the tag for good (device stopped, quiesced or
//! being recovered by another server). The thread returns once every tag has
//! ended, or once, after the first ABORT, it holds no request and nothing
//! has come for [`LINGER`]: QUIESCE_DEV does not abort a tag the server was
//! serving at the time, so the FETCH its COMMIT re-posts may never end.
//!
//! Buffers: in copy mode each tag owns `max_io_bytes` of one anonymous map
//! made at queue start; the kernel reads or writes it between dispatch and
//! commit. In user-copy mode there are no buffers and the backend moves the
//! bytes with pread/pwrite on `/dev/ublkcN`.
//!
//! The loop allocates nothing and takes no lock: one `io_uring_enter` per
//! turn, then a pass over the CQ that pushes one COMMIT per request.
//!
//! Failure: a FETCH or COMMIT that completes with anything but OK or ABORT
//! is a bug or a broken device, and [`Queue::run`] returns it as an error;
//! the thread body (`run_queue`) then aborts the whole process, so
//! the kernel sees the server gone and recovery can take over.
//!
//! Fault hook, for tests only (`fault` module): with `queue-panic:N` each
//! queue thread panics when request N+1 arrives, after serving N; per
//! request it costs a countdown.

use std::any::Any;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::squeue::EntryMarker as _;
use io_uring::{IoUring, cqueue, opcode, types};
use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::backend::file::FileQueue;
use crate::backend::null::NullQueue;
use crate::backend::nvme::NvmeQueue;
use crate::backend::ram::RamQueue;
use crate::backend::{DeviceBackend, KIND_MASK, QueueBackend};
use crate::clock::now_ns;
use crate::config::CopyMode;
use crate::error::{Error, Result};
use crate::request::{Data, Request};
use crate::stats::StatsFile;
use crate::sys::{self, IoCmd, IoDesc};

/// `user_data` of this ring: the tag in bits 0-15, a backend command's own
/// kind in [`KIND_MASK`], and this bit on every backend command.
const BACKEND_BIT: u64 = 1 << 63;
const TAG_MASK: u64 = 0xffff;
const _: () = assert!(KIND_MASK & (BACKEND_BIT | TAG_MASK) == 0);

/// A queue's ring, its entry sizes chosen by the backend.
pub type Ring<B> = IoUring<<B as QueueBackend>::Sqe, <B as QueueBackend>::Cqe>;

/// Called by a queue thread as it ends, whatever the reason.
pub type OnEnd = Arc<dyn Fn() + Send + Sync>;

/// Everything a queue thread needs, fixed before it starts.
#[derive(Clone)]
pub struct QueueSetup {
    pub dev_id: u32,
    pub qid: u16,
    pub depth: u16,
    pub cpu: Option<usize>,
    pub poll: bool,
    pub copy: CopyMode,
    /// UBLK_F_AUTO_BUF_REG (zero copy on 6.16+): every FETCH and COMMIT names
    /// the buffer slot the kernel registers the tag's next request at.
    pub auto_buf_reg: bool,
    pub max_io_bytes: u32,
    pub stats: Option<Arc<StatsFile>>,
    /// Set to the monotonic time of the first request this queue serves.
    pub first_served: Arc<AtomicU64>,
    /// The fault hook: panic after serving this many requests.
    pub panic_after: Option<u64>,
    /// Tells the control thread this queue ended.
    pub on_end: OnEnd,
}

/// A queue's mappings and ring, made in its own thread before any FETCH.
///
/// It is made in two steps so a hot standby can do the slow part early:
/// [`Queue::new`] pins the thread, builds the ring and allocates buffers;
/// [`Queue::bind`] maps the descriptors of an opened `/dev/ublkcN`.
pub struct Queue<B: QueueBackend> {
    // Declared first so it drops first: closing the ring cancels every
    // command before the buffers and descriptor map they point at go.
    ring: Ring<B>,
    setup: QueueSetup,
    backend: B,
    char_dev: Option<Arc<File>>,
    char_fd: i32,
    descs: Option<Mmap>,
    bufs: Option<MmapMut>,
    served_any: bool,
    /// Requests handed to us and not yet committed.
    held: u32,
    /// Each tag's request and the time its descriptor was read.
    inflight: Vec<(Request, u64)>,
    /// Requests left before the fault hook panics (u64::MAX: never, in practice).
    panic_countdown: u64,
}

const IORING_ENTER_GETEVENTS: u32 = 1;
/// How long a stopping queue waits for more aborts or late requests.
const LINGER: Duration = Duration::from_millis(100);

impl<B: QueueBackend> Queue<B> {
    /// Pins the calling thread, maps the descriptors and builds the ring.
    pub fn new(setup: QueueSetup, backend: B) -> Result<Self> {
        if let Some(cpu) = setup.cpu {
            pin(cpu)?;
        }
        let bufs = match setup.copy {
            CopyMode::Copy => Some(
                MmapMut::map_anon(setup.depth as usize * setup.max_io_bytes as usize)
                    .map_err(|e| Error::io("allocate per-tag buffers", e))?,
            ),
            _ => None,
        };
        let entries = (setup.depth as u32 * 4).next_power_of_two();
        // Measured in the guest (4k randread qd32, queue on its own CPU):
        // --poll spinning on enter(GETEVENTS) as here and peeking at the
        // TASKRUN flag between enters gave the same IOPS; dropping
        // DEFER_TASKRUN to peek at the CQ gave ~10% fewer (every request then
        // IPIs the spinning thread).
        let ring = IoUring::<B::Sqe, B::Cqe>::builder()
            .setup_cqsize(entries * 2)
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .map_err(|e| Error::io(format!("io_uring setup for queue {}", setup.qid), e))?;
        if setup.copy == CopyMode::Zero {
            ring.submitter()
                .register_buffers_sparse(setup.depth as u32)
                .map_err(|e| Error::io("register the sparse buffer table for zero copy", e))?;
        }
        let inflight = vec![(Request::default(), 0); setup.depth as usize];
        let panic_countdown = setup.panic_after.unwrap_or(u64::MAX);
        Ok(Queue {
            setup,
            backend,
            char_dev: None,
            char_fd: -1,
            descs: None,
            bufs,
            ring,
            served_any: false,
            held: 0,
            inflight,
            panic_countdown,
        })
    }

    /// Maps this queue's descriptors from `/dev/ublkcN`.
    pub fn bind(&mut self, char_dev: Arc<File>) -> Result<()> {
        self.descs = Some(map_descs(&self.setup, &char_dev, page_size())?);
        self.char_fd = char_dev.as_raw_fd();
        self.char_dev = Some(char_dev);
        Ok(())
    }

    /// Posts FETCH_REQ for every tag. START_DEV or END_USER_RECOVERY may
    /// be sent once this returns.
    pub fn fetch_all(&mut self) -> Result<()> {
        for tag in 0..self.setup.depth {
            let sqe = self.io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0);
            // SAFETY: the command points at this queue's buffer (copy mode) or
            // nothing; the ring drops before the buffers (field order above).
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| Error::invalid("submission queue smaller than queue depth"))?;
        }
        self.ring
            .submit()
            .map_err(|e| Error::io(format!("submit FETCH_REQ on queue {}", self.setup.qid), e))?;
        Ok(())
    }

    /// A ublk FETCH or COMMIT: 16 bytes of command, so it fits a 64-byte
    /// SQE and widens to a 128-byte one unchanged.
    fn io_cmd(&self, op: u32, tag: u16, result: i32) -> B::Sqe {
        let cmd = IoCmd { q_id: self.setup.qid, tag, result, addr: self.buf_addr(tag) };
        let mut payload = [0u8; 16];
        // SAFETY: IoCmd is repr(C), 16 bytes of plain data.
        unsafe { std::ptr::copy_nonoverlapping(&cmd as *const IoCmd as *const u8, payload.as_mut_ptr(), 16) };
        let mut sqe = opcode::UringCmd16::new(types::Fd(self.char_fd), op).cmd(payload);
        if self.setup.auto_buf_reg {
            sqe = sqe.addr(Some(sys::auto_buf_reg(tag, 0)));
        }
        let mut sqe = B::Sqe::from(sqe.build());
        sqe.set_user_data(tag as u64);
        sqe
    }

    fn buf_addr(&self, tag: u16) -> u64 {
        match &self.bufs {
            Some(b) => b.as_ptr() as u64 + tag as u64 * self.setup.max_io_bytes as u64,
            None => 0,
        }
    }

    /// Serves until every tag has ended (see the module doc for when). A
    /// FETCH or COMMIT that fails other than by ABORT ends it with an error.
    pub fn run(mut self) -> Result<()> {
        let mut live = self.setup.depth as u32;
        let mut stopping = false;
        while live > 0 {
            if stopping {
                if !self.wait_for(LINGER)? && self.held == 0 {
                    break;
                }
            } else {
                self.wait()?;
            }
            let n = self.ring.completion().len();
            for _ in 0..n {
                let Some(cqe) = self.ring.completion().next() else { break };
                let cqe: cqueue::Entry = cqe.into();
                let tag = (cqe.user_data() & TAG_MASK) as u16;
                if cqe.user_data() & BACKEND_BIT != 0 {
                    let kind = cqe.user_data() & KIND_MASK;
                    if let Some(result) = self.backend.complete(tag, kind, cqe.result()) {
                        self.commit(tag, result)?;
                    }
                    continue;
                }
                match cqe.result() {
                    sys::UBLK_IO_RES_OK => self.handle(tag)?,
                    sys::UBLK_IO_RES_ABORT => {
                        live -= 1;
                        stopping = true;
                    }
                    err => return Err(self.tag_error(tag, err)),
                }
            }
        }
        // Hand back the requests committed since the last enter.
        let _ = self.ring.submit();
        Ok(())
    }

    fn tag_error(&self, tag: u16, res: i32) -> Error {
        Error::io(
            format!("FETCH/COMMIT of tag {tag} on queue {} failed (not an abort)", self.setup.qid),
            std::io::Error::from_raw_os_error(-res),
        )
    }

    /// One `io_uring_enter`: sleeps for a completion, or in poll mode only
    /// runs task work (GETEVENTS with min_complete 0) and returns at once.
    fn wait(&mut self) -> Result<()> {
        let res = if self.setup.poll {
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: no argument pointer is passed; the ring is ours.
            unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
            }
        } else {
            self.ring.submit_and_wait(1)
        };
        if let (true, Some(stats)) = (self.setup.poll, &self.setup.stats) {
            stats.queue(self.setup.qid as usize).turn(!self.ring.completion().is_empty());
        }
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io(format!("io_uring_enter on queue {}", self.setup.qid), e)),
        }
    }

    /// Submits and waits up to `timeout` for a completion; false if none came.
    fn wait_for(&mut self, timeout: Duration) -> Result<bool> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(!self.ring.completion().is_empty()),
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                Err(Error::io(format!("io_uring_enter on queue {}", self.setup.qid), e))
            }
            _ => Ok(true),
        }
    }

    fn handle(&mut self, tag: u16) -> Result<()> {
        if self.panic_countdown == 0 {
            panic!(
                "{}: queue {} panics as asked, holding tag {tag}",
                crate::fault::FAULT_ENV,
                self.setup.qid
            );
        }
        self.panic_countdown -= 1;
        self.held += 1;
        if !self.served_any {
            self.served_any = true;
            self.setup.first_served.store(now_ns(), Ordering::Relaxed);
        }
        let req = Request::from_desc(&self.desc(tag));
        self.inflight[tag as usize] = (req, now_ns());
        match self.submit(tag, &req) {
            Some(result) => self.commit(tag, result),
            None => Ok(()),
        }
    }

    /// Records the request's service time and queues its COMMIT_AND_FETCH.
    fn commit(&mut self, tag: u16, result: i32) -> Result<()> {
        self.held -= 1;
        if let Some(stats) = &self.setup.stats {
            let (req, t0) = &self.inflight[tag as usize];
            stats.queue(self.setup.qid as usize).record(req, result, now_ns().saturating_sub(*t0));
        }
        let sqe = self.io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
        // SAFETY: as in fetch_all.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| Error::invalid("submission queue overflow"))
    }

    fn submit(&mut self, tag: u16, req: &Request) -> Option<i32> {
        let data = match self.setup.copy {
            CopyMode::Copy => {
                let len = self.setup.max_io_bytes as usize;
                let bufs = self.bufs.as_mut().expect("copy mode has buffers");
                let off = tag as usize * len;
                Data::Buf(&mut bufs[off..off + len])
            }
            CopyMode::Zero if self.setup.auto_buf_reg => Data::Registered { index: tag },
            CopyMode::Zero => Data::Fixed { index: tag, char_fd: self.char_fd, qid: self.setup.qid },
            _ => Data::UserCopy { fd: self.char_fd, pos: sys::user_copy_pos(self.setup.qid, tag, 0) },
        };
        self.backend.submit(tag, req, data, &mut self.ring.submission(), BACKEND_BIT | tag as u64)
    }

    fn desc(&self, tag: u16) -> IoDesc {
        let base = self.descs.as_ref().expect("bound before FETCH").as_ptr() as *const IoDesc;
        // SAFETY: tag < depth, and the map holds depth descriptors; the kernel
        // writes it, so read it volatile.
        unsafe { std::ptr::read_volatile(base.add(tag as usize)) }
    }
}

/// Starts the thread `ublk{dev}q{qid}`. It pins itself, builds its ring
/// and buffers and reports on `ready`; then waits for `/dev/ublkcN` on
/// `bind`, maps it, posts every FETCH, reports again, and serves until
/// aborted. Dropping `bind`'s sender before sending ends the thread.
pub fn spawn_queue(
    backend: &DeviceBackend,
    setup: QueueSetup,
    io: QueueChannels,
) -> Result<JoinHandle<Result<()>>> {
    let name = format!("ublk{}q{}", setup.dev_id, setup.qid);
    let spawn = |f: Box<dyn FnOnce() -> Result<()> + Send>| {
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|e| Error::io("spawn queue thread", e))
    };
    match backend {
        DeviceBackend::Null => spawn(Box::new(move || run_queue(setup, NullQueue, io))),
        DeviceBackend::Ram(store) => {
            let q = RamQueue::new(store.clone());
            spawn(Box::new(move || run_queue(setup, q, io)))
        }
        DeviceBackend::File(f) => {
            let q = FileQueue::new(f.clone(), setup.depth);
            spawn(Box::new(move || run_queue(setup, q, io)))
        }
        DeviceBackend::Nvme(ns, file) => {
            let q = NvmeQueue::new(ns.clone(), file.clone(), setup.depth);
            spawn(Box::new(move || run_queue(setup, q, io)))
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
    let (dev_id, qid, on_end) = (setup.dev_id, setup.qid, setup.on_end.clone());
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
    (on_end)();
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

fn map_descs(setup: &QueueSetup, char_dev: &File, page: usize) -> Result<Mmap> {
    let off = sys::desc_offset(setup.qid, page) as u64;
    // SAFETY: the kernel owns the contents; we only read them volatile, and
    // the map is read-only as the driver demands.
    unsafe { MmapOptions::new().offset(off).len(sys::desc_len(setup.depth, page)).map(char_dev) }
        .map_err(|e| Error::io(format!("mmap descriptors of queue {}", setup.qid), e))
}

/// Pins the calling thread to `cpu` and checks that it took.
pub fn pin(cpu: usize) -> Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        return Err(Error::invalid(format!("could not pin queue thread to CPU {cpu}")));
    }
    // SAFETY: sched_getcpu has no preconditions.
    let now = unsafe { libc::sched_getcpu() };
    if now != cpu as i32 {
        return Err(Error::invalid(format!("pinned to CPU {cpu} but running on CPU {now}")));
    }
    Ok(())
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
