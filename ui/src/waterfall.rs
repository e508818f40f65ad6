//! The trace's layout, computed once per trace (not per frame): tree order (children by start
//! time), depth, the critical path, and which rows are visible given the collapsed spans.

use std::collections::{HashMap, HashSet};

use crate::api::Trace;

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
    pub start_ns: i64,
    pub end_ns: i64,
}

impl Layout {
    pub fn new(t: &Trace) -> Self {
        let n = t.spans.len();
        let by_id: HashMap<String, usize> = t.spans.iter().enumerate().map(|(i, s)| (s.span_id.clone(), i)).collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut roots = Vec::new();
        for (i, s) in t.spans.iter().enumerate() {
            match by_id.get(&s.parent_span_id) {
                Some(&p) if p != i => children[p].push(i),
                _ => roots.push(i),
            }
        }
        let starts: Vec<i64> = t.spans.iter().map(|s| s.start_ns()).collect();
        let ends: Vec<i64> = t.spans.iter().map(|s| s.end_ns()).collect();
        for c in &mut children {
            c.sort_by_key(|&i| (starts[i], i));
        }
        roots.sort_by_key(|&i| (starts[i], i));

        let mut order = Vec::with_capacity(n);
        let mut depth = vec![0u16; n];
        let mut descendants = vec![0u32; n];
        let mut seen = vec![false; n];
        // Iterative pre-order (a 100,000-span chain must not overflow the stack).
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
        for i in 0..n {
            if !seen[i] {
                order.push(i);
            }
        }
        // Descendant counts, from the end of the pre-order back.
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
            mark_critical(r, ends[r], &children, &starts, &ends, &mut critical);
        }
        let start_ns = starts.iter().copied().min().unwrap_or(0);
        let end_ns = ends.iter().copied().max().unwrap_or(start_ns).max(start_ns);
        Self { order, depth, descendants, critical, by_id, start_ns, end_ns }
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
        critical[s] = true;
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

/// Span indexes whose service, name, id, attribute keys or values, or event names contain `q`
/// (case-insensitive).
pub fn search(t: &Trace, q: &str) -> HashSet<usize> {
    let q = q.trim().to_lowercase();
    if q.is_empty() {
        return HashSet::new();
    }
    let has = |s: &str| s.to_lowercase().contains(&q);
    t.spans
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            has(&s.name)
                || has(&s.service)
                || s.span_id == q
                || s.attributes.iter().any(|a| has(&a.key) || has(&crate::api::any_value_text(&a.value)))
                || s.events.iter().any(|e| has(&e.name))
        })
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Span, SpanStatus};

    fn span(id: &str, parent: &str, start: i64, end: i64) -> Span {
        Span {
            span_id: id.into(),
            parent_span_id: parent.into(),
            trace_state: String::new(),
            name: format!("op {id}"),
            kind: "internal".into(),
            service: "svc".into(),
            resource: 1,
            scope: 1,
            start_time_unix_nano: start.to_string(),
            end_time_unix_nano: end.to_string(),
            duration_nanos: end - start,
            status: SpanStatus { code: "UNSET".into(), message: String::new() },
            attributes: vec![],
            events: vec![],
            links: vec![],
            dropped_attributes_count: 0,
            dropped_events_count: 0,
            dropped_links_count: 0,
            flags: 0,
        }
    }

    fn trace(spans: Vec<Span>) -> Trace {
        Trace { trace_id: "t".into(), start_time_unix_nano: "0".into(), duration_nanos: 0, span_count: spans.len() as u64, resources: vec![], scopes: vec![], spans }
    }

    #[test]
    fn tree_order_depth_collapse_and_critical_path() {
        // root(0-100) ─ a(10-40) ─ a1(15-20)
        //             └ b(30-90)
        let t = trace(vec![span("b", "r", 30, 90), span("a1", "a", 15, 20), span("r", "", 0, 100), span("a", "r", 10, 40)]);
        let l = Layout::new(&t);
        let names: Vec<&str> = l.order.iter().map(|&i| t.spans[i].span_id.as_str()).collect();
        assert_eq!(names, ["r", "a", "a1", "b"]);
        assert_eq!(l.depth[l.by_id["a1"]], 2);
        assert_eq!(l.descendants[l.by_id["r"]], 3);
        let collapsed: HashSet<usize> = [l.by_id["a"]].into();
        let visible: Vec<&str> = l.visible(&collapsed).iter().map(|&i| t.spans[i].span_id.as_str()).collect();
        assert_eq!(visible, ["r", "a", "b"]);
        assert!(l.critical[l.by_id["r"]] && l.critical[l.by_id["b"]]);
        assert!(!l.critical[l.by_id["a"]] && !l.critical[l.by_id["a1"]], "a still runs when b starts: the root's own work is critical before b");
        assert_eq!((l.start_ns, l.end_ns), (0, 100));
    }

    #[test]
    fn a_deep_chain_and_a_cycle_do_not_break_layout() {
        let mut spans: Vec<Span> = (0..100_000).map(|i| span(&format!("s{i}"), &format!("s{}", i.max(1) - 1), i, 200_000 - i)).collect();
        spans[0].parent_span_id = String::new();
        spans.push(span("x", "y", 0, 1));
        spans.push(span("y", "x", 0, 1));
        let l = Layout::new(&trace(spans));
        assert_eq!(l.order.len(), 100_002);
        assert_eq!(l.depth[l.by_id["s99999"]], u16::MAX);
    }
}
