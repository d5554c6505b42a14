//! QUIC and TLS settings for gateway-to-gateway links.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use trellis_ca::RoleKind;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};

use crate::config::QuicSettings;
use crate::error::GatewayError;

/// ALPN of the tunnel protocol on QUIC.
pub const ALPN_TUNNEL: &[u8] = b"trellis/1";
/// ALPN of the HTTP/2 fallback.
pub const ALPN_H2: &[u8] = b"h2";

/// The transport parameters both ends of a link use.
pub(crate) fn transport(s: &QuicSettings) -> Result<Arc<TransportConfig>, GatewayError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(s.keep_alive));
    t.max_idle_timeout(Some(IdleTimeout::try_from(s.idle_timeout).map_err(
        |_| {
            GatewayError::config(
                "quic.idle_timeout",
                "is too long for QUIC (at most 2^62 ms)",
            )
        },
    )?));
    t.stream_receive_window(VarInt::from_u32(s.stream_receive_window));
    t.receive_window(VarInt::from_u32(s.receive_window));
    t.send_window(u64::from(s.send_window));
    t.max_concurrent_bidi_streams(VarInt::from_u32(s.max_concurrent_streams));
    // Tunnels never use unidirectional streams.
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.enable_segmentation_offload(s.gso);
    Ok(Arc::new(t))
}

/// The QUIC server side: any gateway identity of our trust domain may connect,
/// and agents of the edge zones we serve; each stream's claimed source zone is
/// then checked against the peer's identity.
pub(crate) fn server_config(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    settings: &QuicSettings,
    edge_zones: &[String],
) -> Result<quinn::ServerConfig, GatewayError> {
    let edges = edge_zones.to_vec();
    let admit = PeerPolicy::Predicate(Arc::new(move |id| match id.role() {
        Some(trellis_ca::Role::Gateway { .. }) => true,
        Some(trellis_ca::Role::Agent { zone, .. }) => edges.contains(&zone),
        _ => false,
    }));
    let mut tls = tls::server_config(certs, trust, admit)?;
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    let crypto = QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| GatewayError::Tls(format!("QUIC server TLS: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(settings)?);
    // Addresses are validated by a Retry before the handshake (see
    // `Shared::admit_quic`); a validated peer may then move (NAT rebinding).
    cfg.migration(true);
    Ok(cfg)
}

/// The rustls server config of the TCP fallback (ALPN h2, gateways only).
pub(crate) fn fallback_server_tls(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let mut tls = tls::server_config(certs, trust, PeerPolicy::Roles(vec![RoleKind::Gateway]))?;
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(tls))
}

/// The policy a link applies to the peer gateway it dials.
pub(crate) fn peer_policy(
    td: &trellis_ca::TrustDomain,
    zone: &str,
    name: Option<&str>,
) -> PeerPolicy {
    match name.and_then(|n| td.role(RoleKind::Gateway, zone, n).ok()) {
        Some(id) => PeerPolicy::AllowList(vec![id]),
        None => {
            let zone = zone.to_owned();
            PeerPolicy::Predicate(Arc::new(
                move |id| matches!(id.role(), Some(trellis_ca::Role::Gateway { zone: z, .. }) if z == zone),
            ))
        }
    }
}

/// Client configs for one peer: QUIC and the TCP fallback.
pub(crate) fn client_configs(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    policy: PeerPolicy,
    settings: &QuicSettings,
) -> Result<(quinn::ClientConfig, Arc<rustls::ClientConfig>), GatewayError> {
    let mut q = tls::client_config(certs.clone(), trust.clone(), policy.clone())?;
    q.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(q))
        .map_err(|e| GatewayError::Tls(format!("QUIC client TLS: {e}")))?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    quic.transport_config(transport(settings)?);
    let mut h2 = tls::client_config(certs, trust, policy)?;
    h2.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((quic, Arc::new(h2)))
}
