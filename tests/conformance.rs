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
    assert!(b.serve(&req(sys::UBLK_IO_OP_DISCARD, 0, 4096), Data::None) >= 0);
    assert!(b.serve(&req(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 4096), Data::None) >= 0);
    assert_eq!(b.serve(&req(99, 0, 512), Data::None), -libc::EOPNOTSUPP);
}

#[test]
fn null_meets_the_common_contract() {
    for mut mode in Mode::all() {
        common_contract(&mut NullQueue, &mut mode);
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
