//! Per-tag data plane: FETCH_REQ once per tag, then one COMMIT_AND_FETCH_REQ
//! per request, each its own command on the thread's ring. The thread's
//! tags are its slots (see the `queue` module doc), of one queue or several.
//!
//! Tag ownership: after FETCH a tag belongs to the kernel. Its CQE (result
//! `UBLK_IO_RES_OK`) hands it to us with a request in the tag's descriptor;
//! we serve it and send COMMIT_AND_FETCH, which hands it back. A CQE of
//! `UBLK_IO_RES_ABORT` ends the tag for good (device stopped, quiesced or
//! being recovered by another server). The thread returns once every tag has
//! ended, or once, after the first ABORT, it holds no request and nothing
//! has come for `LINGER`: QUIESCE_DEV does not abort a tag the server was
//! serving at the time, so the FETCH its COMMIT re-posts may never end.
//!
//! The loop is the one both planes share (`run_loop`): per pass one wait,
//! then one COMMIT pushed per request served.
//!
//! Failure: a FETCH or COMMIT that completes with anything but OK or ABORT
//! is a bug or a broken device, and `run` returns it as an error; the
//! thread body (`run_queue`) then aborts the whole process, so the kernel
//! sees the server gone and recovery can take over.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use io_uring::squeue::EntryMarker as _;
use io_uring::{cqueue, opcode, types};

use super::run_loop::{Core, Protocol, run_split};
use super::{DataPlane, PlaneKind, QueueSetup, Ring, Sq, TAG_MASK, TagIo, build_ring, pin, ring_entries};
use crate::backend::QueueBackend;
use crate::error::{Error, Result};
use crate::plan::Transfer;
use crate::sys::{self, IoCmd};

/// The per-tag data plane ([`Queue`]): FETCH and COMMIT_AND_FETCH per request.
pub struct PerTag;

impl PlaneKind for PerTag {
    type Plane<B: QueueBackend> = Queue<B>;
}

/// A queue's mappings and ring, made in its own thread before any FETCH.
///
/// It is made in two steps so a hot standby can do the slow part early:
/// `new` pins the thread, builds the ring and allocates buffers; `bind`
/// maps the descriptors of an opened `/dev/ublkcN`.
pub struct Queue<B: QueueBackend> {
    // Declared first so it drops first: closing the ring cancels every
    // command before the buffers and descriptor map they point at go.
    ring: Ring<B>,
    core: Core<B>,
    cmds: TagCommands,
}

/// The per-tag protocol's own state: how many tags are still live.
struct TagCommands {
    /// Tags whose FETCH has not ended with ABORT.
    live: u32,
    stopping: bool,
}

impl<B: QueueBackend> DataPlane<B> for Queue<B> {
    /// Pins the calling thread, allocates the buffers and builds the ring.
    fn new(setup: QueueSetup, backend: B) -> Result<Self> {
        if let Some(cpu) = setup.cpu {
            pin(cpu)?;
        }
        let tags = TagIo::new(&setup)?;
        let entries = ring_entries(setup.depth, B::MAX_COMMANDS);
        let ring = build_ring::<B>(entries, entries, setup.qid, setup.copy)?;
        if setup.copy == Transfer::Zero {
            ring.submitter()
                .register_buffers_sparse(setup.depth as u32)
                .map_err(|e| Error::io("register the sparse buffer table for zero copy", e))?;
        }
        let cmds = TagCommands { live: setup.depth as u32, stopping: false };
        let core = Core::new(setup, backend, tags, &ring);
        Ok(Queue { ring, core, cmds })
    }

    /// Maps this queue's descriptors from `/dev/ublkcN`.
    fn bind(&mut self, char_dev: Arc<File>) -> Result<()> {
        let c = &mut self.core;
        c.tags.bind(&c.setup, char_dev)
    }

    /// Posts FETCH_REQ for every tag. START_DEV or END_USER_RECOVERY may
    /// be sent once this returns.
    fn fetch_all(&mut self) -> Result<()> {
        let c = &self.core;
        let mut sq = self.ring.submission();
        for tag in 0..c.setup.depth {
            let sqe = io_cmd::<B>(c, sys::UBLK_U_IO_FETCH_REQ, tag, 0);
            // SAFETY: the command points at this queue's buffer (copy mode) or
            // nothing; the ring drops before the buffers (field order above).
            unsafe { sq.push(&sqe) }
                .map_err(|_| Error::Queue("submission queue smaller than queue depth".into()))?;
        }
        drop(sq);
        self.ring.submit().map_err(|e| Error::io(format!("submit FETCH_REQ on queue {}", c.setup.qid), e))?;
        Ok(())
    }

    /// Serves until every tag has ended (see the module doc for when).
    fn run(mut self) -> Result<()> {
        let Queue { ring, core, cmds } = &mut self;
        run_split::<B>(ring, |sub, sq, cq| core.serve(cmds, sub, sq, cq))
    }
}

impl<B: QueueBackend> Protocol<B> for TagCommands {
    /// Every tag has a FETCH or COMMIT armed, whose CQE wakes the wait.
    const RECHECK: Option<Duration> = None;

    fn ended(&self, _core: &Core<B>) -> bool {
        self.live == 0
    }

    fn stopping(&self) -> bool {
        self.stopping
    }

    fn drained(&self, core: &Core<B>) -> bool {
        core.held() == 0
    }

    #[inline]
    fn reap(&mut self, core: &mut Core<B>, cqe: &cqueue::Entry, sq: &mut Sq<'_, B>) -> Result<()> {
        let tag = (cqe.user_data() & TAG_MASK) as u16;
        match cqe.result() {
            sys::UBLK_IO_RES_OK => {
                core.delivered();
                match core.arrive(tag, sq) {
                    Some(result) => core.finish(self, tag, result, sq),
                    None => Ok(()),
                }
            }
            sys::UBLK_IO_RES_ABORT => {
                self.live -= 1;
                self.stopping = true;
                Ok(())
            }
            err => {
                let (qid, tag) = core.tags.id(tag);
                Err(Error::Queue(format!(
                    "FETCH/COMMIT of tag {tag} on queue {qid} failed (not an abort): {}",
                    std::io::Error::from_raw_os_error(-err)
                )))
            }
        }
    }

    /// Queues the tag's COMMIT_AND_FETCH.
    #[inline]
    fn commit(&mut self, core: &mut Core<B>, tag: u16, result: i32, sq: &mut Sq<'_, B>) -> Result<()> {
        let sqe = io_cmd::<B>(core, sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
        // SAFETY: as in fetch_all. The SQ has room: see ring_entries.
        unsafe { sq.push(&sqe) }.map_err(|_| Error::RingFull("submission queue overflow".into()))
    }
}

/// A ublk FETCH or COMMIT: 16 bytes of command, so it fits a 64-byte SQE
/// and widens to a 128-byte one unchanged. Built by value and pushed at
/// once, it is written in place all the same: in the release build
/// (`objdump -d` of the per-tag `Core::finish`, which inlines
/// `TagCommands::commit`) its fields are stored straight into
/// `sqes[tail & mask]`, with no copy on the stack.
#[inline]
fn io_cmd<B: QueueBackend>(core: &Core<B>, op: u32, slot: u16, result: i32) -> B::Sqe {
    let setup = &core.setup;
    let (q_id, tag) = core.tags.id(slot);
    let cmd = IoCmd { q_id, tag, result, addr: core.tags.buf_addr(setup, slot) };
    let mut payload = [0u8; 16];
    // SAFETY: IoCmd is repr(C), 16 bytes of plain data.
    unsafe { std::ptr::copy_nonoverlapping(&cmd as *const IoCmd as *const u8, payload.as_mut_ptr(), 16) };
    let mut sqe = opcode::UringCmd16::new(types::Fd(core.tags.char_fd), op).cmd(payload);
    if setup.auto_buf_reg {
        // Slots `depth..` are past the table (register_buffers_sparse).
        let index = if setup.unreg_auto_buf { setup.depth + slot } else { slot };
        sqe = sqe.addr(Some(sys::auto_buf_reg(index, sys::UBLK_AUTO_BUF_REG_FALLBACK)));
    }
    let mut sqe = B::Sqe::from(sqe.build());
    sqe.set_user_data(slot as u64);
    sqe
}
