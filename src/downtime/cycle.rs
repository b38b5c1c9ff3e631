//! The kill-and-wait loop: the run's state ([`Run`], [`Timeline`]), one
//! cycle after another (kill or restart, bring back, wait for LIVE), its
//! progress lines, and the tracing and takeover events it gathers.

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cli::{DowntimeArgs, RecoverMethod};
use crate::clock::now_ns;
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::{process, run_files, sys};

use super::client::{JobResult, Shared};
use super::device::run_self;
use super::{report, trace};

/// How long a cycle may take from the kill to LIVE (software emulation is slow).
const LIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client may take to complete its first I/O.
const FIRST_IO_TIMEOUT: Duration = Duration::from_secs(60);

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
    Err(Error::Recovery(format!("--recover-cmd `{cmd}` failed ({}): {}", out.status, err.trim())))
}

/// What the run did, cycle by cycle (monotonic ns).
#[derive(Debug, Default)]
pub(super) struct Timeline {
    pub(super) kills: Vec<u64>,
    /// `--method recover`: when the killed server was seen gone.
    pub(super) exits: Vec<u64>,
    pub(super) lives: Vec<u64>,
    pub(super) old_pids: Vec<i32>,
    pub(super) new_pids: Vec<i32>,
    /// The killed server's threads, per cycle (for the trace).
    pub(super) tids: Vec<Vec<i32>>,
}

pub(super) struct Run<'a> {
    pub(super) a: &'a DowntimeArgs,
    pub(super) interval: Duration,
    pub(super) exe: PathBuf,
    pub(super) dev_id: u32,
    pub(super) shared: Arc<Shared>,
    pub(super) jobs: Vec<JoinHandle<Result<JobResult>>>,
    pub(super) t0: u64,
    pub(super) tl: Timeline,
    pub(super) tracer: Option<trace::Tracer>,
    /// Every trace record drained so far; cycles take theirs by time.
    pub(super) records: Vec<trace::Record>,
}

impl Run<'_> {
    pub(super) fn drive(&mut self, ctrl: &mut Ctrl) -> Result<()> {
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
                return Err(Error::Recovery(format!(
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
    pub(super) fn drain_trace(&mut self) {
        if let Some(t) = self.tracer.as_mut() {
            self.records.extend(t.drain());
        }
    }

    /// The kernel marks and phases of cycle `i` (killed at `k`), with the
    /// server's first request and the client's gap end added.
    pub(super) fn cycle_trace(
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
            return Err(Error::Refused("a client job stopped early".into()));
        }
        Ok(())
    }

    fn wait_first_io(&self) -> Result<()> {
        let deadline = Instant::now() + FIRST_IO_TIMEOUT;
        while self.shared.totals().0 == 0 {
            check_interrupt()?;
            self.check_jobs()?;
            if Instant::now() > deadline {
                return Err(Error::Refused(format!(
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
            Error::Recovery(format!("server pid {old} of device {} is not running", self.dev_id))
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
                return Err(Error::Recovery(format!(
                    "the supervisor of device {} is gone (it gives up after too many crashes): see {}",
                    self.dev_id,
                    run_files::log_path().display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Recovery(format!(
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
pub(super) fn start_trace(a: &DowntimeArgs) -> Result<(Option<trace::Tracer>, report::TraceInfo)> {
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
pub(super) fn read_events(dev_id: u32, tl: &Timeline, wait: bool) -> Vec<report::Event> {
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
