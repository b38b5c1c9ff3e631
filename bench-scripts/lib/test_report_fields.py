"""bench_report.py perf-null and matrix, run as the scripts run them on
canned inputs: the JSON they write has the fields of results/*-example.json.
(perf-nvme: test_perf_nvme_report.py.)"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

from test_perf_nvme_report import fio_doc, key_shape

LIB = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(LIB, "..", "..", "results")
UBLK_DEV = {"dev_id": 0, "queues": 1, "depth": 128, "poll": False, "cpus": [1], "copy_mode": "user",
            "flags": ["USER_COPY"], "backend": "null", "size": 1 << 30, "block_size": 512,
            "max_io_bytes": 524288, "pid": 4242}


def example(kind):
    with open(os.path.join(RESULTS, f"{kind}-example.json"), encoding="utf-8") as f:
        return json.load(f)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def run_module(name, args, env=None):
    p = subprocess.run([sys.executable, os.path.join(LIB, name), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=60)
    return p


def row_keys(rows):
    """Every key any row has (failed rows have fewer)."""
    return set().union(*(set(r) for r in rows))


class PerfNullFields(unittest.TestCase):
    ROWS = (("null_blk", 90000.0), ("ublk-null-blocking", 60000.0), ("ublk-null-poll", 80000.0),
            ("kublk", 50000.0))

    def build(self, d, rounds=("tuned", "default"), batch_unknown=True):
        lines = []
        for rnd in rounds:
            scale = 1.0 if rnd == "tuned" else 0.5
            for name, iops in self.ROWS:
                base = os.path.join(d, f"{rnd}-{name}")
                fio = write(base + ".json", json.dumps(fio_doc(iops * scale, iops * scale * 4096)))
                qd1 = write(base + ".qd1.json", json.dumps(fio_doc(20000.0, 20000.0 * 4096)))
                write(base + ".sched", "none\n")
                dev = "" if name == "null_blk" else write(base + ".dev.json", json.dumps([UBLK_DEV]))
                ticks, enters = ("", "") if name == "null_blk" else ("100", "" if name == "kublk" else "500000")
                lines.append("\t".join([rnd, name, "/dev/x", "ok", fio, qd1, dev, ticks, "1000000", enters, ""]))
            if batch_unknown:
                lines.append("\t".join([rnd, "ublk-null-batch", "", "failed", "", "", "", "", "", "",
                                        "ublk-bench add null --batch failed: unexpected argument '--batch'"]))
        rows = write(os.path.join(d, "rows.tsv"), "\n".join(lines) + "\n")
        out = os.path.join(d, "perf-null-T.json")
        p = run_module("bench_report.py", ["perf-null",
            "--rows", rows, "--out", out, "--root", d, "--timestamp", "T", "--binary", "/bin/true",
            "--runtime", "10", "--qd1-runtime", "5", "--ramp", "2", "--bs", "4k", "--iodepth", "32",
            "--clk-tck", "100", "--rounds", ",".join(rounds), "--fio-cpu", "0",
            "--queue-cpu", "1", "--fio-args", "fio ...", "--note", "canned"],
            {"UBLK_BENCH_HOST_LOADAVG": "1 1 1", "UBLK_BENCH_HOST_QEMUS": "0", "UBLK_BENCH_HOST_CPUS": "2"})
        self.assertEqual(p.returncode, 0, p.stderr)
        self.table = p.stdout
        with open(out, encoding="utf-8") as f:
            return json.load(f)

    def test_same_fields_as_the_example(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.build(d)
        want = example("perf-null")
        # "note" is there only when the run was given one (--note), as here.
        self.assertEqual(set(got) - {"note"}, set(want) - {"note"})
        for section in ("host", "config", "bar"):
            self.assertEqual(key_shape(got[section]), key_shape(want[section]), section)
        ok_want = [r for r in want["rows"] if r["status"] == "ok"]
        # A run of one repeat (as here) has no per-repeat figures.
        repeat_only = {"runs", "iops_spread"} if want["config"]["repeat"] > 1 else set()
        self.assertEqual(row_keys([r for r in got["rows"] if r["status"] == "ok"]), row_keys(ok_want) - repeat_only)
        self.assertEqual(got["bar"]["poll_ratio"], round(80000.0 / 90000.0, 3))

    def test_rounds_per_io_figures_and_unknown_flags(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.build(d)
        by = {(r["round"], r["name"]): r for r in got["rows"]}
        poll = by[("tuned", "ublk-null-poll")]
        # 100 ticks at 100/s = 1 s of CPU over 1e6 reads; 5e5 enters over 1e6 reads.
        self.assertEqual((poll["server_cpu_us_per_io"], poll["enters_per_io"]), (1.0, 0.5))
        self.assertEqual(by[("tuned", "kublk")]["enters_per_io"], None, "peers do not count enters")
        self.assertEqual(by[("tuned", "null_blk")]["server_cpu_us_per_io"], None, "null_blk has no server")
        self.assertEqual(poll["qd1_mean_us"], fio_doc(20000.0, 1)["jobs"][0]["read"]["clat_ns"]["mean"] / 1000)
        # Each round against its own null_blk; default/tuned per row.
        self.assertEqual(by[("default", "ublk-null-poll")]["ratio_to_null_blk"], round(80000 / 90000, 3))
        self.assertEqual(got["default_vs_tuned"]["ublk-null-poll"], 0.5)
        batch = by[("tuned", "ublk-null-batch")]
        self.assertEqual(batch["status"], "failed")
        self.assertIn("unexpected argument '--batch'", batch["error"])
        self.assertFalse(got["complete"])
        self.assertIn("FAILED: ublk-bench add null --batch", self.table)
        self.assertIn("default/tuned ublk-null-poll", self.table)

    def test_targets_per_round(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.build(d, rounds=("tuned", "burst"))
        t = got["targets"]["tuned"]
        # kublk is the only (so the better) peer: 60k and 80k over its 50k.
        self.assertEqual((t["blocking_vs_best_peer"], t["poll_vs_best_peer"]), (1.2, 1.6))
        self.assertEqual(t["poll_qd1_vs_null_blk"], 1.0, "the same canned qd1 run everywhere")
        self.assertEqual((t["batch_vs_blocking"], t["batch_enters_vs_blocking"]), (None, None), "batch failed")
        self.assertEqual(set(got["targets"]), {"tuned", "burst"})
        self.assertIn("burst: blocking/best peer 1.20 (>= 1.2)", self.table)

    def test_repeats_give_medians_runs_and_spread(self):
        with tempfile.TemporaryDirectory() as d:
            lines = []
            # Three repeats; the ublk row's IOPS 40k, 60k, 90k: median 60k.
            for rep, iops in ((1, 40000.0), (2, 60000.0), (3, 90000.0)):
                for name, v in (("null_blk", 100000.0), ("ublk-null-blocking", iops), ("kublk", 50000.0)):
                    base = os.path.join(d, f"r{rep}-tuned-{name}")
                    fio = write(base + ".json", json.dumps(fio_doc(v, v * 4096)))
                    qd1 = write(base + ".qd1.json", json.dumps(fio_doc(20000.0, 20000.0 * 4096)))
                    write(base + ".sched", f"none{rep}\n")
                    enters = "" if name != "ublk-null-blocking" else str(250000 * rep)
                    lines.append("\t".join(["tuned", name, "/dev/x", "ok", fio, qd1, "", "100", "1000000",
                                            enters, "", str(rep)]))
            rows = write(os.path.join(d, "rows.tsv"), "\n".join(lines) + "\n")
            out = os.path.join(d, "perf-null-T.json")
            p = run_module("bench_report.py", ["perf-null",
                "--rows", rows, "--out", out, "--root", d, "--timestamp", "T", "--binary", "/bin/true",
                "--runtime", "10", "--qd1-runtime", "5", "--ramp", "2", "--bs", "4k", "--iodepth", "32",
                "--clk-tck", "100", "--rounds", "tuned", "--fio-cpu", "0", "--queue-cpu", "1",
                "--fio-args", "fio ...", "--repeat", "3"])
            self.assertEqual(p.returncode, 0, p.stderr)
            with open(out, encoding="utf-8") as f:
                got = json.load(f)
        self.assertEqual(len(got["rows"]), 3, "one row per round and name")
        by = {r["name"]: r for r in got["rows"]}
        blocking = by["ublk-null-blocking"]
        self.assertEqual(blocking["iops"], 60000.0)
        self.assertEqual([r["iops"] for r in blocking["runs"]], [40000.0, 60000.0, 90000.0])
        self.assertEqual([r["repeat"] for r in blocking["runs"]], [1, 2, 3])
        self.assertEqual(blocking["enters_per_io"], 0.5, "median of 0.25, 0.5, 0.75")
        self.assertEqual(blocking["iops_spread"], round(50000 / 60000, 3))
        self.assertEqual(blocking["scheduler"], "none1", "the first repeat's facts")
        self.assertEqual(blocking["ratio_to_null_blk"], 0.6)
        self.assertEqual(got["targets"]["tuned"]["blocking_vs_best_peer"], 1.2, "from the medians")
        self.assertEqual(got["config"]["repeat"], 3)
        self.assertIn("median of 3 repeats", p.stdout)
        self.assertIn("spread 0.83", p.stdout)

    def test_old_rows_without_a_round_are_tuned(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.build(d, rounds=("tuned",), batch_unknown=False)
        self.assertEqual({r["round"] for r in got["rows"]}, {"tuned"})
        self.assertEqual(got["default_vs_tuned"], {})
        self.assertTrue(got["complete"])


class MatrixFields(unittest.TestCase):
    def build(self, d):
        config = {"jobs": "randread-4k-qd32", "targets": "null_blk,ublk-null", "modes": "poll",
                  "runtime_s": "5", "ramp_s": "1", "fio_cpu": "0", "ublk_queue_cpu": "1", "ublk_queues": "1",
                  "ublk_depth": "128", "ram_size": "256M", "nvme": "/dev/nvme0n1", "full": "0",
                  "binary": "/b", "binary_sha256": "00", "host_loadavg_start": "1 1 1", "host_cpus": "2",
                  "host_other_qemus": "0", "host_kernel": "6.1", "git_rev": "abc", "git_dirty": "0",
                  "host_loadavg_end": "2 2 2"}
        env = {"kernel": "7.3.4", "kernel_version": "#1", "vcpus": "2", "cpu_model": "QEMU TCG CPU",
               "hypervisor": "1", "in_guest": "1", "fio_version": "fio-3.33", "clk_tck": "100",
               "scheduler": "none", "binary_version": "ublk-bench 0.1.0", "mem_total_kb": "4000000",
               "null_blk.queue_mode": "2", "null_blk.irqmode": "0", "null_blk.submit_queues": "2",
               "null_blk.hw_queue_depth": "64", "null_blk.bs": "512", "null_blk.gb": "250",
               "null_blk.completion_nsec": "10000"}
        write(os.path.join(d, "config.txt"), "".join(f"{k}={v}\n" for k, v in config.items()))
        write(os.path.join(d, "env.txt"), "".join(f"{k}={v}\n" for k, v in env.items()))
        doc = fio_doc(50000.0, 50000.0 * 4096)
        doc["jobs"][0]["read"]["lat_ns"] = {"mean": 600_000.0}
        fio = write(os.path.join(d, "fio.json"), json.dumps(doc))
        add = write(os.path.join(d, "add.json"), json.dumps(UBLK_DEV))
        rows = [["randread-4k-qd32", "null_blk", "kernel", "ok", "/dev/nullb0", fio, "", "", "7000", ""],
                ["randread-4k-qd32", "ublk-null", "poll", "ok", "/dev/ublkb0", fio, add, "700", "7000", ""]]
        write(os.path.join(d, "rows.tsv"), "".join("\t".join(r) + "\t\n" for r in rows))
        out = os.path.join(d, "matrix-T.json")
        p = run_module("bench_report.py", ["matrix", "--work", d, "--out", out, "--root", d, "--timestamp", "T"])
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(out, encoding="utf-8") as f:
            return json.load(f)

    def test_same_fields_as_the_example(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.build(d)
        want = example("matrix")
        self.assertEqual(set(got), set(want))
        for section in ("host", "null_blk", "config", "summary"):
            self.assertEqual(key_shape(got[section]), key_shape(want[section]), section)
        ublk_want = [r for r in want["rows"] if r["status"] == "ok" and "ublk" in r]
        ublk_got = [r for r in got["rows"] if "ublk" in r]
        self.assertEqual(set(ublk_got[0]), set(ublk_want[0]))
        ref_want = next(r for r in want["rows"] if r["target"] == "null_blk")
        self.assertEqual(set(got["rows"][0]), set(ref_want))
        self.assertEqual(ublk_got[0]["server_cpu_pct"], 100.0)  # 7 s of CPU over 7 s


class CommandLine(unittest.TestCase):
    def test_no_kind_is_a_usage_error(self):
        p = run_module("bench_report.py", [])
        self.assertEqual(p.returncode, 2)
        self.assertIn("perf-null,perf-nvme,matrix", p.stderr)

    def test_unknown_kind_is_a_usage_error(self):
        p = run_module("bench_report.py", ["perf-foo", "--out", "x"])
        self.assertEqual(p.returncode, 2)
        self.assertIn("invalid choice: 'perf-foo'", p.stderr)

    def test_unreadable_rows_write_nothing_and_say_why(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "matrix-T.json")
            p = run_module("bench_report.py", ["matrix", "--work", os.path.join(d, "none"), "--out", out,
                                               "--root", d, "--timestamp", "T"])
            self.assertEqual(p.returncode, 1)
            self.assertIn("bench_report matrix: cannot read the runs", p.stderr)
            self.assertIn(os.path.join(d, "none", "rows.tsv"), p.stderr)
            self.assertEqual(os.listdir(d), [])


if __name__ == "__main__":
    unittest.main()
