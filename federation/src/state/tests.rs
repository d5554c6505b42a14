use super::*;

fn ep(id: &str, lease: u64) -> EndpointRecord {
    EndpointRecord {
        namespace: "shop".into(),
        service: "catalog".into(),
        zone: "east".into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        ports: vec![8080],
        protocol: "http".into(),
        labels: BTreeMap::new(),
        healthy: true,
        lease_seconds: lease,
        lease_expires_ms: 0,
        owner: String::new(),
    }
}

fn run(db: &Db, cmds: &[Command]) -> Vec<Result<Outcome, FedError>> {
    let mut ap = Applier::new(db).unwrap();
    let out = cmds.iter().map(|c| ap.apply(c)).collect();
    db.write_applied(ap.into_writes()).unwrap();
    out
}

fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    (dir, db)
}

#[test]
fn leases_expire_only_when_not_renewed() {
    let (_d, db) = db();
    let r = run(
        &db,
        &[
            Command::Register {
                endpoint: ep("a", 10),
                now_ms: 1_000,
            },
            Command::Register {
                endpoint: ep("b", 10),
                now_ms: 1_000,
            },
            Command::Register {
                endpoint: ep("forever", 0),
                now_ms: 1_000,
            },
            Command::Renew {
                key: "shop/catalog/east/b".into(),
                now_ms: 8_000,
            },
            Command::ExpireLeases {
                now_ms: 12_000,
                spare_zones: Vec::new(),
            },
        ],
    );
    assert!(r.iter().all(Result::is_ok));
    let ids: Vec<String> = endpoints(&db).unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec!["b".to_string(), "forever".to_string()]);
    // A renewal after expiry is refused with the reason.
    let r = run(
        &db,
        &[Command::Renew {
            key: "shop/catalog/east/a".into(),
            now_ms: 13_000,
        }],
    );
    assert!(r[0].as_ref().unwrap_err().to_string().contains("expired"));
}

#[test]
fn join_tokens_work_once_and_expire() {
    let (_d, db) = db();
    let token = TokenRecord {
        zone: "west".into(),
        edge: true,
        expires_ms: 10_000,
        used_by: None,
        agent: false,
        workloads: Vec::new(),
        ..Default::default()
    };
    let r = run(
        &db,
        &[
            Command::CreateToken {
                hash: "h1".into(),
                token: token.clone(),
            },
            Command::CreateToken {
                hash: "h2".into(),
                token,
            },
            Command::UseToken {
                hash: "h1".into(),
                by: "s1".into(),
                now_ms: 5_000,
                agent: false,
                member: None,
            },
            Command::UseToken {
                hash: "h1".into(),
                by: "s2".into(),
                now_ms: 5_000,
                agent: false,
                member: None,
            },
            Command::UseToken {
                hash: "h2".into(),
                by: "s3".into(),
                now_ms: 10_000,
                agent: false,
                member: None,
            },
            Command::UseToken {
                hash: "nope".into(),
                by: "s4".into(),
                now_ms: 1,
                agent: false,
                member: None,
            },
        ],
    );
    assert_eq!(r[2].as_ref().unwrap().token.as_ref().unwrap().zone, "west");
    assert!(
        r[3].as_ref()
            .unwrap_err()
            .to_string()
            .contains("already used by s1")
    );
    assert!(r[4].as_ref().unwrap_err().to_string().contains("expired"));
    assert!(r[5].as_ref().unwrap_err().to_string().contains("unknown"));
    let z = zones(&db).unwrap();
    assert_eq!((z.len(), z[0].role), (1, ZoneRole::Edge));
}

#[test]
fn a_bad_policy_refuses_the_whole_batch_with_document_and_field() {
    let (_d, db) = db();
    let good = PolicyRecord {
        kind: "Route".into(),
        name: "r1".into(),
        spec: serde_json::json!({"service": "catalog.shop", "rules": [{}]}),
    };
    let bad = PolicyRecord {
        kind: "Rout".into(),
        name: "r2".into(),
        spec: serde_json::json!({}),
    };
    let r = run(
        &db,
        &[Command::ApplyPolicies {
            docs: vec![good, bad],
        }],
    );
    let msg = r[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("document 2") && msg.contains("kind"), "{msg}");
    assert!(policies(&db).unwrap().is_empty());
    assert_eq!(revision(&db).unwrap(), 0);
}

#[test]
fn every_change_is_one_event_in_revision_order() {
    let (_d, db) = db();
    run(
        &db,
        &[
            Command::Register {
                endpoint: ep("a", 0),
                now_ms: 0,
            },
            Command::Register {
                endpoint: ep("b", 0),
                now_ms: 0,
            },
            Command::Deregister {
                key: "shop/catalog/east/a".into(),
            },
        ],
    );
    assert_eq!(revision(&db).unwrap(), 3);
    let ev = events_after(&db, 1, 100).unwrap().unwrap();
    assert_eq!(
        ev.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(ev[1].value.is_none());
    let (rev, snap) = snapshot_events_scoped(&db, &crate::scope::Scope::all()).unwrap();
    assert_eq!((rev, snap.len()), (3, 1));
}

#[test]
fn bad_endpoints_name_the_field() {
    let mut e = ep("a", 0);
    e.ports = vec![70000];
    assert!(e.validate().unwrap_err().to_string().starts_with("ports:"));
    let mut e = ep("a", 0);
    e.namespace = "Shop/x".into();
    assert!(
        e.validate()
            .unwrap_err()
            .to_string()
            .starts_with("namespace:")
    );
}

#[test]
fn agent_tokens_open_only_the_agent_door() {
    let (_d, db) = db();
    let token = TokenRecord {
        zone: "east".into(),
        edge: false,
        expires_ms: 10_000,
        used_by: None,
        agent: true,
        workloads: vec!["shop/catalog".into(), "ops/*".into()],
        ..Default::default()
    };
    assert!(token.allows_workload("shop", "catalog"));
    assert!(token.allows_workload("ops", "anything"));
    assert!(!token.allows_workload("shop", "auth"));
    let use_it = |agent| Command::UseToken {
        hash: "a1".into(),
        by: "host".into(),
        now_ms: 5_000,
        agent,
        member: None,
    };
    let r = run(
        &db,
        &[
            Command::CreateToken {
                hash: "a1".into(),
                token,
            },
            use_it(false),
            use_it(true),
            use_it(true),
        ],
    );
    let err = r[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("host agent token"), "{err}");
    let used = r[2].as_ref().unwrap().token.clone().unwrap();
    assert_eq!(used.workloads.len(), 2);
    let err = r[3].as_ref().unwrap_err().to_string();
    assert!(err.contains("already used"), "{err}");
}

#[test]
fn enforced_policy_kinds_are_checked_whole() {
    let doc = |kind: &str, spec: serde_json::Value| PolicyRecord {
        kind: kind.into(),
        name: "p".into(),
        spec,
    };
    let ok = doc(
        "Authorization",
        serde_json::json!({"service": "auth.shop", "deny": ["spiffe://td/ns/shop/sa/frontend", "ns:ops"]}),
    );
    assert!(ok.validate().is_ok());
    for (spec, field) in [
        (serde_json::json!({"service": "auth"}), "spec.service"),
        (
            serde_json::json!({"service": "auth.shop", "allow": "ns:x"}),
            "spec.allow",
        ),
        (
            serde_json::json!({"service": "auth.shop", "deny": ["bob"]}),
            "spec.deny[0]",
        ),
        (
            serde_json::json!({"service": "auth.shop", "alow": []}),
            "spec.alow",
        ),
        (serde_json::json!({"allow": []}), "spec.service"),
    ] {
        let err = doc("Authorization", spec)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    assert!(
        doc(
            "Export",
            serde_json::json!({"service": "a.b", "to": ["east", "*"]})
        )
        .validate()
        .is_ok()
    );
    let err = doc("Export", serde_json::json!({"service": "a.b"}))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.to"), "{err}");
}

#[test]
fn a_cut_off_edge_zone_keeps_its_endpoints_and_gets_time_to_renew() {
    let (_d, db) = db();
    let mut edge = EndpointRecord {
        namespace: "shop".into(),
        service: "inventory".into(),
        zone: "edge".into(),
        id: "site-1".into(),
        address: "10.0.3.21".into(),
        ports: vec![8080],
        protocol: "tcp".into(),
        labels: Default::default(),
        healthy: true,
        lease_seconds: 10,
        lease_expires_ms: 0,
        owner: String::new(),
    };
    let mut core = edge.clone();
    core.zone = "west".into();
    core.id = "w1".into();
    let r = run(
        &db,
        &[
            Command::Register {
                endpoint: edge.clone(),
                now_ms: 0,
            },
            Command::Register {
                endpoint: core,
                now_ms: 0,
            },
            Command::ExpireLeases {
                now_ms: 20_000,
                spare_zones: vec!["edge".into()],
            },
        ],
    );
    assert!(r.iter().all(Result::is_ok));
    let left = endpoints(&db).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].zone, "edge");
    // The lease now runs a whole period from the sparing.
    assert_eq!(left[0].lease_expires_ms, 30_000);
    // Healed and still silent: the next round expires it.
    edge.lease_expires_ms = 30_000;
    let r = run(
        &db,
        &[Command::ExpireLeases {
            now_ms: 31_000,
            spare_zones: vec![],
        }],
    );
    assert!(r[0].is_ok());
    assert!(endpoints(&db).unwrap().is_empty());
}

#[test]
fn an_expiry_removes_the_endpoints_named_unless_registered_again_since() {
    let (_d, db) = db();
    let r = run(
        &db,
        &[
            Command::Register {
                endpoint: ep("h1", 10),
                now_ms: 0,
            },
            Command::Register {
                endpoint: ep("h2", 10),
                now_ms: 0,
            },
            // h2 registered again after the leader decided: its lease now
            // ends at 25 s, after the expiry's clock.
            Command::Register {
                endpoint: ep("h2", 10),
                now_ms: 15_000,
            },
            Command::ExpireEndpoints {
                keys: vec![
                    ep("h1", 10).key(),
                    ep("h2", 10).key(),
                    "shop/gone/east/x".into(),
                ],
                now_ms: 20_000,
            },
        ],
    );
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let left: Vec<String> = endpoints(&db).unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(left, ["h2"]);
}
