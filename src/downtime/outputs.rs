//! What the run leaves: the report built from the client's results, the
//! timeline and the takeover events, and its JSON, CSV and SVG files.

use crate::backend;
use crate::cli::RecoverMethod;
use crate::error::Result;
use crate::sys;

use super::client::JobResult;
use super::cycle::Run;
use super::device::DeviceFacts;
use super::report::{self, CycleReport, Report, RunConfig, Summary};
use super::{gap, plot};

pub(super) fn rw_name(rwmix: u32) -> String {
    match rwmix {
        100 => "randread".into(),
        0 => "randwrite".into(),
        r => format!("randrw {r}/{}", 100 - r),
    }
}

fn us(ns: i128) -> f64 {
    ns as f64 / 1e3
}

pub(super) fn build_report(
    run: &Run,
    results: &[JobResult],
    events: &[report::Event],
    stamp: &str,
    complete: bool,
    facts: &DeviceFacts,
    trace_info: report::TraceInfo,
) -> Report {
    let tl = &run.tl;
    let mut cycles = Vec::new();
    for (i, &k) in tl.kills.iter().enumerate() {
        let next = tl.kills.get(i + 1).copied();
        let event = report::event_for(events, k, next);
        let g = gap::merge(results.iter().map(|r| r.cycle(i)), event.and_then(report::Event::anchor_ns));
        let rel = |t: u64| us(t as i128 - k as i128);
        cycles.push(CycleReport {
            cycle: i as u32 + 1,
            kill_ms: (k - run.t0) as f64 / 1e6,
            old_pid: tl.old_pids.get(i).copied().unwrap_or(0),
            new_pid: tl.new_pids.get(i).copied().unwrap_or(0),
            gap_us: g.gap_ns().map(|n| n as f64 / 1e3),
            gap_start_us: g.stall.map(|(s, _)| rel(s)),
            gap_end_us: g.stall.map(|(_, e)| rel(e)),
            gap_anchored: g.anchored,
            max_latency_us: g.max_latency_ns.map(|n| n as f64 / 1e3),
            ios_across_gap: g.across_gap,
            max_latency_at_kill_us: g.max_latency_at_kill_ns.map(|n| n as f64 / 1e3),
            inflight_at_kill: g.spanning,
            errors: g.errors,
            old_exit_us: tl.exits.get(i).map(|&t| rel(t)),
            live_us: tl.lives.get(i).map(|&l| rel(l)),
            phases: event.map(|e| e.offsets(k)),
            trace: run.tracer.as_ref().map(|_| {
                run.cycle_trace(i, k, event.and_then(|e| e.first_served_ns), g.stall.map(|(_, e)| e))
            }),
        });
    }
    let errors: u64 = results.iter().map(|r| r.tracker.errors).sum();
    let ios: u64 = results.iter().map(|r| r.tracker.ok + r.tracker.errors).sum();
    let mut notes = vec![
        "gap_us: the stretch with no successful completion by any client job that holds the moment the new \
         server sent START_USER_RECOVERY (gap_anchored; else the longest such stretch ending after the kill and \
         beginning before LIVE): from the last completion before the outage, stragglers from the dying server \
         included, to the first completion served by the new server"
            .to_string(),
        "max_latency_us / ios_across_gap: the I/Os that waited through the gap (submitted before it ended, \
         completed at or after its end); max_latency_at_kill_us / inflight_at_kill: the I/Os submitted \
         before the kill and completed after it"
            .to_string(),
        "times in cycles[] are µs from the kill (the moment before SIGKILL was sent, or `restart` was called); \
         kill_ms is ms since the run's start, the CSV's time base"
            .to_string(),
    ];
    let late: u64 = results.iter().map(|r| r.late).sum();
    if late > 0 {
        notes.push(format!("{late} completions fell after the last per-ms bucket (not in the CSV)"));
    }
    let undrained: u32 = results.iter().map(|r| r.undrained).sum();
    if undrained > 0 {
        notes.push(format!("{undrained} I/Os were still in flight when the client stopped"));
    }
    let before: u64 = results.iter().map(|r| r.tracker.errors_before).sum();
    if before > 0 {
        notes.push(format!("{before} errors before the first kill"));
    }
    let summary = Summary::new(&cycles, errors, ios);
    Report {
        tool: "ublk-bench downtime",
        version: env!("CARGO_PKG_VERSION"),
        started_utc: stamp.to_string(),
        kernel: report::kernel_release(),
        git_rev: report::git_rev(),
        config: run_config(run, facts),
        cycles,
        summary,
        complete,
        trace: trace_info,
        notes,
    }
}

/// The run's settings, the device's as it was measured where it says.
fn run_config(run: &Run, facts: &DeviceFacts) -> RunConfig {
    let a = run.a;
    let settings = facts.settings.as_ref();
    RunConfig {
        method: a.method,
        recover_cmd: a.recover_cmd.clone(),
        recovery: a.recovery.clone(),
        dev_id: run.dev_id,
        device_created: !a.reuse,
        device_flags: sys::flag_names(facts.flags),
        backend: backend::of(settings.map_or(a.backend, |s| s.backend)).name().into(),
        size: facts.size,
        store: a.store.as_ref().map(|p| p.display().to_string()),
        copy_mode_requested: (!a.reuse).then(|| a.dev_opts.copy_mode.name().into()),
        copy_mode: settings.map(|s| s.copy_mode.name().into()),
        explicit_buf_reg: settings.map_or(a.dev_opts.explicit_buf_reg, |s| s.explicit_buf_reg),
        path: settings.and_then(|s| s.path.as_ref()).map(|p| p.display().to_string()),
        queues: a.queue.queues,
        depth: a.queue.depth,
        poll: a.poll,
        cycles: a.cycles,
        interval_ms: run.interval.as_millis() as u64,
        rwmix: a.rwmix,
        bs: a.bs,
        iodepth: a.iodepth,
        jobs: a.jobs,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
    }
}

/// A cycle's traced phases for the plot: (index in `names`, start, end).
fn plot_phases(c: &CycleReport, names: &[&str], at: impl Fn(f64) -> f64) -> Vec<(usize, f64, f64)> {
    let Some(t) = &c.trace else { return Vec::new() };
    t.phases
        .iter()
        .filter_map(|p| Some((names.iter().position(|n| *n == p.name)?, at(p.start_us), at(p.end_us))))
        .collect()
}

pub(super) fn write_outputs(
    run: &Run,
    rep: &Report,
    results: &[JobResult],
    end_ns: u64,
    stamp: &str,
) -> Result<()> {
    let end_ms = ((end_ns - run.t0) / 1_000_000 + 1) as usize;
    let len = results.iter().map(|r| r.ok_ms.len()).max().unwrap_or(0).min(end_ms);
    let mut ok_ms = vec![0u32; len];
    for r in results {
        for (m, n) in ok_ms.iter_mut().zip(&r.ok_ms) {
            *m += n;
        }
    }
    let base = run.a.out.join(format!("downtime-{stamp}"));
    let json = base.with_extension("json");
    let csv = base.with_extension("csv");
    let svg = base.with_extension("svg");
    report::write(&json, &report::to_json(rep))?;
    report::write(&csv, &report::csv(&ok_ms))?;
    let ms = |t: u64| (t - run.t0) as f64 / 1e6;
    let names: Vec<&str> = rep.summary.phases_us.iter().map(|p| p.name).collect();
    let cycles = rep
        .cycles
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let k = run.tl.kills[i];
            let from_kill = |us: f64| ms(k) + us / 1e3;
            let live = c.phases.as_ref().and_then(|p| p.end_recovery_us).or(c.live_us);
            plot::PlotCycle {
                kill_ms: ms(k),
                live_ms: live.map(from_kill),
                gap: c.gap_start_us.zip(c.gap_end_us).map(|(s, e)| (from_kill(s), from_kill(e))),
                phases: plot_phases(c, &names, from_kill),
            }
        })
        .collect();
    let g = &rep.summary.gap_us;
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", v / 1e3));
    let d = plot::PlotData {
        title: format!(
            "ublk-bench downtime: {:?}, {} -r ({}), {} cycles",
            rep.config.method, rep.config.backend, rep.config.recovery, rep.summary.cycles
        ),
        subtitle: format!(
            "gap p50 {} ms, max {} ms, errors {}; client {} job(s) x qd{} {} {}; kernel {}; git {}; {}",
            fmt(g.p50),
            fmt(g.max),
            rep.summary.errors,
            rep.config.jobs,
            rep.config.iodepth,
            rep.config.bs,
            rw_name(rep.config.rwmix),
            rep.kernel,
            rep.git_rev,
            rep.started_utc
        ),
        kill_label: if rep.config.method == RecoverMethod::Restart {
            "restart".into()
        } else {
            "kill".into()
        },
        ok_ms,
        cycles,
        phase_names: names.iter().map(|n| n.to_string()).collect(),
    };
    report::write(&svg, &plot::render(&d))?;
    println!();
    print!("{}", report::table(rep));
    println!("wrote {}, {}, {}", json.display(), csv.display(), svg.display());
    Ok(())
}
