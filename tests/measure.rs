//! Measurement in the guest: a short `downtime` run and `stats` under load.
//! Like the other driver tests they skip without the driver, through
//! `common::skip` (a failure in the guest, where `UBLK_TEST_NO_SKIP=1`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Kills a background fio's process group when the test ends, however it ends.
struct Background(Running);

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: kill takes plain integers; the group is the fio we started.
        unsafe { libc::kill(-self.0.pid(), libc::SIGKILL) };
        let _ = self.0.child.wait();
    }
}

fn only_file(dir: &Path, ext: &str) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(files.len(), 1, "want one .{ext} in {}: {files:?}", dir.display());
    files[0].clone()
}

/// `downtime --cycles 3` on ram with a supervisor: 3 cycles, no client
/// error, every gap positive and under 10 s, and an SVG that parses.
#[test]
fn downtime_three_supervised_cycles() {
    let Some(_h) = harness() else { return };
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let args = ["downtime", "--cycles", "3", "--method", "supervise", "--size", "64M", "--interval", "2s"];
    let run = try_run(Command::new(bin()).args(args).args(["--out", out]), Duration::from_secs(300))
        .expect("downtime finished within 300 s");
    assert!(run.ok(), "downtime failed:\n{}", run.describe());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(only_file(out_dir.path(), "json")).unwrap())
            .expect("the report is JSON");
    let cycles = report["cycles"].as_array().expect("cycles[]");
    assert_eq!(cycles.len(), 3, "{report}");
    assert_eq!(report["summary"]["errors"], 0, "{}", report["summary"]);
    for c in cycles {
        let gap = c["gap_us"].as_f64().unwrap_or_else(|| panic!("cycle without a gap: {c}"));
        assert!(gap > 0.0 && gap < 10e6, "gap {gap} µs out of (0, 10 s): {c}");
    }
    for key in ["config", "kernel", "git_rev"] {
        assert!(!report[key].is_null(), "report lacks {key}");
    }
    let svg = std::fs::read_to_string(only_file(out_dir.path(), "svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(only_file(out_dir.path(), "csv").exists());
}

/// `stats --json` while fio reads: non-zero IOPS and service-time percentiles,
/// per queue and merged.
#[test]
fn stats_json_under_fio_load() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "-q", "2", "-d", "32"]);
    let mut fio = Command::new(need_tool("fio"));
    fio.args(["--name=load", "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--direct=1"])
        // --thread: a job process would run in a session of its own, out of
        // reach of the process-group kill below, and keep the device open.
        .args(["--iodepth=16", "--time_based", "--runtime=60", "--output=/dev/null", "--thread"])
        .arg(format!("--filename={}", dev.block().display()));
    std::os::unix::process::CommandExt::process_group(&mut fio, 0);
    let _load = Background(spawn(&mut fio));
    // fio takes seconds to start under emulation: wait for the first I/O.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let out = ublk(&["stats", "-n", &dev.id.to_string(), "--json"]).success();
        let v: Value = serde_json::from_str(&out.stdout).expect("stats --json is JSON");
        if v["merged"]["iops"].as_f64().unwrap_or(0.0) > 0.0 || Instant::now() > deadline {
            break v;
        }
    };
    let merged = &stats["merged"];
    assert!(merged["iops"].as_f64().unwrap() > 0.0, "no IOPS under load: {stats}");
    for p in ["p50_us", "p99_us", "p999_us", "max_us"] {
        assert!(merged[p].as_f64().unwrap() > 0.0, "{p} is zero: {stats}");
    }
    assert_eq!(stats["queues"].as_array().map(Vec::len), Some(2), "{stats}");
    assert!(merged["mb_per_s"].as_f64().unwrap() > 0.0, "{stats}");
    drop(_load);
    del(dev.id);
}
