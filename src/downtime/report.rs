//! The downtime run's results: the JSON report (schema below), the
//! per-millisecond IOPS CSV, the server's phase events, and the tables
//! printed on the terminal.
//!
//! `downtime-<UTC>.json`:
//! - `config`: the run's settings (method, recovery, device, client load);
//! - `kernel` (`uname -r`), `git_rev` (short hash or "unknown"), `started_utc`;
//! - `cycles[]`: per kill `cycle`, `kill_ms` (since the run's start, the
//!   CSV's time base), `old_pid`, `new_pid`, `gap_us`, `gap_start_us` and
//!   `gap_end_us` (from the kill), `gap_anchored`, `max_latency_us` and `ios_across_gap`
//!   (the I/Os that waited through the gap), `max_latency_at_kill_us` and
//!   `inflight_at_kill` (the I/Os in flight across the kill itself),
//!   `errors`, `live_us` (when the run saw
//!   the device LIVE again, from the kill) and `phases` (the server's
//!   timestamps from `/run/ublk-bench/<id>.events`, µs from the kill) and,
//!   when traced, `trace`: `marks[]` (`mark`, `t_ns` CLOCK_MONOTONIC,
//!   `at_us` from the kill) and `phases[]` (`name`, `until` (the mark that
//!   ends it), `start_us`, `end_us`, `dur_us`; consecutive from the kill, see
//!   [`super::trace::phases`]);
//! - `summary`: `cycles`, `recovered`, `errors`, `ios`, `gap_us.{p50,p99,max,
//!   min,mean}`, `max_latency_us`, `phases_us[]` (`name`, `until`, `cycles`,
//!   `p50`, `max` of each phase's duration);
//! - `trace`: `enabled`, `note` (on, off, or why it is unavailable),
//!   `events` (what was recorded).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::gap::percentile;
use super::trace::{self, Mark, Phase};
use crate::cli::RecoverMethod;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub started_utc: String,
    pub kernel: String,
    pub git_rev: String,
    pub config: RunConfig,
    pub cycles: Vec<CycleReport>,
    pub summary: Summary,
    /// False when the run was interrupted or failed after some cycles.
    pub complete: bool,
    pub trace: TraceInfo,
    pub notes: Vec<String>,
}

/// Whether the run traced the kernel, and with what.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceInfo {
    pub enabled: bool,
    /// "on", "off (--no-trace)", or "unavailable: <why>".
    pub note: String,
    /// The events recorded: `sched:sched_process_exit`, `p:func`, `r:func`.
    pub events: Vec<String>,
}

impl TraceInfo {
    pub fn off(note: &str) -> Self {
        TraceInfo { enabled: false, note: note.into(), events: Vec::new() }
    }
}

/// One kernel (or server, or client) mark of a cycle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkAt {
    pub mark: Mark,
    pub t_ns: u64,
    pub at_us: f64,
}

/// A cycle's marks and the phases between them, from the kill.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CycleTrace {
    pub marks: Vec<MarkAt>,
    pub phases: Vec<Phase>,
}

impl CycleTrace {
    pub fn new(marks: &[(Mark, u64)], kill_ns: u64) -> Self {
        let mut sorted = marks.to_vec();
        sorted.sort_by_key(|m| m.0);
        let marks = sorted
            .iter()
            .map(|&(mark, t_ns)| MarkAt { mark, t_ns, at_us: (t_ns as f64 - kill_ns as f64) / 1e3 })
            .collect();
        CycleTrace { marks, phases: trace::phases(&sorted, kill_ns) }
    }
}

/// A phase's duration over the cycles that have it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseStat {
    pub name: &'static str,
    pub until: &'static str,
    pub cycles: usize,
    pub p50: Option<f64>,
    pub max: Option<f64>,
}

/// Per-phase median and max, phases in [`Mark::ALL`]'s order.
pub fn phase_stats(cycles: &[CycleReport]) -> Vec<PhaseStat> {
    let mut out = Vec::new();
    for m in Mark::ALL {
        let mut d: Vec<f64> = cycles
            .iter()
            .filter_map(|c| c.trace.as_ref()?.phases.iter().find(|p| p.until == m.name()).map(|p| p.dur_us))
            .collect();
        if d.is_empty() {
            continue;
        }
        d.sort_by(f64::total_cmp);
        out.push(PhaseStat {
            name: m.phase(),
            until: m.name(),
            cycles: d.len(),
            p50: percentile(&d, 50.0),
            max: d.last().copied(),
        });
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub method: RecoverMethod,
    /// The `--recover-cmd` that brought another server back, if any.
    pub recover_cmd: Option<String>,
    /// reissue, plain or fail-io.
    pub recovery: String,
    pub dev_id: u32,
    /// True when the run made the device (and deleted it afterwards).
    pub device_created: bool,
    pub device_flags: Vec<String>,
    pub backend: String,
    pub size: u64,
    /// The RAM store file, when not the default.
    pub store: Option<String>,
    /// The `--copy-mode` the device was created with (None with `--reuse`).
    pub copy_mode_requested: Option<String>,
    /// The copy mode the server chose (None: a device ublk-bench did not add).
    pub copy_mode: Option<String>,
    pub explicit_buf_reg: bool,
    /// The file the file backend serves (absolute), None for other backends.
    pub path: Option<String>,
    pub queues: u32,
    pub depth: u32,
    pub poll: bool,
    pub cycles: u32,
    pub interval_ms: u64,
    pub rwmix: u32,
    pub bs: u64,
    pub iodepth: u32,
    pub jobs: u32,
    pub cpus: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    /// 1-based.
    pub cycle: u32,
    /// The kill (or the `restart` call) in ms since the run's start.
    pub kill_ms: f64,
    pub old_pid: i32,
    pub new_pid: i32,
    /// Client-visible outage: the longest stretch without a successful
    /// completion around the kill. None: service never came back.
    pub gap_us: Option<f64>,
    pub gap_start_us: Option<f64>,
    pub gap_end_us: Option<f64>,
    /// True if the gap holds the new server's START_USER_RECOVERY (from
    /// `phases`); false: the longest stall after the kill was taken.
    pub gap_anchored: bool,
    /// The longest latency of the I/Os that spanned the crash: submitted
    /// before the gap ended, completed at or after its end.
    pub max_latency_us: Option<f64>,
    pub ios_across_gap: u32,
    /// The same for the I/Os submitted before the kill and completed after
    /// it (None: nothing was in flight).
    pub max_latency_at_kill_us: Option<f64>,
    pub inflight_at_kill: u32,
    /// Failed completions (negative result or short) after this kill.
    pub errors: u64,
    /// With `--method recover`: when the killed server had exited (its
    /// pidfd said so) and the recover command was started.
    pub old_exit_us: Option<f64>,
    /// When the run saw the device LIVE under the new server.
    pub live_us: Option<f64>,
    pub phases: Option<PhaseOffsets>,
    /// Kernel-side marks and phases (None: the run did not trace).
    pub trace: Option<CycleTrace>,
}

/// A takeover's phases in µs from the kill (negative: before it, as a hot
/// standby's preparation).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PhaseOffsets {
    pub method: String,
    pub pid: u32,
    pub old_pid: Option<i32>,
    pub began_us: Option<f64>,
    pub prepared_us: Option<f64>,
    pub crash_seen_us: Option<f64>,
    pub quiesced_us: Option<f64>,
    pub start_recovery_us: Option<f64>,
    pub fetch_posted_us: Option<f64>,
    pub end_recovery_us: Option<f64>,
    pub first_served_us: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub cycles: usize,
    /// Cycles where the client got service back.
    pub recovered: usize,
    /// Every failed completion of the run, before the first kill included.
    pub errors: u64,
    pub ios: u64,
    pub gap_us: GapStats,
    pub max_latency_us: Option<f64>,
    /// Per-phase duration statistics of the traced cycles.
    pub phases_us: Vec<PhaseStat>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GapStats {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub min: Option<f64>,
    pub mean: Option<f64>,
}

impl Summary {
    pub fn new(cycles: &[CycleReport], errors: u64, ios: u64) -> Self {
        let mut gaps: Vec<f64> = cycles.iter().filter_map(|c| c.gap_us).collect();
        gaps.sort_by(f64::total_cmp);
        let mean = (!gaps.is_empty()).then(|| gaps.iter().sum::<f64>() / gaps.len() as f64);
        Summary {
            cycles: cycles.len(),
            recovered: gaps.len(),
            errors,
            ios,
            gap_us: GapStats {
                p50: percentile(&gaps, 50.0),
                p99: percentile(&gaps, 99.0),
                max: gaps.last().copied(),
                min: gaps.first().copied(),
                mean,
            },
            max_latency_us: cycles.iter().filter_map(|c| c.max_latency_us).max_by(f64::total_cmp),
            phases_us: phase_stats(cycles),
        }
    }
}

/// One line of `/run/ublk-bench/<id>.events`, as the takeover wrote it.
pub type Event = crate::run_files::Phases;

impl Event {
    /// The moment the takeover learnt of the outage; a standby's `began` is
    /// long before, so prefer `crash_seen`.
    pub fn key_ns(&self) -> u64 {
        self.crash_seen_ns.unwrap_or(if self.quiesced_ns != 0 { self.quiesced_ns } else { self.began_ns })
    }

    /// The moment the gap must contain: START_USER_RECOVERY returned (the
    /// old server is gone, the new one serves nothing yet), else QUIESCED
    /// seen.
    pub fn anchor_ns(&self) -> Option<u64> {
        [self.start_recovery_ns, self.quiesced_ns].into_iter().find(|&t| t != 0)
    }

    pub fn offsets(&self, kill_ns: u64) -> PhaseOffsets {
        let off = |t: u64| (t != 0).then(|| (t as f64 - kill_ns as f64) / 1e3);
        PhaseOffsets {
            method: self.method.clone(),
            pid: self.pid,
            old_pid: self.old_pid,
            began_us: off(self.began_ns),
            prepared_us: off(self.prepared_ns),
            crash_seen_us: self.crash_seen_ns.and_then(off),
            quiesced_us: off(self.quiesced_ns),
            start_recovery_us: off(self.start_recovery_ns),
            fetch_posted_us: off(self.fetch_posted_ns),
            end_recovery_us: off(self.end_recovery_ns),
            first_served_us: self.first_served_ns.and_then(off),
        }
    }
}

/// Parses an events file's text; bad lines are skipped.
pub fn parse_events(text: &str) -> Vec<Event> {
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The event of the cycle whose kill was at `kill_ns` (the next kill, if
/// any, at `next_ns`): the first whose key falls in between.
pub fn event_for(events: &[Event], kill_ns: u64, next_ns: Option<u64>) -> Option<&Event> {
    events.iter().find(|e| e.key_ns() >= kill_ns && next_ns.is_none_or(|n| e.key_ns() < n))
}

/// `20250102T030405Z` for a Unix time in seconds.
pub fn utc_stamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid out-pointer for the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release within the array.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// The commit of the tree this binary was built from (`git rev-parse
/// --short HEAD` there), or "unknown".
pub fn git_rev() -> String {
    git_rev_command()
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The command [`git_rev`] runs. Only in the binary's own source tree, not
/// the caller's folder, and with git's ownership check left on: run as root
/// in a tree someone else owns, git would otherwise obey that tree's config
/// (hooks, fsmonitor): "unknown" is the answer there.
fn git_rev_command() -> std::process::Command {
    let mut c = std::process::Command::new("git");
    c.arg("-C").arg(env!("CARGO_MANIFEST_DIR")).args(["rev-parse", "--short", "HEAD"]);
    for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT"] {
        c.env_remove(var);
    }
    c.stderr(std::process::Stdio::null());
    c
}

pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("report serializes")
}

/// `ms,iops`: successful completions in each millisecond since the run's
/// start, as a rate (count × 1000).
pub fn csv(ok_ms: &[u32]) -> String {
    let mut s = String::with_capacity(ok_ms.len() * 10 + 8);
    s.push_str("ms,iops\n");
    for (ms, n) in ok_ms.iter().enumerate() {
        let _ = writeln!(s, "{ms},{}", *n as u64 * 1000);
    }
    s
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn ms(us: Option<f64>) -> String {
    us.map_or("-".into(), |v| format!("{:.1}", v / 1e3))
}

/// The end-of-run table: one row per cycle, times in ms from the kill;
/// `stuck_io` counts the I/Os that waited through the gap, `maxlat_ms` is the
/// longest of their latencies.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>5} {:>10} {:>10} {:>8} {:>6} {:>9} | {:>9} {:>9} {:>9} {:>9} {:>9}",
        "cycle",
        "gap_ms",
        "maxlat_ms",
        "stuck_io",
        "errors",
        "live_ms",
        "seen_ms",
        "quiesced",
        "start_rec",
        "end_rec",
        "1st_io"
    );
    for c in &r.cycles {
        let p = c.phases.clone().unwrap_or_default();
        let _ = writeln!(
            s,
            "{:>5} {:>10} {:>10} {:>8} {:>6} {:>9} | {:>9} {:>9} {:>9} {:>9} {:>9}",
            c.cycle,
            ms(c.gap_us),
            ms(c.max_latency_us),
            c.ios_across_gap,
            c.errors,
            ms(c.live_us),
            ms(p.crash_seen_us),
            ms(p.quiesced_us),
            ms(p.start_recovery_us),
            ms(p.end_recovery_us),
            ms(p.first_served_us)
        );
    }
    let g = &r.summary.gap_us;
    let _ = writeln!(
        s,
        "method {:?} ({}): {}/{} cycles recovered; gap p50 {} ms, p99 {} ms, max {} ms; errors {}; {} I/Os",
        r.config.method,
        r.config.recovery,
        r.summary.recovered,
        r.summary.cycles,
        ms(g.p50),
        ms(g.p99),
        ms(g.max),
        r.summary.errors,
        r.summary.ios
    );
    s.push_str(&phase_table(&r.summary.phases_us));
    s
}

/// The per-phase table: median and max duration over the traced cycles.
pub fn phase_table(stats: &[PhaseStat]) -> String {
    let mut s = String::new();
    if stats.is_empty() {
        return s;
    }
    let _ = writeln!(s, "{:<16} {:<16} {:>6} {:>9} {:>9}", "phase", "until", "cycles", "p50_ms", "max_ms");
    for p in stats {
        let _ =
            writeln!(s, "{:<16} {:<16} {:>6} {:>9} {:>9}", p.name, p.until, p.cycles, ms(p.p50), ms(p.max));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn sample() -> Report {
        let cycles: Vec<CycleReport> = (1..=3)
            .map(|i| CycleReport {
                cycle: i,
                kill_ms: 2000.0 * i as f64,
                old_pid: 100 + i as i32,
                new_pid: 200 + i as i32,
                gap_us: Some(1000.0 * i as f64),
                gap_start_us: Some(-3.0),
                gap_end_us: Some(1000.0 * i as f64 - 3.0),
                gap_anchored: true,
                max_latency_us: Some(1010.0 * i as f64),
                ios_across_gap: 16,
                max_latency_at_kill_us: Some(990.0 * i as f64),
                inflight_at_kill: 16,
                errors: 0,
                old_exit_us: None,
                live_us: Some(900.0),
                phases: Some(
                    Event { method: "supervise".into(), crash_seen_ns: Some(1_050), ..Default::default() }
                        .offsets(1_000),
                ),
                trace: Some(CycleTrace::new(
                    &[(Mark::ExitFirst, 1_010), (Mark::ChRelease, 1_000 + 20_000 * i as u64)],
                    1_000,
                )),
            })
            .collect();
        let summary = Summary::new(&cycles, 0, 12345);
        Report {
            tool: "ublk-bench downtime",
            version: "0.0.0",
            started_utc: utc_stamp(0),
            kernel: "6.0.0".into(),
            git_rev: "abc1234".into(),
            config: RunConfig {
                method: RecoverMethod::Supervise,
                recover_cmd: None,
                recovery: "reissue".into(),
                dev_id: 0,
                device_created: true,
                device_flags: vec!["USER_RECOVERY".into()],
                backend: "ram".into(),
                size: 256 << 20,
                store: None,
                copy_mode_requested: Some("auto".into()),
                copy_mode: Some("zero".into()),
                explicit_buf_reg: false,
                path: None,
                queues: 1,
                depth: 128,
                poll: false,
                cycles: 3,
                interval_ms: 2000,
                rwmix: 100,
                bs: 4096,
                iodepth: 16,
                jobs: 1,
                cpus: 2,
            },
            cycles,
            summary,
            complete: true,
            trace: TraceInfo { enabled: true, note: "on".into(), events: vec!["p:ublk_ch_release".into()] },
            notes: vec![],
        }
    }

    #[test]
    fn json_schema_round_trip() {
        let text = to_json(&sample());
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        for key in ["config", "kernel", "git_rev", "cycles", "summary", "started_utc"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["config"]["method"], "supervise");
        assert_eq!(v["config"]["cycles"], 3);
        let cycles = v["cycles"].as_array().unwrap();
        assert_eq!(cycles.len(), 3);
        for c in cycles {
            for key in ["gap_us", "max_latency_us", "errors", "phases"] {
                assert!(c.get(key).is_some(), "cycle lacks {key}");
            }
            assert!(c["gap_us"].as_f64().unwrap() > 0.0);
            assert_eq!(c["errors"], 0);
            assert_eq!(c["phases"]["crash_seen_us"].as_f64(), Some(0.05));
            assert_eq!(c["phases"]["method"], "supervise");
            assert!(c["phases"]["quiesced_us"].is_null());
        }
        let g = &v["summary"]["gap_us"];
        assert_eq!(g["p50"].as_f64(), Some(2000.0));
        assert_eq!(g["p99"].as_f64(), Some(3000.0));
        assert_eq!(g["max"].as_f64(), Some(3000.0));
        assert_eq!(v["summary"]["errors"], 0);
        assert_eq!(v["summary"]["recovered"], 3);
        assert_eq!(v["trace"]["enabled"], true);
        let p = &cycles[1]["trace"]["phases"];
        assert_eq!(p[0]["name"], "signal");
        assert_eq!(p[1]["name"], "ring_teardown");
        assert_eq!(p[1]["until"], "ch_release");
        assert_eq!(p[1]["end_us"].as_f64(), Some(40.0));
        assert_eq!(cycles[1]["trace"]["marks"][1]["mark"], "ch_release");
        let stats = &v["summary"]["phases_us"];
        assert_eq!(stats[1]["name"], "ring_teardown");
        assert_eq!(stats[1]["p50"].as_f64(), Some(39.99));
        assert_eq!(stats[1]["max"].as_f64(), Some(59.99));
    }

    #[test]
    fn the_text_report_has_a_phase_table() {
        let t = table(&sample());
        let row = t.lines().find(|l| l.starts_with("ring_teardown")).expect("phase row");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols, ["ring_teardown", "ch_release", "3", "0.0", "0.1"]);
        assert_eq!(phase_table(&[]), "");
    }

    #[test]
    fn summary_without_recovered_cycles_is_null() {
        let c = CycleReport { cycle: 1, ..Default::default() };
        let s = Summary::new(&[c], 5, 10);
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["gap_us"]["p50"].is_null());
        assert_eq!(v["recovered"], 0);
        assert_eq!(v["errors"], 5);
    }

    #[test]
    fn events_parse_and_match_cycles() {
        let text = r#"{"dev_id":3,"method":"supervise","pid":11,"old_pid":10,"began_ns":900,"crash_seen_ns":1010,"prepared_ns":1100,"quiesced_ns":1200,"start_recovery_ns":1300,"fetch_posted_ns":1400,"end_recovery_ns":1500,"first_served_ns":1600}
garbage
{"dev_id":3,"method":"standby","pid":12,"old_pid":11,"began_ns":1700,"crash_seen_ns":5020,"prepared_ns":1800,"quiesced_ns":5100,"start_recovery_ns":5200,"fetch_posted_ns":5300,"end_recovery_ns":5400,"first_served_ns":null}
"#;
        let ev = parse_events(text);
        assert_eq!(ev.len(), 2);
        assert_eq!(event_for(&ev, 1000, Some(5000)).map(|e| e.pid), Some(11));
        let second = event_for(&ev, 5000, None).unwrap();
        assert_eq!(second.pid, 12);
        let o = second.offsets(5000);
        assert_eq!(o.began_us, Some(-3.3));
        assert_eq!(o.crash_seen_us, Some(0.02));
        assert_eq!(o.first_served_us, None);
        assert_eq!(event_for(&ev, 6000, None), None);
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_735_787_045), "20250102T030405Z");
    }

    #[test]
    fn csv_is_ms_and_iops() {
        assert_eq!(csv(&[0, 3, 12]), "ms,iops\n0,0\n1,3000\n2,12000\n");
    }

    /// git keeps its ownership check (no `safe.directory`) and reads only
    /// the binary's own tree, whatever the caller's folder.
    #[test]
    fn git_rev_reads_only_the_binarys_tree_with_the_ownership_check_on() {
        let c = git_rev_command();
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(!args.iter().any(|a| a.contains("safe.directory")), "{args:?}");
        assert_eq!(args[..2], ["-C".to_string(), env!("CARGO_MANIFEST_DIR").to_string()], "{args:?}");
        assert_eq!(c.get_current_dir(), None, "{args:?}");
        let rev = git_rev();
        assert!(rev == "unknown" || rev.chars().all(|ch| ch.is_ascii_hexdigit()), "{rev}");
    }
}

#[cfg(test)]
mod event_tests {
    use super::Event;

    #[test]
    fn events_parse_with_and_without_the_old_pid() {
        let cold = r#"{"dev_id":1,"method":"supervise","pid":9,"old_pid":null,"began_ns":5,"crash_seen_ns":4,"start_recovery_ns":7}"#;
        let hot = r#"{"dev_id":1,"method":"standby","pid":9,"old_pid":8,"began_ns":1,"crash_seen_ns":4,"first_served_ns":null}"#;
        let cold: Event = serde_json::from_str(cold).unwrap();
        let hot: Event = serde_json::from_str(hot).unwrap();
        assert_eq!((cold.old_pid, cold.anchor_ns()), (None, Some(7)));
        assert_eq!((hot.old_pid, hot.key_ns()), (Some(8), 4));
    }
}
