#!/usr/bin/env python3
"""bench-scripts/emulate's report: served figures against the model.

Usage: emulate_report.py OUT.json RUNS_DIR

RUNS_DIR holds fio-MODEL-MODE-qdQD.json (fio --output-format=json) and
gap-NAME/downtime-*.json (ublk-bench downtime). OUT.json gets `kernel` and
`started_utc` (from the first downtime report) and:
- service[]: model, model_us, mode, qd, iops, model_iops (qd / model time),
  iops_ratio, p50_us, p99_us, p50_ratio and p99_ratio (to the model time);
- gap[]: name ("none" or the model), gap_p50_us, gap_max_us,
  inflight_at_kill (median over cycles), cycles, recovered, errors.
Both tables are printed too.
"""

import glob
import json
import os
import re
import statistics
import sys

UNITS = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
FIO_NAME = re.compile(r"fio-(?P<model>.+)-(?P<mode>blocking|poll)-qd(?P<qd>\d+)\.json$")


def model_us(model):
    """A fixed model's time in µs ("100us" -> 100.0)."""
    m = re.fullmatch(r"([0-9.]+)(ns|us|ms|s)", model)
    if not m:
        raise ValueError(f"not a fixed model: {model}")
    return float(m.group(1)) * UNITS[m.group(2)]


def service_row(path):
    m = FIO_NAME.search(os.path.basename(path))
    with open(path) as f:
        read = json.load(f)["jobs"][0]["read"]
    model, qd = m["model"], int(m["qd"])
    t = model_us(model)
    pct = read["clat_ns"]["percentile"]
    p50, p99 = pct["50.000000"] / 1e3, pct["99.000000"] / 1e3
    model_iops = qd * 1e6 / t
    return {
        "model": model,
        "model_us": t,
        "mode": m["mode"],
        "qd": qd,
        "iops": round(read["iops"], 1),
        "model_iops": round(model_iops, 1),
        "iops_ratio": round(read["iops"] / model_iops, 3),
        "p50_us": round(p50, 1),
        "p99_us": round(p99, 1),
        "p50_ratio": round(p50 / t, 3),
        "p99_ratio": round(p99 / t, 3),
    }


def gap_row(name, path, facts):
    with open(path) as f:
        rep = json.load(f)
    facts.setdefault("kernel", rep.get("kernel"))
    facts.setdefault("started_utc", rep.get("started_utc"))
    s = rep["summary"]
    inflight = [c["inflight_at_kill"] for c in rep["cycles"] if c.get("inflight_at_kill") is not None]
    return {
        "name": name,
        "gap_p50_us": s["gap_us"]["p50"],
        "gap_max_us": s["gap_us"]["max"],
        "inflight_at_kill": statistics.median(inflight) if inflight else None,
        "cycles": s["cycles"],
        "recovered": s["recovered"],
        "errors": s["errors"],
    }


def collect(runs):
    service = [service_row(p) for p in sorted(glob.glob(os.path.join(runs, "fio-*.json")))]
    service.sort(key=lambda r: (r["model_us"], r["mode"], r["qd"]))
    gap, facts = [], {}
    for d in sorted(glob.glob(os.path.join(runs, "gap-*"))):
        reports = sorted(glob.glob(os.path.join(d, "downtime-*.json")))
        if reports:
            gap.append(gap_row(os.path.basename(d)[len("gap-"):], reports[-1], facts))
    order = {"none": -1.0}
    gap.sort(key=lambda r: order.get(r["name"], model_us(r["name"]) if FIXED.fullmatch(r["name"]) else 1e12))
    return {"kernel": facts.get("kernel"), "started_utc": facts.get("started_utc"), "service": service, "gap": gap}


FIXED = re.compile(r"[0-9.]+(ns|us|ms|s)")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_tables(rep):
    print(f"{'model':>7} {'mode':>8} {'QD':>3} {'IOPS':>9} {'model':>9} {'ratio':>6} "
          f"{'p50 us':>9} {'p99 us':>9} {'p50/m':>6} {'p99/m':>6}")
    for r in rep["service"]:
        print(f"{r['model']:>7} {r['mode']:>8} {r['qd']:>3} {r['iops']:>9.0f} {r['model_iops']:>9.0f} "
              f"{r['iops_ratio']:>6.2f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
              f"{r['p50_ratio']:>6.2f} {r['p99_ratio']:>6.2f}")
    print()
    print(f"{'device':>8} {'gap p50 us':>11} {'gap max us':>11} {'in flight':>10} {'cycles':>7} {'errors':>7}")
    for r in rep["gap"]:
        print(f"{r['name']:>8} {fmt(r['gap_p50_us'], '11.0f')} {fmt(r['gap_max_us'], '11.0f')} "
              f"{fmt(r['inflight_at_kill'], '10.0f')} {r['recovered']:>3}/{r['cycles']:<3} {r['errors']:>7}")


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    rep = collect(argv[2])
    if not rep["service"] and not rep["gap"]:
        print(f"emulate_report: nothing measured in {argv[2]}", file=sys.stderr)
        return 1
    with open(argv[1], "w") as f:
        json.dump(rep, f, indent=2)
    print_tables(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
