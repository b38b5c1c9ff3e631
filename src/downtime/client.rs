//! The downtime run's load generator: one thread and one io_uring per job,
//! O_DIRECT reads and writes of `bs` bytes at random aligned offsets on
//! `/dev/ublkbN`, `iodepth` in flight, closed loop.
//!
//! Everything a job needs is allocated before its first submission: the
//! aligned buffers (one per slot), the submit times, the per-millisecond
//! buckets and the [`Tracker`]. The I/O path only reads the clock, updates
//! those and pushes SQEs.
//!
//! What is recorded, and why that is enough. Not a log of every I/O: that
//! grows with the IOPS (16 bytes × 300k IOPS × a minute is 300 MB on a fast
//! machine). Instead:
//! - per millisecond since the run's start, the successful and failed
//!   completions (the IOPS curve, the CSV and the plot): 8 bytes per ms,
//!   whatever the IOPS;
//! - per cycle, through [`Tracker`], the few longest stalls since the kill
//!   (each with the I/Os that waited through it), the I/Os in flight across
//!   the kill and the errors: everything the gap needs, in O(1) per cycle.
//!   The exact gap is picked after the run, with the server's phase events.
//!
//! The run publishes each kill's time in [`Shared`] just before sending
//! SIGKILL, so the jobs attribute each completion as it arrives. Each job
//! publishes its kept stalls of the current cycle and its totals, so the
//! run can print progress without stopping the jobs.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use super::gap::{CANDIDATES, CycleTrack, Marks, Stall, Tracker};
use crate::clock::now_ns;
use crate::error::{Error, Result};

/// How long a stopping job waits for its last I/Os.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long io_uring_enter may sleep before the job looks at the stop flag.
const WAKE_EVERY: Duration = Duration::from_millis(50);

/// State shared by the run and its jobs.
#[derive(Debug)]
pub struct Shared {
    pub stop: AtomicBool,
    count: AtomicUsize,
    kills: Box<[AtomicU64]>,
    lives: Box<[AtomicU64]>,
    /// Per job: totals and the current cycle's stall, for progress lines.
    pub jobs: Box<[JobProgress]>,
}

/// What a job publishes while it runs, for progress lines only: the final
/// figures come from the job's [`Tracker`].
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct JobProgress {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// The candidate stalls below are those of cycle `cycle - 1` (0: none yet).
    pub cycle: AtomicUsize,
    pub starts: [AtomicU64; CANDIDATES],
    /// 0: free slot.
    pub ends: [AtomicU64; CANDIDATES],
}

impl JobProgress {
    /// Publishes kept stall `slot` of cycle `i`.
    fn publish(&self, i: usize, slot: usize, s: &Stall) {
        if self.cycle.load(Ordering::Relaxed) != i + 1 {
            self.ends.iter().for_each(|e| e.store(0, Ordering::Relaxed));
        }
        self.starts[slot].store(s.start, Ordering::Relaxed);
        self.ends[slot].store(s.end, Ordering::Relaxed);
        self.cycle.store(i + 1, Ordering::Release);
    }

    /// The published stalls of cycle `i` (empty if the job is not there yet).
    fn track(&self, i: usize) -> CycleTrack {
        let mut c = CycleTrack::default();
        if self.cycle.load(Ordering::Acquire) == i + 1 {
            for (k, slot) in c.stalls.iter_mut().enumerate() {
                let end = self.ends[k].load(Ordering::Relaxed);
                let start = self.starts[k].load(Ordering::Relaxed).min(end);
                *slot = (end != 0).then_some(Stall { start, end, across: 0, max_lat_ns: 0 });
            }
        }
        c
    }
}

impl Shared {
    pub fn new(cycles: usize, jobs: usize) -> Self {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        Shared {
            stop: AtomicBool::new(false),
            count: AtomicUsize::new(0),
            kills: zeros(cycles),
            lives: zeros(cycles),
            jobs: (0..jobs).map(|_| JobProgress::default()).collect(),
        }
    }

    /// Publishes kill `i` (the next one) at `t_ns`.
    pub fn publish_kill(&self, i: usize, t_ns: u64) {
        self.kills[i].store(t_ns, Ordering::Relaxed);
        self.count.store(i + 1, Ordering::Release);
    }

    pub fn publish_live(&self, i: usize, t_ns: u64) {
        self.lives[i].store(t_ns, Ordering::Release);
    }

    /// The gap of cycle `i` so far, merged over the jobs (see
    /// [`super::gap::merge`]), if every job has had a success since the kill.
    pub fn stall_of(&self, i: usize, anchor: Option<u64>) -> Option<(u64, u64)> {
        let tracks: Vec<CycleTrack> = self.jobs.iter().map(|j| j.track(i)).collect();
        super::gap::merge(&tracks, anchor).stall
    }

    pub fn totals(&self) -> (u64, u64) {
        self.jobs.iter().fold((0, 0), |(o, e), j| {
            (o + j.ok.load(Ordering::Relaxed), e + j.errors.load(Ordering::Relaxed))
        })
    }
}

impl Marks for Shared {
    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
    fn kill_ns(&self, i: usize) -> u64 {
        self.kills[i].load(Ordering::Relaxed)
    }
    fn live_ns(&self, i: usize) -> u64 {
        self.lives[i].load(Ordering::Acquire)
    }
}

/// One job's settings.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub index: usize,
    pub path: PathBuf,
    pub bs: u64,
    pub iodepth: u32,
    /// Percentage of reads.
    pub rwmix: u32,
    /// The run's time zero (monotonic ns): bucket 0 starts here.
    pub t0: u64,
    /// Per-millisecond buckets to keep.
    pub max_ms: usize,
    pub cycles: usize,
}

/// What a job hands back.
#[derive(Debug)]
pub struct JobResult {
    pub tracker: Tracker,
    /// Successful / failed completions per millisecond since t0.
    pub ok_ms: Vec<u32>,
    pub err_ms: Vec<u32>,
    /// Completions later than the last bucket.
    pub late: u64,
    /// I/Os still in flight when the job gave up draining.
    pub undrained: u32,
}

impl JobResult {
    pub fn cycle(&self, i: usize) -> &CycleTrack {
        &self.tracker.cycles[i]
    }
}

pub fn spawn(cfg: JobConfig, shared: Arc<Shared>) -> Result<JoinHandle<Result<JobResult>>> {
    std::thread::Builder::new()
        .name(format!("dt-job{}", cfg.index))
        .spawn(move || run_job(&cfg, &shared))
        .map_err(|e| Error::io("start a client thread", e))
}

/// The size of the block device behind `path`.
pub fn device_size(path: &std::path::Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| Error::io(format!("size of {}", path.display()), e))
}

/// xorshift64*: cheap, good enough for offsets and the read/write draw.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in [0, n) for n far below 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// One zeroed allocation of `slots * bs` bytes, 4 KiB aligned.
struct Buffers {
    ptr: *mut u8,
    layout: Layout,
    bs: usize,
}

impl Buffers {
    fn new(slots: usize, bs: usize) -> Result<Self> {
        let layout =
            Layout::from_size_align(slots * bs, 4096).map_err(|_| Error::invalid("buffer size overflows"))?;
        // SAFETY: the layout has a non-zero size (slots and bs are >= 1).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::Refused(format!("cannot allocate {} bytes of client buffers", slots * bs)));
        }
        Ok(Buffers { ptr, layout, bs })
    }

    fn slot(&self, i: usize) -> *mut u8 {
        // SAFETY: callers pass i < slots, so the offset stays inside the allocation.
        unsafe { self.ptr.add(i * self.bs) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        #[cfg(test)]
        FREED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: ptr came from alloc_zeroed with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Buffers freed (tests: [`InFlight`] must not free while I/Os are out).
#[cfg(test)]
static FREED: AtomicUsize = AtomicUsize::new(0);

/// A job's buffers and how many of its I/Os may still write into them.
/// Closing a ring does not wait for its reads: the kernel completes them
/// into these buffers later. So on every way out of a job, the normal end
/// or an error with I/Os in flight, the buffers are freed only if none is
/// out, and otherwise left allocated (once, at the end of a run).
struct InFlight {
    bufs: Option<Buffers>,
    count: usize,
}

impl InFlight {
    fn slot(&self, i: usize) -> *mut u8 {
        self.bufs.as_ref().expect("held until drop").slot(i)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.count > 0 {
            std::mem::forget(self.bufs.take());
        }
    }
}

fn open_device(path: &std::path::Path, write: bool) -> Result<File> {
    // The node appears shortly after START_DEV; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::io(format!("open {} with O_DIRECT", path.display()), e)),
        }
    }
}

/// Draws the next I/O of a job.
struct IoGen {
    fd: types::Fd,
    blocks: u64,
    bs: u64,
    rwmix: u32,
    rng: XorShift,
}

impl IoGen {
    fn prep(&mut self, slot: usize, buf: *mut u8) -> io_uring::squeue::Entry {
        let offset = self.rng.below(self.blocks) * self.bs;
        let len = self.bs as u32;
        let sqe = if (self.rng.below(100) as u32) < self.rwmix {
            opcode::Read::new(self.fd, buf, len).offset(offset).build()
        } else {
            opcode::Write::new(self.fd, buf, len).offset(offset).build()
        };
        sqe.user_data(slot as u64)
    }
}

/// A different, reproducible stream per job.
fn seed(job: usize) -> u64 {
    0x9e37_79b9_7f4a_7c15 ^ (job as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn run_job(cfg: &JobConfig, shared: &Shared) -> Result<JobResult> {
    let depth = cfg.iodepth as usize;
    let bs = cfg.bs as usize;
    let file = open_device(&cfg.path, cfg.rwmix < 100)?;
    let size = device_size(&cfg.path)?;
    let blocks = size / cfg.bs;
    if blocks == 0 {
        return Err(Error::invalid(format!(
            "{} is smaller than one block of {bs} bytes",
            cfg.path.display()
        )));
    }
    // Declared before the ring, so that on every return the ring goes first
    // and the buffers then only if no I/O is out ([`InFlight`]).
    let mut bufs = InFlight { bufs: Some(Buffers::new(depth, bs)?), count: 0 };
    let mut ring =
        IoUring::new(depth.next_power_of_two() as u32).map_err(|e| Error::io("io_uring_setup", e))?;
    let mut submit_ns = vec![0u64; depth];
    let mut tracker = Tracker::new(now_ns(), cfg.cycles);
    let mut ok_ms = vec![0u32; cfg.max_ms];
    let mut err_ms = vec![0u32; cfg.max_ms];
    let mut late = 0u64;
    let fd = types::Fd(file.as_raw_fd());
    let progress = &shared.jobs[cfg.index];
    let wake = types::Timespec::from(WAKE_EVERY);
    let args = types::SubmitArgs::new().timespec(&wake);

    let mut io = IoGen { fd, blocks, bs: cfg.bs, rwmix: cfg.rwmix, rng: XorShift::new(seed(cfg.index)) };
    let (submitter, mut sq, mut cq) = ring.split();
    for (slot, t) in submit_ns.iter_mut().enumerate() {
        let sqe = io.prep(slot, bufs.slot(slot));
        *t = now_ns();
        // SAFETY: the buffer of `slot` stays allocated and untouched until its
        // CQE is reaped (or forever, if the job gives up draining), and the
        // fd outlives the ring's use of it.
        unsafe { sq.push(&sqe) }.map_err(|_| Error::RingFull("io_uring submission queue full".into()))?;
        bufs.count += 1;
    }
    sq.sync();
    let mut drain_deadline = None;
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if stopping {
            if bufs.count == 0 {
                break;
            }
            let d = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
            if Instant::now() >= d {
                break;
            }
        }
        match submitter.submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(Error::io("io_uring_enter", e)),
        }
        // Learn how far the kernel consumed the SQ (else `push` sees it
        // full), and see the new completions.
        sq.sync();
        cq.sync();
        let (mut oks, mut errs) = (0u64, 0u64);
        for cqe in &mut cq {
            let done = now_ns();
            let slot = cqe.user_data() as usize;
            let res = cqe.result();
            let ok = res >= 0 && res as usize == bs;
            let changed = tracker.complete(shared, submit_ns[slot], done, ok);
            if let Some((i, slot)) = changed.stall
                && let Some(s) = &tracker.cycles[i].stalls[slot]
            {
                progress.publish(i, slot, s);
            }
            let ms = (done.saturating_sub(cfg.t0) / 1_000_000) as usize;
            let bucket = if ok { ok_ms.get_mut(ms) } else { err_ms.get_mut(ms) };
            match bucket {
                Some(b) => *b += 1,
                None => late += 1,
            }
            if ok {
                oks += 1;
            } else {
                errs += 1;
            }
            if stopping {
                bufs.count -= 1;
            } else {
                let sqe = io.prep(slot, bufs.slot(slot));
                submit_ns[slot] = now_ns();
                // SAFETY: as above; this slot's previous I/O has just completed.
                while unsafe { sq.push(&sqe) }.is_err() {
                    // Cannot happen with one SQ entry per slot, but never
                    // lose a slot: hand the queued entries over and retry.
                    sq.sync();
                    submitter.submit().map_err(|e| Error::io("io_uring_enter", e))?;
                    sq.sync();
                }
            }
        }
        // Release the reaped CQEs before waiting again, and publish the new SQEs.
        cq.sync();
        sq.sync();
        progress.ok.fetch_add(oks, Ordering::Relaxed);
        progress.errors.fetch_add(errs, Ordering::Relaxed);
    }
    Ok(JobResult { tracker, ok_ms, err_ms, late, undrained: bufs.count as u32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that never completes (an empty pipe) is in flight when the
    /// job's ring goes, as on an error return: its buffer must outlive the
    /// ring, never be freed under it. With nothing in flight it is freed.
    #[test]
    fn buffers_of_reads_in_flight_are_never_freed() {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let before = FREED.load(Ordering::Relaxed);
        {
            let mut bufs = InFlight { bufs: Some(Buffers::new(1, 4096).unwrap()), count: 0 };
            let mut ring = IoUring::new(2).unwrap();
            let sqe = opcode::Read::new(types::Fd(fds[0]), bufs.slot(0), 4096).build();
            // SAFETY: the buffer is held by `bufs`, which this test checks.
            unsafe { ring.submission().push(&sqe) }.unwrap();
            ring.submit().unwrap();
            bufs.count += 1;
            drop(ring);
        }
        assert_eq!(FREED.load(Ordering::Relaxed), before, "a buffer with a read in flight was freed");
        drop(InFlight { bufs: Some(Buffers::new(1, 4096).unwrap()), count: 0 });
        assert_eq!(FREED.load(Ordering::Relaxed), before + 1, "an idle buffer was not freed");
        // SAFETY: our own pipe's descriptors.
        unsafe { libc::close(fds[0]) };
        // SAFETY: as above.
        unsafe { libc::close(fds[1]) };
    }

    #[test]
    fn xorshift_stays_in_range_and_spreads() {
        let mut r = XorShift::new(42);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn shared_marks_and_merged_stall() {
        let s = Shared::new(2, 2);
        assert_eq!(s.count(), 0);
        s.publish_kill(0, 100);
        assert_eq!((s.count(), s.kill_ns(0), s.live_ns(0)), (1, 100, 0));
        s.publish_live(0, 150);
        assert_eq!(s.live_ns(0), 150);
        assert_eq!(s.stall_of(0, None), None);
        let st = |start, end| Stall { start, end, across: 0, max_lat_ns: 0 };
        s.jobs[0].publish(0, 0, &st(90, 170));
        s.jobs[0].publish(0, 1, &st(171, 172));
        assert_eq!(s.jobs[0].track(0).pick(None).map(|s| (s.start, s.end)), Some((90, 170)));
        // Job 1 has had no success since the kill yet.
        assert_eq!(s.stall_of(0, None), None);
        s.jobs[1].publish(0, 0, &st(95, 160));
        assert_eq!(s.stall_of(0, None), Some((95, 160)));
        // Job 0 holds the anchor in (171, 172], job 1 falls back to its
        // longest: they never stalled together.
        assert_eq!(s.stall_of(0, Some(172)), Some((160, 160)));
        assert_eq!(s.stall_of(1, None), None);
        // A new cycle starts from free slots.
        s.jobs[0].publish(1, 3, &st(300, 400));
        assert_eq!(s.jobs[0].track(1).stalls.iter().flatten().count(), 1);
    }
}
