//! The YAML stream's edges and the mutation's rules, below the golden tests
//! of tests/inject.rs.

use serde_json::{Value, json};

use super::documents::{StreamContext, inject_stream, parse_stream};
use super::options::InjectOptions;
use super::pod::{Context, NamespaceSays, Outcome, inject_template};

fn opts() -> InjectOptions {
    InjectOptions {
        image: "trellis:test".into(),
        image_pull_policy: None,
        zone: "k8s".into(),
        token_exchange: "https://x.svc:15012/v1/exchange".into(),
        trust_root_fingerprint: "ab".repeat(32),
        native_sidecar: true,
        cluster_dns: [10, 96, 0, 10].into(),
        cluster_domain: "cluster.local".into(),
        cpu_request: "20m".into(),
        memory_request: "48Mi".into(),
        memory_limit: None,
        uid: 65532,
    }
}

fn pod(meta: Value, spec: Value) -> Value {
    json!({ "metadata": meta, "spec": spec })
}

const SHOP: Context<'static> = Context {
    namespace: Some("shop"),
    namespace_says: NamespaceSays::Nothing,
};

#[test]
fn markers_comments_and_end_of_document() {
    let text = "# leading comment\n---\nkind: A\n--- # a comment on the marker\nkind: B\n...\n---\n# only a comment\n---\n--- {kind: C}\n";
    let mut docs = parse_stream("t", text).unwrap();
    assert_eq!(docs.len(), 5, "{docs:?}");
    let (out, _) = inject_stream(&opts(), "t", &mut docs, &StreamContext::default()).unwrap();
    assert!(out.contains("kind: A\n---\nkind: B\n"), "{out}");
    assert!(out.ends_with("---\n{kind: C}\n"), "{out}");
}

#[test]
fn a_leading_comment_is_its_own_document_only_when_it_is_all() {
    // A comment-only document is kept as it is.
    let docs = parse_stream("t", "# just this\n").unwrap();
    assert_eq!(docs.len(), 1);
    // The common case: no leading `---`, one object.
    let docs = parse_stream("t", "kind: ConfigMap\n").unwrap();
    assert_eq!(docs.len(), 1);
}

#[test]
fn objects_without_kind_are_refused() {
    let mut docs = parse_stream("f.yaml", "a: 1\n").unwrap();
    let err = inject_stream(&opts(), "f.yaml", &mut docs, &StreamContext::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "f.yaml: document 1: kind: missing (not a Kubernetes object)"
    );
}

#[test]
fn label_and_annotation_must_agree() {
    let mut p = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" }, "annotations": { "trellis.io/inject": "disabled" } }),
        json!({ "containers": [{ "name": "a", "image": "b" }] }),
    );
    let err = inject_template(&opts(), &mut p, SHOP).unwrap_err();
    assert_eq!(err.field, "metadata.annotations[\"trellis.io/inject\"]");
}

#[test]
fn the_pod_overrides_its_namespace() {
    let mut p = pod(
        json!({ "annotations": { "trellis.io/inject": "disabled" } }),
        json!({ "containers": [{ "name": "a", "image": "b" }] }),
    );
    let cx = Context {
        namespace: Some("shop"),
        namespace_says: NamespaceSays::Enabled,
    };
    assert_eq!(
        inject_template(&opts(), &mut p, cx).unwrap(),
        Outcome::NotOptedIn
    );
    let mut p = pod(
        json!({}),
        json!({ "containers": [{ "name": "a", "image": "b" }] }),
    );
    assert_eq!(
        inject_template(&opts(), &mut p, cx).unwrap(),
        Outcome::Injected
    );
}

#[test]
fn a_pod_with_its_own_nameservers_keeps_them_after_the_agent() {
    let mut p = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" } }),
        json!({
            "dnsPolicy": "None",
            "dnsConfig": { "nameservers": ["192.0.2.53"], "searches": ["corp.example"] },
            "containers": [{ "name": "a", "image": "b" }],
        }),
    );
    assert_eq!(
        inject_template(&opts(), &mut p, SHOP).unwrap(),
        Outcome::Injected
    );
    assert_eq!(
        p["spec"]["dnsConfig"],
        json!({ "nameservers": ["127.0.0.1", "192.0.2.53"], "searches": ["corp.example"] })
    );

    let mut full = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" } }),
        json!({
            "dnsPolicy": "None",
            "dnsConfig": { "nameservers": ["192.0.2.1", "192.0.2.2", "192.0.2.3"] },
            "containers": [{ "name": "a", "image": "b" }],
        }),
    );
    let before = full.clone();
    assert!(matches!(
        inject_template(&opts(), &mut full, SHOP).unwrap(),
        Outcome::Skipped(_)
    ));
    assert_eq!(full, before, "a skipped pod is not touched");
}

#[test]
fn a_volume_in_the_way_is_refused() {
    let mut p = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" } }),
        json!({ "containers": [{ "name": "a", "image": "b" }], "volumes": [{ "name": "trellis-token", "emptyDir": {} }] }),
    );
    let err = inject_template(&opts(), &mut p, SHOP).unwrap_err();
    assert_eq!(err.field, "spec.volumes");
}

#[test]
fn a_disabled_namespace_wins_over_the_pod() {
    let mut p = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" } }),
        json!({ "containers": [{ "name": "a", "image": "b" }] }),
    );
    let cx = Context {
        namespace: Some("trellis-system"),
        namespace_says: NamespaceSays::Disabled,
    };
    assert_eq!(
        inject_template(&opts(), &mut p, cx).unwrap(),
        Outcome::NotOptedIn
    );
    // A malformed value is still refused there.
    let mut bad = pod(
        json!({ "labels": { "trellis.io/inject": "on" } }),
        json!({ "containers": [{ "name": "a", "image": "b" }] }),
    );
    assert!(inject_template(&opts(), &mut bad, cx).is_err());
}

#[test]
fn a_list_item_without_kind_is_named() {
    let mut docs =
        parse_stream("l.yaml", "kind: List\nitems:\n- kind: ConfigMap\n- a: 1\n").unwrap();
    let err = inject_stream(&opts(), "l.yaml", &mut docs, &StreamContext::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "l.yaml: document 1 (items[1]): items[1].kind: missing (not a Kubernetes object)"
    );
}

#[test]
fn an_app_port_the_agent_binds_is_refused() {
    let mut p = pod(
        json!({ "labels": { "trellis.io/inject": "enabled" } }),
        json!({ "containers": [
            { "name": "a", "image": "b" },
            { "name": "c", "image": "d", "ports": [{ "containerPort": 80 }, { "containerPort": 15020 }] },
        ] }),
    );
    let err = inject_template(&opts(), &mut p, SHOP).unwrap_err();
    assert_eq!(err.field, "spec.containers[1].ports[1].containerPort");
    assert!(
        err.reason.starts_with("15020 is the agent's own port"),
        "{}",
        err.reason
    );
}
