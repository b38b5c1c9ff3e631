//! A request's commands on the queue ring, for the backends that send
//! them (file, nvme): the backend's own command alone, or, when zero copy
//! registers buffers explicitly, hard-linked between REGISTER_IO_BUF and
//! UNREGISTER_IO_BUF of the request's pages; and, per tag, the count that
//! turns the chain's CQEs into one COMMIT result.
//!
//! Each entry is pushed where it is built, with no staging array, so the
//! compiler stores its fields straight into the ring's slot: in the
//! release build `objdump -d` shows the per-tag `Core::finish` and these pushes
//! writing through the slot address (`sqes + (tail & mask) * size`), not
//! copying a finished entry from the stack.

use std::os::fd::RawFd;

use io_uring::{SubmissionQueue, squeue};

use super::KIND_MASK;
use crate::sys;

/// The kinds of a chain's commands, within [`KIND_MASK`].
pub const KIND_IO: u64 = 0;
pub const KIND_REG: u64 = 1 << 16;
pub const KIND_UNREG: u64 = 2 << 16;
const _: () = assert!((KIND_REG | KIND_UNREG) & !KIND_MASK == 0);

/// Where explicit registration puts one request's pages: `/dev/ublkcN`,
/// the request's queue and tag, and the ring's buffer slot.
#[derive(Clone, Copy, Debug)]
pub struct Registration {
    pub char_fd: RawFd,
    pub qid: u16,
    pub tag: u16,
    pub index: u16,
}

/// An entry that can be hard-linked to the next: a failure in the chain
/// still runs the UNREGISTER after it.
pub trait Link: squeue::EntryMarker {
    fn hardlink(self) -> Self;
}

impl Link for squeue::Entry {
    fn hardlink(self) -> Self {
        self.flags(squeue::Flags::IO_HARDLINK)
    }
}

impl Link for squeue::Entry128 {
    fn hardlink(self) -> Self {
        self.flags(squeue::Flags::IO_HARDLINK)
    }
}

/// Per tag: the bytes its request must move, the CQEs still due from its
/// chain, and its result so far.
pub struct Chains {
    lens: Vec<u32>,
    pending: Vec<u8>,
    results: Vec<i32>,
}

impl Chains {
    pub fn new(depth: u16) -> Self {
        let d = depth as usize;
        Chains { lens: vec![0; d], pending: vec![0; d], results: vec![0; d] }
    }

    /// Pushes `io` (its `user_data` already `ud | KIND_IO`) for `tag`,
    /// which must move `len` bytes, inside a REGISTER/UNREGISTER chain
    /// when `reg` is given. Some(-EBUSY), with nothing pushed, if the SQ
    /// lacks room; None once the chain is queued.
    ///
    /// # Safety
    /// As [`SubmissionQueue::push`]: the memory `io` names (the tag's
    /// buffer, or the slot `reg` fills) stays valid until its CQE.
    pub unsafe fn push<S: Link>(
        &mut self,
        sq: &mut SubmissionQueue<'_, S>,
        (tag, len): (u16, u32),
        io: S,
        reg: Option<Registration>,
        ud: u64,
    ) -> Option<i32> {
        let n = if reg.is_some() { 3 } else { 1 };
        if sq.capacity() - sq.len() < n {
            return Some(-libc::EBUSY);
        }
        let t = tag as usize;
        (self.lens[t], self.pending[t], self.results[t]) = (len, n as u8, 0);
        let room = "room checked above";
        // SAFETY: the caller's promise for `io`; REGISTER and UNREGISTER
        // point at no memory of ours.
        unsafe {
            match reg {
                Some(r) => {
                    sq.push(&buf_cmd::<S>(r, sys::UBLK_U_IO_REGISTER_IO_BUF, ud | KIND_REG).hardlink())
                        .expect(room);
                    sq.push(&io.hardlink()).expect(room);
                    sq.push(&buf_cmd(r, sys::UBLK_U_IO_UNREGISTER_IO_BUF, ud | KIND_UNREG)).expect(room);
                }
                None => sq.push(&io).expect(room),
            }
        }
        None
    }

    /// Takes one CQE of `tag`'s chain. `io_result` reads the backend
    /// command's own result given the bytes it had to move; a failed
    /// REGISTER or UNREGISTER fails the request even if that looked fine.
    /// Once every CQE is in, the COMMIT result.
    pub fn complete(
        &mut self,
        tag: u16,
        kind: u64,
        res: i32,
        io_result: impl FnOnce(i32, u32) -> i32,
    ) -> Option<i32> {
        let t = tag as usize;
        let r = &mut self.results[t];
        if kind == KIND_IO {
            *r = io_result(res, self.lens[t]);
        } else if res < 0 && *r >= 0 {
            *r = -libc::EIO;
        }
        self.pending[t] -= 1;
        (self.pending[t] == 0).then_some(*r)
    }
}

/// REGISTER_IO_BUF / UNREGISTER_IO_BUF of `r`'s request at its slot: 16
/// bytes of command, widened to the ring's entry size `S`.
fn buf_cmd<S: squeue::EntryMarker>(r: Registration, op: u32, ud: u64) -> S {
    let c = sys::IoCmd { q_id: r.qid, tag: r.tag, result: 0, addr: r.index as u64 };
    let mut payload = [0u8; 16];
    // SAFETY: IoCmd is repr(C), 16 bytes of plain data.
    unsafe { std::ptr::copy_nonoverlapping(&c as *const _ as *const u8, payload.as_mut_ptr(), 16) };
    S::from(
        io_uring::opcode::UringCmd16::new(io_uring::types::Fd(r.char_fd), op)
            .cmd(payload)
            .build()
            .user_data(ud),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{IoUring, opcode};

    fn whole(res: i32, len: u32) -> i32 {
        if res as u32 == len { res } else { -libc::EIO }
    }

    /// A NOP for `tag` moving `len` bytes, registered at slot `tag` on fd
    /// -1 when `registered`.
    fn push(c: &mut Chains, ring: &mut IoUring, (tag, len): (u16, u32), registered: bool) -> Option<i32> {
        let io = opcode::Nop::new().build().user_data(KIND_IO);
        let reg = registered.then_some(Registration { char_fd: -1, qid: 0, tag, index: tag });
        // SAFETY: no command names memory of ours.
        unsafe { c.push(&mut ring.submission(), (tag, len), io, reg, 0) }
    }

    #[test]
    fn a_registered_request_is_three_hard_linked_commands_committed_once() {
        let mut ring: IoUring = IoUring::new(8).unwrap();
        let mut c = Chains::new(8);
        assert_eq!(push(&mut c, &mut ring, (5, 4096), true), None);
        // On fd -1 both buffer commands fail; the hard links still run
        // every command, in order.
        ring.submit_and_wait(3).unwrap();
        let cqes: Vec<(u64, i32)> = ring.completion().map(|e| (e.user_data(), e.result())).collect();
        assert_eq!(cqes, [(KIND_REG, -libc::EBADF), (KIND_IO, 0), (KIND_UNREG, -libc::EBADF)]);
        assert_eq!(c.complete(5, KIND_REG, 0, whole), None);
        assert_eq!(c.complete(5, KIND_IO, 4096, whole), None);
        assert_eq!(c.complete(5, KIND_UNREG, 0, whole), Some(4096));
    }

    #[test]
    fn a_failed_unregister_fails_a_whole_read_and_a_full_sq_takes_nothing() {
        let mut ring: IoUring = IoUring::new(4).unwrap();
        let mut c = Chains::new(8);
        assert_eq!(push(&mut c, &mut ring, (5, 512), true), None);
        c.complete(5, KIND_REG, 0, whole);
        c.complete(5, KIND_IO, 512, whole);
        assert_eq!(c.complete(5, KIND_UNREG, -libc::ENOENT, whole), Some(-libc::EIO));
        // One slot left of four: a chain of three does not fit, a lone command does.
        assert_eq!(push(&mut c, &mut ring, (6, 512), true), Some(-libc::EBUSY));
        assert_eq!(ring.submission().len(), 3);
        assert_eq!(push(&mut c, &mut ring, (6, 512), false), None);
        assert_eq!(c.complete(6, KIND_IO, 100, whole), Some(-libc::EIO));
    }
}
