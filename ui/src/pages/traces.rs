//! Trace search: service, operation, attribute filters, errors only, duration range, relative or
//! absolute time range, limit; results sortable by start, duration and span count, and a scatter
//! plot of duration over time whose points open the trace. All of it lives in the query string.

use leptos::prelude::*;
use leptos_router::components::{A, Form};
use leptos_router::hooks::use_query_map;

use crate::api::{self, SearchResult, Services, TraceSummary, enc};
use crate::format;

/// The search as the URL has it.
#[derive(Clone, Debug, PartialEq, Default)]
struct Query {
    service: String,
    operation: String,
    attrs: Vec<String>,
    errors: bool,
    min: String,
    max: String,
    lookback: String,
    start: String,
    end: String,
    limit: String,
    sort: String,
}

impl Query {
    fn from_map(q: &leptos_router::params::ParamsMap) -> Self {
        let get = |k: &str| q.get(k).unwrap_or_default().trim().to_owned();
        let attrs = q.get_all("attr").unwrap_or_default().into_iter().flat_map(|a| {
            a.split(['\n']).flat_map(|l| l.split("; ")).map(|s| s.trim().trim_end_matches(';').to_owned()).filter(|s| !s.is_empty()).collect::<Vec<_>>()
        });
        Self {
            service: get("service"),
            operation: get("operation"),
            attrs: attrs.collect(),
            errors: get("errors") == "true",
            min: get("minDuration"),
            max: get("maxDuration"),
            lookback: get("lookback"),
            start: get("start"),
            end: get("end"),
            limit: get("limit"),
            sort: get("sort"),
        }
    }

    /// The filters as query pairs, named as the page's URL names them.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut p: Vec<(&'static str, String)> = vec![("service", self.service.clone()), ("operation", self.operation.clone())];
        p.extend(self.attrs.iter().map(|a| ("attr", a.clone())));
        if self.errors {
            p.push(("errors", "true".into()));
        }
        p.extend([
            ("minDuration", self.min.clone()),
            ("maxDuration", self.max.clone()),
            ("lookback", self.lookback.clone()),
            ("start", self.start.clone()),
            ("end", self.end.clone()),
            ("limit", self.limit.clone()),
        ]);
        p.retain(|(_, v)| !v.is_empty());
        p
    }

    /// The collector API path for this search (its `error=true` is the page's `errors=true`).
    fn api_path(&self) -> String {
        let mut p = self.pairs();
        for (k, _) in &mut p {
            if *k == "errors" {
                *k = "error";
            }
        }
        if self.start.is_empty() && self.lookback.is_empty() {
            p.push(("lookback", "1h".into()));
        }
        if self.limit.is_empty() {
            p.push(("limit", "50".into()));
        }
        format!("/api/v1/traces?{}", join(&p))
    }
}

fn join(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

#[component]
pub fn TracesPage() -> impl IntoView {
    let query_map = use_query_map();
    let query = Memo::new(move |_| Query::from_map(&query_map.read()));
    let base = api::base();
    let services = {
        let base = base.clone();
        Resource::new(
            || (),
            move |_| {
                let base = base.clone();
                async move { api::get::<Services>(&base, "/api/v1/services").await }
            },
        )
    };
    let results = Resource::new(
        move || query.get().api_path(),
        move |path| {
            let base = base.clone();
            async move { api::get::<SearchResult>(&base, &path).await }
        },
    );

    view! {
        <section class="search">
            <h1>"Traces"</h1>
            <Form method="GET" action="/traces">
                <div class="fields">
                    <label>"Service"
                        <Transition fallback=|| view! { <select name="service"><option value="">"…"</option></select> }>
                            {move || {
                                let chosen = query.get().service;
                                services.get().map(|r| match r {
                                    Ok(s) => view! {
                                        <select name="service" data-testid="service">
                                            <option value="">"any"</option>
                                            {s.services.into_iter().map(|name| {
                                                let selected = name == chosen;
                                                view! { <option value=name.clone() selected=selected>{name.clone()}</option> }
                                            }).collect_view()}
                                        </select>
                                    }.into_any(),
                                    Err(e) => view! { <span class="error">{e}</span> }.into_any(),
                                })
                            }}
                        </Transition>
                    </label>
                    <label>"Operation" <input name="operation" prop:value=move || query.get().operation placeholder="GET /api/{service}/{*rest}"/></label>
                    <label class="wide">"Attributes" <input name="attr" prop:value=move || query.get().attrs.join("; ") placeholder="http.response.status_code=500; peer.service=users"/></label>
                    <label>"Min duration" <input name="minDuration" prop:value=move || query.get().min placeholder="10ms"/></label>
                    <label>"Max duration" <input name="maxDuration" prop:value=move || query.get().max placeholder="2s"/></label>
                    <label>"Lookback" <input name="lookback" prop:value=move || query.get().lookback placeholder="1h"/></label>
                    <label>"From" <input name="start" prop:value=move || query.get().start placeholder="2026-11-22T10:00:00Z"/></label>
                    <label>"To" <input name="end" prop:value=move || query.get().end placeholder="empty: now"/></label>
                    <label>"Limit" <input name="limit" prop:value=move || query.get().limit placeholder="50" size="5"/></label>
                    <label class="check"><input type="checkbox" name="errors" value="true" prop:checked=move || query.get().errors/>" errors only"</label>
                    <input type="hidden" name="sort" prop:value=move || query.get().sort/>
                    <button type="submit">"Search"</button>
                </div>
            </Form>
        </section>
        <Transition fallback=|| view! { <p class="notice">"Searching…"</p> }>
            {move || results.get().map(|r| match r {
                Err(e) => view! { <p class="notice error">"The search failed: " {e}</p> }.into_any(),
                Ok(found) if found.traces.is_empty() => view! {
                    <p class="notice">"No traces match. Widen the time range, or check that services export to this collector."</p>
                }.into_any(),
                Ok(found) => view! { <Results traces=found.traces query=query/> }.into_any(),
            })}
        </Transition>
    }
}

/// A link to the same search with another sort order.
fn sort_href(q: &Query, sort: &str) -> String {
    let mut p = q.pairs();
    p.push(("sort", sort.to_owned()));
    format!("/traces?{}", join(&p))
}

#[component]
fn Results(traces: Vec<TraceSummary>, query: Memo<Query>) -> impl IntoView {
    let n = traces.len();
    let scatter = traces.clone();
    // Sorting is client-side and follows the URL, so a sort link (or Back) reorders at once.
    let rows = move || {
        let q = query.get();
        let mut sorted = traces.clone();
        match q.sort.as_str() {
            "duration" => sorted.sort_by_key(|t| std::cmp::Reverse(t.duration_nanos)),
            "spans" => sorted.sort_by_key(|t| std::cmp::Reverse(t.span_count)),
            _ => sorted.sort_by_key(|t| std::cmp::Reverse(t.start_ns())),
        }
        sorted
            .into_iter()
            .map(|t| {
                let href = format!("/traces/{}", t.trace_id);
                let services = t
                    .services
                    .iter()
                    .map(|s| {
                        let colour = format!("background:{}", format::service_colour(&s.name));
                        view! { <span class="chip" style=colour>{format!("{} ({})", s.name, s.span_count)}</span> }
                    })
                    .collect_view();
                view! {
                    <tr class:has-error={t.error_count > 0} data-trace-id=t.trace_id.clone()>
                        <td>{format::time(t.start_ns(), false)}</td>
                        <td><A href=href>{format!("{}: {}", t.root_service, t.root_operation)}</A></td>
                        <td>{format::duration(t.duration_nanos)}</td>
                        <td>{t.span_count}</td>
                        <td>{t.error_count}</td>
                        <td>{services}</td>
                    </tr>
                }
            })
            .collect_view()
    };
    let head = move || {
        let q = query.get();
        let sorted_by = |k: &str| -> &'static str { if q.sort == k || (k == "start" && q.sort.is_empty()) { " ▾" } else { "" } };
        let (mark_start, mark_duration, mark_spans) = (sorted_by("start"), sorted_by("duration"), sorted_by("spans"));
        view! {
            <tr>
                <th><A href=sort_href(&q, "start") attr:data-sort="start">"Start"{mark_start}</A></th>
                <th>"Root"</th>
                <th><A href=sort_href(&q, "duration") attr:data-sort="duration">"Duration"{mark_duration}</A></th>
                <th><A href=sort_href(&q, "spans") attr:data-sort="spans">"Spans"{mark_spans}</A></th>
                <th>"Errors"</th>
                <th>"Services"</th>
            </tr>
        }
    };
    view! {
        <Scatter traces=scatter/>
        <p class="count">{format!("{n} traces")}</p>
        <table class="results" data-testid="results">
            <thead>{head}</thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

/// Duration over start time, one dot per trace (red if it has errors); a dot opens its trace.
#[component]
fn Scatter(traces: Vec<TraceSummary>) -> impl IntoView {
    let (w, h, pad) = (900.0_f64, 160.0_f64, 30.0_f64);
    let t0 = traces.iter().map(TraceSummary::start_ns).min().unwrap_or(0);
    let t1 = traces.iter().map(TraceSummary::start_ns).max().unwrap_or(t0).max(t0 + 1);
    let dmax = traces.iter().map(|t| t.duration_nanos).max().unwrap_or(1).max(1) as f64;
    let dots = traces
        .into_iter()
        .map(|t| {
            let x = pad + (t.start_ns() - t0) as f64 / (t1 - t0) as f64 * (w - 2.0 * pad);
            let y = h - pad - t.duration_nanos as f64 / dmax * (h - 2.0 * pad);
            let href = format!("/traces/{}", t.trace_id);
            let label = format!("{}: {} ({})", t.root_service, t.root_operation, format::duration(t.duration_nanos));
            view! {
                <a href=href>
                    <circle cx=format!("{x:.1}") cy=format!("{y:.1}") r="5" class:error={t.error_count > 0}><title>{label}</title></circle>
                </a>
            }
        })
        .collect_view();
    view! {
        <svg class="scatter" viewBox=format!("0 0 {w} {h}") data-testid="scatter">
            <text x="4" y="14" class="axis">{format!("max {}", format::duration(dmax as i64))}</text>
            <line x1=pad y1=h - pad x2=w - pad y2=h - pad class="axis"/>
            {dots}
        </svg>
    }
}
