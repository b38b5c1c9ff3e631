//! Data plane: its threads (one per hardware queue unless `--threads` says
//! otherwise: `layout`), and what they are made of.
//!
//! - this file: a thread's setup, the thread (spawn, start-up handshake,
//!   abort on failure), its ring, and [`TagIo`], how it reaches a slot's
//!   queue, tag, descriptor and buffer;
//! - `run_loop`: the loop both planes run (wait, reap, commit what is due,
//!   publish counters) and what they share ([`run_loop::Core`]);
//! - `per_tag`: the per-tag plane (FETCH_REQ, COMMIT_AND_FETCH_REQ);
//! - `batch`: the batch plane (UBLK_F_BATCH_IO: PREP, multishot FETCH and
//!   COMMIT_IO_CMDS).
//!
//! Slots: a thread numbers the tags it serves 0.. (`layout`); its ring's
//! `user_data`, its backend's `tag` and its buffer indexes are slots, and
//! [`TagIo`] maps a slot to the kernel's (queue, tag). With one thread per
//! queue the map is the identity.
//!
//! Buffers: in copy mode each tag owns `max_io_bytes` of one anonymous map
//! made at queue start; the kernel reads or writes it between dispatch and
//! commit. In user-copy mode there are no buffers and the backend moves the
//! bytes with pread/pwrite on `/dev/ublkcN`.
//!
//! Failure: once a queue serves, an error or panic of its loop aborts the
//! whole process (`run_queue`), so the kernel sees the server gone and
//! recovery can take over.
//!
//! Fault hook, for tests only (`fault` module): with `queue-panic:N` each
//! queue thread panics when request N+1 arrives, after serving N; per
//! request it costs a countdown.

pub mod batch;
pub mod per_tag;
pub mod run_loop;

pub use per_tag::PerTag;

use std::any::Any;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use io_uring::{CompletionQueue, IoUring, SubmissionQueue};
use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::backend::emulated::Emulated;
use crate::backend::{DeviceBackend, KIND_MASK, QueueBackend, QueueMaker};
use crate::emulate::{Emulation, Failer};
use crate::error::{Error, Result};
use crate::layout::Slice;
use crate::plan::Transfer;
use crate::request::Data;
use crate::stats::StatsFile;
use crate::sys::{self, IoDesc};

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
    /// This thread's index in the layout: its stats slot.
    pub thread: u16,
    /// The queue of the first slice (the batch plane's only queue).
    pub qid: u16,
    /// The tags this thread serves, as slots 0.. in this order.
    pub slices: Arc<[Slice]>,
    /// Tags per hardware queue (each descriptor map's length).
    pub queue_depth: u16,
    /// Slots this thread serves: the queue depth with one thread per queue.
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
    /// `--gather-wait` in µs (blocking queues; see `run_loop`).
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

pub(crate) type Sq<'a, B> = SubmissionQueue<'a, <B as QueueBackend>::Sqe>;
pub(crate) type Cq<'a, B> = CompletionQueue<'a, <B as QueueBackend>::Cqe>;

/// Ring entries for a queue: every tag has at most one FETCH/COMMIT or
/// `per_request` backend commands in flight (never both: COMMIT goes after
/// the last backend CQE), so neither queue can hold more than this; the CQ
/// is made as large as the SQ, not twice.
pub fn ring_entries(depth: u16, per_request: u32) -> u32 {
    (depth as u32 * per_request.max(1)).next_power_of_two()
}

/// A queue's data plane as its thread drives it: per-tag (`per_tag`) or
/// batch (`batch`). Made, bound to `/dev/ublkcN`, armed, then run.
pub(crate) trait DataPlane<B>: Sized {
    fn new(setup: QueueSetup, backend: B) -> Result<Self>;
    fn bind(&mut self, char_dev: Arc<File>) -> Result<()>;
    /// Hands every tag to the kernel; START_DEV or END_USER_RECOVERY may follow.
    fn fetch_all(&mut self) -> Result<()>;
    fn run(self) -> Result<()>;
}

/// Which data plane a queue thread runs, whatever the backend.
pub(crate) trait PlaneKind {
    type Plane<B: QueueBackend>: DataPlane<B>;
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

/// What a queue reaches its tags' requests through, in either loop: the
/// per-tag buffers (copy mode) and, once bound, `/dev/ublkcN` and its
/// descriptor map.
pub(crate) struct TagIo {
    char_dev: Option<Arc<File>>,
    pub(crate) char_fd: i32,
    /// Each slot's (queue, tag).
    ids: Vec<(u16, u16)>,
    /// The descriptor maps of the queues this thread serves, kept mapped
    /// while `desc_at` points into them.
    descs: Vec<Mmap>,
    /// Each slot's descriptor, once bound.
    desc_at: Vec<*const IoDesc>,
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
        let ids = (0..setup.depth)
            .map(|s| crate::layout::slot_tag(&setup.slices, s).expect("depth counts the slices' tags"))
            .collect();
        Ok(TagIo { char_dev: None, char_fd: -1, ids, descs: vec![], desc_at: vec![], bufs })
    }

    /// Maps the descriptors of the queues this thread serves from `/dev/ublkcN`.
    pub(crate) fn bind(&mut self, setup: &QueueSetup, char_dev: Arc<File>) -> Result<()> {
        let page = page_size();
        let mut qids: Vec<u16> = setup.slices.iter().map(|s| s.qid).collect();
        qids.dedup();
        for &qid in &qids {
            self.descs.push(map_descs(qid, setup.queue_depth, &char_dev, page)?);
        }
        self.desc_at = self
            .ids
            .iter()
            .map(|&(qid, tag)| {
                let map = &self.descs[qids.iter().position(|&q| q == qid).expect("mapped above")];
                // SAFETY: tag < queue depth, and the map holds that many descriptors.
                unsafe { (map.as_ptr() as *const IoDesc).add(tag as usize) }
            })
            .collect();
        self.char_fd = char_dev.as_raw_fd();
        self.char_dev = Some(char_dev);
        Ok(())
    }

    /// The kernel's (queue, tag) of `slot`.
    #[inline]
    pub(crate) fn id(&self, slot: u16) -> (u16, u16) {
        self.ids[slot as usize]
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
            Transfer::Zero => self.fixed(tag),
            Transfer::User => {
                let (qid, tag) = self.id(tag);
                Data::UserCopy { fd: self.char_fd, pos: sys::user_copy_pos(qid, tag, 0) }
            }
        }
    }

    /// Zero copy through the server's own REGISTER/UNREGISTER chain: how a
    /// request the kernel could not register (UBLK_IO_F_NEED_REG_BUF, the
    /// AUTO_BUF_REG fallback) is served, at the tag's own slot.
    pub(crate) fn fixed(&self, slot: u16) -> Data<'static> {
        let (qid, tag) = self.id(slot);
        Data::Fixed { index: slot, char_fd: self.char_fd, qid, tag }
    }

    /// The descriptor of `slot`, which must be below the thread's slots.
    #[inline]
    pub(crate) fn desc(&self, slot: u16) -> IoDesc {
        let at = self.desc_at[slot as usize];
        // SAFETY: `at` points into a map this TagIo keeps (bind); the kernel
        // writes it, so read it volatile.
        unsafe { std::ptr::read_volatile(at) }
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
        // One thread per queue: named for its queue; otherwise for its place in the layout.
        let name = match &*setup.slices {
            [s] if s.count == setup.queue_depth => format!("ublk{}q{}", setup.dev_id, s.qid),
            _ => format!("ublk{}t{}", setup.dev_id, setup.thread),
        };
        let body: Box<dyn FnOnce() -> Result<()> + Send> = match setup.emulate.clone() {
            None => Box::new(move || run_queue::<_, K::Plane<_>>(setup, backend, io)),
            Some((e, failer)) => {
                let seed = setup.dev_id as u64 * 4099 + setup.thread as u64;
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

pub(crate) fn map_descs(qid: u16, depth: u16, char_dev: &File, page: usize) -> Result<Mmap> {
    let off = sys::desc_offset(qid, page) as u64;
    // SAFETY: the kernel owns the contents; we only read them volatile, and
    // the map is read-only as the driver demands.
    unsafe { MmapOptions::new().offset(off).len(sys::desc_len(depth, page)).map(char_dev) }
        .map_err(|e| Error::io(format!("mmap descriptors of queue {qid}"), e))
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
    use std::time::Duration;

    use io_uring::{opcode, types};

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
