//! The rules of the store checks, case by case.

use super::*;

fn member(id: u64, role: &str) -> proto::Member {
    proto::Member {
        id,
        name: format!("z/s{id}"),
        address: format!("10.0.0.{id}:7400"),
        role: role.into(),
    }
}

/// A store where the servers `up` (by id, of voters 1..=3) answered,
/// each naming `leader`, with `skew_ms` on the first.
fn store(up: &[u64], leader: u64, skew_ms: i64) -> Store {
    let members = vec![
        member(1, "voter"),
        member(2, "voter"),
        member(3, "voter"),
        member(4, "learner"),
    ];
    let probes = (1..=3)
        .map(|id| ServerProbe {
            addr: format!("10.0.0.{id}:7400"),
            configured: true,
            rtt: Duration::from_millis(id),
            answer: if up.contains(&id) {
                Ok(proto::ClusterStatus {
                    id,
                    leader,
                    term: 7,
                    members: members.clone(),
                    ..Default::default()
                })
            } else {
                Err("no answer within 2s".into())
            },
            skew_ms: up.contains(&id).then_some(skew_ms),
        })
        .collect();
    Store {
        not_asked: None,
        probes,
        bundle: None,
        bundle_unverified: false,
        endpoints: None,
    }
}

#[test]
fn quorum_needs_a_majority_of_voters_and_a_leader() {
    assert_eq!(store(&[1, 2, 3], 1, 0).quorum_check().status, Status::Ok);
    // Two of three is a majority; learners do not count.
    assert_eq!(store(&[1, 2], 1, 0).quorum_check().status, Status::Ok);
    let one = store(&[1], 1, 0).quorum_check();
    assert_eq!(one.status, Status::Fail);
    assert!(
        one.finding.contains("only 1 of 3 voters"),
        "{}",
        one.finding
    );
    let leaderless = store(&[1, 2, 3], 0, 0).quorum_check();
    assert_eq!(leaderless.status, Status::Fail);
    assert!(leaderless.finding.contains("none knows a leader"));
    assert_eq!(store(&[], 0, 0).quorum_check().status, Status::Skip);
}

#[test]
fn clock_skew_warns_past_a_second_and_fails_past_thirty() {
    assert_eq!(store(&[1], 1, 300).clock_check().status, Status::Ok);
    assert_eq!(store(&[1], 1, -1_500).clock_check().status, Status::Warn);
    let ahead = store(&[1], 1, -600_000).clock_check();
    assert_eq!(ahead.status, Status::Fail);
    assert!(
        ahead.finding.contains("600.000 s ahead of"),
        "{}",
        ahead.finding
    );
    let behind = store(&[1], 1, 31_000).clock_check();
    assert_eq!(behind.status, Status::Fail);
    assert!(behind.finding.contains("behind"), "{}", behind.finding);
}

#[test]
fn a_link_on_the_tcp_fallback_or_down_fails_and_says_why() {
    let quic = json!({"links": [{"zone": "west", "transport": "quic", "fallback": false, "rtt_ms": 40.2}]});
    let (s, f) = assess_links("gw1", &quic);
    assert_eq!((s, f.as_str()), (Status::Ok, "gw1 -> west quic 40.2 ms"));
    let fallback = json!({"links": [{"zone": "west", "address": "10.77.2.11:25443", "transport": "tcp", "fallback": true, "error": "QUIC handshake timed out after 5s"}]});
    let (s, f) = assess_links("gw1", &fallback);
    assert_eq!(s, Status::Fail);
    assert!(
        f.contains("QUIC handshake timed out") && f.contains("UDP 10.77.2.11:25443"),
        "{f}"
    );
    // Configured for TCP: not a fallback, nothing wrong.
    let tcp = json!({"links": [{"zone": "west", "transport": "tcp", "fallback": false}]});
    assert_eq!(assess_links("gw1", &tcp).0, Status::Ok);
    let down =
        json!({"links": [{"zone": "west", "transport": null, "error": "TCP connect: refused"}]});
    let (s, f) = assess_links("gw1", &down);
    assert_eq!(s, Status::Fail);
    assert!(f.contains("down (TCP connect: refused)"), "{f}");
}
