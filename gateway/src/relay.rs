//! The async drivers around the sans-IO codec: reading and writing headers
//! and replies on a stream, and splicing two streams with half-close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::tunnel::{Decoded, Header, ProtocolError, Reply};

/// A bidirectional byte stream: a QUIC stream pair, an HTTP/2 CONNECT stream,
/// or a TCP connection.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {
    /// Ends the stream abortively, so that the far end sees an error rather
    /// than a clean end of data: a truncated transfer must never look
    /// complete. Best effort; the stream is dropped right after.
    fn abort(&mut self);

    /// After our side finished writing: resolves once the peer has the data.
    /// `None` where the kernel takes care of it after close (TCP). QUIC
    /// needs it: a connection closed while stream data is unacknowledged
    /// loses that data, and a draining gateway closes its connections.
    fn delivered(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        None
    }
}

impl Duplex for TcpStream {
    fn abort(&mut self) {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = self.set_zero_linger();
    }
}

impl<S: Duplex + ?Sized> Duplex for Box<S> {
    fn abort(&mut self) {
        (**self).abort();
    }

    fn delivered(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        (**self).delivered()
    }
}

impl<S: Duplex> Duplex for Rewind<S> {
    fn abort(&mut self) {
        self.inner.abort();
    }
}

impl<S: Duplex> Duplex for tokio_rustls::server::TlsStream<S> {
    fn abort(&mut self) {
        self.get_mut().0.abort();
    }
}

impl<S: Duplex> Duplex for tokio_rustls::client::TlsStream<S> {
    fn abort(&mut self) {
        self.get_mut().0.abort();
    }
}

/// Both halves of one QUIC stream.
pub struct QuicStream {
    recv: quinn::RecvStream,
    send: quinn::SendStream,
}

impl QuicStream {
    /// Joins the halves `open_bi`/`accept_bi` return.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self { recv, send }
    }
}

impl Duplex for QuicStream {
    fn abort(&mut self) {
        // RESET_STREAM and STOP_SENDING: the peer's reads and writes fail.
        let _ = self.send.reset(ABORT_CODE);
        let _ = self.recv.stop(ABORT_CODE);
    }

    fn delivered(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        let stopped = self.send.stopped();
        Some(Box::pin(async move {
            let _ = stopped.await;
        }))
    }
}

/// Application error code on streams ended by [`Duplex::abort`].
const ABORT_CODE: quinn::VarInt = quinn::VarInt::from_u32(1);

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

/// An HTTP/2 CONNECT stream of the fallback.
pub type H2Stream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

impl Duplex for H2Stream {
    fn abort(&mut self) {
        // hyper offers no reset on an upgraded stream: dropping it ends the
        // stream cleanly. Known gap of the fallback transport.
    }
}

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
