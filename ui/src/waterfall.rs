//! The trace's layout, computed once per trace (not per frame) from its outline: tree order
//! (children by start time), depth, descendant counts, the critical path, and which rows are
//! visible given the collapsed spans.

use std::collections::{HashMap, HashSet};

use crate::api::Outline;

#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Span indexes in tree order (pre-order, children by start time; orphans are roots).
    pub order: Vec<usize>,
    /// Per span index: depth in the tree.
    pub depth: Vec<u16>,
    /// Per span index: number of spans below it.
    pub descendants: Vec<u32>,
    /// Per span index: on the critical path.
    pub critical: Vec<bool>,
    /// Span id → index.
    pub by_id: HashMap<String, usize>,
    /// Trace length in nanoseconds (at least 1).
    pub total_ns: i64,
}

impl Layout {
    pub fn new(t: &Outline) -> Self {
        let n = t.len();
        let by_id: HashMap<String, usize> = t.span_ids.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut roots = Vec::new();
        for i in 0..n {
            match usize::try_from(t.parents[i]) {
                Ok(p) if p < n && p != i => children[p].push(i),
                _ => roots.push(i),
            }
        }
        let starts = &t.start;
        let ends: Vec<i64> = (0..n).map(|i| t.start[i] + t.duration[i]).collect();
        for c in &mut children {
            c.sort_by_key(|&i| (starts[i], i));
        }
        roots.sort_by_key(|&i| (starts[i], i));

        let mut order = Vec::with_capacity(n);
        let mut depth = vec![0u16; n];
        let mut descendants = vec![0u32; n];
        let mut seen = vec![false; n];
        // Iterative pre-order: a 100,000-span chain must not overflow the stack.
        let mut stack: Vec<(usize, u16)> = roots.iter().rev().map(|&r| (r, 0)).collect();
        while let Some((i, d)) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            depth[i] = d;
            order.push(i);
            for &c in children[i].iter().rev() {
                stack.push((c, d.saturating_add(1)));
            }
        }
        // Spans in a parent cycle were never reached: show them as roots.
        for (i, s) in seen.iter().enumerate() {
            if !s {
                order.push(i);
            }
        }
        let mut pos = vec![0usize; n];
        for (p, &i) in order.iter().enumerate() {
            pos[i] = p;
        }
        for &i in order.iter().rev() {
            for &c in &children[i] {
                if seen[c] && pos[c] > pos[i] {
                    descendants[i] += 1 + descendants[c];
                }
            }
        }
        let mut critical = vec![false; n];
        for &r in &roots {
            mark_critical(r, ends[r], &children, starts, &ends, &mut critical);
        }
        let total_ns = ends.iter().copied().max().unwrap_or(0).max(t.duration_nanos).max(1);
        Self { order, depth, descendants, critical, by_id, total_ns }
    }

    /// Rows to show: the tree order without the spans under a collapsed one.
    pub fn visible(&self, collapsed: &HashSet<usize>) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.order.len());
        let mut k = 0;
        while k < self.order.len() {
            let i = self.order[k];
            out.push(i);
            k += 1;
            if collapsed.contains(&i) {
                k += self.descendants[i] as usize;
            }
        }
        out
    }
}

/// The critical path through `span`: walking back from its end, the child that finished last
/// before the cursor is on it, then the cursor moves to that child's start (Jaeger's definition).
fn mark_critical(span: usize, end: i64, children: &[Vec<usize>], starts: &[i64], ends: &[i64], critical: &mut [bool]) {
    let mut stack = vec![(span, end)];
    while let Some((s, end)) = stack.pop() {
        if std::mem::replace(&mut critical[s], true) {
            continue;
        }
        let mut kids: Vec<usize> = children[s].clone();
        kids.sort_by_key(|&c| std::cmp::Reverse(ends[c]));
        let mut cursor = end;
        for c in kids {
            if ends[c] <= cursor && starts[c] < cursor {
                stack.push((c, ends[c]));
                cursor = starts[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (id, parent index, start, end)
    fn outline(spans: &[(&str, i64, i64, i64)]) -> Outline {
        let n = spans.len();
        Outline {
            trace_id: "t".into(),
            start_time_unix_nano: "0".into(),
            duration_nanos: spans.iter().map(|s| s.3).max().unwrap_or(0),
            span_count: n as u64,
            truncated: false,
            services: vec!["svc".into()],
            names: vec!["op".into()],
            span_ids: spans.iter().map(|s| s.0.to_owned()).collect(),
            parents: spans.iter().map(|s| s.1).collect(),
            service: vec![0; n],
            name: vec![0; n],
            kind: vec![1; n],
            start: spans.iter().map(|s| s.2).collect(),
            duration: spans.iter().map(|s| s.3 - s.2).collect(),
            status: vec![0; n],
            event_times: vec![vec![]; n],
        }
    }

    #[test]
    fn tree_order_depth_collapse_and_critical_path() {
        // r(0-100) ─ a(10-40) ─ a1(15-20)
        //          └ b(30-90)
        let t = outline(&[("b", 2, 30, 90), ("a1", 3, 15, 20), ("r", -1, 0, 100), ("a", 2, 10, 40)]);
        let l = Layout::new(&t);
        let names: Vec<&str> = l.order.iter().map(|&i| t.span_ids[i].as_str()).collect();
        assert_eq!(names, ["r", "a", "a1", "b"]);
        assert_eq!(l.depth[l.by_id["a1"]], 2);
        assert_eq!(l.descendants[l.by_id["r"]], 3);
        let collapsed: HashSet<usize> = [l.by_id["a"]].into();
        let visible: Vec<&str> = l.visible(&collapsed).iter().map(|&i| t.span_ids[i].as_str()).collect();
        assert_eq!(visible, ["r", "a", "b"]);
        assert!(l.critical[l.by_id["r"]] && l.critical[l.by_id["b"]]);
        assert!(!l.critical[l.by_id["a"]] && !l.critical[l.by_id["a1"]], "a still runs when b starts: the root's own work is critical before b");
        assert_eq!(l.total_ns, 100);
    }

    #[test]
    fn a_deep_chain_and_a_cycle_do_not_break_layout() {
        let ids: Vec<String> = (0..100_000).map(|i| format!("s{i}")).collect();
        let mut spans: Vec<(&str, i64, i64, i64)> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i as i64 - 1, i as i64, 200_000 - i as i64)).collect();
        spans.push(("x", 100_001, 0, 1));
        spans.push(("y", 100_000, 0, 1));
        let l = Layout::new(&outline(&spans));
        assert_eq!(l.order.len(), 100_002);
        assert_eq!(l.depth[l.by_id["s99999"]], u16::MAX);
    }
}
