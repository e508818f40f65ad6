//! One service: its operations with rate, errors and latency, its instances from the registry,
//! and its recent traces.

use leptos::prelude::*;
use leptos_router::components::A;
use leptos_router::hooks::{use_params_map, use_query_map};
use serde::{Deserialize, Serialize};

use crate::api::{self, Instance, RedPoint, RedSeries, SearchResult, ServiceStats, enc};
use crate::format;
use crate::pages::map::refresh_tick;
use crate::pages::registry::InstanceTable;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServiceInstances {
    instances: Vec<Instance>,
}

#[component]
pub fn ServicePage() -> impl IntoView {
    let params = use_params_map();
    let query = use_query_map();
    let name = Memo::new(move |_| params.read().get("name").unwrap_or_default());
    let window = Memo::new(move |_| query.read().get("window").unwrap_or_else(|| "15m".into()));
    let tick = refresh_tick(10);
    let base = api::base();
    let stats = {
        let base = base.clone();
        Resource::new(
            move || (name.get(), window.get(), tick.get()),
            move |(n, w, _)| api::get::<ServiceStats>(&base, &format!("/api/v1/services/{}/stats?lookback={}", enc(&n), enc(&w))),
        )
    };
    let instances = {
        let base = base.clone();
        Resource::new(move || (name.get(), tick.get()), move |(n, _)| api::get::<ServiceInstances>(&base, &format!("/api/v1/registry/services/{}", enc(&n))))
    };
    let red = {
        let base = base.clone();
        Resource::new(
            move || (name.get(), window.get(), tick.get()),
            move |(n, w, _)| api::get::<RedSeries>(&base, &format!("/api/v1/services/{}/red?lookback={}", enc(&n), enc(&w))),
        )
    };
    let traces = Resource::new(
        move || (name.get(), window.get(), tick.get()),
        move |(n, w, _)| api::get::<SearchResult>(&base, &format!("/api/v1/traces?service={}&lookback={}&limit=20", enc(&n), enc(&w))),
    );

    view! {
        <section class="service-page">
            <h1>{move || name.get()}</h1>
            <p class="muted">{move || format!("Last {} · ", window.get())}<A href=move || format!("/traces?service={}", enc(&name.get()))>"search its traces"</A></p>
            <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                {move || red.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">{e}</p> }.into_any(),
                    Ok(series) => view! { <RedCharts series/> }.into_any(),
                })}
            </Transition>
            <h2>"Operations"</h2>
            <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                {move || stats.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">{e}</p> }.into_any(),
                    Ok(s) if s.operations.is_empty() => view! { <p class="notice">"No spans from this service in the window."</p> }.into_any(),
                    Ok(s) => view! {
                        <table class="results" data-testid="operations">
                            <thead><tr><th>"Operation"</th><th>"Kind"</th><th>"Calls"</th><th>"Rate"</th><th>"Errors"</th><th>"p50"</th><th>"p99"</th></tr></thead>
                            <tbody>{s.operations.into_iter().map(|o| {
                                let href = format!("/traces?service={}&operation={}", enc(&s.service), enc(&o.name));
                                view! {
                                    <tr class:has-error={o.errors > 0}>
                                        <td><A href=href>{o.name.clone()}</A></td><td>{o.kind}</td><td>{o.calls}</td>
                                        <td>{format!("{:.2}/s", o.rate_per_second)}</td>
                                        <td>{format!("{} ({:.1}%)", o.errors, o.error_rate * 100.0)}</td>
                                        <td>{format::duration(o.p50_nanos)}</td><td>{format::duration(o.p99_nanos)}</td>
                                    </tr>
                                }
                            }).collect_view()}</tbody>
                        </table>
                    }.into_any(),
                })}
            </Transition>
            <h2>"Instances"</h2>
            <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                {move || instances.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">"The registry could not be asked: " {e}</p> }.into_any(),
                    Ok(i) if i.instances.is_empty() => view! { <p class="notice">"No instance of this service is registered."</p> }.into_any(),
                    Ok(i) => view! { <InstanceTable instances=i.instances/> }.into_any(),
                })}
            </Transition>
            <h2>"Recent traces"</h2>
            <Transition fallback=|| view! { <p class="notice">"Loading…"</p> }>
                {move || traces.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">{e}</p> }.into_any(),
                    Ok(t) if t.traces.is_empty() => view! { <p class="notice">"No traces in the window."</p> }.into_any(),
                    Ok(t) => view! {
                        <table class="results">
                            <tbody>{t.traces.into_iter().map(|t| view! {
                                <tr class:has-error={t.error_count > 0}>
                                    <td>{format::time(t.start_ns(), false)}</td>
                                    <td><A href=format!("/traces/{}", t.trace_id)>{format!("{}: {}", t.root_service, t.root_operation)}</A></td>
                                    <td>{format::duration(t.duration_nanos)}</td>
                                    <td>{format!("{} spans", t.span_count)}</td>
                                </tr>
                            }).collect_view()}</tbody>
                        </table>
                    }.into_any(),
                })}
            </Transition>
        </section>
    }
}

/// One line of a chart: its points' values, its CSS class and the label written at its end.
struct Line {
    values: Vec<f64>,
    class: &'static str,
    label: String,
}

/// A small line chart over the steps, its maximum on the axis, each line labelled at its end (no
/// legend to look up); every step is a link to the traces of that step (`extra` adds filters).
/// What a chart shows: its title, test id, the filters its steps' links add, and its unit.
struct Chart {
    title: &'static str,
    testid: &'static str,
    extra: &'static str,
    unit: fn(f64) -> String,
}

fn chart(c: Chart, points: &[RedPoint], step_ns: i64, service: &str, lines: Vec<Line>) -> impl IntoView + use<> {
    let Chart { title, testid, extra, unit } = c;
    let (w, h, left, right, top, bottom) = (300.0_f64, 120.0_f64, 8.0_f64, 70.0_f64, 18.0_f64, 16.0_f64);
    let n = points.len().max(1);
    let max = lines.iter().flat_map(|l| l.values.iter().copied()).fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let x = |i: usize| left + (i as f64 + 0.5) / n as f64 * (w - left - right);
    let y = |v: f64| top + (1.0 - v / scale) * (h - top - bottom);
    // End labels one under the other when their lines end close together.
    let mut ends: Vec<(usize, f64)> = lines.iter().enumerate().map(|(k, l)| (k, y(l.values.last().copied().unwrap_or(0.0)) + 4.0)).collect();
    ends.sort_by(|a, b| a.1.total_cmp(&b.1));
    for i in 1..ends.len() {
        ends[i].1 = ends[i].1.max(ends[i - 1].1 + 10.0);
    }
    let label_y = |k: usize| ends.iter().find(|e| e.0 == k).map_or(0.0, |e| e.1);
    let paths = lines
        .into_iter()
        .enumerate()
        .map(|(k, l)| {
            let d = l.values.iter().enumerate().map(|(i, &v)| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { "L" }, x(i), y(v))).collect::<String>();
            let last = l.values.last().copied().unwrap_or(0.0);
            let label = format!("{} {}", l.label, unit(last));
            view! {
                <path d=d class=format!("line {}", l.class)/>
                <text x=format!("{:.1}", w - right + 4.0) y=format!("{:.1}", label_y(k)) class=format!("end {}", l.class)>{label}</text>
            }
        })
        .collect_view();
    let columns = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = p.time_ns();
            let href = format!("/traces?service={}&start={}&end={}{extra}", enc(service), t, t + step_ns);
            let width = (w - left - right) / n as f64;
            let tip = format!("{}: {} calls, {} errors, p99 {}", format::time(t, false), p.calls, p.errors, format::duration(p.p99_nanos));
            view! {
                <a href=href data-step=t.to_string()>
                    <rect x=format!("{:.1}", x(i) - width / 2.0) y=top width=format!("{width:.1}") height=h - top - bottom class="step"><title>{tip}</title></rect>
                </a>
            }
        })
        .collect_view();
    let first = points.first().map(|p| format::time(p.time_ns(), false)).unwrap_or_default();
    view! {
        <figure class="red-chart" data-testid=testid>
            <svg viewBox=format!("0 0 {w} {h}")>
                <text x=left y="12" class="title">{format!("{title} (max {})", unit(max))}</text>
                <line x1=left y1=h - bottom x2=w - right y2=h - bottom class="axis"/>
                <text x=left y=h - 3.0 class="axis">{first.get(11..16).unwrap_or_default().to_owned()}</text>
                {columns}
                {paths}
            </svg>
        </figure>
    }
}

/// Rate, error rate and latency percentiles of the service over the window (from the span
/// metrics); a click on a step lists the traces of that step.
#[component]
fn RedCharts(series: RedSeries) -> impl IntoView {
    let step_ns = series.step_seconds * 1_000_000_000;
    let p = &series.points;
    let counted = match series.counted.as_str() {
        "root" => "its root spans (it serves no requests)",
        _ => "its SERVER and CONSUMER spans",
    };
    let rate = chart(
        Chart { title: "Requests / s", testid: "red-rate", extra: "", unit: |v| format!("{v:.2}/s") },
        p,
        step_ns,
        &series.service,
        vec![Line { values: p.iter().map(|x| x.rate_per_second).collect(), class: "rate", label: "now".into() }],
    );
    let errors = chart(
        Chart { title: "Error rate", testid: "red-errors", extra: "&errors=true", unit: |v| format!("{v:.1}%") },
        p,
        step_ns,
        &series.service,
        vec![Line { values: p.iter().map(|x| x.error_rate * 100.0).collect(), class: "errors", label: "now".into() }],
    );
    let ms = |f: fn(&RedPoint) -> i64| p.iter().map(|x| f(x) as f64 / 1e6).collect::<Vec<_>>();
    let latency = chart(
        Chart { title: "Latency", testid: "red-latency", extra: "", unit: |v| format::duration((v * 1e6) as i64) },
        p,
        step_ns,
        &series.service,
        vec![
            Line { values: ms(|x| x.p99_nanos), class: "p99", label: "p99".into() },
            Line { values: ms(|x| x.p95_nanos), class: "p95", label: "p95".into() },
            Line { values: ms(|x| x.p50_nanos), class: "p50", label: "p50".into() },
        ],
    );
    view! {
        <div class="red-charts" data-testid="red-charts">
            {rate}{errors}{latency}
            <p class="muted">{format!("Per {} s, from {counted}; click a step for its traces.", series.step_seconds)}</p>
        </div>
    }
}
