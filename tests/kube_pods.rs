//! A Kubernetes zone as processes: `trellis kube controller` against the
//! fake API server, a "pod" that is `trellis agent --kubernetes` started
//! with exactly the args, environment and files that `trellis inject` gives
//! the agent container of a small Deployment (resolved as a kubelet would,
//! tests/support/k8s.rs), and a VM agent in the same zone. The pod
//! gets its identity through the token exchange alone, registers itself,
//! and calls and is called by the VM's services by mesh name. Then a Job's
//! pod (no ports, no app label) joins the same way, registers nothing, and
//! its app calls the Deployment's pod by mesh name.
//!
//! Not covered here (needs a real cluster or the netns testbed): pods in
//! their own network namespaces, other zones through gateways, the kubelet
//! rotating the projected token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use trellis_ca::{CaDir, IssueOptions, TrustDomain};
use trellis_federation::client;
use trellis_federation::config::ServerConfig;
use trellis_federation::proto::{
    ReadOptions, TokenRequest, registry_client::RegistryClient, zones_client::ZonesClient,
};
use trellis_kube::testing::{FakeApi, FakeToken, namespace, pod};

#[path = "support/k8s.rs"]
mod k8s;

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
/// This file's ports: 27300-27339.
const BASE: u16 = 27300;

use k8s::Proc;

fn spawn(args: &[&str], env: &[(&str, String)], log: &Path) -> Proc {
    k8s::spawn(Command::new(BIN), args, env, log)
}

/// One GET; the answer, or the connection's error (an app not up yet).
fn get(addr: &str) -> String {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("connect {addr}: {e}"),
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// GETs `127.0.0.1:port` until it answers 200, for up to 30 s; then fails
/// with `what`, the last answer and `log`.
async fn get_200(port: u16, what: &str, log: Option<&Path>) -> String {
    let start = Instant::now();
    loop {
        let a = tokio::task::spawn_blocking(move || get(&format!("127.0.0.1:{port}")))
            .await
            .unwrap();
        if a.starts_with("HTTP/1.1 200") {
            return a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: {a}\nlog:\n{}",
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn log_has(path: &Path, needle: &str) -> bool {
    std::fs::File::open(path)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains(needle))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_joins_by_token_exchange_and_calls_and_is_called_by_mesh_name() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let td: TrustDomain = "trellis.local".parse().unwrap();
    let ca = CaDir::new(dir.join("ca"));
    ca.init(&td, Duration::from_secs(86400)).unwrap();
    let zone_ca = ca.create_zone("k8s", Duration::from_secs(86400)).unwrap();
    let bundle = ca.bundle().unwrap();
    let fingerprint = trellis_federation::token::sha256_hex(bundle.roots()[0].as_ref());

    // The zone's server, in this process.
    let server_addr = format!("127.0.0.1:{BASE}");
    let listener = tokio::net::TcpListener::bind(&server_addr).await.unwrap();
    let mut cfg = ServerConfig::from_toml(&format!(
        "name = \"s0\"\nzone = \"k8s\"\ndata_dir = \"{}\"\nlisten = \"{server_addr}\"\nca_dir = \"{}\"\nbootstrap = true\n",
        dir.join("s0").display(),
        dir.join("ca").display()
    ))
    .unwrap();
    cfg.advertise = Some(server_addr.clone());
    let server = trellis_federation::server::start_on(&cfg, listener)
        .await
        .unwrap();
    while !server.node.is_leader() {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let issue = |id: &str, name: &str| {
        let creds = zone_ca
            .issue(&id.parse().unwrap(), IssueOptions::default())
            .unwrap();
        let prefix = dir.join(name);
        trellis_ca::write_credentials(&prefix, &creds, &bundle).unwrap();
        prefix
    };
    let op = issue("spiffe://trellis.local/operator/alice", "alice");

    // The app's Deployment, through `trellis inject` as an operator would
    // run it (the exchange URL is the controller below).
    let exchange = BASE + 2;
    let (vm_a, vm_b, web) = (BASE + 3, BASE + 4, BASE + 5);
    let template = inject_web(dir, web, exchange, &fingerprint);

    // The cluster: namespace shop in the mesh, pod web-1 running as `web`,
    // with the annotations inject gave its template.
    let api = FakeApi::start(BASE + 1, Duration::from_secs(1))
        .await
        .unwrap();
    api.apply(namespace("shop", &[("trellis.io/inject", "enabled")]));
    let owned = k8s::annotations_of(&template);
    let annotations = k8s::borrowed(&owned);
    assert!(
        annotations.contains(&(trellis_kube::INJECTED_ANNOTATION, "true")),
        "inject marks the pod as the controller's sync expects: {annotations:?}"
    );
    api.apply(pod(
        "shop",
        "web-1",
        "uid-web-1",
        "web",
        "Pending",
        &annotations,
    ));
    let sa_token = "eyJhbGciOiJSUzI1NiJ9.projected-token-of-web-1.sig";
    api.add_token(
        sa_token,
        FakeToken {
            namespace: "shop".into(),
            account: "web".into(),
            pod: Some(("web-1".into(), "uid-web-1".into())),
            audiences: vec!["trellis".into()],
            expired: false,
        },
    );

    // The controller, as a process.
    let ctl_creds = issue(
        "spiffe://trellis.local/zone/k8s/controller/kube",
        "controller",
    );
    let ctl_cfg = dir.join("controller.toml");
    std::fs::write(&ctl_cfg, format!(
        "name = \"kube\"\nzone = \"k8s\"\nservers = [\"{server_addr}\"]\ncredentials = \"{}\"\nlisten = \"127.0.0.1:{exchange}\"\nkubeconfig = \"{}\"\n",
        ctl_creds.display(),
        api.kubeconfig(dir).unwrap().display()
    )).unwrap();
    let ctl_log = dir.join("controller.log");
    let _ctl = spawn(
        &["kube", "controller", "--config", ctl_cfg.to_str().unwrap()],
        &[],
        &ctl_log,
    );

    // The VM in the same zone: vm-a calls web, vm-b is called by web.
    let vm_token = ZonesClient::new(client::connect(&server_addr, &op).unwrap())
        .create_join_token(TokenRequest {
            zone: "k8s".into(),
            ttl_seconds: 300,
            agent: true,
            workloads: vec!["shop/vm-a".into(), "shop/vm-b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    std::fs::write(dir.join("vm.token"), vm_token).unwrap();
    let vm_cfg = dir.join("vm.toml");
    std::fs::write(&vm_cfg, format!(
        "name = \"vm1\"\nzone = \"k8s\"\nservers = [\"{server_addr}\"]\ndata_dir = \"{}\"\njoin_token_file = \"{}\"\nadvertise = \"127.0.0.1\"\ninbound = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\ndns = \"127.0.0.1:{}\"\noutbound_network = \"127.78.0.0\"\nlease = \"5s\"\n\
         [[services]]\nname = \"vm-a\"\nnamespace = \"shop\"\nports = [{vm_a}]\nprotocol = \"http\"\n\
         [[services]]\nname = \"vm-b\"\nnamespace = \"shop\"\nports = [{vm_b}]\nprotocol = \"http\"\n",
        dir.join("vm-data").display(),
        dir.join("vm.token").display(),
        BASE + 6, BASE + 7, BASE + 8
    )).unwrap();
    let _vm = spawn(
        &["agent", "--config", vm_cfg.to_str().unwrap()],
        &[],
        &dir.join("vm.log"),
    );
    let vm_dns = format!("127.0.0.1:{}", BASE + 8);
    let _app_a = spawn(
        &[
            "demo-app",
            "--name",
            "vm-a",
            "--zone",
            "k8s",
            "--listen",
            &format!("127.0.0.1:{vm_a}"),
            "--call",
            &format!("http://web.shop.mesh:{web}/"),
            "--dns",
            &vm_dns,
        ],
        &[],
        &dir.join("app-a.log"),
    );
    let _app_b = spawn(
        &[
            "demo-app",
            "--name",
            "vm-b",
            "--zone",
            "k8s",
            "--listen",
            &format!("127.0.0.1:{vm_b}"),
        ],
        &[],
        &dir.join("app-b.log"),
    );

    // The pod: the injected agent container as the kubelet would start it
    // (downward-API fields resolved to this pod, the projected token and
    // the labels file written out). Every "pod" here shares one host, so
    // the files the container would find at its mount paths are put under
    // pod-files/ and the agent is pointed at them with the overrides it
    // supports (TRELLIS_TOKEN_FILE, TRELLIS_POD_LABELS_FILE,
    // TRELLIS_DATA_DIR); inject sets none of them, so in a pod the agent's
    // defaults are the mount paths (checked below). Its listen addresses
    // move off 15006, 15020 and 53 for the same reason.
    let pod_dns = format!("127.0.0.1:{}", BASE + 11);
    let (_pod, launch, pod_data, pod_log) = start_pod(
        dir,
        &template,
        &k8s::PodFacts {
            name: "web-1".into(),
            namespace: "shop".into(),
            ip: "127.0.0.1".into(),
            service_account: "web".into(),
            token: sa_token.into(),
        },
        [BASE + 9, BASE + 10, BASE + 11],
    );
    assert_eq!(
        launch.env.iter().find(|(k, _)| k == "TRELLIS_PORTS"),
        Some(&("TRELLIS_PORTS".to_owned(), format!("{web}/http")))
    );
    let _app_web = spawn(
        &[
            "demo-app",
            "--name",
            "web",
            "--zone",
            "k8s",
            "--listen",
            &format!("127.0.0.1:{web}"),
            "--call",
            &format!("http://vm-b.shop.mesh:{vm_b}/"),
            "--dns",
            &pod_dns,
        ],
        &[],
        &dir.join("app-web.log"),
    );

    // The pod registers itself as a VM agent does, under its pod name.
    let mut registry = RegistryClient::new(client::connect(&server_addr, &op).unwrap());
    let start = Instant::now();
    loop {
        let eps = registry
            .list(ReadOptions {
                linearizable: false,
            })
            .await
            .unwrap()
            .into_inner()
            .endpoints;
        let web_ep = eps.iter().find(|e| {
            e.key.as_ref().is_some_and(|k| {
                k.service == "web" && k.id == trellis_kube::exchange::agent_name("shop", "web-1")
            })
        });
        let vm = eps
            .iter()
            .filter(|e| e.key.as_ref().is_some_and(|k| k.id == "vm1"))
            .count();
        if let Some(e) = web_ep
            && vm == 2
        {
            assert_eq!(
                e.labels.get("trellis.account").map(String::as_str),
                Some("web")
            );
            assert_eq!(
                e.labels.get("trellis.inbound-port"),
                Some(&(BASE + 9).to_string())
            );
            assert!(
                !e.labels.contains_key("trellis.plain"),
                "the pod has a sidecar"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pod not registered; pod log:\n{}\ncontroller log:\n{}",
            std::fs::read_to_string(&pod_log).unwrap_or_default(),
            std::fs::read_to_string(&ctl_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joined = start.elapsed();
    assert!(log_has(&pod_log, "token exchange: identity granted"));
    let pod_text = std::fs::read_to_string(&pod_log).unwrap();
    let ctl_text = std::fs::read_to_string(&ctl_log).unwrap();
    for secret in [sa_token, "ta1:"] {
        assert!(
            !pod_text.contains(secret) && !ctl_text.contains(secret),
            "a secret was logged"
        );
    }
    assert_eq!(
        k8s::spiffe_id(&pod_data.join("shop.web.crt")),
        "spiffe://trellis.local/ns/shop/sa/web"
    );

    // vm-a → web (the pod, by mesh name) → vm-b (a VM service, by mesh name).
    let answer = get_200(vm_a, "no call through the mesh", None).await;
    assert!(answer.contains("web in zone k8s answered"), "{answer}");
    assert!(answer.contains("vm-b in zone k8s answered"), "{answer}");
    eprintln!("pod joined and registered in {joined:?}");

    // A Job's pod: no ports and no app label. Its agent gets the identity
    // of its service account and registers nothing; its app calls web.
    let job = k8s::inject_template(
        dir,
        "report.yaml",
        &job_yaml(),
        &format!("127.0.0.1:{exchange}"),
        &fingerprint,
    );
    let job_token = "eyJhbGciOiJSUzI1NiJ9.projected-token-of-report-x7.sig";
    api.apply(pod(
        "shop",
        "report-x7",
        "uid-report-x7",
        "report",
        "Pending",
        &k8s::borrowed(&k8s::annotations_of(&job)),
    ));
    api.add_token(
        job_token,
        FakeToken {
            namespace: "shop".into(),
            account: "report".into(),
            pod: Some(("report-x7".into(), "uid-report-x7".into())),
            audiences: vec!["trellis".into()],
            expired: false,
        },
    );
    let (_job, job_launch, job_data, job_log) = start_pod(
        &dir.join("job"),
        &job,
        &k8s::PodFacts {
            name: "report-x7".into(),
            namespace: "shop".into(),
            ip: "127.0.0.1".into(),
            service_account: "report".into(),
            token: job_token.into(),
        },
        [BASE + 12, BASE + 13, BASE + 14],
    );
    assert_eq!(
        job_launch
            .env
            .iter()
            .find(|(k, _)| k == "TRELLIS_PORTS")
            .map(|(_, v)| v.as_str()),
        Some("")
    );
    // The Job's app: reached directly by the test (nothing in the mesh
    // can call it), its one call goes out through the Job's agent.
    let job_app = BASE + 15;
    let _app_job = spawn(
        &[
            "demo-app",
            "--name",
            "report",
            "--zone",
            "k8s",
            "--listen",
            &format!("127.0.0.1:{job_app}"),
            "--call",
            &format!("http://web.shop.mesh:{web}/"),
            "--dns",
            &format!("127.0.0.1:{}", BASE + 14),
        ],
        &[],
        &dir.join("app-report.log"),
    );
    let answer = get_200(
        job_app,
        "the Job's call did not get through",
        Some(&job_log),
    )
    .await;
    assert!(answer.contains("web in zone k8s answered"), "{answer}");
    assert_eq!(
        k8s::spiffe_id(&job_data.join("shop.report.crt")),
        "spiffe://trellis.local/ns/shop/sa/report"
    );
    let eps = registry
        .list(ReadOptions {
            linearizable: false,
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    let job_agent = trellis_kube::exchange::agent_name("shop", "report-x7");
    assert!(
        !eps.iter()
            .any(|e| e.key.as_ref().is_some_and(|k| k.id == job_agent)),
        "a pod without ports registers nothing: {eps:?}"
    );
    server.shutdown(Duration::from_secs(1)).await;
}

/// Starts the injected agent container of `template` as the kubelet would
/// for the pod `facts`, its mounted files under `dir/pod-files/`. Every
/// "pod" here shares one host, so its inbound, admin and DNS addresses
/// move to `ports` too. Returns the process, the launch, the data
/// directory on this host and the log.
fn start_pod(
    dir: &Path,
    template: &serde_json::Value,
    facts: &k8s::PodFacts,
    ports: [u16; 3],
) -> (Proc, k8s::AgentLaunch, PathBuf, PathBuf) {
    let run = k8s::prepare_pod(&dir.join("pod-files"), template, facts);
    let mut env: Vec<(&str, String)> = run
        .env
        .iter()
        .filter(|(k, _)| !["TRELLIS_DNS", "TRELLIS_INBOUND", "TRELLIS_ADMIN"].contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    env.push(("TRELLIS_INBOUND", format!("127.0.0.1:{}", ports[0])));
    env.push(("TRELLIS_ADMIN", format!("127.0.0.1:{}", ports[1])));
    env.push(("TRELLIS_DNS", format!("127.0.0.1:{}", ports[2])));
    let args: Vec<&str> = run.launch.args.iter().map(String::as_str).collect();
    let log = dir.join(format!("pod-{}.log", facts.name));
    let proc = spawn(&args, &env, &log);
    (proc, run.launch, run.data, log)
}

/// A Job whose pod has no ports and no app label, as batch work often is.
fn job_yaml() -> String {
    "apiVersion: batch/v1
kind: Job
metadata:
  name: report
  namespace: shop
spec:
  template:
    metadata:
      annotations:
        trellis.io/inject: enabled
    spec:
      serviceAccountName: report
      restartPolicy: Never
      containers:
        - name: report
          image: example/report:1
"
    .into()
}

/// `trellis inject` on a one-container Deployment `web` in `shop` (app port
/// `web`, declared HTTP); returns the injected pod template.
fn inject_web(dir: &Path, web: u16, exchange: u16, fingerprint: &str) -> serde_json::Value {
    let yaml = format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
        app.kubernetes.io/name: web
      annotations:
        trellis.io/inject: enabled
        trellis.io/port-protocols: \"{web}=http\"
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: example/web:1
          ports:
            - containerPort: {web}
"
    );
    k8s::inject_template(
        dir,
        "web.yaml",
        &yaml,
        &format!("127.0.0.1:{exchange}"),
        fingerprint,
    )
}
