//! `trellis gateway` as a real process: two zones' gateways started from
//! config files, a workload's mTLS call crossing them, and a clean SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{CaDir, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `trellis gateway` and reads back the TCP address it bound.
fn start_gateway(config: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["gateway", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "gateway east/gw1 listening: tcp 127.0.0.1:X, quic ..., admin ..."
    let tcp = line
        .split("tcp ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no listening line: {line:?}"));
    (Proc(child), tcp.parse().unwrap())
}

fn gateway_toml(zone: &str, creds: &Path, extra: &str) -> String {
    format!(
        "name = \"gw1\"\nzone = \"{zone}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncredentials = \"{}\"\n{extra}",
        creds.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_carry_an_mtls_call_and_stop_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaDir::new(tmp.path().join("ca"));
    let td = "trellis.local".parse().unwrap();
    ca.init(&td, DEFAULT_ROOT_TTL).unwrap();
    let bundle = ca.bundle().unwrap();
    for zone in ["east", "west"] {
        let z = ca.create_zone(zone, DEFAULT_ZONE_TTL).unwrap();
        let id = td.role(RoleKind::Gateway, zone, "gw1").unwrap();
        let creds = z.issue(&id, IssueOptions::default()).unwrap();
        trellis_ca::write_credentials(&tmp.path().join(format!("{zone}-gw")), &creds, &bundle)
            .unwrap();
    }

    // catalog's sidecar stand-in in west: mTLS echo with the workload identity.
    let west_ca = ca.zone("west").unwrap();
    let catalog = td.workload("shop", "catalog").unwrap();
    let server = tls::server_config(
        CertSource::new(west_ca.issue(&catalog, IssueOptions::default()).unwrap()).unwrap(),
        TrustStore::new(bundle.clone()),
        PeerPolicy::TrustDomain,
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = backend.accept().await.unwrap();
        let mut t = acceptor.accept(s).await.unwrap();
        let peer = tls::peer_id(t.get_ref().1.peer_certificates()).unwrap();
        let mut buf = [0u8; 5];
        t.read_exact(&mut buf).await.unwrap();
        t.write_all(format!("hello {peer}").as_bytes())
            .await
            .unwrap();
        t.shutdown().await.unwrap();
    });

    let west_cfg = tmp.path().join("west.toml");
    std::fs::write(
        &west_cfg,
        gateway_toml(
            "west",
            &tmp.path().join("west-gw"),
            &format!("[[services]]\nname = \"catalog\"\nnamespace = \"shop\"\nexport_to = [\"east\"]\nendpoints = [\"{backend_addr}\"]\n"),
        ),
    )
    .unwrap();
    let (mut west, west_addr) = start_gateway(&west_cfg);
    let east_cfg = tmp.path().join("east.toml");
    std::fs::write(
        &east_cfg,
        gateway_toml(
            "east",
            &tmp.path().join("east-gw"),
            &format!("[[peers]]\nzone = \"west\"\naddress = \"{west_addr}\"\n"),
        ),
    )
    .unwrap();
    let (mut east, east_addr) = start_gateway(&east_cfg);

    let east_ca = ca.zone("east").unwrap();
    let frontend = td.workload("shop", "frontend").unwrap();
    let client = tls::client_config(
        CertSource::new(east_ca.issue(&frontend, IssueOptions::default()).unwrap()).unwrap(),
        TrustStore::new(bundle),
        PeerPolicy::AllowList(vec![catalog]),
    )
    .unwrap();
    let tcp = TcpStream::connect(east_addr).await.unwrap();
    let mut t = TlsConnector::from(Arc::new(client))
        .connect(
            ServerName::try_from("8080.catalog.shop.west.mesh").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    t.write_all(b"hello").await.unwrap();
    let mut reply = String::new();
    t.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, format!("hello {frontend}"));
    // Our write side is still open, and a drain waits for open streams: close it.
    drop(t);

    for p in [&mut east, &mut west] {
        let pid = p.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = p.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit status {status}");
    }
}

#[test]
fn a_bad_gateway_config_exits_64_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "name = \"gw1\"\nzone = \"East\"\ncredentials = \"/x\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["gateway", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid configuration: zone:"), "{err}");
}
