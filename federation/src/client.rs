//! Connecting to a server as an operator, agent or gateway.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::transport::Channel;
use trellis_ca::tls::{CertSource, TrustStore};

use crate::error::FedError;
use crate::transport::{Dialer, client_tls};

/// How long one unary call through [`Servers::call`] may take.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A channel to `server` (host:port) authenticated with the credentials at
/// `prefix` (`PREFIX.crt`, `PREFIX.key`, `PREFIX.bundle`).
pub fn connect(server: &str, prefix: &Path) -> Result<Channel, FedError> {
    let (creds, bundle) =
        trellis_ca::load_credentials(prefix).map_err(|e| FedError::Tls(e.to_string()))?;
    connect_with(server, creds, bundle)
}

/// A channel to `server` presenting `creds` and trusting `bundle`.
pub fn connect_with(
    server: &str,
    creds: trellis_ca::Credentials,
    bundle: trellis_ca::TrustBundle,
) -> Result<Channel, FedError> {
    let certs = CertSource::new(creds).map_err(|e| FedError::Tls(e.to_string()))?;
    let tls = client_tls(certs, TrustStore::new(bundle))?;
    Dialer::new(tls).channel(server)
}

/// Channels to every server a proxy knows, one of them current. A proxy
/// talks to one server at a time and moves to the next when a call fails
/// for want of an answer, so any live server (a follower forwards writes)
/// keeps it registered and watching.
///
/// The identity is read from `certs` at each handshake, so a renewed
/// certificate is used from the next connection on.
#[derive(Clone)]
pub struct Servers {
    inner: Arc<ServersInner>,
}

struct ServersInner {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
}

impl Servers {
    /// Lazy channels to `addrs`; nothing is dialled until the first call.
    pub fn new(
        addrs: &[String],
        certs: Arc<CertSource>,
        trust: Arc<TrustStore>,
    ) -> Result<Self, FedError> {
        if addrs.is_empty() {
            return Err(FedError::Refused("servers: list at least one".into()));
        }
        let dialer = Dialer::new(client_tls(certs, trust)?);
        let channels = addrs
            .iter()
            .map(|a| dialer.channel(a))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            inner: Arc::new(ServersInner {
                addrs: addrs.to_vec(),
                channels,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// How many servers.
    pub fn len(&self) -> usize {
        self.inner.addrs.len()
    }

    /// Never true: construction needs at least one server.
    pub fn is_empty(&self) -> bool {
        self.inner.addrs.is_empty()
    }

    /// The current server's channel and address.
    pub fn current(&self) -> (Channel, &str) {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        (self.inner.channels[i].clone(), &self.inner.addrs[i])
    }

    /// Moves to the next server after `failed` (an address `current` gave)
    /// did not answer; a no-op when another caller moved on already.
    pub fn next(&self, failed: &str) {
        let i = self.inner.current.load(Ordering::Relaxed);
        if self.inner.addrs[i % self.inner.addrs.len()] == failed {
            let _ = self.inner.current.compare_exchange(
                i,
                i.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// One unary call on the current server. When it gets no answer
    /// (unreachable, or nothing within [`CALL_TIMEOUT`]) the next server
    /// becomes current, so the caller's retry goes elsewhere; a refusal is
    /// an answer and is returned as it is.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (channel, addr) = self.current();
        let addr = addr.to_string();
        let r = match tokio::time::timeout(CALL_TIMEOUT, f(channel)).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "{addr} did not answer in {CALL_TIMEOUT:?}"
            ))),
        };
        match r {
            Ok(resp) => Ok(resp.into_inner()),
            Err(s) => {
                if Self::is_unreachable(&s) {
                    self.next(&addr);
                }
                Err(tonic::Status::new(
                    s.code(),
                    format!("{addr}: {}", s.message()),
                ))
            }
        }
    }

    /// Whether a call's status means "try another server" rather than a
    /// refusal that another server would repeat.
    pub fn is_unreachable(s: &tonic::Status) -> bool {
        matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Aborted
        )
    }
}
