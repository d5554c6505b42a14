//! A Kubernetes zone on the netns testbed (issue 13, end to end): zone
//! `k8s`, whose hosts are network namespaces like the other zones', next
//! to the VM zones east and west and the edge that `testbed/up` brings up.
//!
//! The cluster is played as closely as these machines allow: the fake API
//! server (`trellis_kube::testing`, the list/watch and TokenReview of a real
//! one) listens inside the controller's namespace; `trellis kube
//! controller` and the zone's gateway run there as processes on their own
//! hosts; each "pod" is a namespace of its own whose agent is started with
//! exactly the args and environment that `trellis inject` gives the agent
//! container (downward-API fields resolved as a kubelet would,
//! tests/support/k8s.rs), listening where the pod spec says. Only the
//! files the pod's volumes would mount are moved (the token, the labels
//! file, the data directory), because namespaces share one filesystem.
//! Each pod gets its identity by the token exchange alone.
//!
//! Checked: a VM in east calls the Deployment's pod `web` by mesh name
//! (east's gateway to k8s's, QUIC), and so does the VM-like host in west;
//! the pod's app calls `catalog` in west (k8s's gateway to west's); a
//! Job's pod (no ports) calls east's `frontend` and registers nothing; a
//! Service without sidecars (`ledger`), exported by the controller as plain
//! endpoints, is called from east and from a pod of its own zone through
//! k8s's gateway, which terminates the mTLS and enforces its Authorization.
//! An edge host (whose agent dials west's gateway) calls the pod, and the
//! pod calls the edge's `inventory`: west's gateway relays both ways.
//!
//! Needs root and `ip netns`: CI runs it as root; elsewhere it is skipped
//! with a message.

use std::process::Command;
use std::time::{Duration, Instant};

use trellis_ca::CaDir;
use trellis_kube::testing::{FakeApi, FakeToken, namespace, pod};

#[path = "support/k8s.rs"]
mod k8s;
#[path = "support/netns.rs"]
mod netns;

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed");
const TD: &str = "trellis.local";
/// testbed/lib.sh's ports and addresses.
const SERVERS: [&str; 3] = ["10.77.1.10:7400", "10.77.2.10:7400", "10.77.2.12:7400"];
const APP_PORT: u16 = 8080;
/// The plain (sidecar-less) Service's port.
const LEDGER_PORT: u16 = 9090;
const VM_DNS_PORT: &str = "8600";
/// The k8s zone's hosts (testbed/net).
const CTL: (&str, &str) = ("tb-k8s-ctl", "10.77.4.10");
const GW: (&str, &str) = ("tb-k8s-gw", "10.77.4.11");
const P1: (&str, &str) = ("tb-k8s-p1", "10.77.4.21");
const P2: (&str, &str) = ("tb-k8s-p2", "10.77.4.22");

/// Runs `testbed/down` when dropped (after the processes below, which are
/// declared later and so dropped first).
struct Testbed(std::path::PathBuf);

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(format!("{TESTBED}/down"))
            .env("TRELLIS_BIN", BIN)
            .env("TESTBED_DIR", &self.0)
            .status();
    }
}

use k8s::Proc;

/// Starts `trellis ARGS` inside `ns` with `env`, logging to `log`.
fn spawn(ns: &str, args: &[&str], env: &[(&str, String)], log: &std::path::Path) -> Proc {
    k8s::spawn(netns::in_ns(ns, BIN), args, env, log)
}

fn trellis(args: &[&str]) {
    netns::run(Command::new(BIN).args(args));
}

/// Binds a listener inside the network namespace `ns`: a socket belongs to
/// the namespace it was made in, whichever thread serves it afterwards.
fn listen_in(ns: &str, addr: &str) -> std::net::TcpListener {
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpListener::bind(&addr).unwrap()
    })
    .join()
    .unwrap()
}

/// One GET of `name.shop.mesh` from inside `ns`, resolved by the agent's
/// DNS there on `dns_port`. The body, or why there is none.
fn mesh_get(ns: &str, dns_port: &str, name: &str) -> Result<String, String> {
    mesh_get_at(ns, dns_port, name, APP_PORT)
}

/// [`mesh_get`] on `port`.
fn mesh_get_at(ns: &str, dns_port: &str, name: &str, port: u16) -> Result<String, String> {
    mesh_get_in(ns, dns_port, &format!("{name}.shop.mesh"), port)
}

/// One GET of the mesh name `fqdn` on `port` from inside `ns`.
fn mesh_get_in(ns: &str, dns_port: &str, fqdn: &str, port: u16) -> Result<String, String> {
    let out = netns::in_ns(ns, "dig")
        .args([
            "+short",
            "+time=1",
            "+tries=1",
            "@127.0.0.1",
            "-p",
            dns_port,
        ])
        .arg(fqdn)
        .output()
        .map_err(|e| e.to_string())?;
    let ip = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if ip.is_empty() {
        return Err(format!("{fqdn} does not resolve in {ns}"));
    }
    get(ns, &format!("http://{ip}:{port}/"))
}

fn get(ns: &str, url: &str) -> Result<String, String> {
    let out = netns::in_ns(ns, "curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.rsplit_once('\n') {
        Some((body, "200")) => Ok(body.to_owned()),
        _ => Err(format!(
            "{url} from {ns}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// `trellis policy apply -f file` as the testbed's operator, on east's
/// server host.
fn policy_apply(tb: &std::path::Path, file: &std::path::Path) {
    let mut apply = netns::in_ns("tb-east-server", BIN);
    apply
        .args(["policy", "apply", "--server", SERVERS[0], "-f"])
        .arg(file)
        .arg("--credentials")
        .arg(tb.join("operator"));
    netns::run(&mut apply);
}

/// Retries `f` for up to `secs` seconds; panics with the last error and
/// the tail of each of `logs`.
fn eventually<T>(
    what: &str,
    secs: u64,
    logs: &[&std::path::Path],
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => {
                eprintln!("{what}: {:?}", start.elapsed());
                return v;
            }
            Err(e) if start.elapsed() > Duration::from_secs(secs) => {
                let tails: Vec<String> = logs
                    .iter()
                    .map(|l| {
                        let t = std::fs::read_to_string(l).unwrap_or_default();
                        let lines: Vec<&str> = t.lines().collect();
                        format!(
                            "--- {}\n{}",
                            l.display(),
                            lines[lines.len().saturating_sub(25)..].join("\n")
                        )
                    })
                    .collect();
                panic!("{what}: not within {secs} s: {e}\n{}", tails.join("\n"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `trellis inject` on `yaml`, for this zone's controller; the pod template.
fn inject(dir: &std::path::Path, file: &str, yaml: &str, fingerprint: &str) -> serde_json::Value {
    k8s::inject_template(dir, file, yaml, &format!("{}:15012", CTL.1), fingerprint)
}

/// Starts the agent container of `template` in the pod's namespace `ns`,
/// as the kubelet would for `facts`; returns it, its data directory on
/// this host and its log.
fn start_pod(
    dir: &std::path::Path,
    ns: &str,
    template: &serde_json::Value,
    facts: &k8s::PodFacts,
) -> (Proc, std::path::PathBuf, std::path::PathBuf) {
    let run = k8s::prepare_pod(&dir.join("pods").join(&facts.name), template, facts);
    let env: Vec<(&str, String)> = run
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let args: Vec<&str> = run.launch.args.iter().map(String::as_str).collect();
    let log = dir.join(format!("pod-{}.log", facts.name));
    (spawn(ns, &args, &env, &log), run.data, log)
}

#[test]
fn a_kubernetes_zone_calls_and_is_called_by_vm_zones() {
    if let Err(why) = netns::privileged() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Kubernetes testbed test must run in CI (as root): {why}"
        );
        eprintln!("skipped: the Kubernetes zone on the testbed needs root and ip netns: {why}");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tb = dir.join("testbed");
    let up = Command::new(format!("{TESTBED}/up"))
        .env("TRELLIS_BIN", BIN)
        .env("TESTBED_DIR", &tb)
        .output()
        .unwrap();
    let _tb = Testbed(tb.clone());
    assert!(
        up.status.success(),
        "testbed/up failed:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );

    // The zone's CA, and the identities the README has an operator issue
    // for the gateway and the controller (Secrets in a cluster).
    let ca = tb.join("ca");
    let ca_s = ca.to_str().unwrap();
    trellis(&["ca", "zone", "--dir", ca_s, "--zone", "k8s"]);
    let kube_creds = tb.join("data/kube");
    let gw_creds = tb.join("data/gw-k8s-gw");
    for (id, out) in [
        ("zone/k8s/controller/kube", &kube_creds),
        ("zone/k8s/gateway/gw", &gw_creds),
    ] {
        trellis(&[
            "ca",
            "issue",
            "--dir",
            ca_s,
            "--zone",
            "k8s",
            "--id",
            &format!("spiffe://{TD}/{id}"),
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let bundle = CaDir::new(&ca).bundle().unwrap();
    let fingerprint = trellis_federation::token::sha256_hex(bundle.roots()[0].as_ref());
    let servers = SERVERS
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");

    // The API server, inside the controller's host.
    let api = {
        let _rt = rt.enter();
        FakeApi::start_on(listen_in(CTL.0, "127.0.0.1:6443"), Duration::from_secs(1)).unwrap()
    };
    api.apply(namespace("shop", &[("trellis.io/inject", "enabled")]));
    let ctl_cfg = dir.join("controller.toml");
    std::fs::write(
        &ctl_cfg,
        format!(
            "name = \"kube\"\nzone = \"k8s\"\nservers = [{servers}]\ncredentials = \"{}\"\nlisten = \"{}:15012\"\nkubeconfig = \"{}\"\n",
            kube_creds.display(),
            CTL.1,
            api.kubeconfig(dir).unwrap().display()
        ),
    )
    .unwrap();
    let ctl_log = dir.join("controller.log");
    let _ctl = spawn(
        CTL.0,
        &["kube", "controller", "--config", ctl_cfg.to_str().unwrap()],
        &[],
        &ctl_log,
    );
    let gw_cfg = dir.join("gateway.toml");
    std::fs::write(
        &gw_cfg,
        format!(
            "name = \"gw\"\nzone = \"k8s\"\ntrust_domain = \"{TD}\"\nlisten = \"{ip}:15443\"\nzone_listen = \"{ip}:15444\"\nadmin = \"{ip}:15021\"\ncredentials = \"{}\"\nservers = [{servers}]\n",
            gw_creds.display(),
            ip = GW.1,
        ),
    )
    .unwrap();
    let gw_log = dir.join("gateway.log");
    let _gw = spawn(
        GW.0,
        &["gateway", "--config", gw_cfg.to_str().unwrap()],
        &[],
        &gw_log,
    );

    // Pod web-1 of Deployment web: its app calls catalog (west).
    let web = inject(
        dir,
        "web.yaml",
        &format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata:
      labels: {{app: web}}
      annotations: {{trellis.io/inject: enabled, trellis.io/port-protocols: \"{APP_PORT}=http\"}}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: example/web:1
          ports: [{{containerPort: {APP_PORT}}}]
"
        ),
        &fingerprint,
    );
    let job = inject(
        dir,
        "report.yaml",
        "apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: shop}
spec:
  template:
    metadata:
      annotations: {trellis.io/inject: enabled}
    spec:
      serviceAccountName: report
      restartPolicy: Never
      containers:
        - {name: report, image: example/report:1}
",
        &fingerprint,
    );
    let mut pods = Vec::new();
    for (ns, name, account, template) in [
        (P1, "web-5c7f9-k2x8q", "web", &web),
        (P2, "report-x7r2d", "report", &job),
    ] {
        let uid = format!("uid-{name}");
        let annotations = k8s::annotations_of(template);
        api.apply(pod(
            "shop",
            name,
            &uid,
            account,
            "Running",
            &k8s::borrowed(&annotations),
        ));
        let token = format!("eyJhbGciOiJSUzI1NiJ9.projected-token-of-{name}.sig");
        api.add_token(
            &token,
            FakeToken {
                namespace: "shop".into(),
                account: account.into(),
                pod: Some((name.into(), uid)),
                audiences: vec!["trellis".into()],
                expired: false,
            },
        );
        pods.push(start_pod(
            dir,
            ns.0,
            template,
            &k8s::PodFacts {
                name: name.into(),
                namespace: "shop".into(),
                ip: ns.1.into(),
                service_account: account.into(),
                token,
            },
        ));
    }
    let app = |ns: &str, name: &str, call: &str| {
        spawn(
            ns,
            &[
                "demo-app",
                "--name",
                name,
                "--zone",
                "k8s",
                "--listen",
                &format!("127.0.0.1:{APP_PORT}"),
                "--call",
                &format!("http://{call}.shop.mesh:{APP_PORT}/"),
                "--dns",
                "127.0.0.1:53",
            ],
            &[],
            &dir.join(format!("app-{name}.log")),
        )
    };
    let _web_app = app(P1.0, "web", "catalog");
    let _report_app = app(P2.0, "report", "frontend");
    let logs = [
        pods[0].2.as_path(),
        pods[1].2.as_path(),
        ctl_log.as_path(),
        gw_log.as_path(),
    ];

    // A VM in east calls the pod by name: east's gateway, then k8s's.
    let body = eventually("east VM -> web (k8s) -> catalog (west)", 90, &logs, || {
        mesh_get("tb-east-w1", VM_DNS_PORT, "web")
    });
    for hop in [
        "web in zone k8s answered",
        "catalog in zone west answered",
        "inventory in zone west answered",
    ] {
        assert!(body.contains(hop), "{hop}: {body}");
    }
    // The pod's identity came by the exchange alone.
    assert_eq!(
        k8s::spiffe_id(&pods[0].1.join("shop.web.crt")),
        format!("spiffe://{TD}/ns/shop/sa/web")
    );

    // The VM-like host in west (set up by `trellis agent setup`) too:
    // west's gateway, then k8s's.
    let body = eventually("west VM -> web (k8s)", 30, &logs, || {
        mesh_get("tb-west-vm", VM_DNS_PORT, "web")
    });
    assert!(body.contains("web in zone k8s answered"), "{body}");

    // An edge host calls the pod: its agent's link to west's gateway,
    // which relays the stream to k8s's gateway, vouching for the edge.
    let body = eventually("edge host -> web (k8s), relayed by west", 30, &logs, || {
        mesh_get("tb-edge-w1", VM_DNS_PORT, "web")
    });
    assert!(body.contains("web in zone k8s answered"), "{body}");
    // And the pod calls the edge's inventory: k8s's gateway to west's,
    // which carries the edge and opens the stream over the edge's link.
    let body = eventually(
        "web pod -> inventory (edge), relayed by west",
        30,
        &logs,
        || mesh_get_in(P1.0, "53", "inventory.shop.edge.mesh", APP_PORT),
    );
    assert!(body.contains("inventory in zone edge answered"), "{body}");

    // The Job's pod calls east's frontend (then auth, catalog, inventory).
    let body = eventually("Job pod -> frontend (east)", 30, &logs, || {
        get(P2.0, &format!("http://127.0.0.1:{APP_PORT}/"))
    });
    for hop in [
        "report in zone k8s answered",
        "frontend in zone east answered",
        "inventory in zone west answered",
    ] {
        assert!(body.contains(hop), "{hop}: {body}");
    }

    // The Job's pod registered nothing; the Deployment's pod did.
    let mut list = netns::in_ns("tb-east-server", BIN);
    list.args([
        "service", "list", "--output", "json", "--server", SERVERS[0],
    ])
    .arg("--credentials")
    .arg(tb.join("operator"));
    let out = netns::run(&mut list);
    let list = String::from_utf8_lossy(&out.stdout);
    let web_agent = trellis_kube::exchange::agent_name("shop", "web-5c7f9-k2x8q");
    let job_agent = trellis_kube::exchange::agent_name("shop", "report-x7r2d");
    assert!(list.contains(&web_agent), "{list}");
    assert!(!list.contains(&job_agent), "{list}");
    let text = std::fs::read_to_string(&ctl_log).unwrap();
    assert!(!text.contains("projected-token-of"), "a token was logged");

    // A cluster Service without sidecars (a database's pod, say): the
    // controller exports it as plain endpoints, and the zone's gateway
    // terminates for it. Its app listens on its pod's address, as a pod's
    // would, on the Job pod's host (that pod's agent does not serve it).
    let ledger_app = spawn(
        P2.0,
        &[
            "demo-app",
            "--name",
            "ledger",
            "--zone",
            "k8s",
            "--listen",
            &format!("{}:{LEDGER_PORT}", P2.1),
        ],
        &[],
        &dir.join("app-ledger.log"),
    );
    // A Service named `name` whose one port is named `port` (which says
    // what it speaks), with the ledger pod as its one ready endpoint.
    let plain_service = |name: &str, port: &str| {
        api.apply(trellis_kube::testing::service(
            "shop",
            name,
            &[],
            &[(port, LEDGER_PORT)],
        ));
        api.apply(trellis_kube::testing::endpoint_slice(
            "shop",
            name,
            &format!("{name}-8k2f1"),
            &[(P2.1, "ledger-0", true)],
            &[(port, LEDGER_PORT)],
        ));
    };
    plain_service("ledger", "http");
    // From a VM in east: east's gateway, then k8s's, which ends the mTLS.
    let body = eventually("east VM -> ledger (k8s, plain)", 30, &logs, || {
        mesh_get_at("tb-east-w1", VM_DNS_PORT, "ledger", LEDGER_PORT)
    });
    assert!(body.contains("ledger in zone k8s answered"), "{body}");
    // From a pod of the same zone: its agent sends it to its own zone's
    // gateway, which is the only one that can answer for a plain service.
    let body = eventually("web pod -> ledger (same zone, plain)", 30, &logs, || {
        mesh_get_at(P1.0, "53", "ledger", LEDGER_PORT)
    });
    assert!(body.contains("ledger in zone k8s answered"), "{body}");
    // The same app as a Service whose port says nothing of HTTP: callers
    // treat it as opaque TCP, a CONNECT stream the gateway splices.
    plain_service("ledger-raw", "db");
    let body = eventually("east VM -> ledger-raw (k8s, plain, TCP)", 30, &logs, || {
        mesh_get_at("tb-east-w1", VM_DNS_PORT, "ledger-raw", LEDGER_PORT)
    });
    assert!(body.contains("ledger in zone k8s answered"), "{body}");
    // The gateway enforces the service's Authorization, request by request:
    // GETs from web's identity only.
    let policy = dir.join("ledger-authz.yaml");
    std::fs::write(
        &policy,
        format!(
            "kind: Authorization\nmetadata: {{name: ledger}}\nspec:\n  service: ledger.shop\n  allow: [{{from: [\"spiffe://{TD}/ns/shop/sa/web\"], methods: [GET]}}]\n"
        ),
    )
    .unwrap();
    policy_apply(&tb, &policy);
    let denied = eventually(
        "east VM refused by ledger's Authorization",
        30,
        &logs,
        || match mesh_get_at("tb-east-w1", VM_DNS_PORT, "ledger", LEDGER_PORT) {
            Ok(body) => Err(format!("still admitted: {body}")),
            Err(e) if e.contains("403") => Ok(e),
            Err(e) => Err(e),
        },
    );
    assert!(denied.contains("not in any allow list"), "{denied}");
    let body = mesh_get_at(P1.0, "53", "ledger", LEDGER_PORT).unwrap();
    assert!(body.contains("ledger in zone k8s answered"), "{body}");
    let gw = std::fs::read_to_string(&gw_log).unwrap();
    assert!(gw.contains("plain service's caller denied"), "{gw}");
    // An edge service's Export scopes what the store sends each zone's
    // proxies: inventory exported to east and west only leaves the k8s
    // pods' view (their gateway would be refused it), so its edge name
    // stops resolving in the Job's pod. (The carrier, west's gateway,
    // still refuses such a stream from a caller with an older view:
    // `outbound::tests`.)
    let export = dir.join("inventory-export.yaml");
    std::fs::write(
        &export,
        "kind: Export\nmetadata: {name: inventory}\nspec: {service: inventory.shop, to: [east, west]}\n",
    )
    .unwrap();
    policy_apply(&tb, &export);
    eventually(
        "inventory (edge) leaves the Job pod's view",
        30,
        &logs,
        || match mesh_get_in(P2.0, "53", "inventory.shop.edge.mesh", APP_PORT) {
            Err(e) if e.contains("does not resolve") => Ok(e),
            Ok(body) => Err(format!("still resolves and answers: {body}")),
            Err(e) => Err(format!("still resolves: {e}")),
        },
    );
    // The Export goes: the store sends the pods the edge's endpoints again,
    // right behind the deletion, and the call goes through.
    let mut delete = netns::in_ns("tb-east-server", BIN);
    delete
        .args([
            "policy",
            "delete",
            "Export/inventory",
            "--server",
            SERVERS[0],
            "--credentials",
        ])
        .arg(tb.join("operator"));
    netns::run(&mut delete);
    let body = eventually(
        "Job pod -> inventory (edge) once exported again",
        30,
        &logs,
        || mesh_get_in(P2.0, "53", "inventory.shop.edge.mesh", APP_PORT),
    );
    assert!(body.contains("inventory in zone edge answered"), "{body}");
    drop(ledger_app);
    drop(pods);
    api.stop();
}
