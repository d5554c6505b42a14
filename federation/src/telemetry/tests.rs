use super::*;

fn key(
    reporter: &str,
    src: &str,
    dst: &str,
    zone: &str,
    workload: &str,
    route: &str,
) -> proto::EdgeKey {
    proto::EdgeKey {
        reporter: reporter.into(),
        source_workload: src.into(),
        source_namespace: "shop".into(),
        source_zone: "east".into(),
        destination_service: dst.into(),
        destination_namespace: "shop".into(),
        destination_zone: zone.into(),
        destination_workload: workload.into(),
        route: route.into(),
    }
}

fn edge(k: proto::EdgeKey, requests: u64, errors: u64, latencies_us: &[u64]) -> proto::EdgeSignals {
    let mut s = Summary {
        requests,
        errors,
        ..Summary::default()
    };
    latencies_us.iter().for_each(|&v| s.latency.insert(v));
    s.to_proto(k)
}

fn report(edges: Vec<proto::EdgeSignals>) -> proto::SignalReport {
    proto::SignalReport {
        proxy: String::new(),
        interval_ms: 2000,
        edges,
        dropped: 0,
    }
}

fn sel(window: u32, view: View, service: Option<(&str, &str)>) -> Selection {
    Selection {
        window,
        service: service.map(|(a, b)| (a.into(), b.into())),
        view,
    }
}

#[test]
fn errors_are_no_answer_5xx_and_grpc_server_failures() {
    assert!(is_error(0, None));
    assert!(is_error(503, None));
    assert!(!is_error(404, None));
    assert!(!is_error(200, Some("0")));
    assert!(is_error(200, Some("14")));
    assert!(is_error(200, Some("13")));
    assert!(!is_error(200, Some("5")), "NOT_FOUND blames the caller");
    assert!(
        !is_error(200, Some("7")),
        "PERMISSION_DENIED blames the caller"
    );
}

#[test]
fn reports_add_up_per_edge_across_proxies_and_slots() {
    let t0 = Instant::now();
    let store = Store::new(t0);
    let a = key("source", "auth", "catalog", "west", "catalog", "default");
    // Two auth hosts report the same edge, in two different seconds.
    store
        .record(
            "spiffe://td/zone/east/agent/a1",
            &report(vec![edge(a.clone(), 10, 1, &[1000; 10])]),
            t0,
        )
        .unwrap();
    store
        .record(
            "spiffe://td/zone/east/agent/a2",
            &report(vec![edge(a.clone(), 30, 2, &[3000; 30])]),
            t0 + Duration::from_millis(1500),
        )
        .unwrap();
    let now = t0 + Duration::from_secs(2);
    let t = store.query(&sel(10, View::Edges, None), now).table(10);
    assert_eq!(t.rows.len(), 1, "{t:?}");
    let r = &t.rows[0];
    assert_eq!((r.requests, r.errors), (40, 3));
    assert!((r.rps - 4.0).abs() < 1e-9);
    assert!((r.success_rate - 37.0 / 40.0).abs() < 1e-9);
    // 10 at 1 ms, 30 at 3 ms: the median is 3 ms, to 2 %.
    assert!((r.p50_ms - 3.0).abs() <= 3.0 * 0.02, "{}", r.p50_ms);
    // The edges view folds destination workloads together.
    assert_eq!(r.key.as_ref().unwrap().destination_workload, "");
    // A window of one second sees only the later report.
    let now = t0 + Duration::from_millis(1800);
    let t = store.query(&sel(1, View::Edges, None), now).table(1);
    assert_eq!(t.rows[0].requests, 30);
}

#[test]
fn views_split_callers_from_destinations_and_filter_by_service() {
    let t0 = Instant::now();
    let store = Store::new(t0);
    store
        .record(
            "spiffe://td/zone/east/agent/auth",
            &report(vec![
                edge(
                    key("source", "auth", "catalog", "west", "catalog", "v2-canary"),
                    5,
                    0,
                    &[],
                ),
                edge(
                    key("source", "auth", "catalog", "west", "catalog", "default"),
                    7,
                    0,
                    &[],
                ),
                edge(
                    key("source", "auth", "users", "east", "users", "default"),
                    9,
                    0,
                    &[],
                ),
            ]),
            t0,
        )
        .unwrap();
    for (proxy, n) in [("catalog-west", 8), ("catalog-west-v2", 4)] {
        store
            .record(
                &format!("spiffe://td/zone/west/agent/{proxy}"),
                &report(vec![edge(
                    key(
                        "destination",
                        "auth",
                        "catalog",
                        "west",
                        "catalog",
                        "default",
                    ),
                    n,
                    1,
                    &[],
                )]),
                t0,
            )
            .unwrap();
    }
    let catalog = Some(("catalog", "shop"));
    let routes = store.query(&sel(5, View::Routes, catalog), t0).table(5);
    let got: Vec<(String, u64)> = routes
        .rows
        .iter()
        .map(|r| (r.key.as_ref().unwrap().route.clone(), r.requests))
        .collect();
    assert_eq!(
        got,
        [("default".to_string(), 7), ("v2-canary".to_string(), 5)]
    );
    let endpoints = store.query(&sel(5, View::Endpoints, catalog), t0).table(5);
    let got: Vec<(&str, u64, u64)> = endpoints
        .rows
        .iter()
        .map(|r| (r.proxy.rsplit('/').next().unwrap(), r.requests, r.errors))
        .collect();
    assert_eq!(got, [("catalog-west", 8, 1), ("catalog-west-v2", 4, 1)]);
    let edges = store.query(&sel(5, View::Edges, None), t0).table(5);
    assert_eq!(
        edges.rows.len(),
        3,
        "destination reports are not edges: {edges:?}"
    );
}

#[test]
fn old_slots_expire_and_memory_stays_bounded() {
    let t0 = Instant::now();
    let store = Store::new(t0);
    let k = key("source", "a", "b", "east", "b", "default");
    store
        .record("p", &report(vec![edge(k.clone(), 1, 0, &[])]), t0)
        .unwrap();
    assert_eq!(store.entries(), 1);
    let later = t0 + RETENTION + Duration::from_secs(1);
    let t = store.query(&sel(60, View::Edges, None), later).table(60);
    assert!(t.rows.is_empty());
    assert_eq!(store.entries(), 0);
    // Past MAX_ENTRIES distinct edges, the rest is counted as dropped.
    let many: Vec<_> = (0..MAX_ENTRIES + 10)
        .map(|i| {
            edge(
                key("source", &format!("w{i}"), "b", "east", "b", "default"),
                2,
                0,
                &[],
            )
        })
        .collect();
    store.record("p", &report(many), later).unwrap();
    assert_eq!(store.entries(), MAX_ENTRIES);
    let t = store.query(&sel(1, View::Edges, None), later).table(1);
    assert_eq!(t.dropped, 20);
    assert_eq!(t.rows.len(), MAX_ENTRIES);
}

#[test]
fn malformed_reports_are_refused_whole() {
    let store = Store::default();
    let mut k = key("sideways", "a", "b", "east", "b", "default");
    let r = store.record(
        "p",
        &report(vec![edge(k.clone(), 1, 0, &[])]),
        Instant::now(),
    );
    assert!(
        matches!(
            r,
            Err(ReportError::Field {
                field: "reporter",
                ..
            })
        ),
        "{r:?}"
    );
    k.reporter = "source".into();
    k.route = "x".repeat(300);
    let r = store.record("p", &report(vec![edge(k, 1, 0, &[])]), Instant::now());
    assert!(
        matches!(r, Err(ReportError::Field { field: "route", .. })),
        "{r:?}"
    );
    assert_eq!(store.entries(), 0);
}

#[test]
fn tables_from_other_servers_merge_with_their_sketches() {
    let t0 = Instant::now();
    let (east, west) = (Store::new(t0), Store::new(t0));
    let k = key("source", "auth", "catalog", "west", "catalog", "default");
    east.record(
        "e",
        &report(vec![edge(k.clone(), 100, 0, &[1_000; 100])]),
        t0,
    )
    .unwrap();
    west.record(
        "w",
        &report(vec![edge(k.clone(), 100, 50, &[9_000; 100])]),
        t0,
    )
    .unwrap();
    let s = sel(10, View::Edges, None);
    let mut all = east.query(&s, t0);
    all.add_table(&west.query(&s, t0).table(10));
    let t = all.table(10);
    assert_eq!(t.rows.len(), 1);
    assert_eq!((t.rows[0].requests, t.rows[0].errors), (200, 50));
    assert!((t.rows[0].p99_ms - 9.0).abs() <= 9.0 * 0.02);
    assert!(
        (t.rows[0].p50_ms - 1.0).abs() <= 0.02,
        "{}",
        t.rows[0].p50_ms
    );
}

#[test]
fn queries_name_a_sane_window_and_service() {
    let q = |w, s: &str, v: &str| {
        Selection::from_query(&proto::SignalQuery {
            window_seconds: w,
            service: s.into(),
            view: v.into(),
            local_only: false,
        })
    };
    assert_eq!(q(0, "", "").unwrap().window, 30);
    assert!(q(61, "", "").is_err());
    assert_eq!(
        q(5, "catalog.shop", "routes").unwrap().service,
        Some(("catalog".into(), "shop".into()))
    );
    assert!(q(5, "catalog", "").is_err());
    assert!(q(5, "catalog.shop.mesh", "").is_err());
    assert!(q(5, "", "sideways").is_err());
}
