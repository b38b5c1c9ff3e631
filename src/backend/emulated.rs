//! Any backend, served like a real disk: each request takes the service
//! time `--latency` draws for it and fails as `--fail` says (see
//! [`crate::emulate`]). The backend does the work as soon as the request
//! arrives; its completion is held until due, and a request failed on
//! purpose never reaches it (its bytes are neither read nor written).
//!
//! The queue loop asks [`QueueBackend::next_due`] how long it may sleep and
//! takes finished requests from [`QueueBackend::pop_due`] each pass; a
//! polling queue looks each pass without a syscall.

use std::sync::Arc;

use io_uring::SubmissionQueue;

use crate::backend::QueueBackend;
use crate::clock::now_ns;
use crate::emulate::{Due, Emulation, Emulator, Failer};
use crate::request::{Data, Request};

pub struct Emulated<B> {
    inner: B,
    emu: Emulator,
    due: Due,
    /// Per tag: when it is due, and what it completes with once done.
    due_at: Box<[u64]>,
    result: Box<[i32]>,
}

impl<B: QueueBackend> Emulated<B> {
    /// `seed` tells queues apart; `failer` is the device's, shared.
    pub fn new(inner: B, e: &Emulation, failer: Arc<Failer>, depth: u16, seed: u64) -> Self {
        Emulated {
            inner,
            emu: Emulator::new(e, failer, seed),
            due: Due::new(depth),
            due_at: vec![0; depth as usize].into_boxed_slice(),
            result: vec![0; depth as usize].into_boxed_slice(),
        }
    }

    /// The request is done with `res`: complete it now if it is due, else hold it.
    #[inline]
    fn finish(&mut self, tag: u16, res: i32) -> Option<i32> {
        let due = self.due_at[tag as usize];
        if due == 0 || due <= now_ns() {
            return Some(res);
        }
        self.result[tag as usize] = res;
        self.due.hold(due, tag);
        None
    }
}

impl<B: QueueBackend> QueueBackend for Emulated<B> {
    type Sqe = B::Sqe;
    type Cqe = B::Cqe;
    const MAX_COMMANDS: u32 = B::MAX_COMMANDS;

    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut SubmissionQueue<'_, Self::Sqe>,
        ud: u64,
    ) -> Option<i32> {
        let v = self.emu.arrive(req.op, req.offset >> 9, (req.len >> 9) as u64);
        self.due_at[tag as usize] = if v.delay_ns == 0 { 0 } else { now_ns() + v.delay_ns };
        if let Some(err) = v.fail {
            return self.finish(tag, err);
        }
        let res = self.inner.submit(tag, req, data, sq, ud)?;
        self.finish(tag, res)
    }

    fn complete(&mut self, tag: u16, kind: u64, res: i32) -> Option<i32> {
        let res = self.inner.complete(tag, kind, res)?;
        self.finish(tag, res)
    }

    #[inline]
    fn next_due(&self) -> Option<u64> {
        self.due.next_due()
    }

    #[inline]
    fn pop_due(&mut self, now: u64) -> Option<(u16, i32)> {
        self.due.pop_due(now).map(|tag| (tag, self.result[tag as usize]))
    }
}

#[cfg(test)]
mod tests {
    use io_uring::IoUring;

    use super::*;
    use crate::backend::null::NullQueue;
    use crate::emulate::{fail, latency};
    use crate::sys;

    fn req(op: u8, sector: u64) -> Request {
        Request { op, flags: 0, offset: sector << 9, len: 4096 }
    }

    fn emulated(latency: Option<&str>, fail: &[&str]) -> Emulated<NullQueue> {
        let e = Emulation {
            latency: latency.map(|l| latency::parse(l).unwrap()),
            fail: fail.iter().map(|f| fail::parse(f).unwrap()).collect(),
        };
        let failer = Arc::new(Failer::new(e.fail.clone()));
        Emulated::new(NullQueue::default(), &e, failer, 8, 1)
    }

    /// Held until due, out by due time whatever the order of arrival, and
    /// a request failed on purpose carries its errno.
    #[test]
    fn requests_complete_when_due_not_in_arrival_order() {
        let mut ring: IoUring = IoUring::new(8).unwrap();
        let mut sq = ring.submission();
        let mut e = emulated(Some("read=40ms,write=10ms"), &["op=write,lba=100-100,err=ENOSPC"]);
        let t0 = now_ns();
        assert_eq!(e.submit(0, &req(sys::UBLK_IO_OP_READ, 0), Data::None, &mut sq, 0), None);
        assert_eq!(e.submit(1, &req(sys::UBLK_IO_OP_WRITE, 0), Data::None, &mut sq, 1), None);
        assert_eq!(e.submit(2, &req(sys::UBLK_IO_OP_WRITE, 96), Data::None, &mut sq, 2), None);
        assert!(e.pop_due(t0).is_none(), "nothing is due at arrival");
        let mut out = vec![];
        while out.len() < 3 {
            let now = now_ns();
            assert!(now - t0 < 5_000_000_000, "stuck: {out:?}");
            while let Some(done) = e.pop_due(now) {
                out.push((done, (now - t0) / 1_000_000));
            }
            if let Some(due) = e.next_due() {
                std::thread::sleep(std::time::Duration::from_nanos(due.saturating_sub(now_ns())));
            }
        }
        let order: Vec<(u16, i32)> = out.iter().map(|o| o.0).collect();
        assert!(
            matches!(order[..2], [(1, 4096), (2, r)] | [(2, r), (1, 4096)] if r == -libc::ENOSPC),
            "{out:?}"
        );
        assert_eq!(order[2], (0, 4096), "the read, due last, leaves last: {out:?}");
        assert!(out[0].1 >= 10 && out[2].1 >= 40, "nothing before its time: {out:?}");
    }

    /// No latency: failures still hit, the rest completes in the call.
    #[test]
    fn without_latency_requests_finish_in_the_call() {
        let mut ring: IoUring = IoUring::new(8).unwrap();
        let mut sq = ring.submission();
        let mut e = emulated(None, &["op=read"]);
        assert_eq!(e.submit(0, &req(sys::UBLK_IO_OP_WRITE, 0), Data::None, &mut sq, 0), Some(4096));
        assert_eq!(e.submit(1, &req(sys::UBLK_IO_OP_READ, 0), Data::None, &mut sq, 1), Some(-libc::EIO));
        assert!(e.next_due().is_none());
    }
}
