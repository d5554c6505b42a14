//! An edge site with sidecars and no gateway of its own: its agent dials
//! east's gateway, and plain apps call across that link both ways.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use trellis_agent::{Agent, AgentConfig, EdgeSettings, LocalService, Upstream};
use trellis_gateway::testing::{Pki, Running, config, service, tcp_echo};

fn agent_config(zone: &str, svc: LocalService) -> AgentConfig {
    let mut c = AgentConfig::from_toml(&format!(
        "name = \"h\"\nzone = \"{zone}\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nconnect_timeout = \"2s\"\n[[services]]\nname = \"x\"\nnamespace = \"x\"\ncredentials = \"/x\"\nports = [1]\n"
    ))
    .unwrap();
    c.services = vec![svc];
    c
}

fn upstream(name: &str, port: u16, zone: &str) -> (Upstream, SocketAddr) {
    let ip: IpAddr = [127, 77, fastrand::u8(1..255), fastrand::u8(1..255)].into();
    let up = Upstream {
        name: name.into(),
        namespace: "shop".into(),
        address: ip,
        ports: vec![port],
        identities: vec![format!("spiffe://trellis.local/ns/shop/sa/{name}")],
        endpoints: vec![],
        zones: vec![zone.into()],
        protocol: Default::default(),
        port_protocols: Default::default(),
    };
    (up, SocketAddr::new(ip, port))
}

async fn start(cfg: AgentConfig) -> (SocketAddr, CancellationToken) {
    let agent = Agent::bind(cfg).await.unwrap();
    let addr = agent.inbound_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));
    (addr, stop)
}

/// Calls until the answer comes back (the edge link needs a moment to come up).
async fn call_until(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(msg).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            std::io::Result::Ok(back)
        };
        if let Ok(Ok(back)) = tokio::time::timeout(Duration::from_secs(5), attempt).await
            && !back.is_empty()
        {
            return back;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_apps_call_across_an_edge_link_both_ways() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let creds = |zone: &str, account: &str| {
        let prefix = tmp.path().join(format!("{zone}-{account}"));
        trellis_ca::write_credentials(&prefix, &pki.workload(zone, "shop", account), &pki.bundle())
            .unwrap();
        prefix
    };
    let local = |zone: &str, name: &str, port: u16| LocalService {
        name: name.into(),
        namespace: "shop".into(),
        account: None,
        credentials: Some(creds(zone, name)),
        ports: vec![port],
        address: [127, 0, 0, 1].into(),
        protocol: "tcp".into(),
        port_protocols: Default::default(),
        labels: Default::default(),
        health: None,
    };

    // East: catalog behind a sidecar, and a gateway that serves the edge zone.
    let catalog_app = tcp_echo().await;
    let (catalog_inbound, s1) = start(agent_config(
        "east",
        local("east", "catalog", catalog_app.port()),
    ))
    .await;
    let mut g = config("east", "127.0.0.1:0".parse().unwrap());
    g.edge_zones = vec!["edge".into()];
    g.services = vec![service("catalog", &["edge"], vec![catalog_inbound])];
    let east = Running::start(g, pki.gateway("east", "gw1"), pki.bundle()).await;

    // The edge host: inventory behind a sidecar, linked to east's gateway.
    let inventory_app = tcp_echo().await;
    let node = tmp.path().join("edge-node");
    trellis_ca::write_credentials(&node, &pki.agent("edge", "site-1"), &pki.bundle()).unwrap();
    let mut edge = agent_config("edge", local("edge", "inventory", inventory_app.port()));
    edge.edge = Some(EdgeSettings {
        gateway_zone: "east".into(),
        gateway: east.addrs.quic,
        credentials: Some(node),
        bind: "127.0.0.1:0".parse().unwrap(),
    });
    let (to_catalog, catalog_addr) = upstream("catalog", catalog_app.port(), "east");
    edge.upstreams = vec![to_catalog];
    let (_, s2) = start(edge).await;

    // East's frontend calls inventory at the edge through east's gateway.
    let mut front = agent_config("east", local("east", "frontend", 18000));
    front.gateway = Some(east.addrs.tcp);
    let (to_inventory, inventory_addr) = upstream("inventory", inventory_app.port(), "edge");
    front.upstreams = vec![to_inventory];
    let (_, s3) = start(front).await;

    assert_eq!(
        call_until(inventory_addr, b"east to edge").await,
        b"east to edge"
    );
    assert_eq!(
        call_until(catalog_addr, b"edge to east").await,
        b"edge to east"
    );
    let m = east.metrics().await;
    assert!(
        m.contains(
            r#"direction="outbound",peer_zone="edge",service="inventory.shop",outcome="accepted""#
        ),
        "{m}"
    );
    assert!(
        m.contains(
            r#"direction="inbound",peer_zone="edge",service="catalog.shop",outcome="accepted""#
        ),
        "{m}"
    );
    for s in [s1, s2, s3] {
        s.cancel();
    }
    east.stop().await;
}
