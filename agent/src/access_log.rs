//! Access logs: one JSON line per request (or opaque TCP connection) the
//! sidecar served, on either side: off, a sample, or every one; to stdout
//! (journald under systemd) or a file.
//!
//! Lines are written by a thread of their own behind a bounded queue, so a
//! slow disk never holds a request up: past the queue, lines are dropped and
//! counted (`trellis_agent_access_log_dropped_total`). A file is opened for
//! appending and opened again on every configuration reload (SIGHUP), which
//! is how logrotate's `postrotate` hands over a rotated file; rotation
//! itself is the OS's. Query strings are never logged: they carry secrets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use trellis_proxy::metrics::{ConnRecord, Detail, Observer, Peers, RequestRecord};

use crate::config::{AccessLogMode, AccessLogSettings};

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

enum Msg {
    Line(String),
    /// Write to this file from now on (or stdout), opened anew.
    Target(Option<PathBuf>),
}

/// The access log of one agent.
pub(crate) struct AccessLog {
    settings: ArcSwap<AccessLogSettings>,
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("settings", &self.settings.load())
            .finish()
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    /// `http` (also gRPC) or `tcp`.
    kind: &'static str,
    /// `source` (the caller's sidecar) or `destination`.
    reporter: &'static str,
    source_principal: &'a str,
    source_workload: &'a str,
    source_namespace: &'a str,
    source_zone: &'a str,
    destination_service: &'a str,
    destination_principal: &'a str,
    destination_workload: &'a str,
    destination_zone: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<&'static str>,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

impl<'a> Line<'a> {
    fn new(kind: &'static str, p: &'a Peers, duration: std::time::Duration) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind,
            reporter: p.reporter,
            source_principal: &p.source_principal,
            source_workload: &p.source_workload,
            source_namespace: &p.source_workload_namespace,
            source_zone: &p.source_zone,
            destination_service: &p.destination_service,
            destination_principal: &p.destination_principal,
            destination_workload: &p.destination_workload,
            destination_zone: &p.destination_zone,
            protocol: None,
            method: None,
            authority: None,
            path: None,
            route: None,
            status: None,
            grpc_status: None,
            flags: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: duration.as_secs_f64() * 1000.0,
            upstream: None,
            retries: 0,
            trace_id: None,
        }
    }
}

impl AccessLog {
    /// Starts the writer for `settings`. The file, if any, is opened now, so
    /// a path that cannot be written is refused at start.
    pub(crate) fn start(settings: &AccessLogSettings) -> std::io::Result<Arc<Self>> {
        let out = open(settings.path.as_deref())?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("trellis-access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(Arc::new(Self {
            settings: ArcSwap::from_pointee(settings.clone()),
            tx,
            dropped: Counter::default(),
        }))
    }

    /// Lines dropped because the writer fell behind.
    pub(crate) fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    /// Takes changed settings, and opens the file anew (after a rotation).
    pub(crate) fn apply(&self, settings: &AccessLogSettings) {
        self.settings.store(Arc::new(settings.clone()));
        let _ = self.tx.send(Msg::Target(settings.path.clone()));
    }

    fn wanted(&self) -> bool {
        let s = self.settings.load();
        match s.mode {
            AccessLogMode::Off => false,
            AccessLogMode::Full => true,
            AccessLogMode::Sampled => fastrand::f64() < s.sample,
        }
    }

    fn send(&self, line: &Line<'_>) {
        let Ok(text) = serde_json::to_string(line) else {
            return;
        };
        match self.tx.try_send(Msg::Line(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

impl Observer for AccessLog {
    fn request(&self, peers: &Peers, r: &RequestRecord, d: &Detail) {
        if !self.wanted() {
            return;
        }
        let mut line = Line::new("http", peers, r.duration);
        line.protocol = Some(r.protocol);
        line.method = Some(&d.method);
        line.authority = Some(&d.authority);
        line.path = Some(&d.path);
        line.route = d.route.as_deref();
        line.status = Some(r.code);
        line.grpc_status = r.grpc_status.as_deref();
        line.flags = Some(r.flags);
        line.bytes_received = r.request_bytes;
        line.bytes_sent = r.response_bytes;
        line.upstream = d.upstream.as_deref();
        line.retries = d.retries;
        line.trace_id = d.trace_id.as_deref();
        self.send(&line);
    }

    fn connection(&self, peers: &Peers, r: &ConnRecord) {
        if !self.wanted() {
            return;
        }
        let mut line = Line::new("tcp", peers, r.duration);
        // As for requests: received from the caller, sent back to it.
        line.bytes_received = r.sent;
        line.bytes_sent = r.received;
        line.upstream = r.upstream.as_deref();
        self.send(&line);
    }
}

type Out = Box<dyn Write + Send>;

/// Lines are gathered in memory and written in one call per batch (the
/// writer flushes whenever the queue runs dry), not one call per line.
const BUFFER: usize = 64 * 1024;

fn open(path: Option<&Path>) -> std::io::Result<Out> {
    match path {
        None => Ok(Box::new(std::io::BufWriter::with_capacity(
            BUFFER,
            std::io::stdout(),
        ))),
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Identities and paths are not for every local user.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(p)?;
            Ok(Box::new(std::io::BufWriter::with_capacity(BUFFER, f)))
        }
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is
/// empty, so a line reaches the file within one request's time.
fn write_lines(rx: Receiver<Msg>, mut out: Out) {
    let write = |out: &mut Out, msg: Msg| match msg {
        Msg::Line(mut l) => {
            l.push('\n');
            if let Err(e) = out.write_all(l.as_bytes()) {
                tracing::warn!(error = %e, "access log write failed");
            }
        }
        Msg::Target(p) => {
            let _ = out.flush();
            match open(p.as_deref()) {
                Ok(o) => *out = o,
                Err(e) => {
                    tracing::warn!(error = %e, "access log could not be opened again; writing on to the old one")
                }
            }
        }
    };
    while let Ok(msg) = rx.recv() {
        write(&mut out, msg);
        while let Ok(more) = rx.try_recv() {
            write(&mut out, more);
        }
        let _ = out.flush();
    }
}
