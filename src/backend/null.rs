//! `null`: completes every request at once, so a run measures ublk alone.
//! Reads return whatever the buffer holds; no data is produced.

use super::{Backend, Device, DeviceBackend, QueueMaker, SyncBackend, done};
use crate::config::{BackendKind, DeviceConfig};
use crate::error::Result;
use crate::plan::{CopyRules, Transfer};
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

/// The `null` backend: nothing to open, every copy mode but zero copy
/// (there are no pages to take).
pub struct Null;

/// A null device: nothing is served.
pub struct NullDevice;

impl Backend for Null {
    fn kind(&self) -> BackendKind {
        BackendKind::Null
    }

    fn name(&self) -> &'static str {
        "null"
    }

    fn default_size(&self) -> Option<u64> {
        Some(250 << 30)
    }

    fn copy_rules(&self) -> &'static CopyRules {
        &CopyRules { backend: "null", auto: &[Transfer::User, Transfer::Copy], refused: &[] }
    }

    fn open(&self, _cfg: &mut DeviceConfig, _transfer: Transfer, _create: bool) -> Result<DeviceBackend> {
        Ok(DeviceBackend::Null(NullDevice))
    }
}

impl Device for NullDevice {
    fn served_file(&self) -> Option<(&std::fs::File, &std::path::Path)> {
        None
    }

    fn with_queue<M: QueueMaker>(&self, _depth: u16, m: M) -> M::Out {
        m.make(NullQueue)
    }
}
