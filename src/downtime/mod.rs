//! `downtime`: the recovery-downtime run.
//!
//! 1. Make a device (`add ram -r -i`, plus `--supervise`/`--standby` for
//!    those methods; with `-n ID` that id) or take the one given with
//!    `--reuse -n ID`. A guard deletes what
//!    the run made, on success, error and Ctrl-C alike.
//! 2. Drive `/dev/ublkbN` with the run's own io_uring client ([`client`]).
//! 3. `--cycles` times, `--interval` after the device was last seen LIVE:
//!    publish the kill time, SIGKILL the server (or call `restart`), bring
//!    it back by the method, and wait until the device is LIVE under a new
//!    server.
//! 4. Stop the client, read the server's phase events, delete the device,
//!    and write `downtime-<UTC>.json`, `.csv` and `.svg` into `--out`.
//!
//! Add, recover, restart and del run as subprocesses of this very binary, in
//! their own process group so that a Ctrl-C reaches only this process, which
//! then finishes the step at hand and cleans up.

pub mod client;
pub mod gap;
pub mod plot;
pub mod report;
pub mod trace;

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::cli::{DowntimeArgs, OnOff, RecoverMethod};
use crate::clock::now_ns;
use crate::config::{self, BackendKind};
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::{process, run_files, sys};

use client::{JobConfig, JobResult, Shared};
use report::{CycleReport, Report, RunConfig, Summary};

/// How long a cycle may take from the kill to LIVE (software emulation is slow).
const LIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client may take to complete its first I/O.
const FIRST_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest run the per-millisecond buckets cover (1 h).
const MAX_BUCKETS: usize = 3_600_000;

fn check_interrupt() -> Result<()> {
    if !process::interrupted() {
        return Ok(());
    }
    let e = std::io::Error::new(std::io::ErrorKind::Interrupted, "stopped by SIGINT/SIGTERM");
    Err(Error::io("downtime", e))
}

/// Sleeps until `t`, waking every 10 ms to notice Ctrl-C.
fn sleep_until(t: Instant) -> Result<()> {
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= t {
            return Ok(());
        }
        std::thread::sleep((t - now).min(Duration::from_millis(10)));
    }
}

/// `2s`, `500ms`, `1.5s`, `250us`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::invalid(format!("'{s}' is not a duration: write e.g. 2s, 500ms or 1.5s"));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(Error::invalid(format!(
            "--interval {s} is out of range: give more than 0 and at most a day"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The `add` flags of a recovery flavour.
fn recovery_flags(name: &str) -> Result<&'static [&'static str]> {
    Ok(match name {
        "reissue" => &["-r", "-i"],
        "plain" => &["-r"],
        "fail-io" | "fail_io" | "failio" => &["-r", "-e"],
        _ => {
            return Err(Error::invalid(format!(
                "--recovery {name} is unknown: use reissue (-r -i), plain (-r) or fail-io (-r -e)"
            )));
        }
    })
}

/// Most crash cycles a run takes: the per-cycle records are sized by it.
const MAX_CYCLES: u32 = 10_000;
/// Most memory the client may allocate: I/O buffers plus per-ms buckets.
const MAX_CLIENT_BYTES: u64 = 1 << 30;

/// Every check that needs no driver, so that bad input is refused before
/// a device exists (nothing here may leave one behind).
fn validate(a: &DowntimeArgs) -> Result<Duration> {
    let interval = parse_duration(&a.interval)?;
    recovery_flags(&a.recovery)?;
    if a.cycles == 0 || a.cycles > MAX_CYCLES {
        return Err(Error::invalid(format!(
            "--cycles {} is out of range: give 1..{MAX_CYCLES} (split longer runs)",
            a.cycles
        )));
    }
    if a.rwmix > 100 {
        return Err(Error::invalid(format!(
            "--rwmix {} is out of range: give a read percentage 0..100",
            a.rwmix
        )));
    }
    if a.bs < 512 || !a.bs.is_multiple_of(512) || a.bs > 1 << 20 {
        return Err(Error::invalid(format!("--bs {} must be a multiple of 512 between 512 and 1M", a.bs)));
    }
    if a.iodepth == 0 || a.iodepth > 4096 {
        return Err(Error::invalid(format!("--iodepth {} is out of range: give 1..4096", a.iodepth)));
    }
    if a.jobs == 0 || a.jobs > 256 {
        return Err(Error::invalid(format!("--jobs {} is out of range: give 1..256", a.jobs)));
    }
    check_client_memory(a, interval)?;
    check_recover_cmd(a)?;
    match a.reuse {
        true => check_reuse(a)?,
        false => validate_new_device(a)?,
    }
    Ok(interval)
}

/// `--reuse` measures a device as it was added: options that describe a
/// device to create would be silently ignored, so they are refused.
fn check_reuse(a: &DowntimeArgs) -> Result<()> {
    let given = a.dev_opts.given();
    if given.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} describe the device to create, but --reuse measures device {} as it was added: \
         drop them, or drop --reuse (and -n of an existing device) to create one",
        given.join(", "),
        a.id.map_or("-n".into(), |id| id.to_string())
    )))
}

/// `--recover-cmd` replaces `ublk-bench recover`, so it needs that method.
fn check_recover_cmd(a: &DowntimeArgs) -> Result<()> {
    match &a.recover_cmd {
        Some(c) if c.trim().is_empty() => {
            Err(Error::invalid("--recover-cmd is empty: give the command that recovers the device"))
        }
        Some(_) if a.method != RecoverMethod::Recover => Err(Error::invalid(format!(
            "--recover-cmd replaces `ublk-bench recover`: it needs --method recover, not {:?}",
            a.method
        ))),
        _ => Ok(()),
    }
}

/// Size of a null or ram device when --size is not given.
const DEFAULT_SIZE: u64 = 256 << 20;

/// The size the run asks `add` for: null and ram get DEFAULT_SIZE unless
/// told; file and nvme serve the whole file or namespace unless told.
fn device_size(a: &DowntimeArgs) -> Option<u64> {
    match a.backend {
        BackendKind::Null | BackendKind::Ram => Some(a.size.unwrap_or(DEFAULT_SIZE)),
        BackendKind::File | BackendKind::Nvme => a.size,
    }
}

/// The settings of the device the run creates, checked as `add` checks
/// them. `add` itself probes --path and --dev again, fully.
fn validate_new_device(a: &DowntimeArgs) -> Result<()> {
    if let Some(id) = a.id.filter(|&id| id >= 1 << 20) {
        return Err(Error::invalid(format!("device id {id} is out of range: give -n between 0 and 1048575")));
    }
    a.queue.checked()?;
    a.queue.gather_wait_us(a.poll)?;
    a.dev_opts.check(a.backend)?;
    // A file or namespace is sized, and its --size checked, by `add` against it.
    if let (BackendKind::Null | BackendKind::Ram, Some(size)) = (a.backend, device_size(a))
        && !((config::MIN_SIZE..=config::MAX_SIZE).contains(&size) && size.is_multiple_of(512))
    {
        return Err(Error::invalid(format!(
            "--size {size} is out of range: give a multiple of 512 between 1M and 1P"
        )));
    }
    check_exists(a)
}

/// A missing --path or --dev is refused here, before the run sets up
/// tracing; `add` checks the rest (type, read-write, size) before it makes
/// the device.
fn check_exists(a: &DowntimeArgs) -> Result<()> {
    let opts = &a.dev_opts;
    let given = [
        (
            "--path",
            &opts.path,
            "an existing regular file or block device (`truncate -s 1G FILE` makes a file)",
        ),
        ("--dev", &opts.dev, "an existing NVMe namespace, /dev/ngXnY"),
    ];
    for (flag, p, want) in given {
        let Some(p) = p else { continue };
        if let Err(e) = std::fs::metadata(p) {
            return Err(Error::invalid(format!("{flag} {}: {e}: give {want}", p.display())));
        }
    }
    Ok(())
}

/// Per-ms buckets each client job keeps: the run's expected length plus
/// slack for slow recoveries, at most an hour.
fn bucket_ms(cycles: u32, interval: Duration) -> usize {
    let cycles = cycles as usize;
    let interval_ms = interval.as_millis().min(MAX_BUCKETS as u128) as usize;
    (60_000 + (cycles + 2) * interval_ms + cycles * 30_000).min(MAX_BUCKETS)
}

/// Refuses a client that would allocate more than MAX_CLIENT_BYTES.
fn check_client_memory(a: &DowntimeArgs, interval: Duration) -> Result<()> {
    let per_job = a.iodepth as u64 * a.bs + 8 * bucket_ms(a.cycles, interval) as u64;
    let total = a.jobs as u64 * per_job;
    if total > MAX_CLIENT_BYTES {
        return Err(Error::invalid(format!(
            "the client would need {} MiB (--jobs x (--iodepth x --bs + 8 bytes per ms of run)), more than {} MiB: \
             lower --jobs, --iodepth or --bs",
            total >> 20,
            MAX_CLIENT_BYTES >> 20
        )));
    }
    Ok(())
}

/// Makes `dir` and checks that a file can be written in it, before any
/// device exists; the probe file is removed again.
fn check_out(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create --out {}", dir.display()), e))?;
    let probe = dir.join(format!(".ublk-bench-probe-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).map_err(|e| {
        Error::io(format!("--out {} is not writable (probe {})", dir.display(), probe.display()), e)
    })?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(format!("remove probe {}", probe.display()), e))
}

/// Runs this binary with `args` in its own process group; Ok(stdout) on success.
fn run_self(exe: &Path, args: &[String]) -> Result<String> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .map_err(|e| Error::io(format!("run {}", exe.display()), e))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(Error::invalid(format!(
        "`ublk-bench {}` failed ({}): {}",
        args.join(" "),
        out.status,
        err.trim().trim_start_matches("ublk-bench: error: ")
    )))
}

/// Runs `sh -c CMD` in its own process group (`--recover-cmd`).
fn run_shell(cmd: &str) -> Result<()> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .map_err(|e| Error::io("run sh for --recover-cmd", e))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(Error::invalid(format!("--recover-cmd `{cmd}` failed ({}): {}", out.status, err.trim())))
}

/// The device under test; deletes it on drop if the run made it.
struct Device {
    id: u32,
    created: bool,
    exe: PathBuf,
    facts: DeviceFacts,
}

/// What the report says about the device, read while it exists.
#[derive(Debug, Clone, Default)]
struct DeviceFacts {
    flags: u64,
    /// Bytes, as the kernel has the device.
    size: u64,
    /// The settings ublk-bench keeps for a device it added (copy mode as
    /// the server chose it, file path); None for another server's device.
    settings: Option<config::DeviceConfig>,
}

impl Device {
    fn acquire(a: &DowntimeArgs, exe: &Path, ctrl: &mut Ctrl) -> Result<Device> {
        let mut dev = match a.id {
            Some(id) if a.reuse => {
                Device { id, created: false, exe: exe.into(), facts: DeviceFacts::default() }
            }
            Some(id) if ctrl.info(id).is_ok() => {
                return Err(Error::invalid(format!(
                    "device {id} already exists: pass --reuse to measure it, or pick another -n"
                )));
            }
            _ => Device::create(a, exe)?,
        };
        let info = ctrl.info(dev.id).map_err(|e| ctrl::no_device(dev.id, e))?;
        dev.facts = DeviceFacts {
            flags: info.flags,
            size: ctrl.get_params(dev.id).map_or(0, |p| p.basic.dev_sectors << 9),
            settings: run_files::load(dev.id).ok(),
        };
        ctrl::check_recoverable(&info)?;
        if info.state != sys::UBLK_S_DEV_LIVE {
            return Err(Error::invalid(format!(
                "device {} is {}, not LIVE: recover it first (`ublk-bench recover -n {0}`)",
                dev.id,
                sys::state_name(info.state)
            )));
        }
        let supervised = run_files::live_supervisor(dev.id).is_some();
        match a.method {
            RecoverMethod::Supervise | RecoverMethod::Standby if !supervised => {
                return Err(Error::invalid(format!(
                    "device {} has no supervisor: --method {:?} needs a device added with --supervise/--standby",
                    dev.id, a.method
                )));
            }
            RecoverMethod::Recover if supervised => {
                return Err(Error::invalid(format!(
                    "device {} is supervised: its supervisor would race `recover`; use --method supervise or standby",
                    dev.id
                )));
            }
            RecoverMethod::Restart if info.flags & sys::UBLK_F_QUIESCE == 0 => {
                return Err(Error::Unsupported {
                    feature: "UBLK_F_QUIESCE on this device",
                    version: "6.16",
                    hint: "--method restart needs QUIESCE_DEV; use another method",
                });
            }
            _ => {}
        }
        Ok(dev)
    }

    fn create(a: &DowntimeArgs, exe: &Path) -> Result<Device> {
        let args = add_argv(a)?;
        let out = run_self(exe, &args)?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::invalid(format!("cannot read `add --json` output ({e}): {out}")))?;
        let id = v["dev_id"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("no dev_id in `add` output: {out}")))?;
        Ok(Device { id: id as u32, created: true, exe: exe.into(), facts: DeviceFacts::default() })
    }
}

/// The `add` command line of the device the run creates.
fn add_argv(a: &DowntimeArgs) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec!["add".into(), a.backend.name().into()];
    if let Some(size) = device_size(a) {
        args.extend(["--size".into(), size.to_string()]);
    }
    args.extend([
        "-q".into(),
        a.queue.queues.to_string(),
        "-d".into(),
        a.queue.depth.to_string(),
        "--scheduler".into(),
        a.queue.scheduler.to_string(),
        "--json".into(),
    ]);
    args.extend(a.dev_opts.to_args());
    if let Some(id) = a.id {
        args.extend(["-n".into(), id.to_string()]);
    }
    if a.poll {
        args.push("--poll".into());
    }
    if a.queue.batch {
        args.push("--batch".into());
    }
    if let Some(w) = a.queue.gather_wait {
        args.extend(["--gather-wait".into(), w.to_string()]);
    }
    if a.queue.stats == OnOff::Off {
        args.extend(["--stats".into(), "off".into()]);
    }
    if let Some(store) = &a.store {
        args.extend(["--store".into(), store.display().to_string()]);
    }
    args.extend(recovery_flags(&a.recovery)?.iter().map(|s| s.to_string()));
    match a.method {
        RecoverMethod::Supervise => args.push("--supervise".into()),
        RecoverMethod::Standby => args.push("--standby".into()),
        _ => {}
    }
    Ok(args)
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        println!("deleting device {}", self.id);
        if let Err(e) = run_self(&self.exe, &["del".into(), "-n".into(), self.id.to_string()]) {
            eprintln!("ublk-bench: downtime: could not delete device {}: {e}", self.id);
        }
    }
}

/// What the run did, cycle by cycle (monotonic ns).
#[derive(Debug, Default)]
struct Timeline {
    kills: Vec<u64>,
    /// `--method recover`: when the killed server was seen gone.
    exits: Vec<u64>,
    lives: Vec<u64>,
    old_pids: Vec<i32>,
    new_pids: Vec<i32>,
    /// The killed server's threads, per cycle (for the trace).
    tids: Vec<Vec<i32>>,
}

struct Run<'a> {
    a: &'a DowntimeArgs,
    interval: Duration,
    exe: PathBuf,
    dev_id: u32,
    shared: Arc<Shared>,
    jobs: Vec<JoinHandle<Result<JobResult>>>,
    t0: u64,
    tl: Timeline,
    tracer: Option<trace::Tracer>,
    /// Every trace record drained so far; cycles take theirs by time.
    records: Vec<trace::Record>,
}

pub fn run(a: &DowntimeArgs) -> Result<()> {
    let interval = validate(a)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    process::catch_interrupts();
    let exe = std::env::current_exe().map_err(|e| Error::io("find own executable", e))?;
    let mut ctrl = Ctrl::open()?;
    check_out(&a.out)?;
    let (tracer, trace_note) = start_trace(a)?;
    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let stamp = report::utc_stamp(unix);

    let dev = Device::acquire(a, &exe, &mut ctrl)?;
    let path = PathBuf::from(ctrl::block_path(dev.id));
    println!(
        "downtime: device {} ({}), method {:?}, {} cycle(s) every {:?}, client {} job(s) x qd{} bs {} {}",
        dev.id,
        if dev.created { "created" } else { "existing" },
        a.method,
        a.cycles,
        interval,
        a.jobs,
        a.iodepth,
        a.bs,
        rw_name(a.rwmix)
    );

    let cycles = a.cycles as usize;
    let max_ms = bucket_ms(a.cycles, interval);
    let shared = Arc::new(Shared::new(cycles, a.jobs as usize));
    let t0 = now_ns();
    let mut run = Run {
        a,
        interval,
        exe,
        dev_id: dev.id,
        shared,
        jobs: Vec::new(),
        t0,
        tl: Timeline::default(),
        tracer,
        records: Vec::new(),
    };
    let mut outcome = Ok(());
    for index in 0..a.jobs as usize {
        let cfg = JobConfig {
            index,
            path: path.clone(),
            bs: a.bs,
            iodepth: a.iodepth,
            rwmix: a.rwmix,
            t0,
            max_ms,
            cycles,
        };
        match client::spawn(cfg, run.shared.clone()) {
            Ok(h) => run.jobs.push(h),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if outcome.is_ok() {
        outcome = run.drive(&mut ctrl);
    }
    run.shared.stop.store(true, Ordering::Relaxed);
    let end_ns = now_ns();
    let mut results = Vec::new();
    for h in run.jobs.drain(..) {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => match outcome {
                Ok(()) => outcome = Err(e),
                Err(_) => eprintln!("ublk-bench: downtime: client job: {e}"),
            },
            Err(_) => outcome = Err(Error::invalid("a client thread panicked")),
        }
    }
    let events = read_events(dev.id, &run.tl, outcome.is_ok());
    run.drain_trace();
    let facts = dev.facts.clone();
    drop(dev);
    if results.len() == a.jobs as usize && !run.tl.kills.is_empty() {
        let complete = outcome.is_ok() && run.tl.lives.len() == cycles;
        let rep = build_report(&run, &results, &events, &stamp, complete, &facts, trace_note);
        write_outputs(&run, &rep, &results, end_ns, &stamp)?;
    } else if outcome.is_ok() {
        outcome = Err(Error::invalid("no result: a client job failed"));
    }
    outcome
}

fn rw_name(rwmix: u32) -> String {
    match rwmix {
        100 => "randread".into(),
        0 => "randwrite".into(),
        r => format!("randrw {r}/{}", 100 - r),
    }
}

impl Run<'_> {
    fn drive(&mut self, ctrl: &mut Ctrl) -> Result<()> {
        self.wait_first_io()?;
        let mut last_live = Instant::now();
        let mut last_line = (Instant::now(), self.shared.totals());
        for i in 0..self.a.cycles as usize {
            sleep_until(last_live + self.interval)?;
            if i > 0 {
                self.progress_line(i - 1, &mut last_line);
            }
            self.check_jobs()?;
            let info = ctrl.info(self.dev_id).map_err(|e| Error::io("GET_DEV_INFO", e))?;
            if info.state != sys::UBLK_S_DEV_LIVE {
                return Err(Error::invalid(format!(
                    "device {} is {} before cycle {}",
                    self.dev_id,
                    sys::state_name(info.state),
                    i + 1
                )));
            }
            let old = info.ublksrv_pid;
            self.tl.old_pids.push(old);
            if self.tracer.is_some() {
                self.drain_trace();
                self.tl.tids.push(trace::threads(old));
            }
            let kill = self.hit(i, old)?;
            self.tl.kills.push(kill);
            let (live, pid) = self.wait_live(ctrl, old)?;
            self.shared.publish_live(i, live);
            self.tl.lives.push(live);
            self.tl.new_pids.push(pid);
            last_live = Instant::now();
        }
        sleep_until(last_live + self.interval)?;
        self.progress_line(self.a.cycles as usize - 1, &mut last_line);
        Ok(())
    }

    /// Takes what the trace instance recorded since the last call, so that
    /// its buffer never fills.
    fn drain_trace(&mut self) {
        if let Some(t) = self.tracer.as_mut() {
            self.records.extend(t.drain());
        }
    }

    /// The kernel marks and phases of cycle `i` (killed at `k`), with the
    /// server's first request and the client's gap end added.
    fn cycle_trace(
        &self,
        i: usize,
        k: u64,
        first_served: Option<u64>,
        gap_end: Option<u64>,
    ) -> report::CycleTrace {
        let next = self.tl.kills.get(i + 1).copied().unwrap_or(u64::MAX);
        let recs: Vec<trace::Record> =
            self.records.iter().filter(|r| r.ts_ns >= k && r.ts_ns < next).cloned().collect();
        let tids = self.tl.tids.get(i).map_or(&[][..], Vec::as_slice);
        let mut marks = trace::cycle_marks(&recs, k, tids);
        marks.extend(first_served.map(|t| (trace::Mark::FirstServed, t)));
        marks.extend(gap_end.map(|t| (trace::Mark::GapEnd, t)));
        report::CycleTrace::new(&marks, k)
    }

    fn check_jobs(&self) -> Result<()> {
        if self.jobs.iter().any(|h| h.is_finished()) {
            return Err(Error::invalid("a client job stopped early"));
        }
        Ok(())
    }

    fn wait_first_io(&self) -> Result<()> {
        let deadline = Instant::now() + FIRST_IO_TIMEOUT;
        while self.shared.totals().0 == 0 {
            check_interrupt()?;
            self.check_jobs()?;
            if Instant::now() > deadline {
                return Err(Error::invalid(format!(
                    "the client completed no I/O on {} within {}s",
                    ctrl::block_path(self.dev_id),
                    FIRST_IO_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Publishes kill `i` and takes the server down by the method; returns
    /// the kill time.
    fn hit(&mut self, i: usize, old: i32) -> Result<u64> {
        let id = self.dev_id.to_string();
        if self.a.method == RecoverMethod::Restart {
            let k = now_ns();
            self.shared.publish_kill(i, k);
            run_self(&self.exe, &["restart".into(), "-n".into(), id])?;
            return Ok(k);
        }
        let fd = self.server_of(old).ok_or_else(|| {
            Error::invalid(format!("server pid {old} of device {} is not running", self.dev_id))
        })?;
        let k = now_ns();
        self.shared.publish_kill(i, k);
        if !process::signal(&fd, libc::SIGKILL) {
            return Err(Error::io(format!("SIGKILL pid {old}"), std::io::Error::last_os_error()));
        }
        if self.a.method == RecoverMethod::Recover {
            // `recover` refuses a LIVE device whose server still runs.
            process::wait_pidfd(&fd, Some(Duration::from_secs(30)));
            self.tl.exits.push(now_ns());
            match &self.a.recover_cmd {
                Some(cmd) => run_shell(cmd)?,
                None => drop(run_self(&self.exe, &["recover".into(), "-n".into(), id])?),
            }
        }
        Ok(k)
    }

    /// A pidfd for `pid` if it serves the device: a ublk-bench server, or
    /// with `--recover-cmd` any process that holds `/dev/ublkcN` open.
    fn server_of(&self, pid: i32) -> Option<std::os::fd::OwnedFd> {
        if self.a.recover_cmd.is_none() {
            return process::server_of(self.dev_id, pid).map(|(_, fd)| fd);
        }
        let fd = process::ProcId::of(pid)?.open()?;
        process::holds_file(pid, &ctrl::char_path(self.dev_id)).then_some(fd)
    }

    /// Polls GET_DEV_INFO every millisecond until the device is LIVE under a
    /// living server other than `old`.
    fn wait_live(&self, ctrl: &mut Ctrl, old: i32) -> Result<(u64, i32)> {
        let deadline = Instant::now() + LIVE_TIMEOUT;
        let supervised = matches!(self.a.method, RecoverMethod::Supervise | RecoverMethod::Standby);
        loop {
            let info = ctrl.info(self.dev_id).map_err(|e| Error::io("GET_DEV_INFO", e))?;
            let pid = info.ublksrv_pid;
            if info.state == sys::UBLK_S_DEV_LIVE && pid > 0 && pid != old && self.server_of(pid).is_some() {
                return Ok((now_ns(), pid));
            }
            check_interrupt()?;
            if supervised && run_files::live_supervisor(self.dev_id).is_none() {
                return Err(Error::invalid(format!(
                    "the supervisor of device {} is gone (it gives up after too many crashes): see {}",
                    self.dev_id,
                    run_files::log_path().display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::invalid(format!(
                    "device {} is {} {}s after the kill, not LIVE under a new server",
                    self.dev_id,
                    sys::state_name(info.state),
                    LIVE_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn progress_line(&self, i: usize, last: &mut (Instant, (u64, u64))) {
        let now = Instant::now();
        let totals = self.shared.totals();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let iops = (totals.0 - (last.1).0) as f64 / secs;
        let errors = totals.1 - (last.1).1;
        *last = (now, totals);
        let k = self.tl.kills[i];
        let events = report::parse_events(
            &std::fs::read_to_string(run_files::events_path(self.dev_id)).unwrap_or_default(),
        );
        let anchor = report::event_for(&events, k, None).and_then(report::Event::anchor_ns);
        let gap = self
            .shared
            .stall_of(i, anchor)
            .map_or("-".into(), |(a, b)| format!("{:.1}", (b - a) as f64 / 1e6));
        let live = self.tl.lives.get(i).map_or("-".into(), |l| format!("{:.1}", (l - k) as f64 / 1e6));
        println!(
            "cycle {:>3}/{}: gap {:>8} ms  LIVE after {:>8} ms  pid {} -> {}  errors {}  client {:.0} IOPS",
            i + 1,
            self.a.cycles,
            gap,
            live,
            self.tl.old_pids.get(i).copied().unwrap_or(0),
            self.tl.new_pids.get(i).copied().unwrap_or(0),
            errors,
            iops
        );
        let _ = std::io::stdout().flush();
    }
}

/// Sets up tracing as asked: `--trace` refuses to run without it, the
/// default traces where it can; returns what the JSON says about it.
fn start_trace(a: &DowntimeArgs) -> Result<(Option<trace::Tracer>, report::TraceInfo)> {
    if a.no_trace {
        return Ok((None, report::TraceInfo::off("off (--no-trace)")));
    }
    match trace::Tracer::open() {
        Ok(t) => {
            let info = report::TraceInfo { enabled: true, note: "on".into(), events: t.events.clone() };
            Ok((Some(t), info))
        }
        Err(e) if a.trace => Err(e),
        Err(e) => Ok((None, report::TraceInfo::off(&format!("unavailable: {e}")))),
    }
}

/// The takeover events of the device; waits a little for the last cycle's.
fn read_events(dev_id: u32, tl: &Timeline, wait: bool) -> Vec<report::Event> {
    let path = run_files::events_path(dev_id);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let events = report::parse_events(&std::fs::read_to_string(&path).unwrap_or_default());
        let have_last = tl.kills.last().is_none_or(|&k| report::event_for(&events, k, None).is_some());
        if have_last || !wait || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn us(ns: i128) -> f64 {
    ns as f64 / 1e3
}

fn build_report(
    run: &Run,
    results: &[JobResult],
    events: &[report::Event],
    stamp: &str,
    complete: bool,
    facts: &DeviceFacts,
    trace_info: report::TraceInfo,
) -> Report {
    let tl = &run.tl;
    let mut cycles = Vec::new();
    for (i, &k) in tl.kills.iter().enumerate() {
        let next = tl.kills.get(i + 1).copied();
        let event = report::event_for(events, k, next);
        let g = gap::merge(results.iter().map(|r| r.cycle(i)), event.and_then(report::Event::anchor_ns));
        let rel = |t: u64| us(t as i128 - k as i128);
        cycles.push(CycleReport {
            cycle: i as u32 + 1,
            kill_ms: (k - run.t0) as f64 / 1e6,
            old_pid: tl.old_pids.get(i).copied().unwrap_or(0),
            new_pid: tl.new_pids.get(i).copied().unwrap_or(0),
            gap_us: g.gap_ns().map(|n| n as f64 / 1e3),
            gap_start_us: g.stall.map(|(s, _)| rel(s)),
            gap_end_us: g.stall.map(|(_, e)| rel(e)),
            gap_anchored: g.anchored,
            max_latency_us: g.max_latency_ns.map(|n| n as f64 / 1e3),
            ios_across_gap: g.across_gap,
            max_latency_at_kill_us: g.max_latency_at_kill_ns.map(|n| n as f64 / 1e3),
            inflight_at_kill: g.spanning,
            errors: g.errors,
            old_exit_us: tl.exits.get(i).map(|&t| rel(t)),
            live_us: tl.lives.get(i).map(|&l| rel(l)),
            phases: event.map(|e| e.offsets(k)),
            trace: run.tracer.as_ref().map(|_| {
                run.cycle_trace(i, k, event.and_then(|e| e.first_served_ns), g.stall.map(|(_, e)| e))
            }),
        });
    }
    let errors: u64 = results.iter().map(|r| r.tracker.errors).sum();
    let ios: u64 = results.iter().map(|r| r.tracker.ok + r.tracker.errors).sum();
    let mut notes = vec![
        "gap_us: the stretch with no successful completion by any client job that holds the moment the new \
         server sent START_USER_RECOVERY (gap_anchored; else the longest such stretch ending after the kill and \
         beginning before LIVE): from the last completion before the outage, stragglers from the dying server \
         included, to the first completion served by the new server"
            .to_string(),
        "max_latency_us / ios_across_gap: the I/Os that waited through the gap (submitted before it ended, \
         completed at or after its end); max_latency_at_kill_us / inflight_at_kill: the I/Os submitted \
         before the kill and completed after it"
            .to_string(),
        "times in cycles[] are µs from the kill (the moment before SIGKILL was sent, or `restart` was called); \
         kill_ms is ms since the run's start, the CSV's time base"
            .to_string(),
    ];
    let late: u64 = results.iter().map(|r| r.late).sum();
    if late > 0 {
        notes.push(format!("{late} completions fell after the last per-ms bucket (not in the CSV)"));
    }
    let undrained: u32 = results.iter().map(|r| r.undrained).sum();
    if undrained > 0 {
        notes.push(format!("{undrained} I/Os were still in flight when the client stopped"));
    }
    let before: u64 = results.iter().map(|r| r.tracker.errors_before).sum();
    if before > 0 {
        notes.push(format!("{before} errors before the first kill"));
    }
    let summary = Summary::new(&cycles, errors, ios);
    Report {
        tool: "ublk-bench downtime",
        version: env!("CARGO_PKG_VERSION"),
        started_utc: stamp.to_string(),
        kernel: report::kernel_release(),
        git_rev: report::git_rev(),
        config: run_config(run, facts),
        cycles,
        summary,
        complete,
        trace: trace_info,
        notes,
    }
}

/// The run's settings, the device's as it was measured where it says.
fn run_config(run: &Run, facts: &DeviceFacts) -> RunConfig {
    let a = run.a;
    let settings = facts.settings.as_ref();
    RunConfig {
        method: a.method,
        recover_cmd: a.recover_cmd.clone(),
        recovery: a.recovery.clone(),
        dev_id: run.dev_id,
        device_created: !a.reuse,
        device_flags: sys::flag_names(facts.flags),
        backend: settings.map_or(a.backend, |s| s.backend).name().into(),
        size: facts.size,
        store: a.store.as_ref().map(|p| p.display().to_string()),
        copy_mode_requested: (!a.reuse).then(|| a.dev_opts.copy_mode.name().into()),
        copy_mode: settings.map(|s| s.copy_mode.name().into()),
        explicit_buf_reg: settings.map_or(a.dev_opts.explicit_buf_reg, |s| s.explicit_buf_reg),
        path: settings.and_then(|s| s.path.as_ref()).map(|p| p.display().to_string()),
        queues: a.queue.queues,
        depth: a.queue.depth,
        poll: a.poll,
        cycles: a.cycles,
        interval_ms: run.interval.as_millis() as u64,
        rwmix: a.rwmix,
        bs: a.bs,
        iodepth: a.iodepth,
        jobs: a.jobs,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
    }
}

/// A cycle's traced phases for the plot: (index in `names`, start, end).
fn plot_phases(c: &CycleReport, names: &[&str], at: impl Fn(f64) -> f64) -> Vec<(usize, f64, f64)> {
    let Some(t) = &c.trace else { return Vec::new() };
    t.phases
        .iter()
        .filter_map(|p| Some((names.iter().position(|n| *n == p.name)?, at(p.start_us), at(p.end_us))))
        .collect()
}

fn write_outputs(run: &Run, rep: &Report, results: &[JobResult], end_ns: u64, stamp: &str) -> Result<()> {
    let end_ms = ((end_ns - run.t0) / 1_000_000 + 1) as usize;
    let len = results.iter().map(|r| r.ok_ms.len()).max().unwrap_or(0).min(end_ms);
    let mut ok_ms = vec![0u32; len];
    for r in results {
        for (m, n) in ok_ms.iter_mut().zip(&r.ok_ms) {
            *m += n;
        }
    }
    let base = run.a.out.join(format!("downtime-{stamp}"));
    let json = base.with_extension("json");
    let csv = base.with_extension("csv");
    let svg = base.with_extension("svg");
    report::write(&json, &report::to_json(rep))?;
    report::write(&csv, &report::csv(&ok_ms))?;
    let ms = |t: u64| (t - run.t0) as f64 / 1e6;
    let names: Vec<&str> = rep.summary.phases_us.iter().map(|p| p.name).collect();
    let cycles = rep
        .cycles
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let k = run.tl.kills[i];
            let from_kill = |us: f64| ms(k) + us / 1e3;
            let live = c.phases.as_ref().and_then(|p| p.end_recovery_us).or(c.live_us);
            plot::PlotCycle {
                kill_ms: ms(k),
                live_ms: live.map(from_kill),
                gap: c.gap_start_us.zip(c.gap_end_us).map(|(s, e)| (from_kill(s), from_kill(e))),
                phases: plot_phases(c, &names, from_kill),
            }
        })
        .collect();
    let g = &rep.summary.gap_us;
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", v / 1e3));
    let d = plot::PlotData {
        title: format!(
            "ublk-bench downtime: {:?}, {} -r ({}), {} cycles",
            rep.config.method, rep.config.backend, rep.config.recovery, rep.summary.cycles
        ),
        subtitle: format!(
            "gap p50 {} ms, max {} ms, errors {}; client {} job(s) x qd{} {} {}; kernel {}; git {}; {}",
            fmt(g.p50),
            fmt(g.max),
            rep.summary.errors,
            rep.config.jobs,
            rep.config.iodepth,
            rep.config.bs,
            rw_name(rep.config.rwmix),
            rep.kernel,
            rep.git_rev,
            rep.started_utc
        ),
        kill_label: if rep.config.method == RecoverMethod::Restart {
            "restart".into()
        } else {
            "kill".into()
        },
        ok_ms,
        cycles,
        phase_names: names.iter().map(|n| n.to_string()).collect(),
    };
    report::write(&svg, &plot::render(&d))?;
    println!();
    print!("{}", report::table(rep));
    println!("wrote {}, {}, {}", json.display(), csv.display(), svg.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    fn args(extra: &[&str]) -> std::result::Result<DowntimeArgs, clap::Error> {
        use clap::Parser;
        let argv = ["ublk-bench", "downtime"].iter().chain(extra).copied();
        match crate::cli::Cli::try_parse_from(argv)?.cmd {
            crate::cli::Command::Downtime(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    fn refused(extra: &[&str]) -> String {
        let a = args(extra).unwrap_or_else(|e| panic!("downtime {extra:?} does not parse: {e}"));
        validate(&a).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn every_argument_is_bounded_before_any_device() {
        assert!(validate(&args(&[]).unwrap()).is_ok());
        let cases: [(&[&str], &str); 21] = [
            (&["--cycles", "4000000000"], "--cycles 4000000000 is out of range"),
            (&["--cycles", "0"], "--cycles 0 is out of range"),
            (&["--interval", "0s"], "--interval"),
            (&["--interval", "soon"], "not a duration"),
            (&["--jobs", "0"], "--jobs 0"),
            (&["--iodepth", "5000"], "--iodepth 5000"),
            (&["--bs", "1000"], "--bs 1000"),
            (&["--rwmix", "101"], "--rwmix 101"),
            (&["--jobs", "256", "--iodepth", "4096", "--bs", "1M"], "the client would need"),
            (&["-q", "70000"], "queues is out of range"),
            (&["--size", "1000"], "--size 1000 is out of range"),
            (&["--backend", "nvme"], "the nvme backend needs --dev /dev/ngXnY"),
            (&["--backend", "file"], "the file backend needs --path FILE"),
            (&["--path", "/etc/passwd"], "--path is an option of the file backend, not ram"),
            (&["--backend", "null", "--direct"], "--direct is an option of the file backend, not null"),
            (&["--dev", "/dev/ng0n1"], "--dev is an option of the nvme backend, not ram"),
            (
                &["--backend", "file", "--path", "/etc/passwd", "--dev", "/dev/ng0n1"],
                "--dev is an option of the nvme backend, not file",
            ),
            (&["--backend", "file", "--path", "/etc/passwd", "--copy-mode", "user"], "user copy would add"),
            (&["--backend", "null", "--explicit-buf-reg"], "--explicit-buf-reg applies to zero copy"),
            (&["--backend", "file", "--path", "/nonexistent/dt"], "--path /nonexistent/dt: No such file"),
            (&["--backend", "nvme", "--dev", "/nonexistent/ng9n9"], "give an existing NVMe namespace"),
        ];
        for (extra, want) in cases {
            let err = refused(extra);
            assert!(err.contains(want), "downtime {extra:?}: {err}");
        }
        assert!(refused(&["-n", "2000000"]).contains("-n between 0 and 1048575"));
    }

    /// `--reuse` measures a device as it is: the options that would shape a
    /// new one are refused, not ignored.
    #[test]
    fn reuse_refuses_the_options_of_a_device_to_create() {
        let cases: [(&[&str], &str); 3] = [
            (&["--path", "/etc/passwd"], "--path describe the device to create"),
            (&["--copy-mode", "user", "--explicit-buf-reg"], "--copy-mode, --explicit-buf-reg describe"),
            (&["--dev", "/dev/ng0n1", "--direct", "-b", "4096"], "--direct, --dev, --block-size describe"),
        ];
        for (extra, want) in cases {
            let argv: Vec<&str> = ["--reuse", "-n", "3"].iter().chain(extra).copied().collect();
            let err = refused(&argv);
            assert!(err.contains(want) && err.contains("drop them"), "downtime {argv:?}: {err}");
        }
        assert!(validate(&args(&["--reuse", "-n", "3", "--copy-mode", "auto"]).unwrap()).is_ok());
    }

    /// The `add` line of each row of the recovery-gap matrix, exactly.
    #[test]
    fn the_add_argv_carries_the_device_options() {
        let argv = |extra: &[&str]| add_argv(&args(extra).unwrap()).unwrap();
        let common = ["-q", "1", "-d", "128", "--scheduler", "none", "--json"];
        let want = |head: &[&str], tail: &[&str]| -> Vec<String> {
            head.iter().chain(&common).chain(tail).map(|s| s.to_string()).collect()
        };
        assert_eq!(
            argv(&["--backend", "file", "--path", "/dev/shm/f", "--direct", "--method", "standby"]),
            want(
                &["add", "file"],
                &[
                    "--copy-mode",
                    "auto",
                    "--block-size",
                    "512",
                    "--path",
                    "/dev/shm/f",
                    "--direct",
                    "-r",
                    "-i",
                    "--standby"
                ]
            ),
            "a file device is the whole file unless --size says otherwise"
        );
        assert_eq!(
            argv(&["--copy-mode", "user", "--method", "recover", "--recovery", "plain"]),
            want(
                &["add", "ram", "--size", "268435456"],
                &["--copy-mode", "user", "--block-size", "512", "-r"]
            )
        );
        assert_eq!(
            argv(&["--backend", "nvme", "--dev", "/dev/ng0n1", "--copy-mode", "zero", "--explicit-buf-reg"]),
            want(
                &["add", "nvme"],
                &[
                    "--copy-mode",
                    "zero",
                    "--block-size",
                    "512",
                    "--dev",
                    "/dev/ng0n1",
                    "--explicit-buf-reg",
                    "-r",
                    "-i",
                    "--supervise"
                ]
            )
        );
        let null = argv(&["--backend", "null", "--size", "1G", "-b", "4096"]);
        assert!(null.windows(2).any(|w| w == ["--size", "1073741824"]), "{null:?}");
        assert!(null.windows(2).any(|w| w == ["--block-size", "4096"]), "{null:?}");
    }

    /// What the run hands `add` is what `add` itself accepts and means the
    /// same by: a file device on a file that exists.
    #[test]
    fn add_takes_the_file_device_as_downtime_describes_it() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let p = img.to_str().unwrap();
        let a =
            args(&["--backend", "file", "--path", p, "--copy-mode", "zero", "--explicit-buf-reg"]).unwrap();
        validate(&a).unwrap();
        let argv = add_argv(&a).unwrap();
        let crate::cli::Command::Add(add) =
            crate::cli::Cli::try_parse_from(["ublk-bench".to_string()].into_iter().chain(argv)).unwrap().cmd
        else {
            panic!("not add")
        };
        let cfg = crate::cmd::add::config_from(&add).unwrap();
        assert_eq!(
            (cfg.backend, cfg.size, cfg.path),
            (BackendKind::File, 4 << 20, Some(img.canonicalize().unwrap()))
        );
        assert_eq!((cfg.copy_mode, cfg.explicit_buf_reg), (config::CopyMode::Zero, true));
        assert_eq!(cfg.recovery, config::Recovery::Reissue);
    }

    #[test]
    fn reuse_needs_an_id_and_skips_the_creation_checks() {
        assert!(args(&["--reuse"]).is_err(), "--reuse without -n parsed");
        let a = args(&["--reuse", "-n", "3", "--backend", "nvme"]).unwrap();
        assert!(a.reuse && a.id == Some(3));
        assert!(validate(&a).is_ok());
    }

    #[test]
    fn recover_cmd_needs_reuse_and_the_recover_method() {
        assert!(args(&["--recover-cmd", "true"]).is_err(), "--recover-cmd without --reuse parsed");
        let ok = args(&["--reuse", "-n", "3", "--method", "recover", "--recover-cmd", "kublk recover"]);
        assert!(validate(&ok.unwrap()).is_ok());
        let err = refused(&["--reuse", "-n", "3", "--method", "standby", "--recover-cmd", "x"]);
        assert!(err.contains("needs --method recover"), "{err}");
        let err = refused(&["--reuse", "-n", "3", "--method", "recover", "--recover-cmd", " "]);
        assert!(err.contains("--recover-cmd is empty"), "{err}");
    }

    #[test]
    fn out_is_created_and_probed_without_leaving_the_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a/b");
        check_out(&out).unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "probe left behind");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_out(&file.join("sub")).unwrap_err().to_string();
        assert!(err.contains("--out"), "{err}");
    }

    #[test]
    fn recovery_names() {
        assert_eq!(recovery_flags("reissue").unwrap(), &["-r", "-i"]);
        assert_eq!(recovery_flags("plain").unwrap(), &["-r"]);
        assert_eq!(recovery_flags("fail-io").unwrap(), &["-r", "-e"]);
        assert!(recovery_flags("magic").is_err());
    }
}
