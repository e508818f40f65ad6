//! Compact binary encoding of OTLP attribute lists, events and links, as stored in the
//! `attributes`, `events` and `links` columns.
//!
//! Hand-written because no crate fits: attribute keys and event names are replaced by ids from
//! the string dictionary (see [`super::dict`]), which is what keeps a span near 200 bytes on disk;
//! a generic serializer would store every key again in every row.
//!
//! ```text
//! attrs := varint(n) (varint(key id) value)*
//! value := 0                       empty
//!        | 1 varint(len) utf8      string
//!        | 2 | 3                   bool false | true
//!        | 4 zigzag-varint         int
//!        | 5 f64-le                double
//!        | 6 varint(len) bytes     bytes
//!        | 7 varint(n) value*      array
//!        | 8 attrs                 key-value list
//!        | 9 zigzag-varint         string table index (profiles)
//!        | 10 varint(id)           string from the dictionary
//! ```

use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList, any_value};
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};

use super::view::{EventRef, KvRef, LinkRef, ValueRef};

/// Maps strings to dictionary ids while encoding.
pub trait Intern {
    fn intern(&mut self, s: &str) -> u64;

    /// A dictionary id for a string value of the attribute `key`, when values of that key repeat
    /// enough to be worth one (methods, routes, host names); `None` keeps the value inline.
    fn intern_value(&mut self, _key: u64, _s: &str) -> Option<u64> {
        None
    }
}

/// Maps dictionary ids back to strings while decoding.
pub trait Resolve {
    fn resolve(&self, id: u64) -> Option<&str>;
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("stored value is truncated")]
    Truncated,
    #[error("stored value has unknown tag {0}")]
    UnknownTag(u8),
    #[error("stored value refers to unknown dictionary id {0}")]
    UnknownString(u64),
    #[error("stored string is not UTF-8")]
    Utf8,
    #[error("stored value is nested too deeply")]
    TooDeep,
}

/// Deepest nesting of arrays and key-value lists that is encoded; deeper values are stored empty
/// and counted ([`take_cut_values`]), so the export's answer can say so. Decoding refuses deeper
/// input, so a corrupt row cannot recurse without bound.
pub const MAX_DEPTH: usize = 32;

thread_local! {
    /// Values this thread stored empty for being nested too deeply, since the last take.
    static CUT_VALUES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Values stored empty (nested deeper than [`MAX_DEPTH`]) by this thread since the last call.
/// A request is converted on one thread, so taking before and after converting it counts its own.
pub fn take_cut_values() -> u64 {
    CUT_VALUES.with(|c| c.replace(0))
}

/// Reads a varint written by [`put_varint`] off the front of `buf`; `None` if it is cut short.
pub fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub fn encode_attributes(out: &mut Vec<u8>, attrs: &[KvRef<'_>], dict: &mut impl Intern) {
    encode_kvs(out, attrs, dict, 0);
}

fn encode_kvs(out: &mut Vec<u8>, attrs: &[KvRef<'_>], dict: &mut impl Intern, depth: usize) {
    put_varint(out, attrs.len() as u64);
    for kv in attrs {
        let key = dict.intern(kv.key);
        put_varint(out, key);
        if let ValueRef::Str(s) = kv.value
            && let Some(id) = dict.intern_value(key, s)
        {
            out.push(10);
            put_varint(out, id);
            continue;
        }
        encode_value(out, &kv.value, dict, depth);
    }
}

fn encode_value(out: &mut Vec<u8>, v: &ValueRef<'_>, dict: &mut impl Intern, depth: usize) {
    match v {
        ValueRef::Empty => out.push(0),
        ValueRef::Str(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
        ValueRef::Bool(b) => out.push(if *b { 3 } else { 2 }),
        ValueRef::Int(i) => {
            out.push(4);
            put_varint(out, zigzag(*i));
        }
        ValueRef::Double(d) => {
            out.push(5);
            out.extend_from_slice(&d.to_le_bytes());
        }
        ValueRef::Bytes(b) => {
            out.push(6);
            put_bytes(out, b);
        }
        ValueRef::Array(a) if depth < MAX_DEPTH => {
            out.push(7);
            put_varint(out, a.len() as u64);
            for v in a {
                encode_value(out, v, dict, depth + 1);
            }
        }
        ValueRef::KvList(l) if depth < MAX_DEPTH => {
            out.push(8);
            encode_kvs(out, l, dict, depth + 1);
        }
        ValueRef::Array(_) | ValueRef::KvList(_) => {
            CUT_VALUES.with(|c| c.set(c.get() + 1));
            out.push(0);
        }
        // An index into a profiles string table; kept as the number it is.
        ValueRef::Strindex(i) => {
            out.push(9);
            put_varint(out, zigzag(i64::from(*i)));
        }
    }
}

/// Events are stored with times relative to the span's start, which keeps them short.
pub fn encode_events(out: &mut Vec<u8>, events: &[EventRef<'_>], span_start: u64, dict: &mut impl Intern) {
    put_varint(out, events.len() as u64);
    for e in events {
        put_varint(out, zigzag(e.time_unix_nano.wrapping_sub(span_start) as i64));
        put_varint(out, dict.intern(e.name));
        encode_attributes(out, &e.attributes, dict);
        put_varint(out, u64::from(e.dropped_attributes_count));
    }
}

pub fn encode_links(out: &mut Vec<u8>, links: &[LinkRef<'_>], dict: &mut impl Intern) {
    put_varint(out, links.len() as u64);
    for l in links {
        put_bytes(out, l.trace_id);
        put_bytes(out, l.span_id);
        put_bytes(out, l.trace_state.as_bytes());
        encode_attributes(out, &l.attributes, dict);
        put_varint(out, u64::from(l.dropped_attributes_count));
        put_varint(out, u64::from(l.flags));
    }
}

/// A cursor over an encoded value.
pub struct Reader<'a, D> {
    buf: &'a [u8],
    dict: &'a D,
}

impl<'a, D: Resolve> Reader<'a, D> {
    pub fn new(buf: &'a [u8], dict: &'a D) -> Self {
        Self { buf, dict }
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.buf.split_first().ok_or(CodecError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        get_varint(&mut self.buf).ok_or(CodecError::Truncated)
    }

    fn count(&mut self) -> Result<usize, CodecError> {
        let n = self.varint()?;
        // Every element takes at least one byte: a larger count is corrupt, and must not
        // turn into a huge allocation.
        if n > self.buf.len() as u64 {
            return Err(CodecError::Truncated);
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.varint()?;
        if n > self.buf.len() as u64 {
            return Err(CodecError::Truncated);
        }
        let (b, rest) = self.buf.split_at(n as usize);
        self.buf = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, CodecError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| CodecError::Utf8)
    }

    fn dict_string(&mut self) -> Result<String, CodecError> {
        let id = self.varint()?;
        self.dict.resolve(id).map(str::to_owned).ok_or(CodecError::UnknownString(id))
    }

    pub fn attributes(&mut self) -> Result<Vec<KeyValue>, CodecError> {
        self.kvs(0)
    }

    fn kvs(&mut self, depth: usize) -> Result<Vec<KeyValue>, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep);
        }
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let key = self.dict_string()?;
            let value = self.value(depth)?;
            out.push(KeyValue { key, value: Some(value), ..Default::default() });
        }
        Ok(out)
    }

    fn value(&mut self, depth: usize) -> Result<AnyValue, CodecError> {
        use any_value::Value;
        let value = match self.byte()? {
            0 => None,
            1 => Some(Value::StringValue(self.string()?)),
            2 => Some(Value::BoolValue(false)),
            3 => Some(Value::BoolValue(true)),
            4 => Some(Value::IntValue(unzigzag(self.varint()?))),
            5 => {
                let b = self.buf.get(..8).ok_or(CodecError::Truncated)?;
                let d = f64::from_le_bytes(b.try_into().map_err(|_| CodecError::Truncated)?);
                self.buf = &self.buf[8..];
                Some(Value::DoubleValue(d))
            }
            6 => Some(Value::BytesValue(self.bytes()?.to_vec())),
            7 => {
                if depth >= MAX_DEPTH {
                    return Err(CodecError::TooDeep);
                }
                let n = self.count()?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(self.value(depth + 1)?);
                }
                Some(Value::ArrayValue(ArrayValue { values }))
            }
            8 => Some(Value::KvlistValue(KeyValueList { values: self.kvs(depth + 1)? })),
            9 => Some(Value::StringValueStrindex(unzigzag(self.varint()?) as i32)),
            10 => Some(Value::StringValue(self.dict_string()?)),
            t => return Err(CodecError::UnknownTag(t)),
        };
        Ok(AnyValue { value })
    }

    pub fn events(&mut self, span_start: u64) -> Result<Vec<Event>, CodecError> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let time_unix_nano = span_start.wrapping_add(unzigzag(self.varint()?) as u64);
            let name = self.dict_string()?;
            let attributes = self.attributes()?;
            let dropped_attributes_count = self.varint()? as u32;
            out.push(Event { time_unix_nano, name, attributes, dropped_attributes_count });
        }
        Ok(out)
    }

    pub fn links(&mut self) -> Result<Vec<Link>, CodecError> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let trace_id = self.bytes()?.to_vec();
            let span_id = self.bytes()?.to_vec();
            let trace_state = self.string()?;
            let attributes = self.attributes()?;
            let dropped_attributes_count = self.varint()? as u32;
            let flags = self.varint()? as u32;
            out.push(Link { trace_id, span_id, trace_state, attributes, dropped_attributes_count, flags });
        }
        Ok(out)
    }
}

pub fn decode_attributes(buf: &[u8], dict: &impl Resolve) -> Result<Vec<KeyValue>, CodecError> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Reader::new(buf, dict).attributes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct MapDict {
        ids: HashMap<String, u64>,
        names: Vec<String>,
    }
    impl Intern for MapDict {
        fn intern(&mut self, s: &str) -> u64 {
            if let Some(&id) = self.ids.get(s) {
                return id;
            }
            self.names.push(s.to_owned());
            let id = self.names.len() as u64;
            self.ids.insert(s.to_owned(), id);
            id
        }
        fn intern_value(&mut self, key: u64, s: &str) -> Option<u64> {
            (Some(key) == self.value_key()).then(|| self.intern(s))
        }
    }
    impl MapDict {
        fn value_key(&self) -> Option<u64> {
            self.ids.get("s").copied()
        }
    }
    impl Resolve for MapDict {
        fn resolve(&self, id: u64) -> Option<&str> {
            self.names.get((id as usize).checked_sub(1)?).map(String::as_str)
        }
    }

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
    }

    fn every_type() -> Vec<KeyValue> {
        use any_value::Value::*;
        vec![
            kv("s", StringValue("<img src=x onerror=alert(1)>".into())),
            kv("b", BoolValue(true)),
            kv("f", BoolValue(false)),
            kv("i", IntValue(i64::MIN)),
            kv("j", IntValue(-1)),
            kv("d", DoubleValue(-0.125)),
            kv("y", BytesValue(vec![0, 255, 7])),
            kv(
                "a",
                ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
                    values: vec![AnyValue { value: Some(IntValue(7)) }, AnyValue { value: Some(StringValue("x".into())) }, AnyValue { value: None }],
                }),
            ),
            kv("m", KvlistValue(KeyValueList { values: vec![kv("inner", DoubleValue(1e300))] })),
            KeyValue { key: "empty".into(), value: None, ..Default::default() },
        ]
    }

    #[test]
    fn attributes_round_trip_every_type() {
        let mut dict = MapDict::default();
        let attrs = every_type();
        let mut buf = Vec::new();
        encode_attributes(&mut buf, &crate::store::view::kvs(&attrs), &mut dict);
        let back = decode_attributes(&buf, &dict).expect("decodes");
        // A missing value comes back as an explicit empty AnyValue, which OTLP treats the same.
        let mut want = attrs;
        want[9].value = Some(AnyValue { value: None });
        assert_eq!(back, want);
    }

    #[test]
    fn events_and_links_round_trip() {
        let mut dict = MapDict::default();
        let events = vec![
            Event { time_unix_nano: 1_000, name: "exception".into(), attributes: every_type(), dropped_attributes_count: 2 },
            Event { time_unix_nano: 500, name: "before start".into(), attributes: vec![], dropped_attributes_count: 0 },
        ];
        let links = vec![Link {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "a=b".into(),
            attributes: vec![kv("k", any_value::Value::IntValue(3))],
            dropped_attributes_count: 1,
            flags: 257,
        }];
        let mut eb = Vec::new();
        encode_events(&mut eb, &events.iter().map(EventRef::of).collect::<Vec<_>>(), 900, &mut dict);
        let mut lb = Vec::new();
        encode_links(&mut lb, &links.iter().map(LinkRef::of).collect::<Vec<_>>(), &mut dict);
        let mut back = Reader::new(&eb, &dict).events(900).expect("events decode");
        back[0].attributes[9].value = None;
        assert_eq!(back, events);
        assert_eq!(Reader::new(&lb, &dict).links().expect("links decode"), links);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let dict = MapDict::default();
        for bad in [&[5u8][..], &[1, 1, 1, 200], &[1, 0, 9], &[1, 0, 7, 255, 255, 255, 255, 15], &[0xff; 12]] {
            assert!(Reader::new(bad, &dict).attributes().is_err(), "{bad:?}");
        }
        // Nesting past the limit is refused.
        let mut deep = vec![1u8, 0];
        deep.extend(std::iter::repeat_n(7u8, 40).flat_map(|t| [t, 1]));
        let mut dict2 = MapDict::default();
        dict2.intern("k");
        let mut d = vec![1u8, 1];
        d.extend(std::iter::repeat_n([7u8, 1], 40).flatten());
        d.push(0);
        assert_eq!(Reader::new(&d, &dict2).attributes(), Err(CodecError::TooDeep));
    }
}
