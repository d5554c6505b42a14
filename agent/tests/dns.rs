//! Mesh DNS as users see it: `dig` against the agent, over UDP and TCP.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use trellis_agent::dns::{MeshDns, Names};
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
        protocol: Default::default(),
        port_protocols: Default::default(),
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

fn dig_missing() -> bool {
    if Command::new("dig").arg("-v").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have dig (bind9-dnsutils)"
        );
        eprintln!("skipped: dig is not installed");
        return true;
    }
    false
}

/// An agent for frontend.shop in zone east with `extra` TOML keys; returns
/// its DNS address and the token that stops it.
async fn agent(extra: &str) -> (SocketAddr, CancellationToken, tempfile::TempDir) {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("frontend");
    trellis_ca::write_credentials(
        &prefix,
        &pki.workload("east", "shop", "frontend"),
        &pki.bundle(),
    )
    .unwrap();
    let cfg = AgentConfig::from_toml(&format!(
        "name = \"h\"\nzone = \"east\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{extra}\n[[services]]\nname = \"frontend\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [18000]\n",
        prefix.display()
    ))
    .unwrap();
    let agent = Agent::bind(cfg).await.unwrap();
    let dns = agent.dns_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));
    (dns, stop, tmp)
}

/// One UDP query for `name` (A); the reply and how long it took.
async fn ask_udp(dns: SocketAddr, name: &str, wait: Duration) -> Option<(Message, Duration)> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.metadata.id = fastrand::u16(..);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let start = Instant::now();
    sock.send_to(&q.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some((Message::from_vec(&buf[..n]).unwrap(), start.elapsed()))
}

#[test]
fn mesh_dns_listens_on_loopback_unless_the_config_names_another_address() {
    let cfg = AgentConfig::from_toml(
        "name = \"h\"\nzone = \"east\"\n[[services]]\nname = \"a\"\nnamespace = \"b\"\ncredentials = \"/x\"\nports = [1]\n",
    )
    .unwrap();
    assert!(cfg.dns.ip().is_loopback(), "default dns = {}", cfg.dns);
    assert_eq!(cfg.dns_max_forwarded, 256);
    assert_eq!(cfg.dns_tcp_timeout, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_queries_past_the_cap_are_refused_at_once() {
    // A resolver that never answers: every forwarded query waits 3 s.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = silent.local_addr().unwrap();
    let (dns, stop, _tmp) = agent(&format!(
        "dns_forward = \"{upstream}\"\ndns_max_forwarded = 2"
    ))
    .await;
    let pending: Vec<_> = (0..2)
        .map(|i| {
            let name = format!("slow{i}.example.org.");
            tokio::spawn(async move { ask_udp(dns, &name, Duration::from_secs(10)).await })
        })
        .collect();
    // Let both reach the agent and take their permits.
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(2), silent.recv_from(&mut buf))
            .await
            .expect("the agent forwards the first two")
            .unwrap();
    }
    let (reply, took) = ask_udp(dns, "third.example.org.", Duration::from_secs(2))
        .await
        .expect("the query past the cap got no answer within 2 s");
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(took < Duration::from_millis(500), "answered after {took:?}");
    // Mesh names do not wait for the resolver.
    let (mesh, _) = ask_udp(dns, "nothing.shop.mesh.", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(mesh.metadata.response_code, ResponseCode::NXDomain);
    // The first two end as SERVFAIL when the resolver times out, and free
    // their permits.
    for p in pending {
        let (r, _) = p.await.unwrap().expect("a SERVFAIL after the timeout");
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }
    let (r, _) = ask_udp(dns, "fourth.example.org.", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::ServFail,
        "forwarded again"
    );
    stop.cancel();
}

/// Reads until the server closes; how long that took, or `None` if still
/// open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let drain = async { while let Ok(1..) = s.read(&mut buf).await {} };
    tokio::time::timeout(within, drain)
        .await
        .ok()
        .map(|()| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_send_nothing_or_stall_mid_query_are_disconnected() {
    let (dns, stop, _tmp) = agent("dns_tcp_timeout = \"1s\"").await;
    let start = Instant::now();
    let mut silent = TcpStream::connect(dns).await.unwrap();
    let mut stalled = TcpStream::connect(dns).await.unwrap();
    // A length prefix promising 40 bytes, then nothing.
    stalled.write_all(&[0, 40]).await.unwrap();
    for (what, s) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        closed_within(s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("the {what} client was still connected after 5 s"));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900),
            "{what}: closed after {took:?}"
        );
    }
    stop.cancel();
}

/// A service with `n` endpoints, as a server's registry would answer it.
struct Many(usize);

impl Names for Many {
    fn lookup(&self, service: &str, _: &str, _: Option<&str>) -> Option<(Vec<IpAddr>, Vec<u16>)> {
        (service == "many").then(|| {
            let addrs = (0..self.0)
                .map(|i| IpAddr::from([10, 9, (i / 250) as u8, (i % 250 + 1) as u8]))
                .collect();
            (addrs, vec![80])
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_answers_are_truncated_to_what_the_client_can_take() {
    if dig_missing() {
        return;
    }
    let dns = Arc::new(MeshDns::new("mesh", Arc::new(Many(100)), None).unwrap());
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let udp = UdpSocket::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(dns.serve(udp, tcp, stop.clone()));
    let run = |args: &'static [&'static str]| tokio::task::spawn_blocking(move || dig(addr, args));

    // 100 A records are about 1.6 kB: more than 512 bytes (no EDNS) and
    // more than a 1232-byte EDNS buffer. +ignore shows the truncated reply
    // itself instead of retrying over TCP.
    for args in [
        &["+noedns", "+ignore", "many.shop.mesh"][..],
        &["+bufsize=1232", "+ignore", "many.shop.mesh"][..],
    ] {
        let out = run(args).await.unwrap();
        assert!(out.contains(" tc"), "{args:?}: no TC flag: {out}");
        assert!(out.contains("ANSWER: 0"), "{args:?}: {out}");
    }
    // A buffer large enough takes everything over UDP.
    let out = run(&["+bufsize=4096", "+ignore", "many.shop.mesh"])
        .await
        .unwrap();
    assert!(!out.contains(" tc"), "{out}");
    assert!(out.contains("ANSWER: 100"), "{out}");
    // dig's default: sees TC, asks again over TCP, gets all 100.
    let out = run(&["+noedns", "+short", "many.shop.mesh"]).await.unwrap();
    let records = out.lines().filter(|l| !l.starts_with(';')).count();
    assert_eq!(records, 100, "{out}");
    stop.cancel();
}
