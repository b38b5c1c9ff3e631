//! Protection information (`--integrity`, UBLK_F_INTEGRITY, Linux 7.0): the
//! device carries `metadata_size` bytes of metadata per logical block, with
//! a PI tuple at its start that the block layer generates on write and
//! verifies on read. The server only keeps the metadata beside the data and
//! hands it back; it moves through user copy at the request's position with
//! [`sys::UBLKSRV_IO_INTEGRITY_FLAG`], which is why the kernel refuses
//! integrity without UBLK_F_USER_COPY.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys;

/// A PI format: the guard's checksum and whether the reference tag is
/// checked (type 1: it is the low bits of the block's sector; type 3: it is
/// not checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PiFormat {
    /// T10-DIF, CRC16 guard, 8-byte tuple, reference tag checked.
    T10difType1,
    /// T10-DIF, CRC16 guard, 8-byte tuple, reference tag not checked.
    T10difType3,
    /// NVMe 16-byte PI, CRC64 guard, reference tag checked.
    NvmeType1,
    /// NVMe 16-byte PI, CRC64 guard, reference tag not checked.
    NvmeType3,
}

/// `LBMD_PI_CAP_REFTAG` (linux/fs.h).
const LBMD_PI_CAP_REFTAG: u32 = 1 << 1;
/// `LBMD_PI_CSUM_CRC16_T10DIF` and `LBMD_PI_CSUM_CRC64_NVME` (linux/fs.h).
const LBMD_PI_CSUM_CRC16_T10DIF: u8 = 2;
const LBMD_PI_CSUM_CRC64_NVME: u8 = 4;

impl PiFormat {
    pub const NAMES: &'static str = "t10dif-type1, t10dif-type3, nvme-type1 or nvme-type3";

    pub fn name(self) -> &'static str {
        match self {
            PiFormat::T10difType1 => "t10dif-type1",
            PiFormat::T10difType3 => "t10dif-type3",
            PiFormat::NvmeType1 => "nvme-type1",
            PiFormat::NvmeType3 => "nvme-type3",
        }
    }

    pub fn parse(s: &str) -> std::result::Result<PiFormat, String> {
        [PiFormat::T10difType1, PiFormat::T10difType3, PiFormat::NvmeType1, PiFormat::NvmeType3]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown PI format {s:?}: give {}", Self::NAMES))
    }

    /// Bytes of the PI tuple (the kernel's `pi_tuple_size`).
    pub fn tuple_size(self) -> u8 {
        match self {
            PiFormat::T10difType1 | PiFormat::T10difType3 => 8,
            PiFormat::NvmeType1 | PiFormat::NvmeType3 => 16,
        }
    }

    fn csum_type(self) -> u8 {
        match self {
            PiFormat::T10difType1 | PiFormat::T10difType3 => LBMD_PI_CSUM_CRC16_T10DIF,
            PiFormat::NvmeType1 | PiFormat::NvmeType3 => LBMD_PI_CSUM_CRC64_NVME,
        }
    }

    fn ref_tag(self) -> bool {
        matches!(self, PiFormat::T10difType1 | PiFormat::NvmeType1)
    }
}

/// A device's metadata: its PI format and the metadata bytes per logical
/// block (the tuple first, then bytes the block layer leaves alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Integrity {
    pub format: PiFormat,
    pub metadata_size: u8,
}

/// Metadata as never written: all ones. An application tag of 0xffff (and,
/// for type 3, a reference tag of all ones) is the PI escape, which the
/// block layer's verify skips, so blocks written without PI, discarded, or
/// never written read back as a disk formatted with PI returns them.
pub const UNWRITTEN: u8 = 0xff;

impl Integrity {
    /// `--integrity FORMAT` with `--metadata-size` (default: the tuple's
    /// size), checked: 8 or 16 bytes, room for the tuple.
    pub fn new(format: PiFormat, metadata_size: Option<u8>) -> Result<Integrity> {
        let size = metadata_size.unwrap_or(format.tuple_size());
        if !matches!(size, 8 | 16) || size < format.tuple_size() {
            return Err(Error::invalid(format!(
                "--metadata-size {size} cannot hold {}'s {}-byte PI tuple: give 8 or 16, at least the tuple",
                format.name(),
                format.tuple_size()
            )));
        }
        Ok(Integrity { format, metadata_size: size })
    }

    /// UBLK_PARAM_TYPE_INTEGRITY for a device of `block_size` (one PI
    /// interval per logical block).
    pub fn param(&self, block_size: u32) -> sys::ParamIntegrity {
        sys::ParamIntegrity {
            flags: if self.format.ref_tag() { LBMD_PI_CAP_REFTAG } else { 0 },
            interval_exp: block_size.trailing_zeros() as u8,
            metadata_size: self.metadata_size,
            csum_type: self.format.csum_type(),
            ..Default::default()
        }
    }

    /// Where a device's metadata is, for a device of `block_size`.
    pub fn layout(&self, block_size: u32) -> MetaLayout {
        MetaLayout { block_shift: block_size.trailing_zeros() as u8, per_block: self.metadata_size }
    }

    /// Whether the kernel's view of a device (its flags and parameters)
    /// is this one.
    pub fn same_as_kernel(this: Option<&Integrity>, flags: u64, p: &sys::Params) -> bool {
        let on = flags & sys::UBLK_F_INTEGRITY != 0 && p.types & sys::UBLK_PARAM_TYPE_INTEGRITY != 0;
        match this {
            None => !on,
            Some(i) => {
                on && p.integrity.metadata_size == i.metadata_size
                    && p.integrity.csum_type == i.format.csum_type()
                    && (p.integrity.flags & LBMD_PI_CAP_REFTAG != 0) == i.format.ref_tag()
            }
        }
    }

    pub fn describe(&self) -> String {
        format!("{} ({} bytes per block)", self.format.name(), self.metadata_size)
    }
}

/// How data bytes map to metadata bytes: `per_block` bytes for each block
/// of `1 << block_shift` bytes, in block order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    pub block_shift: u8,
    pub per_block: u8,
}

impl MetaLayout {
    /// Metadata bytes of `data` bytes of blocks (or at `data` bytes in).
    pub fn bytes(&self, data: u64) -> u64 {
        (data >> self.block_shift) * self.per_block as u64
    }

    /// Data bytes whose metadata fills `total - data` of a file of `total`
    /// bytes, if `total` is such a file's length.
    pub fn data_of(&self, total: u64) -> Option<u64> {
        let block = 1u64 << self.block_shift;
        let unit = block + self.per_block as u64;
        total.is_multiple_of(unit).then_some(total / unit * block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name_and_say_what_is_known() {
        for f in [PiFormat::T10difType1, PiFormat::T10difType3, PiFormat::NvmeType1, PiFormat::NvmeType3] {
            assert_eq!(PiFormat::parse(f.name()), Ok(f));
        }
        let err = PiFormat::parse("dif1").unwrap_err();
        assert!(err.contains("t10dif-type1") && err.contains("nvme-type3"), "{err}");
    }

    #[test]
    fn metadata_must_hold_the_tuple() {
        assert_eq!(Integrity::new(PiFormat::NvmeType1, None).unwrap().metadata_size, 16);
        assert_eq!(Integrity::new(PiFormat::T10difType1, Some(16)).unwrap().metadata_size, 16);
        for (f, size) in [(PiFormat::NvmeType1, 8), (PiFormat::T10difType3, 4), (PiFormat::T10difType1, 12)] {
            let err = Integrity::new(f, Some(size)).unwrap_err().to_string();
            assert!(err.contains("--metadata-size") && err.contains("give 8 or 16"), "{err}");
        }
    }

    /// What SET_PARAMS gets is what the kernel's `ublk_validate_params` takes.
    #[test]
    fn params_are_what_the_kernel_validates() {
        let p = Integrity::new(PiFormat::T10difType1, Some(16)).unwrap().param(4096);
        assert_eq!((p.interval_exp, p.metadata_size, p.pi_offset), (12, 16, 0));
        assert_eq!((p.csum_type, p.flags), (LBMD_PI_CSUM_CRC16_T10DIF, LBMD_PI_CAP_REFTAG));
        let p = Integrity::new(PiFormat::NvmeType3, None).unwrap().param(512);
        assert_eq!(
            (p.interval_exp, p.metadata_size, p.csum_type, p.flags),
            (9, 16, LBMD_PI_CSUM_CRC64_NVME, 0)
        );
    }

    #[test]
    fn metadata_follows_the_blocks() {
        let l = Integrity::new(PiFormat::T10difType1, None).unwrap().layout(512);
        assert_eq!(l.bytes(4096), 64);
        assert_eq!(l.bytes(1 << 20), 16384);
        assert_eq!(l.data_of((1 << 20) + 16384), Some(1 << 20));
        assert_eq!(l.data_of(1 << 20), None);
    }

    #[test]
    fn the_kernel_view_must_match() {
        let i = Integrity::new(PiFormat::NvmeType1, None).unwrap();
        let mut p = sys::Params { types: sys::UBLK_PARAM_TYPE_INTEGRITY, ..Default::default() };
        p.integrity = i.param(512);
        assert!(Integrity::same_as_kernel(Some(&i), sys::UBLK_F_INTEGRITY, &p));
        assert!(!Integrity::same_as_kernel(None, sys::UBLK_F_INTEGRITY, &p));
        assert!(!Integrity::same_as_kernel(Some(&i), 0, &p));
        let t3 = Integrity::new(PiFormat::NvmeType3, None).unwrap();
        assert!(!Integrity::same_as_kernel(Some(&t3), sys::UBLK_F_INTEGRITY, &p));
        assert!(Integrity::same_as_kernel(None, 0, &sys::Params::default()));
    }
}
