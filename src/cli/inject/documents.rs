//! A stream of YAML documents in, the same stream out with every opted-in
//! pod template carrying the agent. A document with nothing to inject comes
//! out as the very text that went in; a changed one is written anew (keys
//! sorted, as `kubectl get -o yaml` writes them).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::options::{ANNOTATION_INJECT, InjectOptions};
use super::pod::{self, Context, NamespaceSays, Outcome};

/// Workload kinds whose pods are made from `spec.template`.
const TEMPLATE_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
];

/// One document of the input, as read.
#[derive(Debug)]
pub(crate) struct Document {
    /// Its text, without the `---` line before it.
    text: String,
    /// Its value; `None` for an empty document (comments only).
    value: Option<Value>,
}

/// A refusal, naming the source, the document and the field.
#[derive(Debug)]
pub(crate) struct InjectError {
    source: String,
    doc: usize,
    what: String,
    reason: String,
}

/// What became of one pod template.
#[derive(Debug)]
pub(crate) struct Report {
    /// `Deployment shop/web`, or `items[2]: Pod shop/db`.
    pub(crate) what: String,
    /// What was done.
    pub(crate) outcome: Outcome,
    /// Something the user should know about the result.
    pub(crate) warning: Option<String>,
}

/// How the stream is to be read.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamContext {
    /// For documents that name no namespace (`kubectl apply -n`).
    pub(crate) default_namespace: Option<String>,
    /// Namespaces opted in besides those labelled so in the stream.
    pub(crate) opted_in_namespaces: BTreeSet<String>,
}

// === impl InjectError ===

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.doc)?;
        if !self.what.is_empty() {
            write!(f, " ({})", self.what)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for InjectError {}

/// Splits `text` into YAML documents at `---` lines and parses each one.
pub(crate) fn parse_stream(source: &str, text: &str) -> Result<Vec<Document>, InjectError> {
    // (first line, text) of each document; the part before a first `---`
    // is a document too when it holds anything.
    let mut chunks: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(rest) = line
            .strip_prefix("---")
            .filter(|r| r.is_empty() || r.starts_with(char::is_whitespace))
        {
            // `--- {a: 1}` starts a document on the marker's own line.
            let rest = rest.trim();
            if rest.is_empty() || rest.starts_with('#') {
                chunks.push((i + 2, String::new()));
            } else {
                chunks.push((i + 1, format!("{rest}\n")));
            }
        } else if line.trim_end() == "..." {
            chunks.push((i + 2, String::new()));
        } else if let Some((_, chunk)) = chunks.last_mut() {
            chunk.push_str(line);
        }
    }
    chunks.retain(|(_, t)| !t.trim().is_empty());
    let mut docs = Vec::new();
    for (first_line, text) in chunks {
        let n = docs.len() + 1;
        let v: Value = serde_yaml::from_str(&text).map_err(|e| InjectError {
            source: source.to_owned(),
            doc: n,
            what: String::new(),
            reason: yaml_reason(&e, first_line),
        })?;
        docs.push(Document {
            text,
            value: (!v.is_null()).then_some(v),
        });
    }
    Ok(docs)
}

/// serde_yaml's message with the line counted in the whole source.
fn yaml_reason(e: &serde_yaml::Error, first_line: usize) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(loc) => {
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            format!(
                "not valid YAML: {msg} (line {}, column {})",
                first_line + loc.line() - 1,
                loc.column()
            )
        }
        None => format!("not valid YAML: {msg}"),
    }
}

/// Injects every opted-in pod template of `docs` and writes the stream
/// back. Namespaces labelled `trellis.io/inject: enabled` in the stream opt
/// their pods in.
pub(crate) fn inject_stream(
    opts: &InjectOptions,
    source: &str,
    docs: &mut [Document],
    cx: &StreamContext,
) -> Result<(String, Vec<Report>), InjectError> {
    let mut namespaces: BTreeMap<String, NamespaceSays> = cx
        .opted_in_namespaces
        .iter()
        .map(|ns| (ns.clone(), NamespaceSays::Enabled))
        .collect();
    for d in docs.iter() {
        if let Some(v) = &d.value {
            collect_namespaces(v, &mut namespaces);
        }
    }
    let mut out = String::new();
    let mut reports = Vec::new();
    for (i, d) in docs.iter_mut().enumerate() {
        let n = i + 1;
        if i > 0 {
            out.push_str("---\n");
        }
        let Some(value) = &mut d.value else {
            out.push_str(&d.text);
            continue;
        };
        let before = reports.len();
        let err = |what: String, reason: String| InjectError {
            source: source.to_owned(),
            doc: n,
            what,
            reason,
        };
        walk(opts, value, "", cx, &namespaces, &mut reports)
            .map_err(|(what, reason)| err(what, reason))?;
        let changed = reports[before..]
            .iter()
            .any(|r| r.outcome == Outcome::Injected);
        if changed {
            let text = serde_yaml::to_string(value)
                .map_err(|e| err(String::new(), format!("could not write it back: {e}")))?;
            out.push_str(&text);
        } else {
            out.push_str(&d.text);
            if !d.text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    Ok((out, reports))
}

/// The `trellis.io/inject` label of every Namespace in the stream.
fn collect_namespaces(v: &Value, into: &mut BTreeMap<String, NamespaceSays>) {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "Namespace" {
        let name = v.pointer("/metadata/name").and_then(Value::as_str);
        let label = v
            .pointer("/metadata/labels")
            .and_then(|l| l.get(ANNOTATION_INJECT))
            .and_then(Value::as_str);
        let says = match label {
            Some("enabled") => NamespaceSays::Enabled,
            Some("disabled") => NamespaceSays::Disabled,
            _ => NamespaceSays::Nothing,
        };
        if let Some(name) = name {
            into.insert(name.to_owned(), says);
        }
    } else if is_list(kind, v) {
        for item in v
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            collect_namespaces(item, into);
        }
    }
}

fn is_list(kind: &str, v: &Value) -> bool {
    kind.ends_with("List") && v.get("items").is_some_and(Value::is_array)
}

/// Finds the pod templates in one object (recursing into lists) and
/// injects each; errors are `(what, reason)`.
fn walk(
    opts: &InjectOptions,
    v: &mut Value,
    prefix: &str,
    cx: &StreamContext,
    namespaces: &BTreeMap<String, NamespaceSays>,
    reports: &mut Vec<Report>,
) -> Result<(), (String, String)> {
    let Some(kind) = v.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        return Err((
            prefix.trim_end_matches('.').to_owned(),
            format!("{prefix}kind: missing (not a Kubernetes object)"),
        ));
    };
    if is_list(&kind, v) {
        let items = v
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten();
        for (i, item) in items.enumerate() {
            walk(
                opts,
                item,
                &format!("{prefix}items[{i}]."),
                cx,
                namespaces,
                reports,
            )?;
        }
        return Ok(());
    }
    let meta_ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let namespace = meta_ns.or_else(|| cx.default_namespace.clone());
    let what = match &namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    let what = if prefix.is_empty() {
        what
    } else {
        format!("{}: {what}", prefix.trim_end_matches('.'))
    };
    let pointer = match kind.as_str() {
        "Pod" => "",
        "CronJob" => "/spec/jobTemplate/spec/template",
        k if TEMPLATE_KINDS.contains(&k) => "/spec/template",
        _ => return Ok(()),
    };
    let field = |p: &str| format!("{prefix}{p}");
    let dotted = pointer.trim_start_matches('/').replace('/', ".");
    let Some(template) = v.pointer_mut(pointer) else {
        return Err((
            what,
            format!(
                "{}: missing (a {kind} needs its pod template)",
                field(&dotted)
            ),
        ));
    };
    let at = if dotted.is_empty() {
        String::new()
    } else {
        format!("{dotted}.")
    };
    check_typed(template)
        .map_err(|(f, r)| (what.clone(), format!("{}: {r}", field(&format!("{at}{f}")))))?;
    let pod_cx = Context {
        namespace: namespace.as_deref(),
        namespace_says: namespace
            .as_ref()
            .and_then(|ns| namespaces.get(ns))
            .copied()
            .unwrap_or(NamespaceSays::Nothing),
    };
    let outcome = pod::inject_template(opts, template, pod_cx).map_err(|e| {
        (
            what.clone(),
            format!("{}: {}", field(&format!("{at}{}", e.field)), e.reason),
        )
    })?;
    let warning = (outcome == Outcome::Injected
        && !opts.native_sidecar
        && matches!(kind.as_str(), "Job" | "CronJob"))
    .then(|| {
        "a classic sidecar keeps running after the job's container ends, so the job never \
         completes: use the native sidecar (Kubernetes >= 1.29) for jobs"
            .to_owned()
    });
    reports.push(Report {
        what,
        outcome,
        warning,
    });
    Ok(())
}

/// Reads the template's `metadata` and `spec` as the API server would,
/// so a mistyped field is refused here with its path, not half-injected.
fn check_typed(template: &Value) -> Result<(), (String, String)> {
    if let Some(meta) = template.get("metadata") {
        serde_path_to_error::deserialize::<_, ObjectMeta>(meta)
            .map_err(|e| (path("metadata", e.path()), e.inner().to_string()))?;
    }
    let Some(spec) = template.get("spec") else {
        return Err(("spec".into(), "missing (a pod needs its spec)".into()));
    };
    serde_path_to_error::deserialize::<_, PodSpec>(spec)
        .map_err(|e| (path("spec", e.path()), e.inner().to_string()))?;
    Ok(())
}

/// `root.path`, or `root` when the error is at the root itself.
fn path(root: &str, p: &serde_path_to_error::Path) -> String {
    match p.to_string().as_str() {
        "." => root.to_owned(),
        p => format!("{root}.{p}"),
    }
}
