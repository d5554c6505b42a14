//! A fake Kubernetes API server, for tests only: no API server can run on
//! the machines the tests run on.
//!
//! It speaks the API's wire format (JSON objects and lists with
//! `resourceVersion`s, watch streams of `{"type", "object"}` lines with
//! `BOOKMARK`s when asked, `410 Gone` for a resource version compacted
//! away, `Status` errors) for namespaces, services, endpointslices and
//! pods, and answers `TokenReview`s from tokens a test registers, so that
//! kube-rs's client and reflectors run against it as against a cluster
//! (through a kubeconfig pointing at it). Tests drive it: apply and delete
//! objects, compact the history, drop every watch connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Pod.
    Pod,
}

impl Kind {
    fn of(kind: &str) -> Option<Self> {
        Some(match kind {
            "Namespace" => Kind::Namespace,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "Pod" => Kind::Pod,
            _ => return None,
        })
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Pod => "pods",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn from_plural(p: &str) -> Option<Self> {
        [
            Kind::Namespace,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Pod,
        ]
        .into_iter()
        .find(|k| k.plural() == p)
    }
}

/// A service-account token the fake's TokenReview knows.
#[derive(Debug, Clone)]
pub struct FakeToken {
    /// Namespace of the service account.
    pub namespace: String,
    /// The service account.
    pub account: String,
    /// The pod it is bound to (name, uid); None: a legacy secret token.
    pub pod: Option<(String, String)>,
    /// Audiences it was issued for.
    pub audiences: Vec<String>,
    /// Expired tokens are refused as the API server refuses them.
    pub expired: bool,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (resource version, kind, namespace, event type, object)
    history: VecDeque<(u64, Kind, String, &'static str, Value)>,
    /// Events at or below this resource version are gone: a watch from an
    /// older version gets 410.
    compacted: u64,
    tokens: HashMap<String, FakeToken>,
    /// Requests served, as `METHOD path?query`.
    log: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    /// The current resource version, for watch tasks to wake on.
    rv: watch::Sender<u64>,
    /// Bumped to cut every open watch connection.
    cut: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// A running fake API server on 127.0.0.1.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl FakeApi {
    /// Starts a fake on `127.0.0.1:port` (0: any) sending bookmarks every
    /// `bookmark_every` on watches that ask for them.
    pub async fn start(port: u16, bookmark_every: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        Self::serve(listener, bookmark_every)
    }

    /// Starts a fake on a socket bound elsewhere (say, inside a network
    /// namespace, where a socket stays whichever thread uses it).
    pub fn start_on(
        listener: std::net::TcpListener,
        bookmark_every: Duration,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Self::serve(TcpListener::from_std(listener)?, bookmark_every)
    }

    fn serve(listener: TcpListener, bookmark_every: Duration) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1000,
                compacted: 0,
                ..State::default()
            }),
            rv: watch::channel(1000).0,
            cut: watch::channel(0).0,
            bookmark_every,
        });
        let shutdown = CancellationToken::new();
        let (i, stop) = (inner.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
                };
                let i = i.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let i = i.clone();
                        async move { Ok::<_, Infallible>(serve(&i, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            inner,
            addr,
            shutdown,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections.
    pub fn stop(&self) {
        self.shutdown.cancel();
        self.cut_watches();
    }

    /// Writes a kubeconfig for this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: controller\ncurrent-context: fake\nusers:\n- name: controller\n  user:\n    token: fake-controller-token\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Adds or replaces an object (its `kind` says which); returns its new
    /// resource version.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"]
            .as_str()
            .and_then(Kind::of)
            .expect("the fake serves Namespace, Service, EndpointSlice and Pod");
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let mut st = self.inner.state.lock().expect("fake state");
        st.rv += 1;
        let rv = st.rv;
        let key = (kind, ns.clone(), name.clone());
        let prior = st.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        let uid = prior
            .as_ref()
            .and_then(|p| p["metadata"]["uid"].as_str().map(String::from))
            .or_else(|| meta["uid"].as_str().map(String::from))
            .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
        meta["uid"] = json!(uid);
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2026-11-30T08:00:00Z");
        }
        obj["apiVersion"] = json!(kind.api_version());
        let ty = if prior.is_some() { "MODIFIED" } else { "ADDED" };
        st.objects.insert(key, obj.clone());
        st.history.push_back((rv, kind, ns, ty, obj));
        drop(st);
        self.inner.rv.send_replace(rv);
        rv
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.inner.state.lock().expect("fake state");
        let Some(mut obj) = st.objects.remove(&(kind, namespace.into(), name.into())) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history
            .push_back((rv, kind, namespace.into(), "DELETED", obj));
        drop(st);
        self.inner.rv.send_replace(rv);
        true
    }

    /// An object as the fake holds it.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let st = self.inner.state.lock().expect("fake state");
        st.objects
            .get(&(kind, namespace.into(), name.into()))
            .cloned()
    }

    /// Forgets the event history (as etcd compaction does): a watch
    /// resuming from an older version gets `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut st = self.inner.state.lock().expect("fake state");
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Cuts every open watch connection mid-stream.
    pub fn cut_watches(&self) {
        self.inner.cut.send_modify(|g| *g += 1);
    }

    /// Registers a token for TokenReview.
    pub fn add_token(&self, token: &str, t: FakeToken) {
        let mut st = self.inner.state.lock().expect("fake state");
        st.tokens.insert(token.into(), t);
    }

    /// Requests served so far whose line contains `needle`.
    pub fn requests(&self, needle: &str) -> usize {
        let st = self.inner.state.lock().expect("fake state");
        st.log.iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(v.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static parts")
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn serve(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
    );
    inner.state.lock().expect("fake state").log.push(line);
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if req.method() == Method::POST {
        return match segs.as_slice() {
            ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => {
                token_review(inner, req).await
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("POST {path}"),
            ),
        };
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} {path}", req.method()),
        );
    }
    // /api/v1/... or /apis/discovery.k8s.io/v1/...
    let rest: &[&str] = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => rest,
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            );
        }
    };
    let (kind, ns, name) = match rest {
        [plural] => (Kind::from_plural(plural), None, None),
        ["namespaces", name] => (Some(Kind::Namespace), None, Some(*name)),
        ["namespaces", ns, plural] => (Kind::from_plural(plural), Some(*ns), None),
        ["namespaces", ns, plural, name] => (Kind::from_plural(plural), Some(*ns), Some(*name)),
        _ => (None, None, None),
    };
    let Some(kind) = kind else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    let q = query(&req);
    if let Some(name) = name {
        let st = inner.state.lock().expect("fake state");
        let key = (kind, ns.unwrap_or("").to_string(), name.to_string());
        return match st.objects.get(&key) {
            Some(o) => respond(StatusCode::OK, o),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural()),
            ),
        };
    }
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        return watch_stream(inner, kind, ns.map(String::from), &q);
    }
    let st = inner.state.lock().expect("fake state");
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, n, _), _)| *k == kind && ns.is_none_or(|ns| n == ns))
        .map(|(_, v)| v)
        .collect();
    respond(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch_stream(
    inner: &Arc<Inner>,
    kind: Kind,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    let inner = inner.clone();
    let mut rv_rx = inner.rv.subscribe();
    let mut cut = inner.cut.subscribe();
    cut.borrow_and_update();
    tokio::spawn(async move {
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let mut sent = from;
        let mut tick = tokio::time::interval(inner.bookmark_every);
        tick.tick().await;
        loop {
            // Everything after `sent`, or 410 when it was compacted away.
            let (events, now, gone) = {
                let st = inner.state.lock().expect("fake state");
                let gone = sent < st.compacted;
                let ev: Vec<(u64, &'static str, Value)> = st
                    .history
                    .iter()
                    .filter(|(rv, k, n, _, _)| {
                        *rv > sent && *k == kind && ns.as_ref().is_none_or(|ns| ns == n)
                    })
                    .map(|(rv, _, _, t, o)| (*rv, *t, o.clone()))
                    .collect();
                (ev, st.rv, gone)
            };
            if gone {
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure",
                        "message": format!("too old resource version: {sent} ({now})"),
                        "reason": "Expired", "code": 410,
                    }})))
                    .await;
                return;
            }
            for (rv, t, o) in events {
                if tx
                    .send(line(json!({"type": t, "object": o})))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = rv;
            }
            tokio::select! {
                r = rv_rx.changed() => if r.is_err() { return },
                _ = cut.changed() => {
                    let _ = tx.send(Err(std::io::Error::other("connection cut by the test"))).await;
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    let now = inner.state.lock().expect("fake state").rv;
                    sent = sent.max(now);
                    let bm = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": sent.to_string()},
                    }});
                    if tx.send(line(bm)).await.is_err() { return }
                }
            }
        }
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(body))
        .expect("static parts")
}

async fn token_review(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc".into()]);
    let known = inner
        .state
        .lock()
        .expect("fake state")
        .tokens
        .get(token)
        .cloned();
    let status_v = match known {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
        Some(t) if t.expired => {
            json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
        }
        Some(t) if !t.audiences.iter().any(|a| wanted.contains(a)) => json!({
            "authenticated": false,
            "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", t.audiences, wanted),
        }),
        Some(t) => {
            let mut extra = serde_json::Map::new();
            if let Some((pod, uid)) = &t.pod {
                extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
                extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
            }
            let aud: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
            json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", t.namespace, t.account),
                    "uid": "6f1c0a3e-0000-4000-8000-000000000001",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                    "extra": extra,
                },
                "audiences": aud,
            })
        }
    };
    respond(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"token": token, "audiences": wanted},
            "status": status_v,
        }),
    )
}

// === objects in the shape a cluster returns them ===

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": name, "labels": pairs(labels)},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// A ClusterIP Service with `annotations`, selecting `app=<name>`.
pub fn service(ns: &str, name: &str, annotations: &[(&str, &str)], ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "protocol": "TCP", "port": p, "targetPort": p}))
        .collect();
    json!({"kind": "Service", "metadata": {"name": name, "namespace": ns, "annotations": pairs(annotations)},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.12.34", "clusterIPs": ["10.96.12.34"],
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": ports,
                    "selector": {"app": name}, "sessionAffinity": "None"},
           "status": {"loadBalancer": {}}})
}

/// An IPv4 EndpointSlice of Service `svc`: (address, pod, ready) per endpoint.
pub fn endpoint_slice(
    ns: &str,
    svc: &str,
    slice: &str,
    endpoints: &[(&str, &str, bool)],
    ports: &[(&str, u16)],
) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": "node-1",
            "targetRef": {"kind": "Pod", "name": pod, "namespace": ns, "uid": format!("uid-{pod}")},
        }))
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({"kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": slice, "namespace": ns, "generateName": format!("{svc}-"),
                        "labels": {"kubernetes.io/service-name": svc,
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
           "endpoints": eps, "ports": ports})
}

/// A Pod with its uid, service account, phase and annotations.
pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    account: &str,
    phase: &str,
    annotations: &[(&str, &str)],
) -> Value {
    json!({"kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": name.split('-').next().unwrap_or(name)},
                        "annotations": pairs(annotations)},
           "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "example/app:1"}]},
           "status": {"phase": phase, "podIP": "10.244.1.7"}})
}

fn pairs(kv: &[(&str, &str)]) -> Value {
    Value::Object(kv.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}
