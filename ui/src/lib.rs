#![recursion_limit = "256"]
//! Switchyard's dashboard: a Leptos app, rendered on the server by the collector (`ssr`) and
//! hydrated in the browser (`hydrate`, compiled to wasm). Every page reads the collector's own
//! JSON API (`/api/v1/…`), so what the dashboard shows is exactly what the API answers.

pub mod api;
pub mod app;
pub mod format;
pub mod map_layout;
pub mod outline;
#[cfg(feature = "hydrate")]
pub mod outline_worker;
pub mod pages;
pub mod waterfall;

/// Entry point of the wasm module: hydrates the server-rendered page, then marks `<body>` with
/// `data-hydrated` (tests wait for it: clicks before hydration would be lost).
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
    if let Some(body) = web_sys::window().and_then(|w| w.document()).and_then(|d| d.body()) {
        let _ = body.set_attribute("data-hydrated", "true");
    }
}

/// Serving the app from axum (the collector mounts this router on `--http-addr`).
#[cfg(feature = "ssr")]
pub mod server {
    use std::path::Path;

    use axum::Router;
    use leptos::prelude::*;
    use leptos_axum::{LeptosRoutes, generate_route_list};

    use crate::api::ApiBase;
    use crate::app::{App, shell};

    /// The pages, rendered on the server, and the wasm, JS and CSS under `/pkg` from `site_root`
    /// (built by `ui/build.sh`). `api_base` is where server rendering reads the API: the
    /// collector's own address.
    pub fn router(site_root: &Path, api_base: String) -> Router {
        let options = LeptosOptions::builder().output_name("ui").site_root(site_root.to_string_lossy().to_string()).site_pkg_dir("pkg").build();
        let routes = generate_route_list(App);
        let pkg = tower_http::services::ServeDir::new(site_root.join("pkg")).precompressed_gzip();
        Router::new()
            .leptos_routes_with_context(&options, routes, move || provide_context(ApiBase(api_base.clone())), {
                let options = options.clone();
                move || shell(options.clone())
            })
            .nest_service("/pkg", pkg)
            .with_state(options)
    }
}
