//! Crash recovery: the built `ublk-bench` binary, black-box, against the
//! real ublk driver. A crash is `kill -9` of the server process. What they
//! prove:
//! - with `-r -i`, repeated kills under fio's write-and-verify load, brought
//!   back by `recover`, `--supervise` or `--standby` (per-tag and batch,
//!   `ram` and `file`), lose no acknowledged write and show fio no error;
//! - without `-i` in-flight I/O fails with EIO and queued I/O completes;
//!   with fail-io (`-e`) I/O fails fast while no server runs;
//! - `restart` under load hands over with no error (supervised and batch
//!   too), recovers cold when its successor fails, leaves the successor
//!   serving when interrupted, and refuses a server it does not recognise;
//! - a queue thread's panic is recovered (unsupervised, supervised,
//!   standby); killing the recovering server and recovering again works;
//! - `del` of a quiesced, supervised or standby device ends every process
//!   of the device; SIGTERM to a supervised server is a stop, not a crash;
//! - `recover` refuses bad requests and settings that contradict the
//!   kernel's device, and falls back to the affinity set for a CPU gone
//!   offline; `stats` follows the live server, not a standby or successor.
//!
//! They need /dev/ublk-control and root; without the driver each test goes
//! through `common::skip`: it says why and passes on the host, and fails in
//! the guest (`UBLK_TEST_NO_SKIP=1`). Run them in the guest:
//! `bench-scripts/vm -- target/debug/deps/recovery-HASH --test-threads=1`.
//!
//! Every test holds a [`Guard`]: tests run one at a time (the `common`
//! harness's mutex), and when the test ends, even by panic, the guard kills
//! the fio/dd/CLI processes this file started in the background, prints the
//! server log if the test failed, then the harness deletes every device and
//! kills every ublk-bench process.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- guard

/// Process groups of background children (fio, dd, `recover`) started here.
static BG_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The harness plus the clean-up of what this file starts in the background.
struct Guard {
    _h: Option<Harness>,
}

fn guard() -> Option<Guard> {
    Some(Guard { _h: Some(harness()?) })
}

impl Drop for Guard {
    fn drop(&mut self) {
        kill_background();
        if std::thread::panicking() {
            dump_diagnostics();
        }
        // The harness (dropped next) deletes every device and kills every
        // ublk-bench process, after checking nothing was left behind.
        self._h.take();
    }
}

fn kill_background() {
    for pgid in BG_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        // SAFETY: kill takes plain integers; the group is one we created.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// On failure: the tail of the server log, the events files and the kernel log.
fn dump_diagnostics() {
    let log = run_dir().join("server.log");
    let text = fs::read_to_string(&log).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    eprintln!("---- last lines of {}:\n{tail}", log.display());
    for e in fs::read_dir(run_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".events") {
            eprintln!("---- {name}:\n{}", fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    if let Some(out) = try_run(&mut Command::new("dmesg"), Duration::from_secs(10)) {
        let lines: Vec<&str> = out.stdout.lines().collect();
        eprintln!("---- dmesg tail:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
    }
}

/// A background child in its own process group, killed by the guard if the
/// test ends before it does.
struct Bg {
    run: Option<Running>,
    pgid: i32,
    started: Instant,
}

impl Bg {
    fn start(cmd: &mut Command) -> Bg {
        cmd.process_group(0);
        let run = spawn(cmd);
        let pgid = run.pid();
        BG_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).push(pgid);
        Bg { run: Some(run), pgid, started: Instant::now() }
    }

    fn pid(&self) -> i32 {
        self.pgid
    }

    fn running(&mut self) -> bool {
        let run = self.run.as_mut().expect("not waited yet");
        matches!(run.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout`; None (child killed) on timeout.
    fn wait(mut self, timeout: Duration) -> Option<Out> {
        let out = self.run.take().expect("waited once").wait(timeout);
        BG_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).retain(|&g| g != self.pgid);
        out
    }

    fn finish(self, timeout: Duration) -> Out {
        let started = self.started;
        let what = self.run.as_ref().map(|r| r.what.clone()).unwrap_or_default();
        self.wait(timeout).unwrap_or_else(|| {
            panic!(
                "`{what}` did not finish within {timeout:?} (ran {:?}): hung; killed it",
                started.elapsed()
            )
        })
    }
}

/// Sets its flag when dropped (also when the test panics).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- devices

/// (state, pid) of a device from `list -n ID --json`; None if it is gone.
fn dev_state(id: u32) -> Option<(String, i64)> {
    let out = ublk(&["list", "-n", &id.to_string(), "--json"]);
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = out.status.signal() {
        panic!("`ublk-bench list -n {id} --json` was killed by signal {sig}:\n{}", out.describe());
    }
    if !out.ok() {
        assert!(out.stderr.contains("does not exist"), "`list -n {id}` failed:\n{}", out.describe());
        return None;
    }
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`list -n {id} --json` is not JSON ({e}):\n{}", out.describe()));
    let d = v.as_array().and_then(|a| a.first()).cloned().unwrap_or(v);
    Some((d["state"].as_str().unwrap_or("?").to_string(), d["pid"].as_i64().unwrap_or(0)))
}

/// Polls until the device's state satisfies `want`; returns (state, pid).
fn wait_dev(id: u32, what: &str, timeout: Duration, want: impl Fn(&str, i64) -> bool) -> (String, i64) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let now = dev_state(id);
        if let Some((s, p)) = &now
            && want(s, *p)
        {
            return (s.clone(), *p);
        }
        last = now.or(last);
        assert!(
            Instant::now() < deadline,
            "device {id}: timed out after {timeout:?} waiting for {what}; last seen {last:?}"
        );
        sleep_ms(30);
    }
}

/// The pid in the `daemon pid N` of a device dump.
fn daemon_pid(dump: &str) -> Option<i32> {
    let rest = &dump[dump.find("daemon pid ")? + "daemon pid ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Polls until the device is LIVE under a living pid other than `old`.
fn wait_new_server(id: u32, old: i32, timeout: Duration) -> i32 {
    let (_, pid) = wait_dev(id, &format!("LIVE under a new server (old pid {old})"), timeout, |s, p| {
        s == "LIVE" && p > 0 && p as i32 != old && alive(p as i32)
    });
    pid as i32
}

/// Polls until the device is QUIESCED (or FAIL_IO) with no server.
fn wait_serverless(id: u32, state: &str) {
    wait_dev(id, &format!("{state} with no server"), Duration::from_secs(30), |s, p| {
        s == state && (p <= 0 || !alive(p as i32))
    });
}

fn kill9(pid: i32) {
    assert!(pid > 0, "bad pid {pid}");
    signal(pid, libc::SIGKILL);
}

/// kill -9 of a server that must be running: if it already died by itself,
/// say so with what the server log says about it.
fn crash_server(pid: i32, what: &str) {
    // SAFETY: kill takes plain integers.
    let sent = pid > 0 && running(pid) && unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
    if !sent {
        let log = fs::read_to_string(run_dir().join("server.log")).unwrap_or_default();
        let about: Vec<&str> = log.lines().filter(|l| l.contains(&pid.to_string())).collect();
        panic!(
            "{what}: server {pid} died by itself before the test killed it (a server crash); \
             server.log about it:\n{}",
            about.join("\n")
        );
    }
}

/// The server log from byte `from` on.
fn log_since(from: u64) -> String {
    let log = fs::read(run_dir().join("server.log")).unwrap_or_default();
    String::from_utf8_lossy(&log[(from as usize).min(log.len())..]).into_owned()
}

fn log_len() -> u64 {
    fs::metadata(run_dir().join("server.log")).map_or(0, |m| m.len())
}

/// Running: exists and is not a zombie.
fn running(pid: i32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Requests in flight on the block device (reads + writes).
fn inflight(id: u32) -> u64 {
    fs::read_to_string(format!("/sys/block/ublkb{id}/inflight"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse::<u64>().ok())
        .sum()
}

/// Reads and writes completed on the device so far.
fn completed_ios(id: u32) -> u64 {
    let stat = fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat.split_whitespace().filter_map(|s| s.parse().ok()).collect();
    f.first().copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0)
}

/// Waits until a request is in flight on the device (sampled every
/// millisecond, so at most ~1 ms before the caller acts). Under emulation
/// fio spends most of its time computing and a request is in flight only a
/// small part of it, but it always is again within seconds. False after
/// `timeout`, or once `give_up()`.
fn wait_in_flight(id: u32, timeout: Duration, give_up: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if inflight(id) > 0 {
            return true;
        }
        n += 1;
        if n.is_multiple_of(64) && (give_up() || start.elapsed() > timeout) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Completed I/O must have advanced since the last kill or handover (the
/// server that took over served): `last` holds the count seen at it.
fn assert_progress(id: u32, last: &mut Option<u64>, what: &str) {
    let now = completed_ios(id);
    if let Some(before) = *last {
        assert!(
            now > before,
            "{what}: no I/O completed on device {id} since the last one ({before} then {now})"
        );
    }
    *last = Some(now);
}

/// The complete lines of the events file (one being appended is left out).
fn events(id: u32) -> Vec<Value> {
    let text = fs::read_to_string(run_dir().join(format!("{id}.events"))).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad events line ({e}): {l}")))
        .collect()
}

/// The events line written by server `pid`, if any.
fn event_of(id: u32, pid: i32) -> Option<Value> {
    events(id).into_iter().find(|e| e["pid"] == pid)
}

/// Every `/run/ublk-bench/<id>.*` file.
fn run_files(id: u32) -> Vec<String> {
    let prefix = format!("{id}.");
    fs::read_dir(run_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// After a `del`: no device, no node, no ublk-bench process, no run file, no store.
fn assert_nothing_left(id: u32, store: Option<&str>, pids: &[i32]) {
    assert!(dev_state(id).is_none(), "device {id} is still listed after its delete");
    assert!(list_one(id).is_none(), "device {id} is still in `list --json` after its delete");
    for node in [format!("/dev/ublkb{id}"), format!("/dev/ublkc{id}")] {
        wait_until(&format!("{node} to disappear"), SETTLE, || !Path::new(&node).exists());
    }
    for &pid in pids {
        wait_until(&format!("pid {pid} to exit and be reaped"), SETTLE, || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
    }
    wait_until("every ublk-bench process to be gone", SETTLE, || servers().is_empty());
    let files = run_files(id);
    assert!(files.is_empty(), "files of device {id} left in {}: {files:?}", run_dir().display());
    if let Some(store) = store {
        assert!(!Path::new(store).exists(), "RAM store {store} of device {id} is still there");
    }
    let shm = format!("/dev/shm/ublk-bench-{id}");
    assert!(!Path::new(&shm).exists(), "{shm} is still there");
}

// ---------------------------------------------------------------- processes

/// The command line of `pid`, split at NULs.
fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Living processes whose command line holds `words` in order, adjacent.
fn find_cmd(words: &[&str]) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| {
            let c = cmdline(p);
            c.windows(words.len()).any(|w| w.iter().zip(words).all(|(a, b)| a == b))
        })
        .filter(|&p| alive(p) && proc_state(p) != Some('Z'))
        .collect()
}

/// The hot standby of device `id` watching server `server`.
fn standby_of(id: u32, server: i32) -> Vec<i32> {
    let (id, server) = (id.to_string(), server.to_string());
    find_cmd(&["--watch-pid", &server]).into_iter().filter(|&p| cmdline(p).contains(&id)).collect()
}

fn ppid(pid: i32) -> i32 {
    procs().into_iter().find(|p| p.pid == pid).map_or(0, |p| p.ppid)
}

/// Whether `pid` has a queue thread (`ublk{id}q0`): its queues are prepared.
fn has_queue_thread(pid: i32, id: u32) -> bool {
    let name = format!("ublk{id}q0");
    threads(pid).iter().any(|(_, c)| *c == name)
}

/// Whether `pid` holds a pidfd (a standby holds its server's while it waits).
fn holds_pidfd(pid: i32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("pidfd")))
}

// ---------------------------------------------------------------- data

/// Writes `data` at `offset` with `dd oflag=direct`; returns once dd has
/// exited, so every byte is acknowledged by the device. Panics if dd fails
/// or takes more than CMD_TIMEOUT (a hung device).
fn write_direct(dev: &Path, offset: u64, data: &[u8]) {
    const BS: u64 = 64 << 10;
    assert!(
        offset.is_multiple_of(BS) && (data.len() as u64).is_multiple_of(BS),
        "write_direct wants 64 KiB multiples"
    );
    let mut child = Command::new(need_tool("dd"))
        .args([
            format!("of={}", dev.display()),
            "oflag=direct".into(),
            "iflag=fullblock".into(),
            format!("bs={BS}"),
            format!("seek={}", offset / BS),
            "conv=notrunc".into(),
            "status=none".into(),
        ])
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dd");
    let pid = child.id() as i32;
    BG_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    // A dd that fails stops reading: the feeder then gets EPIPE and ends.
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waitpid dd") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dd of={} seek={offset} hung for {CMD_TIMEOUT:?}; killed it", dev.display());
        }
        sleep_ms(10);
    };
    BG_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).retain(|&g| g != pid);
    let fed = feeder.join().expect("feeder thread");
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut err);
    assert!(status.success(), "dd of={} seek={offset} failed ({status}): {err}", dev.display());
    fed.unwrap_or_else(|e| panic!("feeding dd of={}: {e}", dev.display()));
}

fn assert_reads_back(dev: &Path, offset: u64, want: &[u8], when: &str) {
    let got = read_direct(dev, offset, want.len() as u64);
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{when}: byte {} of {} reads {:#04x}, expected {:#04x} ({bad} bytes differ in {} bytes from offset {offset})",
            offset + at as u64,
            dev.display(),
            got[at],
            want[at],
            want.len()
        );
    }
}

/// A dd reading `len` bytes at `offset` with O_DIRECT, in the background.
fn dd_read_bg(dev: &Path, offset: u64, len: u64) -> Bg {
    Bg::start(&mut dd_direct(dev, offset, len))
}

// ---------------------------------------------------------------- fio

/// fio with JSON output on `dev`, in the background.
fn fio_bg(dev: &Path, name: &str, args: &[String]) -> Bg {
    Bg::start(
        Command::new(need_tool("fio"))
            .arg(format!("--name={name}"))
            .arg(format!("--filename={}", dev.display()))
            .args(args)
            .arg("--output-format=json"),
    )
}

fn job_sum(json: &Value, dir: &str, key: &str) -> u64 {
    json["jobs"].as_array().into_iter().flatten().filter_map(|j| j[dir][key].as_u64()).sum()
}

/// The common part of the verifying fio runs: O_DIRECT io_uring at depth 16.
fn fio_base() -> Vec<String> {
    ["--ioengine=io_uring", "--direct=1", "--iodepth=16", "--verify_state_save=0"].map(String::from).to_vec()
}

/// One verifying write pass over the whole device: random writes, each
/// block read back and checked, partly in the backlog while writing and the
/// rest at the end. Two kinds, which the writer alternates:
///
/// - `pattern == false`: 4 KiB blocks with `--verify=crc32c` (what the
///   issue names). fio checks each block's magic, length, offset and CRC:
///   this catches zeros, misplaced and torn blocks, but NOT a lost write
///   whose block still holds an earlier pass's block at the same offset,
///   which is self-consistent. (Checked with fio 3.33 on a file: restoring
///   an older image under a running crc32c job, with or without
///   verify_backlog, and under `--verify_only`, goes unnoticed.)
/// - `pattern == true`: mixed 4-64 KiB blocks with `--verify=pattern`, the
///   pattern being this pass's seed followed by the block's offset (`%o`).
///   Any byte left from another pass, from another offset or never
///   written fails (the same restore test is caught). These passes are
///   what proves that no acknowledged write was lost, and what a later
///   `--verify_only` can re-check.
fn write_verify_pass(seed: u64, pattern: bool) -> Vec<String> {
    let mut a = fio_base();
    a.extend(
        ["--rw=randwrite", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=256"].map(String::from),
    );
    if pattern {
        a.extend([
            "--bsrange=4k-64k".into(),
            "--verify=pattern".into(),
            format!("--verify_pattern=0x{seed:08x}%o"),
        ]);
    } else {
        a.extend(["--bs=4k", "--verify=crc32c"].map(String::from));
    }
    a.push(format!("--randseed={seed}"));
    a
}

/// A read-only pass that checks what `write_verify_pass(seed, true)` wrote.
fn verify_only_pass(seed: u64) -> Vec<String> {
    let mut a = write_verify_pass(seed, true);
    a.retain(|s| !s.starts_with("--verify_backlog"));
    a.push("--verify_only=1".into());
    a
}

// ---------------------------------------------------------------- writer

/// One finished verifying pass: its seed, its block sizes, how long it took.
#[derive(Clone, Debug)]
struct Pass {
    seed: u64,
    pattern: bool,
    took: Duration,
}

/// Verifying fio passes over the whole device, back to back, in a thread,
/// until `finish` (which lets the pass in progress complete).
///
/// What proves that no acknowledged write is lost: each pass writes every
/// block of the device once, then reads every block back and checks it
/// (see [`write_verify_pass`]); passes alternate crc32c and per-pass
/// patterns. A write acknowledged before a crash and lost in the recovery
/// reads back as the previous pass's block, which a pattern pass rejects
/// (wrong seed). fio must report no error at all, and each pass must have
/// written and verified the whole device. The writer always ends on a
/// pattern pass, which [`final_verify`] reads back once more with a
/// separate `--verify_only` fio.
struct Writer {
    stop: Arc<AtomicBool>,
    /// The pass in progress (0, 1, ...): even ones crc32c, odd ones pattern.
    pass: Arc<AtomicU64>,
    /// Set if the test panics: start no further pass.
    _abort: SetOnDrop,
    passes: Arc<Mutex<Vec<Pass>>>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Writer {
    fn start(block: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let abort = Arc::new(AtomicBool::new(false));
        let passes: Arc<Mutex<Vec<Pass>>> = Arc::default();
        let current = Arc::new(AtomicU64::new(0));
        let (t_stop, t_abort, t_passes, t_current, block) =
            (stop.clone(), abort.clone(), passes.clone(), current.clone(), block.to_owned());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            for pass in 0u64.. {
                if t_abort.load(Ordering::SeqCst) {
                    return Err("aborted".into());
                }
                let (seed, pattern) = (1000 + pass, pass % 2 == 1);
                t_current.store(pass, Ordering::SeqCst);
                let started = Instant::now();
                let fio = fio_bg(&block, "verify-pass", &write_verify_pass(seed, pattern));
                let out = fio
                    .wait(FIO_PASS_TIMEOUT)
                    .ok_or(format!("fio pass {pass} did not finish within {FIO_PASS_TIMEOUT:?}: I/O hung"))?;
                let json = fio_clean(&out).map_err(|e| format!("fio pass {pass}: {e}"))?;
                let (w, r) = (job_sum(&json, "write", "io_bytes"), job_sum(&json, "read", "io_bytes"));
                if w != DEV_MIB * MIB || r != DEV_MIB * MIB {
                    return Err(format!(
                        "fio pass {pass} wrote {w} and verified {r} bytes, not the whole device"
                    ));
                }
                t_passes.lock().unwrap().push(Pass { seed, pattern, took: started.elapsed() });
                // The last pass is a pattern pass, for `final_verify`.
                if t_stop.load(Ordering::SeqCst) && pattern {
                    return Ok(());
                }
            }
            unreachable!()
        });
        Writer { stop, pass: current, _abort: SetOnDrop(abort), passes, thread }
    }

    /// Whether the pass in progress is a pattern pass.
    fn in_pattern_pass(&self) -> bool {
        self.pass.load(Ordering::SeqCst) % 2 == 1
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Lets the pass in progress finish; the passes, or the first failure.
    fn finish(self) -> Result<Vec<Pass>, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| "the writer thread panicked".to_string())??;
        Ok(self.passes.lock().unwrap().clone())
    }
}

/// A separate read-only fio over the whole device against the last pass.
fn final_verify(block: &Path, passes: &[Pass]) {
    let last = passes.last().expect("a finished pass");
    assert!(last.pattern, "the last pass must be a pattern pass to be re-verified: {passes:?}");
    let out = fio_bg(block, "verify-pass", &verify_only_pass(last.seed)).finish(FIO_PASS_TIMEOUT);
    let json = fio_clean(&out).unwrap_or_else(|e| panic!("the final verify pass: {e}"));
    let read = job_sum(&json, "read", "io_bytes");
    assert_eq!(read, DEV_MIB * MIB, "the final verify pass read {read} bytes, not the whole device");
}

// ---------------------------------------------------------------- kill cycles

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Recover,
    Supervise,
    Standby,
}

/// Waits for a request in flight ([`wait_in_flight`]) for cycle `n` (from 1) of `total`, after
/// `pattern_so_far` of the earlier cycles came in a pattern pass: half the
/// cycles (rounded down) go to pattern passes (the kind that catches a lost
/// write), the rest to crc32c ones. Load in any pass will do while both
/// kinds have cycles left; once one kind has had its share, this waits for a
/// pass of the other. Returns at once if the writer ended.
fn wait_load_in_pass(id: u32, writer: &Writer, n: usize, total: usize, pattern_so_far: usize) -> bool {
    let crc_so_far = n - 1 - pattern_so_far;
    let want = if crc_so_far >= total - total / 2 {
        Some(true)
    } else if pattern_so_far >= total / 2 {
        Some(false)
    } else {
        None
    };
    let right = || want.is_none_or(|p| writer.in_pattern_pass() == p) || writer.is_finished();
    loop {
        let kind = match want {
            Some(true) => "pattern",
            Some(false) => "crc32c",
            None => "any",
        };
        wait_until(&format!("cycle {n}: the writer in a pass of kind {kind}"), FIO_PASS_TIMEOUT, right);
        let seen = wait_in_flight(id, Duration::from_secs(60), || writer.is_finished());
        // The pass may have ended while we waited for load: wait again.
        if right() {
            return seen;
        }
    }
}

/// Kills per kill-cycle test unless [`KILL_CYCLES_ENV`] says otherwise: the
/// first server (made by `add`) and servers that themselves took over
/// (two generations), each kind of pass (crc32c, pattern) once or more
/// (one pattern, two crc32c: [`wait_load_in_pass`]). More only repeat these
/// states; a long run sets the variable (by hand, on bare metal).
const KILL_CYCLES: usize = 3;
/// Names the number of kills per kill-cycle test, at least 2 (one in each kind of pass).
const KILL_CYCLES_ENV: &str = "UBLK_TEST_KILL_CYCLES";

fn kill_cycle_count() -> usize {
    let Some(v) = std::env::var_os(KILL_CYCLES_ENV) else { return KILL_CYCLES };
    let n = v.to_str().and_then(|s| s.parse::<usize>().ok());
    n.filter(|&n| n >= 2)
        .unwrap_or_else(|| panic!("{KILL_CYCLES_ENV}={v:?}: want a number of kills, 2 or more"))
}
/// The kill-cycle and restart devices: each verifying pass writes and checks
/// all of it (512 4 KiB blocks, or about 60 of 4-64 KiB), so its size sets
/// how long a pass takes, not what a pass proves.
const DEV_MIB: u64 = 2;
const FIO_PASS_TIMEOUT: Duration = Duration::from_secs(240);

/// `BACKEND -r -i` under verifying fio random writes ([`Writer`]): kill -9 the
/// server [`kill_cycle_count`] times in the middle of the load (each kill with a request
/// seen in flight, [`wait_in_flight`], and I/O completed since the kill before) and bring it back by `method`; half the
/// kills land in pattern passes, the rest in crc32c ones ([`wait_load_in_pass`]),
/// both kinds asserted. fio sees no error, every pass verifies the whole device, and a
/// final `--verify_only` pass reads it all back. Each recovery writes one
/// events line of this method with its phases in order. With a supervisor,
/// the new server is its child and the supervisor logged exactly our kills
/// (no other crash, no failed standby); with `--standby`, the standby that
/// watched the killed server is the one that took over, every time.
/// `backend` is the backend and its options (`ram`: zero copy where the
/// kernel has it; `file --path P`), plus `--batch` to serve in batch mode.
fn kill_cycles(method: Method, backend: &[&str]) {
    let Some(_g) = guard() else { return };
    let t0 = Instant::now();
    let size = format!("{DEV_MIB}M");
    let mut args = backend.to_vec();
    args.extend(["-r", "-i", "--size", &size]);
    match method {
        Method::Recover => {}
        Method::Supervise => args.push("--supervise"),
        Method::Standby => args.push("--standby"),
    }
    let log_start = log_len();
    let dev = add(&args);
    assert_batch(&dev, backend);
    let id = dev.id;
    let block = dev.block();
    let supervisor = (method != Method::Recover).then(|| supervisor_pid(id));
    if let Some(s) = supervisor {
        assert!(alive(s), "supervisor pid {s} of device {id} is not running");
        assert_eq!(ppid(dev.pid), s, "the server of a supervised device is not the supervisor's child");
    }

    let writer = Writer::start(&block);
    let mut server = dev.pid;
    let mut gaps = vec![];
    let mut standby_takeovers = 0;
    let (mut waited_standby, mut waited_io) = (Duration::ZERO, Duration::ZERO);
    let mut done_at_kill = None;
    let cycles = kill_cycle_count();
    let mut pattern_kills = 0;
    for cycle in 1..=cycles {
        let w = Instant::now();
        let standby = if method == Method::Standby {
            // The standby for this server must be ready: prepared and
            // watching the server through a pidfd (it opens that last).
            let mut found = vec![];
            wait_until(
                &format!("cycle {cycle}: a standby watching server {server} through a pidfd"),
                Duration::from_secs(60),
                || {
                    found = standby_of(id, server);
                    (found.len() == 1 && holds_pidfd(found[0])) || !running(server)
                },
            );
            // A server that died meanwhile is reported by crash_server below.
            found.first().copied()
        } else {
            None
        };
        waited_standby += w.elapsed();
        let w = Instant::now();
        // Kill in the middle of the load (or give up if the writer ended).
        let seen = wait_load_in_pass(id, &writer, cycle, cycles, pattern_kills);
        if writer.is_finished() {
            break;
        }
        waited_io += w.elapsed();
        assert!(seen, "cycle {cycle}: no request in flight on device {id} within 60 s");
        assert_progress(id, &mut done_at_kill, &format!("cycle {cycle}"));
        let known: Vec<i32> = events(id).iter().filter_map(|e| e["pid"].as_i64()).map(|p| p as i32).collect();
        let k = Instant::now();
        pattern_kills += writer.in_pattern_pass() as usize;
        crash_server(server, &format!("cycle {cycle}"));
        // The new server: `recover` prints it; a supervised device's shows
        // up as a new events line, written once the new server has served
        // a request (polling a file, not `list`, keeps the guest free).
        let new = match method {
            Method::Recover => {
                let out = ublk(&["recover", "-n", &id.to_string()]).success();
                assert!(
                    out.stdout.contains("state LIVE"),
                    "cycle {cycle}: recover printed:\n{}",
                    out.describe()
                );
                daemon_pid(&out.stdout)
                    .unwrap_or_else(|| panic!("cycle {cycle}: no daemon pid in:\n{}", out.describe()))
            }
            Method::Supervise | Method::Standby => {
                let mut new = 0;
                wait_until(
                    &format!("cycle {cycle}: a new server after killing {server}"),
                    Duration::from_secs(60),
                    || {
                        let evs = events(id);
                        let fresh = evs
                            .iter()
                            .filter_map(|e| e["pid"].as_i64())
                            .find(|p| !known.contains(&(*p as i32)));
                        new = fresh.unwrap_or(0) as i32;
                        new > 0
                    },
                );
                new
            }
        };
        assert_ne!(new, server, "cycle {cycle}: the killed server is still the server");
        wait_until(
            &format!("cycle {cycle}: the events line of server {new}"),
            Duration::from_secs(30),
            || event_of(id, new).is_some(),
        );
        gaps.push(k.elapsed());
        if k.elapsed() > Duration::from_secs(5) {
            let ev = event_of(id, new).unwrap_or_default();
            println!(
                "cycle {cycle}: slow: {:?} from kill to the new server's events line: {ev}",
                k.elapsed()
            );
        }
        assert!(alive(new), "cycle {cycle}: new server {new} is not running");
        wait_dead(server);
        if let Some(s) = supervisor {
            assert!(alive(s), "cycle {cycle}: supervisor {s} died");
            assert_eq!(ppid(new), s, "cycle {cycle}: new server {new} is not the supervisor's child");
        }
        if let Some(sb) = standby {
            assert_eq!(
                new, sb,
                "cycle {cycle}: server {new} took over, not the standby {sb} that watched {server}"
            );
            standby_takeovers += 1;
        }
        server = new;
    }
    let passes = writer
        .finish()
        .unwrap_or_else(|e| panic!("after {} kill/recover cycles ({method:?}): {e}", gaps.len()));
    assert_eq!(gaps.len(), cycles, "the writer ended early");
    assert!(
        pattern_kills > 0 && pattern_kills < cycles,
        "{pattern_kills} of {cycles} kills landed in a pattern pass: every kind of pass must see one"
    );
    final_verify(&block, &passes);

    // Phase events: one line per recovery, by this method, in order.
    let evs = events(id);
    let want = match method {
        Method::Recover => "recover",
        Method::Supervise => "supervise",
        Method::Standby => "standby",
    };
    assert_eq!(evs.len(), cycles, "expected {cycles} events lines:\n{evs:#?}");
    for e in &evs {
        assert_eq!(e["method"], want, "events line of another method: {e}");
        for k in ["quiesced_ns", "start_recovery_ns", "fetch_posted_ns", "end_recovery_ns"] {
            assert!(e[k].as_u64().is_some_and(|v| v > 0), "events line without {k}: {e}");
        }
        let order =
            ["quiesced_ns", "start_recovery_ns", "fetch_posted_ns", "end_recovery_ns"].map(|k| e[k].as_u64());
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "phases out of order: {e}");
    }
    let (state, pid) = dev_state(id).expect("listed");
    assert_eq!((state.as_str(), pid as i32), ("LIVE", server), "device {id} after the cycles");
    assert_batch(&Dev { json: list_one(id).expect("listed"), ..dev.clone() }, backend);
    if method != Method::Recover {
        // The supervisor saw exactly our kills: no server died otherwise.
        let log = log_since(log_start);
        let deaths: Vec<&str> = log.lines().filter(|l| l.contains(" died (")).collect();
        let ours = deaths.iter().filter(|l| l.contains("died (signal: 9 (SIGKILL))")).count();
        assert!(
            ours == cycles && deaths.len() == cycles,
            "the supervisor saw {} server deaths, {ours} of them our SIGKILLs:\n{}",
            deaths.len(),
            deaths.join("\n")
        );
        assert!(!log.contains("cold restart"), "a standby failed and a cold restart took over:\n{log}");
    }

    let mut sorted = gaps.clone();
    sorted.sort();
    println!(
        "{method:?}: {} kills, each with a request in flight ({pattern_kills} in a \
         pattern pass), {} verifying fio \
         passes ({:?} each), {} standby takeovers; kill to events line of the new server: p50 {:?} max {:?}, \
         total {:?}; waited for a ready standby {:?}, for load {:?}; test took {:?}",
        gaps.len(),
        passes.len(),
        passes.iter().map(|p| p.took).collect::<Vec<_>>(),
        standby_takeovers,
        sorted[sorted.len() / 2],
        sorted.last().unwrap(),
        gaps.iter().sum::<Duration>(),
        waited_standby,
        waited_io,
        t0.elapsed()
    );
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[server]);
}

#[test]
fn reissue_kill_cycles_recover() {
    kill_cycles(Method::Recover, &["ram"]);
}

#[test]
fn reissue_kill_cycles_supervise() {
    kill_cycles(Method::Supervise, &["ram"]);
}

#[test]
fn reissue_kill_cycles_standby() {
    kill_cycles(Method::Standby, &["ram"]);
}

#[test]
fn batch_reissue_kill_cycles_recover() {
    kill_cycles(Method::Recover, &["ram", "--batch"]);
}

#[test]
fn batch_reissue_kill_cycles_supervise() {
    kill_cycles(Method::Supervise, &["ram", "--batch"]);
}

#[test]
fn batch_reissue_kill_cycles_standby() {
    kill_cycles(Method::Standby, &["ram", "--batch"]);
}

/// With `--batch` among the `add` options the device has UBLK_F_BATCH_IO and `list` says
/// batch; without, neither.
fn assert_batch(dev: &Dev, opts: &[&str]) {
    let want = opts.contains(&"--batch");
    let flags = dev.json["flags"].as_array().cloned().unwrap_or_default();
    assert_eq!(flags.iter().any(|f| f == "BATCH_IO"), want, "device {}: {}", dev.id, dev.json);
    assert_eq!(dev.json["batch"], want, "device {}: {}", dev.id, dev.json);
}

/// A user's file on tmpfs for the `file` backend, DEV_MIB long; the test
/// checks at the end that ublk-bench left it in place, at its size.
fn user_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a folder in /dev/shm");
    let path = dir.path().join("img");
    fs::write(&path, vec![0u8; (DEV_MIB * MIB) as usize]).expect("write the user's file");
    (dir, path.to_string_lossy().into_owned())
}

fn file_kill_cycles(method: Method) {
    let (_dir, path) = user_file();
    kill_cycles(method, &["file", "--path", &path]);
    let len = fs::metadata(&path).map(|m| m.len());
    assert_eq!(len.as_ref().ok(), Some(&(DEV_MIB * MIB)), "the user's file {path} after del: {len:?}");
}

#[test]
fn file_kill_cycles_recover() {
    file_kill_cycles(Method::Recover);
}

#[test]
fn file_kill_cycles_standby() {
    file_kill_cycles(Method::Standby);
}

// ---------------------------------------------------------------- acknowledged data

/// For each recovery flavour (-r, -r -i, -r -e): data written with O_DIRECT
/// and acknowledged (dd exited) before a kill -9 reads back byte for byte
/// after `recover`; so does data written by the recovered server after a
/// second crash.
#[test]
fn acknowledged_writes_survive_crash() {
    acknowledged_writes_survive(&[]);
}

/// The same in batch mode, which every recovering server keeps.
#[test]
fn batch_acknowledged_writes_survive_crash() {
    acknowledged_writes_survive(&["--batch"]);
}

fn acknowledged_writes_survive(extra: &[&str]) {
    let Some(_g) = guard() else { return };
    for flags in [&["-r"][..], &["-r", "-i"], &["-e"]] {
        let mut args = vec!["ram", "--size", "32M"];
        args.extend_from_slice(flags);
        args.extend_from_slice(extra);
        let what = format!("add {}", args.join(" "));
        let dev = add(&args);
        assert_batch(&dev, extra);
        let id = dev.id;
        let a = random_bytes(2 << 20, 0xa11ce ^ id as u64);
        let b = random_bytes(1 << 20, 0xb0b ^ id as u64);
        write_direct(&dev.block(), MIB, &a);
        assert_reads_back(&dev.block(), MIB, &a, &format!("{what}: before the crash"));

        let serverless = if flags.contains(&"-e") { "FAIL_IO" } else { "QUIESCED" };
        kill9(dev.pid);
        wait_serverless(id, serverless);
        ublk(&["recover", "-n", &id.to_string()]).success();
        let second = wait_new_server(id, dev.pid, Duration::from_secs(30));
        assert_reads_back(&dev.block(), MIB, &a, &format!("{what}: after the first recovery"));

        write_direct(&dev.block(), 20 * MIB, &b);
        kill9(second);
        wait_serverless(id, serverless);
        ublk(&["recover", "-n", &id.to_string()]).success();
        wait_new_server(id, second, Duration::from_secs(30));
        assert_reads_back(
            &dev.block(),
            MIB,
            &a,
            &format!("{what}: data of the first server after two crashes"),
        );
        assert_reads_back(
            &dev.block(),
            20 * MIB,
            &b,
            &format!("{what}: data of the recovered server after its crash"),
        );
        assert_batch(&Dev { json: list_one(id).expect("listed"), ..dev.clone() }, extra);
        del(id);
        assert_nothing_left(id, dev.json["store"].as_str(), &[]);
    }
}

// ---------------------------------------------------------------- plain -r

/// Plain `-r` (no reissue): fio randrw (continue_on_error) runs through a
/// kill -9 and a `recover`. I/O in flight at the kill may fail, but only with
/// EIO, and fio ends on time (nothing hangs). A read issued while no server
/// is attached stays queued (does not fail) and completes with the right
/// data once the device is recovered.
#[test]
fn plain_recovery_fails_inflight_with_eio_and_completes_queued_io() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "--size", "16M"]);
    let id = dev.id;
    let pattern = random_bytes(MIB as usize, 0x91a1);
    write_direct(&dev.block(), 0, &pattern);

    // fio's I/O queued while no server is attached keeps it running until
    // the recovery, however short its runtime: that only has to outlast
    // the wait for load before the kill (checked below).
    let runtime = 3;
    let mut fio_args = fio_base();
    fio_args.extend(
        ["--rw=randrw", "--bs=4k", "--offset=2M", "--time_based", "--continue_on_error=all"]
            .map(String::from),
    );
    fio_args.push(format!("--runtime={runtime}"));
    let mut fio = fio_bg(&dev.block(), "plain-r", &fio_args);
    assert!(
        wait_in_flight(id, Duration::from_secs(60), || false),
        "no request in flight on device {id} under fio"
    );
    kill9(dev.pid);
    assert!(fio.running(), "fio ended before the kill: it must run through it (raise its runtime)");
    wait_serverless(id, "QUIESCED");

    // Queued, not failed: the read must still be waiting a while later.
    let mut reader = dd_read_bg(&dev.block(), 0, MIB);
    sleep_ms(1500);
    assert!(reader.running(), "a read while QUIESCED did not stay queued");
    let (state, _) = dev_state(id).expect("listed");
    assert_eq!(state, "QUIESCED", "device {id} while the read is queued");

    ublk(&["recover", "-n", &id.to_string()]).success();
    wait_new_server(id, dev.pid, Duration::from_secs(30));
    let out = reader.finish(Duration::from_secs(60));
    assert!(out.ok(), "the queued read failed after recovery:\n{}", out.describe());
    assert!(out.raw_stdout == pattern, "the queued read returned wrong data after recovery");

    // fio must end within its runtime plus a margin: nothing hangs.
    let out = fio.finish(Duration::from_secs(runtime + 90));
    let json = fio_json(&out).unwrap_or_else(|e| panic!("{e}:\n{}", out.describe()));
    assert!(out.ok(), "fio failed:\n{}", out.describe());
    let job = &json["jobs"][0];
    let errs = job["total_err"].as_u64().unwrap_or(0);
    let first = job["first_error"].as_i64().unwrap_or(0);
    assert!(
        errs == 0 || first == libc::EIO as i64,
        "in-flight I/O failed with errno {first}, not EIO: {job}"
    );
    let ios = job_sum(&json, "read", "total_ios") + job_sum(&json, "write", "total_ios");
    println!("plain -r: fio did {ios} I/Os, {errs} failed (first error {first})");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[]);
}

// ---------------------------------------------------------------- -e

/// `-e` (FAIL_IO): while no server is attached the device is FAIL_IO and
/// reads and writes fail at once (EREMOTEIO from the kernel); after `recover` both work and the
/// data written before the crash is intact.
#[test]
fn fail_io_fails_fast_without_server_and_recovers() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-e", "--size", "16M"]);
    let id = dev.id;
    let pattern = random_bytes(MIB as usize, 0xfa11);
    write_direct(&dev.block(), 0, &pattern);
    kill9(dev.pid);
    wait_serverless(id, "FAIL_IO");

    let dd = need_tool("dd");
    let block = dev.block().display().to_string();
    let read = [
        format!("if={block}"),
        "iflag=direct".into(),
        "bs=64k".into(),
        "count=1".into(),
        "of=/dev/null".into(),
    ];
    let write = [
        "if=/dev/zero".into(),
        format!("of={block}"),
        "oflag=direct".into(),
        "bs=64k".into(),
        "seek=100".into(),
        "count=1".into(),
        "conv=notrunc".into(),
    ];
    for (what, args) in [("read", &read[..]), ("write", &write[..])] {
        let t = Instant::now();
        let out = try_run(Command::new(&dd).args(args.iter()), Duration::from_secs(30))
            .unwrap_or_else(|| panic!("a direct {what} on FAIL_IO device {id} hung for 30 s"));
        let took = t.elapsed();
        assert!(!out.ok(), "a direct {what} on FAIL_IO device {id} succeeded:\n{}", out.describe());
        // The kernel fails it with BLK_STS_TARGET (EREMOTEIO) or BLK_STS_IOERR (EIO).
        assert!(
            out.stderr.contains("Remote I/O error") || out.stderr.contains("Input/output error"),
            "the {what} did not fail with an I/O error:\n{}",
            out.describe()
        );
        // dd itself takes tens of ms to start under emulation.
        assert!(took < Duration::from_secs(2), "a direct {what} took {took:?} to fail: not fast");
        println!("-e: the {what} failed after {took:?}: {}", out.stderr.lines().next().unwrap_or(""));
    }
    let (state, _) = dev_state(id).expect("listed");
    assert_eq!(state, "FAIL_IO", "device {id} after the failed I/O");

    ublk(&["recover", "-n", &id.to_string()]).success();
    let new = wait_new_server(id, dev.pid, Duration::from_secs(30));
    assert_reads_back(&dev.block(), 0, &pattern, "-e: after recovery");
    let more = random_bytes(MIB as usize, 0xfa12);
    write_direct(&dev.block(), 4 * MIB, &more);
    assert_reads_back(&dev.block(), 4 * MIB, &more, "-e: written after recovery");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[new]);
}

// ---------------------------------------------------------------- killing the new server

#[derive(Clone, Copy, Debug)]
enum When {
    /// As soon as the server process appears (forked by `recover`).
    OnSight,
    /// Once it has its queue thread (prepared, about to wait for QUIESCED).
    Prepared,
    /// Once it logged that START_USER_RECOVERY returned: the fault hook
    /// `pause-after-start-recovery` holds it there, before its FETCHes and
    /// END_USER_RECOVERY.
    StartReturned,
}

/// The hook every `recover` of the test runs with: long enough that a kill
/// after the log line always lands before END_USER_RECOVERY.
const PAUSE_AFTER_START: &str = "pause-after-start-recovery:3000";

/// Whether server `pid` logged that START_USER_RECOVERY returned for `id`.
fn logged_start_returned(pid: i32, id: u32) -> bool {
    let log = fs::read_to_string(run_dir().join("server.log")).unwrap_or_default();
    let line = format!("ublk-bench[{pid}]: device {id}: START_USER_RECOVERY returned");
    log.contains(&line)
}

/// Kill the *new* server during a recovery, before END_USER_RECOVERY; a
/// second recovery still succeeds and the data is intact.
///
/// Timing, from outside: `recover -n ID` is started in the background, with
/// the test hook `pause-after-start-recovery`, and this thread scans
/// `/proc/<recover>/task/*/children` in a tight loop for its server, the
/// one child it forks; it then kills it with SIGKILL at one of three
/// moments ([`When`]). The last is proven from the server's own log: the
/// line it writes once START_USER_RECOVERY returned, before it pauses and
/// then posts FETCH and END_USER_RECOVERY; so that kill lands between the
/// two, and the test asserts it did (the line is there, `recover` failed
/// because its server died before LIVE, no events line). The earlier kills
/// are asserted to have come before that line.
#[test]
fn killing_the_recovering_server_then_recover_again() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "-i", "--size", "16M"]);
    let id = dev.id;
    let pattern = random_bytes(4 << 20, 0x7e57);
    write_direct(&dev.block(), 0, &pattern);
    kill9(dev.pid);
    wait_serverless(id, "QUIESCED");

    let plan = [When::OnSight, When::Prepared, When::StartReturned, When::StartReturned];
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (n, when) in plan.iter().enumerate() {
        let mut cli = Bg::start(
            Command::new(bin())
                .args(["recover", "-n", &id.to_string()])
                .env("UBLK_BENCH_FAULT", PAUSE_AFTER_START),
        );
        let cli_pid = cli.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        // `recover` forks its server (no exec): its one child.
        let srv = loop {
            if let Some(&k) = children(cli_pid).first() {
                break k;
            }
            assert!(Instant::now() < deadline && cli.running(), "attempt {n}: `recover` started no server");
        };
        loop {
            let ready = match when {
                When::OnSight => true,
                When::Prepared => has_queue_thread(srv, id),
                When::StartReturned => logged_start_returned(srv, id),
            };
            if ready || !alive(srv) || Instant::now() > deadline {
                break;
            }
        }
        // SAFETY: kill takes plain integers; srv is the child of our `recover`.
        let killed = unsafe { libc::kill(srv, libc::SIGKILL) } == 0;
        assert!(killed, "attempt {n}: the server {srv} was gone before the kill ({when:?})");
        let out = cli.finish(Duration::from_secs(120));
        assert!(
            !out.ok(),
            "attempt {n} ({when:?}): `recover` succeeded although its server was killed:\n{}",
            out.describe()
        );
        let err = out.stderr.to_lowercase();
        assert!(
            err.contains("exited before") || err.contains("live"),
            "attempt {n}: `recover` whose server was killed failed without a clear message:\n{}",
            out.describe()
        );
        assert!(event_of(id, srv).is_none(), "attempt {n}: killed server {srv} wrote events before END?");
        let started = logged_start_returned(srv, id);
        let verdict = match when {
            When::StartReturned => {
                assert!(started, "attempt {n}: killed at the log line, which is not in the log");
                "between START_USER_RECOVERY and END_USER_RECOVERY"
            }
            _ => {
                assert!(!started, "attempt {n} ({when:?}): the server had passed START_USER_RECOVERY");
                "before START_USER_RECOVERY"
            }
        };
        println!("attempt {n} ({when:?}): killed {verdict}");
        *tally.entry(verdict.to_string()).or_default() += 1;
        wait_dead(srv);
        wait_serverless(id, "QUIESCED");
    }
    println!("kills of the recovering server: {tally:?}");
    let between = tally.get("between START_USER_RECOVERY and END_USER_RECOVERY").copied().unwrap_or(0);
    assert_eq!(between, 2, "kills between START_USER_RECOVERY and END_USER_RECOVERY: {tally:?}");

    // The second (here: last) recovery succeeds, and the data is intact.
    let out = ublk(&["recover", "-n", &id.to_string()]).success();
    assert!(out.stdout.contains("state LIVE"), "recover did not print a LIVE device:\n{}", out.describe());
    let server = wait_new_server(id, dev.pid, Duration::from_secs(30));
    assert_reads_back(&dev.block(), 0, &pattern, "after the killed recoveries");
    let pass = write_verify_pass(7, false);
    let json = fio(&dev.block(), &pass.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(fio_bytes(&json, "read"), 16 * MIB, "verify after the killed recoveries");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[server]);
}

/// Children of `pid` (all its threads).
fn children(pid: i32) -> Vec<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|t| {
            fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

// ---------------------------------------------------------------- del

/// `del` of a QUIESCED `-r` device whose server was killed: it succeeds and
/// leaves no device, node, process, run file or RAM store.
#[test]
fn del_quiesced_device_without_server() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "--size", "16M"]);
    kill9(dev.pid);
    wait_serverless(dev.id, "QUIESCED");
    wait_dead(dev.pid);
    let t = Instant::now();
    let out = ublk(&["del", "-n", &dev.id.to_string()]);
    assert!(out.ok(), "del of QUIESCED device {} failed:\n{}", dev.id, out.describe());
    println!("del of a QUIESCED device took {:?}", t.elapsed());
    assert_nothing_left(dev.id, dev.json["store"].as_str(), &[dev.pid]);
}

/// `del` of a supervised device ends the supervisor and the server, and
/// leaves nothing; the supervisor does not "recover" the deleted device.
#[test]
fn del_supervised_device_ends_supervisor() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "--supervise", "--size", "16M"]);
    let sup = supervisor_pid(dev.id);
    assert!(alive(sup), "supervisor {sup} is not running");
    del(dev.id);
    assert_nothing_left(dev.id, dev.json["store"].as_str(), &[dev.pid, sup]);
}

/// `del` of a hot-standby device ends the supervisor, the server and the
/// standby, and leaves nothing.
#[test]
fn del_standby_device_ends_supervisor_and_standby() {
    let Some(_g) = guard() else { return };
    let (dev, sup, standby) = add_standby_device();
    del(dev.id);
    assert_nothing_left(dev.id, dev.json["store"].as_str(), &[dev.pid, sup, standby]);
}

/// A 16M `ram --standby` device once its standby runs: (device, supervisor
/// pid, standby pid).
fn add_standby_device() -> (Dev, i32, i32) {
    let dev = add(&["ram", "--standby", "--size", "16M"]);
    let sup = supervisor_pid(dev.id);
    let mut sb = vec![];
    wait_until("the standby process", Duration::from_secs(60), || {
        sb = standby_of(dev.id, dev.pid);
        sb.len() == 1
    });
    assert_eq!(ppid(sb[0]), sup, "the standby is not the supervisor's child");
    (dev, sup, sb[0])
}

/// SIGTERM to a supervised server is a graceful stop, not a crash: the
/// server deletes its device, the supervisor leaves without recovering, and
/// the standby goes with it.
#[test]
fn sigterm_to_supervised_server_is_a_stop_not_a_crash() {
    let Some(_g) = guard() else { return };
    let (dev, sup, standby) = add_standby_device();
    signal(dev.pid, libc::SIGTERM);
    for (what, pid) in [("server", dev.pid), ("supervisor", sup), ("standby", standby)] {
        wait_until(&format!("the {what} {pid} to exit"), Duration::from_secs(30), || !alive(pid));
    }
    let events = fs::read_to_string(run_dir().join(format!("{}.events", dev.id))).unwrap_or_default();
    assert!(events.is_empty(), "a recovery ran after SIGTERM: {events}");
    assert_nothing_left(dev.id, dev.json["store"].as_str(), &[dev.pid, sup, standby]);
}

// ---------------------------------------------------------------- recover errors

/// `recover` on a LIVE device, on a device made without `-r`, on a missing
/// id and on a device whose settings file is gone: non-zero exit, a message
/// that says what is wrong, and the device left as it was.
#[test]
fn recover_refuses_clearly() {
    let Some(_g) = guard() else { return };
    let live = add(&["ram", "-r", "--size", "16M"]);
    let plain = add(&["null", "--size", "1G"]);
    let missing = (0..1000).find(|i| ![live.id, plain.id].contains(i)).unwrap();
    let cases: [(u32, &[&str]); 3] =
        [(live.id, &["LIVE", &live.pid.to_string()]), (plain.id, &["-r"]), (missing, &["does not exist"])];
    let mut failures = vec![];
    for (id, words) in cases {
        let out = ublk(&["recover", "-n", &id.to_string()]);
        let problem = if out.ok() {
            Some("exit status 0".to_string())
        } else if out.stderr.contains("panicked") {
            Some("it panicked".into())
        } else {
            words.iter().find(|w| !out.stderr.contains(*w)).map(|w| format!("the message lacks `{w}`"))
        };
        if let Some(p) = problem {
            failures.push(format!("`recover -n {id}`: {p}\n{}", out.describe()));
        }
    }
    assert!(failures.is_empty(), "unclear recover errors:\n{}", failures.join("\n"));
    for d in [&live, &plain] {
        assert_eq!(dev_state(d.id), Some(("LIVE".into(), d.pid as i64)), "device {} changed", d.id);
    }

    // No settings file: say so, and recover once it is back.
    kill9(live.pid);
    wait_serverless(live.id, "QUIESCED");
    let settings = settings_path(live.id);
    let aside = run_dir().join(format!("aside-{}.json", live.id));
    fs::rename(&settings, &aside).expect("move the settings aside");
    let out = ublk(&["recover", "-n", &live.id.to_string()]);
    fs::rename(&aside, &settings).expect("put the settings back");
    assert!(!out.ok(), "recover without a settings file succeeded:\n{}", out.describe());
    assert!(out.stderr.contains("settings"), "recover without settings does not say so:\n{}", out.describe());
    ublk(&["recover", "-n", &live.id.to_string()]).success();
    wait_new_server(live.id, live.pid, Duration::from_secs(30));
    del(live.id);
    del(plain.id);
    assert_nothing_left(live.id, live.json["store"].as_str(), &[]);
    assert_nothing_left(plain.id, None, &[plain.pid]);
}

// ---------------------------------------------------------------- restart

/// Handovers per restart test: as many as kill cycles ([`KILL_CYCLES`]),
/// for the same reasons: the first server and its successors (two
/// generations), both kinds of pass.
const RESTARTS: usize = KILL_CYCLES;

/// `restart -n ID` (QUIESCE_DEV handover; SIGKILL for --batch) RESTARTS times in the middle of
/// the load ([`wait_load_in_pass`]: half in each kind of pass), under verifying fio random writes ([`Writer`]): fio sees no error
/// and every pass and a final `--verify_only` pass verify the whole device;
/// each restart exits 0 without killing the old server ([`DRAIN_KILLED`]),
/// prints and leaves the device LIVE under a new pid (the old one exits). Without a supervisor each restart writes a
/// `restart` events line; with one, the supervisor's new server (its child)
/// takes over.
fn restart_under_load(supervised: bool, extra: &[&str]) {
    let Some(_g) = guard() else { return };
    let t0 = Instant::now();
    let size = format!("{DEV_MIB}M");
    let mut args = vec!["ram", "-i", "--size", &size];
    args.extend_from_slice(extra);
    if supervised {
        args.push("--supervise");
    }
    let dev = add(&args);
    assert_batch(&dev, extra);
    let id = dev.id;
    if !dev.json["flags"].as_array().into_iter().flatten().any(|f| f == "QUIESCE") {
        skip(&format!("the kernel has no UBLK_F_QUIESCE (6.16+): {}", dev.json));
        del(id);
        return;
    }
    let supervisor = supervised.then(|| supervisor_pid(id));
    let writer = Writer::start(&dev.block());
    let mut server = dev.pid;
    let mut took = vec![];
    let mut done_at_restart = None;
    let mut in_pattern = 0;
    for n in 1..=RESTARTS {
        let seen = wait_load_in_pass(id, &writer, n, RESTARTS, in_pattern);
        if writer.is_finished() {
            break;
        }
        assert!(seen, "restart {n}: no request in flight on device {id} within 60 s");
        assert_progress(id, &mut done_at_restart, &format!("restart {n}"));
        in_pattern += writer.in_pattern_pass() as usize;
        let t = Instant::now();
        let out = run(Command::new(bin()).args(["restart", "-n", &id.to_string()]));
        if !out.ok() {
            let (state, pid) = dev_state(id).unwrap_or_default();
            let threads: Vec<String> = threads(server)
                .iter()
                .map(|(tid, c)| {
                    let wchan =
                        fs::read_to_string(format!("/proc/{server}/task/{tid}/wchan")).unwrap_or_default();
                    format!("{c} ({wchan})")
                })
                .collect();
            panic!(
                "restart {n} of {RESTARTS} under load failed after {:?}:\n{}\nthen: device {state} pid {pid}; \
                 old server {server} alive: {}, threads: {threads:?}; in flight: {}",
                t.elapsed(),
                out.describe(),
                alive(server),
                inflight(id)
            );
        }
        assert_no_drain_kill(&out, &format!("restart {n} of {RESTARTS} under load"));
        let new = daemon_pid(&out.stdout)
            .unwrap_or_else(|| panic!("restart {n} printed no pid:\n{}", out.describe()));
        assert!(out.stdout.contains("state LIVE"), "restart {n} printed:\n{}", out.describe());
        assert_ne!(new, server, "restart {n}: the same server still serves");
        took.push(t.elapsed());
        wait_dead(server);
        if let Some(s) = supervisor {
            assert_eq!(ppid(new), s, "restart {n}: the new server is not the supervisor's child");
        }
        server = new;
    }
    let restarts_done = t0.elapsed();
    let passes = writer.finish().unwrap_or_else(|e| panic!("fio across {} restarts: {e}", took.len()));
    assert_eq!(took.len(), RESTARTS, "the writer ended early");
    assert!(
        in_pattern > 0 && in_pattern < RESTARTS,
        "{in_pattern} of {RESTARTS} restarts came in a pattern pass: every kind of pass must see one"
    );
    let writer_done = t0.elapsed();
    final_verify(&dev.block(), &passes);
    let (state, pid) = dev_state(id).expect("listed");
    assert_eq!((state.as_str(), pid as i32), ("LIVE", server));
    if !supervised {
        wait_until("an events line per restart", Duration::from_secs(30), || {
            events(id).iter().filter(|e| e["method"] == "restart").count() == RESTARTS
        });
    }
    println!(
        "restart (supervised: {supervised}): {RESTARTS} handovers, each with a request in flight, {} verifying passes ({:?} each), restart command took {took:?}; restarts done at {:?}, \
         last pass at {:?}, test took {:?}",
        passes.len(),
        passes.iter().map(|p| p.took).collect::<Vec<_>>(),
        restarts_done,
        writer_done,
        t0.elapsed()
    );
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[server]);
}

#[test]
fn restart_under_load_has_no_errors() {
    restart_under_load(false, &[]);
}

#[test]
fn restart_supervised_under_load_has_no_errors() {
    restart_under_load(true, &[]);
}

#[test]
fn batch_restart_under_load_has_no_errors() {
    restart_under_load(false, &["--batch"]);
}

/// `restart` of a `--batch` device without -i keeps QUIESCE_DEV (a kill
/// would fail what the server holds) and says on stderr that the kernel can
/// fail a request submitted during the handover; the device ends LIVE under
/// a new server.
#[test]
fn batch_restart_without_reissue_warns() {
    let Some(_g) = guard() else { return };
    let size = format!("{DEV_MIB}M");
    let dev = add(&["ram", "-r", "--batch", "--size", &size]);
    assert_batch(&dev, &["--batch"]);
    let out = run(Command::new(bin()).args(["restart", "-n", &dev.id.to_string()]));
    assert!(out.ok(), "restart failed:\n{}", out.describe());
    assert!(out.stderr.contains("without -i"), "no warning about the handover window:\n{}", out.describe());
    assert_no_drain_kill(&out, "restart of a --batch device without -i");
    let new =
        daemon_pid(&out.stdout).unwrap_or_else(|| panic!("restart printed no pid:\n{}", out.describe()));
    assert_ne!(new, dev.pid, "the same server still serves");
    assert!(out.stdout.contains("state LIVE"), "restart printed:\n{}", out.describe());
    wait_dead(dev.pid);
    del(dev.id);
    assert_nothing_left(dev.id, dev.json["store"].as_str(), &[dev.pid, new]);
}

// ---------------------------------------------------------------- stats of the live server

/// A long random-read load for `stats` to see, stopped by [`stop_fio`].
fn read_load(dev: &Path) -> Bg {
    let mut a = fio_base();
    a.extend(["--rw=randread", "--bs=4k", "--time_based", "--runtime=600"].map(String::from));
    fio_bg(dev, "stats-load", &a)
}

/// Stops a time-based fio with SIGINT (fio then exits 128 after writing its
/// report) and checks that no job saw an I/O error.
fn stop_fio(fio: Bg, what: &str) {
    signal(fio.pid(), libc::SIGINT);
    let out = fio.finish(Duration::from_secs(60));
    let json = fio_json(&out).unwrap_or_else(|e| panic!("{what}: {e}:\n{}", out.describe()));
    for j in json["jobs"].as_array().into_iter().flatten() {
        let errs = j["total_err"].as_u64().unwrap_or(0);
        assert!(j["error"] == 0 && errs == 0, "{what}: fio job saw errors: {j}");
    }
    let ios = job_sum(&json, "read", "total_ios");
    assert!(ios > 0, "{what}: fio read nothing:\n{}", out.describe());
}

/// `stats -n ID --json`, which must read the file of server `pid` and show
/// I/O (a 300 ms window, in which fio under emulation completes hundreds:
/// up to three tries, in case the load stalled).
fn live_stats(id: u32, pid: i32, when: &str) -> Value {
    for _ in 0..3 {
        let out = ublk(&["stats", "-n", &id.to_string(), "--json", "--window", "300ms"]).success();
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{when}: `stats --json` is not JSON ({e}):\n{}", out.describe()));
        assert_eq!(
            v["server_pid"], pid,
            "{when}: `stats` read the figures of another server than {pid}: {v}"
        );
        if v["merged"]["iops"].as_f64().is_some_and(|x| x > 0.0) {
            return v;
        }
        println!("{when}: no IOPS in this window: {}", v["merged"]);
    }
    panic!("{when}: `stats` of device {id} shows no IOPS under fio in three windows");
}

/// The stats files of device `id` in the run folder (published or not).
fn stats_files(id: u32) -> Vec<String> {
    let mut f: Vec<String> =
        run_files(id).into_iter().filter(|n| n.starts_with(&format!("{id}.stats"))).collect();
    f.sort();
    f
}

fn stats_inode(id: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let p = run_dir().join(format!("{id}.stats"));
    fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).ino()
}

/// The standby of server `server`, once it is prepared (its queue thread
/// exists, so its stats file has been made).
fn prepared_standby(id: u32, server: i32) -> i32 {
    let mut sb = vec![];
    wait_until(&format!("a prepared standby for server {server}"), Duration::from_secs(60), || {
        sb = standby_of(id, server);
        sb.len() == 1 && has_queue_thread(sb[0], id)
    });
    sb[0]
}

/// `ram -r -i --standby` under fio: while the standby waits, `stats` reads
/// the live server (its pid, IOPS > 0) and the standby's stats file has no
/// name in the run folder; after a kill -9 the standby takes over and
/// `stats` reads its figures (IOPS > 0); after `del` no stats file is left.
#[test]
fn stats_follow_the_live_server_under_a_standby() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "-i", "--standby", "--size", "16M"]);
    let id = dev.id;
    let sup = supervisor_pid(id);
    let standby = prepared_standby(id, dev.pid);
    let fio = read_load(&dev.block());
    assert!(wait_in_flight(id, Duration::from_secs(60), || false), "no request in flight under fio");
    live_stats(id, dev.pid, "while the standby waits");
    assert_eq!(stats_files(id), [format!("{id}.stats")], "the standby made a visible stats file");

    crash_server(dev.pid, "stats under a standby");
    let new = wait_new_server(id, dev.pid, Duration::from_secs(60));
    assert_eq!(new, standby, "server {new} took over, not the standby {standby}");
    assert!(wait_in_flight(id, Duration::from_secs(60), || false), "no request in flight after the takeover");
    live_stats(id, new, "after the standby took over");
    stop_fio(fio, "fio across the takeover");
    let next = prepared_standby(id, new);
    assert_eq!(stats_files(id), [format!("{id}.stats")], "stats files with the next standby");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new, next, sup]);
}

/// A restart successor (`__serve --recover --method restart --watch-pid`,
/// what `restart` starts) does not touch the live server's stats: while it
/// waits, `stats` reads the old server (same file, same inode, IOPS > 0)
/// and no other stats file is visible. It publishes its own once it took
/// over. The handover here is the old server's death (kill -9): QUIESCE_DEV
/// can only be sent by `restart`, which starts a successor of its own. Then
/// a real `restart` (where the kernel has QUIESCE_DEV) hands over with the
/// same result.
#[test]
fn restart_successor_does_not_clobber_stats() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "-i", "--size", "16M"]);
    let id = dev.id;
    let fio = read_load(&dev.block());
    assert!(wait_in_flight(id, Duration::from_secs(60), || false), "no request in flight under fio");
    live_stats(id, dev.pid, "before the successor");
    let inode = stats_inode(id);

    let (ids, old, start) = (id.to_string(), dev.pid.to_string(), proc_start(dev.pid).to_string());
    let succ = Bg::start(Command::new(bin()).args([
        "__serve",
        "--recover",
        &ids,
        "--method",
        "restart",
        "--watch-pid",
        &old,
        "--watch-start",
        &start,
        "--notify-fd",
        "1",
    ]));
    wait_until("the successor to be prepared and watching", Duration::from_secs(60), || {
        has_queue_thread(succ.pid(), id) && holds_pidfd(succ.pid())
    });
    live_stats(id, dev.pid, "while the successor waits");
    assert_eq!(stats_inode(id), inode, "the successor replaced the live server's stats file");
    assert_eq!(stats_files(id), [format!("{id}.stats")], "the successor made a visible stats file");

    crash_server(dev.pid, "handover to the successor");
    let new = wait_new_server(id, dev.pid, Duration::from_secs(60));
    assert_eq!(new, succ.pid(), "server {new} took over, not the successor");
    assert!(wait_in_flight(id, Duration::from_secs(60), || false), "no request in flight after the handover");
    live_stats(id, new, "after the successor took over");
    assert_ne!(stats_inode(id), inode, "the successor did not publish its stats file");

    let mut server = new;
    let quiesce =
        list_one(id).is_some_and(|d| d["flags"].as_array().into_iter().flatten().any(|f| f == "QUIESCE"));
    if quiesce {
        let out = ublk(&["restart", "-n", &ids]).success();
        assert_no_drain_kill(&out, "restart after the successor took over");
        server =
            daemon_pid(&out.stdout).unwrap_or_else(|| panic!("restart printed no pid:\n{}", out.describe()));
        assert_ne!(server, new, "restart: the same server still serves");
        wait_dead(new);
        live_stats(id, server, "after `restart`");
        assert_eq!(stats_files(id), [format!("{id}.stats")], "stats files after `restart`");
    } else {
        skip("no UBLK_F_QUIESCE on this kernel: the `restart` step cannot run");
    }
    stop_fio(fio, "fio across the handovers");
    del(id);
    // The successor is our child: reap it, or it stays a zombie.
    succ.finish(SETTLE);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new, server]);
}

// ---------------------------------------------------------------- queue failure

/// Requests a faulty server serves before its queue panics: more than
/// START_DEV's partition scan and the test's own writes before the load.
const FAULT_AFTER: u64 = 300;

/// `add ARGS` with the fault hook set to panic after `after` requests.
fn add_with_fault(args: &[&str], after: u64) -> Dev {
    let fault = format!("queue-panic:{after}");
    let out = run(Command::new(bin()).arg("add").args(args).env("UBLK_BENCH_FAULT", &fault)).success();
    let id = parse_dev_id(&out.stdout).unwrap_or_else(|| panic!("no `dev id N:` in:\n{}", out.describe()));
    let json = list_one(id).unwrap_or_else(|| panic!("device {id} is not listed"));
    assert_eq!(json["state"], "LIVE", "device {id}: {json}");
    let pid = json["pid"].as_i64().unwrap_or_else(|| panic!("device {id} has no pid: {json}")) as i32;
    Dev { id, pid, json }
}

/// A `ram -r -i` device whose first server's queue panics (fault hook)
/// under verifying fio writes: the server dies by itself at once (it does
/// not stay LIVE with a dead queue), server.log says which queue and why,
/// and the device is recovered by `method` under a new pid: `recover` after
/// it went QUIESCED, the supervisor's new server, or the standby. fio sees
/// no error and verifies every block; data written before reads back.
fn queue_panic_is_recovered(method: Method) {
    let Some(_g) = guard() else { return };
    let log_start = log_len();
    let mut args = vec!["ram", "-r", "-i", "--size", "8M"];
    match method {
        Method::Recover => {}
        Method::Supervise => args.push("--supervise"),
        Method::Standby => args.push("--standby"),
    }
    let dev = add_with_fault(&args, FAULT_AFTER);
    let id = dev.id;
    let supervisor = (method != Method::Recover).then(|| supervisor_pid(id));
    let standby = (method == Method::Standby).then(|| prepared_standby(id, dev.pid));
    let pattern = random_bytes(MIB as usize, 0xfa17 ^ id as u64);
    write_direct(&dev.block(), 0, &pattern);
    let mut pass = write_verify_pass(31, true);
    pass.extend(["--offset=4M", "--size=4M"].map(String::from));
    let fio = fio_bg(&dev.block(), "queue-panic", &pass);

    wait_until(&format!("server {} to die of its queue panic", dev.pid), Duration::from_secs(120), || {
        !running(dev.pid)
    });
    let new = match method {
        Method::Recover => {
            let t = Instant::now();
            wait_serverless(id, "QUIESCED");
            println!("QUIESCED {:?} after the server was seen dead", t.elapsed());
            let out = ublk(&["recover", "-n", &id.to_string()]).success();
            daemon_pid(&out.stdout).unwrap_or_else(|| panic!("recover printed no pid:\n{}", out.describe()))
        }
        Method::Supervise | Method::Standby => wait_new_server(id, dev.pid, Duration::from_secs(60)),
    };
    assert_ne!(new, dev.pid);
    if let Some(s) = supervisor {
        assert_eq!(ppid(new), s, "new server {new} is not the supervisor's child");
    }
    if let Some(sb) = standby {
        assert_eq!(new, sb, "server {new} took over, not the standby {sb}");
    }
    let out = fio.finish(FIO_PASS_TIMEOUT);
    let json = fio_clean(&out).unwrap_or_else(|e| panic!("fio across the queue panic: {e}"));
    for dir in ["write", "read"] {
        assert_eq!(job_sum(&json, dir, "io_bytes"), 4 * MIB, "fio {dir} bytes across the queue panic");
    }
    assert_reads_back(&dev.block(), 0, &pattern, "after the queue panic");

    let log = log_since(log_start);
    let line = format!("device {id} queue 0 failed while serving: panicked");
    assert!(log.contains(&line), "server.log lacks `{line}`:\n{log}");
    if supervisor.is_some() {
        assert!(log.contains("died (signal: 6 (SIGABRT)"), "the supervisor did not log an abort:\n{log}");
    }
    let (state, pid) = dev_state(id).expect("listed");
    assert_eq!((state.as_str(), pid as i32), ("LIVE", new), "device {id} after the recovery");
    let next = standby.map(|_| prepared_standby(id, new));
    del(id);
    let mut pids = vec![dev.pid, new];
    pids.extend(supervisor.into_iter().chain(next));
    assert_nothing_left(id, dev.json["store"].as_str(), &pids);
}

#[test]
fn queue_panic_unsupervised_goes_quiesced_and_recovers() {
    queue_panic_is_recovered(Method::Recover);
}

#[test]
fn queue_panic_supervised_is_recovered() {
    queue_panic_is_recovered(Method::Supervise);
}

#[test]
fn queue_panic_standby_takes_over() {
    queue_panic_is_recovered(Method::Standby);
}

/// A malformed fault hook is refused before any device is made.
#[test]
fn bad_fault_hook_is_refused() {
    let Some(_g) = guard() else { return };
    let out = run(Command::new(bin())
        .args(["add", "ram", "--size", "16M"])
        .env("UBLK_BENCH_FAULT", "queue-panic:x"));
    assert!(!out.ok(), "add with a bad UBLK_BENCH_FAULT succeeded:\n{}", out.describe());
    for word in ["UBLK_BENCH_FAULT", "queue-panic:N"] {
        assert!(out.stderr.contains(word), "the refusal does not mention `{word}`:\n{}", out.describe());
    }
    let left = settled_leftovers();
    assert!(left.is_empty(), "a refused add left: {left:?}");
}

// ---------------------------------------------------------------- handover and takeover edges

/// What `restart` says on stderr when the old server did not drain and was
/// killed (`cmd::restart::DRAIN_KILLED`). A handover that needed it failed
/// for these tests, whatever the exit status.
const DRAIN_KILLED: &str = "handover fell back to SIGKILL";

fn assert_no_drain_kill(out: &Out, what: &str) {
    assert!(
        !out.stderr.contains(DRAIN_KILLED),
        "{what}: the old server did not drain after QUIESCE_DEV and was killed:\n{}",
        out.describe()
    );
}

/// Whether the device has UBLK_F_QUIESCE (6.16+); skips the test otherwise.
fn has_quiesce(dev: &Dev) -> bool {
    let yes = dev.json["flags"].as_array().into_iter().flatten().any(|f| f == "QUIESCE");
    if !yes {
        skip(&format!("the kernel has no UBLK_F_QUIESCE (6.16+): {}", dev.json));
    }
    yes
}

/// `del` right after `recover` on an idle device: the recovered server sees
/// the stop at once instead of first waiting (up to 5 s) for a request to
/// time, so the `del` takes as long as any other.
#[test]
fn del_right_after_recover_is_prompt() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "--size", "16M"]);
    let id = dev.id;
    kill9(dev.pid);
    wait_serverless(id, "QUIESCED");
    wait_dead(dev.pid);
    let out = ublk(&["recover", "-n", &id.to_string()]).success();
    let new =
        daemon_pid(&out.stdout).unwrap_or_else(|| panic!("recover printed no pid:\n{}", out.describe()));
    let t = Instant::now();
    del(id);
    let took = t.elapsed();
    println!("del right after recover took {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "del right after recover took {took:?}: the recovered server did not react to the stop at once"
    );
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new]);
}

/// `recover` with a settings file that contradicts the kernel's device
/// (size, depth, copy mode): refused with a message that names the setting
/// and both values, before START_USER_RECOVERY: the device stays QUIESCED
/// with no server and no takeover recorded. With the file restored it
/// recovers, and the data written before reads back.
#[test]
fn recover_refuses_settings_that_contradict_the_kernel() {
    let Some(_g) = guard() else { return };
    let dev = add(&["ram", "-r", "--size", "16M"]);
    let id = dev.id;
    let pattern = random_bytes(MIB as usize, 0x5e77);
    write_direct(&dev.block(), 0, &pattern);
    kill9(dev.pid);
    wait_serverless(id, "QUIESCED");
    wait_dead(dev.pid);
    let path = settings_path(id);
    let orig = fs::read_to_string(&path).expect("settings file");
    let v: Value = serde_json::from_str(&orig).expect("settings are JSON");
    let depth = v["depth"].as_u64().expect("depth in the settings");
    let mode = v["copy_mode"].as_str().expect("copy_mode in the settings").to_string();
    let other = if mode == "copy" { "user" } else { "copy" };
    let cases = [
        ("size", Value::from(32 * MIB), format!("size {} in the file, {} in the kernel", 32 * MIB, 16 * MIB)),
        ("copy_mode", Value::from(other), format!("copy mode {other} in the file, {mode} in the kernel")),
        ("depth", Value::from(depth * 2), format!("depth {} in the file, {depth} in the kernel", depth * 2)),
    ];
    // Every case is tried and reported, not only the first that fails.
    let mut problems = vec![];
    for (key, bad, want) in cases {
        let mut corrupt = v.clone();
        corrupt[key] = bad;
        fs::write(&path, serde_json::to_string_pretty(&corrupt).unwrap()).expect("write the settings");
        let out =
            try_run(Command::new(bin()).args(["recover", "-n", &id.to_string()]), Duration::from_secs(60));
        fs::write(&path, &orig).expect("restore the settings");
        let Some(out) = out else {
            problems.push(format!("wrong {key}: recover hung (killed after 60 s)"));
            wait_serverless(id, "QUIESCED");
            continue;
        };
        if out.ok() {
            problems.push(format!("wrong {key}: recover succeeded:\n{}", out.describe()));
            let (_, pid) = dev_state(id).expect("listed");
            kill9(pid as i32);
            wait_serverless(id, "QUIESCED");
            continue;
        }
        if !(out.stderr.contains(&want) && out.stderr.contains("does not match")) {
            problems.push(format!("wrong {key}: the refusal does not say `{want}`:\n{}", out.describe()));
        }
        let (state, pid) = dev_state(id).expect("listed");
        if !(state == "QUIESCED" && (pid <= 0 || !alive(pid as i32))) {
            problems.push(format!(
                "wrong {key}: device {id} is {state} under pid {pid}, not QUIESCED without a server"
            ));
        }
        if !events(id).is_empty() {
            problems.push(format!("wrong {key}: a takeover was recorded: {:?}", events(id)));
        }
    }
    assert!(problems.is_empty(), "settings that contradict the kernel:\n{}", problems.join("\n"));
    let out = ublk(&["recover", "-n", &id.to_string()]).success();
    let new =
        daemon_pid(&out.stdout).unwrap_or_else(|| panic!("recover printed no pid:\n{}", out.describe()));
    assert_reads_back(&dev.block(), 0, &pattern, "after the refused recoveries");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new]);
}

/// Puts a CPU back online when dropped (also when the test fails).
struct CpuOnline(PathBuf);

impl Drop for CpuOnline {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, "1");
    }
}

/// `add --cpus 1`, crash, CPU 1 goes offline, `recover`: the queue thread
/// falls back to its queue's affinity set (CPU 0 here) with a warning in the
/// server log, and the device serves again.
#[test]
fn recover_after_a_listed_cpu_went_offline_uses_the_affinity_set() {
    let Some(_g) = guard() else { return };
    let online = PathBuf::from("/sys/devices/system/cpu/cpu1/online");
    if online_cpus() < 2 || !online.exists() {
        skip("needs CPU 1 and CPU hotplug (/sys/devices/system/cpu/cpu1/online)");
        return;
    }
    let dev = add(&["ram", "-r", "--cpus", "1", "--size", "16M"]);
    let id = dev.id;
    let pattern = random_bytes(MIB as usize, 0xc9c1);
    write_direct(&dev.block(), 0, &pattern);
    kill9(dev.pid);
    wait_serverless(id, "QUIESCED");
    wait_dead(dev.pid);
    let back = CpuOnline(online.clone());
    fs::write(&online, "0").expect("take CPU 1 offline");
    let log_start = log_len();
    let out = ublk(&["recover", "-n", &id.to_string()]);
    assert!(out.ok(), "recover after CPU 1 went offline failed:\n{}", out.describe());
    let new =
        daemon_pid(&out.stdout).unwrap_or_else(|| panic!("recover printed no pid:\n{}", out.describe()));
    let log = log_since(log_start);
    assert!(
        log.contains("CPU 1 of --cpus is offline"),
        "no warning about the offline CPU in server.log:\n{log}"
    );
    let name = format!("ublk{id}q0");
    let (tid, _) = threads(new).into_iter().find(|(_, c)| *c == name).expect("queue thread");
    assert_eq!(task_status(new, tid, "Cpus_allowed_list").as_deref(), Some("0"), "queue thread's CPUs");
    assert_reads_back(&dev.block(), 0, &pattern, "after the recovery without CPU 1");
    drop(back);
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new]);
}

/// A `ram -r -i` device that `restart` can hand over (the kernel has
/// UBLK_F_QUIESCE, else the test fails in the guest through [`has_quiesce`]),
/// with a random MiB written at 0; None (after the skip) without it.
fn restartable_with_data(seed: u64) -> Option<(Dev, Vec<u8>)> {
    let dev = add(&["ram", "-r", "-i", "--size", "16M"]);
    if !has_quiesce(&dev) {
        del(dev.id);
        return None;
    }
    let pattern = random_bytes(MIB as usize, seed);
    write_direct(&dev.block(), 0, &pattern);
    Some((dev, pattern))
}

/// `restart -n ID` with the test hook `fault` (`UBLK_BENCH_FAULT`, src/fault.rs).
fn restart_with_fault(id: u32, fault: &str) -> Out {
    run(Command::new(bin()).args(["restart", "-n", &id.to_string()]).env("UBLK_BENCH_FAULT", fault))
}

/// `restart` ended right after QUIESCE_DEV (fault hooks), first by a
/// Ctrl-C (SIGINT), which it answers with a message naming `recover`, then
/// by SIGKILL, as a closed terminal would end it: each time the successor
/// it handed the device to outlives it and ends serving the device, data
/// intact.
#[test]
fn restart_interrupted_after_quiesce_leaves_the_successor_serving() {
    let Some(_g) = guard() else { return };
    let Some((dev, pattern)) = restartable_with_data(0x1c7c) else { return };
    let id = dev.id;
    let out = restart_with_fault(id, "interrupt-after-quiesce");
    assert!(!out.ok(), "restart interrupted after QUIESCE_DEV exited 0:\n{}", out.describe());
    assert!(
        out.stderr.contains("interrupted after QUIESCE_DEV")
            && out.stderr.contains(&format!("recover -n {id}")),
        "restart does not say it was interrupted and what to run:\n{}",
        out.describe()
    );
    assert_no_drain_kill(&out, "interrupted restart");
    let first = successor_serving(id, dev.pid, "after the interrupted restart");
    assert_reads_back(&dev.block(), 0, &pattern, "after the interrupted restart");

    let out = restart_with_fault(id, "kill-after-quiesce");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "restart was to die by SIGKILL:\n{}",
        out.describe()
    );
    let second = successor_serving(id, first, "after restart was killed");
    assert_reads_back(&dev.block(), 0, &pattern, "after restart was killed");
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, first, second]);
}

/// Waits until device `id` is LIVE under restart's successor of `old`
/// (it watched `old`), `old` is gone, and it still serves a moment later.
fn successor_serving(id: u32, old: i32, when: &str) -> i32 {
    let new = wait_new_server(id, old, Duration::from_secs(30));
    assert!(
        cmdline(new).iter().any(|a| a == "--watch-pid"),
        "{when}: server {new} is not restart's successor"
    );
    wait_dead(old);
    sleep_ms(500);
    assert_eq!(dev_state(id), Some(("LIVE".into(), new as i64)), "{when}: device {id}");
    new
}

/// A successor that dies after QUIESCE_DEV (fault hook: it aborts once the
/// old server is gone) is replaced by a cold recovery: `restart` says so,
/// exits 0 and prints the device LIVE under the cold server, data intact.
#[test]
fn restart_whose_successor_fails_recovers_cold() {
    let Some(_g) = guard() else { return };
    let Some((dev, pattern)) = restartable_with_data(0xc01d) else { return };
    let id = dev.id;
    let out = restart_with_fault(id, "successor-abort");
    assert!(out.ok(), "restart whose successor failed did not recover:\n{}", out.describe());
    for want in [format!("recovering device {id} cold"), format!("device {id} recovered cold")] {
        assert!(out.stderr.contains(&want), "restart does not say `{want}`:\n{}", out.describe());
    }
    assert_no_drain_kill(&out, "restart with a failing successor");
    let new =
        daemon_pid(&out.stdout).unwrap_or_else(|| panic!("restart printed no pid:\n{}", out.describe()));
    assert!(out.stdout.contains("state LIVE"), "restart printed:\n{}", out.describe());
    assert_ne!(new, dev.pid, "the old server still serves");
    wait_dead(dev.pid);
    assert_eq!(dev_state(id), Some(("LIVE".into(), new as i64)), "device {id} after the fallback");
    assert_reads_back(&dev.block(), 0, &pattern, "after the cold fallback");
    wait_until("the fallback's events line", Duration::from_secs(30), || {
        event_of(id, new).is_some_and(|e| e["method"] == "recover")
    });
    del(id);
    assert_nothing_left(id, dev.json["store"].as_str(), &[dev.pid, new]);
}

/// SIGKILLs a process when dropped (also when the test fails).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// `restart` of an unsupervised device whose server is not a ublk-bench
/// process (the same program under another name): refused at once, with
/// nothing sent: the device stays LIVE under that server.
#[test]
fn restart_refuses_a_server_it_does_not_recognise() {
    let Some(_g) = guard() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let other = dir.path().join("other-server");
    fs::copy(bin(), &other).expect("copy the binary under another name");
    let out = run(Command::new(&other).args(["add", "ram", "-r", "--size", "16M"])).success();
    let id = parse_dev_id(&out.stdout).unwrap_or_else(|| panic!("no `dev id N:` in:\n{}", out.describe()));
    let json = list_one(id).unwrap_or_else(|| panic!("device {id} is not listed"));
    let pid = json["pid"].as_i64().unwrap_or_else(|| panic!("device {id} has no pid: {json}")) as i32;
    let _kill = KillOnDrop(pid);
    assert_eq!(comm(pid).as_deref(), Some("other-server"));
    let dev = Dev { id, pid, json };
    if !has_quiesce(&dev) {
        del(id);
        return;
    }
    let t = Instant::now();
    let out = ublk(&["restart", "-n", &id.to_string()]);
    let took = t.elapsed();
    assert!(!out.ok(), "restart of a server it does not know succeeded:\n{}", out.describe());
    assert!(
        out.stderr.contains("not a ublk-bench server") && out.stderr.contains("nothing was sent"),
        "restart does not say why it refused:\n{}",
        out.describe()
    );
    assert!(took < Duration::from_secs(10), "restart took {took:?} to refuse");
    assert_eq!(dev_state(id), Some(("LIVE".into(), pid as i64)), "device {id} after the refused restart");
    assert!(running(pid), "the server {pid} is gone after the refused restart");
    del(id);
    wait_dead(pid);
    assert_nothing_left(id, dev.json["store"].as_str(), &[pid]);
}
