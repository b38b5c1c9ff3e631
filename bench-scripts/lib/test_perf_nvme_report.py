"""Tests for bench_report.py perf-nvme: a canned guest work folder in, the report out,
with the keys of results/perf-nvme-example.json."""

import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stdout

from bench_report import perf_nvme as pnr

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")
# name -> (4k IOPS, 128k MB/s); nvme-raw-end runs 4k only, as the script does.
FIGURES = {"nvme-raw": (40000.0, 3000.0), "nvme-zero": (30000.0, 2800.0), "nvme-copy": (20000.0, 700.0),
           "nvme-raw-end": (44000.0, None), "ublk-null": (60000.0, 5000.0),
           "ram-user": (50000.0, 900.0), "ram-copy": (45000.0, 600.0)}


def fio_doc(iops, bw_bytes, p99_ns=800_000):
    read = {"iops": iops, "bw_bytes": bw_bytes, "total_ios": int(iops * 8),
            "clat_ns": {"mean": 500_000.0, "max": 2_000_000,
                        "percentile": {"50.000000": 400_000, "90.000000": 600_000,
                                       "99.000000": p99_ns, "99.900000": 1_500_000}}}
    return {"fio version": "fio-3.33",
            "jobs": [{"error": 0, "job_runtime": 8000, "usr_cpu": 5.0, "sys_cpu": 90.0, "ctx": 100,
                      "read": read, "write": {"total_ios": 0}}]}


def example():
    with open(os.path.join(RESULTS, "perf-nvme-example.json"), encoding="utf-8") as f:
        return json.load(f)


class CannedRun:
    """A work folder as the guest part leaves it, ROUNDS rounds."""

    def __init__(self, d, rounds=1, fail=None):
        self.d, self.rows = d, []
        os.makedirs(os.path.join(d, "meta"))
        facts = {"kernel": "7.3.4+deb13-amd64", "vcpus": "2", "queue_cpu": "1", "fio_version": "fio-3.33",
                 "cpu_model": "QEMU TCG CPU version 2.5+", "hypervisor": "1", "in_guest": "1",
                 "binary_version": "ublk-bench 0.1.0", "nvme_model": "QEMU NVMe Ctrl",
                 "nvme_logical_block_size": "512", "nvme_sectors": "2097152", "nvme_max_hw_sectors_kb": "512",
                 "nvme_discard_max_bytes": "2147483136", "nvme_write_zeroes_max_bytes": "524288",
                 "nvme_nr_requests": "1023"}
        for k, v in facts.items():
            self.meta(k, v + "\n")
        self.meta("features.json", json.dumps({"features": ["ZERO_COPY"], "raw": "0x1"}))
        for rnd in range(1, rounds + 1):
            for name, (iops, mb_s) in FIGURES.items():
                scale = 1.0 + 0.1 * (rnd - 1)
                self.row(rnd, name, "randread-4k", iops * scale, iops * scale * 4096, fail)
                if mb_s is not None:
                    self.row(rnd, name, "seqread-128k", mb_s * 1e6 / 131072, mb_s * 1e6 * scale, fail)
        with open(os.path.join(d, "rows.tsv"), "w", encoding="utf-8") as f:
            f.write("".join("\t".join(r) + "\t\n" for r in self.rows))

    def meta(self, name, text):
        with open(os.path.join(self.d, "meta", name), "w", encoding="utf-8") as f:
            f.write(text)

    def row(self, rnd, name, workload, iops, bw, fail):
        base = os.path.join(self.d, f"r{rnd}-{name}")
        with open(f"{base}.sched", "w", encoding="utf-8") as f:
            f.write("none\n")
        dev_json = ""
        if name.startswith(("ram-", "ublk-", "nvme-zero", "nvme-copy")):
            dev_json = f"{base}.dev.json"
            with open(dev_json, "w", encoding="utf-8") as f:
                json.dump([{"dev_id": 0, "backend": name.split("-")[0], "queues": 1, "depth": 128,
                            "cpus": [1], "pid": 42}], f)
        if fail == (name, workload):
            self.rows.append([name, workload, "/dev/x", "failed", "", dev_json, "fio exit 1: boom", str(rnd)])
            return
        fio_json = f"{base}-{workload}.json"
        with open(fio_json, "w", encoding="utf-8") as f:
            f.write("fio: a warning ahead of the JSON\n" + json.dumps(fio_doc(iops, bw)))
        self.rows.append([name, workload, "/dev/x", "ok", fio_json, dev_json, "", str(rnd)])


def args(work, out="x.json", rounds=1, note=""):
    return pnr.parse_args(["--work", work, "--out", out, "--root", "/nonexistent", "--timestamp", "T",
                           "--binary", "/bin/ublk-bench", "--runtime", "8", "--ramp", "2",
                           "--rounds", str(rounds), "--fio-cpu", "0", "--iodepth", "32", "--fill", "512M",
                           "--ram-size", "256M", "--zero-raw-min", "0.6", "--zero-copy-min", "1.0",
                           "--ram-user-copy-min", "1.0", "--note", note])


def build(work, rounds=1, **kw):
    env = {"UBLK_BENCH_HOST_LOADAVG_START": "1.0 1.0 1.0", "UBLK_BENCH_HOST_LOADAVG_END": "2.0 2.0 2.0",
           "UBLK_BENCH_HOST_CPUS": "2", "UBLK_BENCH_HOST_OTHER_QEMUS": "0"}
    return pnr.build(args(work, rounds=rounds, **kw), env, git=lambda root: ("abc1234", False))


def key_shape(doc):
    """The keys of a report, nested, with the first element of each list standing for all."""
    if isinstance(doc, dict):
        return {k: key_shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [key_shape(doc[0])] if doc and isinstance(doc[0], (dict, list)) else []
    return None


class SameFieldsAsTheExample(unittest.TestCase):
    def test_top_level_and_nested_keys(self):
        with tempfile.TemporaryDirectory() as d:
            CannedRun(d, rounds=2)
            got, want = build(d, rounds=2), example()
        for section in ("host", "nvme", "config", "ratios", "bar"):
            self.assertEqual(key_shape(got[section]), key_shape(want[section]), section)
        self.assertEqual(set(got), set(want))
        self.assertEqual(set(got["rows"][0]) - {"ublk"}, set(want["rows"][0]) - {"ublk"})
        self.assertEqual(set(got["summary"][0]), set(want["summary"][0]))
        self.assertEqual(set(got["ratios_per_round"][0]), set(want["ratios_per_round"][0]))
        ublk_rows = [r for r in want["rows"] if "ublk" in r]
        self.assertTrue(set(got["rows"][2]["ublk"]) <= set(ublk_rows[0]["ublk"]) | set(pnr.UBLK_KEYS))


class Figures(unittest.TestCase):
    def test_ratios_and_bar_from_the_rows(self):
        with tempfile.TemporaryDirectory() as d:
            CannedRun(d)
            r = build(d)
        raw = (FIGURES["nvme-raw"][0] + FIGURES["nvme-raw-end"][0]) / 2
        self.assertEqual(r["ratios"]["raw_nvme_4k_iops_reference"], raw)
        self.assertEqual(r["ratios"]["zero_vs_raw_4k_iops"], round(FIGURES["nvme-zero"][0] / raw, 3))
        self.assertEqual(r["ratios"]["zero_vs_copy_128k_mb_s"],
                         round(FIGURES["nvme-zero"][1] / FIGURES["nvme-copy"][1], 3))
        self.assertEqual(r["bar"]["zero_vs_raw_4k_iops"]["pass"], FIGURES["nvme-zero"][0] / raw >= 0.6)
        self.assertTrue(r["complete"])
        self.assertEqual(r["emulation"], "tcg")
        self.assertEqual(r["nvme"]["size_bytes"], 2097152 * 512)
        self.assertEqual(r["config"]["ublk_queue_cpu"], 1)
        self.assertEqual(r["host"]["cpus"], 2)

    def test_median_over_rounds(self):
        with tempfile.TemporaryDirectory() as d:
            CannedRun(d, rounds=3)
            r = build(d, rounds=3)
        raw = next(s for s in r["summary"] if s["name"] == "nvme-raw" and s["workload"] == "randread-4k")
        self.assertEqual(raw["runs_ok"], 3)
        self.assertEqual(raw["iops"], FIGURES["nvme-raw"][0] * 1.1)  # the middle round
        self.assertEqual(len(r["ratios_per_round"]), 3)

    def test_a_failed_row_makes_it_incomplete_and_the_bar_fails(self):
        with tempfile.TemporaryDirectory() as d:
            CannedRun(d, fail=("nvme-zero", "randread-4k"))
            r = build(d)
        row = next(x for x in r["rows"] if x["name"] == "nvme-zero" and x["workload"] == "randread-4k")
        self.assertEqual((row["status"], row["error"], row["iops"]), ("failed", "fio exit 1: boom", None))
        self.assertFalse(r["complete"])
        self.assertIsNone(r["ratios"]["zero_vs_raw_4k_iops"])
        self.assertFalse(r["bar"]["zero_vs_raw_4k_iops"]["pass"])
        self.assertFalse(r["bar"]["pass"])

    def test_empty_work_folder_gives_an_incomplete_report(self):
        with tempfile.TemporaryDirectory() as d:
            r = build(d)
        self.assertEqual((r["rows"], r["complete"], r["kernel"]), ([], False, None))


class Main(unittest.TestCase):
    def test_writes_the_json_and_prints_the_table(self):
        with tempfile.TemporaryDirectory() as d:
            work, out = os.path.join(d, "work"), os.path.join(d, "res", "perf-nvme-T.json")
            CannedRun(work)
            argv = ["--work", work, "--out", out, "--root", d, "--timestamp", "T", "--binary", "b",
                    "--runtime", "8", "--ramp", "2", "--rounds", "1", "--fio-cpu", "0", "--iodepth", "32",
                    "--fill", "512M", "--ram-size", "256M", "--zero-raw-min", "0.6", "--zero-copy-min", "1",
                    "--ram-user-copy-min", "1", "--note", "n"]
            buf = io.StringIO()
            with redirect_stdout(buf):
                self.assertEqual(pnr.main(argv), 0)
            with open(out, encoding="utf-8") as f:
                doc = json.load(f)
        self.assertEqual((doc["kind"], doc["note"]), ("perf-nvme", "n"))
        self.assertIn(f"result: {out}", buf.getvalue())
        self.assertIn("bar zero_vs_raw_4k_iops", buf.getvalue())


if __name__ == "__main__":
    unittest.main()
