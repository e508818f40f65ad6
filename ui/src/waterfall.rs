//! The trace's layout, computed once per trace (not per frame) from its outline: tree order
//! (children by start time), depth, descendant counts, the critical path, which rows are visible
//! given the collapsed spans, and a span's index from its id. Every part is a flat array of one
//! entry per span (no allocation per span), so a million-span trace lays out in bounded memory; the
//! dashboard computes it in a worker (`outline_layout`) and the page keeps only these arrays.

use std::collections::HashSet;

use crate::outline::Outline;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    /// Span indexes in tree order (pre-order, children by start time; orphans are roots).
    pub order: Vec<u32>,
    /// Per span index: depth in the tree.
    pub depth: Vec<u16>,
    /// Per span index: number of spans below it.
    pub descendants: Vec<u32>,
    /// Per span index: 1 when on the critical path.
    pub critical: Vec<u8>,
    /// Span indexes sorted by span id (then index): [`Layout::find`] searches it.
    pub by_id: Vec<u32>,
    /// Trace length in nanoseconds (at least 1).
    pub total_ns: i64,
}

/// Children lists of every span in two flat arrays: span `i`'s children are
/// `kids[first[i]..first[i + 1]]`, ordered by start time.
struct Children {
    first: Vec<u32>,
    kids: Vec<u32>,
}

impl Children {
    fn of(&self, i: usize) -> &[u32] {
        &self.kids[self.first[i] as usize..self.first[i + 1] as usize]
    }
}

impl Layout {
    pub fn new(t: &Outline) -> Self {
        let n = t.len();
        let parent = |i: usize| usize::try_from(t.parents[i]).ok().filter(|&p| p < n && p != i);
        let by_start = |a: &u32, b: &u32| (t.start[*a as usize], *a).cmp(&(t.start[*b as usize], *b));
        let mut first = vec![0u32; n + 1];
        for i in 0..n {
            if let Some(p) = parent(i) {
                first[p + 1] += 1;
            }
        }
        for i in 0..n {
            first[i + 1] += first[i];
        }
        let mut kids = vec![0u32; first[n] as usize];
        let mut fill: Vec<u32> = first[..n].to_vec();
        let mut roots = Vec::new();
        for i in 0..n {
            match parent(i) {
                Some(p) => {
                    kids[fill[p] as usize] = i as u32;
                    fill[p] += 1;
                }
                None => roots.push(i as u32),
            }
        }
        drop(fill);
        // Spans come in start order from the collector: the sorts find their runs already sorted.
        for i in 0..n {
            kids[first[i] as usize..first[i + 1] as usize].sort_unstable_by(by_start);
        }
        roots.sort_unstable_by(by_start);
        let children = Children { first, kids };

        let mut order = Vec::with_capacity(n);
        let mut depth = vec![0u16; n];
        let mut seen = vec![false; n];
        // Iterative pre-order: a 100,000-span chain must not overflow the stack.
        let mut stack: Vec<(u32, u16)> = roots.iter().rev().map(|&r| (r, 0)).collect();
        while let Some((i, d)) = stack.pop() {
            if std::mem::replace(&mut seen[i as usize], true) {
                continue;
            }
            depth[i as usize] = d;
            order.push(i);
            for &c in children.of(i as usize).iter().rev() {
                stack.push((c, d.saturating_add(1)));
            }
        }
        // Spans in a parent cycle were never reached: show them as roots.
        for (i, s) in seen.iter().enumerate() {
            if !s {
                order.push(i as u32);
            }
        }
        let mut pos = vec![0u32; n];
        for (p, &i) in order.iter().enumerate() {
            pos[i as usize] = p as u32;
        }
        let mut descendants = vec![0u32; n];
        for &i in order.iter().rev() {
            let i = i as usize;
            for &c in children.of(i) {
                if seen[c as usize] && pos[c as usize] > pos[i] {
                    descendants[i] += 1 + descendants[c as usize];
                }
            }
        }
        drop(pos);
        let end = |i: usize| t.start[i].saturating_add(t.duration[i]);
        let mut critical = vec![0u8; n];
        let mut scratch = Vec::new();
        for &r in &roots {
            mark_critical(r as usize, end(r as usize), &children, t, &mut critical, &mut scratch);
        }
        let mut by_id: Vec<u32> = (0..n as u32).collect();
        by_id.sort_unstable_by_key(|&i| (t.span_ids[i as usize], i));
        let total_ns = (0..n).map(end).max().unwrap_or(0).max(t.header.duration_nanos as i64).max(1);
        Self { order, depth, descendants, critical, by_id, total_ns }
    }

    /// The index of the span with this id (the earliest, if the id is repeated).
    pub fn find(&self, t: &Outline, span_id: u64) -> Option<usize> {
        let k = self.by_id.partition_point(|&i| t.span_ids[i as usize] < span_id);
        self.by_id.get(k).map(|&i| i as usize).filter(|&i| t.span_ids[i] == span_id)
    }

    /// [`Layout::find`] for a span id in hex.
    pub fn find_hex(&self, t: &Outline, span_id: &str) -> Option<usize> {
        u64::from_str_radix(span_id, 16).ok().and_then(|id| self.find(t, id))
    }

    pub fn is_critical(&self, i: usize) -> bool {
        self.critical[i] != 0
    }

    /// Rows to show: the tree order without the spans under a collapsed one.
    pub fn visible(&self, collapsed: &HashSet<usize>) -> Vec<u32> {
        if collapsed.is_empty() {
            return self.order.clone();
        }
        let mut out = Vec::with_capacity(self.order.len());
        let mut k = 0;
        while k < self.order.len() {
            let i = self.order[k];
            out.push(i);
            k += 1;
            if collapsed.contains(&(i as usize)) {
                k += self.descendants[i as usize] as usize;
            }
        }
        out
    }
}

/// The critical path through `span`: walking back from its end, the child that finished last
/// before the cursor is on it, then the cursor moves to that child's start (Jaeger's definition).
fn mark_critical(span: usize, end: i64, children: &Children, t: &Outline, critical: &mut [u8], kids: &mut Vec<u32>) {
    let end_of = |i: usize| t.start[i].saturating_add(t.duration[i]);
    let mut stack = vec![(span, end)];
    while let Some((s, end)) = stack.pop() {
        if std::mem::replace(&mut critical[s], 1) != 0 {
            continue;
        }
        kids.clear();
        kids.extend_from_slice(children.of(s));
        kids.sort_unstable_by_key(|&c| (std::cmp::Reverse(end_of(c as usize)), t.start[c as usize], c));
        let mut cursor = end;
        for &c in kids.iter() {
            let c = c as usize;
            if end_of(c) <= cursor && t.start[c] < cursor {
                stack.push((c, end_of(c)));
                cursor = t.start[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outline::tests::outline;

    #[test]
    fn tree_order_depth_collapse_find_and_critical_path() {
        // r(0-100) ─ a(10-40) ─ a1(15-20)
        //          └ b(30-90)
        let (r, a, a1, b) = (0x10u64, 0xa0, 0xa1, 0xb0);
        let t = outline(&[(b, 2, 30, 90), (a1, 3, 15, 20), (r, -1, 0, 100), (a, 2, 10, 40)]);
        let l = Layout::new(&t);
        let ids: Vec<u64> = l.order.iter().map(|&i| t.span_ids[i as usize]).collect();
        assert_eq!(ids, [r, a, a1, b]);
        let idx = |id| l.find(&t, id).expect("found");
        assert_eq!(l.find_hex(&t, "00000000000000a1"), Some(1));
        assert_eq!(l.find(&t, 0x42), None);
        assert_eq!(l.depth[idx(a1)], 2);
        assert_eq!(l.descendants[idx(r)], 3);
        let collapsed: HashSet<usize> = [idx(a)].into();
        let visible: Vec<u64> = l.visible(&collapsed).iter().map(|&i| t.span_ids[i as usize]).collect();
        assert_eq!(visible, [r, a, b]);
        assert!(l.is_critical(idx(r)) && l.is_critical(idx(b)));
        assert!(!l.is_critical(idx(a)) && !l.is_critical(idx(a1)), "a still runs when b starts: the root's own work is critical before b");
        assert_eq!(l.total_ns, 100);
    }

    #[test]
    fn a_deep_chain_and_a_cycle_do_not_break_layout() {
        let mut spans: Vec<(u64, i32, i64, i64)> = (0..100_000).map(|i| (i as u64 + 1, i - 1, i64::from(i), 200_000 - i64::from(i))).collect();
        spans.push((0x1_0000_0000, 100_001, 0, 1));
        spans.push((0x1_0000_0001, 100_000, 0, 1));
        let t = outline(&spans);
        let l = Layout::new(&t);
        assert_eq!(l.order.len(), 100_002);
        assert_eq!(l.depth[l.find(&t, 100_000).expect("found")], u16::MAX);
        assert_eq!(l.find(&t, 0x1_0000_0001), Some(100_001));
    }

    #[test]
    fn a_repeated_span_id_finds_its_earliest_span() {
        let t = outline(&[(5, -1, 0, 10), (5, 0, 1, 2), (3, 0, 2, 3)]);
        assert_eq!(Layout::new(&t).find(&t, 5), Some(0));
    }
}
