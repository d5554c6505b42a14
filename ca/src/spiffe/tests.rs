use super::*;

#[test]
fn valid_ids_round_trip() {
    for s in [
        "spiffe://trellis.local",
        "spiffe://trellis.local/ns/shop/sa/catalog",
        "spiffe://a_b-c.d/zone/east/gateway/gw-1",
        "spiffe://x/operator/Alice.Smith_2",
    ] {
        let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(id.to_string(), s);
    }
}

#[test]
fn each_rule_is_named_in_the_error() {
    use SpiffeIdError as E;
    type Check = fn(&SpiffeIdError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("", |e| matches!(e, E::Empty)),
        ("http://td/x", |e| matches!(e, E::WrongScheme(_))),
        ("SPIFFE://td/x", |e| matches!(e, E::WrongScheme(_))),
        ("spiffe://", |e| matches!(e, E::EmptyTrustDomain)),
        ("spiffe:///ns/a", |e| matches!(e, E::EmptyTrustDomain)),
        ("spiffe://Trellis.local/x", |e| {
            matches!(e, E::BadTrustDomainChar { ch: 'T', .. })
        }),
        ("spiffe://td:8443/x", |e| {
            matches!(e, E::BadTrustDomainChar { ch: ':', .. })
        }),
        ("spiffe://user@td/x", |e| {
            matches!(e, E::BadTrustDomainChar { ch: '@', .. })
        }),
        ("spiffe://td/", |e| matches!(e, E::EmptySegment(_))),
        ("spiffe://td/a//b", |e| matches!(e, E::EmptySegment(_))),
        ("spiffe://td/a/./b", |e| matches!(e, E::DotSegment(_))),
        ("spiffe://td/a/..", |e| matches!(e, E::DotSegment(_))),
        ("spiffe://td/a?x=1", |e| {
            matches!(e, E::BadPathChar { ch: '?', .. })
        }),
        ("spiffe://td/a#f", |e| {
            matches!(e, E::BadPathChar { ch: '#', .. })
        }),
        ("spiffe://td/a%20b", |e| {
            matches!(e, E::BadPathChar { ch: '%', .. })
        }),
    ];
    for (input, check) in cases {
        let err = input.parse::<SpiffeId>().expect_err(input);
        assert!(check(&err), "{input:?} gave the wrong error: {err}");
    }
}

#[test]
fn length_limits() {
    let td = "a".repeat(256);
    assert_eq!(
        format!("spiffe://{td}").parse::<SpiffeId>(),
        Err(SpiffeIdError::TrustDomainTooLong(256))
    );
    assert!(
        format!("spiffe://{}", "a".repeat(255))
            .parse::<SpiffeId>()
            .is_ok()
    );
    let long = format!("spiffe://td/{}", "a".repeat(2048));
    assert!(matches!(
        long.parse::<SpiffeId>(),
        Err(SpiffeIdError::TooLong(_))
    ));
    let exact = format!("spiffe://td/{}", "a".repeat(2048 - 12));
    assert_eq!(exact.len(), 2048);
    assert!(exact.parse::<SpiffeId>().is_ok());
}

#[test]
fn roles_are_read_from_the_path() {
    let td: TrustDomain = "trellis.local".parse().unwrap();
    let id = td.workload("shop", "catalog").unwrap();
    assert_eq!(
        id.role(),
        Some(Role::Workload {
            namespace: "shop".into(),
            account: "catalog".into()
        })
    );
    let gw = td.role(RoleKind::Gateway, "east", "gw1").unwrap();
    assert_eq!(gw.as_str(), "spiffe://trellis.local/zone/east/gateway/gw1");
    assert_eq!(gw.role_kind(), Some(RoleKind::Gateway));
    assert_eq!(gw.role().unwrap().zone(), Some("east"));
    let op = td.role(RoleKind::Operator, "", "alice").unwrap();
    assert_eq!(op.role_kind(), Some(RoleKind::Operator));
    let ctl = td.role(RoleKind::Controller, "k8s", "kube").unwrap();
    assert_eq!(
        ctl.as_str(),
        "spiffe://trellis.local/zone/k8s/controller/kube"
    );
    assert_eq!(
        ctl.role(),
        Some(Role::Controller {
            zone: "k8s".into(),
            name: "kube".into()
        })
    );
    assert_eq!(ctl.role().unwrap().zone(), Some("k8s"));
    let other: SpiffeId = "spiffe://trellis.local/zone/east/printer/p1"
        .parse()
        .unwrap();
    assert_eq!(other.role(), None);
    assert_eq!(gw.trust_domain(), td);
    assert_eq!(gw.path(), "/zone/east/gateway/gw1");
}

#[test]
fn trust_domain_accepts_the_id_form() {
    let a: TrustDomain = "spiffe://trellis.local".parse().unwrap();
    let b: TrustDomain = "trellis.local".parse().unwrap();
    assert_eq!(a, b);
    assert!("trellis.local/x".parse::<TrustDomain>().is_err());
}
