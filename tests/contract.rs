//! The backend contract through the kernel, in the guest: every backend in
//! every copy mode (and `--poll`, `--batch`, under a standby) answers what
//! `/dev/ublkbN` sends it the way the block layer expects, and `stats`
//! counts exactly the requests the block layer completed.
//!
//! tests/conformance.rs checks each backend's answers on the host, calling
//! it directly; zero copy (the kernel registers the request's pages),
//! NVMe passthrough and the queue loops need the driver, so here the same
//! contract goes through a real device:
//! - WRITEs read back (a backend that keeps data: not null);
//! - BLKDISCARD succeeds where the device advertises discard, and fails
//!   with EOPNOTSUPP where it does not; BLKZEROOUT succeeds; both read back
//!   as zeros where the backend keeps data (a discard on NVMe need not);
//! - over that exchange, `stats`' `reads` equal the block layer's
//!   completed reads, and its `writes` and `others` the block layer's
//!   writes and discards (`/sys/block/ublkbN/stat`). Flushes stay out of
//!   the window: with a write cache the block layer also accounts the
//!   request that carried REQ_PREFLUSH, which the server never sees;
//! - a FUA write (RWF_DSYNC) reads back and fsync (FLUSH) succeeds.
//!
//! Like the other driver tests they skip without the driver, through
//! `common::skip` (a failure in the guest, where `UBLK_TEST_NO_SKIP=1`).

mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SIZE: &str = "16M";
const NVME: &str = "/dev/ng0n1";
/// _IO(0x12, 119) and _IO(0x12, 127) from linux/fs.h.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const LEN: usize = 64 << 10;

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds layout.size() initialised bytes that only self owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc_zeroed with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// One device shape of the matrix: `add` arguments and whether reads give
/// back what was written.
struct Shape {
    args: Vec<String>,
    keeps_data: bool,
}

fn shape(args: &[&str], keeps_data: bool) -> Shape {
    Shape { args: args.iter().map(|s| s.to_string()).collect(), keeps_data }
}

/// Every backend and copy mode, and the loops and takeover modes that count
/// requests differently. `file` serves a file on the guest's /tmp.
fn shapes(file: &Path) -> Vec<Shape> {
    let f = file.to_str().unwrap();
    vec![
        shape(&["null", "--copy-mode", "copy"], false),
        shape(&["null", "--copy-mode", "user"], false),
        shape(&["null", "--poll"], false),
        shape(&["null", "--batch"], false),
        shape(&["ram", "--copy-mode", "copy"], true),
        shape(&["ram", "--copy-mode", "user"], true),
        shape(&["ram", "--copy-mode", "zero"], true),
        shape(&["ram", "--copy-mode", "zero", "--poll"], true),
        shape(&["ram", "--copy-mode", "user", "--batch"], true),
        shape(&["ram", "--copy-mode", "zero", "--batch", "--poll"], true),
        shape(&["ram", "--standby"], true),
        shape(&["file", "--path", f, "--copy-mode", "copy"], true),
        shape(&["file", "--path", f, "--copy-mode", "zero"], true),
        shape(&["file", "--path", f, "--copy-mode", "zero", "--batch"], true),
        shape(&["nvme", "--dev", NVME, "--copy-mode", "zero"], true),
        shape(&["nvme", "--dev", NVME, "--copy-mode", "copy"], true),
        shape(&["nvme", "--dev", NVME, "--copy-mode", "zero", "--explicit-buf-reg"], true),
    ]
}

/// Completed requests from /sys/block/NAME/stat: (reads, writes and
/// discards; WRITE_ZEROES counts as a write).
fn block_completions(id: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap();
    let f: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(f.len() >= 17, "/sys/block/ublkb{id}/stat lacks the discard and flush fields: {s}");
    (f[0], f[4] + f[11])
}

/// `stats --json`'s merged (reads, writes + others): totals, which need
/// no window (`--window 0` reads them at once).
fn server_counts(id: u32) -> (u64, u64) {
    let out = ublk(&["stats", "-n", &id.to_string(), "--json", "--window", "0"]).success();
    let v: Value = serde_json::from_str(&out.stdout).expect("stats --json is JSON");
    let m = &v["merged"];
    let n = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("no merged.{k}: {v}"));
    (n("reads"), n("writes") + n("others"))
}

/// Both counts, once the device is quiet: two reads of the block layer's
/// figures around `stats` agree, so nothing completed in between.
fn quiet_counts(id: u32) -> ((u64, u64), (u64, u64)) {
    let mut got = None;
    let quiet = eventually(Duration::from_secs(60), || {
        let b0 = block_completions(id);
        let s = server_counts(id);
        let b1 = block_completions(id);
        got = Some((b1, s));
        b0 == b1
    });
    assert!(quiet, "device {id} never went quiet: last {got:?}");
    got.unwrap()
}

fn ioctl_range(f: &File, req: libc::c_ulong, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: both ioctls read two u64 from the pointer, which stays valid.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), req, range.as_ptr()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// A pwritev2 of `buf` at `offset` with RWF_DSYNC: a FUA write, or a write
/// and a flush where the device has no FUA.
fn write_dsync(f: &File, buf: &mut Aligned, offset: u64) -> isize {
    let iov = libc::iovec { iov_base: buf.ptr.cast(), iov_len: buf.layout.size() };
    // SAFETY: the iovec points at the buffer, which outlives the call.
    unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_DSYNC) }
}

/// WRITE, READ, DISCARD and WRITE_ZEROES: requests the block layer counts
/// once each, as the server sees them (so the counting window holds these
/// alone: a flush is accounted in the flush machinery's own way).
fn data_and_zeroing(dev: &Dev, f: &File, keeps_data: bool) {
    let what = format!("device {} ({})", dev.id, dev.json["backend"]);
    let mut w = Aligned::new(LEN);
    let mut r = Aligned::new(LEN);
    for i in 0..16u64 {
        pattern(w.bytes(), i as u8);
        f.write_all_at(&w.bytes()[..4096], (1 << 20) + i * 4096)
            .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    }
    f.read_exact_at(r.bytes(), 1 << 20).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    if keeps_data {
        for i in 0..16u64 {
            pattern(w.bytes(), i as u8);
            let got = &r.bytes()[i as usize * 4096..][..4096];
            assert!(got == &w.bytes()[..4096], "{what}: block {i} reads back other data than was written");
        }
    }
    let discard = sysfs_u64(dev.id, "discard_max_bytes") > 0;
    let res = ioctl_range(f, BLKDISCARD, 1 << 20, LEN as u64);
    if discard {
        res.unwrap_or_else(|e| panic!("{what}: BLKDISCARD on a device that advertises discard: {e}"));
    } else {
        let e = res.expect_err("BLKDISCARD on a device without discard succeeded");
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{what}: {e}");
    }
    pattern(w.bytes(), 3);
    f.write_all_at(w.bytes(), 2 << 20).unwrap();
    ioctl_range(f, BLKZEROOUT, 2 << 20, LEN as u64).unwrap_or_else(|e| panic!("{what}: BLKZEROOUT: {e}"));
    if keeps_data {
        f.read_exact_at(r.bytes(), 2 << 20).unwrap();
        assert!(r.bytes().iter().all(|&b| b == 0), "{what}: BLKZEROOUT range does not read as zeros");
        if discard && zeroes_after_discard(dev) {
            f.read_exact_at(r.bytes(), 1 << 20).unwrap();
            assert!(r.bytes().iter().all(|&b| b == 0), "{what}: discarded range does not read as zeros");
        }
    }
}

/// A FUA write (RWF_DSYNC) reads back, and fsync (FLUSH) succeeds.
fn durability(dev: &Dev, f: &File, keeps_data: bool) {
    let what = format!("device {} ({})", dev.id, dev.json["backend"]);
    let mut w = Aligned::new(LEN);
    let mut r = Aligned::new(LEN);
    pattern(w.bytes(), 9);
    assert_eq!(write_dsync(f, &mut w, 3 << 20), LEN as isize, "{what}: FUA write");
    f.sync_all().unwrap_or_else(|e| panic!("{what}: fsync (FLUSH): {e}"));
    if keeps_data {
        f.read_exact_at(r.bytes(), 3 << 20).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert!(r.bytes() == w.bytes(), "{what}: read back other data than the FUA write");
    }
}

fn open_direct(dev: &Dev) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev.block())
        .unwrap_or_else(|e| panic!("device {}: open O_DIRECT: {e}", dev.id))
}

/// ram and file punch holes; an NVMe deallocate need not read as zeros.
fn zeroes_after_discard(dev: &Dev) -> bool {
    dev.json["backend"] != "nvme"
}

fn sysfs_u64(id: u32, attr: &str) -> u64 {
    let p = format!("/sys/block/ublkb{id}/queue/{attr}");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}")).trim().parse().unwrap()
}

/// One counting window: the contract's data requests, then `stats` against
/// the block layer over exactly that window.
fn count_window(dev: &Dev, keeps_data: bool, what: &str) {
    let f = open_direct(dev);
    let (b0, s0) = quiet_counts(dev.id);
    data_and_zeroing(dev, &f, keeps_data);
    let (b1, s1) = quiet_counts(dev.id);
    durability(dev, &f, keeps_data);
    drop(f);
    let block = (b1.0 - b0.0, b1.1 - b0.1);
    let server = (s1.0 - s0.0, s1.1 - s0.1);
    assert!(block.0 > 0, "{what}: no read reached the block layer");
    assert!(block.1 >= 18, "{what}: the writes and zeroing are not in the block layer's stat");
    assert_eq!(
        server,
        block,
        "{what}: `stats` counted (reads, others) {server:?}, the block layer completed {block:?}\n\
         /sys/block/ublkb{id}/stat: {}\nstats: {}",
        std::fs::read_to_string(format!("/sys/block/ublkb{}/stat", dev.id)).unwrap_or_default(),
        ublk(&["stats", "-n", &dev.id.to_string(), "--json", "--window", "0"]).stdout,
        id = dev.id
    );
}

/// The server of device `id` once it is LIVE under a server other than `old`.
fn new_server(id: u32, old: i32) -> i32 {
    let mut pid = 0;
    let live = eventually(Duration::from_secs(60), || {
        let d = list_one(id).unwrap_or_default();
        pid = d["pid"].as_i64().unwrap_or(0) as i32;
        d["state"] == "LIVE" && pid > 0 && pid != old && alive(pid)
    });
    assert!(live, "device {id} is not LIVE under a new server (last pid {pid}, old {old})");
    pid
}

#[test]
fn every_backend_and_copy_mode_keeps_the_contract_and_stats_count_what_the_block_layer_completed() {
    let Some(_h) = harness() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("img");
    File::create(&file).unwrap().set_len(16 << 20).unwrap();
    for s in shapes(&file) {
        let mut args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        if !args.contains(&"file") {
            args.extend(["--size", SIZE]);
        }
        let dev = add(&args);
        count_window(&dev, s.keeps_data, &format!("{args:?}"));
        del(dev.id);
    }
}

/// `stats` keeps counting exactly what the block layer completed after the
/// server changed hands: a standby that took over from a killed server, and
/// the successor of a `restart`, each count their own window.
#[test]
fn stats_count_what_the_block_layer_completed_after_a_takeover() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--standby", "--size", SIZE]);
    count_window(&dev, true, "ram --standby, first server");
    signal(dev.pid, libc::SIGKILL);
    let pid = new_server(dev.id, dev.pid);
    count_window(&Dev { pid, ..dev.clone() }, true, "ram --standby, after the standby took over");
    del(dev.id);

    let dev = add(&["ram", "-r", "--size", SIZE]);
    ublk(&["restart", "-n", &dev.id.to_string()]).success();
    let pid = new_server(dev.id, dev.pid);
    count_window(&Dev { pid, ..dev.clone() }, true, "ram -r, after `restart`");
    del(dev.id);
}
