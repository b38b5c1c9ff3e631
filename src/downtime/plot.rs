//! The downtime run's picture, hand-written SVG: the top panel is the
//! client's IOPS over time with every kill (red, dashed), every LIVE moment
//! (green) and every measured gap (shaded); the bottom panel has one bar per
//! cycle with its gap, stacked by phase when the run was traced (the part of
//! the gap no phase covers stays orange), with a legend of the phases.

use std::fmt::Write as _;

/// What the plot shows; times in ms since the run's start.
#[derive(Debug, Clone, Default)]
pub struct PlotData {
    pub title: String,
    pub subtitle: String,
    /// What the red lines mark: "kill", or "restart" for a planned handover.
    pub kill_label: String,
    /// Successful completions per millisecond.
    pub ok_ms: Vec<u32>,
    pub cycles: Vec<PlotCycle>,
    /// The phase names the cycles' segments index, in stacking order.
    pub phase_names: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PlotCycle {
    pub kill_ms: f64,
    pub live_ms: Option<f64>,
    /// The gap's start and end (ms since the run's start), if measured.
    pub gap: Option<(f64, f64)>,
    /// Phases as (index into `phase_names`, start, end), ms since the run's start.
    pub phases: Vec<(usize, f64, f64)>,
}

/// Phase colours, in stacking order (repeating after 12).
const PHASE_COLOURS: [&str; 12] = [
    "#1f77b4", "#aec7e8", "#9467bd", "#c5b0d5", "#d62728", "#ff9896", "#8c564b", "#c49c94", "#2ca02c",
    "#98df8a", "#17becf", "#7f7f7f",
];
/// Height added under the bottom panel for the phase legend.
const LEGEND_H: f64 = 50.0;

const W: f64 = 1000.0;
const H: f64 = 660.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP1: f64 = 70.0;
const BOT1: f64 = 370.0;
const TOP2: f64 = 440.0;
const BOT2: f64 = 610.0;

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A round tick step giving about `target` ticks over `range`.
fn nice_step(range: f64, target: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, class: &str, s: &str) {
    let _ = writeln!(
        svg,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" class="{class}">{}</text>"#,
        esc(s)
    );
}

/// Horizontal grid lines from 0 to `ymax` every `step`, labelled on the left.
fn y_grid(
    s: &mut String,
    (ymax, step): (f64, f64),
    x1: f64,
    ys: &dyn Fn(f64) -> f64,
    label: fn(f64) -> String,
) {
    let mut v = 0.0;
    while v <= ymax {
        let _ = writeln!(s, r#"<line class="grid" x1="{LEFT}" y1="{0:.1}" x2="{x1}" y2="{0:.1}"/>"#, ys(v));
        text(s, LEFT - 6.0, ys(v) + 4.0, "end", "a", &label(v));
        v += step;
    }
}

pub fn render(d: &PlotData) -> String {
    let mut s = String::with_capacity(64 * 1024);
    let h = if d.phase_names.is_empty() { H } else { H + LEGEND_H };
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    s.push_str(
        "<style>.t{font-size:16px;font-weight:bold}.s{font-size:12px;fill:#444}.a{font-size:11px;fill:#333}\
         .k{stroke:#d62728;stroke-width:1;stroke-dasharray:4 3}.l{stroke:#2ca02c;stroke-width:1}\
         .g{fill:#ff7f0e;fill-opacity:0.25}.grid{stroke:#ddd;stroke-width:1}.ax{stroke:#333;stroke-width:1}</style>\n",
    );
    let _ = writeln!(s, r##"<rect x="0" y="0" width="{W}" height="{h}" fill="#fff"/>"##);
    text(&mut s, W / 2.0, 24.0, "middle", "t", &d.title);
    text(&mut s, W / 2.0, 44.0, "middle", "s", &d.subtitle);
    iops_panel(&mut s, d);
    gap_panel(&mut s, d);
    phase_legend(&mut s, &d.phase_names);
    s.push_str("</svg>\n");
    s
}

fn iops_panel(s: &mut String, d: &PlotData) {
    let x1 = W - RIGHT;
    let pw = x1 - LEFT;
    let total_ms = d.ok_ms.len().max(1) as f64;
    let xs = |ms: f64| LEFT + ms / total_ms * pw;
    // One bin per pixel or so: the mean IOPS of its milliseconds.
    let bins = (pw as usize).min(d.ok_ms.len()).max(1);
    let per = d.ok_ms.len().div_ceil(bins).max(1);
    let means: Vec<(f64, f64)> = d
        .ok_ms
        .chunks(per)
        .enumerate()
        .map(|(i, c)| {
            let mid = (i * per) as f64 + c.len() as f64 / 2.0;
            (mid, c.iter().map(|&n| n as f64 * 1000.0).sum::<f64>() / c.len() as f64)
        })
        .collect();
    let ymax = means.iter().map(|m| m.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let ys = |v: f64| BOT1 - v / ymax * (BOT1 - TOP1);
    // Grid and axes.
    y_grid(s, (ymax, nice_step(ymax, 5.0)), x1, &ys, fmt_num);
    let secs = total_ms / 1000.0;
    let xstep = nice_step(secs, 10.0);
    let mut t = 0.0;
    while t <= secs + 1e-9 {
        let x = xs(t * 1000.0);
        let _ =
            writeln!(s, r#"<line class="ax" x1="{x:.1}" y1="{BOT1}" x2="{x:.1}" y2="{:.1}"/>"#, BOT1 + 4.0);
        text(s, x, BOT1 + 16.0, "middle", "a", &trim(t));
        t += xstep;
    }
    text(s, LEFT + pw / 2.0, BOT1 + 32.0, "middle", "a", "time since start (s)");
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0:.1}" transform="rotate(-90 18 {0:.1})" text-anchor="middle" class="a">client IOPS (mean per {1} ms)</text>"#,
        (TOP1 + BOT1) / 2.0,
        per
    );
    // Gaps, then kills and LIVE moments, then the curve on top.
    for c in &d.cycles {
        if let Some((a, b)) = c.gap {
            let (xa, xb) = (xs(a), xs(b));
            let _ = writeln!(
                s,
                r#"<rect class="g" x="{xa:.2}" y="{TOP1}" width="{:.2}" height="{:.1}"/>"#,
                (xb - xa).max(1.0),
                BOT1 - TOP1
            );
        }
    }
    for (i, c) in d.cycles.iter().enumerate() {
        let x = xs(c.kill_ms);
        let _ = writeln!(s, r#"<line class="k" x1="{x:.2}" y1="{TOP1}" x2="{x:.2}" y2="{BOT1}"/>"#);
        text(s, x, TOP1 - 4.0, "middle", "a", &format!("K{}", i + 1));
        if let Some(l) = c.live_ms {
            let x = xs(l);
            let _ = writeln!(s, r#"<line class="l" x1="{x:.2}" y1="{TOP1}" x2="{x:.2}" y2="{BOT1}"/>"#);
        }
    }
    let mut pts = String::with_capacity(means.len() * 16);
    for (mid, v) in &means {
        let _ = write!(pts, "{:.1},{:.1} ", xs(*mid), ys(*v));
    }
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.2" points="{}"/>"##,
        pts.trim_end()
    );
    let _ = writeln!(s, r#"<line class="ax" x1="{LEFT}" y1="{BOT1}" x2="{x1}" y2="{BOT1}"/>"#);
    let _ = writeln!(s, r#"<line class="ax" x1="{LEFT}" y1="{TOP1}" x2="{LEFT}" y2="{BOT1}"/>"#);
    // Legend, under the axis, right-aligned.
    let lx = x1 - 270.0;
    let ly = BOT1 + 22.0;
    let _ = writeln!(
        s,
        r##"<rect x="{lx}" y="{ly}" width="270" height="20" fill="#fff" fill-opacity="0.85" stroke="#ccc"/>"##
    );
    let y = ly + 10.0;
    let _ = writeln!(s, r#"<line class="k" x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#, lx + 6.0, lx + 22.0);
    let kill_label = if d.kill_label.is_empty() { "kill" } else { &d.kill_label };
    text(s, lx + 26.0, y + 4.0, "start", "a", kill_label);
    let _ = writeln!(s, r#"<line class="l" x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#, lx + 70.0, lx + 86.0);
    text(s, lx + 90.0, y + 4.0, "start", "a", "LIVE");
    let _ = writeln!(s, r#"<rect class="g" x="{}" y="{}" width="16" height="10"/>"#, lx + 120.0, y - 5.0);
    text(s, lx + 140.0, y + 4.0, "start", "a", "gap (no completion)");
}

fn gap_panel(s: &mut String, d: &PlotData) {
    let x1 = W - RIGHT;
    let pw = x1 - LEFT;
    let gaps: Vec<Option<f64>> = d.cycles.iter().map(|c| c.gap.map(|(a, b)| b - a)).collect();
    let ymax = gaps.iter().flatten().fold(0.0f64, |m, &g| m.max(g)).max(0.001) * 1.15;
    let ys = |v: f64| BOT2 - v / ymax * (BOT2 - TOP2);
    y_grid(s, (ymax, nice_step(ymax, 4.0)), x1, &ys, trim);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0:.1}" transform="rotate(-90 18 {0:.1})" text-anchor="middle" class="a">gap (ms)</text>"#,
        (TOP2 + BOT2) / 2.0
    );
    let n = gaps.len().max(1) as f64;
    let band = pw / n;
    let bw = (band * 0.6).min(60.0);
    for (i, g) in gaps.iter().enumerate() {
        let cx = LEFT + band * (i as f64 + 0.5);
        match g {
            Some(g) => {
                let y = ys(*g);
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.2}" y="{y:.2}" width="{bw:.2}" height="{:.2}" fill="#ff7f0e"/>"##,
                    cx - bw / 2.0,
                    BOT2 - y
                );
                let c = &d.cycles[i];
                for (k, from, to) in stack(c) {
                    let (y0, y1) = (ys(to), ys(from));
                    let _ = writeln!(
                        s,
                        r#"<rect x="{:.2}" y="{y0:.2}" width="{bw:.2}" height="{:.2}" fill="{}"/>"#,
                        cx - bw / 2.0,
                        y1 - y0,
                        PHASE_COLOURS[k % PHASE_COLOURS.len()]
                    );
                }
                text(s, cx, y - 4.0, "middle", "a", &format!("{g:.1}"));
            }
            None => text(s, cx, BOT2 - 4.0, "middle", "a", "n/a"),
        }
        text(s, cx, BOT2 + 16.0, "middle", "a", &(i + 1).to_string());
    }
    let _ = writeln!(s, r#"<line class="ax" x1="{LEFT}" y1="{BOT2}" x2="{x1}" y2="{BOT2}"/>"#);
    let _ = writeln!(s, r#"<line class="ax" x1="{LEFT}" y1="{TOP2}" x2="{LEFT}" y2="{BOT2}"/>"#);
    text(s, LEFT + pw / 2.0, BOT2 + 34.0, "middle", "a", "cycle: client-visible gap per kill (ms)");
}

/// A cycle's phases as bar segments (index, from, to) in ms from the gap's
/// start, clipped to the gap; empty phases and phases outside it dropped.
pub fn stack(c: &PlotCycle) -> Vec<(usize, f64, f64)> {
    let Some((a, b)) = c.gap else { return Vec::new() };
    c.phases
        .iter()
        .map(|&(k, from, to)| (k, from.clamp(a, b) - a, to.clamp(a, b) - a))
        .filter(|&(_, from, to)| to > from)
        .collect()
}

/// The phase colours, six to a row, under the bottom panel.
fn phase_legend(s: &mut String, names: &[String]) {
    let (x0, y0) = (LEFT, H + 6.0);
    for (k, name) in names.iter().enumerate() {
        let x = x0 + (k % 6) as f64 * 150.0;
        let y = y0 + (k / 6) as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="10" fill="{}"/>"#,
            y - 9.0,
            PHASE_COLOURS[k % PHASE_COLOURS.len()]
        );
        text(s, x + 16.0, y, "start", "a", name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal well-formedness check: every tag closes in order, and
    /// text holds no raw `<` or stray `&`.
    fn well_formed(xml: &str) -> Result<(), String> {
        let body = xml.trim_start().strip_prefix("<?xml").ok_or("no prolog")?;
        let body = &body[body.find("?>").ok_or("prolog open")? + 2..];
        let mut stack: Vec<String> = Vec::new();
        let mut rest = body;
        while let Some(i) = rest.find('<') {
            check_text(&rest[..i])?;
            let end = rest[i..].find('>').ok_or("tag open")? + i;
            let tag = &rest[i + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or("close without open")?;
                if open != name.trim() {
                    return Err(format!("</{name}> closes <{open}>"));
                }
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().ok_or("empty tag")?;
                stack.push(name.to_string());
            }
            if tag.matches('"').count() % 2 != 0 {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            rest = &rest[end + 1..];
        }
        check_text(rest)?;
        if stack.is_empty() { Ok(()) } else { Err(format!("unclosed {stack:?}")) }
    }

    fn check_text(t: &str) -> Result<(), String> {
        let mut r = t;
        while let Some(i) = r.find('&') {
            let ent = &r[i..r[i..].find(';').map_or(r.len(), |j| i + j + 1)];
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&ent) {
                return Err(format!("bad entity {ent}"));
            }
            r = &r[i + 1..];
        }
        Ok(())
    }

    #[test]
    fn svg_is_well_formed_and_escapes_text() {
        let mut ok_ms = vec![20u32; 6000];
        ok_ms[2000..2150].iter_mut().for_each(|n| *n = 0);
        let d = PlotData {
            title: "downtime <ram> & \"supervise\"".into(),
            subtitle: "it's 3 cycles".into(),
            kill_label: "kill".into(),
            ok_ms,
            cycles: vec![
                PlotCycle {
                    kill_ms: 2000.0,
                    live_ms: Some(2140.0),
                    gap: Some((1999.9, 2150.2)),
                    phases: vec![(0, 2000.0, 2010.0), (1, 2010.0, 2140.0)],
                },
                PlotCycle { kill_ms: 4000.0, live_ms: None, gap: None, phases: vec![] },
            ],
            phase_names: vec!["signal".into(), "ring_teardown".into()],
        };
        let svg = render(&d);
        well_formed(&svg).unwrap();
        assert!(svg.contains("downtime &lt;ram&gt; &amp; &quot;supervise&quot;"));
        assert!(svg.contains("it&apos;s"));
        assert!(svg.contains(">K1<") && svg.contains(">K2<"));
        assert!(svg.contains(">n/a<"));
        assert!(svg.contains("150.3"));
        assert!(svg.contains(">ring_teardown<"), "legend");
        assert!(svg.contains(r##"fill="#aec7e8""##), "second phase segment");
    }

    #[test]
    fn phases_stack_inside_the_gap() {
        let c = PlotCycle {
            kill_ms: 100.0,
            live_ms: None,
            gap: Some((99.5, 130.0)),
            phases: vec![(0, 100.0, 101.0), (1, 101.0, 101.0), (2, 101.0, 125.0), (3, 125.0, 140.0)],
        };
        // The empty phase goes, the last is cut at the gap's end, and every
        // segment starts where the one before ended.
        assert_eq!(stack(&c), [(0, 0.5, 1.5), (2, 1.5, 25.5), (3, 25.5, 30.5)]);
        assert!(stack(&PlotCycle { gap: None, ..c }).is_empty());
    }

    #[test]
    fn empty_plot_still_renders() {
        well_formed(&render(&PlotData::default())).unwrap();
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 10.0), 1.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(fmt_num(25_000.0), "25k");
        assert_eq!(fmt_num(1_500_000.0), "1.5M");
    }
}
