//! `downtime --trace` in the guest: the kernel-side phases of each gap are
//! in the JSON, named and in order, and tracefs is left as it was found; a
//! refused `--trace` leaves no device, no output and no tracefs state.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Our instances and kprobe groups still in tracefs (there should be none
/// once a run has ended).
fn trace_leftovers() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(Path::new(TRACEFS).join("instances"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    out.retain(|n| n.starts_with("ublk-bench-"));
    let defs = std::fs::read_to_string(Path::new(TRACEFS).join("kprobe_events")).unwrap_or_default();
    out.extend(defs.lines().filter(|l| l.contains("ublk_bench_")).map(String::from));
    out
}

fn report_in(dir: &Path) -> Value {
    let json = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap_or_else(|| panic!("no JSON in {}", dir.display()));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).expect("the report is JSON")
}

/// The marks every standby takeover passes, in the order it passes them.
const NEEDED: [&str; 7] =
    ["exit_first", "ch_release", "release_work", "quiesced", "start_recovery", "end_recovery", "gap_end"];
/// Every mark name, in phase order.
const ORDER: [&str; 12] = [
    "exit_first",
    "mm_done",
    "exit_last",
    "ring_exit_work",
    "ch_release",
    "release_work",
    "quiesced",
    "start_recovery",
    "fetch_ready",
    "end_recovery",
    "first_served",
    "gap_end",
];

/// Checks one cycle's phases: consecutive from the kill, in ORDER, none
/// negative, ending at the client's gap end, with the NEEDED marks.
fn check_phases(c: &Value) {
    let phases = c["trace"]["phases"].as_array().unwrap_or_else(|| panic!("cycle without phases: {c}"));
    let until: Vec<&str> = phases.iter().map(|p| p["until"].as_str().unwrap()).collect();
    for m in NEEDED {
        assert!(until.contains(&m), "no {m} phase in {until:?}: {c}");
    }
    let pos: Vec<usize> =
        until.iter().map(|u| ORDER.iter().position(|o| o == u).expect("known mark")).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "phases out of order: {until:?}");
    let mut at = 0.0;
    for p in phases {
        let (start, end, dur) =
            (p["start_us"].as_f64().unwrap(), p["end_us"].as_f64().unwrap(), p["dur_us"].as_f64().unwrap());
        assert!((start - at).abs() < 1e-3, "phase {p} does not start where the last ended ({at})");
        assert!(dur >= 0.0 && (end - start - dur).abs() < 1e-3, "bad phase {p}");
        at = end;
    }
    // The phases end at the latest mark: the client's gap end, unless a
    // kernel mark fell after it (END_USER_RECOVERY's return probe can fire
    // after the requeued requests were already served).
    let marks = c["trace"]["marks"].as_array().unwrap();
    let latest = marks.iter().map(|m| m["at_us"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert!((at - latest).abs() < 1e-3, "phases end at {at} µs, the latest mark at {latest} µs");
    let gap_end = c["gap_end_us"].as_f64().unwrap();
    assert!(at >= gap_end - 1e-3, "phases end at {at} µs, before the gap's end {gap_end} µs");
    for m in marks {
        assert!(m["at_us"].as_f64().unwrap() >= 0.0, "mark {m} before the kill");
    }
}

/// `downtime --trace --method standby` on null: every cycle's gap split into
/// named phases, in order, adding up to the gap's end; the summary has the
/// per-phase table; tracefs holds nothing of the run afterwards.
#[test]
fn downtime_trace_phases_present_and_ordered() {
    let Some(_h) = harness() else { return };
    let out_dir = tempfile::tempdir().unwrap();
    let args = ["downtime", "--trace", "--method", "standby", "--backend", "null", "--size", "64M"];
    let run = try_run(
        Command::new(bin())
            .args(args)
            .args(["--cycles", "2", "--interval", "1s", "--out"])
            .arg(out_dir.path()),
        Duration::from_secs(300),
    )
    .expect("downtime finished within 300 s");
    assert!(run.ok(), "downtime --trace failed:\n{}", run.describe());
    assert!(
        run.stdout.contains("phase") && run.stdout.contains("ch_release"),
        "no phase table:\n{}",
        run.stdout
    );
    let report = report_in(out_dir.path());
    assert_eq!(report["trace"]["enabled"], true, "{}", report["trace"]);
    assert_eq!(report["summary"]["errors"], 0, "{}", report["summary"]);
    let cycles = report["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 2);
    cycles.iter().for_each(check_phases);
    let stats = report["summary"]["phases_us"].as_array().unwrap();
    assert!(stats.iter().any(|s| s["until"] == "ch_release" && s["cycles"] == 2), "{stats:?}");
    let svg = std::fs::read_to_string(
        std::fs::read_dir(out_dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "svg"))
            .unwrap(),
    )
    .unwrap();
    roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    assert!(svg.contains(">ring_teardown<"), "no phase legend in the SVG");
    assert_eq!(trace_leftovers(), Vec::<String>::new(), "tracefs state left behind");
}

/// `--trace` where tracefs cannot be had (a mount namespace whose
/// /sys/kernel is an empty read-only tmpfs): refused before any device,
/// with a message that names tracefs and the way out, no output written.
#[test]
fn a_refused_trace_leaves_nothing() {
    let Some(_h) = harness() else { return };
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out");
    let script = format!(
        "mount -t tmpfs -o ro,size=4k none /sys/kernel && exec {} downtime --trace --cycles 1 --out {}",
        bin().display(),
        out.display()
    );
    let before = list_ids();
    let run =
        run(Command::new(need_tool("unshare")).args(["-m", "--propagation", "private", "sh", "-c", &script]));
    assert!(!run.ok(), "downtime --trace ran without tracefs:\n{}", run.describe());
    for want in ["--trace", "tracefs", "--no-trace"] {
        assert!(run.stderr.contains(want), "refusal lacks {want}:\n{}", run.describe());
    }
    assert_eq!(list_ids(), before, "a device was made");
    assert!(std::fs::read_dir(&out).map_or(true, |d| d.count() == 0), "output written");
    assert_eq!(trace_leftovers(), Vec::<String>::new(), "tracefs state left behind");
}
