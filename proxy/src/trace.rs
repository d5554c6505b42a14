//! W3C trace context through the mesh, and one span per hop.
//!
//! A proxy continues the `traceparent`/`tracestate` that arrives with a
//! request (or starts a trace when there is none), makes its own span, and
//! passes the context on with its span as the parent: the caller's sidecar
//! a `client` span, the callee's sidecar a `server` span, each gateway a span
//! for the tunnel it opens. Spans go to whatever tracer provider the binary
//! installed (the OpenTelemetry SDK with its OTLP exporter, configured by the
//! standard `OTEL_*` environment); until one is, [`enabled`] is false and a
//! proxy leaves trace headers exactly as the app sent them.

use std::sync::OnceLock;
use std::time::SystemTime;

use http::HeaderMap;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use trellis_federation::spans::HeaderExtractor;

pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;

static TRACER: OnceLock<BoxedTracer> = OnceLock::new();

/// Makes spans from now on with the global tracer provider, which the
/// caller has just installed. Once per process; later calls change nothing.
pub fn enable() {
    let _ = TRACER.set(opentelemetry::global::tracer("trellis"));
}

/// Whether spans are made at all (a tracer provider is installed).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A lone `traceparent` value, as the tunnel header and the gateway
/// preamble carry it.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The trace context a request arrived with (an empty context when it has
/// none, or an invalid one).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The context of a `traceparent` value; an invalid value is no context.
pub fn from_traceparent(value: &str) -> Context {
    TraceContextPropagator::new().extract(&One(value))
}

/// One proxy's span for one request, connection or tunnel: started when
/// the work arrives, ended (with its outcome) when the work is done. The
/// SDK ends a span dropped unended, so an early return loses no span.
pub struct Hop {
    cx: Context,
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop")
            .field("span", &self.context())
            .finish()
    }
}

impl Hop {
    /// A span named `name` of `kind`, child of `parent`'s span (a new trace
    /// when `parent` has none), sampled as the provider's sampler says
    /// (by default following the parent's `sampled` flag), with
    /// `attributes` when it is sampled. `None` when tracing is not enabled.
    pub fn start(
        kind: SpanKind,
        name: impl Into<std::borrow::Cow<'static, str>>,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Self> {
        let tracer = TRACER.get()?;
        let span: BoxedSpan =
            tracer.build_with_context(SpanBuilder::from_name(name).with_kind(kind), parent);
        let hop = Self {
            cx: parent.with_span(span),
        };
        // Most spans are not sampled: their attributes are never made.
        if hop.recording() {
            hop.set(attributes());
        }
        Some(hop)
    }

    /// The span's identity, to pass on.
    pub fn context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// Whether the span is recorded (sampled); attributes of an unsampled
    /// span are not worth computing.
    pub fn recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// The trace ID in hex, for logs.
    pub fn trace_id(&self) -> Option<String> {
        let c = self.context();
        c.is_valid().then(|| c.trace_id().to_string())
    }

    /// Writes `traceparent` (and `tracestate`) naming this span as the
    /// parent into `headers`, replacing what was there.
    pub fn inject(&self, headers: &mut HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeadersMut(headers));
    }

    /// The `traceparent` naming this span as the parent, for a sampled span
    /// (an unsampled trace makes no span further on).
    pub fn traceparent(&self) -> Option<String> {
        if !self.context().is_sampled() {
            return None;
        }
        let mut h = HeaderMap::new();
        self.inject(&mut h);
        h.get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Adds attributes.
    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes);
    }

    /// Ends the span as failed, saying why.
    pub fn fail(self, why: impl Into<std::borrow::Cow<'static, str>>) {
        self.cx.span().set_status(Status::error(why));
        self.end();
    }

    /// Ends the span now.
    pub fn end(self) {
        self.cx.span().end_with_timestamp(SystemTime::now());
    }
}

/// The gRPC service and method a request's path names, for gRPC.
fn rpc(parts: &http::request::Parts, grpc: bool) -> Option<(&str, &str)> {
    grpc.then(|| parts.uri.path().trim_start_matches('/').split_once('/'))
        .flatten()
}

/// The span name OpenTelemetry's conventions give a request:
/// `{rpc.service}/{rpc.method}` for gRPC, `{method}` otherwise.
pub fn request_name(parts: &http::request::Parts, grpc: bool) -> String {
    match rpc(parts, grpc) {
        Some((service, method)) => format!("{service}/{method}"),
        None => parts.method.as_str().to_owned(),
    }
}

/// The attributes OpenTelemetry's conventions give a request: `http.*`,
/// and `rpc.*` for gRPC.
pub fn request_attributes(
    parts: &http::request::Parts,
    grpc: bool,
    authority: &str,
) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("http.request.method", parts.method.as_str().to_owned()),
        KeyValue::new("url.path", parts.uri.path().to_owned()),
        KeyValue::new("server.address", authority.to_owned()),
        KeyValue::new(
            "network.protocol.version",
            match parts.version {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
    ];
    if let Some((service, method)) = rpc(parts, grpc) {
        attrs.push(KeyValue::new("rpc.system", "grpc"));
        attrs.push(KeyValue::new("rpc.service", service.to_owned()));
        attrs.push(KeyValue::new("rpc.method", method.to_owned()));
    }
    attrs
}

/// Whether a response is an error for a span of `kind`, by OpenTelemetry's
/// conventions: at a server, what golden signals count as an error (a 5xx,
/// no response, a gRPC server failure); at a client, a 4xx or any non-OK
/// gRPC status too.
pub fn is_error(kind: &SpanKind, code: u16, grpc_status: Option<&str>) -> bool {
    if matches!(kind, SpanKind::Server) {
        return trellis_federation::telemetry::is_error(code, grpc_status);
    }
    code == 0
        || code >= 400
        || grpc_status
            .and_then(|g| g.trim().parse::<u16>().ok())
            .is_some_and(|g| g != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_garbage_is_no_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(tp);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            !from_traceparent("00-zz-00f067aa0ba902b7-01")
                .span()
                .span_context()
                .is_valid()
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        assert_eq!(extract(&h).span().span_context(), &sc);
    }

    #[test]
    fn errors_follow_the_conventions() {
        assert!(is_error(&SpanKind::Client, 404, None));
        assert!(!is_error(&SpanKind::Server, 404, None));
        assert!(is_error(&SpanKind::Server, 503, None));
        assert!(is_error(&SpanKind::Server, 0, None));
        assert!(!is_error(&SpanKind::Server, 200, Some("5")));
        assert!(is_error(&SpanKind::Client, 200, Some("5")));
        assert!(is_error(&SpanKind::Server, 200, Some("14")));
    }
}
