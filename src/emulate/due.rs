//! The requests a queue has finished but holds until their due time: a
//! min-heap of `(due_ns, tag)` made once with room for every tag, so the
//! hot loop pushes and pops without allocating.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Debug)]
pub struct Due {
    heap: BinaryHeap<Reverse<(u64, u16)>>,
    depth: usize,
}

impl Due {
    pub fn new(depth: u16) -> Self {
        Due { heap: BinaryHeap::with_capacity(depth as usize), depth: depth as usize }
    }

    /// Holds `tag` until `due_ns`. A tag is held at most once: the kernel
    /// hands it out again only after we complete it.
    #[inline]
    pub fn hold(&mut self, due_ns: u64, tag: u16) {
        debug_assert!(self.heap.len() < self.depth, "more held requests than tags");
        self.heap.push(Reverse((due_ns, tag)));
    }

    /// The earliest due time held, for a blocking wait's timeout.
    #[inline]
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|r| r.0.0)
    }

    /// The next tag due by `now_ns`, earliest first.
    #[inline]
    pub fn pop_due(&mut self, now_ns: u64) -> Option<u16> {
        match self.heap.peek() {
            Some(Reverse((due, _))) if *due <= now_ns => self.heap.pop().map(|r| r.0.1),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Due order, not arrival order; nothing before its time; full depth
    /// held without the heap growing.
    #[test]
    fn requests_leave_by_due_time() {
        let mut d = Due::new(4);
        let cap = d.heap.capacity();
        d.hold(300, 0);
        d.hold(100, 1);
        d.hold(200, 2);
        d.hold(100, 3);
        assert_eq!(d.heap.capacity(), cap, "no growth at full depth");
        assert_eq!(d.next_due(), Some(100));
        assert_eq!(d.pop_due(99), None);
        let mut out = vec![];
        while let Some(t) = d.pop_due(250) {
            out.push(t);
        }
        out[..2].sort();
        assert_eq!(out, [1, 3, 2]);
        assert_eq!((d.len(), d.next_due()), (1, Some(300)));
        assert_eq!(d.pop_due(300), Some(0));
        assert!(d.is_empty());
    }
}
