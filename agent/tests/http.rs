//! The HTTP-aware sidecar with real clients: curl over HTTP/1.1 (keep-alive,
//! chunked uploads, `Connection: close`) and HTTP/2, a WebSocket upgrade, a
//! protocol in which the server speaks first, Python grpcio unary and
//! streaming calls, refusals that say why, and the request metrics counting
//! what the clients sent. Every app connection rides one pooled mTLS
//! connection between the two sidecars.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use trellis_agent::{Agent, AgentConfig, Protocol};
use trellis_gateway::config::Transport;
use trellis_gateway::testing::{Pki, Running, config, peer, service};

mod support;
use support::{agent_config, catalog, local, metrics};

fn loopback() -> IpAddr {
    IpAddr::from([127, 78, fastrand::u8(1..255), fastrand::u8(1..255)])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(cfg: AgentConfig) -> (SocketAddr, SocketAddr, CancellationToken) {
    let agent = Agent::bind(cfg).await.unwrap();
    let admin = agent.admin_addr().unwrap();
    let inbound = agent.inbound_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));
    (inbound, admin, stop)
}

/// The value of the sample whose line contains every one of `parts`.
fn sample(metrics: &str, name: &str, parts: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The app: HTTP/1.1 and HTTP/2 on one port. `/echo` answers with the
/// request body and what it saw (`x-seen-version`, `x-seen-host`,
/// `x-seen-xfcc`); `/ws` upgrades and echoes bytes; anything else is 200 `hello`.
async fn http_app(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let seen = format!("{:?}", req.version());
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap_or("").to_owned())
                        .or_else(|| req.uri().authority().map(|a| a.to_string()))
                        .unwrap_or_default();
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|h| h.to_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    let leaked = req
                        .headers()
                        .keys()
                        .any(|k| k.as_str().starts_with("trellis-"));
                    let connect = req.method() == http::Method::CONNECT;
                    let r = match req.uri().path() {
                        _ if connect => {
                            // An app's own CONNECT (it uses the service as a
                            // proxy): 200, then the tunnel echoes.
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(up.await.unwrap());
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            Response::new(Full::new(Bytes::new()))
                        }
                        "/echo" => {
                            let body = req.body_mut().collect().await.unwrap().to_bytes();
                            Response::builder()
                                .header("x-seen-version", seen)
                                .header("x-seen-host", host)
                                .header("x-seen-xfcc", xfcc)
                                .header("x-seen-trellis-headers", leaked.to_string())
                                .body(Full::new(body))
                                .unwrap()
                        }
                        "/ws" => {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(up.await.unwrap());
                                let mut buf = [0u8; 1024];
                                loop {
                                    match io.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => {
                                            if io.write_all(&buf[..n]).await.is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            });
                            Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                                .body(Full::new(Bytes::new()))
                                .unwrap()
                        }
                        _ => Response::new(Full::new(Bytes::from_static(b"hello\n"))),
                    };
                    Ok::<_, Infallible>(r)
                });
                // No `date`: the test checks that the sidecars add no header.
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                b.http1().auto_date_header(false);
                b.http2().auto_date_header(false);
                let _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
            });
        }
    });
}

/// Two sidecars in one zone: `frontend`'s calls `catalog` at the returned
/// loopback address; catalog's app listens on `port`.
struct Pair {
    via: SocketAddr,
    caller_admin: SocketAddr,
    server_admin: SocketAddr,
    stops: Vec<CancellationToken>,
    pki: Pki,
    tmp: tempfile::TempDir,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for s in &self.stops {
            s.cancel();
        }
    }
}

impl Pair {
    /// Rewrites both services' credentials (a renewal each).
    fn renew(&self, port: u16) {
        local(&self.pki, self.tmp.path(), "east", "catalog", port);
        local(&self.pki, self.tmp.path(), "east", "frontend", 18000);
    }
}

async fn pair(port: u16, protocol: Protocol, xfcc: bool) -> Pair {
    pair_with(port, protocol, |server, _| {
        server.proxy.forward_client_cert = xfcc;
    })
    .await
}

/// A pair whose configurations `tune` adjusts (server's, then caller's).
async fn pair_with(
    port: u16,
    protocol: Protocol,
    tune: impl FnOnce(&mut AgentConfig, &mut AgentConfig),
) -> Pair {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let mut server = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "catalog", port)],
    );
    let mut client = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    tune(&mut server, &mut client);
    let (inbound, server_admin, s_stop) = start(server).await;
    let addr = loopback();
    client.upstreams = vec![catalog(addr, port, vec![inbound], &[], protocol)];
    let (_, caller_admin, c_stop) = start(client).await;
    Pair {
        via: SocketAddr::new(addr, port),
        caller_admin,
        server_admin,
        stops: vec![s_stop, c_stop],
        pki,
        tmp,
    }
}

/// A response head, read byte by byte so nothing after it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed in the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_http2_rides_one_pooled_connection_and_is_counted() {
    let port = free_port();
    http_app(port).await;
    let p = pair(port, Protocol::Detect, true).await;
    let base = format!("http://{}", p.via);

    // HTTP/1.1: five requests on one keep-alive connection.
    let (out, err) = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            let url = format!("{base}/");
            let mut args: Vec<&str> = vec!["-w", "%{http_code} %{num_connects}\n"];
            for _ in 0..5 {
                args.extend(["-o", "/dev/null", url.as_str()]);
            }
            curl(&args)
        }
    })
    .await
    .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out} {err}");
    assert_eq!(lines[0], "200 1", "{out}");
    assert!(
        lines[1..].iter().all(|l| *l == "200 0"),
        "keep-alive: {out}"
    );

    // A chunked upload of 1 MiB comes back whole, with the app's Host.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(tmp.path(), &body).unwrap();
    let file = format!("@{}", tmp.path().display());
    let url = format!("{base}/echo");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let dest = out_file.path().display().to_string();
    let headers = {
        let (file, url, dest) = (file.clone(), url.clone(), dest.clone());
        tokio::task::spawn_blocking(move || {
            curl(&[
                "-D",
                "-",
                "-o",
                &dest,
                "-H",
                "Transfer-Encoding: chunked",
                "-H",
                "Host: catalog.shop.mesh",
                "--data-binary",
                &file,
                &url,
            ])
        })
        .await
        .unwrap()
        .0
    };
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(headers.contains("x-seen-version: HTTP/1.1"), "{headers}");
    assert!(
        headers.contains("x-seen-host: catalog.shop.mesh"),
        "{headers}"
    );
    assert!(
        headers.contains("x-seen-trellis-headers: false"),
        "{headers}"
    );
    assert!(
        headers.contains("x-seen-xfcc: By=spiffe://trellis.local/ns/shop/sa/catalog;URI=spiffe://trellis.local/ns/shop/sa/frontend"),
        "{headers}"
    );
    assert!(
        !headers.to_lowercase().contains("\ndate:"),
        "no header the app did not send: {headers}"
    );
    assert_eq!(std::fs::read(out_file.path()).unwrap(), body);

    // HTTP/2 with prior knowledge: the app sees HTTP/2.
    let url2 = url.clone();
    let (out, err) = tokio::task::spawn_blocking(move || {
        curl(&["--http2-prior-knowledge", "-D", "-", "-d", "h2 body", &url2])
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/2 200"), "{out} {err}");
    assert!(out.contains("x-seen-version: HTTP/2.0"), "{out}");
    assert!(out.ends_with("h2 body"), "{out}");

    // Twenty new connections with `Connection: close`: still one handshake.
    for _ in 0..20 {
        let u = format!("{base}/");
        let (out, _) = tokio::task::spawn_blocking(move || {
            curl(&[
                "-H",
                "Connection: close",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &u,
            ])
        })
        .await
        .unwrap();
        assert_eq!(out, "200");
    }

    // The metrics count what the clients sent, at both ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics(p.caller_admin).await;
    let source = [
        "reporter=\"source\"",
        "destination_service=\"catalog.shop.mesh\"",
        "source_workload=\"frontend\"",
        "destination_workload=\"catalog\"",
        "response_code=\"200\"",
        "source_zone=\"east\"",
        "destination_zone=\"east\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(sample(&m, "trellis_requests_total{", &source), 27, "{m}");
    let d = metrics(p.server_admin).await;
    let dest_labels = [
        "reporter=\"destination\"",
        "response_code=\"200\"",
        "source_zone=\"east\"",
    ];
    assert_eq!(
        sample(&d, "trellis_requests_total{", &dest_labels),
        27,
        "{d}"
    );
    assert!(
        sample(&m, "trellis_request_bytes_sum{", &source) >= 1024 * 1024,
        "{m}"
    );
    // 27 requests on 23 client connections, one TLS handshake between sidecars.
    assert_eq!(sample(&m, "trellis_pool_handshakes_total", &[]), 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_and_echo() {
    let port = free_port();
    http_app(port).await;
    let p = pair(port, Protocol::Detect, false).await;
    let mut s = TcpStream::connect(p.via).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: catalog\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // A masked text frame "hi", echoed back as bytes by the app.
    let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    for _ in 0..3 {
        s.write_all(&frame).await.unwrap();
        let mut back = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, frame);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_connect_passes_and_tunnels() {
    let port = free_port();
    http_app(port).await;
    let p = pair(port, Protocol::Detect, false).await;
    let mut s = TcpStream::connect(p.via).await.unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"tunnelled bytes").await.unwrap();
    let mut back = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"tunnelled bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_before_it_is_sent() {
    let port = free_port();
    http_app(port).await;
    let p = pair_with(port, Protocol::Detect, |_, client| {
        client.proxy.max_body_bytes = Some(1000);
    })
    .await;
    let url = format!("http://{}/echo", p.via);
    let small = "x".repeat(1000);
    let big = "x".repeat(1001);
    let (u, b) = (url.clone(), big.clone());
    let (out, _) = tokio::task::spawn_blocking(move || curl(&["-D", "-", "-d", &b, &u]))
        .await
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.contains("trellis-error: request body over the 1000-byte limit"),
        "{out}"
    );
    let (out, _) = tokio::task::spawn_blocking(move || curl(&["-d", &small, &url]))
        .await
        .unwrap();
    assert_eq!(out.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_where_the_server_speaks_first_is_not_broken_by_detection() {
    let port = free_port();
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 greetings from the server\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s.write_all(&buf[..n]).await;
            });
        }
    });
    let p = pair(port, Protocol::Detect, false).await;
    let mut s = TcpStream::connect(p.via).await.unwrap();
    let mut greeting = [0u8; 31];
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("the greeting arrives")
        .unwrap();
    assert_eq!(&greeting, b"220 greetings from the server\r\n");
    // It waited for the detection timeout (100 ms by default), not longer.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"QUIT\r\n");
    let m = metrics(p.caller_admin).await;
    assert_eq!(
        sample(
            &m,
            "trellis_tcp_connections_opened_total{",
            &["reporter=\"source\""]
        ),
        1,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_unreachable_destinations_503_with_a_reason() {
    let port = free_port();
    http_app(port).await;
    let p = pair(port, Protocol::Detect, false).await;

    // A header line without a colon.
    let mut s = TcpStream::connect(p.via).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    // Headers over the limit (64 KiB by default): refused, the agent lives.
    let mut s = TcpStream::connect(p.via).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 431") || out.is_empty(), "{out}");
    let (ok, _) = tokio::task::spawn_blocking({
        let u = format!("http://{}/", p.via);
        move || curl(&["-o", "/dev/null", "-w", "%{http_code}", &u])
    })
    .await
    .unwrap();
    assert_eq!(ok, "200");

    // A destination whose app is gone: 503 with the reason, for HTTP.
    // A port bound but not listening: connections to it are refused, and no
    // other test can take it meanwhile.
    let hold = tokio::net::TcpSocket::new_v4().unwrap();
    hold.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = hold.local_addr().unwrap().port();
    let p2 = pair(dead, Protocol::Http, false).await;
    let u = format!("http://{}/", p2.via);
    let (out, _) = tokio::task::spawn_blocking(move || curl(&["-D", "-", &u]))
        .await
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.contains("trellis-error: catalog.shop: the app did not answer"),
        "{out}"
    );

    // For TCP the connection is reset (no bytes, an error or an empty read).
    let p3 = pair(dead, Protocol::Tcp, false).await;
    // (On loopback the reset can beat the connect itself.)
    if let Ok(mut s) = TcpStream::connect(p3.via).await {
        let _ = s.write_all(b"hello").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(r.is_err() || buf.is_empty(), "{r:?} {buf:?}");
    }
}

/// The gRPC server and client, Python grpcio with raw-bytes handlers (no
/// generated code): unary `Echo/Say` and bidirectional `Echo/Chat`.
const GRPC_PY: &str = r#"
import sys, grpc
from concurrent import futures
ident = lambda b: b
def serve(port):
    def say(req, ctx):
        if req == b"fail":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b"said:" + req
    def chat(it, ctx):
        for m in it:
            yield b"echo:" + m
    h = grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say, ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
    })
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    s.add_generic_rpc_handlers((h,))
    s.add_insecure_port("127.0.0.1:%d" % port)
    s.start()
    print("ready", flush=True)
    s.wait_for_termination()
def call(target):
    ch = grpc.insecure_channel(target)
    say = ch.unary_unary("/test.Echo/Say", ident, ident)
    for i in range(10):
        assert say(b"x%d" % i, timeout=10) == b"said:x%d" % i
    try:
        say(b"fail", timeout=10)
        raise SystemExit("expected NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        assert e.details() == "no such thing", e.details()
    chat = ch.stream_stream("/test.Echo/Chat", ident, ident)
    got = [m for m in chat(iter([b"a", b"b", b"c"]), timeout=10)]
    assert got == [b"echo:a", b"echo:b", b"echo:c"], got
    print("ok", flush=True)
def l7(target):
    ch = grpc.insecure_channel(target)
    say = ch.unary_unary("/test.Echo/Say", ident, ident)
    assert say(b"x", timeout=10) == b"said:x"
    chat = ch.stream_stream("/test.Echo/Chat", ident, ident)
    try:
        list(chat(iter([b"a"]), timeout=10))
        raise SystemExit("expected PERMISSION_DENIED")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        assert "not in any allow list" in e.details(), e.details()
    print("ok", flush=True)
if sys.argv[1] == "serve":
    serve(int(sys.argv[2]))
elif sys.argv[1] == "l7":
    l7(sys.argv[2])
else:
    call(sys.argv[2])
"#;

/// The Python gRPC echo server, running; dropped, it is killed.
struct GrpcEcho {
    py: &'static str,
    _dir: tempfile::TempDir,
    script: std::path::PathBuf,
    port: u16,
    _server: tokio::process::Child,
}

impl GrpcEcho {
    /// The server, ready; `None` (the test skips) without grpcio outside CI.
    async fn start() -> Option<Self> {
        let Some(py) = python_with_grpc() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have python3-grpcio (.ci/run installs it)"
            );
            eprintln!("skipped: no Python with grpcio here (apt-get install python3-grpcio)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("echo.py");
        std::fs::write(&script, GRPC_PY).unwrap();
        let port = free_port();
        let mut server = tokio::process::Command::new(py)
            .arg(&script)
            .args(["serve", &port.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut ready = [0u8; 5];
        server
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .await
            .unwrap();
        Some(Self {
            py,
            _dir: dir,
            script,
            port,
            _server: server,
        })
    }

    /// Runs the client script's `mode` against `target`; it must succeed.
    async fn client(&self, mode: &str, target: SocketAddr) {
        let out = tokio::process::Command::new(self.py)
            .arg(&self.script)
            .args([mode, &target.to_string()])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn python_with_grpc() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import grpc"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_errors_and_streaming_pass_end_to_end() {
    let Some(echo) = GrpcEcho::start().await else {
        return;
    };
    let port = echo.port;
    let p = pair(port, Protocol::Detect, false).await;
    echo.client("call", p.via).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics(p.caller_admin).await;
    let ok = [
        "reporter=\"source\"",
        "request_protocol=\"grpc\"",
        "grpc_response_status=\"0\"",
    ];
    assert_eq!(sample(&m, "trellis_requests_total{", &ok), 11, "{m}");
    let nf = ["reporter=\"source\"", "grpc_response_status=\"5\""];
    assert_eq!(sample(&m, "trellis_requests_total{", &nf), 1, "{m}");
    let d = metrics(p.server_admin).await;
    let dst = ["reporter=\"destination\"", "request_protocol=\"grpc\""];
    assert_eq!(sample(&d, "trellis_requests_total{", &dst), 12, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_method_outside_the_allowed_paths_gets_permission_denied() {
    let Some(echo) = GrpcEcho::start().await else {
        return;
    };
    let port = echo.port;
    // The callee's file allows one method; the store's documents take the
    // same form.
    let p = pair_with(port, Protocol::Grpc, |server, _| {
        server.authorization = vec![trellis_agent::AuthzRule {
            service: "catalog.shop".into(),
            allow: vec![serde_json::json!({"methods": ["POST"], "paths": ["/test.Echo/Say"]})],
            deny: vec![],
        }];
    })
    .await;
    echo.client("l7", p.via).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_crosses_zones_through_both_gateways_on_one_pooled_connection() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    http_app(port).await;
    let (w_inbound, _, w_stop) = start(agent_config(
        "west",
        vec![local(&pki, tmp.path(), "west", "catalog", port)],
    ))
    .await;
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![service("catalog", &["east"], vec![w_inbound])];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west.addrs.tcp, Transport::Quic)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    let addr = loopback();
    let mut cfg = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    cfg.gateway = Some(east.addrs.tcp);
    cfg.upstreams = vec![catalog(addr, port, vec![], &["west"], Protocol::Detect)];
    let (_, admin, e_stop) = start(cfg).await;
    for i in 0..10 {
        let u = format!("http://{}/echo", SocketAddr::new(addr, port));
        let body = format!("across {i}");
        let (out, err) = tokio::task::spawn_blocking(move || {
            curl(&["-H", "Connection: close", "-d", &body, &u])
        })
        .await
        .unwrap();
        assert_eq!(out, format!("across {i}"), "{err}");
    }
    let m = metrics(admin).await;
    let labels = [
        "reporter=\"source\"",
        "destination_zone=\"west\"",
        "response_code=\"200\"",
    ];
    assert_eq!(sample(&m, "trellis_requests_total{", &labels), 10, "{m}");
    assert_eq!(sample(&m, "trellis_pool_handshakes_total", &[]), 1, "{m}");
    // The gateways saw one tunnelled connection, not ten.
    let g = east.metrics().await;
    assert!(
        g.contains(r#"service="catalog.shop",outcome="accepted"} 1"#),
        "{g}"
    );
    e_stop.cancel();
    w_stop.cancel();
    east.stop().await;
    west.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_pooled_http_load_with_no_failed_request() {
    let port = free_port();
    http_app(port).await;
    let p = pair_with(port, Protocol::Http, |server, client| {
        server.credentials_poll = Duration::from_millis(50);
        client.credentials_poll = Duration::from_millis(50);
        // The reaper runs every quarter of this.
        client.proxy.pool_idle_timeout = Duration::from_secs(4);
    })
    .await;
    let admin = p.caller_admin;
    let url: http::Uri = format!("http://{}/echo", p.via).parse().unwrap();

    // Four keep-alive clients post back to back while both sides'
    // certificates are replaced five times.
    let stop = CancellationToken::new();
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut load = Vec::new();
    for w in 0..4 {
        let (stop, http, url) = (stop.clone(), http.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.is_cancelled() {
                i += 1;
                let body = format!("{w}-{i}");
                let req = Request::post(url.clone())
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                match http.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let got = r.into_body().collect().await.unwrap().to_bytes();
                        if got == body.as_bytes() {
                            ok += 1;
                        } else {
                            failed.push(format!("wrong body {got:?}"));
                        }
                    }
                    Ok(r) => failed.push(format!("{} {:?}", r.status(), r.headers())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        p.renew(port);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    assert!(ok > 100, "only {ok} requests ran");
    // Each renewal of the caller's certificate made a fresh handshake.
    let m = metrics(admin).await;
    let handshakes = sample(&m, "trellis_pool_handshakes_total", &[]);
    assert!(
        (2..=12).contains(&handshakes),
        "{handshakes} handshakes for 5 renewals: {m}"
    );
    eprintln!("{ok} requests, {handshakes} handshakes across 5 renewals");
    // Connections made under an older certificate close once idle; the
    // current one stays until its idle timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let m = metrics(admin).await;
        let open = sample(&m, "trellis_pool_connections ", &[]);
        if open == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} pooled connections left after 5 renewals: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_the_pooled_protocol_gets_one_tls_connection_per_app_connection() {
    // An older agent's inbound: mutual TLS with the workload identity, no
    // ALPN, bytes to and from the app (here: echoed).
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let old_inbound = trellis_gateway::testing::tls_echo(&pki, "east", "catalog").await;
    let addr = loopback();
    let mut client = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    client.upstreams = vec![catalog(addr, 7000, vec![old_inbound], &[], Protocol::Tcp)];
    let (_, admin, stop) = start(client).await;
    for i in 0..3 {
        let mut s = TcpStream::connect(SocketAddr::new(addr, 7000))
            .await
            .unwrap();
        let msg = format!("old peer {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    let m = metrics(admin).await;
    assert_eq!(sample(&m, "trellis_pool_handshakes_total", &[]), 3, "{m}");
    stop.cancel();
}
