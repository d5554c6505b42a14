//! Zones: join tokens, joining by token, listing, leaving, the bundle.

use super::*;

// === Zones ===

#[tonic::async_trait]
impl proto::zones_server::Zones for Api {
    async fn create_join_token(
        &self,
        req: Request<proto::TokenRequest>,
    ) -> Result<Response<proto::TokenReply>, Status> {
        caller(&req, self.td(), "Zones.CreateJoinToken", OPERATOR)?;
        let r = req.into_inner();
        state::name_field("zone", &r.zone).map_err(to_status)?;
        let ttl = if r.ttl_seconds == 0 {
            3600
        } else {
            r.ttl_seconds
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
        let expires_ms = node::now_ms() + ttl * 1000;
        self.write(Command::CreateToken {
            hash: t.secret_hash(),
            token: state::TokenRecord {
                zone: r.zone,
                edge: r.edge,
                expires_ms,
                used_by: None,
                agent: r.agent,
                workloads: r.workloads,
            },
        })
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
        // No identity required: the token is the proof.
        let r = req.into_inner();
        let t = JoinToken::parse(&r.token).map_err(to_status)?;
        state::key_field("name", &r.name).map_err(to_status)?;
        if r.address.is_empty() {
            return Err(Status::invalid_argument("address: must not be empty"));
        }
        let id = self
            .td()
            .role(RoleKind::Server, &t.zone, &r.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let o = self
            .write(Command::UseToken {
                hash: t.secret_hash(),
                by: id.to_string(),
                now_ms: node::now_ms(),
                agent: false,
            })
            .await?;
        let used = o
            .token
            .ok_or_else(|| Status::internal("token outcome missing"))?;
        let auth = self.authority_for(&id)?;
        let csr = rustls_pki_types::CertificateSigningRequestDer::from(r.csr);
        let chain = auth
            .sign_csr(&csr, &id, IssueOptions::default())
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let node_id = member_id(&used.zone, &r.name);
        let member = MemberRecord {
            id: node_id,
            name: r.name.clone(),
            zone: used.zone.clone(),
            address: r.address.clone(),
        };
        let o = self.conf_change(node::add_member(&member, false)).await?;
        if !used.edge {
            // Core zones vote: Cluster.Promote (on the leader) waits until
            // the learner has caught up before making it a voter.
            let api = self.clone();
            let id = member.id;
            tokio::spawn(async move {
                let promote = proto::MemberId { id };
                let r = match api.node().status().leader == api.node().id() {
                    true => api.promote_when_caught_up(id).await.map(|_| ()),
                    false => api.forward_promote(promote).await,
                };
                if let Err(e) = r {
                    tracing::warn!(id, error = %e.message(), "promoting the new server failed; run `trellis cluster promote`");
                }
            });
        }
        Ok(Response::new(proto::JoinReply {
            chain_pem: trellis_ca::certs_to_pem(chain.iter()),
            bundle_pem: self.bundle_pem(),
            node_id,
            zone: used.zone,
            revision: o.revision,
        }))
    }

    async fn join_agent(
        &self,
        req: Request<proto::AgentJoinRequest>,
    ) -> Result<Response<proto::AgentJoinReply>, Status> {
        // No identity required: the token is the proof.
        let r = req.into_inner();
        let t = JoinToken::parse(&r.token).map_err(to_status)?;
        state::key_field("name", &r.name).map_err(to_status)?;
        let node_id = self
            .td()
            .role(RoleKind::Agent, &t.zone, &r.name)
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
        // burn it: only its kind and the CSRs' keys are left to check later.
        let hash = t.secret_hash();
        let known = self
            .read(|db| state::token(db, &hash))?
            .1
            .ok_or_else(|| to_status(FedError::Refused("join token: unknown (check that it was copied whole, or create a new one with `trellis zone token create --agent`)".into())))?;
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
        let o = self
            .write(Command::UseToken {
                hash,
                by: node_id.to_string(),
                now_ms: node::now_ms(),
                agent: true,
            })
            .await?;
        let used = o
            .token
            .ok_or_else(|| Status::internal("token outcome missing"))?;
        let auth = self.authority_for(&node_id)?;
        let mut opts = IssueOptions::default();
        if r.ttl_seconds > 0 {
            opts.ttl = Duration::from_secs(r.ttl_seconds);
        }
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
        caller(&req, self.td(), "Zones.Leave", OPERATOR)?;
        let name = req.into_inner().name;
        Ok(reply(&self.write(Command::RemoveZone { name }).await?))
    }

    async fn bundle(
        &self,
        _req: Request<proto::Empty>,
    ) -> Result<Response<proto::BundleReply>, Status> {
        Ok(Response::new(proto::BundleReply {
            bundle_pem: self.bundle_pem(),
        }))
    }
}
