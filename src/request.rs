//! What one request is, as the queue loop hands it to a backend and the
//! stats record it: the decoded descriptor ([`Request`]) and where its
//! bytes are ([`Data`]). Plain types, below both stats and backends.

use std::os::fd::RawFd;

use crate::sys;

/// One request, decoded from its descriptor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    /// The descriptor's `UBLK_IO_F_*` bits where `op_flags` has them (bits
    /// 8-31; the op bits cleared), so `flags & sys::UBLK_IO_F_FUA` tests FUA.
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    pub fn from_desc(d: &sys::IoDesc) -> Self {
        Request { op: d.op(), flags: d.op_flags & !0xff, offset: d.start_sector << 9, len: d.nr_sectors << 9 }
    }
}

/// Where the request's bytes are.
pub enum Data<'a> {
    /// Copy mode: the tag's own buffer.
    Buf(&'a mut [u8]),
    /// User copy: `pread` (WRITE) or `pwrite` (READ) on `fd` at `pos`.
    UserCopy { fd: RawFd, pos: u64 },
    /// Zero copy: the request's pages are registered in the queue ring's
    /// buffer table at this index.
    Fixed { index: u16, char_fd: RawFd, qid: u16 },
    /// UBLK_F_AUTO_BUF_REG: the kernel registered the request's pages at this
    /// index before handing us the request, and drops them at COMMIT.
    Registered { index: u16 },
    /// No data reachable (null backend in user-copy mode never touches it).
    None,
}
