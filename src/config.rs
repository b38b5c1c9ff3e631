//! A device's settings: everything needed to serve it, made once by `add`,
//! validated here, and persisted so that `recover -n ID` needs nothing else.
//! The machine's CPUs are `cpus`; the I/O scheduler and its sysfs file are
//! `io_scheduler`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cpus::{format_cpus, online_cpus, possible_cpus};
use crate::emulate::Emulation;
use crate::error::{Error, Result};
use crate::integrity::Integrity;
use crate::io_scheduler::parse_scheduler;
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Null,
    Ram,
    Nvme,
    File,
}

/// How request data travels between the bio and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// Pick the best the kernel offers for the backend.
    #[default]
    Auto,
    /// Per-tag buffers; the kernel copies to and from them.
    Copy,
    /// UBLK_F_USER_COPY: pread/pwrite on /dev/ublkcN.
    User,
    /// Zero copy (AUTO_BUF_REG or SUPPORT_ZERO_COPY): the request's pages go straight to the device.
    Zero,
}

impl CopyMode {
    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Auto => "auto",
            CopyMode::Copy => "copy",
            CopyMode::User => "user",
            CopyMode::Zero => "zero",
        }
    }
}

/// What happens to the device when its server dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// The device is removed.
    #[default]
    None,
    /// USER_RECOVERY: I/O in the server fails, queued I/O waits.
    Plain,
    /// + REISSUE: I/O in the server is requeued.
    Reissue,
    /// + FAIL_IO: new I/O fails fast until a server is back.
    FailIo,
}

impl Recovery {
    pub fn flags(self) -> u64 {
        match self {
            Recovery::None => 0,
            Recovery::Plain => sys::UBLK_F_USER_RECOVERY,
            Recovery::Reissue => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
            Recovery::FailIo => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_FAIL_IO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// None asks the kernel to pick.
    pub dev_id: Option<u32>,
    pub backend: BackendKind,
    pub size: u64,
    /// RAM store path (absolute, canonical folder); None for other backends.
    pub store: Option<PathBuf>,
    /// ublk-bench created the store file, so `del` and failed starts may
    /// remove it; false for a store the user brought with `--reuse-store`.
    #[serde(default)]
    pub store_created: bool,
    /// The file or block device `file` serves (absolute, links resolved).
    /// Never created, truncated or removed by ublk-bench.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `file`: open `path` O_DIRECT.
    #[serde(default)]
    pub direct: bool,
    /// NVMe namespace (`/dev/ngXnY`) for `nvme`.
    #[serde(default)]
    pub nvme_dev: Option<PathBuf>,
    /// What `path`, `store` or `nvme_dev` was when the device was made:
    /// every server opens it again by name and refuses another file there.
    /// None in run files from before the record (those go unchecked).
    #[serde(default)]
    pub backing_id: Option<FileId>,
    pub queues: u16,
    pub depth: u16,
    /// CPU per queue thread (thread t, queue t by default, uses `cpus[t % len]`); empty: kernel affinity.
    pub cpus: Vec<usize>,
    pub poll: bool,
    pub block_size: u32,
    pub max_io_bytes: u32,
    pub copy_mode: CopyMode,
    /// Zero copy through REGISTER_IO_BUF chains, not AUTO_BUF_REG.
    #[serde(default)]
    pub explicit_buf_reg: bool,
    pub recovery: Recovery,
    /// UBLK_F_BATCH_IO (7.0): tags travel in arrays (PREP/COMMIT_IO_CMDS) and
    /// one multishot FETCH_IO_CMDS per queue; every server of the device
    /// (recover, standby, restart) serves it so, as the kernel's flags say.
    #[serde(default)]
    pub batch: bool,
    /// `--gather-wait`: how long (µs) a blocking queue whose last pass had
    /// two deliveries or more waits for a second one (`queue::run_loop`);
    /// files from before the option get the default.
    #[serde(default = "gather_wait_default")]
    pub gather_wait_us: u32,
    /// Server-side statistics (`--stats`); files from before the option have them on.
    #[serde(default = "stats_default")]
    pub stats: bool,
    /// I/O scheduler `add` put the device's queue on after START_DEV; None:
    /// the kernel's choice was kept. The queue keeps it across recovery, so
    /// only a new device applies it.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// `ram --sparse`: the store is not reserved at `add` (pages come as
    /// written; a write on a full file system fails with ENOSPC).
    #[serde(default)]
    pub sparse: bool,
    /// `--part-scan`: the kernel scans for partitions at START_DEV (without
    /// it, UBLK_F_NO_AUTO_PART_SCAN where the kernel has it).
    #[serde(default)]
    pub part_scan: bool,
    /// `--latency` and `--fail`: served like a disk (see `emulate`).
    #[serde(default, skip_serializing_if = "Emulation::is_off")]
    pub emulate: Emulation,
    /// `--integrity`: protection information kept beside the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<Integrity>,
    /// `--threads`: the threads serving the device's tags (`layout`); None,
    /// as in files from before the option: one per queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u16>,
}

/// A file as a device's servers know it. A regular file is its filesystem
/// (`st_dev`) and inode; a block or character device is its device number
/// (`st_rdev`), which names the disk whatever node it is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub kind: FileKind,
    pub dev: u64,
    pub ino: u64,
    /// 0 unless a block or character device.
    pub rdev: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Block,
    Char,
    /// Found only, never recorded: a device is never made on one.
    Symlink,
    Other,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let ft = meta.file_type();
        let kind = match () {
            _ if ft.is_file() => FileKind::File,
            _ if ft.is_block_device() => FileKind::Block,
            _ if ft.is_char_device() => FileKind::Char,
            _ if ft.is_symlink() => FileKind::Symlink,
            _ => FileKind::Other,
        };
        let rdev = match kind {
            FileKind::Block | FileKind::Char => meta.rdev(),
            _ => 0,
        };
        FileId { kind, dev: meta.dev(), ino: meta.ino(), rdev }
    }

    /// Whether `other` is this same file (or device).
    pub fn same(&self, other: &FileId) -> bool {
        self.kind == other.kind
            && match self.kind {
                FileKind::File => (self.dev, self.ino) == (other.dev, other.ino),
                FileKind::Block | FileKind::Char => self.rdev == other.rdev,
                FileKind::Symlink | FileKind::Other => false,
            }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let devno = |d: u64| format!("{}:{}", libc::major(d), libc::minor(d));
        match self.kind {
            FileKind::Block => write!(f, "block device {}", devno(self.rdev)),
            FileKind::Char => write!(f, "character device {}", devno(self.rdev)),
            k => {
                let what = match k {
                    FileKind::File => "regular file",
                    FileKind::Symlink => "symbolic link",
                    _ => "file that is no regular file or device",
                };
                write!(f, "{what} on device {}, inode {}", devno(self.dev), self.ino)
            }
        }
    }
}

fn stats_default() -> bool {
    true
}

/// `--gather-wait`'s default. Under load one delivery came every 30-40 µs in
/// the test guest: 50 µs gathers two or more per io_uring_enter there, and
/// on a fast machine the second comes long before it expires.
pub const GATHER_WAIT_US: u32 = 50;
/// The longest `--gather-wait` taken: past 10 ms a wait is a stall.
pub const GATHER_WAIT_MAX_US: u32 = 10_000;

fn gather_wait_default() -> u32 {
    GATHER_WAIT_US
}

pub const MIN_SIZE: u64 = 1 << 20;
pub const MAX_SIZE: u64 = 1 << 50;
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;
/// Queue count: 1 to UBLK_MAX_NR_QUEUES, the kernel's own limit. ADD_DEV
/// then clamps it to the possible CPUs (nr_cpu_ids); queue threads may
/// share CPUs. One message for every out-of-range value, 0 and 70000 alike.
pub fn check_queues(queues: u32) -> Result<u16> {
    match u16::try_from(queues) {
        Ok(q) if q >= 1 && queues <= sys::UBLK_MAX_NR_QUEUES => Ok(q),
        _ => Err(Error::invalid(format!(
            "{queues} queues is out of range: give -q between 1 and {} (UBLK_MAX_NR_QUEUES)",
            sys::UBLK_MAX_NR_QUEUES
        ))),
    }
}

/// How many queues ADD_DEV makes of `queues`: the kernel clamps
/// nr_hw_queues to nr_cpu_ids, the possible CPUs (ublk_ctrl_add_dev).
pub fn kernel_queues(queues: u16) -> u16 {
    let possible = possible_cpus().unwrap_or(usize::MAX);
    queues.min(possible.min(u16::MAX as usize) as u16)
}

/// Queue depth: 1 to UBLK_MAX_QUEUE_DEPTH, one message for every bad value.
pub fn check_depth(depth: u32) -> Result<u16> {
    if depth == 0 || depth > sys::UBLK_MAX_QUEUE_DEPTH {
        return Err(Error::invalid(format!(
            "depth {depth} is out of range: give -d between 1 and {}",
            sys::UBLK_MAX_QUEUE_DEPTH
        )));
    }
    Ok(depth as u16)
}

impl DeviceConfig {
    /// Checks everything that can be checked without the driver, the size
    /// against `min` (the backend's smallest, named `min_name`). The
    /// backend's own checks are `backend::Backend::validate`'s.
    pub fn validate(&self, min: u64, min_name: &str) -> Result<()> {
        if !matches!(self.block_size, 512 | 1024 | 2048 | 4096) {
            return Err(Error::invalid(format!(
                "block size {} is not supported: use 512, 1024, 2048 or 4096",
                self.block_size
            )));
        }
        if self.size < min || self.size > MAX_SIZE {
            return Err(Error::invalid(format!(
                "size {} is out of range: give --size between {min_name} and 1P",
                self.size
            )));
        }
        if !self.size.is_multiple_of(self.block_size as u64) {
            return Err(Error::invalid(format!(
                "size {} is not a multiple of the block size {}: round it, e.g. --size {}",
                self.size,
                self.block_size,
                self.size / self.block_size as u64 * self.block_size as u64
            )));
        }
        check_depth(self.depth as u32)?;
        check_queues(self.queues as u32)?;
        if let Some(n) = self.threads {
            crate::layout::check_threads(n, self.queues, self.depth)?;
        }
        if let Some(name) = &self.scheduler {
            parse_scheduler(name).map_err(Error::invalid)?;
        }
        self.validate_cpus()
    }

    fn validate_cpus(&self) -> Result<()> {
        let online = online_cpus();
        match self.cpus.iter().find(|c| !online.contains(c)) {
            Some(c) => Err(Error::invalid(format!(
                "CPU {c} does not exist or is offline: pick from {}",
                format_cpus(&online)
            ))),
            None => Ok(()),
        }
    }

    /// The CPU for queue thread `idx` if the user gave a list.
    pub fn cpu_for(&self, idx: u16) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[idx as usize % self.cpus.len()])
    }

    /// Where queue thread `idx` runs (with one thread per queue, `idx` is
    /// the queue), the `nth` of its queue's threads: `--cpus` round robin
    /// over the threads while that CPU is online (a takeover may find it
    /// gone since `add`); else the `nth` online CPU of the queue's affinity
    /// set (`affinity`, GET_QUEUE_AFFINITY) counting from its last, away from
    /// CPU 0 where clients tend to start. A queue whose set has no online CPU
    /// takes the online CPUs round robin, sharing them. `add --help` and
    /// docs/data-plane.md state the rule. Measured in one boot (7.3.4,
    /// TCG, 2 CPUs, 1 queue, fio unpinned, scheduler none): a blocking
    /// thread left on both CPUs gave 24.5k IOPS, pinned to CPU 0 50.3k, to
    /// CPU 1 49.5k (tuned 54.3k); a polling one on both 26.8k, on CPU 0
    /// 16.1k, on CPU 1 67.6k.
    pub fn queue_cpu(&self, idx: u16, nth: usize, affinity: &[usize], online: &[usize]) -> usize {
        if let Some(cpu) = self.cpu_for(idx).filter(|c| online.contains(c)) {
            return cpu;
        }
        let set: Vec<usize> = affinity.iter().rev().filter(|c| online.contains(c)).copied().collect();
        match set.len() {
            0 => online.get(idx as usize % online.len().max(1)).copied().unwrap_or(0),
            n => set[nth % n],
        }
    }

    /// With `--poll`, the warning to give when `threads` spinning threads
    /// will share CPUs (more of them than CPUs to pin them to).
    pub fn poll_sharing(&self, threads: u16) -> Option<String> {
        let cpus = match self.cpus.is_empty() {
            true => online_cpus().len(),
            false => self.cpus.iter().collect::<std::collections::BTreeSet<_>>().len(),
        };
        let flag = if self.threads.is_some() { "--threads" } else { "-q" };
        (self.poll && threads as usize > cpus).then(|| {
            format!(
                "warning: {threads} busy-polling queue threads on {cpus} CPU(s): spinning threads share a CPU \
                 and slow each other down; give {flag} {cpus} or fewer, more --cpus, or drop --poll"
            )
        })
    }

    /// Threads serving a device of `queues` queues (the kernel's count).
    pub fn threads_for(&self, queues: u16) -> u16 {
        self.threads.unwrap_or(queues)
    }

    pub fn dev_sectors(&self) -> u64 {
        self.size >> 9
    }
}

/// Parses `4096`, `4k`, `512M`, `1G`, `2T` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "p" => 1 << 50,
                u => return Err(format!("unknown unit '{u}' in size '{s}': use k, M, G, T or P")),
            };
            (&s[..i], mult)
        }
    };
    let too_large = || format!("size '{s}' is too large: the most is 1P (a ublk device may not exceed it)");
    if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) && num.parse::<u64>().is_err() {
        return Err(too_large());
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size: write e.g. 4096, 64M or 1G"))?;
    n.checked_mul(mult).ok_or_else(too_large)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid ram device's settings, for tests to vary.
    pub(crate) fn sample() -> DeviceConfig {
        DeviceConfig {
            dev_id: None,
            backend: BackendKind::Ram,
            size: 64 << 20,
            store: None,
            store_created: false,
            path: None,
            direct: false,
            nvme_dev: None,
            backing_id: None,
            queues: 1,
            depth: 64,
            cpus: vec![],
            poll: false,
            block_size: 512,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            copy_mode: CopyMode::Auto,
            explicit_buf_reg: false,
            recovery: Recovery::None,
            batch: false,
            gather_wait_us: GATHER_WAIT_US,
            stats: true,
            scheduler: Some("none".into()),
            sparse: false,
            part_scan: false,
            emulate: Emulation::default(),
            integrity: None,
            threads: None,
        }
    }

    /// Run files from before `--gather-wait` load with its default.
    #[test]
    fn run_files_without_gather_wait_get_the_default() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("gather_wait_us");
        let cfg: DeviceConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.gather_wait_us, GATHER_WAIT_US);
    }

    /// Run files from before the identity record load without one.
    #[test]
    fn run_files_without_an_identity_load() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("backing_id");
        let cfg: DeviceConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.backing_id, None);
    }

    #[test]
    fn a_file_is_its_inode_and_a_device_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let id = |p: &std::path::Path| FileId::of(&std::fs::symlink_metadata(p).unwrap());
        assert!(id(&a).same(&id(&a)) && !id(&a).same(&id(&b)));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        assert_eq!(id(&link).kind, FileKind::Symlink);
        assert!(!id(&a).same(&id(&link)) && !id(&link).same(&id(&link)), "a link is never the file");
        let null = id(std::path::Path::new("/dev/null"));
        assert_eq!((null.kind, null.to_string().as_str()), (FileKind::Char, "character device 1:3"));
        let other_node = FileId { dev: 99, ino: 12345, ..null };
        assert!(null.same(&other_node), "a device is its number, whatever node reaches it");
        assert!(
            id(&a).to_string().starts_with("regular file on device ")
                && id(&a).to_string().contains("inode ")
        );
        let json = serde_json::to_value(id(&a)).unwrap();
        assert_eq!(json["kind"], "file");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn validation_rejects_bad_values() {
        assert!(sample().validate(MIN_SIZE, "1M").is_ok());
        let bad = [
            DeviceConfig { size: 1000 << 20 | 100, ..sample() },
            DeviceConfig { size: 4096, ..sample() },
            DeviceConfig { depth: 0, ..sample() },
            DeviceConfig { depth: 5000, ..sample() },
            DeviceConfig { queues: 0, ..sample() },
            DeviceConfig { queues: 9999, ..sample() },
            DeviceConfig { scheduler: Some("no such".into()), ..sample() },
            DeviceConfig { cpus: vec![100_000], ..sample() },
            DeviceConfig { block_size: 3000, ..sample() },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(MIN_SIZE, "1M"), Err(Error::Invalid(_))), "{cfg:?}");
        }
    }

    #[test]
    fn huge_sizes_are_too_large_not_garbage() {
        for s in ["99999999999999999999", "99999999999P", "20000000T"] {
            let err = parse_size(s).unwrap_err();
            assert!(err.contains("too large"), "{s}: {err}");
        }
    }

    #[test]
    fn every_bad_queue_count_gets_one_message() {
        let bad = [0, 4097, 70000, u32::MAX];
        for q in bad {
            let m = check_queues(q).unwrap_err().to_string();
            let want = format!("{q} queues is out of range: give -q between 1 and 4096 (UBLK_MAX_NR_QUEUES)");
            assert!(m.ends_with(&want), "{m}");
        }
        let ncpu = online_cpus().len() as u32;
        for q in [1, ncpu + 1, 4 * ncpu, 4096] {
            assert_eq!(check_queues(q).unwrap(), q as u16, "more queues than CPUs are the kernel's to clamp");
        }
        assert!(kernel_queues(4096) >= 1 && kernel_queues(1) == 1);
        for d in [0, 4097, 70000] {
            assert!(check_depth(d).unwrap_err().to_string().contains("give -d between 1 and 4096"), "{d}");
        }
    }

    #[test]
    fn queue_threads_go_to_the_last_cpu_of_their_set_or_round_robin() {
        let cfg = sample();
        let online = [0, 1];
        assert_eq!(cfg.queue_cpu(0, 0, &[0, 1], &online), 1, "one queue on two CPUs: the last");
        assert_eq!(cfg.queue_cpu(1, 0, &[1], &online), 1);
        assert_eq!(cfg.queue_cpu(0, 0, &[0], &online), 0);
        // Sets of offline CPUs: round robin over the online ones.
        assert_eq!(cfg.queue_cpu(2, 0, &[2], &online), 0);
        assert_eq!(cfg.queue_cpu(3, 0, &[3], &online), 1);
        let pinned = DeviceConfig { cpus: vec![1, 0], ..sample() };
        assert_eq!((pinned.queue_cpu(0, 0, &[0], &online), pinned.queue_cpu(3, 0, &[1], &online)), (1, 0));
    }

    #[test]
    fn an_offline_cpu_of_the_list_falls_back_to_the_affinity_set() {
        let pinned = DeviceConfig { cpus: vec![1], ..sample() };
        assert_eq!(pinned.queue_cpu(0, 0, &[0, 1], &[0, 1]), 1, "online: the list decides");
        assert_eq!(pinned.queue_cpu(0, 0, &[0, 1], &[0]), 0, "CPU 1 offline: the set's last online CPU");
        assert_eq!(pinned.queue_cpu(1, 0, &[2, 3], &[0, 2]), 2);
        // A queue's second and third threads (`--threads`): the set's next CPUs, round robin.
        let free = DeviceConfig { cpus: vec![], ..sample() };
        assert_eq!((free.queue_cpu(1, 1, &[0, 1], &[0, 1]), free.queue_cpu(2, 2, &[0, 1], &[0, 1])), (0, 1));
    }

    #[test]
    fn sharing_polling_threads_are_warned_about() {
        let poll = DeviceConfig { poll: true, cpus: vec![1, 1], ..sample() };
        let w = poll.poll_sharing(2).expect("two spinning threads on CPU 1");
        assert!(w.contains("share a CPU") && w.contains("-q 1"), "{w}");
        assert_eq!(poll.poll_sharing(1), None);
        let threads = DeviceConfig { threads: Some(2), ..poll.clone() };
        assert!(threads.poll_sharing(2).unwrap().contains("--threads 1"));
        assert_eq!(DeviceConfig { poll: false, ..poll.clone() }.poll_sharing(4), None);
        let ncpu = online_cpus().len() as u16;
        let free = DeviceConfig { cpus: vec![], ..poll };
        assert!(free.poll_sharing(ncpu + 1).is_some() && free.poll_sharing(ncpu).is_none());
    }

    #[test]
    fn recovery_flags() {
        assert_eq!(Recovery::None.flags(), 0);
        assert_eq!(Recovery::Reissue.flags(), sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    }
}
