use std::time::{Duration, SystemTime};

use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::spiffe::RoleKind;

fn td() -> TrustDomain {
    "trellis.local".parse().unwrap()
}

fn root() -> Authority {
    Authority::new_root(&td(), DEFAULT_ROOT_TTL).unwrap()
}

#[test]
fn root_and_zone_have_the_right_constraints() {
    let root = root();
    assert!(root.info().is_ca);
    assert_eq!(root.info().path_len, None);
    let zone = root.new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    assert!(zone.info().is_ca);
    assert_eq!(zone.info().path_len, Some(0));
    assert_eq!(zone.info().issuer, root.info().subject);
    // A zone CA cannot make further intermediates.
    assert!(zone.new_zone("west", DEFAULT_ZONE_TTL).is_err());
    // Zone names must be valid path segments.
    assert!(root.new_zone("a/b", DEFAULT_ZONE_TTL).is_err());
}

#[test]
fn leaf_carries_one_uri_san_both_usages_and_24h() {
    let zone = root().new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let id = td().workload("shop", "catalog").unwrap();
    let before = SystemTime::now();
    let creds = zone.issue(&id, IssueOptions::default()).unwrap();
    assert_eq!(creds.chain.len(), 2, "leaf plus zone intermediate");
    creds.check_key_matches().unwrap();

    let (_, cert) = X509Certificate::from_der(&creds.chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(creds.id().unwrap(), id);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());

    let info = creds.leaf_info().unwrap();
    let backdate = before.duration_since(info.not_before).unwrap();
    assert!(
        backdate >= Duration::from_secs(299) && backdate <= Duration::from_secs(301),
        "backdated {backdate:?}"
    );
    // The lifetime counts from issue; only the start is backdated.
    let life = info.not_after.duration_since(info.not_before).unwrap();
    assert_eq!(life, DEFAULT_LEAF_TTL + BACKDATE);
}

#[test]
fn a_short_lifetime_is_not_spent_by_the_backdate() {
    let zone = root().new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let td: TrustDomain = "trellis.local".parse().unwrap();
    let opts = IssueOptions {
        ttl: Duration::from_secs(20),
        ..IssueOptions::default()
    };
    let before = std::time::SystemTime::now();
    let info = zone
        .issue(&td.workload("shop", "catalog").unwrap(), opts)
        .unwrap()
        .leaf_info()
        .unwrap();
    let left = info.not_after.duration_since(before).unwrap();
    assert!(
        left >= Duration::from_secs(19),
        "only {left:?} left at issue"
    );
    assert!(before.duration_since(info.not_before).unwrap() <= Duration::from_secs(6));
}

#[test]
fn serials_are_random_and_positive() {
    let zone = root().new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let id = td().workload("shop", "catalog").unwrap();
    let a = zone.issue(&id, IssueOptions::default()).unwrap();
    let b = zone.issue(&id, IssueOptions::default()).unwrap();
    let sa = a.leaf_info().unwrap().serial;
    let sb = b.leaf_info().unwrap().serial;
    assert_ne!(sa, sb);
    assert!(
        sa.len() >= 16 * 3 - 1,
        "serial {sa} is shorter than 128 bits"
    );
}

#[test]
fn lifetime_is_clipped_to_the_issuer() {
    let root = root();
    let zone = root.new_zone("east", Duration::from_secs(3600)).unwrap();
    let id = td().workload("shop", "catalog").unwrap();
    let creds = zone
        .issue(&id, IssueOptions::ttl(DEFAULT_LEAF_TTL))
        .unwrap();
    assert!(creds.leaf_info().unwrap().not_after <= zone.info().not_after);
}

#[test]
fn refuses_identities_it_may_not_sign() {
    let root = root();
    let east = root.new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let other_td: TrustDomain = "other.example".parse().unwrap();
    let cases = [
        other_td.workload("shop", "catalog").unwrap(),
        td().role(RoleKind::Gateway, "west", "gw1").unwrap(),
        "spiffe://trellis.local".parse().unwrap(),
    ];
    for id in cases {
        let err = east.issue(&id, IssueOptions::default()).unwrap_err();
        assert!(matches!(err, CaError::NotAllowed { .. }), "{id}: {err}");
    }
    // Its own zone's roles are fine.
    let gw = td().role(RoleKind::Gateway, "east", "gw1").unwrap();
    east.issue(&gw, IssueOptions::default()).unwrap();
}

#[test]
fn csr_must_prove_the_key_and_may_not_ask_for_more() {
    let zone = root().new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let id = td().workload("shop", "catalog").unwrap();
    let other = td().workload("shop", "admin").unwrap();

    // A CSR for another identity is refused: the caller's identity wins, and a mismatch is a bug or an attack.
    let (_, csr) = new_key_and_csr(&other).unwrap();
    let err = zone
        .sign_csr(&csr, &id, IssueOptions::default())
        .unwrap_err();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");

    // A CSR whose signature was tampered with is refused.
    let (_, csr) = new_key_and_csr(&id).unwrap();
    let mut bytes = csr.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let err = zone
        .sign_csr(&bytes.into(), &id, IssueOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");

    // Garbage is refused with a reason, not a panic.
    let err = zone
        .sign_csr(&vec![0x30, 0x03, 0x01].into(), &id, IssueOptions::default())
        .unwrap_err();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");
}

#[test]
fn authority_round_trips_through_pem() {
    let root = root();
    let loaded = Authority::from_pem(
        AuthorityKind::Root,
        td(),
        &root.cert_pem(),
        &root.key_pem(),
        Vec::new(),
    )
    .unwrap();
    let zone = loaded.new_zone("east", DEFAULT_ZONE_TTL).unwrap();
    assert_eq!(zone.info().issuer, root.info().subject);
    // A key that is not the certificate's is refused.
    let other = Authority::new_root(&td(), DEFAULT_ROOT_TTL).unwrap();
    let err = Authority::from_pem(
        AuthorityKind::Root,
        td(),
        &root.cert_pem(),
        &other.key_pem(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

#[test]
fn debug_output_never_shows_keys() {
    let root = root();
    let id = td().workload("shop", "catalog").unwrap();
    let creds = root.issue(&id, IssueOptions::default()).unwrap();
    let key_pem = creds.key_pem();
    let secret_line = key_pem.lines().nth(1).unwrap();
    assert!(!format!("{creds:?}").contains(secret_line));
    let root_key = root.key_pem();
    let root_secret = root_key.lines().nth(1).unwrap();
    assert!(!format!("{root:?}").contains(root_secret));
}

#[test]
fn dns_names_sit_beside_the_identity_only_when_asked() {
    let zone = root().new_zone("k8s", DEFAULT_ZONE_TTL).unwrap();
    let id = td().workload("trellis-system", "trellis-webhook").unwrap();
    let names = vec!["trellis-webhook.trellis-system.svc".to_owned()];
    let creds = zone
        .issue_with_dns_names(&id, &names, IssueOptions::default())
        .unwrap();
    assert_eq!(
        creds.id().unwrap(),
        id,
        "the SPIFFE ID is still the identity"
    );
    let (_, cert) = X509Certificate::from_der(&creds.chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let dns: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, names);

    // A CSR asking for a DNS name the caller did not grant is refused.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(id.as_str().try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    let csr = params.serialize_request(&key).unwrap();
    let err = zone
        .sign_csr_with_dns_names(csr.der(), &id, &names, IssueOptions::default())
        .unwrap_err();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");
}
