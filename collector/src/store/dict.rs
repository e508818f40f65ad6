//! In-memory id assignment for everything that is stored once and referred to by id: strings
//! (attribute keys, service and span names), resources, scopes, metric descriptions, series,
//! traces and operations.
//!
//! Ingest threads assign ids while converting a request, before the writer sees it; each new
//! entry's row waits in `pending` until the writer takes it into the next transaction. Because a
//! request is converted before it is queued, the transaction that commits it also commits (or has
//! already committed) every entry it refers to. A failed transaction puts its entries back.
//!
//! Metric descriptions and series, which retention may remove, work differently ([`Ids`]): the
//! request carries the rows it uses and every transaction writes them again (an upsert), so a row
//! removed by retention comes back, with the same id, as soon as something uses it.

use std::borrow::Borrow;
use std::collections::HashMap as StdHashMap;

/// Maps keyed by what clients send (strings, trace ids): foldhash with a random seed, several
/// times faster than SipHash on short keys and still seeded per process against collisions
/// chosen by a client.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::codec::{Intern, Resolve};

struct State<K, R> {
    map: HashMap<K, i64>,
    next: i64,
    pending: Vec<R>,
}

/// Assigns increasing ids to keys, remembering the rows that still have to be written.
pub struct Interner<K, R> {
    state: Mutex<State<K, R>>,
}

impl<K: Hash + Eq, R> Interner<K, R> {
    pub fn new(loaded: impl IntoIterator<Item = (K, i64)>) -> Self {
        let map: HashMap<K, i64> = loaded.into_iter().collect();
        let next = map.values().copied().max().unwrap_or(0) + 1;
        Self { state: Mutex::new(State { map, next, pending: Vec::new() }) }
    }

    pub fn get_or_insert<Q>(&self, key: &Q, make_row: impl FnOnce(i64) -> R) -> i64
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = st.map.get(key) {
            return id;
        }
        let id = st.next;
        st.next += 1;
        st.map.insert(key.to_owned(), id);
        st.pending.push(make_row(id));
        id
    }

    pub fn take_pending(&self) -> Vec<R> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).pending)
    }

    /// Puts back rows whose transaction failed, ahead of any added since.
    pub fn restore_pending(&self, mut rows: Vec<R>) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        rows.append(&mut st.pending);
        st.pending = rows;
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Assigns increasing ids to keys; the rows themselves travel with the requests that use them.
/// Ids stay assigned after retention removes their rows (until a restart reloads the table).
pub struct Ids<K> {
    state: Mutex<(HashMap<K, i64>, i64)>,
}

impl<K: Hash + Eq> Ids<K> {
    pub fn new(loaded: impl IntoIterator<Item = (K, i64)>) -> Self {
        let map: HashMap<K, i64> = loaded.into_iter().collect();
        let next = map.values().copied().max().unwrap_or(0) + 1;
        Self { state: Mutex::new((map, next)) }
    }

    pub fn id<Q>(&self, key: &Q) -> i64
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = st.0.get(key) {
            return id;
        }
        let id = st.1;
        st.1 += 1;
        st.0.insert(key.to_owned(), id);
        id
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Strings by id, in chunks: a chunk once full is shared and never changes, so a snapshot copies
/// one pointer per chunk and at most one chunk's worth of the rest.
#[derive(Default, Clone)]
struct Names {
    full: Vec<Arc<[Arc<str>]>>,
    tail: Vec<Arc<str>>,
}

const CHUNK: usize = 4096;

impl Names {
    fn len(&self) -> usize {
        self.full.len() * CHUNK + self.tail.len()
    }

    fn push(&mut self, s: Arc<str>) {
        self.tail.push(s);
        if self.tail.len() == CHUNK {
            self.full.push(Arc::from(std::mem::replace(&mut self.tail, Vec::with_capacity(CHUNK))));
        }
    }

    /// The string at 0-based `i`.
    fn get(&self, i: usize) -> Option<&Arc<str>> {
        let (chunk, at) = (i / CHUNK, i % CHUNK);
        match self.full.get(chunk) {
            Some(c) => c.get(at),
            None if chunk == self.full.len() => self.tail.get(at),
            None => None,
        }
    }
}

/// The string dictionary: ids for attribute keys, service names, span and event names.
/// Readers resolve ids without touching the database.
///
/// Its memory is bounded where cardinality comes from data: attribute values have a budget per
/// key and in all (longer or later ones stay inline in their row), and so do span names, per
/// service and in all (a name past the budget is stored in the span's row itself, see
/// [`Strings::span_name`]). Attribute keys, service and event names are taken as they come.
pub struct Strings {
    ids: RwLock<HashMap<Arc<str>, i64>>,
    names: RwLock<Names>,
    pending: Mutex<Vec<(i64, Arc<str>)>>,
    /// Values added to the dictionary so far, per attribute key, and in all.
    value_budget: Mutex<(HashMap<u64, u32>, usize)>,
    /// Span names added to the dictionary so far, per service (since start).
    span_name_budget: Mutex<HashMap<i64, u32>>,
}

/// Distinct span names one service adds to the dictionary (since start); later new names (ones
/// that embed ids, like `GET /users/93821`) are stored inline in their spans.
const SPAN_NAMES_PER_SERVICE: u32 = 10_000;
/// Strings the dictionary holds at most before span names stop entering it (across restarts:
/// the dictionary is loaded whole at start).
const MAX_STRINGS_FOR_SPAN_NAMES: usize = 500_000;

/// String values longer than this stay inline.
const MAX_VALUE_LEN: usize = 64;
/// Distinct values of one attribute key the dictionary takes (since start); keys with more
/// (ids, paths, timestamps) keep their later values inline. The first values stay shared.
const VALUES_PER_KEY: u32 = 256;
/// Attribute values the dictionary takes in all (since start), which bounds its memory.
const MAX_VALUES: usize = 1_000_000;

impl Strings {
    /// `loaded` must hold ids 1..=n without gaps, as the writer assigns them.
    pub fn new(mut loaded: Vec<(i64, String)>) -> Self {
        loaded.sort_by_key(|(id, _)| *id);
        let mut ids = HashMap::with_capacity_and_hasher(loaded.len(), Default::default());
        let mut names = Names::default();
        for (id, s) in loaded {
            let s: Arc<str> = s.into();
            // Ids are dense from 1; a gap (not written by this program) is filled with an empty name.
            while (names.len() as i64) < id - 1 {
                names.push(Arc::from(""));
            }
            ids.insert(s.clone(), id);
            names.push(s);
        }
        Self {
            ids: RwLock::new(ids),
            names: RwLock::new(names),
            pending: Mutex::new(Vec::new()),
            value_budget: Mutex::new((HashMap::default(), 0)),
            span_name_budget: Mutex::new(HashMap::default()),
        }
    }

    pub fn id(&self, s: &str) -> i64 {
        if let Some(&id) = self.ids.read().unwrap_or_else(PoisonError::into_inner).get(s) {
            return id;
        }
        let mut ids = self.ids.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = ids.get(s) {
            return id;
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        let s: Arc<str> = s.into();
        names.push(s.clone());
        let id = names.len() as i64;
        ids.insert(s.clone(), id);
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).push((id, s));
        id
    }

    /// Looks up an existing id without creating one.
    pub fn find(&self, s: &str) -> Option<i64> {
        self.ids.read().unwrap_or_else(PoisonError::into_inner).get(s).copied()
    }

    pub fn name(&self, id: i64) -> Option<Arc<str>> {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        names.get(usize::try_from(id).ok()?.checked_sub(1)?).cloned()
    }

    /// The id of a span name of `service`, or `None` when the name is new and the budget for span
    /// names is spent (the service's, or the dictionary's): the span then keeps its name inline.
    pub fn span_name(&self, service: i64, name: &str) -> Option<i64> {
        if let Some(id) = self.find(name) {
            return Some(id);
        }
        if self.len() >= MAX_STRINGS_FOR_SPAN_NAMES {
            return None;
        }
        {
            let mut budget = self.span_name_budget.lock().unwrap_or_else(PoisonError::into_inner);
            let used = budget.entry(service).or_insert(0);
            if *used >= SPAN_NAMES_PER_SERVICE {
                return None;
            }
            *used += 1;
        }
        Some(self.id(name))
    }

    /// Strings in the dictionary.
    pub fn len(&self) -> usize {
        self.names.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn take_pending(&self) -> Vec<(i64, Arc<str>)> {
        std::mem::take(&mut self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn restore_pending(&self, mut rows: Vec<(i64, Arc<str>)>) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        rows.append(&mut p);
        *p = rows;
    }

    /// A snapshot for decoding many values without taking the lock for each. Cheap: full chunks
    /// are shared, so the lock is held for one pointer per 4,096 strings and the last chunk.
    pub fn snapshot(&self) -> StringsSnapshot {
        StringsSnapshot(self.names.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl Intern for &Strings {
    fn intern(&mut self, s: &str) -> u64 {
        self.id(s) as u64
    }

    fn intern_value(&mut self, key: u64, s: &str) -> Option<u64> {
        if s.len() > MAX_VALUE_LEN {
            return None;
        }
        if let Some(id) = self.find(s) {
            return Some(id as u64);
        }
        {
            let mut budget = self.value_budget.lock().unwrap_or_else(PoisonError::into_inner);
            let (per_key, total) = &mut *budget;
            let used = per_key.entry(key).or_insert(0);
            if *used >= VALUES_PER_KEY || *total >= MAX_VALUES {
                return None;
            }
            *used += 1;
            *total += 1;
        }
        Some(self.id(s) as u64)
    }
}

pub struct StringsSnapshot(Names);

impl StringsSnapshot {
    pub fn get(&self, id: i64) -> &str {
        self.resolve(id as u64).unwrap_or("")
    }
}

impl Resolve for StringsSnapshot {
    fn resolve(&self, id: u64) -> Option<&str> {
        self.0.get(usize::try_from(id).ok()?.checked_sub(1)?).map(|s| &**s)
    }
}

/// A trace's row in `traces`. Spans refer to it by `id` instead of repeating the 16-byte trace id,
/// so the only random-key index entry is one per trace, not one per span.
#[derive(Debug, Clone)]
pub struct TraceRow {
    pub id: i64,
    pub trace_id: [u8; 16],
    pub first_seen_ns: i64,
}

struct TraceState {
    current: HashMap<[u8; 16], i64>,
    previous: HashMap<[u8; 16], i64>,
    next: i64,
    pending: Vec<TraceRow>,
}

/// Trace ids of recent traces. Only recent ones are kept: a span arriving for a trace that was
/// forgotten gets a second `traces` row with the same trace id, and reads gather all of them.
pub struct TraceRefs {
    state: Mutex<TraceState>,
    max_entries: usize,
}

impl TraceRefs {
    pub fn new(next: i64, max_entries: usize) -> Self {
        Self {
            state: Mutex::new(TraceState { current: HashMap::default(), previous: HashMap::default(), next, pending: Vec::new() }),
            max_entries: max_entries.max(1),
        }
    }

    pub fn get_or_insert(&self, trace_id: [u8; 16], now_ns: i64) -> i64 {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = st.current.get(&trace_id) {
            return id;
        }
        if let Some(id) = st.previous.remove(&trace_id) {
            st.current.insert(trace_id, id);
            return id;
        }
        if st.current.len() >= self.max_entries {
            st.previous = std::mem::take(&mut st.current);
        }
        let id = st.next;
        st.next += 1;
        st.current.insert(trace_id, id);
        st.pending.push(TraceRow { id, trace_id, first_seen_ns: now_ns });
        id
    }

    /// The smallest id new spans may still use: rows below it can be removed whole.
    pub fn min_reachable(&self) -> i64 {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let pending_min = st.pending.iter().map(|r| r.id).min();
        st.previous.values().chain(st.current.values()).copied().chain(pending_min).min().unwrap_or(st.next)
    }

    /// Forgets the older half, so that retention can remove rows no new span will point to;
    /// returns the smallest id new spans may still use.
    pub fn rotate(&self) -> i64 {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.previous = std::mem::take(&mut st.current);
        let pending_min = st.pending.iter().map(|r| r.id).min();
        st.previous.values().copied().chain(pending_min).min().unwrap_or(st.next)
    }

    pub fn take_pending(&self) -> Vec<TraceRow> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).pending)
    }

    pub fn restore_pending(&self, mut rows: Vec<TraceRow>) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        rows.append(&mut st.pending);
        st.pending = rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_assign_dense_ids_and_remember_pending() {
        let s = Strings::new(vec![(1, "a".into()), (2, "b".into())]);
        assert_eq!(s.id("b"), 2);
        assert_eq!(s.id("c"), 3);
        assert_eq!(s.id("c"), 3);
        assert_eq!(s.name(3).as_deref(), Some("c"));
        let p = s.take_pending();
        assert_eq!(p.len(), 1);
        s.restore_pending(p);
        assert_eq!(s.take_pending()[0].0, 3);
        assert!(s.take_pending().is_empty());
    }

    #[test]
    fn values_are_shared_until_a_key_has_too_many() {
        let s = Strings::new(Vec::new());
        let mut d = &s;
        let key = d.intern("user.id");
        let first = d.intern_value(key, "GET").expect("shared");
        assert_eq!(d.intern_value(key, "GET"), Some(first));
        for i in 1..VALUES_PER_KEY {
            assert!(d.intern_value(key, &format!("u{i}")).is_some());
        }
        assert_eq!(d.intern_value(key, "one too many"), None);
        assert_eq!(d.intern_value(key, "GET"), Some(first), "known values stay shared");
        assert_eq!(d.intern_value(key, &"x".repeat(65)), None);
    }

    #[test]
    fn trace_refs_reuse_recent_ids_and_rotate() {
        let t = TraceRefs::new(10, 2);
        let a = t.get_or_insert([1; 16], 0);
        assert_eq!(t.get_or_insert([1; 16], 0), a);
        let b = t.get_or_insert([2; 16], 0);
        let c = t.get_or_insert([3; 16], 0); // rotates: a and b move to previous
        assert_eq!((a, b, c), (10, 11, 12));
        assert_eq!(t.get_or_insert([1; 16], 0), a);
        assert_eq!(t.take_pending().len(), 3);
        assert_eq!(t.rotate(), 10);
    }

    #[test]
    fn ids_continue_after_the_loaded_ones() {
        let i: Ids<Vec<u8>> = Ids::new([(vec![1u8], 4)]);
        assert_eq!(i.id(&[1u8][..]), 4);
        assert_eq!(i.id(&[2u8][..]), 5);
        assert_eq!(i.id(&[2u8][..]), 5);
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn interner_keeps_ids_stable() {
        let i: Interner<Vec<u8>, i64> = Interner::new([(vec![1u8], 4)]);
        assert_eq!(i.get_or_insert(&[1u8][..], |id| id), 4);
        assert_eq!(i.get_or_insert(&[2u8][..], |id| id), 5);
        assert_eq!(i.take_pending(), vec![5]);
    }
}
