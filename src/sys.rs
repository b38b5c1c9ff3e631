//! The ublk kernel ABI: structs, constants and command numbers from
//! `include/uapi/linux/ublk_cmd.h`, and nothing else.
//!
//! Every struct shared with the kernel has its size and field offsets
//! const-asserted below, so a layout slip fails the build, not a device.

use std::mem::{offset_of, size_of};

/// `_IOR('u', nr, 32-byte struct)`.
const fn ior(nr: u32) -> u32 {
    0x8020_7500 | nr
}
/// `_IOWR('u', nr, 32-byte struct)`.
const fn iowr(nr: u32) -> u32 {
    0xC020_7500 | nr
}
/// `_IOWR('u', nr, 16-byte struct)`: the per-I/O commands (`ublksrv_io_cmd`)
/// and the batch commands (`ublk_batch_io`), both 16 bytes.
const fn iowr_io(nr: u32) -> u32 {
    0xC010_7500 | nr
}

pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior(0x01);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(0x02);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(0x04);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(0x05);
pub const UBLK_U_CMD_START_DEV: u32 = iowr(0x06);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(0x07);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(0x08);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(0x09);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(0x10);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(0x11);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(0x13);
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(0x14);
/// Sets a started device's capacity to `data[0]` sectors (UBLK_F_UPDATE_SIZE, 6.16).
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(0x15);
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(0x16);
/// Stops the device only if `/dev/ublkbN` has no openers (-EBUSY otherwise).
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(0x17);

pub const UBLK_U_IO_FETCH_REQ: u32 = iowr_io(0x20);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr_io(0x21);
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr_io(0x23);
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr_io(0x24);
/// UBLK_F_BATCH_IO: hands every tag of a queue to the driver in one command
/// (an array of [`BatchElem`]); completes with 0.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr_io(0x25);
/// UBLK_F_BATCH_IO: commits an array of [`BatchElem`]; completes with the
/// bytes of the array it consumed (fewer on a partial commit) or -errno if
/// it consumed none.
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr_io(0x26);
/// UBLK_F_BATCH_IO: multishot (IORING_URING_CMD_MULTISHOT with a provided
/// buffer group); each CQE fills one buffer with the u16 tags of requests
/// ready to serve.
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr_io(0x27);

/// `ublk_batch_io.flags`: each element carries a zone-append LBA.
pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
/// Each element carries a buffer address (copy mode).
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

/// CQE result of a FETCH/COMMIT: a request waits in the descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// CQE result when the device stops or quiesces: the tag is finished.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;
pub const UBLK_F_IO_DESC_SIZE: u64 = 1 << 20;

/// Every flag with its name and the first mainline kernel that reports it
/// in GET_FEATURES (or, before GET_FEATURES, accepts it in ADD_DEV).
/// Checked against the patches and the merge window they landed in:
/// ZERO_COPY is defined since 6.0, but GET_FEATURES masked it out and
/// ADD_DEV cleared it until the 6.15 REGISTER_IO_BUF series; UNPRIVILEGED_DEV
/// was merged for 6.2 (posted Nov 2022); UPDATE_SIZE for 6.16 (posted Apr
/// 2025, after 6.15-rc1).
pub const FEATURES: &[(u64, &str, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY", "6.15"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "COMP_IN_TASK", "6.0"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA", "6.0"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY", "6.1"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE", "6.1"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV", "6.2"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE", "6.4"),
    (UBLK_F_USER_COPY, "USER_COPY", "6.5"),
    (UBLK_F_ZONED, "ZONED", "6.6"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO", "6.13"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE", "6.16"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG", "6.16"),
    (UBLK_F_QUIESCE, "QUIESCE", "6.16"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON", "6.16"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON", "6.17"),
    (UBLK_F_BATCH_IO, "BATCH_IO", "7.0"),
    (UBLK_F_INTEGRITY, "INTEGRITY", "7.0"),
    (UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV", "7.0"),
    (UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN", "7.0"),
    (UBLK_F_SHMEM_ZC, "SHMEM_ZC", "7.1"),
    // In 7.3's uapi, not in 7.1-rc's; 7.2 not checked.
    (UBLK_F_IO_DESC_SIZE, "IO_DESC_SIZE", "7.3"),
];

pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;

pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// Honoured only together with UBLK_ATTR_VOLATILE_CACHE.
pub const UBLK_ATTR_FUA: u32 = 1 << 3;
/// A descriptor's FUA flag, tested against the raw `op_flags`.
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
/// WRITE_ZEROES: keep the blocks allocated (REQ_NOUNMAP).
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
/// AUTO_BUF_REG could not register this request's pages (6.16): with
/// [`UBLK_AUTO_BUF_REG_FALLBACK`] the server registers them itself.
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;
/// The request carries protection information (UBLK_F_INTEGRITY, 7.0).
pub const UBLK_IO_F_INTEGRITY: u32 = 1 << 18;
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

/// The descriptor array of queue q starts at `q * UBLK_MAX_QUEUE_DESC_BYTES`
/// rounded up to a page.
pub const UBLK_MAX_QUEUE_DEPTH: u32 = 4096;
pub const UBLK_MAX_NR_QUEUES: u32 = 4096;

/// u64 words of a CPU mask for a machine of `nr_cpu_ids` possible CPUs.
/// GET_QUEUE_AFFINITY and sched_getaffinity refuse (EINVAL) a mask shorter
/// than nr_cpu_ids bits or not a whole number of longs; never less than
/// 4096 bits, the size used before machines outgrew it.
pub fn cpu_mask_words(nr_cpu_ids: usize) -> usize {
    nr_cpu_ids.div_ceil(64).max(64)
}

/// The CPUs whose bits are set in `mask` (bit c of word c / 64).
pub fn mask_cpus(mask: &[u64]) -> Vec<usize> {
    (0..mask.len() * 64).filter(|c| mask[c / 64] & (1 << (c % 64)) != 0).collect()
}

/// User-copy file positions: `UBLKSRV_IO_BUF_OFFSET + (q << 41) + (tag << 25) + off`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
pub const UBLK_TAG_OFF: u32 = 25;
pub const UBLK_QID_OFF: u32 = 41;
/// Set in a user-copy position, it reaches the request's metadata (its
/// protection information) instead of its data.
pub const UBLKSRV_IO_INTEGRITY_FLAG: u64 = 1 << 62;
/// A request carries at most 32 MiB in user-copy mode.
pub const UBLK_IO_BUF_BYTES_MAX: u32 = 1 << UBLK_TAG_OFF;

pub const DEV_ID_ANY: u32 = u32::MAX;
pub const QUEUE_ID_NONE: u16 = u16::MAX;

/// `struct ublksrv_ctrl_cmd`: the 32-byte payload of every control command.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: u64,
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    /// The descriptor stride with UBLK_F_IO_DESC_SIZE (7.3); 0 before.
    pub io_desc_size: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read-only, filled by GET_PARAMS).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned` (never set: no zoned backend).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_param_dma_align`: the mask a buffer's address and length
/// must clear (`alignment + 1` a power of two below a page).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamDmaAlign {
    pub alignment: u32,
    pub pad: [u8; 4],
}

/// `struct ublk_param_segment`: how a request's memory may be split.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamSegment {
    pub seg_boundary_mask: u64,
    pub max_segment_size: u32,
    pub max_segments: u16,
    pub pad: [u8; 2],
}

/// `struct ublk_param_integrity`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamIntegrity {
    pub flags: u32,
    pub max_integrity_segments: u16,
    pub interval_exp: u8,
    pub metadata_size: u8,
    pub pi_offset: u8,
    pub csum_type: u8,
    pub tag_size: u8,
    pub pad: [u8; 5],
}

/// `struct ublk_params` (7.x layout, 152 bytes); older kernels clamp `len`
/// to their own size and drop the types they do not know.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
    pub dma: ParamDmaAlign,
    pub seg: ParamSegment,
    pub integrity: ParamIntegrity,
}

/// `struct ublksrv_io_desc`: one per tag in the read-only mmapped array.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: the payload of FETCH and COMMIT_AND_FETCH.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

/// `struct ublk_batch_io`: the payload of PREP, COMMIT and FETCH_IO_CMDS.
/// The element array is at `sqe->addr` (PREP, COMMIT); FETCH takes
/// `elem_bytes` 2 (a tag) and no flags.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchIo {
    pub q_id: u16,
    pub flags: u16,
    /// Elements in the array: at most the queue depth.
    pub nr_elem: u16,
    /// Bytes per element: 8, plus 8 for each of HAS_BUF_ADDR and HAS_ZONE_LBA.
    pub elem_bytes: u8,
    pub reserved: u8,
    pub reserved2: u64,
}

impl BatchIo {
    /// The 16 bytes that go in `sqe->cmd`.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..6].copy_from_slice(&self.nr_elem.to_ne_bytes());
        b[6] = self.elem_bytes;
        b
    }
}

/// `struct ublk_elem_header`: the first 8 bytes of every PREP/COMMIT
/// element; with HAS_BUF_ADDR a u64 buffer address follows it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchElem {
    pub tag: u16,
    /// Buffer slot the kernel registers the tag's next request at (AUTO_BUF_REG only).
    pub buf_index: u16,
    /// The request's result (COMMIT only).
    pub result: i32,
}

impl BatchElem {
    /// The element as one u64 in memory order, for an 8-byte-aligned array.
    pub fn word(&self) -> u64 {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.tag.to_ne_bytes());
        b[2..4].copy_from_slice(&self.buf_index.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        u64::from_ne_bytes(b)
    }
}

/// `ublk_auto_buf_reg.flags`: where the kernel cannot register a request's
/// pages it hands the request over with [`UBLK_IO_F_NEED_REG_BUF`]
/// instead of failing it.
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;

/// `struct ublk_auto_buf_reg`, passed in `sqe->addr`.
pub const fn auto_buf_reg(index: u16, flags: u8) -> u64 {
    index as u64 | ((flags as u64) << 16)
}

/// Byte offset of queue `q`'s descriptor array in the `/dev/ublkcN` mmap.
pub fn desc_offset(q: u16, page_size: usize) -> i64 {
    let max = UBLK_MAX_QUEUE_DEPTH as usize * size_of::<IoDesc>();
    (q as usize * max.div_ceil(page_size) * page_size) as i64
}

/// Length of one queue's descriptor mapping.
pub fn desc_len(depth: u16, page_size: usize) -> usize {
    (depth as usize * size_of::<IoDesc>()).div_ceil(page_size) * page_size
}

/// File position on `/dev/ublkcN` of byte `off` of request `(q, tag)` in user copy.
pub fn user_copy_pos(q: u16, tag: u16, off: u64) -> u64 {
    UBLKSRV_IO_BUF_OFFSET + ((q as u64) << UBLK_QID_OFF) + ((tag as u64) << UBLK_TAG_OFF) + off
}

pub fn state_name(state: u16) -> &'static str {
    match state {
        UBLK_S_DEV_DEAD => "DEAD",
        UBLK_S_DEV_LIVE => "LIVE",
        UBLK_S_DEV_QUIESCED => "QUIESCED",
        UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

const _: () = {
    assert!(size_of::<CtrlCmd>() == 32);
    assert!(offset_of!(CtrlCmd, queue_id) == 4);
    assert!(offset_of!(CtrlCmd, len) == 6);
    assert!(offset_of!(CtrlCmd, addr) == 8);
    assert!(offset_of!(CtrlCmd, data) == 16);
    assert!(offset_of!(CtrlCmd, dev_path_len) == 24);

    assert!(size_of::<DevInfo>() == 64);
    assert!(offset_of!(DevInfo, state) == 4);
    assert!(offset_of!(DevInfo, max_io_buf_bytes) == 8);
    assert!(offset_of!(DevInfo, dev_id) == 12);
    assert!(offset_of!(DevInfo, ublksrv_pid) == 16);
    assert!(offset_of!(DevInfo, flags) == 24);
    assert!(offset_of!(DevInfo, ublksrv_flags) == 32);
    assert!(offset_of!(DevInfo, owner_uid) == 40);
    assert!(offset_of!(DevInfo, reserved1) == 48);

    assert!(size_of::<ParamBasic>() == 32);
    assert!(offset_of!(ParamBasic, max_sectors) == 8);
    assert!(offset_of!(ParamBasic, dev_sectors) == 16);
    assert!(offset_of!(ParamBasic, virt_boundary_mask) == 24);
    assert!(size_of::<ParamDiscard>() == 20);
    assert!(offset_of!(ParamDiscard, max_discard_segments) == 16);
    assert!(size_of::<ParamDevt>() == 16);
    assert!(size_of::<Params>() == 152);
    assert!(offset_of!(Params, basic) == 8);
    assert!(offset_of!(Params, discard) == 40);
    assert!(offset_of!(Params, devt) == 60);
    assert!(offset_of!(Params, zoned) == 76);
    assert!(offset_of!(Params, dma) == 108);
    assert!(offset_of!(Params, seg) == 120);
    assert!(offset_of!(Params, integrity) == 136);

    assert!(size_of::<IoDesc>() == 24);
    assert!(offset_of!(IoDesc, nr_sectors) == 4);
    assert!(offset_of!(IoDesc, start_sector) == 8);
    assert!(offset_of!(IoDesc, addr) == 16);

    assert!(size_of::<IoCmd>() == 16);
    assert!(offset_of!(IoCmd, tag) == 2);
    assert!(offset_of!(IoCmd, result) == 4);
    assert!(offset_of!(IoCmd, addr) == 8);

    assert!(size_of::<BatchIo>() == 16);
    assert!(offset_of!(BatchIo, flags) == 2);
    assert!(offset_of!(BatchIo, nr_elem) == 4);
    assert!(offset_of!(BatchIo, elem_bytes) == 6);
    assert!(offset_of!(BatchIo, reserved2) == 8);
    assert!(size_of::<BatchElem>() == 8);
    assert!(offset_of!(BatchElem, buf_index) == 2);
    assert!(offset_of!(BatchElem, result) == 4);
};

/// Names of the `UBLK_F_*` bits set in `flags`, lowest first; a bit this
/// table does not know yet (a newer kernel) is `bit N`, never dropped.
pub fn flag_names(flags: u64) -> Vec<String> {
    (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|b| flags & b != 0)
        .map(|b| match FEATURES.iter().find(|(f, _, _)| *f == b) {
            Some((_, name, _)) => name.to_string(),
            None => format!("bit {}", b.trailing_zeros()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bit is named: known ones by name in bit order, unknown ones
    /// as `bit N`; the table holds each bit once.
    #[test]
    fn every_flag_bit_is_named() {
        let names = flag_names(UBLK_F_USER_COPY | UBLK_F_SUPPORT_ZERO_COPY | 1 << 21 | 1 << 63);
        assert_eq!(names, ["ZERO_COPY", "USER_COPY", "bit 21", "bit 63"]);
        assert_eq!(flag_names(UBLK_F_IO_DESC_SIZE), ["IO_DESC_SIZE"]);
        let all = FEATURES.iter().fold(0, |acc, (b, _, _)| {
            assert_eq!(acc & b, 0, "{b:#x} listed twice");
            acc | b
        });
        assert!(flag_names(all).iter().all(|n| !n.starts_with("bit ")));
    }

    /// A machine with more CPUs than 4096 gets a mask with a bit for each.
    #[test]
    fn cpu_masks_cover_every_possible_cpu() {
        for n in [1, 2, 64, 4096, 4097, 5000, 8192] {
            assert!(cpu_mask_words(n) * 64 >= n, "{n} CPUs");
            assert!(cpu_mask_words(n) >= 64);
        }
        let mut mask = vec![0u64; cpu_mask_words(5000)];
        for c in [0, 63, 64, 4999] {
            mask[c / 64] |= 1 << (c % 64);
        }
        assert_eq!(mask_cpus(&mask), vec![0, 63, 64, 4999]);
    }

    #[test]
    fn command_numbers_match_the_uapi_header() {
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xC020_7504);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_UPDATE_SIZE, 0xC020_7515);
        assert_eq!(UBLK_U_CMD_TRY_STOP_DEV, 0xC020_7517);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xC010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xC010_7521);
        assert_eq!(UBLK_U_IO_PREP_IO_CMDS, 0xC010_7525);
        assert_eq!(UBLK_U_IO_COMMIT_IO_CMDS, 0xC010_7526);
        assert_eq!(UBLK_U_IO_FETCH_IO_CMDS, 0xC010_7527);
    }

    /// The byte images match the repr(C) layouts the kernel reads.
    #[test]
    fn batch_structs_serialise_in_layout_order() {
        let io =
            BatchIo { q_id: 0x0102, flags: 0x0304, nr_elem: 0x0506, elem_bytes: 16, ..Default::default() };
        // SAFETY: BatchIo is repr(C), 16 bytes of plain data with no padding.
        let raw: [u8; 16] = unsafe { std::mem::transmute(io) };
        assert_eq!(io.bytes(), raw);
        let e = BatchElem { tag: 7, buf_index: 9, result: -5 };
        // SAFETY: BatchElem is repr(C), 8 bytes of plain data with no padding.
        let raw: u64 = unsafe { std::mem::transmute(e) };
        assert_eq!(e.word(), raw);
    }

    #[test]
    fn descriptor_offsets_use_the_max_depth_stride() {
        assert_eq!(desc_offset(0, 4096), 0);
        assert_eq!(desc_offset(1, 4096), 98304);
        assert_eq!(desc_offset(1, 65536), 131072);
        assert_eq!(desc_len(128, 4096), 4096);
        assert_eq!(desc_len(4096, 4096), 98304);
    }

    #[test]
    fn user_copy_position_packs_queue_and_tag() {
        assert_eq!(user_copy_pos(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_pos(1, 2, 512), 0x8000_0000 + (1 << 41) + (2 << 25) + 512);
    }
}
