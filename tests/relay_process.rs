//! `trellis relay` as a real process on loopback, between a UDP echo and a
//! TCP echo sharing one port: every round trip through it takes at least
//! twice the delay, data arrives intact and in order, replies reach the
//! right UDP client, and SIGTERM stops it cleanly.
//!
//! Timing is checked only from below: the relay holds each datagram and
//! chunk for the delay by construction, while an upper bound would measure
//! how busy the machine is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const DELAY: Duration = Duration::from_millis(40);
/// How long any single read may wait before the test calls it lost.
const PATIENCE: Duration = Duration::from_secs(10);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP echo and a UDP echo on the same loopback port, each on its own
/// threads for the rest of the test process.
fn echo_servers() -> SocketAddr {
    // Port 0 gives TCP a free port; UDP may have it taken, so retry.
    let (tcp, udp) = (0..20)
        .find_map(|_| {
            let t = TcpListener::bind("127.0.0.1:0").unwrap();
            let u = UdpSocket::bind(t.local_addr().unwrap()).ok()?;
            Some((t, u))
        })
        .expect("no loopback port free for both TCP and UDP");
    let addr = tcp.local_addr().unwrap();
    thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                // Echo until the client closes, then close our side too.
                let _ = std::io::copy(&mut conn, &mut back);
                let _ = back.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 65_535];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Starts the relay and reads back the address it bound.
fn start_relay(to: SocketAddr) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["relay", "--listen", "127.0.0.1:0", "--to"])
        .arg(to.to_string())
        .args(["--delay", &format!("{}ms", DELAY.as_millis())])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "relay listening on 127.0.0.1:X (tcp+udp), forwarding to ..."
    let addr = line
        .strip_prefix("relay listening on ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no listening line: {line:?}"));
    assert!(line.contains("(tcp+udp)"), "{line:?}");
    (Proc(child), addr.parse().unwrap())
}

fn udp_client(relay: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(relay).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

#[test]
fn relay_delays_both_ways_keeps_order_and_stops_on_sigterm() {
    let echo = echo_servers();
    let (mut relay, addr) = start_relay(echo);

    // UDP round trip: at least twice the delay.
    let a = udp_client(addr);
    let mut buf = [0u8; 65_535];
    for _ in 0..3 {
        let t = Instant::now();
        a.send(b"ping").unwrap();
        let n = a.recv(&mut buf).expect("no UDP echo through the relay");
        let rtt = t.elapsed();
        assert_eq!(&buf[..n], b"ping");
        assert!(rtt >= 2 * DELAY, "UDP round trip {rtt:?} < 2 x {DELAY:?}");
    }

    // Two clients at once, each a flow of its own: every datagram comes back
    // to the client that sent it, intact and in order. The relay releases
    // the burst all at once after the delay, as a delay line should, so it
    // is kept small enough for the echo's default socket buffer (~208 KiB):
    // loss there would be the test's, not the relay's.
    let b = udp_client(addr);
    let payload = |client: u8, i: u32| -> Vec<u8> {
        let mut p = vec![client; 200 + 50 * i as usize];
        p[..4].copy_from_slice(&i.to_be_bytes());
        p
    };
    const N: u32 = 20;
    for i in 0..N {
        a.send(&payload(b'a', i)).unwrap();
        b.send(&payload(b'b', i)).unwrap();
    }
    for (sock, client) in [(&a, b'a'), (&b, b'b')] {
        for i in 0..N {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("client {} datagram {i} lost: {e}", client as char));
            assert_eq!(
                buf[..n],
                payload(client, i)[..],
                "client {} datagram {i}",
                client as char
            );
        }
    }

    // TCP round trip on one connection: at least twice the delay per
    // exchange (each chunk is held once each way).
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    for i in 0..3u8 {
        let t = Instant::now();
        c.write_all(&[i]).unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        let rtt = t.elapsed();
        assert_eq!(one, [i]);
        assert!(rtt >= 2 * DELAY, "TCP round trip {rtt:?} < 2 x {DELAY:?}");
    }

    // A stream much larger than one chunk, written while the echo is read:
    // it comes back byte for byte, then the half-close crosses both ways.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut writer = c.try_clone().unwrap();
    let sent = data.clone();
    let w = thread::spawn(move || {
        for chunk in sent.chunks(10_000) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    w.join().unwrap();
    assert_eq!(back.len(), data.len(), "TCP stream length");
    assert!(back == data, "TCP stream corrupted or reordered");
    drop(c);

    // SIGTERM: it drains (nothing open) and exits 0.
    let pid = nix::unistd::Pid::from_raw(relay.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = relay.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay still running after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "relay exited with {status} after SIGTERM");
}
