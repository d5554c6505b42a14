//! Helpers the agent's integration tests share: workload credentials, a
//! minimal agent configuration, an upstream entry, the metrics page.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_agent::{AgentConfig, LocalService, Protocol, Upstream};
use trellis_gateway::testing::Pki;

/// Service `name` of namespace `shop` in `zone`, its app on 127.0.0.1:`port`,
/// with fresh credentials written under `dir` (a rewrite is a renewal).
pub(crate) fn local(pki: &Pki, dir: &Path, zone: &str, name: &str, port: u16) -> LocalService {
    let prefix = dir.join(format!("{zone}-{name}"));
    trellis_ca::write_credentials(&prefix, &pki.workload(zone, "shop", name), &pki.bundle())
        .unwrap();
    LocalService {
        name: name.into(),
        namespace: "shop".into(),
        account: None,
        credentials: Some(prefix),
        ports: vec![port],
        address: [127, 0, 0, 1].into(),
        protocol: "detect".into(),
        port_protocols: Default::default(),
        labels: Default::default(),
        health: None,
    }
}

/// An agent of `zone` on loopback ports of its own, serving `services`.
pub(crate) fn agent_config(zone: &str, services: Vec<LocalService>) -> AgentConfig {
    let mut c = AgentConfig::from_toml(&format!(
        "name = \"host\"\nzone = \"{zone}\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nconnect_timeout = \"2s\"\n[[services]]\nname = \"x\"\nnamespace = \"x\"\ncredentials = \"/x\"\nports = [1]\n"
    ))
    .unwrap();
    c.services = services;
    c
}

/// `catalog.shop` on `addr`:`port`, answered by the catalog identity, at
/// these sidecars in the zone and then these zones.
pub(crate) fn catalog(
    addr: IpAddr,
    port: u16,
    endpoints: Vec<SocketAddr>,
    zones: &[&str],
    protocol: Protocol,
) -> Upstream {
    Upstream {
        name: "catalog".into(),
        namespace: "shop".into(),
        address: addr,
        ports: vec![port],
        identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
        endpoints,
        zones: zones.iter().map(|z| (*z).to_owned()).collect(),
        protocol,
        port_protocols: Default::default(),
    }
}

/// The agent's `/metrics` page.
pub(crate) async fn metrics(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
