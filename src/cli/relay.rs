//! `trellis relay` (hidden): a user-space delay line for the testbed.
//!
//! The testbed kernel has no `tc netem`, so inter-zone latency is made here
//! instead: the relay listens on one address, forwards to another, and holds
//! every UDP datagram and every TCP chunk for `--delay` in each direction.
//! UDP is relayed per client address (one upstream socket per client), so a
//! QUIC connection through the relay keeps a stable 4-tuple at both ends.
//! Order is kept per flow and per TCP direction: the delay is constant, so
//! a FIFO of due times is already sorted.
//!
//! What it leaves out: loss, jitter and bandwidth limits, and delaying the
//! TCP handshake itself (only data and FIN are delayed; a connect costs one
//! loopback round trip more than on a real delayed link).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{UsageError, shutdown_on_signals};

/// Largest UDP payload; a smaller buffer would truncate datagrams silently.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued per flow and direction; more are dropped, as a router
/// drops on a full queue, rather than growing memory without bound.
const UDP_QUEUE: usize = 4096;
/// TCP chunks in flight per direction. Reading stops when it is full, which
/// passes backpressure on to the sender (2 MiB with 64 KiB reads).
const TCP_CHUNKS: usize = 32;
const TCP_READ: usize = 64 * 1024;
/// How long a connect to the target may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times to look for a port free for both TCP and UDP when
/// `--listen` asks for port 0.
const BIND_ATTEMPTS: usize = 20;

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Where to listen (the same port for TCP and UDP; port 0 picks one).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward to.
    #[arg(long)]
    to: SocketAddr,
    /// How long each datagram or chunk is held, in each direction, e.g. 20ms.
    /// The round trip grows by twice this.
    #[arg(long, value_parser = parse_delay)]
    delay: Duration,
    /// Relay UDP (with --tcp: both; neither flag: both).
    #[arg(long)]
    udp: bool,
    /// Relay TCP (with --udp: both; neither flag: both).
    #[arg(long)]
    tcp: bool,
    /// A UDP flow with no datagram either way for this long is forgotten.
    /// Longer than QUIC's usual 30 s idle timeout, so the relay never ends a
    /// flow its endpoints still consider alive.
    #[arg(long, default_value = "60s", value_parser = crate::cli::parse_duration)]
    udp_idle_timeout: Duration,
    /// On SIGTERM, how long open TCP connections may go on before they are cut.
    #[arg(long, default_value = "5s", value_parser = parse_delay)]
    drain_deadline: Duration,
}

/// Like `parse_duration`, but zero is allowed: a zero-delay relay is a plain
/// forwarder, handy as a baseline.
fn parse_delay(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a number and a unit, e.g. 20ms, 1s)"))
}

/// The sockets the relay listens on, bound before anything is announced.
struct Listeners {
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
    addr: SocketAddr,
}

impl RelayArgs {
    pub(crate) fn run(self) -> Result<()> {
        let (udp, tcp) = match (self.udp, self.tcp) {
            (false, false) => (true, true),
            flags => flags,
        };
        if self.listen == self.to {
            return Err(UsageError(format!(
                "invalid configuration: --to: {} is the --listen address; the relay would feed itself",
                self.to
            ))
            .into());
        }
        // One thread is enough: the relay mostly sleeps on timers and sockets,
        // and the testbed machine's two cores belong to the mesh processes.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not start the async runtime")?
            .block_on(self.serve(udp, tcp))
    }

    async fn serve(self, udp: bool, tcp: bool) -> Result<()> {
        let l = bind(self.listen, tcp, udp)
            .await
            .with_context(|| format!("could not listen on {}", self.listen))?;
        let protocols = match (l.tcp.is_some(), l.udp.is_some()) {
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            _ => "udp",
        };
        // Scripts and tests read this line for the bound address.
        noteln!(
            "relay listening on {} ({protocols}), forwarding to {} with {} each way",
            l.addr,
            self.to,
            humantime::format_duration(self.delay)
        );
        let shutdown = CancellationToken::new();
        shutdown_on_signals(shutdown.clone())?;
        let Listeners {
            tcp: tcp_listener,
            udp: udp_socket,
            ..
        } = l;
        let (args, sd) = (&self, shutdown.clone());
        let udp_task = async move {
            match udp_socket {
                Some(s) => relay_udp(s, args, sd).await,
                None => Ok(()),
            }
        };
        let sd = shutdown.clone();
        let tcp_task = async move {
            match tcp_listener {
                Some(s) => relay_tcp(s, args, sd).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(udp_task, tcp_task)?;
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Binds TCP and UDP on the same port. With port 0, the port TCP got may be
/// taken for UDP, so a few ports are tried.
async fn bind(listen: SocketAddr, tcp: bool, udp: bool) -> io::Result<Listeners> {
    if !tcp {
        let u = UdpSocket::bind(listen).await?;
        let addr = u.local_addr()?;
        return Ok(Listeners {
            tcp: None,
            udp: Some(u),
            addr,
        });
    }
    let attempts = if listen.port() == 0 && udp {
        BIND_ATTEMPTS
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let t = TcpListener::bind(listen).await?;
        let addr = t.local_addr()?;
        if !udp {
            return Ok(Listeners {
                tcp: Some(t),
                udp: None,
                addr,
            });
        }
        match UdpSocket::bind(addr).await {
            Ok(u) => {
                return Ok(Listeners {
                    tcp: Some(t),
                    udp: Some(u),
                    addr,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port free for both TCP and UDP")))
}

// === UDP ===

/// A datagram and the moment it may be sent on.
type Held = (Instant, Vec<u8>);

/// Receives from clients and hands each datagram, stamped with its due time,
/// to that client's flow. Flows end themselves when idle.
async fn relay_udp(front: UdpSocket, args: &RelayArgs, shutdown: CancellationToken) -> Result<()> {
    let front = Arc::new(front);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Held>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let unspecified: IpAddr = match args.to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    loop {
        let (n, client) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = front.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // Errors on an unconnected socket are per datagram (e.g. a
                // buffer shortage); the next one may well succeed.
                Err(e) => {
                    tracing::warn!("udp receive on {}: {e}", args.listen);
                    continue;
                }
            },
        };
        let held = (Instant::now() + args.delay, buf[..n].to_vec());
        if flows.get(&client).is_none_or(|tx| tx.is_closed()) {
            // Forget flows that ended on their own before adding one, so the
            // map grows only with clients active at the same time.
            flows.retain(|_, tx| !tx.is_closed());
            let upstream = match connect_udp(unspecified, args.to).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("udp flow for {client}: connecting to {}: {e}", args.to);
                    continue;
                }
            };
            tracing::debug!("udp flow {client} -> {} opened", args.to);
            let (tx, rx) = mpsc::channel(UDP_QUEUE);
            tokio::spawn(udp_flow(UdpFlow {
                front: front.clone(),
                client,
                upstream,
                from_client: rx,
                delay: args.delay,
                idle: args.udp_idle_timeout,
                shutdown: shutdown.clone(),
            }));
            flows.insert(client, tx);
        }
        let tx = &flows[&client];
        if tx.try_send(held).is_err() {
            tracing::debug!("udp flow {client}: queue full, datagram dropped");
        }
    }
}

async fn connect_udp(local: IpAddr, to: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind((local, 0)).await?;
    s.connect(to).await?;
    Ok(s)
}

/// One client's flow: its own upstream socket, and one FIFO of held
/// datagrams per direction.
struct UdpFlow {
    front: Arc<UdpSocket>,
    client: SocketAddr,
    upstream: UdpSocket,
    from_client: mpsc::Receiver<Held>,
    delay: Duration,
    idle: Duration,
    shutdown: CancellationToken,
}

/// Moves datagrams both ways until the flow is idle or the relay stops.
/// Everything runs in one select loop that owns both queues, so no state is
/// shared between tasks.
async fn udp_flow(mut f: UdpFlow) {
    let mut up: VecDeque<Held> = VecDeque::new();
    let mut down: VecDeque<Held> = VecDeque::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last = Instant::now();
    loop {
        let next_up = up.front().map(|h| h.0);
        let next_down = down.front().map(|h| h.0);
        let quiet = up.is_empty() && down.is_empty();
        tokio::select! {
            () = f.shutdown.cancelled() => return,
            held = f.from_client.recv() => {
                let Some(held) = held else { return };
                last = Instant::now();
                if up.len() < UDP_QUEUE {
                    up.push_back(held);
                }
            }
            r = f.upstream.recv(&mut buf) => match r {
                Ok(n) => {
                    last = Instant::now();
                    if down.len() < UDP_QUEUE {
                        down.push_back((last + f.delay, buf[..n].to_vec()));
                    }
                }
                // A connected UDP socket reports ICMP errors (port
                // unreachable while the target restarts); the flow stays.
                Err(e) => tracing::debug!("udp flow {}: upstream: {e}", f.client),
            },
            () = sleep_until(next_up.unwrap_or(last)), if next_up.is_some() => {
                if let Some((_, d)) = up.pop_front()
                    && let Err(e) = f.upstream.send(&d).await
                {
                    tracing::debug!("udp flow {}: send upstream: {e}", f.client);
                }
            }
            () = sleep_until(next_down.unwrap_or(last)), if next_down.is_some() => {
                if let Some((_, d)) = down.pop_front()
                    && let Err(e) = f.front.send_to(&d, f.client).await
                {
                    tracing::debug!("udp flow {}: send to client: {e}", f.client);
                }
            }
            () = sleep_until(last + f.idle), if quiet => {
                tracing::debug!("udp flow {} idle, closed", f.client);
                return;
            }
        }
    }
}

// === TCP ===

/// Accepts clients, connects each to the target, and relays both directions.
/// On shutdown it stops accepting and gives open connections the drain
/// deadline before cutting them.
async fn relay_tcp(
    listener: TcpListener,
    args: &RelayArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    let tracker = TaskTracker::new();
    let cut = CancellationToken::new();
    loop {
        let (client, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Usually out of file descriptors: wait for some to close
                    // instead of spinning on the same error.
                    tracing::warn!("tcp accept on {}: {e}", args.listen);
                    sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (to, delay, cut) = (args.to, args.delay, cut.clone());
        tracker.spawn(async move {
            tokio::select! {
                r = tcp_connection(client, to, delay) => match r {
                    Ok((up, down)) => tracing::debug!("tcp {peer} -> {to}: {up} bytes up, {down} down"),
                    Err(e) => tracing::debug!("tcp {peer} -> {to}: {e:#}"),
                },
                () = cut.cancelled() => {}
            }
        });
    }
    drop(listener);
    tracker.close();
    if timeout(args.drain_deadline, tracker.wait()).await.is_err() {
        tracing::warn!(
            "{} tcp connections still open after {}: cutting them",
            tracker.len(),
            humantime::format_duration(args.drain_deadline)
        );
        cut.cancel();
        tracker.wait().await;
    }
    Ok(())
}

async fn tcp_connection(client: TcpStream, to: SocketAddr, delay: Duration) -> Result<(u64, u64)> {
    let server = match timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
        Ok(r) => r.with_context(|| format!("connecting to {to}"))?,
        Err(_) => bail!("connecting to {to}: no answer in {CONNECT_TIMEOUT:?}"),
    };
    // Nagle would hold small chunks for an ACK and add its own delay on top
    // of the one asked for.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // An error either way ends both: the other direction has no peer left.
    let (up, down) = tokio::try_join!(pump(cr, sw, delay), pump(sr, cw, delay))?;
    Ok((up, down))
}

/// Copies one direction, each chunk written `delay` after it was read, then
/// passes the end of stream on (also delayed, since it queues behind the
/// data). Returns the bytes copied.
async fn pump<R, W>(mut from: R, mut to: W, delay: Duration) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Held>(TCP_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; TCP_READ];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // Dropping `tx` here is the end-of-stream marker.
                return Ok::<_, io::Error>(());
            }
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                // The writer failed and try_join reports its error.
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut total = 0u64;
        while let Some((due, chunk)) = rx.recv().await {
            sleep_until(due).await;
            to.write_all(&chunk).await?;
            total += chunk.len() as u64;
        }
        to.shutdown().await?;
        Ok(total)
    };
    let ((), total) = tokio::try_join!(reader, writer)?;
    Ok(total)
}
