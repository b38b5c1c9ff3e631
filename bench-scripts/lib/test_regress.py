"""Tests for bench-scripts/regress (run as a subprocess on synthetic matrix
results in a temporary folder) and for the shape of the committed
results/baseline.json and results/matrix-*.json files.

Run from the project's top folder:
    python3 -m unittest discover -s bench-scripts/lib -p 'test_*.py' -v
Standard library only; no guest, no root.
"""

import copy
import glob
import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REGRESS = os.path.join(ROOT, "bench-scripts", "regress")


def row(job, target, mode, iops, p99, status="ok", **extra):
    r = {"job": job, "target": target, "mode": mode, "status": status, "iops": iops,
         "mb_s": round(iops * 4096 / 1e6, 2) if iops is not None else None,
         "clat_p50_us": 100.0, "clat_p99_us": p99, "clat_p99_9_us": 2 * p99 if p99 else None}
    r.update(extra)
    return r


def result(rows):
    return {"kind": "matrix", "schema": 1, "kernel": "7.3.4", "emulation": "tcg", "vcpus": 2,
            "fio_version": "fio-3.33", "config": {"runtime_s": 5, "ramp_s": 1}, "rows": rows}


BASE_ROWS = [
    row("randread-4k-qd32", "null_blk", "kernel", 50000.0, 3000.0),
    row("randread-4k-qd32", "ublk-null", "poll", 9000.0, 14000.0),
    row("randread-4k-qd32", "ublk-null", "blocking", 6000.0, 20000.0),
    row("randread-4k-qd32", "ublk-nvme-zero", "poll", None, None, status="unsupported", error="zero copy ..."),
]


class RegressTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def write(self, name, doc):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w", encoding="utf-8") as f:
            if isinstance(doc, str):
                f.write(doc)
            else:
                json.dump(doc, f)
        return path

    def run_regress(self, *args):
        p = subprocess.run([sys.executable, REGRESS, *args], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return p.returncode, p.stdout, p.stderr

    def compare(self, now_rows, base_rows=None, *extra, base_extra=None):
        base = result(copy.deepcopy(base_rows or BASE_ROWS))
        base.update(base_extra or {})
        b = self.write("baseline.json", base)
        n = self.write("now.json", result(now_rows))
        return self.run_regress(n, "--baseline", b, *extra)

    def test_pass_within_thresholds(self):
        now = copy.deepcopy(BASE_ROWS)
        now[1]["iops"] = 8300.0  # -7.8%: within 10%
        now[2]["clat_p99_us"] = 23000.0  # +15%: within 20%
        rc, out, err = self.compare(now)
        self.assertEqual(rc, 0, out + err)
        self.assertIn("PASS: 0 of", out)
        self.assertNotIn("FAIL", out)
        # the table: metric, baseline, now, change, limit, result
        self.assertRegex(out, r"randread-4k-qd32/ublk-null/poll\s+iops\s+9000\.0\s+8300\.0\s+-7\.8%\s+-10%\s+PASS")

    def test_iops_drop_fails_with_exit_1(self):
        now = copy.deepcopy(BASE_ROWS)
        now[1]["iops"] = 7000.0  # -22%
        rc, out, err = self.compare(now)
        self.assertEqual(rc, 1, out + err)
        self.assertRegex(out, r"ublk-null/poll\s+iops\s+9000\.0\s+7000\.0\s+-22\.2%\s+-10%\s+FAIL")
        self.assertIn("REGRESSION: 1 of", out)

    def test_p99_rise_fails_and_flag_relaxes_it(self):
        now = copy.deepcopy(BASE_ROWS)
        now[0]["clat_p99_us"] = 3750.0  # +25%
        rc, out, _ = self.compare(now)
        self.assertEqual(rc, 1)
        self.assertRegex(out, r"null_blk/kernel\s+clat_p99_us\s+3000\.0\s+3750\.0\s+\+25\.0%\s+\+20%\s+FAIL")
        rc, out, _ = self.compare(now, None, "--threshold", "clat_p99_us=30")
        self.assertEqual(rc, 0, out)
        rc, out, _ = self.compare(now, None, "--threshold", "clat_p99_us=none")
        self.assertEqual(rc, 0, out)
        self.assertNotIn("clat_p99_us ", out.split("PASS:")[0])

    def test_thresholds_from_the_baseline_file(self):
        now = copy.deepcopy(BASE_ROWS)
        now[1]["iops"] = 8300.0  # -7.8%
        rc, out, _ = self.compare(now, None, base_extra={"thresholds": {"iops": 5}})
        self.assertEqual(rc, 1, out)
        rc, _, err = self.compare(now, None, base_extra={"thresholds": {"bogus_metric": 5}})
        self.assertEqual(rc, 2)
        self.assertIn("unknown metric 'bogus_metric'", err)

    def test_improvement_passes(self):
        now = copy.deepcopy(BASE_ROWS)
        now[1]["iops"] = 20000.0
        now[1]["clat_p99_us"] = 1000.0
        rc, out, _ = self.compare(now)
        self.assertEqual(rc, 0, out)

    def test_row_failed_now_is_a_regression(self):
        now = copy.deepcopy(BASE_ROWS)
        now[2] = row("randread-4k-qd32", "ublk-null", "blocking", None, None, status="failed", error="fio exit 1")
        rc, out, _ = self.compare(now)
        self.assertEqual(rc, 1)
        self.assertRegex(out, r"ublk-null/blocking\s+status\s+ok\s+failed.*FAIL\s+fio exit 1")

    def test_rows_not_run_are_skipped_and_new_rows_listed(self):
        now = [copy.deepcopy(BASE_ROWS[1]), row("seqread-128k", "ublk-ram", "poll", 900.0, 5000.0)]
        rc, out, _ = self.compare(now)
        self.assertEqual(rc, 0, out)
        self.assertIn("not run now (skipped): randread-4k-qd32/null_blk/kernel", out)
        self.assertIn("new rows (no baseline): seqread-128k/ublk-ram/poll", out)

    def test_environment_differences_are_warned_about(self):
        now = result(copy.deepcopy(BASE_ROWS))
        now["emulation"] = "none"
        b = self.write("baseline.json", result(copy.deepcopy(BASE_ROWS)))
        n = self.write("now.json", now)
        rc, out, _ = self.run_regress(n, "--baseline", b)
        self.assertEqual(rc, 0)
        self.assertIn("warning: emulation: baseline 'tcg', now 'none'", out)

    def test_bad_input_exits_2(self):
        b = self.write("baseline.json", result(copy.deepcopy(BASE_ROWS)))
        rc, _, err = self.run_regress(os.path.join(self.tmp.name, "missing.json"), "--baseline", b)
        self.assertEqual(rc, 2)
        self.assertIn("no such file", err)
        rc, _, err = self.run_regress(b, "--baseline", os.path.join(self.tmp.name, "nope.json"))
        self.assertEqual(rc, 2)
        self.assertIn("baseline", err)
        n = self.write("garbage.json", "{not json")
        rc, _, err = self.run_regress(n, "--baseline", b)
        self.assertEqual(rc, 2)
        self.assertIn("not valid JSON", err)
        n = self.write("perfnull.json", {"kind": "perf-null", "rows": [{"name": "null_blk", "iops": 1.0}]})
        rc, _, err = self.run_regress(n, "--baseline", b)
        self.assertEqual(rc, 2)
        self.assertIn("perf-null results are not supported", err)
        n = self.write("other.json", result([row("seqwrite-128k", "ublk-ram", "poll", 1.0, 1.0)]))
        rc, _, err = self.run_regress(n, "--baseline", b)
        self.assertEqual(rc, 2)
        self.assertIn("no rows in common", err)
        rc, _, err = self.run_regress(b, "--baseline", b, "--threshold", "iops")
        self.assertEqual(rc, 2)
        self.assertIn("METRIC=PERCENT", err)
        rc, _, _ = self.run_regress("--no-such-flag")
        self.assertEqual(rc, 2)

    def test_make_baseline_labels_and_round_trips(self):
        src = result(copy.deepcopy(BASE_ROWS))
        src["host"] = {"loadavg_start": "5.1 5.0 4.9", "loadavg_end": "6.0 5.5 5.0", "cpus": 2, "other_qemus": 1}
        s = self.write("matrix-x.json", src)
        out = os.path.join(self.tmp.name, "baseline.json")
        rc, stdout, err = self.run_regress("--make-baseline", s, "--out", out, "--note", "test")
        self.assertEqual(rc, 0, stdout + err)
        with open(out, encoding="utf-8") as f:
            b = json.load(f)
        self.assertEqual(b["baseline"]["label"], "tcg guest, 2 vCPUs, kernel 7.3.4")
        self.assertEqual(b["baseline"]["host_loadavg_start"], "5.1 5.0 4.9")
        self.assertIn("same kind of host", b["baseline"]["comparability"])
        self.assertEqual(b["thresholds"]["iops"], 10.0)
        rc, stdout, _ = self.run_regress(s, "--baseline", out)
        self.assertEqual(rc, 0, stdout)


REQUIRED_TOP = {"kind": str, "timestamp": str, "kernel": str, "git_rev": str, "emulation": str,
                "vcpus": int, "fio_version": str, "config": dict, "rows": list, "summary": dict,
                "host": dict}
REQUIRED_ROW = {"job": str, "target": str, "mode": str, "status": str}
OK_ROW_NUMBERS = ("iops", "mb_s", "clat_p50_us", "clat_p99_us", "clat_p99_9_us", "fio_usr_cpu_pct",
                  "fio_sys_cpu_pct")


class ResultFilesTest(unittest.TestCase):
    """The committed matrix results and the baseline parse and have the documented fields."""

    def check_matrix(self, path):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        for k, t in REQUIRED_TOP.items():
            self.assertIsInstance(doc.get(k), t, f"{path}: {k}")
        self.assertEqual(doc["kind"], "matrix")
        self.assertTrue(doc["rows"], path)
        keys = set()
        for r in doc["rows"]:
            for k, t in REQUIRED_ROW.items():
                self.assertIsInstance(r.get(k), t, f"{path}: row {r}: {k}")
            self.assertIn(r["status"], ("ok", "failed", "unsupported"))
            self.assertIn(r["mode"], ("kernel", "poll", "blocking"))
            key = (r["job"], r["target"], r["mode"])
            self.assertNotIn(key, keys, f"{path}: duplicate row {key}")
            keys.add(key)
            if r["status"] == "ok":
                for k in OK_ROW_NUMBERS:
                    self.assertIsInstance(r.get(k), (int, float), f"{path}: {key}: {k}")
            else:
                self.assertTrue(r.get("error"), f"{path}: {key}: a row that is not ok says why")
        return doc

    def test_matrix_results_parse(self):
        for path in sorted(glob.glob(os.path.join(ROOT, "results", "matrix-*.json"))):
            with self.subTest(path=os.path.basename(path)):
                self.check_matrix(path)

    def test_baseline_parses_and_is_labelled(self):
        path = os.path.join(ROOT, "results", "baseline.json")
        if not os.path.exists(path):
            self.skipTest("no results/baseline.json")
        doc = self.check_matrix(path)
        label = doc.get("baseline")
        self.assertIsInstance(label, dict)
        for k in ("label", "taken_in", "host_loadavg_start", "comparability"):
            self.assertTrue(label.get(k), k)
        self.assertIsInstance(doc.get("thresholds"), dict)
        # it compares cleanly with itself
        p = subprocess.run([sys.executable, REGRESS, path, "--baseline", path], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


if __name__ == "__main__":
    unittest.main()
