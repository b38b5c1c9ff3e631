//! The pure part of the downtime measurement: what one client job saw around
//! each kill, and how the jobs' views merge into one figure per cycle.
//!
//! The client does not keep a log of every I/O (that would grow with the
//! IOPS, hundreds of MB on a fast machine). Instead each job feeds every
//! completion to a [`Tracker`], which keeps O(1) state per cycle, all
//! preallocated:
//!
//! - the [`CANDIDATES`] longest stretches without a *successful* completion
//!   (stalls) that ended after the kill and began before the device was seen
//!   LIVE again, each with the I/Os that waited through it (submitted before
//!   it ended, completed at or after its end): how many, and the longest
//!   latency among them, the worst an application waited because of it;
//! - the I/Os in flight across the kill itself (submitted before it,
//!   completed after it): how many, and the longest latency among them;
//! - the failed completions (negative result or short transfer) since the
//!   kill.
//!
//! The gap of a cycle is the stall that contains the *anchor*: the moment the
//! new server sent START_USER_RECOVERY (from the events file), when the old
//! server is surely gone and the new one serves nothing yet. Without an
//! anchor it is the longest candidate.
//!
//! Why not literally "the last completion before the kill and the first
//! after it": SIGKILL is not instant, and the client stamps a completion when
//! it reaps it. Completions the dying server posted around the kill are often
//! reaped just after it (and `restart` drains on purpose), and an emulated
//! machine stalls now and then for 100 ms or more on its own, sometimes right
//! before a kill. The anchored stall starts at the last completion before
//! the outage, stragglers included, and ends at the first completion served
//! by the new server; when there are no stragglers it is exactly the last
//! completion before the kill to the first after it. Failed completions
//! (FAIL_IO, or plain recovery's EIO) do not end a stall: the client was not
//! served.
//!
//! With several jobs, every job records its own stall; the client-wide stall
//! is their intersection: no job completed anything from the latest start to
//! the earliest end.

/// The kill and LIVE moments (CLOCK_MONOTONIC ns) as the completion path sees
/// them. The run publishes each kill just before sending SIGKILL, and the LIVE
/// moment once it saw the device LIVE under a new server.
pub trait Marks {
    /// Kills published so far; their times ascend.
    fn count(&self) -> usize;
    fn kill_ns(&self, i: usize) -> u64;
    /// When the device was seen LIVE again after kill `i`; 0 = not yet.
    fn live_ns(&self, i: usize) -> u64;
}

/// Marks known in advance: tests, and computing after the run.
#[derive(Debug, Clone, Copy)]
pub struct FixedMarks<'a> {
    pub kills: &'a [u64],
    pub lives: &'a [u64],
}

impl Marks for FixedMarks<'_> {
    fn count(&self) -> usize {
        self.kills.len()
    }
    fn kill_ns(&self, i: usize) -> u64 {
        self.kills[i]
    }
    fn live_ns(&self, i: usize) -> u64 {
        self.lives.get(i).copied().unwrap_or(0)
    }
}

/// How many stalls a job keeps per cycle. The anchored stall lies inside
/// (kill, LIVE), and every candidate ends after the kill and begins before
/// LIVE, so only a few can be longer than it: 8 is plenty.
pub const CANDIDATES: usize = 8;

/// A stretch with no successful completion in one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stall {
    /// The job's last successful completion before it (or the job's start).
    pub start: u64,
    /// The first successful completion after it.
    pub end: u64,
    /// I/Os submitted before `end` and completed at or after it.
    pub across: u32,
    /// The longest latency among them (ns).
    pub max_lat_ns: u64,
}

impl Stall {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// True if `t` falls in it: start < t <= end.
    pub fn contains(&self, t: u64) -> bool {
        self.start < t && t <= self.end
    }
}

/// One job's view of one cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleTrack {
    /// The longest stalls since the kill, in no order; None: free slot.
    pub stalls: [Option<Stall>; CANDIDATES],
    /// I/Os submitted before the kill and completed after it.
    pub spanning: u32,
    /// The longest latency among them (ns).
    pub max_span_ns: u64,
    /// Failed completions after this kill (and before the next).
    pub errors: u64,
}

impl CycleTrack {
    /// Keeps (start, end) if a slot is free or it is longer than the
    /// shortest kept; returns the slot.
    fn offer(&mut self, start: u64, end: u64) -> Option<usize> {
        let len = end - start;
        let slot = match self.stalls.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                let (i, shortest) = self
                    .stalls
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.map(|s| (i, s.len())))
                    .min_by_key(|&(_, l)| l)?;
                if len <= shortest {
                    return None;
                }
                i
            }
        };
        self.stalls[slot] = Some(Stall { start, end, across: 0, max_lat_ns: 0 });
        Some(slot)
    }

    /// The stall containing `anchor`, else the longest (None: no
    /// successful completion since the kill).
    pub fn pick(&self, anchor: Option<u64>) -> Option<Stall> {
        let kept = self.stalls.iter().flatten();
        anchor
            .and_then(|t| kept.clone().find(|s| s.contains(t)))
            .or_else(|| kept.max_by_key(|s| (s.len(), s.end)))
            .copied()
    }
}

/// What one job saw, fed one completion at a time. Never allocates after
/// [`Tracker::new`].
#[derive(Debug, Clone)]
pub struct Tracker {
    last_ok: u64,
    pub cycles: Vec<CycleTrack>,
    /// Failed completions before the first kill.
    pub errors_before: u64,
    pub ok: u64,
    pub errors: u64,
}

/// What [`Tracker::complete`] changed, so the caller can publish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    /// (cycle, slot) of a newly kept stall.
    pub stall: Option<(usize, usize)>,
}

impl Tracker {
    /// A job that starts at `start_ns` (a stall may begin there) and will
    /// see at most `cycles` kills.
    pub fn new(start_ns: u64, cycles: usize) -> Self {
        Tracker {
            last_ok: start_ns,
            cycles: vec![CycleTrack::default(); cycles],
            errors_before: 0,
            ok: 0,
            errors: 0,
        }
    }

    /// One completion: submitted at `submit_ns`, completed at `done_ns`,
    /// successful or not.
    pub fn complete(&mut self, marks: &impl Marks, submit_ns: u64, done_ns: u64, ok: bool) -> Changed {
        let n = marks.count().min(self.cycles.len());
        // Kills this I/O was in flight across: submit < kill <= done.
        // Kills ascend, so walk back from the newest until one precedes the submission.
        let mut cycle = None;
        for j in (0..n).rev() {
            let k = marks.kill_ns(j);
            if k <= submit_ns {
                if cycle.is_none() && k <= done_ns {
                    cycle = Some(j);
                }
                break;
            }
            if k <= done_ns {
                let c = &mut self.cycles[j];
                c.spanning += 1;
                c.max_span_ns = c.max_span_ns.max(done_ns - submit_ns);
                cycle.get_or_insert(j);
            }
        }
        // `cycle` is the newest kill at or before `done_ns`, if any.
        let mut changed = Changed { stall: None };
        if let Some(i) = cycle {
            let c = &mut self.cycles[i];
            if ok {
                let live = marks.live_ns(i);
                if (live == 0 || self.last_ok < live)
                    && let Some(slot) = c.offer(self.last_ok.min(done_ns), done_ns)
                {
                    changed.stall = Some((i, slot));
                }
            }
            for s in c.stalls.iter_mut().flatten() {
                if submit_ns < s.end && done_ns >= s.end {
                    s.across += 1;
                    s.max_lat_ns = s.max_lat_ns.max(done_ns - submit_ns);
                }
            }
        }
        if !ok {
            self.errors += 1;
            match cycle {
                Some(i) => self.cycles[i].errors += 1,
                None => self.errors_before += 1,
            }
            return changed;
        }
        self.ok += 1;
        self.last_ok = self.last_ok.max(done_ns);
        changed
    }
}

/// The client-wide figures of one cycle, all in ns (absolute CLOCK_MONOTONIC
/// for moments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleGap {
    /// The stall every job was in at once: None if some job had no
    /// successful completion after the kill (the client never got service
    /// back). Some((t, t)) if the jobs never stalled together.
    pub stall: Option<(u64, u64)>,
    /// True if every job's stall contains the anchor.
    pub anchored: bool,
    /// I/Os that waited through the stall, and their longest latency.
    pub across_gap: u32,
    pub max_latency_ns: Option<u64>,
    /// I/Os in flight across the kill, and their longest latency (None:
    /// nothing was in flight).
    pub spanning: u32,
    pub max_latency_at_kill_ns: Option<u64>,
    pub errors: u64,
}

impl CycleGap {
    pub fn gap_ns(&self) -> Option<u64> {
        self.stall.map(|(a, b)| b - a)
    }
}

/// The client-wide stall from each job's: their intersection; None if a
/// job has none.
pub fn intersect(stalls: impl IntoIterator<Item = Option<(u64, u64)>>) -> Option<(u64, u64)> {
    let mut merged: Option<Option<(u64, u64)>> = None;
    for s in stalls {
        merged = Some(match (merged, s) {
            (None, s) => s,
            (Some(Some((a, b))), Some((a2, b2))) => Some((a.max(a2), b.min(b2))),
            (Some(_), _) => None,
        });
    }
    merged.flatten().map(|(a, b)| if a < b { (a, b) } else { (b, b) })
}

/// Merges the jobs' views of one cycle, picking in each job the stall that
/// contains `anchor` (see the module doc).
pub fn merge<'a>(jobs: impl IntoIterator<Item = &'a CycleTrack>, anchor: Option<u64>) -> CycleGap {
    let mut g = CycleGap { anchored: anchor.is_some(), ..Default::default() };
    let (mut max_span, mut max_gap) = (0, 0);
    let mut picks = Vec::new();
    for t in jobs {
        g.spanning += t.spanning;
        g.errors += t.errors;
        max_span = max_span.max(t.max_span_ns);
        let s = t.pick(anchor);
        if let Some(s) = s {
            g.across_gap += s.across;
            max_gap = max_gap.max(s.max_lat_ns);
        }
        g.anchored &= s.zip(anchor).is_some_and(|(s, a)| s.contains(a));
        picks.push(s.map(|s| (s.start, s.end)));
    }
    g.stall = intersect(picks);
    g.max_latency_at_kill_ns = (g.spanning > 0).then_some(max_span);
    g.max_latency_ns = (g.across_gap > 0).then_some(max_gap);
    g
}

/// The nearest-rank percentile `p` (0 < p <= 100) of `v`, which is sorted.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    /// A closed-loop job at queue depth 1: each I/O is submitted when the
    /// previous one completes and takes `lat` unless it meets the outage
    /// [down, up), in which case it completes at `up` (reissued) or fails at
    /// `down` (`fail`).
    fn qd1(
        t: &mut Tracker,
        m: &FixedMarks,
        from: u64,
        to: u64,
        lat: u64,
        outage: Option<(u64, u64)>,
        fail: bool,
    ) {
        let mut now = from;
        while now < to {
            let submit = now;
            let mut done = submit + lat;
            let mut ok = true;
            if let Some((down, up)) = outage
                && done >= down
                && submit < up
            {
                if fail {
                    // FAIL_IO: the I/O fails 1 µs after it met the outage.
                    done = submit.max(down) + US;
                    ok = false;
                } else {
                    // REISSUE: it completes once the new server serves it.
                    done = up + lat;
                }
            }
            t.complete(m, submit, done, ok);
            now = done;
        }
    }

    #[test]
    fn no_crash_means_no_cycle_and_no_error() {
        let m = FixedMarks { kills: &[], lives: &[] };
        let mut t = Tracker::new(0, 3);
        qd1(&mut t, &m, 0, 10 * MS, 10 * US, None, false);
        assert_eq!(t.errors, 0);
        assert_eq!(t.ok, 1000);
        assert!(t.cycles.iter().all(|c| *c == CycleTrack::default()));
        let g = merge(&t.cycles[..1], None);
        assert_eq!(g.stall, None);
        assert_eq!(g.max_latency_ns, None);
    }

    #[test]
    fn a_kill_that_changes_nothing_shows_the_normal_spacing() {
        // A kill mark in a steady 10 µs stream: the "gap" is one I/O time.
        let kills = [5 * MS + 3 * US];
        let m = FixedMarks { kills: &kills, lives: &[5 * MS + 4 * US] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, 10 * MS, 10 * US, None, false);
        let g = merge(&t.cycles, None);
        assert_eq!(g.gap_ns(), Some(10 * US));
        assert_eq!((g.spanning, g.max_latency_at_kill_ns), (1, Some(10 * US)));
        assert_eq!((g.across_gap, g.max_latency_ns), (1, Some(10 * US)));
        assert_eq!(g.errors, 0);
    }

    #[test]
    fn crash_with_nothing_in_flight() {
        // Completions every 10 µs up to 1 ms; the kill at 1.005 ms finds the
        // client idle; its next I/O, submitted at 1.010 ms, is served at
        // 50 ms by the new server.
        let kill = MS + 5 * US;
        let m = FixedMarks { kills: &[kill], lives: &[49 * MS] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, MS, 10 * US, None, false);
        t.complete(&m, MS + 10 * US, 50 * MS, true);
        qd1(&mut t, &m, 50 * MS, 60 * MS, 10 * US, None, false);
        let g = merge(&t.cycles, None);
        assert_eq!(g.stall, Some((MS, 50 * MS)));
        assert_eq!(g.gap_ns(), Some(49 * MS));
        // Nothing was in flight at the kill; the next I/O waited it out.
        assert_eq!((g.spanning, g.max_latency_at_kill_ns), (0, None));
        assert_eq!((g.across_gap, g.max_latency_ns), (1, Some(50 * MS - MS - 10 * US)));
        assert_eq!(g.errors, 0);
    }

    #[test]
    fn crash_spanning_in_flight_io() {
        // qd1: the I/O submitted at 1 ms is in the server when it dies at
        // 1.004 ms; it is reissued and completes at 80 ms + 10 µs.
        let kill = MS + 4 * US;
        let m = FixedMarks { kills: &[kill], lives: &[79 * MS] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, 20 * MS, 10 * US, Some((kill, 80 * MS)), false);
        let g = merge(&t.cycles, None);
        assert_eq!(g.stall, Some((MS, 80 * MS + 10 * US)));
        assert_eq!((g.spanning, g.max_latency_at_kill_ns), (1, Some(79 * MS + 10 * US)));
        assert_eq!((g.across_gap, g.max_latency_ns), (1, Some(79 * MS + 10 * US)));
        assert_eq!(t.errors, 0);
    }

    #[test]
    fn failed_ios_count_as_errors_and_do_not_end_the_gap() {
        // FAIL_IO: from the kill until 30 ms every I/O fails fast (1 ns);
        // service is back at 30 ms.
        let kill = 2 * MS;
        let m = FixedMarks { kills: &[kill], lives: &[29 * MS] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, 40 * MS, 10 * US, Some((kill, 30 * MS)), true);
        let g = merge(&t.cycles, None);
        assert!(g.errors > 1000, "errors {}", g.errors);
        assert_eq!(t.errors_before, 0);
        assert_eq!(t.errors, g.errors);
        // Last success at 1.99 ms (the I/O submitted then meets the kill),
        // first success 10 µs after the first submission once service is back.
        let (a, b) = g.stall.unwrap();
        assert_eq!(a, 2 * MS - 10 * US);
        assert!((30 * MS + 10 * US..=30 * MS + 11 * US).contains(&b), "end {b}");
    }

    #[test]
    fn errors_before_the_first_kill_are_kept_apart() {
        let m = FixedMarks { kills: &[10 * MS], lives: &[11 * MS] };
        let mut t = Tracker::new(0, 1);
        t.complete(&m, 0, US, false);
        t.complete(&m, 10 * MS + US, 10 * MS + 2 * US, false);
        assert_eq!(t.errors_before, 1);
        assert_eq!(t.cycles[0].errors, 1);
    }

    #[test]
    fn stragglers_after_the_kill_start_the_gap() {
        // The dying server still completes one request 3 µs after kill(2).
        let kill = 10 * MS;
        let m = FixedMarks { kills: &[kill], lives: &[40 * MS] };
        let mut t = Tracker::new(0, 1);
        // Completions every 10 µs up to 9.99 ms, then the straggler.
        qd1(&mut t, &m, 0, kill - 10 * US, 10 * US, None, false);
        t.complete(&m, kill - 7 * US, kill + 3 * US, true);
        t.complete(&m, kill + 3 * US, 41 * MS, true);
        qd1(&mut t, &m, 41 * MS, 50 * MS, 10 * US, None, false);
        let g = merge(&t.cycles, None);
        assert_eq!(g.stall, Some((kill + 3 * US, 41 * MS)));
        // The straggler looks short from the kill's side; the I/O resubmitted
        // after it waited for the whole outage.
        assert_eq!((g.spanning, g.max_latency_at_kill_ns), (1, Some(10 * US)));
        assert_eq!((g.across_gap, g.max_latency_ns), (1, Some(41 * MS - kill - 3 * US)));
    }

    #[test]
    fn a_hiccup_after_live_is_not_the_gap() {
        // Outage 10..20 ms (LIVE seen at 19 ms), then a longer 30 ms
        // scheduling hiccup at 50 ms, after LIVE: the gap is the outage.
        let kill = 10 * MS;
        let m = FixedMarks { kills: &[kill], lives: &[19 * MS] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, 50 * MS, 10 * US, Some((kill, 20 * MS)), false);
        t.complete(&m, 50 * MS, 80 * MS, true);
        let g = merge(&t.cycles, None);
        // The I/O submitted at 9.99 ms meets the kill: the last success is the one before.
        assert_eq!(g.stall, Some((10 * MS - 10 * US, 20 * MS + 10 * US)));
    }

    #[test]
    fn several_cycles_and_an_io_across_two_kills() {
        let kills = [10 * MS, 20 * MS];
        let m = FixedMarks { kills: &kills, lives: &[12 * MS, 22 * MS] };
        let mut t = Tracker::new(0, 2);
        t.complete(&m, 9 * MS, 25 * MS, true);
        assert_eq!(t.cycles[0].spanning, 1);
        assert_eq!(t.cycles[1].spanning, 1);
        assert_eq!(t.cycles[1].max_span_ns, 16 * MS);
        // The stall belongs to the newest kill before the completion.
        let s = t.cycles[1].pick(None).unwrap();
        assert_eq!((s.start, s.end, s.across), (0, 25 * MS, 1));
        assert_eq!(t.cycles[0].pick(None), None);
    }

    fn track(stalls: &[(u64, u64, u32, u64)]) -> CycleTrack {
        let mut c = CycleTrack::default();
        for (i, &(start, end, across, max_lat_ns)) in stalls.iter().enumerate() {
            c.stalls[i] = Some(Stall { start, end, across, max_lat_ns });
        }
        c
    }

    #[test]
    fn jobs_merge_by_intersection() {
        let a = CycleTrack {
            spanning: 2,
            max_span_ns: 850,
            errors: 1,
            ..track(&[(100, 900, 2, 850), (5, 6, 1, 1)])
        };
        let b = CycleTrack { spanning: 1, max_span_ns: 860, ..track(&[(120, 880, 3, 870)]) };
        let g = merge([&a, &b], None);
        assert_eq!(g.stall, Some((120, 880)));
        assert_eq!(g.gap_ns(), Some(760));
        assert!(!g.anchored);
        assert_eq!((g.spanning, g.max_latency_at_kill_ns), (3, Some(860)));
        assert_eq!((g.across_gap, g.max_latency_ns), (5, Some(870)));
        assert_eq!(g.errors, 1);
        assert!(merge([&a, &b], Some(500)).anchored);
        // A job that never got service back: no gap for the client.
        let c = CycleTrack::default();
        assert_eq!(merge([&a, &c], None).stall, None);
        // Stalls that do not overlap: the jobs never stopped together.
        let d = track(&[(950, 990, 0, 0)]);
        assert_eq!(merge([&a, &d], None).gap_ns(), Some(0));
    }

    #[test]
    fn the_anchor_picks_the_outage_over_a_longer_hiccup() {
        // An emulated machine stalls on its own from 0.7 s to the kill at
        // 1 s; a straggler is reaped at 1.0001 s; the new server starts
        // recovery at 1.15 s and serves at 1.2 s. The longest stall is the
        // hiccup (300 ms); the outage (200 ms) is the one holding the anchor.
        let kill = 1000 * MS;
        let m = FixedMarks { kills: &[kill], lives: &[1190 * MS] };
        let mut t = Tracker::new(0, 1);
        qd1(&mut t, &m, 0, 700 * MS, 10 * US, None, false);
        t.complete(&m, 700 * MS, kill + 100 * US, true);
        t.complete(&m, kill + 100 * US, 1200 * MS, true);
        qd1(&mut t, &m, 1200 * MS, 1300 * MS, 10 * US, None, false);
        let longest = merge(&t.cycles, None);
        assert_eq!(longest.stall, Some((700 * MS, kill + 100 * US)));
        let g = merge(&t.cycles, Some(1150 * MS));
        assert!(g.anchored);
        assert_eq!(g.stall, Some((kill + 100 * US, 1200 * MS)));
        assert_eq!((g.across_gap, g.max_latency_ns), (1, Some(200 * MS - 100 * US)));
        // An anchor no kept stall holds falls back to the longest.
        let g = merge(&t.cycles, Some(5000 * MS));
        assert!(!g.anchored);
        assert_eq!(g.stall, longest.stall);
    }

    #[test]
    fn only_the_longest_candidates_are_kept() {
        let mut c = CycleTrack::default();
        for i in 0..20u64 {
            c.offer(i * 1000, i * 1000 + i);
        }
        let mut kept: Vec<u64> = c.stalls.iter().flatten().map(Stall::len).collect();
        kept.sort();
        assert_eq!(kept, (12..20).collect::<Vec<_>>());
        assert_eq!(c.offer(0, 5), None);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 100.0), Some(10.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
