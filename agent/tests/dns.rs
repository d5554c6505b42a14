//! Mesh DNS as users see it: `dig` against the agent, over UDP and TCP.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use trellis_agent::{Agent, AgentConfig, Upstream};
use trellis_gateway::testing::Pki;

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stand-in for the host's resolver: answers every A query with 192.0.2.1.
async fn stub_resolver() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.recursion_available = true;
            for q in req.queries {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A([192, 0, 2, 1].into())),
                ));
                resp.add_query(q);
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_mesh_names_srv_nxdomain_and_forwarded_names() {
    if Command::new("dig").arg("-v").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have dig (bind9-dnsutils)"
        );
        eprintln!("skipped: dig is not installed");
        return;
    }
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("frontend");
    trellis_ca::write_credentials(
        &prefix,
        &pki.workload("east", "shop", "frontend"),
        &pki.bundle(),
    )
    .unwrap();
    let ip: IpAddr = [127, 77, fastrand::u8(1..255), fastrand::u8(1..255)].into();
    let mut cfg = AgentConfig::from_toml(&format!(
        "name = \"h\"\nzone = \"east\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndns_forward = \"{}\"\n[[services]]\nname = \"frontend\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [18000]\n",
        stub_resolver().await,
        prefix.display()
    ))
    .unwrap();
    cfg.upstreams = vec![Upstream {
        name: "catalog".into(),
        namespace: "shop".into(),
        address: ip,
        ports: vec![8080, 9090],
        identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
        endpoints: vec!["127.0.0.1:1".parse().unwrap()],
        zones: vec![],
    }];
    let agent = Agent::bind(cfg).await.unwrap();
    let dns = agent.dns_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));

    let run = |args: Vec<&'static str>| tokio::task::spawn_blocking(move || dig(dns, &args));
    assert_eq!(
        run(vec!["+short", "catalog.shop.mesh"])
            .await
            .unwrap()
            .trim(),
        ip.to_string()
    );
    assert_eq!(
        run(vec!["+short", "+tcp", "Catalog.Shop.Mesh"])
            .await
            .unwrap()
            .trim(),
        ip.to_string()
    );
    assert_eq!(
        run(vec!["+short", "SRV", "_9090._tcp.catalog.shop.mesh"])
            .await
            .unwrap()
            .trim(),
        "0 0 9090 catalog.shop.mesh."
    );
    let srv = run(vec!["SRV", "_9090._tcp.catalog.shop.mesh"])
        .await
        .unwrap();
    assert!(
        srv.contains("ADDITIONAL SECTION") && srv.contains(&ip.to_string()),
        "{srv}"
    );
    for missing in [
        "nothing.shop.mesh",
        "_7._tcp.catalog.shop.mesh",
        "a.b.c.d.e.mesh",
    ] {
        let out = run(vec![missing]).await.unwrap();
        assert!(out.contains("status: NXDOMAIN"), "{missing}: {out}");
    }
    // A name that exists without an AAAA record: NOERROR and no answer.
    let aaaa = run(vec!["AAAA", "catalog.shop.mesh"]).await.unwrap();
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    // Everything else goes to the host's resolver.
    assert_eq!(
        run(vec!["+short", "example.org"]).await.unwrap().trim(),
        "192.0.2.1"
    );
    stop.cancel();
}
