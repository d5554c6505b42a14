//! Cluster: members and Raft state; membership changes.

use super::*;

// === Cluster ===

#[tonic::async_trait]
impl proto::cluster_server::Cluster for Api {
    async fn status(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::ClusterStatus>, Status> {
        caller(&req, self.td(), "Cluster.Status", ANY)?;
        let s = self.node().status();
        let known: HashMap<u64, MemberRecord> = state::members(self.node().db())
            .map_err(to_status)?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        let mut members = Vec::new();
        for (ids, role) in [(&s.voters, "voter"), (&s.learners, "learner")] {
            for id in ids {
                let m = known.get(id);
                members.push(proto::Member {
                    id: *id,
                    name: m
                        .map(|m| format!("{}/{}", m.zone, m.name))
                        .unwrap_or_default(),
                    address: m
                        .map(|m| m.address.clone())
                        .or_else(|| self.inner.transport.address(*id))
                        .or_else(|| (*id == s.id).then(|| self.inner.advertise.clone()))
                        .unwrap_or_default(),
                    role: role.into(),
                });
            }
        }
        // One look at the hub, so the two counts are of one moment.
        let (streams, scoped) = self.watch_streams();
        Ok(Response::new(proto::ClusterStatus {
            id: s.id,
            leader: s.leader,
            term: s.term,
            commit: s.commit,
            applied: s.applied,
            revision: s.revision,
            members,
            now_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            watch_streams: streams as u64,
            watch_streams_scoped: scoped as u64,
            watch_snapshots: self
                .inner
                .snapshots_served
                .load(std::sync::atomic::Ordering::Relaxed),
            tracked_proxies: self.tracked_proxies() as u64,
        }))
    }

    async fn add_learner(
        &self,
        req: Request<proto::Member>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let who = caller(&req, self.td(), "Cluster.AddLearner", ANY)?;
        let m = req.into_inner();
        let (zone, name) = m
            .name
            .split_once('/')
            .ok_or_else(|| Status::invalid_argument("name: write it as ZONE/NAME"))?;
        state::key_field("name", name).map_err(to_status)?;
        state::name_field("zone", zone).map_err(to_status)?;
        if m.address.is_empty() {
            return Err(Status::invalid_argument("address: must not be empty"));
        }
        let id = member_id(zone, name);
        if m.id != 0 && m.id != id {
            return Err(Status::invalid_argument(format!(
                "id: the Raft id of {zone}/{name} is {id}, derived from its name; leave it 0"
            )));
        }
        let rec = MemberRecord {
            id,
            name: name.into(),
            zone: zone.into(),
            address: m.address,
        };
        let change = MemberChange::AddLearner(rec);
        Ok(reply(&self.write(&who, Command::Member { change }).await?))
    }

    async fn promote(
        &self,
        req: Request<proto::MemberId>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let who = caller(&req, self.td(), "Cluster.Promote", ANY)?;
        let change = MemberChange::Promote(req.into_inner().id);
        Ok(reply(&self.write(&who, Command::Member { change }).await?))
    }

    async fn remove(
        &self,
        req: Request<proto::MemberId>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let who = caller(&req, self.td(), "Cluster.Remove", ANY)?;
        let id = req.into_inner().id;
        if !matches!(
            self.node().membership(id),
            node::Membership::Voter | node::Membership::Learner
        ) {
            return Err(Status::not_found(format!("Raft id {id} is not a member")));
        }
        let change = MemberChange::Remove(id);
        Ok(reply(&self.write(&who, Command::Member { change }).await?))
    }
}
