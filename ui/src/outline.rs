//! A trace's outline: what the waterfall needs of every span (ids, parents, services, names,
//! kinds, statuses, times, event times), in columns, with strings in dictionaries and no
//! attributes; and its binary form, `/api/v1/traces/{id}/outline?format=binary`. The collector
//! writes it (its JSON form too, from the same columns), the dashboard's worker reads it.
//!
//! The binary form, every integer a LEB128 varint unless said otherwise, one column after another
//! so that gzip on the wire finds the repeats of each:
//!
//! ```text
//! "SYO1"                          magic and version
//! header length, header           JSON: traceId, startTimeUnixNano, durationNanos, spanCount,
//!                                 services, names
//! n                               spans in this outline
//! span ids                        n × 8 bytes, as sent (big-endian)
//! parents                         n × zigzag(i − parent), 0 for none (a span is not its own parent)
//! service, name                   n × dictionary index, each
//! kind, status                    n bytes, each
//! starts                          n × zigzag(start − previous start), from the trace's start
//! durations                       n
//! event counts                    n
//! event times                     Σ counts × zigzag(time − the span's start)
//! ```
//!
//! Spans are in start order, so the start deltas and the parents' distances are small.

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"SYO1";
/// The media type of the binary form.
pub const MEDIA_TYPE: &str = "application/vnd.switchyard.outline";

/// A trace's outline. Every per-span column has one entry per span, spans ordered by start time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outline {
    pub header: Header,
    /// Span ids as sent (8 bytes, big-endian).
    pub span_ids: Vec<u64>,
    /// Index of the parent span; -1 when the parent is not in the outline (a root or an orphan).
    pub parents: Vec<i32>,
    /// Index into `header.services`.
    pub service: Vec<u32>,
    /// Index into `header.names`.
    pub name: Vec<u32>,
    /// OTLP span kind (0–5).
    pub kind: Vec<u8>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status: Vec<u8>,
    /// Nanoseconds from the trace's start.
    pub start: Vec<i64>,
    pub duration: Vec<i64>,
    /// Span `i`'s events are `event_times[event_offsets[i]..event_offsets[i + 1]]` (n + 1 entries).
    pub event_offsets: Vec<u32>,
    /// Nanoseconds from the trace's start (an event may precede it).
    pub event_times: Vec<i64>,
}

/// What an outline says of the whole trace.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Hex.
    pub trace_id: String,
    /// The earliest span's start, in Unix nanoseconds (a string in JSON, as in OTLP/JSON).
    #[serde(with = "string_u64")]
    pub start_time_unix_nano: u64,
    /// From the earliest start to the latest end.
    pub duration_nanos: u64,
    /// Spans the trace has in all: more than the outline lists when it was cut.
    pub span_count: u64,
    /// Service names, sorted, each once.
    pub services: Vec<String>,
    /// Span names, sorted, each once.
    pub names: Vec<String>,
}

mod string_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Outline {
    pub fn len(&self) -> usize {
        self.span_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.span_ids.is_empty()
    }
    /// The trace has more spans than the outline lists.
    pub fn truncated(&self) -> bool {
        self.header.span_count > self.len() as u64
    }
    pub fn service_of(&self, i: usize) -> &str {
        self.header.services.get(self.service[i] as usize).map_or("", String::as_str)
    }
    pub fn name_of(&self, i: usize) -> &str {
        self.header.names.get(self.name[i] as usize).map_or("", String::as_str)
    }
    pub fn is_error(&self, i: usize) -> bool {
        self.status[i] == 2
    }
    pub fn span_id_hex(&self, i: usize) -> String {
        format!("{:016x}", self.span_ids[i])
    }
    pub fn events_of(&self, i: usize) -> &[i64] {
        &self.event_times[self.event_offsets[i] as usize..self.event_offsets[i + 1] as usize]
    }

    /// The binary form (see the module's documentation).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.len();
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(16 + header.len() + n * 24 + self.event_times.len() * 3);
        out.extend_from_slice(MAGIC);
        put(&mut out, header.len() as u64);
        out.extend_from_slice(&header);
        put(&mut out, n as u64);
        for id in &self.span_ids {
            out.extend_from_slice(&id.to_be_bytes());
        }
        // A span is never its own parent: one that says so is written as a root.
        for (i, &p) in self.parents.iter().enumerate() {
            put(&mut out, if p < 0 || p as usize == i { 0 } else { zigzag(i as i64 - i64::from(p)) });
        }
        for &s in &self.service {
            put(&mut out, u64::from(s));
        }
        for &s in &self.name {
            put(&mut out, u64::from(s));
        }
        out.extend_from_slice(&self.kind);
        out.extend_from_slice(&self.status);
        let mut previous = 0;
        for &s in &self.start {
            put(&mut out, zigzag(s.wrapping_sub(previous)));
            previous = s;
        }
        for &d in &self.duration {
            put(&mut out, d.max(0) as u64);
        }
        for w in self.event_offsets.windows(2) {
            put(&mut out, u64::from(w[1] - w[0]));
        }
        for i in 0..n {
            for &t in self.events_of(i) {
                put(&mut out, zigzag(t.wrapping_sub(self.start[i])));
            }
        }
        out
    }

    /// Reads the binary form, checking every index against what it points into.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4, "the magic")? != MAGIC {
            return Err("not an outline (no SYO1 magic)".into());
        }
        let len = r.len("the header's length", bytes.len())?;
        let header: Header = serde_json::from_slice(r.take(len, "the header")?).map_err(|e| format!("the header: {e}"))?;
        // A span takes at least 8 bytes: a count past that is a corrupt body, not an allocation.
        let n = r.len("the span count", bytes.len() / 8)?;
        let mut o = Outline { header, ..Default::default() };
        o.span_ids = r.take(n * 8, "the span ids")?.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect();
        o.parents = Vec::with_capacity(n);
        for i in 0..n {
            let d = r.varint("a parent")?;
            o.parents.push(if d == 0 {
                -1
            } else {
                match (i as i64).checked_sub(unzigzag(d)) {
                    Some(p) if (0..n as i64).contains(&p) => p as i32,
                    _ => return Err(format!("span {i}'s parent is outside the outline")),
                }
            });
        }
        o.service = r.indexes(n, o.header.services.len(), "service")?;
        o.name = r.indexes(n, o.header.names.len(), "name")?;
        o.kind = r.take(n, "the kinds")?.to_vec();
        o.status = r.take(n, "the statuses")?.to_vec();
        o.start = Vec::with_capacity(n);
        let mut previous = 0i64;
        for _ in 0..n {
            previous = previous.wrapping_add(unzigzag(r.varint("a start")?));
            o.start.push(previous);
        }
        o.duration = (0..n).map(|_| r.varint("a duration").map(|d| d.min(i64::MAX as u64) as i64)).collect::<Result<_, _>>()?;
        o.event_offsets = Vec::with_capacity(n + 1);
        o.event_offsets.push(0);
        let mut total = 0u32;
        for _ in 0..n {
            let count = r.len("an event count", bytes.len())?;
            total = u32::try_from(count).ok().and_then(|c| total.checked_add(c)).ok_or("more events than an outline holds")?;
            o.event_offsets.push(total);
        }
        // An event takes at least a byte: more than the bytes left is a corrupt body, not an allocation.
        if total as usize > bytes.len() - r.at {
            return Err(format!("{total} events in {} bytes", bytes.len() - r.at));
        }
        o.event_times = Vec::with_capacity(total as usize);
        for i in 0..n {
            for _ in o.event_offsets[i]..o.event_offsets[i + 1] {
                o.event_times.push(o.start[i].wrapping_add(unzigzag(r.varint("an event time")?)));
            }
        }
        if r.at != bytes.len() {
            return Err(format!("{} bytes after the last column", bytes.len() - r.at));
        }
        Ok(o)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| format!("the outline ends inside {what}"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn varint(&mut self, what: &str) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.at).ok_or_else(|| format!("the outline ends inside {what}"))?;
            self.at += 1;
            if shift == 63 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(format!("{what} is not a varint"))
    }
    /// A count or length of at most `max`.
    fn len(&mut self, what: &str, max: usize) -> Result<usize, String> {
        let v = self.varint(what)?;
        usize::try_from(v).ok().filter(|&v| v <= max).ok_or_else(|| format!("{what} {v} is larger than the outline"))
    }
    fn indexes(&mut self, n: usize, bound: usize, what: &str) -> Result<Vec<u32>, String> {
        (0..n)
            .map(|i| {
                let v = self.varint(what)?;
                u32::try_from(v).ok().filter(|&v| (v as usize) < bound).ok_or_else(|| format!("span {i}'s {what} {v} is not in the dictionary of {bound}"))
            })
            .collect()
    }
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// (id, parent index, start, end) → an outline of one service and name.
    pub(crate) fn outline(spans: &[(u64, i32, i64, i64)]) -> Outline {
        let n = spans.len();
        Outline {
            header: Header {
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                start_time_unix_nano: 1_700_000_000_000_000_000,
                duration_nanos: spans.iter().map(|s| s.3).max().unwrap_or(0) as u64,
                span_count: n as u64,
                services: vec!["svc".into()],
                names: vec!["op".into()],
            },
            span_ids: spans.iter().map(|s| s.0).collect(),
            parents: spans.iter().map(|s| s.1).collect(),
            service: vec![0; n],
            name: vec![0; n],
            kind: vec![1; n],
            start: spans.iter().map(|s| s.2).collect(),
            duration: spans.iter().map(|s| s.3 - s.2).collect(),
            status: vec![0; n],
            event_offsets: vec![0; n + 1],
            event_times: vec![],
        }
    }

    #[test]
    fn round_trips_every_column() {
        let mut o = outline(&[(1, -1, 0, 100), (u64::MAX, 0, 10, 40), (0x0102_0304_0506_0708, 3, 10, 20), (7, 0, 30, 90)]);
        o.header.services = vec!["a".into(), "b".into()];
        o.header.names = vec!["x".into(), "y".into(), "z".into()];
        o.header.span_count = 9;
        o.service = vec![0, 1, 1, 0];
        o.name = vec![2, 0, 1, 2];
        o.kind = vec![2, 3, 5, 1];
        o.status = vec![0, 2, 1, 0];
        o.event_offsets = vec![0, 2, 2, 3, 3];
        o.event_times = vec![-5, 60, 15];
        let bytes = o.encode();
        assert_eq!(Outline::decode(&bytes), Ok(o.clone()));
        assert!(o.truncated());
        assert_eq!(o.span_id_hex(2), "0102030405060708");
        assert_eq!(o.events_of(0), [-5, 60]);
        let json = serde_json::to_value(&o.header).expect("a header is JSON");
        assert_eq!(json["startTimeUnixNano"], "1700000000000000000");
    }

    #[test]
    fn a_million_spans_take_few_bytes_a_span() {
        let spans: Vec<(u64, i32, i64, i64)> = (0..1_000_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i as i32 - 1 - (i % 7) as i32, i as i64 * 1000, i as i64 * 1000 + 5000))
            .collect();
        let mut spans = spans;
        spans[0].1 = -1;
        let o = outline(&spans);
        let bytes = o.encode();
        // 8 bytes of id, 1 each of parent, service, name, kind, status and event count, 2 each of
        // start and duration.
        assert_eq!(bytes.len(), 18 * 1_000_000 + 177);
        assert_eq!(Outline::decode(&bytes).expect("decodes"), o);
    }

    #[test]
    fn corrupt_bodies_are_errors_that_name_the_problem() {
        let o = outline(&[(1, -1, 0, 100), (2, 0, 10, 40)]);
        let bytes = o.encode();
        assert!(Outline::decode(b"{\"traceId\":1}").expect_err("a corrupt body").contains("magic"));
        for cut in [3, 6, 30, bytes.len() - 1] {
            let e = Outline::decode(&bytes[..cut]).expect_err("a corrupt body");
            assert!(e.contains("ends inside") || e.contains("larger than") || e.contains("header"), "{cut}: {e}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Outline::decode(&extra).expect_err("a corrupt body").contains("after the last column"));
        // A parent pointing past the outline, a name outside its dictionary.
        let mut bad = o.clone();
        bad.parents[1] = 5;
        assert!(Outline::decode(&bad.encode()).expect_err("a corrupt body").contains("outside the outline"));
        let mut bad = o;
        bad.name[0] = 3;
        assert!(Outline::decode(&bad.encode()).expect_err("a corrupt body").contains("not in the dictionary"));
        // An event count past the bytes left, a varint of more than 64 bits.
        let mut o = outline(&[(1, -1, 0, 100)]);
        o.event_offsets = vec![0, 3];
        o.event_times = vec![1, 2, 3];
        let mut bytes = o.encode();
        let at = bytes.len() - 4; // the count, then three one-byte times
        bytes[at] = 0x7f;
        assert!(Outline::decode(&bytes).expect_err("a corrupt count").contains("events in"));
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&[0xff; 9]);
        long.push(0x02);
        assert!(Outline::decode(&long).expect_err("a corrupt varint").contains("not a varint"));
    }

    /// Every cut and every changed byte of a body gives an outline or an error, never a panic or a
    /// huge allocation; an outline it gives encodes back to the same bytes' meaning.
    #[test]
    fn any_damage_to_a_body_is_handled() {
        let mut o = outline(&[(1, -1, 0, 100), (2, 0, 10, 40), (3, 1, 12, 20), (4, 0, 50, 90)]);
        o.event_offsets = vec![0, 1, 1, 3, 3];
        o.event_times = vec![5, 13, 19];
        let bytes = o.encode();
        for cut in 0..bytes.len() {
            assert!(Outline::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            for flip in [0x01, 0x10, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                if let Ok(d) = Outline::decode(&b) {
                    assert!(d.len() <= b.len() / 8 && d.event_times.len() <= b.len());
                    assert_eq!(Outline::decode(&d.encode()), Ok(d));
                }
            }
        }
    }
}
