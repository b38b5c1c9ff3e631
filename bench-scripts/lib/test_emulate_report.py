"""Tests for bench-scripts/lib/emulate_report.py (the emulate benchmark's
report), on synthetic fio and downtime files in a temporary folder.

Run from the project's top folder:
    python3 -m unittest discover -s bench-scripts/lib -p 'test_*.py' -v
Standard library only; no guest, no root.
"""

import io
import json
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import emulate_report  # noqa: E402


def fio(iops, p50_ns, p99_ns):
    return {"jobs": [{"read": {"iops": iops, "clat_ns": {"percentile": {"50.000000": p50_ns, "99.000000": p99_ns}}}}]}


def downtime(gaps_us, inflight):
    return {
        "kernel": "7.3.4-test",
        "started_utc": "2026-12-07T11:38:13Z",
        "summary": {"cycles": len(gaps_us), "recovered": len(gaps_us), "errors": 0,
                    "gap_us": {"p50": sorted(gaps_us)[len(gaps_us) // 2], "max": max(gaps_us)}},
        "cycles": [{"inflight_at_kill": n} for n in inflight],
    }


class Report(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.runs = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def put(self, name, obj):
        path = os.path.join(self.runs, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f)

    def test_ratios_are_to_the_model(self):
        self.put("fio-100us-blocking-qd1.json", fio(8000.0, 120_000, 200_000))
        self.put("fio-1ms-poll-qd32.json", fio(30_000.0, 1_050_000, 1_500_000))
        rep = emulate_report.collect(self.runs)
        a, b = rep["service"]
        self.assertEqual((a["model"], a["qd"], a["model_iops"]), ("100us", 1, 10_000.0))
        self.assertEqual((a["iops_ratio"], a["p50_ratio"], a["p99_ratio"]), (0.8, 1.2, 2.0))
        self.assertEqual((b["mode"], b["model_iops"], b["iops_ratio"], b["p50_ratio"]), ("poll", 32_000.0, 0.938, 1.05))

    def test_gap_rows_in_model_order_with_inflight_median(self):
        self.put("gap-1ms/downtime-1.json", downtime([9000, 11000, 10000], [16, 15, 16]))
        self.put("gap-none/downtime-1.json", downtime([3000, 3500, 4000], [0, 1, 2]))
        self.put("gap-100us/downtime-1.json", downtime([5000], [16]))
        rep = emulate_report.collect(self.runs)
        self.assertEqual([r["name"] for r in rep["gap"]], ["none", "100us", "1ms"])
        self.assertEqual(rep["gap"][2]["inflight_at_kill"], 16)
        self.assertEqual(rep["gap"][0]["gap_p50_us"], 3500)
        self.assertEqual(rep["kernel"], "7.3.4-test")

    def test_main_writes_the_json_and_prints_both_tables(self):
        self.put("fio-1ms-blocking-qd1.json", fio(900.0, 1_100_000, 1_300_000))
        self.put("gap-none/downtime-1.json", downtime([3000], [1]))
        out = os.path.join(self.runs, "out.json")
        buf = io.StringIO()
        with redirect_stdout(buf):
            self.assertEqual(emulate_report.main(["x", out, self.runs]), 0)
        with open(out) as f:
            self.assertEqual(len(json.load(f)["service"]), 1)
        self.assertIn("gap p50 us", buf.getvalue())
        self.assertIn("1ms blocking", buf.getvalue())

    def test_an_empty_folder_fails(self):
        with redirect_stdout(io.StringIO()), open(os.devnull, "w") as null:
            sys.stderr, old = null, sys.stderr
            try:
                self.assertEqual(emulate_report.main(["x", os.path.join(self.runs, "o.json"), self.runs]), 1)
            finally:
                sys.stderr = old


if __name__ == "__main__":
    unittest.main()
