//! `trellis dev` as a test harness: the whole mesh in the background, the
//! addresses it wrote to `state.json`, operator commands against it, and
//! the small clients the tests drive it with.
// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// `trellis dev` in the background, stopped with SIGTERM when dropped.
pub(crate) struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    pub(crate) state: serde_json::Value,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.stop_strays();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_strays();
    }
}

impl Dev {
    /// Stops what outlived `trellis dev` on its state directory: servers
    /// a test restarted (`load mesh --storm`) are not dev's children.
    fn stop_strays(&self) {
        let pattern = self.dir.path().to_string_lossy().to_string();
        let _ = Command::new("pkill")
            .args(["-TERM", "-f", &pattern])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let alive = Command::new("pgrep")
                .args(["-f", &pattern])
                .output()
                .is_ok_and(|o| o.status.success());
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
    }
}

impl Dev {
    pub(crate) fn start(ports_from: u16, cert_ttl: &str) -> Self {
        Self::start_with(ports_from, cert_ttl, &[], &[])
    }

    /// With more `args` for `trellis dev`, and `env` for it and every part
    /// it starts.
    pub(crate) fn start_with(
        ports_from: u16,
        cert_ttl: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("mesh");
        let child = Command::new(BIN)
            .args([
                "dev",
                "--state-dir",
                state_dir.to_str().unwrap(),
                "--ports-from",
                &ports_from.to_string(),
                "--cert-ttl",
                cert_ttl,
            ])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("dev.out")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("dev.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut dev = Dev {
            child,
            dir,
            state: serde_json::Value::Null,
        };
        let path = state_dir.join("state.json");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !path.exists() {
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!(
                    "trellis dev exited ({status}): {}{}",
                    dev.read("dev.out"),
                    dev.read("dev.err")
                );
            }
            assert!(Instant::now() < deadline, "trellis dev did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        dev.state = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        dev
    }

    pub(crate) fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    pub(crate) fn s(&self, ptr: &str) -> String {
        match self.state.pointer(ptr) {
            Some(serde_json::Value::String(s)) => s.clone(),
            other => panic!("state.json {ptr}: {other:?}"),
        }
    }

    pub(crate) fn host(&self, name: &str) -> serde_json::Value {
        self.state["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub(crate) fn frontend(&self) -> SocketAddr {
        self.s("/frontend").parse().unwrap()
    }

    /// An operator command against the first server.
    pub(crate) fn op(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let server = self.s("/servers/0");
        let creds = self.s("/operator");
        all.extend(["--server", &server, "--credentials", &creds]);
        Command::new(BIN).args(&all).output().unwrap()
    }

    /// An operator command that must succeed; its standard output.
    pub(crate) fn op_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.op(args);
        assert!(
            out.status.success(),
            "trellis {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Waits until every proxy (six agents, two gateways) has acknowledged
    /// the latest revision: `trellis status` shows none behind or rejecting.
    pub(crate) fn in_sync(&self) {
        let mut last = String::new();
        wait_for("every proxy in sync", Duration::from_secs(10), || {
            let out = self.op(&["status", "--output", "json"]);
            last = String::from_utf8_lossy(&out.stdout).into_owned();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&last) else {
                return false;
            };
            let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
            proxies.len() == 8
                && proxies
                    .iter()
                    .all(|p| p["behind"] == 0 && p["rejected"] == "")
        });
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("mesh")
    }
}

/// One HTTP/1.1 answer: status (0 when none came), headers (lowercase
/// names), body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` to `to` on a new connection (`connection: close`), with
/// `headers`; waits up to `wait` for the whole answer.
pub(crate) fn exchange(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    wait: Duration,
) -> Answer {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// GET / from `addr`: (status line, body).
pub(crate) fn get(addr: SocketAddr) -> Result<(String, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: frontend.shop.mesh\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

pub(crate) fn dig(dns: &str, args: &[&str]) -> String {
    let (ip, port) = dns.split_once(':').unwrap();
    let out = Command::new("dig")
        .args([&format!("@{ip}"), "-p", port, "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed by .ci/run (bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

pub(crate) fn tool_missing(tool: &str) -> bool {
    let missing = Command::new(tool).arg("-v").output().is_err();
    if missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing; .ci/run installs it"
        );
        eprintln!("skipped: {tool} is not installed (.ci/run installs it)");
    }
    missing
}
