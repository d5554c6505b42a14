use super::*;

fn header() -> Header {
    Header {
        service: "catalog".into(),
        namespace: "shop".into(),
        port: 8080,
        source_zone: "east".into(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        subset: None,
        zone: None,
    }
}

#[test]
fn header_round_trips_and_reports_what_is_missing() {
    let h = header();
    let bytes = h.encode().unwrap();
    for cut in 0..bytes.len() {
        match Header::decode(&bytes[..cut]).unwrap() {
            Decoded::Incomplete { needed } => {
                assert!(
                    needed >= 1 && cut + needed <= bytes.len(),
                    "cut {cut}: {needed}"
                )
            }
            Decoded::Complete { .. } => panic!("complete at {cut} of {}", bytes.len()),
        }
    }
    // Bytes after the header belong to the payload and are left alone.
    let mut with_payload = bytes.clone();
    with_payload.extend_from_slice(b"\x16\x03\x01payload");
    assert_eq!(
        Header::decode(&with_payload).unwrap(),
        Decoded::Complete {
            value: h.clone(),
            consumed: bytes.len()
        }
    );
    let no_trace = Header {
        traceparent: None,
        ..h
    };
    let b = no_trace.encode().unwrap();
    assert!(
        matches!(Header::decode(&b).unwrap(), Decoded::Complete { value, .. } if value == no_trace)
    );
}

#[test]
fn malformed_headers_name_the_problem() {
    let good = header().encode().unwrap();
    let mut bad_version = good.clone();
    bad_version[0] = 9;
    assert_eq!(Header::decode(&bad_version), Err(ProtocolError::Version(9)));

    let too_long = [VERSION, 0xff, 0xff];
    assert_eq!(
        Header::decode(&too_long),
        Err(ProtocolError::TooLong(65535))
    );

    // Declared length shorter than the fields: a field runs past the end.
    let mut short = good.clone();
    short[2] = 5;
    assert!(matches!(
        Header::decode(&short),
        Err(ProtocolError::Truncated(_))
    ));

    // Trailing bytes inside the declared body.
    let mut trailing = good.clone();
    let len = u16::from_be_bytes([good[1], good[2]]) + 2;
    trailing[1..3].copy_from_slice(&len.to_be_bytes());
    trailing.extend_from_slice(b"xx");
    assert_eq!(Header::decode(&trailing), Err(ProtocolError::Trailing(2)));

    // Uppercase in the service name.
    let mut upper = good.clone();
    upper[4] = b'C';
    assert!(matches!(
        Header::decode(&upper),
        Err(ProtocolError::BadName {
            field: "service",
            ..
        })
    ));

    let zero_port = Header {
        port: 0,
        ..header()
    };
    assert_eq!(zero_port.encode(), Err(ProtocolError::ZeroPort));
    let bad_ns = Header {
        namespace: "-shop".into(),
        ..header()
    };
    assert!(
        bad_ns
            .encode()
            .unwrap_err()
            .to_string()
            .contains("namespace")
    );
    let bad_trace = Header {
        traceparent: Some("a b".into()),
        ..header()
    };
    assert_eq!(bad_trace.encode(), Err(ProtocolError::BadTrace));
}

#[test]
fn replies_round_trip_and_long_reasons_are_cut_on_a_char_boundary() {
    for code in [
        ReplyCode::Accepted,
        ReplyCode::UnknownService,
        ReplyCode::NotExported,
        ReplyCode::NoHealthyEndpoint,
        ReplyCode::Forbidden,
        ReplyCode::Overloaded,
        ReplyCode::UpstreamFailed,
        ReplyCode::ProtocolError,
    ] {
        let r = Reply::refused(code, format!("because {code}"));
        let b = r.encode();
        assert_eq!(
            Reply::decode(&b).unwrap(),
            Decoded::Complete {
                value: r,
                consumed: b.len()
            }
        );
    }
    let long = Reply::refused(ReplyCode::Forbidden, "é".repeat(200));
    let b = long.encode();
    assert!(b.len() <= MAX_REPLY_LEN);
    let Decoded::Complete { value, .. } = Reply::decode(&b).unwrap() else {
        panic!("incomplete")
    };
    assert_eq!(value.reason.len(), 254);
    assert_eq!(
        Reply::decode(&[VERSION, 99, 0]),
        Err(ProtocolError::UnknownCode(99))
    );
}

/// Random and mutated inputs never panic, and whatever decodes re-encodes to
/// the same bytes. (The libFuzzer target in gateway/fuzz goes further.)
#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = fastrand::Rng::with_seed(0x0074_7265_6c6c_6973);
    let good = header().encode().unwrap();
    for i in 0..200_000 {
        let buf: Vec<u8> = if i % 2 == 0 {
            let n = rng.usize(0..64);
            let mut b: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            if !b.is_empty() {
                b[0] = VERSION;
            }
            b
        } else {
            let mut b = good.clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(0..b.len());
                b[at] = rng.u8(..);
            }
            b.truncate(rng.usize(0..=b.len()));
            b
        };
        if let Ok(Decoded::Complete { value, consumed }) = Header::decode(&buf) {
            assert_eq!(value.encode().unwrap(), buf[..consumed]);
        }
        if let Ok(Decoded::Complete { value, consumed }) = Reply::decode(&buf) {
            assert_eq!(value.encode(), buf[..consumed]);
        }
    }
}

#[test]
fn a_subset_travels_in_version_2_and_its_absence_keeps_version_1() {
    let plain = header().encode().unwrap();
    assert_eq!(
        plain[0], VERSION,
        "a gateway of an earlier release takes it"
    );
    let h = Header {
        subset: Some("v2".into()),
        zone: None,
        ..header()
    };
    let bytes = h.encode().unwrap();
    assert_eq!(bytes[0], VERSION_SUBSET);
    assert_eq!(
        Header::decode(&bytes).unwrap(),
        Decoded::Complete {
            value: h,
            consumed: bytes.len()
        }
    );
    // Version 1 has no room for a subset: the byte is trailing.
    let mut v1 = bytes.clone();
    v1[0] = VERSION;
    assert!(matches!(
        Header::decode(&v1),
        Err(ProtocolError::Trailing(3))
    ));
    let bad = Header {
        subset: Some("V2".into()),
        zone: None,
        ..header()
    };
    assert!(matches!(
        bad.encode(),
        Err(ProtocolError::BadName {
            field: "subset",
            ..
        })
    ));
}

#[test]
fn a_relayed_streams_zone_travels_in_version_3_with_or_without_a_subset() {
    for subset in [None, Some("v2".to_owned())] {
        let h = Header {
            subset,
            zone: Some("edge".into()),
            ..header()
        };
        let bytes = h.encode().unwrap();
        assert_eq!(bytes[0], VERSION_RELAY);
        assert_eq!(
            Header::decode(&bytes).unwrap(),
            Decoded::Complete {
                value: h,
                consumed: bytes.len()
            }
        );
        // Read as version 2, the zone's bytes are trailing or the subset bad.
        let mut v2 = bytes.clone();
        v2[0] = VERSION_SUBSET;
        assert!(Header::decode(&v2).is_err());
    }
    let bad = Header {
        zone: Some("Edge".into()),
        ..header()
    };
    assert!(matches!(
        bad.encode(),
        Err(ProtocolError::BadName { field: "zone", .. })
    ));
    // A relayed header whose zone is missing is refused, not guessed.
    let mut cut = Header {
        zone: Some("edge".into()),
        ..header()
    }
    .encode()
    .unwrap();
    cut.truncate(cut.len() - 5);
    let body = (cut.len() - 3) as u16;
    cut[1..3].copy_from_slice(&body.to_be_bytes());
    assert!(Header::decode(&cut).is_err());
}
