//! What a backing block device accepts of one request's memory: its DMA
//! alignment and how many segments of what size. In zero copy (and with
//! `file --direct`) a request's own pages go to the backing device, and an
//! NVMe passthrough command cannot be split on the way, so the ublk device
//! advertises the same limits (UBLK_PARAM_TYPE_DMA_ALIGN and _SEGMENT):
//! whatever the kernel accepts on `/dev/ublkbN`, the backing device takes.

use std::path::{Path, PathBuf};

use crate::sys::{self, Params};

/// The largest DMA alignment mask the kernel takes: below a page.
const MAX_DMA_MASK: u32 = 4095;
/// The block layer's default segment boundary (BLK_SEG_BOUNDARY_MASK); the
/// backing device's is not in sysfs.
const SEG_BOUNDARY: u64 = 0xffff_ffff;

/// A block device's queue limits as sysfs shows them (`queue/`): what a
/// client's O_DIRECT I/O on it must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueLimits {
    pub logical_block_size: u32,
    /// Mask a buffer's address and length must clear.
    pub dma_alignment: u32,
    pub max_segments: u32,
    pub max_segment_size: u64,
}

impl QueueLimits {
    /// From a block device's `queue` folder; None where a file is missing.
    pub fn read(queue: &Path) -> Option<QueueLimits> {
        let read = |f: &str| std::fs::read_to_string(queue.join(f)).ok()?.trim().parse::<u64>().ok();
        Some(QueueLimits {
            logical_block_size: read("logical_block_size")? as u32,
            dma_alignment: read("dma_alignment")? as u32,
            max_segments: read("max_segments")? as u32,
            max_segment_size: read("max_segment_size")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Mask a buffer's address and length must clear (`queue/dma_alignment`).
    pub dma_alignment: u32,
    /// None: only the alignment is known (a regular file's O_DIRECT rule).
    pub segments: Option<(u16, u32)>,
}

impl Limits {
    /// A block device's, from its `queue` folder in sysfs, clamped to what
    /// the parameters can carry.
    pub fn from_queue(queue: &Path) -> Option<Limits> {
        let q = QueueLimits::read(queue)?;
        Some(Limits {
            dma_alignment: q.dma_alignment.min(MAX_DMA_MASK),
            segments: Some((
                q.max_segments.clamp(1, u16::MAX as u32) as u16,
                q.max_segment_size.min(u32::MAX as u64) as u32,
            )),
        })
    }

    /// The block device `rdev`'s (a partition's are its disk's).
    pub fn of_block_device(rdev: u64) -> Option<Limits> {
        let dir = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
        Self::from_queue(&dir.join("queue")).or_else(|| Self::from_queue(&dir.join("../queue")))
    }

    /// A regular file's O_DIRECT memory alignment (statx STATX_DIOALIGN).
    pub fn of_direct_file(mem_align: u32) -> Option<Limits> {
        (mem_align.is_power_of_two() && mem_align > 0)
            .then(|| Limits { dma_alignment: (mem_align - 1).min(MAX_DMA_MASK), segments: None })
    }

    /// Advertises these limits in a device's parameters. The kernel wants a
    /// segment at least 4 KiB long; a device with a virtual boundary (NVMe)
    /// has an unlimited segment size, which is passed on as it is.
    pub fn apply(&self, p: &mut Params) {
        p.types |= sys::UBLK_PARAM_TYPE_DMA_ALIGN;
        p.dma.alignment = self.dma_alignment;
        if let Some((max_segments, max_segment_size)) = self.segments {
            p.types |= sys::UBLK_PARAM_TYPE_SEGMENT;
            p.seg.seg_boundary_mask = SEG_BOUNDARY;
            p.seg.max_segments = max_segments;
            p.seg.max_segment_size = max_segment_size.max(4096);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (f, v) in files {
            std::fs::write(dir.path().join(f), format!("{v}\n")).unwrap();
        }
        dir
    }

    /// An NVMe namespace's limits as sysfs has them reach the parameters
    /// as the kernel validates them: mask below a page, segment >= 4 KiB.
    #[test]
    fn a_block_devices_limits_become_the_parameters() {
        let q = queue(&[
            ("logical_block_size", "512"),
            ("dma_alignment", "3"),
            ("max_segments", "33"),
            ("max_segment_size", "4294967295"),
        ]);
        let l = Limits::from_queue(q.path()).unwrap();
        assert_eq!(l, Limits { dma_alignment: 3, segments: Some((33, u32::MAX)) });
        let mut p = Params::default();
        l.apply(&mut p);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_DMA_ALIGN | sys::UBLK_PARAM_TYPE_SEGMENT);
        assert_eq!((p.dma.alignment, p.seg.max_segments, p.seg.max_segment_size), (3, 33, u32::MAX));
        assert!((p.seg.seg_boundary_mask + 1).is_power_of_two());
        let small = queue(&[
            ("logical_block_size", "4096"),
            ("dma_alignment", "65535"),
            ("max_segments", "0"),
            ("max_segment_size", "512"),
        ]);
        let mut p = Params::default();
        Limits::from_queue(small.path()).unwrap().apply(&mut p);
        assert_eq!((p.dma.alignment, p.seg.max_segments, p.seg.max_segment_size), (4095, 1, 4096));
        assert!(Limits::from_queue(&q.path().join("none")).is_none());
    }

    #[test]
    fn a_direct_files_alignment_is_a_mask() {
        assert_eq!(Limits::of_direct_file(512), Some(Limits { dma_alignment: 511, segments: None }));
        assert_eq!(Limits::of_direct_file(4), Some(Limits { dma_alignment: 3, segments: None }));
        assert_eq!(Limits::of_direct_file(0), None);
        let mut p = Params::default();
        Limits::of_direct_file(4).unwrap().apply(&mut p);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_DMA_ALIGN, "no segment limits for a file");
    }
}
