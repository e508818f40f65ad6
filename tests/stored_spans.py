"""Counts the spans a stopped collector's database holds, per trace id, by reading the span
blocks themselves (collector/src/store/blocks.rs, format 1): the trace-runs column of each block,
not the collector's own per-trace counts."""

import sqlite3

import zstandard


def _varint(buf, pos):
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _unzigzag(v):
    return (v >> 1) ^ -(v & 1)


def block_trace_counts(data):
    """(traces row id, span count) of each trace run in one block's `data`."""
    raw_len, pos = _varint(data, 0)
    raw = bytes(data[pos:]) if raw_len == 0 else zstandard.ZstdDecompressor().decompress(bytes(data[pos:]), max_output_size=raw_len)
    assert raw[0] == 1, f"block format {raw[0]}"
    _, pos = _varint(raw, 1)  # spans
    _, pos = _varint(raw, pos)  # length of the first column: the trace runs
    runs, pos = _varint(raw, pos)
    trace, out = 0, []
    for _ in range(runs):
        delta, pos = _varint(raw, pos)
        count, pos = _varint(raw, pos)
        trace += _unzigzag(delta)
        out.append((trace, count))
    return out


def span_counts(db_path):
    """{trace id (16 bytes): spans stored} over every block of the database."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ids = dict(con.execute("SELECT id, trace_id FROM traces"))
        counts = {}
        for (data,) in con.execute("SELECT data FROM span_blocks"):
            for row, n in block_trace_counts(data):
                counts[ids[row]] = counts.get(ids[row], 0) + n
        return counts
    finally:
        con.close()
