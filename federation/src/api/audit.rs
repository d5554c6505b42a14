//! Audit: the trail of changes to policy, tokens, zones and membership.

use super::*;

// === Audit ===

#[tonic::async_trait]
impl proto::audit_server::Audit for Api {
    async fn list(
        &self,
        req: Request<proto::AuditQuery>,
    ) -> Result<Response<proto::AuditList>, Status> {
        caller(&req, self.td(), "Audit.List", OPERATOR)?;
        let limit = match req.into_inner().limit {
            0 => 100,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let (_, entries) = self.read(|db| state::audit(db, limit))?;
        Ok(Response::new(proto::AuditList {
            entries: entries
                .into_iter()
                .map(|a| proto::AuditEntry {
                    seq: a.seq,
                    time_ms: a.time_ms,
                    by: a.by,
                    action: a.action,
                    detail: a.detail,
                })
                .collect(),
        }))
    }
}
