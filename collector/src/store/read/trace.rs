//! Reading traces: whole (within an answer's [`SpanBudget`]), as an outline, one span, and
//! finding spans in a trace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::spans::{SpanKey, TraceBlocks};
use super::{span_record, value_text};
use crate::store::blocks::StoredSpan;
use crate::store::codec::{Reader, decode_attributes};
use crate::store::dict::StringsSnapshot;
use crate::store::rows::SpanName;
use crate::store::{Store, StoreError};
use ui::outline::{Header, Outline};

#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_state: String,
    pub service: Arc<str>,
    pub name: String,
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub status_code: i32,
    pub status_message: String,
    pub flags: u32,
    pub attributes: Vec<KeyValue>,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
    pub dropped_attributes_count: u32,
    pub dropped_events_count: u32,
    pub dropped_links_count: u32,
    pub resource: i64,
    pub scope: i64,
}
impl TraceData {
    pub fn truncated(&self) -> bool {
        self.total_spans > self.spans.len()
    }

    /// Why the answer holds only part of the trace, if it does.
    pub fn warning(&self) -> Option<String> {
        self.truncated().then(|| {
            format!(
                "trace truncated: {} of its {} spans are returned (the earliest by start time; an answer holds at most {} spans, {} spans, \
                 attributes, events and links together, or {} MiB of stored span data); the outline (/api/v1/traces/{}/outline) lists every span",
                self.spans.len(),
                self.total_spans,
                SpanBudget::ANSWER.spans,
                SpanBudget::ANSWER.items,
                SpanBudget::ANSWER.bytes >> 20,
                hex::encode(self.trace_id)
            )
        })
    }
}
/// How much of its traces' full spans one answer holds: spans are taken in start order until
/// either bound is reached (the first span of a trace always), the rest only counted. Bounds the
/// memory a query takes whatever the size of the trace (see docs/API.md, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanBudget {
    pub spans: usize,
    /// Stored bytes of attributes, events and links (decoded, they take several times more).
    pub bytes: usize,
    /// Spans, attributes, events and links (with their attributes) together: the stored form
    /// of an event is a few bytes, its decoded and JSON forms some hundreds.
    pub items: usize,
}
impl SpanBudget {
    pub const ANSWER: SpanBudget = SpanBudget { spans: 10_000, bytes: 8 << 20, items: 50_000 };

    /// An equal share for each of `n` traces.
    fn share(self, n: usize) -> SpanBudget {
        let n = n.max(1);
        SpanBudget { spans: (self.spans / n).max(1), bytes: (self.bytes / n).max(1), items: (self.items / n).max(1) }
    }
}
/// Spans an outline lists at most: the dashboard opens a trace of this many (24 px a row keeps its
/// waterfall under the browser's 33,554,431 px limit for an element), and building the outline
/// holds about 130 bytes a span for a moment. A larger trace's outline holds its earliest spans and
/// says so.
pub const MAX_OUTLINE_SPANS: usize = 1_000_000;
impl SpanRecord {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}
#[derive(Debug, Clone)]
pub struct ResourceRecord {
    pub service: Arc<str>,
    pub attributes: Vec<KeyValue>,
    pub dropped_attributes_count: u32,
    pub schema_url: String,
}
#[derive(Debug, Clone)]
pub struct ScopeRecord {
    pub name: String,
    pub version: String,
    pub attributes: Vec<KeyValue>,
    pub dropped_attributes_count: u32,
    pub schema_url: String,
}
/// One trace with the resources and scopes its spans refer to. Spans are ordered by start time;
/// when the trace is larger than the answer's [`SpanBudget`], only its earliest spans are here.
#[derive(Debug, Clone)]
pub struct TraceData {
    pub trace_id: [u8; 16],
    pub spans: Vec<SpanRecord>,
    /// Spans the trace has in all (more than `spans.len()` when it was cut).
    pub total_spans: usize,
    pub resources: BTreeMap<i64, ResourceRecord>,
    pub scopes: BTreeMap<i64, ScopeRecord>,
}
/// One span with its resource and scope.
#[derive(Debug, Clone)]
pub struct SpanDetail {
    pub span: SpanRecord,
    pub resource: Option<ResourceRecord>,
    pub scope: Option<ScopeRecord>,
}
/// The distinct strings of these dictionary ids, sorted, and for each id the index of its string.
fn dictionary<'a>(ids: impl Iterator<Item = i64> + Clone, get: impl Fn(i64) -> &'a str) -> (Vec<String>, Vec<u32>) {
    let distinct: HashSet<i64> = ids.clone().collect();
    let mut strings: Vec<&str> = distinct.iter().map(|&id| get(id)).collect();
    strings.sort_unstable();
    strings.dedup();
    let index: HashMap<i64, u32> = distinct.iter().map(|&id| (id, strings.binary_search(&get(id)).unwrap_or(0) as u32)).collect();
    let column = ids.map(|id| index.get(&id).copied().unwrap_or(0)).collect();
    (strings.into_iter().map(str::to_owned).collect(), column)
}
/// What an outline keeps of a span while it is built.
struct OutlineSpan {
    span_id: i64,
    parent: Option<i64>,
    service: i64,
    /// `strings.id`, or a negative id for an inline name.
    name: i64,
    start: i64,
    duration: i64,
    /// Unix nanoseconds.
    events: Box<[i64]>,
    kind: u8,
    status: u8,
}
impl Store {
    pub async fn trace(&self, trace_id: [u8; 16]) -> Result<Option<TraceData>, StoreError> {
        Ok(self.traces(&[trace_id], SpanBudget::ANSWER).await?.pop())
    }

    /// Traces for these ids, in the order given, sharing `budget` equally; ids with no spans are
    /// left out. Each trace's earliest spans are read up to the trace's share of spans, then
    /// taken in start order until its share of bytes or items, so memory is bounded whatever the
    /// trace's size.
    pub async fn traces(&self, ids: &[[u8; 16]], budget: SpanBudget) -> Result<Vec<TraceData>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let share = budget.share(ids.len());
        // One read transaction (one snapshot) for the spans, their resources and scopes.
        let mut tx = self.read.begin().await?;
        // The first read fixes the snapshot; the dictionary's, taken after, knows every id.
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let mut out = Vec::new();
        for id in ids {
            let tb = TraceBlocks::of(&mut tx, *id).await?;
            let (earliest, total_spans) = tb.earliest(&mut tx, share.spans, |s| Ok(s.clone())).await?;
            if earliest.is_empty() {
                continue;
            }
            let (mut spans, mut bytes, mut items) = (Vec::new(), 0usize, 0usize);
            for stored in earliest {
                let size = stored.blob_len();
                if !spans.is_empty() && (bytes + size > share.bytes || items >= share.items) {
                    break;
                }
                bytes += size;
                let span = span_record(stored, *id, &dict)?;
                items += 1
                    + span.attributes.len()
                    + span.events.iter().map(|e| 1 + e.attributes.len()).sum::<usize>()
                    + span.links.iter().map(|l| 1 + l.attributes.len()).sum::<usize>();
                spans.push(span);
            }
            let (mut resources, mut scopes) = (BTreeMap::new(), BTreeMap::new());
            Self::load_resources(&mut tx, spans.iter().map(|s| s.resource).collect(), &dict, &mut resources).await?;
            Self::load_scopes(&mut tx, spans.iter().map(|s| s.scope).collect(), &dict, &mut scopes).await?;
            out.push(TraceData { trace_id: *id, spans, total_spans, resources, scopes });
        }
        Ok(out)
    }

    async fn load_resources(
        conn: &mut SqliteConnection,
        ids: HashSet<i64>,
        dict: &StringsSnapshot,
        out: &mut BTreeMap<i64, ResourceRecord>,
    ) -> Result<(), StoreError> {
        let select = "SELECT id, service, attributes, dropped_attributes_count, schema_url FROM resources";
        load_by_id(conn, select, ids, out, |r| {
            Ok(ResourceRecord {
                service: Arc::from(dict.get(r.try_get(1)?)),
                attributes: decode_attributes(&r.try_get::<Vec<u8>, _>(2)?, dict)?,
                dropped_attributes_count: r.try_get::<i64, _>(3)? as u32,
                schema_url: r.try_get(4)?,
            })
        })
        .await
    }

    async fn load_scopes(
        conn: &mut SqliteConnection,
        ids: HashSet<i64>,
        dict: &StringsSnapshot,
        out: &mut BTreeMap<i64, ScopeRecord>,
    ) -> Result<(), StoreError> {
        let select = "SELECT id, name, version, attributes, dropped_attributes_count, schema_url FROM scopes";
        load_by_id(conn, select, ids, out, |r| {
            Ok(ScopeRecord {
                name: r.try_get(1)?,
                version: r.try_get(2)?,
                attributes: decode_attributes(&r.try_get::<Vec<u8>, _>(3)?, dict)?,
                dropped_attributes_count: r.try_get::<i64, _>(4)? as u32,
                schema_url: r.try_get(5)?,
            })
        })
        .await
    }

    /// The outline of a trace: its spans' ids, parents, services, names, kinds, times, statuses
    /// and event times, without attributes, in start order (its earliest [`MAX_OUTLINE_SPANS`]).
    /// `None` when the trace has no spans.
    pub async fn trace_outline(&self, trace_id: [u8; 16]) -> Result<Option<Outline>, StoreError> {
        let mut tx = self.read.begin().await?;
        // The first read fixes the snapshot; the dictionary's, taken after, knows every event name.
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let tb = TraceBlocks::of(&mut tx, trace_id).await?;
        // Only what the outline shows is kept of each span, in ~70 bytes; inline span names get
        // negative ids, local to this outline.
        let mut inline_names: HashMap<String, i64> = HashMap::new();
        let (spans, total) = tb
            .earliest(&mut tx, MAX_OUTLINE_SPANS, |s| {
                let events: Box<[i64]> = match &s.events {
                    Some(b) => Reader::new(b, &dict).events(s.start_ns as u64)?.iter().map(|e| e.time_unix_nano as i64).collect(),
                    None => Box::default(),
                };
                let name = match &s.name {
                    SpanName::Id(id) => *id,
                    SpanName::Inline(n) => {
                        let next = -(inline_names.len() as i64) - 1;
                        *inline_names.entry(n.clone()).or_insert(next)
                    }
                };
                Ok(OutlineSpan {
                    span_id: s.span_id,
                    parent: s.parent_span_id,
                    service: s.service,
                    name,
                    start: s.start_ns,
                    duration: s.duration_ns.max(0),
                    events,
                    kind: u8::try_from(s.kind).unwrap_or(0),
                    status: u8::try_from(s.status_code).unwrap_or(0),
                })
            })
            .await?;
        if spans.is_empty() {
            return Ok(None);
        }
        let start_ns = spans.iter().map(|s| s.start).min().unwrap_or(0);
        let end = spans.iter().map(|s| s.start.saturating_add(s.duration)).max().unwrap_or(start_ns);
        let (services, service) = dictionary(spans.iter().map(|s| s.service), |id| dict.get(id));
        let inline: HashMap<i64, &str> = inline_names.iter().map(|(s, id)| (*id, s.as_str())).collect();
        let (names, name) = dictionary(spans.iter().map(|s| s.name), |id| if id < 0 { inline.get(&id).copied().unwrap_or("") } else { dict.get(id) });
        // A parent is found by binary search in the spans sorted by id (the first span with an id
        // is the one its children point to): 12 bytes a span, where a hash map would take ~40.
        let mut by_id: Vec<(i64, u32)> = spans.iter().enumerate().map(|(i, s)| (s.span_id, i as u32)).collect();
        by_id.sort_unstable();
        let parents = spans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let p = s.parent?;
                let k = by_id.partition_point(|&(id, _)| id < p);
                by_id.get(k).filter(|(id, j)| *id == p && *j as usize != i).map(|&(_, j)| j as i32)
            })
            .map(|p| p.unwrap_or(-1))
            .collect();
        drop(by_id);
        let mut event_offsets = Vec::with_capacity(spans.len() + 1);
        event_offsets.push(0u32);
        let mut event_times = Vec::new();
        for s in &spans {
            event_times.extend(s.events.iter().map(|t| t.wrapping_sub(start_ns)));
            event_offsets.push(u32::try_from(event_times.len()).unwrap_or(u32::MAX));
        }
        let header = Header {
            trace_id: hex::encode(trace_id),
            start_time_unix_nano: start_ns as u64,
            duration_nanos: end.saturating_sub(start_ns) as u64,
            span_count: total as u64,
            services,
            names,
        };
        Ok(Some(Outline {
            header,
            span_ids: spans.iter().map(|s| s.span_id as u64).collect(),
            parents,
            service,
            name,
            kind: spans.iter().map(|s| s.kind).collect(),
            status: spans.iter().map(|s| s.status).collect(),
            start: spans.iter().map(|s| s.start.saturating_sub(start_ns)).collect(),
            duration: spans.iter().map(|s| s.duration).collect(),
            event_offsets,
            event_times,
        }))
    }

    /// One span of a trace with its resource and scope; the earliest one if the sender repeated
    /// its id. `None` when the trace has no such span.
    pub async fn span(&self, trace_id: [u8; 16], span_id: [u8; 8]) -> Result<Option<SpanDetail>, StoreError> {
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let tb = TraceBlocks::of(&mut tx, trace_id).await?;
        let want = i64::from_be_bytes(span_id);
        let mut first: Option<(SpanKey, StoredSpan)> = None;
        tb.visit(&mut tx, |key, s| {
            if s.span_id == want && first.as_ref().is_none_or(|(k, _)| key < *k) {
                first = Some((key, s));
            }
            Ok(())
        })
        .await?;
        let Some((_, stored)) = first else { return Ok(None) };
        let span = span_record(stored, trace_id, &dict)?;
        let (mut resources, mut scopes) = (BTreeMap::new(), BTreeMap::new());
        Self::load_resources(&mut tx, HashSet::from([span.resource]), &dict, &mut resources).await?;
        Self::load_scopes(&mut tx, HashSet::from([span.scope]), &dict, &mut scopes).await?;
        Ok(Some(SpanDetail { resource: resources.remove(&span.resource), scope: scopes.remove(&span.scope), span }))
    }

    /// Ids of the spans of a trace, in start order, whose name, service, span id (hex), attribute
    /// keys or values (as [`value_text`]) or event names contain `needle`, ignoring case.
    /// `None` when the trace has no spans.
    pub async fn find_in_trace(&self, trace_id: [u8; 16], needle: &str) -> Result<Option<Vec<[u8; 8]>>, StoreError> {
        let needle = needle.to_lowercase();
        let has = |s: &str| s.to_lowercase().contains(&needle);
        let mut tx = self.read.begin().await?;
        sqlx::query("SELECT 1 FROM traces LIMIT 1").fetch_optional(&mut *tx).await?;
        let dict = self.dicts.strings.snapshot();
        let tb = TraceBlocks::of(&mut tx, trace_id).await?;
        // Services and names repeat: each dictionary string is compared once. Only the hits are
        // kept (with their place in start order), whatever the trace's size.
        let mut string_matches: HashMap<i64, bool> = HashMap::new();
        let mut hits: Vec<(SpanKey, [u8; 8])> = Vec::new();
        let mut any = false;
        tb.visit(&mut tx, |key, s| {
            any = true;
            let span_id = s.span_id.to_be_bytes();
            let name_hit = match &s.name {
                SpanName::Id(id) => *string_matches.entry(*id).or_insert_with(|| has(dict.get(*id))),
                SpanName::Inline(name) => has(name),
            };
            let hit = name_hit
                || *string_matches.entry(s.service).or_insert_with(|| has(dict.get(s.service)))
                || hex::encode(span_id).contains(&needle)
                || match &s.attributes {
                    Some(b) => decode_attributes(b, &dict)?.iter().any(|kv| has(&kv.key) || has(&value_text(kv.value.as_ref()))),
                    None => false,
                }
                || match &s.events {
                    Some(b) => Reader::new(b, &dict).events(0)?.iter().any(|e| has(&e.name)),
                    None => false,
                };
            if hit {
                hits.push((key, span_id));
            }
            Ok(())
        })
        .await?;
        hits.sort_unstable_by_key(|(key, _)| *key);
        Ok(any.then(|| hits.into_iter().map(|(_, id)| id).collect()))
    }
}

/// The rows of `select` (whose first column is `id`) with these ids, each made a record by `make`.
async fn load_by_id<T>(
    conn: &mut SqliteConnection,
    select: &'static str,
    ids: HashSet<i64>,
    out: &mut BTreeMap<i64, T>,
    make: impl Fn(&sqlx::sqlite::SqliteRow) -> Result<T, StoreError>,
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(select);
    qb.push(" WHERE id IN (");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(id);
    }
    qb.push(")");
    for r in qb.build().fetch_all(&mut *conn).await? {
        out.insert(r.try_get(0)?, make(&r)?);
    }
    Ok(())
}
