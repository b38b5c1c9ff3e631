//! `--latency MODEL`: how long the emulated device takes to serve a
//! request, as a distribution sampled once per request.
//!
//! A model is a fixed time (`100us`), a uniform range (`50us-200us`), or a
//! recorded distribution (`file:PATH`: ublk-bench's own `stats --json`, or
//! fio's `--output-format=json`). `read=MODEL,write=MODEL` sets reads and
//! the rest (writes, flushes, discards) apart; a bare model sets both. A
//! recorded file is read once, at `add`: the device keeps the points, so a
//! takeover never depends on the file.

use serde::{Deserialize, Serialize};

use crate::sys;

/// One distribution of service times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dist {
    Fixed {
        ns: u64,
    },
    /// Every time in `lo_ns..=hi_ns` equally likely.
    Uniform {
        lo_ns: u64,
        hi_ns: u64,
    },
    /// Points of the inverse CDF, `(quantile in parts per million, ns)`:
    /// quantiles rise from 0 to 10^6 and times never fall; a sample
    /// interpolates between two points.
    Recorded {
        points: Vec<(u32, u64)>,
    },
}

/// Service times for reads and for everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub read: Dist,
    pub write: Dist,
}

impl Latency {
    /// The distribution a request of `op` is served with.
    #[inline]
    pub fn dist(&self, op: u8) -> &Dist {
        if op == sys::UBLK_IO_OP_READ { &self.read } else { &self.write }
    }
}

impl Dist {
    /// A service time for the uniform draw `u` (any u64).
    #[inline]
    pub fn sample(&self, u: u64) -> u64 {
        match self {
            Dist::Fixed { ns } => *ns,
            Dist::Uniform { lo_ns, hi_ns } => lo_ns + u % (hi_ns - lo_ns + 1),
            Dist::Recorded { points } => interpolate(points, unit(u)),
        }
    }

    /// The model's mean, for `list` and the benchmark's comparison.
    pub fn mean_ns(&self) -> u64 {
        match self {
            Dist::Fixed { ns } => *ns,
            Dist::Uniform { lo_ns, hi_ns } => (lo_ns + hi_ns) / 2,
            Dist::Recorded { points } => {
                let area: f64 = points
                    .windows(2)
                    .map(|w| (w[1].0 - w[0].0) as f64 / PPM * (w[0].1 + w[1].1) as f64 / 2.0)
                    .sum();
                area as u64
            }
        }
    }

    /// The model as `list` shows it.
    pub fn describe(&self) -> String {
        match self {
            Dist::Fixed { ns } => show_ns(*ns),
            Dist::Uniform { lo_ns, hi_ns } => format!("{}-{}", show_ns(*lo_ns), show_ns(*hi_ns)),
            Dist::Recorded { points } => {
                format!("recorded({} points, mean {})", points.len(), show_ns(self.mean_ns()))
            }
        }
    }
}

/// Quantiles are kept in parts per million (so settings compare exactly).
const PPM: f64 = 1e6;

/// `u` as a fraction in [0, 1).
#[inline]
fn unit(u: u64) -> f64 {
    (u >> 11) as f64 / (1u64 << 53) as f64
}

#[inline]
fn interpolate(points: &[(u32, u64)], q: f64) -> u64 {
    let q = q * PPM;
    let i = points.partition_point(|p| p.0 as f64 <= q).clamp(1, points.len() - 1);
    let ((q0, t0), (q1, t1)) = (points[i - 1], points[i]);
    let (q0, q1) = (q0 as f64, q1 as f64);
    let f = if q1 > q0 { ((q - q0) / (q1 - q0)).clamp(0.0, 1.0) } else { 1.0 };
    t0 + ((t1 - t0) as f64 * f) as u64
}

/// A time as its largest whole unit (`100us`, `1.5ms` shows as `1500us`).
pub fn show_ns(ns: u64) -> String {
    match ns {
        0 => "0".into(),
        n if n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}us", n / 1_000),
        n => format!("{n}ns"),
    }
}

/// `--latency`'s value parser (clap): the model, or what to write instead.
pub fn parse(s: &str) -> Result<Latency, String> {
    let s = s.trim();
    if s.contains('=') {
        let (mut read, mut write) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("read", m)) => read = Some(parse_model(m)?),
                Some(("write", m)) => write = Some(parse_model(m)?),
                _ => return Err(format!("`{part}`: write read=MODEL and/or write=MODEL, comma-separated")),
            }
        }
        let zero = || Dist::Fixed { ns: 0 };
        return Ok(Latency { read: read.unwrap_or_else(zero), write: write.unwrap_or_else(zero) });
    }
    if let Some(path) = s.strip_prefix("file:") {
        return recorded(path);
    }
    let d = parse_model(s)?;
    Ok(Latency { read: d.clone(), write: d })
}

fn parse_model(m: &str) -> Result<Dist, String> {
    if let Some(path) = m.strip_prefix("file:") {
        return recorded(path).map(|l| l.read);
    }
    if m.starts_with('-') {
        return Err(format!("`{m}`: a service time cannot be negative"));
    }
    match m.split_once('-') {
        Some((lo, hi)) => {
            let (lo_ns, hi_ns) = (parse_time(lo)?, parse_time(hi)?);
            if lo_ns > hi_ns {
                return Err(format!("`{m}`: the range's low end is above its high end"));
            }
            Ok(Dist::Uniform { lo_ns, hi_ns })
        }
        None => Ok(Dist::Fixed { ns: parse_time(m)? }),
    }
}

/// The longest service time a model may give: past the kernel's default
/// request timeout (30 s) a request would be aborted, not served slowly.
const MAX_NS: u64 = 10_000_000_000;

/// `100us`, `1.5ms`, `250ns`, `2s`: a time in nanoseconds.
pub fn parse_time(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "" => return Err(format!("`{t}`: give a unit (ns, us, ms or s), e.g. 100us")),
        _ => return Err(format!("`{t}`: unknown unit `{unit}` (ns, us, ms or s)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("`{t}`: not a time (e.g. 100us, 1.5ms)"))?;
    let ns = (v * scale).round();
    if !(0.0..=MAX_NS as f64).contains(&ns) {
        return Err(format!("`{t}`: at most {}", show_ns(MAX_NS)));
    }
    Ok(ns as u64)
}

/// A recorded distribution: reads and writes from a fio JSON file (each
/// kind that has completions), or the merged percentiles of `stats --json`.
fn recorded(path: &str) -> Result<Latency, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--latency file:{path}: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!("--latency file:{path}: not JSON ({e}); give `stats --json` or fio JSON output")
    })?;
    let found = if v.get("jobs").is_some() { from_fio(&v) } else { from_stats(&v) };
    found.map_err(|e| format!("--latency file:{path}: {e}"))
}

/// fio `--output-format=json`: `jobs[0].{read,write}.clat_ns.percentile`.
fn from_fio(v: &serde_json::Value) -> Result<Latency, String> {
    let job = &v["jobs"][0];
    let kind = |k: &str| -> Option<Result<Dist, String>> {
        let p = job[k]["clat_ns"]["percentile"].as_object()?;
        let mut points: Vec<(f64, u64)> =
            p.iter().filter_map(|(q, ns)| Some((q.parse::<f64>().ok()? / 100.0, ns.as_u64()?))).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let max = job[k]["clat_ns"]["max"].as_u64();
        (points.last().is_some_and(|p| p.1 > 0)).then(|| finish(points, max))
    };
    match (kind("read"), kind("write")) {
        (None, None) => {
            Err("a fio JSON file without completion-latency percentiles (run fio with clat percentiles on)"
                .into())
        }
        (Some(r), None) => r.map(|d| Latency { read: d.clone(), write: d }),
        (None, Some(w)) => w.map(|d| Latency { read: d.clone(), write: d }),
        (Some(r), Some(w)) => Ok(Latency { read: r?, write: w? }),
    }
}

/// `stats --json`: the merged p50/p99/p99.9/max. Below the median the
/// service time is taken as the median (the file has no lower points).
fn from_stats(v: &serde_json::Value) -> Result<Latency, String> {
    let m = &v["merged"];
    let us = |k: &str| m[k].as_f64().map(|x| (x * 1000.0).round() as u64);
    let (Some(p50), Some(p99), Some(p999), Some(max)) =
        (us("p50_us"), us("p99_us"), us("p999_us"), us("max_us"))
    else {
        return Err("neither `stats --json` output (merged p50_us..max_us) nor fio JSON (jobs)".into());
    };
    let d = finish(vec![(0.5, p50), (0.99, p99), (0.999, p999)], Some(max))?;
    Ok(Latency { read: d.clone(), write: d })
}

/// Closes the inverse CDF at 0 and 1 and checks it.
fn finish(mut points: Vec<(f64, u64)>, max: Option<u64>) -> Result<Dist, String> {
    let (Some(&first), Some(&last)) = (points.first(), points.last()) else {
        return Err("no percentiles in it".into());
    };
    if first.0 > 0.0 {
        points.insert(0, (0.0, first.1));
    }
    if last.0 < 1.0 {
        points.push((1.0, max.unwrap_or(last.1).max(last.1)));
    }
    if points.windows(2).any(|w| w[1].0 < w[0].0 || w[1].1 < w[0].1) {
        return Err("its percentiles are not in order (a time falls as the percentile rises)".into());
    }
    if points.iter().any(|p| p.1 > MAX_NS) {
        return Err(format!("a percentile above {}", show_ns(MAX_NS)));
    }
    if points.iter().all(|p| p.1 == 0) {
        return Err("every percentile is 0: nothing was recorded".into());
    }
    Ok(Dist::Recorded { points: points.iter().map(|&(q, ns)| ((q * PPM).round() as u32, ns)).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(ns: u64) -> Dist {
        Dist::Fixed { ns }
    }

    #[test]
    fn times_and_models_parse() {
        assert_eq!(parse_time("100us"), Ok(100_000));
        assert_eq!(parse_time("1.5ms"), Ok(1_500_000));
        assert_eq!(parse_time("250ns"), Ok(250));
        assert_eq!(parse_time("2s"), Ok(2_000_000_000));
        assert_eq!(parse("100us").unwrap(), Latency { read: fixed(100_000), write: fixed(100_000) });
        let u = Dist::Uniform { lo_ns: 50_000, hi_ns: 200_000 };
        assert_eq!(parse("50us-200us").unwrap().write, u);
        let split = parse("read=100us,write=1ms").unwrap();
        assert_eq!((split.read, split.write), (fixed(100_000), fixed(1_000_000)));
        assert_eq!(parse("write=1ms").unwrap().read, fixed(0));
    }

    #[test]
    fn bad_models_are_refused_with_what_to_write() {
        for (bad, says) in [
            ("-5us", "negative"),
            ("100", "give a unit"),
            ("100 parsecs", "unknown unit"),
            ("abcus", "unknown unit"),
            ("1.2.3us", "not a time"),
            ("200us-50us", "low end"),
            ("1h", "unknown unit"),
            ("11s", "at most"),
            ("size=4k", "read=MODEL"),
            ("file:/nonexistent/x.json", "No such file"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn samples_stay_in_the_model() {
        let u = Dist::Uniform { lo_ns: 10, hi_ns: 20 };
        let mut seen = [false; 11];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = u.sample(x);
            assert!((10..=20).contains(&s), "{s}");
            seen[(s - 10) as usize] = true;
        }
        assert!(seen.iter().all(|&b| b), "every value drawn: {seen:?}");
        assert_eq!(fixed(7).sample(x), 7);
    }

    #[test]
    fn a_recorded_model_follows_its_percentiles() {
        let d = finish(vec![(0.5, 100), (0.99, 1000)], Some(5000)).unwrap();
        assert_eq!(
            d,
            Dist::Recorded { points: vec![(0, 100), (500_000, 100), (990_000, 1000), (1_000_000, 5000)] }
        );
        assert_eq!(d.sample(0), 100);
        let at = |q: f64| d.sample(((q * (1u64 << 53) as f64) as u64) << 11);
        assert_eq!(at(0.25), 100);
        assert!((540..=560).contains(&at(0.745)), "{}", at(0.745));
        assert!(at(0.999_999) <= 5000 && at(0.995) > 1000);
        assert!(finish(vec![(0.5, 100), (0.99, 50)], None).unwrap_err().contains("not in order"));
        assert!(finish(vec![(0.5, 0)], Some(0)).unwrap_err().contains("nothing was recorded"));
    }

    fn write_tmp(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ublk-bench-latency-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn recorded_files_from_fio_and_stats() {
        let fio = r#"{"jobs":[{"read":{"clat_ns":{"max":900000,"percentile":{"50.000000":100000,"99.000000":400000}}},
                     "write":{"clat_ns":{"max":0,"percentile":{"50.000000":0}}}}]}"#;
        let p = write_tmp("fio", fio);
        let l = parse(&format!("file:{}", p.display())).unwrap();
        let Dist::Recorded { points } = &l.read else { panic!("{l:?}") };
        assert_eq!(points.last(), Some(&(1_000_000, 900_000)));
        assert_eq!(l.write, l.read, "a kind without completions takes the other's");
        let stats = r#"{"merged":{"p50_us":10.0,"p99_us":20.0,"p999_us":30.5,"max_us":40.0}}"#;
        let p2 = write_tmp("stats", stats);
        let l = parse(&format!("read=file:{},write=1ms", p2.display())).unwrap();
        assert_eq!(l.read.sample(0), 10_000);
        assert_eq!(l.write, fixed(1_000_000));
        let p3 = write_tmp("junk", "{\"x\": 1}");
        assert!(parse(&format!("file:{}", p3.display())).unwrap_err().contains("neither"));
        let p4 = write_tmp("text", "p50 10us");
        assert!(parse(&format!("file:{}", p4.display())).unwrap_err().contains("not JSON"));
        for p in [p, p2, p3, p4] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn models_describe_themselves() {
        assert_eq!(parse("100us").unwrap().read.describe(), "100us");
        assert_eq!(parse("1500us-2ms").unwrap().read.describe(), "1500us-2ms");
        assert_eq!(Dist::Uniform { lo_ns: 0, hi_ns: 100 }.mean_ns(), 50);
        let d = Dist::Recorded { points: vec![(0, 100), (1_000_000, 300)] };
        assert_eq!(d.mean_ns(), 200);
    }
}
