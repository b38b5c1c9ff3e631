#!/usr/bin/env python3
"""Build a results/<kind>-<UTC>.json report from the runs a bench script made,
and print its table. One module for the three presets of lib/bench.sh:

    bench_report.py perf-null --rows ROWS.tsv --out OUT --root DIR --timestamp TS ...
    bench_report.py perf-nvme --work DIR --out OUT --root DIR --timestamp TS ...
    bench_report.py matrix    --work DIR --out OUT --root DIR --timestamp TS [--note TEXT]

(`bench_report.py KIND --help` lists each kind's options.) Called by
bench-scripts/perf-null, perf-nvme and matrix; not meant to be run by hand, but
harmless to re-run on a kept work folder. Standard library only.

Written once here: reading fio JSON (lib/fio_summary.py), a ublk device's
facts from `ublk-bench list --json`, the guest facts (lib/guest_facts.py), the
top-level fields every report starts with, the optional note, and writing the
file whole (lib/report_file.py). Per kind: where the rows and the guest facts
come from, the row fields, the figures derived from the rows, and the table.

perf-null  ROWS.tsv, one row a line, tab-separated:
               round name device status(ok|failed) qd32_fio_json qd1_fio_json
               device_json server_cpu_ticks ios io_uring_enters error [repeat]
           (ROUND-NAME.sched beside it holds the I/O scheduler, rREPEAT-ROUND-NAME.sched
           for a numbered repeat); run in the guest, so the guest facts are read
           from this machine. Repeats of one round and row become one row of
           medians, each repeat's figures under "runs".
perf-nvme  DIR/rows.tsv: name workload device status fio_json dev_json error round;
           DIR/r<ROUND>-<NAME>.sched; DIR/meta/ one file per guest fact.
matrix     DIR/rows.tsv: job target mode status device fio_json add_json
           server_cpu_ticks wall_ms error; DIR/config.txt and DIR/env.txt (KEY=VALUE).
The host's load comes in UBLK_BENCH_HOST_* variables (perf-null, perf-nvme) or
config.txt (matrix).

Exit status: 0 the report was written (whatever its rows or bar say);
1 it could not be (rows unreadable, file not writable); 2 bad arguments.
"""

import argparse
import json
import os
import re
import statistics
import sys
from types import SimpleNamespace

sys.dont_write_bytecode = True  # the project folder is shared with the guest; keep it clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_summary  # noqa: E402
import guest_facts  # noqa: E402
import report_file  # noqa: E402

REFERENCE = "null_blk"
# The fields every report starts with, in this order; a kind leaves out those
# it does not record (only matrix has schema, kernel_version, binary_sha256,
# scheduler and mem_total_kb). Its own sections follow, then complete, then note.
HEAD_KEYS = ("kind", "schema", "timestamp", "kernel", "kernel_version", "git_rev", "git_dirty", "binary",
             "binary_sha256", "binary_version", "scheduler", "emulation", "in_guest", "cpu_model", "vcpus",
             "mem_total_kb", "fio_version", "host")


# ---------------------------------------------------------------- shared parts

def text_of(path):
    """A small file's stripped text; None when it is missing or empty."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def num(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def read_lines(path):
    """The lines of a rows file, or raises OSError."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def fio_run(path):
    """(fio's document, its fio_summary.summarize()); raises OSError or FioOutputError."""
    doc = fio_summary.load(path)
    return doc, fio_summary.summarize(doc)


def fio_failure(summary, ios, unit):
    """Why a fio run that exited 0 still does not count, or None."""
    if summary["error"] or not ios:
        return f"fio error {summary['error']}, {ios} {unit}"
    return None


def ublk_facts(path, keys):
    """KEYS of the device in `ublk-bench list --json` / `add --json` output;
    None when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            dev = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(dev, list):
        dev = dev[0] if dev else {}
    return {k: dev[k] for k in keys if k in dev} if isinstance(dev, dict) else {}


def assemble(head, body, complete, note):
    """The report: the common head fields in HEAD_KEYS order, the kind's own
    sections, then complete (every row ok) and the note if one was given."""
    report = {k: head[k] for k in HEAD_KEYS if k in head}
    report.update(body)
    report["complete"] = complete
    if note:
        report["note"] = note
    return report


def write_and_print(report, out, table, prog="bench_report"):
    """Writes the report whole, then prints its table. Exit status."""
    try:
        report_file.write(out, report)
    except OSError as e:
        print(f"{prog}: cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(table(report, out))
    return 0


def common_args(p):
    p.add_argument("--out", required=True, help="the report's path (results/KIND-<UTC>.json)")
    p.add_argument("--root", required=True, help="the checkout (for git_rev)")
    p.add_argument("--timestamp", required=True)
    p.add_argument("--note", default="", help='free text stored as "note"')


# ------------------------------------------------------------------- perf-null

PEERS = ("kublk", "rublk")
NULL_BAR = {"poll": ("ublk-null-poll", 0.40), "blocking": ("ublk-null-blocking", 0.30)}
NULL_UBLK_KEYS = ("dev_id", "queues", "depth", "poll", "cpus", "copy_mode", "flags", "backend")
NULL_BLK_PARAMS = ("queue_mode", "irqmode", "submit_queues", "hw_queue_depth", "bs", "gb", "completion_nsec")


def null_local_facts():
    """perf-null's report is built in the guest: the facts of this machine."""
    in_guest = os.environ.get("UBLK_BENCH_IN_GUEST") == "1"
    cpuinfo = text_of("/proc/cpuinfo") or ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    model = model.group(1).strip() if model else ""
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    hypervisor = bool(flags and "hypervisor" in flags.group(1).split())
    try:
        vcpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        vcpus = os.cpu_count()
    return {"kernel": os.uname().release, "emulation": guest_facts.emulation(model, hypervisor, in_guest),
            "in_guest": in_guest, "cpu_model": model, "vcpus": vcpus,
            "fio_version": guest_facts.cmd_out(["fio", "--version"]) or "unknown"}


def null_host(env):
    """The host's load when the guest was started: other guests on a 2-core
    host make the figures noisy."""
    if "UBLK_BENCH_HOST_LOADAVG" not in env:
        return None
    qemus, cpus = env.get("UBLK_BENCH_HOST_QEMUS", ""), env.get("UBLK_BENCH_HOST_CPUS", "")
    return {"loadavg": env.get("UBLK_BENCH_HOST_LOADAVG") or None,
            "cpus": int(cpus) if cpus.isdigit() else None,
            # qemu-system-x86 processes running when we started, ours not yet among them
            "other_qemus": int(qemus) if qemus.isdigit() else None}


def null_blk_params():
    d = "/sys/module/null_blk/parameters"
    out = {}
    for k in NULL_BLK_PARAMS:
        try:
            with open(os.path.join(d, k), encoding="utf-8") as f:
                out[k] = f.read().strip()
        except OSError:
            pass
    return out


NULL_ROW_FIELDS = ("round", "name", "device", "status", "fio_json", "qd1_json", "dev_json", "cpu_ticks", "ios",
                   "enters", "error", "repeat")
# The figures a row of several repeats gives as the median of its repeats
# (the rest, device and facts, are the first repeat's).
NULL_MEDIAN_KEYS = ("iops", "p50_us", "p99_us", "p90_us", "p99_9_us", "clat_mean_us", "bw_mib_s", "fio_usr_cpu",
                    "fio_sys_cpu", "fio_ctx", "qd1_mean_us", "qd1_p50_us", "qd1_p99_us", "window_ios",
                    "server_cpu_us_per_io", "enters_per_io")
# Each repeat's own figures, kept under "runs" to show the spread.
NULL_RUN_KEYS = ("iops", "qd1_mean_us", "server_cpu_us_per_io", "enters_per_io")


def null_row(folder, line, clk_tck):
    """One rows.tsv line as a report row: the QD32 figures, the QD1 latency,
    the server's CPU time and io_uring_enter calls per I/O, the device facts."""
    f = dict(zip(NULL_ROW_FIELDS, (line.split("\t") + [""] * len(NULL_ROW_FIELDS))[:len(NULL_ROW_FIELDS)]))
    row = {"round": f["round"] or "tuned", "name": f["name"], "device": f["device"], "status": f["status"],
           "iops": None, "p50_us": None, "p99_us": None, "ratio_to_null_blk": None}
    if f["error"]:
        row["error"] = f["error"]
    if f["repeat"]:
        row["repeat"] = int(f["repeat"])
    prefix = f"r{f['repeat']}-" if f["repeat"] else ""
    row["scheduler"] = text_of(os.path.join(folder, f"{prefix}{row['round']}-{row['name']}.sched"))
    row = finish_row(row, f["fio_json"], null_fio_figures, f["dev_json"], NULL_UBLK_KEYS)
    row.update(qd1_figures(f["qd1_json"] if row["status"] == "ok" else ""))
    row.update(per_io(num(f["cpu_ticks"]), num(f["ios"]), num(f["enters"]), clk_tck))
    return row


def qd1_figures(path):
    """QD1 latency (mean, p50, p99) of one fio JSON; None figures without one."""
    keys = ("qd1_mean_us", "qd1_p50_us", "qd1_p99_us")
    if not path:
        return dict.fromkeys(keys)
    try:
        r = fio_run(path)[1].get("read") or {}
    except (OSError, fio_summary.FioOutputError):
        return dict.fromkeys(keys)
    return dict(zip(keys, (r.get("clat_mean_us"), r.get("p50_us"), r.get("p99_us"))))


def per_io(ticks, ios, enters, clk_tck):
    """Server CPU microseconds and io_uring_enter calls per I/O over the QD32
    run; None where a figure is missing (null_blk has no server, other
    servers no enter count)."""
    cpu = round(ticks / clk_tck * 1e6 / ios, 2) if ticks is not None and ios and clk_tck else None
    calls = round(enters / ios, 3) if enters is not None and ios else None
    return {"window_ios": ios, "server_cpu_us_per_io": cpu, "enters_per_io": calls}


def null_fio_figures(path):
    """perf-null's read-side figures of one fio JSON and why it failed (or
    None); raises OSError or FioOutputError."""
    _, s = fio_run(path)
    r = s.get("read") or {}
    figures = dict(iops=r.get("iops"), p50_us=r.get("p50_us"), p99_us=r.get("p99_us"),
                   p90_us=r.get("p90_us"), p99_9_us=r.get("p99_9_us"),
                   clat_mean_us=r.get("clat_mean_us"), bw_mib_s=r.get("bw_mib_s"),
                   fio_usr_cpu=s["usr_cpu"], fio_sys_cpu=s["sys_cpu"], fio_ctx=s["ctx"])
    return figures, fio_failure(s, r.get("ios", 0), "reads")


def finish_row(row, fio_json, figures_of, dev_json, ublk_keys):
    """Adds a row's fio figures (`figures_of(path)`), or why it failed, and
    the facts of its ublk device."""
    if fio_json and row["status"] == "ok":
        try:
            figures, failure = figures_of(fio_json)
            row.update(figures)
            if failure:
                row["status"], row["error"] = "failed", failure
        except (OSError, fio_summary.FioOutputError) as e:
            row["status"], row["error"] = "failed", str(e)
    if dev_json:
        ublk = ublk_facts(dev_json, ublk_keys)
        if ublk is not None:
            row["ublk"] = ublk
    return row


def merge_repeats(rows):
    """One row per round and name. Several repeats give the median of each
    figure (NULL_MEDIAN_KEYS) over the repeats, every repeat's own figures
    under "runs", and the IOPS spread ((max - min) / median). A row with a
    failed repeat is failed, with that repeat's error."""
    groups = {}
    for r in rows:
        groups.setdefault((r["round"], r["name"]), []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append({k: v for k, v in runs[0].items() if k != "repeat"})
            continue
        row = {k: v for k, v in runs[0].items() if k not in ("repeat", "error")}
        for k in NULL_MEDIAN_KEYS:
            row[k] = median([r.get(k) for r in runs])
        failed = next((r for r in runs if r["status"] != "ok"), None)
        if failed:
            row["status"] = "failed"
            row["error"] = f"repeat {failed.get('repeat', '?')}: {failed.get('error', '')}"
        iops = [r["iops"] for r in runs if r.get("iops") is not None]
        row["iops_spread"] = round((max(iops) - min(iops)) / row["iops"], 3) if iops and row["iops"] else None
        row["runs"] = [{"repeat": r.get("repeat"), **{k: r.get(k) for k in NULL_RUN_KEYS}} for r in runs]
        out.append(row)
    return out


def null_bar(rows):
    bar = {}
    for key, (row_name, minimum) in NULL_BAR.items():
        row = next((r for r in rows if r["name"] == row_name and r["round"] == "tuned"), None)
        value = row["ratio_to_null_blk"] if row else None
        bar[f"{key}_ratio"] = value
        bar[f"{key}_min"] = minimum
        bar[f"{key}_pass"] = value is not None and value >= minimum
    bar["pass"] = all(bar[f"{k}_pass"] for k in NULL_BAR)
    return bar


def round_targets(rows, rnd):
    """One round's figures for the fast-path targets: IOPS over the better
    peer's (blocking >= 1.2, poll >= 2.0), --poll QD1 mean over null_blk's
    (<= 2.0), --batch over per-request blocking (IOPS >= 1.15 or enters per
    I/O <= 0.5). None where a row is missing or failed."""
    ok = {r["name"]: r for r in rows if r["round"] == rnd and r["status"] == "ok"}
    peers = [ok[p]["iops"] for p in PEERS if p in ok and ok[p]["iops"]]
    best = max(peers) if peers else None

    def get(name, key):
        return ok[name].get(key) if name in ok else None

    return {"blocking_vs_best_peer": ratio(get("ublk-null-blocking", "iops"), best),
            "poll_vs_best_peer": ratio(get("ublk-null-poll", "iops"), best),
            "poll_qd1_vs_null_blk": ratio(get("ublk-null-poll", "qd1_mean_us"), get(REFERENCE, "qd1_mean_us")),
            "batch_vs_blocking": ratio(get("ublk-null-batch", "iops"), get("ublk-null-blocking", "iops")),
            "batch_enters_vs_blocking": ratio(get("ublk-null-batch", "enters_per_io"),
                                              get("ublk-null-blocking", "enters_per_io"))}


def default_vs_tuned(rows):
    """Per row name measured in both rounds: default IOPS / tuned IOPS (the
    target is >= 0.9: fast as it comes)."""
    iops = {(r["round"], r["name"]): r["iops"] for r in rows if r["status"] == "ok"}
    names = dict.fromkeys(r["name"] for r in rows)
    return {n: ratio(iops.get(("default", n)), iops.get(("tuned", n))) for n in names
            if ("default", n) in iops and ("tuned", n) in iops}


def null_build(a, env):
    folder = os.path.dirname(a.rows)
    rows = merge_repeats([null_row(folder, line, a.clk_tck) for line in read_lines(a.rows)])
    for rnd in dict.fromkeys(r["round"] for r in rows):
        ref = next((r for r in rows if r["name"] == REFERENCE and r["round"] == rnd and r["status"] == "ok"), None)
        for r in rows:
            if r["round"] == rnd:
                r["ratio_to_null_blk"] = ratio(r["iops"], ref["iops"] if ref else None)
    git_rev, dirty = guest_facts.git_state(a.root)
    head = {"kind": "perf-null", "timestamp": a.timestamp, "git_rev": git_rev, "git_dirty": dirty,
            "binary": a.binary, "binary_version": guest_facts.cmd_out([a.binary, "--version"]),
            **null_local_facts(), "host": null_host(env)}
    body = {"null_blk": null_blk_params(),
            "config": {"runtime_s": a.runtime, "qd1_runtime_s": a.qd1_runtime, "ramp_s": a.ramp, "bs": a.bs,
                       "iodepth": a.iodepth, "burst": a.burst, "numjobs": 1, "rw": "randread", "ioengine": "io_uring",
                       "direct": 1, "rounds": a.rounds, "repeat": a.repeat, "fio_cpu": a.fio_cpu, "ublk_queue_cpu": a.queue_cpu,
                       "fio_args": a.fio_args},
            "rows": rows, "bar": null_bar(rows), "default_vs_tuned": default_vs_tuned(rows),
            "targets": {rnd: round_targets(rows, rnd) for rnd in dict.fromkeys(r["round"] for r in rows)}}
    return assemble(head, body, all(r["status"] == "ok" for r in rows), a.note)


def cell(v, width, prec):
    """A table cell: the number right-aligned, or "-" in its place."""
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{prec}f}"


def null_table(report, out):
    c, bar = report["config"], report["bar"]
    lines = [f"perf-null: {report['kernel']}, {report['emulation']}, {report['vcpus']} vCPUs, "
             f"git {report['git_rev']}, fio randread {c['bs']} qd{c['iodepth']} {c['runtime_s']}s and qd1 "
             f"{c['qd1_runtime_s']}s (ramp {c['ramp_s']}s); tuned: fio on CPU {c['fio_cpu']}, server on CPU "
             f"{c['ublk_queue_cpu']}; default: no pinning; burst: tuned, qd32 fio in bursts of "
             f"{c.get('burst', '-')}"
             + (f"; each row the median of {c['repeat']} repeats (spread: IOPS (max - min) / median)"
                if c.get("repeat", 1) > 1 else ""),
             f"{'round':<8} {'row':<25} {'IOPS':>8} {'mean':>7} {'p50':>7} {'p99':>7} {'qd1 mean':>8} "
             f"{'p50':>7} {'p99':>7} {'cpu/io':>7} {'ent/io':>6} {'vs null':>7} {'sched':<11}"]
    for r in report["rows"]:
        line = (f"{r['round']:<8} {r['name']:<25} {cell(r['iops'], 8, 0)} {cell(r.get('clat_mean_us'), 7, 1)} "
                f"{cell(r['p50_us'], 7, 1)} {cell(r['p99_us'], 7, 1)} {cell(r.get('qd1_mean_us'), 8, 1)} "
                f"{cell(r.get('qd1_p50_us'), 7, 1)} {cell(r.get('qd1_p99_us'), 7, 1)} "
                f"{cell(r.get('server_cpu_us_per_io'), 7, 2)} {cell(r.get('enters_per_io'), 6, 2)} "
                f"{cell(r['ratio_to_null_blk'], 7, 3)} {r.get('scheduler') or '-':<11}")
        if "iops_spread" in r:
            line += f" spread {fmt(r['iops_spread'], '.2f')}"
        if r["status"] != "ok":
            line += f"   FAILED: {r.get('error', '')}"
        lines.append(line)
    lines.append("latency in us (QD32 mean/p50/p99, then QD1); cpu/io: server CPU us per I/O; "
                 "ent/io: io_uring_enter calls per I/O")
    for name, v in report.get("default_vs_tuned", {}).items():
        lines.append(f"default/tuned {name:<25} {fmt(v, '.3f')}  {'ok' if v is not None and v >= 0.9 else 'below 0.9'}")
    for rnd, t in report.get("targets", {}).items():
        lines.append(f"{rnd}: blocking/best peer {fmt(t['blocking_vs_best_peer'], '.2f')} (>= 1.2), "
                     f"poll/best peer {fmt(t['poll_vs_best_peer'], '.2f')} (>= 2.0), "
                     f"poll qd1/null_blk {fmt(t['poll_qd1_vs_null_blk'], '.2f')} (<= 2.0), "
                     f"batch/blocking {fmt(t['batch_vs_blocking'], '.2f')} (>= 1.15) "
                     f"enters {fmt(t['batch_enters_vs_blocking'], '.2f')} (<= 0.5)")
    for key in NULL_BAR:
        lines.append(f"bar {key:<8}: {fmt(bar[key + '_ratio'], '.3f')} >= {bar[key + '_min']:.2f}  "
                     f"{'PASS' if bar[key + '_pass'] else 'FAIL'}")
    h = report["host"]
    if h:
        lines.append(f"host at start: load {h['loadavg']} on {h['cpus']} CPUs, "
                     f"{h['other_qemus']} other QEMU guest(s)")
    lines.append(f"result: {out}")
    return "\n".join(lines)


def null_args(p):
    p.add_argument("--rows", required=True, help="the rows file (NAME.sched files beside it)")
    p.add_argument("--binary", required=True)
    p.add_argument("--runtime", type=int, required=True)
    p.add_argument("--ramp", type=int, required=True)
    p.add_argument("--bs", required=True)
    p.add_argument("--iodepth", type=int, required=True)
    p.add_argument("--qd1-runtime", type=int, required=True)
    p.add_argument("--clk-tck", type=int, required=True, help="clock ticks per second (getconf CLK_TCK)")
    p.add_argument("--rounds", default="tuned", help="the rounds run (tuned,default,burst)")
    p.add_argument("--fio-cpu", required=True)
    p.add_argument("--queue-cpu", required=True)
    p.add_argument("--fio-args", required=True, help="the common fio arguments, as run")
    p.add_argument("--burst", type=int, default=16, help="the burst round's I/Os per fio reap and submit")
    p.add_argument("--repeat", type=int, default=1, help="how many times each round ran (rows give medians)")


# ------------------------------------------------------------------- perf-nvme

WORKLOADS = {"randread-4k": "rw=randread bs=4k norandommap randrepeat=0",
             "seqread-128k": "rw=read bs=128k"}
NVME_UBLK_KEYS = ("dev_id", "backend", "copy_mode", "queues", "depth", "cpus", "size", "block_size",
                  "max_io_bytes", "flags")
NVME_HOST_KEYS = ("loadavg_start", "loadavg_end", "cpus", "other_qemus")


def fact(work, name):
    """One guest fact from work/meta, stripped; None when absent or empty."""
    return text_of(os.path.join(work, "meta", name))


def nvme_fio_figures(path):
    """Read-side figures of one fio JSON and why it failed (or None);
    raises OSError or FioOutputError."""
    _, s = fio_run(path)
    r = s.get("read") or {}
    figures = dict(iops=r.get("iops"), mb_s=r.get("bw_mb_s", 0.0), mib_s=r.get("bw_mib_s"),
                   p50_us=r.get("p50_us"), p99_us=r.get("p99_us"), p99_9_us=r.get("p99_9_us"),
                   clat_mean_us=r.get("clat_mean_us"), ios=r.get("ios"),
                   fio_usr_cpu=s["usr_cpu"], fio_sys_cpu=s["sys_cpu"])
    return figures, fio_failure(s, r.get("ios", 0), "reads")


def nvme_row(work, line):
    """One rows.tsv line as a report row (fio figures and device facts read in)."""
    name, workload, device, status, fio_json, dev_json, error, rnd = (line.split("\t") + [""] * 8)[:8]
    row = {"round": int(rnd) if rnd.isdigit() else 1, "name": name, "workload": workload,
           "device": device, "status": status,
           "iops": None, "mb_s": None, "mib_s": None, "p50_us": None, "p99_us": None}
    if error:
        row["error"] = error
    row["scheduler"] = text_of(os.path.join(work, f"r{row['round']}-{name}.sched"))
    return finish_row(row, fio_json, nvme_fio_figures, dev_json, NVME_UBLK_KEYS)


def nvme_rows(work):
    """The rows; none when the guest left no rows.tsv (the report says incomplete)."""
    try:
        lines = read_lines(os.path.join(work, "rows.tsv"))
    except OSError:
        lines = []
    return [nvme_row(work, line) for line in lines]


def get(rows, rnd, name, workload, key):
    """KEY of the ok row (RND, NAME, WORKLOAD), or None."""
    r = next((r for r in rows if r["round"] == rnd and r["name"] == name and r["workload"] == workload
              and r["status"] == "ok"), None)
    return r.get(key) if r else None


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


def nvme_summary(rows):
    """Per row name and workload: the median over rounds of each figure."""
    summary = []
    for name, workload in dict.fromkeys((r["name"], r["workload"]) for r in rows):
        runs = [r for r in rows if r["name"] == name and r["workload"] == workload and r["status"] == "ok"]
        summary.append({"name": name, "workload": workload, "runs_ok": len(runs),
                        **{k: median(r.get(k) for r in runs) for k in ("iops", "mb_s", "p50_us", "p99_us")}})
    return summary


def check(value, minimum):
    return {"value": value, "min": minimum, "pass": value is not None and value >= minimum}


def nvme_bar(ratios, zero_raw_min, zero_copy_min, ram_user_copy_min):
    bar = {
        "zero_vs_raw_4k_iops": check(ratios["zero_vs_raw_4k_iops"], zero_raw_min),
        "zero_vs_copy_128k_mb_s": check(ratios["zero_vs_copy_128k_mb_s"], zero_copy_min),
        "ram_user_vs_copy_4k_iops": check(ratios["ram_user_vs_copy_4k_iops"], ram_user_copy_min),
        "ram_user_vs_copy_128k_mb_s": check(ratios["ram_user_vs_copy_128k_mb_s"], ram_user_copy_min),
    }
    bar["pass"] = all(v["pass"] for v in bar.values())
    return bar


def nvme_host(env):
    """The host's load, from the UBLK_BENCH_HOST_* variables host_main exports."""
    host = {k: env.get("UBLK_BENCH_HOST_" + k.upper()) or None for k in NVME_HOST_KEYS}
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


def nvme_config(a, queue_cpu):
    return {"runtime_s": a.runtime, "ramp_s": a.ramp, "rounds": a.rounds, "iodepth": a.iodepth,
            "numjobs": 1, "ioengine": "io_uring", "direct": 1, "fio_cpu": a.fio_cpu, "ublk_queues": 1,
            "ublk_queue_cpu": queue_cpu, "nvme_prefill_and_read_span": a.fill, "ram_size": a.ram_size,
            "workloads": dict(WORKLOADS)}


def nvme_build(a, env, git=guest_facts.git_state):
    """The whole report (a dict) from the work folder and the run's arguments."""
    work = a.work
    rows = nvme_rows(work)
    per_round = [round_ratios(rows, r) for r in range(1, a.rounds + 1)]
    # The ratios: the median over rounds of each round's own ratio.
    ratios = {k: median(pr[k] for pr in per_round) for k in per_round[0]}
    model = fact(work, "cpu_model") or ""
    in_guest = fact(work, "in_guest") == "1"
    git_rev, dirty = git(a.root)
    head = {"kind": "perf-nvme", "timestamp": a.timestamp, "kernel": fact(work, "kernel"),
            "git_rev": git_rev, "git_dirty": dirty, "binary": a.binary,
            "binary_version": fact(work, "binary_version"),
            "emulation": guest_facts.emulation(model, fact(work, "hypervisor") == "1", in_guest),
            "in_guest": in_guest, "cpu_model": model, "vcpus": num(fact(work, "vcpus")),
            "fio_version": fact(work, "fio_version"), "host": nvme_host(env)}
    body = {"nvme": nvme_facts(work), "ublk_features": features_of(work),
            "config": nvme_config(a, int(fact(work, "queue_cpu") or -1)),
            "rows": rows, "summary": nvme_summary(rows), "ratios": ratios, "ratios_per_round": per_round,
            "bar": nvme_bar(ratios, a.zero_raw_min, a.zero_copy_min, a.ram_user_copy_min)}
    return assemble(head, body, bool(rows) and all(r["status"] == "ok" for r in rows), a.note)


def nvme_table(report, out):
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


def nvme_args(p):
    p.add_argument("--work", required=True, help="the guest part's scratch folder")
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


def nvme_check(p, a):
    if a.rounds < 1:
        p.error("--rounds wants a whole number >= 1")


# ---------------------------------------------------------------------- matrix

SCHEMA = 1
MATRIX_ROW_FIELDS = ("job", "target", "mode", "status", "device", "fio_json", "add_json",
                     "server_cpu_ticks", "wall_ms", "error")
MATRIX_UBLK_KEYS = ("dev_id", "queues", "depth", "poll", "cpus", "copy_mode", "flags", "backend", "size",
                    "block_size", "max_io_bytes")
FIO_CMD = ("UBLK_DEV=DEV taskset -c FIO_CPU fio --output-format=json JOB.fio "
           "(fio-jobs/JOB.fio with runtime= and ramp_time= rewritten)")


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


def requested_copy_mode(target):
    if not target.startswith("ublk-"):
        return None
    parts = target.split("-")
    return parts[2] if len(parts) > 2 else "auto"


def matrix_fio_figures(row, fio_json):
    """Adds a finished run's fio figures to ROW; returns (main direction, fio
    document), or (None, None) when the fio output could not be read."""
    try:
        doc, s = fio_run(fio_json)
    except (OSError, fio_summary.FioOutputError) as e:
        row["status"], row["error"] = "failed", str(e)
        return None, None
    dirs = {d: s[d] for d in fio_summary.DIRECTIONS if d in s}
    ios = sum(d["ios"] for d in dirs.values())
    failure = fio_failure(s, ios, "I/Os")
    if failure:
        row["status"], row["error"] = "failed", failure
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
    return main, doc


def matrix_row(parts, clk_tck):
    r = dict(zip(MATRIX_ROW_FIELDS, parts + [""] * (len(MATRIX_ROW_FIELDS) - len(parts))))
    row = {"job": r["job"], "target": r["target"], "mode": r["mode"], "status": r["status"] or "failed",
           "device": r["device"] or None,
           "backend": r["target"].split("-")[1] if r["target"].startswith("ublk-") else None,
           "copy_mode_requested": requested_copy_mode(r["target"]),
           "iops": None, "mb_s": None, "clat_p50_us": None, "clat_p99_us": None, "clat_p99_9_us": None}
    if r["error"]:
        row["error"] = r["error"]
    ublk = ublk_facts(r["add_json"], MATRIX_UBLK_KEYS) if r["add_json"] else None
    if ublk:
        row["ublk"] = ublk
        row["copy_mode"] = ublk.get("copy_mode")
    wall_ms = num(r["wall_ms"])
    if wall_ms is not None:
        row["wall_s"] = round(wall_ms / 1000.0, 2)
    if row["status"] != "ok":
        return row
    main, doc = matrix_fio_figures(row, r["fio_json"])
    if doc is None:
        return row
    # Total latency (submission + completion): fio reports only its mean unless
    # lat_percentiles=1. null_blk with irqmode=0 completes inside the submit
    # call, so its clat is near zero and its cost shows in lat (and IOPS).
    lat = [j[main].get("lat_ns", {}).get("mean") for j in doc.get("jobs", []) if main and main in j]
    if lat and lat[0] is not None:
        row["lat_mean_us"] = round(lat[0] / 1000.0, 2)
    ticks = num(r["server_cpu_ticks"])
    if ticks is not None and clk_tck:
        cpu_s = ticks / clk_tck
        row["server_cpu_s"] = round(cpu_s, 2)
        if wall_ms:
            # of one CPU, over the whole fio run (start-up and ramp included)
            row["server_cpu_pct"] = round(100.0 * cpu_s / (wall_ms / 1000.0), 1)
    return row


def matrix_config(cfg):
    def split(v):
        return [x for x in (v or "").split(",") if x]
    return {"jobs": split(cfg.get("jobs")), "targets": split(cfg.get("targets")),
            "modes": split(cfg.get("modes")), "full": cfg.get("full") == "1",
            "runtime_s": num(cfg.get("runtime_s")), "ramp_s": num(cfg.get("ramp_s")),
            "fio_cpu": num(cfg.get("fio_cpu")), "ublk_queue_cpu": num(cfg.get("ublk_queue_cpu")),
            "ublk_queues": num(cfg.get("ublk_queues")), "ublk_depth": num(cfg.get("ublk_depth")),
            "ram_size": cfg.get("ram_size"), "nvme": cfg.get("nvme") or None, "fio_cmd": FIO_CMD}


def matrix_head(a, cfg, env, rows):
    # The checkout at the start of the run (config.txt); now, if that is missing.
    git_rev, dirty = guest_facts.git_state(a.root)
    git_rev = cfg.get("git_rev") or git_rev
    if "git_dirty" in cfg:
        dirty = cfg["git_dirty"] not in ("", "0")
    in_guest = env.get("in_guest") == "1"
    return {"kind": "matrix", "schema": SCHEMA, "timestamp": a.timestamp,
            "kernel": env.get("kernel") or None, "kernel_version": env.get("kernel_version") or None,
            "git_rev": git_rev, "git_dirty": dirty, "binary": cfg.get("binary"),
            "binary_sha256": cfg.get("binary_sha256"), "binary_version": env.get("binary_version") or None,
            "scheduler": env.get("scheduler") or None,
            "emulation": guest_facts.emulation(env.get("cpu_model", ""), env.get("hypervisor") == "1", in_guest),
            "in_guest": in_guest, "cpu_model": env.get("cpu_model") or None,
            "vcpus": num(env.get("vcpus")), "mem_total_kb": num(env.get("mem_total_kb")),
            "fio_version": env.get("fio_version") or next((r["fio_version"] for r in rows
                                                           if r.get("fio_version")), None),
            "host": {"kernel": cfg.get("host_kernel"), "cpus": num(cfg.get("host_cpus")),
                     "loadavg_start": cfg.get("host_loadavg_start") or None,
                     "loadavg_end": cfg.get("host_loadavg_end") or None,
                     "other_qemus": num(cfg.get("host_other_qemus"))}}


def matrix_args(p):
    p.add_argument("--work", required=True, help="the matrix work folder")


def matrix_build(a, env=None):
    """The whole report; ENV is unused (the host facts come from config.txt)."""
    cfg = read_kv(os.path.join(a.work, "config.txt"))
    guest = read_kv(os.path.join(a.work, "env.txt"))
    clk_tck = num(guest.get("clk_tck")) or 100
    rows = [matrix_row(line.split("\t"), clk_tck)
            for line in read_lines(os.path.join(a.work, "rows.tsv")) if line]
    refs = {r["job"]: r["iops"] for r in rows if r["target"] == REFERENCE and r["status"] == "ok"}
    for r in rows:
        r["iops_vs_null_blk"] = ratio(r["iops"], refs.get(r["job"]))
    head = matrix_head(a, cfg, guest, rows)
    for r in rows:
        r.pop("fio_version", None)  # one per report, in the head
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "unsupported")}
    body = {"null_blk": {k.split(".", 1)[1]: v for k, v in guest.items() if k.startswith("null_blk.")},
            "config": matrix_config(cfg), "rows": rows, "summary": {"rows": len(rows), **counts}}
    return assemble(head, body, counts["failed"] == 0 and bool(rows), a.note)


def matrix_table(report, out):
    c, h = report["config"], report["host"]
    lines = [f"matrix: {report['kernel']}, {report['emulation']}, {report['vcpus']} vCPUs, "
             f"git {report['git_rev']}{'+dirty' if report['git_dirty'] else ''}, {report['fio_version']}, "
             f"{c['runtime_s']}s + {c['ramp_s']}s ramp per row; host load {h['loadavg_start']} -> "
             f"{h['loadavg_end']} on {h['cpus']} CPUs",
             f"{'job':<18} {'target':<16} {'mode':<10} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9} "
             f"{'p99.9 us':>9} {'fio u/s %':>10} {'srv %':>6} {'/null_blk':>9}"]
    for r in report["rows"]:
        who = f"{r['job']:<18} {r['target']:<16} {r['mode']:<10}"
        if r["status"] != "ok":
            lines.append(f"{who} {r['status'].upper()}: {r.get('error', '')[:110]}")
            continue
        fio_cpu = ("-" if r.get("fio_usr_cpu_pct") is None
                   else f"{r['fio_usr_cpu_pct']:.0f}/{r['fio_sys_cpu_pct']:.0f}")
        lines.append(f"{who} {fmt(r['iops'], '9.0f')} {fmt(r['mb_s'], '8.1f')} "
                     f"{fmt(r['clat_p50_us'], '9.1f')} {fmt(r['clat_p99_us'], '9.1f')} "
                     f"{fmt(r['clat_p99_9_us'], '9.1f')} {fio_cpu:>10} {fmt(r.get('server_cpu_pct'), '6.0f')} "
                     f"{fmt(r['iops_vs_null_blk'], '9.3f')}")
    s = report["summary"]
    lines.append(f"{s['rows']} rows: {s['ok']} ok, {s['failed']} failed, {s['unsupported']} unsupported")
    lines.append(f"result: {out}")
    return "\n".join(lines)


# --------------------------------------------------------------- command line

def _no_check(p, a):
    pass


# Each kind: its options, its report builder (a, env) -> dict, and its table.
KINDS = {
    "perf-null": SimpleNamespace(add_args=null_args, check=_no_check, build=null_build, table=null_table,
                                 help="fio 4k randread: null_blk vs ublk-bench null (blocking, --poll, --batch, "
                                 "--stats off) and peers, tuned and default rounds"),
    "perf-nvme": SimpleNamespace(add_args=nvme_args, check=nvme_check, build=nvme_build, table=nvme_table,
                                 help="raw NVMe vs ublk-bench nvme zero-copy/copy, ram user/copy"),
    "matrix": SimpleNamespace(add_args=matrix_args, check=_no_check, build=matrix_build, table=matrix_table,
                              help="fio-jobs x targets x modes"),
}


def parser():
    p = argparse.ArgumentParser(prog="bench_report.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(KINDS) + "}")
    for name, k in KINDS.items():
        sp = sub.add_parser(name, help=k.help, description=k.help)
        common_args(sp)
        k.add_args(sp)
    return p, sub


def parse_args(argv):
    """KIND and its options; exits 2 (with a usage message) on bad ones."""
    p, sub = parser()
    a = p.parse_args(argv)
    KINDS[a.kind].check(sub.choices[a.kind], a)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    k = KINDS[a.kind]
    try:
        report = k.build(a, os.environ)
    except OSError as e:
        print(f"bench_report {a.kind}: cannot read the runs: {e}", file=sys.stderr)
        return 1
    return write_and_print(report, a.out, k.table, f"bench_report {a.kind}")


def preset(kind):
    """One kind's builder with the kind fixed: parse_args, build, main, as the
    tests (and a caller that knows its kind) use them."""
    return SimpleNamespace(parse_args=lambda argv: parse_args([kind, *argv]),
                           build=KINDS[kind].build, table=KINDS[kind].table,
                           main=lambda argv=None: main([kind, *(sys.argv[1:] if argv is None else argv)]))


perf_null = preset("perf-null")
perf_nvme = preset("perf-nvme")
perf_nvme.UBLK_KEYS = NVME_UBLK_KEYS
matrix = preset("matrix")

if __name__ == "__main__":
    sys.exit(main())
