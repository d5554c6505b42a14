//! `trellis demo-app --call` as processes: a chain of demo apps answers with
//! every hop, resolving names by IP literal, the system resolver and a DNS
//! server given with --dns; a failing or silent downstream turns into a 502
//! that says why, within the call timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// A demo-app process, killed when dropped.
struct App {
    child: Child,
    addr: SocketAddr,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo_app(name: &str, zone: &str, extra: &[&str]) -> App {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["demo-app", "--name", name, "--zone", zone])
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("could not run the trellis binary");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("demo-app {name} did not start: {line:?}"));
    App { child, addr }
}

/// One GET with `connection: close`: the status line and the body.
fn get(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("no header end");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// A DNS server on UDP that knows `inventory.shop.mesh` as 127.0.0.1 and
/// nothing else (NXDOMAIN), as the agent's mesh DNS would answer.
fn mesh_dns() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            let q = req.queries[0].clone();
            let name = q.name().to_ascii().to_lowercase();
            if name == "inventory.shop.mesh." {
                if q.query_type() == RecordType::A {
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        5,
                        RData::A(A::new(127, 0, 0, 1)),
                    ));
                }
            } else {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            resp.add_query(q);
            let _ = sock.send_to(&resp.to_vec().unwrap(), from);
        }
    });
    addr
}

#[test]
fn a_chain_answers_with_every_hop_and_a_failure_with_502() {
    let dns = mesh_dns().to_string();
    let inventory = demo_app("inventory", "west", &[]);
    let inventory_url = format!("http://inventory.shop.mesh:{}/", inventory.addr.port());
    let catalog = demo_app(
        "catalog",
        "west",
        &["--call", &inventory_url, "--dns", &dns],
    );
    // The system resolver: localhost may come back as ::1 first, where
    // nothing listens, so this also checks that the next address is tried.
    let auth_url = format!("http://localhost:{}/", catalog.addr.port());
    let auth = demo_app("auth", "east", &["--call", &auth_url]);
    let frontend_url = format!("http://{}/", auth.addr);
    let frontend = demo_app("frontend", "east", &["--call", &frontend_url]);

    let (status, body) = get(frontend.addr);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert_eq!(
        body,
        "frontend in zone east answered over plain HTTP\n\
         -> auth in zone east answered over plain HTTP\n\
         -> catalog in zone west answered over plain HTTP\n\
         -> inventory in zone west answered over plain HTTP\n"
    );

    // The last hop goes away: every hop above it answers 502, and the body
    // keeps the path up to the failure and its reason.
    let port = inventory.addr.port();
    drop(inventory);
    let (status, body) = get(frontend.addr);
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "frontend in zone east answered over plain HTTP",
            "-> auth in zone east answered over plain HTTP",
            "-> catalog in zone west answered over plain HTTP",
        ],
        "{body}"
    );
    assert!(
        lines[3].starts_with(&format!(
            "-> call to {inventory_url} failed: could not connect to 127.0.0.1:{port}: "
        )),
        "{body}"
    );
    assert_eq!(
        lines[4..],
        [
            format!("-> call to {auth_url} failed: answered 502 Bad Gateway"),
            format!("-> call to {frontend_url} failed: answered 502 Bad Gateway"),
        ],
        "{body}"
    );
}

#[test]
fn unknown_names_and_silent_downstreams_answer_502_within_the_timeout() {
    let dns = mesh_dns().to_string();
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/", silent.local_addr().unwrap());
    let app = demo_app(
        "frontend",
        "east",
        &[
            "--call",
            "http://nowhere.shop.mesh:8080/",
            "--call",
            &silent_url,
            "--dns",
            &dns,
            "--call-timeout",
            "300ms",
        ],
    );
    let start = Instant::now();
    let (status, body) = get(app.addr);
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{body}");
    assert_eq!(
        body,
        format!(
            "frontend in zone east answered over plain HTTP\n\
             -> call to http://nowhere.shop.mesh:8080/ failed: could not resolve nowhere.shop.mesh with DNS server {dns}: no such name (NXDOMAIN)\n\
             -> call to {silent_url} failed: no answer within 300ms\n"
        )
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(silent);
}

#[test]
fn a_call_url_that_is_not_plain_http_is_refused_naming_the_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["demo-app", "--name", "a", "--zone", "east"])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--call",
            "https://auth.shop.mesh/",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--call") && err.contains("write http://"),
        "{err}"
    );
}
