//! Helpers for the Kubernetes tests: the `trellis inject` flags every test
//! uses, and offline schema validation with `kubernetes-validate` (PyPI),
//! which `.ci/run` installs.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A root fingerprint the goldens carry (no CA is needed to inject).
pub const FINGERPRINT: &str = "3b9f2c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

/// The flags of every injection in the tests.
pub fn inject_flags() -> Vec<&'static str> {
    vec![
        "--zone",
        "k8s",
        "--trust-root-fingerprint",
        FINGERPRINT,
        "--image",
        "registry.example/trellis:test",
        "--cluster-dns",
        "10.96.0.10",
    ]
}

/// `trellis inject FLAGS EXTRA FILES`, with no TRELLIS_* from the caller.
pub fn inject(extra: &[&str], files: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    cmd.arg("inject")
        .args(inject_flags())
        .args(extra)
        .args(files);
    cmd.env_remove("TRELLIS_ZONE");
    cmd.output().expect("run trellis inject")
}

/// The test data directory.
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The `kubernetes-validate` program: $KUBERNETES_VALIDATE, or on PATH.
/// Missing, the test fails and says how to get it: a validation that
/// quietly does not run would pass everything.
pub fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("kubernetes-validate"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "kubernetes-validate is not installed: run .ci/run, or `pip install \
             kubernetes-validate` and put it on PATH (or set KUBERNETES_VALIDATE)"
        )
    })
}

/// The newest Kubernetes version `kubernetes-validate` knows (its default).
pub fn newest_kubernetes() -> String {
    let out = Command::new(kubernetes_validate())
        .arg("--help")
        .output()
        .expect("run kubernetes-validate --help");
    let text = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "Defaults")
        .expect("kubernetes-validate --help names its default version");
    words[i + 2].trim_end_matches('.').to_owned()
}

/// Validates `files` strictly (unknown fields refused) against Kubernetes
/// 1.29 (the first with native sidecars on by default) and the newest
/// version known; every resource must pass and have a schema. Returns how
/// many resources passed per version.
pub fn validate(files: &[PathBuf]) -> usize {
    let mut passed = 0;
    for version in ["1.29.0".to_owned(), newest_kubernetes()] {
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "-k", &version])
            .args(files)
            .output()
            .expect("run kubernetes-validate");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("WARN"))
            .collect();
        assert!(
            out.status.success() && bad.is_empty(),
            "kubernetes-validate {version} refused:\n{text}"
        );
        passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(
            passed > 0,
            "kubernetes-validate {version} checked nothing:\n{text}"
        );
    }
    passed
}

/// What a pod's `trellis-agent` container is started with, resolved as the
/// kubelet would: for tests that run the agent as a plain process with
/// exactly what the injected pod spec gives it (the netns end-to-end test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLaunch {
    /// The container's args (the image's entrypoint is `trellis`).
    pub args: Vec<String>,
    /// Its environment, downward-API references resolved.
    pub env: Vec<(String, String)>,
    /// Files the pod's volumes put in the container: (path in the
    /// container, contents). The token is `facts.token`.
    pub files: Vec<(PathBuf, String)>,
    /// Directories the container may write (emptyDir mounts).
    pub writable: Vec<PathBuf>,
}

/// The pod's own facts, which the API server and kubelet fill in.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub service_account: String,
    /// The projected service-account token's contents.
    pub token: String,
}

/// Resolves the `trellis-agent` container of `template` (an injected pod
/// template: `metadata` and `spec`) for the pod `facts`. Panics on anything
/// it cannot resolve, so an injection that a kubelet could not run either
/// fails the test that uses it.
pub fn agent_launch(template: &Value, facts: &PodFacts) -> AgentLaunch {
    let spec = &template["spec"];
    let agent = ["initContainers", "containers"]
        .iter()
        .filter_map(|l| spec[*l].as_array())
        .flatten()
        .find(|c| c["name"] == "trellis-agent")
        .expect("an injected pod has a trellis-agent container");
    let args = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let env = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            if let Some(v) = e["value"].as_str() {
                return (name, v.to_owned());
            }
            let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: neither value nor fieldRef"));
            let v = match path {
                "metadata.name" => facts.name.clone(),
                "metadata.namespace" => facts.namespace.clone(),
                "status.podIP" => facts.ip.clone(),
                "spec.serviceAccountName" => facts.service_account.clone(),
                other => panic!("{name}: fieldRef {other} is not resolved here"),
            };
            (name, v)
        })
        .collect();
    let volumes = spec["volumes"].as_array().unwrap();
    let mut files = Vec::new();
    let mut writable = Vec::new();
    for m in agent["volumeMounts"].as_array().unwrap() {
        let dir = PathBuf::from(m["mountPath"].as_str().unwrap());
        let vol = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("the mount's volume");
        if let Some(p) = vol.get("projected") {
            for s in p["sources"].as_array().unwrap() {
                let t = &s["serviceAccountToken"];
                assert!(
                    !t.is_null(),
                    "only service-account tokens are projected: {s}"
                );
                files.push((dir.join(t["path"].as_str().unwrap()), facts.token.clone()));
            }
        } else if let Some(d) = vol.get("downwardAPI") {
            for item in d["items"].as_array().unwrap() {
                let map = match item["fieldRef"]["fieldPath"].as_str().unwrap() {
                    "metadata.labels" => &template["metadata"]["labels"],
                    "metadata.annotations" => &template["metadata"]["annotations"],
                    other => panic!("downward API {other} is not resolved here"),
                };
                files.push((dir.join(item["path"].as_str().unwrap()), downward_map(map)));
            }
        } else if vol.get("emptyDir").is_some() {
            writable.push(dir);
        } else {
            panic!("the agent mounts a volume kind not resolved here: {vol}");
        }
    }
    AgentLaunch {
        args,
        env,
        files,
        writable,
    }
}

/// A label or annotation map as the kubelet writes it in a downward-API
/// file: `key="value"` lines sorted by key, the value quoted as Go's %q
/// (which JSON quoting matches for printable ASCII).
pub fn downward_map(map: &Value) -> String {
    let mut pairs: Vec<(&String, &str)> = map
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}\n", serde_json::to_string(v).unwrap()))
        .collect()
}

/// A started process, stopped with SIGTERM (then SIGKILL after 5 s) when
/// dropped, so a failed assertion leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (the binary, or `ip netns exec NS` and the binary) with
/// `args` and exactly the TRELLIS_* variables of `env` (none of the
/// test's own leak in), stderr to `log`.
pub fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, String)], log: &Path) -> Proc {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

/// `trellis inject` on the workload `yaml` (written to `dir/file`) for the
/// zone `k8s` and the exchange at `exchange` (`host:port`), as an operator
/// would run it; returns the injected pod template.
pub fn inject_template(
    dir: &Path,
    file: &str,
    yaml: &str,
    exchange: &str,
    fingerprint: &str,
) -> Value {
    let path = dir.join(file);
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "inject",
            "--zone",
            "k8s",
            "--trust-root-fingerprint",
            fingerprint,
        ])
        .arg(format!("--token-exchange=https://{exchange}/v1/exchange"))
        .arg(&path)
        .env_remove("TRELLIS_ZONE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trellis inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    doc["spec"]["template"].clone()
}

/// The annotations an injected template gives its pods.
pub fn annotations_of(template: &Value) -> Vec<(String, String)> {
    template["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

/// The SPIFFE ID of the first certificate in the PEM file `path`.
pub fn spiffe_id(path: &Path) -> String {
    let pem = std::fs::read(path).unwrap();
    let certs = trellis_ca::certs_from_pem(&pem, "certificate").unwrap();
    trellis_ca::CertInfo::parse(&certs[0])
        .unwrap()
        .spiffe_id
        .unwrap()
        .as_str()
        .to_owned()
}

/// A pod's agent container made ready to start as a process: its launch,
/// its environment and where its data directory is on this host.
pub struct PodRun {
    pub launch: AgentLaunch,
    pub env: Vec<(String, String)>,
    pub data: PathBuf,
}

/// Resolves the agent container of `template` for `facts` and writes the
/// files its volumes would mount under `root` (the pods here share one
/// filesystem), pointing the agent at them with the overrides it supports
/// (TRELLIS_TOKEN_FILE, TRELLIS_POD_LABELS_FILE, TRELLIS_DATA_DIR). Inject
/// sets none of them, so in a pod the agent's defaults are the mount
/// paths; that is checked here.
pub fn prepare_pod(root: &Path, template: &Value, facts: &PodFacts) -> PodRun {
    let launch = agent_launch(template, facts);
    let host = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    for (path, text) in &launch.files {
        std::fs::create_dir_all(host(path).parent().unwrap()).unwrap();
        std::fs::write(host(path), text).unwrap();
    }
    let mounted = |p: &str| launch.files.iter().any(|(f, _)| f == Path::new(p));
    assert!(mounted(trellis_kube::pod::DEFAULT_TOKEN_FILE), "{launch:?}");
    assert!(
        mounted(trellis_kube::pod::DEFAULT_LABELS_FILE),
        "{launch:?}"
    );
    let data = Path::new(trellis_kube::pod::DEFAULT_DATA_DIR);
    assert!(launch.writable.iter().any(|w| w == data), "{launch:?}");
    // The kubelet makes the emptyDir.
    std::fs::create_dir_all(host(data)).unwrap();
    let mut env = launch.env.clone();
    for (k, p) in [
        ("TRELLIS_TOKEN_FILE", trellis_kube::pod::DEFAULT_TOKEN_FILE),
        (
            "TRELLIS_POD_LABELS_FILE",
            trellis_kube::pod::DEFAULT_LABELS_FILE,
        ),
        ("TRELLIS_DATA_DIR", trellis_kube::pod::DEFAULT_DATA_DIR),
    ] {
        assert!(
            !launch.env.iter().any(|(e, _)| e == k),
            "inject sets {k}: the override would hide it"
        );
        env.push((k.into(), host(Path::new(p)).display().to_string()));
    }
    PodRun {
        data: host(data),
        launch,
        env,
    }
}

/// `pairs` borrowed as the fake API's builders take them.
pub fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
