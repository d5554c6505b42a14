//! The page: server-rendered HTML, one fragment per section, so the first
//! load and every refresh (which swaps fragments in from `/api/sections`)
//! come from the same code. Every string from the store, a proxy or an
//! admin port goes through [`esc`]: names, reasons and audit details are
//! written by other parties.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::collect::{Part, Snapshot};
use super::graph;

/// The sections in page order: (id, title).
pub(crate) const SECTIONS: [(&str, &str); 7] = [
    ("zones", "Zones and servers"),
    ("gateways", "Gateways and links"),
    ("graph", "Service graph"),
    ("services", "Services and endpoints"),
    ("proxies", "Proxies"),
    ("policies", "Policies"),
    ("audit", "Audit log"),
];

/// Seconds between refreshes of the page's sections: a failed health check
/// shows within two (the agents check every second in `trellis dev`).
pub(crate) const REFRESH_SECONDS: u64 = 1;

/// HTML-escapes text for element content and quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Unix milliseconds as RFC 3339 UTC, to the second.
pub(crate) fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Each section's HTML fragment, in page order.
pub(crate) fn sections(s: &Snapshot) -> Vec<(&'static str, String)> {
    SECTIONS
        .iter()
        .map(|(id, _)| {
            let body = match *id {
                "zones" => zones(s),
                "gateways" => part(&s.gateways, |g| gateways(g)),
                "graph" => graph::render(
                    &s.graph.zones,
                    &s.graph.nodes,
                    &s.graph.edges,
                    s.graph.note.as_deref(),
                ),
                "services" => part(&s.services, |v| services(v)),
                "proxies" => part(&s.proxies, proxies),
                "policies" => part(&s.policies, |p| policies(p)),
                _ => part(&s.audit, |a| audit(a)),
            };
            (*id, body)
        })
        .collect()
}

/// The whole page. `nonce` admits the one inline script under the page's
/// Content-Security-Policy.
pub(crate) fn page(s: &Snapshot, nonce: &str) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Trellis dashboard</title><style>{CSS}</style></head><body><header><h1>Trellis</h1><nav>"#
    );
    for (id, title) in SECTIONS {
        let _ = write!(out, "<a href=\"#s-{id}\">{title}</a>");
    }
    let _ = write!(
        out,
        r#"</nav><span id="updated">read {}</span></header><main>"#,
        time(s.taken_ms)
    );
    for ((id, title), (_, body)) in SECTIONS.iter().zip(sections(s)) {
        let _ = write!(
            out,
            r#"<section id="s-{id}"><h2>{title}</h2><div class="body" id="b-{id}">{body}</div></section>"#
        );
    }
    let _ = write!(
        out,
        r#"</main><footer>read-only; refreshes every {REFRESH_SECONDS} s</footer><script nonce="{nonce}">{}</script></body></html>"#,
        SCRIPT.replace("REFRESH_MS", &(REFRESH_SECONDS * 1000).to_string())
    );
    out
}

fn part<T>(p: &Part<T>, f: impl FnOnce(&T) -> String) -> String {
    match p {
        Part::Ok(v) => f(v),
        Part::Error(e) => format!(r#"<p class="bad">unavailable: {}</p>"#, esc(e)),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "—".into(), |v| v.to_string())
}

fn zones(s: &Snapshot) -> String {
    let mut out = String::new();
    let servers = match &s.cluster {
        Part::Ok(c) => {
            let _ = write!(
                out,
                r#"<p class="summary">leader <b id="leader">{}</b> (Raft id {}), term {}, commit {}</p>"#,
                if c.leader_name.is_empty() {
                    "none".to_owned()
                } else {
                    esc(&c.leader_name)
                },
                c.leader,
                c.term,
                c.commit
            );
            Some(&c.servers)
        }
        Part::Error(e) => {
            let _ = write!(out, r#"<p class="bad">cluster: {}</p>"#, esc(e));
            None
        }
    };
    match &s.zones {
        Part::Ok(zs) => {
            out.push_str("<table><thead><tr><th>zone</th><th>role</th><th>servers</th><th>gateways</th></tr></thead><tbody>");
            for z in zs {
                let names: Vec<String> = servers
                    .into_iter()
                    .flatten()
                    .filter(|m| m.zone == z.name)
                    .map(|m| {
                        let lead = if m.leader { " ★" } else { "" };
                        format!("{} ({}){lead}", esc(&m.name), esc(&m.role))
                    })
                    .collect();
                let gws: Vec<String> = z.gateways.iter().map(|g| esc(g)).collect();
                let _ = write!(
                    out,
                    r#"<tr data-zone="{n}"><td>{n}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                    esc(&z.role),
                    or_none(names.join(", ")),
                    or_none(gws.join(", ")),
                    n = esc(&z.name),
                );
            }
            out.push_str("</tbody></table>");
        }
        Part::Error(e) => {
            let _ = write!(out, r#"<p class="bad">zones: {}</p>"#, esc(e));
        }
    }
    if let Some(servers) = servers {
        out.push_str("<table><thead><tr><th>server</th><th>address</th><th>role</th><th>term</th><th>commit</th><th>applied</th><th>lag</th><th>state</th></tr></thead><tbody>");
        for m in servers {
            let state = match &m.error {
                Some(e) => format!(r#"<span class="bad">no answer: {}</span>"#, esc(e)),
                None if m.lag == Some(0) => r#"<span class="ok">caught up</span>"#.into(),
                None => r#"<span class="warn">applying</span>"#.into(),
            };
            let _ = write!(
                out,
                r#"<tr data-server="{}"><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td></tr>"#,
                esc(&m.name),
                esc(&m.name),
                esc(&m.address),
                esc(&m.role),
                if m.leader { " (leader)" } else { "" },
                opt(m.term),
                opt(m.commit),
                opt(m.applied),
                opt(m.lag),
            );
        }
        out.push_str("</tbody></table>");
    }
    out
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        r#"<span class="dim">none</span>"#.into()
    } else {
        s
    }
}

fn gateways(gs: &[super::collect::Gateway]) -> String {
    if gs.is_empty() {
        return r#"<p class="dim">no gateway is registered</p>"#.into();
    }
    let mut out = String::from(
        "<table><thead><tr><th>gateway</th><th>tunnel address</th><th>zone address</th><th>health</th><th>links to (store)</th><th>link state (admin /links)</th></tr></thead><tbody>",
    );
    for g in gs {
        let links = match &g.links {
            Part::Ok(v) => json(v),
            Part::Error(e) => format!(r#"<span class="dim">{}</span>"#, esc(e)),
        };
        let peers: Vec<String> = g.peer_zones.iter().map(|z| esc(z)).collect();
        let _ = write!(
            out,
            r#"<tr data-gateway="{z}/{n}"><td>{z}/{n}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{links}</td></tr>"#,
            esc(&g.address),
            or_none(esc(&g.zone_address)),
            health(g.healthy),
            or_none(peers.join(", ")),
            z = esc(&g.zone),
            n = esc(&g.name),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn health(ok: bool) -> &'static str {
    if ok {
        r#"<span class="ok">healthy</span>"#
    } else {
        r#"<span class="bad">unhealthy</span>"#
    }
}

/// An admin answer of unknown shape: a list of objects (or an object
/// holding one under `links`) as a table, anything else as JSON text.
fn json(v: &serde_json::Value) -> String {
    let list = v
        .as_array()
        .or_else(|| v.get("links").and_then(|l| l.as_array()));
    let rows: Option<Vec<&serde_json::Map<String, serde_json::Value>>> =
        list.and_then(|l| l.iter().map(|r| r.as_object()).collect());
    let Some(rows) = rows.filter(|r| !r.is_empty()) else {
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        return format!("<pre>{}</pre>", esc(&text));
    };
    let mut keys: Vec<&String> = Vec::new();
    for r in &rows {
        for k in r.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut out = String::from(r#"<table class="inner"><tr>"#);
    for k in &keys {
        let _ = write!(out, "<th>{}</th>", esc(k));
    }
    out.push_str("</tr>");
    for r in rows {
        out.push_str("<tr>");
        for k in &keys {
            let cell = match r.get(*k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let _ = write!(out, "<td>{}</td>", esc(&cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

fn services(svcs: &[super::collect::Service]) -> String {
    if svcs.is_empty() {
        return r#"<p class="dim">no service is registered</p>"#.into();
    }
    let mut out = String::from(
        "<table><thead><tr><th>zone</th><th>endpoint</th><th>address</th><th>ports</th><th>protocol</th><th>labels</th><th>health</th><th>lease until</th></tr></thead>",
    );
    for s in svcs {
        let healthy = s.endpoints.iter().filter(|e| e.healthy).count();
        let mut zones: Vec<&str> = s.endpoints.iter().map(|e| e.zone.as_str()).collect();
        zones.dedup();
        let _ = write!(
            out,
            r#"<tbody data-service="{n}" data-endpoints="{}" data-healthy="{healthy}"><tr class="svc"><th colspan="8">{n} <span class="dim">— {} endpoint(s), {healthy} healthy, in {}</span></th></tr>"#,
            s.endpoints.len(),
            s.endpoints.len(),
            esc(&zones.join(", ")),
            n = esc(&s.name),
        );
        for e in &s.endpoints {
            let ports: Vec<String> = e.ports.iter().map(u32::to_string).collect();
            let labels: Vec<String> = e
                .labels
                .iter()
                .filter(|(k, _)| !k.starts_with("trellis."))
                .map(|(k, v)| esc(&format!("{k}={v}")))
                .collect();
            let lease = if e.lease_expires_ms == 0 {
                "no lease".into()
            } else {
                time(e.lease_expires_ms)
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{lease}</td></tr>",
                esc(&e.zone),
                esc(&e.id),
                esc(&e.address),
                ports.join(","),
                esc(&e.protocol),
                labels.join(" "),
                health(e.healthy),
            );
        }
        out.push_str("</tbody>");
    }
    out.push_str("</table>");
    out
}

fn proxies(p: &super::collect::Proxies) -> String {
    let synced = p
        .proxies
        .iter()
        .filter(|x| x.drift == 0 && x.rejected.is_empty())
        .count();
    let rejecting = p.proxies.iter().filter(|x| !x.rejected.is_empty()).count();
    let mut out = format!(
        r#"<p class="summary">store revision <b id="revision">{}</b> · {} proxies · {synced} in sync · {rejecting} rejecting</p>"#,
        p.revision,
        p.proxies.len()
    );
    out.push_str("<table><thead><tr><th>proxy</th><th>kind</th><th>zone</th><th>applied revision</th><th>drift</th><th>state</th></tr></thead><tbody>");
    for x in &p.proxies {
        let state = if !x.rejected.is_empty() {
            format!(r#"<span class="bad">rejected: {}</span>"#, esc(&x.rejected))
        } else if x.drift == 0 {
            r#"<span class="ok">in sync</span>"#.into()
        } else {
            r#"<span class="warn">behind</span>"#.into()
        };
        let _ = write!(
            out,
            r#"<tr data-proxy="{id}" data-drift="{}"><td>{} <span class="dim">{id}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td></tr>"#,
            x.drift,
            esc(&x.name),
            esc(&x.kind),
            esc(&x.zone),
            x.revision,
            x.drift,
            id = esc(&x.id),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn policies(ps: &[super::collect::Policy]) -> String {
    if ps.is_empty() {
        return r#"<p class="dim">no policy is applied</p>"#.into();
    }
    let mut out = String::from(
        "<table><thead><tr><th>kind</th><th>name</th><th>rejected by</th><th>spec</th></tr></thead><tbody>",
    );
    for p in ps {
        let rejected = if p.rejected_by.is_empty() {
            r#"<span class="ok">no proxy</span>"#.to_owned()
        } else {
            let list: Vec<String> = p
                .rejected_by
                .iter()
                .map(|r| {
                    format!(
                        r#"<li class="bad">{}: {}</li>"#,
                        esc(&r.proxy),
                        esc(&r.reason)
                    )
                })
                .collect();
            format!("<ul>{}</ul>", list.concat())
        };
        let _ = write!(
            out,
            r#"<tr data-policy="{k}/{n}"><td>{k}</td><td>{n}</td><td>{rejected}</td><td><details><summary>spec</summary><pre>{}</pre></details></td></tr>"#,
            esc(&p.spec),
            k = esc(&p.kind),
            n = esc(&p.name),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn audit(entries: &[super::collect::Audit]) -> String {
    if entries.is_empty() {
        return r#"<p class="dim">no entries</p>"#.into();
    }
    let mut out = String::from(
        r#"<p class="summary">newest first</p><table><thead><tr><th>seq</th><th>time</th><th>by</th><th>action</th><th>detail</th></tr></thead><tbody>"#,
    );
    for a in entries {
        let _ = write!(
            out,
            r#"<tr data-seq="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            a.seq,
            a.seq,
            time(a.time_ms),
            esc(&a.by),
            esc(&a.action),
            esc(&a.detail),
        );
    }
    out.push_str("</tbody></table>");
    out
}

const CSS: &str = r#"
:root{--fg:#1d2330;--dim:#6b7280;--line:#d9dee7;--ok:#137333;--warn:#a15c00;--bad:#b3261e;--bg:#f7f8fa;--card:#fff;--accent:#2f5fb3}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{position:sticky;top:0;z-index:1;display:flex;gap:18px;align-items:center;padding:10px 20px;background:#1d2330;color:#fff}
header h1{font-size:18px;margin:0}nav{display:flex;flex-wrap:wrap;gap:12px}nav a{color:#c9d6f2;text-decoration:none}
#updated{margin-left:auto;color:#c9d6f2;font-size:12px}#updated.bad{color:#ffb4ab}
main{padding:12px 20px;display:grid;gap:14px}section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;overflow-x:auto}
h2{font-size:15px;margin:2px 0 8px}table{border-collapse:collapse;width:100%;margin:6px 0}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:#374151}tr.svc th{background:#eef2f9}table.inner td,table.inner th{font-size:12px;padding:2px 6px}
.dim{color:var(--dim);font-size:12px}.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}.summary{margin:4px 0}.note{color:var(--dim)}
pre{margin:4px 0;font-size:12px;white-space:pre-wrap}ul{margin:0;padding-left:18px}footer{padding:6px 20px 16px;color:var(--dim);font-size:12px}
svg.graph{max-width:100%;height:auto}svg .zone{fill:#f1f4fa;stroke:var(--line)}svg .zone-name{font-size:13px;font-weight:600;fill:#374151}
svg .node rect{fill:#fff;stroke:var(--accent);stroke-width:1.5}svg .node.degraded rect{stroke:var(--bad)}svg .node text{font-size:13px;fill:var(--fg)}svg text.small{font-size:11px;fill:var(--dim)}
svg .edge{stroke:var(--accent);stroke-width:1.5}svg .edge-label{font-size:11px;fill:var(--accent)}
"#;

/// Swaps in fresh section fragments from `/api/sections` every few
/// seconds; an unchanged fragment is left alone so an open `<details>`
/// stays open.
const SCRIPT: &str = r#"
(() => {
  const updated = document.getElementById('updated');
  const last = new Map();
  async function refresh() {
    try {
      const r = await fetch('/api/sections', {credentials: 'same-origin', cache: 'no-store'});
      if (r.status === 401) {
        updated.textContent = 'session ended: open the URL trellis dashboard printed';
        updated.className = 'bad';
        return;
      }
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const j = await r.json();
      for (const [id, html] of Object.entries(j.sections)) {
        const el = document.getElementById('b-' + id);
        if (el && last.get(id) !== html) { el.innerHTML = html; last.set(id, html); }
      }
      updated.textContent = 'read ' + j.taken;
      updated.className = '';
    } catch (e) {
      updated.textContent = 'refresh failed: ' + e.message;
      updated.className = 'bad';
    }
    setTimeout(refresh, REFRESH_MS);
  }
  setTimeout(refresh, REFRESH_MS);
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            esc(r#"<img src=x onerror='a("b")'>&"#),
            "&lt;img src=x onerror=&#39;a(&quot;b&quot;)&#39;&gt;&amp;"
        );
    }

    /// Every field another party writes, carrying markup, through the
    /// whole page: none of it may come out as markup.
    #[test]
    fn hostile_names_from_the_store_come_out_as_text() {
        use super::super::collect::*;
        use super::super::graph::Node;
        let x = "<script>alert(1)</script>\"'";
        let snap = Snapshot {
            taken_ms: 0,
            cluster: Part::Ok(Cluster {
                leader: 1,
                leader_name: x.into(),
                term: 1,
                commit: 1,
                servers: vec![Server {
                    id: 1,
                    name: x.into(),
                    zone: x.into(),
                    address: x.into(),
                    role: x.into(),
                    leader: true,
                    applied: None,
                    commit: None,
                    term: None,
                    lag: None,
                    error: Some(x.into()),
                }],
            }),
            zones: Part::Ok(vec![Zone {
                name: x.into(),
                role: x.into(),
                gateways: vec![x.into()],
            }]),
            gateways: Part::Ok(vec![Gateway {
                zone: x.into(),
                name: x.into(),
                address: x.into(),
                zone_address: x.into(),
                healthy: true,
                peer_zones: vec![x.into()],
                links: Part::Ok(serde_json::json!([{ x: x }])),
            }]),
            services: Part::Ok(vec![Service {
                name: x.into(),
                endpoints: vec![Endpoint {
                    zone: x.into(),
                    id: x.into(),
                    address: x.into(),
                    ports: vec![1],
                    protocol: x.into(),
                    labels: [(x.to_owned(), x.to_owned())].into(),
                    healthy: false,
                    lease_expires_ms: 0,
                }],
            }]),
            graph: Graph {
                zones: vec![x.into()],
                nodes: vec![Node {
                    service: x.into(),
                    zone: x.into(),
                    endpoints: 1,
                    healthy: 0,
                }],
                edges: Vec::new(),
                note: Some(x.into()),
            },
            proxies: Part::Ok(Proxies {
                revision: 2,
                proxies: vec![Proxy {
                    id: x.into(),
                    kind: x.into(),
                    zone: x.into(),
                    name: x.into(),
                    revision: 1,
                    drift: 1,
                    rejected: x.into(),
                }],
            }),
            policies: Part::Ok(vec![Policy {
                kind: x.into(),
                name: x.into(),
                spec: x.into(),
                rejected_by: vec![Rejection {
                    proxy: x.into(),
                    reason: x.into(),
                }],
            }]),
            audit: Part::Error(x.into()),
        };
        let page = page(&snap, "n0nce");
        assert!(!page.contains("<script>alert"), "{page}");
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;"));
    }

    #[test]
    fn an_admin_list_becomes_a_table_and_anything_else_text() {
        let v = serde_json::json!([{"peer": "<west>", "transport": "quic", "rtt_ms": 1.5}]);
        let t = json(&v);
        assert!(t.contains("<th>peer</th>") && t.contains("&lt;west&gt;") && t.contains("1.5"));
        let t = json(&serde_json::json!({"odd": "<x>"}));
        assert!(t.starts_with("<pre>") && t.contains("&lt;x&gt;"));
    }
}
