//! `trellis webhook` as the API server calls it: AdmissionReview v1 JSON
//! over HTTPS, to a certificate from the mesh CA checked by its DNS name,
//! and the JSON patch it answers applied with the `json-patch` crate. The
//! patched pod must be the pod `trellis inject` prints for the same input.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

#[path = "support/k8s.rs"]
mod k8s;

/// The name the API server calls the webhook by (its Service).
const SERVICE_DNS: &str = "trellis-webhook.trellis-system.svc";
/// This suite's ports (the range given to the Kubernetes tests).
const PORTS: std::ops::Range<u16> = 27400..27500;

fn trellis(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .expect("run trellis");
    assert!(
        out.status.success(),
        "trellis {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Webhook {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, the webhook's certificate for its Service name, and the webhook
/// on the first free port of [`PORTS`].
fn start() -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let creds = dir.path().join("webhook");
    trellis(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    trellis(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://trellis.local/ns/trellis-system/sa/trellis-webhook",
        "--dns-name",
        SERVICE_DNS,
        "--out",
        creds.to_str().unwrap(),
    ]);
    for port in PORTS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .arg("webhook")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--credentials", creds.to_str().unwrap()])
            .args(k8s::inject_flags())
            .env_remove("TRELLIS_ZONE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.starts_with("webhook listening on https://") {
            assert!(
                line.trim_end().ends_with(&format!(":{port}/inject")),
                "{line}"
            );
            return Webhook { child, port, dir };
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("could not listen"),
            "the webhook did not start: {err}"
        );
    }
    panic!("no free port in {PORTS:?}");
}

/// POSTs `body` to the webhook over TLS, checking its certificate against
/// the mesh root for `server_name`; returns the status and body.
async fn post(
    wh: &Webhook,
    server_name: &str,
    path: &str,
    body: &Value,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(wh.dir.path().join("ca/bundle.pem")).unwrap();
    for cert in trellis_ca::certs_from_pem(&pem, "bundle").unwrap() {
        roots.add(cert).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", wh.port)).await?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", server_name)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

/// A pod as the API server hands it to a mutating webhook: made by a
/// ReplicaSet (generateName, no name yet), defaults filled in, the
/// service-account token volume added by its admission plugin.
fn rs_pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "frontend-7d9f8b6c5-",
            "labels": { "app": "frontend", "pod-template-hash": "7d9f8b6c5" },
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "frontend-7d9f8b6c5",
                "uid": "1b0c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d", "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "serviceAccountName": "frontend",
            "containers": [{
                "name": "frontend",
                "image": "registry.example/shop/frontend:1.4.2",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [{
                    "name": "kube-api-access-x7k2p",
                    "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                }],
            }],
            "volumes": [{
                "name": "kube-api-access-x7k2p",
                "projected": {
                    "sources": [
                        { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
                        { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
                    ],
                    "defaultMode": 420,
                },
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 },
            ],
        },
        "status": {},
    })
}

fn review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "8d1c2b3a-4e5f-4061-9a8b-7c6d5e4f3a2b",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        },
    })
}

/// Sends the review and returns its `response`, checking the envelope.
async fn admit(wh: &Webhook, uid: &str, pod: &Value) -> Value {
    let (status, body) = post(wh, SERVICE_DNS, "/inject", &review(uid, pod))
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(
        v["response"]["uid"], uid,
        "the response echoes the request's uid"
    );
    v["response"].clone()
}

fn apply(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

/// `trellis inject -n shop --enabled-namespace shop` of the same pod.
fn offline(pod: &Value, dir: &Path) -> Value {
    let f = dir.join("pod.yaml");
    std::fs::write(&f, serde_yaml::to_string(pod).unwrap()).unwrap();
    let out = k8s::inject(&["-n", "shop", "--enabled-namespace", "shop"], &[&f]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_patched_pod_is_the_injected_pod() {
    let wh = start();
    let pod = rs_pod(json!({ "trellis.io/port-protocols": "8080=http" }));
    let response = admit(&wh, "705ab4f5-6393-11e8-b7cc-42010a800002", &pod).await;
    assert_eq!(response["allowed"], true);
    let patched = apply(&pod, &response);
    assert_eq!(patched, offline(&pod, wh.dir.path()));
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "trellis-agent"
    );
    assert_eq!(
        patched["spec"]["initContainers"][0]["restartPolicy"],
        "Always"
    );
    assert_eq!(
        patched["spec"]["dnsConfig"]["searches"][0],
        "shop.svc.cluster.local"
    );

    // Reinvoked on its own output, it changes nothing.
    let again = admit(&wh, "705ab4f5-6393-11e8-b7cc-42010a800003", &patched).await;
    assert_eq!(again["allowed"], true);
    assert!(again.get("patch").is_none(), "{again}");
}

#[tokio::test]
async fn opted_out_and_other_requests_are_allowed_unchanged() {
    let wh = start();
    let pod = rs_pod(json!({ "trellis.io/inject": "disabled" }));
    let r = admit(&wh, "u-1", &pod).await;
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none());

    let mut update = review("u-2", &rs_pod(json!({})));
    update["request"]["operation"] = json!("UPDATE");
    let (status, body) = post(&wh, SERVICE_DNS, "/inject", &update).await.unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());

    let mut host = rs_pod(json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let r = admit(&wh, "u-3", &host).await;
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none());
    assert!(
        r["warnings"][0].as_str().unwrap().contains("hostNetwork"),
        "{r}"
    );
}

#[tokio::test]
async fn a_bad_annotation_is_refused_with_its_name() {
    let wh = start();
    let pod = rs_pod(json!({ "trellis.io/port-protocols": "http" }));
    let r = admit(&wh, "u-4", &pod).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 400);
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(msg.contains("trellis.io/port-protocols"), "{msg}");
}

#[tokio::test]
async fn not_a_review_or_wrong_place() {
    let wh = start();
    let (status, body) = post(&wh, SERVICE_DNS, "/inject", &json!({ "hello": 1 }))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("apiVersion"));
    let (status, _) = post(
        &wh,
        SERVICE_DNS,
        "/mutate",
        &review("u", &rs_pod(json!({}))),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    // The certificate names the Service, not any other host.
    let err = post(&wh, "trellis-webhook.other.svc", "/inject", &json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn sighup_or_a_changed_file_rereads_the_certificate_and_sigterm_stops_it() {
    let mut wh = start();
    let ca = wh.dir.path().join("ca");
    let creds = wh.dir.path().join("webhook");
    // The Service moved: a certificate for the new name, then SIGHUP.
    let moved = "trellis-webhook.mesh-system.svc";
    let before = post(&wh, moved, "/inject", &json!({})).await;
    assert!(before.is_err(), "the old certificate does not name {moved}");
    trellis(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://trellis.local/ns/mesh-system/sa/trellis-webhook",
        "--dns-name",
        moved,
        "--out",
        creds.to_str().unwrap(),
    ]);
    let pid = nix::unistd::Pid::from_raw(wh.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    served(
        &wh,
        moved,
        "u-5",
        5,
        20,
        "the new certificate was not served",
    )
    .await;

    // A rotated Secret: the files change and nobody signals. The webhook
    // checks them every 10 s (30 s allowed for a loaded machine).
    let rotated = "trellis-webhook.rotated.svc";
    trellis(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://trellis.local/ns/rotated/sa/trellis-webhook",
        "--dns-name",
        rotated,
        "--out",
        creds.to_str().unwrap(),
    ]);
    let started = std::time::Instant::now();
    served(
        &wh,
        rotated,
        "u-6",
        30,
        200,
        "the rotated certificate was not served without a signal",
    )
    .await;
    eprintln!("rotated certificate served after {:?}", started.elapsed());

    // SIGTERM: it drains and exits 0.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = wh.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "still running after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

/// Waits until the webhook answers an admission review for `name` (TLS
/// with a certificate for that name) within `limit_s` seconds, asking every
/// `every_ms`.
async fn served(wh: &Webhook, name: &str, uid: &str, limit_s: u64, every_ms: u64, failure: &str) {
    let started = std::time::Instant::now();
    loop {
        match post(wh, name, "/inject", &review(uid, &rs_pod(json!({})))).await {
            Ok((200, _)) => return,
            other => assert!(
                started.elapsed() < std::time::Duration::from_secs(limit_s),
                "{failure}: {other:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(every_ms)).await;
    }
}
