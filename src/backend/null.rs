//! `null`: completes every request at once, so a run measures ublk alone.
//! Reads return whatever the buffer holds; no data is produced. With
//! `--integrity` a read hands back unwritten metadata (all ones, the PI
//! escape), which the block layer's verify skips.

use super::{Backend, Device, DeviceBackend, QueueMaker, SyncBackend, UNWRITTEN_META, done, fill_fd};
use crate::config::{BackendKind, DeviceConfig};
use crate::error::Result;
use crate::integrity::MetaLayout;
use crate::plan::{CopyRules, Transfer};
use crate::request::{Data, Request};
use crate::sys;

#[derive(Debug, Default)]
pub struct NullQueue {
    meta: Option<MetaLayout>,
}

impl NullQueue {
    /// A read's metadata (user copy): unwritten, as `len` data bytes have it.
    fn read_meta(&self, req: &Request, data: &Data<'_>) -> i32 {
        let (Some(meta), Data::UserCopy { fd, pos }) = (self.meta, data) else { return -libc::EINVAL };
        let at = pos | sys::UBLKSRV_IO_INTEGRITY_FLAG;
        match fill_fd(*fd, &UNWRITTEN_META, at, meta.bytes(req.len as u64)) {
            r if r < 0 => r,
            _ => done(req.len),
        }
    }
}

impl SyncBackend for NullQueue {
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32 {
        match req.op {
            sys::UBLK_IO_OP_READ if req.flags & sys::UBLK_IO_F_INTEGRITY != 0 => self.read_meta(req, &data),
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => done(req.len),
            sys::UBLK_IO_OP_FLUSH | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => 0,
            _ => -libc::EOPNOTSUPP,
        }
    }
}

/// The `null` backend: nothing to open, every copy mode but zero copy
/// (there are no pages to take).
pub struct Null;

/// A null device: nothing is served (but unwritten metadata, with `--integrity`).
pub struct NullDevice(Option<MetaLayout>);

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

    fn keeps_metadata(&self) -> bool {
        true
    }

    fn open(&self, cfg: &mut DeviceConfig, _transfer: Transfer, _create: bool) -> Result<DeviceBackend> {
        Ok(DeviceBackend::Null(NullDevice(cfg.integrity.map(|i| i.layout(cfg.block_size)))))
    }
}

impl Device for NullDevice {
    fn served_file(&self) -> Option<(&std::fs::File, &std::path::Path)> {
        None
    }

    fn with_queue<M: QueueMaker>(&self, _depth: u16, m: M) -> M::Out {
        m.make(NullQueue { meta: self.0 })
    }
}
