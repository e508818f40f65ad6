//! Borrowed views of OTLP trace data, and a protobuf reader that builds them straight from an
//! export's bytes.
//!
//! Decoding an export with prost allocates every id, name, attribute key and string value, and
//! conversion then drops them all again: that took about half of the collector's CPU per span.
//! The views borrow from the request instead (from the body's bytes on the protobuf path, from
//! prost's structs on the JSON path), so both paths convert through the same code
//! ([`super::convert::traces`]).
//!
//! Hand-written because no crate fits: prost decodes into owned types only. [`parse_traces`]
//! accepts exactly what prost accepts for `ExportTraceServiceRequest`, with the same values
//! (the fuzz targets check that the two agree on every input): unknown fields and groups are
//! skipped, a known field with another wire type is an error, strings must be UTF-8, a message
//! field given twice is merged (a oneof's message variant too) and a scalar given twice keeps the
//! last value, and messages nest at most [`RECURSION_LIMIT`] deep.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};

/// An attribute value as sent.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ValueRef<'a> {
    #[default]
    Empty,
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    Array(Vec<ValueRef<'a>>),
    KvList(Vec<KvRef<'a>>),
    /// An index into a profiles string table.
    Strindex(i32),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvRef<'a> {
    pub key: &'a str,
    pub value: ValueRef<'a>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventRef<'a> {
    pub time_unix_nano: u64,
    pub name: &'a str,
    pub attributes: Vec<KvRef<'a>>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkRef<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub trace_state: &'a str,
    pub attributes: Vec<KvRef<'a>>,
    pub dropped_attributes_count: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpanRef<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub trace_state: &'a str,
    pub parent_span_id: &'a [u8],
    pub flags: u32,
    pub name: &'a str,
    pub kind: i32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub attributes: Vec<KvRef<'a>>,
    pub dropped_attributes_count: u32,
    pub events: Vec<EventRef<'a>>,
    pub dropped_events_count: u32,
    pub links: Vec<LinkRef<'a>>,
    pub dropped_links_count: u32,
    pub status_code: i32,
    pub status_message: &'a str,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceRef<'a> {
    pub attributes: Vec<KvRef<'a>>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScopeRef<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub attributes: Vec<KvRef<'a>>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScopeSpansRef<'a> {
    pub scope: Option<ScopeRef<'a>>,
    pub spans: Vec<SpanRef<'a>>,
    pub schema_url: &'a str,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceSpansRef<'a> {
    pub resource: Option<ResourceRef<'a>>,
    pub scope_spans: Vec<ScopeSpansRef<'a>>,
    pub schema_url: &'a str,
}

impl ValueRef<'_> {
    pub fn of(v: Option<&AnyValue>) -> ValueRef<'_> {
        use any_value::Value as V;
        match v.and_then(|v| v.value.as_ref()) {
            None => ValueRef::Empty,
            Some(V::StringValue(s)) => ValueRef::Str(s),
            Some(V::BoolValue(b)) => ValueRef::Bool(*b),
            Some(V::IntValue(i)) => ValueRef::Int(*i),
            Some(V::DoubleValue(d)) => ValueRef::Double(*d),
            Some(V::BytesValue(b)) => ValueRef::Bytes(b),
            Some(V::ArrayValue(a)) => ValueRef::Array(a.values.iter().map(|v| ValueRef::of(Some(v))).collect()),
            Some(V::KvlistValue(l)) => ValueRef::KvList(kvs(&l.values)),
            Some(V::StringValueStrindex(i)) => ValueRef::Strindex(*i),
        }
    }

    /// The owned value (for the rare paths that want one: arrays and maps as search text).
    pub fn to_any_value(&self) -> AnyValue {
        use any_value::Value as V;
        let value = match self {
            ValueRef::Empty => None,
            ValueRef::Str(s) => Some(V::StringValue((*s).to_owned())),
            ValueRef::Bool(b) => Some(V::BoolValue(*b)),
            ValueRef::Int(i) => Some(V::IntValue(*i)),
            ValueRef::Double(d) => Some(V::DoubleValue(*d)),
            ValueRef::Bytes(b) => Some(V::BytesValue(b.to_vec())),
            ValueRef::Array(a) => Some(V::ArrayValue(ArrayValue { values: a.iter().map(ValueRef::to_any_value).collect() })),
            ValueRef::KvList(l) => Some(V::KvlistValue(KeyValueList {
                values: l.iter().map(|kv| KeyValue { key: kv.key.to_owned(), value: Some(kv.value.to_any_value()), ..Default::default() }).collect(),
            })),
            ValueRef::Strindex(i) => Some(V::StringValueStrindex(*i)),
        };
        AnyValue { value }
    }
}

/// Views of prost's attributes.
pub fn kvs(attrs: &[KeyValue]) -> Vec<KvRef<'_>> {
    attrs.iter().map(|kv| KvRef { key: &kv.key, value: ValueRef::of(kv.value.as_ref()) }).collect()
}

impl<'a> ResourceRef<'a> {
    pub fn of(r: &'a Resource) -> Self {
        Self { attributes: kvs(&r.attributes), dropped_attributes_count: r.dropped_attributes_count }
    }
}

impl<'a> ScopeRef<'a> {
    pub fn of(s: &'a InstrumentationScope) -> Self {
        Self { name: &s.name, version: &s.version, attributes: kvs(&s.attributes), dropped_attributes_count: s.dropped_attributes_count }
    }
}

impl<'a> EventRef<'a> {
    pub fn of(e: &'a Event) -> Self {
        EventRef { time_unix_nano: e.time_unix_nano, name: &e.name, attributes: kvs(&e.attributes), dropped_attributes_count: e.dropped_attributes_count }
    }
}

impl<'a> LinkRef<'a> {
    pub fn of(l: &'a Link) -> Self {
        LinkRef {
            trace_id: &l.trace_id,
            span_id: &l.span_id,
            trace_state: &l.trace_state,
            attributes: kvs(&l.attributes),
            dropped_attributes_count: l.dropped_attributes_count,
            flags: l.flags,
        }
    }
}

fn span(s: &Span) -> SpanRef<'_> {
    let status = s.status.as_ref();
    SpanRef {
        trace_id: &s.trace_id,
        span_id: &s.span_id,
        trace_state: &s.trace_state,
        parent_span_id: &s.parent_span_id,
        flags: s.flags,
        name: &s.name,
        kind: s.kind,
        start_time_unix_nano: s.start_time_unix_nano,
        end_time_unix_nano: s.end_time_unix_nano,
        attributes: kvs(&s.attributes),
        dropped_attributes_count: s.dropped_attributes_count,
        events: s.events.iter().map(EventRef::of).collect(),
        dropped_events_count: s.dropped_events_count,
        links: s.links.iter().map(LinkRef::of).collect(),
        dropped_links_count: s.dropped_links_count,
        status_code: status.map_or(0, |st| st.code),
        status_message: status.map_or("", |st| &st.message),
    }
}

/// Views of a request prost decoded (the JSON path).
pub fn of_request(req: &ExportTraceServiceRequest) -> Vec<ResourceSpansRef<'_>> {
    req.resource_spans
        .iter()
        .map(|rs: &ResourceSpans| ResourceSpansRef {
            resource: rs.resource.as_ref().map(ResourceRef::of),
            scope_spans: rs
                .scope_spans
                .iter()
                .map(|ss| ScopeSpansRef { scope: ss.scope.as_ref().map(ScopeRef::of), spans: ss.spans.iter().map(span).collect(), schema_url: &ss.schema_url })
                .collect(),
            schema_url: &rs.schema_url,
        })
        .collect()
}

/// Why a body is not a valid `ExportTraceServiceRequest`, and where (as prost words it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    description: &'static str,
    /// `Message.field` from the innermost out.
    stack: Vec<String>,
}

impl WireError {
    fn new(description: &'static str) -> Self {
        Self { description, stack: Vec::new() }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed to decode Protobuf message: ")?;
        for at in self.stack.iter().rev() {
            write!(f, "{at}: ")?;
        }
        f.write_str(self.description)
    }
}

impl std::error::Error for WireError {}

/// How deep messages nest at most, as prost counts it.
pub const RECURSION_LIMIT: u32 = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A cursor over one message's fields.
struct Fields<'a> {
    buf: &'a [u8],
    /// Nesting levels left for the messages inside this one.
    depth: u32,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], depth: u32) -> Self {
        Self { buf, depth }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(WireError::new("buffer underflow"))?;
            self.buf = rest;
            if i == 9 && b > 1 {
                return Err(WireError::new("invalid varint"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::new("invalid varint"))
    }

    /// The next field's number and wire type; `None` at the end.
    fn next(&mut self) -> Result<Option<(u32, u8)>, WireError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| WireError::new("invalid key value"))?;
        let wire = (key & 7) as u8;
        if wire > 5 {
            return Err(WireError::new("invalid wire type value"));
        }
        let tag = key >> 3;
        if tag == 0 {
            return Err(WireError::new("invalid tag value: 0"));
        }
        Ok(Some((tag, wire)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::new("buffer underflow"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn bytes(&mut self, wire: u8) -> Result<&'a [u8], WireError> {
        expect(wire, LEN)?;
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| WireError::new("buffer underflow"))?)
    }

    fn string(&mut self, wire: u8) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes(wire)?).map_err(|_| WireError::new("invalid string value: data is not UTF-8 encoded"))
    }

    fn uint(&mut self, wire: u8) -> Result<u64, WireError> {
        expect(wire, VARINT)?;
        self.varint()
    }

    fn fixed64(&mut self, wire: u8) -> Result<u64, WireError> {
        expect(wire, FIXED64)?;
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| WireError::new("buffer underflow"))?))
    }

    fn fixed32(&mut self, wire: u8) -> Result<u32, WireError> {
        expect(wire, FIXED32)?;
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| WireError::new("buffer underflow"))?))
    }

    /// A nested message's fields (one level deeper).
    fn message(&mut self, wire: u8) -> Result<Fields<'a>, WireError> {
        let body = self.bytes(wire)?;
        if self.depth == 0 {
            return Err(WireError::new("recursion limit reached"));
        }
        Ok(Fields::new(body, self.depth - 1))
    }

    /// Skips a field this reader does not keep (groups too, as prost does).
    fn skip(&mut self, tag: u32, wire: u8, depth: u32) -> Result<(), WireError> {
        if depth == 0 {
            return Err(WireError::new("recursion limit reached"));
        }
        match wire {
            VARINT => {
                self.varint()?;
            }
            FIXED64 => {
                self.take(8)?;
            }
            LEN => {
                self.bytes(wire)?;
            }
            FIXED32 => {
                self.take(4)?;
            }
            START_GROUP => loop {
                let (inner, inner_wire) = self.next()?.ok_or(WireError::new("buffer underflow"))?;
                if inner_wire == END_GROUP {
                    if inner != tag {
                        return Err(WireError::new("unexpected end group tag"));
                    }
                    break;
                }
                self.skip(inner, inner_wire, depth - 1)?;
            },
            _ => return Err(WireError::new("unexpected end group tag")),
        }
        Ok(())
    }

    /// How many fields numbered `tag` the rest of the message has (a quick pass over the keys, so
    /// a repeated field's vector is allocated once): a guess, as an error ends the count.
    fn count(&self, tag: u32) -> usize {
        let mut f = Fields::new(self.buf, self.depth);
        let mut n = 0;
        while let Ok(Some((t, wire))) = f.next() {
            n += usize::from(t == tag);
            if f.skip(t, wire, self.depth.max(1)).is_err() {
                break;
            }
        }
        n
    }

    fn unknown(&mut self, tag: u32, wire: u8) -> Result<(), WireError> {
        self.skip(tag, wire, self.depth)
    }
}

/// Calls `each` with every field of a message; an error names the message and field it was in.
fn fields_of<'a>(
    mut f: Fields<'a>,
    message: &'static str,
    names: &[&'static str],
    mut each: impl FnMut(&mut Fields<'a>, u32, u8) -> Result<(), WireError>,
) -> Result<(), WireError> {
    while let Some((tag, wire)) = f.next()? {
        each(&mut f, tag, wire).map_err(|mut e| {
            let field = usize::try_from(tag).ok().and_then(|t| names.get(t.checked_sub(1)?)).copied().unwrap_or("unknown field");
            e.stack.push(format!("{message}.{field}"));
            e
        })?;
    }
    Ok(())
}

fn expect(wire: u8, want: u8) -> Result<(), WireError> {
    if wire == want { Ok(()) } else { Err(WireError::new("invalid wire type")) }
}

/// Views of a protobuf `ExportTraceServiceRequest`, borrowing its strings and ids from `body`.
pub fn parse_traces(body: &[u8]) -> Result<Vec<ResourceSpansRef<'_>>, WireError> {
    let mut out = Vec::new();
    fields_of(Fields::new(body, RECURSION_LIMIT), "ExportTraceServiceRequest", &["resource_spans"], |f, tag, wire| {
        match tag {
            1 => out.push(resource_spans(f.message(wire)?)?),
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(out)
}

fn resource_spans(f: Fields<'_>) -> Result<ResourceSpansRef<'_>, WireError> {
    let mut rs = ResourceSpansRef::default();
    fields_of(f, "ResourceSpans", &["resource", "scope_spans", "schema_url"], |f, tag, wire| {
        match tag {
            1 => resource(f.message(wire)?, rs.resource.get_or_insert_with(Default::default))?,
            2 => rs.scope_spans.push(scope_spans(f.message(wire)?)?),
            3 => rs.schema_url = f.string(wire)?,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(rs)
}

fn resource<'a>(f: Fields<'a>, r: &mut ResourceRef<'a>) -> Result<(), WireError> {
    fields_of(f, "Resource", &["attributes", "dropped_attributes_count", "entity_refs"], |f, tag, wire| {
        match tag {
            1 => r.attributes.push(key_value(f.message(wire)?)?),
            2 => r.dropped_attributes_count = f.uint(wire)? as u32,
            // Entity references: checked as prost checks them, not kept.
            3 => entity_ref(f.message(wire)?)?,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })
}

fn entity_ref(f: Fields<'_>) -> Result<(), WireError> {
    fields_of(f, "EntityRef", &["schema_url", "type", "id_keys", "description_keys"], |f, tag, wire| {
        match tag {
            1..=4 => {
                f.string(wire)?;
            }
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })
}

fn scope_spans(f: Fields<'_>) -> Result<ScopeSpansRef<'_>, WireError> {
    let mut ss = ScopeSpansRef { spans: Vec::with_capacity(f.count(2)), ..Default::default() };
    fields_of(f, "ScopeSpans", &["scope", "spans", "schema_url"], |f, tag, wire| {
        match tag {
            1 => scope(f.message(wire)?, ss.scope.get_or_insert_with(Default::default))?,
            2 => ss.spans.push(span_ref(f.message(wire)?)?),
            3 => ss.schema_url = f.string(wire)?,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(ss)
}

fn scope<'a>(f: Fields<'a>, s: &mut ScopeRef<'a>) -> Result<(), WireError> {
    fields_of(f, "InstrumentationScope", &["name", "version", "attributes", "dropped_attributes_count"], |f, tag, wire| {
        match tag {
            1 => s.name = f.string(wire)?,
            2 => s.version = f.string(wire)?,
            3 => s.attributes.push(key_value(f.message(wire)?)?),
            4 => s.dropped_attributes_count = f.uint(wire)? as u32,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })
}

const SPAN_FIELDS: [&str; 16] = [
    "trace_id",
    "span_id",
    "trace_state",
    "parent_span_id",
    "name",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "attributes",
    "dropped_attributes_count",
    "events",
    "dropped_events_count",
    "links",
    "dropped_links_count",
    "status",
    "flags",
];

fn span_ref(f: Fields<'_>) -> Result<SpanRef<'_>, WireError> {
    let mut s = SpanRef { attributes: Vec::with_capacity(f.count(9)), ..Default::default() };
    fields_of(f, "Span", &SPAN_FIELDS, |f, tag, wire| {
        match tag {
            1 => s.trace_id = f.bytes(wire)?,
            2 => s.span_id = f.bytes(wire)?,
            3 => s.trace_state = f.string(wire)?,
            4 => s.parent_span_id = f.bytes(wire)?,
            5 => s.name = f.string(wire)?,
            6 => s.kind = f.uint(wire)? as i32,
            7 => s.start_time_unix_nano = f.fixed64(wire)?,
            8 => s.end_time_unix_nano = f.fixed64(wire)?,
            9 => s.attributes.push(key_value(f.message(wire)?)?),
            10 => s.dropped_attributes_count = f.uint(wire)? as u32,
            11 => s.events.push(event_ref(f.message(wire)?)?),
            12 => s.dropped_events_count = f.uint(wire)? as u32,
            13 => s.links.push(link_ref(f.message(wire)?)?),
            14 => s.dropped_links_count = f.uint(wire)? as u32,
            15 => status(f.message(wire)?, &mut s)?,
            16 => s.flags = f.fixed32(wire)?,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(s)
}

fn status<'a>(f: Fields<'a>, s: &mut SpanRef<'a>) -> Result<(), WireError> {
    fields_of(f, "Status", &["", "message", "code"], |f, tag, wire| {
        match tag {
            2 => s.status_message = f.string(wire)?,
            3 => s.status_code = f.uint(wire)? as i32,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })
}

fn event_ref(f: Fields<'_>) -> Result<EventRef<'_>, WireError> {
    let mut e = EventRef::default();
    fields_of(f, "Event", &["time_unix_nano", "name", "attributes", "dropped_attributes_count"], |f, tag, wire| {
        match tag {
            1 => e.time_unix_nano = f.fixed64(wire)?,
            2 => e.name = f.string(wire)?,
            3 => e.attributes.push(key_value(f.message(wire)?)?),
            4 => e.dropped_attributes_count = f.uint(wire)? as u32,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(e)
}

fn link_ref(f: Fields<'_>) -> Result<LinkRef<'_>, WireError> {
    let mut l = LinkRef::default();
    fields_of(f, "Link", &["trace_id", "span_id", "trace_state", "attributes", "dropped_attributes_count", "flags"], |f, tag, wire| {
        match tag {
            1 => l.trace_id = f.bytes(wire)?,
            2 => l.span_id = f.bytes(wire)?,
            3 => l.trace_state = f.string(wire)?,
            4 => l.attributes.push(key_value(f.message(wire)?)?),
            5 => l.dropped_attributes_count = f.uint(wire)? as u32,
            6 => l.flags = f.fixed32(wire)?,
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(l)
}

fn key_value(f: Fields<'_>) -> Result<KvRef<'_>, WireError> {
    let mut kv = KvRef::default();
    fields_of(f, "KeyValue", &["key", "value", "key_strindex"], |f, tag, wire| {
        match tag {
            1 => kv.key = f.string(wire)?,
            2 => any_value(f.message(wire)?, &mut kv.value)?,
            // `key_strindex` (profiles only): checked, not kept.
            3 => {
                f.uint(wire)?;
            }
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })?;
    Ok(kv)
}

const VALUE_FIELDS: [&str; 8] =
    ["string_value", "bool_value", "int_value", "double_value", "array_value", "kvlist_value", "bytes_value", "string_value_strindex"];

/// Merges an `AnyValue` into `v`: a scalar replaces it, an array or map given again adds to it.
fn any_value<'a>(f: Fields<'a>, v: &mut ValueRef<'a>) -> Result<(), WireError> {
    fields_of(f, "AnyValue", &VALUE_FIELDS, |f, tag, wire| {
        match tag {
            1 => *v = ValueRef::Str(f.string(wire)?),
            2 => *v = ValueRef::Bool(f.uint(wire)? != 0),
            3 => *v = ValueRef::Int(f.uint(wire)? as i64),
            4 => *v = ValueRef::Double(f64::from_bits(f.fixed64(wire)?)),
            5 => {
                let inner = f.message(wire)?;
                let mut values = match std::mem::take(v) {
                    ValueRef::Array(values) => values,
                    _ => Vec::new(),
                };
                fields_of(inner, "ArrayValue", &["values"], |f, tag, wire| {
                    match tag {
                        1 => {
                            let mut item = ValueRef::Empty;
                            any_value(f.message(wire)?, &mut item)?;
                            values.push(item);
                        }
                        _ => f.unknown(tag, wire)?,
                    }
                    Ok(())
                })?;
                *v = ValueRef::Array(values);
            }
            6 => {
                let inner = f.message(wire)?;
                let mut values = match std::mem::take(v) {
                    ValueRef::KvList(values) => values,
                    _ => Vec::new(),
                };
                fields_of(inner, "KeyValueList", &["values"], |f, tag, wire| {
                    match tag {
                        1 => values.push(key_value(f.message(wire)?)?),
                        _ => f.unknown(tag, wire)?,
                    }
                    Ok(())
                })?;
                *v = ValueRef::KvList(values);
            }
            7 => *v = ValueRef::Bytes(f.bytes(wire)?),
            8 => *v = ValueRef::Strindex(f.uint(wire)? as i32),
            _ => f.unknown(tag, wire)?,
        }
        Ok(())
    })
}

/// About how many bytes [`parse_traces`] would allocate for the views of `body` (their vectors'
/// items; strings and ids are borrowed), found by a pass over the keys that allocates nothing. A
/// caller reserves it on the request's in-flight budget first: a body of millions of empty items
/// (2 bytes each on the wire, ~200 bytes as views) is then refused instead of decoded. Where the
/// body is malformed the count stops (the parse then refuses it).
pub fn decoded_size(body: &[u8]) -> usize {
    use std::mem::size_of;
    /// The views' bytes of the fields of one message, by what the message is.
    fn walk(buf: &[u8], what: Kind, depth: u32) -> usize {
        let mut f = Fields::new(buf, depth);
        let mut n = 0;
        while let Ok(Some((tag, wire))) = f.next() {
            let inner = match (what, tag, wire) {
                (Kind::Request, 1, LEN) => Some((Kind::ResourceSpans, size_of::<ResourceSpansRef<'_>>())),
                (Kind::ResourceSpans, 1, LEN) => Some((Kind::Attributed, 0)),
                (Kind::ResourceSpans, 2, LEN) => Some((Kind::ScopeSpans, size_of::<ScopeSpansRef<'_>>())),
                (Kind::ScopeSpans, 1, LEN) => Some((Kind::Scope, 0)),
                (Kind::ScopeSpans, 2, LEN) => Some((Kind::Span, size_of::<SpanRef<'_>>())),
                (Kind::Scope, 3, LEN) | (Kind::Attributed, 1, LEN) | (Kind::Span, 9, LEN) | (Kind::Event, 3, LEN) | (Kind::Link, 4, LEN) => {
                    Some((Kind::KeyValue, size_of::<KvRef<'_>>()))
                }
                (Kind::Span, 11, LEN) => Some((Kind::Event, size_of::<EventRef<'_>>())),
                (Kind::Span, 13, LEN) => Some((Kind::Link, size_of::<LinkRef<'_>>())),
                (Kind::KeyValue, 2, LEN) | (Kind::Array, 1, LEN) => Some((Kind::Value, 0)),
                (Kind::Value, 5, LEN) => Some((Kind::Array, 0)),
                (Kind::Value, 6, LEN) => Some((Kind::KvList, 0)),
                (Kind::KvList, 1, LEN) => Some((Kind::KeyValue, size_of::<KvRef<'_>>())),
                _ => None,
            };
            // An array's items are counted as they come (each a `ValueRef`).
            let item = if matches!((what, tag, wire), (Kind::Array, 1, LEN)) { size_of::<ValueRef<'_>>() } else { 0 };
            match inner {
                Some((kind, own)) if depth > 0 => match f.bytes(wire) {
                    Ok(b) => n += own + item + walk(b, kind, depth - 1),
                    Err(_) => break,
                },
                _ => {
                    if f.skip(tag, wire, depth.max(1)).is_err() {
                        break;
                    }
                }
            }
        }
        n
    }
    #[derive(Clone, Copy)]
    enum Kind {
        Request,
        ResourceSpans,
        ScopeSpans,
        /// A resource: attributes in field 1.
        Attributed,
        Scope,
        Span,
        Event,
        Link,
        KeyValue,
        Value,
        Array,
        KvList,
    }
    walk(body, Kind::Request, RECURSION_LIMIT)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value as V};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;

    use super::{of_request, parse_traces};

    fn kv(key: &str, v: V) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
    }

    fn request() -> ExportTraceServiceRequest {
        let every = vec![
            kv("s", V::StringValue("text".into())),
            kv("b", V::BoolValue(true)),
            kv("i", V::IntValue(-5)),
            kv("d", V::DoubleValue(-0.5)),
            kv("bytes", V::BytesValue(vec![0, 255])),
            kv("list", V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::IntValue(1)) }, AnyValue { value: None }] })),
            kv("map", V::KvlistValue(KeyValueList { values: vec![kv("k", V::StringValue("v".into()))] })),
            kv("idx", V::StringValueStrindex(-3)),
            KeyValue { key: "none".into(), value: None, ..Default::default() },
        ];
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "a=b".into(),
            parent_span_id: vec![3; 8],
            flags: 0x301,
            name: "GET /".into(),
            kind: 3,
            start_time_unix_nano: u64::MAX - 1,
            end_time_unix_nano: 7,
            attributes: every.clone(),
            dropped_attributes_count: 1,
            events: vec![Event { time_unix_nano: 9, name: "e".into(), attributes: every.clone(), dropped_attributes_count: 2 }],
            dropped_events_count: 3,
            links: vec![Link {
                trace_id: vec![4; 16],
                span_id: vec![5; 8],
                trace_state: "c=d".into(),
                attributes: every.clone(),
                dropped_attributes_count: 4,
                flags: 5,
            }],
            dropped_links_count: 6,
            status: Some(Status { message: "bad".into(), code: 2 }),
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource { attributes: every.clone(), dropped_attributes_count: 7, ..Default::default() }),
                scope_spans: vec![
                    ScopeSpans {
                        scope: Some(InstrumentationScope { name: "lib".into(), version: "1".into(), attributes: every, dropped_attributes_count: 8 }),
                        spans: vec![span, Span::default()],
                        schema_url: "u1".into(),
                    },
                    ScopeSpans::default(),
                ],
                schema_url: "u2".into(),
            }],
        }
    }

    #[test]
    fn the_wire_views_equal_the_views_of_what_prost_decodes() {
        let req = request();
        let body = req.encode_to_vec();
        assert_eq!(parse_traces(&body).expect("valid"), of_request(&req));
    }

    #[test]
    fn fields_given_twice_merge_as_protobuf_says() {
        // A span whose status comes in two parts, and an attribute whose array value does.
        let first = Span { status: Some(Status { message: "m".into(), code: 0 }), ..Default::default() };
        let second = Span {
            status: Some(Status { message: String::new(), code: 2 }),
            attributes: vec![kv("l", V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::IntValue(1)) }] }))],
            ..Default::default()
        };
        let mut bytes = first.encode_to_vec();
        bytes.extend(second.encode_to_vec());
        let mut both = Vec::new();
        // Two KeyValue messages for one key are two attributes; one KeyValue whose value comes
        // twice is one attribute with both arrays' items.
        let value_twice = {
            let v1 = AnyValue { value: Some(V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::IntValue(1)) }] })) };
            let v2 = AnyValue { value: Some(V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::BoolValue(true)) }] })) };
            let mut kv = KeyValue { key: "x".into(), value: Some(v1), ..Default::default() }.encode_to_vec();
            kv.extend(KeyValue { value: Some(v2), ..Default::default() }.encode_to_vec());
            kv
        };
        prost::encoding::bytes::encode(9, &value_twice, &mut both);
        bytes.extend(both);
        let scope_spans = {
            let mut b = Vec::new();
            prost::encoding::bytes::encode(2, &bytes, &mut b);
            b
        };
        let resource_spans = {
            let mut b = Vec::new();
            prost::encoding::bytes::encode(2, &scope_spans, &mut b);
            b
        };
        let mut body = Vec::new();
        prost::encoding::bytes::encode(1, &resource_spans, &mut body);
        let by_prost = ExportTraceServiceRequest::decode(body.as_slice()).expect("prost takes it");
        assert_eq!(parse_traces(&body).expect("valid"), of_request(&by_prost));
        let span = &by_prost.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.status.as_ref().map(|s| (s.code, s.message.as_str())), Some((2, "m")));
        assert_eq!(span.attributes.len(), 2);
    }

    #[test]
    fn what_prost_refuses_is_refused() {
        let body = request().encode_to_vec();
        // Every cut of a valid body either fails in both or parses alike in both.
        for n in 0..body.len() {
            let cut = &body[..n];
            match (ExportTraceServiceRequest::decode(cut), parse_traces(cut)) {
                (Ok(req), Ok(views)) => assert_eq!(views, of_request(&req), "cut at {n}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("cut at {n}: prost {:?}, wire {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }
        // Not UTF-8; a known field with another wire type; a tag of 0; a stray end of group.
        for bad in [&[0x0a, 0x04, 0x1a, 0x02, 0xff, 0xfe][..], &[0x08, 0x01], &[0x00], &[0x0c]] {
            assert!(ExportTraceServiceRequest::decode(bad).is_err(), "{bad:?}");
            assert!(parse_traces(bad).is_err(), "{bad:?}");
        }
        // An unknown group is skipped.
        let group = [0x5b, 0x08, 0x01, 0x5c];
        assert!(ExportTraceServiceRequest::decode(&group[..]).is_ok());
        assert_eq!(parse_traces(&group).expect("skipped"), Vec::new());
    }

    /// The bytes the views' vectors hold, counted from the views.
    fn held(rs: &[super::ResourceSpansRef<'_>]) -> usize {
        use super::{EventRef, KvRef, LinkRef, ResourceSpansRef, ScopeSpansRef, SpanRef, ValueRef};
        use std::mem::size_of;
        fn value(v: &ValueRef<'_>) -> usize {
            match v {
                ValueRef::Array(a) => a.iter().map(|v| size_of::<ValueRef<'_>>() + value(v)).sum(),
                ValueRef::KvList(l) => kvs(l),
                _ => 0,
            }
        }
        fn kvs(l: &[KvRef<'_>]) -> usize {
            l.iter().map(|kv| size_of::<KvRef<'_>>() + value(&kv.value)).sum()
        }
        rs.iter()
            .map(|r| {
                size_of::<ResourceSpansRef<'_>>()
                    + r.resource.as_ref().map_or(0, |res| kvs(&res.attributes))
                    + r.scope_spans
                        .iter()
                        .map(|ss| {
                            size_of::<ScopeSpansRef<'_>>()
                                + ss.scope.as_ref().map_or(0, |sc| kvs(&sc.attributes))
                                + ss.spans
                                    .iter()
                                    .map(|s| {
                                        size_of::<SpanRef<'_>>()
                                            + kvs(&s.attributes)
                                            + s.events.iter().map(|e| size_of::<EventRef<'_>>() + kvs(&e.attributes)).sum::<usize>()
                                            + s.links.iter().map(|l| size_of::<LinkRef<'_>>() + kvs(&l.attributes)).sum::<usize>()
                                    })
                                    .sum::<usize>()
                        })
                        .sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn the_decoded_size_is_what_the_views_hold() {
        let body = request().encode_to_vec();
        let views = parse_traces(&body).expect("valid");
        assert_eq!(super::decoded_size(&body), held(&views));
        // Millions of empty spans: a few bytes each on the wire, far more as views.
        let mut spans = Vec::new();
        for _ in 0..100_000 {
            prost::encoding::bytes::encode(2, &Vec::<u8>::new(), &mut spans);
        }
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &spans, &mut rs);
        let mut empty = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut empty);
        let views = parse_traces(&empty).expect("valid");
        assert_eq!(super::decoded_size(&empty), held(&views));
        assert!(super::decoded_size(&empty) > 50 * empty.len(), "{} bytes decode to {}", empty.len(), super::decoded_size(&empty));
    }

    #[test]
    fn nesting_stops_where_prost_stops() {
        let mut refused = 0;
        for depth in 44..=50 {
            // Arrays `depth` deep in an attribute of a span: each adds two messages (ArrayValue,
            // AnyValue) below the five above the attribute's value.
            let mut v = AnyValue { value: Some(V::IntValue(1)) };
            for _ in 0..depth {
                v = AnyValue { value: Some(V::ArrayValue(ArrayValue { values: vec![v] })) };
            }
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![Span { attributes: vec![KeyValue { key: "k".into(), value: Some(v), ..Default::default() }], ..Default::default() }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let body = req.encode_to_vec();
            let (a, b) = (ExportTraceServiceRequest::decode(body.as_slice()), parse_traces(&body));
            assert_eq!(a.is_ok(), b.is_ok(), "depth {depth}");
            refused += usize::from(a.is_err());
        }
        assert!(refused > 0 && refused < 7, "the limit falls within the depths tried");
    }
}
