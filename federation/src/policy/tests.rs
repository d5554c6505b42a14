use serde_json::json;

use super::*;

#[test]
fn the_table_gets_its_verdicts_with_field_and_reason() {
    let cases = cases::all();
    assert!(cases.len() > 20, "the table lost its cases");
    for c in cases {
        let at = format!("testdata/policy.txt:{}", c.line);
        match (parse(&c.kind, &c.name, &c.spec), &c.refused) {
            (Ok(_), None) => {}
            (Ok(p), Some((field, _))) => panic!("{at}: accepted {p:?}, want {field} refused"),
            (Err(e), None) => panic!("{at}: refused: {e}"),
            (Err(e), Some((field, words))) => {
                assert_eq!(&e.field, field, "{at}: {e}");
                assert!(e.reason.contains(words.as_str()), "{at}: {e}");
                assert_eq!(e.document, format!("{}/{}", c.kind, c.name), "{at}");
            }
        }
    }
}

#[test]
fn the_issue_namespace_is_refused_at_apply_and_its_dns_form_accepted() {
    let doc = |ns: &str| json!({"service": "catalog.shop", "allow": [format!("ns:{ns}")]});
    let err = parse("Authorization", "foo", &doc("team_a")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Authorization/foo: spec.allow[0]: \"ns:team_a\" is neither a SPIFFE ID nor ns:NAMESPACE: \
         namespace \"team_a\" has '_'; only lowercase letters, digits and '-' are allowed"
    );
    // The service is readable although the document is not: a proxy can fail
    // closed for it.
    assert_eq!(err.service.as_deref(), Some("catalog.shop"));
    let Policy::Authorization(a) = parse("Authorization", "foo", &doc("team-a")).unwrap() else {
        panic!("not an Authorization");
    };
    assert!(matches!(&a.allow[0], Caller::Principal(p) if p.namespace() == Some("team-a")));
    assert_eq!(a.service.to_string(), "catalog.shop");
}

#[test]
fn every_refusal_names_the_service_when_it_is_readable() {
    // A proxy fails closed for this service, whatever else is wrong.
    let spec = json!({"service": "catalog.shop", "allow": ["ns:shop"]});
    let err = parse("Authorization", "Bad_Name", &spec).unwrap_err();
    assert_eq!(err.field, "metadata.name");
    assert_eq!(err.service.as_deref(), Some("catalog.shop"));
    let err = parse("Authorization", "x", &json!({"service": 3})).unwrap_err();
    assert_eq!(err.field, "spec.service");
    assert_eq!(err.service, None);
}

#[test]
fn typed_structs_and_the_field_walk_agree() {
    // `parse` walks fields to name them; the serde types are the schema. The
    // two must give the same verdict on every case. (serde also reads a
    // struct from a list of its fields in order; a spec must be a mapping,
    // which only the walk checks, so lists are left out here.)
    for c in cases::all().into_iter().filter(|c| c.spec.is_object()) {
        let walked = parse(&c.kind, &c.name, &c.spec).is_ok();
        let serde_ok = match c.kind.as_str() {
            "Authorization" => serde_json::from_value::<Authorization>(c.spec.clone()).is_ok(),
            "Export" => serde_json::from_value::<Export>(c.spec.clone()).is_ok(),
            // The traffic kinds are read with serde alone (`typed`).
            _ => continue,
        };
        let named_ok = check_key(&c.name).is_ok();
        assert_eq!(walked, serde_ok && named_ok, "line {}", c.line);
    }
}

#[test]
fn parsed_documents_serialize_back_to_what_was_applied() {
    let spec = json!({
        "service": "catalog.shop",
        "allow": ["ns:shop", "spiffe://trellis.local/ns/ops/sa/probe"],
        "deny": ["spiffe://trellis.local/ns/shop/sa/legacy"],
    });
    let a = Authorization::from_spec(&spec).unwrap();
    assert_eq!(serde_json::to_value(&a).unwrap(), spec);
    let e = Export::from_spec(&json!({"service": "a.b", "to": ["east", "*"]})).unwrap();
    assert!(e.admits("east") && e.admits("west"));
    let e = Export::from_spec(&json!({"service": "a.b", "to": ["east"]})).unwrap();
    assert!(e.admits("east") && !e.admits("west"));
}

#[test]
fn labels_and_keys() {
    for ok in ["a", "shop", "team-a", "0zone", &"a".repeat(63)] {
        assert_eq!(check_label(ok), Ok(()), "{ok}");
        assert_eq!(check_key(ok), Ok(()), "{ok}");
    }
    for (bad, why) in [
        ("", NameError::Empty),
        ("-a", NameError::Edge),
        ("a-", NameError::Edge),
        (&"a".repeat(64), NameError::TooLong(64)),
    ] {
        assert_eq!(check_label(bad), Err(why), "{bad:?}");
    }
    // Host names and pod names are keys, not labels.
    for host in ["host-1.west.internal", "pod_7", "a-"] {
        assert!(check_label(host).is_err(), "{host}");
        assert_eq!(check_key(host), Ok(()), "{host}");
    }
    assert_eq!(check_key("-a"), Err(NameError::LeadingDash));
    assert!(matches!(
        check_key("A"),
        Err(NameError::Char { found: 'A', .. })
    ));
}
