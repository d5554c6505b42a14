//! `trellis dev`: a whole multi-zone mesh on this machine, as real child
//! processes on loopback, with state in a temporary directory.
//!
//! - a fresh CA with zones `east`, `west` and `edge`, and an operator identity;
//! - three federation servers: `east-1` and `west-1` form the Raft cluster,
//!   `edge-1` joins with an edge token and stays a learner;
//! - a gateway in `east` and one in `west` (west's also serves the edge zone,
//!   whose agents dial it over QUIC: the edge has no gateway of its own);
//! - the demo shop, one agent per host, each bootstrapped with its own
//!   single-use agent token: `frontend` (east) → `auth` (east) → `catalog`
//!   (west, two hosts: `v1` and `v2`, subsets of the `catalog` Backend) →
//!   `inventory` (west and edge). Every hop is the caller's agent
//!   → mutual TLS (through both gateways between zones) → the callee's agent.
//!
//! It prints what runs where, a `curl` and a `dig` to try, and a live line of
//! requests/s and errors until Ctrl-C (or SIGTERM), which stops every part
//! (SIGTERM, so each drains and deregisters) and removes the state.
//! `state.json` in the state directory lists every address, for scripts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
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
use trellis_federation::proto;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Stop after this many requests instead of running until Ctrl-C.
    #[arg(long)]
    requests: Option<u64>,
    /// Keep the state directory (CA, configs, logs) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// The first of the 100 consecutive ports the mesh uses.
    #[arg(long, default_value_t = 17400)]
    ports_from: u16,
    /// Use this (empty or new) directory for the state instead of a
    /// temporary one; it is kept.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Lifetime of the workload certificates: each is renewed at half-life,
    /// under the running load.
    #[arg(long, default_value = "1h", value_parser = crate::cli::parse_duration)]
    cert_ttl: Duration,
    /// Send no requests of its own once the shop answered, and wait for
    /// Ctrl-C: for counting exactly what another client sends (tests,
    /// `trellis top`).
    #[arg(long, conflicts_with = "requests")]
    no_traffic: bool,
    /// How much each agent writes to its access log (`logs/HOST.access.log`):
    /// `off`, `sampled` (one request in ten) or `full`.
    #[arg(long, default_value = "sampled", value_parser = ["off", "sampled", "full"])]
    access_log: String,
}

const TD: &str = "trellis.local";
const NS: &str = "shop";

/// One host of the demo shop: an app and the agent in front of it.
struct Host {
    /// `frontend-east`, …
    name: &'static str,
    service: &'static str,
    zone: &'static str,
    /// What the app calls on every request.
    calls: Option<&'static str>,
    /// The app's own address (apps of one service share its port).
    app_ip: Ipv4Addr,
    /// A file whose existence fails the app's health check (a drain switch).
    switch: bool,
    /// The endpoint's `version` label, which the `catalog` Backend's
    /// subsets select; the app names it in its answer.
    version: Option<&'static str>,
}

const HOSTS: [Host; 6] = [
    Host {
        name: "frontend-east",
        service: "frontend",
        zone: "east",
        calls: Some("auth"),
        app_ip: Ipv4Addr::new(127, 0, 0, 1),
        switch: false,
        version: None,
    },
    Host {
        name: "auth-east",
        service: "auth",
        zone: "east",
        calls: Some("catalog"),
        app_ip: Ipv4Addr::new(127, 0, 0, 1),
        switch: false,
        version: None,
    },
    Host {
        name: "catalog-west",
        service: "catalog",
        zone: "west",
        calls: Some("inventory"),
        app_ip: Ipv4Addr::new(127, 0, 0, 1),
        switch: true,
        version: Some("v1"),
    },
    Host {
        name: "catalog-west-v2",
        service: "catalog",
        zone: "west",
        calls: Some("inventory"),
        app_ip: Ipv4Addr::new(127, 0, 0, 3),
        switch: true,
        version: Some("v2"),
    },
    Host {
        name: "inventory-west",
        service: "inventory",
        zone: "west",
        calls: None,
        app_ip: Ipv4Addr::new(127, 0, 0, 1),
        switch: true,
        version: None,
    },
    Host {
        name: "inventory-edge",
        service: "inventory",
        zone: "edge",
        calls: None,
        app_ip: Ipv4Addr::new(127, 0, 0, 2),
        switch: true,
        version: None,
    },
];

/// Where everything listens, from `--ports-from`.
struct Ports(u16);

impl Ports {
    fn server(&self, i: u16) -> u16 {
        self.0 + i
    }
    fn server_dns(&self, i: u16) -> u16 {
        self.0 + 5 + i
    }
    fn gateway(&self, i: u16) -> u16 {
        self.0 + 10 + i
    }
    /// The gateway's port for its zone's workloads (`zone_listen`).
    fn gateway_zone(&self, i: u16) -> u16 {
        self.0 + 12 + i
    }
    fn gateway_admin(&self, i: u16) -> u16 {
        self.0 + 20 + i
    }
    fn inbound(&self, i: u16) -> u16 {
        self.0 + 30 + i
    }
    fn dns(&self, i: u16) -> u16 {
        self.0 + 40 + i
    }
    fn admin(&self, i: u16) -> u16 {
        self.0 + 50 + i
    }
    /// The dashboard (`trellis dashboard`, run inside the dev process).
    fn dashboard(&self) -> u16 {
        self.0 + 90
    }
    fn app(&self, service: &str) -> u16 {
        let i = ["frontend", "auth", "catalog", "inventory"]
            .iter()
            .position(|s| *s == service)
            .unwrap_or(0);
        self.0 + 80 + i as u16
    }
}

/// A child process, stopped with SIGTERM (and reaped) when dropped.
struct Role {
    child: Child,
    name: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running mesh; dropping it stops the parts, last started first.
struct Parts {
    roles: Vec<Role>,
    logs: PathBuf,
}

impl Parts {
    fn spawn(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))
            .with_context(|| format!("creating the log of {name}"))?;
        let exe = std::env::current_exe().context("where is the trellis binary?")?;
        let child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.roles.push(Role {
            child,
            name: name.to_string(),
        });
        Ok(())
    }

    /// Fails with the part's log when it exited.
    fn check_alive(&mut self) -> Result<()> {
        for r in &mut self.roles {
            if let Ok(Some(status)) = r.child.try_wait() {
                let log = std::fs::read_to_string(self.logs.join(format!("{}.log", r.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{} exited ({status}):\n{}", r.name, tail.join("\n"));
            }
        }
        Ok(())
    }
}

impl Drop for Parts {
    /// Everything but the servers first, all at once, so agents and
    /// gateways can still deregister; then the servers.
    fn drop(&mut self) {
        let servers: Vec<Role> = {
            let (servers, rest): (Vec<Role>, Vec<Role>) = self
                .roles
                .drain(..)
                .partition(|r| ["east-1", "west-1", "edge-1"].contains(&r.name.as_str()));
            stop_all(rest);
            servers
        };
        stop_all(servers);
    }
}

/// SIGTERM to every role, then waits for each (Role's drop kills laggards).
fn stop_all(roles: Vec<Role>) {
    for r in &roles {
        let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    drop(roles);
}

pub(crate) fn run(args: DevArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(run_async(args))
}

/// Refuses to start when a port it needs is taken, naming it.
fn check_ports(p: &Ports) -> Result<()> {
    let mut want: Vec<(u16, String, bool)> = Vec::new();
    for (i, s) in ["east-1", "west-1", "edge-1"].iter().enumerate() {
        want.push((p.server(i as u16), format!("server {s}"), false));
        if i < 2 {
            want.push((
                p.server_dns(i as u16),
                format!("server {s} DNS (TCP and UDP)"),
                true,
            ));
        }
    }
    for (i, z) in ["east", "west"].iter().enumerate() {
        want.push((
            p.gateway(i as u16),
            format!("gateway {z} (TCP and UDP)"),
            true,
        ));
        want.push((
            p.gateway_zone(i as u16),
            format!("gateway {z} zone port"),
            false,
        ));
        want.push((
            p.gateway_admin(i as u16),
            format!("gateway {z} admin"),
            false,
        ));
    }
    for (i, h) in HOSTS.iter().enumerate() {
        let i = i as u16;
        want.push((p.inbound(i), format!("agent {} inbound", h.name), false));
        want.push((
            p.dns(i),
            format!("agent {} DNS (TCP and UDP)", h.name),
            true,
        ));
        want.push((p.admin(i), format!("agent {} admin", h.name), false));
    }
    for s in ["frontend", "auth", "catalog", "inventory"] {
        want.push((p.app(s), format!("demo app {s}"), false));
    }
    want.push((p.dashboard(), "the dashboard".into(), false));
    for (port, what, udp) in want {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err()
            || (udp && std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_err());
        if taken {
            bail!(
                "port {port} ({what}) is taken on 127.0.0.1; another trellis dev may be running. Pick other ports with --ports-from N (it uses N to N+99)"
            );
        }
    }
    Ok(())
}

async fn run_async(args: DevArgs) -> Result<()> {
    if args.ports_from > u16::MAX - 100 {
        return Err(crate::cli::UsageError(format!(
            "--ports-from {}: the mesh needs 100 ports from there",
            args.ports_from
        ))
        .into());
    }
    let p = Ports(args.ports_from);
    check_ports(&p)?;
    let (tmp, dir) = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("trellis-dev-")
                .tempdir()
                .context("could not create a temporary directory")?;
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    let started = Instant::now();
    let mut parts = Parts {
        roles: Vec::new(),
        logs: dir.join("logs"),
    };
    std::fs::create_dir_all(&parts.logs)?;
    std::fs::create_dir_all(dir.join("down"))?;
    std::fs::create_dir_all(dir.join("faults"))?;
    let result = up_and_run(&args, &p, &dir, &mut parts, started).await;
    noteln!("stopping (SIGTERM: every part drains and deregisters)…");
    drop(parts);
    match tmp {
        Some(t) if args.keep => noteln!("kept {}", t.keep().display()),
        Some(t) => drop(t),
        None => noteln!("state kept in {}", dir.display()),
    }
    result
}

async fn up_and_run(
    args: &DevArgs,
    p: &Ports,
    dir: &Path,
    parts: &mut Parts,
    started: Instant,
) -> Result<()> {
    // The CA, the gateways' identities and the operator's.
    let ca = CaDir::new(dir.join("ca"));
    let td: TrustDomain = TD.parse()?;
    ca.init(&td, DEFAULT_ROOT_TTL)?;
    let bundle = ca.bundle()?;
    for zone in ["east", "west", "edge"] {
        ca.create_zone(zone, DEFAULT_ZONE_TTL)?;
    }
    let operator = dir.join("operator");
    let op = ca.root()?.issue(
        &td.role(RoleKind::Operator, "", "dev")?,
        IssueOptions::default(),
    )?;
    write_credentials(&operator, &op, &bundle)?;
    let server_addr = |i: u16| format!("127.0.0.1:{}", p.server(i));

    // The store: east-1 and west-1 vote; edge-1 joins as a learner.
    for (i, (name, zone, peer, peer_zone)) in [
        ("east-1", "east", "west-1", "west"),
        ("west-1", "west", "east-1", "east"),
    ]
    .into_iter()
    .enumerate()
    {
        let i = i as u16;
        let cfg = format!(
            "name = \"{name}\"\nzone = \"{zone}\"\ntrust_domain = \"{TD}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\n\
             ca_dir = \"{}\"\ndns = \"127.0.0.1:{}\"\nbootstrap = true\n[[peers]]\nname = \"{peer}\"\nzone = \"{peer_zone}\"\naddress = \"{}\"\n",
            dir.join(name).display(),
            server_addr(i),
            dir.join("ca").display(),
            p.server_dns(i),
            server_addr(1 - i),
        );
        let path = write_config(dir, &format!("{name}.toml"), cfg)?;
        parts.spawn(name, &["server", "--config", &path])?;
    }
    let ops = Operator::new(&server_addr(0), &operator)?;
    let token = ops
        .token(
            proto::TokenRequest {
                zone: "edge".into(),
                edge: true,
                ttl_seconds: 300,
                ..Default::default()
            },
            parts,
        )
        .await
        .context("creating the edge server's join token")?;
    let token_file = dir.join("edge-1.token");
    trellis_ca::files::write_private(&token_file, token.as_bytes())?;
    parts.spawn(
        "edge-1",
        &[
            "zone",
            "join",
            "--token-file",
            &token_file.display().to_string(),
            "--name",
            "edge-1",
            "--data-dir",
            &dir.join("edge-1").display().to_string(),
            "--listen",
            &server_addr(2),
        ],
    )?;

    // Gateways, registered in the store; west's also carries the edge.
    for (i, zone) in ["east", "west"].into_iter().enumerate() {
        let i = i as u16;
        let z = ca.zone(zone)?;
        let creds = z.issue(
            &td.role(RoleKind::Gateway, zone, "gw1")?,
            IssueOptions::default(),
        )?;
        let prefix = dir.join(format!("{zone}-gw1"));
        write_credentials(&prefix, &creds, &bundle)?;
        let edge = if zone == "west" {
            "edge_zones = [\"edge\"]\n"
        } else {
            ""
        };
        let cfg = format!(
            "name = \"gw1\"\nzone = \"{zone}\"\ntrust_domain = \"{TD}\"\nlisten = \"127.0.0.1:{}\"\nzone_listen = \"127.0.0.1:{}\"\n\
             admin = \"127.0.0.1:{}\"\ncredentials = \"{}\"\nservers = [\"{}\", \"{}\"]\n{edge}",
            p.gateway(i),
            p.gateway_zone(i),
            p.gateway_admin(i),
            prefix.display(),
            server_addr(i),
            server_addr(1 - i),
        );
        let path = write_config(dir, &format!("{zone}-gw1.toml"), cfg)?;
        parts.spawn(&format!("{zone}-gw1"), &["gateway", "--config", &path])?;
    }

    // catalog's two versions as subsets, so a canary Route works at once.
    ops.apply(
        "Backend",
        "catalog",
        serde_json::json!({
            "service": format!("catalog.{NS}"),
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        }),
        parts,
    )
    .await
    .context("applying the catalog Backend")?;

    // The shop: apps first (they resolve their downstream per request), then
    // one agent per host, each with its own single-use token.
    for (i, h) in HOSTS.iter().enumerate() {
        let i = i as u16;
        let port = p.app(h.service);
        let listen = format!("{}:{port}", h.app_ip);
        let dns = format!("127.0.0.1:{}", p.dns(i));
        let mut app = vec![
            "demo-app".to_string(),
            "--name".into(),
            h.service.into(),
            "--zone".into(),
            h.zone.into(),
            "--listen".into(),
            listen,
            "--dns".into(),
            dns.clone(),
        ];
        if let Some(next) = h.calls {
            app.push("--call".into());
            app.push(format!("http://{next}.{NS}.mesh:{}/", p.app(next)));
        }
        if let Some(v) = h.version {
            app.push("--app-version".into());
            app.push(v.into());
        }
        app.push("--faults".into());
        app.push(dir.join("faults").join(h.name).display().to_string());
        let app: Vec<&str> = app.iter().map(String::as_str).collect();
        parts.spawn(&format!("app-{}", h.name), &app)?;

        let token = ops
            .token(
                proto::TokenRequest {
                    zone: h.zone.into(),
                    edge: h.zone == "edge",
                    ttl_seconds: 300,
                    agent: true,
                    workloads: vec![format!("{NS}/{}", h.service)],
                    name: h.name.into(),
                    replace: false,
                },
                parts,
            )
            .await
            .with_context(|| format!("creating the join token of agent {}", h.name))?;
        let token_file = dir.join(format!("{}.token", h.name));
        trellis_ca::files::write_private(&token_file, token.as_bytes())?;
        // Servers nearest first: the zone's own, then the others.
        let own = match h.zone {
            "east" => 0,
            "west" => 1,
            _ => 2,
        };
        let servers: Vec<String> = [own, 0, 1, 2]
            .iter()
            .enumerate()
            .filter(|(k, s)| *k == 0 || **s != own)
            .map(|(_, s)| format!("\"{}\"", server_addr(*s)))
            .collect();
        // East and west agents find their zone's gateway in the store, at
        // the zone port it registers (its tunnel port refuses workloads).
        let (gateway, edge) = match h.zone {
            "east" | "west" => (String::new(), String::new()),
            _ => (
                String::new(),
                format!(
                    "[edge]\ngateway_zone = \"west\"\ngateway = \"127.0.0.1:{}\"\nbind = \"127.0.0.1:0\"\n",
                    p.gateway(1)
                ),
            ),
        };
        let health = if h.switch {
            format!(
                "[services.health]\nkind = \"command\"\ncommand = [\"test\", \"!\", \"-e\", \"{}\"]\ninterval = \"1s\"\ntimeout = \"1s\"\nunhealthy_threshold = 1\n",
                dir.join("down").join(h.name).display()
            )
        } else {
            "[services.health]\nkind = \"tcp\"\ninterval = \"1s\"\ntimeout = \"1s\"\n".into()
        };
        let cfg = format!(
            "name = \"{name}\"\nzone = \"{zone}\"\ntrust_domain = \"{TD}\"\nservers = [{servers}]\ndata_dir = \"{data}\"\n\
             join_token_file = \"{token}\"\ninbound = \"127.0.0.1:{inbound}\"\ndns = \"127.0.0.1:{dnsp}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             outbound_network = \"127.{net}.0.0\"\ncertificate_ttl = \"{ttl}s\"\nzone_priority = [\"west\", \"east\", \"edge\"]\n\
             calls = [\"*.{NS}\"]\n{gateway}\
             [access_log]\nmode = \"{access_mode}\"\nsample = 0.1\npath = \"{access}\"\n\
             [[services]]\nname = \"{svc}\"\nnamespace = \"{NS}\"\nports = [{port}]\naddress = \"{ip}\"\nprotocol = \"http\"\n{labels}{health}{edge}",
            name = h.name,
            zone = h.zone,
            servers = servers.join(", "),
            data = dir.join(h.name).display(),
            token = token_file.display(),
            access = parts.logs.join(format!("{}.access.log", h.name)).display(),
            access_mode = args.access_log,
            inbound = p.inbound(i),
            dnsp = p.dns(i),
            admin = p.admin(i),
            net = 77 + i,
            ttl = args.cert_ttl.as_secs().max(10),
            svc = h.service,
            ip = h.app_ip,
            labels = h
                .version
                .map(|v| format!("labels = {{ version = \"{v}\" }}\n"))
                .unwrap_or_default(),
        );
        let path = write_config(dir, &format!("{}.toml", h.name), cfg)?;
        parts.spawn(&format!("agent-{}", h.name), &["agent", "--config", &path])?;
    }

    // The user's shell acts as a workload on the frontend host: its agent's
    // DNS and outbound listeners are the way in.
    let dns = SocketAddr::from(([127, 0, 0, 1], p.dns(0)));
    let front_port = p.app("frontend");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (front_ip, first) = loop {
        parts.check_alive()?;
        let attempt = async {
            let ip = resolve(dns, &format!("frontend.{NS}.mesh")).await?;
            let body = call(SocketAddr::new(ip, front_port)).await?;
            if body.lines().count() < 4 {
                bail!("only part of the path answered:\n{body}");
            }
            Ok((ip, body))
        };
        match attempt.await {
            Ok(x) => break x,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!(
                    "the shop did not answer within 60 s; logs in {}",
                    parts.logs.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let target = SocketAddr::new(front_ip, front_port);
    // Stopped when the mesh is: the guard cancels it as this returns.
    let dashboard_stop = tokio_util::sync::CancellationToken::new();
    let _dashboard_guard = dashboard_stop.clone().drop_guard();
    let dashboard = start_dashboard(p, &server_addr(0), &operator, dashboard_stop).await?;
    write_state(dir, p, target, &dashboard)?;

    noteln!(
        "Trellis dev mesh, up in {:.1} s (state in {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    noteln!(
        "  store     servers east-1 {}, west-1 {} (voters), edge-1 {} (learner)",
        server_addr(0),
        server_addr(1),
        server_addr(2)
    );
    noteln!(
        "  gateways  east/gw1 127.0.0.1:{} (zone: {}), west/gw1 127.0.0.1:{} (zone: {}) (QUIC between zones; west also carries the edge)",
        p.gateway(0),
        p.gateway_zone(0),
        p.gateway(1),
        p.gateway_zone(1)
    );
    for (i, h) in HOSTS.iter().enumerate() {
        noteln!(
            "  {:<9} {:<9} app {}:{}, agent inbound 127.0.0.1:{}, DNS 127.0.0.1:{}, spiffe://{TD}/ns/{NS}/sa/{}",
            h.zone,
            h.service,
            h.app_ip,
            p.app(h.service),
            p.inbound(i as u16),
            p.dns(i as u16),
            h.service
        );
    }
    noteln!(
        "  logs      {}: each part's log, and each agent's access log (one JSON line per request; {})",
        parts.logs.display(),
        match args.access_log.as_str() {
            "sampled" => "a 10 % sample",
            other => other,
        }
    );
    if crate::telemetry::wanted() {
        noteln!(
            "  traces    every part exports spans over OTLP as the OTEL_* environment says (endpoint {})",
            std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_default()
        );
    } else {
        noteln!("  traces    off; set OTEL_EXPORTER_OTLP_ENDPOINT to export spans from every part");
    }
    noteln!();
    noteln!("first response (frontend → auth → catalog → inventory):");
    for l in first.lines() {
        noteln!("  {l}");
    }
    noteln!();
    noteln!("try it (as a workload on the frontend host):");
    noteln!("  dig @127.0.0.1 -p {} frontend.{NS}.mesh +short", p.dns(0));
    noteln!("  curl http://{target}/");
    noteln!(
        "  trellis check --config {} --service catalog.shop   # what a host sees, check by check",
        dir.join("auth-east.toml").display()
    );
    noteln!(
        "  touch {}   # fails inventory's health check in west: traffic moves to the edge",
        dir.join("down").join("inventory-west").display()
    );
    noteln!(
        "  trellis --help; operator credentials: --server {} --credentials {}",
        server_addr(0),
        operator.display()
    );
    noteln!(
        "  trellis top --server {} --credentials {}   # live golden signals per edge",
        server_addr(0),
        operator.display()
    );
    noteln!("  dashboard (read-only; the token opens it): {dashboard}");
    noteln!();

    if args.no_traffic {
        noteln!("no traffic of its own (--no-traffic); Ctrl-C to stop");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return Ok(());
    }
    let (mut ok, mut errors, mut last_error) = (1u64, 0u64, String::new());
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if args.requests.is_some_and(|n| ok + errors >= n) {
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = term.recv() => break,
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
        note!("\r{ok} ok, {errors} errors, {rate:.1} req/s  (Ctrl-C to stop) ");
    }
    noteln!();
    if !last_error.is_empty() {
        noteln!("last error: {last_error}");
    }
    if errors > 0 && args.requests.is_some() {
        bail!("{errors} of {} requests failed", ok + errors);
    }
    Ok(())
}

/// An operator's connection to the store, for tokens.
struct Operator {
    channel: tonic::transport::Channel,
}

impl Operator {
    fn new(server: &str, prefix: &Path) -> Result<Self> {
        Ok(Self {
            channel: trellis_federation::client::connect(server, prefix)?,
        })
    }

    /// Applies one policy document, waiting for the cluster to elect a leader.
    async fn apply(
        &self,
        kind: &str,
        name: &str,
        spec: serde_json::Value,
        parts: &mut Parts,
    ) -> Result<()> {
        let docs = proto::PolicyDocs {
            docs: vec![proto::PolicyDoc {
                key: Some(proto::PolicyKey {
                    kind: kind.into(),
                    name: name.into(),
                }),
                spec_json: spec.to_string(),
            }],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            parts.check_alive()?;
            let r = proto::policy_client::PolicyClient::new(self.channel.clone())
                .apply(docs.clone())
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(s) if Instant::now() > deadline => {
                    bail!("the store did not answer: {}", s.message())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Creates a join token, waiting for the cluster to elect a leader.
    async fn token(&self, req: proto::TokenRequest, parts: &mut Parts) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            parts.check_alive()?;
            let r = proto::zones_client::ZonesClient::new(self.channel.clone())
                .create_join_token(req.clone())
                .await;
            match r {
                Ok(r) => return Ok(r.into_inner().token),
                Err(s) if Instant::now() > deadline => {
                    bail!("the store did not answer: {}", s.message())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

fn write_config(dir: &Path, name: &str, text: String) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.display().to_string())
}

/// The dashboard on its port from the plan, reading as the operator from
/// the first server, with both gateways' admin ports for their links.
/// Returns its URL (token included).
async fn start_dashboard(
    p: &Ports,
    server: &str,
    operator: &Path,
    stop: tokio_util::sync::CancellationToken,
) -> Result<String> {
    let gateway_admins = ["east", "west"]
        .iter()
        .enumerate()
        .map(|(i, z)| {
            (
                format!("{z}/gw1"),
                SocketAddr::from(([127, 0, 0, 1], p.gateway_admin(i as u16))),
            )
        })
        .collect();
    let source = crate::cli::dashboard::Source {
        channel: trellis_federation::client::connect(server, operator)?,
        credentials: operator.to_path_buf(),
        read: proto::ReadOptions::default(),
        gateway_admins,
        audit_limit: 50,
        members: Default::default(),
    };
    let running = crate::cli::dashboard::start(p.dashboard(), source, stop)
        .await
        .context("starting the dashboard")?;
    Ok(running.url)
}

/// Every address, for scripts and tests (`state.json`). It holds the
/// dashboard's token, as the state directory holds the operator's key.
fn write_state(dir: &Path, p: &Ports, target: SocketAddr, dashboard: &str) -> Result<()> {
    let hosts: Vec<serde_json::Value> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let i = i as u16;
            serde_json::json!({
                "name": h.name, "service": h.service, "zone": h.zone,
                "app": format!("{}:{}", h.app_ip, p.app(h.service)),
                "inbound": format!("127.0.0.1:{}", p.inbound(i)),
                "dns": format!("127.0.0.1:{}", p.dns(i)),
                "admin": format!("127.0.0.1:{}", p.admin(i)),
                "config": dir.join(format!("{}.toml", h.name)),
                "log": dir.join("logs").join(format!("agent-{}.log", h.name)),
                "down_switch": dir.join("down").join(h.name),
                "faults": dir.join("faults").join(h.name),
                "version": h.version,
            })
        })
        .collect();
    let state = serde_json::json!({
        "trust_domain": TD,
        "servers": (0..3).map(|i| format!("127.0.0.1:{}", p.server(i))).collect::<Vec<_>>(),
        "server_dns": (0..2).map(|i| format!("127.0.0.1:{}", p.server_dns(i))).collect::<Vec<_>>(),
        "gateways": { "east": format!("127.0.0.1:{}", p.gateway(0)), "west": format!("127.0.0.1:{}", p.gateway(1)) },
        "operator": dir.join("operator"),
        "ca_dir": dir.join("ca"),
        "frontend": target.to_string(),
        "dashboard": dashboard,
        "gateway_admin": { "east": format!("127.0.0.1:{}", p.gateway_admin(0)), "west": format!("127.0.0.1:{}", p.gateway_admin(1)) },
        "hosts": hosts,
    });
    std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
    Ok(())
}

/// Resolves a name with one DNS server (A record).
async fn resolve(server: SocketAddr, name: &str) -> Result<IpAddr> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&m.to_vec()?, server).await?;
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .map_err(|_| anyhow!("{server} did not answer for {name}"))??;
    let reply = Message::from_vec(&buf[..n])?;
    reply
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .ok_or_else(|| anyhow!("{name}: no address ({})", reply.metadata.response_code))
}

/// One plain HTTP/1.1 GET, as an app would send it to its agent.
async fn call(target: SocketAddr) -> Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(target).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: frontend.shop.mesh\r\nconnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP response from {target}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "{}: {}",
                head.lines().next().unwrap_or_default(),
                body.trim()
            );
        }
        Ok(body.trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("no answer from {target} within 10 s"))?
}
