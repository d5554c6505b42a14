use serde_json::{Value, json};

use super::*;

fn doc(api: &str, kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": api,
        "kind": kind,
        "metadata": { "name": "catalog", "namespace": "shop" },
        "spec": spec,
    })
}

fn vs(spec: Value) -> Value {
    doc("networking.istio.io/v1", "VirtualService", spec)
}

fn dr(spec: Value) -> Value {
    doc("networking.istio.io/v1beta1", "DestinationRule", spec)
}

fn http(spec: Value) -> Value {
    doc("gateway.networking.k8s.io/v1", "HTTPRoute", spec)
}

fn grpc(spec: Value) -> Value {
    doc("gateway.networking.k8s.io/v1", "GRPCRoute", spec)
}

fn natives(d: &Value) -> Vec<Native> {
    assert!(is_foreign(d), "{d}");
    translate(1, d).unwrap_or_else(|e| panic!("{e}"))
}

/// The spec of the one native document `d` becomes.
fn spec(d: &Value) -> Value {
    let mut n = natives(d);
    assert_eq!(n.len(), 1, "{n:?}");
    n.remove(0).spec
}

/// The rules of the one `Route` `d` becomes.
fn rules(d: &Value) -> Vec<Value> {
    spec(d)["rules"].as_array().unwrap().clone()
}

/// The refusal of `d`, checked to name `field` and to say `words`.
fn refused(d: &Value, field: &str, words: &str) -> String {
    let e = translate(1, d).map(|n| format!("{n:?}")).unwrap_err().0;
    assert!(e.contains(&format!(": {field}: ")), "want {field}: {e}");
    assert!(e.contains(words), "want {words:?}: {e}");
    e
}

/// The one Chrome header route and a 90/10 split: the canary of the issue.
fn canary_vs() -> Value {
    vs(json!({
        "hosts": ["catalog"],
        "http": [
            {
                "name": "chrome",
                "match": [{ "headers": { "User-Agent": { "regex": ".*Chrome.*" } } }],
                "route": [{ "destination": { "host": "catalog", "subset": "v2" } }],
            },
            {
                "route": [
                    { "destination": { "host": "catalog", "subset": "v1" }, "weight": 90 },
                    { "destination": { "host": "catalog.shop.svc.cluster.local", "subset": "v2" }, "weight": 10 },
                ],
                "timeout": "2s",
                "retries": { "attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,refused-stream,unavailable,503" },
            },
        ],
    }))
}

// === Istio VirtualService ===

#[test]
fn a_virtual_service_becomes_a_route_rule_by_rule() {
    let n = natives(&canary_vs());
    assert_eq!((n[0].kind, n[0].name.as_str()), ("Route", "catalog"));
    assert_eq!(
        n[0].spec,
        json!({
            "service": "catalog.shop",
            "rules": [
                {
                    "name": "chrome",
                    "match": [{ "headers": { "user-agent": { "regex": ".*Chrome.*" } } }],
                    "backends": [{ "subset": "v2", "weight": 1 }],
                },
                {
                    "backends": [
                        { "subset": "v1", "weight": 90 },
                        { "subset": "v2", "weight": 10 },
                    ],
                    "timeout": "2s",
                    "retries": {
                        "attempts": 3,
                        "perTryTimeout": "500ms",
                        "on": ["5xx", "reset"],
                        "statusCodes": [503],
                        "grpcStatuses": ["unavailable"],
                        "budget": { "percent": 20.0, "minPerSecond": 10 },
                    },
                },
            ],
        })
    );
}

#[test]
fn hosts_name_mesh_services_in_every_spelling() {
    for (host, want) in [
        ("catalog", "catalog.shop"),
        ("catalog.web", "catalog.web"),
        ("catalog.web.svc", "catalog.web"),
        ("catalog.web.svc.cluster.local", "catalog.web"),
        ("catalog.web.mesh", "catalog.web"),
    ] {
        assert_eq!(
            mesh_service(host, "shop").unwrap().to_string(),
            want,
            "{host}"
        );
    }
    for host in [
        "*.shop.svc.cluster.local",
        "*",
        "a.b.c",
        "catalog.shop.svc.other.local",
        "Catalog",
    ] {
        assert!(mesh_service(host, "shop").is_err(), "{host}");
    }
    // Without metadata.namespace, Kubernetes' default namespace.
    let mut d = canary_vs();
    d["metadata"].as_object_mut().unwrap().remove("namespace");
    assert_eq!(spec(&d)["service"], "catalog.default");
    let d = vs(json!({ "hosts": ["*.shop.svc.cluster.local"], "http": [] }));
    refused(&d, "spec.hosts[0]", "wildcard");
}

#[test]
fn several_hosts_become_several_routes_and_other_services_are_named() {
    let d = vs(json!({
        "hosts": ["catalog", "catalog-beta.shop.mesh"],
        "http": [{ "route": [{ "destination": { "host": "catalog" } }] }],
    }));
    let n = natives(&d);
    let names: Vec<_> = n.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["catalog.catalog.shop", "catalog.catalog-beta.shop"]);
    // The route's own service needs no `service`; another one does.
    assert_eq!(n[0].spec["rules"][0]["backends"], json!([{ "weight": 1 }]));
    assert_eq!(
        n[1].spec["rules"][0]["backends"],
        json!([{ "service": "catalog.shop", "weight": 1 }])
    );
    let d = vs(json!({ "hosts": ["catalog", "catalog.shop"], "http": [] }));
    refused(&d, "spec.hosts[1]", "again");
}

#[test]
fn istio_matches_map_field_by_field() {
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [{
            "match": [
                {
                    "uri": { "prefix": "/api" },
                    "method": { "exact": "GET" },
                    "headers": { "x-env": { "exact": "canary" }, "x-trace": {} },
                    "withoutHeaders": { "x-debug": {} },
                    "queryParams": { "v": { "regex": "2|3" } },
                    "sourceNamespace": "web",
                    "port": 8080,
                    "gateways": ["mesh"],
                    "ignoreUriCase": false,
                },
                { "uri": { "exact": "/health" }, "port": 8080 },
                { "uri": { "regex": "/items/[0-9]+" }, "port": 8080 },
            ],
            "route": [{ "destination": { "host": "catalog", "port": { "number": 8080 } } }],
        }],
    }));
    let s = spec(&d);
    assert_eq!(s["port"], 8080);
    assert_eq!(
        s["rules"][0]["match"],
        json!([
            {
                "path": { "prefix": "/api" },
                "method": "GET",
                "headers": {
                    "x-env": { "exact": "canary" },
                    "x-trace": { "present": true },
                    "x-debug": { "present": false },
                },
                "query": { "v": { "regex": "2|3" } },
                "from": ["ns:web"],
            },
            { "path": { "exact": "/health" } },
            { "path": { "regex": "/items/[0-9]+" } },
        ])
    );
}

#[test]
fn a_virtual_service_routes_one_port_or_every_port() {
    let rule =
        |m: Value| json!({ "match": m, "route": [{ "destination": { "host": "catalog" } }] });
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [rule(json!([{ "port": 80 }])), rule(json!([{ "port": 81 }]))],
    }));
    refused(
        &d,
        "spec.http[1].match[0].port",
        "81, while spec.http[0].match[0].port is 80",
    );
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [rule(json!([{ "port": 80 }])), { "route": [{ "destination": { "host": "catalog" } }] }],
    }));
    refused(&d, "spec.http[0].match[0].port", "spec.http[1] has no port");
    // A destination port is the port the request was made to, or refused.
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [{ "route": [{ "destination": { "host": "catalog", "port": { "number": 9090 } } }] }],
    }));
    refused(
        &d,
        "spec.http[0].route[0].destination.port.number",
        "give every match port: 9090",
    );
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [{
            "match": [{ "port": 80 }],
            "route": [{ "destination": { "host": "catalog", "port": { "number": 9090 } } }],
        }],
    }));
    refused(
        &d,
        "spec.http[0].route[0].destination.port.number",
        "here 80",
    );
}

fn retry_rule(retries: Value) -> Value {
    vs(json!({
        "hosts": ["catalog"],
        "http": [{ "route": [{ "destination": { "host": "catalog" } }], "retries": retries }],
    }))
}

#[test]
fn retry_on_maps_envoy_conditions_grpc_statuses_and_codes() {
    let r = &rules(&retry_rule(json!({
        "attempts": 2,
        "retryOn": "gateway-error, connect-failure,reset,retriable-status-codes,cancelled,deadline-exceeded,internal,resource-exhausted,502",
    })))[0]["retries"];
    assert_eq!(
        r["on"],
        json!(["gateway-error", "connect-failure", "reset"])
    );
    assert_eq!(r["statusCodes"], json!([502]));
    assert_eq!(
        r["grpcStatuses"],
        json!([
            "cancelled",
            "deadline-exceeded",
            "internal",
            "resource-exhausted"
        ])
    );
    // Istio's own default when retryOn is left out, not Trellis'.
    let r = &rules(&retry_rule(json!({ "attempts": 1 })))[0]["retries"];
    assert_eq!(r["on"], json!(["connect-failure", "reset"]));
    assert_eq!(r["statusCodes"], json!([503]));
    assert_eq!(r["grpcStatuses"], json!(["unavailable", "cancelled"]));
    // attempts: 0 turns retries off in Istio.
    assert!(
        rules(&retry_rule(json!({ "attempts": 0 })))[0]
            .get("retries")
            .is_none()
    );
    refused(
        &retry_rule(json!({ "attempts": 2, "retryOn": "5xx,retriable-headers" })),
        "spec.http[0].retries.retryOn",
        "\"retriable-headers\" is not supported by Trellis",
    );
    refused(
        &retry_rule(json!({ "attempts": 11 })),
        "spec.http[0].retries.attempts",
        "1 to 10",
    );
    refused(
        &retry_rule(json!({ "attempts": 1, "retryRemoteLocalities": true })),
        "spec.http[0].retries.retryRemoteLocalities",
        "not supported",
    );
}

#[test]
fn faults_mirrors_headers_and_redirects_map() {
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [
            {
                "route": [{ "destination": { "host": "catalog", "subset": "v1" } }],
                "fault": {
                    "delay": { "fixedDelay": "1.5s", "percentage": { "value": 10 } },
                    "abort": { "grpcStatus": "UNAVAILABLE", "percentage": { "value": 0.5 } },
                },
                "mirror": { "host": "catalog-shadow", "subset": "v3" },
                "mirrorPercentage": { "value": 25.0 },
                "headers": {
                    "request": { "set": { "X-Env": "canary" }, "add": { "x-hop": "1" }, "remove": ["X-Debug"] },
                    "response": { "remove": ["server"] },
                },
            },
            {
                "match": [{ "uri": { "exact": "/old" } }],
                "redirect": { "uri": "/new", "authority": "catalog.example", "redirectCode": 308, "scheme": "https", "port": 8443 },
            },
            {
                "route": [{ "destination": { "host": "catalog" } }],
                "fault": { "abort": { "httpStatus": 503 } },
                "mirrors": [{ "destination": { "host": "catalog" }, "percentage": { "value": 5 } }],
            },
        ],
    }));
    let r = rules(&d);
    assert_eq!(
        r[0]["fault"],
        json!({
            "delay": { "fixed": "1s 500ms", "percent": 10.0 },
            "abort": { "grpcStatus": "unavailable", "percent": 0.5 },
        })
    );
    assert_eq!(
        r[0]["mirror"],
        json!({ "service": "catalog-shadow.shop", "subset": "v3", "percent": 25.0 })
    );
    assert_eq!(
        r[0]["requestHeaders"],
        json!({ "set": { "x-env": "canary" }, "add": { "x-hop": "1" }, "remove": ["x-debug"] })
    );
    assert_eq!(r[0]["responseHeaders"], json!({ "remove": ["server"] }));
    assert_eq!(
        r[1]["redirect"],
        json!({ "scheme": "https", "host": "catalog.example", "port": 8443, "path": "/new", "status": 308 })
    );
    assert_eq!(
        r[2]["fault"],
        json!({ "abort": { "status": 503, "percent": 100.0 } })
    );
    assert_eq!(r[2]["mirror"], json!({ "percent": 5.0 }));
    let two = vs(json!({
        "hosts": ["catalog"],
        "http": [{
            "route": [{ "destination": { "host": "catalog" } }],
            "mirrors": [{ "destination": { "host": "a" } }, { "destination": { "host": "b" } }],
        }],
    }));
    refused(&two, "spec.http[0].mirrors", "more than one mirror");
    let redirect_and_route = vs(json!({
        "hosts": ["catalog"],
        "http": [{ "redirect": { "uri": "/x" }, "route": [{ "destination": { "host": "catalog" } }] }],
    }));
    refused(&redirect_and_route, "spec.http[0].redirect", "no route");
}

#[test]
fn a_uri_rewrite_replaces_the_prefix_a_prefix_match_names_else_the_path() {
    let rewrite = |m: Value| {
        vs(json!({
            "hosts": ["catalog"],
            "http": [{
                "name": "v2",
                "match": m,
                "rewrite": { "uri": "/v2", "authority": "catalog-v2" },
                "route": [{ "destination": { "host": "catalog" } }],
            }],
        }))
    };
    let r = rules(&rewrite(
        json!([{ "uri": { "prefix": "/api" } }, { "uri": { "prefix": "/rpc" } }]),
    ));
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0]["rewrite"],
        json!({ "prefix": "/v2", "authority": "catalog-v2" })
    );
    let r = rules(&rewrite(json!([{ "uri": { "exact": "/api" } }])));
    assert_eq!(
        r[0]["rewrite"],
        json!({ "path": "/v2", "authority": "catalog-v2" })
    );
    // Mixed: one rule per run, in order, as Istio rewrites match by match.
    let r = rules(&rewrite(json!([
        { "uri": { "prefix": "/a" } },
        { "uri": { "exact": "/b" } },
        { "uri": { "prefix": "/c" } },
    ])));
    let got: Vec<_> = r
        .iter()
        .map(|x| (x["name"].clone(), x["match"].clone(), x["rewrite"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                json!("v2-1"),
                json!([{ "path": { "prefix": "/a" } }]),
                json!({ "prefix": "/v2", "authority": "catalog-v2" })
            ),
            (
                json!("v2-2"),
                json!([{ "path": { "exact": "/b" } }]),
                json!({ "path": "/v2", "authority": "catalog-v2" })
            ),
            (
                json!("v2-3"),
                json!([{ "path": { "prefix": "/c" } }]),
                json!({ "prefix": "/v2", "authority": "catalog-v2" })
            ),
        ]
    );
    let d = vs(json!({
        "hosts": ["catalog"],
        "http": [{ "rewrite": { "uri": "/v2" }, "route": [{ "destination": { "host": "catalog" } }] }],
    }));
    refused(&d, "spec.http[0].rewrite.uri", "implicit prefix");
    let d =
        rewrite(json!([{ "uri": { "prefix": "/a" } }, { "headers": { "x": { "exact": "1" } } }]));
    refused(&d, "spec.http[0].match[1]", "has no uri");
}

#[test]
fn unsupported_virtual_service_fields_are_refused_by_path() {
    let route = json!([{ "destination": { "host": "catalog" } }]);
    let e = refused(
        &vs(
            json!({ "hosts": ["catalog"], "http": [{ "route": route, "corsPolicy": { "allowOrigins": [] } }] }),
        ),
        "spec.http[0].corsPolicy",
        "not supported by Trellis",
    );
    assert_eq!(
        e,
        "document 1 (VirtualService/catalog): spec.http[0].corsPolicy: not supported by Trellis"
    );
    for (spec, field, words) in [
        (
            json!({ "hosts": ["catalog"], "tcp": [] }),
            "spec.tcp",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "tls": [] }),
            "spec.tls",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "exportTo": ["."], "http": [] }),
            "spec.exportTo",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "gateways": ["shop/ingress"], "http": [] }),
            "spec.gateways[0]",
            "mesh traffic only",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "delegate": { "name": "x" } }] }),
            "spec.http[0].delegate",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "directResponse": { "status": 503 } }] }),
            "spec.http[0].directResponse",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "sourceLabels": { "app": "web" } }], "route": route }] }),
            "spec.http[0].match[0].sourceLabels",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "authority": { "exact": "a" } }], "route": route }] }),
            "spec.http[0].match[0].authority",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "name": "x" }], "route": route }] }),
            "spec.http[0].match[0].name",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "method": { "regex": "GET|PUT" } }], "route": route }] }),
            "spec.http[0].match[0].method.regex",
            "exactly",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "withoutHeaders": { "x": { "exact": "1" } } }], "route": route }] }),
            "spec.http[0].match[0].withoutHeaders.x",
            "negated",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "headers": { ":authority": { "exact": "a" } } }], "route": route }] }),
            "spec.http[0].match[0].headers.:authority",
            "not a header name",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "route": [{ "destination": { "host": "catalog" }, "headers": {} }] }] }),
            "spec.http[0].route[0].headers",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "route": route, "rewrite": { "uriRegexRewrite": { "match": "a" } } }] }),
            "spec.http[0].rewrite.uriRegexRewrite",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "route": route, "fault": { "abort": { "http2Error": "x" } } }] }),
            "spec.http[0].fault.abort.http2Error",
            "not supported",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "route": route, "timeout": "soon" }] }),
            "spec.http[0].timeout",
            "not a duration",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "name": "Canary", "route": route }] }),
            "spec.http[0].name",
            "\"Canary\"",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "match": [{ "uri": { "prefix": "/a" } }] }] }),
            "spec.http[0]",
            "give route",
        ),
        (
            json!({ "hosts": ["catalog"], "http": [{ "name": "a", "route": route }, { "name": "a", "route": route }] }),
            "spec.http[1].name",
            "earlier rule",
        ),
    ] {
        refused(&vs(spec), field, words);
    }
}

// === Istio DestinationRule ===

#[test]
fn a_destination_rule_becomes_a_backend() {
    let d = dr(json!({
        "host": "catalog.shop.svc.cluster.local",
        "subsets": [
            { "name": "v1", "labels": { "version": "v1" } },
            { "name": "v2", "labels": { "version": "v2" } },
        ],
        "trafficPolicy": {
            "loadBalancer": { "consistentHash": { "httpHeaderName": "X-User" } },
            "connectionPool": {
                "tcp": { "maxConnections": 100 },
                "http": { "http2MaxRequests": 1000, "http1MaxPendingRequests": 10 },
            },
            "outlierDetection": {
                "consecutive5xxErrors": 3,
                "consecutiveGatewayErrors": 2,
                "interval": "5s",
                "baseEjectionTime": "1m",
                "maxEjectionPercent": 50,
            },
        },
    }));
    let n = natives(&d);
    assert_eq!((n[0].kind, n[0].name.as_str()), ("Backend", "catalog"));
    assert_eq!(
        n[0].spec,
        json!({
            "service": "catalog.shop",
            "subsets": [
                { "name": "v1", "labels": { "version": "v1" } },
                { "name": "v2", "labels": { "version": "v2" } },
            ],
            "loadBalancer": { "policy": "consistentHash", "hashHeader": "x-user" },
            "connectionPool": { "maxRequests": 1000, "maxPendingRequests": 10, "maxConnections": 100 },
            "outlierDetection": {
                "consecutive5xx": 3,
                "consecutiveGatewayErrors": 2,
                "interval": "5s",
                "baseEjectionTime": "1m",
                "maxEjectionPercent": 50.0,
            },
        })
    );
    for (simple, policy) in [
        ("ROUND_ROBIN", "roundRobin"),
        ("LEAST_REQUEST", "p2c"),
        ("LEAST_CONN", "p2c"),
        ("RANDOM", "p2c"),
        ("UNSPECIFIED", "p2c"),
    ] {
        let d = dr(
            json!({ "host": "catalog", "trafficPolicy": { "loadBalancer": { "simple": simple } } }),
        );
        assert_eq!(
            spec(&d)["loadBalancer"],
            json!({ "policy": policy }),
            "{simple}"
        );
    }
    // Istio's outlier defaults, whatever Trellis' are.
    let d = dr(json!({ "host": "catalog", "trafficPolicy": { "outlierDetection": {} } }));
    assert_eq!(
        spec(&d)["outlierDetection"],
        json!({ "consecutive5xx": 5, "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 10.0 })
    );
}

#[test]
fn unsupported_destination_rule_fields_are_refused_by_path() {
    for (spec, field, words) in [
        (
            json!({ "host": "catalog", "exportTo": ["."] }),
            "spec.exportTo",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "workloadSelector": {} }),
            "spec.workloadSelector",
            "not supported",
        ),
        (json!({ "host": "*.shop" }), "spec.host", "wildcard"),
        (
            json!({ "host": "catalog", "subsets": [{ "name": "v1", "labels": { "v": "1" }, "trafficPolicy": {} }] }),
            "spec.subsets[0].trafficPolicy",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "subsets": [{ "name": "v1" }] }),
            "spec.subsets[0].labels",
            "at least one label",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "tls": { "mode": "ISTIO_MUTUAL" } } }),
            "spec.trafficPolicy.tls",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "portLevelSettings": [] } }),
            "spec.trafficPolicy.portLevelSettings",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "loadBalancer": { "localityLbSetting": { "failoverPriority": ["topology.kubernetes.io/zone"] } } } }),
            "spec.trafficPolicy.loadBalancer.localityLbSetting",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "loadBalancer": { "consistentHash": { "useSourceIp": true } } } }),
            "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "loadBalancer": { "simple": "PASSTHROUGH" } } }),
            "spec.trafficPolicy.loadBalancer.simple",
            "PASSTHROUGH",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "connectionPool": { "http": { "maxRetries": 3 } } } }),
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "connectionPool": { "tcp": { "connectTimeout": "1s" } } } }),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "not supported",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "connectionPool": { "http": { "http1MaxPendingRequests": 5 } } } }),
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "http2MaxRequests",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "outlierDetection": { "consecutive5xxErrors": 0 } } }),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            "give 1 or more",
        ),
        (
            json!({ "host": "catalog", "trafficPolicy": { "outlierDetection": { "minHealthPercent": 50 } } }),
            "spec.trafficPolicy.outlierDetection.minHealthPercent",
            "not supported",
        ),
    ] {
        refused(&dr(spec), field, words);
    }
}

// === Gateway API HTTPRoute ===

fn parent() -> Value {
    json!([{ "group": "", "kind": "Service", "name": "catalog", "port": 8080 }])
}

fn backend(name: &str, weight: u32) -> Value {
    json!({ "name": name, "port": 8080, "weight": weight })
}

#[test]
fn an_http_route_becomes_a_route_for_its_service_parent() {
    let d = http(json!({
        "parentRefs": parent(),
        "rules": [
            {
                "name": "chrome",
                "matches": [{ "headers": [{ "type": "RegularExpression", "name": "User-Agent", "value": ".*Chrome.*" }] }],
                "backendRefs": [{ "name": "catalog-v2", "port": 8080 }],
            },
            {
                "backendRefs": [backend("catalog-v1", 90), backend("catalog-v2", 10), backend("catalog", 0)],
                "timeouts": { "request": "2s", "backendRequest": "2000ms" },
            },
        ],
    }));
    let n = natives(&d);
    assert_eq!((n[0].kind, n[0].name.as_str()), ("Route", "catalog"));
    assert_eq!(
        n[0].spec,
        json!({
            "service": "catalog.shop",
            "port": 8080,
            "rules": [
                {
                    "name": "chrome",
                    "match": [{ "headers": { "user-agent": { "regex": ".*Chrome.*" } } }],
                    "backends": [{ "service": "catalog-v2.shop", "weight": 1 }],
                },
                {
                    "backends": [
                        { "service": "catalog-v1.shop", "weight": 90 },
                        { "service": "catalog-v2.shop", "weight": 10 },
                        { "weight": 0 },
                    ],
                    "timeout": "2s",
                },
            ],
        })
    );
}

#[test]
fn http_route_matches_map_field_by_field() {
    let with_match = |m: Value| {
        http(json!({
            "parentRefs": parent(),
            "rules": [{ "matches": [m], "backendRefs": [backend("catalog", 1)] }],
        }))
    };
    let d = with_match(json!({
        "path": { "type": "RegularExpression", "value": "(/a|/b)/[0-9]+" },
        "method": "POST",
        "headers": [{ "name": "X-Env", "value": "canary" }],
        "queryParams": [
            { "name": "Debug", "value": "1" },
            { "type": "RegularExpression", "name": "v", "value": "2|3" },
        ],
    }));
    assert_eq!(
        rules(&d)[0]["match"],
        json!([{
            "path": { "regex": "(/a|/b)/[0-9]+" },
            "method": "POST",
            "headers": { "x-env": { "exact": "canary" } },
            "query": { "Debug": { "exact": "1" }, "v": { "regex": "2|3" } },
        }])
    );
    let twice =
        json!({ "headers": [{ "name": "X-A", "value": "1" }, { "name": "x-a", "value": "2" }] });
    refused(
        &with_match(twice),
        "spec.rules[0].matches[0].headers[1]",
        "earlier entry",
    );
    refused(
        &with_match(json!({ "method": "get" })),
        "spec.rules[0].matches[0].method",
        "capitals",
    );
    refused(
        &with_match(json!({ "path": { "type": "Exact", "value": "api" } })),
        "spec.rules[0].matches[0].path.value",
        "must start with '/'",
    );
}

#[test]
fn http_route_matches_are_ordered_by_gateway_api_precedence() {
    let rule = |name: &str, matches: Value| json!({ "name": name, "matches": matches, "backendRefs": [backend("catalog", 1)] });
    let d = http(json!({
        "parentRefs": parent(),
        "rules": [
            { "name": "all", "backendRefs": [backend("catalog", 1)] },
            rule("api", json!([{ "path": { "type": "PathPrefix", "value": "/api" } }])),
            rule("mixed", json!([
                { "path": { "type": "PathPrefix", "value": "/api/v2" } },
                { "path": { "type": "Exact", "value": "/login" } },
            ])),
            rule("api-get", json!([{ "path": { "value": "/api" }, "method": "GET" }])),
            rule("api-hdr", json!([{
                "path": { "value": "/api" },
                "method": "GET",
                "headers": [{ "name": "x-a", "value": "1" }],
            }])),
            rule("api-q", json!([{
                "path": { "value": "/api" },
                "method": "GET",
                "headers": [{ "name": "x-b", "value": "1" }],
                "queryParams": [{ "name": "v", "value": "2" }],
            }])),
            rule("re", json!([{ "path": { "type": "RegularExpression", "value": "/x/[0-9]+" } }])),
            rule("login", json!([{ "path": { "type": "Exact", "value": "/login" } }])),
        ],
    }));
    let r = rules(&d);
    let names: Vec<_> = r.iter().map(|x| x["name"].as_str().unwrap()).collect();
    // Exact first (the earlier rule on a tie), then the regular
    // expression, then the longer prefix, then method, headers, query;
    // the match-all rule last although written first.
    assert_eq!(
        names,
        [
            "mixed-1", "login", "re", "mixed-2", "api-q", "api-hdr", "api-get", "api", "all"
        ]
    );
    assert_eq!(r[0]["match"], json!([{ "path": { "exact": "/login" } }]));
    assert_eq!(r[3]["match"], json!([{ "path": { "prefix": "/api/v2" } }]));
    // The default match matches everything: no native match at all.
    assert!(r[8].get("match").is_none(), "{}", r[8]);
    // Matches of one rule that stay together stay one rule.
    let d = http(json!({
        "parentRefs": parent(),
        "rules": [rule("both", json!([{ "path": { "value": "/a" } }, { "path": { "value": "/b" } }]))],
    }));
    let r = rules(&d);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["name"], "both");
}

#[test]
fn http_route_filters_map() {
    let d = http(json!({
        "parentRefs": parent(),
        "rules": [
            {
                "matches": [{ "path": { "type": "PathPrefix", "value": "/api" } }],
                "filters": [
                    { "type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{ "name": "X-Env", "value": "canary" }],
                        "add": [{ "name": "x-hop", "value": "1" }],
                        "remove": ["X-Debug"],
                    } },
                    { "type": "ResponseHeaderModifier", "responseHeaderModifier": { "remove": ["server"] } },
                    { "type": "URLRewrite", "urlRewrite": {
                        "hostname": "catalog-v2",
                        "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2" },
                    } },
                    { "type": "RequestMirror", "requestMirror": {
                        "backendRef": { "name": "catalog-shadow", "port": 8080 },
                        "fraction": { "numerator": 1, "denominator": 4 },
                    } },
                ],
                "backendRefs": [backend("catalog", 1)],
            },
            {
                "matches": [{ "path": { "type": "Exact", "value": "/old" } }],
                "filters": [{ "type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https",
                    "hostname": "catalog.example",
                    "path": { "type": "ReplaceFullPath", "replaceFullPath": "/new" },
                } }],
            },
            {
                "matches": [{ "path": { "type": "Exact", "value": "/x" } }],
                "filters": [{ "type": "URLRewrite", "urlRewrite": {
                    "path": { "type": "ReplaceFullPath", "replaceFullPath": "/y" },
                } }],
                "backendRefs": [backend("catalog", 1)],
            },
        ],
    }));
    let r = rules(&d);
    let api = r
        .iter()
        .find(|x| x["match"][0]["path"]["prefix"] == "/api")
        .unwrap();
    assert_eq!(
        api["requestHeaders"],
        json!({ "set": { "x-env": "canary" }, "add": { "x-hop": "1" }, "remove": ["x-debug"] })
    );
    assert_eq!(api["responseHeaders"], json!({ "remove": ["server"] }));
    assert_eq!(
        api["rewrite"],
        json!({ "prefix": "/v2", "authority": "catalog-v2" })
    );
    assert_eq!(
        api["mirror"],
        json!({ "service": "catalog-shadow.shop", "percent": 25.0 })
    );
    let old = r
        .iter()
        .find(|x| x["match"][0]["path"]["exact"] == "/old")
        .unwrap();
    // The Gateway API's 302, and the new scheme's well-known port.
    assert_eq!(
        old["redirect"],
        json!({ "scheme": "https", "host": "catalog.example", "port": 443, "path": "/new", "status": 302 })
    );
    assert!(old.get("backends").is_none());
    let x = r
        .iter()
        .find(|x| x["match"][0]["path"]["exact"] == "/x")
        .unwrap();
    assert_eq!(x["rewrite"], json!({ "path": "/y" }));
    // A prefix rewrite keeps the default prefix "/" it replaces.
    let d = http(json!({
        "parentRefs": parent(),
        "rules": [{
            "filters": [{ "type": "URLRewrite", "urlRewrite": {
                "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2" },
            } }],
            "backendRefs": [backend("catalog", 1)],
        }],
    }));
    assert_eq!(
        rules(&d)[0]["match"],
        json!([{ "path": { "prefix": "/" } }])
    );
}

#[test]
fn several_parents_become_several_routes() {
    let d = http(json!({
        "parentRefs": [
            { "group": "", "kind": "Service", "name": "catalog", "port": 8080 },
            { "group": "core", "kind": "Service", "name": "catalog-beta", "namespace": "beta", "port": 8080 },
        ],
        "rules": [{ "backendRefs": [backend("catalog", 1)] }],
    }));
    let n = natives(&d);
    let names: Vec<_> = n.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "catalog.catalog.shop.8080",
            "catalog.catalog-beta.beta.8080"
        ]
    );
    assert_eq!(n[1].spec["service"], "catalog-beta.beta");
    assert_eq!(
        n[1].spec["rules"][0]["backends"],
        json!([{ "service": "catalog.shop", "weight": 1 }])
    );
}

#[test]
fn unsupported_http_route_fields_are_refused_by_path() {
    let b = json!([backend("catalog", 1)]);
    let gateway = json!([{ "name": "ingress" }]);
    let no_port = json!([{ "group": "", "kind": "Service", "name": "catalog" }]);
    let no_group = json!([{ "kind": "Service", "name": "catalog", "port": 8080 }]);
    let section =
        json!([{ "group": "", "kind": "Service", "name": "catalog", "sectionName": "http" }]);
    for (spec, field, words) in [
        (
            json!({ "parentRefs": gateway, "rules": [{ "backendRefs": b }] }),
            "spec.parentRefs[0]",
            "not ingress",
        ),
        (
            json!({ "parentRefs": no_group, "rules": [{ "backendRefs": b }] }),
            "spec.parentRefs[0].group",
            "group \"\"",
        ),
        (
            json!({ "parentRefs": section, "rules": [{ "backendRefs": b }] }),
            "spec.parentRefs[0].sectionName",
            "not supported",
        ),
        (
            json!({ "parentRefs": no_port, "rules": [{ "backendRefs": b }] }),
            "spec.rules[0].backendRefs[0].port",
            "give the parentRef port: 8080",
        ),
        (
            json!({ "parentRefs": parent(), "hostnames": ["catalog.example"], "rules": [{ "backendRefs": b }] }),
            "spec.hostnames",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "name": "catalog", "port": 9090 }] }] }),
            "spec.rules[0].backendRefs[0].port",
            "here 8080",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "name": "catalog" }] }] }),
            "spec.rules[0].backendRefs[0].port",
            "missing",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "kind": "ServiceImport", "name": "catalog", "port": 8080 }] }] }),
            "spec.rules[0].backendRefs[0].kind",
            "ServiceImport",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [{ "name": "catalog", "port": 8080, "filters": [] }] }] }),
            "spec.rules[0].backendRefs[0].filters",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "matches": [{ "path": { "value": "/a" } }] }] }),
            "spec.rules[0].backendRefs",
            "missing",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "retry": { "attempts": 2 } }] }),
            "spec.rules[0].retry",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "sessionPersistence": {} }] }),
            "spec.rules[0].sessionPersistence",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "timeouts": { "request": "2s", "backendRequest": "1s" } }] }),
            "spec.rules[0].timeouts.backendRequest",
            "unless equal",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "filters": [{ "type": "ExtensionRef", "extensionRef": {} }] }] }),
            "spec.rules[0].filters[0].extensionRef",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "filters": [{ "type": "CORS" }] }] }),
            "spec.rules[0].filters[0].type",
            "\"CORS\" is not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "filters": [{ "type": "RequestRedirect", "requestRedirect": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/b" } } }] }] }),
            "spec.rules[0].filters[0].requestRedirect.path.replacePrefixMatch",
            "whole path",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "filters": [{ "type": "RequestRedirect", "requestRedirect": {} }] }] }),
            "spec.rules[0].backendRefs",
            "no backendRefs",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "matches": [{ "path": { "type": "Exact", "value": "/a" } }], "backendRefs": b, "filters": [{ "type": "URLRewrite", "urlRewrite": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/b" } } }] }] }),
            "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
            "PathPrefix",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": b, "filters": [
            { "type": "RequestMirror", "requestMirror": { "backendRef": { "name": "a", "port": 8080 } } },
            { "type": "RequestMirror", "requestMirror": { "backendRef": { "name": "b", "port": 8080 } } },
        ] }] }),
            "spec.rules[0].filters[1].type",
            "one RequestMirror",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [backend("a", 0)] }] }),
            "spec.rules[0].backendRefs",
            "add up to 0",
        ),
    ] {
        refused(&http(spec), field, words);
    }
}

// === Gateway API GRPCRoute ===

#[test]
fn a_grpc_route_matches_methods_as_paths() {
    let rule = |name: &str, method: Value| json!({ "name": name, "matches": [{ "method": method }], "backendRefs": [backend("catalog", 1)] });
    let d = grpc(json!({
        "parentRefs": parent(),
        "rules": [
            { "name": "all", "backendRefs": [backend("catalog-v1", 1)] },
            rule("svc", json!({ "service": "shop.Catalog" })),
            rule("get", json!({ "service": "shop.Catalog", "method": "Get" })),
            rule("any-get", json!({ "method": "Get" })),
            rule("re", json!({ "type": "RegularExpression", "service": "shop\\..*", "method": "List|Get" })),
            {
                "name": "hdr",
                "matches": [{ "headers": [{ "name": "X-Canary", "value": "1" }] }],
                "filters": [{ "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x-via", "value": "grpc" }] } }],
                "backendRefs": [backend("catalog-v2", 1)],
            },
        ],
    }));
    let r = rules(&d);
    let got: Vec<_> = r
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["match"].clone()))
        .collect();
    // The longer service first, then the longer method, then headers.
    assert_eq!(
        got,
        [
            ("get", json!([{ "path": { "exact": "/shop.Catalog/Get" } }])),
            ("svc", json!([{ "path": { "prefix": "/shop.Catalog/" } }])),
            (
                "re",
                json!([{ "path": { "regex": "/(?:shop\\..*)/(?:List|Get)" } }])
            ),
            ("any-get", json!([{ "path": { "regex": "/[^/]+/Get" } }])),
            (
                "hdr",
                json!([{ "headers": { "x-canary": { "exact": "1" } } }])
            ),
            ("all", Value::Null),
        ]
    );
    assert_eq!(
        r[4]["requestHeaders"],
        json!({ "set": { "x-via": "grpc" } })
    );
    for (spec, field, words) in [
        (
            json!({ "parentRefs": parent(), "rules": [rule("x", json!({}))] }),
            "spec.rules[0].matches[0].method",
            "give service, method or both",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [rule("x", json!({ "service": "a/b" }))] }),
            "spec.rules[0].matches[0].method.service",
            "not a gRPC service name",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [backend("catalog", 1)], "timeouts": { "request": "1s" } }] }),
            "spec.rules[0].timeouts",
            "not supported",
        ),
        (
            json!({ "parentRefs": parent(), "rules": [{ "backendRefs": [backend("catalog", 1)], "filters": [{ "type": "URLRewrite", "urlRewrite": {} }] }] }),
            "spec.rules[0].filters[0].urlRewrite",
            "not supported",
        ),
    ] {
        refused(&grpc(spec), field, words);
    }
}

// === the envelope ===

#[test]
fn the_envelope_is_checked_and_other_kinds_are_refused() {
    assert!(!is_foreign(
        &json!({ "kind": "Route", "metadata": { "name": "a" }, "spec": {} })
    ));
    assert!(!is_foreign(
        &json!({ "apiVersion": "trellis/v1", "kind": "Route" })
    ));
    assert!(is_foreign(
        &json!({ "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy" })
    ));
    let e = refused(
        &doc("security.istio.io/v1", "AuthorizationPolicy", json!({})),
        "kind",
        "not supported by Trellis",
    );
    assert!(
        e.starts_with("document 1 (AuthorizationPolicy/catalog): kind: "),
        "{e}"
    );
    refused(
        &doc("gateway.networking.k8s.io/v1", "Gateway", json!({})),
        "kind",
        "HTTPRoute and GRPCRoute",
    );
    refused(
        &doc("networking.istio.io/v2", "VirtualService", json!({})),
        "apiVersion",
        "v1, /v1beta1, /v1alpha3",
    );
    let mut d = canary_vs();
    d["extra"] = json!(1);
    refused(&d, "extra", "not supported");
    // Bookkeeping in metadata and a status are no routing.
    let mut d = canary_vs();
    d["metadata"]["labels"] = json!({ "app": "catalog" });
    d["metadata"]["resourceVersion"] = json!("12");
    d["status"] = json!({});
    spec(&d);
    let mut d = canary_vs();
    d["metadata"]["name"] = json!("Catalog");
    refused(&d, "metadata.name", "\"Catalog\"");
}

#[test]
fn go_durations_parse() {
    for (s, want) in [
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("500ms", Duration::from_millis(500)),
        ("1.5s", Duration::from_millis(1500)),
        ("1h30m", Duration::from_secs(5400)),
        ("2m3s", Duration::from_secs(123)),
        ("10us", Duration::from_micros(10)),
        (".5s", Duration::from_millis(500)),
    ] {
        assert_eq!(parse_go_duration(s), Ok(want), "{s}");
    }
    for s in ["", "5", "1d", "-1s", "1.s5", "s"] {
        assert!(parse_go_duration(s).is_err(), "{s}");
    }
}

// === through `policy apply -f` ===

#[test]
fn translated_documents_go_through_parse_policies() {
    let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: catalog, namespace: shop}\nspec: {host: catalog}\n---\nkind: Route\nmetadata: {name: other}\nspec: {x: 1}\n";
    let docs = crate::cli::ops::parse_policies(text).unwrap();
    let keys: Vec<_> = docs
        .iter()
        .map(|d| {
            d.key
                .as_ref()
                .map(|k| format!("{}/{}", k.kind, k.name))
                .unwrap()
        })
        .collect();
    assert_eq!(keys, ["Backend/catalog", "Route/other"]);
    // A translated document may not make a policy another one makes.
    let text = "kind: Backend\nmetadata: {name: catalog}\nspec: {}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: catalog}\nspec: {host: catalog}\n";
    let e = crate::cli::ops::parse_policies(text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("document 2: Backend/catalog is made by document 1 too"),
        "{e}"
    );
    let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: c}\nspec: {parentRefs: [{name: gw}], rules: []}\n";
    let e = crate::cli::ops::parse_policies(text)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("document 1 (HTTPRoute/c): spec.parentRefs[0]: "),
        "{e}"
    );
}

/// The house rule: every example config is loaded by a test. Each file of
/// configs/policy goes through `policy apply -f`'s reader, and every spec
/// it yields through the store's parser.
#[test]
fn the_example_policy_files_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/policy");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let docs =
            crate::cli::ops::parse_policies(&text).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let mut keys = Vec::new();
        for d in &docs {
            let k = d.key.as_ref().unwrap();
            let spec: Value = serde_json::from_str(&d.spec_json).unwrap();
            policy::parse(&k.kind, &k.name, &spec).unwrap_or_else(|e| panic!("{file}: {e}"));
            keys.push(format!("{}/{}", k.kind, k.name));
        }
        seen.push((file, keys));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "httproute-canary.yaml".to_owned(),
                vec!["Route/catalog".to_owned()]
            ),
            (
                "istio-canary.yaml".to_owned(),
                vec!["Route/catalog".to_owned(), "Backend/catalog".to_owned()]
            ),
        ]
    );
    // Both canaries send Chrome to v2 first and split the rest 90/10.
    for (file, chrome, v1, v2) in [
        (
            "istio-canary.yaml",
            json!({ "subset": "v2", "weight": 1 }),
            json!({ "subset": "v1", "weight": 90 }),
            json!({ "subset": "v2", "weight": 10 }),
        ),
        (
            "httproute-canary.yaml",
            json!({ "service": "catalog-v2.shop", "weight": 1 }),
            json!({ "service": "catalog-v1.shop", "weight": 90 }),
            json!({ "service": "catalog-v2.shop", "weight": 10 }),
        ),
    ] {
        let docs =
            crate::cli::ops::parse_policies(&std::fs::read_to_string(dir.join(file)).unwrap())
                .unwrap();
        let route: Value = serde_json::from_str(&docs[0].spec_json).unwrap();
        assert_eq!(route["service"], "catalog.shop", "{file}");
        assert_eq!(
            route["rules"][0]["match"][0]["headers"]["user-agent"]["regex"], ".*Chrome.*",
            "{file}"
        );
        assert_eq!(route["rules"][0]["backends"], json!([chrome]), "{file}");
        assert_eq!(route["rules"][1]["backends"], json!([v1, v2]), "{file}");
    }
}
