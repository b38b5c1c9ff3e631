//! Which thread serves which tags (`--threads`).
//!
//! Default: one thread per hardware queue, serving all its tags. With
//! UBLK_F_PER_IO_DAEMON (6.16) a tag belongs to whichever task sent its
//! FETCH, so the tags of a device may be dealt out otherwise:
//!
//! - N >= Q threads: queue q is served by the threads t with t % Q == q,
//!   each taking a contiguous range of its tags (so a queue's threads can
//!   be pinned to several CPUs of its affinity set);
//! - N < Q: thread t serves the whole queues q with q % N == t.
//!
//! A thread numbers the tags it serves 0.. in the order of its slices: its
//! *slots*. A slot is what the thread's ring carries in `user_data`, what
//! its backend knows as the request's tag, and its buffer index; the slice
//! gives the kernel's (queue, tag) back.
//!
//! The layout is a pure function of (queues, depth, threads), all persisted
//! in the device's settings, so every takeover re-creates it.

use crate::error::{Error, Result};
use crate::sys;

/// Tags `first..first + count` of queue `qid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub qid: u16,
    pub first: u16,
    pub count: u16,
}

/// Slots one thread may serve: as many as one queue has at most, so its
/// ring, buffer table and `user_data` are sized as a queue's are.
pub const MAX_SLOTS: u32 = sys::UBLK_MAX_QUEUE_DEPTH;

/// The slices of each of `threads` threads over `queues` queues of `depth`
/// tags. Threads that would get no tag (more threads than tags) get none
/// and are left out, so every thread listed has at least one slice.
pub fn layout(queues: u16, depth: u16, threads: u16) -> Vec<Vec<Slice>> {
    let (q, n) = (queues.max(1) as u32, threads.max(1) as u32);
    let mut out = vec![];
    if n >= q {
        for t in 0..n {
            let qid = t % q;
            // This queue's threads are qid, qid + q, ...: `k` of them, this the j-th.
            let k = (n - qid).div_ceil(q);
            let j = t / q;
            let first = j * depth as u32 / k;
            let end = (j + 1) * depth as u32 / k;
            if end > first {
                out.push(vec![Slice { qid: qid as u16, first: first as u16, count: (end - first) as u16 }]);
            }
        }
    } else {
        for t in 0..n {
            out.push(
                (t..q)
                    .step_by(n as usize)
                    .map(|qid| Slice { qid: qid as u16, first: 0, count: depth })
                    .collect(),
            );
        }
    }
    out
}

/// `--threads` against the queues and depth asked for: 1 or more, no more
/// threads than tags, and no thread with more than [`MAX_SLOTS`] tags.
pub fn check_threads(threads: u16, queues: u16, depth: u16) -> Result<()> {
    let tags = queues as u32 * depth as u32;
    if threads == 0 || threads as u32 > tags {
        return Err(Error::invalid(format!(
            "--threads {threads} is out of range: give 1 to {tags} (queues x depth) threads"
        )));
    }
    let most = (queues as u32).div_ceil(threads as u32) * depth as u32;
    if threads < queues && most > MAX_SLOTS {
        return Err(Error::invalid(format!(
            "--threads {threads}: one thread would serve {most} tags, at most {MAX_SLOTS}: give more threads or a \
             smaller -d"
        )));
    }
    Ok(())
}

/// Slot `slot` of a thread serving `slices`: its (queue, tag).
pub fn slot_tag(slices: &[Slice], mut slot: u16) -> Option<(u16, u16)> {
    for s in slices {
        if slot < s.count {
            return Some((s.qid, s.first + slot));
        }
        slot -= s.count;
    }
    None
}

/// Slots of a thread serving `slices`.
pub fn slots(slices: &[Slice]) -> u16 {
    slices.iter().map(|s| s.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tag of every queue is served by exactly one thread.
    fn each_tag_once(queues: u16, depth: u16, threads: u16) {
        let l = layout(queues, depth, threads);
        let mut seen = vec![0u32; queues as usize * depth as usize];
        for slices in &l {
            assert!(!slices.is_empty() && slots(slices) > 0, "{queues}q {depth}d {threads}t: an idle thread");
            for s in 0..slots(slices) {
                let (q, t) = slot_tag(slices, s).unwrap();
                seen[q as usize * depth as usize + t as usize] += 1;
            }
            assert_eq!(slot_tag(slices, slots(slices)), None, "a slot past the thread's");
        }
        assert!(seen.iter().all(|&n| n == 1), "{queues}q {depth}d {threads}t: {seen:?}");
    }

    #[test]
    fn every_tag_has_one_thread() {
        for (q, d, n) in
            [(1, 128, 1), (2, 64, 2), (1, 128, 2), (2, 64, 3), (2, 64, 1), (3, 5, 2), (4, 7, 9), (1, 3, 3)]
        {
            each_tag_once(q, d, n);
        }
    }

    #[test]
    fn one_thread_per_queue_is_the_identity() {
        let l = layout(3, 64, 3);
        assert_eq!(l.len(), 3);
        for (t, slices) in l.iter().enumerate() {
            assert_eq!(slices, &[Slice { qid: t as u16, first: 0, count: 64 }]);
        }
    }

    #[test]
    fn more_threads_split_a_queue_into_contiguous_ranges() {
        assert_eq!(
            layout(1, 128, 2),
            [vec![Slice { qid: 0, first: 0, count: 64 }], vec![Slice { qid: 0, first: 64, count: 64 }]]
        );
        // Queue 0 gets threads 0 and 2, queue 1 thread 1.
        assert_eq!(
            layout(2, 64, 3),
            [
                vec![Slice { qid: 0, first: 0, count: 32 }],
                vec![Slice { qid: 1, first: 0, count: 64 }],
                vec![Slice { qid: 0, first: 32, count: 32 }],
            ]
        );
    }

    #[test]
    fn fewer_threads_take_whole_queues_round_robin() {
        let l = layout(3, 8, 2);
        assert_eq!(l[0], [Slice { qid: 0, first: 0, count: 8 }, Slice { qid: 2, first: 0, count: 8 }]);
        assert_eq!(l[1], [Slice { qid: 1, first: 0, count: 8 }]);
        assert_eq!(slot_tag(&l[0], 9), Some((2, 1)));
    }

    #[test]
    fn bad_thread_counts_are_refused() {
        assert!(check_threads(1, 1, 128).is_ok());
        assert!(check_threads(4, 2, 128).is_ok());
        let zero = check_threads(0, 1, 128).unwrap_err().to_string();
        assert!(zero.contains("--threads 0 is out of range"), "{zero}");
        assert!(check_threads(5, 2, 2).unwrap_err().to_string().contains("1 to 4"));
        let big = check_threads(1, 2, 4096).unwrap_err().to_string();
        assert!(big.contains("8192 tags, at most 4096"), "{big}");
        assert!(check_threads(2, 4, 2048).is_ok());
    }
}
