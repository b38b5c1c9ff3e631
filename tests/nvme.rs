//! NVMe passthrough and copy modes: the built `ublk-bench`
//! binary, black-box, against the real ublk driver and the guest's emulated
//! NVMe namespace (`/dev/nvme0n1`, generic node `/dev/ng0n1`, recreated
//! empty at every boot by bench-scripts/vm).
//!
//! What they prove:
//! - fio's own CRC32C verification passes through `/dev/ublkbN` on `nvme` in
//!   each copy mode (copy, zero, and auto, which must pick zero here), and
//!   the same blocks then verify when read straight from `/dev/nvme0n1`
//!   after the device is deleted: the data landed on the namespace;
//! - a pattern written with O_DIRECT pwrite through ublk reads back byte for
//!   byte from `/dev/nvme0n1`;
//! - DISCARD and WRITE_ZEROES on `nvme` read back as zeros, through ublk and
//!   on the namespace, with the data around them intact;
//! - `ram` passes the same verify jobs with user copy and with copy;
//! - kill -9 of an `nvme -r -i` server in fio's write phase, then `recover`,
//!   `--supervise` or `--standby`, in zero and copy mode, loses nothing:
//!   fio sees no error and its verify pass succeeds; so does `restart`;
//! - the ublk device's `write_cache` and `fua` match the namespace's (`ram`
//!   shows no volatile cache); fsync through ublk reaches the namespace as
//!   NVMe Flush and RWF_DSYNC writes as NVMe Writes with FUA, as the NVMe
//!   driver's `nvme_setup_cmd` trace events show (passthrough commands do not
//!   show in `/sys/block/nvme0n1/stat`);
//! - ext4 on an `nvme` device smaller than the namespace (zero and copy
//!   mode): mkfs, mount, files written and fsync'd, unmount, `e2fsck -f`
//!   finds the filesystem clean and the files read back after a remount;
//! - the durability tests (`nvme_durable_*`) pass on a namespace of
//!   4 KiB LBAs too (`bench-scripts/vm --nvme-lbs 4096`, run that way by
//!   bench-scripts/test), where the ublk device's logical block is 4 KiB
//!   and a FLUSH names no whole LBA;
//! - `--dev` given as a chain of symlinks to /dev/nvme0n1 works;
//! - bad `--dev` values and copy modes a backend cannot do are refused with
//!   a message that names the problem, leaving nothing behind.
//!
//! They need /dev/ublk-control, /dev/ng0n1 and root; without them each test
//! goes through `common::skip`: it says why and passes on the host, and
//! fails in the guest (`UBLK_TEST_NO_SKIP=1`). Run them in the guest:
//! `UBLK_TEST_SUITES=nvme bench-scripts/test`, or by hand
//! `bench-scripts/vm --auto -- target/debug/deps/nvme-HASH --test-threads=1`.
//! Tests run one at a time under the `common` harness, which deletes every
//! ublk device and kills every ublk-bench process when a test ends.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The guest's NVMe namespace: generic char device and block device.
const NG: &str = "/dev/ng0n1";
const NVME_BLOCK: &str = "/dev/nvme0n1";
const SKIP_NVME: &str = "/dev/ng0n1 absent (the guest's emulated NVMe: run inside bench-scripts/vm)";
/// Region of the namespace the fio verify jobs cover: 4096 writes of 4 KiB,
/// about 250 of 4-128 KiB, each size on many offsets; a crash cycle kills
/// the server after 64 writes, with most of the write phase still to come.
const FIO_SPAN: u64 = 16 * MIB;
/// Region the hand-written pattern covers (after the fio region).
const PATTERN_AT: u64 = 96 * MIB;
const PATTERN_SPAN: u64 = 8 * MIB;
/// A verifying fio run under emulation, recovery included.
const FIO_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------- set-up

/// The harness, or None (after `skip`) without the driver or the
/// emulated NVMe namespace.
fn nvme_harness() -> Option<Harness> {
    let h = harness()?;
    let is_char = fs::metadata(NG).is_ok_and(|m| m.file_type().is_char_device());
    if !is_char || !is_block_device(Path::new(NVME_BLOCK)) {
        skip(SKIP_NVME);
        return None;
    }
    Some(h)
}

/// On a failing test: the tail of the server log and of the kernel log.
struct Diagnostics;

impl Drop for Diagnostics {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = run_dir().join("server.log");
        let text = fs::read_to_string(&log).unwrap_or_else(|e| format!("({e})"));
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "---- last lines of {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
        if let Some(out) = try_run(&mut Command::new("dmesg"), Duration::from_secs(10)) {
            let lines: Vec<&str> = out.stdout.lines().collect();
            eprintln!("---- dmesg tail:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}

/// A `/sys/block/NAME/queue/FILE` number.
fn queue_attr(name: &str, file: &str) -> u64 {
    let path = format!("/sys/block/{name}/queue/{file}");
    let s = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    s.trim().parse().unwrap_or_else(|_| panic!("{path}: not a number: {s:?}"))
}

/// The namespace's logical block size, which must be what the guest was
/// booted with (`bench-scripts/vm --nvme-lbs`, passed as UBLK_VM_NVME_LBS),
/// so a run meant for 4 KiB LBAs cannot pass on 512-byte ones.
fn namespace_lbs() -> u64 {
    MAIN_NS.lbs()
}

/// A namespace of the guest's NVMe controller, by its block device's name
/// (`nvme0nN`; the generic node is `/dev/ng0nN`), and the LBA size the guest
/// made it with (None: whatever it has).
#[derive(Clone, Copy)]
struct Ns {
    name: &'static str,
    want_lbs: Option<u64>,
}

/// /dev/nvme0n1: its LBA size is what the guest was booted with
/// (`bench-scripts/vm --nvme-lbs`, passed as UBLK_VM_NVME_LBS).
const MAIN_NS: Ns = Ns { name: "nvme0n1", want_lbs: None };
/// Where bench-scripts/vm names its namespace with 4 KiB LBAs.
const NS_4K_ENV: &str = "UBLK_VM_NVME_4K";

impl Ns {
    fn ng(&self) -> String {
        format!("/dev/{}", self.name.replacen("nvme", "ng", 1))
    }

    fn block(&self) -> String {
        format!("/dev/{}", self.name)
    }

    /// The logical block size, which must be the one the guest made the
    /// namespace with, so a run meant for 4 KiB LBAs cannot pass on 512-byte ones.
    fn lbs(&self) -> u64 {
        let lbs = queue_attr(self.name, "logical_block_size");
        let want = match self.want_lbs {
            Some(n) => Some(n.to_string()),
            None => std::env::var("UBLK_VM_NVME_LBS").ok().filter(|v| !v.is_empty()),
        };
        if let Some(want) = want {
            assert_eq!(lbs.to_string(), want, "{} logical_block_size vs what the guest made", self.block());
        }
        lbs
    }

    /// The ublk device's logical block is the namespace's LBA: a smaller one
    /// would let the block layer send requests that are no whole LBAs.
    fn assert_lbs_of(&self, dev: &Dev) -> u64 {
        let lbs = self.lbs();
        let name = ublk_name(dev);
        assert_eq!(
            queue_attr(&name, "logical_block_size"),
            lbs,
            "{name} logical_block_size vs {}'s",
            self.block()
        );
        assert_eq!(dev.json["block_size"], lbs, "{}", dev.json);
        lbs
    }
}

/// The harness and the namespace with 4 KiB LBAs that bench-scripts/vm
/// makes beside /dev/nvme0n1 and names in [`NS_4K_ENV`]; None (after
/// `skip`, a failure in the guest) where there is none.
fn nvme_4k_harness() -> Option<(Harness, Ns)> {
    let h = nvme_harness()?;
    let Some(name) = std::env::var(NS_4K_ENV).ok().filter(|v| !v.is_empty()) else {
        skip(&format!("{NS_4K_ENV} unset: no NVMe namespace with 4 KiB LBAs (bench-scripts/vm makes one)"));
        return None;
    };
    let ns = Ns { name: String::leak(name), want_lbs: Some(4096) };
    let is_char = fs::metadata(ns.ng()).is_ok_and(|m| m.file_type().is_char_device());
    if !is_char || !is_block_device(Path::new(&ns.block())) {
        skip(&format!("{NS_4K_ENV}={}, but {} or {} is absent", ns.name, ns.ng(), ns.block()));
        return None;
    }
    Some((h, ns))
}

fn ublk_name(dev: &Dev) -> String {
    format!("ublkb{}", dev.id)
}

/// `nvme` devices on the guest's namespace in copy mode `mode`, plus `extra`.
fn add_nvme(dev: &str, mode: &str, extra: &[&str]) -> Dev {
    let mut args = vec!["nvme", "--dev", dev, "--copy-mode", mode];
    args.extend_from_slice(extra);
    add(&args)
}

fn has_flag(dev: &Dev, flag: &str) -> bool {
    dev.json["flags"].as_array().is_some_and(|f| f.iter().any(|v| v == flag))
}

// ---------------------------------------------------------------- O_DIRECT I/O

/// A 4 KiB-aligned buffer of `len` bytes, as O_DIRECT wants.
struct Aligned {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + 4096];
        let at = raw.as_ptr().align_offset(4096);
        Aligned { raw, at, len }
    }

    fn get(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

fn open_direct(dev: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", dev.display()))
}

/// Writes `data` at `offset` with O_DIRECT pwrites of the sizes in `sizes`
/// (cycled), then fsync (a FLUSH). Returns the write sizes used.
fn pwrite_direct(dev: &Path, offset: u64, data: &[u8], sizes: &[usize]) -> Vec<usize> {
    let f = open_direct(dev, true);
    let mut buf = Aligned::new(sizes.iter().copied().max().expect("sizes"));
    let (mut done, mut used) = (0usize, vec![]);
    for &size in sizes.iter().cycle() {
        if done == data.len() {
            break;
        }
        let n = size.min(data.len() - done);
        buf.get_mut()[..n].copy_from_slice(&data[done..done + n]);
        f.write_all_at(&buf.get()[..n], offset + done as u64).unwrap_or_else(|e| {
            panic!("pwrite {n} bytes at {} of {}: {e}", offset + done as u64, dev.display())
        });
        used.push(n);
        done += n;
    }
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", dev.display()));
    used
}

/// Reads `len` bytes at `offset` with O_DIRECT preads of up to 1 MiB.
fn pread_direct(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = open_direct(dev, false);
    let mut buf = Aligned::new(MIB as usize);
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let n = (len - out.len() as u64).min(MIB) as usize;
        let at = offset + out.len() as u64;
        f.read_exact_at(&mut buf.get_mut()[..n], at)
            .unwrap_or_else(|e| panic!("pread {n} bytes at {at} of {}: {e}", dev.display()));
        out.extend_from_slice(&buf.get()[..n]);
    }
    out
}

/// Panics at the first byte where `got` differs from `want`, with how many differ.
fn assert_same(got: &[u8], want: &[u8], base: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        let zeros = got.iter().zip(want).filter(|(a, b)| a != b && **a == 0).count();
        panic!(
            "{what}: byte at offset {} reads {:#04x}, expected {:#04x}; {bad} of {} bytes differ ({zeros} of them read 0)",
            base + at as u64,
            got[at],
            want[at],
            want.len()
        );
    }
}

/// Write sizes for the pattern: single sectors' worth of pages, odd sizes,
/// exactly the largest request, and more than it (the kernel splits).
const PATTERN_SIZES: &[usize] = &[4096, 12288, 131072, 69632, 1 << 20, 528384, 8192, 262144];

// ---------------------------------------------------------------- fio

/// fio's verify job: random writes of mixed sizes, each block with a
/// CRC32C, read back and checked at the end; `seed` makes each run's data
/// its own, so a block left from another run fails the check.
fn verify_job(seed: u64, span: u64, bs: &str) -> Vec<String> {
    verify_job_at(seed, 0, span, bs)
}

/// [`verify_job`] over `span` bytes from `offset`.
fn verify_job_at(seed: u64, offset: u64, span: u64, bs: &str) -> Vec<String> {
    let mut a: Vec<String> = FIO_CRC_VERIFY.map(String::from).to_vec();
    a.push(format!("--offset={offset}"));
    a.push(format!("--size={span}"));
    a.push(if bs.contains('-') { format!("--bsrange={bs}") } else { format!("--bs={bs}") });
    a.push(format!("--randseed={seed}"));
    a
}

/// The same job as a read-only check of what `verify_job` wrote.
fn verify_only_job(seed: u64, span: u64, bs: &str) -> Vec<String> {
    let mut a = verify_job(seed, span, bs);
    a.push("--verify_only=1".into());
    a
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A fio run in the background, in its own process group, which is killed
/// if the test ends before it does.
struct BgFio {
    run: Option<Running>,
    pgid: i32,
}

impl BgFio {
    fn start(dev: &Path, name: &str, args: &[String]) -> Self {
        let mut cmd = Command::new(need_tool("fio"));
        cmd.arg(format!("--name={name}"))
            .arg(format!("--filename={}", dev.display()))
            .args(args)
            .arg("--output-format=json")
            .process_group(0);
        let run = spawn(&mut cmd);
        BgFio { pgid: run.pid(), run: Some(run) }
    }

    fn running(&mut self) -> bool {
        matches!(self.run.as_mut().expect("not finished").child.try_wait(), Ok(None))
    }

    fn finish(mut self, timeout: Duration) -> Out {
        self.run.take().expect("finished once").finish(timeout)
    }
}

impl Drop for BgFio {
    fn drop(&mut self) {
        if self.run.is_some() {
            // SAFETY: kill takes plain integers; the group is the fio we started.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
    }
}

// ---------------------------------------------------------------- copy modes

/// On `dev` (an `nvme` device on the guest's namespace): fio verify over
/// the first FIO_SPAN, and a pattern written with O_DIRECT pwrite at
/// PATTERN_AT that must read back through ublk. Then the device is deleted
/// and both are read straight from /dev/nvme0n1: fio's verify-only pass
/// and a byte compare of the pattern. `seed` must differ between callers,
/// so that data left by an earlier test cannot pass for this one's.
fn verify_and_check_namespace(dev: Dev, seed: u64) {
    check_on_namespace(&[write_through(dev, seed, 0)]);
}

/// What [`write_through`] left on the namespace, for [`check_on_namespace`].
struct Landed {
    mode: String,
    seed: u64,
    fio_at: u64,
    pattern_at: u64,
    pattern: Vec<u8>,
}

/// The part of [`verify_and_check_namespace`] through `dev`, in region
/// `slot` of the namespace (fio's span at `slot` FIO_SPANs, the pattern at
/// PATTERN_AT plus `slot` PATTERN_SPANs, so that several devices made one
/// after another leave their data side by side); the device is deleted.
fn write_through(dev: Dev, seed: u64, slot: u64) -> Landed {
    let mode = dev.json["copy_mode"].as_str().unwrap_or("?").to_string();
    let block = dev.block();
    let (fio_at, pattern_at) = (slot * FIO_SPAN, PATTERN_AT + slot * PATTERN_SPAN);
    assert!(fio_at + FIO_SPAN <= PATTERN_AT, "slot {slot}: fio's span would reach the patterns");
    let t = Instant::now();
    let job = verify_job_at(seed, fio_at, FIO_SPAN, "4k-128k");
    let json = fio(&block, &as_strs(&job));
    assert_eq!(fio_bytes(&json, "write"), FIO_SPAN, "{mode}: fio wrote less than its span");
    assert_eq!(fio_bytes(&json, "read"), FIO_SPAN, "{mode}: fio verified less than its span");
    println!("{mode}: fio verify of {} MiB through {} in {:?}", FIO_SPAN >> 20, block.display(), t.elapsed());

    let pattern = random_bytes(PATTERN_SPAN as usize, seed);
    let sizes = pwrite_direct(&block, pattern_at, &pattern, PATTERN_SIZES);
    let back = pread_direct(&block, pattern_at, PATTERN_SPAN);
    assert_same(
        &back,
        &pattern,
        pattern_at,
        &format!("{mode}: pattern read back through {}", block.display()),
    );
    println!("{mode}: pattern of {} writes ({} MiB) read back through ublk", sizes.len(), PATTERN_SPAN >> 20);

    del(dev.id);
    assert_gone(&dev);
    Landed { mode, seed, fio_at, pattern_at, pattern }
}

/// Reads what [`write_through`] left straight from /dev/nvme0n1: each
/// pattern byte for byte, and fio's blocks with a verify-only job per
/// device, all in one fio run (one start-up, seconds under emulation).
fn check_on_namespace(landed: &[Landed]) {
    let nvme = Path::new(NVME_BLOCK);
    for l in landed {
        let back = pread_direct(nvme, l.pattern_at, PATTERN_SPAN);
        let what = format!("{}: pattern read straight from {NVME_BLOCK}", l.mode);
        assert_same(&back, &l.pattern, l.pattern_at, &what);
    }
    let jobs: Vec<(String, Vec<String>)> = landed
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut a = verify_job_at(l.seed, l.fio_at, FIO_SPAN, "4k-128k");
            a.push("--verify_only=1".into());
            (format!("check{i}-{}", l.mode), a)
        })
        .collect();
    let json = fio_jobs(Some(nvme), &[], &jobs);
    for ((job, _), l) in jobs.iter().zip(landed) {
        let read = fio_job_bytes(&json, job, "read");
        assert_eq!(read, FIO_SPAN, "{}: fio verify-only on {NVME_BLOCK} read less", l.mode);
        println!("{}: fio's blocks and the pattern verified on {NVME_BLOCK} itself", l.mode);
    }
}

/// `--copy-mode copy`: the tag buffers, one queue.
#[test]
fn nvme_copy_mode_copy_verifies_and_lands_on_the_namespace() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let dev = add_nvme(NG, "copy", &[]);
    assert_eq!(dev.json["copy_mode"], "copy", "{}", dev.json);
    assert_eq!(dev.json["backend"], "nvme", "{}", dev.json);
    assert!(
        !has_flag(&dev, "ZERO_COPY") && !has_flag(&dev, "USER_COPY"),
        "copy mode with a zero/user copy flag: {}",
        dev.json
    );
    verify_and_check_namespace(dev, 0xc0b1);
}

/// Whether the running kernel offers UBLK_F_AUTO_BUF_REG (6.16+).
fn kernel_has_auto_buf_reg() -> bool {
    let out = ublk(&["features", "--json"]).success();
    let features: Value = serde_json::from_str(&out.stdout).expect("`features --json` is JSON");
    features["features"].as_array().is_some_and(|f| f.iter().any(|n| n == "AUTO_BUF_REG"))
}

/// `--copy-mode zero`: AUTO_BUF_REG where the kernel has it (else
/// REGISTER_IO_BUF chains), two queues where there are two CPUs.
#[test]
fn nvme_copy_mode_zero_verifies_and_lands_on_the_namespace() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let q = online_cpus().min(2).to_string();
    let flag = if kernel_has_auto_buf_reg() { "AUTO_BUF_REG" } else { "ZERO_COPY" };
    let dev = add_nvme(NG, "zero", &["-q", &q]);
    assert_eq!(dev.json["copy_mode"], "zero", "{}", dev.json);
    assert!(has_flag(&dev, flag), "zero copy without UBLK_F_{flag}: {}", dev.json);
    assert_eq!(dev.json["queues"].to_string(), q, "{}", dev.json);
    verify_and_check_namespace(dev, 0x2e50);
}

/// `--copy-mode zero --explicit-buf-reg`: REGISTER_IO_BUF → NVMe →
/// UNREGISTER_IO_BUF chains (the 6.15 path) even where AUTO_BUF_REG exists.
#[test]
fn nvme_zero_copy_with_explicit_registration_verifies() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let dev = add_nvme(NG, "zero", &["--explicit-buf-reg"]);
    assert!(
        has_flag(&dev, "ZERO_COPY"),
        "explicit registration without UBLK_F_SUPPORT_ZERO_COPY: {}",
        dev.json
    );
    assert!(!has_flag(&dev, "AUTO_BUF_REG"), "explicit registration with AUTO_BUF_REG: {}", dev.json);
    verify_and_check_namespace(dev, 0x2e51);
}

/// `--batch` (UBLK_F_BATCH_IO) in every copy mode nvme has: copy, zero copy
/// with AUTO_BUF_REG, and zero copy with explicit REGISTER_IO_BUF chains.
#[test]
fn nvme_batch_every_copy_mode_verifies_and_lands_on_the_namespace() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let modes: [(&str, &[&str], u64); 3] =
        [("copy", &[], 0xba01), ("zero", &[], 0xba02), ("zero", &["--explicit-buf-reg"], 0xba03)];
    let mut landed = vec![];
    for (slot, (mode, extra, seed)) in modes.into_iter().enumerate() {
        let mut args = vec!["--batch"];
        args.extend_from_slice(extra);
        let dev = add_nvme(NG, mode, &args);
        assert!(has_flag(&dev, "BATCH_IO"), "--batch without UBLK_F_BATCH_IO: {}", dev.json);
        assert_eq!(dev.json["copy_mode"], mode, "{}", dev.json);
        landed.push(write_through(dev, seed, slot as u64));
    }
    // Each mode's data in its own region, all read back from the namespace at once.
    check_on_namespace(&landed);
}

/// `--copy-mode auto` picks zero on this kernel (as `features` says it
/// would), through `--dev /dev/nvme0n1`, mapped to the generic node. The
/// device takes its size, block size and request limit from the namespace.
#[test]
fn nvme_copy_mode_auto_is_zero_with_the_namespace_geometry() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let out = ublk(&["features", "--json"]).success();
    let features: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`features --json` is not JSON ({e}):\n{}", out.describe()));
    let names = features["features"].as_array().cloned().unwrap_or_default();
    let kernel_zero = names.iter().any(|n| n == "ZERO_COPY");
    let want = if kernel_zero { "zero" } else { "copy" };
    assert_eq!(
        features["copy_modes"]["nvme"]["auto"], want,
        "`features --json` on a kernel with {names:?}: {features}"
    );

    let dev = add_nvme(NVME_BLOCK, "auto", &[]);
    assert_eq!(dev.json["copy_mode"], want, "auto on a kernel with {names:?}: {}", dev.json);
    assert!(kernel_zero, "this kernel ({names:?}) lacks zero copy: the guest kernel should have it");
    assert!(has_flag(&dev, "ZERO_COPY") || has_flag(&dev, "AUTO_BUF_REG"), "{}", dev.json);

    // Geometry from the namespace.
    let ns_bytes = fs::read_to_string("/sys/block/nvme0n1/size").expect("nvme0n1 size");
    let ns_bytes = ns_bytes.trim().parse::<u64>().expect("a number") << 9;
    let name = ublk_name(&dev);
    assert_eq!(dev.json["size"], ns_bytes, "size of the device vs the namespace: {}", dev.json);
    assert_eq!(queue_attr(&name, "logical_block_size"), queue_attr("nvme0n1", "logical_block_size"));
    assert_eq!(dev.json["block_size"], queue_attr("nvme0n1", "logical_block_size"), "{}", dev.json);
    let mdts_kb = queue_attr("nvme0n1", "max_hw_sectors_kb");
    let ours_kb = queue_attr(&name, "max_hw_sectors_kb");
    assert!(ours_kb <= mdts_kb, "{name} max_hw_sectors_kb {ours_kb} > the namespace's {mdts_kb}");
    assert!(
        dev.json["max_io_bytes"].as_u64().is_some_and(|b| b > 0 && b <= mdts_kb << 10),
        "max_io_bytes vs the namespace's {mdts_kb} KiB: {}",
        dev.json
    );
    let size_sectors = fs::read_to_string(format!("/sys/block/{name}/size")).expect("ublk size");
    assert_eq!(size_sectors.trim().parse::<u64>().ok(), Some(ns_bytes >> 9), "/sys/block/{name}/size");
    println!(
        "auto -> {want}; {name}: {} bytes, lbs {}, max_hw_sectors_kb {ours_kb} (namespace {mdts_kb})",
        ns_bytes,
        queue_attr(&name, "logical_block_size")
    );
    verify_and_check_namespace(dev, 0xa070);
}

// ---------------------------------------------------------------- discard

/// DISCARD (`blkdiscard`) and WRITE_ZEROES (`blkdiscard -z`) on `nvme`, in
/// zero and in copy mode: the ranges read back as zeros and the bytes
/// around them keep their data, through ublk and on /dev/nvme0n1 after the
/// device is gone.
#[test]
fn nvme_discard_and_write_zeroes_read_back_zeros() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let blkdiscard = need_tool("blkdiscard");
    let ns_discard = queue_attr("nvme0n1", "discard_max_bytes");
    let ns_wz = queue_attr("nvme0n1", "write_zeroes_max_bytes");
    assert!(
        ns_discard > 0 || ns_wz > 0,
        "{NVME_BLOCK} supports neither discard nor write zeroes: the test needs one (QEMU's nvme has both)"
    );
    let span = 8 * MIB;
    for (mode, seed) in [("zero", 0xd15c_u64), ("copy", 0xd15d)] {
        let dev = add_nvme(NG, mode, &[]);
        let name = ublk_name(&dev);
        let (discard, wz) =
            (queue_attr(&name, "discard_max_bytes"), queue_attr(&name, "write_zeroes_max_bytes"));
        println!(
            "{mode}: {name} discard_max_bytes {discard} write_zeroes_max_bytes {wz} (namespace {ns_discard}, {ns_wz})"
        );
        assert!(discard > 0, "{mode}: {name} offers no DISCARD though the namespace can");
        if ns_wz > 0 {
            assert!(wz > 0, "{mode}: {name} offers no WRITE_ZEROES though the namespace has it");
        }
        let data = random_bytes(span as usize, seed);
        pwrite_direct(&dev.block(), 0, &data, &[1 << 20]);
        assert_same(
            &pread_direct(&dev.block(), 0, span),
            &data,
            0,
            &format!("{mode}: pattern before any discard"),
        );

        // 4 KiB aligned but not on MiB boundaries, from one page to more
        // than the device's largest DISCARD or WRITE_ZEROES (split).
        let mut ranges = vec![
            ("discard", MIB + (64 << 10), 512 << 10),
            ("discard", 6 * MIB + 8192, 4096),
            ("discard", 4 * MIB + 8192, MIB + 12288),
        ];
        if wz > 0 {
            ranges.push(("write zeroes", 3 * MIB + 4096, 300 << 10));
            ranges.push(("write zeroes", 4 * MIB - 4096, 4096));
            ranges.push(("write zeroes", 6 * MIB + (64 << 10), 700 << 10));
        }
        let mut expect = data;
        for &(what, off, len) in &ranges {
            let mut cmd = Command::new(&blkdiscard);
            if what == "write zeroes" {
                cmd.arg("-z");
            }
            run(cmd.args(["-o", &off.to_string(), "-l", &len.to_string()]).arg(dev.block())).success();
            expect[off as usize..(off + len) as usize].fill(0);
        }
        let check = |back: &[u8], where_: &str| {
            if let Some(at) = back.iter().zip(&expect).position(|(a, b)| a != b) {
                let at = at as u64;
                let place = ranges.iter().find(|(_, off, len)| (*off..off + len).contains(&at)).map_or(
                    "outside the ranges: data around a range was changed".to_string(),
                    |(what, off, len)| format!("inside the {what} range {off}+{len}: not zero"),
                );
                panic!(
                    "{mode}, {where_}: byte {at} reads {:#04x}, expected {:#04x}, {place}",
                    back[at as usize], expect[at as usize]
                );
            }
        };
        check(&pread_direct(&dev.block(), 0, span), &format!("through {}", dev.block().display()));
        del(dev.id);
        assert_gone(&dev);
        check(&pread_direct(Path::new(NVME_BLOCK), 0, span), &format!("on {NVME_BLOCK}"));
        println!("{mode}: {} ranges read back as zeros, their surroundings intact", ranges.len());
    }
}

// ---------------------------------------------------------------- ram

/// `ram` with `--copy-mode user` and with `--copy-mode copy` pass the same
/// verify jobs as the driver tests: 4 KiB random writes, then (stonewalled)
/// mixed sizes up to 256 KiB, each verified; both devices in one fio run.
/// `auto` on ram picks zero copy where the kernel has it.
#[test]
fn ram_user_and_copy_pass_fio_verify() {
    let Some(_h) = harness() else { return };
    let _d = Diagnostics;
    let size = 32 * MIB;
    let user = add(&["ram", "--size", "32M", "--copy-mode", "user"]);
    assert_eq!(user.json["copy_mode"], "user", "{}", user.json);
    assert!(has_flag(&user, "USER_COPY"), "user copy without UBLK_F_USER_COPY: {}", user.json);
    let copy = add(&["ram", "--size", "32M", "--copy-mode", "copy"]);
    assert_eq!(copy.json["copy_mode"], "copy", "{}", copy.json);
    assert!(!has_flag(&copy, "USER_COPY") && !has_flag(&copy, "ZERO_COPY"), "{}", copy.json);
    let auto = add(&["ram", "--size", "1M"]);
    assert_eq!(auto.json["copy_mode"], "zero", "auto on ram, a kernel with zero copy: {}", auto.json);
    del(auto.id);
    assert_gone(&auto);

    fio_verify_devices(&[("user", &user), ("copy", &copy)], size);
    for dev in [&user, &copy] {
        del(dev.id);
        assert_gone(dev);
    }
}

// ---------------------------------------------------------------- crash

/// Requests in flight on a block device: (reads, writes).
fn inflight(dev: &Dev) -> (u64, u64) {
    let s = fs::read_to_string(format!("/sys/block/{}/inflight", ublk_name(dev))).unwrap_or_default();
    let v: Vec<u64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0))
}

/// Write requests the block device has completed.
fn writes_done(dev: &Dev) -> u64 {
    let s = fs::read_to_string(format!("/sys/block/{}/stat", ublk_name(dev))).unwrap_or_default();
    s.split_whitespace().nth(4).and_then(|x| x.parse().ok()).unwrap_or(0)
}

/// Kills per crash test: the first server (made by `add`), then one that
/// took over; one pass of 4 KiB writes, one of mixed sizes. A third cycle
/// would repeat the second's states.
const CRASH_CYCLES: u64 = 2;

/// How the server is replaced: after a kill -9, or by a planned restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// `ublk-bench recover -n ID`, called by the test.
    Recover,
    /// `add --supervise`: the supervisor restarts it.
    Supervise,
    /// `add --standby`: a hot standby takes over.
    Standby,
    /// No crash: `ublk-bench restart -n ID` hands the device over.
    Restart,
}

/// `nvme -r -i` in copy mode `mode` under fio verify: each cycle starts a
/// verifying fio pass over FIO_SPAN (its own seed), kill -9s the server
/// while fio is in its write phase with writes in flight, and brings the
/// device back by `method` (or, for `Restart`, hands it over at that
/// moment); fio must finish with no error, its verify pass reading the
/// whole span. After the last cycle the device is deleted and
/// the last pass verifies on /dev/nvme0n1 itself.
fn crash_recover_under_fio_verify(mode: &str, method: Method, seed0: u64) {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let t0 = Instant::now();
    let mut extra = vec!["-r", "-i"];
    match method {
        Method::Recover | Method::Restart => {}
        Method::Supervise => extra.push("--supervise"),
        Method::Standby => extra.push("--standby"),
    }
    let dev = add_nvme(NG, mode, &extra);
    assert_eq!(dev.json["copy_mode"], mode, "{}", dev.json);
    assert!(has_flag(&dev, "USER_RECOVERY_REISSUE"), "-r -i without REISSUE: {}", dev.json);
    if method == Method::Restart && !has_flag(&dev, "QUIESCE") {
        skip(&format!("the kernel has no UBLK_F_QUIESCE (6.16+) for restart: {}", dev.json));
        del(dev.id);
        return;
    }
    let (id, block) = (dev.id, dev.block());
    let mut server = dev.pid;
    let mut last = (0, "");
    for cycle in 1..=CRASH_CYCLES {
        let seed = seed0 + cycle;
        let bs = if cycle % 2 == 0 { "4k-128k" } else { "4k" };
        last = (seed, bs);
        let before = writes_done(&dev);
        let mut fio = BgFio::start(&block, "crash", &verify_job(seed, FIO_SPAN, bs));
        // The write phase: writes in flight, no verify reads yet, and some
        // writes already done so the kill lands mid-phase. Sampled every
        // millisecond: under emulation a write is in flight only a small
        // part of the time, and the phase lasts a second or two.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (caught, seen) = loop {
            let (r, w) = inflight(&dev);
            let seen = (r, w, writes_done(&dev).saturating_sub(before));
            if (w > 0 && r == 0 && seen.2 >= 64) || !fio.running() {
                break (true, seen);
            }
            if Instant::now() > deadline {
                break (false, seen);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(fio.running(), "cycle {cycle}: fio ended before the kill (missed its write phase)");
        assert!(caught, "cycle {cycle}: no write phase with writes in flight within 120 s (last {seen:?})");
        let k = Instant::now();
        if method == Method::Restart {
            let out = ublk(&["restart", "-n", &id.to_string()]).success();
            assert!(out.stdout.contains("state LIVE"), "cycle {cycle}: restart printed:\n{}", out.describe());
        } else {
            signal(server, libc::SIGKILL);
        }
        wait_dead(server);
        if method == Method::Recover {
            let out = ublk(&["recover", "-n", &id.to_string()]).success();
            assert!(out.stdout.contains("state LIVE"), "cycle {cycle}: recover printed:\n{}", out.describe());
        } else {
            wait_until(
                &format!(
                    "cycle {cycle}: device {id} LIVE under a new server ({method:?}) after killing {server}"
                ),
                Duration::from_secs(60),
                || {
                    list_one(id).is_some_and(|d| {
                        let pid = d["pid"].as_i64().unwrap_or(0) as i32;
                        d["state"] == "LIVE" && pid > 0 && pid != server && alive(pid)
                    })
                },
            );
        }
        let now = list_one(id).unwrap_or_else(|| panic!("cycle {cycle}: device {id} gone after recovery"));
        let new = now["pid"].as_i64().unwrap_or(0) as i32;
        assert!(new > 0 && new != server && alive(new), "cycle {cycle}: no new live server: {now}");
        assert_eq!(now["state"], "LIVE", "cycle {cycle}: {now}");
        assert_eq!(now["copy_mode"], mode, "cycle {cycle}: the recovered device changed copy mode: {now}");
        let recovered_in = k.elapsed();
        let out = fio.finish(FIO_TIMEOUT);
        let json = fio_clean(&out).unwrap_or_else(|e| {
            panic!("cycle {cycle}: fio across {method:?} of server {server} ({mode}): {e}")
        });
        assert_eq!(fio_bytes(&json, "write"), FIO_SPAN, "cycle {cycle}: fio wrote less than its span");
        assert_eq!(fio_bytes(&json, "read"), FIO_SPAN, "cycle {cycle}: fio verified less than its span");
        println!(
            "cycle {cycle} ({mode}, {method:?}, bs {bs}): replaced server {server} with {} reads / {} writes in flight, \
             {} writes done; recovered in {recovered_in:?} by {new}; fio verified {} MiB, no error",
            seen.0,
            seen.1,
            seen.2,
            FIO_SPAN >> 20
        );
        server = new;
    }
    del(id);
    assert_gone(&Dev { id, pid: server, json: dev.json.clone() });
    let (seed, bs) = last;
    let json = fio(Path::new(NVME_BLOCK), &as_strs(&verify_only_job(seed, FIO_SPAN, bs)));
    assert_eq!(fio_bytes(&json, "read"), FIO_SPAN, "verify-only on {NVME_BLOCK} read less than the span");
    println!(
        "{mode}: {CRASH_CYCLES} {method:?} cycles, last pass verified on {NVME_BLOCK}; {:?}",
        t0.elapsed()
    );
}

#[test]
fn nvme_zero_crash_recover_under_fio_verify() {
    crash_recover_under_fio_verify("zero", Method::Recover, 0x21_0000);
}

#[test]
fn nvme_copy_crash_recover_under_fio_verify() {
    crash_recover_under_fio_verify("copy", Method::Recover, 0xc0_0000);
}

#[test]
fn nvme_zero_crash_supervise_under_fio_verify() {
    crash_recover_under_fio_verify("zero", Method::Supervise, 0x25_0000);
}

#[test]
fn nvme_zero_crash_standby_under_fio_verify() {
    crash_recover_under_fio_verify("zero", Method::Standby, 0x55_0000);
}

#[test]
fn nvme_copy_crash_standby_under_fio_verify() {
    crash_recover_under_fio_verify("copy", Method::Standby, 0x5c_0000);
}

/// The planned handover (QUIESCE_DEV) on nvme in zero copy, under the same
/// verifying load: no error, nothing lost.
#[test]
fn nvme_zero_restart_under_fio_verify() {
    crash_recover_under_fio_verify("zero", Method::Restart, 0x7e_0000);
}

// ---------------------------------------------------------------- durability
//
// Every test here runs on /dev/nvme0n1 (nvme_durable_*) and again, in the
// same boot, on the guest's namespace with 4 KiB LBAs (nvme_durable_4k_*,
// /dev/nvme0n2): there a FLUSH names no whole LBA and the ublk device's
// block is 4 KiB, the format most datacenter drives ship with.

/// A `/sys/block/NAME/queue/FILE` as trimmed text.
fn queue_text(name: &str, file: &str) -> String {
    let path = format!("/sys/block/{name}/queue/{file}");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}")).trim().to_string()
}

/// Field `i` (0-based) of `/sys/block/NAME/stat` (Documentation/block/stat.rst).
fn block_stat(name: &str, i: usize) -> u64 {
    let path = format!("/sys/block/{name}/stat");
    let s = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    s.split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no field {i}: {s:?}"))
}

/// `flush I/Os` in a block device's stat file.
const STAT_FLUSH_IOS: usize = 15;

/// The ublk device shows the namespace's cache mode and FUA support, and a
/// `ram` device shows no volatile cache (its store is the medium).
#[test]
fn nvme_durable_cache_and_fua_attributes_match_the_namespace() {
    let Some(_h) = nvme_harness() else { return };
    cache_and_fua_attributes_match(MAIN_NS);
}

#[test]
fn nvme_durable_4k_cache_and_fua_attributes_match_the_namespace() {
    let Some((_h, ns)) = nvme_4k_harness() else { return };
    cache_and_fua_attributes_match(ns);
}

fn cache_and_fua_attributes_match(nvme: Ns) {
    let _d = Diagnostics;
    let ns = (queue_text(nvme.name, "write_cache"), queue_text(nvme.name, "fua"));
    let dev = add_nvme(&nvme.ng(), "zero", &[]);
    nvme.assert_lbs_of(&dev);
    let name = ublk_name(&dev);
    let ours = (queue_text(&name, "write_cache"), queue_text(&name, "fua"));
    assert_eq!(ours, ns, "{name} (write_cache, fua) vs {}'s", nvme.block());
    let ram = add(&["ram", "--size", "8M"]);
    let ram_name = ublk_name(&ram);
    let ram_attrs = (queue_text(&ram_name, "write_cache"), queue_text(&ram_name, "fua"));
    assert_eq!(ram_attrs, ("write through".to_string(), "0".to_string()), "{ram_name} (ram)");
    println!("{name}: {ours:?} like the namespace; {ram_name} (ram): {ram_attrs:?}");
    for d in [&dev, &ram] {
        del(d.id);
        assert_gone(d);
    }
}

/// A private ftrace instance recording the NVMe driver's `nvme_setup_cmd`
/// event (every command it sends, passthrough included) for Flush (opcode
/// 0) and Write (1) on I/O queues. Passthrough commands do not show in
/// `/sys/block/nvme0n1/stat`, so this is where our Flushes can be seen.
/// Drop removes the instance, and unmounts tracefs if it mounted it.
struct NvmeTrace {
    dir: PathBuf,
    mounted: bool,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl NvmeTrace {
    fn start() -> Self {
        let mounted = !Path::new(TRACEFS).join("instances").is_dir();
        if mounted {
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (src, dst, fs) = (c("tracefs"), c(TRACEFS), c("tracefs"));
            // SAFETY: every pointer is a NUL-terminated string alive for the call.
            let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
            assert_eq!(r, 0, "mount tracefs on {TRACEFS}: {}", std::io::Error::last_os_error());
        }
        let dir =
            Path::new(TRACEFS).join("instances").join(format!("ublk-bench-test-{}", std::process::id()));
        let t = NvmeTrace { dir, mounted };
        fs::create_dir(&t.dir).unwrap_or_else(|e| panic!("create trace instance {}: {e}", t.dir.display()));
        let event = t.dir.join("events/nvme/nvme_setup_cmd");
        for (file, value) in [("filter", "qid != 0 && opcode <= 1"), ("enable", "1")] {
            fs::write(event.join(file), value)
                .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", event.join(file).display()));
        }
        t
    }

    /// The recorded commands for block device `disk`, one line each.
    fn lines(&self, disk: &str) -> Vec<String> {
        let path = self.dir.join("trace");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let tag = format!("disk={disk},");
        text.lines().filter(|l| l.contains("nvme_setup_cmd:") && l.contains(&tag)).map(String::from).collect()
    }
}

impl Drop for NvmeTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/nvme/nvme_setup_cmd/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
        if self.mounted {
            let dst = std::ffi::CString::new(TRACEFS).expect("no NUL");
            // SAFETY: dst is a NUL-terminated string alive for the call.
            unsafe { libc::umount(dst.as_ptr()) };
        }
    }
}

/// `key=VALUE` in a trace line: VALUE up to the next ',' or ')'.
fn trace_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    Some(&rest[..rest.find([',', ')']).unwrap_or(rest.len())])
}

/// An NVMe Write seen in the trace: first LBA and whether FUA (CDW12 bit
/// 30, bit 14 of the traced control word) was set.
fn traced_writes(lines: &[String]) -> Vec<(u64, bool)> {
    lines
        .iter()
        .filter(|l| l.contains("cmd=(nvme_cmd_write "))
        .map(|l| {
            let slba = trace_field(l, "slba=").and_then(|v| v.parse().ok());
            let ctrl = trace_field(l, "ctrl=0x").and_then(|v| u16::from_str_radix(v, 16).ok());
            match (slba, ctrl) {
                (Some(s), Some(c)) => (s, c & (1 << 14) != 0),
                _ => panic!("cannot read slba and ctrl in trace line {l:?}"),
            }
        })
        .collect()
}

/// `pwritev2(RWF_DSYNC)` of `buf` at `at`: on an O_DIRECT block device the
/// kernel sends it as a FUA write.
fn pwrite_dsync(f: &File, buf: &[u8], at: u64) {
    use std::os::fd::AsRawFd;
    let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: iov describes buf, which outlives the call; the kernel only reads it.
    let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, at as i64, libc::RWF_DSYNC) };
    assert_eq!(n, buf.len() as isize, "pwritev2(RWF_DSYNC) at {at}: {}", std::io::Error::last_os_error());
}

const FSYNCS: u64 = 6;
const FUA_WRITES: u64 = 5;
/// Where the fsync'd and the RWF_DSYNC writes go (4 KiB each, apart).
const FSYNC_AT: u64 = 32 * MIB;
const FUA_AT: u64 = 33 * MIB;

/// fsync through the ublk device reaches the namespace as NVMe Flush, and
/// RWF_DSYNC writes reach it as NVMe Writes with FUA set (plain writes
/// without), as the NVMe driver's own trace of the commands it sends shows.
#[test]
fn nvme_durable_fsync_and_fua_writes_reach_the_namespace() {
    let Some(_h) = nvme_harness() else { return };
    fsync_and_fua_writes_reach(MAIN_NS);
}

#[test]
fn nvme_durable_4k_fsync_and_fua_writes_reach_the_namespace() {
    let Some((_h, ns)) = nvme_4k_harness() else { return };
    fsync_and_fua_writes_reach(ns);
}

fn fsync_and_fua_writes_reach(ns: Ns) {
    let _d = Diagnostics;
    let nvme_block = ns.block();
    assert_eq!(
        queue_text(ns.name, "write_cache"),
        "write back",
        "{nvme_block} has no volatile cache, so no flush is ever due: QEMU's nvme device needs one"
    );
    let ns_fua = queue_text(ns.name, "fua") == "1";
    let dev = add_nvme(&ns.ng(), "zero", &[]);
    let lbs = ns.assert_lbs_of(&dev);
    let name = ublk_name(&dev);
    let trace = NvmeTrace::start();
    let (ours_before, ns_before) = (block_stat(&name, STAT_FLUSH_IOS), block_stat(ns.name, STAT_FLUSH_IOS));

    let f = open_direct(&dev.block(), true);
    let mut buf = Aligned::new(4096);
    buf.get_mut().copy_from_slice(&random_bytes(4096, 0xf1a5));
    for i in 0..FSYNCS {
        let at = FSYNC_AT + i * 8192;
        f.write_all_at(buf.get(), at).unwrap_or_else(|e| panic!("pwrite at {at}: {e}"));
        f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", dev.block().display()));
    }
    for i in 0..FUA_WRITES {
        pwrite_dsync(&f, buf.get(), FUA_AT + i * 8192);
    }
    drop(f);

    let flushed = block_stat(&name, STAT_FLUSH_IOS) - ours_before;
    let lines = trace.lines(ns.name);
    let nvme_flushes = lines.iter().filter(|l| l.contains("cmd=(nvme_cmd_flush ")).count() as u64;
    let writes = traced_writes(&lines);
    let in_span = |at: u64, n: u64| move |w: &&(u64, bool)| (at / lbs..(at + n * 8192) / lbs).contains(&w.0);
    let plain: Vec<_> = writes.iter().filter(in_span(FSYNC_AT, FSYNCS)).collect();
    let fua: Vec<_> = writes.iter().filter(in_span(FUA_AT, FUA_WRITES)).collect();
    println!(
        "{FSYNCS} fsyncs and {FUA_WRITES} RWF_DSYNC writes: {name} counted {flushed} flushes; the NVMe driver sent \
         {nvme_flushes} Flush, {} plain and {} FUA Writes in range ({nvme_block} stat flush field {} -> {})",
        plain.iter().filter(|w| !w.1).count(),
        fua.iter().filter(|w| w.1).count(),
        ns_before,
        block_stat(ns.name, STAT_FLUSH_IOS)
    );
    assert!(flushed >= FSYNCS, "{name} counted {flushed} flushes for {FSYNCS} fsyncs");
    assert!(
        nvme_flushes >= flushed,
        "{name} took {flushed} flushes but the NVMe driver sent only {nvme_flushes} Flush commands:\n{}",
        lines.join("\n")
    );
    assert_eq!(plain.len() as u64, FSYNCS, "Writes for the fsync'd blocks:\n{}", lines.join("\n"));
    assert!(plain.iter().all(|w| !w.1), "a plain write went with FUA: {plain:?}");
    assert_eq!(fua.len() as u64, FUA_WRITES, "Writes for the RWF_DSYNC blocks:\n{}", lines.join("\n"));
    // Without FUA on the namespace the block layer flushes after each instead.
    assert!(fua.iter().all(|w| w.1 == ns_fua), "RWF_DSYNC writes, namespace fua {ns_fua}: {fua:?}");
    drop(trace);
    del(dev.id);
    assert_gone(&dev);
}

/// A filesystem mounted on a fresh folder; unmounted (lazily if busy) and
/// the folder removed when dropped, so a failing test leaves no mount.
struct Mounted {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Mounted {
    fn new(dev: &Path, opts: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("ublk-bench-ext4.").tempdir().expect("mount point");
        let out = run(Command::new(need_tool("mount")).args(["-o", opts]).arg(dev).arg(dir.path()));
        assert!(out.ok(), "mount -o {opts} {}:\n{}", dev.display(), out.describe());
        Mounted { dir, mounted: true }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn unmount(mut self) {
        let out = run(Command::new(need_tool("umount")).arg(self.dir.path()));
        assert!(out.ok(), "umount {}:\n{}", self.dir.path().display(), out.describe());
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = try_run(Command::new("umount").arg("-l").arg(self.dir.path()), Duration::from_secs(30));
        }
    }
}

const EXT4_FILES: u64 = 4;

/// ext4 with its journal on an `nvme` device of 256 MiB (less than the
/// namespace), in zero and in copy mode: mkfs, mount, files written and
/// fsync'd, unmount; `e2fsck -f -n` finds it clean, and the files read back
/// after a remount. Every step here flushes: mkfs and fsync directly, the
/// journal with FLUSH and FUA commits; one refused FLUSH fails the step or
/// aborts the journal (which the remount and fsck then show).
#[test]
fn nvme_durable_ext4_fsync_and_fsck_pass() {
    let Some(_h) = nvme_harness() else { return };
    ext4_fsync_and_fsck_pass(MAIN_NS);
}

#[test]
fn nvme_durable_4k_ext4_fsync_and_fsck_pass() {
    let Some((_h, ns)) = nvme_4k_harness() else { return };
    ext4_fsync_and_fsck_pass(ns);
}

fn ext4_fsync_and_fsck_pass(ns: Ns) {
    let _d = Diagnostics;
    for (mode, seed) in [("zero", 0xe4_0000_u64), ("copy", 0xe4_1000)] {
        let dev = add_nvme(&ns.ng(), mode, &["--size", "256M"]);
        let lbs = ns.assert_lbs_of(&dev);
        assert_eq!(dev.json["size"], 256 * MIB, "{}", dev.json);
        let block = dev.block();
        let mkfs = run(Command::new(need_tool("mkfs.ext4")).args(["-q", "-F"]).arg(&block));
        assert!(mkfs.ok(), "{mode}: mkfs.ext4 {} (lbs {lbs}):\n{}", block.display(), mkfs.describe());

        let fs = Mounted::new(&block, "rw");
        let files: Vec<(String, Vec<u8>)> = (0..EXT4_FILES)
            .map(|i| (format!("f{i}"), random_bytes((MIB + 4096 * i + 100) as usize, seed + i)))
            .collect();
        for (name, data) in &files {
            let path = &fs.path(name);
            let mut f =
                File::create(path).unwrap_or_else(|e| panic!("{mode}: create {}: {e}", path.display()));
            std::io::Write::write_all(&mut f, data)
                .unwrap_or_else(|e| panic!("{mode}: write {}: {e}", path.display()));
            f.sync_all().unwrap_or_else(|e| {
                panic!("{mode}: fsync {} on ext4 on {}: {e}", path.display(), block.display())
            });
        }
        File::open(fs.dir.path())
            .and_then(|d| d.sync_all())
            .unwrap_or_else(|e| panic!("{mode}: fsync of the folder: {e}"));
        fs.unmount();

        let fsck = run(Command::new(need_tool("e2fsck")).args(["-f", "-n"]).arg(&block));
        assert!(
            fsck.ok(),
            "{mode}: e2fsck -f -n {} after the unmount:\n{}",
            block.display(),
            fsck.describe()
        );

        let fs = Mounted::new(&block, "ro");
        for (name, data) in &files {
            let path = &fs.path(name);
            let back = fs::read(path)
                .unwrap_or_else(|e| panic!("{mode}: read {} after remount: {e}", path.display()));
            assert_same(&back, data, 0, &format!("{mode}: {} after remount", path.display()));
        }
        fs.unmount();
        println!(
            "{mode}: ext4 on {} (lbs {lbs}, 256 MiB of the namespace): {EXT4_FILES} files fsync'd, fsck clean, read back",
            block.display()
        );
        del(dev.id);
        assert_gone(&dev);
    }
}

/// A recovering server must find the device where its settings say: where
/// the settings name a size past the namespace's end or, on 4 KiB LBAs,
/// blocks smaller than its LBAs, `recover` fails naming the mismatch, before
/// the kernel's device is touched; with the settings restored, `recover`
/// brings the device back with the data written before the crash.
/// The takeover compares its settings with the kernel's view first, so that
/// check is the one that refuses here; the namespace's own check (a
/// namespace that shrank or was reformatted under an unchanged device,
/// which the guest cannot do to its emulated disk) is covered on the host by
/// `serving_checks_the_namespace_still_holds_the_device` in nvme.rs.
#[test]
fn nvme_durable_recover_refuses_settings_the_namespace_cannot_hold() {
    let Some(_h) = nvme_harness() else { return };
    recover_refuses_settings_the_namespace_cannot_hold(MAIN_NS);
}

#[test]
fn nvme_durable_4k_recover_refuses_settings_the_namespace_cannot_hold() {
    let Some((_h, ns)) = nvme_4k_harness() else { return };
    recover_refuses_settings_the_namespace_cannot_hold(ns);
}

fn recover_refuses_settings_the_namespace_cannot_hold(ns: Ns) {
    let _d = Diagnostics;
    let dev = add_nvme(&ns.ng(), "zero", &["-r", "--size", "256M"]);
    let lbs = ns.assert_lbs_of(&dev);
    let (id, at) = (dev.id.to_string(), 8 * MIB);
    let pattern = random_bytes(MIB as usize, 0x7a6e);
    pwrite_direct(&dev.block(), at, &pattern, &[128 << 10]);
    signal(dev.pid, libc::SIGKILL);
    wait_dead(dev.pid);

    let path = settings_path(dev.id);
    let saved = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let cfg: Value = serde_json::from_str(&saved).expect("settings are JSON");
    let sectors = fs::read_to_string(format!("/sys/block/{}/size", ns.name)).expect("namespace size");
    let ns_bytes = sectors.trim().parse::<u64>().expect("a number") << 9;
    let kernel = "does not match the device in the kernel".to_string();
    let mut cases = vec![(
        "size",
        Value::from(ns_bytes + lbs),
        vec![kernel.clone(), format!("size {} in the file", ns_bytes + lbs)],
    )];
    if lbs > 512 {
        cases.push((
            "block_size",
            Value::from(512),
            vec![kernel, format!("block size 512 in the file, {lbs}")],
        ));
    }
    for (key, value, hints) in &cases {
        let mut bad = cfg.clone();
        bad[*key] = value.clone();
        fs::write(&path, bad.to_string()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let out = ublk(&["recover", "-n", &id]);
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !out.ok(),
            "recover with {key} {value} on a {ns_bytes}-byte namespace succeeded:\n{}",
            out.describe()
        );
        for hint in hints {
            assert!(
                text.contains(hint.as_str()),
                "recover with {key} {value}: no {hint:?} in:\n{}",
                out.describe()
            );
        }
        let state = list_one(dev.id).map(|d| d["state"].clone());
        assert!(state.as_ref().is_some_and(|s| s != "LIVE"), "device after a refused recover: {state:?}");
        println!("recover with {key} {value} refused: {}", out.stderr.trim());
    }
    fs::write(&path, &saved).unwrap_or_else(|e| panic!("restore {}: {e}", path.display()));
    let out = ublk(&["recover", "-n", &id]).success();
    assert!(out.stdout.contains("state LIVE"), "recover with the settings restored:\n{}", out.describe());
    assert_same(&pread_direct(&dev.block(), at, MIB), &pattern, at, "pattern after the recover");
    let now = list_one(dev.id).expect("device after recover");
    del(dev.id);
    assert_gone(&Dev { id: dev.id, pid: now["pid"].as_i64().unwrap_or(0) as i32, json: now });
}

/// `--dev` as a chain of symlinks (relative to absolute, as udev's
/// /dev/disk/by-id names are) to /dev/nvme0n1 works: the settings name the
/// real generic node, and a pattern written through ublk is on the namespace.
#[test]
fn nvme_dev_given_as_a_symlink_works() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let dir = tempfile::Builder::new().prefix("ublk-bench-nvme.").tempdir().expect("temp dir");
    fs::create_dir(dir.path().join("by-id")).expect("mkdir by-id");
    let by_id = dir.path().join("by-id/nvme-QEMU_NVMe_Ctrl_ublk0001");
    std::os::unix::fs::symlink(NVME_BLOCK, &by_id).expect("symlink to the namespace");
    let link = dir.path().join("namespace");
    std::os::unix::fs::symlink("by-id/nvme-QEMU_NVMe_Ctrl_ublk0001", &link).expect("relative symlink");
    let dev = add_nvme(&link.to_string_lossy(), "copy", &[]);
    let settings = fs::read_to_string(settings_path(dev.id)).expect("settings file");
    let cfg: Value = serde_json::from_str(&settings).expect("settings are JSON");
    assert_eq!(cfg["nvme_dev"], NG, "settings of a device made with --dev {}: {cfg}", link.display());

    let at = 40 * MIB;
    let pattern = random_bytes(MIB as usize, 0x5111_u64);
    pwrite_direct(&dev.block(), at, &pattern, &[128 << 10]);
    del(dev.id);
    assert_gone(&dev);
    assert_same(&pread_direct(Path::new(NVME_BLOCK), at, MIB), &pattern, at, "pattern on the namespace");
    println!("--dev {} -> {NG}; 1 MiB written through ublk read back from {NVME_BLOCK}", link.display());
}

// ---------------------------------------------------------------- errors

/// Bad `--dev` values and copy modes a backend cannot do: each `add` fails
/// with a message naming the problem and makes no device and no process.
#[test]
fn bad_nvme_input_is_rejected_and_leaves_nothing() {
    let Some(_h) = nvme_harness() else { return };
    let dir = tempfile::Builder::new().prefix("ublk-bench-nvme.").tempdir().expect("temp dir");
    // Names the code maps as namespaces, but not the char device it needs:
    // a block device node (a symlink would resolve to its target's name).
    let block_node: PathBuf = dir.path().join("ng0n5");
    make_block_node(&block_node, Path::new(NVME_BLOCK));
    let regular: PathBuf = dir.path().join("ng0n6");
    fs::write(&regular, b"not a device").expect("write a regular file");
    let missing_link: PathBuf = dir.path().join("nvme-gone");
    std::os::unix::fs::symlink("/dev/nvme9n1", &missing_link).expect("dangling symlink");
    let (block_node, regular, missing_link) = (
        block_node.to_string_lossy().into_owned(),
        regular.to_string_lossy().into_owned(),
        missing_link.to_string_lossy().into_owned(),
    );
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["add", "nvme", "--dev", "/dev/sda"], vec!["/dev/sda", "nvme namespace"]),
        (vec!["add", "nvme", "--dev", "/dev/null"], vec!["/dev/null", "nvme namespace"]),
        (vec!["add", "nvme", "--dev", "/dev/nvme0"], vec!["/dev/nvme0", "nvme namespace"]),
        (vec!["add", "nvme", "--dev", "/dev/nvme0n1p1"], vec!["/dev/nvme0n1p1", "nvme namespace"]),
        (vec!["add", "nvme", "--dev", "/dev/ng9n1"], vec!["/dev/ng9n1", "no such file"]),
        (vec!["add", "nvme", "--dev", "/dev/nvme9n1"], vec!["/dev/nvme9n1", "no such file", "/dev/ngXnY"]),
        (vec!["add", "nvme", "--dev", &missing_link], vec![&missing_link, "no such file", "symlink"]),
        (vec!["add", "nvme", "--dev", &block_node], vec![&block_node, "not a character device"]),
        (vec!["add", "nvme", "--dev", &regular], vec![&regular, "not a character device"]),
        (vec!["add", "nvme"], vec!["--dev"]),
        (vec!["add", "nvme", "--dev", NG, "--copy-mode", "user"], vec!["user copy", "--copy-mode zero"]),
        (vec!["add", "nvme", "--dev", NG, "--size", "2G"], vec!["--size", "namespace"]),
        (vec!["add", "ram", "--dev", NG], vec!["--dev", "nvme"]),
        (vec!["add", "null", "--dev", NG], vec!["--dev", "nvme"]),
        (vec!["add", "nvme", "--dev", NG, "--copy-mode", "fast"], vec!["fast", "zero"]),
        (
            vec!["add", "nvme", "--dev", NG, "--copy-mode", "copy", "--explicit-buf-reg"],
            vec!["--explicit-buf-reg", "--copy-mode zero"],
        ),
    ];
    let failures: Vec<String> =
        cases.iter().filter_map(|(args, hints)| check_rejected(args, hints)).collect();
    assert!(
        failures.is_empty(),
        "{} bad input(s) not handled well:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The namespace is still usable after all that.
    let dev = add_nvme(NG, "auto", &[]);
    del(dev.id);
    assert_gone(&dev);
}

/// A block device node at `path` for the same device as `like`.
fn make_block_node(path: &Path, like: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(like).unwrap_or_else(|e| panic!("stat {}: {e}", like.display())).rdev();
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("no NUL");
    // SAFETY: c is a NUL-terminated path alive for the call.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev) };
    assert_eq!(r, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
}

// ---------------------------------------------------------------- the namespace's limits

/// A zero-copy `nvme` device, and `file --direct` on the namespace's block
/// node, advertise what the namespace accepts of a request's memory
/// (UBLK_PARAM_TYPE_DMA_ALIGN, _SEGMENT): their DMA alignment and segment
/// limits are the namespace's, `list` shows them, and O_DIRECT I/O whose
/// buffer is aligned only as far as the ublk device asks (`dma_alignment +
/// 1` bytes, 4 on NVMe, not the default 512) goes through end to end:
/// written through `/dev/ublkbN`, read back through it with the same
/// alignment, and found on the namespace.
#[test]
fn zero_copy_devices_advertise_the_namespace_limits() {
    let Some(_h) = nvme_harness() else { return };
    let _d = Diagnostics;
    let nvme = add_nvme(NG, "zero", &[]);
    finely_aligned_io_lands(nvme, 0x1d4a);
    let file = add(&["file", "--path", NVME_BLOCK, "--direct"]);
    assert_eq!(file.json["copy_mode"], "zero", "{}", file.json);
    finely_aligned_io_lands(file, 0x1d4b);
}

fn finely_aligned_io_lands(dev: Dev, seed: u64) {
    let name = ublk_name(&dev);
    for attr in ["dma_alignment", "max_segments", "max_segment_size"] {
        let (ublk, ns) = (queue_attr(&name, attr), queue_attr("nvme0n1", attr));
        assert_eq!(ublk, ns, "{name} {attr} vs nvme0n1's");
        assert_eq!(dev.json["limits"][attr], ublk, "`list` shows {attr}: {}", dev.json);
    }
    let mask = queue_attr(&name, "dma_alignment") as usize;
    assert!(mask < 511, "the namespace accepts finer alignment than the 512-byte default: {mask}");
    let len = 4 * (namespace_lbs() as usize).max(4096);
    let offset = PATTERN_AT;
    let want = random_bytes(len, seed);
    // A page-aligned buffer, used from `mask + 1` bytes in: aligned to that and no more.
    let mut raw = Aligned::new(len + 4096);
    let at = mask + 1;
    raw.get_mut()[at..at + len].copy_from_slice(&want);
    let f = open_direct(&dev.block(), true);
    f.write_all_at(&raw.get()[at..at + len], offset)
        .unwrap_or_else(|e| panic!("{name}: O_DIRECT write with a buffer aligned to {at} bytes: {e}"));
    f.sync_all().unwrap();
    raw.get_mut()[at..at + len].fill(0);
    f.read_exact_at(&mut raw.get_mut()[at..at + len], offset)
        .unwrap_or_else(|e| panic!("{name}: O_DIRECT read with a buffer aligned to {at} bytes: {e}"));
    assert_same(&raw.get()[at..at + len], &want, offset, &format!("{name}: read back"));
    drop(f);
    del(dev.id);
    let on_ns = pread_direct(Path::new(NVME_BLOCK), offset, len as u64);
    assert_same(&on_ns, &want, offset, &format!("{name}: on the namespace"));
}
