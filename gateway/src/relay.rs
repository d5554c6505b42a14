//! The async drivers around the sans-IO codec: reading and writing headers
//! and replies on a stream, and splicing two streams with half-close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::tunnel::{Decoded, Header, ProtocolError, Reply};

/// A bidirectional byte stream: a QUIC stream pair, an HTTP/2 CONNECT stream,
/// or a TCP connection.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A boxed [`Duplex`], so QUIC and the fallback share one code path.
pub type BoxStream = Box<dyn Duplex>;

/// Copy buffer per direction. 64 KiB keeps the syscalls per byte low for
/// bulk transfers; it is held for a stream's whole life, so the worst case is
/// 128 KiB per open stream (1.3 GB at the default `max_streams` of 10,000).
const SPLICE_BUF: usize = 64 * 1024;

/// Why reading a header or reply failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Io(#[from] io::Error),
    /// The bytes were not a valid header or reply.
    #[error("tunnel protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// Nothing complete arrived in time.
    #[error("no complete header within {0:?}")]
    Timeout(Duration),
}

/// Reads exactly one header; never reads past it.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Header, ReadError> {
    read_frame(r, timeout, Header::decode).await
}

/// Reads exactly one reply; never reads past it.
pub async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Reply, ReadError> {
    read_frame(r, timeout, Reply::decode).await
}

async fn read_frame<R, T>(
    r: &mut R,
    timeout: Duration,
    decode: fn(&[u8]) -> Result<Decoded<T>, ProtocolError>,
) -> Result<T, ReadError>
where
    R: AsyncRead + Unpin,
{
    let work = async {
        let mut buf = Vec::with_capacity(64);
        loop {
            match decode(&buf)? {
                Decoded::Complete { value, .. } => return Ok(value),
                // `needed` is exact for these formats, so reading just that
                // much never swallows payload bytes that follow.
                Decoded::Incomplete { needed } => {
                    let at = buf.len();
                    buf.resize(at + needed, 0);
                    r.read_exact(&mut buf[at..]).await?;
                }
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
}

/// Writes bytes and flushes them, so a peer waiting for them is not left waiting.
pub async fn write_all_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Copies both ways until both directions have ended. When one side ends
/// its writes, the other side's write half is shut down, so half-closed
/// connections get their full reply. Returns (a→b, b→a) byte counts.
pub async fn splice<A: Duplex + ?Sized, B: Duplex + ?Sized>(
    a: &mut A,
    b: &mut B,
) -> io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUF, SPLICE_BUF).await
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// Replays `prefix`, then reads from `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_reader_leaves_the_payload_alone() {
        let h = Header {
            service: "catalog".into(),
            namespace: "shop".into(),
            port: 80,
            source_zone: "east".into(),
            traceparent: None,
        };
        let mut bytes = h.encode().unwrap();
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        let got = read_header(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, h);
        assert_eq!(r, b"payload");
    }

    #[tokio::test]
    async fn a_peer_that_sends_half_a_header_times_out() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 0, 10, 3]).await.unwrap();
        let err = read_header(&mut b, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_through() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello".to_vec(), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
