//! The async drivers around the sans-IO codec: reading headers and replies
//! on a stream, and the QUIC stream as a [`Duplex`]. Streams and splicing
//! live in the data-plane core (`trellis_proxy::io`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

pub use trellis_proxy::io::{BoxStream, Duplex, H2Stream, Rewind, splice, write_all_flush};

use crate::tunnel::{Decoded, Header, ProtocolError, Reply};

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn header_reader_leaves_the_payload_alone() {
        let h = Header {
            service: "catalog".into(),
            namespace: "shop".into(),
            port: 80,
            source_zone: "east".into(),
            traceparent: None,
            subset: None,
            zone: None,
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
}
