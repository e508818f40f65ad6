//! A read-only proxy to the service registry, for the dashboard: `GET /api/v1/registry/{path}`
//! answers what `GET {--registry-url}/v1/{path}` (same query string) answers, status and body
//! unchanged. Long enough a timeout for the registry's blocking queries (`wait` up to 30 s).

use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, Response, Uri, header};
use axum::routing::get;

use super::ApiError;

/// Covers a blocking query's `wait` of up to 30 s.
const TIMEOUT: Duration = Duration::from_secs(35);
/// An unreachable host fails fast rather than after the whole timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PREFIX: &str = "/api/v1/registry/";
/// Registry answer headers passed on with the body.
const FORWARDED: [HeaderName; 2] = [header::CONTENT_TYPE, HeaderName::from_static("x-registry-index")];

#[derive(Clone)]
pub struct RegistryProxy {
    /// `--registry-url` without a trailing `/`.
    base: String,
    client: reqwest::Client,
}

impl RegistryProxy {
    pub fn new(registry_url: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(registry_url).with_context(|| format!("--registry-url {registry_url:?}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            anyhow::bail!("--registry-url {registry_url:?}: expected an http:// URL");
        }
        let client = reqwest::Client::builder().timeout(TIMEOUT).connect_timeout(CONNECT_TIMEOUT).no_proxy().build().context("building the registry client")?;
        Ok(Self { base: registry_url.trim_end_matches('/').to_owned(), client })
    }

    pub fn router(self) -> Router {
        Router::new().route("/api/v1/registry/{*path}", get(forward)).with_state(self)
    }
}

/// Whether a path segment, percent-encoded or not, is `.` or `..`.
fn is_dot_segment(segment: &str) -> bool {
    matches!(segment.to_ascii_lowercase().replace("%2e", ".").as_str(), "." | "..")
}

async fn forward(State(proxy): State<RegistryProxy>, uri: Uri) -> Result<Response<Body>, ApiError> {
    // The raw path, still percent-encoded, so it reaches the registry as the client wrote it.
    let path = uri.path().strip_prefix(PREFIX).unwrap_or_default();
    if path.split('/').any(is_dot_segment) {
        return Err(ApiError::bad("path", format!("dot segments are not allowed: {path:?}")));
    }
    let mut url = format!("{}/v1/{path}", proxy.base);
    if let Some(q) = uri.query() {
        url.push('?');
        url.push_str(q);
    }
    let unreachable = |e: reqwest::Error| {
        let reason = reason(&e);
        tracing::warn!(registry = %proxy.base, error = %reason, "the registry is unreachable");
        ApiError::RegistryUnreachable { url: proxy.base.clone(), reason }
    };
    let answer = proxy.client.get(&url).send().await.map_err(unreachable)?;
    let mut out = Response::builder().status(answer.status().as_u16());
    for name in FORWARDED {
        if let Some(v) = answer.headers().get(&name) {
            out = out.header(name, v.as_bytes());
        }
    }
    let body = answer.bytes().await.map_err(unreachable)?;
    out.body(Body::from(body)).map_err(|e| {
        tracing::error!(error = %e, "cannot build the registry's answer");
        ApiError::Internal
    })
}

/// Why a request to the registry failed, for the client: the innermost cause (e.g. `Connection
/// refused (os error 111)`), or which timeout ran out.
fn reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        let within = if e.is_connect() { CONNECT_TIMEOUT } else { TIMEOUT };
        return format!("no answer within {}s", within.as_secs());
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_any_spelling() {
        for s in ["..", ".", "%2e%2E", ".%2e", "%2E"] {
            assert!(is_dot_segment(s), "{s}");
        }
        for s in ["instances", "...", "a..b", "", "%2e%2e%2e"] {
            assert!(!is_dot_segment(s), "{s}");
        }
    }

    #[test]
    fn only_http_urls() {
        assert!(RegistryProxy::new("http://127.0.0.1:8500/").is_ok_and(|p| p.base == "http://127.0.0.1:8500"));
        assert!(RegistryProxy::new("127.0.0.1:8500").is_err());
        assert!(RegistryProxy::new("ftp://registry").is_err());
    }
}
