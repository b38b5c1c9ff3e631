//! Measurement in the guest: a short supervised `downtime` run completes
//! its cycles and writes its report, and `stats` under fio load counts
//! every request the block layer completed (`--json` included), or says
//! that its figures are off for a `--stats off` server.
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
/// error, every gap positive and under 10 s, and an SVG that parses. The
/// run waits an interval before each kill and after the last: 500 ms, in
/// which the client under emulation completes thousands of reads, keeps
/// every gap between loads without the default's 2 s of idle waiting.
#[test]
fn downtime_three_supervised_cycles() {
    let Some(_h) = harness() else { return };
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let args = ["downtime", "--cycles", "3", "--method", "supervise", "--size", "64M", "--interval", "500ms"];
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

/// `stats --json` while fio reads: non-zero IOPS, io_uring_enter counts and
/// service-time percentiles above zero and in order, per queue and merged.
/// The device is a file in zero copy: each read completes in a later pass
/// than the one that took it, so its service time is not zero (on null or
/// ram every request is served within the pass that saw it, and reads 0 at
/// the loop's one-clock-read-per-pass resolution).
#[test]
fn stats_json_under_fio_load() {
    let Some(_h) = harness() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let dev = add(&["file", "--path", img.to_str().unwrap(), "--copy-mode", "zero", "-q", "2", "-d", "32"]);
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
    let p: Vec<f64> = ["p50_us", "p99_us", "p999_us", "max_us"]
        .iter()
        .map(|k| merged[k].as_f64().unwrap_or_else(|| panic!("no {k}: {stats}")))
        .collect();
    assert!(p[0] > 0.0, "a zero median service time from a device that serves in a later pass: {stats}");
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "percentiles out of order: {stats}");
    assert_eq!(stats["stats"], "on", "{stats}");
    assert_eq!(stats["queues"].as_array().map(Vec::len), Some(2), "{stats}");
    assert!(merged["mb_per_s"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(merged["enters"].as_u64().unwrap() > 0, "no io_uring_enter counted: {stats}");
    assert!(merged["enters_per_io"].as_f64().is_some_and(|e| e > 0.0), "no enters per I/O: {stats}");
    let per_queue: u64 =
        stats["queues"].as_array().unwrap().iter().map(|q| q["enters"].as_u64().unwrap()).sum();
    assert_eq!(per_queue, merged["enters"].as_u64().unwrap(), "merged enters are not the sum: {stats}");
    drop(_load);
    del(dev.id);
}

/// `stats --json --window WINDOW` of device `id`, after checking it exits 0.
fn stats_json(id: u32, window: &str) -> Value {
    let out = ublk(&["stats", "-n", &id.to_string(), "--json", "--window", window]).success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stats --json is not JSON ({e}):\n{}", out.describe()))
}

/// With stats on (the default) the server counts every request once: after
/// a window with no I/O (udev's probing done), a QD1 fio read of 8 MiB in
/// 4k blocks shows up in `ios` as exactly the I/Os fio reports, in blocking
/// and in poll mode.
#[test]
fn stats_count_every_request() {
    let Some(_h) = harness() else { return };
    for mode in [&[][..], &["--poll"][..]] {
        let dev = add(&[&["null", "-d", "32"][..], mode].concat());
        let quiet = |v: &Value| v["merged"]["iops"].as_f64() == Some(0.0);
        let mut before = Value::Null;
        assert!(
            eventually(Duration::from_secs(30), || {
                before = stats_json(dev.id, "1s");
                quiet(&before)
            }),
            "device {} never went quiet after add: {before}",
            dev.id
        );
        let args =
            ["--rw=randread", "--bs=4k", "--size=8M", "--direct=1", "--ioengine=io_uring", "--iodepth=1"];
        let job = fio(&dev.block(), &args);
        let fio_ios = job["jobs"][0]["read"]["total_ios"].as_u64().expect("fio total_ios");
        assert_eq!(fio_ios, 2048, "fio read other than 8M in 4k: {job}");
        // Totals only: no window.
        let after = stats_json(dev.id, "0");
        let ios = |v: &Value| v["merged"]["ios"].as_u64().unwrap();
        assert_eq!(ios(&after) - ios(&before), fio_ios, "{mode:?}: before {before}\nafter {after}");
        assert!(after["merged"]["enters"].as_u64() > before["merged"]["enters"].as_u64(), "{after}");
        del(dev.id);
    }
}

/// `add --stats off`: the setting is kept for recovery, and `stats` says
/// the figures are off (exit 0) instead of printing zeros; `--json` has no
/// figures but the io_uring_enter calls the loop still counts.
#[test]
fn stats_off_says_so() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "--stats", "off", "-r"]);
    let settings: Value =
        serde_json::from_str(&std::fs::read_to_string(settings_path(dev.id)).unwrap()).unwrap();
    assert_eq!(settings["stats"], false, "--stats off is not in the settings: {settings}");
    fio(&dev.block(), &["--rw=randread", "--bs=4k", "--size=1M", "--direct=1", "--ioengine=io_uring"]);
    let out = ublk(&["stats", "-n", &dev.id.to_string()]).success();
    let want = format!("stats are off for device {} (added with --stats off)", dev.id);
    assert!(out.stdout.contains(&want), "`stats` does not say stats are off:\n{}", out.describe());
    assert!(
        !out.stdout.contains("IOPS"),
        "`stats` printed figures for a --stats off device:\n{}",
        out.describe()
    );
    let v = stats_json(dev.id, "1s");
    assert_eq!(v["stats"], "off", "{v}");
    assert!(v.get("merged").is_none() && v.get("queues").is_none(), "figures for a --stats off device: {v}");
    assert!(v["enters"].as_u64().is_some_and(|e| e > 0), "no enters counted with --stats off: {v}");
    del(dev.id);
}
