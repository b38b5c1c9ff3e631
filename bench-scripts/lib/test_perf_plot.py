"""Tests for perf_plot.py on the example reports in results/ and on canned edge cases."""

import io
import json
import os
import tempfile
import unittest
import xml.etree.ElementTree as ET
from contextlib import redirect_stderr

import perf_plot

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")
SVG = "{http://www.w3.org/2000/svg}"


def example(kind):
    with open(os.path.join(RESULTS, f"{kind}-example.json"), encoding="utf-8") as f:
        return json.load(f)


def bars_of(svg):
    root = ET.fromstring(svg)
    return [r for r in root.iter(SVG + "rect") if r.get("class") == "bar"], \
        [ln for ln in root.iter(SVG + "line") if ln.get("class") == "ref"]


def titles(elems):
    return sorted(e.find(SVG + "title").text for e in elems)


class ChartFromExamples(unittest.TestCase):
    def test_perf_null_reference_is_null_blk(self):
        """One group per round (tuned, default), each against its own null_blk."""
        report = example("perf-null")
        chart = perf_plot.chart_of(report)
        rounds = list(dict.fromkeys(r.get("round") for r in report["rows"]))
        self.assertEqual(len(chart.groups), len(rounds))
        for g, rnd in zip(chart.groups, rounds):
            rows = [r for r in report["rows"] if r.get("round") == rnd]
            ref = next(r for r in rows if r["name"] == "null_blk")
            self.assertEqual([(r.label, r.iops, r.p99_us) for r in g.refs],
                             [("null_blk", ref["iops"], ref["p99_us"])])
            self.assertEqual([b.label for b in g.bars], [r["name"] for r in rows if r["name"] != "null_blk"])
            self.assertTrue(rnd is None or g.name.endswith(rnd), g.name)

    def test_perf_nvme_groups_by_workload_reference_raw(self):
        report = example("perf-nvme")
        chart = perf_plot.chart_of(report)
        workloads = list(dict.fromkeys(r["workload"] for r in report["summary"]))
        self.assertEqual([g.name for g in chart.groups], workloads)
        for g in chart.groups:
            raw = [r for r in report["summary"]
                   if r["workload"] == g.name and r["name"] == "nvme-raw"]
            self.assertEqual([r.iops for r in g.refs], [r["iops"] for r in raw])
            self.assertNotIn("nvme-raw", [b.label for b in g.bars])

    def test_matrix_kernel_rows_are_references(self):
        report = example("matrix")
        chart = perf_plot.chart_of(report)
        self.assertEqual([g.name for g in chart.groups], report["config"]["jobs"])
        kernel = {r["target"] for r in report["rows"] if r["mode"] == "kernel"}
        ublk = [r for r in report["rows"] if r["mode"] != "kernel"]
        for g in chart.groups:
            self.assertEqual({r.label for r in g.refs}, kernel)
            self.assertEqual(len(g.bars), len([r for r in ublk if r["job"] == g.name]))
        bar = chart.groups[0].bars[0]
        row = next(r for r in ublk if r["job"] == chart.groups[0].name)
        self.assertEqual((bar.iops, bar.p99_us), (row["iops"], row["clat_p99_us"]))


class Render(unittest.TestCase):
    def test_every_ok_bar_is_drawn_in_both_panels(self):
        for kind in perf_plot.CHARTS:
            with self.subTest(kind=kind):
                chart = perf_plot.chart_of(example(kind))
                rects, refs = bars_of(perf_plot.render(chart))
                bars = [b for g in chart.groups for b in g.bars if b.status == "ok"]
                self.assertEqual(len(rects), 2 * len(bars))
                self.assertEqual(len(refs), 2 * sum(len(g.refs) for g in chart.groups))
                self.assertIn(f"{bars[0].label}: {perf_plot.si(bars[0].iops)}", titles(rects))

    def test_taller_bar_for_more_iops(self):
        chart = perf_plot.Chart("t", "s", [perf_plot.Group("g", [], [
            perf_plot.Bar("a", "ok", 1000.0, 10.0), perf_plot.Bar("b", "ok", 3000.0, 100.0)])])
        rects, _ = bars_of(perf_plot.render(chart))
        heights = [float(r.get("height")) for r in rects]
        self.assertAlmostEqual(heights[1] / heights[0], 3.0, places=2)  # IOPS: linear
        self.assertGreater(heights[3], heights[2])  # p99: log, still ordered

    def test_failed_run_has_status_text_not_bar(self):
        chart = perf_plot.Chart("t", "s", [perf_plot.Group("g", [], [
            perf_plot.Bar("ok-one", "ok", 1000.0, 10.0),
            perf_plot.Bar("broken", "unsupported", None, None)])])
        svg = perf_plot.render(chart)
        rects, _ = bars_of(svg)
        self.assertEqual(titles(rects), sorted(["ok-one: 1k", "ok-one: 10 \u00b5s"]))
        self.assertEqual(svg.count(">unsupported</text>"), 2)

    def test_unknown_kind_is_refused(self):
        with self.assertRaisesRegex(ValueError, "perf-null, perf-nvme or matrix"):
            perf_plot.chart_of({"kind": "downtime"})


class WriteSvg(unittest.TestCase):
    def test_writes_beside_the_json(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "matrix-20260101T000000Z.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(example("matrix"), f)
            out = perf_plot.write_svg(path)
            self.assertEqual(out, path[:-5] + ".svg")
            with open(out, encoding="utf-8") as f:
                self.assertEqual(ET.fromstring(f.read()).tag, SVG + "svg")

    def test_main_exit_status(self):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "x.json")
            with open(bad, "w", encoding="utf-8") as f:
                f.write('{"kind": "nope"}')
            err = io.StringIO()
            with redirect_stderr(err):
                self.assertEqual(perf_plot.main(["perf_plot.py", bad]), 1)
            self.assertIn("kind 'nope' is not one of", err.getvalue())
            self.assertFalse(os.path.exists(bad[:-5] + ".svg"))
        with redirect_stderr(io.StringIO()) as err:
            self.assertEqual(perf_plot.main(["perf_plot.py"]), 2)
        self.assertIn("perf_plot.py RESULT.json [OUT.svg]", err.getvalue())


if __name__ == "__main__":
    unittest.main()
