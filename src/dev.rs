//! `trellis dev`: run what exists of the mesh on this machine.
//!
//! Every part is a real child process on loopback, with state in a temporary
//! directory: a fresh CA, the east and west gateways linked by QUIC, a demo
//! `catalog` app in west behind its agent (sidecar), and an agent in east
//! whose outbound listener and DNS a plain client uses. Requests go from
//! east's agent through both gateways to west's agent by mutual TLS, then
//! plain to the app. A live line counts requests and errors until Ctrl-C,
//! which stops everything (SIGTERM, so each part drains) and removes the
//! state. The federation store is not part of it yet: the parts run on
//! static configuration files written here.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_ca::{
    CaDir, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind, TrustDomain,
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

/// The loopback address east's agent gives catalog.shop.
const CATALOG_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 77, 0, 2));

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
        let gw = z.issue(
            &td.role(RoleKind::Gateway, zone, "gw1")?,
            IssueOptions::default(),
        )?;
        write_credentials(&dir.join(format!("{zone}-gw1")), &gw, &bundle)?;
    }
    for (zone, account) in [("west", "catalog"), ("east", "frontend")] {
        let c = ca
            .zone(zone)?
            .issue(&td.workload("shop", account)?, IssueOptions::default())?;
        write_credentials(&dir.join(account), &c, &bundle)?;
    }

    // West: the app, its agent, the gateway that routes to the agent.
    let (app, line) = spawn(&[
        "demo-app",
        "--name",
        "catalog.shop",
        "--zone",
        "west",
        "--listen",
        "127.0.0.1:0",
    ])?;
    let app_addr: SocketAddr = field(&line, "on ")?;
    let port = app_addr.port();
    let west_agent_cfg = write_config(
        dir,
        "west-agent.toml",
        format!(
            "name = \"west-host\"\nzone = \"west\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [[services]]\nname = \"catalog\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [{port}]\n",
            dir.join("catalog").display()
        ),
    )?;
    let (west_agent, line) = spawn(&["agent", "--config", &west_agent_cfg])?;
    let west_inbound: SocketAddr = field(&line, "inbound ")?;
    let (west_gw, line) = spawn(&[
        "gateway",
        "--config",
        &gateway_config(
            dir,
            "west",
            &format!(
                "[[services]]\nname = \"catalog\"\nnamespace = \"shop\"\nexport_to = [\"east\"]\nendpoints = [\"{west_inbound}\"]\n"
            ),
        )?,
    ])?;
    let west_tcp: SocketAddr = field(&line, "tcp ")?;

    // East: the gateway, and the agent a client uses.
    let (east_gw, line) = spawn(&[
        "gateway",
        "--config",
        &gateway_config(
            dir,
            "east",
            &format!("[[peers]]\nzone = \"west\"\naddress = \"{west_tcp}\"\n"),
        )?,
    ])?;
    let east_tcp: SocketAddr = field(&line, "tcp ")?;
    let east_agent_cfg = write_config(
        dir,
        "east-agent.toml",
        format!(
            "name = \"east-host\"\nzone = \"east\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ngateway = \"{east_tcp}\"\n\
             [[services]]\nname = \"frontend\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [18000]\n\
             [[upstreams]]\nname = \"catalog\"\nnamespace = \"shop\"\naddress = \"{CATALOG_IP}\"\nports = [{port}]\n\
             identities = [\"spiffe://{td}/ns/shop/sa/catalog\"]\nzones = [\"west\"]\n",
            dir.join("frontend").display()
        ),
    )?;
    let (east_agent, line) = spawn(&["agent", "--config", &east_agent_cfg])?;
    let east_dns: SocketAddr = field(&line, "dns ")?;
    let target = SocketAddr::new(CATALOG_IP, port);

    println!("Trellis dev mesh (state in {})", dir.display());
    println!("  CA        trust domain {td}; zone CAs east and west");
    println!("  west      app catalog.shop on {app_addr} (trellis demo-app, plain HTTP)");
    println!("  west      agent: mTLS inbound {west_inbound} as spiffe://{td}/ns/shop/sa/catalog");
    println!("  west      gateway west/gw1 on {west_tcp} (TCP and QUIC)");
    println!("  east      gateway east/gw1 on {east_tcp} (TCP and QUIC)");
    println!(
        "  east      agent: catalog.shop on {target}, DNS on {east_dns}, mTLS as spiffe://{td}/ns/shop/sa/frontend"
    );
    println!(
        "  not yet   federation servers: the parts run on static config files in the state directory"
    );
    println!();

    let first = call(target)
        .await
        .context("the first request through the mesh failed")?;
    println!("first response: {first}");
    println!(
        "(plain to east's agent → mTLS via east gateway → QUIC → west gateway → west's agent → plain to the app)"
    );
    println!("try it:");
    println!(
        "  dig @{} -p {} catalog.shop.mesh +short",
        east_dns.ip(),
        east_dns.port()
    );
    println!("  curl http://{target}/\n");

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
        match call(target).await {
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
    println!("stopping (SIGTERM, drain)…");
    drop((east_agent, east_gw, west_gw, west_agent, app));
    if args.keep {
        println!("kept {}", tmp.keep().display());
    }
    if errors > 0 {
        bail!("{errors} of {} requests failed", ok + errors);
    }
    Ok(())
}

fn write_config(dir: &Path, name: &str, text: String) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("could not write {}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

fn gateway_config(dir: &Path, zone: &str, extra: &str) -> Result<String> {
    write_config(
        dir,
        &format!("{zone}-gateway.toml"),
        format!(
            "name = \"gw1\"\nzone = \"{zone}\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncredentials = \"{}\"\n{extra}",
            dir.join(format!("{zone}-gw1")).display()
        ),
    )
}

/// The address after `key` in a "… listening: …" line.
fn field(line: &str, key: &str) -> Result<SocketAddr> {
    line.split(key)
        .nth(1)
        .and_then(|r| r.split([',', ' ', '\n']).next())
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| anyhow!("a part did not start (see its log above): {line:?}"))
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

/// One plain HTTP request to catalog through east's agent.
async fn call(target: SocketAddr) -> Result<String> {
    let work = async {
        let mut s = TcpStream::connect(target).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: catalog.shop.mesh\r\nconnection: close\r\n\r\n")
            .await?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_owned())
            .ok_or_else(|| anyhow!("malformed response: {resp:?}"))?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("no answer within 10 s"))?
}
