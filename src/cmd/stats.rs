//! `stats -n ID`: the server's own figures, read from its shared-memory
//! stats file over a one-second window: per queue and merged. The file is
//! the one the serving server published (a standby or successor publishes
//! its own only when it takes over); `server_pid` says whose it is.

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
    pub errors: u64,
    pub busy_turns: u64,
    pub idle_turns: u64,
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
            errors: total.errors,
            busy_turns: total.busy_turns,
            idle_turns: total.idle_turns,
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
    pub window_s: f64,
    pub queues: Vec<Figures>,
    pub merged: Figures,
}

pub fn collect(dev_id: u32, window: Duration) -> Result<Report> {
    let file = StatsFile::open(dev_id)?;
    let take = || (0..file.queues()).map(|q| file.queue(q).snapshot()).collect::<Vec<_>>();
    let (t0, before) = (Instant::now(), take());
    std::thread::sleep(window);
    let (secs, after) = (t0.elapsed().as_secs_f64(), take());
    let deltas: Vec<Snapshot> = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    let queues = (0..after.len()).map(|q| Figures::new(Some(q), &deltas[q], &after[q], secs)).collect();
    let merged = Figures::new(None, &Snapshot::merge(&deltas), &Snapshot::merge(&after), secs);
    Ok(Report { dev_id, server_pid: file.server_pid(), window_s: secs, queues, merged })
}

pub fn run(dev_id: u32, json: bool) -> Result<()> {
    let r = collect(dev_id, WINDOW)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
        return Ok(());
    }
    println!(
        "device {dev_id}, server pid {}, over {:.2}s (service time: descriptor seen to COMMIT queued)",
        r.server_pid, r.window_s
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "queue", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "max us", "errors"
    );
    for f in r.queues.iter().chain(std::iter::once(&r.merged)) {
        let q = f.queue.map_or("all".into(), |q| q.to_string());
        println!(
            "{q:>6} {:>10.0} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>7}",
            f.iops, f.mb_per_s, f.p50_us, f.p99_us, f.p999_us, f.max_us, f.errors
        );
    }
    Ok(())
}
