//! JSON forms shared by the query APIs.

use base64::Engine;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::{Value, json};

/// An attribute value in its OTLP/JSON form (`{"stringValue": "…"}`, `{"intValue": "5"}`, …),
/// which keeps its type.
pub fn any_value_json(v: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    match v.and_then(|v| v.value.as_ref()) {
        None => json!({}),
        Some(V::StringValue(s)) => json!({ "stringValue": s }),
        Some(V::BoolValue(b)) => json!({ "boolValue": b }),
        Some(V::IntValue(i)) => json!({ "intValue": i.to_string() }),
        Some(V::DoubleValue(d)) => json!({ "doubleValue": finite(*d) }),
        Some(V::BytesValue(b)) => json!({ "bytesValue": base64::engine::general_purpose::STANDARD.encode(b) }),
        Some(V::ArrayValue(a)) => {
            json!({ "arrayValue": { "values": a.values.iter().map(|v| any_value_json(Some(v))).collect::<Vec<_>>() } })
        }
        Some(V::KvlistValue(l)) => json!({ "kvlistValue": { "values": attributes_json(&l.values) } }),
        Some(V::StringValueStrindex(i)) => json!({ "stringValueStrindex": i }),
    }
}

/// JSON has no NaN or infinity: those are written as strings, as the protobuf JSON mapping does.
fn finite(d: f64) -> Value {
    if d.is_nan() {
        json!("NaN")
    } else if d.is_infinite() {
        json!(if d > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(d)
    }
}

pub fn attributes_json(attrs: &[KeyValue]) -> Vec<Value> {
    attrs.iter().map(|kv| json!({ "key": kv.key, "value": any_value_json(kv.value.as_ref()) })).collect()
}

/// A plain JSON rendering of a value, for places that show values as text (arrays and maps as JSON).
pub fn plain_json(v: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    match v.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(V::StringValue(s)) => json!(s),
        Some(V::BoolValue(b)) => json!(b),
        Some(V::IntValue(i)) => json!(i),
        Some(V::DoubleValue(d)) => finite(*d),
        Some(V::BytesValue(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        Some(V::ArrayValue(a)) => Value::Array(a.values.iter().map(|v| plain_json(Some(v))).collect()),
        Some(V::KvlistValue(l)) => Value::Object(l.values.iter().map(|kv| (kv.key.clone(), plain_json(kv.value.as_ref()))).collect()),
        Some(V::StringValueStrindex(i)) => json!(i),
    }
}

/// Rewrites base64 `traceId`/`spanId` fields (as the protobuf JSON mapping writes them) as hex, as
/// OTLP/JSON wants them.
pub fn base64_ids_to_hex(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if matches!(k.as_str(), "traceId" | "spanId" | "parentSpanId") {
                    if let Value::String(s) = child
                        && let Ok(b) = base64::engine::general_purpose::STANDARD.decode(s.as_bytes())
                    {
                        *s = hex::encode(b);
                    }
                } else {
                    base64_ids_to_hex(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(base64_ids_to_hex),
        _ => {}
    }
}
