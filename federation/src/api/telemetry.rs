//! Telemetry: proxies' golden-signal reports in, tables out. Soft state in
//! this server's memory (see `crate::telemetry`), never a Raft write.

use futures_util::future::join_all;

use super::*;
use crate::telemetry::{self, Selection};

/// How long the server asked waits for each other server's table; one
/// that has not answered by then is reported as missing.
const FANOUT_DEADLINE: Duration = Duration::from_secs(2);

// === Telemetry ===

#[tonic::async_trait]
impl proto::telemetry_server::Telemetry for Api {
    async fn report(
        &self,
        req: Request<tonic::Streaming<proto::SignalReport>>,
    ) -> Result<Response<proto::Empty>, Status> {
        let id = caller(&req, self.td(), "Telemetry.Report", PROXIES)?;
        let me = id.to_string();
        let zone = id
            .role()
            .and_then(|r| r.zone().map(str::to_string))
            .unwrap_or_default();
        let mut stream = req.into_inner();
        let stopping = self.inner.stopping.clone();
        loop {
            let report = tokio::select! {
                () = stopping.cancelled() => break,
                r = stream.message() => match r? {
                    Some(r) => r,
                    None => break,
                },
            };
            // The proxy is who the certificate says; a report naming
            // another is refused rather than filed under either.
            if !report.proxy.is_empty() && report.proxy != me {
                return Err(Status::permission_denied(format!(
                    "{me} may not report for {}",
                    report.proxy
                )));
            }
            // A proxy speaks for its own side of each edge: its zone is
            // the caller's zone of the edges it reports as the source, and
            // the answering zone of those it reports as the destination.
            for e in &report.edges {
                let Some(k) = &e.key else { continue };
                let side = match k.reporter.as_str() {
                    "source" => &k.source_zone,
                    _ => &k.destination_zone,
                };
                if *side != zone {
                    return Err(Status::permission_denied(format!(
                        "{me} is in zone {zone} and may not report {} edges of zone {side}",
                        k.reporter
                    )));
                }
            }
            self.inner
                .telemetry
                .record(&me, &report, std::time::Instant::now())
                .map_err(|e| Status::invalid_argument(format!("SignalReport: {e}")))?;
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn query(
        &self,
        req: Request<proto::SignalQuery>,
    ) -> Result<Response<proto::SignalTable>, Status> {
        let id = caller(&req, self.td(), "Telemetry.Query", OPERATOR_OR_SERVER)?;
        let q = req.into_inner();
        let sel = Selection::from_query(&q).map_err(Status::invalid_argument)?;
        let mut merged = self.inner.telemetry.query(&sel, std::time::Instant::now());
        let (me, others) = self.members_for_telemetry();
        let mut table_servers = vec![me];
        let mut missing = Vec::new();
        // A server asks for its peers' own data only, so a fan-out never
        // fans out again.
        let local_only = q.local_only || id.role_kind() == Some(RoleKind::Server);
        if !local_only {
            let ask = proto::SignalQuery {
                local_only: true,
                ..q
            };
            let (answers, failed) = self
                .fan_out(others, |ch| telemetry::query(ch, ask.clone()))
                .await;
            for (name, t) in answers {
                merged.add_table(&t);
                table_servers.push(name);
            }
            missing = failed;
        }
        let mut table = merged.table(sel.window);
        table.servers = table_servers;
        table.missing = missing;
        Ok(Response::new(table))
    }
}

impl Api {
    /// Asks each of `others` (Raft id, `zone/name`) with `call` over the
    /// server-to-server channel, each within [`FANOUT_DEADLINE`]: the answers
    /// by member, and the members that did not answer, each with why.
    pub(super) async fn fan_out<T, F, Fut>(
        &self,
        others: Vec<(u64, String)>,
        call: F,
    ) -> (Vec<(String, T)>, Vec<String>)
    where
        F: Fn(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let calls = others.into_iter().map(|(raft_id, name)| {
            let asked = self.leader_channel(raft_id).map(&call);
            async move {
                let r = match asked {
                    Ok(fut) => match tokio::time::timeout(FANOUT_DEADLINE, fut).await {
                        Ok(Ok(t)) => Ok(t),
                        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                        Err(_) => Err(format!("no answer within {FANOUT_DEADLINE:?}")),
                    },
                    Err(s) => Err(s.message().to_string()),
                };
                (name, r)
            }
        });
        let mut answers = Vec::new();
        let mut missing = Vec::new();
        for (name, r) in join_all(calls).await {
            match r {
                Ok(t) => answers.push((name, t)),
                Err(reason) => missing.push(format!("{name}: {reason}")),
            }
        }
        (answers, missing)
    }

    /// This server's `zone/name`, and every other member's Raft id and
    /// `zone/name` (voters and learners alike: edge servers hold their
    /// zone's reports too).
    pub(super) fn members_for_telemetry(&self) -> (String, Vec<(u64, String)>) {
        let status = self.node().status();
        let known: HashMap<u64, MemberRecord> = state::members(self.node().db())
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        // A bootstrapped member may have no record yet: its address then.
        let name = |id: u64| {
            known
                .get(&id)
                .map(|m| format!("{}/{}", m.zone, m.name))
                .or_else(|| self.inner.transport.address(id))
                .unwrap_or_else(|| format!("raft id {id}"))
        };
        let me = match self.inner.server_id.role() {
            Some(Role::Server { zone, name }) => format!("{zone}/{name}"),
            _ => name(status.id),
        };
        let others = status
            .voters
            .iter()
            .chain(&status.learners)
            .filter(|id| **id != status.id)
            .map(|id| (*id, name(*id)))
            .collect();
        (me, others)
    }
}
