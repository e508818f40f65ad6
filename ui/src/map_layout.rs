//! A stable layered layout for the service map, read from the entry points outward: a node's
//! layer is the longest path to it from a node nobody calls (cycles are cut), and within a layer
//! nodes sit near the nodes that call them (ties by name), so the picture does not jump between
//! refreshes.

use std::collections::{BTreeMap, BTreeSet};

/// Layer and row of each node.
pub fn layered(nodes: &[String], edges: &[(String, String)]) -> BTreeMap<String, (usize, usize)> {
    let ids: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    let edges: Vec<(&str, &str)> = edges.iter().map(|(a, b)| (a.as_str(), b.as_str())).filter(|(a, b)| a != b && ids.contains(a) && ids.contains(b)).collect();
    // Cut the edges that close a cycle (back edges of a depth-first walk from the entry points),
    // then take the longest path over what is left.
    let indegree = |n: &str| edges.iter().filter(|(_, b)| *b == n).count();
    let mut starts: Vec<&str> = ids.iter().copied().filter(|n| indegree(n) == 0).collect();
    starts.extend(ids.iter().copied().filter(|n| indegree(n) > 0));
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 on the walk's stack, 2 done
    let mut back: BTreeSet<(&str, &str)> = BTreeSet::new();
    for &s in &starts {
        if state.contains_key(s) {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(s, 0)];
        state.insert(s, 1);
        while let Some(&mut (n, ref mut next)) = stack.last_mut() {
            let out: Vec<&str> = edges.iter().filter(|(a, _)| *a == n).map(|(_, b)| *b).collect();
            if *next < out.len() {
                let m = out[*next];
                *next += 1;
                match state.get(m) {
                    Some(1) => {
                        back.insert((n, m));
                    }
                    Some(_) => {}
                    None => {
                        state.insert(m, 1);
                        stack.push((m, 0));
                    }
                }
            } else {
                state.insert(n, 2);
                stack.pop();
            }
        }
    }
    let dag: Vec<(&str, &str)> = edges.iter().copied().filter(|e| !back.contains(e)).collect();
    let mut layer: BTreeMap<&str, usize> = ids.iter().map(|&n| (n, 0)).collect();
    for _ in 0..ids.len() {
        let mut changed = false;
        for &(a, b) in &dag {
            if layer[a] + 1 > layer[b] {
                layer.insert(b, layer[a] + 1);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let depth = layer.values().copied().max().unwrap_or(0);
    let mut rows: BTreeMap<&str, usize> = BTreeMap::new();
    for l in 0..=depth {
        let mut in_layer: Vec<(f64, &str)> = layer
            .iter()
            .filter(|(_, v)| **v == l)
            .map(|(&n, _)| {
                let parents: Vec<usize> = dag.iter().filter(|(_, b)| *b == n).filter_map(|(a, _)| rows.get(a).copied()).collect();
                let centre = if parents.is_empty() { f64::MAX } else { parents.iter().sum::<usize>() as f64 / parents.len() as f64 };
                (centre, n)
            })
            .collect();
        in_layer.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
        for (row, (_, n)) in in_layer.into_iter().enumerate() {
            rows.insert(n, row);
        }
    }
    layer.into_iter().map(|(n, l)| (n.to_owned(), (l, rows[n]))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn reads_from_the_entry_outward_and_survives_cycles() {
        let nodes = s(&["catalog", "gateway", "loadgen", "sqlite catalog", "users", "sqlite users"]);
        let edges: Vec<(String, String)> = [
            ("loadgen", "gateway"),
            ("gateway", "users"),
            ("gateway", "catalog"),
            ("users", "sqlite users"),
            ("catalog", "sqlite catalog"),
            ("users", "gateway"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let l = layered(&nodes, &edges);
        assert_eq!(l["loadgen"].0, 0);
        assert_eq!((l["gateway"].0, l["users"].0, l["sqlite users"].0), (1, 2, 3), "the users → gateway call does not push the gateway down");
        assert!(l["catalog"].0 > l["gateway"].0 && l["sqlite catalog"].0 > l["catalog"].0);
        // The same input gives the same picture.
        assert_eq!(l, layered(&nodes, &edges));
        let rows_in_layer: BTreeSet<(usize, usize)> = l.values().copied().collect();
        assert_eq!(rows_in_layer.len(), nodes.len(), "no two nodes share a place");
    }
}
