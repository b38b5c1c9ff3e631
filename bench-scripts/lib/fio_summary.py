#!/usr/bin/env python3
"""Summarise fio --output-format=json results: IOPS, bandwidth and completion
latency percentiles (in microseconds) per direction. Standard library only.

As a module:  summarize(load("out.json"))  ->  {"read": {...}, "write": {...}, ...}
From a shell: fio_summary.py out.json [...]          (a table)
              fio_summary.py --json out.json [...]   (one JSON object per file)

fio sometimes prints warnings ahead of the JSON document (even with
--output=FILE); load() skips anything before the first line that starts
with '{'.
"""

import json
import sys

DIRECTIONS = ("read", "write", "trim")
# fio's percentile keys, e.g. "99.000000"; these are in its default list.
PERCENTILES = {"p50_us": "50.000000", "p90_us": "90.000000",
               "p99_us": "99.000000", "p99_9_us": "99.900000"}


class FioOutputError(ValueError):
    pass


def load(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return loads(text, path)


def loads(text, what="fio output"):
    start = 0 if text.startswith("{") else text.find("\n{")
    if start < 0:
        raise FioOutputError(f"{what}: no JSON document (fio failed before reporting?)")
    try:
        return json.JSONDecoder().raw_decode(text[start:].lstrip())[0]
    except json.JSONDecodeError as e:
        raise FioOutputError(f"{what}: bad JSON: {e}") from e


def _us(ns):
    return None if ns is None else round(ns / 1000.0, 2)


def direction(stats):
    """One direction (fio's job["read"] etc.) in the units we report."""
    clat = stats.get("clat_ns") or {}
    pct = clat.get("percentile") or {}
    out = {
        "iops": round(stats.get("iops", 0.0), 1),
        "bw_mib_s": round(stats.get("bw_bytes", 0) / (1 << 20), 2),
        "bw_mb_s": round(stats.get("bw_bytes", 0) / 1e6, 2),  # decimal MB/s
        "ios": stats.get("total_ios", 0),
        "clat_mean_us": _us(clat.get("mean")),
        "clat_max_us": _us(clat.get("max")),
    }
    for name, key in PERCENTILES.items():
        out[name] = _us(pct.get(key))
    return out


def summarize(doc):
    """Totals over all jobs in one fio run (run fio with --group_reporting for
    exact merged percentiles; without it the first job's percentiles are used)."""
    jobs = doc.get("jobs") or []
    if not jobs:
        raise FioOutputError("fio output has no jobs")
    res = {"fio_version": doc.get("fio version"),
           "jobs": len(jobs),
           "error": max(j.get("error", 0) for j in jobs),
           "runtime_ms": max(j.get("job_runtime", 0) for j in jobs),
           "usr_cpu": round(sum(j.get("usr_cpu", 0.0) for j in jobs), 2),
           "sys_cpu": round(sum(j.get("sys_cpu", 0.0) for j in jobs), 2),
           "ctx": sum(j.get("ctx", 0) for j in jobs)}
    for d in DIRECTIONS:
        if all(j.get(d, {}).get("total_ios", 0) == 0 for j in jobs):
            continue
        first = direction(jobs[0][d])
        if len(jobs) > 1:
            first["iops"] = round(sum(j[d].get("iops", 0.0) for j in jobs), 1)
            first["bw_mib_s"] = round(sum(j[d].get("bw_bytes", 0) for j in jobs) / (1 << 20), 2)
            first["bw_mb_s"] = round(sum(j[d].get("bw_bytes", 0) for j in jobs) / 1e6, 2)
            first["ios"] = sum(j[d].get("total_ios", 0) for j in jobs)
        res[d] = first
    return res


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv):
    as_json = "--json" in argv
    paths = [a for a in argv if a != "--json"]
    if not paths or any(a.startswith("-") for a in paths):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rc = 0
    if not as_json:
        print(f"{'file':<32} {'dir':<5} {'IOPS':>10} {'MiB/s':>9} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9}")
    for p in paths:
        try:
            s = summarize(load(p))
        except (OSError, FioOutputError) as e:
            print(f"fio_summary: {e}", file=sys.stderr)
            rc = 1
            continue
        if s["error"]:
            rc = 1
        if as_json:
            print(json.dumps({"file": p, **s}))
            continue
        for d in DIRECTIONS:
            if d in s:
                r = s[d]
                print(f"{p[-32:]:<32} {d:<5} {_fmt(r['iops'], '10.0f')} {_fmt(r['bw_mib_s'], '9.1f')} "
                      f"{_fmt(r['p50_us'], '9.1f')} {_fmt(r['p99_us'], '9.1f')} {_fmt(r['p99_9_us'], '9.1f')}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
