//! The loop both data planes run, per-tag (`per_tag`) and batch (`batch`).
//!
//! Each pass: wait (one `io_uring_enter` at most: blocking, polling, a
//! gathering wait, a wait until an emulated request is due, or a stopping
//! queue's linger), then one clock read (stats on, and only if the CQ holds
//! entries), then a pass over the CQ, then the emulated requests now due,
//! then what the plane sends once per pass, then the queue's counters go to
//! its stats slot. The loop allocates nothing and takes no lock.
//!
//! What differs between the planes is the ublk commands they speak, a
//! [`Protocol`]: which CQEs of their own commands hand requests over or end
//! the queue, how a served request is committed (a COMMIT_AND_FETCH per
//! tag, or one element of the next COMMIT_IO_CMDS array), and when a
//! stopping queue is done. What both hold is a [`Core`]: the setup, the
//! backend, the tags' descriptors and buffers, the requests held and the
//! counters. Backend CQEs are the loop's own business: their `user_data`
//! carries [`BACKEND_BIT`] in either plane.

use std::time::Duration;

use io_uring::{CompletionQueue, IoUring, Submitter, cqueue, types};

use super::{BACKEND_BIT, Cq, QueueSetup, Ring, Sq, TAG_MASK, TagIo};
use crate::backend::{KIND_MASK, QueueBackend};
use crate::clock::now_ns;
use crate::error::{Error, Result};
use crate::request::Request;
use crate::stats::QueueCounters;
use crate::sys;

const IORING_ENTER_GETEVENTS: u32 = 1;
/// How long a stopping queue waits for more aborts or late requests.
pub(crate) const LINGER: Duration = Duration::from_millis(100);
/// Idle passes of a polling queue between two publishes of its counters
/// (busy passes and passes that entered the kernel always publish).
const IDLE_PUBLISH_EVERY: u64 = 1024;

/// The ublk commands a data plane speaks, as the loop drives them. Each
/// method gets the queue's [`Core`] and this pass's SQ.
pub(crate) trait Protocol<B: QueueBackend> {
    /// The longest a blocking wait that neither gathers nor waits for a
    /// due request sleeps before the loop looks at the CQ again; None:
    /// until a CQE comes.
    const RECHECK: Option<Duration>;

    /// The queue is done: every command of its own has ended.
    fn ended(&self, core: &Core<B>) -> bool;
    /// The kernel has begun to end the queue (an ABORT came): the loop
    /// lingers (see [`LINGER`]) instead of waiting for requests.
    fn stopping(&self) -> bool;
    /// Nothing held, nothing waiting to be sent: a stopping queue that sees
    /// nothing more for [`LINGER`] may return.
    fn drained(&self, core: &Core<B>) -> bool;
    /// CQEs a blocking wait sleeps for.
    fn want(&self) -> usize {
        1
    }
    /// An enter has just submitted what was pushed.
    fn entered(&mut self) {}
    /// A CQE of the plane's own commands (not a backend's).
    fn reap(&mut self, core: &mut Core<B>, cqe: &cqueue::Entry, sq: &mut Sq<'_, B>) -> Result<()>;
    /// Hands `result` of the request of `tag` back to the kernel (called
    /// by [`Core::finish`], which has counted it).
    fn commit(&mut self, core: &mut Core<B>, tag: u16, result: i32, sq: &mut Sq<'_, B>) -> Result<()>;
    /// What the plane sends once per pass, after the CQ and what came due.
    fn end_pass(&mut self, _core: &mut Core<B>, _sq: &mut Sq<'_, B>) -> Result<()> {
        Ok(())
    }
}

/// What a queue holds in either plane, but its ring, so a pass can hold
/// the ring's submission and completion queues and still call into this.
pub(crate) struct Core<B: QueueBackend> {
    pub(crate) setup: QueueSetup,
    pub(crate) backend: B,
    pub(crate) tags: TagIo,
    arrivals: Arrivals,
    /// Requests handed to us and not yet committed.
    held: u32,
    /// Each tag's request and the pass time it arrived at (stats on).
    inflight: Vec<(Request, u64)>,
    counters: QueueCounters,
    /// The time of the current pass (stats on; else 0): the one clock read
    /// that stamps both the requests the pass hands out and those it commits.
    now: u64,
    /// Counts the plane's deliveries (a per-tag CQE, a FETCH CQE with tags).
    gather: Gather,
}

impl<B: QueueBackend> Core<B> {
    /// `ring`: the queue's, for what its kernel can do (see [`Gather::new`]).
    pub(crate) fn new(setup: QueueSetup, backend: B, tags: TagIo, ring: &Ring<B>) -> Self {
        Core {
            backend,
            tags,
            arrivals: Arrivals::new(&setup),
            held: 0,
            inflight: vec![(Request::default(), 0); setup.depth as usize],
            counters: QueueCounters::new(),
            now: 0,
            gather: Gather::new(ring, &setup),
            setup,
        }
    }

    /// Requests handed to us and not yet committed.
    pub(crate) fn held(&self) -> u32 {
        self.held
    }

    /// One delivery of requests (see [`Gather`]).
    pub(crate) fn delivered(&mut self) {
        self.gather.delivered();
    }

    /// A request arrived on `tag`: counts it and hands it to the backend;
    /// Some(result) if the backend finished it in the call.
    #[inline]
    pub(crate) fn arrive(&mut self, tag: u16, sq: &mut Sq<'_, B>) -> Option<i32> {
        self.arrivals.arrive(&self.setup, tag);
        self.held += 1;
        let req = Request::from_desc(&self.tags.desc(tag));
        if self.setup.stats_on {
            self.inflight[tag as usize] = (req, self.now);
        }
        // Only a plane that asks for AUTO_BUF_REG's fallback sees the flag.
        let data = match req.flags & sys::UBLK_IO_F_NEED_REG_BUF {
            0 => self.tags.data(&self.setup, tag),
            _ => self.tags.fixed(tag),
        };
        self.backend.submit(tag, &req, data, sq, BACKEND_BIT | tag as u64)
    }

    /// The request of `tag` is done with `result`: counts it (stats on)
    /// and has `proto` commit it.
    #[inline]
    pub(crate) fn finish<P: Protocol<B>>(
        &mut self,
        proto: &mut P,
        tag: u16,
        result: i32,
        sq: &mut Sq<'_, B>,
    ) -> Result<()> {
        self.held -= 1;
        if self.setup.stats_on {
            let (req, t0) = &self.inflight[tag as usize];
            self.counters.record(req, result, self.now.saturating_sub(*t0));
        }
        proto.commit(self, tag, result, sq)
    }

    /// Serves until `proto` says the queue has ended, or a stopping queue
    /// drained and saw nothing more for [`LINGER`]. A command that fails
    /// other than by ABORT ends it with an error.
    pub(crate) fn serve<P: Protocol<B>>(
        &mut self,
        proto: &mut P,
        sub: &Submitter<'_>,
        sq: &mut Sq<'_, B>,
        cq: &mut Cq<'_, B>,
    ) -> Result<()> {
        while !proto.ended(self) {
            sq.sync();
            // Publish the CQ head the last pass advanced: the kernel counts a
            // blocking wait from it and would return at once on old CQEs.
            cq.sync();
            let entered = if proto.stopping() {
                if !self.wait_for(proto, sub, cq, LINGER)? && proto.drained(self) {
                    break;
                }
                true
            } else {
                self.wait(proto, sub, sq)?
            };
            sq.sync();
            cq.sync();
            let busy = !CompletionQueue::is_empty(cq);
            if busy && self.setup.stats_on {
                self.now = now_ns();
            }
            for cqe in &mut *cq {
                let cqe: cqueue::Entry = cqe.into();
                let ud = cqe.user_data();
                if ud & BACKEND_BIT == 0 {
                    proto.reap(self, &cqe, sq)?;
                    continue;
                }
                let tag = (ud & TAG_MASK) as u16;
                if let Some(result) = self.backend.complete(tag, ud & KIND_MASK, cqe.result()) {
                    self.finish(proto, tag, result, sq)?;
                }
            }
            let busy = self.commit_due(proto, sq)? || busy;
            self.gather.end_pass();
            proto.end_pass(self, sq)?;
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
            self.counters.publish(stats.queue(self.setup.thread as usize));
        }
    }

    /// Commits what the backend held back (emulated service times) and is
    /// now due; true if it committed any.
    #[inline]
    fn commit_due<P: Protocol<B>>(&mut self, proto: &mut P, sq: &mut Sq<'_, B>) -> Result<bool> {
        if self.backend.next_due().is_none() {
            return Ok(false);
        }
        let now = now_ns();
        if self.setup.stats_on {
            self.now = now;
        }
        let mut any = false;
        while let Some((tag, res)) = self.backend.pop_due(now) {
            self.finish(proto, tag, res, sq)?;
            any = true;
        }
        Ok(any)
    }

    /// Blocking: one `io_uring_enter` that submits and sleeps until the
    /// earliest held request is due (emulation), or gathers after a pass
    /// with two deliveries or more ([`Gather`]), or else sleeps for
    /// [`Protocol::want`] CQEs (at most [`Protocol::RECHECK`]). Polling:
    /// enters only when there is something to submit, task work to run
    /// (IORING_SQ_TASKRUN: a new request reaches the CQ only through task
    /// work, which runs in an enter) or a CQ overflow to flush, and then
    /// returns at once (min_complete 0); otherwise the pass just looks at
    /// the CQ. True if it entered.
    ///
    /// Measured in one guest boot (7.3.4 TCG, null, fio 4k randread qd32 on
    /// CPU 0, queue on CPU 1, scheduler none): entering only when needed gave
    /// 70.8k IOPS at 1.96 enters per I/O; entering on every pass (GETEVENTS,
    /// min_complete 0) 63.5k at 28.5 enters per I/O.
    #[inline]
    fn wait<P: Protocol<B>>(&mut self, proto: &mut P, sub: &Submitter<'_>, sq: &Sq<'_, B>) -> Result<bool> {
        let res = if !self.setup.poll {
            match self.backend.next_due() {
                Some(due) => wait_until(sub, due),
                None if self.gather.armed() => self.gather.wait(sub, proto.want()),
                None => match P::RECHECK {
                    None => sub.submit_and_wait(proto.want()),
                    Some(recheck) => {
                        let ts = types::Timespec::from(recheck);
                        sub.submit_with_args(proto.want(), &types::SubmitArgs::new().timespec(&ts))
                    }
                },
            }
        } else if !sq.is_empty() || sq.taskrun() || sq.cq_overflow() {
            // SAFETY: no argument pointer is passed; the ring is ours.
            unsafe { sub.enter::<libc::sigset_t>(sq.len() as u32, 0, IORING_ENTER_GETEVENTS, None) }
        } else {
            return Ok(false);
        };
        proto.entered();
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
    fn wait_for<P: Protocol<B>>(
        &mut self,
        proto: &mut P,
        sub: &Submitter<'_>,
        cq: &mut Cq<'_, B>,
        timeout: Duration,
    ) -> Result<bool> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        proto.entered();
        self.counters.entered();
        match sub.submit_with_args(1, &args) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                cq.sync();
                Ok(!CompletionQueue::is_empty(cq))
            }
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {
                Err(Error::io(format!("io_uring_enter on queue {}", self.setup.qid), e))
            }
            _ => Ok(true),
        }
    }
}

/// Splits `ring` once for a whole run and calls `serve` with its parts;
/// then hands back what `serve` committed since its last enter.
///
/// The submission and completion queues are borrowed once for the whole
/// run; each pass syncs them with the kernel's view (a few atomic loads
/// and stores) instead of borrowing them again per entry.
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

/// What every request's arrival does in either plane: the fault hook's
/// countdown, and the time of the first request served.
struct Arrivals {
    /// Requests left before the fault hook panics (u64::MAX: never, in practice).
    panic_countdown: u64,
    served_any: bool,
}

impl Arrivals {
    fn new(setup: &QueueSetup) -> Self {
        Arrivals { panic_countdown: setup.panic_after.unwrap_or(u64::MAX), served_any: false }
    }

    /// Counts one request; panics when the fault hook says so.
    fn arrive(&mut self, setup: &QueueSetup, tag: u16) {
        if self.panic_countdown == 0 {
            panic!("{}: queue {} panics as asked, holding tag {tag}", crate::fault::FAULT_ENV, setup.qid);
        }
        self.panic_countdown -= 1;
        if !self.served_any {
            self.served_any = true;
            setup.first_served.store(now_ns(), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Submits and sleeps until a completion comes or the monotonic time
/// `due_ns` (a held request's), whichever is first; ETIME is the latter.
fn wait_until(sub: &Submitter<'_>, due_ns: u64) -> std::io::Result<usize> {
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
///
/// The batch plane counts FETCH CQEs with tags, not tags: a burst the
/// client submitted at once comes in one CQE and has nothing to gain, and
/// there the COMMITs' own CQEs would end the min_wait empty (measured:
/// 0.65x IOPS in perf-null's burst round).
struct Gather {
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
    fn new<S: io_uring::squeue::EntryMarker, C: cqueue::EntryMarker>(
        ring: &IoUring<S, C>,
        setup: &QueueSetup,
    ) -> Self {
        let usec = if ring.params().is_feature_min_timeout() { setup.gather_wait_us } else { 0 };
        Gather { usec, deliveries: 0, armed: false }
    }

    fn delivered(&mut self) {
        self.deliveries += 1;
    }

    /// Ends a pass: the next wait gathers if it took two deliveries or more.
    fn end_pass(&mut self) {
        self.armed = self.usec > 0 && self.deliveries >= 2;
        self.deliveries = 0;
    }

    /// The next wait gathers.
    fn armed(&self) -> bool {
        self.armed
    }

    /// Submits and waits for `want + 1` CQEs, or `want` once the min_wait
    /// has passed, or the first past that (see above).
    fn wait(&self, sub: &Submitter<'_>, want: usize) -> std::io::Result<usize> {
        let ts = types::Timespec::from(GATHER_TIMEOUT);
        sub.submit_with_args(want + 1, &types::SubmitArgs::new().timespec(&ts).min_wait_usec(self.usec))
    }
}
