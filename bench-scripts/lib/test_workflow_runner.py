"""Tests of workflow_runner: expressions, GITHUB_ENV, step semantics, refusals, the real workflow."""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflow_runner as wr  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github/workflows/perf-regress.yml"


def ctx(**over):
    c = {
        "github": {"sha": "abc", "ref": "refs/heads/main", "run_id": "7", "event_name": "push",
                   "repository": "o/r", "workspace": "/w", "event": wr.Loose()},
        "runner": {"temp": "/t", "name": "box", "os": "Linux", "arch": "X64"},
        "vars": wr.Loose(),
        "inputs": {"make_baseline": None},
    }
    c.update(over)
    return c


class Expressions(unittest.TestCase):
    def test_or_default(self):
        expr = "${{ vars.DIR || '/var/lib/x' }}"
        self.assertEqual(wr.interpolate(expr, ctx()), "/var/lib/x")
        self.assertEqual(wr.interpolate(expr, ctx(vars=wr.Loose(DIR="/d"))), "/d")

    def test_unset_var_is_empty(self):
        self.assertEqual(wr.interpolate("${{ vars.NVME }}", ctx()), "")

    def test_interpolation_in_text(self):
        self.assertEqual(wr.interpolate("${{ runner.temp }}/p/*.json\nx-${{ github.run_id }}", ctx()),
                         "/t/p/*.json\nx-7")

    def test_unknown_things_are_refused(self):
        for text in ("${{ secrets.TOKEN }}", "${{ github.actor }}", "${{ runner.temp.x }}",
                     "${{ contains(github.ref, 'main') }}", "${{ format('{0}', 1) }}", "${{ inputs.other }}",
                     "${{ github.sha[0] }}", "${{ vars.A"):
            with self.subTest(text=text), self.assertRaises(wr.Refused):
                wr.interpolate(text, ctx())

    def test_unknown_path_refused_even_where_short_circuit_skips_it(self):
        with self.assertRaises(wr.Refused):
            wr.condition("true || secrets.X", ctx(), "success")

    def test_event_payload_is_loose(self):
        fork = "github.event_name != 'pull_request' || github.event.pull_request.head.repo.full_name == github.repository"
        self.assertTrue(wr.condition(fork, ctx(), "success"))
        pr = ctx()
        pr["github"] = dict(pr["github"], event_name="pull_request",
                            event=wr.Loose(pull_request={"head": {"repo": {"full_name": "fork/r"}}}))
        self.assertFalse(wr.condition(fork, pr, "success"))
        pr["github"]["event"]["pull_request"]["head"]["repo"]["full_name"] = "O/R"  # case-insensitive
        self.assertTrue(wr.condition(fork, pr, "success"))

    def test_if_implies_success(self):
        yes = ctx(inputs={"make_baseline": True})
        self.assertTrue(wr.condition("${{ inputs.make_baseline }}", yes, "success"))
        self.assertFalse(wr.condition("${{ inputs.make_baseline }}", yes, "failure"))
        self.assertFalse(wr.condition("${{ !inputs.make_baseline }}", yes, "success"))
        self.assertTrue(wr.condition("${{ !inputs.make_baseline }}", ctx(), "success"))  # push: null
        self.assertTrue(wr.condition("${{ always() }}", ctx(), "failure"))
        self.assertFalse(wr.condition(None, ctx(), "failure"))
        self.assertTrue(wr.condition("failure()", ctx(), "failure"))

    def test_loose_equality_and_precedence(self):
        c = ctx()
        self.assertTrue(wr.condition("1 == '1' && null == 0 && !(true == 'x')", c, "success"))
        self.assertTrue(wr.condition("false || 'a' == 'b' || 2 > 1", c, "success"))
        self.assertEqual(wr.interpolate("${{ 'it''s' }}", c), "it's")


class EnvFile(unittest.TestCase):
    def parse(self, text):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write(text)
        self.addCleanup(os.unlink, f.name)
        return wr.parse_env_file(f.name)

    def test_forms(self):
        self.assertEqual(self.parse("A=1\nB=x=y\n\nC<<EOF\nl1\nl2\nEOF\n"),
                         {"A": "1", "B": "x=y", "C": "l1\nl2"})

    def test_bad(self):
        for text in ("no equals\n", "D<<EOF\nnever closed\n", "1X=2\n"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                self.parse(text)


class RunJob(unittest.TestCase):
    def run_workflow(self, yml, *extra):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        wf = os.path.join(d.name, "wf.yml")
        with open(wf, "w") as f:
            f.write(textwrap.dedent(yml))
        # A child process: the steps' output goes to its stdout, not through sys.stdout.
        p = subprocess.run([sys.executable, wr.__file__, "--workflow", wf, "--workspace", d.name,
                            "--runner-temp", os.path.join(d.name, "t"), "--runner-name", "box",
                            "--sha", "feedface", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        return p.returncode, p.stdout, d.name

    def test_steps_env_status_and_artifacts(self):
        rc, out, d = self.run_workflow("""
            on: {workflow_dispatch: {inputs: {mb: {type: boolean, default: false}}}}
            defaults: {run: {shell: bash}}
            jobs:
              j:
                runs-on: [self-hosted]
                env: {J: "${{ vars.V || 'dflt' }}", K: job}
                steps:
                  - uses: actions/checkout@v4
                  - name: set
                    run: |
                      echo "FOO=bar" >> "$GITHUB_ENV"
                      echo "K=from-env-file" >> "$GITHUB_ENV"
                      printf 'M<<E\\nl1\\nl2\\nE\\n' >> "$GITHUB_ENV"
                      mkdir -p "$RUNNER_TEMP/out" && echo 1 > "$RUNNER_TEMP/out/a.json"
                  - name: see
                    env: {S: "${{ github.sha }}"}
                    run: |
                      test "$FOO $J $K $S $RUNNER_NAME $GITHUB_SHA" = "bar dflt job feedface box feedface"
                      test "$M" = "$(printf 'l1\\nl2')"
                      test "$PWD" = "$GITHUB_WORKSPACE"
                  - name: only with mb
                    if: ${{ inputs.mb }}
                    run: exit 9
                  - name: pipefail
                    run: false | true
                  - name: after failure
                    run: echo SHOULD-NOT-RUN
                  - name: cleanup
                    if: ${{ always() }}
                    run: echo cleanup-ran
                  - uses: actions/upload-artifact@v4
                    if: ${{ always() }}
                    with:
                      name: a-${{ github.run_id }}
                      path: |
                        ${{ runner.temp }}/out/*.json
                        ${{ runner.temp }}/out/*.svg
            """, "--event", "workflow_dispatch")
        self.assertEqual(rc, 1, out)  # the pipefail step's status
        self.assertIn("--- see: ok", out)
        self.assertIn("--- skipped: if: ${{ inputs.mb }} is false", out)
        self.assertIn("--- pipefail: FAILED (exit 1)", out)
        self.assertNotIn("SHOULD-NOT-RUN", out)
        self.assertIn("cleanup-ran", out)
        self.assertIn("out/*.json: 1 file(s)", out)
        self.assertIn("warning: no file matches", out)
        self.assertIn("job j: failure", out)

    def test_strict_artifacts_and_input_true(self):
        rc, out, _ = self.run_workflow("""
            on: {workflow_dispatch: {inputs: {mb: {type: boolean}}}}
            jobs:
              j:
                runs-on: x
                steps:
                  - if: ${{ inputs.mb }}
                    run: echo mb-is-true
                  - uses: actions/upload-artifact@v4
                    with: {path: "${{ runner.temp }}/none/*.json"}
            """, "--event", "workflow_dispatch", "--input", "mb=true", "--strict-artifacts")
        self.assertIn("mb-is-true", out)
        self.assertEqual(rc, 1, out)

    def test_skip_step_is_named_and_printed(self):
        yml = """
            jobs:
              j:
                runs-on: x
                steps:
                  - name: Build
                    run: exit 5
            """
        rc, out, _ = self.run_workflow(yml, "--skip-step", "Build=built on the host")
        self.assertEqual(rc, 0, out)
        self.assertIn("skipped by --skip-step: built on the host", out)
        rc, out, _ = self.run_workflow(yml, "--skip-step", "Biuld=x")
        self.assertEqual(rc, 3, out)

    def test_refusals_before_any_step(self):
        for step in ("run: echo RAN\n                    working-directory: x",
                     "run: echo RAN\n                    shell: sh",
                     "uses: actions/cache@v4",
                     "run: echo RAN ${{ secrets.X }}"):
            yml = f"""
            jobs:
              j:
                runs-on: x
                steps:
                  - run: echo RAN-FIRST
                  - {step}
            """
            with self.subTest(step=step):
                rc, out, _ = self.run_workflow(yml)
                self.assertEqual(rc, 3, out)
                self.assertIn("refused", out)
                self.assertNotIn("RAN-FIRST", out)


class RealWorkflow(unittest.TestCase):
    """The project's workflow is accepted as it is, and its every expression is known."""

    def test_loads_and_checks_on_both_events(self):
        doc = wr.load(WORKFLOW)
        _, job = wr.pick_job(doc, None)
        names = [wr.step_name(s) for s in job["steps"]]
        self.assertIn("Build", names)
        for event, given in (("workflow_dispatch", {"make_baseline": "true"}), ("push", {})):
            c = ctx(inputs=wr.inputs_of(doc, event, given))
            self.assertTrue(wr.condition(job["if"], c, "success"))
            for v in job["env"].values():
                wr.interpolate(v, c)
            ran = [wr.step_name(s) for s in job["steps"] if wr.condition(s.get("if"), c, "success")]
            self.assertEqual("Make the baseline (workflow_dispatch with make_baseline)" in ran,
                             event == "workflow_dispatch")
            self.assertEqual("Compare with the machine's baseline" in ran, event == "push")

    def test_dump_runs_writes_each_run_block(self):
        with tempfile.TemporaryDirectory() as d:
            rc = subprocess.run([sys.executable, wr.__file__, "--workflow", str(WORKFLOW), "--dump-runs", d],
                                stdout=subprocess.DEVNULL, check=False).returncode
            self.assertEqual(rc, 0)
            files = sorted(os.listdir(d))
            self.assertEqual(len(files), 6, files)
            with open(os.path.join(d, files[1])) as f:
                self.assertIn("cargo build --release --locked", f.read())


if __name__ == "__main__":
    unittest.main()
