//! Access logs: one JSON line per request (or opaque TCP connection) the
//! sidecar served, on either side: off, a sample, or every one; to stdout
//! (journald under systemd) or a file.
//!
//! Lines are gathered in memory and written by a thread of their own every
//! 100 ms, in one call: a request costs the formatting of its line and a
//! short lock, never a write or a wake-up, and a slow disk never holds a
//! request up. Past 4 MiB waiting, lines are dropped and counted
//! (`trellis_agent_access_log_dropped_total`). A file is opened for
//! appending and opened again on every configuration reload (SIGHUP), which
//! is how logrotate's `postrotate` hands over a rotated file; rotation
//! itself is the OS's. Query strings are never logged: they carry secrets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use trellis_proxy::metrics::{ConnRecord, Detail, Observer, Peers, RequestRecord};

use crate::config::{AccessLogMode, AccessLogSettings};

/// Bytes of lines that may wait for the writer before new ones are dropped.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// How often the writer writes what has gathered.
const EVERY: Duration = Duration::from_millis(100);

/// What waits for the writer.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// Write to this file from now on (or stdout), opened anew.
    reopen: Option<Option<PathBuf>>,
    stop: bool,
}

/// The access log of one agent.
pub(crate) struct AccessLog {
    settings: ArcSwap<AccessLogSettings>,
    pending: Arc<(Mutex<Pending>, Condvar)>,
    dropped: Counter,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let pending = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
        let shared = pending.clone();
        let writer = std::thread::Builder::new()
            .name("trellis-access-log".into())
            .spawn(move || write_lines(&shared, out))?;
        Ok(Arc::new(Self {
            settings: ArcSwap::from_pointee(settings.clone()),
            pending,
            dropped: Counter::default(),
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Writes what is left and stops the writer: the last lines of a
    /// stopping agent reach the file. Lines that come after are dropped.
    pub(crate) fn close(&self) {
        lock(&self.pending.0).stop = true;
        self.pending.1.notify_one();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// Lines dropped because the writer fell behind.
    pub(crate) fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    /// Takes changed settings, and opens the file anew (after a rotation).
    pub(crate) fn apply(&self, settings: &AccessLogSettings) {
        self.settings.store(Arc::new(settings.clone()));
        lock(&self.pending.0).reopen = Some(settings.path.clone());
        self.pending.1.notify_one();
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
        let Ok(mut text) = serde_json::to_vec(line) else {
            return;
        };
        text.push(b'\n');
        let mut p = lock(&self.pending.0);
        if p.lines.len() + text.len() > MAX_PENDING {
            drop(p);
            self.dropped.inc();
            return;
        }
        p.lines.extend_from_slice(&text);
    }
}

impl Observer for AccessLog {
    fn request(&self, peers: &Peers, r: &RequestRecord, d: &Detail) {
        if !self.wanted() {
            return;
        }
        let mut line = Line::new("http", peers, r.duration);
        line.protocol = Some(r.protocol);
        line.method = Some(d.method.as_str());
        line.authority = Some(&d.authority);
        line.path = Some(d.uri.path());
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

fn open(path: Option<&Path>) -> std::io::Result<Out> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Identities and paths are not for every local user.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(p)?;
            Ok(Box::new(f))
        }
    }
}

/// The writer thread: every [`EVERY`], what has gathered, in one write.
fn write_lines(shared: &(Mutex<Pending>, Condvar), mut out: Out) {
    let mut batch = Vec::new();
    loop {
        let (reopen, stop) = {
            let mut p = lock(&shared.0);
            if !p.stop && p.reopen.is_none() {
                p = shared
                    .1
                    .wait_timeout(p, EVERY)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            // The buffer goes to the writer; the (emptied) last one comes
            // back, so its memory is reused.
            std::mem::swap(&mut p.lines, &mut batch);
            (p.reopen.take(), p.stop)
        };
        if !batch.is_empty() {
            if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "access log write failed");
            }
            batch.clear();
        }
        if let Some(path) = reopen {
            match open(path.as_deref()) {
                Ok(o) => out = o,
                Err(e) => {
                    tracing::warn!(error = %e, "access log could not be opened again; writing on to the old one")
                }
            }
        }
        if stop {
            return;
        }
    }
}
