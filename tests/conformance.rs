//! Backend conformance: every backend, in every data mode, answers READ,
//! WRITE, FLUSH, DISCARD and WRITE_ZEROES the way the block layer expects.
//! User copy is exercised with a plain file standing in for `/dev/ublkcN`:
//! the backend's pread/pwrite at the request's position are the same calls.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ublk_bench::backend::SyncBackend;
use ublk_bench::backend::null::NullQueue;
use ublk_bench::backend::ram::{RamQueue, RamStore};
use ublk_bench::request::{Data, Request};
use ublk_bench::sys;

const SIZE: u64 = 8 << 20;

fn req(op: u8, offset: u64, len: u32) -> Request {
    Request { op, flags: 0, offset, len }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// How a test hands data to the backend: a per-tag buffer, or a file
/// position as in user copy.
enum Mode {
    Buf(Vec<u8>),
    User(File),
}

impl Mode {
    fn all() -> Vec<Mode> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 << 20).unwrap();
        vec![Mode::Buf(vec![0; 1 << 20]), Mode::User(file)]
    }

    /// Serves a WRITE of `data` at `offset`.
    fn write(&mut self, b: &mut impl SyncBackend, offset: u64, data: &[u8]) -> i32 {
        let r = req(sys::UBLK_IO_OP_WRITE, offset, data.len() as u32);
        match self {
            Mode::Buf(buf) => {
                buf[..data.len()].copy_from_slice(data);
                b.serve(&r, Data::Buf(buf))
            }
            Mode::User(f) => {
                f.write_all_at(data, 4096).unwrap();
                b.serve(&r, Data::UserCopy { fd: f.as_raw_fd(), pos: 4096 })
            }
        }
    }

    /// Serves a READ of `len` bytes at `offset` and returns what it produced.
    fn read(&mut self, b: &mut impl SyncBackend, offset: u64, len: usize) -> (i32, Vec<u8>) {
        let r = req(sys::UBLK_IO_OP_READ, offset, len as u32);
        match self {
            Mode::Buf(buf) => {
                let res = b.serve(&r, Data::Buf(buf));
                (res, buf[..len].to_vec())
            }
            Mode::User(f) => {
                let res = b.serve(&r, Data::UserCopy { fd: f.as_raw_fd(), pos: 1 << 21 });
                let mut out = vec![0; len];
                f.read_exact_at(&mut out, 1 << 21).unwrap();
                (res, out)
            }
        }
    }
}

fn ram() -> (tempfile::TempDir, RamQueue) {
    let dir = tempfile::tempdir().unwrap();
    let store = RamStore::create(&dir.path().join("store"), SIZE).unwrap();
    (dir, RamQueue::new(Arc::new(store)))
}

/// What every backend must do, whatever it stores.
fn common_contract(b: &mut impl SyncBackend, mode: &mut Mode) {
    assert_eq!(mode.write(b, 0, &pattern(4096, 1)), 4096);
    assert_eq!(mode.read(b, 4096, 8192).0, 8192);
    assert_eq!(b.serve(&req(sys::UBLK_IO_OP_FLUSH, 0, 0), Data::None), 0);
    assert_eq!(b.serve(&req(sys::UBLK_IO_OP_FLUSH, u64::MAX << 9, 0), Data::None), 0, "FLUSH at sector -1");
    assert!(b.serve(&req(sys::UBLK_IO_OP_DISCARD, 0, 4096), Data::None) >= 0);
    assert!(b.serve(&req(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 4096), Data::None) >= 0);
    assert_eq!(b.serve(&req(99, 0, 512), Data::None), -libc::EOPNOTSUPP);
}

#[test]
fn null_meets_the_common_contract() {
    for mut mode in Mode::all() {
        common_contract(&mut NullQueue::default(), &mut mode);
    }
}

#[test]
fn ram_meets_the_common_contract() {
    for mut mode in Mode::all() {
        common_contract(&mut ram().1, &mut mode);
    }
}

#[test]
fn ram_reads_back_what_was_written() {
    for mut mode in Mode::all() {
        let (_d, mut b) = ram();
        let (a, c) = (pattern(65536, 7), pattern(512, 9));
        assert_eq!(mode.write(&mut b, 1 << 20, &a), 65536);
        assert_eq!(mode.write(&mut b, (1 << 20) + 512, &c), 512);
        let (res, got) = mode.read(&mut b, 1 << 20, 65536);
        assert_eq!(res, 65536);
        assert_eq!(&got[..512], &a[..512]);
        assert_eq!(&got[512..1024], &c[..]);
        assert_eq!(&got[1024..], &a[1024..]);
    }
}

#[test]
fn ram_discard_and_write_zeroes_read_back_zeros() {
    for op in [sys::UBLK_IO_OP_DISCARD, sys::UBLK_IO_OP_WRITE_ZEROES] {
        for mut mode in Mode::all() {
            let (_d, mut b) = ram();
            mode.write(&mut b, 0, &pattern(1 << 20, 3));
            // Unaligned edges and whole pages in one request.
            assert_eq!(b.serve(&req(op, 1536, 20480), Data::None), 0);
            let (_, got) = mode.read(&mut b, 0, 32768);
            let want = pattern(1 << 20, 3);
            assert_eq!(&got[..1536], &want[..1536]);
            assert!(got[1536..1536 + 20480].iter().all(|&x| x == 0));
            assert_eq!(&got[22016..], &want[22016..32768]);
        }
    }
}

#[test]
fn ram_refuses_requests_past_the_end() {
    let (_d, mut b) = ram();
    let mut buf = vec![0u8; 8192];
    assert_eq!(b.serve(&req(sys::UBLK_IO_OP_READ, SIZE - 4096, 8192), Data::Buf(&mut buf)), -libc::EINVAL);
}

#[test]
fn ram_store_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let data = pattern(4096, 5);
    {
        let mut b = RamQueue::new(Arc::new(RamStore::create(&path, SIZE).unwrap()));
        assert_eq!(Mode::Buf(vec![0; 4096]).write(&mut b, 8192, &data), 4096);
    }
    let mut b = RamQueue::new(Arc::new(RamStore::open(&path, SIZE).unwrap()));
    assert_eq!(Mode::Buf(vec![0; 4096]).read(&mut b, 8192, 4096).1, data);
    assert!(RamStore::open(&path, SIZE * 2).is_err());
}

// ---- file: the io_uring backend of `file` and of `ram` in zero copy ----

use io_uring::IoUring;
use ublk_bench::backend::QueueBackend;
use ublk_bench::backend::chain::{KIND_IO, KIND_REG, KIND_UNREG};
use ublk_bench::backend::file::{Backing, FileQueue};

/// The queue's `user_data` for a backend command of `tag` (bit 63, as in src/queue/mod.rs).
const BACKEND_BIT: u64 = 1 << 63;

/// A file queue on a real ring, driven one request at a time the way the
/// queue loop drives it: `submit`, then every CQE to `complete`.
struct Driver {
    ring: IoUring,
    q: FileQueue,
}

impl Driver {
    fn new(backing: Backing) -> Self {
        Driver { ring: IoUring::new(16).unwrap(), q: FileQueue::new(Arc::new(backing), 4) }
    }

    fn run(&mut self, r: &Request, data: Data<'_>) -> i32 {
        let tag = 1u16;
        if let Some(res) = self.q.submit(tag, r, data, &mut self.ring.submission(), BACKEND_BIT | tag as u64)
        {
            return res;
        }
        loop {
            self.ring.submit_and_wait(1).unwrap();
            let cqes: Vec<_> = self.ring.completion().collect();
            for cqe in cqes {
                assert_eq!(cqe.user_data() & 0xffff, tag as u64);
                let kind = cqe.user_data() & ublk_bench::backend::KIND_MASK;
                if let Some(res) = self.q.complete(tag, kind, cqe.result()) {
                    return res;
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        let mut buf = data.to_vec();
        self.run(&req(sys::UBLK_IO_OP_WRITE, offset, data.len() as u32), Data::Buf(&mut buf))
    }

    fn read(&mut self, offset: u64, len: usize) -> (i32, Vec<u8>) {
        let mut buf = vec![0xeeu8; len];
        let res = self.run(&req(sys::UBLK_IO_OP_READ, offset, len as u32), Data::Buf(&mut buf));
        (res, buf)
    }
}

/// A user's file of `SIZE` bytes (on /tmp or wherever tempdir is) and, where
/// /dev/shm exists, one on tmpfs, whose fallocate modes differ.
fn user_files() -> Vec<(tempfile::TempDir, std::path::PathBuf)> {
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
        dirs.push(d);
    }
    dirs.into_iter()
        .map(|d| {
            let p = d.path().join("img");
            std::fs::write(&p, pattern(SIZE as usize, 11)).unwrap();
            (d, p)
        })
        .collect()
}

#[test]
fn file_reads_back_what_was_written_and_the_file_holds_it() {
    for (_d, path) in user_files() {
        let mut f = Driver::new(Backing::open_path(&path, SIZE, false).unwrap());
        let a = pattern(65536, 7);
        assert_eq!(f.write(1 << 20, &a), 65536);
        assert_eq!(f.read(1 << 20, 65536), (65536, a.clone()));
        // Another descriptor sees the data, and what was there before stays.
        let other = File::open(&path).unwrap();
        let mut got = vec![0u8; 65536 + 4096];
        other.read_exact_at(&mut got, (1 << 20) - 4096).unwrap();
        assert_eq!(&got[4096..], &a[..]);
        assert_eq!(&got[..4096], &pattern(SIZE as usize, 11)[(1 << 20) - 4096..1 << 20]);
    }
}

#[test]
fn file_flush_and_fua_write_reach_the_file() {
    for (_d, path) in user_files() {
        let mut f = Driver::new(Backing::open_path(&path, SIZE, false).unwrap());
        let data = pattern(8192, 21);
        let mut buf = data.clone();
        let fua = Request { op: sys::UBLK_IO_OP_WRITE, flags: sys::UBLK_IO_F_FUA, offset: 4096, len: 8192 };
        assert_eq!(f.run(&fua, Data::Buf(&mut buf)), 8192);
        assert_eq!(f.run(&req(sys::UBLK_IO_OP_FLUSH, 0, 0), Data::None), 0, "fsync through io_uring");
        // The block layer leaves a FLUSH's sector at -1 (blk_rq_init).
        let flush = Request { op: sys::UBLK_IO_OP_FLUSH, flags: 0, offset: u64::MAX << 9, len: 0 };
        assert_eq!(f.run(&flush, Data::None), 0, "a FLUSH's sector is not a range");
        let mut got = vec![0u8; 8192];
        File::open(&path).unwrap().read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(got, data);
    }
}

#[test]
fn file_discard_and_write_zeroes_read_back_zeros_and_keep_the_size() {
    let ops = [
        (sys::UBLK_IO_OP_DISCARD, 0),
        (sys::UBLK_IO_OP_WRITE_ZEROES, 0),
        (sys::UBLK_IO_OP_WRITE_ZEROES, sys::UBLK_IO_F_NOUNMAP),
    ];
    for (op, flags) in ops {
        for (_d, path) in user_files() {
            let mut f = Driver::new(Backing::open_path(&path, SIZE, false).unwrap());
            // Unaligned edges and whole pages in one request.
            let r = Request { op, flags, offset: 1536, len: 20480 };
            assert_eq!(f.run(&r, Data::None), 0, "op {op} flags {flags:#x} on {}", path.display());
            let (_, got) = f.read(0, 32768);
            let want = pattern(SIZE as usize, 11);
            assert_eq!(&got[..1536], &want[..1536]);
            assert!(got[1536..22016].iter().all(|&x| x == 0));
            assert_eq!(&got[22016..], &want[22016..32768]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE, "KEEP_SIZE");
        }
    }
}

#[test]
fn file_refuses_requests_past_the_end_and_fails_short_reads() {
    let (_d, path) = user_files().remove(0);
    let mut f = Driver::new(Backing::open_path(&path, SIZE, false).unwrap());
    assert_eq!(f.read(SIZE - 4096, 8192).0, -libc::EINVAL);
    assert_eq!(f.run(&req(99, 0, 512), Data::None), -libc::EOPNOTSUPP);
    // The file shrinks under the device: the read comes back short.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(SIZE - 2048).unwrap();
    assert_eq!(f.read(SIZE - 4096, 4096).0, -libc::EIO);
    let err = Backing::open_path(&path, SIZE, false).err().expect("a shrunk file is refused").to_string();
    assert!(err.contains("less than the device's"), "{err}");
}

#[test]
fn a_ram_store_served_as_a_file_needs_no_flush_and_is_not_mapped() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let path = dir.path().join("store");
    let file = ublk_bench::backend::ram::create_file(&path, SIZE).unwrap();
    let mut f = Driver::new(Backing::store(file, &path, SIZE));
    assert_eq!(f.run(&req(sys::UBLK_IO_OP_FLUSH, 0, 0), Data::None), 0);
    assert_eq!(
        f.q.submit(0, &req(sys::UBLK_IO_OP_FLUSH, 0, 0), Data::None, &mut f.ring.submission(), 0),
        Some(0)
    );
    assert_eq!(f.write(4096, &pattern(4096, 3)), 4096);
    assert_eq!(f.read(4096, 4096).1, pattern(4096, 3));
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!maps.contains(path.to_str().unwrap()), "the store is mapped");
}

#[test]
fn a_tmpfs_file_is_set_to_stay_inline_and_another_is_not() {
    for (_d, path) in user_files() {
        let b = Backing::open_path(&path, SIZE, false).unwrap();
        let tmpfs = path.starts_with("/dev/shm");
        assert_eq!(b.has_flag(libc::O_NONBLOCK), tmpfs, "{}", path.display());
        assert_eq!(b.has_flag(libc::O_DIRECT), tmpfs, "{}", path.display());
    }
}

#[test]
fn explicit_registration_is_a_chain_of_three_committed_once() {
    let (_d, path) = user_files().remove(0);
    let mut f = Driver::new(Backing::open_path(&path, SIZE, false).unwrap());
    let data = Data::Fixed { index: 2, char_fd: -1, qid: 0, tag: 2 };
    let r = req(sys::UBLK_IO_OP_READ, 0, 4096);
    assert_eq!(f.q.submit(2, &r, data, &mut f.ring.submission(), BACKEND_BIT | 2), None);
    assert_eq!(f.ring.submission().len(), 3, "REGISTER, READ_FIXED, UNREGISTER");
    let kinds = [KIND_REG, KIND_IO, KIND_UNREG];
    // Completions in order: register, the read (all bytes), unregister.
    assert_eq!(f.q.complete(2, kinds[0], 0), None);
    assert_eq!(f.q.complete(2, kinds[1], 4096), None);
    assert_eq!(f.q.complete(2, kinds[2], 0), Some(4096));
    // A failed unregister fails the request even if the read was whole.
    assert_eq!(
        f.q.submit(2, &r, Data::Fixed { index: 2, char_fd: -1, qid: 0, tag: 2 }, &mut f.ring.submission(), 2),
        None
    );
    f.q.complete(2, kinds[0], 0);
    f.q.complete(2, kinds[1], 4096);
    assert_eq!(f.q.complete(2, kinds[2], -libc::ENOENT), Some(-libc::EIO));
}
