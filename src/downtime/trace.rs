//! `downtime --trace`: kernel-side timestamps of each recovery, from tracefs.
//!
//! [`Tracer::open`] makes a tracefs instance of its own
//! (`instances/ublk-bench-<pid>`, clock `mono`, so its timestamps are
//! CLOCK_MONOTONIC like [`crate::clock::now_ns`]), defines kprobes in a group
//! of its own (`ublk_bench_<pid>`) and enables them and `sched_process_exit`
//! in that instance only. Its Drop disables them, removes the instance and
//! the probes, and unmounts tracefs if it mounted it: on success, error and
//! Ctrl-C alike. Before anything is created, it checks root, tracefs and
//! kprobe events, and that the kernel offers the ublk functions to probe.
//!
//! [`Tracer::drain`] reads what the instance holds (non-blocking
//! `trace_pipe`); the run drains once per cycle, just before the next kill.
//! [`cycle_marks`] picks the marks of one cycle from its records and
//! [`phases`] turns the marks into consecutive named phases from the kill.
//!
//! The probes (Linux 7.3; `START/END_USER_RECOVERY`'s own handlers are
//! inlined, so the control command's entry and return stand for them):
//! `ublk_ch_release` (the last release of /dev/ublkcN), `ublk_ch_release_work_fn`
//! entry and return (the release work aborts the requests and sets
//! QUIESCED), `ublk_ctrl_uring_cmd` entry (its `cmd_op`) and return,
//! `ublk_wait_dev_ready_and_lock` return (END_USER_RECOVERY saw every
//! FETCH_REQ), `exit_mmap` return (an address space torn down) and
//! `io_ring_exit_work` entry (an io_uring's teardown work starts). The
//! first three are required; the others are used when the kernel has them.
//! The ublk probes see every ublk device: run one measured device at a time.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

const TRACEFS: &str = "/sys/kernel/tracing";
/// Per-CPU ring size of the instance: the probed functions fire a few
/// times per cycle, `sched_process_exit` once per exiting thread.
const BUFFER_KB: u32 = 1024;

/// A probe: its event name and its definition after `p:GROUP/NAME `.
struct Probe {
    name: &'static str,
    kind: char,
    func: &'static str,
    args: &'static str,
    /// Arguments to try when `args` is refused: `cmd->cmd_op` needs BTF
    /// (CONFIG_PROBE_EVENTS_BTF_ARGS); the offset form is struct
    /// io_uring_cmd's layout (cmd_op after two pointers).
    alt: Option<&'static str>,
    required: bool,
}

const PROBES: &[Probe] = &[
    Probe { name: "ch_release", kind: 'p', func: "ublk_ch_release", args: "", alt: None, required: true },
    Probe {
        name: "release_work",
        kind: 'p',
        func: "ublk_ch_release_work_fn",
        args: "",
        alt: None,
        required: true,
    },
    Probe {
        name: "release_work_ret",
        kind: 'r',
        func: "ublk_ch_release_work_fn",
        args: "",
        alt: None,
        required: true,
    },
    Probe {
        name: "ctrl",
        kind: 'p',
        func: "ublk_ctrl_uring_cmd",
        args: "op=cmd->cmd_op:x32",
        alt: Some("op=+16($arg1):x32"),
        required: false,
    },
    Probe {
        name: "ctrl_ret",
        kind: 'r',
        func: "ublk_ctrl_uring_cmd",
        args: "ret=$retval:s32",
        alt: None,
        required: false,
    },
    Probe {
        name: "fetch_ready",
        kind: 'r',
        func: "ublk_wait_dev_ready_and_lock",
        args: "ret=$retval:s32",
        alt: None,
        required: false,
    },
    Probe { name: "mm_done", kind: 'r', func: "exit_mmap", args: "", alt: None, required: false },
    Probe { name: "ring_exit", kind: 'p', func: "io_ring_exit_work", args: "", alt: None, required: false },
];

/// The tracefs state this run made; Drop undoes all of it.
pub struct Tracer {
    root: PathBuf,
    group: String,
    instance: Option<PathBuf>,
    /// Probes defined in `kprobe_events` (names).
    defined: Vec<&'static str>,
    /// Event `enable` files set to 1.
    enabled: Vec<PathBuf>,
    mounted: bool,
    pipe: Option<File>,
    /// What the instance records: `sched:sched_process_exit` and the probes.
    pub events: Vec<String>,
}

fn refuse(why: impl std::fmt::Display) -> Error {
    Error::Refused(format!("--trace: {why}; or run without --trace (--no-trace)"))
}

fn write_file(path: &Path, text: &str, append: bool) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).append(append).truncate(!append).open(path)?;
    f.write_all(text.as_bytes())
}

impl Tracer {
    /// Checks that tracing can work, then sets up the instance and probes;
    /// any failure undoes what was made and says what is missing.
    pub fn open() -> Result<Tracer> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(refuse("tracefs and kprobes need root: run as root"));
        }
        let root = PathBuf::from(TRACEFS);
        let mut t = Tracer {
            group: format!("ublk_bench_{}", std::process::id()),
            instance: None,
            defined: Vec::new(),
            enabled: Vec::new(),
            mounted: false,
            pipe: None,
            events: Vec::new(),
            root,
        };
        t.mount()?;
        let funcs = t.check_kernel()?;
        t.make_instance()?;
        t.add_probes(&funcs)?;
        t.enable_event("sched/sched_process_exit", "sched:sched_process_exit")?;
        let pipe = t.instance_path().join("trace_pipe");
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe)
            .map_err(|e| Error::io(format!("open {}", pipe.display()), e))?;
        t.pipe = Some(f);
        Ok(t)
    }

    fn mount(&mut self) -> Result<()> {
        if self.root.join("trace").exists() {
            return Ok(());
        }
        let dir = c"/sys/kernel/tracing";
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc =
            unsafe { libc::mount(c"nodev".as_ptr(), dir.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(refuse(format!(
                "tracefs is not mounted at {TRACEFS} and mounting it failed ({e}): the kernel needs CONFIG_TRACING"
            )));
        }
        self.mounted = true;
        Ok(())
    }

    /// Returns the functions kprobes may attach to; refuses a kernel without
    /// kprobe events or without the required ublk functions.
    fn check_kernel(&self) -> Result<String> {
        if !self.root.join("kprobe_events").exists() {
            return Err(refuse(format!(
                "{TRACEFS}/kprobe_events is missing: the kernel lacks CONFIG_KPROBE_EVENTS"
            )));
        }
        let path = self.root.join("available_filter_functions");
        let funcs = std::fs::read_to_string(&path)
            .map_err(|e| refuse(format!("cannot read {} ({e})", path.display())))?;
        for p in PROBES.iter().filter(|p| p.required) {
            if !offers(&funcs, p.func) {
                return Err(refuse(format!(
                    "the kernel offers no {} to probe (is ublk_drv loaded, and built with kprobes allowed?)",
                    p.func
                )));
            }
        }
        Ok(funcs)
    }

    fn instance_path(&self) -> PathBuf {
        self.instance.clone().unwrap_or_else(|| self.root.clone())
    }

    fn make_instance(&mut self) -> Result<()> {
        let dir = self.root.join("instances").join(format!("ublk-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| refuse(format!("cannot create {} ({e})", dir.display())))?;
        self.instance = Some(dir.clone());
        write_file(&dir.join("trace_clock"), "mono", false)
            .map_err(|e| refuse(format!("trace clock mono refused ({e})")))?;
        write_file(&dir.join("buffer_size_kb"), &BUFFER_KB.to_string(), false)
            .map_err(|e| Error::io(format!("size {}", dir.display()), e))
    }

    fn add_probes(&mut self, funcs: &str) -> Result<()> {
        let defs = self.root.join("kprobe_events");
        for p in PROBES {
            if !offers(funcs, p.func) {
                continue;
            }
            let line = |args: &str| format!("{}:{}/{} {} {args}", p.kind, self.group, p.name, p.func);
            let mut added = write_file(&defs, line(p.args).trim_end(), true);
            if let (Err(_), Some(alt)) = (&added, p.alt) {
                added = write_file(&defs, &line(alt), true);
            }
            match added {
                Ok(()) => self.defined.push(p.name),
                Err(e) if p.required => {
                    return Err(refuse(format!(
                        "kprobe `{}` refused ({e}); see {TRACEFS}/error_log",
                        line(p.args)
                    )));
                }
                Err(_) => continue,
            }
            let event = format!("{}/{}", self.group, p.name);
            self.enable_event(&event, &format!("{}:{}", p.kind, p.func))?;
        }
        Ok(())
    }

    fn enable_event(&mut self, event: &str, label: &str) -> Result<()> {
        let path = self.instance_path().join("events").join(event).join("enable");
        write_file(&path, "1", false).map_err(|e| refuse(format!("cannot enable {event} ({e})")))?;
        self.enabled.push(path);
        self.events.push(label.to_string());
        Ok(())
    }

    /// Everything recorded since the last drain, parsed; unreadable lines
    /// are skipped.
    pub fn drain(&mut self) -> Vec<Record> {
        let Some(pipe) = self.pipe.as_mut() else { return Vec::new() };
        let mut text = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: empty.
            }
        }
        String::from_utf8_lossy(&text).lines().filter_map(parse_line).collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.pipe = None;
        for path in self.enabled.drain(..).rev() {
            let _ = write_file(&path, "0", false);
        }
        if let Some(dir) = self.instance.take()
            && let Err(e) = std::fs::remove_dir(&dir)
        {
            eprintln!("ublk-bench: downtime: could not remove {}: {e}", dir.display());
        }
        let defs = self.root.join("kprobe_events");
        for name in self.defined.drain(..) {
            if let Err(e) = write_file(&defs, &format!("-:{}/{name}", self.group), true) {
                eprintln!("ublk-bench: downtime: could not remove kprobe {}/{name}: {e}", self.group);
            }
        }
        if self.mounted {
            // SAFETY: the path is a NUL-terminated string.
            unsafe { libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// True if `available_filter_functions` lists `func` (lines are `name` or
/// `name [module]`).
fn offers(funcs: &str, func: &str) -> bool {
    funcs.lines().any(|l| l.split_whitespace().next() == Some(func))
}

/// The thread ids of process `pid`, read just before it is killed: its
/// `sched_process_exit` and `exit_mmap` records carry them.
pub fn threads(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![pid] };
    let mut tids: Vec<i32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    tids
}

/// One line of `trace_pipe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The thread that hit the event.
    pub tid: i32,
    /// CLOCK_MONOTONIC (the instance's `mono` clock), µs resolution.
    pub ts_ns: u64,
    pub event: String,
    /// The rest of the line after `event: `.
    pub fields: String,
}

impl Record {
    /// The value of `name=` in the fields: decimal or 0x hex.
    pub fn field(&self, name: &str) -> Option<i64> {
        let v = self.fields.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?;
        match v.strip_prefix("0x") {
            Some(hex) => i64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// `secs.frac` to ns (`123.456789` → 123456789000).
fn parse_ts(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.')?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = 10u64.pow(9 - frac.len() as u32);
    Some(secs.parse::<u64>().ok()? * 1_000_000_000 + frac.parse::<u64>().ok()? * scale)
}

/// Parses `  comm-tid  [cpu] flags  secs.usecs: event: fields`; the comm may
/// hold spaces, dashes and colons, so the line is cut at the `[cpu]` field
/// and the timestamp after it.
pub fn parse_line(line: &str) -> Option<Record> {
    let open = line.match_indices(" [").map(|(i, _)| i).find(|&i| {
        let rest = &line[i + 2..];
        rest.find(']').is_some_and(|j| j > 0 && rest[..j].bytes().all(|b| b.is_ascii_digit()))
    })?;
    let tid = line[..open].trim_end().rsplit_once('-')?.1.parse().ok()?;
    let after = &line[open + 2..];
    let after = &after[after.find(']')? + 1..];
    let (head, rest) = after.split_once(": ")?;
    let ts_ns = parse_ts(head.split_whitespace().last()?)?;
    let (event, fields) = rest.split_once(": ").unwrap_or((rest.trim_end_matches(':'), ""));
    Some(Record { tid, ts_ns, event: event.to_string(), fields: fields.to_string() })
}

/// The kernel-side marks, in the order a recovery passes them. Each phase
/// ends at one of them: [`Mark::phase`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// The first thread of the killed server exits (`sched_process_exit`).
    ExitFirst,
    /// Its address space is gone (`exit_mmap` returned in one of its threads).
    MmDone,
    /// Its last thread exits (`sched_process_exit`, group dead).
    ExitLast,
    /// An io_uring's teardown work starts (`io_ring_exit_work`), after the
    /// server's ring files were released.
    RingExit,
    /// The last reference to /dev/ublkcN goes (`ublk_ch_release`).
    ChRelease,
    /// The release work starts (`ublk_ch_release_work_fn`).
    ReleaseWork,
    /// The release work returns for the last time: requests requeued, QUIESCED.
    Quiesced,
    /// START_USER_RECOVERY returned 0.
    StartRecovery,
    /// END_USER_RECOVERY saw every FETCH_REQ (`ublk_wait_dev_ready_and_lock`).
    FetchReady,
    /// END_USER_RECOVERY returned 0: the device is LIVE.
    EndRecovery,
    /// The new server completed its first request (its own `first_served`).
    FirstServed,
    /// The client's first completion after the outage (the gap's end).
    GapEnd,
}

impl Mark {
    pub const ALL: [Mark; 12] = [
        Mark::ExitFirst,
        Mark::MmDone,
        Mark::ExitLast,
        Mark::RingExit,
        Mark::ChRelease,
        Mark::ReleaseWork,
        Mark::Quiesced,
        Mark::StartRecovery,
        Mark::FetchReady,
        Mark::EndRecovery,
        Mark::FirstServed,
        Mark::GapEnd,
    ];

    /// The name of the phase that ends at this mark.
    pub fn phase(self) -> &'static str {
        match self {
            Mark::ExitFirst => "signal",
            Mark::MmDone => "mm_teardown",
            Mark::ExitLast => "threads_exit",
            Mark::RingExit => "ring_release",
            Mark::ChRelease => "ring_teardown",
            Mark::ReleaseWork => "work_queued",
            Mark::Quiesced => "abort_requeue",
            Mark::StartRecovery => "takeover_start",
            Mark::FetchReady => "fetch",
            Mark::EndRecovery => "end_recovery",
            Mark::FirstServed => "first_io",
            Mark::GapEnd => "to_client",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mark::ExitFirst => "exit_first",
            Mark::MmDone => "mm_done",
            Mark::ExitLast => "exit_last",
            Mark::RingExit => "ring_exit_work",
            Mark::ChRelease => "ch_release",
            Mark::ReleaseWork => "release_work",
            Mark::Quiesced => "quiesced",
            Mark::StartRecovery => "start_recovery",
            Mark::FetchReady => "fetch_ready",
            Mark::EndRecovery => "end_recovery",
            Mark::FirstServed => "first_served",
            Mark::GapEnd => "gap_end",
        }
    }
}

/// The ioctl numbers' low byte of START/END_USER_RECOVERY (the legacy
/// opcodes are the bare numbers).
const NR_START_RECOVERY: i64 = 0x10;
const NR_END_RECOVERY: i64 = 0x11;

/// Picks the kernel marks of one cycle from its records: those at or after
/// `kill_ns`, the exits and mm teardown only of `tids` (the killed
/// server's threads). Marks the records do not show are left out.
pub fn cycle_marks(records: &[Record], kill_ns: u64, tids: &[i32]) -> Vec<(Mark, u64)> {
    let recs: Vec<&Record> = records.iter().filter(|r| r.ts_ns >= kill_ns).collect();
    let first = |ev: &str, from: u64, ours: bool| {
        recs.iter()
            .find(|r| r.event == ev && r.ts_ns >= from && (!ours || tids.contains(&r.tid)))
            .map(|r| r.ts_ns)
    };
    let mut out = Vec::new();
    let exits: Vec<&&Record> =
        recs.iter().filter(|r| r.event == "sched_process_exit" && tids.contains(&r.tid)).collect();
    let exit_first = exits.first().map(|r| r.ts_ns);
    let exit_last = exits
        .iter()
        .find(|r| r.fields.contains("group_dead=true") || r.fields.contains("group_dead=1"))
        .or(exits.last())
        .map(|r| r.ts_ns);
    out.extend(exit_first.map(|t| (Mark::ExitFirst, t)));
    out.extend(first("mm_done", kill_ns, true).map(|t| (Mark::MmDone, t)));
    out.extend(exit_last.map(|t| (Mark::ExitLast, t)));
    let released = first("ch_release", kill_ns, false);
    out.extend(first("ring_exit", exit_first.unwrap_or(kill_ns), false).map(|t| (Mark::RingExit, t)));
    out.extend(released.map(|t| (Mark::ChRelease, t)));
    let after_release = released.unwrap_or(kill_ns);
    out.extend(first("release_work", after_release, false).map(|t| (Mark::ReleaseWork, t)));
    let (start, end) = (ctrl_done(&recs, NR_START_RECOVERY), ctrl_done(&recs, NR_END_RECOVERY));
    let quiesced = recs
        .iter()
        .rev()
        .find(|r| {
            r.event == "release_work_ret" && r.ts_ns >= after_release && start.is_none_or(|s| r.ts_ns <= s)
        })
        .map(|r| r.ts_ns);
    out.extend(quiesced.map(|t| (Mark::Quiesced, t)));
    out.extend(start.map(|t| (Mark::StartRecovery, t)));
    if let Some(s) = start {
        out.extend(first("fetch_ready", s, false).map(|t| (Mark::FetchReady, t)));
    }
    out.extend(end.map(|t| (Mark::EndRecovery, t)));
    out
}

/// When the first successful control command with ioctl number `nr`
/// returned: its entry and return are paired by thread (a command punted to
/// io-wq enters again in a worker).
fn ctrl_done(recs: &[&Record], nr: i64) -> Option<u64> {
    let mut open: Vec<i32> = Vec::new();
    for r in recs {
        match r.event.as_str() {
            "ctrl" if r.field("op").is_some_and(|op| op & 0xff == nr) => open.push(r.tid),
            "ctrl_ret" => {
                if let Some(i) = open.iter().position(|&t| t == r.tid) {
                    open.swap_remove(i);
                    if r.field("ret") == Some(0) {
                        return Some(r.ts_ns);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// One phase of a cycle, µs from the kill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// The mark that ends it.
    pub until: &'static str,
    pub start_us: f64,
    pub end_us: f64,
    pub dur_us: f64,
}

/// The phases from the kill to the last mark. Marks are taken in
/// [`Mark::ALL`]'s order; each phase starts where the previous one ended
/// and ends at its mark, or has no length if its mark came earlier (a step
/// that overlapped an earlier one did not hold the recovery up). The
/// durations therefore add up to the last mark's time from the kill.
pub fn phases(marks: &[(Mark, u64)], kill_ns: u64) -> Vec<Phase> {
    let mut sorted: Vec<(Mark, u64)> = marks.to_vec();
    sorted.sort_by_key(|m| m.0);
    sorted.dedup_by_key(|m| m.0);
    let us = |t: u64| (t as f64 - kill_ns as f64) / 1e3;
    let mut at = kill_ns;
    let mut out = Vec::new();
    for (m, t) in sorted {
        let end = t.max(at);
        out.push(Phase {
            name: m.phase(),
            until: m.name(),
            start_us: us(at),
            end_us: us(end),
            dur_us: us(end) - us(at),
        });
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_parse() {
        let l = "      ublk-bench-1234    [001] d..1.   123.456789: sched_process_exit: comm=ublk-bench pid=1234 prio=120 group_dead=true";
        let r = parse_line(l).unwrap();
        assert_eq!((r.tid, r.ts_ns, r.event.as_str()), (1234, 123_456_789_000, "sched_process_exit"));
        assert!(r.fields.contains("group_dead=true"));
        assert_eq!(r.field("pid"), Some(1234));
        let l = " kworker/u8:2-my [x]-77 [000] .....    5.000001: ctrl: (ublk_ctrl_uring_cmd+0x0/0x7c0 [ublk_drv]) op=0xc0207510";
        let r = parse_line(l).unwrap();
        assert_eq!((r.tid, r.ts_ns), (77, 5_000_001_000));
        assert_eq!(r.field("op"), Some(0xc0207510));
        let r = parse_line("  <idle>-0  [1] ..s1. 9.5: ctrl_ret: (x <- y) ret=-16").unwrap();
        assert_eq!((r.ts_ns, r.field("ret")), (9_500_000_000, Some(-16)));
        for bad in ["", "# tracer: nop", "  foo-12 [001] .... notatime: ev: x", "no bracket 1.0: ev: x"] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }

    fn rec(tid: i32, us: u64, event: &str, fields: &str) -> Record {
        Record { tid, ts_ns: us * 1000, event: event.into(), fields: fields.into() }
    }

    /// A standby takeover as the kernel records it: server 100 (threads
    /// 100, 101) killed at 1000 µs.
    fn standby_cycle() -> Vec<Record> {
        vec![
            rec(100, 900, "sched_process_exit", "pid=100 group_dead=false"), // before the kill: ignored
            rec(101, 1010, "sched_process_exit", "comm=q pid=101 group_dead=false"),
            rec(100, 1020, "mm_done", "(do_exit <- exit_mmap)"),
            rec(100, 1030, "sched_process_exit", "comm=s pid=100 group_dead=true"),
            rec(7, 1040, "ring_exit", ""),
            rec(7, 25000, "ch_release", ""),
            rec(8, 25010, "release_work", ""),
            rec(8, 25020, "release_work_ret", ""),
            rec(8, 25030, "release_work", ""),
            rec(8, 25100, "release_work_ret", ""),
            rec(200, 25200, "ctrl", "op=0xc0207510"),
            rec(200, 25210, "ctrl_ret", "ret=-11"),
            rec(9, 25300, "ctrl", "op=0xc0207510"),
            rec(9, 25400, "ctrl_ret", "ret=0"),
            rec(200, 25500, "ctrl", "op=0xc0207511"),
            rec(200, 26000, "fetch_ready", "ret=0"),
            rec(200, 26100, "ctrl_ret", "ret=0"),
            rec(300, 26200, "sched_process_exit", "pid=300 group_dead=true"), // someone else
        ]
    }

    #[test]
    fn a_cycle_gives_every_mark_in_order() {
        let marks = cycle_marks(&standby_cycle(), 1_000_000, &[100, 101]);
        let want = [
            (Mark::ExitFirst, 1010),
            (Mark::MmDone, 1020),
            (Mark::ExitLast, 1030),
            (Mark::RingExit, 1040),
            (Mark::ChRelease, 25000),
            (Mark::ReleaseWork, 25010),
            (Mark::Quiesced, 25100),
            (Mark::StartRecovery, 25400),
            (Mark::FetchReady, 26000),
            (Mark::EndRecovery, 26100),
        ];
        let got: Vec<(Mark, u64)> = marks.iter().map(|&(m, t)| (m, t / 1000)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn phases_follow_the_marks_and_add_up() {
        let kill = 1_000_000;
        let mut marks = cycle_marks(&standby_cycle(), kill, &[100, 101]);
        marks.push((Mark::FirstServed, 26_300_000));
        marks.push((Mark::GapEnd, 26_320_000));
        let p = phases(&marks, kill);
        let names: Vec<&str> = p.iter().map(|p| p.name).collect();
        assert_eq!(names, Mark::ALL.map(Mark::phase));
        assert_eq!(p[0].start_us, 0.0);
        for w in p.windows(2) {
            assert_eq!(w[0].end_us, w[1].start_us);
        }
        let sum: f64 = p.iter().map(|p| p.dur_us).sum();
        assert!((sum - 25_320.0).abs() < 1e-6, "sum {sum}");
        assert_eq!(p[4].dur_us, 24_000.0 - 40.0);
    }

    #[test]
    fn an_early_mark_makes_an_empty_phase() {
        // The mm is torn down after the last thread's exit event: the
        // threads_exit phase has no length of its own.
        let kill = 0;
        let marks = [(Mark::ExitLast, 3000), (Mark::ExitFirst, 1000), (Mark::MmDone, 5000)];
        let p = phases(&marks, kill);
        let got: Vec<(&str, f64, f64)> = p.iter().map(|p| (p.name, p.start_us, p.dur_us)).collect();
        assert_eq!(got, [("signal", 0.0, 1.0), ("mm_teardown", 1.0, 4.0), ("threads_exit", 5.0, 0.0)]);
        assert!(phases(&[], 0).is_empty());
    }

    #[test]
    fn missing_events_leave_marks_out() {
        let recs = vec![rec(7, 2000, "ch_release", ""), rec(100, 10, "sched_process_exit", "pid=100")];
        assert_eq!(cycle_marks(&recs, 1_000_000, &[100]), [(Mark::ChRelease, 2_000_000)]);
        // A failed START_USER_RECOVERY (EBUSY) is not the start.
        let recs = vec![rec(5, 2000, "ctrl", "op=0x10"), rec(5, 2001, "ctrl_ret", "ret=-16")];
        assert!(cycle_marks(&recs, 0, &[]).is_empty());
    }

    /// On a machine without ublk_drv (the host) open() is refused; with it,
    /// open() and drop. Either way nothing of ours is left in tracefs, and
    /// tracefs is mounted exactly as before.
    #[test]
    fn a_refused_or_dropped_tracer_leaves_nothing() {
        let root = Path::new(TRACEFS);
        let mounted = root.join("trace").exists();
        match Tracer::open() {
            Ok(t) => drop(t),
            Err(e) => assert!(e.to_string().contains("--trace"), "{e}"),
        }
        let pid = std::process::id();
        assert!(!root.join(format!("instances/ublk-bench-{pid}")).exists(), "instance left behind");
        let defs = std::fs::read_to_string(root.join("kprobe_events")).unwrap_or_default();
        assert!(!defs.contains(&format!("ublk_bench_{pid}/")), "kprobes left behind: {defs}");
        assert_eq!(root.join("trace").exists(), mounted, "tracefs mount changed");
    }

    #[test]
    fn functions_are_matched_whole() {
        let funcs = "ublk_ch_release [ublk_drv]\nublk_ch_release_work_fn [ublk_drv]\nexit_mmap\n";
        assert!(offers(funcs, "ublk_ch_release"));
        assert!(offers(funcs, "exit_mmap"));
        assert!(!offers(funcs, "ublk_ch"));
        assert!(!offers(funcs, "io_ring_exit_work"));
    }
}
