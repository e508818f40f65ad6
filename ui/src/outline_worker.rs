//! Opening a big trace without blocking the page. The page fetches the trace's binary outline
//! (gzip on the wire, inflated by the browser off the page's thread) while a worker
//! (`/pkg/outline-worker.js`) instantiates this same wasm from the page's compiled module; the
//! worker decodes the outline and lays the
//! trace out ([`outline_layout`]), then moves the columns back as typed arrays; the page copies
//! them into its own memory (one copy of each flat array, no object per span) and ends the worker.

use js_sys::{BigUint64Array, Int32Array, Object, Reflect, Uint8Array, Uint16Array, Uint32Array};
use wasm_bindgen::prelude::*;

use crate::outline::{Header, Outline};
use crate::waterfall::Layout;

/// In the worker: the outline's bytes → an object of typed arrays (the outline's columns and the
/// layout's) and the header as JSON.
#[wasm_bindgen]
pub fn outline_layout(bytes: &[u8]) -> Result<Object, JsValue> {
    let o = Outline::decode(bytes).map_err(|e| JsValue::from_str(&format!("the outline could not be read: {e}")))?;
    let l = Layout::new(&o);
    let m = Object::new();
    let set = |k: &str, v: JsValue| Reflect::set(&m, &JsValue::from_str(k), &v).map(drop);
    set("header", JsValue::from_str(&serde_json::to_string(&o.header).map_err(|e| JsValue::from_str(&e.to_string()))?))?;
    set("spanIds", BigUint64Array::from(&o.span_ids[..]).into())?;
    set("parents", Int32Array::from(&o.parents[..]).into())?;
    set("service", Uint32Array::from(&o.service[..]).into())?;
    set("name", Uint32Array::from(&o.name[..]).into())?;
    set("kind", Uint8Array::from(&o.kind[..]).into())?;
    set("status", Uint8Array::from(&o.status[..]).into())?;
    set("start", js_sys::BigInt64Array::from(&o.start[..]).into())?;
    set("duration", js_sys::BigInt64Array::from(&o.duration[..]).into())?;
    set("eventOffsets", Uint32Array::from(&o.event_offsets[..]).into())?;
    set("eventTimes", js_sys::BigInt64Array::from(&o.event_times[..]).into())?;
    set("order", Uint32Array::from(&l.order[..]).into())?;
    set("depth", Uint16Array::from(&l.depth[..]).into())?;
    set("descendants", Uint32Array::from(&l.descendants[..]).into())?;
    set("critical", Uint8Array::from(&l.critical[..]).into())?;
    set("byId", Uint32Array::from(&l.by_id[..]).into())?;
    set("totalNs", JsValue::from_f64(l.total_ns as f64))?;
    Ok(m)
}

/// On the page: the outline at `path` (fetched here) decoded and laid out by a worker.
pub async fn load(path: &str) -> Result<(Outline, Layout), String> {
    use wasm_bindgen::JsCast;
    use wasm_bindgen_futures::JsFuture;

    let window = web_sys::window().ok_or("no window")?;
    // Started first: the worker instantiates its wasm while the outline downloads.
    let opts = web_sys::WorkerOptions::new();
    opts.set_type(web_sys::WorkerType::Module);
    let worker = Ended(web_sys::Worker::new_with_options("/pkg/outline-worker.js", &opts).map_err(|_| "the outline worker could not be started".to_owned())?);
    // Listening from the start: a worker that fails to load says so before the outline is here.
    let reply = js_sys::Promise::new(&mut |resolve, reject| {
        worker.0.set_onmessage(Some(&resolve));
        worker.0.set_onerror(Some(&reject));
        worker.0.set_onmessageerror(Some(&reject));
    });
    // The page's compiled module: the worker instantiates it instead of compiling the wasm again.
    let hello = Object::new();
    Reflect::set(&hello, &JsValue::from_str("module"), &wasm_bindgen::module()).map_err(|_| "the wasm module could not be handed over")?;
    worker.0.post_message(&hello).map_err(|_| "the wasm module could not be handed to the worker".to_owned())?;

    let resp = JsFuture::from(window.fetch_with_str(path)).await.map_err(|_| "the collector could not be reached".to_owned())?;
    let resp: web_sys::Response = resp.dyn_into().map_err(|_| "fetch gave no response".to_owned())?;
    if !resp.ok() {
        let text = JsFuture::from(resp.text().map_err(|_| "reading the answer failed")?).await.map_err(|_| "reading the answer failed")?;
        return Err(crate::api::error_message(resp.status(), text.as_string().unwrap_or_default()));
    }
    let bytes = JsFuture::from(resp.array_buffer().map_err(|_| "reading the outline failed")?).await.map_err(|_| "reading the outline failed")?;
    worker.0.post_message_with_transfer(&bytes, &js_sys::Array::of1(&bytes)).map_err(|_| "the outline could not be handed to the worker".to_owned())?;
    let event = JsFuture::from(reply).await.map_err(|_| "the outline worker failed (it could not load, or its answer could not be read)".to_owned())?;
    let data = event.dyn_into::<web_sys::MessageEvent>().map_err(|_| "the outline worker gave no message")?.data();
    if let Some(e) = get(&data, "error").ok().and_then(|e| e.as_string()) {
        return Err(e);
    }
    columns(&data).map_err(|e| format!("the outline worker's answer: {e}"))
}

/// The worker, ended however `load` ends: answered, failed, or dropped (the page left).
struct Ended(web_sys::Worker);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.terminate();
    }
}

fn get(o: &JsValue, key: &str) -> Result<JsValue, String> {
    Reflect::get(o, &JsValue::from_str(key)).ok().filter(|v| !v.is_undefined()).ok_or_else(|| format!("no {key}"))
}

fn array<A: JsCast>(o: &JsValue, key: &str) -> Result<A, String> {
    get(o, key)?.dyn_into::<A>().map_err(|_| format!("{key} is not the typed array expected"))
}

/// The worker's answer back into an outline and its layout.
fn columns(d: &JsValue) -> Result<(Outline, Layout), String> {
    let header: Header = serde_json::from_str(&get(d, "header")?.as_string().unwrap_or_default()).map_err(|e| format!("header: {e}"))?;
    let o = Outline {
        header,
        span_ids: array::<BigUint64Array>(d, "spanIds")?.to_vec(),
        parents: array::<Int32Array>(d, "parents")?.to_vec(),
        service: array::<Uint32Array>(d, "service")?.to_vec(),
        name: array::<Uint32Array>(d, "name")?.to_vec(),
        kind: array::<Uint8Array>(d, "kind")?.to_vec(),
        status: array::<Uint8Array>(d, "status")?.to_vec(),
        start: array::<js_sys::BigInt64Array>(d, "start")?.to_vec(),
        duration: array::<js_sys::BigInt64Array>(d, "duration")?.to_vec(),
        event_offsets: array::<Uint32Array>(d, "eventOffsets")?.to_vec(),
        event_times: array::<js_sys::BigInt64Array>(d, "eventTimes")?.to_vec(),
    };
    let l = Layout {
        order: array::<Uint32Array>(d, "order")?.to_vec(),
        depth: array::<Uint16Array>(d, "depth")?.to_vec(),
        descendants: array::<Uint32Array>(d, "descendants")?.to_vec(),
        critical: array::<Uint8Array>(d, "critical")?.to_vec(),
        by_id: array::<Uint32Array>(d, "byId")?.to_vec(),
        total_ns: get(d, "totalNs")?.as_f64().unwrap_or(1.0) as i64,
    };
    let n = o.len();
    let lengths = [
        o.parents.len(),
        o.service.len(),
        o.name.len(),
        o.kind.len(),
        o.status.len(),
        o.start.len(),
        o.duration.len(),
        l.order.len(),
        l.depth.len(),
        l.descendants.len(),
        l.critical.len(),
        l.by_id.len(),
    ];
    if lengths.iter().any(|&len| len != n) || o.event_offsets.len() != n + 1 {
        return Err(format!("columns of different lengths for {n} spans"));
    }
    Ok((o, l))
}
