//! `trellis dev`: run what exists of the mesh on this machine.
//!
//! Until the server, gateway and agent roles land, this exercises the part
//! that exists for real: a fresh CA in a temporary directory, two zone
//! intermediates, gateway identities issued from CSRs, and mutual TLS between
//! them over a loopback socket, including a refused identity.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{CaDir, Credentials, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind};

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Keep the temporary CA directory instead of removing it at exit.
    #[arg(long)]
    keep: bool,
}

pub(crate) fn run(args: DevArgs) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-dev-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let ca = CaDir::new(tmp.path().join("ca"));
    let td = "trellis.local".parse()?;
    ca.init(&td, DEFAULT_ROOT_TTL)?;
    let east = ca.create_zone("east", DEFAULT_ZONE_TTL)?;
    let west = ca.create_zone("west", DEFAULT_ZONE_TTL)?;
    let bundle = ca.bundle()?;
    println!(
        "CA        trust domain {td}, zones east and west, in {}",
        ca.path().display()
    );

    let gw_east = east.issue(
        &td.role(RoleKind::Gateway, "east", "gw1")?,
        IssueOptions::default(),
    )?;
    let gw_west = west.issue(
        &td.role(RoleKind::Gateway, "west", "gw1")?,
        IssueOptions::default(),
    )?;
    let workload = west.issue(&td.workload("shop", "catalog")?, IssueOptions::default())?;
    let trust = TrustStore::new(bundle);
    let only_gateways = PeerPolicy::Roles(vec![RoleKind::Gateway]);

    let server_cfg = tls::server_config(
        CertSource::new(gw_east)?,
        trust.clone(),
        only_gateways.clone(),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("listener  {addr}: mTLS as east/gw1, admits gateway identities only");
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await?;
            match acceptor.accept(tcp).await {
                Ok(mut s) => {
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await?;
                    s.write_all(&buf[..n]).await?;
                    s.shutdown().await?;
                }
                Err(e) => println!("listener  refused a client: {e}"),
            }
        }
        Ok::<_, std::io::Error>(())
    });

    let call = |creds: Credentials| {
        let trust = trust.clone();
        let policy = only_gateways.clone();
        async move {
            let cfg = tls::client_config(CertSource::new(creds)?, trust, policy)?;
            let tcp = TcpStream::connect(addr).await?;
            let mut s = TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("15443.gateway.east.mesh")?, tcp)
                .await?;
            let peer = tls::peer_id(s.get_ref().1.peer_certificates())
                .ok_or_else(|| anyhow!("no peer identity"))?;
            s.write_all(b"hello east").await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            anyhow::Ok((peer, String::from_utf8_lossy(&buf).into_owned()))
        }
    };

    let (peer, reply) = call(gw_west).await.context("west/gw1 → east/gw1 failed")?;
    println!("west/gw1  → verified {peer}, echoed {reply:?}");
    match call(workload).await {
        Ok((_, reply)) => return Err(anyhow!("a workload identity got through: {reply:?}")),
        Err(e) => println!("shop/catalog → refused as it should be: {e:#}"),
    }
    server.await??;

    println!();
    println!("built so far: the CA (trellis ca init|zone|issue|inspect).");
    println!("not built yet: trellis server, gateway and agent; this command will run them all.");
    if args.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}
