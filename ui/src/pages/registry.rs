//! The registry's state: the faults switched on (and chaos mode), every service and instance with
//! status, address, metadata, heartbeat age and lease expiry, renewals per minute against the
//! self-preservation threshold, the banner when self-preservation is on, and the recent events.
//! Says so when the registry is unreachable.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos_router::components::A;

use crate::api::{self, Faults, Instance, Instances, RegistryEvents, RegistryStatus, enc, now_ms, rfc3339_ms};
use crate::pages::map::refresh_tick;

fn age(ms: Option<i64>, now: i64) -> String {
    match ms {
        Some(t) if now >= t => format!("{:.1} s ago", (now - t) as f64 / 1000.0),
        Some(t) => format!("in {:.1} s", (t - now) as f64 / 1000.0),
        None => "?".into(),
    }
}

/// Instances as a table (shared with the service page).
#[component]
pub fn InstanceTable(instances: Vec<Instance>) -> impl IntoView {
    let now = now_ms();
    view! {
        <table class="results instances" data-testid="instances">
            <thead><tr><th>"Instance"</th><th>"Status"</th><th>"Address"</th><th>"Last heartbeat"</th><th>"Lease expires"</th><th>"Metadata"</th></tr></thead>
            <tbody>{instances.into_iter().map(|i| {
                let status_class = format!("status {}", i.status.to_lowercase());
                let metadata = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
                let expired = i.lease_expired.then_some(" (expired, kept)");
                view! {
                    <tr data-instance=i.instance_id.clone()>
                        <td>{i.instance_id.clone()}</td>
                        <td><span class=status_class>{i.status.clone()}</span></td>
                        <td>{i.address.clone()}</td>
                        <td>{age(rfc3339_ms(&i.last_heartbeat), now)}</td>
                        <td>{age(rfc3339_ms(&i.lease_expires_at), now)}{expired}</td>
                        <td class="meta">{metadata}</td>
                    </tr>
                }
            }).collect_view()}</tbody>
        </table>
    }
}

#[component]
pub fn RegistryPage() -> impl IntoView {
    let tick = refresh_tick(3);
    let base = api::base();
    let status = {
        let base = base.clone();
        Resource::new(move || tick.get(), move |_| api::get::<RegistryStatus>(&base, "/api/v1/registry/status"))
    };
    let instances = {
        let base = base.clone();
        Resource::new(move || tick.get(), move |_| api::get::<Instances>(&base, "/api/v1/registry/instances"))
    };
    let faults = {
        let base = base.clone();
        Resource::new(move || tick.get(), move |_| api::get::<Faults>(&base, "/api/v1/registry/faults"))
    };
    let events = Resource::new(move || tick.get(), move |_| api::get::<RegistryEvents>(&base, "/api/v1/registry/events?limit=50"));

    view! {
        <section class="registry-page">
            <h1>"Registry"</h1>
            <Transition fallback=|| view! { <p class="notice">"Asking the registry…"</p> }>
                {move || status.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error" data-testid="registry-error">"The registry is unreachable: " {e}</p> }.into_any(),
                    Ok(s) => {
                        let r = s.renewals.clone();
                        view! {
                            {r.self_preservation.then(|| view! {
                                <p class="banner" data-testid="self-preservation">
                                    "Self-preservation is ON: renewals fell below "{format!("{:.0}%", r.threshold * 100.0)}
                                    " of those expected, so expired leases are not evicted."
                                </p>
                            })}
                            <p class="facts" data-testid="renewals">
                                <span>{format!("{} services, {} instances", s.services, s.instances)}</span>
                                <span>{format!("renewals {:.1}/min", r.renewals_per_minute)}</span>
                                <span>{format!("expected {:.1}/min", r.expected_renewals_per_minute)}</span>
                                <span>{format!("threshold {:.1}/min", r.threshold_per_minute)}</span>
                                <span>{if r.self_preservation_enabled { "self-preservation enabled" } else { "self-preservation disabled" }}</span>
                            </p>
                        }.into_any()
                    }
                })}
            </Transition>
            <Transition fallback=|| ()>
                {move || faults.get().and_then(|r| r.ok()).map(|f| {
                    let now = now_ms();
                    let chaos = f.chaos.enabled.then(|| view! {
                        <p class="banner chaos" data-testid="chaos">
                            {format!("Chaos mode is ON: a random fault every {:.0} s, at most {} at once.", f.chaos.interval_ms as f64 / 1000.0, f.chaos.max_active)}
                        </p>
                    });
                    let list = if f.faults.is_empty() {
                        view! { <p class="muted" data-testid="no-faults">"No fault is on. Switch one on with "<code>"./run fault set SERVICE KIND"</code>"."</p> }.into_any()
                    } else {
                        view! {
                            <table class="results faults" data-testid="faults">
                                <thead><tr><th>"Service"</th><th>"Fault"</th><th>"Source"</th><th>"Since"</th><th>"Ends"</th></tr></thead>
                                <tbody>{f.faults.into_iter().map(|x| view! {
                                    <tr data-fault=format!("{}:{}", x.service, x.kind)>
                                        <td>{x.service.clone()}</td>
                                        <td><span class="fault-badge">{x.label()}</span></td>
                                        <td>{x.source.clone()}</td>
                                        <td>{age(rfc3339_ms(&x.set_at), now)}</td>
                                        <td>{x.expires_at.as_deref().map_or_else(|| "when switched off".to_owned(), |t| age(rfc3339_ms(t), now))}</td>
                                    </tr>
                                }).collect_view()}</tbody>
                            </table>
                        }.into_any()
                    };
                    view! { <h2>"Faults"</h2> {chaos} {list} }
                })}
            </Transition>
            <Transition fallback=|| ()>
                {move || instances.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">"The instances could not be listed: " {e}</p> }.into_any(),
                    Ok(i) if i.instances.is_empty() => view! { <p class="notice">"No instance is registered."</p> }.into_any(),
                    Ok(i) => {
                        let mut by_service: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
                        for inst in i.instances {
                            by_service.entry(inst.service.clone()).or_default().push(inst);
                        }
                        by_service.into_iter().map(|(svc, list)| {
                            let up = list.iter().filter(|i| i.status == "UP").count();
                            let href = format!("/services/{}", enc(&svc));
                            view! {
                                <h2><A href=href>{svc.clone()}</A>" "<span class="muted">{format!("{up}/{} up", list.len())}</span></h2>
                                <InstanceTable instances=list/>
                            }
                        }).collect_view().into_any()
                    }
                })}
            </Transition>
            <h2>"Recent events"</h2>
            <Transition fallback=|| ()>
                {move || events.get().map(|r| match r {
                    Err(e) => view! { <p class="notice error">"The events could not be read: " {e}</p> }.into_any(),
                    Ok(e) => view! {
                        <table class="results events" data-testid="events">
                            <tbody>{e.events.into_iter().map(|e| { let class = format!("event {}", e.kind.to_lowercase()); view! {
                                <tr class=class>
                                    <td>{e.at}</td><td>{e.kind}</td><td>{e.service}</td><td>{e.instance_id}</td><td>{e.detail}</td>
                                </tr>
                            }}).collect_view()}</tbody>
                        </table>
                    }.into_any(),
                })}
            </Transition>
        </section>
    }
}
