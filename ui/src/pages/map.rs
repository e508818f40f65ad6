//! The service map: services (and the databases and brokers they call) as nodes, calls as edges
//! with request rate, error rate and p50/p99 latency over the chosen window, health colours,
//! instance counts from the registry, a layered layout from the entry points outward, and a live
//! refresh every five seconds. A node opens its service.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos_router::components::A;
use leptos_router::hooks::use_query_map;

use crate::api::{self, Faults, Instances, MapNode, ServiceMap, enc};
use crate::format;
use crate::map_layout::layered;

const WINDOWS: &[&str] = &["5m", "15m", "1h", "6h", "24h"];
const NODE_W: f64 = 200.0;
const NODE_H: f64 = 64.0;
const COL: f64 = 340.0;
const ROW: f64 = 120.0;

/// A tick that advances every `secs` in the browser (never on the server).
pub fn refresh_tick(secs: u64) -> RwSignal<u64> {
    let tick = RwSignal::new(0u64);
    Effect::new(move |_| {
        #[cfg(feature = "hydrate")]
        {
            let handle = set_interval_with_handle(move || tick.update(|t| *t += 1), std::time::Duration::from_secs(secs));
            on_cleanup(move || {
                if let Ok(h) = handle {
                    h.clear();
                }
            });
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = secs;
    });
    tick
}

fn health(n: &MapNode) -> &'static str {
    if n.requests == 0 {
        "idle"
    } else if n.error_rate >= 0.05 {
        "bad"
    } else if n.error_rate >= 0.01 {
        "warn"
    } else {
        "ok"
    }
}

#[component]
pub fn MapPage() -> impl IntoView {
    let query = use_query_map();
    let window = Memo::new(move |_| query.read().get("window").filter(|w| WINDOWS.contains(&w.as_str())).unwrap_or_else(|| "15m".into()));
    let tick = refresh_tick(5);
    let base = api::base();
    let map = {
        let base = base.clone();
        Resource::new(move || (window.get(), tick.get()), move |(w, _)| api::get::<ServiceMap>(&base, &format!("/api/v1/service-map?lookback={}", enc(&w))))
    };
    let instances = {
        let base = base.clone();
        Resource::new(move || tick.get(), move |_| api::get::<Instances>(&base, "/api/v1/registry/instances"))
    };
    let faults = Resource::new(move || tick.get(), move |_| api::get::<Faults>(&base, "/api/v1/registry/faults"));

    let windows = move || {
        let current = window.get();
        WINDOWS
            .iter()
            .map(|w| {
                let href = format!("/?window={w}");
                view! { <A href=href attr:class=if *w == current { "win current" } else { "win" }>{*w}</A> }
            })
            .collect_view()
    };
    view! {
        <section class="map-page">
            <h1>"Service map"</h1>
            <p class="controls">"Window: " {windows} <span class="muted">" · refreshes every 5 s"</span></p>
            <Transition fallback=|| view! { <p class="notice">"Loading the map…"</p> }>
                {move || {
                    let counts: Option<BTreeMap<String, (usize, usize)>> = instances.get().and_then(|r| r.ok()).map(|i| {
                        let mut c: BTreeMap<String, (usize, usize)> = BTreeMap::new();
                        for inst in i.instances {
                            let e = c.entry(inst.service).or_default();
                            e.1 += 1;
                            if inst.status == "UP" {
                                e.0 += 1;
                            }
                        }
                        c
                    });
                    // Service → its active faults' labels.
                    let faulted: BTreeMap<String, Vec<String>> = faults.get().and_then(|r| r.ok()).map(|f| {
                        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
                        for x in f.faults {
                            m.entry(x.service.clone()).or_default().push(x.label());
                        }
                        m
                    }).unwrap_or_default();
                    let registry_note = instances.get().and_then(|r| r.err()).map(|e| view! {
                        <p class="notice" data-testid="registry-unreachable">"Instance counts are missing: " {e}</p>
                    });
                    map.get().map(|r| match r {
                        Err(e) => view! { <p class="notice error">"The map could not be loaded: " {e}</p> }.into_any(),
                        Ok(m) if m.nodes.is_empty() => view! {
                            <p class="notice">"No calls in this window yet. Point your services' OTLP exporters at this collector, or widen the window."</p>
                        }.into_any(),
                        Ok(m) => view! { {registry_note} <MapSvg map=m counts=counts faulted=faulted/> }.into_any(),
                    })
                }}
            </Transition>
        </section>
    }
}

#[component]
fn MapSvg(map: ServiceMap, counts: Option<BTreeMap<String, (usize, usize)>>, faulted: BTreeMap<String, Vec<String>>) -> impl IntoView {
    let ids: Vec<String> = map.nodes.iter().map(|n| n.id.clone()).collect();
    let pairs: Vec<(String, String)> = map.edges.iter().map(|e| (e.source.clone(), e.target.clone())).collect();
    let places = layered(&ids, &pairs);
    let pos = |id: &str| {
        let (l, r) = places.get(id).copied().unwrap_or((0, 0));
        (40.0 + l as f64 * COL, 30.0 + r as f64 * ROW)
    };
    let width = places.values().map(|p| p.0).max().unwrap_or(0) as f64 * COL + NODE_W + 80.0;
    let height = places.values().map(|p| p.1).max().unwrap_or(0) as f64 * ROW + NODE_H + 60.0;

    let edges = map
        .edges
        .iter()
        .map(|e| {
            let (x1, y1) = pos(&e.source);
            let (x2, y2) = pos(&e.target);
            let (sx, sy, tx, ty) = (x1 + NODE_W, y1 + NODE_H / 2.0, x2, y2 + NODE_H / 2.0);
            let back = tx <= sx;
            let d = if back {
                format!("M{sx},{sy} C{},{} {},{} {tx},{ty}", sx + 60.0, sy - 80.0, tx - 60.0, ty - 80.0)
            } else {
                let mx = (sx + tx) / 2.0;
                format!("M{sx},{sy} C{mx},{sy} {mx},{ty} {tx},{ty}")
            };
            let rate = format!("{:.2}/s · {:.1}% err", e.rate_per_second, e.error_rate * 100.0);
            let latency = format!("p50 {} · p99 {}", format::duration(e.p50_nanos), format::duration(e.p99_nanos));
            let (lx, ly) = ((sx + tx) / 2.0, (sy + ty) / 2.0 - if back { 60.0 } else { 18.0 });
            let class = if e.error_rate >= 0.05 {
                "edge bad"
            } else if e.error_rate >= 0.01 {
                "edge warn"
            } else {
                "edge"
            };
            view! {
                <g class=class data-edge=format!("{}->{}", e.source, e.target)>
                    <path d=d marker-end="url(#arrow)"/>
                    <text x=format!("{lx:.1}") y=format!("{ly:.1}") text-anchor="middle">
                        <tspan x=format!("{lx:.1}") dy="0">{rate}</tspan>
                        <tspan x=format!("{lx:.1}") dy="12">{latency}</tspan>
                    </text>
                </g>
            }
        })
        .collect_view();

    let nodes = map
        .nodes
        .iter()
        .map(|n| {
            let (x, y) = pos(&n.id);
            let count = counts.as_ref().and_then(|c| c.get(&n.id)).copied();
            let down = count.is_some_and(|(up, total)| total > 0 && up == 0);
            let faults = faulted.get(&n.id).filter(|_| n.kind == "service");
            let class = format!("node {} {}{}{}", n.kind, health(n), if down { " down" } else { "" }, if faults.is_some() { " faulted" } else { "" });
            let instances = count.map(|(up, total)| format!("{up}/{total} instances up"));
            let fault_badge = faults.map(|f| {
                let label = format!("⚡ {}", f.join(", "));
                view! {
                    <g class="fault-badge" data-fault=f.join(",")>
                        <rect x=format!("{}", x + 8.0) y=format!("{}", y - 11.0) width=format!("{}", NODE_W - 16.0) height="18" rx="9"/>
                        <text x=format!("{}", x + 16.0) y=format!("{}", y + 2.0)>{label}<title>"Fault switched on: "{f.join(", ")}</title></text>
                    </g>
                }
            });
            let stats = if n.requests == 0 {
                "no requests".to_owned()
            } else {
                format!("{:.2}/s · {:.1}% err · p99 {}", n.rate_per_second, n.error_rate * 100.0, format::duration(n.p99_nanos))
            };
            let body = view! {
                <rect x=format!("{x}") y=format!("{y}") width=NODE_W height=NODE_H rx="8"/>
                <text x=format!("{}", x + 10.0) y=format!("{}", y + 20.0) class="name">{n.id.clone()}</text>
                <text x=format!("{}", x + 10.0) y=format!("{}", y + 38.0) class="stats">{stats}</text>
                <text x=format!("{}", x + 10.0) y=format!("{}", y + 55.0) class="instances">{instances.unwrap_or_else(|| n.kind.clone())}</text>
                {fault_badge}
            };
            if n.kind == "service" {
                view! { <a href=format!("/services/{}", enc(&n.id)) class=class data-node=n.id.clone()>{body}</a> }.into_any()
            } else {
                view! { <g class=class data-node=n.id.clone()>{body}</g> }.into_any()
            }
        })
        .collect_view();

    view! {
        <svg class="map" data-testid="map" viewBox=format!("0 0 {width} {height}") width=format!("{width}") height=format!("{height}")>
            <defs>
                <marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
                    <path d="M 0 0 L 10 5 L 0 10 z"/>
                </marker>
            </defs>
            {edges}
            {nodes}
        </svg>
        <p class="legend muted">"Green: under 1% errors · amber: under 5% · red: 5% or more · grey: no requests · dashed: no instance up · ⚡ a fault is switched on"</p>
    }
}
