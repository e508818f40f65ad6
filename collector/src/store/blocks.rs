//! Spans as they are stored: in blocks of up to [`MAX_BLOCK_SPANS`] spans of one transaction,
//! sorted by trace and start, laid out column by column and compressed with zstd. One
//! `span_blocks` row holds a block with what search and retention need to know without opening
//! it (its span starts, the operations in it with their statuses and longest duration, the trace
//! rows it holds); one `trace_blocks` row per trace and block finds a trace's blocks. A
//! transaction of thousands of spans thus writes a few rows and index entries instead of one row
//! and three index entries per span (see ARCHITECTURE.md, "Span blocks").
//!
//! The layout (format 1), before compression: the format byte, the span count, then columns, each
//! a varint length and its bytes: trace runs (trace row id delta, span count), span ids (8 bytes
//! each), parents (0 none, 1 outside the block — 8 bytes in the next column —, k + 2 the k-th span
//! of the block), services, names (id × 2, or 1 for a name stored inline in the texts column),
//! kinds, starts (delta from the previous span), durations, status codes, resources, scopes,
//! flags, dropped counts, optional texts (status message, trace state: length + 1 or 0), texts,
//! and the lengths (+ 1, or 0) and bytes of the encoded attributes, events and links. Columns of
//! like values compress far better than rows: see docs/PERFORMANCE.md for the bytes per span.

use super::codec::{CodecError, get_varint, put_varint, unzigzag, zigzag};
use super::rows::SpanName;

/// Spans a block holds at most: small enough that reading one trace opens little else.
pub const MAX_BLOCK_SPANS: usize = 512;
/// About the most encoded bytes a block takes before compression.
pub const MAX_BLOCK_RAW: usize = 256 << 10;
/// A block that claims more than this when decompressed is corrupt.
const MAX_DECOMPRESSED: usize = 64 << 20;
const FORMAT: u8 = 1;
/// zstd's level: 3 compresses spans about as well as 9 at a third of the CPU (docs/PERFORMANCE.md).
const ZSTD_LEVEL: i32 = 3;

/// A span as stored: the columns of the former `spans` table.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpan {
    /// `traces.id`.
    pub trace: i64,
    /// 8 bytes, big-endian, as i64.
    pub span_id: i64,
    pub parent_span_id: Option<i64>,
    /// `strings.id` of the resource's service.
    pub service: i64,
    pub name: SpanName,
    pub kind: i32,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub status_code: i32,
    pub status_message: Option<String>,
    pub resource: i64,
    pub scope: i64,
    pub trace_state: Option<String>,
    pub flags: i64,
    pub attributes: Option<Vec<u8>>,
    pub events: Option<Vec<u8>>,
    pub links: Option<Vec<u8>>,
    pub dropped_attributes_count: i64,
    pub dropped_events_count: i64,
    pub dropped_links_count: i64,
}

impl StoredSpan {
    /// Bytes of its encoded attributes, events and links.
    pub fn blob_len(&self) -> usize {
        let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
        len(&self.attributes) + len(&self.events) + len(&self.links)
    }

    /// About the bytes the span takes encoded, before compression.
    fn raw_len(&self) -> usize {
        48 + self.blob_len()
            + self.status_message.as_ref().map_or(0, String::len)
            + self.trace_state.as_ref().map_or(0, String::len)
            + match &self.name {
                SpanName::Inline(s) => s.len(),
                SpanName::Id(_) => 0,
            }
    }
}

/// What search learns of a block without opening it: each (service, name, kind) in it, with the
/// status codes its spans have (bit per code) and their longest duration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub ops: Vec<OpSummary>,
    /// The resources of its spans, ascending.
    pub resources: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpSummary {
    pub service: i64,
    /// The name's string id; -1 for every name stored inline.
    pub name: i64,
    pub kind: i32,
    pub statuses: u8,
    pub max_duration_ns: i64,
}

impl Summary {
    fn of(spans: &[&StoredSpan]) -> Self {
        let mut ops: std::collections::BTreeMap<(i64, i64, i32), (u8, i64)> = Default::default();
        for s in spans {
            let name = match s.name {
                SpanName::Id(id) => id,
                SpanName::Inline(_) => -1,
            };
            let e = ops.entry((s.service, name, s.kind)).or_insert((0, i64::MIN));
            e.0 |= status_bit(s.status_code);
            e.1 = e.1.max(s.duration_ns);
        }
        let mut resources: Vec<i64> = spans.iter().map(|s| s.resource).collect();
        resources.sort_unstable();
        resources.dedup();
        Self {
            ops: ops
                .into_iter()
                .map(|((service, name, kind), (statuses, max_duration_ns))| OpSummary { service, name, kind, statuses, max_duration_ns })
                .collect(),
            resources,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ops.len() * 8 + 2);
        put_varint(&mut out, self.ops.len() as u64);
        for op in &self.ops {
            put_varint(&mut out, zigzag(op.service));
            put_varint(&mut out, zigzag(op.name));
            put_varint(&mut out, zigzag(i64::from(op.kind)));
            out.push(op.statuses);
            put_varint(&mut out, zigzag(op.max_duration_ns));
        }
        put_varint(&mut out, self.resources.len() as u64);
        for r in &self.resources {
            put_varint(&mut out, zigzag(*r));
        }
        out
    }

    pub fn decode(mut buf: &[u8]) -> Result<Self, CodecError> {
        let b = &mut buf;
        let n = varint(b)? as usize;
        let mut ops = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let service = unzigzag(varint(b)?);
            let name = unzigzag(varint(b)?);
            let kind = unzigzag(varint(b)?) as i32;
            let (&statuses, rest) = b.split_first().ok_or(CodecError::Truncated)?;
            *b = rest;
            let max_duration_ns = unzigzag(varint(b)?);
            ops.push(OpSummary { service, name, kind, statuses, max_duration_ns });
        }
        let n = varint(b)? as usize;
        let mut resources = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            resources.push(unzigzag(varint(b)?));
        }
        Ok(Self { ops, resources })
    }
}

/// The bit a status code has in [`OpSummary::statuses`].
pub fn status_bit(code: i32) -> u8 {
    1 << code.clamp(0, 7)
}

/// A block ready to insert.
#[derive(Debug)]
pub struct Block {
    pub start_min: i64,
    pub start_max: i64,
    pub spans: usize,
    pub summary: Vec<u8>,
    /// The `traces` rows it holds spans of, ascending, with how many each.
    pub traces: Vec<(i64, u32)>,
    /// The compressed columns.
    pub data: Vec<u8>,
    /// The filter of its spans' attribute pairs ([`Bloom`]); `None` when some span came without
    /// its pairs hashed (moved from an older database).
    pub bloom: Option<Vec<u8>>,
}

/// Splits spans into blocks: sorted by trace and start, cut at [`MAX_BLOCK_SPANS`] spans or
/// [`MAX_BLOCK_RAW`] bytes. Each span comes with the hashes of its attribute pairs
/// ([`attribute_hash`]) when they are known.
pub fn build(mut spans: Vec<(&StoredSpan, Option<&[u64]>)>) -> Vec<Block> {
    spans.sort_by_key(|(s, _)| (s.trace, s.start_ns));
    // One compression context for all the blocks (zstd's takes about a megabyte to set up).
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
    let mut blocks = Vec::new();
    let mut from = 0;
    while from < spans.len() {
        let mut to = from;
        let mut raw = 0;
        while to < spans.len() && to - from < MAX_BLOCK_SPANS && (to == from || raw + spans[to].0.raw_len() <= MAX_BLOCK_RAW) {
            raw += spans[to].0.raw_len();
            to += 1;
        }
        let chunk = &spans[from..to];
        let mut block = encode_with(&chunk.iter().map(|(s, _)| *s).collect::<Vec<_>>(), compressor.as_mut());
        block.bloom = chunk.iter().map(|(_, h)| *h).collect::<Option<Vec<&[u64]>>>().map(|hashes| Bloom::of(hashes.into_iter().flatten().copied().collect()));
        blocks.push(block);
        from = to;
    }
    blocks
}

/// Encodes spans (sorted by trace) as one block.
pub fn encode(spans: &[&StoredSpan]) -> Block {
    encode_with(spans, zstd::bulk::Compressor::new(ZSTD_LEVEL).ok().as_mut())
}

/// [`encode`] with a compression context to reuse (`None`: its creation failed; stored uncompressed).
fn encode_with(spans: &[&StoredSpan], compressor: Option<&mut zstd::bulk::Compressor<'static>>) -> Block {
    let mut cols: [Vec<u8>; COLUMNS] = Default::default();
    // The large columns get their room at once, not by doubling (and copying) as they grow.
    cols[C_ATTRIBUTES].reserve(spans.iter().map(|s| s.attributes.as_ref().map_or(0, Vec::len)).sum());
    cols[C_EVENTS].reserve(spans.iter().map(|s| s.events.as_ref().map_or(0, Vec::len)).sum());
    cols[C_SPAN_IDS].reserve(spans.len() * 8);
    let mut traces: Vec<(i64, u32)> = Vec::new();
    for s in spans {
        match traces.last_mut() {
            Some((t, n)) if *t == s.trace => *n += 1,
            _ => traces.push((s.trace, 1)),
        }
    }
    put_varint(&mut cols[C_TRACES], traces.len() as u64);
    let mut prev = 0;
    for &(t, n) in &traces {
        put_varint(&mut cols[C_TRACES], zigzag(t.wrapping_sub(prev)));
        put_varint(&mut cols[C_TRACES], u64::from(n));
        prev = t;
    }
    // A parent is usually a span of the same trace in the same block: its index is a byte or two.
    let index: rustc_hash::FxHashMap<(i64, i64), usize> = spans.iter().enumerate().map(|(i, s)| ((s.trace, s.span_id), i)).collect();
    let mut prev_start = 0i64;
    for s in spans {
        cols[C_SPAN_IDS].extend_from_slice(&s.span_id.to_be_bytes());
        match s.parent_span_id {
            None => put_varint(&mut cols[C_PARENTS], 0),
            Some(p) => match index.get(&(s.trace, p)) {
                Some(&i) => put_varint(&mut cols[C_PARENTS], i as u64 + 2),
                None => {
                    put_varint(&mut cols[C_PARENTS], 1);
                    cols[C_PARENT_IDS].extend_from_slice(&p.to_be_bytes());
                }
            },
        }
        put_varint(&mut cols[C_SERVICES], zigzag(s.service));
        match &s.name {
            SpanName::Id(id) => put_varint(&mut cols[C_NAMES], zigzag(*id) << 1),
            SpanName::Inline(name) => {
                put_varint(&mut cols[C_NAMES], 1);
                put_text(&mut cols[C_TEXTS], name.as_bytes());
            }
        }
        put_varint(&mut cols[C_KINDS], zigzag(i64::from(s.kind)));
        put_varint(&mut cols[C_STARTS], zigzag(s.start_ns.wrapping_sub(prev_start)));
        prev_start = s.start_ns;
        put_varint(&mut cols[C_DURATIONS], zigzag(s.duration_ns));
        put_varint(&mut cols[C_STATUS], zigzag(i64::from(s.status_code)));
        put_varint(&mut cols[C_RESOURCES], zigzag(s.resource));
        put_varint(&mut cols[C_SCOPES], zigzag(s.scope));
        put_varint(&mut cols[C_FLAGS], zigzag(s.flags));
        for d in [s.dropped_attributes_count, s.dropped_events_count, s.dropped_links_count] {
            put_varint(&mut cols[C_DROPPED], zigzag(d));
        }
        for t in [&s.status_message, &s.trace_state] {
            let [lens, bytes] = cols.get_disjoint_mut([C_OPTIONAL_TEXTS, C_TEXTS]).expect("distinct columns");
            put_optional(lens, bytes, t.as_ref().map(String::as_bytes));
        }
        let [lens, bytes] = cols.get_disjoint_mut([C_ATTRIBUTE_LENS, C_ATTRIBUTES]).expect("distinct columns");
        put_optional(lens, bytes, s.attributes.as_deref());
        let [lens, bytes] = cols.get_disjoint_mut([C_EVENT_LENS, C_EVENTS]).expect("distinct columns");
        put_optional(lens, bytes, s.events.as_deref());
        let [lens, bytes] = cols.get_disjoint_mut([C_LINK_LENS, C_LINKS]).expect("distinct columns");
        put_optional(lens, bytes, s.links.as_deref());
    }
    let mut raw = Vec::with_capacity(cols.iter().map(|c| c.len() + 4).sum::<usize>() + 8);
    raw.push(FORMAT);
    put_varint(&mut raw, spans.len() as u64);
    for c in &cols {
        put_varint(&mut raw, c.len() as u64);
        raw.extend_from_slice(c);
    }
    let mut data = Vec::with_capacity(raw.len() / 4 + 16);
    put_varint(&mut data, raw.len() as u64);
    // Compressing into memory cannot fail but for a bug: keep the block uncompressed then.
    let compressed = match compressor {
        Some(c) => c.compress(&raw),
        None => Err(std::io::Error::other("no compression context")),
    };
    match compressed {
        Ok(z) => data.extend_from_slice(&z),
        Err(e) => {
            tracing::error!(error = %e, "compressing a span block failed; stored uncompressed");
            data.clear();
            put_varint(&mut data, 0);
            data.extend_from_slice(&raw);
        }
    }
    Block {
        start_min: spans.iter().map(|s| s.start_ns).min().unwrap_or(0),
        start_max: spans.iter().map(|s| s.start_ns).max().unwrap_or(0),
        spans: spans.len(),
        summary: Summary::of(spans).encode(),
        traces,
        data,
        bloom: None,
    }
}

/// The hash of an attribute pair as a span has it (key, and the value as search compares it:
/// [`crate::store::read::value_text`]) for a block's [`Bloom`] filter. FNV-1a, written out: the
/// hash is stored, so it must never change with a dependency's version.
pub fn attribute_hash(key: &str, value: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes().iter().chain(&[0xff]).chain(value.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A Bloom filter of a block's attribute pairs: 8 bits a distinct pair, 5 probes (about 2 % false
/// positives), so a search for a rare value opens few blocks. Stored as its bit array (a multiple
/// of 64 bits).
pub struct Bloom;

impl Bloom {
    const PROBES: u64 = 5;
    const BITS_PER_PAIR: usize = 8;

    pub fn of(mut hashes: Vec<u64>) -> Vec<u8> {
        hashes.sort_unstable();
        hashes.dedup();
        if hashes.is_empty() {
            return Vec::new();
        }
        let bits = (hashes.len() * Self::BITS_PER_PAIR).div_ceil(64) * 64;
        let mut out = vec![0u8; bits / 8];
        for h in hashes {
            for bit in Self::probes(h, bits as u64) {
                out[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        out
    }

    /// Whether the filter may hold the hash (an empty filter holds nothing).
    pub fn may_contain(filter: &[u8], h: u64) -> bool {
        let bits = filter.len() as u64 * 8;
        bits > 0 && Self::probes(h, bits).all(|bit| filter[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    fn probes(h: u64, bits: u64) -> impl Iterator<Item = u64> {
        let (a, b) = (h & 0xffff_ffff, (h >> 32) | 1);
        (0..Self::PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) % bits)
    }
}

/// A block's trace rows and their span counts as `span_blocks.traces` stores them: a delta varint
/// and a count varint each.
pub fn encode_trace_list(traces: &[(i64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(traces.len() * 3);
    let mut prev = 0;
    for &(t, n) in traces {
        put_varint(&mut out, zigzag(t.wrapping_sub(prev)));
        put_varint(&mut out, u64::from(n));
        prev = t;
    }
    out
}

/// The trace rows of `span_blocks.traces`, with the spans the block holds of each.
pub fn decode_trace_list(mut buf: &[u8]) -> Result<Vec<(i64, u32)>, CodecError> {
    let mut out = Vec::new();
    let mut prev = 0i64;
    while !buf.is_empty() {
        prev = prev.wrapping_add(unzigzag(varint(&mut buf)?));
        let n = u32::try_from(varint(&mut buf)?).map_err(|_| CodecError::Truncated)?;
        out.push((prev, n));
    }
    Ok(out)
}

/// The spans of a stored block, in stored order (by trace, then start).
pub fn decode(data: &[u8]) -> Result<Vec<StoredSpan>, CodecError> {
    Ok(decode_where(data, |_| true)?.into_iter().map(|(_, s)| s).collect())
}

/// The spans of a stored block whose `traces` row `keep` wants, with their places in the block.
/// The others are read past without copying their strings and blobs: a trace's few spans out of a
/// block of 512 cost little more than those.
pub fn decode_where(data: &[u8], keep: impl Fn(i64) -> bool) -> Result<Vec<(u32, StoredSpan)>, CodecError> {
    let mut buf = data;
    let raw_len = varint(&mut buf)? as usize;
    let decompressed;
    let mut raw: &[u8] = if raw_len == 0 {
        buf
    } else {
        if raw_len > MAX_DECOMPRESSED {
            return Err(CodecError::Truncated);
        }
        decompressed = zstd::bulk::decompress(buf, raw_len).map_err(|_| CodecError::Truncated)?;
        if decompressed.len() != raw_len {
            return Err(CodecError::Truncated);
        }
        &decompressed
    };
    let (&format, rest) = raw.split_first().ok_or(CodecError::Truncated)?;
    if format != FORMAT {
        return Err(CodecError::UnknownTag(format));
    }
    raw = rest;
    let n = varint(&mut raw)? as usize;
    if n > MAX_DECOMPRESSED / 8 {
        return Err(CodecError::Truncated);
    }
    let mut cols: [&[u8]; COLUMNS] = [&[]; COLUMNS];
    for c in &mut cols {
        let len = varint(&mut raw)? as usize;
        if len > raw.len() {
            return Err(CodecError::Truncated);
        }
        let (col, rest) = raw.split_at(len);
        *c = col;
        raw = rest;
    }
    let mut trace_of = Vec::with_capacity(n);
    {
        let c = &mut cols[C_TRACES];
        let runs = varint(c)?;
        let mut t = 0i64;
        for _ in 0..runs {
            t = t.wrapping_add(unzigzag(varint(c)?));
            let count = varint(c)? as usize;
            if trace_of.len() + count > n {
                return Err(CodecError::Truncated);
            }
            trace_of.extend(std::iter::repeat_n(t, count));
        }
        if trace_of.len() != n {
            return Err(CodecError::Truncated);
        }
    }
    let mut span_ids = Vec::with_capacity(n);
    for _ in 0..n {
        span_ids.push(fixed(&mut cols[C_SPAN_IDS])?);
    }
    let mut out = Vec::with_capacity(n);
    let mut prev_start = 0i64;
    for i in 0..n {
        let parent_span_id = match varint(&mut cols[C_PARENTS])? {
            0 => None,
            1 => Some(fixed(&mut cols[C_PARENT_IDS])?),
            k => Some(*span_ids.get(k as usize - 2).ok_or(CodecError::Truncated)?),
        };
        let service = unzigzag(varint(&mut cols[C_SERVICES])?);
        let name = match varint(&mut cols[C_NAMES])? {
            1 => Err(text_bytes(&mut cols[C_TEXTS])?),
            v => Ok(unzigzag(v >> 1)),
        };
        let kind = unzigzag(varint(&mut cols[C_KINDS])?) as i32;
        prev_start = prev_start.wrapping_add(unzigzag(varint(&mut cols[C_STARTS])?));
        let duration_ns = unzigzag(varint(&mut cols[C_DURATIONS])?);
        let status_code = unzigzag(varint(&mut cols[C_STATUS])?) as i32;
        let resource = unzigzag(varint(&mut cols[C_RESOURCES])?);
        let scope = unzigzag(varint(&mut cols[C_SCOPES])?);
        let flags = unzigzag(varint(&mut cols[C_FLAGS])?);
        let mut dropped = [0i64; 3];
        for d in &mut dropped {
            *d = unzigzag(varint(&mut cols[C_DROPPED])?);
        }
        let [texts_lens, texts] = cols.get_disjoint_mut([C_OPTIONAL_TEXTS, C_TEXTS]).map_err(|_| CodecError::Truncated)?;
        let status_message = optional(texts_lens, texts)?;
        let trace_state = optional(texts_lens, texts)?;
        let [lens, bytes] = cols.get_disjoint_mut([C_ATTRIBUTE_LENS, C_ATTRIBUTES]).map_err(|_| CodecError::Truncated)?;
        let attributes = optional(lens, bytes)?;
        let [lens, bytes] = cols.get_disjoint_mut([C_EVENT_LENS, C_EVENTS]).map_err(|_| CodecError::Truncated)?;
        let events = optional(lens, bytes)?;
        let [lens, bytes] = cols.get_disjoint_mut([C_LINK_LENS, C_LINKS]).map_err(|_| CodecError::Truncated)?;
        let links = optional(lens, bytes)?;
        if !keep(trace_of[i]) {
            continue;
        }
        out.push((
            i as u32,
            StoredSpan {
                trace: trace_of[i],
                span_id: span_ids[i],
                parent_span_id,
                service,
                name: match name {
                    Ok(id) => SpanName::Id(id),
                    Err(text) => SpanName::Inline(utf8(text)?),
                },
                kind,
                start_ns: prev_start,
                duration_ns,
                status_code,
                status_message: status_message.map(utf8).transpose()?,
                resource,
                scope,
                trace_state: trace_state.map(utf8).transpose()?,
                flags,
                attributes: attributes.map(<[u8]>::to_vec),
                events: events.map(<[u8]>::to_vec),
                links: links.map(<[u8]>::to_vec),
                dropped_attributes_count: dropped[0],
                dropped_events_count: dropped[1],
                dropped_links_count: dropped[2],
            },
        ));
    }
    Ok(out)
}

const C_TRACES: usize = 0;
const C_SPAN_IDS: usize = 1;
const C_PARENTS: usize = 2;
const C_PARENT_IDS: usize = 3;
const C_SERVICES: usize = 4;
const C_NAMES: usize = 5;
const C_KINDS: usize = 6;
const C_STARTS: usize = 7;
const C_DURATIONS: usize = 8;
const C_STATUS: usize = 9;
const C_RESOURCES: usize = 10;
const C_SCOPES: usize = 11;
const C_FLAGS: usize = 12;
const C_DROPPED: usize = 13;
const C_OPTIONAL_TEXTS: usize = 14;
const C_TEXTS: usize = 15;
const C_ATTRIBUTE_LENS: usize = 16;
const C_ATTRIBUTES: usize = 17;
const C_EVENT_LENS: usize = 18;
const C_EVENTS: usize = 19;
const C_LINK_LENS: usize = 20;
const C_LINKS: usize = 21;
const COLUMNS: usize = 22;

fn varint(buf: &mut &[u8]) -> Result<u64, CodecError> {
    get_varint(buf).ok_or(CodecError::Truncated)
}

fn fixed(buf: &mut &[u8]) -> Result<i64, CodecError> {
    let (head, rest) = buf.split_first_chunk::<8>().ok_or(CodecError::Truncated)?;
    *buf = rest;
    Ok(i64::from_be_bytes(*head))
}

fn put_text(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn text_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], CodecError> {
    let len = varint(buf)? as usize;
    if len > buf.len() {
        return Err(CodecError::Truncated);
    }
    let (t, rest) = buf.split_at(len);
    *buf = rest;
    Ok(t)
}

fn utf8(b: &[u8]) -> Result<String, CodecError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::Utf8)
}

/// An optional byte string: its length + 1 (0 for none) in `lens`, its bytes in `bytes`.
fn put_optional(lens: &mut Vec<u8>, bytes: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varint(lens, 0),
        Some(b) => {
            put_varint(lens, b.len() as u64 + 1);
            bytes.extend_from_slice(b);
        }
    }
}

fn optional<'a>(lens: &mut &[u8], bytes: &mut &'a [u8]) -> Result<Option<&'a [u8]>, CodecError> {
    match varint(lens)? {
        0 => Ok(None),
        n => {
            let len = n as usize - 1;
            if len > bytes.len() {
                return Err(CodecError::Truncated);
            }
            let (b, rest) = bytes.split_at(len);
            *bytes = rest;
            Ok(Some(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: i64, i: i64) -> StoredSpan {
        StoredSpan {
            trace,
            span_id: i * 7919 - 40,
            parent_span_id: match i % 3 {
                0 => None,
                1 => Some((i - 1) * 7919 - 40),
                _ => Some(-5),
            },
            service: 3 + i % 2,
            name: if i % 5 == 0 { SpanName::Inline(format!("inline {i}")) } else { SpanName::Id(10 + i % 4) },
            kind: (i % 6) as i32,
            start_ns: 1_700_000_000_000_000_000 + i * 1000 - (i % 7) * 3,
            duration_ns: if i == 4 { -3 } else { i * 10 },
            status_code: (i % 3) as i32,
            status_message: (i % 4 == 0).then(|| format!("message {i}")),
            resource: 1,
            scope: 2,
            trace_state: (i % 9 == 0).then(|| "k=v".to_owned()),
            flags: 0x101,
            attributes: (i % 2 == 0).then(|| vec![i as u8; (i % 40) as usize]),
            events: (i % 3 == 0).then(|| vec![7; 3]),
            links: (i % 8 == 0).then(Vec::new),
            dropped_attributes_count: i % 2,
            dropped_events_count: 0,
            dropped_links_count: 3,
        }
    }

    #[test]
    fn blocks_give_back_every_span() {
        let spans: Vec<StoredSpan> = (0..1300).map(|i| span(i / 10 + (i % 3) * 1000, i)).collect();
        let hashes: Vec<Vec<u64>> = spans.iter().map(|s| vec![attribute_hash("span", &s.span_id.to_string())]).collect();
        let blocks = build(spans.iter().zip(&hashes).map(|(s, h)| (s, Some(h.as_slice()))).collect());
        assert_eq!(blocks.len(), 3, "cut at {MAX_BLOCK_SPANS} spans");
        let mut back: Vec<StoredSpan> = blocks.iter().flat_map(|b| decode(&b.data).expect("decodes")).collect();
        for b in &blocks {
            let summary = Summary::decode(&b.summary).expect("summary");
            assert!(summary.ops.iter().any(|o| o.name == -1), "inline names are summarised as -1");
            assert_eq!(summary.resources, vec![1]);
            let bloom = b.bloom.as_deref().expect("every span came with its hashes");
            let back = decode(&b.data).expect("decodes");
            assert!(back.iter().all(|s| Bloom::may_contain(bloom, attribute_hash("span", &s.span_id.to_string()))), "no false negative");
            let strangers = (0..1000).filter(|i| Bloom::may_contain(bloom, attribute_hash("span", &format!("x{i}")))).count();
            assert!(strangers < 50, "{strangers} false positives in 1000");
            assert_eq!(decode_trace_list(&encode_trace_list(&b.traces)).expect("trace list"), b.traces);
            // One trace's spans alone, at their places in the block.
            let one = b.traces[b.traces.len() / 2].0;
            let own = decode_where(&b.data, |t| t == one).expect("decodes");
            let places: Vec<(u32, StoredSpan)> = back.iter().cloned().enumerate().filter(|(_, s)| s.trace == one).map(|(i, s)| (i as u32, s)).collect();
            assert!(!own.is_empty());
            assert_eq!(own, places);
            assert_eq!(b.traces.iter().map(|t| t.1 as usize).sum::<usize>(), b.spans);
        }
        let mut want = spans.clone();
        want.sort_by_key(|s| (s.trace, s.start_ns));
        back.sort_by_key(|s| (s.trace, s.start_ns));
        assert_eq!(back, want);
    }

    #[test]
    fn corrupt_blocks_are_refused() {
        let spans: Vec<StoredSpan> = (0..50).map(|i| span(1, i)).collect();
        let block = encode(&spans.iter().collect::<Vec<_>>());
        for cut in [1, 5, block.data.len() / 2, block.data.len() - 1] {
            assert!(decode(&block.data[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = block.data.clone();
        flipped[0] ^= 0x40;
        assert!(decode(&flipped).is_err());
    }
}
