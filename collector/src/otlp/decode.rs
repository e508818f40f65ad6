//! Decoding OTLP request bodies: gzip with a limit counted after decompression, protobuf, and
//! OTLP/JSON.
//!
//! OTLP/JSON is the protobuf JSON mapping with one difference: trace and span ids are hex, not
//! base64. The mapping itself (enum names or numbers, 64-bit integers as strings or numbers,
//! camelCase or snake_case field names, unknown fields ignored) is done by `prost-reflect` against
//! the OTLP descriptors; this module only turns the hex ids into what that mapping expects.

use std::io::Read;
use std::sync::LazyLock;

use base64::Engine;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

use super::status::IngestError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    pub fn label(self) -> &'static str {
        match self {
            Self::Protobuf => "protobuf",
            Self::Json => "json",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }

    /// From a Content-Type header value; parameters such as `charset` are ignored.
    pub fn from_content_type(ct: &str) -> Result<Self, IngestError> {
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/x-protobuf" | "application/protobuf" => Ok(Self::Protobuf),
            "application/json" => Ok(Self::Json),
            _ => Err(IngestError::UnsupportedContentType(ct.to_owned())),
        }
    }
}

/// Decompresses gzip, stopping as soon as the output passes `limit` (a gzip bomb costs at most
/// `limit` bytes of memory).
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity((body.len() * 4).min(limit));
    let mut decoder = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|e| IngestError::Malformed(format!("gzip body is corrupt: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { limit, decompressed: true });
    }
    Ok(out)
}

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| DescriptorPool::decode(opentelemetry_proto::DESCRIPTORS).map_err(|e| e.to_string()));

/// The descriptor of an OTLP message type, by its full protobuf name.
pub fn message_descriptor(full_name: &str) -> Option<MessageDescriptor> {
    POOL.as_ref().ok()?.get_message_by_name(full_name)
}

fn descriptor(full_name: &str) -> Result<MessageDescriptor, IngestError> {
    let pool = POOL.as_ref().map_err(|e| IngestError::Malformed(format!("OTLP descriptors unavailable: {e}")))?;
    pool.get_message_by_name(full_name).ok_or_else(|| IngestError::Malformed(format!("OTLP descriptor {full_name} missing")))
}

/// An OTLP message type that can be decoded from protobuf or OTLP/JSON.
pub trait OtlpMessage: Message + Default {
    const PROTO_NAME: &'static str;
}

macro_rules! otlp_message {
    ($t:ty, $name:literal) => {
        impl OtlpMessage for $t {
            const PROTO_NAME: &'static str = $name;
        }
    };
}

use opentelemetry_proto::tonic::collector::{logs::v1 as logs, metrics::v1 as metrics, trace::v1 as trace};
otlp_message!(trace::ExportTraceServiceRequest, "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest");
otlp_message!(trace::ExportTraceServiceResponse, "opentelemetry.proto.collector.trace.v1.ExportTraceServiceResponse");
otlp_message!(metrics::ExportMetricsServiceRequest, "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest");
otlp_message!(metrics::ExportMetricsServiceResponse, "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceResponse");
otlp_message!(logs::ExportLogsServiceRequest, "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest");
otlp_message!(logs::ExportLogsServiceResponse, "opentelemetry.proto.collector.logs.v1.ExportLogsServiceResponse");

pub fn decode<M: OtlpMessage>(body: &[u8], encoding: Encoding) -> Result<M, IngestError> {
    match encoding {
        Encoding::Protobuf => M::decode(body).map_err(|e| IngestError::Malformed(format!("invalid protobuf body: {e}"))),
        Encoding::Json => decode_json(body),
    }
}

fn decode_json<M: OtlpMessage>(body: &[u8]) -> Result<M, IngestError> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(IngestError::Malformed("invalid JSON body: expected an object".into()));
    }
    hex_ids_to_base64(&mut value, "")?;
    let desc = descriptor(M::PROTO_NAME)?;
    let msg = DynamicMessage::deserialize_with_options(desc, value, &DeserializeOptions::new().deny_unknown_fields(false))
        .map_err(|e| IngestError::Malformed(format!("invalid OTLP/JSON body: {e}")))?;
    M::decode(msg.encode_to_vec().as_slice()).map_err(|e| IngestError::Malformed(format!("invalid OTLP/JSON body: {e}")))
}

const ID_FIELDS: [&str; 6] = ["traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id"];

/// Rewrites hex trace and span ids as base64, which is what the protobuf JSON mapping reads.
fn hex_ids_to_base64(v: &mut Value, path: &str) -> Result<(), IngestError> {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if ID_FIELDS.contains(&k.as_str()) {
                    if let Value::String(s) = child {
                        let bytes = hex::decode(s.as_str()).map_err(|e| IngestError::Malformed(format!("{path}{k} must be a hex string: {e} in {s:?}")))?;
                        *s = base64::engine::general_purpose::STANDARD.encode(bytes);
                    }
                } else if k != "attributes" && k != "body" {
                    // Attribute values are user data: a key that happens to be called traceId
                    // inside them is left alone.
                    hex_ids_to_base64(child, &format!("{path}{k}."))?;
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                hex_ids_to_base64(item, &format!("{}[{i}].", path.trim_end_matches('.')))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Encodes a response message the way the request was encoded.
pub fn encode<M: OtlpMessage>(msg: &M, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => msg.encode_to_vec(),
        Encoding::Json => {
            let Ok(desc) = descriptor(M::PROTO_NAME) else { return b"{}".to_vec() };
            match DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()) {
                Ok(dynamic) => {
                    let mut out = Vec::new();
                    let mut ser = serde_json::Serializer::new(&mut out);
                    match dynamic.serialize_with_options(&mut ser, &SerializeOptions::new()) {
                        Ok(()) => out,
                        Err(_) => b"{}".to_vec(),
                    }
                }
                Err(_) => b"{}".to_vec(),
            }
        }
    }
}

/// `google.rpc.Status`, the body of an OTLP/HTTP error response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

pub fn encode_status(code: tonic::Code, message: &str, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => RpcStatus { code: code as i32, message: message.to_owned() }.encode_to_vec(),
        Encoding::Json => serde_json::json!({ "code": code as i32, "message": message }).to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn json_accepts_hex_ids_enum_names_and_string_integers() {
        let body = br#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"a"}}]},
          "scopeSpans":[{"scope":{"name":"s"},"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
          "name":"op","kind":"SPAN_KIND_SERVER","startTimeUnixNano":"1700000000000000001","endTimeUnixNano":1700000000000000999,
          "attributes":[{"key":"n","value":{"intValue":"-5"}}],"unknownField":{"x":1},
          "status":{"code":2,"message":"boom"}}]}]}]}"#;
        let req: ExportTraceServiceRequest = decode(body, Encoding::Json).expect("decodes");
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id, (1..=16).collect::<Vec<u8>>());
        assert_eq!(span.span_id, (1..=8).collect::<Vec<u8>>());
        assert_eq!(span.kind, 2);
        assert_eq!(span.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(span.end_time_unix_nano, 1_700_000_000_000_000_999);
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
    }

    #[test]
    fn json_errors_name_the_problem() {
        let e = decode::<ExportTraceServiceRequest>(b"{\"resourceSpans\":[{\"scopeSpans\":[{\"spans\":[{\"traceId\":\"zz\"}]}]}]}", Encoding::Json)
            .expect_err("bad hex");
        assert!(e.to_string().contains("resourceSpans[0].scopeSpans[0].spans[0].traceId"), "{e}");
        let e = decode::<ExportTraceServiceRequest>(b"{\"resourceSpans\":", Encoding::Json).expect_err("truncated");
        assert!(e.to_string().starts_with("invalid JSON body"), "{e}");
    }

    #[test]
    fn gzip_is_cut_off_at_the_limit() {
        use flate2::{Compression, write::GzEncoder};
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), Compression::best());
        enc.write_all(&vec![0u8; 10_000_000]).expect("compress");
        let bomb = enc.finish().expect("compress");
        assert!(matches!(gunzip(&bomb, 1_000_000), Err(IngestError::TooLarge { decompressed: true, .. })));
        assert!(matches!(gunzip(b"not gzip", 1000), Err(IngestError::Malformed(_))));
    }
}
