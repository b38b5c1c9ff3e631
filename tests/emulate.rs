//! Device emulation through the kernel, in the guest: the mechanics of
//! `--latency` and `--fail`, not how close a served latency comes to its
//! model (bench-scripts/emulate measures that):
//! - every request completes, none before its service time, and a queue
//!   serves many at once (blocking and `--poll`);
//! - requests leave by due time, not by arrival: fast writes overtake slow
//!   reads queued before them;
//! - a failure rule fails exactly the requests it names (operation, range
//!   edges, `after`), with its errno, without touching the data, and
//!   `stats` counts each as an error;
//! - both settings survive a crash and `recover`;
//! - bad models and rules are refused before any device is made.
//!
//! Like the other driver tests they skip without the driver, through
//! `common::skip` (a failure in the guest, where `UBLK_TEST_NO_SKIP=1`).

mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// fio's clock for the tests' latencies: the system's monotonic clock, the
/// one the server's due times are on (fio's default, the TSC calibrated at
/// start, runs fast or slow by a fraction of a percent under emulation).
const CLOCK: &str = "--clocksource=clock_gettime";

/// The shortest time fio saw a request of one direction take, from before
/// its submission to its completion (`lat_ns`: the server may start a
/// request's timer inside the io_uring_enter that submits it, before fio
/// stamps it issued, so `clat_ns` can be shorter than the service time).
fn min_lat(json: &Value, job: usize, dir: &str) -> u64 {
    json["jobs"][job][dir]["lat_ns"]["min"].as_u64().unwrap_or(0)
}

fn total_ios(json: &Value, job: usize, dir: &str) -> u64 {
    json["jobs"][job][dir]["total_ios"].as_u64().unwrap_or(0)
}

fn stats_json(id: u32) -> Value {
    let out = ublk(&["stats", "-n", &id.to_string(), "--json"]).success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stats --json: {e}\n{}", out.describe()))
}

/// 160 reads at QD16 on a 10 ms device: all complete, none under 10 ms,
/// and together in far less than one after another (1.6 s): a queue never
/// waits on one request's timer. Blocking, `--poll` and `--batch`.
#[test]
fn every_request_completes_none_before_its_time_many_at_once() {
    let Some(_h) = harness() else { return };
    for mode in [&[][..], &["--poll"][..], &["--batch"][..]] {
        let mut args = vec!["null", "-q", "1", "-d", "32", "--latency", "10ms"];
        args.extend_from_slice(mode);
        let dev = add(&args);
        assert_eq!(dev.json["emulate"], "latency 10ms", "{}", dev.json);
        let json = fio(
            &dev.block(),
            &[
                "--rw=randread",
                "--bs=4k",
                "--direct=1",
                "--iodepth=16",
                "--ioengine=io_uring",
                "--io_size=640k",
                CLOCK,
            ],
        );
        let min = min_lat(&json, 0, "read");
        assert_eq!(total_ios(&json, 0, "read"), 160, "{mode:?}: every request completes");
        assert!(min >= 10_000_000, "{mode:?}: a read completed in {min} ns, before its 10 ms");
        let runtime_ms = json["jobs"][0]["read"]["runtime"].as_u64().unwrap_or(u64::MAX);
        assert!(
            runtime_ms < 800,
            "{mode:?}: 160 reads of 10 ms at QD16 took {runtime_ms} ms: served one by one?"
        );
        del(dev.id);
    }
}

/// Reads take 50 ms, writes 1 ms; a reader and a writer, 4 deep each, on
/// one queue, for the same second. Served in arrival order, a write would
/// wait behind the reads queued before it (up to 50 ms: half of them 25 ms
/// or more); by due time, half the writes complete within 10 ms (ten times
/// their model, for a loaded guest) and every read takes its 50 ms.
#[test]
fn requests_complete_by_due_time_not_arrival() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "-q", "1", "-d", "16", "--latency", "read=50ms,write=1ms"]);
    let job = |rw: &str| (rw.to_string(), vec![format!("--rw={rw}"), "--iodepth=4".into()]);
    let json = fio_jobs(
        Some(&dev.block()),
        &["--bs=4k", "--direct=1", "--ioengine=io_uring", "--time_based", "--runtime=1", CLOCK],
        &[job("randread"), job("randwrite")],
    );
    let read_min = min_lat(&json, 0, "read");
    let write_p50 = json["jobs"][1]["write"]["clat_ns"]["percentile"]["50.000000"].as_u64().unwrap_or(0);
    let (reads, writes) = (total_ios(&json, 0, "read"), total_ios(&json, 1, "write"));
    assert!(reads >= 20 && writes > 0, "the jobs overlapped too little: {reads} reads, {writes} writes");
    assert!(read_min >= 50_000_000, "a read completed in {read_min} ns, before its 50 ms");
    assert!(
        write_p50 < 10_000_000,
        "writes (1 ms) waited behind reads (50 ms): write p50 {write_p50} ns over {writes} writes"
    );
    del(dev.id);
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        let mut a = Aligned { ptr, layout };
        a.bytes().fill(fill);
        a
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds layout.size() initialised bytes that only self owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn open_direct(dev: &Path) -> File {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap()
}

/// 4 KiB at `sector`: Ok, or the errno.
fn write4k(f: &File, sector: u64, fill: u8) -> Result<(), i32> {
    let mut b = Aligned::new(4096, fill);
    f.write_at(b.bytes(), sector * 512).map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(0))
}

fn read4k(f: &File, sector: u64) -> Result<Vec<u8>, i32> {
    let mut b = Aligned::new(4096, 0xee);
    f.read_at(b.bytes(), sector * 512).map(|_| b.bytes().to_vec()).map_err(|e| e.raw_os_error().unwrap_or(0))
}

/// Sectors far from where udev's probes read (the first and last MiBs).
const W: u64 = 8192;
const R: u64 = 12288;
const RULES: [&str; 4] =
    ["--fail", "op=write,lba=8192-8199,err=ENOSPC", "--fail", "op=read,lba=12288-12295,after=1"];

/// The write rule fails exactly sectors 8192-8199 with ENOSPC (a write
/// ending at 8191 or starting at 8200 passes; one overlapping by a sector
/// fails) and leaves the store as it was; the read rule lets its first
/// match pass, then fails with EIO. `stats` counts each failure.
fn assert_rules_hit_exactly(dev: &Dev, what: &str) {
    let f = open_direct(&dev.block());
    let errors_before = stats_json(dev.id)["merged"]["errors"].as_u64().unwrap();
    assert_eq!(write4k(&f, W - 8, 0x11), Ok(()), "{what}: the write ending before the range");
    assert_eq!(write4k(&f, W + 8, 0x22), Ok(()), "{what}: the write starting past the range");
    assert_eq!(write4k(&f, W, 0x33), Err(libc::ENOSPC), "{what}: the write on the range");
    assert_eq!(write4k(&f, W - 7, 0x44), Err(libc::ENOSPC), "{what}: the write overlapping by a sector");
    assert_eq!(read4k(&f, W).map(|b| b[0]), Ok(0), "{what}: a failed write reached the store");
    assert_eq!(read4k(&f, W + 8).map(|b| b[0]), Ok(0x22), "{what}");
    let first = read4k(&f, R);
    let (second, third) = (read4k(&f, R), read4k(&f, R));
    assert!(
        first.is_ok() && second == Err(libc::EIO) && third == Err(libc::EIO),
        "{what}: reads {first:?} {second:?} {third:?}"
    );
    let errors = stats_json(dev.id)["merged"]["errors"].as_u64().unwrap() - errors_before;
    assert_eq!(errors, 4, "{what}: stats counted {errors} errors, 2 writes and 2 reads failed");
}

#[test]
fn failures_hit_exactly_what_was_asked() {
    let Some(_h) = harness() else { return };
    let mut args = vec!["ram", "--size", "16M"];
    args.extend(RULES);
    let dev = add(&args);
    assert_rules_hit_exactly(&dev, "ram");
    del(dev.id);
}

/// Both settings live in the device: after a crash and `recover` the new
/// server serves the same model and the same rules (the `after` count
/// starts again with the new server).
#[test]
fn emulation_survives_a_crash_and_recover() {
    let Some(_h) = harness() else { return };
    let mut args = vec!["ram", "--size", "16M", "-r", "--latency", "5ms"];
    args.extend(RULES);
    let dev = add(&args);
    let shown = dev.json["emulate"].clone();
    signal(dev.pid, libc::SIGKILL);
    wait_dead(dev.pid);
    assert!(
        eventually(Duration::from_secs(30), || list_one(dev.id).is_some_and(|d| d["state"] == "QUIESCED")),
        "device {} not QUIESCED after its server died",
        dev.id
    );
    ublk(&["recover", "-n", &dev.id.to_string()]).success();
    let now = list_one(dev.id).unwrap();
    assert_eq!(now["state"], "LIVE", "{now}");
    assert_eq!(now["emulate"], shown, "the settings changed across the takeover");
    let json = fio(
        &dev.block(),
        &[
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--io_size=40k",
            "--offset=1M",
            "--size=1M",
            CLOCK,
        ],
    );
    let min = min_lat(&json, 0, "read");
    assert!(min >= 5_000_000, "after recover a read completed in {min} ns, before its 5 ms");
    assert_rules_hit_exactly(
        &Dev { pid: now["pid"].as_i64().unwrap() as i32, json: now, ..dev },
        "after recover",
    );
    del(dev.id);
}

/// Bad models and rules: refused with what to write, exit non-zero, and
/// no device (the harness checks nothing was left).
#[test]
fn bad_models_and_rules_are_refused_before_anything_is_made() {
    let Some(_h) = harness() else { return };
    let dir = std::env::temp_dir().join(format!("ublk-emulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"x\": 1}").unwrap();
    let junk_arg = format!("file:{}", junk.display());
    let ids_before = list_ids();
    for (args, says) in [
        (vec!["null", "--latency", "-5us"], "negative"),
        (vec!["null", "--latency", "100"], "give a unit"),
        (vec!["null", "--latency", "file:/nonexistent.json"], "No such file"),
        (vec!["null", "--latency", &junk_arg], "neither"),
        (vec!["null", "--fail", "rate=2"], "at most 1"),
        (vec!["null", "--fail", "err=EPERM"], "one of EIO"),
    ] {
        let mut full = vec!["add"];
        full.extend(&args);
        let out = ublk(&full);
        assert!(!out.ok(), "{args:?} was accepted:\n{}", out.describe());
        assert!(out.stderr.contains(says), "{args:?}: no `{says}` in:\n{}", out.describe());
        assert_eq!(list_ids(), ids_before, "{args:?} left a device");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
