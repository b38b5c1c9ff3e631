#!/usr/bin/env python3
"""SVG plot of a perf-null, perf-nvme or matrix report: IOPS and p99 per target and mode.

    perf_plot.py RESULT.json [OUT.svg]      (default OUT: RESULT with .svg)

Two panels, IOPS (linear) above p99 completion latency (log scale: the matrix spans
qd1 on null_blk at ~1 us to qd32 on emulated NVMe at ~6 ms). One group of bars per
fio job or workload; one bar per ublk target and mode; the in-kernel reference
(null_blk, raw NVMe) is a dashed line across its group, as the downtime plot marks
its gaps. A run that failed or is unsupported has no bar, only its status.
Standard library only: the scripts run it on the host and in the guest.
"""

import json
import math
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

WIDTH = 1000
LEFT, RIGHT = 80, 20
PANEL_H = 220
MAX_BAR_W = 90
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a"]
REF_COLOURS = ["#d62728", "#000000", "#555555"]
STYLE = (".t{font-size:16px;font-weight:bold}.s{font-size:12px;fill:#444}"
         ".a{font-size:11px;fill:#333}"
         ".v{font-size:9px;fill:#333;paint-order:stroke;stroke:#fff;stroke-width:3px}"
         ".grid{stroke:#ddd;stroke-width:1}.ax{stroke:#333;stroke-width:1}"
         ".ref{stroke-width:2;stroke-dasharray:6 3}")


@dataclass
class Bar:
    label: str
    status: str
    iops: float | None
    p99_us: float | None


@dataclass
class Group:
    name: str
    refs: list = field(default_factory=list)  # Bar, drawn as lines
    bars: list = field(default_factory=list)


@dataclass
class Chart:
    title: str
    subtitle: str
    groups: list


def _bar(label, row, p99_key):
    return Bar(label, row.get("status", "ok"), row.get("iops"), row.get(p99_key))


def _subtitle(report, extra):
    return "; ".join([extra, f"kernel {report.get('kernel', '?')}",
                      f"git {report.get('git_rev', '?')}", report.get("timestamp", "")])


def chart_perf_null(report):
    """One group per round (tuned, default; reports before rounds have one)."""
    cfg = report.get("config", {})
    job = f"{cfg.get('rw', '')} {cfg.get('bs', '')} qd{cfg.get('iodepth', '')}"
    groups = {}
    for row in report["rows"]:
        rnd = row.get("round")
        group = groups.setdefault(rnd, Group(f"{job} {rnd}" if rnd else job))
        target = group.refs if row["name"] == "null_blk" else group.bars
        target.append(_bar(row["name"], row, "p99_us"))
    return Chart("ublk-bench perf-null: ublk null vs null_blk", _subtitle(
        report, f"{cfg.get('runtime_s', '?')} s per run"), list(groups.values()))


def chart_perf_nvme(report):
    groups = {}
    for row in report["summary"]:
        group = groups.setdefault(row["workload"], Group(row["workload"]))
        target = group.refs if row["name"] == "nvme-raw" else group.bars
        bar = _bar(row["name"], row, "p99_us")
        if not row.get("runs_ok"):
            bar.status = "failed"
        target.append(bar)
    rounds = report.get("config", {}).get("rounds", "?")
    return Chart("ublk-bench perf-nvme: ublk nvme vs raw NVMe (median of rounds)", _subtitle(
        report, f"{rounds} rounds"), list(groups.values()))


def chart_matrix(report):
    groups = {}
    for row in report["rows"]:
        group = groups.setdefault(row["job"], Group(row["job"]))
        if row.get("mode") == "kernel":
            group.refs.append(_bar(row["target"], row, "clat_p99_us"))
        else:
            group.bars.append(_bar(f"{row['target']} {row['mode']}", row, "clat_p99_us"))
    summ = report.get("summary", {})
    return Chart("ublk-bench matrix: IOPS and p99 per target and mode", _subtitle(
        report, f"{summ.get('ok', '?')}/{summ.get('rows', '?')} ok"), list(groups.values()))


CHARTS = {"perf-null": chart_perf_null, "perf-nvme": chart_perf_nvme, "matrix": chart_matrix}


def chart_of(report):
    kind = report.get("kind")
    if kind not in CHARTS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(CHARTS)}: "
                         "give a perf-null, perf-nvme or matrix JSON")
    return CHARTS[kind](report)


def si(v):
    """Short number: 85029 -> 85.0k."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def us(v):
    if v >= 1e6:
        return f"{v / 1e6:.3g} s"
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.3g} \u00b5s"


class LinearAxis:
    def __init__(self, vmax):
        raw = max(vmax, 1e-9) / 5
        mag = 10 ** math.floor(math.log10(raw))
        self.step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        self.top = self.step * math.ceil(max(vmax, 1e-9) / self.step)

    def frac(self, v):
        return v / self.top

    def ticks(self):
        n = round(self.top / self.step)
        return [(i * self.step, si(i * self.step)) for i in range(n + 1)]


class LogAxis:
    def __init__(self, vmin, vmax):
        self.lo = math.floor(math.log10(max(vmin, 1e-3)))
        self.hi = max(math.ceil(math.log10(max(vmax, 1e-3))), self.lo + 1)

    def frac(self, v):
        return (math.log10(max(v, 10 ** self.lo)) - self.lo) / (self.hi - self.lo)

    def ticks(self):
        return [(10.0 ** e, us(10.0 ** e)) for e in range(self.lo, self.hi + 1)]


def _labels(chart):
    """Bar labels in first-seen order: one colour each across groups."""
    seen = {}
    for g in chart.groups:
        for b in g.bars:
            seen.setdefault(b.label, COLOURS[len(seen) % len(COLOURS)])
    return seen


def _ref_labels(chart):
    seen = {}
    for g in chart.groups:
        for r in g.refs:
            seen.setdefault(r.label, REF_COLOURS[len(seen) % len(REF_COLOURS)])
    return seen


def _values(chart, attr):
    return [getattr(b, attr) for g in chart.groups for b in g.refs + g.bars
            if b.status == "ok" and getattr(b, attr)]


def _text(out, x, y, cls, s, anchor="middle", rotate=False):
    rot = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}"{rot}>'
               f"{escape(s)}</text>")


def _panel(out, chart, top, attr, axis, title, fmt, colours, ref_colours):
    bottom, width = top + PANEL_H, WIDTH - LEFT - RIGHT

    def y_of(v):
        return bottom - axis.frac(v) * PANEL_H
    for v, label in axis.ticks():
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y_of(v):.1f}" x2="{WIDTH - RIGHT}" '
                   f'y2="{y_of(v):.1f}"/>')
        _text(out, LEFT - 6, y_of(v) + 4, "a", label, "end")
    out.append(f'<line class="ax" x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}"/>')
    _text(out, 18, top + PANEL_H / 2, "a", title, rotate=True)
    gw = width / max(len(chart.groups), 1)
    for gi, g in enumerate(chart.groups):
        x0 = LEFT + gi * gw
        _group(out, g, x0, gw, attr, y_of, bottom, fmt, colours, ref_colours)
        _text(out, x0 + gw / 2, bottom + 14, "a", g.name)


def _group(out, g, x0, gw, attr, y_of, bottom, fmt, colours, ref_colours):
    n = max(len(g.bars), 1)
    bw = min((gw * 0.84) / n, MAX_BAR_W)
    pad = (gw - bw * n) / 2  # the bars centred in their group
    labels = []  # drawn last: on top of the reference lines
    for i, b in enumerate(g.bars):
        x, v = x0 + pad + i * bw, getattr(b, attr)
        if b.status != "ok" or not v:
            _text(out, x + bw / 2, bottom - 4, "v", b.status if b.status != "ok" else "no data",
                  "start", rotate=True)
            continue
        y = y_of(v)
        out.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
                   f'height="{bottom - y:.1f}" fill="{colours[b.label]}"><title>'
                   f"{escape(b.label)}: {escape(fmt(v))}</title></rect>")
        _text(labels, x + bw / 2, y - 3, "v", fmt(v))
    for r in g.refs:
        v = getattr(r, attr)
        if r.status != "ok" or not v:
            continue
        out.append(f'<line class="ref" x1="{x0 + gw * 0.04:.1f}" y1="{y_of(v):.1f}" '
                   f'x2="{x0 + gw * 0.96:.1f}" y2="{y_of(v):.1f}" '
                   f'stroke="{ref_colours[r.label]}"><title>{escape(r.label)}: '
                   f"{escape(fmt(v))}</title></line>")
    out.extend(labels)


def _legend(out, top, colours, ref_colours):
    x, y = LEFT, top
    items = [(k, c, False) for k, c in ref_colours.items()] + \
        [(k, c, True) for k, c in colours.items()]
    for label, colour, is_bar in items:
        if x + 150 > WIDTH - RIGHT:
            x, y = LEFT, y + 18
        if is_bar:
            out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{colour}"/>')
        else:
            out.append(f'<line class="ref key" x1="{x}" y1="{y - 4}" x2="{x + 14}" y2="{y - 4}" '
                       f'stroke="{colour}"/>')
        suffix = "" if is_bar else " (reference)"
        _text(out, x + 18, y, "a", label + suffix, "start")
        x += 160
    return y


def render(chart):
    """The chart as an SVG document (a string)."""
    colours, ref_colours = _labels(chart), _ref_labels(chart)
    iops, p99 = _values(chart, "iops"), _values(chart, "p99_us")
    out = []
    _text(out, WIDTH / 2, 24, "t", chart.title)
    _text(out, WIDTH / 2, 44, "s", chart.subtitle)
    _panel(out, chart, 70, "iops", LinearAxis(max(iops, default=1)), "IOPS", si,
           colours, ref_colours)
    p99_top = 70 + PANEL_H + 50
    _panel(out, chart, p99_top, "p99_us", LogAxis(min(p99, default=1), max(p99, default=10)),
           "p99 completion latency (log)", us, colours, ref_colours)
    end = _legend(out, p99_top + PANEL_H + 44, colours, ref_colours)
    height = end + 16
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">',
        f"<style>{STYLE}</style>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#fff"/>',
    ]
    return "\n".join(head + out + ["</svg>", ""])


def write_svg(json_path, svg_path=None):
    """Reads a report JSON and writes its plot; returns the SVG's path."""
    with open(json_path, encoding="utf-8") as f:
        report = json.load(f)
    svg_path = svg_path or (json_path[:-5] if json_path.endswith(".json") else json_path) + ".svg"
    svg = render(chart_of(report))
    with open(svg_path, "w", encoding="utf-8") as f:
        f.write(svg)
    return svg_path


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(write_svg(*argv[1:]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"perf_plot: {argv[1]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
