//! `stats -n ID`: the server's own figures, read from its shared-memory
//! stats file over a one-second window: per queue and merged. The file is
//! the one the serving server published (a standby or successor publishes
//! its own only when it takes over); `server_pid` says whose it is.
//!
//! A device added with `--stats off` has no request figures: `stats` says
//! so (exit 0) and shows only the `io_uring_enter` calls its queues counted.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::stats::{Snapshot, StatsFile};

const WINDOW: Duration = Duration::from_secs(1);

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
    /// `window` is the interval's delta; percentiles fall back to the whole
    /// life of the server when the interval saw no I/O.
    fn new(queue: Option<usize>, window: &Snapshot, total: &Snapshot, secs: f64) -> Self {
        let h = if window.ios() > 0 { window.histogram() } else { total.histogram() };
        let us = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        Figures {
            queue,
            iops: window.ios() as f64 / secs,
            mb_per_s: (window.read_bytes + window.write_bytes) as f64 / secs / 1e6,
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
        queues: None,
        merged: None,
        enters: 0,
    };
    if !file.is_on() {
        r.enters = take().iter().map(|s| s.enters).sum();
        return r;
    }
    let (t0, before) = (Instant::now(), take());
    std::thread::sleep(window);
    let (secs, after) = (t0.elapsed().as_secs_f64(), take());
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

pub fn run(dev_id: u32, json: bool) -> Result<()> {
    let r = collect(dev_id, WINDOW)?;
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
    println!(
        "device {dev_id}, server pid {}, over {:.2}s (service time: from the pass over the ring that saw the \
         descriptor to the pass that queued its COMMIT; 0 when both are one pass)",
        r.server_pid, r.window_s
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>12}",
        "queue", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "max us", "errors", "enters/io", "enters"
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
    fn stats_off_reports_off_and_only_enters() {
        let dir = tempfile::tempdir().unwrap();
        let server = server_file(dir.path(), 2, false);
        let mut c = QueueCounters::new();
        (0..5).for_each(|_| c.entered());
        c.publish(server.queue(1));
        let reader = StatsFile::open_in(dir.path().into(), 4).unwrap();
        let r = collect_from(&reader, 4, WINDOW);
        assert_eq!((r.stats, r.enters, r.window_s), ("off", 5, 0.0), "an off report waits no window");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("merged").is_none() && json.get("queues").is_none(), "{json}");
        assert_eq!(off_message(4), "stats are off for device 4 (added with --stats off)");
    }
}
