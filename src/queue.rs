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
//! The loop allocates nothing and takes no lock. Each pass: at most one
//! `io_uring_enter` (blocking: always, sleeping for a completion; `--poll`:
//! only when there is something to submit or the ring flags pending task
//! work), at most one clock read (stats on, and only if the CQ holds
//! entries), then a pass over the CQ that pushes one COMMIT per request,
//! then the queue's counters go to its stats slot.
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
use io_uring::{CompletionQueue, IoUring, SubmissionQueue, Submitter, cqueue, opcode, types};
use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::backend::emulated::Emulated;
use crate::backend::{DeviceBackend, KIND_MASK, QueueBackend, QueueMaker};
use crate::clock::now_ns;
use crate::emulate::{Emulation, Failer};
use crate::error::{Error, Result};
use crate::plan::Transfer;
use crate::request::{Data, Request};
use crate::stats::{QueueCounters, StatsFile};
use crate::sys::{self, IoCmd, IoDesc};

/// `user_data` of this ring: the tag in bits 0-15, a backend command's own
/// kind in [`KIND_MASK`], and this bit on every backend command.
pub(crate) const BACKEND_BIT: u64 = 1 << 63;
pub(crate) const TAG_MASK: u64 = 0xffff;
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
    pub copy: Transfer,
    /// UBLK_F_AUTO_BUF_REG (zero copy on 6.16+): every FETCH and COMMIT names
    /// the buffer slot the kernel registers the tag's next request at.
    pub auto_buf_reg: bool,
    pub max_io_bytes: u32,
    pub stats: Option<Arc<StatsFile>>,
    /// `--stats on`: count every request and read the clock once per pass.
    /// Off: no clock read and no per-request work; only enters are counted.
    pub stats_on: bool,
    /// `--gather-wait` in µs (blocking queues; see [`Gather`]).
    pub gather_wait_us: u32,
    /// Set to the monotonic time of the first request this queue serves.
    pub first_served: Arc<AtomicU64>,
    /// The fault hook: panic after serving this many requests.
    pub panic_after: Option<u64>,
    /// The fault hook `auto-buf-reg-fallback`: FETCH and COMMIT name a slot
    /// past the buffer table, so the kernel falls back on every request.
    pub unreg_auto_buf: bool,
    /// `--latency`/`--fail`: the backend is wrapped in [`Emulated`], with
    /// the device's shared failure rules.
    pub emulate: Option<(Emulation, Arc<Failer>)>,
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
    state: State<B>,
}

/// Everything of a queue but its ring, so a pass can hold the ring's
/// submission and completion queues and still call into this.
struct State<B: QueueBackend> {
    setup: QueueSetup,
    backend: B,
    tags: TagIo,
    arrivals: Arrivals,
    /// Requests handed to us and not yet committed.
    held: u32,
    /// Each tag's request and the pass time it was seen at (stats on).
    inflight: Vec<(Request, u64)>,
    counters: QueueCounters,
    /// The time of the current pass (stats on; else 0): the one clock read
    /// that stamps both the requests the pass hands out and those it commits.
    now: u64,
    gather: Gather,
}

pub(crate) type Sq<'a, B> = SubmissionQueue<'a, <B as QueueBackend>::Sqe>;
pub(crate) type Cq<'a, B> = CompletionQueue<'a, <B as QueueBackend>::Cqe>;

pub(crate) const IORING_ENTER_GETEVENTS: u32 = 1;
/// How long a stopping queue waits for more aborts or late requests.
pub(crate) const LINGER: Duration = Duration::from_millis(100);
/// Idle passes of a polling queue between two publishes of its counters
/// (busy passes and passes that entered the kernel always publish).
pub(crate) const IDLE_PUBLISH_EVERY: u64 = 1024;

/// Ring entries for a queue: every tag has at most one FETCH/COMMIT or
/// `per_request` backend commands in flight (never both: COMMIT goes after
/// the last backend CQE), so neither queue can hold more than this; the CQ
/// is made as large as the SQ, not twice.
pub fn ring_entries(depth: u16, per_request: u32) -> u32 {
    (depth as u32 * per_request.max(1)).next_power_of_two()
}

/// A queue's data plane as its thread drives it: per-tag ([`Queue`]) or
/// batch (`batch_queue`). Made, bound to `/dev/ublkcN`, armed, then run.
pub(crate) trait DataPlane<B>: Sized {
    fn new(setup: QueueSetup, backend: B) -> Result<Self>;
    fn bind(&mut self, char_dev: Arc<File>) -> Result<()>;
    /// Hands every tag to the kernel; START_DEV or END_USER_RECOVERY may follow.
    fn fetch_all(&mut self) -> Result<()>;
    fn run(self) -> Result<()>;
}

/// What every request's arrival does in either loop: the fault hook's
/// countdown, and the time of the first request served.
pub(crate) struct Arrivals {
    /// Requests left before the fault hook panics (u64::MAX: never, in practice).
    panic_countdown: u64,
    served_any: bool,
}

impl Arrivals {
    pub(crate) fn new(setup: &QueueSetup) -> Self {
        Arrivals { panic_countdown: setup.panic_after.unwrap_or(u64::MAX), served_any: false }
    }

    /// Counts one request; panics when the fault hook says so.
    pub(crate) fn arrive(&mut self, setup: &QueueSetup, tag: u16) {
        if self.panic_countdown == 0 {
            panic!("{}: queue {} panics as asked, holding tag {tag}", crate::fault::FAULT_ENV, setup.qid);
        }
        self.panic_countdown -= 1;
        if !self.served_any {
            self.served_any = true;
            setup.first_served.store(now_ns(), Ordering::Relaxed);
        }
    }
}

/// Which data plane a queue thread runs, whatever the backend.
pub(crate) trait PlaneKind {
    type Plane<B: QueueBackend>: DataPlane<B>;
}

/// The per-tag data plane ([`Queue`]): FETCH and COMMIT_AND_FETCH per request.
pub struct PerTag;

impl PlaneKind for PerTag {
    type Plane<B: QueueBackend> = Queue<B>;
}

impl<B: QueueBackend> DataPlane<B> for Queue<B> {
    fn new(setup: QueueSetup, backend: B) -> Result<Self> {
        Queue::new(setup, backend)
    }
    fn bind(&mut self, char_dev: Arc<File>) -> Result<()> {
        Queue::bind(self, char_dev)
    }
    fn fetch_all(&mut self) -> Result<()> {
        Queue::fetch_all(self)
    }
    fn run(self) -> Result<()> {
        Queue::run(self)
    }
}

/// A queue's ring of `entries` SQEs and `cq_entries` CQEs.
pub(crate) fn build_ring<B: QueueBackend>(
    entries: u32,
    cq_entries: u32,
    qid: u16,
    copy: Transfer,
) -> Result<Ring<B>> {
    // TASKRUN_FLAG: the kernel sets IORING_SQ_TASKRUN in the SQ flags when
    // it queues task work (a new request for us), so a polling queue sees
    // without a syscall when it must enter.
    let mut b = IoUring::<B::Sqe, B::Cqe>::builder();
    b.setup_cqsize(cq_entries).setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer();
    // Zero copy goes without DEFER_TASKRUN: torn down after its server
    // died, a DEFER_TASKRUN ring waits an RCU grace period
    // (synchronize_rcu in io_ring_exit_work) before it frees its buffer
    // table, and the requests registered there hold the driver's release
    // work, so the recovery, until then (docs/measurements.md, "Where the gap goes").
    if copy != Transfer::Zero {
        b.setup_defer_taskrun();
    }
    b.build(entries).map_err(|e| Error::io(format!("io_uring setup for queue {qid}"), e))
}

/// Submits and sleeps until a completion comes or the monotonic time
/// `due_ns` (a held request's), whichever is first; ETIME is the latter.
pub(crate) fn wait_until(sub: &Submitter<'_>, due_ns: u64) -> std::io::Result<usize> {
    let left = due_ns.saturating_sub(now_ns());
    if left == 0 {
        return sub.submit();
    }
    let ts = types::Timespec::from(Duration::from_nanos(left));
    sub.submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
}

/// A gathering wait's overall timeout: its min_wait applies only under one,
/// and its expiry (ETIME, idle that long) is a plain return.
const GATHER_TIMEOUT: Duration = Duration::from_secs(1);

/// A blocking queue's gathering (`--gather-wait`). After a pass that took
/// two deliveries or more, its enter waits for one CQE more than it needs,
/// or for `--gather-wait` µs once one has come (io_uring's min_wait), or
/// past that for the first. ublk wakes the thread for every delivery (its
/// task work is added non-lazily), but the kernel runs it and sleeps again,
/// so one enter takes two or more. After a pass with one delivery (QD1) it
/// does not gather, so a lone request never waits.
pub(crate) struct Gather {
    /// 0: never (asked so, or the kernel has no min_wait).
    usec: u32,
    /// Deliveries in the current pass.
    deliveries: u32,
    /// The next wait gathers.
    armed: bool,
}

impl Gather {
    /// `--gather-wait` as `ring` can do it: off where the kernel has no
    /// min_wait (IORING_FEAT_MIN_TIMEOUT, 6.12), which would refuse the enter.
    pub(crate) fn new<S: io_uring::squeue::EntryMarker, C: cqueue::EntryMarker>(
        ring: &IoUring<S, C>,
        setup: &QueueSetup,
    ) -> Self {
        let usec = if ring.params().is_feature_min_timeout() { setup.gather_wait_us } else { 0 };
        Gather { usec, deliveries: 0, armed: false }
    }

    pub(crate) fn delivered(&mut self) {
        self.deliveries += 1;
    }

    /// Ends a pass: the next wait gathers if it took two deliveries or more.
    pub(crate) fn end_pass(&mut self) {
        self.armed = self.usec > 0 && self.deliveries >= 2;
        self.deliveries = 0;
    }

    /// The next wait gathers (a bounded wait of its own).
    pub(crate) fn armed(&self) -> bool {
        self.armed
    }

    /// Submits and waits for `want` CQEs, or gathers (see above).
    pub(crate) fn wait(&self, sub: &Submitter<'_>, want: usize) -> std::io::Result<usize> {
        if !self.armed {
            return sub.submit_and_wait(want);
        }
        let ts = types::Timespec::from(GATHER_TIMEOUT);
        sub.submit_with_args(want + 1, &types::SubmitArgs::new().timespec(&ts).min_wait_usec(self.usec))
    }
}

impl<B: QueueBackend> Queue<B> {
    /// Pins the calling thread, maps the descriptors and builds the ring.
    pub fn new(setup: QueueSetup, backend: B) -> Result<Self> {
        if let Some(cpu) = setup.cpu {
            pin(cpu)?;
        }
        let tags = TagIo::new(&setup)?;
        let entries = ring_entries(setup.depth, B::MAX_COMMANDS);
        let ring = build_ring::<B>(entries, entries, setup.qid, setup.copy)?;
        let gather = Gather::new(&ring, &setup);
        if setup.copy == Transfer::Zero {
            ring.submitter()
                .register_buffers_sparse(setup.depth as u32)
                .map_err(|e| Error::io("register the sparse buffer table for zero copy", e))?;
        }
        let inflight = vec![(Request::default(), 0); setup.depth as usize];
        let arrivals = Arrivals::new(&setup);
        let state = State {
            setup,
            backend,
            tags,
            arrivals,
            held: 0,
            inflight,
            counters: QueueCounters::new(),
            now: 0,
            gather,
        };
        Ok(Queue { ring, state })
    }

    /// Maps this queue's descriptors from `/dev/ublkcN`.
    pub fn bind(&mut self, char_dev: Arc<File>) -> Result<()> {
        let s = &mut self.state;
        s.tags.bind(&s.setup, char_dev)?;
        Ok(())
    }

    /// Posts FETCH_REQ for every tag. START_DEV or END_USER_RECOVERY may
    /// be sent once this returns.
    pub fn fetch_all(&mut self) -> Result<()> {
        let s = &self.state;
        let mut sq = self.ring.submission();
        for tag in 0..s.setup.depth {
            let sqe = s.io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0);
            // SAFETY: the command points at this queue's buffer (copy mode) or
            // nothing; the ring drops before the buffers (field order above).
            unsafe { sq.push(&sqe) }
                .map_err(|_| Error::Queue("submission queue smaller than queue depth".into()))?;
        }
        drop(sq);
        self.ring.submit().map_err(|e| Error::io(format!("submit FETCH_REQ on queue {}", s.setup.qid), e))?;
        Ok(())
    }

    /// Serves until every tag has ended (see the module doc for when). A
    /// FETCH or COMMIT that fails other than by ABORT ends it with an error.
    ///
    /// The submission and completion queues are borrowed once for the
    /// whole run; each pass syncs them with the kernel's view (a few
    /// atomic loads and stores) instead of borrowing them again per entry.
    pub fn run(mut self) -> Result<()> {
        let Queue { ring, state } = &mut self;
        run_split::<B>(ring, |sub, sq, cq| state.serve(sub, sq, cq))
    }
}

/// Splits `ring` once for a whole run and calls `serve` with its parts;
/// then hands back what `serve` committed since its last enter.
pub(crate) fn run_split<B: QueueBackend>(
    ring: &mut Ring<B>,
    serve: impl FnOnce(&Submitter<'_>, &mut Sq<'_, B>, &mut Cq<'_, B>) -> Result<()>,
) -> Result<()> {
    let (mut submitter, mut sq, mut cq) = ring.split();
    // Each enter then names the ring by its registered index and skips
    // the file lookup; without it (old kernel) enters work as before.
    let registered = submitter.register_ring_fd().is_ok();
    let res = serve(&submitter, &mut sq, &mut cq);
    if res.is_ok() {
        sq.sync();
        let _ = submitter.submit();
    }
    // The registration holds a reference to the ring: without undoing
    // it, dropping the ring would not close it (and cancel its commands)
    // before the buffers go, only the thread's exit would.
    if registered {
        let _ = submitter.unregister_ring_fd();
    }
    res
}

impl<B: QueueBackend> State<B> {
    fn serve(&mut self, sub: &Submitter<'_>, sq: &mut Sq<'_, B>, cq: &mut Cq<'_, B>) -> Result<()> {
        let mut live = self.setup.depth as u32;
        let mut stopping = false;
        while live > 0 {
            sq.sync();
            // Publish the CQ head the last pass advanced: the kernel counts a
            // blocking wait from it and would return at once on old CQEs.
            cq.sync();
            let entered = if stopping {
                if !self.wait_for(sub, cq, LINGER)? && self.held == 0 {
                    break;
                }
                true
            } else {
                self.wait(sub, sq)?
            };
            sq.sync();
            cq.sync();
            let busy = !CompletionQueue::is_empty(cq);
            if busy && self.setup.stats_on {
                self.now = now_ns();
            }
            for cqe in &mut *cq {
                let cqe: cqueue::Entry = cqe.into();
                let tag = (cqe.user_data() & TAG_MASK) as u16;
                if cqe.user_data() & BACKEND_BIT != 0 {
                    let kind = cqe.user_data() & KIND_MASK;
                    if let Some(result) = self.backend.complete(tag, kind, cqe.result()) {
                        self.commit(tag, result, sq)?;
                    }
                    continue;
                }
                match cqe.result() {
                    sys::UBLK_IO_RES_OK => {
                        self.gather.delivered();
                        self.handle(tag, sq)?
                    }
                    sys::UBLK_IO_RES_ABORT => {
                        live -= 1;
                        stopping = true;
                    }
                    err => return Err(self.tag_error(tag, err)),
                }
            }
            let busy = self.commit_due(sq)? || busy;
            self.gather.end_pass();
            self.counters.turn(busy);
            if busy || entered || self.counters.idle_turns.is_multiple_of(IDLE_PUBLISH_EVERY) {
                self.publish();
            }
        }
        self.publish();
        Ok(())
    }

    fn publish(&mut self) {
        if let Some(stats) = &self.setup.stats {
            self.counters.publish(stats.queue(self.setup.qid as usize));
        }
    }

    fn tag_error(&self, tag: u16, res: i32) -> Error {
        Error::io(
            format!("FETCH/COMMIT of tag {tag} on queue {} failed (not an abort)", self.setup.qid),
            std::io::Error::from_raw_os_error(-res),
        )
    }

    /// Blocking: one `io_uring_enter` that submits and sleeps for a
    /// completion, or gathers after a pass with two requests or more
    /// ([`Gather`]). Polling: enters only when there is something to submit,
    /// task work to run (IORING_SQ_TASKRUN: a new request reaches the CQ
    /// only through task work, which runs in an enter) or
    /// a CQ overflow to flush, and then returns at once (min_complete 0);
    /// otherwise the pass just looks at the CQ. True if it entered.
    ///
    /// Measured in one guest boot (7.3.4 TCG, null, fio 4k randread qd32 on
    /// CPU 0, queue on CPU 1, scheduler none): entering only when needed gave
    /// 70.8k IOPS at 1.96 enters per I/O; entering on every pass (GETEVENTS,
    /// min_complete 0) 63.5k at 28.5 enters per I/O.
    fn wait(&mut self, sub: &Submitter<'_>, sq: &Sq<'_, B>) -> Result<bool> {
        let res = if !self.setup.poll {
            match self.backend.next_due() {
                Some(due) => wait_until(sub, due),
                None => self.gather.wait(sub, 1),
            }
        } else if !sq.is_empty() || sq.taskrun() || sq.cq_overflow() {
            // SAFETY: no argument pointer is passed; the ring is ours.
            unsafe { sub.enter::<libc::sigset_t>(sq.len() as u32, 0, IORING_ENTER_GETEVENTS, None) }
        } else {
            return Ok(false);
        };
        self.counters.entered();
        match res {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(Error::io(format!("io_uring_enter on queue {}", self.setup.qid), e)),
        }
    }

    /// Submits and waits up to `timeout` for a completion; false if none came.
    fn wait_for(&mut self, sub: &Submitter<'_>, cq: &mut Cq<'_, B>, timeout: Duration) -> Result<bool> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.counters.entered();
        match sub.submit_with_args(1, &args) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                cq.sync();
                Ok(!CompletionQueue::is_empty(cq))
            }
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                Err(Error::io(format!("io_uring_enter on queue {}", self.setup.qid), e))
            }
            _ => Ok(true),
        }
    }

    /// Commits what the backend held back (emulated service times) and is
    /// now due; true if it committed any.
    #[inline]
    fn commit_due(&mut self, sq: &mut Sq<'_, B>) -> Result<bool> {
        if self.backend.next_due().is_none() {
            return Ok(false);
        }
        let now = now_ns();
        if self.setup.stats_on {
            self.now = now;
        }
        let mut any = false;
        while let Some((tag, res)) = self.backend.pop_due(now) {
            self.commit(tag, res, sq)?;
            any = true;
        }
        Ok(any)
    }

    fn handle(&mut self, tag: u16, sq: &mut Sq<'_, B>) -> Result<()> {
        self.arrivals.arrive(&self.setup, tag);
        self.held += 1;
        let req = Request::from_desc(&self.tags.desc(tag));
        if self.setup.stats_on {
            self.inflight[tag as usize] = (req, self.now);
        }
        match self.submit(tag, &req, sq) {
            Some(result) => self.commit(tag, result, sq),
            None => Ok(()),
        }
    }

    /// Counts the request (stats on) and queues its COMMIT_AND_FETCH.
    fn commit(&mut self, tag: u16, result: i32, sq: &mut Sq<'_, B>) -> Result<()> {
        self.held -= 1;
        if self.setup.stats_on {
            let (req, t0) = &self.inflight[tag as usize];
            self.counters.record(req, result, self.now.saturating_sub(*t0));
        }
        let sqe = self.io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
        // SAFETY: as in fetch_all. The SQ has room: see ring_entries.
        unsafe { sq.push(&sqe) }.map_err(|_| Error::RingFull("submission queue overflow".into()))
    }

    fn submit(&mut self, tag: u16, req: &Request, sq: &mut Sq<'_, B>) -> Option<i32> {
        let data = match req.flags & sys::UBLK_IO_F_NEED_REG_BUF {
            0 => self.tags.data(&self.setup, tag),
            _ => self.tags.fixed(&self.setup, tag),
        };
        self.backend.submit(tag, req, data, sq, BACKEND_BIT | tag as u64)
    }

    /// A ublk FETCH or COMMIT: 16 bytes of command, so it fits a 64-byte
    /// SQE and widens to a 128-byte one unchanged. Built by value and
    /// pushed at once, it is written in place all the same: in the release
    /// build (`objdump -d`, `State<B>::commit`) its fields are stored
    /// straight into `sqes[tail & mask]`, with no copy on the stack.
    fn io_cmd(&self, op: u32, tag: u16, result: i32) -> B::Sqe {
        let cmd = IoCmd { q_id: self.setup.qid, tag, result, addr: self.tags.buf_addr(&self.setup, tag) };
        let mut payload = [0u8; 16];
        // SAFETY: IoCmd is repr(C), 16 bytes of plain data.
        unsafe { std::ptr::copy_nonoverlapping(&cmd as *const IoCmd as *const u8, payload.as_mut_ptr(), 16) };
        let mut sqe = opcode::UringCmd16::new(types::Fd(self.tags.char_fd), op).cmd(payload);
        if self.setup.auto_buf_reg {
            // Slots `depth..` are past the table (register_buffers_sparse).
            let slot = if self.setup.unreg_auto_buf { self.setup.depth + tag } else { tag };
            sqe = sqe.addr(Some(sys::auto_buf_reg(slot, sys::UBLK_AUTO_BUF_REG_FALLBACK)));
        }
        let mut sqe = B::Sqe::from(sqe.build());
        sqe.set_user_data(tag as u64);
        sqe
    }
}

/// What a queue reaches its tags' requests through, in either loop: the
/// per-tag buffers (copy mode) and, once bound, `/dev/ublkcN` and its
/// descriptor map.
pub(crate) struct TagIo {
    char_dev: Option<Arc<File>>,
    pub(crate) char_fd: i32,
    descs: Option<Mmap>,
    bufs: Option<MmapMut>,
}

impl TagIo {
    /// Allocates the per-tag buffers of copy mode; nothing is bound yet.
    pub(crate) fn new(setup: &QueueSetup) -> Result<Self> {
        let bufs = match setup.copy {
            Transfer::Copy => Some(
                MmapMut::map_anon(setup.depth as usize * setup.max_io_bytes as usize)
                    .map_err(|e| Error::io("allocate per-tag buffers", e))?,
            ),
            _ => None,
        };
        Ok(TagIo { char_dev: None, char_fd: -1, descs: None, bufs })
    }

    /// Maps the queue's descriptors from `/dev/ublkcN`.
    pub(crate) fn bind(&mut self, setup: &QueueSetup, char_dev: Arc<File>) -> Result<()> {
        self.descs = Some(map_descs(setup, &char_dev, page_size())?);
        self.char_fd = char_dev.as_raw_fd();
        self.char_dev = Some(char_dev);
        Ok(())
    }

    /// The tag's buffer address (copy mode), else 0.
    pub(crate) fn buf_addr(&self, setup: &QueueSetup, tag: u16) -> u64 {
        match &self.bufs {
            Some(b) => b.as_ptr() as u64 + tag as u64 * setup.max_io_bytes as u64,
            None => 0,
        }
    }

    /// Where the request of `tag` has its bytes, by the queue's copy mode.
    pub(crate) fn data(&mut self, setup: &QueueSetup, tag: u16) -> Data<'_> {
        match setup.copy {
            Transfer::Copy => {
                let len = setup.max_io_bytes as usize;
                let bufs = self.bufs.as_mut().expect("copy mode has buffers");
                let off = tag as usize * len;
                Data::Buf(&mut bufs[off..off + len])
            }
            Transfer::Zero if setup.auto_buf_reg => Data::Registered { index: tag },
            Transfer::Zero => self.fixed(setup, tag),
            Transfer::User => Data::UserCopy { fd: self.char_fd, pos: sys::user_copy_pos(setup.qid, tag, 0) },
        }
    }

    /// Zero copy through the server's own REGISTER/UNREGISTER chain: how a
    /// request the kernel could not register (UBLK_IO_F_NEED_REG_BUF, the
    /// AUTO_BUF_REG fallback) is served, at the tag's own slot.
    pub(crate) fn fixed(&self, setup: &QueueSetup, tag: u16) -> Data<'static> {
        Data::Fixed { index: tag, char_fd: self.char_fd, qid: setup.qid }
    }

    /// The descriptor of `tag`, which must be below the queue depth.
    pub(crate) fn desc(&self, tag: u16) -> IoDesc {
        let base = self.descs.as_ref().expect("bound before FETCH").as_ptr() as *const IoDesc;
        // SAFETY: tag < depth (callers check or the kernel gave it), and the
        // map holds depth descriptors; the kernel writes it, so read it volatile.
        unsafe { std::ptr::read_volatile(base.add(tag as usize)) }
    }
}

/// Starts the thread `ublk{dev}q{qid}`. It pins itself, builds its ring
/// and buffers and reports on `ready`; then waits for `/dev/ublkcN` on
/// `bind`, maps it, posts every FETCH, reports again, and serves until
/// aborted. Dropping `bind`'s sender before sending ends the thread.
pub(crate) fn spawn_queue<K: PlaneKind>(
    backend: &DeviceBackend,
    setup: QueueSetup,
    io: QueueChannels,
) -> Result<JoinHandle<Result<()>>> {
    let depth = setup.depth;
    backend.with_queue(depth, Spawn::<K> { setup, io, plane: std::marker::PhantomData })
}

/// Starts a queue thread once the backend has made the queue's half.
struct Spawn<K> {
    setup: QueueSetup,
    io: QueueChannels,
    plane: std::marker::PhantomData<K>,
}

impl<K: PlaneKind> QueueMaker for Spawn<K> {
    type Out = Result<JoinHandle<Result<()>>>;

    /// The backend is wrapped in [`Emulated`] when the device emulates a disk.
    fn make<B: QueueBackend + Send + 'static>(self, backend: B) -> Self::Out {
        let Spawn { setup, io, .. } = self;
        let name = format!("ublk{}q{}", setup.dev_id, setup.qid);
        let body: Box<dyn FnOnce() -> Result<()> + Send> = match setup.emulate.clone() {
            None => Box::new(move || run_queue::<_, K::Plane<_>>(setup, backend, io)),
            Some((e, failer)) => {
                let seed = setup.dev_id as u64 * 4099 + setup.qid as u64;
                let q = Emulated::new(backend, &e, failer, setup.depth, seed);
                Box::new(move || run_queue::<_, K::Plane<_>>(setup, q, io))
            }
        };
        std::thread::Builder::new().name(name).spawn(body).map_err(|e| Error::io("spawn queue thread", e))
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
pub(crate) fn run_queue<B, P: DataPlane<B>>(setup: QueueSetup, backend: B, io: QueueChannels) -> Result<()> {
    let (dev_id, qid, on_end) = (setup.dev_id, setup.qid, setup.on_end.clone());
    let mut serving = false;
    let body = AssertUnwindSafe(|| match prepare_and_fetch::<B, P>(setup, backend, &io)? {
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
fn prepare_and_fetch<B, P: DataPlane<B>>(
    setup: QueueSetup,
    backend: B,
    io: &QueueChannels,
) -> Result<Option<P>> {
    let mut queue = P::new(setup, backend)?;
    let _ = io.ready.send(Ok(()));
    let Ok(char_dev) = io.bind.recv() else { return Ok(None) };
    queue.bind(char_dev)?;
    queue.fetch_all()?;
    let _ = io.ready.send(Ok(()));
    Ok(Some(queue))
}

pub(crate) fn map_descs(setup: &QueueSetup, char_dev: &File, page: usize) -> Result<Mmap> {
    let off = sys::desc_offset(setup.qid, page) as u64;
    // SAFETY: the kernel owns the contents; we only read them volatile, and
    // the map is read-only as the driver demands.
    unsafe { MmapOptions::new().offset(off).len(sys::desc_len(setup.depth, page)).map(char_dev) }
        .map_err(|e| Error::io(format!("mmap descriptors of queue {}", setup.qid), e))
}

/// Pins the calling thread to `cpu` and checks that it took.
pub fn pin(cpu: usize) -> Result<()> {
    // A mask long enough for `cpu`, however many CPUs the machine has (a
    // cpu_set_t stops at 1024).
    let mut mask = vec![0u64; sys::cpu_mask_words(cpu + 1)];
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: mask is readable for its whole length in bytes; 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, mask.len() * 8, mask.as_ptr().cast()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Queue(format!("could not pin queue thread to CPU {cpu}: {e}")));
    }
    // SAFETY: sched_getcpu has no preconditions.
    let now = unsafe { libc::sched_getcpu() };
    if now != cpu as i32 {
        return Err(Error::Queue(format!("pinned to CPU {cpu} but running on CPU {now}")));
    }
    Ok(())
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::null::NullQueue;

    #[test]
    fn rings_hold_what_can_be_in_flight_and_no_more() {
        // Sync backends: one FETCH/COMMIT per tag.
        assert_eq!(ring_entries(128, 0), 128);
        assert_eq!(ring_entries(100, 0), 128, "rounded up to a power of two");
        assert_eq!(ring_entries(1, 0), 1);
        // One backend command per request replaces the COMMIT, never adds to it.
        assert_eq!(ring_entries(128, 1), 128);
        // NVMe zero copy chains three commands per request.
        assert_eq!(ring_entries(128, 3), 512);
        assert_eq!(ring_entries(sys::UBLK_MAX_QUEUE_DEPTH as u16, 3), 16384);
    }

    /// The ring as a queue builds it (its flags, CQ no larger than the SQ)
    /// is accepted by the kernel, takes exactly `entries` commands, and
    /// round-trips them through one borrow of each queue with a registered
    /// ring fd, as `run` uses it.
    #[test]
    fn a_queue_ring_round_trips_through_one_borrow() {
        for copy in [Transfer::Copy, Transfer::Zero] {
            round_trip(build_ring::<NullQueue>(ring_entries(4, 0), ring_entries(4, 0), 0, copy).unwrap());
        }
    }

    /// A zero-copy queue's ring has no DEFER_TASKRUN, the others do (see
    /// `build_ring`). Told apart by where task work runs: a timeout's
    /// completion is task work, which a plain ring runs on the way back
    /// from any syscall and a DEFER_TASKRUN ring only in io_uring_enter.
    #[test]
    fn only_zero_copy_rings_run_task_work_outside_enter() {
        for (copy, deferred) in [(Transfer::Copy, true), (Transfer::User, true), (Transfer::Zero, false)] {
            let mut ring = build_ring::<NullQueue>(4, 4, 0, copy).unwrap();
            let ts = types::Timespec::new().nsec(1_000_000);
            // SAFETY: ts outlives the timeout: it is waited for below.
            unsafe { ring.submission().push(&opcode::Timeout::new(&ts).build()) }.unwrap();
            ring.submit().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let seen = ring.completion().len();
            assert_eq!(seen, usize::from(!deferred), "{copy:?}: {seen} CQE(s) before an enter");
            ring.submit_and_wait(1).unwrap();
            assert_eq!(ring.completion().len(), 1, "{copy:?}: the timeout never completed");
        }
    }

    fn round_trip(mut ring: Ring<NullQueue>) {
        let (mut sub, mut sq, mut cq) = ring.split();
        sub.register_ring_fd().unwrap();
        for round in 0..3u64 {
            for i in 0..4 {
                // SAFETY: a NOP points at nothing.
                unsafe { sq.push(&opcode::Nop::new().build().user_data(round * 4 + i)) }.unwrap();
            }
            // SAFETY: as above.
            assert!(unsafe { sq.push(&opcode::Nop::new().build()) }.is_err(), "more than 4 entries");
            sq.sync();
            sub.submit_and_wait(4).unwrap();
            sq.sync();
            cq.sync();
            let got: Vec<u64> = cq.by_ref().map(|c| c.user_data()).collect();
            assert_eq!(got, (round * 4..round * 4 + 4).collect::<Vec<_>>());
            cq.sync();
        }
        sub.unregister_ring_fd().unwrap();
    }
}
