//! Server-side statistics kept by each queue thread.
//!
//! Counters are relaxed atomics written only by the owning queue thread, so
//! recording costs a few uncontended adds and no lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::backend::Request;
use crate::sys;

/// Monotonic clock in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Default)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub other: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub service_ns: AtomicU64,
}

impl QueueStats {
    pub fn record(&self, req: &Request, result: i32, ns: u64) {
        match req.op {
            sys::UBLK_IO_OP_READ => {
                self.reads.fetch_add(1, Relaxed);
                self.read_bytes.fetch_add(req.len as u64, Relaxed);
            }
            sys::UBLK_IO_OP_WRITE => {
                self.writes.fetch_add(1, Relaxed);
                self.write_bytes.fetch_add(req.len as u64, Relaxed);
            }
            _ => {
                self.other.fetch_add(1, Relaxed);
            }
        }
        if result < 0 {
            self.errors.fetch_add(1, Relaxed);
        }
        self.service_ns.fetch_add(ns, Relaxed);
    }
}
