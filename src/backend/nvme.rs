//! `nvme`: every request becomes an NVMe I/O command sent through io_uring
//! passthrough (`IORING_OP_URING_CMD`, `NVME_URING_CMD_IO`) on the queue's
//! own ring, to the namespace's generic char device `/dev/ngXnY`.
//!
//! Data: in zero-copy mode the NVMe command reads or writes the request's
//! own pages in place, as fixed buffer `tag` of the queue ring (offset 0).
//! With UBLK_F_AUTO_BUF_REG (6.16+) the kernel has registered them there
//! before the request reaches us and drops them at COMMIT; otherwise
//! (UBLK_F_SUPPORT_ZERO_COPY, 6.15) a hard-linked chain registers them,
//! runs the command and unregisters them. In copy mode the command points
//! at the tag's buffer. DISCARD sends a DSM
//! deallocate whose one range lives in a per-tag slot made at queue start.
//!
//! Durability: where the namespace has a volatile write cache the device
//! advertises one too (and FUA where the namespace has it), so the block
//! layer sends FLUSH, which becomes an NVMe Flush, and FUA writes, which
//! become NVMe Writes with FUA set.
//!
//! Completion is asynchronous: `submit` pushes the command tagged with the
//! queue's `user_data` for the tag and the queue loop hands its CQE to
//! `complete` (see [`QueueBackend`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::chain::{Chains, KIND_IO, Registration};
use super::claim;
use super::limits::Limits;
use super::live_size::Resizing;
use super::{Backend, Device, DeviceBackend, Options, QueueBackend, QueueMaker};
use crate::config::{BackendKind, DeviceConfig, FileId, FileKind};
use crate::error::{Error, Result};
use crate::plan::{CopyRules, Transfer};
use crate::request::{Data, Request};
use crate::sys::{self, Params};

const NVME_URING_CMD_IO: u32 = 0xC048_4E80;
const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;
const OP_FLUSH: u8 = 0x00;
const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;
const OP_WRITE_ZEROES: u8 = 0x08;
const OP_DSM: u8 = 0x09;
const DSM_DEALLOCATE: u32 = 1 << 2;
/// Write Zeroes: deallocate the blocks too (DEAC, CDW12 bit 25).
const WZ_DEALLOCATE: u32 = 1 << 25;
/// Read/Write: Force Unit Access (FUA, CDW12 bit 30).
const RW_FUA: u32 = 1 << 30;
/// Most blocks one Read, Write or Write Zeroes names: NLB is a 0-based
/// 16-bit field (CDW12 bits 15:0).
pub const MAX_NLB: u32 = 1 << 16;

/// `struct nvme_uring_cmd` (72 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NvmeUringCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub rsvd2: u32,
}

const _: () = {
    assert!(std::mem::size_of::<NvmeUringCmd>() == 72);
    assert!(std::mem::offset_of!(NvmeUringCmd, addr) == 24);
    assert!(std::mem::offset_of!(NvmeUringCmd, data_len) == 36);
    assert!(std::mem::offset_of!(NvmeUringCmd, cdw10) == 40);
    assert!(std::mem::offset_of!(NvmeUringCmd, timeout_ms) == 64);
};

/// One DSM range (`struct nvme_dsm_range`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DsmRange {
    cattr: u32,
    nlb: u32,
    slba: u64,
}

/// What the namespace offers, read once from sysfs and the char device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub char_dev: PathBuf,
    pub nsid: u32,
    pub lba_shift: u32,
    /// Bytes the namespace holds.
    pub size: u64,
    /// Bytes the device serves, from LBA 0: its size once [`Self::probe_for`]
    /// has checked that the namespace holds them (`--size` may be smaller
    /// than the namespace), else all of it. No request reaches beyond.
    pub served: u64,
    pub max_hw_bytes: u32,
    /// Largest DSM deallocate and Write Zeroes in bytes (0: unsupported).
    pub discard_max: u64,
    pub write_zeroes_max: u64,
    /// `queue/write_cache` says "write back": acknowledged writes may sit in
    /// a cache that a power loss empties until a Flush.
    pub volatile_cache: bool,
    /// `queue/fua` is 1: a write can be made durable on its own.
    pub fua: bool,
    /// The namespace's DMA alignment and segments (`queue/`): a zero-copy
    /// request's pages go to it as they are, in one passthrough command.
    pub limits: Option<Limits>,
}

impl Namespace {
    /// Bytes one Read, Write or Write Zeroes can cover (NLB).
    pub fn max_cmd_bytes(&self) -> u64 {
        (MAX_NLB as u64) << self.lba_shift
    }

    /// Largest Write Zeroes we send, in bytes (0: none).
    pub fn write_zeroes_bytes(&self) -> u64 {
        self.write_zeroes_max.min(self.max_cmd_bytes())
    }

    /// DISCARD is sent as Write Zeroes with deallocate where the namespace
    /// has it, so discarded blocks read back as zeros (a bare DSM
    /// deallocate leaves that to the device).
    pub fn discard_max_bytes(&self) -> u64 {
        if self.write_zeroes_max > 0 { self.write_zeroes_bytes() } else { self.discard_max }
    }

    /// The cache attributes the namespace has: a volatile cache, and FUA
    /// with it (the kernel ignores FUA without a volatile cache).
    pub fn cache_attrs(&self) -> u32 {
        match (self.volatile_cache, self.fua) {
            (true, true) => sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            (true, false) => sys::UBLK_ATTR_VOLATILE_CACHE,
            (false, _) => 0,
        }
    }

    /// What the namespace dictates in a device's parameters. Every limit is
    /// clamped to what one NVMe command carries, so the block layer splits
    /// larger requests and `command` never has to refuse one.
    pub fn apply_params(&self, p: &mut Params) {
        // PRP lists need page-aligned segments; without this the NVMe driver bounces.
        p.basic.virt_boundary_mask = 4095;
        p.basic.physical_bs_shift = p.basic.physical_bs_shift.max(self.lba_shift as u8);
        p.basic.max_sectors = p.basic.max_sectors.min(sectors(self.max_cmd_bytes()));
        p.basic.attrs |= self.cache_attrs();
        p.discard.max_discard_sectors = sectors(self.discard_max_bytes());
        p.discard.max_write_zeroes_sectors = sectors(self.write_zeroes_bytes());
        if self.discard_max_bytes() == 0 {
            p.types &= !sys::UBLK_PARAM_TYPE_DISCARD;
        }
        if let Some(l) = &self.limits {
            l.apply(p);
        }
    }
}

/// Bytes to 512-byte sectors, saturating at the u32 of a limit field.
fn sectors(bytes: u64) -> u32 {
    (bytes >> 9).min(u32::MAX as u64) as u32
}

/// `--dev` with every symlink resolved (`/dev/disk/by-id/nvme-...` names
/// `/dev/nvme0n1`), so the generic node is derived from the real name.
fn resolve(dev: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(dev).map_err(|e| {
        Error::invalid(format!(
            "--dev {}: {e}: give an NVMe namespace node (/dev/ngXnY or /dev/nvmeXnY) or a symlink to one",
            dev.display()
        ))
    })
}

/// `/dev/nvme0n1` → `/dev/ng0n1`; `/dev/ng0n1` stays.
pub fn generic_path(dev: &Path) -> Result<PathBuf> {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Some(rest) = name.strip_prefix("nvme").filter(|r| r.contains('n') && !r.contains('p')) {
        return Ok(dev.with_file_name(format!("ng{rest}")));
    }
    if name.starts_with("ng") {
        return Ok(dev.to_owned());
    }
    Err(Error::invalid(format!(
        "{} is not an NVMe namespace: give --dev /dev/ngXnY (or /dev/nvmeXnY)",
        dev.display()
    )))
}

impl Namespace {
    /// Opens the namespace `cfg` names (`--dev`) to serve the device: the
    /// generic node `add` resolved, by that name (a link there is not
    /// followed), and only if it is still the character device the device
    /// was made with. A new device's server and a recovering one's both come
    /// here, and both find the namespace as `add` left it or refuse to serve.
    pub fn probe_for(cfg: &DeviceConfig) -> Result<(Self, File)> {
        let dev = cfg.nvme_dev.as_deref().ok_or_else(|| Error::invalid("nvme backend without --dev"))?;
        let (ns, file) = Self::open_node(dev.to_owned(), cfg.backing_id.as_ref(), cfg.dev_id)?;
        Ok((ns.serving(cfg.size, cfg.block_size)?, file))
    }

    /// The namespace limited to the device's first `size` bytes, if it still
    /// holds them in LBAs that a `block_size` request covers whole; a
    /// namespace that shrank or was reformatted with larger LBAs since the
    /// device was made cannot serve it.
    pub fn serving(mut self, size: u64, block_size: u32) -> Result<Self> {
        let name = self.char_dev.display();
        if self.size < size {
            return Err(Error::invalid(format!(
                "{name} now holds {} bytes, less than the device's {size}: restore the namespace or delete the device",
                self.size
            )));
        }
        if (1u64 << self.lba_shift) > block_size as u64 {
            return Err(Error::invalid(format!(
                "{name} now has {}-byte LBAs, larger than the device's {block_size}-byte blocks: \
                 reformat it back or delete the device",
                1u64 << self.lba_shift
            )));
        }
        self.served = size;
        Ok(self)
    }

    /// Opens `--dev` (links resolved) as `add` does.
    pub fn probe(dev: &Path) -> Result<(Self, File)> {
        Self::open_node(generic_path(&resolve(dev)?)?, None, None)
    }

    fn open_node(char_dev: PathBuf, want: Option<&FileId>, dev_id: Option<u32>) -> Result<(Self, File)> {
        let found = claim::find(&char_dev).map_err(|e| {
            Error::io(
                format!("{} (is the nvme driver loaded and the namespace present?)", char_dev.display()),
                e,
            )
        })?;
        found.check(want, dev_id)?;
        if found.id.kind != FileKind::Char {
            return Err(Error::invalid(format!(
                "{} is not a character device: give the generic namespace node /dev/ngXnY",
                char_dev.display()
            )));
        }
        let file = found
            .open(libc::O_RDWR | libc::O_CLOEXEC)
            .map_err(|e| Error::io(format!("open {}", char_dev.display()), e))?;
        // SAFETY: NVME_IOCTL_ID takes no argument and returns the nsid.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID) };
        if nsid <= 0 {
            return Err(Error::io("NVME_IOCTL_ID", std::io::Error::last_os_error()));
        }
        let sysfs = Path::new("/sys/block").join(block_name(&char_dev));
        let ns = Namespace::from_sysfs(char_dev, nsid as u32, &sysfs)?;
        Ok((ns, file))
    }

    /// Reads the namespace's limits from `sysfs` (`/sys/block/nvmeXnY`).
    fn from_sysfs(char_dev: PathBuf, nsid: u32, sysfs: &Path) -> Result<Self> {
        let block = sysfs.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let file = |f: &str| sysfs.join(f).to_string_lossy().into_owned();
        let q = |f: &str| read_u64(&file(&format!("queue/{f}")));
        let lbs = q("logical_block_size")?;
        if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
            return Err(Error::invalid(format!(
                "{block} uses {lbs}-byte LBAs: only 512 to 4096 are supported (reformat the namespace)"
            )));
        }
        // Passthrough commands carry no metadata buffer, so a format with
        // per-LBA metadata would fail every I/O.
        let meta = read_u64(&file("metadata_bytes")).unwrap_or(0);
        if meta > 0 {
            return Err(Error::invalid(format!(
                "{block} has {meta} bytes of metadata per LBA, which this backend cannot send: \
                 reformat the namespace to an LBA format without metadata"
            )));
        }
        let size = read_u64(&file("size"))? << 9;
        Ok(Namespace {
            char_dev,
            nsid,
            lba_shift: lbs.trailing_zeros(),
            size,
            served: size,
            max_hw_bytes: (q("max_hw_sectors_kb")? << 10).min(u32::MAX as u64) as u32,
            discard_max: q("discard_max_bytes").unwrap_or(0),
            write_zeroes_max: q("write_zeroes_max_bytes").unwrap_or(0),
            volatile_cache: read_write_cache(&file("queue/write_cache"))?,
            fua: q("fua").unwrap_or(0) == 1,
            limits: Limits::from_queue(&sysfs.join("queue")),
        })
    }
}

/// `queue/write_cache`: "write back" (volatile cache) or "write through".
fn read_write_cache(path: &str) -> Result<bool> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {path}"), e))?;
    match s.trim() {
        "write back" => Ok(true),
        "write through" => Ok(false),
        other => Err(Error::Refused(format!("{path}: unknown cache mode {other:?}"))),
    }
}

fn block_name(char_dev: &Path) -> String {
    let name = char_dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    format!("nvme{}", name.trim_start_matches("ng"))
}

fn read_u64(path: &str) -> Result<u64> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {path}"), e))?;
    s.trim().parse().map_err(|_| Error::Refused(format!("{path}: not a number")))
}

/// NVMe status (CQE res > 0) to the errno a block-layer client should see.
pub fn status_to_errno(status: i32) -> i32 {
    let (sct, sc) = ((status >> 8) & 0x7, status & 0xff);
    match (sct, sc) {
        (0, 0x02) => -libc::EINVAL, // invalid field
        (0, 0x0b) => -libc::EINVAL, // invalid namespace or format
        (0, 0x80) => -libc::ENOSPC, // LBA out of range
        (0, 0x81) => -libc::ENOSPC, // capacity exceeded
        (1, 0x80..=0x82) => -libc::ENOSPC,
        (2, 0x86) => -libc::EACCES,     // access denied
        (2, 0x87) => -libc::ENODATA,    // deallocated or unwritten
        (2, _) => -libc::EIO,           // media and data integrity errors
        (0, 0x01) => -libc::EOPNOTSUPP, // invalid opcode
        _ => -libc::EIO,
    }
}

/// NLB (0-based) for `nlb` blocks; -EINVAL for none or more than fit.
/// `apply_params` keeps the block layer's requests within MAX_NLB.
fn nlb_field(nlb: u32) -> std::result::Result<u32, i32> {
    match nlb {
        1..=MAX_NLB => Ok(nlb - 1),
        _ => Err(-libc::EINVAL),
    }
}

/// One queue's handle on the namespace.
pub struct NvmeQueue {
    ns: Arc<Namespace>,
    file: Arc<File>,
    ranges: Vec<DsmRange>,
    /// Each tag's commands in flight; the bytes a request moved are its
    /// result at completion.
    chains: Chains,
}

impl NvmeQueue {
    pub fn new(ns: Arc<Namespace>, file: Arc<File>, depth: u16) -> Self {
        let d = depth as usize;
        NvmeQueue { ns, file, ranges: vec![DsmRange::default(); d], chains: Chains::new(depth) }
    }

    fn command(
        &mut self,
        tag: u16,
        req: &Request,
        data: &Data<'_>,
    ) -> std::result::Result<NvmeUringCmd, i32> {
        // A FLUSH carries no range: its sector is whatever the block layer
        // left there (blk_rq_init sets it to -1, which is no whole LBA).
        if req.op == sys::UBLK_IO_OP_FLUSH {
            return Ok(NvmeUringCmd { opcode: OP_FLUSH, nsid: self.ns.nsid, ..Default::default() });
        }
        if req.offset.checked_add(req.len as u64).is_none_or(|end| end > self.ns.served) {
            return Err(-libc::EINVAL);
        }
        let shift = self.ns.lba_shift;
        // A range that is not whole LBAs would be cut short, not refused.
        if (req.offset | req.len as u64) & ((1 << shift) - 1) != 0 {
            return Err(-libc::EINVAL);
        }
        let (slba, nlb) = (req.offset >> shift, req.len >> shift);
        let mut c = NvmeUringCmd {
            nsid: self.ns.nsid,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            ..Default::default()
        };
        match req.op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => {
                c.opcode = if req.op == sys::UBLK_IO_OP_READ { OP_READ } else { OP_WRITE };
                c.cdw12 = nlb_field(nlb)?;
                if req.op == sys::UBLK_IO_OP_WRITE && req.flags & sys::UBLK_IO_F_FUA != 0 {
                    c.cdw12 |= RW_FUA;
                }
                c.data_len = req.len;
                c.addr = match data {
                    // The device moves data_len bytes at addr: all must be the tag's.
                    Data::Buf(b) if b.len() >= req.len as usize => b.as_ptr() as u64,
                    Data::Fixed { .. } | Data::Registered { .. } => 0,
                    _ => return Err(-libc::EINVAL),
                };
            }
            sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_OP_DISCARD if self.ns.write_zeroes_max > 0 => {
                c.opcode = OP_WRITE_ZEROES;
                c.cdw12 = nlb_field(nlb)?;
                if req.op == sys::UBLK_IO_OP_DISCARD {
                    c.cdw12 |= WZ_DEALLOCATE;
                }
            }
            sys::UBLK_IO_OP_DISCARD if self.ns.discard_max > 0 => {
                self.ranges[tag as usize] = DsmRange { cattr: 0, nlb, slba };
                c = NvmeUringCmd {
                    opcode: OP_DSM,
                    nsid: self.ns.nsid,
                    addr: &self.ranges[tag as usize] as *const DsmRange as u64,
                    data_len: std::mem::size_of::<DsmRange>() as u32,
                    cdw10: 0,
                    cdw11: DSM_DEALLOCATE,
                    ..Default::default()
                };
            }
            _ => return Err(-libc::EOPNOTSUPP),
        }
        Ok(c)
    }
}

impl QueueBackend for NvmeQueue {
    /// NVMe passthrough needs SQE128 and CQE32.
    type Sqe = squeue::Entry128;
    type Cqe = io_uring::cqueue::Entry32;
    /// Zero copy without AUTO_BUF_REG: REGISTER_IO_BUF, the command, UNREGISTER_IO_BUF.
    const MAX_COMMANDS: u32 = 3;

    /// Pushes the NVMe command for `tag`; Some(result) if it failed at once.
    ///
    /// Zero copy with data is a hard-linked chain of three: REGISTER_IO_BUF
    /// puts the request's pages at slot `index` of this ring, the NVMe
    /// command uses them as a fixed buffer, UNREGISTER_IO_BUF drops them.
    /// The request is committed once all three CQEs are in.
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut io_uring::SubmissionQueue<'_, squeue::Entry128>,
        ud: u64,
    ) -> Option<i32> {
        let cmd = match self.command(tag, req, &data) {
            Ok(c) => c,
            Err(e) => return Some(e),
        };
        let len = match req.op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => req.len,
            _ => 0,
        };
        // Only READ and WRITE carry pages to register.
        let reg = match data {
            Data::Fixed { index, char_fd, qid, tag } if len > 0 => {
                Some(Registration { char_fd, qid, tag, index })
            }
            _ => None,
        };
        let registered = match data {
            Data::Registered { index } if len > 0 => Some(index),
            _ => None,
        };
        let mut nvme = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), NVME_URING_CMD_IO)
            .cmd(nvme_payload(&cmd));
        if let Some(index) = reg.map(|r| r.index).or(registered) {
            nvme = nvme.buf_index(Some(index));
        }
        let nvme = nvme.build().user_data(ud | KIND_IO);
        // SAFETY: the command's data (tag buffer, kernel-registered request
        // pages, or this queue's DSM range slot) stays valid until its CQE:
        // the tag is not reused before we COMMIT it, after the last CQE.
        unsafe { self.chains.push(sq, (tag, len), nvme, reg, ud) }
    }

    /// Takes one CQE of `tag`'s chain; the COMMIT result once all are in.
    fn complete(&mut self, tag: u16, kind: u64, res: i32) -> Option<i32> {
        self.chains.complete(tag, kind, res, |res, len| match res {
            0 => len as i32,
            s if s > 0 => status_to_errno(s),
            e => e,
        })
    }
}

fn nvme_payload(cmd: &NvmeUringCmd) -> [u8; 80] {
    let mut payload = [0u8; 80];
    // SAFETY: NvmeUringCmd is repr(C), 72 bytes of plain data.
    unsafe { std::ptr::copy_nonoverlapping(cmd as *const _ as *const u8, payload.as_mut_ptr(), 72) };
    payload
}

/// The `nvme` backend: `--dev` names the namespace it passes requests to.
pub struct Nvme;

/// An nvme device's namespace and its generic node, opened.
pub struct NvmeDevice {
    ns: Arc<Namespace>,
    file: Arc<File>,
}

impl Backend for Nvme {
    fn kind(&self) -> BackendKind {
        BackendKind::Nvme
    }

    fn name(&self) -> &'static str {
        "nvme"
    }

    fn default_size(&self) -> Option<u64> {
        None
    }

    fn copy_rules(&self) -> &'static CopyRules {
        &CopyRules {
            backend: "nvme",
            auto: &[Transfer::Zero, Transfer::Copy],
            refused: &[(Transfer::User, "would add a bounce copy")],
        }
    }

    fn options(&self) -> &'static [&'static str] {
        &["--dev"]
    }

    fn resizing(&self, dev_id: u32, _cfg: &DeviceConfig) -> Result<Resizing> {
        Err(Error::invalid(format!(
            "device {dev_id} serves an NVMe namespace, whose size is the namespace's: resize takes null, ram \
             and file devices; make a new nvme device with the --size wanted"
        )))
    }

    fn needs(&self, o: &Options<'_>) -> Result<()> {
        match o.dev {
            Some(_) => Ok(()),
            None => Err(Error::invalid("the nvme backend needs --dev /dev/ngXnY")),
        }
    }

    /// Size, block size and request size come from the namespace.
    fn configure(&self, cfg: &mut DeviceConfig, o: &Options<'_>) -> Result<()> {
        let dev = o.dev.expect("needs() wants --dev");
        let (ns, file) = Namespace::probe(dev)?;
        let meta = file.metadata().map_err(|e| Error::io(format!("stat {}", ns.char_dev.display()), e))?;
        cfg.backing_id = Some(FileId::of(&meta));
        if o.size.is_some_and(|s| s > ns.size) {
            return Err(Error::invalid(format!("--size exceeds the namespace ({} bytes)", ns.size)));
        }
        cfg.size = o.size.unwrap_or(ns.size);
        cfg.block_size = 1 << ns.lba_shift;
        // No buffer larger than one NVMe command carries (NLB).
        cfg.max_io_bytes =
            cfg.max_io_bytes.min(ns.max_hw_bytes).min(ns.max_cmd_bytes().min(u32::MAX as u64) as u32);
        cfg.nvme_dev = Some(ns.char_dev);
        Ok(())
    }

    fn claimed_path<'a>(&self, cfg: &'a DeviceConfig) -> Option<&'a Path> {
        cfg.nvme_dev.as_deref()
    }

    /// The namespace's limits, cache and DMA alignment.
    fn params(&self, cfg: &DeviceConfig, p: &mut Params) -> Result<()> {
        Namespace::probe_for(cfg)?.0.apply_params(p);
        Ok(())
    }

    fn open(&self, cfg: &mut DeviceConfig, _transfer: Transfer, _create: bool) -> Result<DeviceBackend> {
        let (ns, file) = Namespace::probe_for(cfg)?;
        Ok(DeviceBackend::Nvme(NvmeDevice { ns: Arc::new(ns), file: Arc::new(file) }))
    }
}

impl Device for NvmeDevice {
    fn served_file(&self) -> Option<(&File, &Path)> {
        Some((&self.file, &self.ns.char_dev))
    }

    fn with_queue<M: QueueMaker>(&self, depth: u16, m: M) -> M::Out {
        m.make(NvmeQueue::new(self.ns.clone(), self.file.clone(), depth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_paths_map_to_the_generic_node() {
        assert_eq!(generic_path(Path::new("/dev/nvme0n1")).unwrap(), PathBuf::from("/dev/ng0n1"));
        assert_eq!(generic_path(Path::new("/dev/ng1n2")).unwrap(), PathBuf::from("/dev/ng1n2"));
        assert!(generic_path(Path::new("/dev/nvme0n1p1")).is_err());
        assert!(generic_path(Path::new("/dev/sda")).is_err());
        assert_eq!(block_name(Path::new("/dev/ng0n1")), "nvme0n1");
    }

    #[test]
    fn nvme_status_maps_to_errno() {
        assert_eq!(status_to_errno(0x80), -libc::ENOSPC);
        assert_eq!(status_to_errno(0x2), -libc::EINVAL);
        assert_eq!(status_to_errno(0x281), -libc::EIO);
        assert_eq!(status_to_errno(0x7ff), -libc::EIO);
    }

    fn namespace() -> Namespace {
        Namespace {
            char_dev: "/dev/null".into(),
            nsid: 1,
            lba_shift: 9,
            size: 1 << 34,
            served: 1 << 34,
            max_hw_bytes: 1 << 20,
            discard_max: 1 << 30,
            write_zeroes_max: 0,
            volatile_cache: true,
            fua: true,
            limits: None,
        }
    }

    fn queue() -> NvmeQueue {
        NvmeQueue::new(Arc::new(namespace()), Arc::new(File::open("/dev/null").unwrap()), 4)
    }

    fn request(op: u8, flags: u32, offset: u64, len: u32) -> Request {
        Request { op, flags, offset, len }
    }

    #[test]
    fn requests_become_nvme_commands() {
        let mut q = queue();
        let r = Request { op: sys::UBLK_IO_OP_READ, flags: 0, offset: 4096 * 3 + (1u64 << 33), len: 8192 };
        let c = q.command(0, &r, &Data::Fixed { index: 0, char_fd: -1, qid: 0, tag: 0 }).unwrap();
        assert_eq!((c.opcode, c.nsid, c.addr, c.data_len, c.cdw12), (OP_READ, 1, 0, 8192, 15));
        assert_eq!(((c.cdw11 as u64) << 32) | c.cdw10 as u64, r.offset >> 9);
        let d = Request { op: sys::UBLK_IO_OP_DISCARD, flags: 0, offset: 1 << 20, len: 1 << 20 };
        let c = q.command(2, &d, &Data::None).unwrap();
        assert_eq!((c.opcode, c.cdw11, c.data_len), (OP_DSM, DSM_DEALLOCATE, 16));
        assert_eq!((q.ranges[2].slba, q.ranges[2].nlb), (2048, 2048));
        let z = Request { op: sys::UBLK_IO_OP_WRITE_ZEROES, flags: 0, offset: 0, len: 4096 };
        assert_eq!(q.command(1, &z, &Data::None).unwrap_err(), -libc::EOPNOTSUPP);
        // With Write Zeroes, DISCARD becomes Write Zeroes with deallocate.
        Arc::get_mut(&mut q.ns).unwrap().write_zeroes_max = 1 << 20;
        assert_eq!(q.command(1, &z, &Data::None).unwrap().cdw12, 7);
        let c = q.command(2, &d, &Data::None).unwrap();
        assert_eq!((c.opcode, c.cdw12), (OP_WRITE_ZEROES, 2047 | WZ_DEALLOCATE));
    }

    #[test]
    fn fua_writes_set_the_fua_bit_and_flush_is_a_flush() {
        let mut q = queue();
        let data = Data::Registered { index: 0 };
        let desc = sys::IoDesc {
            op_flags: sys::UBLK_IO_OP_WRITE as u32 | sys::UBLK_IO_F_FUA,
            nr_sectors: 8,
            start_sector: 16,
            addr: 0,
        };
        let fua = Request::from_desc(&desc);
        assert_eq!(
            (fua.op, fua.flags, fua.offset, fua.len),
            (sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8192, 4096)
        );
        let c = q.command(0, &fua, &data).unwrap();
        assert_eq!((c.opcode, c.cdw12), (OP_WRITE, RW_FUA | 7));
        // Other flags (FAILFAST_DEV, bit 8) do not pass for FUA.
        let plain = request(sys::UBLK_IO_OP_WRITE, 1 << 8, 8192, 4096);
        assert_eq!(q.command(0, &plain, &data).unwrap().cdw12, 7);
        // FUA only means something on a write.
        let read = request(sys::UBLK_IO_OP_READ, sys::UBLK_IO_F_FUA, 8192, 4096);
        assert_eq!(q.command(0, &read, &data).unwrap().cdw12, 7);
        let flush = q.command(1, &request(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), &Data::None).unwrap();
        assert_eq!(
            (flush.opcode, flush.nsid, flush.cdw10, flush.cdw12, flush.data_len),
            (OP_FLUSH, 1, 0, 0, 0)
        );
    }

    #[test]
    fn block_counts_beyond_the_nlb_field_are_refused_not_truncated() {
        let mut q = queue();
        Arc::get_mut(&mut q.ns).unwrap().write_zeroes_max = 1 << 30;
        let data = Data::Registered { index: 0 };
        let most = MAX_NLB << 9;
        for op in [
            sys::UBLK_IO_OP_READ,
            sys::UBLK_IO_OP_WRITE,
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_OP_DISCARD,
        ] {
            let c = q.command(0, &request(op, 0, 0, most), &data).unwrap();
            assert_eq!(c.cdw12 & 0xffff, 0xffff, "op {op}: {MAX_NLB} blocks");
            let too_many = request(op, 0, 0, most + 512);
            assert_eq!(q.command(0, &too_many, &data).unwrap_err(), -libc::EINVAL, "op {op}");
            assert_eq!(q.command(0, &request(op, 0, 0, 0), &data).unwrap_err(), -libc::EINVAL, "op {op}");
        }
        // With 4 KiB LBAs the same field covers 256 MiB; a partial LBA is refused.
        Arc::get_mut(&mut q.ns).unwrap().lba_shift = 12;
        let c = q.command(0, &request(sys::UBLK_IO_OP_READ, 0, 4096, 8192), &data).unwrap();
        assert_eq!((c.cdw10, c.cdw12), (1, 1));
        let part = request(sys::UBLK_IO_OP_WRITE, 0, 4096, 6144);
        assert_eq!(q.command(0, &part, &data).unwrap_err(), -libc::EINVAL);
        let off = request(sys::UBLK_IO_OP_WRITE, 0, 512, 4096);
        assert_eq!(q.command(0, &off, &data).unwrap_err(), -libc::EINVAL);
    }

    fn desc(op: u8, start_sector: u64, nr_sectors: u32) -> sys::IoDesc {
        sys::IoDesc { op_flags: op as u32, nr_sectors, start_sector, addr: 0 }
    }

    /// The block layer's FLUSH names sector -1 (no sector): on a namespace
    /// of 4 KiB LBAs that is no whole LBA, and a FLUSH refused for it fails
    /// every fsync.
    #[test]
    fn flush_is_sent_whatever_sector_it_names_on_every_lba_size() {
        for shift in [9, 12] {
            let mut q = queue();
            Arc::get_mut(&mut q.ns).unwrap().lba_shift = shift;
            for sector in [u64::MAX, 0, 7, u64::MAX >> 9] {
                let flush = Request::from_desc(&desc(sys::UBLK_IO_OP_FLUSH, sector, 0));
                let c = q.command(0, &flush, &Data::None);
                assert_eq!(
                    c.map(|c| (c.opcode, c.nsid, c.cdw10, c.cdw11)),
                    Ok((OP_FLUSH, 1, 0, 0)),
                    "{shift} {sector}"
                );
            }
        }
    }

    /// `--size` smaller than the namespace: the bytes past it are not the
    /// device's, whatever the namespace holds there.
    #[test]
    fn requests_past_the_device_size_are_refused() {
        let mut q = queue();
        let ns = Arc::get_mut(&mut q.ns).unwrap();
        ns.write_zeroes_max = 1 << 20;
        ns.served = 64 << 20;
        let data = Data::Registered { index: 0 };
        let end = 64u64 << 20;
        for op in [
            sys::UBLK_IO_OP_READ,
            sys::UBLK_IO_OP_WRITE,
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_OP_DISCARD,
        ] {
            assert!(q.command(0, &request(op, 0, end - 4096, 4096), &data).is_ok(), "op {op}: last block");
            for (offset, len) in [(end, 4096), (end - 4096, 8192), (1 << 30, 4096), (u64::MAX - 511, 4096)] {
                let r = request(op, 0, offset, len);
                assert_eq!(
                    q.command(0, &r, &data).unwrap_err(),
                    -libc::EINVAL,
                    "op {op} at {offset} len {len}"
                );
            }
            // Sector counts that overflow u32 bytes do not wrap into range.
            let huge = Request::from_desc(&desc(op, 8, 1 << 23));
            assert_eq!(q.command(0, &huge, &data).unwrap_err(), -libc::EINVAL, "op {op}: 2^23 sectors");
        }
    }

    /// A namespace that no longer holds the device (it shrank, or its LBAs
    /// grew past the device's blocks) is refused; one that does serves the
    /// device's size, not its own.
    #[test]
    fn serving_checks_the_namespace_still_holds_the_device() {
        let ns = namespace().serving(64 << 20, 512).unwrap();
        assert_eq!((ns.size, ns.served), (1 << 34, 64 << 20));
        assert_eq!(namespace().serving(1 << 34, 4096).unwrap().served, 1 << 34);
        let err = namespace().serving((1 << 34) + 4096, 512).unwrap_err().to_string();
        assert!(err.contains("17179869184 bytes") && err.contains("17179873280"), "{err}");
        let mut ns = namespace();
        ns.lba_shift = 12;
        let err = ns.serving(64 << 20, 512).unwrap_err().to_string();
        assert!(err.contains("4096-byte LBAs") && err.contains("512-byte blocks"), "{err}");
    }

    /// Copy mode: the NVMe command moves `data_len` bytes at the tag's
    /// buffer, so a request longer than that buffer is refused, not sent.
    #[test]
    fn copy_mode_requests_longer_than_the_tag_buffer_are_refused() {
        let mut q = queue();
        let mut buf = vec![0u8; 8192];
        let addr = buf.as_ptr() as u64;
        for op in [sys::UBLK_IO_OP_READ, sys::UBLK_IO_OP_WRITE] {
            let c = q.command(0, &request(op, 0, 4096, 8192), &Data::Buf(&mut buf)).unwrap();
            assert_eq!((c.addr, c.data_len), (addr, 8192), "op {op}");
            let long = request(op, 0, 4096, 12288);
            assert_eq!(q.command(0, &long, &Data::Buf(&mut buf)).unwrap_err(), -libc::EINVAL, "op {op}");
        }
    }

    fn params(max_sectors: u32) -> Params {
        let mut p =
            Params { types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD, ..Default::default() };
        p.basic.physical_bs_shift = 12;
        p.basic.max_sectors = max_sectors;
        p.discard.max_discard_sectors = u32::MAX >> 9;
        p.discard.max_write_zeroes_sectors = u32::MAX >> 9;
        p
    }

    #[test]
    fn params_keep_every_request_within_one_command() {
        // 512-byte LBAs: one command is at most 32 MiB; the namespace's
        // Write Zeroes limit is larger, so ours is clamped to it.
        let mut ns = namespace();
        ns.write_zeroes_max = 1 << 30;
        let mut p = params(u32::MAX);
        ns.apply_params(&mut p);
        let limit = MAX_NLB;
        assert_eq!((p.basic.max_sectors, p.discard.max_write_zeroes_sectors), (limit, limit));
        assert_eq!(p.discard.max_discard_sectors, limit, "DISCARD goes as Write Zeroes");
        assert_eq!(p.basic.virt_boundary_mask, 4095);
        // A smaller request limit stays; without Write Zeroes, DISCARD is a
        // DSM whose 32-bit count the namespace's own limit bounds.
        ns.write_zeroes_max = 0;
        let mut p = params(1024);
        ns.apply_params(&mut p);
        assert_eq!((p.basic.max_sectors, p.discard.max_write_zeroes_sectors), (1024, 0));
        assert_eq!(p.discard.max_discard_sectors, (1u32 << 30) >> 9);
        // Neither: no DISCARD parameters at all.
        ns.discard_max = 0;
        let mut p = params(1024);
        ns.apply_params(&mut p);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        // 4 KiB LBAs: 256 MiB per command, and the physical block follows.
        ns.lba_shift = 12;
        ns.write_zeroes_max = 1 << 30;
        let mut p = params(u32::MAX);
        ns.apply_params(&mut p);
        assert_eq!((p.basic.max_sectors, p.discard.max_write_zeroes_sectors), (MAX_NLB << 3, MAX_NLB << 3));
    }

    #[test]
    fn cache_attributes_follow_the_namespace() {
        let mut ns = namespace();
        let attrs = |ns: &Namespace| {
            let mut p = params(1024);
            ns.apply_params(&mut p);
            p.basic.attrs
        };
        assert_eq!(attrs(&ns), sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        ns.fua = false;
        assert_eq!(attrs(&ns), sys::UBLK_ATTR_VOLATILE_CACHE);
        ns.volatile_cache = false;
        assert_eq!(attrs(&ns), 0);
        ns.fua = true;
        assert_eq!(attrs(&ns), 0, "FUA without a volatile cache is not advertised");
    }

    /// A fake `/sys/block/nvme0n1` with the files `from_sysfs` reads.
    fn fake_sysfs(cache: &str, fua: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("nvme0n1");
        std::fs::create_dir_all(ns.join("queue")).unwrap();
        std::fs::write(ns.join("size"), "2097152\n").unwrap();
        for (f, v) in [
            ("logical_block_size", "512"),
            ("max_hw_sectors_kb", "512"),
            ("discard_max_bytes", "2147483136"),
            ("write_zeroes_max_bytes", "524288"),
            ("write_cache", cache),
            ("fua", fua),
        ] {
            std::fs::write(ns.join("queue").join(f), format!("{v}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn sysfs_cache_mode_and_fua_are_read() {
        let read = |cache, fua| {
            let dir = fake_sysfs(cache, fua);
            Namespace::from_sysfs("/dev/ng0n1".into(), 1, &dir.path().join("nvme0n1"))
        };
        let ns = read("write back", "1").unwrap();
        assert_eq!((ns.volatile_cache, ns.fua, ns.size, ns.max_hw_bytes), (true, true, 1 << 30, 512 << 10));
        let ns = read("write through", "0").unwrap();
        assert_eq!((ns.volatile_cache, ns.fua), (false, false));
        let err = read("sometimes", "0").unwrap_err().to_string();
        assert!(err.contains("write_cache") && err.contains("sometimes"), "{err}");
    }

    #[test]
    fn dev_symlinks_resolve_before_the_generic_node_is_derived() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nvme3n2");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("nvme-by-id-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let real = resolve(&link).unwrap();
        assert_eq!(generic_path(&real).unwrap(), real.with_file_name("ng3n2"));
        let missing = dir.path().join("nvme9n9");
        let err = resolve(&missing).unwrap_err().to_string();
        assert!(
            err.contains("nvme9n9") && err.contains("No such file") && err.contains("/dev/ngXnY"),
            "{err}"
        );
    }
}
