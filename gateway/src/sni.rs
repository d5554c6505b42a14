//! SNI reading and mesh names live in the data-plane core
//! ([`trellis_proxy::sni`]); re-exported here for the gateway's modules.

pub use trellis_proxy::sni::*;

#[cfg(test)]
mod tests {
    use crate::testing::client_hello;
    use trellis_proxy::Decoded;
    use trellis_proxy::sni::*;

    #[test]
    fn finds_the_sni_of_a_real_client_hello_at_any_split() {
        let hello = client_hello("8080.catalog.shop.west.mesh");
        for cut in 0..hello.len() {
            assert!(
                matches!(
                    client_hello_sni(&hello[..cut]),
                    Ok(Decoded::Incomplete { .. })
                ),
                "cut {cut}"
            );
        }
        let mut with_more = hello.clone();
        with_more.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
        assert_eq!(
            client_hello_sni(&with_more).unwrap(),
            Decoded::Complete {
                value: Some("8080.catalog.shop.west.mesh".into()),
                consumed: hello.len()
            }
        );
    }

    #[test]
    fn a_client_hello_split_over_two_records_is_reassembled() {
        let hello = client_hello("443.auth.shop.east.mesh");
        let payload = &hello[5..];
        let (a, b) = payload.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let Decoded::Complete { value, consumed } = client_hello_sni(&split).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(value.as_deref(), Some("443.auth.shop.east.mesh"));
        assert_eq!(consumed, split.len());
    }

    #[test]
    fn non_tls_and_garbage_are_refused_without_panicking() {
        assert_eq!(
            client_hello_sni(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls(b'G'))
        );
        let mut rng = fastrand::Rng::with_seed(7);
        let hello = client_hello("1.a.b.c.mesh");
        for _ in 0..100_000 {
            let mut b = hello.clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(0..b.len());
                b[at] = rng.u8(..);
            }
            b.truncate(rng.usize(0..=b.len()));
            let _ = client_hello_sni(&b);
        }
    }

    #[test]
    fn mesh_names_parse_by_the_naming_rule() {
        let n = MeshName::parse("8080.catalog.shop.west.mesh", "mesh").unwrap();
        assert_eq!(
            n,
            MeshName {
                subset: None,
                port: 8080,
                service: "catalog".into(),
                namespace: "shop".into(),
                zone: "west".into()
            }
        );
        assert_eq!(n.to_sni("mesh"), "8080.catalog.shop.west.mesh");
        let n = MeshName::parse("80.a.b.c.mesh.example.com", "mesh.example.com").unwrap();
        assert_eq!(n.zone, "c");
        // A caller's chosen subset leads.
        let n = MeshName::parse("v2.8080.catalog.shop.west.mesh", "mesh").unwrap();
        assert_eq!((n.subset.as_deref(), n.port), (Some("v2"), 8080));
        assert_eq!(n.to_sni("mesh"), "v2.8080.catalog.shop.west.mesh");
        for bad in [
            "V2.8080.catalog.shop.west.mesh",
            "x.y.8080.catalog.shop.west.mesh",
            "catalog.shop.west.mesh",
            "0.catalog.shop.west.mesh",
            "x.catalog.shop.west.mesh",
            "8080.catalog.shop.west.other",
            "8080.Catalog.shop.west.mesh",
            "8080.a.b.c.d.mesh",
            "mesh",
        ] {
            assert!(MeshName::parse(bad, "mesh").is_err(), "{bad}");
        }
    }
}
