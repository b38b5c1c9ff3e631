"""Tests for lib/bench.sh, the bench runner's shell core, with a fake
ublk-bench binary (no driver, no devices: runs on any host)."""

import os
import subprocess
import tempfile
import textwrap
import unittest

LIB = os.path.dirname(os.path.abspath(__file__))

# A stand-in for ublk-bench: logs its arguments; `add` answers like
# `add --json` (dev_id, and the pid of a process it leaves running, as a
# daemonized server would) unless FAKE_ADD is "fail" or "noid"; `del` works.
FAKE_BIN = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >>"$FAKE_LOG"
    case $1 in
    add)
        case ${FAKE_ADD:-ok} in
        fail) echo "Error: the kernel lacks UBLK_F_USER_COPY" >&2; exit 1 ;;
        noid) echo '{"state": "LIVE"}'; exit 0 ;;
        esac
        sleep 30 </dev/null >/dev/null 2>&1 &
        printf '{\\n  "dev_id": 7,\\n  "pid": %d,\\n  "state": "LIVE"\\n}\\n' $! ;;
    del) exit 0 ;;
    esac
    """)


def run(script, tmp, env=None):
    """Runs SCRIPT in bash after sourcing strays.sh and bench.sh; returns
    (status, stdout, stderr)."""
    prologue = textwrap.dedent(f"""\
        set -euo pipefail
        NAME=t ROOT={tmp}
        usage() {{ echo "usage: t [--runtime SECS]"; }}
        source {LIB}/strays.sh
        source {LIB}/bench.sh
        """)
    full_env = {**os.environ, "FAKE_LOG": os.path.join(tmp, "calls.log"), **(env or {})}
    full_env.pop("UBLK_BENCH_IN_GUEST", None)
    p = subprocess.run(["bash", "-c", prologue + script], capture_output=True, text=True,
                       env=full_env, timeout=60)
    return p.returncode, p.stdout, p.stderr


class Options(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        subprocess.run(["rm", "-rf", self.tmp], check=True)

    def parse(self, *args):
        quoted = " ".join("'" + a + "'" for a in args)
        return run(f"""
            set -- {quoted}
            while [[ $# -gt 0 ]]; do
                if bench_option "$@"; then shift "$SHIFT"; continue; fi
                echo "own: $1"; shift
            done
            bench_check_options
            echo "runtime=$RUNTIME ramp=$RAMP build=$BUILD note=$NOTE results=$RESULTS"
            """, self.tmp)

    def test_common_options_both_spellings(self):
        rc, out, err = self.parse("--runtime", "3", "--ramp=0", "--depth", "--note", "a b",
                                  "--results=x", "--no-build")
        self.assertEqual(rc, 0, err)
        self.assertIn("own: --depth", out)
        self.assertIn(f"runtime=3 ramp=0 build=0 note=a b results={os.getcwd()}/x", out)

    def test_defaults(self):
        rc, out, _ = self.parse()
        self.assertEqual(rc, 0)
        self.assertIn(f"runtime=10 ramp=2 build=1 note= results={self.tmp}/results", out)

    def test_bad_values_are_usage_errors(self):
        for args, msg in ((["--runtime", "0"], "--runtime wants whole seconds >= 1"),
                          (["--ramp=x"], "--ramp wants whole seconds"),
                          (["--note"], "--note needs a value")):
            with self.subTest(args=args):
                rc, _, err = self.parse(*args)
                self.assertEqual(rc, 2)
                self.assertIn(f"t: {msg}", err)
                self.assertIn("usage: t", err)

    def test_help_exits_0(self):
        rc, out, _ = self.parse("--help")
        self.assertEqual((rc, out.strip()), (0, "usage: t [--runtime SECS]"))


class PerfNullOptions(unittest.TestCase):
    """perf-null's own options are checked before anything runs."""

    def test_bad_burst_and_rounds_are_usage_errors(self):
        script = os.path.join(LIB, "..", "perf-null")
        for args, msg in ((["--burst", "0"], "--burst wants a whole number from 1 to 32"),
                          (["--burst=33"], "--burst wants a whole number from 1 to 32"),
                          (["--rounds", "tuned,fast"], "unknown round 'fast' (tuned, default, burst)"),
                          (["--repeat", "0"], "--repeat wants a whole number from 1 to 20"),
                          (["--repeat=21"], "--repeat wants a whole number from 1 to 20")):
            with self.subTest(args=args):
                p = subprocess.run([script, "--no-build", *args], capture_output=True, text=True, timeout=60)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertIn(msg, p.stderr)


class Devices(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.bin = os.path.join(self.tmp, "ublk-bench")
        with open(self.bin, "w", encoding="utf-8") as f:
            f.write(FAKE_BIN)
        os.chmod(self.bin, 0o755)

    def tearDown(self):
        subprocess.run(["rm", "-rf", self.tmp], check=True)

    def calls(self):
        with open(os.path.join(self.tmp, "calls.log"), encoding="utf-8") as f:
            return f.read().splitlines()

    def add(self, fake_add, then=""):
        return run(f"""
            BIN={self.bin} DEV_WAIT_TENTHS=1
            rc=0; bench_add {self.tmp}/add.json {self.tmp}/add.err null -q 1 --json || rc=$?
            echo "rc=$rc id=$DEV_ID dev=$DEV devs=${{DEVS[*]}} pids=${{#SERVER_PIDS[@]}} err=$ADD_ERR"
            {then}
            """, self.tmp, {"FAKE_ADD": fake_add})

    def test_add_failure_names_the_reason_and_records_nothing(self):
        rc, out, _ = self.add("fail")
        self.assertEqual(rc, 0)
        self.assertIn("rc=1 id= dev= devs= pids=0", out)
        self.assertIn("err=ublk-bench add null -q 1 --json failed: Error: the kernel lacks UBLK_F_USER_COPY",
                      out)

    def test_add_without_an_id(self):
        _, out, _ = self.add("noid")
        self.assertIn('rc=2 id= dev= devs= pids=0 err=no device id in the add output: {"state": "LIVE"}', out)

    def test_device_and_server_are_recorded_and_torn_down(self):
        # No /dev/ublkb7 here: add "succeeds" but the block device never shows
        # (rc 3); the device and its server are recorded all the same, and the
        # teardown deletes the one and, the server still running, kills it and
        # fails the run.
        rc, out, err = self.add("ok", """
            pid=${SERVER_PIDS[0]}
            bench_teardown 0
            echo "exit=$EXIT_RC alive=$(running "$pid" && echo yes || echo no)"
            """)
        self.assertEqual(rc, 0, err)
        self.assertIn("rc=3 id=7 dev=/dev/ublkb7 devs=7 pids=1 err=/dev/ublkb7 did not appear within 0s", out)
        self.assertIn("exit=1 alive=no", out)
        self.assertIn("del -n 7", self.calls())
        self.assertIn("outlived their devices", err)

    def test_del_forgets_the_device(self):
        rc, out, err = self.add("ok", """
            bench_del 7 {tmp}/del.err
            echo "after del: devs=${{DEVS[*]}} failed=$FAILED"
            kill "${{SERVER_PIDS[0]}}"
            """.format(tmp=self.tmp))
        self.assertEqual(rc, 0, err)
        self.assertIn("after del: devs= failed=0", out)


class Fio(unittest.TestCase):
    def test_status_and_reason_of_a_failed_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            rc, out, err = run(f"""
                rc=0; bench_fio 10 {tmp}/err bash -c 'echo "fio: bad option" >&2; exit 3' || rc=$?
                echo "rc=$rc pid=$FIO_PID err=$FIO_ERR"
                bench_fio 10 {tmp}/err true && echo "ok err=$FIO_ERR"
                """, tmp)
        self.assertEqual(rc, 0, err)
        self.assertIn("rc=3 pid= err=fio exit 3: fio: bad option", out)
        self.assertIn("ok err=\n", out)


if __name__ == "__main__":
    unittest.main()
