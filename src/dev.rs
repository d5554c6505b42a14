//! `trellis dev`: run what exists of the mesh on this machine.
//!
//! Until the federation store and the agent land, this runs the parts that
//! exist, for real: a fresh CA in a temporary directory, the east and west
//! gateways as child processes (`trellis gateway --config …`) linked by QUIC,
//! a demo `catalog` app in west behind mTLS, and a `frontend` caller in east
//! whose requests cross the gateways with end-to-end mutual TLS. A live line
//! counts requests and errors until Ctrl-C, which stops the gateways
//! (SIGTERM, so they drain) and removes the state.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{
    CaDir, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind, SpiffeId, TrustDomain,
    write_credentials,
};

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Stop after this many requests instead of running until Ctrl-C.
    #[arg(long)]
    requests: Option<u64>,
    /// Keep the temporary directory (CA, configs) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// The demo's request path: `frontend` in east calls `catalog` in west.
const SNI: &str = "8080.catalog.shop.west.mesh";

pub(crate) fn run(args: DevArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(run_async(args))
}

/// A child process, stopped with SIGTERM (and reaped) when dropped.
struct Role(Child);

/// A child gateway and its TCP address.
struct Gateway {
    _role: Role,
    tcp: SocketAddr,
}

impl Drop for Role {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_async(args: DevArgs) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-dev-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let dir = tmp.path();
    let ca = CaDir::new(dir.join("ca"));
    let td: TrustDomain = "trellis.local".parse()?;
    ca.init(&td, DEFAULT_ROOT_TTL)?;
    let bundle = ca.bundle()?;
    for zone in ["east", "west"] {
        let z = ca.create_zone(zone, DEFAULT_ZONE_TTL)?;
        let creds = z.issue(
            &td.role(RoleKind::Gateway, zone, "gw1")?,
            IssueOptions::default(),
        )?;
        write_credentials(&dir.join(format!("{zone}-gw1")), &creds, &bundle)?;
    }
    let catalog_id = td.workload("shop", "catalog")?;
    let frontend_id = td.workload("shop", "frontend")?;
    let catalog_creds = ca
        .zone("west")?
        .issue(&catalog_id, IssueOptions::default())?;
    write_credentials(&dir.join("west-catalog"), &catalog_creds, &bundle)?;
    let frontend_creds = ca
        .zone("east")?
        .issue(&frontend_id, IssueOptions::default())?;
    write_credentials(&dir.join("east-frontend"), &frontend_creds, &bundle)?;
    let trust = TrustStore::new(bundle);

    let (app, line) = spawn(&[
        "demo-app",
        "--name",
        "catalog.shop",
        "--zone",
        "west",
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        &dir.join("west-catalog").to_string_lossy(),
    ])?;
    // "demo-app catalog.shop listening on 127.0.0.1:X"
    let catalog: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| anyhow!("the demo app did not start: {line:?}"))?;
    let west = start_gateway(
        dir,
        "west",
        &format!(
            "[[services]]\nname = \"catalog\"\nnamespace = \"shop\"\nexport_to = [\"east\"]\nendpoints = [\"{catalog}\"]\n"
        ),
    )?;
    let east = start_gateway(
        dir,
        "east",
        &format!("[[peers]]\nzone = \"west\"\naddress = \"{}\"\n", west.tcp),
    )?;

    println!("Trellis dev mesh (state in {})", dir.display());
    println!("  CA        trust domain {td}; zone CAs east and west");
    println!(
        "  east      gateway east/gw1 on {} (TCP and QUIC)",
        east.tcp
    );
    println!(
        "  west      gateway west/gw1 on {} (TCP and QUIC)",
        west.tcp
    );
    println!("  west      app catalog.shop on {catalog} (trellis demo-app, mTLS as {catalog_id})");
    println!("  east      caller frontend.shop ({frontend_id}) → {SNI} via east/gw1");
    println!("  not yet   servers, agents and DNS are not part of dev yet: the gateways run on static config");
    println!();

    let client = Arc::new(tls::client_config(
        CertSource::new(frontend_creds)?,
        trust,
        PeerPolicy::AllowList(vec![catalog_id.clone()]),
    )?);
    let first = call(east.tcp, client.clone(), &catalog_id)
        .await
        .context("the first request through the gateways failed")?;
    println!("first response: {first}");
    println!(
        "(frontend in east → east gateway → QUIC → west gateway → catalog in west; mTLS end to end)"
    );
    let f = dir.join("east-frontend");
    println!(
        "try it with curl as frontend (curl checks DNS names, not SPIFFE IDs, hence --insecure; catalog checks curl's certificate):"
    );
    println!(
        "  curl -s --insecure --cert {0}.crt --key {0}.key --connect-to {SNI}:443:{1} https://{SNI}/\n",
        f.display(),
        east.tcp
    );

    let (mut ok, mut errors, mut last_error) = (1u64, 0u64, String::new());
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if args.requests.is_some_and(|n| ok + errors >= n) {
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        match call(east.tcp, client.clone(), &catalog_id).await {
            Ok(_) => ok += 1,
            Err(e) => {
                errors += 1;
                last_error = format!("{e:#}");
            }
        }
        let rate = (ok + errors) as f64 / start.elapsed().as_secs_f64().max(0.001);
        print!("\r{ok} ok, {errors} errors, {rate:.1} req/s  (Ctrl-C to stop) ");
        let _ = std::io::stdout().flush();
    }
    println!();
    if !last_error.is_empty() {
        println!("last error: {last_error}");
    }
    println!("stopping gateways (SIGTERM, drain)…");
    drop(east);
    drop(west);
    drop(app);
    if args.keep {
        println!("kept {}", tmp.keep().display());
    }
    if errors > 0 {
        bail!("{errors} of {} requests failed", ok + errors);
    }
    Ok(())
}

/// Writes a gateway config and starts `trellis gateway` on it.
fn start_gateway(dir: &Path, zone: &str, extra: &str) -> Result<Gateway> {
    let cfg = dir.join(format!("{zone}-gateway.toml"));
    std::fs::write(
        &cfg,
        format!(
            "name = \"gw1\"\nzone = \"{zone}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncredentials = \"{}\"\n{extra}",
            dir.join(format!("{zone}-gw1")).display()
        ),
    )?;
    let (role, line) = spawn(&["gateway", "--config", &cfg.to_string_lossy()])?;
    // "gateway west/gw1 listening: tcp 127.0.0.1:X, quic …, admin …"
    let tcp = line
        .split("tcp ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| anyhow!("the {zone} gateway did not start (see its log above)"))?;
    Ok(Gateway { _role: role, tcp })
}

/// Starts `trellis ARGS…` and returns it with the first line it prints.
fn spawn(args: &[&str]) -> Result<(Role, String)> {
    let exe = std::env::current_exe().context("cannot find the trellis binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start trellis {}", args[0]))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let role = Role(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok((role, line))
}

/// One request from `frontend`, checking that the answer came from `catalog`.
async fn call(gw: SocketAddr, cfg: Arc<rustls::ClientConfig>, want: &SpiffeId) -> Result<String> {
    let work = async {
        let tcp = TcpStream::connect(gw).await?;
        let mut t = TlsConnector::from(cfg)
            .connect(ServerName::try_from(SNI)?, tcp)
            .await?;
        let peer = tls::peer_id(t.get_ref().1.peer_certificates());
        if peer.as_ref() != Some(want) {
            bail!("answered by {peer:?}, not {want}");
        }
        t.write_all(b"GET / HTTP/1.1\r\nhost: catalog.shop.mesh\r\nconnection: close\r\n\r\n")
            .await?;
        let mut resp = String::new();
        t.read_to_string(&mut resp).await?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_owned())
            .ok_or_else(|| anyhow!("malformed response"))?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("no answer within 10 s"))?
}
