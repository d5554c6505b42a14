//! The `trellis ca` verbs, run as a user would, and their output checked with openssl.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .expect("could not run the trellis binary")
}

fn ok(args: &[&str]) -> String {
    let out = trellis(args);
    assert!(
        out.status.success(),
        "trellis {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for this test (.ci/run installs it)")
}

#[test]
fn ca_chain_verifies_with_openssl_and_keys_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    ok(&["ca", "init", "--dir", d, "--trust-domain", "example.org"]);
    ok(&["ca", "zone", "--dir", d, "--zone", "east"]);
    let prefix = tmp.path().join("creds/alice");
    let p = prefix.to_str().unwrap();
    let out = ok(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://example.org/ns/shop/sa/catalog",
        "--zone",
        "east",
        "--out",
        p,
        "--ttl",
        "2h",
    ]);
    assert!(
        out.contains("issued spiffe://example.org/ns/shop/sa/catalog"),
        "{out}"
    );

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("root.key")), 0o600);
    assert_eq!(mode(&dir.join("zones/east/ca.key")), 0o600);
    assert_eq!(mode(&tmp.path().join("creds/alice.key")), 0o600);

    // PREFIX.crt holds leaf then intermediate; split them for openssl.
    let chain = std::fs::read_to_string(format!("{p}.crt")).unwrap();
    let blocks: Vec<String> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_owned)
        .collect();
    assert_eq!(blocks.len(), 2, "leaf and zone intermediate");
    let leaf = tmp.path().join("leaf.crt");
    std::fs::write(&leaf, &blocks[0]).unwrap();
    let v = openssl(&[
        "verify",
        "-CAfile",
        &format!("{d}/root.crt"),
        "-untrusted",
        &format!("{d}/zones/east/ca.crt"),
        leaf.to_str().unwrap(),
    ]);
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The bundle written beside the credentials verifies the same chain.
    let v = openssl(&[
        "verify",
        "-CAfile",
        &format!("{p}.bundle"),
        "-untrusted",
        &format!("{d}/zones/east/ca.crt"),
        leaf.to_str().unwrap(),
    ]);
    assert!(v.status.success());

    let text = openssl(&["x509", "-noout", "-text", "-in", leaf.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://example.org/ns/shop/sa/catalog"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    let inter = openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        &format!("{d}/zones/east/ca.crt"),
    ]);
    assert!(String::from_utf8_lossy(&inter.stdout).contains("CA:TRUE, pathlen:0"));

    // The key is the leaf's key.
    let pubkey = |args: &[&str]| openssl(args).stdout;
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in", leaf.to_str().unwrap()]),
        pubkey(&["pkey", "-pubout", "-in", &format!("{p}.key")])
    );

    // inspect names the identity and the time left.
    let shown = ok(&["ca", "inspect", &format!("{p}.crt")]);
    assert!(
        shown.contains("identity:   spiffe://example.org/ns/shop/sa/catalog"),
        "{shown}"
    );
    assert!(shown.contains("certificate 2 of 2"), "{shown}");
    assert!(shown.contains("CA:         yes, path length 0"), "{shown}");
    assert!(shown.contains("time left:  1h 5"), "{shown}");
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    let d = d.to_str().unwrap();
    ok(&["ca", "init", "--dir", d]);
    let before = std::fs::read(format!("{d}/root.key")).unwrap();
    let out = trellis(&["ca", "init", "--dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(format!("{d}/root.key")).unwrap(), before);
    // Likewise for a zone.
    ok(&["ca", "zone", "--dir", d, "--zone", "east"]);
    let out = trellis(&["ca", "zone", "--dir", d, "--zone", "east"]);
    assert!(!out.status.success());
}

#[test]
fn bad_input_is_refused_with_the_rule_and_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    let d = d.to_str().unwrap();
    ok(&["ca", "init", "--dir", d]);
    for (args, needle) in [
        (
            vec![
                "ca",
                "issue",
                "--dir",
                d,
                "--id",
                "spiffe://trellis.local/a/../b",
                "--out",
                "x",
            ],
            "'..'",
        ),
        (
            vec![
                "ca",
                "issue",
                "--dir",
                d,
                "--id",
                "https://trellis.local/a",
                "--out",
                "x",
            ],
            "spiffe://",
        ),
        (
            vec!["ca", "init", "--dir", d, "--trust-domain", "Bad_Domain"],
            "'B'",
        ),
        (
            vec![
                "ca",
                "issue",
                "--dir",
                d,
                "--id",
                "spiffe://trellis.local/a",
                "--out",
                "x",
                "--ttl",
                "soon",
            ],
            "e.g. 90s",
        ),
    ] {
        let out = trellis(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // An identity from another trust domain is refused by the CA itself.
    let out = trellis(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://other.org/ns/a/sa/b",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signs only for trust domain trellis.local")
    );
    // A zone that was never made is named with the command that makes it.
    let out = trellis(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://trellis.local/operator/a",
        "--zone",
        "nowhere",
        "--out",
        "x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("trellis ca zone"));
}

#[test]
fn inspect_warns_about_a_ca_close_to_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    let d = d.to_str().unwrap();
    ok(&["ca", "init", "--dir", d, "--ttl", "20d"]);
    let out = trellis(&["ca", "inspect", &format!("{d}/root.crt")]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: CA") && err.contains("rotate it"),
        "{err}"
    );
    // A 10-year root draws no warning.
    let d2 = tmp.path().join("ca2");
    ok(&["ca", "init", "--dir", d2.to_str().unwrap()]);
    let out = trellis(&["ca", "inspect", d2.join("root.crt").to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

#[test]
fn a_root_rotation_keeps_old_and_new_chains_valid_until_the_old_root_is_retired() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    let d = d.to_str().unwrap();
    let issue = |out: &str| {
        ok(&[
            "ca",
            "issue",
            "--dir",
            d,
            "--zone",
            "east",
            "--id",
            "spiffe://trellis.local/ns/shop/sa/catalog",
            "--out",
            tmp.path().join(out).to_str().unwrap(),
        ]);
        // Split leaf and intermediate for openssl.
        let chain = std::fs::read_to_string(tmp.path().join(format!("{out}.crt"))).unwrap();
        let mut parts = chain.split_inclusive("-----END CERTIFICATE-----\n");
        let (leaf, inter) = (parts.next().unwrap(), parts.next().unwrap());
        std::fs::write(tmp.path().join(format!("{out}.leaf")), leaf).unwrap();
        std::fs::write(tmp.path().join(format!("{out}.inter")), inter).unwrap();
    };
    let verifies = |out: &str| {
        openssl(&[
            "verify",
            "-CAfile",
            &format!("{d}/bundle.pem"),
            "-untrusted",
            tmp.path().join(format!("{out}.inter")).to_str().unwrap(),
            tmp.path().join(format!("{out}.leaf")).to_str().unwrap(),
        ])
        .status
        .success()
    };
    ok(&["ca", "init", "--dir", d]);
    ok(&["ca", "zone", "--dir", d, "--zone", "east"]);
    issue("old");
    assert!(verifies("old"));

    ok(&["ca", "rotate-root", "--dir", d]);
    let bundle = std::fs::read_to_string(format!("{d}/bundle.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    // Until the zone is re-signed, it still chains to the old root.
    ok(&["ca", "zone", "--dir", d, "--zone", "east", "--replace"]);
    issue("new");
    assert!(
        verifies("old") && verifies("new"),
        "both chains are trusted during the rotation"
    );
    assert_eq!(mode(&tmp.path().join("ca/retired")), 0o700);

    ok(&["ca", "retire-roots", "--dir", d]);
    assert!(verifies("new"));
    assert!(!verifies("old"), "the old root is no longer trusted");
}
