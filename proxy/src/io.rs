//! Byte streams and splicing: what both proxies move bytes with.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

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

/// [`splice`], and if one side fails, both are aborted, so that neither
/// end mistakes a truncated transfer for a complete one.
pub async fn splice_or_abort<A: Duplex + ?Sized, B: Duplex + ?Sized>(
    a: &mut A,
    b: &mut B,
) -> io::Result<(u64, u64)> {
    let r = splice(a, b).await;
    if r.is_err() {
        a.abort();
        b.abort();
    }
    r
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
    use tokio::io::AsyncReadExt;

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
