//! Watch: the ordered change stream proxies live on, and their acks.

use super::*;

// === Watch ===

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

fn event_to(e: state::Event, snapshot: bool) -> proto::WatchEvent {
    proto::WatchEvent {
        revision: e.revision,
        kind: e.kind,
        key: e.key,
        deleted: e.value.is_none(),
        value_json: e.value.map(|v| v.to_string()).unwrap_or_default(),
        snapshot,
    }
}

#[tonic::async_trait]
impl proto::watch_server::Watch for Api {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        caller(&req, self.td(), "Watch.Watch", ANY)?;
        let from = req.into_inner().from_revision;
        let (tx, rx) = mpsc::channel(256);
        let node = self.node().clone();
        tokio::spawn(async move {
            if let Err(s) = run_watch(node, from, &tx).await {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack(
        &self,
        req: Request<proto::AckRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Watch.Ack", PROXIES)?;
        let r = req.into_inner();
        let cmd = Command::Ack {
            // The proxy is who the certificate says, whatever the body claims.
            proxy: id.to_string(),
            ack: state::ProxyAck {
                revision: r.revision,
                rejected: r.rejected,
            },
        };
        Ok(reply(&self.write(&id, cmd).await?))
    }

    async fn proxies(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::ProxyList>, Status> {
        caller(&req, self.td(), "Watch.Proxies", OPERATOR_OR_SERVER)?;
        self.read_barrier(Some(req.get_ref())).await?;
        let (revision, acks) = self.read(state::proxy_acks)?;
        Ok(Response::new(proto::ProxyList {
            revision,
            proxies: acks
                .into_iter()
                .map(|(proxy, a)| proto::ProxyStatus {
                    proxy,
                    revision: a.revision,
                    rejected: a.rejected,
                })
                .collect(),
        }))
    }
}

/// Sends the snapshot (when needed) and then every event in revision order.
/// The events come from the replicated history, so a client that reconnects
/// to any server with the last revision it saw gets each event exactly once.
async fn run_watch(
    node: NodeHandle,
    from: u64,
    tx: &mpsc::Sender<Result<proto::WatchEvent, Status>>,
) -> Result<(), Status> {
    let db = node.db().clone();
    let mut last = from;
    let needs_snapshot = from == 0
        || state::events_after(&db, from, 1)
            .map_err(to_status)?
            .is_none();
    if needs_snapshot {
        let (rev, events) = state::snapshot_events(&db).map_err(to_status)?;
        for e in events {
            if tx.send(Ok(event_to(e, true))).await.is_err() {
                return Ok(());
            }
        }
        // Marks the end of the snapshot, so an empty store is visible too.
        let sync = proto::WatchEvent {
            revision: rev,
            kind: "sync".into(),
            snapshot: true,
            ..Default::default()
        };
        if tx.send(Ok(sync)).await.is_err() {
            return Ok(());
        }
        last = rev;
    }
    let mut status = node.subscribe();
    loop {
        let batch = state::events_after(&db, last, 1024)
            .map_err(to_status)?
            .ok_or_else(|| {
                Status::out_of_range(format!(
                    "revision {last} is older than the history this server keeps; watch again from 0"
                ))
            })?;
        let full = batch.len() == 1024;
        for e in batch {
            last = e.revision;
            if tx.send(Ok(event_to(e, false))).await.is_err() {
                return Ok(());
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            r = status.wait_for(|s| s.revision > last || !s.running) => {
                if r.map(|s| !s.running).unwrap_or(true) {
                    return Err(Status::unavailable("the server is stopping; watch again from the last revision"));
                }
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}
