//! Zones: join tokens, joining by token, listing, leaving, the bundle.

use super::*;

// === Zones ===

#[tonic::async_trait]
impl proto::zones_server::Zones for Api {
    async fn create_join_token(
        &self,
        req: Request<proto::TokenRequest>,
    ) -> Result<Response<proto::TokenReply>, Status> {
        let who = caller(&req, self.td(), "Zones.CreateJoinToken", TOKEN_MAKERS)?;
        let r = req.into_inner();
        state::name_field("zone", &r.zone).map_err(to_status)?;
        if !r.name.is_empty() {
            state::key_field("name", &r.name).map_err(to_status)?;
        }
        if r.replace && (!r.agent || r.name.is_empty()) {
            return Err(Status::invalid_argument(
                "replace: only an agent token bound to a name (--name) may replace that host; a server is replaced by removing it first (`trellis cluster remove ID`)",
            ));
        }
        let ttl = match r.ttl_seconds {
            0 => 3600,
            t if t > MAX_TOKEN_TTL_SECONDS => {
                return Err(Status::invalid_argument(format!(
                    "ttl_seconds: {t} is longer than the {MAX_TOKEN_TTL_SECONDS} s a join token may live"
                )));
            }
            t => t,
        };
        let root = self.bundle_pem();
        let roots = trellis_ca::certs_from_pem(root.as_bytes(), "bundle")
            .map_err(|e| Status::internal(e.to_string()))?;
        let fp = roots
            .first()
            .map(|c| token::sha256_hex(c.as_ref()))
            .ok_or_else(|| Status::internal("the trust bundle holds no root"))?;
        let mut servers = vec![self.inner.advertise.clone()];
        for m in state::members(self.node().db()).map_err(to_status)? {
            if !servers.contains(&m.address) {
                servers.push(m.address);
            }
        }
        if r.agent && r.workloads.is_empty() {
            return Err(Status::invalid_argument(
                "workloads: an agent token names the workload identities it may claim (NAMESPACE/ACCOUNT or NAMESPACE/*)",
            ));
        }
        if !r.agent && !r.workloads.is_empty() {
            return Err(Status::invalid_argument(
                "workloads: only agent tokens carry workload identities",
            ));
        }
        for (i, w) in r.workloads.iter().enumerate() {
            let field = format!("workloads[{i}]");
            let (ns, sa) = w.split_once('/').ok_or_else(|| {
                Status::invalid_argument(format!("{field}: {w:?} is not NAMESPACE/ACCOUNT"))
            })?;
            state::name_field(&field, ns).map_err(to_status)?;
            if sa != "*" {
                state::key_field(&field, sa).map_err(to_status)?;
            }
        }
        let mut t = JoinToken::generate(self.td().as_str(), &r.zone, r.edge, &fp, servers)
            .map_err(to_status)?;
        if r.agent {
            t = t.for_agent();
        }
        let now = node::now_ms();
        let expires_ms = now + ttl * 1000;
        self.write(
            &who,
            Command::CreateToken {
                hash: t.secret_hash(),
                token: state::TokenRecord {
                    zone: r.zone,
                    edge: r.edge,
                    expires_ms,
                    used_by: None,
                    agent: r.agent,
                    workloads: r.workloads,
                    name: (!r.name.is_empty()).then_some(r.name),
                    replace: r.replace,
                    created_by: who.to_string(),
                    created_ms: now,
                },
            },
        )
        .await?;
        Ok(Response::new(proto::TokenReply {
            token: t.encode(),
            expires_ms,
        }))
    }

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinReply>, Status> {
        let _admitted = self.admit_open_call()?;
        // No identity required: the token is the proof. Everything the
        // identity holds (kind, zone, name) comes from the token's stored
        // record, never from its text, which the holder can edit.
        let r = req.into_inner();
        let (hash, rec) = self.known_token(&r.token, false).await?;
        let name = bound_name(&rec, &r.name)?;
        if r.address.is_empty() {
            return Err(Status::invalid_argument("address: must not be empty"));
        }
        let id = self
            .td()
            .role(RoleKind::Server, &rec.zone, &name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let node_id = member_id(&rec.zone, &name);
        if matches!(
            self.node().membership(node_id),
            node::Membership::Voter | node::Membership::Learner
        ) {
            return Err(Status::already_exists(format!(
                "join: {id} is already a member (Raft id {node_id}); remove it first with `trellis cluster remove {node_id}` to replace it"
            )));
        }
        // The CSR is checked before the token is spent, so a bad one does
        // not burn it.
        let auth = self.authority_for(&id)?;
        let csr = rustls_pki_types::CertificateSigningRequestDer::from(r.csr);
        let chain = auth
            .sign_csr(&csr, &id, IssueOptions::default())
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let o = self
            .write(
                &id,
                Command::UseToken {
                    hash,
                    by: id.to_string(),
                    now_ms: node::now_ms(),
                    agent: false,
                    member: Some(node_id),
                },
            )
            .await?;
        let used = o
            .token
            .ok_or_else(|| Status::internal("token outcome missing"))?;
        // The membership change is checked here against the spent token,
        // which this replica may not have applied yet: a read index waits
        // until it has applied everything committed before it.
        self.read_barrier(Some(&proto::ReadOptions { linearizable: true }))
            .await?;
        let member = MemberRecord {
            id: node_id,
            name: name.clone(),
            zone: used.zone.clone(),
            address: r.address.clone(),
        };
        // The new server asks for its own promotion once it runs (core
        // zones only), so nothing here acts for it later.
        let change = MemberChange::AddLearner(member);
        let o = self.write(&id, Command::Member { change }).await?;
        tracing::info!(server = %id, node_id, "server joined");
        let status = self.node().status();
        Ok(Response::new(proto::JoinReply {
            chain_pem: trellis_ca::certs_to_pem(chain.iter()),
            bundle_pem: self.bundle_pem(),
            node_id,
            zone: used.zone,
            revision: o.revision,
            members: status
                .voters
                .iter()
                .chain(&status.learners)
                .copied()
                .filter(|m| *m != node_id)
                .collect(),
        }))
    }

    async fn join_agent(
        &self,
        req: Request<proto::AgentJoinRequest>,
    ) -> Result<Response<proto::AgentJoinReply>, Status> {
        let _admitted = self.admit_open_call()?;
        // No identity required: the token is the proof; zone, kind and name
        // come from its stored record.
        let r = req.into_inner();
        let (hash, known) = self.known_token(&r.token, true).await?;
        let name = bound_name(&known, &r.name)?;
        let node_id = self
            .td()
            .role(RoleKind::Agent, &known.zone, &name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let mut workload_ids = Vec::with_capacity(r.workloads.len());
        for (i, w) in r.workloads.iter().enumerate() {
            state::name_field(&format!("workloads[{i}].namespace"), &w.namespace)
                .map_err(to_status)?;
            state::key_field(&format!("workloads[{i}].account"), &w.account).map_err(to_status)?;
            let id = self
                .td()
                .workload(&w.namespace, &w.account)
                .map_err(|e| Status::invalid_argument(format!("workloads[{i}]: {e}")))?;
            workload_ids.push(id);
        }
        // Checked before the token is spent, so a wrong request does not
        // burn it.
        for w in &r.workloads {
            if !known.allows_workload(&w.namespace, &w.account) {
                return Err(Status::permission_denied(format!(
                    "join token: it does not allow workload {}/{} (it allows {})",
                    w.namespace,
                    w.account,
                    known.workloads.join(", ")
                )));
            }
        }
        // Every CSR is signed before the token is spent, so a bad one (or a
        // server without the CA) leaves the token usable.
        let auth = self.authority_for(&node_id)?;
        let opts = issue_options(r.ttl_seconds);
        let sign = |csr: Vec<u8>, id: &SpiffeId, field: &str| {
            let csr = rustls_pki_types::CertificateSigningRequestDer::from(csr);
            auth.sign_csr(&csr, id, opts)
                .map(|chain| trellis_ca::certs_to_pem(chain.iter()))
                .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
        };
        let node_chain_pem = sign(r.node_csr, &node_id, "node_csr")?;
        let mut workload_chain_pem = Vec::with_capacity(workload_ids.len());
        for (i, (w, id)) in r.workloads.into_iter().zip(&workload_ids).enumerate() {
            workload_chain_pem.push(sign(w.csr, id, &format!("workloads[{i}].csr"))?);
        }
        let o = self
            .write(
                &node_id,
                Command::UseToken {
                    hash,
                    by: node_id.to_string(),
                    now_ms: node::now_ms(),
                    agent: true,
                    member: None,
                },
            )
            .await?;
        let used = o
            .token
            .ok_or_else(|| Status::internal("token outcome missing"))?;
        tracing::info!(agent = %node_id, workloads = workload_ids.len(), "agent joined");
        Ok(Response::new(proto::AgentJoinReply {
            node_chain_pem,
            bundle_pem: self.bundle_pem(),
            zone: used.zone,
            workload_chain_pem,
        }))
    }

    async fn list(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::ZoneList>, Status> {
        caller(&req, self.td(), "Zones.List", ANY)?;
        self.read_barrier(Some(req.get_ref())).await?;
        let (revision, (zones, eps)) =
            self.read(|db| Ok((state::zones(db)?, state::endpoints(db)?)))?;
        Ok(Response::new(proto::ZoneList {
            revision,
            zones: zones
                .into_iter()
                .map(|z| {
                    // A zone's gateways are the ones registered and healthy.
                    let mut gateways = z.gateways;
                    gateways.extend(
                        eps.iter()
                            .filter(|e| {
                                e.namespace == state::SYSTEM_NAMESPACE
                                    && e.service == state::GATEWAY_SERVICE
                                    && e.zone == z.name
                                    && e.healthy
                            })
                            .map(|e| match e.ports.first() {
                                Some(p) if e.address.contains(':') => {
                                    format!("[{}]:{p}", e.address)
                                }
                                Some(p) => format!("{}:{p}", e.address),
                                None => e.address.clone(),
                            }),
                    );
                    proto::Zone {
                        name: z.name,
                        role: match z.role {
                            ZoneRole::Core => "core".into(),
                            ZoneRole::Edge => "edge".into(),
                        },
                        gateways,
                    }
                })
                .collect(),
        }))
    }

    async fn leave(
        &self,
        req: Request<proto::ZoneName>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let who = caller(&req, self.td(), "Zones.Leave", OPERATOR)?;
        let name = req.into_inner().name;
        Ok(reply(
            &self.write(&who, Command::RemoveZone { name }).await?,
        ))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::TokenList>, Status> {
        caller(&req, self.td(), "Zones.ListTokens", OPERATOR)?;
        let (_, tokens) = self.read(state::tokens)?;
        Ok(Response::new(proto::TokenList {
            tokens: tokens
                .into_iter()
                .map(|(hash, t)| proto::TokenInfo {
                    id: state::token_id(&hash),
                    zone: t.zone,
                    kind: match (t.agent, t.edge) {
                        (true, _) => "agent",
                        (false, true) => "edge-server",
                        (false, false) => "server",
                    }
                    .into(),
                    name: t.name.unwrap_or_default(),
                    workloads: t.workloads,
                    expires_ms: t.expires_ms,
                    used_by: t.used_by.unwrap_or_default(),
                    created_by: t.created_by,
                    created_ms: t.created_ms,
                    replace: t.replace,
                })
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<proto::TokenId>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let who = caller(&req, self.td(), "Zones.RevokeToken", OPERATOR)?;
        let id = req.into_inner().id;
        if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "id: give at least 8 hex digits of the id `trellis zone token list` shows",
            ));
        }
        let (_, tokens) = self.read(state::tokens)?;
        let mut found = tokens
            .into_iter()
            .filter(|(h, _)| h.starts_with(&id.to_ascii_lowercase()));
        let (hash, _) = found
            .next()
            .ok_or_else(|| Status::not_found(format!("no join token has id {id}")))?;
        if found.next().is_some() {
            return Err(Status::invalid_argument(format!(
                "id: {id} matches several tokens; give more digits"
            )));
        }
        Ok(reply(
            &self.write(&who, Command::RevokeToken { hash }).await?,
        ))
    }

    async fn bundle(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::BundleReply>, Status> {
        // Members and proxies ask with their certificates (every few
        // seconds each); only callers without one count against the limit.
        let _admitted = match identity_of(&req) {
            Ok(_) => None,
            Err(_) => Some(self.admit_open_call()?),
        };
        Ok(Response::new(proto::BundleReply {
            bundle_pem: self.bundle_pem(),
        }))
    }
}

/// The longest a join token may stay valid: a week.
const MAX_TOKEN_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// The name a joiner takes: the token's, when it is bound to one.
fn bound_name(rec: &state::TokenRecord, asked: &str) -> Result<String, Status> {
    let name = match &rec.name {
        Some(n) if asked.is_empty() || asked == n => n.clone(),
        Some(n) => {
            return Err(Status::permission_denied(format!(
                "name: this join token is bound to {n:?}, not {asked:?}"
            )));
        }
        None => asked.to_string(),
    };
    state::key_field("name", &name).map_err(to_status)?;
    Ok(name)
}

impl Api {
    /// The stored record of a presented token, refused (unknown, wrong
    /// kind, spent, expired) before anything is proposed, so that junk and
    /// replayed tokens never reach the Raft log.
    async fn known_token(
        &self,
        text: &str,
        agent: bool,
    ) -> Result<(String, state::TokenRecord), Status> {
        let t = JoinToken::parse(text).map_err(to_status)?;
        let hash = t.secret_hash();
        let mut rec = self.read(|db| state::token(db, &hash))?.1;
        if rec.is_none() && !self.node().is_leader() {
            // Made a moment ago on the leader: confirm with a read index
            // (no log entry) before calling it unknown.
            self.read_barrier(Some(&proto::ReadOptions { linearizable: true }))
                .await?;
            rec = self.read(|db| state::token(db, &hash))?.1;
        }
        let rec = rec.ok_or_else(|| {
            Status::unauthenticated(
                "join token: unknown (check that it was copied whole, or create a new one with `trellis zone token create`)",
            )
        })?;
        if rec.agent != agent {
            return Err(Status::permission_denied(if rec.agent {
                "join token: this is a host agent token; give it to `trellis agent` (join_token_file), not to `trellis zone join`"
            } else {
                "join token: this is a server token; create an agent token with `trellis zone token create --agent`"
            }));
        }
        if let Some(user) = &rec.used_by {
            return Err(Status::permission_denied(format!(
                "join token: already used by {user}; a token works once, create a new one"
            )));
        }
        let now = node::now_ms();
        if rec.expires_ms <= now {
            return Err(Status::permission_denied(format!(
                "join token: expired {} s ago; create a new one",
                (now - rec.expires_ms) / 1000
            )));
        }
        Ok((hash, rec))
    }
}
