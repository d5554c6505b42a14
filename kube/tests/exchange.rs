//! The token exchange end to end: a real controller (in this process) with
//! a real federation server and kube-rs against the fake API server; the
//! pod side is the agent's own exchange client and join.

use trellis_federation::join::join_agent;
use trellis_federation::proto::{TokenRequest, zones_client::ZonesClient};
use trellis_federation::token::JoinToken;
use trellis_kube::KubeError;
use trellis_kube::exchange::{ExchangeRequest, request};
use trellis_kube::testing::{FakeToken, Kind, namespace, pod};

#[path = "support/zone.rs"]
mod support;
use support::{ZONE, Zone};

const UID: &str = "5b1d7c1e-0000-4000-8000-00000000aaaa";

/// A zone with namespace `shop` opted in, pod `web-1` running as `web`,
/// and its projected token `tok-web-1` known to the API server.
async fn zone(base: u16) -> (Zone, support::Running) {
    let z = Zone::start(base).await;
    z.api
        .apply(namespace("shop", &[("trellis.io/inject", "enabled")]));
    z.api.apply(namespace("plain", &[]));
    z.api
        .apply(pod("shop", "web-1", UID, "web", "Running", &[]));
    z.api
        .add_token("tok-web-1", bound("shop", "web", "web-1", UID));
    let c = z.controller(false).await;
    (z, c)
}

fn bound(ns: &str, sa: &str, pod: &str, uid: &str) -> FakeToken {
    FakeToken {
        namespace: ns.into(),
        account: sa.into(),
        pod: Some((pod.into(), uid.into())),
        audiences: vec!["trellis".into()],
        expired: false,
    }
}

fn ask(token: &str, ns: &str, pod: &str) -> ExchangeRequest {
    ExchangeRequest {
        token: token.into(),
        namespace: ns.into(),
        pod: pod.into(),
    }
}

async fn refusal(z: &Zone, a: &ExchangeRequest) -> (String, String) {
    match request(&z.exchange_url(), &z.root_fingerprint(), ZONE, a).await {
        Err(KubeError::Refused { reason, message }) => (reason, message),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.name)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_pod_gets_exactly_its_identity_once() {
    let (z, c) = zone(27100).await;
    let reply = request(
        &z.exchange_url(),
        &z.root_fingerprint(),
        ZONE,
        &ask("tok-web-1", "shop", "web-1"),
    )
    .await
    .unwrap();
    let name = trellis_kube::exchange::agent_name("shop", "web-1");
    assert_eq!(reply.name, name);
    assert_eq!(reply.workload, "spiffe://test.local/ns/shop/sa/web");
    assert!(
        !format!("{reply:?}").contains(&reply.join_token),
        "Debug must not print the token"
    );
    let token = JoinToken::parse(&reply.join_token).unwrap();
    assert!(token.agent);
    assert_eq!(token.zone, ZONE);

    // The token buys nothing but the pod's own identity...
    let other = join_agent(&token, &name, &[("shop".into(), "admin".into())], None).await;
    assert!(
        other
            .err()
            .unwrap()
            .to_string()
            .contains("does not allow workload shop/admin")
    );
    let renamed = join_agent(&token, "db-0", &[("shop".into(), "web".into())], None).await;
    assert!(renamed.err().unwrap().to_string().contains("bound to"));
    // ...which the ordinary join gives it, with keys made here...
    let joined = join_agent(&token, &name, &[("shop".into(), "web".into())], None)
        .await
        .unwrap();
    assert_eq!(
        joined.workloads[0].id().unwrap().as_str(),
        "spiffe://test.local/ns/shop/sa/web"
    );
    assert_eq!(
        joined.node.id().unwrap().as_str(),
        format!("spiffe://test.local/zone/k8s/agent/{name}")
    );
    // ...once.
    let again = join_agent(&token, &name, &[("shop".into(), "web".into())], None).await;
    assert!(again.err().unwrap().to_string().contains("already used"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() {
    let (z, c) = zone(27110).await;
    let cases: Vec<(&str, FakeToken, &str, &str)> = vec![
        (
            "tok-aud",
            FakeToken {
                audiences: vec!["https://kubernetes.default.svc".into()],
                ..bound("shop", "web", "web-1", UID)
            },
            "web-1",
            "not-authenticated",
        ),
        (
            "tok-exp",
            FakeToken {
                expired: true,
                ..bound("shop", "web", "web-1", UID)
            },
            "web-1",
            "not-authenticated",
        ),
        (
            "tok-legacy",
            FakeToken {
                pod: None,
                ..bound("shop", "web", "web-1", UID)
            },
            "web-1",
            "not-pod-bound",
        ),
        (
            "tok-other",
            bound("shop", "web", "web-1", UID),
            "web-2",
            "other-pod",
        ),
        (
            "tok-gone",
            bound("shop", "web", "web-9", "uid-9"),
            "web-9",
            "pod-gone",
        ),
        (
            "tok-recreated",
            bound("shop", "web", "web-1", "an-older-uid"),
            "web-1",
            "pod-gone",
        ),
    ];
    for (tok, t, pod_name, want) in cases {
        z.api.add_token(tok, t);
        let (reason, message) = refusal(&z, &ask(tok, "shop", pod_name)).await;
        assert_eq!(reason, want, "{tok}: {message}");
        assert!(
            !message.contains(tok),
            "{tok}: the refusal must not echo the token"
        );
    }
    let (r, m) = refusal(&z, &ask("tok-unknown", "shop", "web-1")).await;
    assert_eq!(r, "not-authenticated", "{m}");
    let (_, m) = refusal(&z, &ask("tok-aud", "shop", "web-1")).await;
    assert!(m.contains("audiences"), "{m}");
    let (_, m) = refusal(&z, &ask("tok-exp", "shop", "web-1")).await;
    assert!(m.contains("expired"), "{m}");

    // Namespace not opted in.
    z.api
        .apply(pod("plain", "job-1", "uid-j", "runner", "Running", &[]));
    z.api
        .add_token("tok-plain", bound("plain", "runner", "job-1", "uid-j"));
    let (r, m) = refusal(&z, &ask("tok-plain", "plain", "job-1")).await;
    assert_eq!(r, "namespace-not-opted-in", "{m}");
    assert!(m.contains("trellis.io/inject=enabled"), "{m}");
    // A pod annotation opts it in on its own.
    z.api.apply(pod(
        "plain",
        "job-1",
        "uid-j",
        "runner",
        "Running",
        &[("trellis.io/inject", "enabled")],
    ));
    request(
        &z.exchange_url(),
        &z.root_fingerprint(),
        ZONE,
        &ask("tok-plain", "plain", "job-1"),
    )
    .await
    .unwrap();

    // Finished, then terminating, then deleted.
    z.api
        .apply(pod("shop", "web-1", UID, "web", "Succeeded", &[]));
    assert_eq!(
        refusal(&z, &ask("tok-web-1", "shop", "web-1")).await.0,
        "pod-not-running"
    );
    let mut p = pod("shop", "web-1", UID, "web", "Running", &[]);
    p["metadata"]["deletionTimestamp"] = "2026-11-30T08:01:00Z".into();
    z.api.apply(p);
    assert_eq!(
        refusal(&z, &ask("tok-web-1", "shop", "web-1")).await.0,
        "pod-terminating"
    );
    assert!(z.api.delete(Kind::Pod, "shop", "web-1"));
    assert_eq!(
        refusal(&z, &ask("tok-web-1", "shop", "web-1")).await.0,
        "pod-gone"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_a_controller_the_pod_cannot_verify() {
    let (z, c) = zone(27120).await;
    let before = z.api.requests("tokenreviews");
    // Another mesh's root: the TLS handshake fails before the request.
    let wrong = "00".repeat(32);
    let err = request(
        &z.exchange_url(),
        &wrong,
        ZONE,
        &ask("tok-web-1", "shop", "web-1"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, KubeError::Tls(_)), "{err}");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    // The right root, but a pod of another zone: not its controller.
    let err = request(
        &z.exchange_url(),
        &z.root_fingerprint(),
        "east",
        &ask("tok-web-1", "shop", "web-1"),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("not a Trellis controller of zone east"),
        "{err}"
    );
    assert_eq!(
        z.api.requests("tokenreviews"),
        before,
        "no token may have been sent"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_lets_a_controller_mint_only_single_pod_tokens_of_its_zone() {
    let z = Zone::start(27130).await;
    let ctl = z.creds(&format!("zone/{ZONE}/controller/kube"));
    let mut zones =
        ZonesClient::new(trellis_federation::client::connect(&z.server_addr(), &ctl).unwrap());
    let good = TokenRequest {
        zone: ZONE.into(),
        ttl_seconds: 60,
        agent: true,
        workloads: vec!["shop/web".into()],
        name: "web-1-0123456789abcdef".into(),
        replace: true,
        ..Default::default()
    };
    zones.create_join_token(good.clone()).await.unwrap();
    let cases = [
        (
            TokenRequest {
                workloads: vec!["shop/*".into()],
                ..good.clone()
            },
            "exactly one workload",
        ),
        (
            TokenRequest {
                workloads: vec!["shop/web".into(), "shop/db".into()],
                ..good.clone()
            },
            "exactly one workload",
        ),
        (
            TokenRequest {
                zone: "east".into(),
                ..good.clone()
            },
            "the controller's is k8s",
        ),
        (
            TokenRequest {
                name: String::new(),
                replace: false,
                ..good.clone()
            },
            "bound to the pod's name",
        ),
        (
            TokenRequest {
                ttl_seconds: 3600,
                ..good.clone()
            },
            "longer than",
        ),
        (
            TokenRequest {
                agent: false,
                workloads: vec![],
                replace: false,
                ..good.clone()
            },
            "agent tokens only",
        ),
    ];
    for (req, want) in cases {
        let s = zones.create_join_token(req).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{}", s.message());
        assert!(s.message().contains(want), "{}", s.message());
    }
    // Nor anything an operator does.
    let s = zones
        .revoke_token(trellis_federation::proto::TokenId {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{}", s.message());
}
