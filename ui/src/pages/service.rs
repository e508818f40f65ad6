//! One service: its operations with rate, errors and latency, its instances from the registry,
//! and its recent traces.

use leptos::prelude::*;
use leptos_router::components::A;
use leptos_router::hooks::{use_params_map, use_query_map};
use serde::{Deserialize, Serialize};

use crate::api::{self, Instance, SearchResult, ServiceStats, enc};
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
    let traces = Resource::new(
        move || (name.get(), window.get(), tick.get()),
        move |(n, w, _)| api::get::<SearchResult>(&base, &format!("/api/v1/traces?service={}&lookback={}&limit=20", enc(&n), enc(&w))),
    );

    view! {
        <section class="service-page">
            <h1>{move || name.get()}</h1>
            <p class="muted">{move || format!("Last {} · ", window.get())}<A href=move || format!("/traces?service={}", enc(&name.get()))>"search its traces"</A></p>
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
