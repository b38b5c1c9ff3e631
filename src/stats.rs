//! Server-side statistics, published in shared memory.
//!
//! Each queue thread keeps its own counters as plain integers
//! ([`QueueCounters`]: no atomics, no sharing, nothing but an add per
//! request) and copies them to its slot in the shared file with
//! [`QueueCounters::publish`] once per pass over its completion queue. A
//! slot ([`QueueStats`]) is written only by its queue thread, with relaxed
//! stores, so publishing takes no lock or syscall; of the histogram only
//! the buckets that changed since the last publish are copied.
//!
//! `/run/ublk-bench/<id>.stats` holds a header and one slot per queue. A
//! server started with `--stats off` says so in the header; its queues then
//! count only their `io_uring_enter` calls, and `stats` reports that the
//! figures are off instead of showing zeros. Service time (the pass that saw
//! the descriptor to the pass that queued its COMMIT, one clock read per
//! pass) goes into log-linear buckets (16 per power of two, so within
//! 6.25%), which `stats` turns into an HdrHistogram to merge queues and read
//! percentiles. Readers take two snapshots and difference them, so nothing
//! needs a consistent cut.
//!
//! The name belongs to the server that serves the device. A server that is
//! still getting ready to take over (a hot standby, `restart`'s successor,
//! `recover` before START_USER_RECOVERY) fills a file that has no name yet
//! (O_TMPFILE) and [`StatsFile::publish`]es it only once it takes over, so
//! `stats` keeps reading the live server until then; a server that never
//! takes over, even one killed by SIGKILL, leaves nothing behind. Where the
//! filesystem has no O_TMPFILE the file is `<id>.stats.<pid>` until then,
//! removed on drop. Files are mode 0600.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};
use crate::request::Request;
use crate::{run_files, sys};

pub const SUB_BITS: u32 = 4;
pub const BUCKETS: usize = 64 << SUB_BITS;
/// "ublkst02": the second layout (header flags, `enters`).
const MAGIC: u64 = 0x7562_6c6b_7374_3032;
/// Header flag: the server counts nothing but its enters (`--stats off`).
const FLAG_OFF: u64 = 1;

/// One queue's slot in the shared file. Field order is the file format.
#[repr(C)]
#[derive(Debug)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub others: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub busy_turns: AtomicU64,
    pub idle_turns: AtomicU64,
    /// `io_uring_enter` calls of the queue's loop, blocking or polling.
    pub enters: AtomicU64,
    pub max_ns: AtomicU64,
    pub buckets: [AtomicU64; BUCKETS],
}

#[repr(C)]
struct Header {
    magic: u64,
    queues: u64,
    /// The server process that writes the file.
    pid: u64,
    /// [`FLAG_OFF`] or 0.
    flags: u64,
}

/// Bucket of a service time: exact below 16 ns, then 16 per octave.
pub fn bucket_of(ns: u64) -> usize {
    if ns < (1 << SUB_BITS) {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let sub = (ns >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (((exp - SUB_BITS + 1) << SUB_BITS) as u64 + sub) as usize
}

/// Lowest value that falls in bucket `b` (inverse of [`bucket_of`]).
pub fn bucket_floor(b: usize) -> u64 {
    let b = b as u64;
    if b < (1 << SUB_BITS) {
        return b;
    }
    let exp = (b >> SUB_BITS) + SUB_BITS as u64 - 1;
    let sub = b & ((1 << SUB_BITS) - 1);
    (1 << exp) | (sub << (exp - SUB_BITS as u64))
}

/// One queue's counters, owned by its queue thread: plain integers bumped
/// in the loop and copied to the shared slot by [`Self::publish`]. Made
/// once at queue start (the histogram is the one allocation); recording
/// and publishing allocate nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCounters {
    pub reads: u64,
    pub writes: u64,
    pub others: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub busy_turns: u64,
    pub idle_turns: u64,
    pub enters: u64,
    pub max_ns: u64,
    buckets: Box<[u64]>,
    /// One bit per bucket changed since the last publish, so a publish
    /// copies a few buckets and not all 1024.
    dirty: [u64; BUCKETS / 64],
}

impl Default for QueueCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueCounters {
    pub fn new() -> Self {
        QueueCounters {
            reads: 0,
            writes: 0,
            others: 0,
            read_bytes: 0,
            write_bytes: 0,
            errors: 0,
            busy_turns: 0,
            idle_turns: 0,
            enters: 0,
            max_ns: 0,
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            dirty: [0; BUCKETS / 64],
        }
    }

    /// Counts one finished request that took `ns` (its COMMIT result is `result`).
    #[inline]
    pub fn record(&mut self, req: &Request, result: i32, ns: u64) {
        match req.op {
            sys::UBLK_IO_OP_READ => {
                self.reads += 1;
                self.read_bytes += req.len as u64;
            }
            sys::UBLK_IO_OP_WRITE => {
                self.writes += 1;
                self.write_bytes += req.len as u64;
            }
            _ => self.others += 1,
        }
        self.errors += (result < 0) as u64;
        let b = bucket_of(ns).min(BUCKETS - 1);
        self.buckets[b] += 1;
        self.dirty[b / 64] |= 1 << (b % 64);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Counts one look at the completion queue: `busy` if it held entries.
    #[inline]
    pub fn turn(&mut self, busy: bool) {
        if busy {
            self.busy_turns += 1;
        } else {
            self.idle_turns += 1;
        }
    }

    /// Counts one `io_uring_enter` call.
    #[inline]
    pub fn entered(&mut self) {
        self.enters += 1;
    }

    /// Copies the counters to `slot` (this queue's, written by no one
    /// else): every scalar, and the buckets changed since the last call.
    pub fn publish(&mut self, slot: &QueueStats) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Relaxed);
        set(&slot.reads, self.reads);
        set(&slot.writes, self.writes);
        set(&slot.others, self.others);
        set(&slot.read_bytes, self.read_bytes);
        set(&slot.write_bytes, self.write_bytes);
        set(&slot.errors, self.errors);
        set(&slot.busy_turns, self.busy_turns);
        set(&slot.idle_turns, self.idle_turns);
        set(&slot.enters, self.enters);
        set(&slot.max_ns, self.max_ns);
        for (w, word) in self.dirty.iter_mut().enumerate() {
            while *word != 0 {
                let b = w * 64 + word.trailing_zeros() as usize;
                set(&slot.buckets[b], self.buckets[b]);
                *word &= *word - 1;
            }
        }
    }
}

impl QueueStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            others: self.others.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            busy_turns: self.busy_turns.load(Relaxed),
            idle_turns: self.idle_turns.load(Relaxed),
            enters: self.enters.load(Relaxed),
            max_ns: self.max_ns.load(Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub reads: u64,
    pub writes: u64,
    pub others: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub busy_turns: u64,
    pub idle_turns: u64,
    pub enters: u64,
    pub max_ns: u64,
    pub buckets: Vec<u64>,
}

impl Snapshot {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Snapshot {
            reads: d(self.reads, earlier.reads),
            writes: d(self.writes, earlier.writes),
            others: d(self.others, earlier.others),
            read_bytes: d(self.read_bytes, earlier.read_bytes),
            write_bytes: d(self.write_bytes, earlier.write_bytes),
            errors: d(self.errors, earlier.errors),
            busy_turns: d(self.busy_turns, earlier.busy_turns),
            idle_turns: d(self.idle_turns, earlier.idle_turns),
            enters: d(self.enters, earlier.enters),
            max_ns: self.max_ns,
            buckets: self.buckets.iter().zip(&earlier.buckets).map(|(a, b)| d(*a, *b)).collect(),
        }
    }

    pub fn ios(&self) -> u64 {
        self.reads + self.writes + self.others
    }

    /// Service-time histogram, values at each bucket's floor.
    pub fn histogram(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = hdrhistogram::Histogram::new_with_bounds(1, 1 << 44, 3).expect("valid bounds");
        for (b, &n) in self.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
            h.saturating_record_n(bucket_floor(b), n);
        }
        h
    }

    /// Sum of several queues.
    pub fn merge(all: &[Snapshot]) -> Snapshot {
        let mut m = Snapshot { buckets: vec![0; BUCKETS], ..Default::default() };
        for s in all {
            m.reads += s.reads;
            m.writes += s.writes;
            m.others += s.others;
            m.read_bytes += s.read_bytes;
            m.write_bytes += s.write_bytes;
            m.errors += s.errors;
            m.busy_turns += s.busy_turns;
            m.idle_turns += s.idle_turns;
            m.enters += s.enters;
            m.max_ns = m.max_ns.max(s.max_ns);
            m.buckets.iter_mut().zip(&s.buckets).for_each(|(a, b)| *a += b);
        }
        m
    }
}

pub fn stats_path(dev_id: u32) -> PathBuf {
    run_files::run_dir().join(format!("{dev_id}.stats"))
}

/// The name a server's file has before it is published: only used for a
/// moment while publishing, or throughout where there is no O_TMPFILE.
fn private_path(dir: &Path, dev_id: u32) -> PathBuf {
    dir.join(format!("{dev_id}.stats.{}", std::process::id()))
}

/// The mapped stats file of one device.
pub struct StatsFile {
    map: MmapMut,
    queues: usize,
    dev_id: u32,
    /// The run folder the file is published in.
    dir: PathBuf,
    /// Until `publish`: the file, and its private name if it has one.
    unpublished: Mutex<Option<(File, Option<PathBuf>)>>,
}

// SAFETY: every field the map exposes is an atomic; the map itself is never
// remapped while shared.
unsafe impl Sync for StatsFile {}
// SAFETY: as above; the mapping may be used from any thread.
unsafe impl Send for StatsFile {}

impl StatsFile {
    /// The file's length for `queues` queues; None where that overflows
    /// (a corrupt header's count).
    fn len(queues: u64) -> Option<usize> {
        usize::try_from(queues).ok()?.checked_mul(size_of::<QueueStats>())?.checked_add(size_of::<Header>())
    }

    /// Makes a zeroed, unpublished file for `queues` queues (a new server
    /// starts afresh); `on` false marks it as a `--stats off` server's.
    /// Never touches the live server's file, which that server has mapped:
    /// truncating it would turn its stores into SIGBUS.
    pub fn create(dev_id: u32, queues: usize, on: bool) -> Result<Self> {
        Self::create_in(run_files::run_dir(), dev_id, queues, on)
    }

    /// [`Self::create`] in another folder (tests).
    pub(crate) fn create_in(dir: PathBuf, dev_id: u32, queues: usize, on: bool) -> Result<Self> {
        let (file, name) = unnamed_file(&dir, dev_id)?;
        let len = Self::len(queues as u64).ok_or_else(|| Error::invalid(format!("{queues} queues")))?;
        file.set_len(len as u64).map_err(|e| Error::io("size stats file", e))?;
        // SAFETY: the file is ours and sized above; other processes only read it.
        let mut map =
            unsafe { MmapOptions::new().map_mut(&file) }.map_err(|e| Error::io("mmap stats file", e))?;
        // SAFETY: the map is at least a Header long and page aligned.
        let h = unsafe { &mut *(map.as_mut_ptr() as *mut Header) };
        h.queues = queues as u64;
        h.pid = std::process::id() as u64;
        h.flags = if on { 0 } else { FLAG_OFF };
        h.magic = MAGIC;
        Ok(StatsFile { map, queues, dev_id, dir, unpublished: Mutex::new(Some((file, name))) })
    }

    /// Gives the file the device's stats name, replacing the previous
    /// server's (whose readers keep their old mapping). Once only.
    pub fn publish(&self) -> Result<()> {
        let Some((file, name)) = self.unpublished.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let private = match name {
            Some(n) => n,
            None => link_unnamed(&file, &private_path(&self.dir, self.dev_id))?,
        };
        let path = self.dir.join(format!("{}.stats", self.dev_id));
        std::fs::rename(&private, &path).map_err(|e| {
            let _ = std::fs::remove_file(&private);
            Error::io(format!("rename {} to {}", private.display(), path.display()), e)
        })
    }

    /// Maps an existing file for reading (by `stats`).
    pub fn open(dev_id: u32) -> Result<Self> {
        Self::open_in(run_files::run_dir(), dev_id)
    }

    /// [`Self::open`] in another folder (tests).
    pub(crate) fn open_in(dir: PathBuf, dev_id: u32) -> Result<Self> {
        let path = dir.join(format!("{dev_id}.stats"));
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| {
            Error::io(format!("open {} (is device {dev_id} served by ublk-bench?)", path.display()), e)
        })?;
        // SAFETY: shared map of a file only ever grown before use; we check its size below.
        let map = unsafe { MmapOptions::new().map_mut(&f) }.map_err(|e| Error::io("mmap stats file", e))?;
        if map.len() < size_of::<Header>() {
            return Err(Error::Refused(format!("{} is truncated", path.display())));
        }
        let h = Self::header(&map);
        let fits = Self::len(h.queues).is_some_and(|len| map.len() >= len);
        if h.magic != MAGIC || !fits {
            return Err(Error::Refused(format!("{} is not a ublk-bench stats file", path.display())));
        }
        let queues = h.queues as usize;
        Ok(StatsFile { map, queues, dev_id, dir, unpublished: Mutex::new(None) })
    }

    fn header(map: &MmapMut) -> &Header {
        // SAFETY: callers checked the map holds at least a Header; it is
        // page aligned and Header is plain integers.
        unsafe { &*(map.as_ptr() as *const Header) }
    }

    /// The pid of the server that made the file.
    pub fn server_pid(&self) -> u32 {
        Self::header(&self.map).pid as u32
    }

    /// False for a server started with `--stats off`: its slots hold only
    /// `enters`.
    pub fn is_on(&self) -> bool {
        Self::header(&self.map).flags & FLAG_OFF == 0
    }

    pub fn queues(&self) -> usize {
        self.queues
    }

    pub fn queue(&self, q: usize) -> &QueueStats {
        assert!(q < self.queues);
        let off = size_of::<Header>() + q * size_of::<QueueStats>();
        // SAFETY: in bounds (checked against the file size at open/create),
        // 8-byte aligned (header and slots are multiples of 8), and
        // QueueStats is only atomics, valid for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(off) as *const QueueStats) }
    }
}

impl Drop for StatsFile {
    fn drop(&mut self) {
        // A named private file of a server that never took over goes with it.
        let unpublished = self.unpublished.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some((_, Some(name))) = unpublished.take() {
            let _ = std::fs::remove_file(name);
        }
    }
}

/// A new mode-0600 file in the run folder: unnamed (O_TMPFILE), or where
/// the filesystem cannot, under its private name (returned).
fn unnamed_file(dir: &Path, dev_id: u32) -> Result<(File, Option<PathBuf>)> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    let (file, name) = match opts.clone().custom_flags(libc::O_TMPFILE).open(dir) {
        Ok(f) => (f, None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)) => {
            let path = private_path(dir, dev_id);
            // A stale file of an earlier process with our pid goes first:
            // then O_EXCL|O_NOFOLLOW, so no link planted there is followed.
            let _ = std::fs::remove_file(&path);
            let f = opts.create_new(true).custom_flags(libc::O_NOFOLLOW).open(&path);
            (f.map_err(|e| Error::io(format!("create {}", path.display()), e))?, Some(path))
        }
        Err(e) => return Err(Error::io(format!("create a stats file in {}", dir.display()), e)),
    };
    // The umask may have taken bits off the mode; we want exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod the stats file", e))?;
    Ok((file, name))
}

/// Links an O_TMPFILE file at `to` (replacing a stale link) and returns `to`.
fn link_unnamed(file: &File, to: &Path) -> Result<PathBuf> {
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let to_c = CString::new(to.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{} holds a NUL byte", to.display())))?;
    let _ = std::fs::remove_file(to);
    // SAFETY: both paths are NUL-terminated and live for the call.
    let r = unsafe {
        libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    };
    if r != 0 {
        return Err(Error::io(
            format!("link the stats file at {}", to.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(to.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    fn busy_turn(f: &StatsFile, q: usize) {
        let mut c = QueueCounters::new();
        c.turn(true);
        c.publish(f.queue(q));
    }

    fn read(op: u8, len: u32) -> Request {
        Request { op, len, ..Default::default() }
    }

    #[test]
    fn counters_reach_the_file_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatsFile::create_in(dir.path().into(), 5, 2, true).unwrap();
        let mut c = QueueCounters::new();
        c.record(&read(sys::UBLK_IO_OP_READ, 4096), 4096, 1000);
        c.record(&read(sys::UBLK_IO_OP_WRITE, 8192), -5, 50_000);
        c.record(&read(sys::UBLK_IO_OP_FLUSH, 0), 0, 0);
        c.entered();
        c.turn(true);
        c.turn(false);
        assert_eq!(f.queue(1).snapshot().ios(), 0, "counted before publish");
        c.publish(f.queue(1));
        let s = f.queue(1).snapshot();
        assert_eq!((s.reads, s.writes, s.others, s.errors), (1, 1, 1, 1));
        assert_eq!((s.read_bytes, s.write_bytes, s.max_ns), (4096, 8192, 50_000));
        assert_eq!((s.enters, s.busy_turns, s.idle_turns), (1, 1, 1));
        assert_eq!(s.buckets.iter().sum::<u64>(), 3);
        assert_eq!((s.buckets[0], s.buckets[bucket_of(1000)], s.buckets[bucket_of(50_000)]), (1, 1, 1));
        assert_eq!(f.queue(0).snapshot().ios(), 0, "queue 1 wrote queue 0's slot");
    }

    #[test]
    fn publish_copies_every_changed_bucket_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatsFile::create_in(dir.path().into(), 5, 1, true).unwrap();
        let mut c = QueueCounters::new();
        // One bucket in most dirty words, and both ends of the range.
        let last = bucket_of(u64::MAX);
        for b in (0..last).step_by(63).chain([last - 1]) {
            c.record(&read(sys::UBLK_IO_OP_READ, 512), 512, bucket_floor(b));
        }
        c.publish(f.queue(0));
        assert_eq!(f.queue(0).snapshot().buckets, c.buckets.to_vec());
        assert_eq!(c.dirty, [0; BUCKETS / 64], "publish left buckets marked");
        c.record(&read(sys::UBLK_IO_OP_READ, 512), 512, u64::MAX);
        c.publish(f.queue(0));
        assert_eq!(f.queue(0).snapshot().buckets, c.buckets.to_vec());
        assert_eq!(f.queue(0).snapshot().max_ns, u64::MAX);
    }

    #[test]
    fn the_header_says_whether_stats_are_on() {
        let dir = tempfile::tempdir().unwrap();
        for on in [true, false] {
            let f = StatsFile::create_in(dir.path().into(), 9, 1, on).unwrap();
            f.publish().unwrap();
            assert_eq!(StatsFile::open_in(dir.path().into(), 9).unwrap().is_on(), on);
        }
    }

    #[test]
    fn a_zero_service_time_reads_as_zero() {
        let mut s = Snapshot { buckets: vec![0; BUCKETS], ..Default::default() };
        s.buckets[0] = 10;
        let h = s.histogram();
        assert_eq!((h.len(), h.value_at_quantile(0.5), h.max()), (10, 0, 0));
    }

    #[test]
    fn an_unpublished_file_has_no_name_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatsFile::create_in(dir.path().into(), 7, 2, true).unwrap();
        busy_turn(&f, 1);
        assert_eq!(names(dir.path()), Vec::<String>::new(), "a file named before publish");
        assert!(StatsFile::open_in(dir.path().into(), 7).is_err(), "opened an unpublished file");
        drop(f);
        assert_eq!(names(dir.path()), Vec::<String>::new(), "a file left after drop");
    }

    #[test]
    fn publish_replaces_the_live_file_and_its_readers_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let live = StatsFile::create_in(dir.path().into(), 3, 1, true).unwrap();
        live.publish().unwrap();
        let mut live_counters = QueueCounters::new();
        live_counters.turn(true);
        live_counters.publish(live.queue(0));
        let next = StatsFile::create_in(dir.path().into(), 3, 1, true).unwrap();
        let reader = StatsFile::open_in(dir.path().into(), 3).unwrap();
        assert_eq!(reader.queue(0).snapshot().busy_turns, 1, "the reader does not see the live server");
        next.publish().unwrap();
        next.publish().unwrap(); // a second publish changes nothing
        assert_eq!(names(dir.path()), ["3.stats"]);
        live_counters.turn(true);
        live_counters.publish(live.queue(0));
        assert_eq!(reader.queue(0).snapshot().busy_turns, 2, "an old reader lost its mapping");
        let now = StatsFile::open_in(dir.path().into(), 3).unwrap();
        assert_eq!(now.queue(0).snapshot().busy_turns, 0, "the published file is not the new one");
        assert_eq!(now.server_pid(), std::process::id());
        let meta = std::fs::metadata(dir.path().join("3.stats")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        drop((live, next));
        assert_eq!(names(dir.path()), ["3.stats"], "drop removed a published file");
    }

    #[test]
    fn buckets_are_monotonic_and_invert() {
        let mut last = 0;
        for ns in [0u64, 1, 15, 16, 17, 31, 32, 1000, 1023, 1024, 1 << 30, u64::MAX >> 1] {
            let b = bucket_of(ns);
            assert!(b >= last, "{ns}");
            last = b;
            assert!(bucket_floor(b) <= ns);
            if b + 1 < BUCKETS {
                assert!(bucket_floor(b + 1) > ns, "{ns} bucket {b}");
            }
        }
    }

    #[test]
    fn bucket_error_is_under_one_sixteenth() {
        for ns in (100..1_000_000).step_by(997) {
            let f = bucket_floor(bucket_of(ns));
            assert!((ns - f) as f64 / ns as f64 <= 1.0 / 16.0, "{ns} -> {f}");
        }
    }

    #[test]
    fn snapshots_difference_and_merge() {
        let a = Snapshot {
            reads: 10,
            read_bytes: 40960,
            enters: 4,
            buckets: vec![1; BUCKETS],
            ..Default::default()
        };
        let b = Snapshot {
            reads: 25,
            read_bytes: 102400,
            enters: 9,
            buckets: vec![3; BUCKETS],
            ..Default::default()
        };
        let d = b.since(&a);
        assert_eq!((d.reads, d.read_bytes, d.enters), (15, 61440, 5));
        assert!(d.buckets.iter().all(|&x| x == 2));
        let m = Snapshot::merge(&[a, b]);
        assert_eq!((m.reads, m.enters), (35, 13));
        assert_eq!(m.buckets[7], 4);
    }

    #[test]
    fn histogram_percentiles_come_from_buckets() {
        let mut s = Snapshot { buckets: vec![0; BUCKETS], ..Default::default() };
        s.buckets[bucket_of(10_000)] = 99;
        s.buckets[bucket_of(1_000_000)] = 1;
        let h = s.histogram();
        let p50 = h.value_at_quantile(0.5);
        assert!((9_000..=10_000).contains(&p50), "{p50}");
        assert!(h.value_at_quantile(0.999) >= 900_000);
    }

    /// A corrupt header whose queue count times the slot size wraps around
    /// to a length the file has: refused, not mapped past its end.
    #[test]
    fn a_queue_count_that_overflows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatsFile::create_in(dir.path().into(), 6, 1, true).unwrap();
        f.publish().unwrap();
        drop(f);
        let path = dir.path().join("6.stats");
        let slot = size_of::<QueueStats>() as u64;
        // 2^64 / slot (rounded up): times slot, it wraps to a few bytes.
        let queues = u64::MAX / slot + 1;
        assert!(queues.wrapping_mul(slot) < slot, "the count chosen must wrap");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..16].copy_from_slice(&queues.to_ne_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = StatsFile::open_in(dir.path().into(), 6).err().expect("a corrupt count is refused");
        assert!(err.to_string().contains("not a ublk-bench stats file"), "{err}");
    }
}
