-- A trace's spans in start order straight from the index: reading a trace (full, capped, or its
-- outline) streams rows in order instead of sorting the whole trace first, so a trace of a
-- million spans is read in bounded memory. Replaces the index on (trace) alone.
DROP INDEX IF EXISTS spans_trace;
CREATE INDEX spans_trace_start ON spans (trace, start_ns);
