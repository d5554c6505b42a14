//! `trellis top`: live golden signals per service edge (success rate,
//! requests per second, p50 and p99), from the summaries the proxies send
//! to the servers; `--service NAME.NS` shows one service's routes and
//! endpoints instead. The server asked merges every server's data, and
//! names the servers that did not answer.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;
use trellis_federation::{proto, telemetry};

use crate::cli::UsageError;
use crate::cli::ops::{self, Conn, Output};
use crate::cli::parse_duration;

/// How often the table refreshes in a terminal.
const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    conn: Conn,
    /// One service (`NAME.NAMESPACE`): its routes (as callers saw them)
    /// and endpoints (as each answering proxy saw them).
    #[arg(long, value_name = "NAME.NAMESPACE")]
    service: Option<String>,
    /// How far back rates and latencies look: whole seconds, 1s to 60s.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    window: Duration,
    /// Print once and exit, instead of refreshing every 2 s.
    #[arg(long)]
    once: bool,
}

/// One row of `trellis top`: an edge, a route or an endpoint.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Signal {
    /// The caller's workload, namespace and zone (edges).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) source_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) source_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) source_zone: Option<String>,
    /// The called service (`name`, `namespace`) and, for edges and
    /// endpoints, the zone that answered.
    pub(crate) destination_service: String,
    pub(crate) destination_namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) destination_zone: Option<String>,
    /// The answering workload and its proxy's name (endpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) destination_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint: Option<String>,
    /// The route rule (edges and routes); `default` when none was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) route: Option<String>,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) connections: u64,
    pub(crate) rps: f64,
    pub(crate) success_rate: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// A table of signals and where it came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Table {
    /// The window the rows cover.
    pub(crate) window_seconds: u32,
    /// The servers whose data is in it (`zone/name`).
    pub(crate) servers: Vec<String>,
    /// The servers that did not answer in time, with the reason.
    pub(crate) missing: Vec<String>,
    /// Requests the proxies or servers could not summarise (bounds).
    pub(crate) dropped: u64,
    /// Busiest first.
    pub(crate) rows: Vec<Signal>,
}

/// Which rows a table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// Per source workload and zone → destination service and zone, route.
    Edges,
    /// One service's routes.
    Routes,
    /// One service's endpoints.
    Endpoints,
}

/// The table of `view` over `window` from the server behind `channel`,
/// merged across the mesh; `service` (`name.namespace`) keeps one
/// service's rows. The dashboard's entry point: `top::fetch(ch,
/// View::Edges, None, Duration::from_secs(30))` is the edges table.
pub(crate) async fn fetch(
    channel: Channel,
    view: View,
    service: Option<&str>,
    window: Duration,
) -> Result<Table, tonic::Status> {
    let t = telemetry::query(
        channel,
        proto::SignalQuery {
            window_seconds: u32::try_from(window.as_secs()).unwrap_or(u32::MAX),
            service: service.unwrap_or_default().to_string(),
            view: match view {
                View::Edges => "edges",
                View::Routes => "routes",
                View::Endpoints => "endpoints",
            }
            .into(),
            local_only: false,
        },
    )
    .await?;
    Ok(Table {
        window_seconds: t.window_seconds,
        servers: t.servers,
        missing: t.missing,
        dropped: t.dropped,
        rows: t.rows.into_iter().map(|r| signal(view, r)).collect(),
    })
}

fn signal(view: View, r: proto::SignalRow) -> Signal {
    let k = r.key.unwrap_or_default();
    let edges = view == View::Edges;
    let endpoints = view == View::Endpoints;
    Signal {
        source_workload: edges.then(|| k.source_workload.clone()),
        source_namespace: edges.then(|| k.source_namespace.clone()),
        source_zone: edges.then(|| k.source_zone.clone()),
        destination_service: k.destination_service,
        destination_namespace: k.destination_namespace,
        destination_zone: (view != View::Routes).then_some(k.destination_zone),
        destination_workload: endpoints.then_some(k.destination_workload),
        // The proxy's name: the last segment of its SPIFFE ID.
        endpoint: endpoints.then(|| r.proxy.rsplit('/').next().unwrap_or_default().to_string()),
        route: (!endpoints).then_some(k.route),
        requests: r.requests,
        errors: r.errors,
        connections: r.connections,
        rps: r.rps,
        success_rate: r.success_rate,
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
    }
}

// === impl TopArgs ===

impl TopArgs {
    pub(crate) fn run(self) -> Result<()> {
        let secs = self.window.as_secs();
        if self.window.subsec_nanos() != 0 || !(1..=telemetry::RETENTION.as_secs()).contains(&secs)
        {
            return Err(UsageError(format!(
                "--window: {} is not a whole number of seconds between 1s and {}s (servers keep {}s)",
                humantime::format_duration(self.window),
                telemetry::RETENTION.as_secs(),
                telemetry::RETENTION.as_secs()
            ))
            .into());
        }
        if let Some(s) = &self.service
            && s.split('.').filter(|p| !p.is_empty()).count() != 2
        {
            return Err(UsageError(format!(
                "--service {s:?}: write it as NAME.NAMESPACE, e.g. catalog.shop"
            ))
            .into());
        }
        let rt = ops::runtime()?;
        let ch = self.conn.channel(&rt)?;
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
        loop {
            let frame = rt.block_on(self.frame(ch.clone()));
            match frame {
                Ok(text) => {
                    if !self.once && terminal {
                        // Clear the screen and go home, as top does.
                        outln!("\x1b[2J\x1b[H{text}");
                    } else {
                        outln!("{text}");
                    }
                }
                Err(e) if self.once => return Err(e),
                Err(e) => eprintln!("error: {e:#}"),
            }
            if self.once {
                return Ok(());
            }
            let stop = rt.block_on(async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => true,
                    () = tokio::time::sleep(REFRESH) => false,
                }
            });
            if stop {
                return Ok(());
            }
        }
    }

    /// One screenful (or one JSON document).
    async fn frame(&self, ch: Channel) -> Result<String> {
        let service = self.service.as_deref();
        let json = self.conn.output == Output::Json;
        let Some(name) = service else {
            let t = fetch(ch, View::Edges, None, self.window)
                .await
                .map_err(ops::status)?;
            if json {
                return Ok(serde_json::json!({
                    "window_seconds": t.window_seconds,
                    "servers": t.servers,
                    "missing": t.missing,
                    "dropped": t.dropped,
                    "edges": t.rows,
                })
                .to_string());
            }
            let mut out = heading(&t);
            out.push_str(&edges_table(&t.rows));
            return Ok(out);
        };
        let (routes, endpoints) = tokio::try_join!(
            fetch(ch.clone(), View::Routes, service, self.window),
            fetch(ch, View::Endpoints, service, self.window),
        )
        .map_err(ops::status)?;
        if json {
            let mut missing = routes.missing.clone();
            missing.extend(endpoints.missing.iter().cloned());
            missing.sort();
            missing.dedup();
            return Ok(serde_json::json!({
                "service": name,
                "window_seconds": routes.window_seconds,
                "servers": routes.servers,
                "missing": missing,
                "dropped": routes.dropped,
                "routes": routes.rows,
                "endpoints": endpoints.rows,
            })
            .to_string());
        }
        let mut out = heading(&routes);
        out.push_str(&format!("\nroutes of {name} (as its callers saw them)\n"));
        out.push_str(&render(
            ["ROUTE", "REQUESTS", "RPS", "SUCCESS", "P50", "P99"],
            routes.rows.iter().map(|r| {
                let [rps, ok, p50, p99] = figures(r);
                [
                    r.route.clone().unwrap_or_default(),
                    r.requests.to_string(),
                    rps,
                    ok,
                    p50,
                    p99,
                ]
            }),
        ));
        out.push_str(&format!("\nendpoints of {name} (as each answered)\n"));
        out.push_str(&render(
            [
                "ENDPOINT", "WORKLOAD", "ZONE", "RPS", "SUCCESS", "P50", "P99",
            ],
            endpoints.rows.iter().map(|r| {
                let [rps, ok, p50, p99] = figures(r);
                [
                    r.endpoint.clone().unwrap_or_default(),
                    r.destination_workload.clone().unwrap_or_default(),
                    r.destination_zone.clone().unwrap_or_default(),
                    rps,
                    ok,
                    p50,
                    p99,
                ]
            }),
        ));
        Ok(out)
    }
}

/// The line above the table, as `trellis status` has one.
fn heading(t: &Table) -> String {
    let mut s = format!(
        "window {}s  servers {}",
        t.window_seconds,
        t.servers.join(", ")
    );
    if !t.missing.is_empty() {
        s.push_str(&format!("  MISSING {}", t.missing.join("; ")));
    }
    if t.dropped > 0 {
        s.push_str(&format!("  dropped {} (memory bounds)", t.dropped));
    }
    s.push('\n');
    s
}

fn edges_table(rows: &[Signal]) -> String {
    render(
        [
            "SOURCE",
            "DESTINATION",
            "ROUTE",
            "RPS",
            "SUCCESS",
            "P50",
            "P99",
        ],
        rows.iter().map(|r| {
            let [rps, ok, p50, p99] = figures(r);
            [
                format!(
                    "{}.{}@{}",
                    r.source_workload.as_deref().unwrap_or_default(),
                    r.source_namespace.as_deref().unwrap_or_default(),
                    r.source_zone.as_deref().unwrap_or_default()
                ),
                format!(
                    "{}.{}@{}",
                    r.destination_service,
                    r.destination_namespace,
                    r.destination_zone.as_deref().unwrap_or_default()
                ),
                r.route.clone().unwrap_or_default(),
                rps,
                ok,
                p50,
                p99,
            ]
        }),
    )
}

/// RPS, SUCCESS, P50, P99 as shown; `-` where no request was made (an
/// edge of opaque TCP connections only).
fn figures(r: &Signal) -> [String; 4] {
    if r.requests == 0 {
        return ["0".into(), "-".into(), "-".into(), "-".into()];
    }
    [
        format!("{:.1}", r.rps),
        format!("{:.2}%", r.success_rate * 100.0),
        ms(r.p50_ms),
        ms(r.p99_ms),
    ]
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}ms")
    } else if v < 1000.0 {
        format!("{v:.0}ms")
    } else {
        format!("{:.2}s", v / 1000.0)
    }
}

/// Aligned columns, as `trellis status` prints them, into a string.
fn render<const N: usize>(head: [&str; N], rows: impl Iterator<Item = [String; N]>) -> String {
    let mut all: Vec<[String; N]> = vec![head.map(String::from)];
    all.extend(rows);
    let widths: Vec<usize> = (0..N)
        .map(|c| all.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &all {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_print_as_aligned_columns_with_figures() {
        let row = Signal {
            source_workload: Some("auth".into()),
            source_namespace: Some("shop".into()),
            source_zone: Some("east".into()),
            destination_service: "catalog".into(),
            destination_namespace: "shop".into(),
            destination_zone: Some("west".into()),
            destination_workload: None,
            endpoint: None,
            route: Some("default".into()),
            requests: 400,
            errors: 100,
            connections: 0,
            rps: 13.333,
            success_rate: 0.75,
            p50_ms: 3.456,
            p99_ms: 1234.0,
        };
        let text = edges_table(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SOURCE          DESTINATION        ROUTE    RPS   SUCCESS  P50     P99"
        );
        assert_eq!(
            lines[1],
            "auth.shop@east  catalog.shop@west  default  13.3  75.00%   3.46ms  1.23s"
        );
    }
}
