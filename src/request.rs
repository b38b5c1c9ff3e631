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
    /// A range whose bytes overflow `offset` or `len` (a FLUSH's sector is
    /// -1; a sector count of 2^23 or more is no request the device's limits
    /// allow) starts at u64::MAX, past every device's end, so each backend's
    /// range check refuses it; a wrapped value would name other bytes.
    pub fn from_desc(d: &sys::IoDesc) -> Self {
        let len = d.nr_sectors.checked_mul(512);
        let offset = d.start_sector.checked_mul(512).filter(|_| len.is_some());
        Request {
            op: d.op(),
            flags: d.op_flags & !0xff,
            offset: offset.unwrap_or(u64::MAX),
            len: len.unwrap_or(u32::MAX),
        }
    }
}

/// Where the request's bytes are.
pub enum Data<'a> {
    /// Copy mode: the tag's own buffer.
    Buf(&'a mut [u8]),
    /// User copy: `pread` (WRITE) or `pwrite` (READ) on `fd` at `pos`.
    UserCopy { fd: RawFd, pos: u64 },
    /// Zero copy: the request's pages, the kernel's request (`qid`, `tag`),
    /// are registered in the ring's buffer table at this index.
    Fixed { index: u16, char_fd: RawFd, qid: u16, tag: u16 },
    /// UBLK_F_AUTO_BUF_REG: the kernel registered the request's pages at this
    /// index before handing us the request, and drops them at COMMIT.
    Registered { index: u16 },
    /// No data reachable (null backend in user-copy mode never touches it).
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(start_sector: u64, nr_sectors: u32) -> sys::IoDesc {
        sys::IoDesc { op_flags: sys::UBLK_IO_OP_WRITE as u32, nr_sectors, start_sector, addr: 0 }
    }

    #[test]
    fn sector_ranges_that_overflow_bytes_do_not_wrap() {
        let r = Request::from_desc(&desc(16, 8));
        assert_eq!((r.offset, r.len), (8192, 4096));
        let most = u32::MAX >> 9;
        assert_eq!(Request::from_desc(&desc(0, most)).len, most << 9);
        // 2^23 sectors is 4 GiB, one byte past u32: it must not become 0
        // bytes, nor 2^23 + 1 sectors one sector.
        for n in [1 << 23, (1 << 23) + 1, u32::MAX] {
            let r = Request::from_desc(&desc(8, n));
            assert_eq!((r.offset, r.len), (u64::MAX, u32::MAX), "{n} sectors");
        }
        // Sector 2^55 + 8 is byte 4096 once wrapped.
        let r = Request::from_desc(&desc((1 << 55) + 8, 8));
        assert_eq!((r.offset, r.len), (u64::MAX, 4096));
        let flush = Request::from_desc(&sys::IoDesc {
            op_flags: sys::UBLK_IO_OP_FLUSH as u32,
            nr_sectors: 0,
            start_sector: u64::MAX,
            addr: 0,
        });
        assert_eq!((flush.op, flush.offset, flush.len), (sys::UBLK_IO_OP_FLUSH, u64::MAX, 0));
    }
}
