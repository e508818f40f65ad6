//! The app: the HTML shell, the top navigation and the routes. Every page's state is in its URL
//! (path and query string), so a link reproduces it and the back button works.

use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::components::{A, Route, Router, Routes};
use leptos_router::path;

use crate::api::{self, Storage};
use crate::format;
use crate::pages;
use crate::pages::map::refresh_tick;

/// Two rails meeting at a switch, as a data URI.
const FAVICON: &str = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'%3E%3Crect width='32' height='32' rx='6' fill='%231d2433'/%3E%3Cpath d='M6 26 L16 6 M26 26 L16 6 M11 16 H21' stroke='%2367c18b' stroke-width='3' fill='none' stroke-linecap='round'/%3E%3C/svg%3E";

/// The HTML document around the app (server side).
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                // Inline, so the browser asks for no /favicon.ico (which would log a 404).
                <link rel="icon" type="image/svg+xml" href=FAVICON/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="switchyard" href="/pkg/ui.css"/>
        <Title text="Switchyard"/>
        <Router>
            <header class="top">
                <A href="/" attr:class="brand">"Switchyard"</A>
                <nav>
                    <A href="/" exact=true>"Service map"</A>
                    <A href="/traces">"Traces"</A>
                    <A href="/explore">"Metrics"</A>
                    <A href="/registry">"Registry"</A>
                </nav>
            </header>
            <StorageNotice/>
            <main>
                <Routes fallback=|| view! { <p class="notice">"There is no such page."</p> }>
                    <Route path=path!("/") view=pages::map::MapPage/>
                    <Route path=path!("/services/:name") view=pages::service::ServicePage/>
                    <Route path=path!("/registry") view=pages::registry::RegistryPage/>
                    <Route path=path!("/traces") view=pages::traces::TracesPage/>
                    <Route path=path!("/explore") view=pages::metrics::MetricsPage/>
                    <Route path=path!("/traces/:id") view=pages::trace::TracePage/>
                </Routes>
            </main>
        </Router>
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

/// On every page, once retention by size has removed data: how much, since when, and from when
/// on the data is whole — never a silent loss.
#[component]
fn StorageNotice() -> impl IntoView {
    let tick = refresh_tick(30);
    let base = api::base();
    let storage = Resource::new(move || tick.get(), move |_| api::get::<Storage>(&base, "/api/v1/storage"));
    let notice = move || {
        let s = storage.get()?.ok()?;
        let e = s.evicted;
        if e.traces + e.metric_points + e.log_records == 0 {
            return None;
        }
        let time = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<i64>().ok()).map(|t| format::time(t, false)).unwrap_or_default();
        let limit = s.max_database_bytes.map(|m| format!(" to keep the database under {}", mib(m))).unwrap_or_default();
        Some(view! {
            <p class="banner storage" data-testid="storage-notice">
                "Size limit: " {e.traces.to_string()} " traces (" {e.spans.to_string()} " spans), "
                {e.metric_points.to_string()} " metric points and " {e.log_records.to_string()} " log records removed since "
                {time(&e.first_unix_nano)} {limit} "; data that arrived before " {time(&e.before_unix_nano)} " may be incomplete."
            </p>
        })
    };
    view! { <Transition fallback=|| ()>{notice}</Transition> }
}
