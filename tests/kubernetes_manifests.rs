//! The manifests under configs/kubernetes: rendered with `kubectl
//! kustomize` (each overlay, and one with the NodePort component), validated
//! strictly against the Kubernetes schemas (1.29 and the newest
//! `kubernetes-validate` knows), and read for what the rest of Trellis
//! relies on: the configuration files each role loads, the flags each
//! container passes, least-privilege RBAC, and the webhook's selectors.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

#[path = "support/k8s.rs"]
mod k8s;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/kubernetes")
}

/// `kubectl kustomize DIR`, parsed.
fn render(dir: &Path) -> (String, Vec<Value>) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed to render the manifests ({e}); .ci/run installs it")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    (text, docs)
}

/// Renders, writes the result to a file and validates it.
fn render_and_validate(dir: &Path) -> Vec<Value> {
    let (text, docs) = render(dir);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("rendered.yaml");
    std::fs::write(&f, text).unwrap();
    let passed = k8s::validate(&[f]);
    assert_eq!(
        passed,
        docs.len(),
        "every rendered resource has a schema and passes"
    );
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n == name || n.starts_with(&format!("{name}-")))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn has(docs: &[Value], kind: &str, name: &str) -> bool {
    docs.iter()
        .any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// What every role's pod must be, as the namespace's `restricted` Pod
/// Security Standard also demands.
fn check_hardened(docs: &[Value]) {
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
    {
        let name = &d["metadata"]["name"];
        let spec = pod_spec(d);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"], json!({ "drop": ["ALL"] }), "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert!(
                c["image"].as_str().unwrap().starts_with("trellis:"),
                "{name}"
            );
        }
    }
    let ns = find(docs, "Namespace", "trellis-system");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_eq!(ns["metadata"]["labels"]["trellis.io/inject"], "disabled");
}

fn check_rbac(docs: &[Value]) {
    let role = find(docs, "ClusterRole", "trellis-controller");
    let mut rules: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                let verbs = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect();
                rules.push((
                    g.as_str().unwrap().into(),
                    res.as_str().unwrap().into(),
                    verbs,
                ));
            }
        }
    }
    rules.sort();
    let watch = || vec!["get".to_owned(), "list".into(), "watch".into()];
    assert_eq!(
        rules,
        vec![
            ("".into(), "namespaces".into(), watch()),
            ("".into(), "pods".into(), watch()),
            ("".into(), "services".into(), watch()),
            (
                "authentication.k8s.io".into(),
                "tokenreviews".into(),
                vec!["create".to_owned()]
            ),
            (
                "discovery.k8s.io".into(),
                "endpointslices".into(),
                vec!["list".to_owned(), "watch".into()]
            ),
        ],
        "the controller may read what it watches and create TokenReviews, nothing else"
    );
    // No other role or binding: the webhook, gateway and servers have no API access.
    let roles = docs
        .iter()
        .filter(|d| d["kind"].as_str().unwrap().ends_with("Role"))
        .count();
    assert_eq!(roles, 1);
    for sa in ["trellis-webhook", "trellis-gateway", "trellis-server"] {
        assert_eq!(
            find(docs, "ServiceAccount", sa)["automountServiceAccountToken"],
            false,
            "{sa}"
        );
    }
    // Every rule says why, in the file itself.
    let text = std::fs::read_to_string(root().join("base/rbac.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("- apiGroups:") {
            assert!(
                lines[i - 1].trim_start().starts_with('#'),
                "rbac.yaml line {}: a rule without its reason",
                i + 1
            );
        }
    }
}

fn check_webhook(docs: &[Value]) {
    let dep = find(docs, "Deployment", "trellis-webhook");
    let c = &pod_spec(dep)["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The flags parse: the command gets as far as reading the trust bundle.
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(&args)
        .env("TRELLIS_ZONE", "k8s")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trust-bundle /etc/trellis/webhook/webhook.bundle: could not read it"),
        "{err}"
    );

    let svc = find(docs, "Service", "trellis-webhook");
    let cfg = find(docs, "MutatingWebhookConfiguration", "trellis-inject");
    let hooks = cfg["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2);
    for h in hooks {
        assert_eq!(h["failurePolicy"], "Fail");
        assert_eq!(h["sideEffects"], "None");
        assert_eq!(h["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(
            h["clientConfig"]["service"]["name"],
            svc["metadata"]["name"]
        );
        assert_eq!(h["clientConfig"]["service"]["namespace"], "trellis-system");
        assert_eq!(h["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(
            h["clientConfig"]["service"]["port"],
            svc["spec"]["ports"][0]["port"]
        );
        assert_eq!(h["rules"][0]["operations"], json!(["CREATE"]));
        assert_eq!(h["rules"][0]["resources"], json!(["pods"]));
    }
    // The namespace opt-in, and the pod-label opt-in everywhere else.
    assert_eq!(
        hooks[0]["namespaceSelector"]["matchExpressions"][0],
        json!({ "key": "trellis.io/inject", "operator": "In", "values": ["enabled"] })
    );
    assert_eq!(
        hooks[1]["objectSelector"]["matchExpressions"][0],
        json!({ "key": "trellis.io/inject", "operator": "In", "values": ["enabled"] })
    );
    let skipped = &hooks[1]["namespaceSelector"]["matchExpressions"][1]["values"];
    assert!(
        skipped
            .as_array()
            .unwrap()
            .contains(&json!("trellis-system"))
    );
}

/// The gateway's TOML loads as the gateway loads it, and its Service
/// carries UDP and TCP 15443.
fn check_gateway(docs: &[Value], service_type: &str) {
    let cm = find(docs, "ConfigMap", "trellis-gateway");
    let toml = cm["data"]["gateway.toml"].as_str().unwrap();
    let cfg = trellis_gateway::config::GatewayConfig::from_toml(toml)
        .unwrap_or_else(|e| panic!("gateway.toml: {e}"));
    assert_eq!(cfg.zone, "k8s");
    let dep = find(docs, "Deployment", "trellis-gateway");
    let c = &pod_spec(dep)["containers"][0];
    assert_eq!(
        c["args"],
        json!(["gateway", "--config", "/etc/trellis/gateway/gateway.toml"])
    );
    assert_eq!(
        pod_spec(dep)["volumes"][0]["configMap"]["name"],
        cm["metadata"]["name"]
    );
    let svc = find(docs, "Service", "trellis-gateway");
    assert_eq!(svc["spec"]["type"], service_type);
    let ports: Vec<(String, u64)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["protocol"].as_str().unwrap().to_owned(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        vec![("UDP".to_owned(), 15443), ("TCP".to_owned(), 15443)]
    );
}

/// The controller runs the real CLI: its controller.toml loads with the
/// controller's own parser, the credentials Secret sits where that file
/// says, and the Service is where `trellis inject` points the agents.
fn check_controller(docs: &[Value]) -> trellis_kube::ControllerConfig {
    let cm = find(docs, "ConfigMap", "trellis-controller");
    let cfg = trellis_kube::ControllerConfig::from_toml(
        cm["data"]["controller.toml"]
            .as_str()
            .expect("controller.toml in the trellis-controller ConfigMap"),
    )
    .unwrap_or_else(|e| panic!("controller.toml: {e}"));
    assert_eq!(cfg.zone, "k8s");
    let dep = find(docs, "Deployment", "trellis-controller");
    let spec = pod_spec(dep);
    assert_eq!(spec["serviceAccountName"], "trellis-controller");
    let c = &spec["containers"][0];
    assert_eq!(
        c["args"],
        json!([
            "kube",
            "controller",
            "--config",
            "/etc/trellis/controller/controller.toml"
        ])
    );
    let volume = |name: &str| {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mount_of = |path: &Path| {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == path.to_str())
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
        volume(m["name"].as_str().unwrap())
    };
    assert_eq!(
        mount_of(Path::new("/etc/trellis/controller"))["configMap"]["name"],
        cm["metadata"]["name"]
    );
    assert_eq!(
        mount_of(cfg.credentials.parent().unwrap())["secret"]["secretName"],
        "trellis-controller-credentials",
        "the credentials prefix {} is in the Secret",
        cfg.credentials.display()
    );
    assert_eq!(c["ports"][0]["containerPort"], cfg.listen.port());
    let svc = find(docs, "Service", "trellis-controller");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15012);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], c["ports"][0]["name"]);
    // Where the webhook (and inject's default) send the agents' exchange.
    let webhook = find(docs, "Deployment", "trellis-webhook");
    let url = format!(
        "--token-exchange=https://{}.{}.svc:{}{}",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap(),
        svc["spec"]["ports"][0]["port"],
        trellis_kube::EXCHANGE_PATH
    );
    assert!(
        pod_spec(webhook)["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!(url)),
        "the webhook gives agents {url}"
    );
    let zone = find(docs, "ConfigMap", "trellis-zone");
    assert_eq!(zone["data"]["TRELLIS_ZONE"], cfg.zone);
    cfg
}

#[test]
fn zone_servers_overlay() {
    let docs = render_and_validate(&root().join("overlays/zone-servers"));
    check_hardened(&docs);
    check_rbac(&docs);
    check_webhook(&docs);
    check_gateway(&docs, "LoadBalancer");
    let controller = check_controller(&docs);

    let sts = find(&docs, "StatefulSet", "trellis-server");
    assert_eq!(sts["spec"]["serviceName"], "trellis-server");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let headless = find(&docs, "Service", "trellis-server");
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // server.toml with the pod's flags, and what the join adds (zone and
    // credentials: tests/server_join.rs runs that), is a valid server
    // configuration.
    let toml = find(&docs, "ConfigMap", "trellis-server")["data"]["server.toml"]
        .as_str()
        .unwrap();
    let mut cfg = trellis_federation::config::ServerConfig::from_toml(toml)
        .unwrap_or_else(|e| panic!("server.toml: {e}"));
    let c = &pod_spec(sts)["containers"][0];
    let args = &c["args"];
    assert_eq!(args[0], "server");
    assert_eq!(args[1], "--config=/etc/trellis/server/server.toml");
    assert_eq!(args[4], "--join-token-file=/etc/trellis/join/token");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let join = mounts
        .iter()
        .find(|m| m["mountPath"] == "/etc/trellis/join")
        .expect("the token's mount");
    let vol = pod_spec(sts)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == join["name"])
        .unwrap();
    assert_eq!(vol["secret"]["secretName"], "trellis-server-join");
    let data = mounts.iter().find(|m| m["name"] == "data").unwrap();
    assert_eq!(
        data["mountPath"].as_str().unwrap(),
        cfg.data_dir.to_str().unwrap(),
        "the join's credentials land on the volume"
    );
    cfg.name = "trellis-server-0".into();
    cfg.zone = "k8s".into();
    cfg.advertise = Some(
        args[3]
            .as_str()
            .unwrap()
            .trim_start_matches("--advertise=")
            .replace("$(POD_NAME)", "trellis-server-0"),
    );
    cfg.credentials = Some(cfg.data_dir.join("server"));
    cfg.validate()
        .unwrap_or_else(|e| panic!("server.toml with the pod's flags: {e}"));
    let gw = trellis_gateway::config::GatewayConfig::from_toml(
        find(&docs, "ConfigMap", "trellis-gateway")["data"]["gateway.toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        gw.servers,
        vec![cfg.advertise.clone().unwrap()],
        "the gateway finds this cluster's server"
    );
    assert_eq!(
        controller.servers, gw.servers,
        "the controller finds this cluster's server"
    );
}

#[test]
fn join_remote_overlay() {
    let docs = render_and_validate(&root().join("overlays/join-remote"));
    check_hardened(&docs);
    check_rbac(&docs);
    check_webhook(&docs);
    check_gateway(&docs, "LoadBalancer");
    check_controller(&docs);
    assert!(
        !docs.iter().any(|d| d["kind"] == "StatefulSet"),
        "no servers here"
    );
    assert!(!has(&docs, "Service", "trellis-server"));
}

#[test]
fn nodeport_component() {
    // kustomize refuses absolute paths, so the tree is copied beside a
    // test overlay that adds the component.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&root(), &tmp.path().join("kubernetes"));
    let overlay = tmp.path().join("kubernetes/overlays/test-nodeport");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources:\n  - ../join-remote\ncomponents:\n  - ../../components/nodeport\n",
    )
    .unwrap();
    let docs = render_and_validate(&overlay);
    check_gateway(&docs, "NodePort");
    let svc = find(&docs, "Service", "trellis-gateway");
    for p in svc["spec"]["ports"].as_array().unwrap() {
        assert_eq!(p["nodePort"], 31443);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
