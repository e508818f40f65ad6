//! Fuzz targets. Each takes arbitrary bytes and must neither panic nor recurse without bound;
//! what it decodes it also converts to rows, and every blob the encoder wrote must decode again.
//!
//! `collector/fuzz` runs them under libFuzzer (`cargo fuzz`, which needs a nightly toolchain);
//! `tests/fuzz_corpus.rs` replays the committed corpus through them on stable, in the test
//! command. See docs/RELIABILITY.md for a recorded run.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::otlp::decode::{Encoding, decode};
use crate::store::codec::{Reader, decode_attributes};
use crate::store::convert::{self, Converted};
use crate::store::{Dicts, dict::StringsSnapshot};

/// The body of an OTLP/HTTP protobuf export (or a gRPC message) of any signal.
pub fn otlp_protobuf(data: &[u8]) {
    otlp(data, Encoding::Protobuf);
}

/// The body of an OTLP/HTTP JSON export of any signal.
pub fn otlp_json(data: &[u8]) {
    otlp(data, Encoding::Json);
}

/// A stored blob (attributes, events, links, a span block) as read back from the database: a corrupt row must
/// give an error, never a panic.
pub fn codec(data: &[u8]) {
    let dicts = Dicts::empty();
    for s in ["service.name", "http.route", "GET /", "exception"] {
        dicts.strings.id(s);
    }
    let dict = dicts.strings.snapshot();
    let _ = decode_attributes(data, &dict);
    let _ = Reader::new(data, &dict).events(1_700_000_000_000_000_000);
    let _ = Reader::new(data, &dict).links();
    // A span block, its summary and trace list: stored blobs too.
    let _ = crate::store::blocks::decode(data);
    let _ = crate::store::blocks::Summary::decode(data);
    let _ = crate::store::blocks::decode_trace_list(data);
}

fn otlp(data: &[u8], encoding: Encoding) {
    let dicts = Dicts::empty();
    let prost = decode::<ExportTraceServiceRequest>(data, encoding);
    if encoding == Encoding::Protobuf {
        same_as_prost(data, prost.as_ref().ok());
    }
    if let Ok(req) = prost {
        check(convert::traces(req, &dicts), &dicts);
    }
    if let Ok(req) = decode::<ExportMetricsServiceRequest>(data, encoding) {
        check(convert::metrics(req, &dicts), &dicts);
    }
    if let Ok(req) = decode::<ExportLogsServiceRequest>(data, encoding) {
        check(convert::logs(req, &dicts), &dicts);
    }
}

/// The protobuf path's reader ([`crate::store::view`]) takes what prost takes, and converts it to
/// the same rows (with fresh dictionaries, so the same ids).
fn same_as_prost(data: &[u8], by_prost: Option<&ExportTraceServiceRequest>) {
    let dicts = Dicts::empty();
    let wire = convert::traces_protobuf(data, &dicts);
    match (by_prost, wire) {
        (None, Err(_)) => {}
        (Some(req), Ok(got)) => {
            let want = convert::traces(req.clone(), &Dicts::empty());
            assert_eq!(format!("{:?}", got.rows), format!("{:?}", want.rows), "the protobuf reader converts as prost's structs do");
            assert_eq!((got.rejected, &got.first_error, got.cut_values), (want.rejected, &want.first_error, want.cut_values));
            check(got, &dicts);
        }
        (Some(_), Err(e)) => panic!("prost takes the body, the protobuf reader refuses it: {e}"),
        (None, Ok(_)) => panic!("prost refuses the body, the protobuf reader takes it"),
    }
}

/// Everything the encoder wrote decodes with the dictionary it wrote to.
fn check(converted: Converted, dicts: &Dicts) {
    let _ = converted.message();
    let dict: StringsSnapshot = dicts.strings.snapshot();
    let rows = converted.rows;
    for s in &rows.spans {
        if let Some(b) = &s.span.attributes {
            decode_attributes(b, &dict).expect("span attributes the encoder wrote decode");
        }
        if let Some(b) = &s.span.events {
            Reader::new(b, &dict).events(s.span.start_ns as u64).expect("events the encoder wrote decode");
        }
        if let Some(b) = &s.span.links {
            Reader::new(b, &dict).links().expect("links the encoder wrote decode");
        }
    }
    for l in &rows.logs {
        for b in [&l.body, &l.attributes].into_iter().flatten() {
            decode_attributes(b, &dict).expect("log attributes and bodies the encoder wrote decode");
        }
    }
    for s in &rows.series {
        decode_attributes(&s.key.3, &dict).expect("series attributes the encoder wrote decode");
    }
}
