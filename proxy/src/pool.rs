//! Long-lived, multiplexed connections from this sidecar to others.
//!
//! A connection is kept per [`Key`]: the route it takes (an endpoint's
//! inbound, a gateway, the edge link), the SNI (destination service, port
//! and zone), the local identity presented (with its certificate's
//! generation) and the peer identities admitted (with the trust bundle's
//! generation). A renewed certificate, a rotated bundle or a change in who
//! may answer therefore makes a new key, so the next stream gets a fresh
//! handshake, while streams already open on the old connection finish on it;
//! the old key's connections then close as soon as they are idle.
//!
//! A connection takes up to `max_streams` streams at once; past that a
//! second connection is opened for the same key. Connections idle longer
//! than `idle_timeout`, older than `max_age`, or closed by the peer leave
//! the pool at the next [`Pool::reap`]; dropping the last handle closes one
//! once its open streams end.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;

use crate::forward::Body;
use crate::hbone;
use crate::io::BoxStream;

/// A client TLS stream to another proxy.
pub type Tls = tokio_rustls::client::TlsStream<BoxStream>;

/// How the pool behaves.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Streams one connection carries at once before another is opened.
    pub max_streams: usize,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// A connection this old takes no new streams (its open ones finish).
    pub max_age: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_streams: hbone::DEFAULT_MAX_STREAMS as usize,
            idle_timeout: Duration::from_secs(60),
            max_age: Duration::from_secs(30 * 60),
        }
    }
}

/// What a pooled connection is for; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The route: the address the TCP connection goes to; `None` for a
    /// stream over the edge link.
    pub via: Option<std::net::SocketAddr>,
    /// The SNI of the TLS: destination port, service, namespace and zone.
    pub sni: String,
    /// The local identity presented, and its certificate's generation.
    pub source: (Arc<str>, u64),
    /// The admitted peer identities, and the trust bundle's generation.
    pub peers: (Arc<str>, u64),
}

struct Conn {
    send: SendRequest<Body>,
    /// The SPIFFE ID the peer presented.
    peer: String,
    active: AtomicUsize,
    created: Instant,
    /// Milliseconds after `created` when the last stream ended.
    idle_since_ms: AtomicU64,
}

impl Conn {
    fn usable(&self, s: &Settings) -> bool {
        !self.send.is_closed() && self.created.elapsed() < s.max_age
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.created.elapsed().saturating_sub(since))
    }
}

/// One stream's claim on a pooled connection: it counts towards the
/// connection's stream limit and keeps it open until dropped.
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        Self { conn }
    }

    /// The SPIFFE ID the peer presented.
    pub fn peer(&self) -> &str {
        &self.conn.peer
    }

    /// Sends one request (a `CONNECT` or a forwarded request) as a stream.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        let mut s = self.conn.send.clone();
        s.ready().await?;
        s.send_request(req).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let ms = self.conn.created.elapsed().as_millis() as u64;
        self.conn.idle_since_ms.store(ms, Ordering::Release);
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Pool::checkout`] gives.
pub enum Checkout {
    /// A stream's share of a pooled HTTP/2 connection.
    Pooled(Lease),
    /// The peer did not agree on [`hbone::ALPN`] (an older agent): this TLS
    /// connection is for one app connection, spliced as before.
    Single(Box<Tls>),
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// A newer key for the same route and name exists (a renewed
    /// certificate, a new bundle, other admitted peers): this slot's
    /// connections take no new streams and close as soon as they are idle.
    superseded: std::sync::atomic::AtomicBool,
    /// Held while dialing, so a burst of new app connections shares one
    /// handshake instead of racing a dozen.
    dialing: tokio::sync::Mutex<()>,
}

impl Slot {
    fn lease(&self, s: &Settings) -> Option<Lease> {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        // The least busy usable connection.
        conns
            .iter()
            .filter(|c| c.usable(s) && c.active.load(Ordering::Acquire) < s.max_streams)
            .min_by_key(|c| c.active.load(Ordering::Acquire))
            .map(|c| Lease::new(c.clone()))
    }
}

/// Connection counts, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pooled connections open.
    pub connections: usize,
    /// Streams open on them.
    pub streams: usize,
}

/// The pool; one per sidecar.
pub struct Pool {
    settings: Settings,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    handshakes: prometheus_client::metrics::counter::Counter,
}

impl Pool {
    /// An empty pool that counts its TLS handshakes in `handshakes`
    /// (each pooled connection, and each single connection to a peer
    /// without the pooled protocol).
    pub fn new(
        settings: Settings,
        handshakes: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            settings,
            slots: Mutex::new(HashMap::new()),
            handshakes,
        }
    }

    /// The pool's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn slot(&self, key: &Key) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slots.get(key)
            && !s.superseded.load(Ordering::Acquire)
        {
            return s.clone();
        }
        // A new key (or one back in use) supersedes the others for the
        // same route and name.
        for (k, old) in slots.iter() {
            if k != key && k.via == key.via && k.sni == key.sni {
                old.superseded.store(true, Ordering::Release);
            }
        }
        let s = slots.entry(key.clone()).or_default().clone();
        s.superseded.store(false, Ordering::Release);
        s
    }

    /// A stream on a connection for `key`: an open one with room, or a new
    /// one made from the TLS stream `dial` returns.
    pub async fn checkout<F, Fut>(&self, key: &Key, dial: F) -> Result<Checkout, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Tls, String>>,
    {
        let slot = self.slot(key);
        if let Some(l) = slot.lease(&self.settings) {
            return Ok(Checkout::Pooled(l));
        }
        let _dialing = slot.dialing.lock().await;
        if let Some(l) = slot.lease(&self.settings) {
            return Ok(Checkout::Pooled(l));
        }
        let tls = dial().await?;
        self.handshakes.inc();
        if tls.get_ref().1.alpn_protocol() != Some(hbone::ALPN) {
            return Ok(Checkout::Single(Box::new(tls)));
        }
        let peer = trellis_ca::tls::peer_id(tls.get_ref().1.peer_certificates())
            .map(|id| id.to_string())
            .unwrap_or_default();
        let (send, conn) = hbone::client_builder()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let sni = key.sni.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%sni, error = %e, "pooled connection ended");
            }
        });
        let c = Arc::new(Conn {
            send,
            peer,
            active: AtomicUsize::new(0),
            created: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        });
        let lease = Lease::new(c.clone());
        slot.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(c);
        Ok(Checkout::Pooled(lease))
    }

    /// Drops connections that are closed, idle past the timeout, or past
    /// their age with no stream; returns what is left.
    pub fn reap(&self) -> Stats {
        let s = self.settings;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stats = Stats::default();
        slots.retain(|_, slot| {
            let superseded = slot.superseded.load(Ordering::Acquire);
            let mut conns = slot.conns.lock().unwrap_or_else(PoisonError::into_inner);
            conns.retain(|c| {
                if c.send.is_closed() {
                    return false;
                }
                match c.idle_for() {
                    Some(idle) => {
                        !superseded && idle < s.idle_timeout && c.created.elapsed() < s.max_age
                    }
                    None => true,
                }
            });
            for c in conns.iter() {
                stats.connections += 1;
                stats.streams += c.active.load(Ordering::Acquire);
            }
            // A slot being dialed stays, so the dial's result has a home.
            !conns.is_empty() || slot.dialing.try_lock().is_err()
        });
        stats
    }
}
