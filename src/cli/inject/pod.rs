//! The mutation itself: one pod template in, the same template with the
//! agent beside the app out. `trellis inject` and the admission webhook both
//! call [`inject_template`], so what a cluster admits is what the offline
//! command prints.
//!
//! The template is a JSON value (`metadata` and `spec`), not a typed
//! `PodTemplateSpec`: a typed round trip would drop every field newer than
//! the schema version we compile against. The typed schema only checks the
//! template first ([`super::documents`]), so that a refusal names the field.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::options::{
    ADMIN_PORT, AGENT_CONTAINER, AGENT_DNS, ANNOTATION_INJECT, ANNOTATION_INJECTED,
    ANNOTATION_PORT_PROTOCOLS, DATA_DIR, DATA_VOLUME, INBOUND_PORT, INJECTED_TRUE, InjectOptions,
    LABELS_DIR, PODINFO_VOLUME, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS, TOKEN_VOLUME,
};

/// The sysctl that lets a non-root process bind ports below 1024 in the
/// pod's network namespace (the agent's DNS on 53, and loopback listeners
/// for mesh services on ports such as 80). It is in Kubernetes' safe set.
const UNPRIVILEGED_PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";

/// Where a template stands with respect to the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The agent was added.
    Injected,
    /// It already has the agent: left as it is (inject is idempotent).
    AlreadyInjected,
    /// Neither the pod nor its namespace opted in.
    NotOptedIn,
    /// Opted in, but it cannot carry the agent; the reason says why.
    Skipped(String),
}

/// What the template's surroundings say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    /// The pod's namespace, when known (the DNS search list names it).
    pub(crate) namespace: Option<&'a str>,
    /// The namespace's `trellis.io/inject` label.
    pub(crate) namespace_says: NamespaceSays,
}

/// A namespace's `trellis.io/inject` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NamespaceSays {
    /// No label: only pods that opt in themselves.
    Nothing,
    /// `enabled`: every pod that does not opt out.
    Enabled,
    /// `disabled`: no pod, whatever it says (as Istio's namespace label;
    /// the mesh's own namespace is labelled so).
    Disabled,
}

/// A refusal: the field (relative to the template) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// A path such as `metadata.annotations["trellis.io/port-protocols"]`.
    pub(crate) field: String,
    /// What is wrong with it.
    pub(crate) reason: String,
}

/// The protocols a port may declare (the agent's `port_protocols`).
const PROTOCOLS: &[&str] = &["detect", "http", "http2", "grpc", "tcp"];

/// Adds the agent to `template` (an object with `metadata` and `spec`) when
/// the pod or its namespace opted in.
pub(crate) fn inject_template(
    opts: &InjectOptions,
    template: &mut Value,
    cx: Context<'_>,
) -> Result<Outcome, FieldError> {
    // The pod's own value is still checked, so a typo is refused even
    // where the namespace says no.
    let pod_says = opted_in(template, cx.namespace_says == NamespaceSays::Enabled)?;
    if !pod_says || cx.namespace_says == NamespaceSays::Disabled {
        return Ok(Outcome::NotOptedIn);
    }
    let spec = template.get("spec").unwrap_or(&Value::Null);
    if has_agent(spec) {
        return Ok(Outcome::AlreadyInjected);
    }
    if let Some(reason) = cannot_carry(spec) {
        return Ok(Outcome::Skipped(reason));
    }
    let Some(namespace) = cx.namespace else {
        return Err(FieldError {
            field: "metadata.namespace".into(),
            reason: "unset, and no namespace was given (--namespace): the pod's DNS search \
                     list names its namespace"
                .into(),
        });
    };
    let ports = app_ports(template)?;
    for name in [TOKEN_VOLUME, PODINFO_VOLUME, DATA_VOLUME] {
        if volume_index(spec, name).is_some() {
            return Err(FieldError {
                field: "spec.volumes".into(),
                reason: format!(
                    "a volume named {name} exists but no {AGENT_CONTAINER} container: rename it, the agent needs that name"
                ),
            });
        }
    }

    let agent = agent_container(opts, &ports);
    let spec = object_at(template, "spec");
    if opts.native_sidecar {
        // First, so that the app's own init containers already have the
        // mesh (and its DNS) when they run.
        array_at(spec, "initContainers").insert(0, agent);
    } else {
        let first_app = spec
            .get("containers")
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        // First, because the kubelet starts containers in order: the agent
        // gets a head start on the app (nothing waits for it, though).
        array_at(spec, "containers").insert(0, agent);
        if let Some(app) = first_app {
            // `kubectl logs` and `exec` still mean the app, not the agent.
            let ann = object_at(object_at(template, "metadata"), "annotations");
            ann.entry("kubectl.kubernetes.io/default-container")
                .or_insert(Value::String(app));
        }
    }
    let spec = object_at(template, "spec");
    array_at(spec, "volumes").extend(volumes());
    dns(spec, namespace, opts);
    unprivileged_ports(spec);
    let ann = object_at(object_at(template, "metadata"), "annotations");
    // Exactly "true": the zone controller leaves such pods out of its
    // registry sync, because their agents register them.
    ann.insert(
        ANNOTATION_INJECTED.into(),
        Value::String(INJECTED_TRUE.into()),
    );
    Ok(Outcome::Injected)
}

/// The pod's own say (annotation, then label) wins over its namespace's.
fn opted_in(template: &Value, namespace_opted_in: bool) -> Result<bool, FieldError> {
    let meta = template.get("metadata");
    let read = |map: &str| -> Result<Option<bool>, FieldError> {
        let Some(v) = meta
            .and_then(|m| m.get(map))
            .and_then(|m| m.get(ANNOTATION_INJECT))
        else {
            return Ok(None);
        };
        match v.as_str() {
            Some("enabled") => Ok(Some(true)),
            Some("disabled") => Ok(Some(false)),
            _ => Err(FieldError {
                field: format!("metadata.{map}[\"{ANNOTATION_INJECT}\"]"),
                reason: format!("{v} is neither \"enabled\" nor \"disabled\""),
            }),
        }
    };
    let annotation = read("annotations")?;
    let label = read("labels")?;
    if let (Some(a), Some(l)) = (annotation, label)
        && a != l
    {
        return Err(FieldError {
            field: format!("metadata.annotations[\"{ANNOTATION_INJECT}\"]"),
            reason: "says the opposite of the label of the same name; keep one".into(),
        });
    }
    Ok(annotation.or(label).unwrap_or(namespace_opted_in))
}

fn has_agent(spec: &Value) -> bool {
    ["initContainers", "containers"].iter().any(|list| {
        spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(AGENT_CONTAINER))
        })
    })
}

/// Why an opted-in pod cannot have the agent, if it cannot.
fn cannot_carry(spec: &Value) -> Option<String> {
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Some(
            "spec.hostNetwork is true: the agent's DNS and loopback listeners would be the node's"
                .into(),
        );
    }
    match spec.get("dnsPolicy").and_then(Value::as_str) {
        Some("Default") => {
            return Some(
                "spec.dnsPolicy is Default (the node's resolvers): the agent forwards other names \
                 to the cluster DNS, which is not what this pod asked for"
                    .into(),
            );
        }
        Some("None") => {
            let n = spec
                .pointer("/dnsConfig/nameservers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if n >= 3 {
                return Some(
                    "spec.dnsConfig.nameservers has 3 entries already (the most a pod may have): \
                     no room for the agent's"
                        .into(),
                );
            }
        }
        _ => {}
    }
    None
}

/// The app's TCP ports and each one's protocol: every `containerPort` of
/// the app containers (`detect` unless the annotation says otherwise), plus
/// any port the annotation names.
fn app_ports(template: &Value) -> Result<BTreeMap<u16, String>, FieldError> {
    let mut ports = BTreeMap::new();
    let containers = template
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (i, c) in containers.iter().enumerate() {
        let declared = c
            .get("ports")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for (j, p) in declared.iter().enumerate() {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|p| p == "TCP");
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok());
            let Some(port) = port else { continue };
            // The pod is one network namespace: the app cannot have what
            // the agent binds on every address (53 is UDP and TCP).
            if port == INBOUND_PORT || port == ADMIN_PORT || port == 53 {
                return Err(FieldError {
                    field: format!("spec.containers[{i}].ports[{j}].containerPort"),
                    reason: format!(
                        "{port} is the agent's own port ({INBOUND_PORT} inbound, {ADMIN_PORT} admin, 53 DNS); move the app or opt the pod out"
                    ),
                });
            }
            if tcp {
                ports.insert(port, "detect".to_owned());
            }
        }
    }
    let field = || format!("metadata.annotations[\"{ANNOTATION_PORT_PROTOCOLS}\"]");
    let Some(ann) = template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_PORT_PROTOCOLS))
    else {
        return Ok(ports);
    };
    let text = ann.as_str().ok_or_else(|| FieldError {
        field: field(),
        reason: format!("{ann} is not a string"),
    })?;
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |reason: String| FieldError {
            field: field(),
            reason,
        };
        let (port, proto) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?} is not PORT=PROTOCOL (e.g. 8080=http)")))?;
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("{:?} is not a port (1-65535)", port.trim())))?;
        let proto = proto.trim();
        if !PROTOCOLS.contains(&proto) {
            return Err(bad(format!(
                "port {port}: {proto:?} is not one of {}",
                PROTOCOLS.join(", ")
            )));
        }
        if port == INBOUND_PORT || port == ADMIN_PORT || port == 53 {
            return Err(bad(format!("port {port} is the agent's own")));
        }
        ports.insert(port, proto.to_owned());
    }
    Ok(ports)
}

fn agent_container(opts: &InjectOptions, ports: &BTreeMap<u16, String>) -> Value {
    let field = |path: &str| json!({ "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let with_name = |name: &str, mut v: Value| {
        v["name"] = Value::String(name.into());
        v
    };
    let value = |name: &str, v: &str| json!({ "name": name, "value": v });
    let app_ports = ports
        .iter()
        .map(|(p, proto)| format!("{p}/{proto}"))
        .collect::<Vec<_>>()
        .join(",");
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": { "path": "/ready", "port": ADMIN_PORT },
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    let mut resources = json!({
        "requests": { "cpu": opts.cpu_request, "memory": opts.memory_request },
    });
    if let Some(limit) = &opts.memory_limit {
        resources["limits"] = json!({ "memory": limit });
    }
    let mut c = json!({
        "name": AGENT_CONTAINER,
        "image": opts.image,
        "args": ["agent", "--kubernetes"],
        "env": [
            with_name("TRELLIS_POD_NAME", field("metadata.name")),
            with_name("TRELLIS_POD_NAMESPACE", field("metadata.namespace")),
            with_name("TRELLIS_POD_IP", field("status.podIP")),
            with_name("TRELLIS_SERVICE_ACCOUNT", field("spec.serviceAccountName")),
            value("TRELLIS_ZONE", &opts.zone),
            value("TRELLIS_TOKEN_EXCHANGE", &opts.token_exchange),
            value("TRELLIS_TRUST_ROOT_FINGERPRINT", &opts.trust_root_fingerprint),
            value("TRELLIS_DNS", AGENT_DNS),
            value("TRELLIS_PORTS", &app_ports),
        ],
        "ports": [
            { "name": "trellis-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP" },
            { "name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" },
        ],
        // Until it answers, the kubelet starts no later container (native
        // sidecar) and the pod is not Ready (either mode).
        "startupProbe": probe(1, 120),
        "readinessProbe": probe(5, 3),
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": opts.uid,
            "runAsGroup": opts.uid,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "readOnlyRootFilesystem": true,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": PODINFO_VOLUME, "mountPath": LABELS_DIR, "readOnly": true },
            { "name": DATA_VOLUME, "mountPath": DATA_DIR },
        ],
    });
    if let Some(policy) = &opts.image_pull_policy {
        c["imagePullPolicy"] = Value::String(policy.clone());
    }
    if opts.native_sidecar {
        // What makes an init container a sidecar (Kubernetes >= 1.29): it
        // keeps running beside the app and stops after it.
        c["restartPolicy"] = Value::String("Always".into());
    }
    c
}

fn volumes() -> [Value; 3] {
    [
        // Audience-bound and short-lived: the kubelet rotates it; the zone
        // controller checks it with a TokenReview and trades it for the
        // workload certificate. No long-lived secret sits in the pod.
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [ { "serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": "token",
            } } ] },
        }),
        json!({
            "name": PODINFO_VOLUME,
            "downwardAPI": { "items": [
                { "path": "labels", "fieldRef": { "fieldPath": "metadata.labels" } },
                { "path": "annotations", "fieldRef": { "fieldPath": "metadata.annotations" } },
            ] },
        }),
        // Keys and certificates: in memory, never on the node's disk.
        json!({
            "name": DATA_VOLUME,
            "emptyDir": { "medium": "Memory", "sizeLimit": "16Mi" },
        }),
    ]
}

/// `*.mesh` must reach the agent and every other name the cluster DNS, with
/// the search list a `ClusterFirst` pod has. A pod's resolv.conf cannot
/// split by domain, so the agent becomes the pod's first nameserver and
/// forwards what is not its own to the next one, the cluster DNS (which
/// also answers, slower, if the agent is down). The cluster's DNS service
/// stays as it is: no stub domain to configure.
fn dns(spec: &mut Map<String, Value>, namespace: &str, opts: &InjectOptions) {
    let was_none = spec.get("dnsPolicy").and_then(Value::as_str) == Some("None");
    spec.insert("dnsPolicy".into(), Value::String("None".into()));
    let cfg = object_at(spec, "dnsConfig");
    let theirs: Vec<Value> = cfg
        .get("nameservers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut nameservers = vec![Value::String("127.0.0.1".into())];
    if was_none {
        nameservers.extend(theirs);
    } else {
        nameservers.push(Value::String(opts.cluster_dns.to_string()));
        nameservers.extend(theirs);
    }
    nameservers.dedup();
    nameservers.truncate(3);
    cfg.insert("nameservers".into(), Value::Array(nameservers));

    let d = &opts.cluster_domain;
    let mut searches: Vec<Value> = if was_none {
        Vec::new()
    } else {
        [
            format!("{namespace}.svc.{d}"),
            format!("svc.{d}"),
            d.clone(),
        ]
        .into_iter()
        .map(Value::String)
        .collect()
    };
    for s in cfg
        .get("searches")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if !searches.contains(s) {
            searches.push(s.clone());
        }
    }
    if !searches.is_empty() {
        cfg.insert("searches".into(), Value::Array(searches));
    }
    if !was_none {
        // ClusterFirst's ndots, unless the pod set its own.
        let options = array_at(cfg, "options");
        if !options
            .iter()
            .any(|o| o.get("name").and_then(Value::as_str) == Some("ndots"))
        {
            options.push(json!({ "name": "ndots", "value": "5" }));
        }
    }
}

/// Lets the agent (non-root, no capabilities) bind 53 and the ports of the
/// mesh services it listens for. Pod-wide: the app may then bind low ports
/// too, as it may by default on containerd 2 and Docker.
fn unprivileged_ports(spec: &mut Map<String, Value>) {
    let sysctls = array_at(object_at(spec, "securityContext"), "sysctls");
    if let Some(s) = sysctls
        .iter_mut()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(UNPRIVILEGED_PORT_SYSCTL))
    {
        s["value"] = Value::String("0".into());
    } else {
        sysctls.push(json!({ "name": UNPRIVILEGED_PORT_SYSCTL, "value": "0" }));
    }
}

fn volume_index(spec: &Value, name: &str) -> Option<usize> {
    spec.get("volumes")?
        .as_array()?
        .iter()
        .position(|v| v.get("name").and_then(Value::as_str) == Some(name))
}

/// `map[key]` as an object, made (or replaced, if it was null) on the way.
fn object_at<'a>(v: &'a mut impl Slot, key: &str) -> &'a mut Map<String, Value> {
    let slot = v.slot(key);
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("made an object just above"),
    }
}

fn array_at<'a>(v: &'a mut impl Slot, key: &str) -> &'a mut Vec<Value> {
    let slot = v.slot(key);
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    match slot {
        Value::Array(a) => a,
        _ => unreachable!("made an array just above"),
    }
}

/// A value or map that holds keyed values.
trait Slot {
    fn slot(&mut self, key: &str) -> &mut Value;
}

impl Slot for Value {
    fn slot(&mut self, key: &str) -> &mut Value {
        if !self.is_object() {
            *self = Value::Object(Map::new());
        }
        match self {
            Value::Object(m) => m.entry(key).or_insert(Value::Null),
            _ => unreachable!("made an object just above"),
        }
    }
}

impl Slot for Map<String, Value> {
    fn slot(&mut self, key: &str) -> &mut Value {
        self.entry(key).or_insert(Value::Null)
    }
}
