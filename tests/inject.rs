//! `trellis inject` as users run it: the binary, YAML files in, YAML out.
//!
//! Each workload kind has a golden (`tests/data/inject/NAME.golden.yaml`);
//! set TRELLIS_UPDATE_GOLDENS=1 to rewrite them after a deliberate change,
//! and read the diff. Every golden is also validated against the
//! Kubernetes schemas (1.29 and the newest `kubernetes-validate` knows),
//! injected again to prove it does not change, and read for the names the
//! agent's `--kubernetes` mode and the zone controller rely on.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

#[path = "support/k8s.rs"]
mod k8s;

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "trellis inject failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// Injects `tests/data/inject/INPUT.yaml` with `extra` flags and compares
/// the result with `GOLDEN.golden.yaml`; returns the golden's path.
fn golden(input: &str, golden: &str, extra: &[&str]) -> PathBuf {
    let src = k8s::data(&format!("inject/{input}.yaml"));
    let want_path = k8s::data(&format!("inject/{golden}.golden.yaml"));
    let got = stdout(&k8s::inject(extra, &[&src]));
    if std::env::var_os("TRELLIS_UPDATE_GOLDENS").is_some() {
        std::fs::write(&want_path, &got).expect("write golden");
    }
    let want = std::fs::read_to_string(&want_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (TRELLIS_UPDATE_GOLDENS=1 writes it)",
            want_path.display()
        )
    });
    assert_eq!(
        got,
        want,
        "{input} with {extra:?} differs from {}",
        want_path.display()
    );

    // Idempotent: the output injected again is the output.
    let again = stdout(&k8s::inject(extra, &[&want_path]));
    assert_eq!(
        again,
        want,
        "injecting {} again changed it",
        want_path.display()
    );
    want_path
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

/// The pod templates in a document.
fn templates(doc: &Value) -> Vec<&Value> {
    match doc["kind"].as_str().unwrap_or("") {
        "List" => doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(templates)
            .collect(),
        "Pod" => vec![doc],
        "CronJob" => vec![&doc["spec"]["jobTemplate"]["spec"]["template"]],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            vec![&doc["spec"]["template"]]
        }
        _ => vec![],
    }
}

fn agent(template: &Value, native: bool) -> &Value {
    let list = if native {
        "initContainers"
    } else {
        "containers"
    };
    let cs = template["spec"][list].as_array().expect("containers");
    assert_eq!(
        cs[0]["name"], "trellis-agent",
        "the agent comes first in {list}"
    );
    &cs[0]
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {c}"))
}

/// What the zone controller and the agent's `--kubernetes` mode were
/// promised: the token, the environment, the labels file.
fn check_contract(template: &Value, native: bool) {
    let a = agent(template, native);
    assert_eq!(a["args"], serde_json::json!(["agent", "--kubernetes"]));
    assert_eq!(a["image"], "registry.example/trellis:test");
    for (name, path) in [
        ("TRELLIS_POD_NAME", "metadata.name"),
        ("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
        ("TRELLIS_POD_IP", "status.podIP"),
        ("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        assert_eq!(
            env(a, name)["valueFrom"]["fieldRef"]["fieldPath"],
            path,
            "{name}"
        );
    }
    assert_eq!(env(a, "TRELLIS_ZONE")["value"], "k8s");
    assert_eq!(
        env(a, "TRELLIS_TRUST_ROOT_FINGERPRINT")["value"],
        k8s::FINGERPRINT
    );
    // The controller serves the exchange at /v1/exchange on 15012.
    assert_eq!(
        env(a, "TRELLIS_TOKEN_EXCHANGE")["value"],
        "https://trellis-controller.trellis-system.svc:15012/v1/exchange"
    );
    // The agent's own parser takes what inject wrote.
    trellis_kube::pod::parse_ports(env(a, "TRELLIS_PORTS")["value"].as_str().unwrap())
        .expect("TRELLIS_PORTS parses as the agent reads it");
    // Exactly "true": the controller's registry sync then leaves the pod
    // to its agent.
    assert_eq!(
        template["metadata"]["annotations"][trellis_kube::INJECTED_ANNOTATION],
        "true"
    );
    assert_eq!(env(a, "TRELLIS_DNS")["value"], "127.0.0.1:53");

    // The token: projected, audience-bound, an hour; no secret volume.
    let vols = template["spec"]["volumes"].as_array().unwrap();
    let vol = |n: &str| {
        vols.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("volume {n}"))
    };
    let tok = &vol("trellis-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(tok["audience"], "trellis");
    assert_eq!(tok["expirationSeconds"], 3600);
    assert!(
        vols.iter().all(|v| v.get("secret").is_none()),
        "no secret volume: {vols:?}"
    );
    let mounts = a["volumeMounts"].as_array().unwrap();
    let mount = |n: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == n)
            .unwrap_or_else(|| panic!("mount {n}"))
    };
    assert_eq!(
        format!(
            "{}/{}",
            mount("trellis-token")["mountPath"].as_str().unwrap(),
            tok["path"].as_str().unwrap()
        ),
        "/var/run/secrets/trellis/serviceaccount/token"
    );
    let items = vol("trellis-pod-info")["downwardAPI"]["items"]
        .as_array()
        .unwrap();
    let labels = items
        .iter()
        .find(|i| i["fieldRef"]["fieldPath"] == "metadata.labels")
        .unwrap();
    assert_eq!(
        format!(
            "{}/{}",
            mount("trellis-pod-info")["mountPath"].as_str().unwrap(),
            labels["path"].as_str().unwrap()
        ),
        "/etc/trellis/pod/labels"
    );

    // Non-root, nothing added, read-only, the runtime's seccomp profile.
    let sc = &a["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(sc["runAsUser"].as_i64().unwrap() > 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], serde_json::json!({ "drop": ["ALL"] }));
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(a["resources"]["requests"]["cpu"].is_string());
    assert!(a["resources"]["requests"]["memory"].is_string());

    if native {
        assert_eq!(a["restartPolicy"], "Always");
    } else {
        assert!(a.get("restartPolicy").is_none());
    }
    assert_eq!(a["startupProbe"]["httpGet"]["path"], "/ready");

    // DNS: the agent first, the cluster DNS next, ClusterFirst's search list.
    let spec = &template["spec"];
    assert_eq!(spec["dnsPolicy"], "None");
    assert_eq!(spec["dnsConfig"]["nameservers"][0], "127.0.0.1");
    assert_eq!(spec["dnsConfig"]["nameservers"][1], "10.96.0.10");
    let sysctls = spec["securityContext"]["sysctls"].as_array().unwrap();
    assert!(
        sysctls
            .iter()
            .any(|s| s["name"] == "net.ipv4.ip_unprivileged_port_start" && s["value"] == "0")
    );
}

fn check_golden(path: &Path, native: bool, injected: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let docs = documents(&text);
    let ts: Vec<&Value> = docs.iter().flat_map(templates).collect();
    assert_eq!(ts.len(), injected, "pod templates in {}", path.display());
    for t in ts {
        check_contract(t, native);
    }
    // The schemas have no `List`: its items are validated one by one.
    let mut flat = Vec::new();
    for d in &docs {
        match d["kind"].as_str() {
            Some("List") => flat.extend(d["items"].as_array().unwrap().iter().cloned()),
            _ => flat.push(d.clone()),
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join(path.file_name().unwrap());
    let text: Vec<String> = flat
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(&f, text.join("---\n")).unwrap();
    assert_eq!(
        k8s::validate(&[f]),
        flat.len(),
        "every resource of {} passes",
        path.display()
    );
}

#[test]
fn deployment() {
    let g = golden("deployment", "deployment", &[]);
    check_golden(&g, true, 1);
    let docs = documents(&std::fs::read_to_string(&g).unwrap());
    let t = &docs[0]["spec"]["template"];
    // The app's init container runs after the agent, with the mesh up.
    assert_eq!(t["spec"]["initContainers"][1]["name"], "migrate");
    // UDP ports are not the agent's business; the annotation's protocols are.
    assert_eq!(
        env(agent(t, true), "TRELLIS_PORTS")["value"],
        "8080/http,9090/grpc"
    );
    assert_eq!(
        t["spec"]["dnsConfig"]["searches"],
        serde_json::json!([
            "shop.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local"
        ])
    );
}

#[test]
fn deployment_classic_sidecar() {
    let g = golden(
        "deployment",
        "deployment.classic",
        &["--native-sidecar=false"],
    );
    check_golden(&g, false, 1);
    let docs = documents(&std::fs::read_to_string(&g).unwrap());
    let t = &docs[0]["spec"]["template"];
    assert_eq!(t["spec"]["containers"][1]["name"], "frontend");
    assert_eq!(
        t["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "frontend"
    );
    assert_eq!(t["metadata"]["annotations"]["trellis.io/injected"], "true");
}

#[test]
fn statefulset_by_namespace() {
    let g = golden("statefulset", "statefulset", &[]);
    check_golden(&g, true, 1);
    let text = std::fs::read_to_string(&g).unwrap();
    // The Namespace and the Service come out as they went in.
    let src = std::fs::read_to_string(k8s::data("inject/statefulset.yaml")).unwrap();
    let service = src.split("---\n").nth(1).unwrap();
    assert!(text.contains(service), "the Service's text is kept");
}

#[test]
fn daemonset() {
    let g = golden("daemonset", "daemonset", &[]);
    check_golden(&g, true, 1);
}

#[test]
fn job() {
    let g = golden("job", "job", &[]);
    check_golden(&g, true, 1);
}

#[test]
fn cronjob() {
    let g = golden("cronjob", "cronjob", &[]);
    check_golden(&g, true, 1);
}

#[test]
fn bare_pod_keeps_its_dns_options() {
    let g = golden("pod", "pod", &[]);
    check_golden(&g, true, 1);
    let docs = documents(&std::fs::read_to_string(&g).unwrap());
    let dns = &docs[0]["spec"]["dnsConfig"];
    assert_eq!(dns["searches"][3], "corp.example");
    assert_eq!(
        dns["options"],
        serde_json::json!([{ "name": "ndots", "value": "2" }])
    );
}

#[test]
fn list_items() {
    let g = golden("list", "list", &[]);
    check_golden(&g, true, 1);
}

#[test]
fn pods_without_opt_in_are_untouched() {
    let src = k8s::data("inject/untouched.yaml");
    let got = stdout(&k8s::inject(&["--enabled-namespace", "data"], &[&src]));
    assert_eq!(got, std::fs::read_to_string(&src).unwrap(), "byte for byte");
    let err = String::from_utf8(k8s::inject(&[], &[&src]).stderr).unwrap();
    assert!(err.contains("Deployment shop/legacy not opted in"), "{err}");
}

#[test]
fn stdin_and_several_files() {
    let a = k8s::data("inject/job.yaml");
    let b = k8s::data("inject/cronjob.yaml");
    let both = stdout(&k8s::inject(&[], &[&a, &b]));
    let docs = documents(&both);
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["kind"], "Job");
    assert_eq!(docs[1]["kind"], "CronJob");

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("inject")
        .args(k8s::inject_flags())
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&a).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        documents(&stdout(&out)),
        documents(&stdout(&k8s::inject(&[], &[&a])))
    );
}

fn refused(file: &str, extra: &[&str]) -> String {
    let out = k8s::inject(extra, &[&k8s::data(file)]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{file} must be refused as bad input"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is printed for a refused stream"
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn malformed_yaml_names_the_document_and_line() {
    let err = refused("inject/bad-yaml.yaml", &[]);
    assert!(err.contains("bad-yaml.yaml: document 2"), "{err}");
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(err.contains("line 10"), "{err}");
}

#[test]
fn mistyped_field_is_named() {
    let err = refused("inject/bad-field.yaml", &[]);
    assert!(err.contains("document 2 (Deployment shop/web)"), "{err}");
    assert!(
        err.contains(
            "spec.template.spec.containers[0].ports[0].containerPort: invalid type: string \"http\""
        ),
        "{err}"
    );
}

#[test]
fn bad_opt_in_and_protocol_annotations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pod.yaml");
    let pod = |ann: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\n  annotations:\n{ann}\nspec:\n  containers: [{{name: a, image: b}}]\n"
        )
    };
    std::fs::write(&f, pod("    trellis.io/inject: \"yes\"")).unwrap();
    let out = k8s::inject(&[], &[&f]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("metadata.annotations[\"trellis.io/inject\"]: \"yes\" is neither"),
        "{err}"
    );

    std::fs::write(
        &f,
        pod("    trellis.io/inject: enabled\n    trellis.io/port-protocols: \"8080=quic\""),
    )
    .unwrap();
    let err = String::from_utf8(k8s::inject(&[], &[&f]).stderr).unwrap();
    assert!(
        err.contains("trellis.io/port-protocols\"]: port 8080: \"quic\" is not one of"),
        "{err}"
    );
}

#[test]
fn a_pod_without_namespace_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pod.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {trellis.io/inject: enabled}\nspec:\n  containers: [{name: a, image: b}]\n",
    )
    .unwrap();
    let err = String::from_utf8(k8s::inject(&[], &[&f]).stderr).unwrap();
    assert!(err.contains("metadata.namespace: unset"), "{err}");
    let out = stdout(&k8s::inject(&["-n", "shop"], &[&f]));
    assert!(out.contains("shop.svc.cluster.local"), "{out}");
}

#[test]
fn host_network_pods_are_left_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pod.yaml");
    let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\n  labels: {trellis.io/inject: enabled}\nspec:\n  hostNetwork: true\n  containers: [{name: a, image: b}]\n";
    std::fs::write(&f, text).unwrap();
    let out = k8s::inject(&[], &[&f]);
    assert_eq!(stdout(&out), text);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning:"),
        "a warning says why"
    );
}

#[test]
fn the_agent_can_be_started_from_the_pod_spec_alone() {
    let g = k8s::data("inject/deployment.golden.yaml");
    let docs = documents(&std::fs::read_to_string(g).unwrap());
    let t = &docs[0]["spec"]["template"];
    let facts = k8s::PodFacts {
        name: "frontend-7d9f8b6c5-x2x9q".into(),
        namespace: "shop".into(),
        ip: "10.244.1.17".into(),
        service_account: "frontend".into(),
        token: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(),
    };
    let launch = k8s::agent_launch(t, &facts);
    assert_eq!(launch.args, ["agent", "--kubernetes"]);
    let env: std::collections::BTreeMap<_, _> = launch.env.iter().cloned().collect();
    assert_eq!(env["TRELLIS_POD_NAME"], facts.name);
    assert_eq!(env["TRELLIS_POD_NAMESPACE"], "shop");
    assert_eq!(env["TRELLIS_POD_IP"], "10.244.1.17");
    assert_eq!(env["TRELLIS_SERVICE_ACCOUNT"], "frontend");
    let file = |p: &str| {
        launch
            .files
            .iter()
            .find(|(path, _)| path == Path::new(p))
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("no {p} in {:?}", launch.files))
    };
    assert_eq!(
        file("/var/run/secrets/trellis/serviceaccount/token"),
        facts.token
    );
    assert_eq!(file("/etc/trellis/pod/labels"), "app=\"frontend\"\n");
    assert!(
        file("/etc/trellis/pod/annotations")
            .contains("trellis.io/port-protocols=\"8080=http,9090=grpc\"\n")
    );
    assert_eq!(launch.writable, [PathBuf::from("/var/lib/trellis/agent")]);
}

#[test]
fn without_cluster_dns_it_says_which_it_assumed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "inject",
            "--zone",
            "k8s",
            "--trust-root-fingerprint",
            k8s::FINGERPRINT,
        ])
        .arg(k8s::data("inject/pod.yaml"))
        .env_remove("TRELLIS_ZONE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("to 10.96.0.10 (kubeadm's cluster DNS)"),
        "{err}"
    );
    let docs = documents(&stdout(&out));
    assert_eq!(docs[0]["spec"]["dnsConfig"]["nameservers"][1], "10.96.0.10");
}

#[test]
fn a_classic_sidecar_in_a_job_is_warned_about() {
    let out = k8s::inject(
        &["--native-sidecar=false"],
        &[&k8s::data("inject/job.yaml")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:") && err.contains("never completes"),
        "{err}"
    );
    let out = k8s::inject(&[], &[&k8s::data("inject/job.yaml")]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning:"));
}
