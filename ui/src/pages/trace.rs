//! One trace: a header, a search inside the trace, the waterfall (span tree with collapse and
//! expand, per-service colours, error markers, event marks, the critical path, a time axis) and the
//! panel of the selected span. The page loads the trace's outline (columns, no attributes) and
//! asks for one span's details when it is selected, so a trace of 100,000 spans opens quickly; only
//! the rows in view are in the DOM, so it scrolls like a small one. The selected span, the search
//! and the time zone are in the URL.

use std::collections::HashSet;
use std::sync::Arc;

use leptos::prelude::*;
use leptos_router::NavigateOptions;
use leptos_router::components::A;
use leptos_router::hooks::{use_navigate, use_params_map, use_query_map};

use crate::api::{self, KeyValue, SpanDetail, SpanMatches, Trace, any_value_text, enc};
use crate::format;
use crate::outline::Outline;
use crate::waterfall::Layout;

const ROW_H: f64 = 24.0;
const VIEW_H: f64 = 640.0;
/// The tallest canvas the waterfall scrolls over. Past 2^24 px Chromium places and paints boxes
/// with float precision (rows overlap, then vanish), so more rows than fit are scrolled over a
/// canvas of this height, each pixel of scroll moving the rows several pixels.
const MAX_CANVAS: f64 = 8_000_000.0;

/// The canvas's height for `rows` rows, and how many pixels the rows move for one of scroll.
fn scroll_scale(rows: usize) -> (f64, f64) {
    let total = rows as f64 * ROW_H;
    if total <= MAX_CANVAS { (total, 1.0) } else { (MAX_CANVAS, (total - VIEW_H) / (MAX_CANVAS - VIEW_H)) }
}
const OVERSCAN: usize = 20;

#[component]
pub fn TracePage() -> impl IntoView {
    let params = use_params_map();
    let id = Memo::new(move |_| params.read().get("id").unwrap_or_default());
    // Fetched by the browser, not embedded in the page (a big trace would double the HTML), in
    // its binary form, decoded and laid out by a worker.
    let outline = LocalResource::new(move || {
        let id = id.get();
        async move { load_outline(&id).await.map(|(t, l)| (Arc::new(t), Arc::new(l))) }
    });
    // No <Suspense> around the view: the span details and the search it loads later would put the
    // boundary back into its fallback, and the waterfall, remounted, would lose its scroll.
    move || match outline.get() {
        // Following a link to another trace keeps the last one until the new one is here.
        // (Ids shorter than 32 digits are padded on the left.)
        Some(Ok((t, l))) if t.header.trace_id.trim_start_matches('0').eq_ignore_ascii_case(id.get().trim_start_matches('0')) => {
            view! { <TraceView trace=t layout=l/> }.into_any()
        }
        None | Some(Ok(_)) => view! { <p class="notice">"Loading the trace…"</p> }.into_any(),
        Some(Err(e)) => view! { <p class="notice error" data-testid="trace-error">"This trace could not be shown: " {e}</p> }.into_any(),
    }
}

async fn load_outline(id: &str) -> Result<(Outline, Layout), String> {
    let path = format!("/api/v1/traces/{}/outline?format=binary", enc(id));
    #[cfg(feature = "hydrate")]
    return crate::outline_worker::load(&path).await;
    #[cfg(not(feature = "hydrate"))]
    Err(format!("{path} is read in the browser"))
}

fn attrs_table(attrs: &[KeyValue]) -> impl IntoView + use<> {
    let rows = attrs
        .iter()
        .map(|a| {
            let (k, v) = (a.key.clone(), any_value_text(&a.value));
            view! { <tr><th>{k}</th><td>{v}</td></tr> }
        })
        .collect_view();
    view! { <table class="attrs">{rows}</table> }
}

#[component]
fn TraceView(trace: Arc<Outline>, layout: Arc<Layout>) -> impl IntoView {
    let query = use_query_map();
    let navigate = use_navigate();
    let local = Memo::new(move |_| query.read().get("tz").is_some_and(|z| z == "local"));
    let q = Memo::new(move |_| query.read().get("q").unwrap_or_default());
    let selected_id = Memo::new(move |_| query.read().get("span").unwrap_or_default());
    let collapsed = RwSignal::new(HashSet::<usize>::new());
    let scroll_top = RwSignal::new(0.0_f64);
    let trace_id = trace.header.trace_id.clone();

    // The search runs in the collector, which has the attributes.
    let found = {
        let trace_id = trace_id.clone();
        LocalResource::new(move || {
            let (q, trace_id) = (q.get(), trace_id.clone());
            async move {
                if q.trim().is_empty() {
                    return Ok(SpanMatches { span_ids: vec![] });
                }
                let base = api::base();
                api::get::<SpanMatches>(&base, &format!("/api/v1/traces/{}/search?q={}", enc(&trace_id), enc(&q))).await
            }
        })
    };
    let matches = {
        let (layout, trace) = (layout.clone(), trace.clone());
        Memo::new(move |_| {
            let ids = found.get().and_then(|r| r.ok()).map(|m| m.span_ids).unwrap_or_default();
            Arc::new(ids.iter().filter_map(|id| layout.find_hex(&trace, id)).collect::<HashSet<usize>>())
        })
    };
    let visible = {
        let layout = layout.clone();
        Memo::new(move |_| Arc::new(layout.visible(&collapsed.read())))
    };

    // The URL with one parameter changed.
    let href_with = move |key: &'static str, value: String| {
        let m = query.get_untracked();
        let mut parts: Vec<String> =
            ["span", "q", "tz"].iter().filter(|k| **k != key).filter_map(|k| m.get(k).filter(|v| !v.is_empty()).map(|v| format!("{k}={}", enc(&v)))).collect();
        if !value.is_empty() {
            parts.push(format!("{key}={}", enc(&value)));
        }
        parts.join("&")
    };

    let root = layout.order.first().map(|&r| r as usize);
    let services = trace.header.services.len();
    let errors = trace.status.iter().filter(|s| **s == 2).count();
    let total = layout.total_ns;
    let start_ns = trace.header.start_time_unix_nano as i64;
    let title = root.map_or_else(|| "(no spans)".to_owned(), |r| format!("{}: {}", trace.service_of(r), trace.name_of(r)));

    let tz_href = { move || format!("?{}", href_with("tz", if local.get() { String::new() } else { "local".into() })) };
    let on_search = {
        let navigate = navigate.clone();
        move |ev: leptos::ev::Event| {
            let v = event_target_value(&ev);
            navigate(&format!("?{}", href_with("q", v)), NavigateOptions { replace: true, ..Default::default() });
        }
    };
    let download_error = RwSignal::new(None::<String>);
    let download = {
        let trace_id = trace_id.clone();
        move |_| download_otlp(trace_id.clone(), download_error)
    };

    // The selected span (from a link, the URL or "next match") is brought into view: its collapsed
    // ancestors open and the waterfall scrolls to it.
    let viewport = NodeRef::<leptos::html::Div>::new();
    {
        let (layout, trace) = (layout.clone(), trace.clone());
        Effect::new(move |_| {
            let selected = selected_id.get();
            // Also runs again once the waterfall is in the page.
            let Some(el) = viewport.get() else { return };
            let Some(i) = layout.find_hex(&trace, &selected) else { return };
            let mut up = usize::try_from(trace.parents[i]).ok();
            let mut reopened = false;
            let mut coll = collapsed.get_untracked();
            while let Some(p) = up.filter(|p| *p < trace.len()) {
                reopened |= coll.remove(&p);
                up = usize::try_from(trace.parents[p]).ok().filter(|q| *q != p);
            }
            if reopened {
                collapsed.set(coll);
            }
            // The rows' memo, brought up to date with the reopened ancestors (not laid out again here).
            let vis = visible.get_untracked();
            let Some(pos) = vis.iter().position(|&v| v as usize == i) else { return };
            let (_, k) = scroll_scale(vis.len());
            let y = pos as f64 * ROW_H;
            let top = f64::from(el.scroll_top()) * k;
            if y < top || y > top + VIEW_H - 2.0 * ROW_H {
                let target = ((y - VIEW_H / 3.0).max(0.0) / k).round();
                scroll_top.set(target);
                scroll_when_ready(el, target as i32, 60, scroll_top);
            }
        });
    }
    // "Next match": the first matching span after the selected one in tree order.
    let next_match = {
        let (layout, trace, navigate, href_with) = (layout.clone(), trace.clone(), navigate.clone(), href_with);
        move |_| {
            let m = matches.get_untracked();
            if m.is_empty() {
                return;
            }
            let current = layout.find_hex(&trace, &selected_id.get_untracked()).and_then(|i| layout.order.iter().position(|&o| o as usize == i));
            let from = current.map_or(0, |p| p + 1);
            let n = layout.order.len();
            if let Some(i) = (0..n).map(|k| layout.order[(from + k) % n] as usize).find(|i| m.contains(i)) {
                navigate(&format!("?{}", href_with("span", trace.span_id_hex(i))), NavigateOptions { replace: true, ..Default::default() });
            }
        }
    };

    // Rows in view.
    let rows = {
        let layout = layout.clone();
        let trace = trace.clone();
        move || {
            let vis = visible.get();
            // Rows are placed near the scroll position (`shift`), whatever their place in the trace.
            let (_, k) = scroll_scale(vis.len());
            let at = scroll_top.get();
            let shift = (at * k).round() - at;
            let first = (((at + shift) / ROW_H) as usize).saturating_sub(OVERSCAN);
            let last = (first + (VIEW_H / ROW_H) as usize + 2 * OVERSCAN).min(vis.len());
            let matches = matches.get();
            let selected = selected_id.get();
            let coll = collapsed.get();
            (first..last)
                .map(|pos| {
                    let i = vis[pos] as usize;
                    let left = trace.start[i] as f64 / total as f64 * 100.0;
                    let width = (trace.duration[i] as f64 / total as f64 * 100.0).max(0.15);
                    let indent = format!("padding-left:{}px", 6 + 14 * usize::from(layout.depth[i]).min(40));
                    let service = trace.service_of(i).to_owned();
                    let colour = format::service_colour(&service);
                    let bar_style = format!("left:{left:.4}%;width:{width:.4}%;background:{colour}");
                    let has_kids = layout.descendants[i] > 0;
                    let is_collapsed = coll.contains(&i);
                    let marks = trace
                        .events_of(i)
                        .iter()
                        .map(|t| {
                            let at = (t - trace.start[i]) as f64 / trace.duration[i].max(1) as f64 * 100.0;
                            view! { <span class="event-mark" style=format!("left:{:.4}%", at.clamp(0.0, 100.0))></span> }
                        })
                        .collect_view();
                    let toggle = move |_| {
                        collapsed.update(|c| {
                            if !c.remove(&i) {
                                c.insert(i);
                            }
                        })
                    };
                    let span_id = trace.span_id_hex(i);
                    let select_href = format!("?{}", href_with("span", span_id.clone()));
                    let (is_selected, is_match, is_error, is_critical) = (span_id == selected, matches.contains(&i), trace.is_error(i), layout.is_critical(i));
                    let (name, dur) = (trace.name_of(i).to_owned(), format::duration(trace.duration[i]));
                    let dur_style = format!("left:{:.4}%", (left + width).min(92.0));
                    let top = format!("top:{}px", pos as f64 * ROW_H - shift);
                    view! {
                        <div class="row" style=top
                            class:selected=is_selected
                            class:match=is_match
                            class:error=is_error
                            class:critical=is_critical
                            data-span-id=span_id
                            data-row=pos>
                            <div class="label" style=indent>
                                {has_kids.then(|| view! {
                                    <button class="toggle" on:click=toggle aria-label="collapse or expand" data-testid="toggle">
                                        {if is_collapsed { "▸" } else { "▾" }}
                                    </button>
                                })}
                                <A href=select_href attr:class="span-link">
                                    <span class="svc" style=format!("color:{colour}")>{service}</span>
                                    " "
                                    <span class="name">{name}</span>
                                </A>
                                {is_error.then(|| view! { <span class="err-mark" title="error">"!"</span> })}
                            </div>
                            <div class="lane">
                                <div class="bar" style=bar_style>{marks}</div>
                                <span class="dur" style=dur_style>{dur}</span>
                            </div>
                        </div>
                    }
                })
                .collect_view()
        }
    };

    // The selected span's details, asked for when it is selected. Following a link to another
    // trace changes the URL (span included) before this view gives way to the other trace's:
    // until then the span belongs to the other trace and is not asked for under this one.
    let params = use_params_map();
    let route_trace = Memo::new(move |_| params.read().get("id").unwrap_or_default());
    let detail = {
        let trace_id = trace_id.clone();
        LocalResource::new(move || {
            let (id, trace_id, shown) = (selected_id.get(), trace_id.clone(), route_trace.get());
            async move {
                if id.is_empty() || !shown.eq_ignore_ascii_case(&trace_id) {
                    return None;
                }
                let base = api::base();
                Some(api::get::<SpanDetail>(&base, &format!("/api/v1/traces/{}/spans/{}", enc(&trace_id), enc(&id))).await)
            }
        })
    };
    let panel = move || {
        let local = local.get();
        let selected = selected_id.get();
        detail.get().flatten().map(|r| match r {
            Err(e) => view! { <aside class="panel" data-testid="span-panel"><p class="error">{e}</p></aside> }.into_any(),
            // The previous span's details stay until the selected one's arrive: not shown as its.
            Ok(s) if !s.span_id.trim_start_matches('0').eq_ignore_ascii_case(selected.trim_start_matches('0')) => {
                view! { <aside class="panel loading" data-testid="span-panel-loading"><p class="notice">"Loading the span…"</p></aside> }.into_any()
            }
            Ok(s) => {
                let span_start = s.start_time_unix_nano.parse::<i64>().unwrap_or(0);
                let events = s
                    .events
                    .iter()
                    .map(|e| {
                        let at = e.time_unix_nano.parse::<i64>().unwrap_or(0) - start_ns;
                        view! { <li><b>{e.name.clone()}</b>" at +"{format::duration(at)}{attrs_table(&e.attributes)}</li> }
                    })
                    .collect_view();
                let links = s
                    .links
                    .iter()
                    .map(|l| {
                        let href = format!("/traces/{}?span={}", l.trace_id, l.span_id);
                        view! { <li><A href=href attr:class="link" attr:data-testid="span-link">{format!("trace {} span {}", l.trace_id, l.span_id)}</A>{attrs_table(&l.attributes)}</li> }
                    })
                    .collect_view();
                let is_error = s.status.code == "ERROR";
                view! {
                    <aside class="panel" data-testid="span-panel">
                        <h2>{format!("{}: {}", s.service, s.name)}</h2>
                        <dl>
                            <dt>"Span"</dt><dd>{s.span_id.clone()}</dd>
                            <dt>"Parent"</dt><dd>{if s.parent_span_id.is_empty() { "(root)".to_owned() } else { s.parent_span_id.clone() }}</dd>
                            <dt>"Kind"</dt><dd>{s.kind.clone()}</dd>
                            <dt>"Start"</dt><dd>{format::time(span_start, local)}" (+"{format::duration(span_start - start_ns)}")"</dd>
                            <dt>"Duration"</dt><dd>{format::duration(s.duration_nanos)}</dd>
                            <dt>"Status"</dt><dd class:error=is_error>{format!("{} {}", s.status.code, s.status.message)}</dd>
                        </dl>
                        <h3>"Attributes"</h3>{attrs_table(&s.attributes)}
                        <h3>"Resource"</h3>{attrs_table(&s.resource.attributes)}
                        {(!s.events.is_empty()).then(|| view! { <h3>"Events"</h3><ul>{events}</ul> })}
                        {(!s.links.is_empty()).then(|| view! { <h3>"Links"</h3><ul>{links}</ul> })}
                    </aside>
                }
                .into_any()
            }
        })
    };

    let axis = (0..=4)
        .map(|k| {
            let label = format::duration(total * k / 4);
            view! { <span style=format!("left:{}%", k * 25)>{label}</span> }
        })
        .collect_view();
    let height = move || format!("height:{}px", scroll_scale(visible.get().len()).0);
    let start_text = move || format::time(start_ns, local.get());
    let match_count = move || {
        let n = matches.get().len();
        (!q.get().is_empty()).then(|| format!("{n} matching spans"))
    };

    view! {
        <section class="trace" data-trace-id=trace_id.clone()>
            <header class="trace-head">
                <h1>{title}</h1>
                <p class="facts">
                    <span>{start_text}</span>
                    <span>{format::duration(total)}</span>
                    <span data-testid="span-count">{format!("{} spans", trace.len())}</span>
                    <span>{format!("{services} services")}</span>
                    <span class:error={errors > 0}>{format!("{errors} errors")}</span>
                    <A href=tz_href>{move || if local.get() { "show UTC" } else { "show local time" }}</A>
                    <button on:click=download data-testid="download">"Download OTLP JSON"</button>
                    {move || download_error.get().map(|e| view! { <span class="error">{e}</span> })}
                </p>
                {trace.truncated().then(|| view! {
                    <p class="notice" data-testid="truncated">
                        {format!("This trace has {} spans; the waterfall shows the earliest {} by start time.", trace.header.span_count, trace.len())}
                    </p>
                })}
                <p class="find">
                    <input type="search" placeholder="Find in trace: name, service, attribute…" prop:value=move || q.get() on:change=on_search data-testid="find"/>
                    <span data-testid="match-count">{match_count}</span>
                    <button on:click=next_match data-testid="next-match" disabled=move || matches.get().is_empty()>"Next match"</button>
                    <span class="legend"><span class="critical-key"></span>" critical path"</span>
                </p>
            </header>
            <div class="split">
                <div class="waterfall">
                    <div class="axis">{axis}</div>
                    <div class="viewport" style=format!("height:{VIEW_H}px") data-testid="waterfall" node_ref=viewport
                        on:scroll=move |ev| {
                            let top = event_target::<leptos::web_sys::Element>(&ev).scroll_top();
                            scroll_top.set(f64::from(top));
                        }>
                        <div class="canvas" style=height>{rows}</div>
                    </div>
                </div>
                {panel}
            </div>
        </section>
    }
}

/// Scrolls the waterfall once it is in the document with its full height (before that the
/// browser would clamp the scroll to 0), trying for up to `frames` animation frames.
/// `scroll_top` then follows where the browser put it: a target past the end stops at the end,
/// and a scroll that changes nothing fires no scroll event.
fn scroll_when_ready(el: leptos::web_sys::HtmlDivElement, target: i32, frames: u32, scroll_top: RwSignal<f64>) {
    request_animation_frame(move || {
        if el.is_connected() && el.scroll_height() >= target {
            el.set_scroll_top(target);
            scroll_top.set(f64::from(el.scroll_top()));
        } else if frames > 0 {
            scroll_when_ready(el, target, frames - 1, scroll_top);
        }
    });
}

/// Saves the trace as OTLP/JSON (an `ExportTraceServiceRequest`), grouped by resource and scope.
/// The whole trace is fetched only now: the page itself never needs all attributes.
fn download_otlp(trace_id: String, error: RwSignal<Option<String>>) {
    error.set(None);
    #[cfg(feature = "hydrate")]
    leptos::task::spawn_local(async move {
        let base = api::base();
        match api::get::<Trace>(&base, &format!("/api/v1/traces/{}", enc(&trace_id))).await {
            Ok(t) => {
                save(&t.trace_id, &otlp_json(&t));
                // A trace larger than an answer is saved in part: say so.
                if let Some(w) = t.warnings.first() {
                    error.set(Some(format!("Saved in part: {w}")));
                }
            }
            Err(e) => error.set(Some(format!("The download failed: {e}"))),
        }
    });
    #[cfg(not(feature = "hydrate"))]
    let _ = trace_id;
}

#[cfg(feature = "hydrate")]
fn save(trace_id: &str, json: &str) {
    {
        use wasm_bindgen::JsCast;
        let parts = js_sys::Array::of1(&wasm_bindgen::JsValue::from_str(json));
        let opts = web_sys::BlobPropertyBag::new();
        opts.set_type("application/json");
        let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts) else { return };
        let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else { return };
        if let Some(a) =
            web_sys::window().and_then(|w| w.document()).and_then(|d| d.create_element("a").ok()).and_then(|e| e.dyn_into::<web_sys::HtmlAnchorElement>().ok())
        {
            a.set_href(&url);
            a.set_download(&format!("trace-{trace_id}.json"));
            a.click();
        }
        let _ = web_sys::Url::revoke_object_url(&url);
    }
}

pub fn otlp_json(t: &Trace) -> String {
    use serde_json::{Value, json};
    let kind = |k: &str| match k {
        "internal" => 1,
        "server" => 2,
        "client" => 3,
        "producer" => 4,
        "consumer" => 5,
        _ => 0,
    };
    let code = |c: &str| match c {
        "OK" => 1,
        "ERROR" => 2,
        _ => 0,
    };
    let mut groups: Vec<((i64, i64), Vec<Value>)> = Vec::new();
    for s in &t.spans {
        let span = json!({
            "traceId": t.trace_id, "spanId": s.span_id, "parentSpanId": s.parent_span_id, "traceState": s.trace_state,
            "name": s.name, "kind": kind(&s.kind), "startTimeUnixNano": s.start_time_unix_nano, "endTimeUnixNano": s.end_time_unix_nano,
            "attributes": s.attributes, "droppedAttributesCount": s.dropped_attributes_count,
            "events": s.events.iter().map(|e| json!({"timeUnixNano": e.time_unix_nano, "name": e.name, "attributes": e.attributes})).collect::<Vec<_>>(),
            "droppedEventsCount": s.dropped_events_count,
            "links": s.links.iter().map(|l| json!({"traceId": l.trace_id, "spanId": l.span_id, "attributes": l.attributes})).collect::<Vec<_>>(),
            "droppedLinksCount": s.dropped_links_count,
            "status": {"code": code(&s.status.code), "message": s.status.message}, "flags": s.flags,
        });
        match groups.iter_mut().find(|(k, _)| *k == (s.resource, s.scope)) {
            Some((_, v)) => v.push(span),
            None => groups.push(((s.resource, s.scope), vec![span])),
        }
    }
    let mut resource_spans: Vec<Value> = Vec::new();
    for r in &t.resources {
        let scope_spans: Vec<Value> = groups
            .iter()
            .filter(|((res, _), _)| *res == r.id)
            .map(|((_, scope), spans)| {
                let sc = t.scopes.iter().find(|s| s.id == *scope);
                json!({"scope": {"name": sc.map_or("", |s| s.name.as_str()), "version": sc.map_or("", |s| s.version.as_str())}, "spans": spans})
            })
            .collect();
        if !scope_spans.is_empty() {
            resource_spans.push(json!({"resource": {"attributes": r.attributes}, "scopeSpans": scope_spans}));
        }
    }
    json!({ "resourceSpans": resource_spans }).to_string()
}
