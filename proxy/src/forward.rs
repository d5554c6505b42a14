//! The HTTP rules of a proxy: which headers belong to one hop, the bodies a
//! proxy passes on (with limits and accounting), and the responses it makes
//! itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::hbone::ERROR_HEADER;

/// Errors a forwarded body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every forwarded request and response takes.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Any body of bytes, boxed.
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// A body received by hyper, passed on.
pub fn incoming(b: Incoming) -> Body {
    b.map_err(BoxError::from).boxed()
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// and never cross a proxy. `te: trailers` is the one value that may (gRPC
/// over HTTP/2 needs it), so it is put back where it was.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    let trailers = h
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A response the proxy makes itself: `status`, the reason in
/// [`ERROR_HEADER`] and as a plain-text body.
pub fn refusal(status: StatusCode, reason: &str) -> Response<Body> {
    // A header value is visible ASCII; a reason with anything else is cut.
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect();
    let mut r = Response::new(full(format!("{clean}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&clean) {
        h.insert(ERROR_HEADER, v);
    }
    r
}

/// The answer a proxy makes itself to a gRPC call: HTTP 200 with only
/// trailers in the headers (`grpc-status`, `grpc-message`), as gRPC
/// clients read a status; `trellis-error` says which proxy answered.
pub fn grpc_refusal(code: u8, message: &str) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    // grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    let encoded: String = message
        .bytes()
        .map(|b| match b {
            b' '..=b'~' if b != b'%' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v.clone());
        h.insert(ERROR_HEADER, v);
    }
    r
}

/// What a body carried, reported once when it ends (or is dropped early).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Data bytes passed.
    pub bytes: u64,
    /// `grpc-status`, from trailers (or headers, for a trailers-only reply).
    pub grpc_status: Option<String>,
    /// The body reached its end without an error.
    pub complete: bool,
}

type Done = Box<dyn FnOnce(Tally) + Send + Sync>;

/// A body that counts what passes and reports it when it ends.
pub struct Observed<B> {
    inner: B,
    tally: Tally,
    done: Option<Done>,
}

impl<B> Observed<B> {
    /// Wraps `inner`; `done` runs once, at the end or on drop.
    pub fn new(inner: B, done: impl FnOnce(Tally) + Send + Sync + 'static) -> Self {
        Self {
            inner,
            tally: Tally::default(),
            done: Some(Box::new(done)),
        }
    }

    /// Starts with a `grpc-status` already seen (in the response headers).
    pub fn with_grpc_status(mut self, status: Option<String>) -> Self {
        self.tally.grpc_status = status;
        self
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            self.tally.complete = complete;
            done(std::mem::take(&mut self.tally));
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.tally.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(s) = grpc_status(t)
                {
                    this.tally.grpc_status = Some(s);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A gRPC request or response, by its content type.
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-status` in `h`, if any: one of gRPC's codes (0-16), or
/// `unknown` for anything else, so what an app sends cannot grow the
/// metrics' label sets without bound.
pub fn grpc_status(h: &HeaderMap) -> Option<String> {
    let v = h.get("grpc-status")?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse::<u8>().ok())
            .filter(|c| *c <= 16)
            .map_or_else(|| "unknown".to_owned(), |c| c.to_string()),
    )
}

/// Limits on what a client may send through the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line and headers, in bytes (HTTP/1 buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Request body, in bytes; `None`: no limit (bodies stream through, so
    /// an unlimited body still costs bounded memory).
    pub max_body_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_body_bytes: None,
        }
    }
}

/// Applies the body limit to a request body: refused up front when its
/// declared length is over (`Err` with the 413 to send), cut with an error
/// when it streams past the limit.
pub fn limit_body(
    h: &HeaderMap,
    body: Incoming,
    limits: &Limits,
) -> Result<Body, Box<Response<Body>>> {
    let Some(max) = limits.max_body_bytes else {
        return Ok(incoming(body));
    };
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(Box::new(refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over the {max}-byte limit"),
        )));
    }
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    Ok(http_body_util::Limited::new(body, max)
        .map_err(BoxError::from)
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-app"]);
    }

    #[test]
    fn grpc_status_is_one_of_the_codes_or_unknown() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        for (sent, seen) in [
            ("0", "0"),
            ("16", "16"),
            ("17", "unknown"),
            ("x", "unknown"),
        ] {
            h.insert("grpc-status", HeaderValue::from_static(sent));
            assert_eq!(grpc_status(&h).as_deref(), Some(seen));
        }
    }

    #[test]
    fn a_refusal_carries_its_reason_in_a_header_that_is_valid() {
        let r = refusal(StatusCode::SERVICE_UNAVAILABLE, "no route\nto é");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "no route?to ?");
    }

    #[tokio::test]
    async fn observed_counts_bytes_and_reads_grpc_status_from_trailers() {
        use std::sync::{Arc, Mutex};
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let obs = Observed::new(body, move |t| *s.lock().unwrap() = Some(t));
        let collected = obs.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "5");
        let t = seen.lock().unwrap().clone().unwrap();
        assert_eq!(
            (t.bytes, t.grpc_status.as_deref(), t.complete),
            (5, Some("5"), true)
        );
    }
}
