//! `stats -n ID`: the server's own figures, read from its shared-memory
//! stats file over a window (`--window`, one second unless told): per
//! queue and merged. The counts (`ios`, `reads`, ...) are the server's
//! totals whatever the window; `--window 0` reads them at once, without
//! rates. The file is
//! the one the serving server published (a standby or successor publishes
//! its own only when it takes over); `server_pid` says whose it is.
//!
//! A device added with `--stats off` has no request figures: `stats` says
//! so (exit 0) and shows only the `io_uring_enter` calls its queues counted.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::stats::{Snapshot, StatsFile};

/// The longest `--window`: a window is for watching a load, not a timer.
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// Parses `--window`: `0`, `250ms`, `1s`, `2` (seconds).
pub fn parse_window(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.find(|c: char| !c.is_ascii_digit()).map_or((t, ""), |i| t.split_at(i));
    let bad = || format!("'{s}' is not a window: write e.g. 1s, 250ms or 0");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        _ => return Err(bad()),
    };
    if d > MAX_WINDOW {
        return Err(format!("window '{s}' is too long: the most is 3600s"));
    }
    Ok(d)
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub queue: Option<usize>,
    pub iops: f64,
    pub mb_per_s: f64,
    pub ios: u64,
    /// `ios` by kind: READ, WRITE, and everything else (FLUSH, DISCARD,
    /// WRITE_ZEROES).
    pub reads: u64,
    pub writes: u64,
    pub others: u64,
    pub errors: u64,
    pub busy_turns: u64,
    pub idle_turns: u64,
    /// `io_uring_enter` calls of the queue loop since the server started.
    pub enters: u64,
    /// Enters per I/O over the window; None when the window saw no I/O.
    pub enters_per_io: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Figures {
    /// `window` is the interval's delta, over `secs` (0: no window, rates
    /// 0); percentiles fall back to the whole life of the server when the
    /// interval saw no I/O.
    fn new(queue: Option<usize>, window: &Snapshot, total: &Snapshot, secs: f64) -> Self {
        let h = if window.ios() > 0 { window.histogram() } else { total.histogram() };
        let us = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        let rate = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        Figures {
            queue,
            iops: rate(window.ios() as f64),
            mb_per_s: rate((window.read_bytes + window.write_bytes) as f64) / 1e6,
            ios: total.ios(),
            reads: total.reads,
            writes: total.writes,
            others: total.others,
            errors: total.errors,
            busy_turns: total.busy_turns,
            idle_turns: total.idle_turns,
            enters: total.enters,
            enters_per_io: (window.ios() > 0).then(|| window.enters as f64 / window.ios() as f64),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: total.max_ns as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dev_id: u32,
    /// The server that wrote these figures.
    pub server_pid: u32,
    /// "on", or "off" for a device added with `--stats off`: then `queues`
    /// and `merged` are absent and only `enters` is counted.
    pub stats: &'static str,
    pub window_s: f64,
    /// Threads serving the device (`--threads`; one per queue by default).
    pub threads: usize,
    /// One entry per serving thread, as `threads` counts them (thread t
    /// serves queue t by default); the name is from when there was one
    /// thread per queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<Figures>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<Figures>,
    /// Every queue's `io_uring_enter` calls so far (also in `merged`).
    pub enters: u64,
}

pub fn collect(dev_id: u32, window: Duration) -> Result<Report> {
    Ok(collect_from(&StatsFile::open(dev_id)?, dev_id, window))
}

fn collect_from(file: &StatsFile, dev_id: u32, window: Duration) -> Report {
    let take = || (0..file.queues()).map(|q| file.queue(q).snapshot()).collect::<Vec<_>>();
    let mut r = Report {
        dev_id,
        server_pid: file.server_pid(),
        stats: if file.is_on() { "on" } else { "off" },
        window_s: 0.0,
        threads: file.queues(),
        queues: None,
        merged: None,
        enters: 0,
    };
    if !file.is_on() {
        r.enters = take().iter().map(|s| s.enters).sum();
        return r;
    }
    let (t0, before) = (Instant::now(), take());
    if !window.is_zero() {
        std::thread::sleep(window);
    }
    let after = take();
    let secs = if window.is_zero() { 0.0 } else { t0.elapsed().as_secs_f64() };
    let deltas: Vec<Snapshot> = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    let queues = (0..after.len()).map(|q| Figures::new(Some(q), &deltas[q], &after[q], secs)).collect();
    let merged = Figures::new(None, &Snapshot::merge(&deltas), &Snapshot::merge(&after), secs);
    r.window_s = secs;
    r.enters = merged.enters;
    (r.queues, r.merged) = (Some(queues), Some(merged));
    r
}

/// What `stats` says for a device added with `--stats off`.
pub fn off_message(dev_id: u32) -> String {
    format!("stats are off for device {dev_id} (added with --stats off)")
}

pub fn run(dev_id: u32, json: bool, window: Duration) -> Result<()> {
    let r = collect(dev_id, window)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
        return Ok(());
    }
    let (Some(queues), Some(merged)) = (&r.queues, &r.merged) else {
        println!(
            "{}; server pid {}, io_uring_enter calls so far: {}",
            off_message(dev_id),
            r.server_pid,
            r.enters
        );
        return Ok(());
    };
    let over = if r.window_s > 0.0 { format!("over {:.2}s", r.window_s) } else { "no window".into() };
    println!(
        "device {dev_id}, server pid {}, {over} (service time: from the pass over the ring that saw the \
         descriptor to the pass that queued its COMMIT; 0 when both are one pass); {} serving thread(s)",
        r.server_pid, r.threads
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>12}",
        "thread", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "max us", "errors", "enters/io", "enters"
    );
    for f in queues.iter().chain(std::iter::once(merged)) {
        let q = f.queue.map_or("all".into(), |q| q.to_string());
        let per_io = f.enters_per_io.map_or("-".into(), |e| format!("{e:.3}"));
        println!(
            "{q:>6} {:>10.0} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>7} {per_io:>9} {:>12}",
            f.iops, f.mb_per_s, f.p50_us, f.p99_us, f.p999_us, f.max_us, f.errors, f.enters
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Request;
    use crate::stats::QueueCounters;
    use crate::sys;

    /// A published file of `queues` queues in `dir`, as a server makes it.
    fn server_file(dir: &std::path::Path, queues: usize, on: bool) -> StatsFile {
        let f = StatsFile::create_in(dir.into(), 4, queues, on).unwrap();
        f.publish().unwrap();
        f
    }

    #[test]
    fn enters_per_io_over_the_window_per_queue_and_merged() {
        let dir = tempfile::tempdir().unwrap();
        let server = server_file(dir.path(), 2, true);
        let mut q = [QueueCounters::new(), QueueCounters::new()];
        q[0].entered();
        q.iter_mut().enumerate().for_each(|(i, c)| c.publish(server.queue(i)));
        let reader = StatsFile::open_in(dir.path().into(), 4).unwrap();
        let load = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let req = Request { op: sys::UBLK_IO_OP_READ, len: 4096, ..Default::default() };
            for _ in 0..8 {
                q[0].record(&req, 4096, 2000);
                q[1].record(&req, 4096, 2000);
            }
            (0..2).for_each(|_| q[0].entered());
            (0..4).for_each(|_| q[1].entered());
            q.iter_mut().enumerate().for_each(|(i, c)| c.publish(server.queue(i)));
        });
        let r = collect_from(&reader, 4, Duration::from_millis(300));
        load.join().unwrap();
        let (queues, merged) = (r.queues.unwrap(), r.merged.unwrap());
        assert_eq!(r.stats, "on");
        assert_eq!((queues[0].enters, queues[1].enters, merged.enters, r.enters), (3, 4, 7, 7));
        assert_eq!(queues[0].enters_per_io, Some(0.25), "2 enters in the window for 8 I/Os");
        assert_eq!(queues[1].enters_per_io, Some(0.5));
        assert_eq!(merged.enters_per_io, Some(6.0 / 16.0));
        assert_eq!(merged.ios, 16);
        assert!((1.9..=2.0).contains(&merged.p50_us), "{}", merged.p50_us);
    }

    #[test]
    fn no_io_in_the_window_gives_no_enters_per_io() {
        let dir = tempfile::tempdir().unwrap();
        let _server = server_file(dir.path(), 1, true);
        let reader = StatsFile::open_in(dir.path().into(), 4).unwrap();
        let r = collect_from(&reader, 4, Duration::from_millis(1));
        assert_eq!(r.merged.unwrap().enters_per_io, None);
    }

    #[test]
    fn a_zero_window_reads_the_totals_at_once_without_rates() {
        let dir = tempfile::tempdir().unwrap();
        let server = server_file(dir.path(), 1, true);
        let mut c = QueueCounters::new();
        let req = Request { op: sys::UBLK_IO_OP_WRITE, len: 4096, ..Default::default() };
        (0..3).for_each(|_| c.record(&req, 4096, 2000));
        c.publish(server.queue(0));
        let reader = StatsFile::open_in(dir.path().into(), 4).unwrap();
        let t0 = Instant::now();
        let r = collect_from(&reader, 4, Duration::ZERO);
        assert!(t0.elapsed() < Duration::from_millis(500), "a zero window waited {:?}", t0.elapsed());
        let m = r.merged.unwrap();
        assert_eq!((r.window_s, m.ios, m.writes, m.iops, m.mb_per_s), (0.0, 3, 3, 0.0, 0.0));
        assert!((1.9..=2.0).contains(&m.p50_us), "whole-life service time: {}", m.p50_us);
    }

    #[test]
    fn window_takes_seconds_milliseconds_and_zero() {
        assert_eq!(parse_window("0"), Ok(Duration::ZERO));
        assert_eq!(parse_window("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_window("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_window("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "s", "1m", "-1", "1.5s", "3601s"] {
            assert!(parse_window(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn stats_off_reports_off_and_only_enters() {
        let dir = tempfile::tempdir().unwrap();
        let server = server_file(dir.path(), 2, false);
        let mut c = QueueCounters::new();
        (0..5).for_each(|_| c.entered());
        c.publish(server.queue(1));
        let reader = StatsFile::open_in(dir.path().into(), 4).unwrap();
        let r = collect_from(&reader, 4, Duration::from_secs(1));
        assert_eq!((r.stats, r.enters, r.window_s), ("off", 5, 0.0), "an off report waits no window");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("merged").is_none() && json.get("queues").is_none(), "{json}");
        assert_eq!(off_message(4), "stats are off for device 4 (added with --stats off)");
    }
}
