//! A bound on the bytes of export requests held in memory at once, over both OTLP listeners.
//!
//! Every request takes a [`Ticket`] before its body is read. The ticket reserves the declared
//! `Content-Length` at once (so a request that cannot fit is refused before a byte of it is
//! read), counts the body's frames as they arrive (a body without a length, gRPC's included, is
//! refused mid-stream once the budget is spent), and can reserve more for what decompression
//! produces. It gives everything back when the request is answered, since the decoded request
//! and its rows live until the commit. Refusals are retryable: HTTP 503 with `Retry-After`, gRPC
//! `UNAVAILABLE`.
//!
//! The write queue bounds items waiting for the writer; this bounds bytes before and during
//! decoding, which the item count cannot see (one 15 MiB request may hold few items).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::status::IngestError;

/// The shared budget.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    gauge: prometheus::IntGauge,
}

impl Budget {
    pub fn new(limit: usize, gauge: prometheus::IntGauge) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit, gauge })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` bytes if they fit.
    fn try_take(&self, n: usize) -> bool {
        let taken = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|&total| total <= self.limit)).is_ok();
        if taken {
            self.gauge.add(n as i64);
        }
        taken
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.gauge.sub(n as i64);
    }

    /// A ticket for a new request that declares `declared` bytes; `None` if they do not fit (or
    /// nothing is left for a request of unknown length).
    pub fn admit(self: &Arc<Self>, declared: Option<usize>) -> Option<Arc<Ticket>> {
        let want = declared.unwrap_or(0);
        if (declared.is_none() && self.used.load(Ordering::Acquire) >= self.limit) || !self.try_take(want) {
            return None;
        }
        Some(Arc::new(Ticket { budget: self.clone(), held: AtomicUsize::new(want), seen: AtomicUsize::new(0) }))
    }
}

/// One request's share of the budget, given back when the last clone is dropped.
pub struct Ticket {
    budget: Arc<Budget>,
    /// Bytes taken from the budget.
    held: AtomicUsize,
    /// Body bytes received so far (counted against `held` first).
    seen: AtomicUsize,
}

impl Ticket {
    /// The whole budget's size.
    pub fn limit(&self) -> usize {
        self.budget.limit
    }

    /// Reserves `n` more bytes (what decompression produced, say).
    pub fn reserve(&self, n: usize) -> Result<(), IngestError> {
        if self.budget.try_take(n) {
            self.held.fetch_add(n, Ordering::AcqRel);
            Ok(())
        } else {
            Err(IngestError::Busy { limit: self.budget.limit })
        }
    }

    /// Counts `n` body bytes, taking more from the budget once the declared length is used up.
    fn received(&self, n: usize) -> Result<(), IngestError> {
        let seen = self.seen.fetch_add(n, Ordering::AcqRel) + n;
        let held = self.held.load(Ordering::Acquire);
        if seen > held { self.reserve(seen - held) } else { Ok(()) }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.budget.give_back(*self.held.get_mut());
    }
}

/// A request body that counts its frames against the request's ticket.
struct Counted {
    inner: Body,
    ticket: Arc<Ticket>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(tonic::Status::from_error(Box::new(e))))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref()
            && let Err(e) = self.ticket.received(data.len())
        {
            return Poll::Ready(Some(Err(e.into())));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body error is this module's refusal.
pub fn is_busy(e: &(dyn std::error::Error + 'static)) -> Option<IngestError> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(s) = e.downcast_ref::<tonic::Status>()
            && s.code() == tonic::Code::Unavailable
            && let Some(limit) = s.metadata().get(LIMIT_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
        {
            return Some(IngestError::Busy { limit });
        }
        next = e.source();
    }
    None
}

/// Marks a refusal's status so the HTTP side can tell it from other body errors.
pub const LIMIT_KEY: &str = "x-switchyard-inflight-limit";

/// How a refused request is answered on each listener.
#[derive(Clone, Copy)]
pub enum Protocol {
    Grpc,
    Http,
}

/// Middleware: gives each request a ticket (in its extensions) and counts its body, or refuses it.
pub async fn limit(State((budget, protocol)): State<(Arc<Budget>, Protocol)>, req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let Some(ticket) = budget.admit(declared) else {
        let e = IngestError::Busy { limit: budget.limit };
        return match protocol {
            Protocol::Grpc => tonic::Status::from(e).into_http::<Body>(),
            Protocol::Http => {
                let encoding = super::decode::Encoding::from_content_type(req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(""))
                    .unwrap_or(super::decode::Encoding::Json);
                super::http::error_response(&e, encoding).into_response()
            }
        };
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ticket.clone());
    let req = Request::from_parts(parts, Body::new(Counted { inner: body, ticket: ticket.clone() }));
    let resp = next.run(req).await;
    drop(ticket);
    resp
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn tickets_take_and_give_back_bytes() {
        let budget = Budget::new(100, prometheus::IntGauge::new("g", "g").expect("gauge"));
        let a = budget.admit(Some(60)).expect("fits");
        assert!(budget.admit(Some(50)).is_none(), "60 + 50 is over 100");
        let b = budget.admit(None).expect("something is left for an unknown length");
        a.received(60).expect("declared bytes are paid for");
        assert!(a.received(41).is_err(), "60 + 41 more is over 100");
        b.received(40).expect("fits");
        assert!(budget.admit(None).is_none(), "nothing left");
        drop((a, b));
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Acquire), 0, "all given back");
        assert_eq!(budget.gauge.get(), 0);
    }
}
