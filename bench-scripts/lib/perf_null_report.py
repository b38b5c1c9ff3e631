#!/usr/bin/env python3
"""Build the perf-null result (results/perf-null-<UTC>.json) from the runs
that bench-scripts/perf-null made, and print a short table. Standard library
only. Called by perf-null; not meant to be run by hand.

The rows file is tab-separated, one run per line:
    name  device  status(ok|failed)  fio_json_path  device_json_path  error
Exit status: 0 when the report was written (whatever the bar says), 1 if not.
"""

import argparse
import json
import os
import re
import sys

sys.dont_write_bytecode = True  # the project folder is shared with the guest; keep it clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_summary  # noqa: E402
import guest_facts  # noqa: E402
import report_file  # noqa: E402

REFERENCE = "null_blk"
# The core performance bar: ublk `null` IOPS as a fraction of null_blk's,
# same fio job, same pinning, same guest boot.
BAR = {"poll": ("ublk-null-poll", 0.40), "blocking": ("ublk-null-blocking", 0.30)}


def emulation():
    """(kind as guest_facts.emulation() names it, CPU model, run through bench-scripts/vm)."""
    in_guest = os.environ.get("UBLK_BENCH_IN_GUEST") == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    model = model.group(1).strip() if model else ""
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    hypervisor = bool(flags and "hypervisor" in flags.group(1).split())
    return guest_facts.emulation(model, hypervisor, in_guest), model, in_guest


def host_info():
    """The host's load when the guest was started (from perf-null's host side):
    other guests on a 2-core host make the figures noisy."""
    env = os.environ
    if "UBLK_BENCH_HOST_LOADAVG" not in env:
        return None
    qemus = env.get("UBLK_BENCH_HOST_QEMUS", "")
    cpus = env.get("UBLK_BENCH_HOST_CPUS", "")
    return {"loadavg": env.get("UBLK_BENCH_HOST_LOADAVG") or None,
            "cpus": int(cpus) if cpus.isdigit() else None,
            # qemu-system-x86 processes running when we started, ours not yet among them
            "other_qemus": int(qemus) if qemus.isdigit() else None}


def null_blk_params():
    d = "/sys/module/null_blk/parameters"
    out = {}
    for k in ("queue_mode", "irqmode", "submit_queues", "hw_queue_depth", "bs", "gb", "completion_nsec"):
        try:
            with open(os.path.join(d, k), encoding="utf-8") as f:
                out[k] = f.read().strip()
        except OSError:
            pass
    return out


def read_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            parts += [""] * (6 - len(parts))
            name, device, status, fio_json, dev_json, error = parts[:6]
            row = {"name": name, "device": device, "status": status,
                   "iops": None, "p50_us": None, "p99_us": None, "ratio_to_null_blk": None}
            if error:
                row["error"] = error
            try:
                with open(os.path.join(os.path.dirname(path), name + ".sched"), encoding="utf-8") as f:
                    row["scheduler"] = f.read().strip() or None
            except OSError:
                row["scheduler"] = None
            if fio_json and status == "ok":
                try:
                    s = fio_summary.summarize(fio_summary.load(fio_json))
                    r = s.get("read") or {}
                    row.update(iops=r.get("iops"), p50_us=r.get("p50_us"), p99_us=r.get("p99_us"),
                               p90_us=r.get("p90_us"), p99_9_us=r.get("p99_9_us"),
                               clat_mean_us=r.get("clat_mean_us"), bw_mib_s=r.get("bw_mib_s"),
                               fio_usr_cpu=s["usr_cpu"], fio_sys_cpu=s["sys_cpu"], fio_ctx=s["ctx"])
                    if s["error"] or not r.get("ios"):
                        row["status"] = "failed"
                        row["error"] = f"fio error {s['error']}, {r.get('ios', 0)} reads"
                except (OSError, fio_summary.FioOutputError) as e:
                    row["status"] = "failed"
                    row["error"] = str(e)
            if dev_json:
                try:
                    with open(dev_json, encoding="utf-8") as f:
                        dev = json.load(f)
                    if isinstance(dev, list):
                        dev = dev[0] if dev else {}
                    row["ublk"] = {k: dev.get(k) for k in
                                   ("dev_id", "queues", "depth", "poll", "cpus", "copy_mode", "flags", "backend")
                                   if k in dev}
                except (OSError, ValueError):
                    pass
            rows.append(row)
    return rows


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True, help="project folder (for git)")
    ap.add_argument("--timestamp", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--runtime", type=int, required=True)
    ap.add_argument("--ramp", type=int, required=True)
    ap.add_argument("--bs", required=True)
    ap.add_argument("--iodepth", type=int, required=True)
    ap.add_argument("--fio-cpu", required=True)
    ap.add_argument("--queue-cpu", required=True)
    ap.add_argument("--fio-args", required=True, help="the common fio arguments, as run")
    ap.add_argument("--note", default="")
    a = ap.parse_args()

    rows = read_rows(a.rows)
    ref = next((r for r in rows if r["name"] == REFERENCE and r["status"] == "ok"), None)
    for r in rows:
        r["ratio_to_null_blk"] = ratio(r["iops"], ref["iops"] if ref else None)

    bar = {}
    for key, (row_name, minimum) in BAR.items():
        row = next((r for r in rows if r["name"] == row_name), None)
        value = row["ratio_to_null_blk"] if row else None
        bar[f"{key}_ratio"] = value
        bar[f"{key}_min"] = minimum
        bar[f"{key}_pass"] = value is not None and value >= minimum
    bar["pass"] = all(bar[f"{k}_pass"] for k in BAR)

    kind, cpu_model, in_guest = emulation()
    git_rev, dirty = guest_facts.git_state(a.root)
    fio_version = guest_facts.cmd_out(["fio", "--version"]) or "unknown"
    try:
        vcpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        vcpus = os.cpu_count()
    report = {
        "kind": "perf-null",
        "timestamp": a.timestamp,
        "kernel": os.uname().release,
        "git_rev": git_rev,
        "git_dirty": dirty,
        "binary": a.binary,
        "binary_version": guest_facts.cmd_out([a.binary, "--version"]),
        "emulation": kind,
        "in_guest": in_guest,
        "cpu_model": cpu_model,
        "vcpus": vcpus,
        "fio_version": fio_version,
        "host": host_info(),
        "null_blk": null_blk_params(),
        "config": {"runtime_s": a.runtime, "ramp_s": a.ramp, "bs": a.bs, "iodepth": a.iodepth,
                   "numjobs": 1, "rw": "randread", "ioengine": "io_uring", "direct": 1,
                   "fio_cpu": a.fio_cpu, "ublk_queue_cpu": a.queue_cpu, "fio_args": a.fio_args},
        "rows": rows,
        "bar": bar,
        "complete": all(r["status"] == "ok" for r in rows),
    }
    if a.note:
        report["note"] = a.note
    report_file.write(a.out, report)

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"perf-null: {report['kernel']}, {kind}, {vcpus} vCPUs, git {git_rev}, "
          f"fio randread {a.bs} qd{a.iodepth} {a.runtime}s (ramp {a.ramp}s), "
          f"fio on CPU {a.fio_cpu}, ublk queue on CPU {a.queue_cpu}")
    print(f"{'row':<20} {'IOPS':>10} {'p50 us':>9} {'p99 us':>9} {'vs null_blk':>12}")
    for r in rows:
        line = (f"{r['name']:<20} {f(r['iops'], '10.0f')} {f(r['p50_us'], '9.1f')} "
                f"{f(r['p99_us'], '9.1f')} {f(r['ratio_to_null_blk'], '12.3f')}")
        if r["status"] != "ok":
            line += f"   FAILED: {r.get('error', '')}"
        print(line)
    for key in BAR:
        print(f"bar {key:<8}: {f(bar[key + '_ratio'], '.3f')} >= {bar[key + '_min']:.2f}  "
              f"{'PASS' if bar[key + '_pass'] else 'FAIL'}")
    h = report["host"]
    if h:
        print(f"host at start: load {h['loadavg']} on {h['cpus']} CPUs, {h['other_qemus']} other QEMU guest(s)")
    print(f"result: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
