//! The metrics services send: their names with a search, type and unit; one metric's series over
//! time (counters as rates, gauges as values, histograms as p50/p95/p99), grouped by a label and
//! filtered by label values. Every line is labelled at its end. All of it lives in the URL.

use leptos::prelude::*;
use leptos_router::components::{A, Form};
use leptos_router::hooks::use_query_map;

use crate::api::{self, MetricChart, MetricList, enc};
use crate::format;

/// The page's state, from its query string.
#[derive(Debug, Clone, PartialEq, Default)]
struct Query {
    search: String,
    name: String,
    by: String,
    attr: String,
    lookback: String,
}

impl Query {
    fn from_map(q: &leptos_router::params::ParamsMap) -> Self {
        let get = |k: &str| q.get(k).unwrap_or_default().trim().to_owned();
        Self { search: get("q"), name: get("name"), by: get("by"), attr: get("attr"), lookback: get("lookback") }
    }

    fn href(&self, name: &str) -> String {
        let mut p = vec![("q", self.search.clone()), ("name", name.to_owned()), ("lookback", self.lookback.clone())];
        p.retain(|(_, v)| !v.is_empty());
        format!("/explore?{}", p.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&"))
    }

    fn chart_path(&self) -> String {
        let lookback = if self.lookback.is_empty() { "1h" } else { &self.lookback };
        let mut path = format!("/api/v1/metrics/{}/chart?lookback={}", enc(&self.name), enc(lookback));
        if !self.by.is_empty() {
            path.push_str(&format!("&by={}", enc(&self.by)));
        }
        for a in self.attr.split(';').map(str::trim).filter(|a| !a.is_empty()) {
            path.push_str(&format!("&attr={}", enc(a)));
        }
        path
    }
}

#[component]
pub fn MetricsPage() -> impl IntoView {
    let query_map = use_query_map();
    let query = Memo::new(move |_| Query::from_map(&query_map.read()));
    let base = api::base();
    let list = {
        let base = base.clone();
        Resource::new(|| (), move |_| api::get::<MetricList>(&base, "/api/v1/metrics"))
    };
    let chart = Resource::new(
        move || query.get(),
        move |q| {
            let base = base.clone();
            async move { if q.name.is_empty() { Ok(None) } else { api::get::<MetricChart>(&base, &q.chart_path()).await.map(Some) } }
        },
    );
    view! {
        <section class="metrics-page">
            <h1>"Metrics"</h1>
            <div class="metrics-layout">
                <div class="metric-list">
                    <Form method="GET" action="/explore">
                        <input name="q" prop:value=move || query.get().search placeholder="search names" data-testid="metric-search"/>
                        <input type="hidden" name="name" prop:value=move || query.get().name/>
                        <button type="submit">"Find"</button>
                    </Form>
                    <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                        {move || list.get().map(|r| match r {
                            Err(e) => view! { <p class="notice error">{e}</p> }.into_any(),
                            Ok(l) => {
                                let q = query.get();
                                let words = q.search.to_lowercase();
                                let found: Vec<_> = l.metrics.into_iter().filter(|m| m.name.to_lowercase().contains(&words)).collect();
                                if found.is_empty() {
                                    return view! { <p class="notice">"No metric matches. Services send metrics over OTLP (/v1/metrics)."</p> }.into_any();
                                }
                                view! {
                                    <table class="results" data-testid="metrics">
                                        <thead><tr><th>"Metric"</th><th>"Type"</th><th>"Unit"</th><th>"Series"</th></tr></thead>
                                        <tbody>{found.into_iter().map(|m| {
                                            let href = q.href(&m.name);
                                            let selected = m.name == q.name;
                                            let (key, label) = (m.name.clone(), m.name.clone());
                                            view! {
                                                <tr class:selected=selected data-metric=key>
                                                    <td><A href=href attr:title=m.description.clone()>{label}</A></td>
                                                    <td>{m.metric_type}</td><td>{m.unit}</td><td>{m.series_count}</td>
                                                </tr>
                                            }
                                        }).collect_view()}</tbody>
                                    </table>
                                }.into_any()
                            }
                        })}
                    </Transition>
                </div>
                <div class="metric-chart">
                    <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                        {move || chart.get().map(|r| match r {
                            Err(e) => view! { <p class="notice error">{e}</p> }.into_any(),
                            Ok(None) => view! { <p class="notice">"Choose a metric."</p> }.into_any(),
                            Ok(Some(c)) => view! { <ChartView chart=c query=query.get()/> }.into_any(),
                        })}
                    </Transition>
                </div>
            </div>
        </section>
    }
}

/// What a chart's values are, by the metric's type.
fn describe(c: &MetricChart) -> &'static str {
    match c.metric_type.as_str() {
        "sum" if c.groups.iter().any(|g| g.lines.iter().any(|l| l.name == "rate")) => "rate per second",
        "histogram" | "exponential_histogram" => "percentiles of the values recorded in each step",
        "summary" => "the quantiles the services reported",
        _ => "latest value in each step",
    }
}

#[component]
fn ChartView(chart: MetricChart, query: Query) -> impl IntoView {
    let (w, h, left, right, top, bottom) = (760.0_f64, 260.0_f64, 10.0_f64, 190.0_f64, 20.0_f64, 20.0_f64);
    let n = chart.steps.len().max(1);
    let lines: Vec<(String, Vec<Option<f64>>)> = chart
        .groups
        .iter()
        .flat_map(|g| g.lines.iter().map(move |l| (if g.key == "all" { l.name.clone() } else { format!("{} · {}", g.key, l.name) }, l.values.clone())))
        .collect();
    let max = lines.iter().flat_map(|(_, v)| v.iter().flatten().copied()).fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let x = move |i: usize| left + (i as f64 + 0.5) / n as f64 * (w - left - right);
    let y = move |v: f64| top + (1.0 - v / scale) * (h - top - bottom);
    let unit = chart.unit.clone();
    let shown = move |v: f64| if v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.3}") };
    // End labels one under the other when their lines end close together.
    let mut ends: Vec<(usize, f64)> =
        lines.iter().enumerate().filter_map(|(k, (_, values))| values.iter().rev().flatten().next().map(|&v| (k, y(v) + 4.0))).collect();
    ends.sort_by(|a, b| a.1.total_cmp(&b.1));
    for i in 1..ends.len() {
        ends[i].1 = ends[i].1.max(ends[i - 1].1 + 13.0);
    }
    let paths = lines
        .iter()
        .enumerate()
        .map(|(k, (label, values))| {
            // Steps without data are passed over (services export less often than a step can
            // be); every point also gets a dot, so a lone one shows.
            let known: Vec<(usize, f64)> = values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
            let d: String = known.iter().enumerate().map(|(k, &(i, v))| format!("{}{:.1},{:.1}", if k == 0 { "M" } else { "L" }, x(i), y(v))).collect();
            let colour = format::service_colour(label);
            let dots = known
                .iter()
                .map(|&(i, v)| view! { <circle cx=format!("{:.1}", x(i)) cy=format!("{:.1}", y(v)) r="2.5" style=format!("fill:{colour}")/> })
                .collect_view();
            let last = values.iter().rposition(Option::is_some);
            let per_second = if label.ends_with("rate") { "/s" } else { "" };
            let label_y = ends.iter().find(|e| e.0 == k).map_or(0.0, |e| e.1);
            let end = last.and_then(|i| values[i]).map(|v| {
                let text = format!("{label} {} {unit}{per_second}", shown(v));
                view! { <text x=format!("{:.1}", w - right + 6.0) y=format!("{label_y:.1}") class="end" style=format!("fill:{colour}")>{text}</text> }
            });
            view! {
                <path d=d class="line" style=format!("stroke:{colour}") data-line=label.clone()/>
                {dots}
                {end}
            }
        })
        .collect_view();
    let first = chart.steps.first().and_then(|t| t.parse::<i64>().ok()).map(|t| format::time(t, false)).unwrap_or_default();
    let last = chart.steps.last().and_then(|t| t.parse::<i64>().ok()).map(|t| format::time(t, false)).unwrap_or_default();
    let what = describe(&chart);
    let by = query.by.clone();
    let attr = query.attr.clone();
    let lookback = if query.lookback.is_empty() { "1h".to_owned() } else { query.lookback.clone() };
    view! {
        <h2 data-testid="chart-title">{chart.name.clone()}</h2>
        <p class="muted">{format!("{} · {} series · {what}", chart.metric_type, chart.series)}</p>
        <Form method="GET" action="/explore">
            <div class="fields">
                <input type="hidden" name="q" value=query.search.clone()/>
                <input type="hidden" name="name" value=query.name.clone()/>
                <label>"Group by "
                    <select name="by" data-testid="group-by">
                        <option value="">"nothing"</option>
                        {chart.labels.iter().map(|l| view! { <option value=l.clone() selected=*l == by>{l.clone()}</option> }).collect_view()}
                    </select>
                </label>
                <label class="wide">"Filter " <input name="attr" value=attr placeholder="service=gateway; http.route=/api/orders" data-testid="filter"/></label>
                <label>"Last " <input name="lookback" value=lookback size="5"/></label>
                <button type="submit">"Show"</button>
            </div>
        </Form>
        {if lines.is_empty() {
            view! { <p class="notice">"No points of this metric in the window."</p> }.into_any()
        } else {
            view! {
                <svg class="metric-svg" viewBox=format!("0 0 {w} {h}") data-testid="metric-chart">
                    <text x=left y="12" class="axis">{format!("max {} {}", shown(max), chart.unit)}</text>
                    <line x1=left y1=h - bottom x2=w - right y2=h - bottom class="axis"/>
                    <text x=left y=h - 4.0 class="axis">{first}</text>
                    <text x=w - right y=h - 4.0 class="axis" text-anchor="end">{last}</text>
                    {paths}
                </svg>
            }.into_any()
        }}
    }
}
