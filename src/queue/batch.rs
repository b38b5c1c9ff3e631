//! Batch data plane (UBLK_F_BATCH_IO, Linux 7.0): one thread per hardware
//! queue, as in `queue`, driving the same [`QueueBackend`] per request.
//!
//! Commands (ublk-abi.md §2.4; `drivers/block/ublk_drv.c` is the authority):
//! - PREP_IO_CMDS hands every tag to the driver in one array, once, before
//!   START_DEV or END_USER_RECOVERY (which wait until every tag is ready).
//! - FETCH_IO_CMDS is multishot with a provided-buffer group: each CQE
//!   fills one buffer of the queue's buffer ring with the u16 tags of up to
//!   128 requests. Two are armed per queue: the kernel lets only one deliver
//!   at a time, and a cancel skips the one delivering, so the other's ABORT
//!   is what tells a stopping queue to stop.
//! - COMMIT_IO_CMDS commits the requests served in one pass over the CQ as
//!   one array. It returns the bytes it consumed; a partial commit is sent
//!   again from the element that stopped it, whose own error then shows.
//!
//! Buffers: the fetch ring has a power of two of entries, at least the
//! queue depth, so it never runs dry (each CQE takes one buffer and carries
//! at least one tag, and at most `depth` tags are ours at once); each buffer
//! is recycled as soon as its tags are copied out. A FETCH that ends all the
//! same (no `IORING_CQE_F_MORE`: -ENOBUFS when the ring was empty or its CQE
//! could not be posted) must be armed again, and is: the driver
//! (`ublk_batch_dispatch` -> `ublk_batch_deinit_fetch_buf`) puts the tags it
//! could not deliver back in its queue and clears the active FETCH without
//! handing them to the other armed one, so they wait for the next FETCH to
//! attach (`ublk_batch_attach`) or the next request to arrive; under a
//! steady load with every tag queued neither comes on its own. The fault
//! hook `fetch-bufs:N` forces that path (tests/batch.rs). Commit arrays
//! live in [`COMMIT_BUFS`] buffers of `depth` elements, each busy from its
//! COMMIT until that command's CQE; if none is free at the end of a pass the
//! array being filled waits for the next pass (it cannot overflow: a tag is
//! in it at most once).
//!
//! Elements are 8 bytes (tag, buffer slot, result) and 16 in copy mode
//! (plus the tag's buffer address, which the kernel needs on every commit).
//! With AUTO_BUF_REG each element names slot = tag for the tag's next
//! request, as the per-tag loop does, and every array asks for the
//! fallback: a request whose pages the kernel could not register comes
//! with UBLK_IO_F_NEED_REG_BUF and is served through a REGISTER/UNREGISTER
//! chain (REGISTER_IO_BUF is one of the per-tag commands a batch device
//! still takes).
//!
//! Stopping: a FETCH that ends with ABORT (device stopped, quiesced, or its
//! server being replaced) puts the queue in stopping mode; it commits what
//! it holds and returns once both FETCHes have ended, or once it holds
//! nothing and nothing has come for [`LINGER`](super::run_loop::LINGER).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::squeue::{self, EntryMarker as _};
use io_uring::{IoUring, cqueue, opcode, types};
use memmap2::MmapMut;

use super::run_loop::{Core, Protocol, run_split};
use super::{
    BACKEND_BIT, DataPlane, PlaneKind, QueueSetup, Ring, Sq, TAG_MASK, TagIo, build_ring, page_size, pin,
    ring_entries,
};
use crate::backend::{KIND_MASK, QueueBackend};
use crate::error::{Error, Result};
use crate::plan::Transfer;
use crate::sys::{self, BatchElem, BatchIo};

/// Multishot FETCH_IO_CMDS armed per queue (see the module doc).
const FETCHES: u16 = 2;
/// Commit arrays per queue.
const COMMIT_BUFS: usize = 4;
/// The longest a blocking wait sleeps before the loop looks at the CQ again.
const RECHECK: Duration = Duration::from_secs(1);
/// Tags one FETCH CQE carries at most (the driver's MAX_NR_TAG).
const MAX_TAGS: usize = 128;
/// The queue's provided-buffer group (each queue has its own ring).
const BGID: u16 = 0;

/// `user_data` of the queue's own commands: kind here, index in bits 0-15.
/// Backend commands carry [`BACKEND_BIT`] instead.
const KIND_SHIFT: u32 = 32;
const FETCH: u64 = 1;
const COMMIT: u64 = 2;
const PREP: u64 = 3;
const _: () = assert!((0xff << KIND_SHIFT) & (BACKEND_BIT | KIND_MASK | TAG_MASK) == 0);

/// io_uring ABI (`include/uapi/linux/io_uring.h`) the crate has no setter
/// for on a URING_CMD: `sqe->uring_cmd_flags` and `sqe->buf_group`.
const SQE_URING_CMD_FLAGS: usize = 28;
const SQE_BUF_GROUP: usize = 40;
const IORING_URING_CMD_MULTISHOT: u32 = 1 << 1;
const _: () = assert!(size_of::<squeue::Entry>() == 64);

/// The batch data plane, for [`crate::queue::spawn_queue`].
pub struct Batch;

impl PlaneKind for Batch {
    type Plane<B: QueueBackend> = BatchQueue<B>;
}

pub struct BatchQueue<B: QueueBackend> {
    // Declared first so it drops first: closing the ring cancels every
    // command before the buffers it points at go.
    ring: Ring<B>,
    core: Core<B>,
    cmds: BatchCommands,
}

/// The batch protocol's own state: the fetch buffers, the commit arrays
/// and the commands in flight.
struct BatchCommands {
    fetch: FetchRing,
    commits: Commits,
    /// COMMITs pushed since the last enter: each completes at once, so a
    /// blocking enter waits for that many CQEs plus one.
    commits_unsent: u32,
    /// Multishot FETCHes armed and not yet ended.
    fetches_live: u16,
    stopping: bool,
}

impl<B: QueueBackend> DataPlane<B> for BatchQueue<B> {
    /// Pins the thread, builds the ring and registers its fetch buffers.
    fn new(setup: QueueSetup, backend: B) -> Result<Self> {
        if let Some(cpu) = setup.cpu {
            pin(cpu)?;
        }
        // The SQ holds the backend's commands, a few COMMITs and FETCH
        // re-arms; the CQ also FETCH CQEs (at most one per tag we hold).
        let entries = ring_entries(setup.depth + 8, B::MAX_COMMANDS);
        let ring = build_ring::<B>(entries, entries * 2, setup.qid, setup.copy)?;
        if setup.copy == Transfer::Zero {
            ring.submitter()
                .register_buffers_sparse(setup.depth as u32)
                .map_err(|e| Error::io("register the sparse buffer table for zero copy", e))?;
        }
        let bufs = crate::fault::fetch_bufs().unwrap_or(setup.depth.next_power_of_two());
        let cmds = BatchCommands {
            fetch: FetchRing::new(&ring, setup.depth, bufs)?,
            commits: Commits::new(setup.depth as usize, setup.copy == Transfer::Copy, setup.auto_buf_reg),
            commits_unsent: 0,
            fetches_live: 0,
            stopping: false,
        };
        let tags = TagIo::new(&setup)?;
        let core = Core::new(setup, backend, tags, &ring);
        Ok(BatchQueue { ring, core, cmds })
    }

    fn bind(&mut self, char_dev: Arc<File>) -> Result<()> {
        let c = &mut self.core;
        c.tags.bind(&c.setup, char_dev)
    }

    /// PREP_IO_CMDS with every tag, waited for (it completes at once), then
    /// the FETCHes.
    fn fetch_all(&mut self) -> Result<()> {
        let BatchQueue { ring, core, cmds } = self;
        let qid = core.setup.qid;
        let slot = cmds.commits.filling;
        for tag in 0..core.setup.depth {
            let elem = elem(core, tag, 0);
            cmds.commits.push(elem, core.tags.buf_addr(&core.setup, tag));
        }
        let sqe = cmds.batch_cmd::<B>(core, sys::UBLK_U_IO_PREP_IO_CMDS, PREP, slot);
        push::<B>(&mut ring.submission(), &sqe, qid)?;
        ring.submit_and_wait(1).map_err(|e| Error::io(format!("submit PREP_IO_CMDS on queue {qid}"), e))?;
        let cqe: cqueue::Entry = ring.completion().next().expect("waited for it").into();
        cmds.commits.bufs[slot].clear();
        match cqe.result() {
            0 => {}
            // The device is being stopped: nothing to serve, `run` returns at once.
            sys::UBLK_IO_RES_ABORT => {
                cmds.stopping = true;
                return Ok(());
            }
            err => return Err(cmd_error("PREP_IO_CMDS", qid, err)),
        }
        for i in 0..FETCHES {
            cmds.arm_fetch(core, i, &mut ring.submission())?;
        }
        ring.submit().map_err(|e| Error::io(format!("submit FETCH_IO_CMDS on queue {qid}"), e))?;
        Ok(())
    }

    /// Serves until stopped (see the module doc); a command that fails
    /// other than by ABORT ends it with an error.
    fn run(mut self) -> Result<()> {
        let BatchQueue { ring, core, cmds } = &mut self;
        run_split::<B>(ring, |sub, sq, cq| core.serve(cmds, sub, sq, cq))
    }
}

impl<B: QueueBackend> Protocol<B> for BatchCommands {
    /// Bounded, so that a CQE the wait's count did not foresee (or one the
    /// kernel posted without waking us) is reaped within RECHECK rather
    /// than never; an idle queue wakes once per RECHECK.
    const RECHECK: Option<Duration> = Some(RECHECK);

    fn ended(&self, core: &Core<B>) -> bool {
        self.stopping && self.drained(core) && self.fetches_live == 0
    }

    fn stopping(&self) -> bool {
        self.stopping
    }

    fn drained(&self, core: &Core<B>) -> bool {
        core.held() == 0 && self.commits.idle()
    }

    /// The COMMITs submitted by the wait complete at once: it waits for a
    /// CQE beyond theirs.
    fn want(&self) -> usize {
        1 + self.commits_unsent as usize
    }

    fn entered(&mut self) {
        self.commits_unsent = 0;
    }

    #[inline]
    fn reap(&mut self, core: &mut Core<B>, cqe: &cqueue::Entry, sq: &mut Sq<'_, B>) -> Result<()> {
        let ud = cqe.user_data();
        let index = (ud & TAG_MASK) as u16;
        match ud >> KIND_SHIFT {
            FETCH => self.fetched(core, index, cqe, sq),
            COMMIT => self.committed(core, index as usize, cqe.result(), sq),
            kind => Err(Error::Queue(format!("queue {}: CQE of unknown kind {kind}", core.setup.qid))),
        }
    }

    /// Adds the request's result to the array the next COMMIT sends.
    #[inline]
    fn commit(&mut self, core: &mut Core<B>, tag: u16, result: i32, _sq: &mut Sq<'_, B>) -> Result<()> {
        self.commits.push(elem(core, tag, result), core.tags.buf_addr(&core.setup, tag));
        Ok(())
    }

    /// Gives the kernel the fetch buffers taken this pass and sends the
    /// array filled this pass, if a free one can take its place.
    #[inline]
    fn end_pass(&mut self, core: &mut Core<B>, sq: &mut Sq<'_, B>) -> Result<()> {
        self.fetch.publish();
        if let Some(slot) = self.commits.send() {
            let sqe = self.batch_cmd::<B>(core, sys::UBLK_U_IO_COMMIT_IO_CMDS, COMMIT, slot);
            self.commits_unsent += 1;
            push::<B>(sq, &sqe, core.setup.qid)?;
        }
        Ok(())
    }
}

impl BatchCommands {
    /// A FETCH CQE: serve its tags; arm it again if it ended short of ABORT.
    fn fetched<B: QueueBackend>(
        &mut self,
        core: &mut Core<B>,
        index: u16,
        cqe: &cqueue::Entry,
        sq: &mut Sq<'_, B>,
    ) -> Result<()> {
        let mut tags = [0u16; MAX_TAGS];
        let mut n = 0;
        if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
            n = self.fetch.take(bid, cqe.result().max(0) as usize, &mut tags);
        }
        if n > 0 {
            core.delivered();
        }
        for &tag in &tags[..n] {
            if tag >= core.setup.depth {
                return Err(Error::Queue(format!("queue {}: FETCH delivered tag {tag}", core.setup.qid)));
            }
            if let Some(result) = core.arrive(tag, sq) {
                core.finish(self, tag, result, sq)?;
            }
        }
        if cqueue::more(cqe.flags()) {
            return Ok(());
        }
        self.fetches_live -= 1;
        match cqe.result() {
            // ABORT: cancelled (stop, quiesce, takeover). -ENODEV: a FETCH
            // armed again just as the queue began to cancel, refused by
            // ublk_batch_attach; the ABORT of the other follows.
            sys::UBLK_IO_RES_ABORT => self.stopping = true,
            r if r == -libc::ENODEV => self.stopping = true,
            r if (r >= 0 || r == -libc::ENOBUFS) && !self.stopping => self.arm_fetch(core, index, sq)?,
            r if r >= 0 || r == -libc::ENOBUFS => {}
            err => return Err(cmd_error("FETCH_IO_CMDS", core.setup.qid, err)),
        }
        Ok(())
    }

    /// A COMMIT CQE: its array is free again, or what it did not consume is sent again.
    fn committed<B: QueueBackend>(
        &mut self,
        core: &Core<B>,
        slot: usize,
        res: i32,
        sq: &mut Sq<'_, B>,
    ) -> Result<()> {
        let qid = core.setup.qid;
        match self.commits.done(slot, res) {
            Done::All => Ok(()),
            Done::Partial => {
                let sqe = self.batch_cmd::<B>(core, sys::UBLK_U_IO_COMMIT_IO_CMDS, COMMIT, slot);
                self.commits_unsent += 1;
                push::<B>(sq, &sqe, qid)
            }
            Done::Failed(tag) => Err(Error::Queue(format!(
                "COMMIT_IO_CMDS on queue {qid} failed at tag {tag} (not an abort): {}",
                std::io::Error::from_raw_os_error(-res)
            ))),
        }
    }

    /// PREP or COMMIT of what commit array `slot` has not had consumed yet.
    fn batch_cmd<B: QueueBackend>(&self, core: &Core<B>, op: u32, kind: u64, slot: usize) -> B::Sqe {
        let (addr, nr_elem) = self.commits.pending(slot);
        let cmd = BatchIo {
            q_id: core.setup.qid,
            flags: self.commits.flags,
            nr_elem,
            elem_bytes: self.commits.elem_bytes(),
            ..Default::default()
        };
        let sqe = opcode::UringCmd16::new(types::Fd(core.tags.char_fd), op)
            .cmd(cmd.bytes())
            .addr(Some(addr))
            .build();
        let mut sqe = B::Sqe::from(sqe);
        sqe.set_user_data(kind << KIND_SHIFT | slot as u64);
        sqe
    }

    /// Arms multishot FETCH number `index` on the queue's buffer group.
    fn arm_fetch<B: QueueBackend>(&mut self, core: &Core<B>, index: u16, sq: &mut Sq<'_, B>) -> Result<()> {
        let cmd = BatchIo {
            q_id: core.setup.qid,
            nr_elem: self.fetch.tags_per_buf(),
            elem_bytes: 2,
            ..Default::default()
        };
        let sqe = opcode::UringCmd16::new(types::Fd(core.tags.char_fd), sys::UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(cmd.bytes())
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        let mut sqe = B::Sqe::from(multishot(sqe, BGID));
        sqe.set_user_data(FETCH << KIND_SHIFT | index as u64);
        push::<B>(sq, &sqe, core.setup.qid)?;
        self.fetches_live += 1;
        Ok(())
    }
}

/// The element that commits `result` for `tag` (and, with AUTO_BUF_REG,
/// names slot = tag for its next request; the fault hook names a slot past
/// the table, so every request falls back).
fn elem<B: QueueBackend>(core: &Core<B>, tag: u16, result: i32) -> BatchElem {
    let buf_index = match (core.setup.auto_buf_reg, core.setup.unreg_auto_buf) {
        (false, _) => 0,
        (true, false) => tag,
        (true, true) => core.setup.depth + tag,
    };
    BatchElem { tag, buf_index, result }
}

fn push<B: QueueBackend>(sq: &mut Sq<'_, B>, sqe: &B::Sqe, qid: u16) -> Result<()> {
    // SAFETY: every command points at memory this queue owns (commit
    // arrays, fetch buffers, per-tag buffers) or at nothing, and the ring
    // drops before that memory (field order of BatchQueue).
    unsafe { sq.push(sqe) }
        .map_err(|_| Error::RingFull(format!("submission queue of queue {qid} overflowed")))
}

/// A command of the queue's own that failed other than by ABORT: the
/// kernel broke the protocol or the device is broken.
fn cmd_error(what: &str, qid: u16, res: i32) -> Error {
    Error::Queue(format!(
        "{what} on queue {qid} failed (not an abort): {}",
        std::io::Error::from_raw_os_error(-res)
    ))
}

/// `sqe` made multishot with buffer select from group `bgid`: the two
/// URING_CMD fields the crate has no setter for, written at their ABI offsets.
fn multishot(sqe: squeue::Entry, bgid: u16) -> squeue::Entry {
    // SAFETY: squeue::Entry is repr(C) around the 64-byte io_uring_sqe (size
    // asserted above), plain integers throughout, so any bytes are valid.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    let flags = u32::from_ne_bytes(raw[SQE_URING_CMD_FLAGS..SQE_URING_CMD_FLAGS + 4].try_into().unwrap());
    raw[SQE_URING_CMD_FLAGS..SQE_URING_CMD_FLAGS + 4]
        .copy_from_slice(&(flags | IORING_URING_CMD_MULTISHOT).to_ne_bytes());
    raw[SQE_BUF_GROUP..SQE_BUF_GROUP + 2].copy_from_slice(&bgid.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

// ---------------------------------------------------------------- fetch buffers

/// The queue's provided-buffer ring (`IORING_REGISTER_PBUF_RING`) and the
/// buffers it hands out, one per FETCH CQE.
struct FetchRing {
    /// `io_uring_buf` entries (16 bytes: addr, len, bid, and in entry 0 the tail).
    ring: MmapMut,
    bufs: MmapMut,
    entries: u16,
    buf_len: usize,
    /// The tail as we have advanced it; the kernel sees it at `publish`.
    tail: u16,
}

/// Offsets in `struct io_uring_buf`.
const BUF_ADDR: usize = 0;
const BUF_LEN: usize = 8;
const BUF_BID: usize = 12;
const BUF_TAIL: usize = 14;
const BUF_ENTRY: usize = 16;

impl FetchRing {
    /// `entries` buffers (a power of two) of `depth` tags, at most MAX_TAGS.
    fn new<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        ring: &IoUring<S, C>,
        depth: u16,
        entries: u16,
    ) -> Result<Self> {
        let buf_len = 2 * (depth as usize).min(MAX_TAGS);
        let map = |len: usize| MmapMut::map_anon(len).map_err(|e| Error::io("allocate fetch buffers", e));
        let mut me = FetchRing {
            ring: map((entries as usize * BUF_ENTRY).next_multiple_of(page_size()))?,
            bufs: map(entries as usize * buf_len)?,
            entries,
            buf_len,
            tail: 0,
        };
        for bid in 0..entries {
            me.give(bid);
        }
        me.publish();
        // SAFETY: the ring map is page-aligned, holds `entries` entries and
        // lives as long as the ring (the queue drops its ring first).
        unsafe { ring.submitter().register_buf_ring_with_flags(me.ring.as_ptr() as u64, entries, BGID, 0) }
            .map_err(|e| Error::io("register the FETCH buffer ring (IORING_REGISTER_PBUF_RING)", e))?;
        Ok(me)
    }

    fn tags_per_buf(&self) -> u16 {
        (self.buf_len / 2) as u16
    }

    /// Copies the tags of buffer `bid` (`len` bytes) into `out` and gives
    /// the buffer back; returns how many.
    fn take(&mut self, bid: u16, len: usize, out: &mut [u16; MAX_TAGS]) -> usize {
        let bid = bid % self.entries;
        let start = bid as usize * self.buf_len;
        let bytes = &self.bufs[start..start + len.min(self.buf_len)];
        let mut n = 0;
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *slot = u16::from_ne_bytes([pair[0], pair[1]]);
            n += 1;
        }
        self.give(bid);
        n
    }

    /// Puts buffer `bid` at the tail (seen by the kernel at `publish`).
    fn give(&mut self, bid: u16) {
        let e = (self.tail & (self.entries - 1)) as usize * BUF_ENTRY;
        let addr = self.bufs.as_ptr() as u64 + bid as u64 * self.buf_len as u64;
        // Field by field: entry 0's last two bytes are the ring's tail.
        self.ring[e + BUF_ADDR..e + BUF_ADDR + 8].copy_from_slice(&addr.to_ne_bytes());
        self.ring[e + BUF_LEN..e + BUF_LEN + 4].copy_from_slice(&(self.buf_len as u32).to_ne_bytes());
        self.ring[e + BUF_BID..e + BUF_BID + 2].copy_from_slice(&bid.to_ne_bytes());
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the tail: the entries written before it are the kernel's.
    fn publish(&mut self) {
        let tail = self.ring[BUF_TAIL..].as_mut_ptr() as *mut u16;
        // SAFETY: the tail is a 2-byte-aligned u16 in our map that the
        // kernel only reads; release orders the entries before it.
        unsafe { AtomicU16::from_ptr(tail) }.store(self.tail, Ordering::Release);
    }
}

// ---------------------------------------------------------------- commit arrays

/// One PREP/COMMIT element array: `depth` elements of `stride` u64 words.
struct CommitBuf {
    words: Box<[u64]>,
    /// Elements written.
    len: usize,
    /// The first element the in-flight command covers (past a partial commit).
    sent: usize,
    in_flight: bool,
}

impl CommitBuf {
    fn clear(&mut self) {
        (self.len, self.sent, self.in_flight) = (0, 0, false);
    }
}

struct Commits {
    bufs: Vec<CommitBuf>,
    /// The array this pass's results go to; never in flight.
    filling: usize,
    /// 1 (8-byte elements) or 2 (with a buffer address).
    stride: usize,
    flags: u16,
}

/// What a COMMIT CQE says of its array.
#[derive(Debug, PartialEq, Eq)]
enum Done {
    All,
    /// Consumed in part: the rest is to be sent again.
    Partial,
    /// Consumed none: the element for this tag failed.
    Failed(u16),
}

impl Commits {
    /// Arrays of `depth` elements; `with_addr` in copy mode, `fallback`
    /// with AUTO_BUF_REG (a request whose pages the kernel cannot register
    /// comes with UBLK_IO_F_NEED_REG_BUF instead of failing).
    fn new(depth: usize, with_addr: bool, fallback: bool) -> Self {
        let stride = if with_addr { 2 } else { 1 };
        let buf = || CommitBuf { words: vec![0; depth * stride].into(), len: 0, sent: 0, in_flight: false };
        let flags = if with_addr { sys::UBLK_BATCH_F_HAS_BUF_ADDR } else { 0 }
            | if fallback { sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK } else { 0 };
        Commits { bufs: (0..COMMIT_BUFS).map(|_| buf()).collect(), filling: 0, stride, flags }
    }

    fn elem_bytes(&self) -> u8 {
        (self.stride * 8) as u8
    }

    fn push(&mut self, elem: BatchElem, addr: u64) {
        let b = &mut self.bufs[self.filling];
        let i = b.len * self.stride;
        b.words[i] = elem.word();
        if self.stride == 2 {
            b.words[i + 1] = addr;
        }
        b.len += 1;
    }

    /// Marks the filled array in flight and picks a free one to fill next;
    /// None if there is nothing to send or no free array yet.
    fn send(&mut self) -> Option<usize> {
        let cur = self.filling;
        if self.bufs[cur].len == 0 {
            return None;
        }
        let next = (0..self.bufs.len()).find(|&i| i != cur && !self.bufs[i].in_flight)?;
        self.bufs[cur].in_flight = true;
        self.filling = next;
        Some(cur)
    }

    /// Address and element count of what array `slot` has still to send.
    fn pending(&self, slot: usize) -> (u64, u16) {
        let b = &self.bufs[slot];
        (b.words[b.sent * self.stride..].as_ptr() as u64, (b.len - b.sent) as u16)
    }

    fn done(&mut self, slot: usize, res: i32) -> Done {
        let elem_bytes = self.stride * 8;
        let b = &mut self.bufs[slot];
        let want = (b.len - b.sent) * elem_bytes;
        match res {
            r if r >= 0 && r as usize >= want => {
                b.clear();
                Done::All
            }
            r if r > 0 => {
                b.sent += r as usize / elem_bytes;
                Done::Partial
            }
            _ => {
                let word = b.words[b.sent * self.stride].to_ne_bytes();
                Done::Failed(u16::from_ne_bytes([word[0], word[1]]))
            }
        }
    }

    /// No COMMIT in flight and nothing waiting to be sent.
    fn idle(&self) -> bool {
        self.bufs.iter().all(|b| !b.in_flight && b.len == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elem(tag: u16) -> BatchElem {
        BatchElem { tag, buf_index: 0, result: 4096 }
    }

    /// A command of the queue's own that the kernel failed is a queue
    /// error with the kernel's errno, not bad input.
    #[test]
    fn a_failed_command_is_a_queue_error_not_bad_input() {
        let e = cmd_error("FETCH_IO_CMDS", 3, -libc::EINVAL);
        let msg = e.to_string();
        assert!(matches!(e, Error::Queue(_)), "{e:?}");
        assert!(msg.starts_with("FETCH_IO_CMDS on queue 3 failed (not an abort): "), "{msg}");
        assert!(msg.contains("os error 22"), "{msg}");
    }

    #[test]
    fn a_partial_commit_resends_the_rest_and_a_failure_names_its_tag() {
        let mut c = Commits::new(8, false, false);
        for t in [3, 5, 7] {
            c.push(elem(t), 0);
        }
        let slot = c.send().unwrap();
        assert_ne!(c.filling, slot);
        assert_eq!(c.pending(slot).1, 3);
        assert_eq!(c.done(slot, 8), Done::Partial, "one of three 8-byte elements consumed");
        assert_eq!(c.pending(slot).1, 2);
        assert_eq!(c.done(slot, -libc::EBUSY), Done::Failed(5));
        assert_eq!(c.done(slot, 16), Done::All);
        assert!(c.idle());
    }

    #[test]
    fn copy_mode_elements_carry_the_buffer_address() {
        let mut c = Commits::new(4, true, false);
        assert_eq!((c.elem_bytes(), c.flags), (16, sys::UBLK_BATCH_F_HAS_BUF_ADDR));
        c.push(elem(2), 0xdead_b000);
        let b = &c.bufs[c.filling];
        assert_eq!(b.words[..2], [elem(2).word(), 0xdead_b000]);
    }

    #[test]
    fn auto_buf_reg_arrays_ask_for_the_fallback() {
        let f = sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK;
        assert_eq!(Commits::new(4, false, true).flags & f, f);
        assert_eq!(Commits::new(4, false, false).flags & f, 0);
        assert_eq!(Commits::new(4, true, false).flags, sys::UBLK_BATCH_F_HAS_BUF_ADDR);
    }

    #[test]
    fn a_filled_array_waits_while_no_other_is_free() {
        let mut c = Commits::new(4, false, false);
        let mut sent = vec![];
        for t in 0..COMMIT_BUFS as u16 {
            c.push(elem(t), 0);
            if let Some(s) = c.send() {
                sent.push(s);
            }
        }
        assert_eq!(sent.len(), COMMIT_BUFS - 1, "the last filled array has no free one to swap with");
        assert!(c.send().is_none());
        assert_eq!(c.done(sent[0], 8), Done::All);
        assert_eq!(c.send(), Some(3), "the array that waited goes once one is free");
        assert!(c.send().is_none(), "nothing left to send");
    }

    /// The ring's entries and tail as the kernel reads them, after setup and
    /// after a buffer is taken and given back.
    #[test]
    fn fetch_ring_hands_every_buffer_out_and_takes_tags_back() {
        let ring = IoUring::<squeue::Entry, cqueue::Entry>::new(8).expect("io_uring on this host");
        let mut f = FetchRing::new(&ring, 8, 8).expect("IORING_REGISTER_PBUF_RING (5.19+)");
        let word = |r: &FetchRing, at: usize, len: usize| {
            r.ring[at..at + len].iter().rev().fold(0u64, |v, b| v << 8 | *b as u64)
        };
        assert_eq!((f.entries, f.buf_len, f.tags_per_buf()), (8, 16, 8));
        assert_eq!(word(&f, BUF_TAIL, 2), 8, "all 8 buffers given at start");
        for bid in 0..8 {
            let e = bid * BUF_ENTRY;
            assert_eq!(word(&f, e + BUF_BID, 2), bid as u64);
            assert_eq!(word(&f, e + BUF_LEN, 4), 16);
            assert_eq!(word(&f, e + BUF_ADDR, 8), f.bufs.as_ptr() as u64 + bid as u64 * 16);
        }
        f.bufs[3 * 16..3 * 16 + 4].copy_from_slice(&[7, 0, 0x22, 0x01]);
        let mut tags = [0u16; MAX_TAGS];
        assert_eq!(f.take(3, 4, &mut tags), 2);
        assert_eq!(tags[..2], [7, 0x0122]);
        f.publish();
        assert_eq!(word(&f, BUF_TAIL, 2), 9);
        assert_eq!(word(&f, BUF_BID, 2), 3, "buffer 3 back at slot 8 % 8 = 0");
    }

    #[test]
    fn multishot_sets_the_two_uring_cmd_fields() {
        let sqe = opcode::UringCmd16::new(types::Fd(3), sys::UBLK_U_IO_FETCH_IO_CMDS).build();
        // SAFETY: as in `multishot`.
        let raw: [u8; 64] = unsafe { std::mem::transmute(multishot(sqe, 0x0102)) };
        assert_eq!(u32::from_ne_bytes(raw[28..32].try_into().unwrap()), IORING_URING_CMD_MULTISHOT);
        assert_eq!(u16::from_ne_bytes(raw[40..42].try_into().unwrap()), 0x0102);
        assert_eq!(raw[0], 46, "still IORING_OP_URING_CMD");
    }
}
