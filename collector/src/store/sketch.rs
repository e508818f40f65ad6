//! A mergeable latency sketch: counts in logarithmic buckets, eight to a doubling.
//!
//! Bucket `i ≥ 1` holds durations `d` (in nanoseconds) with `⌊8·log2(d)⌋ = i - 1`; bucket 0 holds
//! `d = 0`. A percentile is answered with the geometric middle of the bucket that holds the
//! nearest-rank value, so it is within `2^(1/16) - 1 ≈ 4.4 %` of that value (the relative error
//! documented in `docs/API.md`). Sketches of the same series merge by adding counts, so per-minute
//! sketches answer any window of whole minutes.
//!
//! Stored as a BLOB: the number of non-empty buckets, then for each its index (as the difference
//! from the previous one) and its count, all LEB128 varints.

use super::codec::{get_varint, put_varint};

/// Buckets per doubling.
const PER_OCTAVE: f64 = 8.0;
/// The largest relative error of a percentile against the value it stands for.
pub const RELATIVE_ERROR: f64 = 0.044_3;

/// Non-empty buckets in increasing index order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    buckets: Vec<(u16, u64)>,
}

fn bucket(duration_ns: u64) -> u16 {
    if duration_ns == 0 {
        return 0;
    }
    // log2 of a u64 is below 64, so the index stays below 8·64 + 1.
    ((duration_ns as f64).log2() * PER_OCTAVE).floor() as u16 + 1
}

/// The geometric middle of a bucket's range.
fn middle(index: u16) -> u64 {
    if index == 0 {
        return 0;
    }
    ((f64::from(index - 1) + 0.5) / PER_OCTAVE).exp2().round() as u64
}

impl Sketch {
    pub fn add(&mut self, duration_ns: u64) {
        self.add_count(bucket(duration_ns), 1);
    }

    fn add_count(&mut self, index: u16, count: u64) {
        match self.buckets.binary_search_by_key(&index, |&(i, _)| i) {
            Ok(at) => self.buckets[at].1 += count,
            Err(at) => self.buckets.insert(at, (index, count)),
        }
    }

    /// Adds another sketch's counts: one pass over both sorted bucket lists.
    pub fn merge(&mut self, other: &Sketch) {
        if self.buckets.is_empty() {
            self.buckets.clone_from(&other.buckets);
            return;
        }
        let mut merged = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut a, mut b) = (self.buckets.iter().peekable(), other.buckets.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&(i, c)), Some(&&(j, d))) if i == j => {
                    a.next();
                    b.next();
                    (i, c + d)
                }
                (Some(&&x), Some(&&y)) if x.0 < y.0 => {
                    a.next();
                    x
                }
                (_, Some(&&y)) => {
                    b.next();
                    y
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, None) => break,
            };
            merged.push(next);
        }
        self.buckets = merged;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, c)| c).sum()
    }

    /// The nearest-rank `p` percentile (0 < p ≤ 1), within [`RELATIVE_ERROR`]; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for &(i, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                return middle(i);
            }
        }
        middle(self.buckets.last().map_or(0, |&(i, _)| i))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 3 * self.buckets.len());
        put_varint(&mut out, self.buckets.len() as u64);
        let mut prev = 0;
        for &(i, c) in &self.buckets {
            put_varint(&mut out, u64::from(i - prev));
            put_varint(&mut out, c);
            prev = i;
        }
        out
    }

    /// `None` for a blob this code did not write.
    pub fn decode(mut b: &[u8]) -> Option<Self> {
        let n = get_varint(&mut b)?;
        let mut buckets = Vec::with_capacity(n.min(600) as usize);
        let mut index: u64 = 0;
        for _ in 0..n {
            index += get_varint(&mut b)?;
            let count = get_varint(&mut b)?;
            buckets.push((u16::try_from(index).ok()?, count));
        }
        b.is_empty().then_some(Self { buckets })
    }
}

/// Buckets a sketch can have: index 0 for zero, then 8 per doubling of a u64.
const BUCKETS: usize = 8 * 64 + 2;

/// A sketch being summed from many stored ones: a count per possible bucket, so adding an encoded
/// sketch allocates nothing.
pub struct Dense(Box<[u64; BUCKETS]>);

impl Default for Dense {
    fn default() -> Self {
        Self(Box::new([0; BUCKETS]))
    }
}

impl Dense {
    /// Adds a sketch as [`Sketch::encode`] wrote it; `None` for a blob it did not write.
    pub fn add_encoded(&mut self, mut b: &[u8]) -> Option<()> {
        let n = get_varint(&mut b)?;
        let mut index: u64 = 0;
        for _ in 0..n {
            index += get_varint(&mut b)?;
            let count = get_varint(&mut b)?;
            *self.0.get_mut(usize::try_from(index).ok()?)? += count;
        }
        b.is_empty().then_some(())
    }

    pub fn into_sketch(self) -> Sketch {
        Sketch { buckets: self.0.iter().enumerate().filter(|&(_, &c)| c > 0).map(|(i, &c)| (i as u16, c)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_the_documented_error() {
        let mut values: Vec<u64> = (0..10_000u64).map(|i| 1_000 + i * i * 37 % 5_000_000_000).collect();
        let mut sketch = Sketch::default();
        for &v in &values {
            sketch.add(v);
        }
        values.sort_unstable();
        for p in [0.01, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
            let exact = values[rank - 1] as f64;
            let got = sketch.percentile(p) as f64;
            assert!((got - exact).abs() <= exact * RELATIVE_ERROR, "p{p}: {got} vs {exact}");
        }
    }

    #[test]
    fn merged_sketches_equal_one_sketch_of_everything() {
        let (mut a, mut b, mut all) = (Sketch::default(), Sketch::default(), Sketch::default());
        for v in [0, 1, 7, 1_000, 1_000_000, u64::MAX] {
            a.add(v);
            all.add(v);
        }
        for v in [3, 1_000, 2_000_000_000] {
            b.add(v);
            all.add(v);
        }
        let mut dense = Dense::default();
        dense.add_encoded(&a.encode()).expect("decodes");
        dense.add_encoded(&b.encode()).expect("decodes");
        assert_eq!(dense.into_sketch(), all);
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(Sketch::decode(&all.encode()), Some(all.clone()));
        assert_eq!(all.count(), 9);
        assert_eq!(Sketch::decode(&[2, 1]), None);
        assert_eq!(Sketch::default().percentile(0.5), 0);
    }
}
