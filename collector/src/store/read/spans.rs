//! Reading spans out of their blocks: the spans of one trace (in start order, bounded), and the
//! spans that started within a window.

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use std::collections::HashSet;

use crate::store::StoreError;
use crate::store::blocks::{self, StoredSpan};

/// Where the spans of one trace id are: its `traces` rows (more than one when spans came after
/// the id was forgotten) and the blocks holding them, in id order.
pub(crate) struct TraceBlocks {
    pub rows: HashSet<i64>,
    pub blocks: Vec<i64>,
    /// Spans its rows count (`traces.spans`): a hint, as retention may have taken some since.
    pub spans_hint: usize,
}

impl TraceBlocks {
    pub async fn of(conn: &mut SqliteConnection, trace_id: [u8; 16]) -> Result<Self, StoreError> {
        let counted: Vec<(i64, i64)> = sqlx::query_as("SELECT id, spans FROM traces WHERE trace_id = ?").bind(trace_id.to_vec()).fetch_all(&mut *conn).await?;
        let spans_hint = counted.iter().map(|(_, n)| usize::try_from(*n).unwrap_or(0)).sum();
        let rows: Vec<i64> = counted.into_iter().map(|(id, _)| id).collect();
        let mut blocks = Vec::new();
        for &row in &rows {
            let ids: Vec<i64> = sqlx::query_scalar("SELECT block FROM trace_blocks WHERE trace = ?").bind(row).fetch_all(&mut *conn).await?;
            blocks.extend(ids);
        }
        blocks.sort_unstable();
        blocks.dedup();
        Ok(Self { rows: rows.into_iter().collect(), blocks, spans_hint })
    }

    /// Calls `f` with each span of the trace, block by block (not in start order), with the
    /// span's [`SpanKey`].
    pub async fn visit(&self, conn: &mut SqliteConnection, mut f: impl FnMut(SpanKey, StoredSpan) -> Result<(), StoreError>) -> Result<(), StoreError> {
        for (pos, &id) in self.blocks.iter().enumerate() {
            for (i, s) in self.read_own(conn, id).await? {
                f(SpanKey { start_ns: s.start_ns, block: pos as u32, index: i }, s)?;
            }
        }
        Ok(())
    }

    /// The earliest `max` spans of the trace by start (then as stored), each made a `T` by
    /// `take`, in that order; and how many spans the trace has in all. Memory stays within `max`
    /// items and 16 bytes a span, whatever the trace's size: a larger trace is read twice.
    pub async fn earliest<T>(
        &self,
        conn: &mut SqliteConnection,
        max: usize,
        mut take: impl FnMut(&StoredSpan) -> Result<T, StoreError>,
    ) -> Result<(Vec<T>, usize), StoreError> {
        // A trace counted larger than `max` is read twice from the start; a smaller one gets its
        // room at once (no doubling of a million-item vector on the way).
        let mut all_kept = self.spans_hint <= max;
        let mut keys: Vec<SpanKey> = Vec::with_capacity(self.spans_hint.min(max.saturating_mul(4)));
        let mut items: Vec<(SpanKey, T)> = Vec::with_capacity(if all_kept { self.spans_hint } else { 0 });
        self.visit(conn, |key, s| {
            keys.push(key);
            if all_kept {
                if items.len() < max {
                    items.push((key, take(&s)?));
                } else {
                    all_kept = false;
                    items = Vec::new();
                }
            }
            Ok(())
        })
        .await?;
        let total = keys.len();
        if all_kept {
            items.sort_unstable_by_key(|(k, _)| *k);
            return Ok((items.into_iter().map(|(_, t)| t).collect(), total));
        }
        keys.sort_unstable();
        keys.truncate(max);
        // (block, place in the block, rank) of each span taken, by block: 12 bytes a span.
        let mut wanted: Vec<(u32, u32, u32)> = keys.iter().enumerate().map(|(r, k)| (k.block, k.index, r as u32)).collect();
        drop(keys);
        wanted.sort_unstable();
        let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(wanted.len()).collect();
        for run in wanted.chunk_by(|a, b| a.0 == b.0) {
            let spans = self.read_own(conn, self.blocks[run[0].0 as usize]).await?;
            for &(_, index, rank) in run {
                if let Ok(k) = spans.binary_search_by_key(&index, |(i, _)| *i) {
                    slots[rank as usize] = Some(take(&spans[k].1)?);
                }
            }
        }
        Ok((slots.into_iter().flatten().collect(), total))
    }
}

impl TraceBlocks {
    /// The trace's spans in block `id`, with their places in it (ascending).
    async fn read_own(&self, conn: &mut SqliteConnection, id: i64) -> Result<Vec<(u32, StoredSpan)>, StoreError> {
        match block_data(conn, id).await? {
            Some(d) => Ok(blocks::decode_where(&d, |t| self.rows.contains(&t))?),
            None => Ok(Vec::new()),
        }
    }
}

/// Orders the spans of a trace: by start, then as stored (block, then place in the block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SpanKey {
    pub start_ns: i64,
    pub block: u32,
    pub index: u32,
}

pub(crate) async fn read_block(conn: &mut SqliteConnection, id: i64) -> Result<Vec<StoredSpan>, StoreError> {
    match block_data(conn, id).await? {
        Some(d) => Ok(blocks::decode(&d)?),
        None => Ok(Vec::new()),
    }
}

/// A block's compressed columns; `None` when retention removed it since its id was read.
async fn block_data(conn: &mut SqliteConnection, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(sqlx::query_scalar("SELECT data FROM span_blocks WHERE id = ?").bind(id).fetch_optional(&mut *conn).await?)
}

/// A block as search sees it before opening it.
pub(crate) struct BlockHead {
    pub id: i64,
    pub start_max: i64,
    pub summary: blocks::Summary,
    /// Its attribute filter, when asked for and known.
    pub bloom: Option<Vec<u8>>,
}

/// The blocks whose spans may have started within `[start_ns, end_ns]`, latest `start_max`
/// first, read a page at a time (so blocks can be opened on the same connection in between).
pub(crate) struct WindowBlocks {
    start_ns: i64,
    end_ns: i64,
    /// Read the blocks' attribute filters too.
    blooms: bool,
    page: std::vec::IntoIter<HeadRow>,
    /// (start_max, id) of the last block read; `None` before the first page.
    below: Option<(i64, i64)>,
    done: bool,
}

impl WindowBlocks {
    pub fn new(start_ns: i64, end_ns: i64, blooms: bool) -> Self {
        Self { start_ns, end_ns, blooms, page: Vec::new().into_iter(), below: None, done: false }
    }

    pub async fn next(&mut self, conn: &mut SqliteConnection) -> Result<Option<BlockHead>, StoreError> {
        if let Some((id, start_max, summary, bloom)) = self.page.next() {
            return Ok(Some(BlockHead { id, start_max, summary: blocks::Summary::decode(&summary)?, bloom }));
        }
        if self.done {
            return Ok(None);
        }
        let columns = if self.blooms { "id, start_max, summary, bloom" } else { "id, start_max, summary, NULL" };
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!("SELECT {columns} FROM span_blocks WHERE start_max >= "));
        qb.push_bind(self.start_ns).push(" AND start_min <= ").push_bind(self.end_ns);
        if let Some((start_max, id)) = self.below {
            qb.push(" AND (start_max, id) < (").push_bind(start_max).push(", ").push_bind(id).push(")");
        }
        qb.push(" ORDER BY start_max DESC, id DESC LIMIT ").push_bind(WINDOW_PAGE);
        let rows = qb.build().fetch_all(&mut *conn).await?;
        let page: Vec<HeadRow> = rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))).collect::<Result<_, sqlx::Error>>()?;
        self.done = (page.len() as i64) < WINDOW_PAGE;
        let Some(&(id, start_max, _, _)) = page.last() else { return Ok(None) };
        self.below = Some((start_max, id));
        self.page = page.into_iter();
        let Some((id, start_max, summary, bloom)) = self.page.next() else { return Ok(None) };
        Ok(Some(BlockHead { id, start_max, summary: blocks::Summary::decode(&summary)?, bloom }))
    }
}

/// A block head as read: id, latest span start, encoded summary, attribute filter.
type HeadRow = (i64, i64, Vec<u8>, Option<Vec<u8>>);

/// Block heads [`WindowBlocks`] reads at a time.
const WINDOW_PAGE: i64 = 64;

/// Calls `f` with every span that started within `[start_ns, end_ns]` (in no particular order),
/// at most `limit` of them; returns how many it saw.
pub(crate) async fn visit_window(
    conn: &mut SqliteConnection,
    start_ns: i64,
    end_ns: i64,
    limit: usize,
    mut f: impl FnMut(StoredSpan) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let mut seen = 0;
    let mut heads = WindowBlocks::new(start_ns, end_ns, false);
    while let Some(head) = heads.next(conn).await? {
        for s in read_block(conn, head.id).await? {
            if s.start_ns < start_ns || s.start_ns > end_ns {
                continue;
            }
            seen += 1;
            if seen > limit {
                return Ok(seen);
            }
            f(s)?;
        }
    }
    Ok(seen)
}
