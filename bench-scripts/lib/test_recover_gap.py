"""Tests for bench-scripts/lib/recover_gap.py (the recover-gap report), on
synthetic downtime reports in a temporary folder.

Run from the project's top folder:
    python3 -m unittest discover -s bench-scripts/lib -p 'test_*.py' -v
Standard library only; no guest, no root.
"""

import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recover_gap  # noqa: E402


def cycle(gap_ms, phases=None, exit_ms=10.0):
    return {
        "cycle": 1,
        "gap_us": None if gap_ms is None else gap_ms * 1e3,
        "gap_end_us": None if gap_ms is None else gap_ms * 1e3 - 5e3,
        "old_exit_us": exit_ms * 1e3,
        "live_us": 50e3,
        "phases": phases,
    }


def downtime(gaps_ms, recover_cmd=None, errors=0, complete=True, phases=None):
    return {
        "kernel": "7.3.4",
        "git_rev": "abc1234",
        "config": {"recover_cmd": recover_cmd, "cycles": len(gaps_ms), "interval_ms": 1000,
                   "rwmix": 100, "bs": 4096, "iodepth": 16, "jobs": 1},
        "cycles": [cycle(g, phases) for g in gaps_ms],
        "summary": {"errors": errors},
        "complete": complete,
    }


class RecoverGapTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.out = os.path.join(self.dir, "out", "recover-gap.json")
        self.runs = os.path.join(self.dir, "runs")

    def tearDown(self):
        self.tmp.cleanup()

    def put(self, name, report):
        d = os.path.join(self.runs, name)
        os.makedirs(d)
        with open(os.path.join(d, "downtime-20260101T000000Z.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)

    def run_main(self):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = recover_gap.main(["recover_gap.py", self.out, self.runs])
        return rc, out.getvalue(), err.getvalue()

    def test_gaps_are_pooled_per_server_and_compared(self):
        ph = {"began_us": 20e3, "start_recovery_us": 30e3, "end_recovery_us": 40e3}
        self.put("ublk-bench-1", downtime([40, 60, 50], phases=ph))
        self.put("ublk-bench-2", downtime([70, 30]))
        self.put("kublk-1", downtime([100, 80], recover_cmd="kublk recover -n 1"))
        self.put("kublk-2", downtime([90, 120, 110], recover_cmd="kublk recover -n 1"))
        rc, out, _ = self.run_main()
        self.assertEqual(rc, 0, out)
        with open(self.out, encoding="utf-8") as f:
            rep = json.load(f)
        ours, peer = rep["servers"]["ublk-bench"], rep["servers"]["kublk"]
        self.assertEqual((ours["runs"], ours["cycles"]), (2, 5))
        self.assertEqual(ours["gap_ms"]["p50"], 50.0)
        self.assertEqual(ours["gap_ms"]["max"], 70.0)
        self.assertEqual(peer["gap_ms"]["p50"], 100.0)
        self.assertEqual(peer["gap_ms"]["max"], 120.0)
        self.assertEqual(rep["ratio_p50"], 0.5)
        self.assertEqual(rep["ratio_max"], round(70 / 120, 2))
        # Phases only where a server reported them; the run's own for both.
        self.assertEqual(ours["phase_p50_ms"]["start_recovery_ms"], 30.0)
        self.assertNotIn("start_recovery_ms", peer["phase_p50_ms"])
        self.assertEqual(peer["phase_p50_ms"]["old_exit_ms"], 10.0)
        self.assertEqual(rep["recover_cmds"]["kublk"], "kublk recover -n 1")
        self.assertIsNone(rep["recover_cmds"]["ublk-bench"])
        self.assertIn("ublk-bench / kublk: p50 0.50x", out)

    def test_a_cycle_without_service_or_with_errors_fails(self):
        self.put("ublk-bench-1", downtime([40, None]))
        self.put("kublk-1", downtime([100], errors=3))
        rc, out, _ = self.run_main()
        self.assertEqual(rc, 1)
        self.assertIn("1 cycle(s) without a gap", out)
        self.assertIn("3 I/O error(s)", out)

    def test_a_failed_run_is_an_error_not_a_figure(self):
        self.put("ublk-bench-1", downtime([40]))
        os.makedirs(os.path.join(self.runs, "kublk-1"))
        rc, _, err = self.run_main()
        self.assertEqual(rc, 1)
        self.assertIn("no downtime-*.json", err)
        self.assertFalse(os.path.exists(self.out))


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recover-gap")


class RecoverGapScriptTest(unittest.TestCase):
    """Bad arguments are refused before any build or guest."""

    def run_script(self, *args):
        return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=30, check=False)

    def test_bad_arguments_are_usage_errors(self):
        cases = [
            (["--cycles", "0"], "--cycles 0: give a whole number"),
            (["--rounds", "x"], "--rounds x: give a whole number"),
            (["--kublk", "/nonexistent/kublk"], "no kublk at /nonexistent/kublk"),
            (["--bogus"], "unknown argument '--bogus'"),
        ]
        for args, want in cases:
            r = self.run_script(*args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn(want, r.stderr, args)

    def test_help_exits_0(self):
        r = self.run_script("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--rounds R", r.stderr)


if __name__ == "__main__":
    unittest.main()
