//! A span per API call a server answers, in the trace the caller sent
//! (W3C `traceparent` in the gRPC metadata), named `Service/Method` with
//! OpenTelemetry's RPC attributes. The spans go to the global tracer
//! provider, which the binary installs when the `OTEL_*` environment asks
//! for export; until then they cost a no-op.
//!
//! A span covers the call until its response headers: a watch stream's
//! span is its opening, not its hours of life.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, Status, Tracer as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Reads the trace context from HTTP headers (or gRPC metadata, which is
/// carried in them).
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The tower layer that wraps the API's routes.
pub(crate) fn layer<S>(inner: S) -> Spans<S> {
    Spans(inner)
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Spans<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Spans<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let span = global::tracer("trellis").build_with_context(
            SpanBuilder::from_name(format!("{service}/{method}"))
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", service.to_owned()),
                    KeyValue::new("rpc.method", method.to_owned()),
                ]),
            &parent,
        );
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut span = span;
            let out = fut.await;
            match &out {
                // A call that fails at once answers with its status in the
                // headers (trailers-only); a streamed answer's status comes
                // later and is OK as far as this span goes.
                Ok(resp) => {
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u16>().ok())
                        .unwrap_or(0);
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                    if crate::telemetry::grpc_server_failure(code) {
                        span.set_status(Status::error(format!("grpc-status {code}")));
                    }
                }
                Err(_) => span.set_status(Status::error("the call failed")),
            }
            span.end();
            out
        })
    }
}
