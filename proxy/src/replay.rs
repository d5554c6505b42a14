//! A request body that can be sent again: for retries and mirrors.
//!
//! The body streams to the first attempt as it arrives (a client that waits
//! for the answer before it sends more is never stalled) while a copy is
//! kept, up to a limit. A retry gets a [`Replay::try_clone`] that first
//! replays the copy, then reads on from the client where the copy ends.
//!
//! Every clone reads the one shared sequence of frames: whichever is at the
//! front pulls the next frame from the client and records it, and the rest
//! find it in the copy. Past the limit nothing more is recorded: the clone
//! at the front goes on alone, and no new clone can be made.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::forward::{Body, BoxError};

/// A body whose frames are kept for another attempt.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    /// The next frame of the copy this clone reads.
    at: usize,
    /// This clone pulled past the limit: it alone reads on.
    alone: bool,
    /// The trailers (or the end) were given to this clone.
    done: bool,
}

struct Shared {
    source: Option<Body>,
    frames: Vec<Bytes>,
    recorded: usize,
    limit: usize,
    /// Frames past the limit were read and not kept.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl Replay {
    /// Wraps `body`, keeping up to `limit` bytes for clones.
    pub fn new(body: Body, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(body),
                frames: Vec::new(),
                recorded: 0,
                limit,
                overflowed: false,
                trailers: None,
                ended: false,
            })),
            at: 0,
            alone: false,
            done: false,
        }
    }

    /// A body that sends the same bytes from the start, unless more than
    /// the limit has already been read (then `None`: no retry can be made).
    pub fn try_clone(&self) -> Option<Self> {
        let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.overflowed {
            return None;
        }
        Some(Self {
            shared: self.shared.clone(),
            at: 0,
            alone: false,
            done: false,
        })
    }

    /// The body, boxed.
    pub fn boxed(self) -> Body {
        use http_body_util::BodyExt;
        BodyExt::boxed(self)
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut s = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.overflowed && !this.alone {
            this.done = true;
            return Poll::Ready(Some(Err(
                "the request body outgrew the retry buffer and went to another attempt".into(),
            )));
        }
        if let Some(b) = s.frames.get(this.at) {
            this.at += 1;
            return Poll::Ready(Some(Ok(Frame::data(b.clone()))));
        }
        if s.ended {
            this.done = true;
            return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.source = None;
                s.ended = true;
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !s.overflowed && s.recorded + data.len() <= s.limit {
                        s.recorded += data.len();
                        s.frames.push(data.clone());
                        this.at += 1;
                    } else {
                        // Past the limit: the copy is useless now; free it.
                        s.overflowed = true;
                        s.frames = Vec::new();
                        this.alone = true;
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    s.trailers.clone_from(&trailers);
                    s.ended = true;
                    s.source = None;
                    this.done = true;
                    Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.ended && s.trailers.is_none() && self.at >= s.frames.len()
            || s.source
                .as_ref()
                .is_some_and(|b| b.is_end_stream() && self.at >= s.frames.len() && !s.overflowed)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let kept: u64 = s.frames[self.at.min(s.frames.len())..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        match &s.source {
            Some(b) => {
                let h = b.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + kept);
                if let Some(u) = h.upper() {
                    out.set_upper(u + kept);
                }
                out
            }
            None => SizeHint::with_exact(kept),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use crate::forward;

    fn chunks(parts: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        forward::boxed(StreamBody::new(tokio_stream::iter(frames)))
    }

    async fn read(b: Replay) -> (String, Option<HeaderMap>) {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (String::from_utf8(c.to_bytes().to_vec()).unwrap(), t)
    }

    #[tokio::test]
    async fn a_clone_replays_what_was_read_and_reads_on() {
        let mut first = Replay::new(chunks(&["ab", "cd", "ef"], true), 1024);
        // The first attempt reads one frame and fails.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = first.try_clone().unwrap();
        let (body, trailers) = read(second).await;
        assert_eq!(body, "abcdef");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        // A third, after the whole body was read, gets it all from the copy.
        let (body, trailers) = read(first.try_clone().unwrap()).await;
        assert_eq!(body, "abcdef");
        assert!(trailers.is_some());
        // The first one, still alive, sees the same sequence.
        let (rest, _) = read(first).await;
        assert_eq!(rest, "cdef");
    }

    #[tokio::test]
    async fn past_the_limit_the_front_reads_alone_and_no_clone_is_made() {
        let first = Replay::new(chunks(&["abc", "def", "ghi"], false), 4);
        let early = first.try_clone().unwrap();
        let (body, _) = read(first).await;
        assert_eq!(body, "abcdefghi");
        // The earlier clone lost its copy: it fails rather than send a hole.
        let err = early.collect().await.err().unwrap();
        assert!(err.to_string().contains("retry buffer"), "{err}");
    }

    #[tokio::test]
    async fn an_empty_body_is_empty_for_every_clone() {
        let first = Replay::new(forward::empty(), 1024);
        assert!(first.is_end_stream());
        let c = first.try_clone().unwrap();
        assert_eq!(read(first).await.0, "");
        assert_eq!(read(c).await.0, "");
    }
}
