//! `null`: completes every request at once, so a run measures ublk alone.
//! Reads return whatever the buffer holds; no data is produced.

use super::{SyncBackend, done};
use crate::request::{Data, Request};
use crate::sys;

#[derive(Debug, Default)]
pub struct NullQueue;

impl SyncBackend for NullQueue {
    fn serve(&mut self, req: &Request, _data: Data<'_>) -> i32 {
        match req.op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => done(req.len),
            sys::UBLK_IO_OP_FLUSH | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => 0,
            _ => -libc::EOPNOTSUPP,
        }
    }
}
