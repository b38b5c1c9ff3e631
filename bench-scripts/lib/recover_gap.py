"""The report of bench-scripts/recover-gap: the client's gap after kill -9 and a
cold `recover`, per server, from the `ublk-bench downtime` runs of one guest boot.

    recover_gap.py OUT.json RUN_DIR

RUN_DIR holds one folder per downtime run, named SERVER-ROUND (ublk-bench-1,
kublk-1, ublk-bench-2, ...), each with that run's downtime-<UTC>.json. For
each server the gaps of all its cycles are pooled: median, max and mean, and
the median of each phase (µs from the kill). Writes OUT.json and prints a
table. Exit status 1 when a run is missing or a cycle has no gap (service
never came back) or an I/O error: such figures would not compare.
Standard library only.
"""

import glob
import json
import os
import statistics
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report_file  # noqa: E402

# Phases in the order they happen, as downtime reports them (µs from the kill).
# old_exit and live come from the run itself; the rest from ublk-bench's events.
PHASES = [
    ("old_exit_us", None),
    ("crash_seen_us", "phases"),
    ("began_us", "phases"),
    ("prepared_us", "phases"),
    ("quiesced_us", "phases"),
    ("start_recovery_us", "phases"),
    ("fetch_posted_us", "phases"),
    ("end_recovery_us", "phases"),
    ("first_served_us", "phases"),
    ("gap_end_us", None),
    ("live_us", None),
]


def load_runs(run_dir):
    """{server: [downtime report, ...]} from RUN_DIR/SERVER-ROUND/downtime-*.json."""
    runs = {}
    for sub in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, sub)
        server, sep, _ = sub.rpartition("-")
        if not sep or not os.path.isdir(path):
            continue
        files = sorted(glob.glob(os.path.join(path, "downtime-*.json")))
        if not files:
            raise ValueError(f"{path}: no downtime-*.json (the run failed)")
        with open(files[-1], encoding="utf-8") as f:
            runs.setdefault(server, []).append(json.load(f))
    return runs


def phase_value(cycle, key, where):
    src = cycle.get(where) if where else cycle
    return (src or {}).get(key)


def summarize(reports):
    """Pooled gap figures and phase medians of one server's runs."""
    cycles = [c for r in reports for c in r["cycles"]]
    gaps_ms = [c["gap_us"] / 1e3 for c in cycles if c.get("gap_us") is not None]
    problems = []
    missing = len(cycles) - len(gaps_ms)
    if missing:
        problems.append(f"{missing} cycle(s) without a gap (service never came back)")
    errors = sum(r["summary"]["errors"] for r in reports)
    if errors:
        problems.append(f"{errors} I/O error(s)")
    if not all(r.get("complete", False) for r in reports):
        problems.append("a run did not complete every cycle")
    phases = {}
    for key, where in PHASES:
        vals = [v for c in cycles if (v := phase_value(c, key, where)) is not None]
        if vals:
            phases[key.removesuffix("_us") + "_ms"] = round(statistics.median(vals) / 1e3, 2)
    return {
        "runs": len(reports),
        "cycles": len(cycles),
        "gap_ms": {
            "p50": round(statistics.median(gaps_ms), 2) if gaps_ms else None,
            "max": round(max(gaps_ms), 2) if gaps_ms else None,
            "mean": round(statistics.fmean(gaps_ms), 2) if gaps_ms else None,
            "all": [round(g, 2) for g in gaps_ms],
        },
        "phase_p50_ms": phases,
        "problems": problems,
    }


def build(runs):
    servers = {name: summarize(reps) for name, reps in runs.items()}
    first = next(iter(runs.values()))[0]
    cfg = first["config"]
    report = {
        "kind": "recover-gap",
        "schema": 1,
        "kernel": first.get("kernel"),
        "git_rev": first.get("git_rev"),
        "client": {k: cfg.get(k) for k in ("rwmix", "bs", "iodepth", "jobs")},
        "cycles_per_run": cfg.get("cycles"),
        "interval_ms": cfg.get("interval_ms"),
        "recover_cmds": {n: r[0]["config"].get("recover_cmd") for n, r in runs.items()},
        "servers": servers,
    }
    ours, peer = servers.get("ublk-bench"), servers.get("kublk")
    if ours and peer and ours["gap_ms"]["p50"] and peer["gap_ms"]["p50"]:
        report["ratio_p50"] = round(ours["gap_ms"]["p50"] / peer["gap_ms"]["p50"], 2)
        report["ratio_max"] = round(ours["gap_ms"]["max"] / peer["gap_ms"]["max"], 2)
    return report


def table(report):
    lines = [f"{'server':<12} {'cycles':>6} {'gap p50 ms':>11} {'max ms':>8} {'mean ms':>8}  phases p50 (ms from kill)"]
    for name, s in report["servers"].items():
        g = s["gap_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ph = " ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in s["phase_p50_ms"].items())
        lines.append(f"{name:<12} {s['cycles']:>6} {fmt(g['p50']):>11} {fmt(g['max']):>8} {fmt(g['mean']):>8}  {ph}")
        lines.extend(f"  {name}: {p}" for p in s["problems"])
    if "ratio_p50" in report:
        lines.append(f"ublk-bench / kublk: p50 {report['ratio_p50']:.2f}x, max {report['ratio_max']:.2f}x")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 3:
        print("usage: recover_gap.py OUT.json RUN_DIR", file=sys.stderr)
        return 2
    out, run_dir = argv[1], argv[2]
    try:
        runs = load_runs(run_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"recover_gap: error: {e}", file=sys.stderr)
        return 1
    if not runs:
        print(f"recover_gap: error: no runs in {run_dir}", file=sys.stderr)
        return 1
    report = build(runs)
    report_file.write(out, report)
    print(table(report))
    print(f"wrote {out}")
    return 1 if any(s["problems"] for s in report["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
