//! JSON forms shared by the query APIs.

use base64::Engine;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct, Serializer};
use serde_json::{Value, json};

/// An attribute value in its OTLP/JSON form (`{"stringValue": "…"}`, `{"intValue": "5"}`, …),
/// which keeps its type.
pub fn any_value_json(v: Option<&AnyValue>) -> Value {
    serde_json::to_value(OtlpValue(v)).unwrap_or(Value::Null)
}

pub fn attributes_json(attrs: &[KeyValue]) -> Value {
    serde_json::to_value(Attributes(attrs)).unwrap_or(Value::Null)
}

/// Attributes in their OTLP/JSON form (`[{"key": …, "value": {"stringValue": …}}]`), serialized
/// straight from the records: no `Value` tree (a trace's JSON took 2× as long through one).
pub struct Attributes<'a>(pub &'a [KeyValue]);

impl Serialize for Attributes<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut seq = ser.serialize_seq(Some(self.0.len()))?;
        for kv in self.0 {
            seq.serialize_element(&Attribute(kv))?;
        }
        seq.end()
    }
}

struct Attribute<'a>(&'a KeyValue);

impl Serialize for Attribute<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_struct("KeyValue", 2)?;
        m.serialize_field("key", &self.0.key)?;
        m.serialize_field("value", &OtlpValue(self.0.value.as_ref()))?;
        m.end()
    }
}

/// An attribute value in its OTLP/JSON form, which keeps its type: `{}` for none.
pub struct OtlpValue<'a>(pub Option<&'a AnyValue>);

impl Serialize for OtlpValue<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use any_value::Value as V;
        let Some(v) = self.0.and_then(|v| v.value.as_ref()) else {
            return ser.serialize_map(Some(0))?.end();
        };
        let mut m = ser.serialize_map(Some(1))?;
        match v {
            V::StringValue(s) => m.serialize_entry("stringValue", s)?,
            V::BoolValue(b) => m.serialize_entry("boolValue", b)?,
            V::IntValue(i) => m.serialize_entry("intValue", &Decimal(*i))?,
            V::DoubleValue(d) => m.serialize_entry("doubleValue", &Finite(*d))?,
            V::BytesValue(b) => m.serialize_entry("bytesValue", &base64::engine::general_purpose::STANDARD.encode(b))?,
            V::ArrayValue(a) => m.serialize_entry("arrayValue", &Values(&a.values))?,
            V::KvlistValue(l) => m.serialize_entry("kvlistValue", &KvList(&l.values))?,
            V::StringValueStrindex(i) => m.serialize_entry("stringValueStrindex", i)?,
        }
        m.end()
    }
}

/// `{"values": [...]}` of an array value.
struct Values<'a>(&'a [AnyValue]);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        struct Items<'a>(&'a [AnyValue]);
        impl Serialize for Items<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.iter().map(|v| OtlpValue(Some(v))))
            }
        }
        let mut m = ser.serialize_struct("ArrayValue", 1)?;
        m.serialize_field("values", &Items(self.0))?;
        m.end()
    }
}

/// `{"values": [attributes]}` of a key-value list.
struct KvList<'a>(&'a [KeyValue]);

impl Serialize for KvList<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_struct("KeyValueList", 1)?;
        m.serialize_field("values", &Attributes(self.0))?;
        m.end()
    }
}

/// A number as a decimal string (64-bit integers and nanosecond times do not fit a JSON number
/// exactly), written without an intermediate `String`.
pub struct Decimal<T>(pub T);

impl<T: std::fmt::Display> Serialize for Decimal<T> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(&self.0)
    }
}

/// JSON has no NaN or infinity: those are written as strings, as the protobuf JSON mapping does.
struct Finite(f64);

impl Serialize for Finite {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        if d.is_nan() {
            ser.serialize_str("NaN")
        } else if d.is_infinite() {
            ser.serialize_str(if d > 0.0 { "Infinity" } else { "-Infinity" })
        } else {
            ser.serialize_f64(d)
        }
    }
}

/// Bytes (an id) as lowercase hex, from a buffer on the stack for ids of up to 32 bytes.
pub struct Hex<'a>(pub &'a [u8]);

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        match buf.get_mut(..self.0.len() * 2) {
            Some(out) => {
                hex::encode_to_slice(self.0, out).map_err(serde::ser::Error::custom)?;
                ser.serialize_str(std::str::from_utf8(out).map_err(serde::ser::Error::custom)?)
            }
            None => ser.serialize_str(&hex::encode(self.0)),
        }
    }
}

/// A plain JSON rendering of a value, for places that show values as text (arrays and maps as JSON).
pub fn plain_json(v: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    match v.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(V::StringValue(s)) => json!(s),
        Some(V::BoolValue(b)) => json!(b),
        Some(V::IntValue(i)) => json!(i),
        Some(V::DoubleValue(d)) => serde_json::to_value(Finite(*d)).unwrap_or(Value::Null),
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
