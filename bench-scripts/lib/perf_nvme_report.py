#!/usr/bin/env python3
"""The perf-nvme report: results/perf-nvme-<UTC>.json and the table, from the
scratch folder the guest part of bench-scripts/perf-nvme leaves.

The work folder holds rows.tsv (NAME WORKLOAD DEVICE STATUS FIO_JSON DEV_JSON
ERROR ROUND, tab-separated, one fio run a line), r<ROUND>-<NAME>.sched (the I/O
scheduler), the fio JSON and `ublk-bench list --json` files the rows name, and
meta/ (one file per guest fact: kernel, vcpus, queue_cpu, fio_version,
cpu_model, hypervisor, in_guest, binary_version, features.json, nvme_*,
started, finished). The host's load comes in UBLK_BENCH_HOST_* variables.

Run on the host, not in the guest (python3 is slow under emulation). Standard
library only. Exit status: 0 written, 1 could not write, 2 bad arguments.
"""

import argparse
import json
import os
import statistics
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_summary  # noqa: E402
import guest_facts  # noqa: E402
import report_file  # noqa: E402

WORKLOADS = {"randread-4k": "rw=randread bs=4k norandommap randrepeat=0",
             "seqread-128k": "rw=read bs=128k"}
UBLK_KEYS = ("dev_id", "backend", "copy_mode", "queues", "depth", "cpus", "size", "block_size",
             "max_io_bytes", "flags")
HOST_KEYS = ("loadavg_start", "loadavg_end", "cpus", "other_qemus")


def fact(work, name):
    """One guest fact from work/meta, stripped; None when absent or empty."""
    try:
        with open(os.path.join(work, "meta", name), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def num(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def fio_figures(path):
    """Read-side figures of one fio JSON, or raises (OSError, FioOutputError)."""
    doc = fio_summary.load(path)
    s = fio_summary.summarize(doc)
    r = s.get("read") or {}
    bw = sum(j.get("read", {}).get("bw_bytes", 0) for j in doc.get("jobs", []))
    figures = dict(iops=r.get("iops"), mb_s=round(bw / 1e6, 2), mib_s=r.get("bw_mib_s"),
                   p50_us=r.get("p50_us"), p99_us=r.get("p99_us"), p99_9_us=r.get("p99_9_us"),
                   clat_mean_us=r.get("clat_mean_us"), ios=r.get("ios"),
                   fio_usr_cpu=s["usr_cpu"], fio_sys_cpu=s["sys_cpu"])
    error = None
    if s["error"] or not r.get("ios"):
        error = f"fio error {s['error']}, {r.get('ios', 0)} reads"
    return figures, error


def ublk_facts(path):
    """The device's shape from `ublk-bench list -n N --json`, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            dev = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(dev, list):
        dev = dev[0] if dev else {}
    return {k: dev.get(k) for k in UBLK_KEYS if k in dev}


def scheduler(work, rnd, name):
    try:
        with open(os.path.join(work, f"r{rnd}-{name}.sched"), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def parse_row(work, line):
    """One rows.tsv line as a report row (fio figures and device facts read in)."""
    name, workload, device, status, fio_json, dev_json, error, rnd = (line.split("\t") + [""] * 8)[:8]
    row = {"round": int(rnd) if rnd.isdigit() else 1, "name": name, "workload": workload,
           "device": device, "status": status,
           "iops": None, "mb_s": None, "mib_s": None, "p50_us": None, "p99_us": None}
    if error:
        row["error"] = error
    row["scheduler"] = scheduler(work, row["round"], name)
    if fio_json and status == "ok":
        try:
            figures, fio_error = fio_figures(fio_json)
            row.update(figures)
            if fio_error:
                row["status"], row["error"] = "failed", fio_error
        except (OSError, fio_summary.FioOutputError) as e:
            row["status"], row["error"] = "failed", str(e)
    if dev_json:
        ublk = ublk_facts(dev_json)
        if ublk is not None:
            row["ublk"] = ublk
    return row


def read_rows(work):
    try:
        with open(os.path.join(work, "rows.tsv"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    return [parse_row(work, line) for line in lines]


def get(rows, rnd, name, workload, key):
    """KEY of the ok row (RND, NAME, WORKLOAD), or None."""
    r = next((r for r in rows if r["round"] == rnd and r["name"] == name and r["workload"] == workload
              and r["status"] == "ok"), None)
    return r.get(key) if r else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def round_ratios(rows, rnd):
    """The ratios within one round: pairs measured minutes apart, not rounds apart."""
    def g(name, workload, key):
        return get(rows, rnd, name, workload, key)
    raw_runs = [v for v in (g("nvme-raw", "randread-4k", "iops"), g("nvme-raw-end", "randread-4k", "iops"))
                if v is not None]
    raw_4k = sum(raw_runs) / len(raw_runs) if raw_runs else None
    zero_4k, copy_4k = g("nvme-zero", "randread-4k", "iops"), g("nvme-copy", "randread-4k", "iops")
    null_4k = g("ublk-null", "randread-4k", "iops")
    zero_128k, copy_128k = g("nvme-zero", "seqread-128k", "mb_s"), g("nvme-copy", "seqread-128k", "mb_s")
    raw_128k = g("nvme-raw", "seqread-128k", "mb_s")
    return {
        "raw_nvme_4k_iops_reference": None if raw_4k is None else round(raw_4k, 1),
        "raw_nvme_4k_drift": ratio(g("nvme-raw-end", "randread-4k", "iops"), g("nvme-raw", "randread-4k", "iops")),
        "zero_vs_raw_4k_iops": ratio(zero_4k, raw_4k),
        "ublk_null_vs_raw_4k_iops": ratio(null_4k, raw_4k),
        "zero_vs_ublk_null_4k_iops": ratio(zero_4k, null_4k),
        "copy_vs_raw_4k_iops": ratio(copy_4k, raw_4k),
        "zero_vs_copy_4k_iops": ratio(zero_4k, copy_4k),
        "zero_vs_copy_128k_mb_s": ratio(zero_128k, copy_128k),
        "zero_vs_raw_128k_mb_s": ratio(zero_128k, raw_128k),
        "copy_vs_raw_128k_mb_s": ratio(copy_128k, raw_128k),
        "ram_user_vs_copy_4k_iops": ratio(g("ram-user", "randread-4k", "iops"), g("ram-copy", "randread-4k", "iops")),
        "ram_user_vs_copy_128k_mb_s": ratio(g("ram-user", "seqread-128k", "mb_s"),
                                            g("ram-copy", "seqread-128k", "mb_s")),
    }


def summarize(rows):
    """Per row name and workload: the median over rounds of each figure."""
    summary = []
    for name, workload in dict.fromkeys((r["name"], r["workload"]) for r in rows):
        runs = [r for r in rows if r["name"] == name and r["workload"] == workload and r["status"] == "ok"]
        summary.append({"name": name, "workload": workload, "runs_ok": len(runs),
                        **{k: median(r.get(k) for r in runs) for k in ("iops", "mb_s", "p50_us", "p99_us")}})
    return summary


def check(value, minimum):
    return {"value": value, "min": minimum, "pass": value is not None and value >= minimum}


def bar_of(ratios, zero_raw_min, zero_copy_min, ram_user_copy_min):
    bar = {
        "zero_vs_raw_4k_iops": check(ratios["zero_vs_raw_4k_iops"], zero_raw_min),
        "zero_vs_copy_128k_mb_s": check(ratios["zero_vs_copy_128k_mb_s"], zero_copy_min),
        "ram_user_vs_copy_4k_iops": check(ratios["ram_user_vs_copy_4k_iops"], ram_user_copy_min),
        "ram_user_vs_copy_128k_mb_s": check(ratios["ram_user_vs_copy_128k_mb_s"], ram_user_copy_min),
    }
    bar["pass"] = all(v["pass"] for v in bar.values())
    return bar


def host_facts(env):
    """The host's load, from the UBLK_BENCH_HOST_* variables host_main exports."""
    host = {k: env.get("UBLK_BENCH_HOST_" + k.upper()) or None for k in HOST_KEYS}
    for k in ("cpus", "other_qemus"):
        host[k] = num(host[k])
    return host


def nvme_facts(work):
    sectors = num(fact(work, "nvme_sectors"))
    return {"model": fact(work, "nvme_model"), "logical_block_size": num(fact(work, "nvme_logical_block_size")),
            "size_bytes": None if sectors is None else sectors * 512,
            "max_hw_sectors_kb": num(fact(work, "nvme_max_hw_sectors_kb")),
            "discard_max_bytes": num(fact(work, "nvme_discard_max_bytes")),
            "write_zeroes_max_bytes": num(fact(work, "nvme_write_zeroes_max_bytes")),
            "nr_requests": num(fact(work, "nvme_nr_requests"))}


def features_of(work):
    try:
        with open(os.path.join(work, "meta", "features.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_of(a, queue_cpu):
    return {"runtime_s": a.runtime, "ramp_s": a.ramp, "rounds": a.rounds, "iodepth": a.iodepth,
            "numjobs": 1, "ioengine": "io_uring", "direct": 1, "fio_cpu": a.fio_cpu, "ublk_queues": 1,
            "ublk_queue_cpu": queue_cpu, "nvme_prefill_and_read_span": a.fill, "ram_size": a.ram_size,
            "workloads": dict(WORKLOADS)}


def build(a, env, git=guest_facts.git_state):
    """The whole report (a dict) from the work folder and the run's arguments."""
    work = a.work
    rows = read_rows(work)
    per_round = [round_ratios(rows, r) for r in range(1, a.rounds + 1)]
    # The ratios: the median over rounds of each round's own ratio.
    ratios = {k: median(pr[k] for pr in per_round) for k in per_round[0]}
    model = fact(work, "cpu_model") or ""
    in_guest = fact(work, "in_guest") == "1"
    git_rev, dirty = git(a.root)
    report = {
        "kind": "perf-nvme", "timestamp": a.timestamp, "kernel": fact(work, "kernel"),
        "git_rev": git_rev, "git_dirty": dirty, "binary": a.binary,
        "binary_version": fact(work, "binary_version"),
        "emulation": guest_facts.emulation(model, fact(work, "hypervisor") == "1", in_guest),
        "in_guest": in_guest, "cpu_model": model, "vcpus": num(fact(work, "vcpus")),
        "fio_version": fact(work, "fio_version"), "host": host_facts(env), "nvme": nvme_facts(work),
        "ublk_features": features_of(work),
        "config": config_of(a, int(fact(work, "queue_cpu") or -1)),
        "rows": rows, "summary": summarize(rows), "ratios": ratios, "ratios_per_round": per_round,
        "bar": bar_of(ratios, a.zero_raw_min, a.zero_copy_min, a.ram_user_copy_min),
        "complete": bool(rows) and all(r["status"] == "ok" for r in rows),
    }
    if a.note:
        report["note"] = a.note
    return report


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(report, out):
    """The report as text, as printed after a run."""
    c, rounds = report["config"], report["config"]["rounds"]
    lines = [f"perf-nvme: {report['kernel']}, {report['emulation']}, {report['vcpus']} vCPUs, "
             f"git {report['git_rev']}, {report['fio_version']}, qd{c['iodepth']} {c['runtime_s']}s "
             f"(ramp {c['ramp_s']}s) x {rounds} round(s), fio on CPU {c['fio_cpu']}, "
             f"ublk queue on CPU {c['ublk_queue_cpu']}",
             f"{'round':<5} {'row':<14} {'workload':<13} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9}"]
    for r in report["rows"]:
        line = (f"{r['round']:<5} {r['name']:<14} {r['workload']:<13} {fmt(r['iops'], '9.0f')} "
                f"{fmt(r['mb_s'], '8.1f')} {fmt(r['p50_us'], '9.1f')} {fmt(r['p99_us'], '9.1f')}")
        if r["status"] != "ok":
            line += f"   FAILED: {r.get('error', '')}"
        lines.append(line)
    lines.append(("median over rounds of the per-round ratios" if rounds > 1 else "ratios") + ":")
    for k, v in report["ratios"].items():
        per = "" if rounds == 1 else \
            "  (" + ", ".join(fmt(pr[k], '.3f') for pr in report["ratios_per_round"]) + ")"
        lines.append(f"  {k:<28} {fmt(v, '.3f')}{per}")
    for k, v in report["bar"].items():
        if k != "pass":
            lines.append(f"bar {k:<28} {fmt(v['value'], '.3f')} >= {v['min']:.2f}  "
                         f"{'PASS' if v['pass'] else 'FAIL'}")
    h = report["host"]
    lines.append(f"host: load {h['loadavg_start']} at start, {h['loadavg_end']} at end, on {h['cpus']} CPUs, "
                 f"{h['other_qemus']} other QEMU guest(s) at start")
    lines.append(f"result: {out}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="perf_nvme_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the guest part's scratch folder")
    p.add_argument("--out", required=True, help="the report's path (results/perf-nvme-<UTC>.json)")
    p.add_argument("--root", required=True, help="the checkout (for git_rev)")
    p.add_argument("--timestamp", required=True)
    p.add_argument("--binary", required=True, help="the ublk-bench binary that was tested")
    p.add_argument("--runtime", type=int, required=True)
    p.add_argument("--ramp", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--fio-cpu", type=int, required=True)
    p.add_argument("--iodepth", type=int, required=True)
    p.add_argument("--fill", required=True, help="prefilled and read span of the namespace")
    p.add_argument("--ram-size", required=True)
    p.add_argument("--zero-raw-min", type=float, required=True)
    p.add_argument("--zero-copy-min", type=float, required=True)
    p.add_argument("--ram-user-copy-min", type=float, required=True)
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds wants a whole number >= 1")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    report = build(a, os.environ)
    try:
        report_file.write(a.out, report)
    except OSError as e:
        print(f"perf_nvme_report: cannot write {a.out}: {e}", file=sys.stderr)
        return 1
    print(table(report, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
