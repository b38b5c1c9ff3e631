#!/usr/bin/env python3
"""Build results/matrix-<UTC>.json from the work folder bench-scripts/matrix
filled (config.txt, env.txt, rows.tsv and raw fio JSON), and print a table.
Standard library only. Called by bench-scripts/matrix on the host side after
the guest run; not meant to be run by hand (but harmless to re-run on a kept
work folder: --keep-raw).

rows.tsv is tab-separated, one row per line:
    job target mode status device fio_json add_json server_cpu_ticks wall_ms error
Exit status: 0 when the report was written (whatever the rows say), 1 if not.
"""

import argparse
import json
import os
import sys

sys.dont_write_bytecode = True  # the project folder is shared with the guest; keep it clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_summary  # noqa: E402
import guest_facts  # noqa: E402
import report_file  # noqa: E402

SCHEMA = 1
REFERENCE = "null_blk"
ROW_FIELDS = ("job", "target", "mode", "status", "device", "fio_json", "add_json",
              "server_cpu_ticks", "wall_ms", "error")
UBLK_KEYS = ("dev_id", "queues", "depth", "poll", "cpus", "copy_mode", "flags", "backend", "size",
             "block_size", "max_io_bytes")


def read_kv(path):
    out = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    out[k] = v
    except OSError:
        pass
    return out


def to_int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def emulation(env):
    """guest_facts.emulation() from what the guest saw."""
    return guest_facts.emulation(env.get("cpu_model", ""), env.get("hypervisor") == "1", env.get("in_guest") == "1")


def load_ublk(path):
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            dev = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(dev, list):
        dev = dev[0] if dev else {}
    return {k: dev[k] for k in UBLK_KEYS if isinstance(dev, dict) and k in dev}


def requested_copy_mode(target):
    if not target.startswith("ublk-"):
        return None
    parts = target.split("-")
    return parts[2] if len(parts) > 2 else "auto"


def build_row(parts, clk_tck):
    parts = parts + [""] * (len(ROW_FIELDS) - len(parts))
    r = dict(zip(ROW_FIELDS, parts))
    row = {"job": r["job"], "target": r["target"], "mode": r["mode"], "status": r["status"] or "failed",
           "device": r["device"] or None,
           "backend": r["target"].split("-")[1] if r["target"].startswith("ublk-") else None,
           "copy_mode_requested": requested_copy_mode(r["target"]),
           "iops": None, "mb_s": None, "clat_p50_us": None, "clat_p99_us": None, "clat_p99_9_us": None}
    if r["error"]:
        row["error"] = r["error"]
    ublk = load_ublk(r["add_json"])
    if ublk:
        row["ublk"] = ublk
        row["copy_mode"] = ublk.get("copy_mode")
    wall_ms = to_int(r["wall_ms"])
    if wall_ms is not None:
        row["wall_s"] = round(wall_ms / 1000.0, 2)
    if row["status"] != "ok":
        return row
    try:
        doc = fio_summary.load(r["fio_json"])
        s = fio_summary.summarize(doc)
    except (OSError, fio_summary.FioOutputError) as e:
        row["status"] = "failed"
        row["error"] = str(e)
        return row
    dirs = {d: s[d] for d in fio_summary.DIRECTIONS if d in s}
    ios = sum(d["ios"] for d in dirs.values())
    if s["error"] or not ios:
        row["status"] = "failed"
        row["error"] = f"fio error {s['error']}, {ios} I/Os"
    # Latency percentiles come from the direction with the most I/Os (reads in
    # a 70/30 mix); each direction's own figures are under "read"/"write".
    main = max(dirs, key=lambda d: dirs[d]["ios"]) if dirs else None
    m = dirs.get(main, {})
    row.update(
        iops=round(sum(d["iops"] for d in dirs.values()), 1),
        mb_s=round(sum(d["bw_mb_s"] for d in dirs.values()), 2),
        clat_p50_us=m.get("p50_us"), clat_p90_us=m.get("p90_us"), clat_p99_us=m.get("p99_us"),
        clat_p99_9_us=m.get("p99_9_us"), clat_mean_us=m.get("clat_mean_us"),
        clat_max_us=m.get("clat_max_us"), clat_dir=main,
        ios=ios, fio_runtime_s=round(s["runtime_ms"] / 1000.0, 2),
        fio_usr_cpu_pct=s["usr_cpu"], fio_sys_cpu_pct=s["sys_cpu"], fio_ctx=s["ctx"],
        fio_version=s.get("fio_version"))
    row.update(dirs)
    # Total latency (submission + completion): fio reports only its mean unless
    # lat_percentiles=1. null_blk with irqmode=0 completes inside the submit
    # call, so its clat is near zero and its cost shows in lat (and IOPS).
    lat = [j[main].get("lat_ns", {}).get("mean") for j in doc.get("jobs", []) if main and main in j]
    if lat and lat[0] is not None:
        row["lat_mean_us"] = round(lat[0] / 1000.0, 2)
    ticks = to_int(r["server_cpu_ticks"])
    if ticks is not None and clk_tck:
        cpu_s = ticks / clk_tck
        row["server_cpu_s"] = round(cpu_s, 2)
        if wall_ms:
            # of one CPU, over the whole fio run (start-up and ramp included)
            row["server_cpu_pct"] = round(100.0 * cpu_s / (wall_ms / 1000.0), 1)
    return row


def read_rows(path, clk_tck):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                rows.append(build_row(line.split("\t"), clk_tck))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the matrix work folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True, help="project folder (for git)")
    ap.add_argument("--timestamp", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()

    cfg = read_kv(os.path.join(a.work, "config.txt"))
    env = read_kv(os.path.join(a.work, "env.txt"))
    clk_tck = to_int(env.get("clk_tck")) or 100
    try:
        rows = read_rows(os.path.join(a.work, "rows.tsv"), clk_tck)
    except OSError as e:
        print(f"matrix_report: {e}", file=sys.stderr)
        return 1

    refs = {r["job"]: r["iops"] for r in rows if r["target"] == REFERENCE and r["status"] == "ok"}
    for r in rows:
        ref = refs.get(r["job"])
        r["iops_vs_null_blk"] = round(r["iops"] / ref, 3) if r["iops"] is not None and ref else None

    # The checkout at the start of the run (config.txt); now, if that is missing.
    git_rev, dirty = guest_facts.git_state(a.root)
    git_rev = cfg.get("git_rev") or git_rev
    if "git_dirty" in cfg:
        dirty = cfg["git_dirty"] not in ("", "0")
    fio_version = env.get("fio_version") or next((r["fio_version"] for r in rows if r.get("fio_version")), None)
    for r in rows:
        r.pop("fio_version", None)
    split = lambda v: [x for x in (v or "").split(",") if x]  # noqa: E731
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "unsupported")}
    report = {
        "kind": "matrix",
        "schema": SCHEMA,
        "timestamp": a.timestamp,
        "kernel": env.get("kernel") or None,
        "kernel_version": env.get("kernel_version") or None,
        "git_rev": git_rev,
        "git_dirty": dirty,
        "binary": cfg.get("binary"),
        "binary_sha256": cfg.get("binary_sha256"),
        "binary_version": env.get("binary_version") or None,
        "scheduler": env.get("scheduler") or None,
        "emulation": emulation(env),
        "in_guest": env.get("in_guest") == "1",
        "cpu_model": env.get("cpu_model") or None,
        "vcpus": to_int(env.get("vcpus")),
        "mem_total_kb": to_int(env.get("mem_total_kb")),
        "fio_version": fio_version,
        "host": {"kernel": cfg.get("host_kernel"),
                 "cpus": to_int(cfg.get("host_cpus")),
                 "loadavg_start": cfg.get("host_loadavg_start") or None,
                 "loadavg_end": cfg.get("host_loadavg_end") or None,
                 "other_qemus": to_int(cfg.get("host_other_qemus"))},
        "null_blk": {k.split(".", 1)[1]: v for k, v in env.items() if k.startswith("null_blk.")},
        "config": {"jobs": split(cfg.get("jobs")), "targets": split(cfg.get("targets")),
                   "modes": split(cfg.get("modes")), "full": cfg.get("full") == "1",
                   "runtime_s": to_int(cfg.get("runtime_s")), "ramp_s": to_int(cfg.get("ramp_s")),
                   "fio_cpu": to_int(cfg.get("fio_cpu")), "ublk_queue_cpu": to_int(cfg.get("ublk_queue_cpu")),
                   "ublk_queues": to_int(cfg.get("ublk_queues")), "ublk_depth": to_int(cfg.get("ublk_depth")),
                   "ram_size": cfg.get("ram_size"), "nvme": cfg.get("nvme") or None,
                   "fio_cmd": "UBLK_DEV=DEV taskset -c FIO_CPU fio --output-format=json JOB.fio "
                              "(fio-jobs/JOB.fio with runtime= and ramp_time= rewritten)"},
        "rows": rows,
        "summary": {"rows": len(rows), **counts},
        "complete": counts["failed"] == 0 and bool(rows),
    }
    if a.note:
        report["note"] = a.note
    report_file.write(a.out, report)
    print_table(report, a.out)
    return 0


def print_table(report, out):
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    c = report["config"]
    h = report["host"]
    print(f"matrix: {report['kernel']}, {report['emulation']}, {report['vcpus']} vCPUs, git {report['git_rev']}"
          f"{'+dirty' if report['git_dirty'] else ''}, {report['fio_version']}, "
          f"{c['runtime_s']}s + {c['ramp_s']}s ramp per row; host load {h['loadavg_start']} -> {h['loadavg_end']}"
          f" on {h['cpus']} CPUs")
    print(f"{'job':<18} {'target':<16} {'mode':<8} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9} "
          f"{'p99.9 us':>9} {'fio u/s %':>10} {'srv %':>6} {'/null_blk':>9}")
    for r in report["rows"]:
        fio_cpu = ("-" if r.get("fio_usr_cpu_pct") is None
                   else f"{r['fio_usr_cpu_pct']:.0f}/{r['fio_sys_cpu_pct']:.0f}")
        line = (f"{r['job']:<18} {r['target']:<16} {r['mode']:<8} {f(r['iops'], '9.0f')} {f(r['mb_s'], '8.1f')} "
                f"{f(r['clat_p50_us'], '9.1f')} {f(r['clat_p99_us'], '9.1f')} {f(r['clat_p99_9_us'], '9.1f')} "
                f"{fio_cpu:>10} {f(r.get('server_cpu_pct'), '6.0f')} {f(r['iops_vs_null_blk'], '9.3f')}")
        if r["status"] != "ok":
            line = (f"{r['job']:<18} {r['target']:<16} {r['mode']:<8} {r['status'].upper()}: "
                    f"{r.get('error', '')[:110]}")
        print(line)
    s = report["summary"]
    print(f"{s['rows']} rows: {s['ok']} ok, {s['failed']} failed, {s['unsupported']} unsupported")
    print(f"result: {out}")


if __name__ == "__main__":
    sys.exit(main())
