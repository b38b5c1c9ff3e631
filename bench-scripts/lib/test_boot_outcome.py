"""Tests for bench-scripts/lib/boot_outcome.sh (how bench-scripts/vm reads a
finished guest run: retry a boot that panicked, fail one that died after the
command started) and for kill_strays in bench-scripts/lib/strays.sh.

Run from the project's top folder:
    python3 -m unittest discover -s bench-scripts/lib -p 'test_*.py' -v
Standard library and bash only; no guest, no root.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.abspath(__file__))

CLEAN_BOOT = """\
[    0.000000] Linux version 7.3.4+deb13-amd64 (debian-kernel@lists.debian.org)
[    2.101234] nvme nvme0: 2/0/0 default/read/poll queues
[    3.456789] 9pnet: Installing 9P2000 support
[    4.012345] null_blk: disk nullb0 created
"""

# The shape of the panic seen now and then under TCG, before our command.
INT3_PANIC = CLEAN_BOOT + """\
[    1.234567] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    1.234570] CPU: 1 UID: 0 PID: 1 Comm: swapper/0 Not tainted 7.3.4+deb13-amd64 #1
[    1.234580] RIP: 0010:text_poke_bp_batch+0x1a2/0x290
[    1.234600] ---[ end trace 0000000000000000 ]---
[    1.234610] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b
"""

INIT_ERROR = CLEAN_BOOT + """\
[    4.100000] vm-init: error: insmod null_blk.ko failed: insmod: can't insert 'null_blk.ko': Invalid argument
"""


class BootOutcome(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="boot-outcome.")
        self.status = os.path.join(self.dir, "status")
        self.started = os.path.join(self.dir, "started")
        self.console = os.path.join(self.dir, "console.log")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def outcome(self, qrc=0, console=CLEAN_BOOT, status=None, started=False):
        with open(self.console, "w") as f:
            f.write(console)
        if status is not None:
            with open(self.status, "w") as f:
                f.write(status)
        if started:
            open(self.started, "w").close()
        out = subprocess.run(
            ["bash", "-c", 'source "$1"; boot_outcome "$2" "$3" "$4" "$5"', "test",
             os.path.join(HERE, "boot_outcome.sh"), str(qrc), self.status, self.started,
             self.console],
            capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def test_status_wins_over_everything(self):
        self.assertEqual(self.outcome(status="3\n", started=True, console=INT3_PANIC), "status")

    def test_empty_status_file_is_no_status(self):
        self.assertEqual(self.outcome(status="", started=True), "died-after-start")

    def test_timeout(self):
        self.assertEqual(self.outcome(qrc=124, started=True), "timeout")

    def test_panic_before_start_is_retried(self):
        self.assertEqual(self.outcome(console=INT3_PANIC), "boot-panic")

    def test_panic_after_start_is_not_retried(self):
        self.assertEqual(self.outcome(console=INT3_PANIC, started=True), "died-after-start")

    def test_init_error_is_not_retried(self):
        self.assertEqual(self.outcome(console=INIT_ERROR), "init-failed")

    def test_no_panic_no_mark(self):
        self.assertEqual(self.outcome(), "boot-failed")

    def test_missing_console_log(self):
        out = subprocess.run(
            ["bash", "-c", 'source "$1"; boot_outcome 0 "$2" "$3" "$4"', "test",
             os.path.join(HERE, "boot_outcome.sh"), self.status, self.started,
             os.path.join(self.dir, "absent.log")],
            capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "boot-failed")


class KillStrays(unittest.TestCase):
    """kill_strays on a process of our own named ublk-bench (a copy of sleep)."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="strays.")
        self.fake = os.path.join(self.dir, "ublk-bench")
        shutil.copy(shutil.which("sleep"), self.fake)

    def tearDown(self):
        shutil.rmtree(self.dir)

    def kill_strays(self, *pids):
        return subprocess.run(
            ["bash", "-c", 'source "$1"; shift; kill_strays "after the test" "$@"', "test",
             os.path.join(HERE, "strays.sh")] + [str(p) for p in pids],
            capture_output=True, text=True)

    def test_none_running_passes_quietly(self):
        proc = subprocess.Popen([self.fake, "0"])
        proc.wait()
        out = self.kill_strays(proc.pid)
        self.assertEqual((out.returncode, out.stderr), (0, ""))

    def test_a_stray_is_named_killed_and_fails(self):
        proc = subprocess.Popen([self.fake, "300"])
        try:
            time.sleep(0.2)
            out = self.kill_strays(proc.pid)
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertIn("stray ublk-bench process", out.stderr)
            self.assertIn(f"pid {proc.pid} ", out.stderr)
            self.assertIn("300", out.stderr)  # its command line
            self.assertIsNotNone(proc.poll(), "the stray still runs")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    unittest.main()
