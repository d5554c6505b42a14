//! The service graph: services as boxes in one column per zone, and one
//! edge per caller → callee (and route) with its golden signals. Nodes come
//! from the registry; edges from the servers' golden-signal summaries
//! (`Telemetry.Query`, over the last 30 s, merged across every server).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::html::esc;

/// One service in one zone.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Node {
    /// `name.namespace`.
    pub(crate) service: String,
    pub(crate) zone: String,
    /// Registered endpoints, and how many of them pass their health check.
    pub(crate) endpoints: usize,
    pub(crate) healthy: usize,
}

/// Golden signals of the requests from one service to another.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Edge {
    /// The caller, `name.namespace`.
    pub(crate) source: String,
    pub(crate) source_zone: String,
    /// The callee, `name.namespace`.
    pub(crate) destination: String,
    pub(crate) destination_zone: String,
    /// How the requests went: `local`, `gateway`, `edge`, or a route name.
    pub(crate) route: String,
    /// Requests per second.
    pub(crate) rps: f64,
    /// Share of requests that succeeded, 0 to 1.
    pub(crate) success_rate: f64,
    /// Latency percentiles, in milliseconds.
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

const COL_W: usize = 220;
const BOX_W: usize = 170;
const BOX_H: usize = 44;
const ROW_H: usize = 64;
const TOP: usize = 34;

/// The graph section: an SVG with zones as columns, then the edges as a
/// table. `zones` orders the columns; nodes or edges in a zone not listed
/// get a column of their own at the end. Everything drawn from the store is
/// escaped.
pub(crate) fn render(
    zones: &[String],
    nodes: &[Node],
    edges: &[Edge],
    note: Option<&str>,
) -> String {
    let mut columns: Vec<String> = zones.to_vec();
    let mut boxes: Vec<Node> = nodes.to_vec();
    for e in edges {
        for (service, zone) in [
            (&e.source, &e.source_zone),
            (&e.destination, &e.destination_zone),
        ] {
            if !boxes
                .iter()
                .any(|n| &n.service == service && &n.zone == zone)
            {
                boxes.push(Node {
                    service: service.clone(),
                    zone: zone.clone(),
                    endpoints: 0,
                    healthy: 0,
                });
            }
        }
    }
    for n in &boxes {
        if !columns.contains(&n.zone) {
            columns.push(n.zone.clone());
        }
    }
    // Where each box sits: its column, then its row in that column.
    let mut rows: BTreeMap<&str, usize> = BTreeMap::new();
    let mut at: Vec<(usize, usize)> = Vec::with_capacity(boxes.len());
    for n in &boxes {
        let col = columns.iter().position(|z| *z == n.zone).unwrap_or(0);
        let row = rows.entry(n.zone.as_str()).or_default();
        at.push((col, *row));
        *row += 1;
    }
    let height = TOP + rows.values().max().copied().unwrap_or(1).max(1) * ROW_H + 10;
    let width = columns.len().max(1) * COL_W;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="graph" role="img" aria-label="service graph" viewBox="0 0 {width} {height}" width="{width}" height="{height}">"#
    );
    for (i, z) in columns.iter().enumerate() {
        let x = i * COL_W;
        let _ = write!(
            s,
            r#"<rect class="zone" x="{}" y="2" width="{}" height="{}" rx="8"/><text class="zone-name" x="{}" y="22">zone {}</text>"#,
            x + 4,
            COL_W - 8,
            height - 4,
            x + 14,
            esc(z)
        );
    }
    let centre = |i: usize| {
        let (col, row) = at[i];
        (
            col * COL_W + (COL_W - BOX_W) / 2 + BOX_W / 2,
            TOP + row * ROW_H + BOX_H / 2,
        )
    };
    let find = |service: &str, zone: &str| {
        boxes
            .iter()
            .position(|n| n.service == service && n.zone == zone)
    };
    for e in edges {
        let (Some(a), Some(b)) = (
            find(&e.source, &e.source_zone),
            find(&e.destination, &e.destination_zone),
        ) else {
            continue;
        };
        let ((x1, y1), (x2, y2)) = (centre(a), centre(b));
        let _ = write!(
            s,
            r#"<line class="edge" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" marker-end="url(#arrow)"/><text class="edge-label" x="{}" y="{}">{:.1}/s {:.0}%</text>"#,
            (x1 + x2) / 2,
            (y1 + y2) / 2 - 4,
            e.rps,
            e.success_rate * 100.0
        );
    }
    for (i, n) in boxes.iter().enumerate() {
        let (cx, cy) = centre(i);
        let class = if n.healthy == n.endpoints && n.endpoints > 0 {
            "node"
        } else {
            "node degraded"
        };
        let _ = write!(
            s,
            r#"<g class="{class}"><rect x="{}" y="{}" width="{BOX_W}" height="{BOX_H}" rx="6"/><text x="{cx}" y="{}" text-anchor="middle">{}</text><text class="small" x="{cx}" y="{}" text-anchor="middle">{}/{} healthy</text></g>"#,
            cx - BOX_W / 2,
            cy - BOX_H / 2,
            cy - 4,
            esc(&n.service),
            cy + 13,
            n.healthy,
            n.endpoints
        );
    }
    s.push_str(r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs></svg>"#);

    if let Some(n) = note {
        let _ = write!(
            s,
            r#"<p class="note" id="signals-note">golden signals: {}</p>"#,
            esc(n)
        );
    }
    if edges.is_empty() {
        s.push_str(r#"<p class="note" id="signals">golden signals: no requests between services in the last 30 s; the boxes are the registered services, by zone.</p>"#);
        return s;
    }
    s.push_str("<table><thead><tr><th>source</th><th>destination</th><th>route</th><th>requests/s</th><th>success</th><th>p50</th><th>p99</th></tr></thead><tbody>");
    for e in edges {
        let _ = write!(
            s,
            "<tr><td>{} <span class=\"dim\">({})</span></td><td>{} <span class=\"dim\">({})</span></td><td>{}</td><td>{:.2}</td><td>{:.1}%</td><td>{:.1} ms</td><td>{:.1} ms</td></tr>",
            esc(&e.source),
            esc(&e.source_zone),
            esc(&e.destination),
            esc(&e.destination_zone),
            esc(&e.route),
            e.rps,
            e.success_rate * 100.0,
            e.p50_ms,
            e.p99_ms
        );
    }
    s.push_str("</tbody></table>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(service: &str, zone: &str) -> Node {
        Node {
            service: service.into(),
            zone: zone.into(),
            endpoints: 1,
            healthy: 1,
        }
    }

    #[test]
    fn without_edges_it_says_no_requests_were_seen_and_why_data_is_missing() {
        let html = render(
            &["east".into(), "west".into()],
            &[node("auth.shop", "east"), node("catalog.shop", "west")],
            &[],
            Some("west/west-1 did not answer"),
        );
        assert!(html.contains("no requests between services"), "{html}");
        assert!(html.contains("west/west-1 did not answer"), "{html}");
        assert!(html.contains("zone east") && html.contains("catalog.shop"));
        assert!(!html.contains("<line"));
    }

    #[test]
    fn edges_draw_a_line_and_a_row_with_escaped_names() {
        let e = Edge {
            source: "auth.shop".into(),
            source_zone: "east".into(),
            destination: "<b>catalog</b>".into(),
            destination_zone: "west".into(),
            route: "gateway".into(),
            rps: 12.5,
            success_rate: 0.99,
            p50_ms: 3.0,
            p99_ms: 40.0,
        };
        let html = render(&["east".into()], &[node("auth.shop", "east")], &[e], None);
        assert!(html.contains("<line"), "{html}");
        assert!(html.contains("&lt;b&gt;catalog&lt;/b&gt;") && !html.contains("<b>"));
        assert!(html.contains("99.0%") && html.contains("zone west"));
        assert!(!html.contains("no requests between"));
    }
}
