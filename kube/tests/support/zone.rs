//! Shared by the controller tests: a zone `k8s` with one real federation
//! server in this process, a fake Kubernetes API server, and a controller
//! run in-process against both (through a kubeconfig, over real sockets).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_ca::{CaDir, IssueOptions, TrustDomain};
use trellis_federation::client;
use trellis_federation::config::ServerConfig;
use trellis_federation::proto::{self, registry_client::RegistryClient};
use trellis_federation::server::{self, Server};
use trellis_kube::ControllerConfig;
use trellis_kube::controller::Controller;
use trellis_kube::testing::FakeApi;

pub(crate) const ZONE: &str = "k8s";

pub(crate) struct Zone {
    pub(crate) dir: TempDir,
    pub(crate) td: TrustDomain,
    pub(crate) server: Server,
    pub(crate) api: FakeApi,
    pub(crate) operator: PathBuf,
    /// Port the controller's exchange listens on.
    pub(crate) exchange_port: u16,
}

pub(crate) struct Running {
    pub(crate) stop: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<Result<(), trellis_kube::KubeError>>,
}

impl Zone {
    /// Ports `base`..`base+2` (the test's own, in 27000-27999): the
    /// server, the fake API, the exchange.
    pub(crate) async fn start(base: u16) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "test.local".parse().unwrap();
        let ca = CaDir::new(dir.path().join("ca"));
        ca.init(&td, Duration::from_secs(86400)).unwrap();
        ca.create_zone(ZONE, Duration::from_secs(86400)).unwrap();
        let listener = TcpListener::bind(("127.0.0.1", base)).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let text = format!(
            "name = \"s0\"\nzone = \"{ZONE}\"\ntrust_domain = \"test.local\"\ndata_dir = \"{}\"\nlisten = \"{addr}\"\nca_dir = \"{}\"\nbootstrap = true\n",
            dir.path().join("s0").display(),
            dir.path().join("ca").display()
        );
        let mut cfg = ServerConfig::from_toml(&text).unwrap();
        cfg.advertise = Some(addr.clone());
        cfg.validate().unwrap();
        let server = server::start_on(&cfg, listener).await.unwrap();
        for _ in 0..200 {
            if server.node.is_leader() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let api = FakeApi::start(base + 1, Duration::from_millis(300))
            .await
            .unwrap();
        let mut z = Self {
            dir,
            td,
            server,
            api,
            operator: PathBuf::new(),
            exchange_port: base + 2,
        };
        z.operator = z.creds("operator/alice");
        z
    }

    /// Credentials for `path` (a SPIFFE path), signed by its zone's CA.
    pub(crate) fn creds(&self, path: &str) -> PathBuf {
        let ca = CaDir::new(self.dir.path().join("ca"));
        let id = self.td.id(path.split('/')).unwrap();
        let auth = match id.role().and_then(|r| r.zone().map(str::to_string)) {
            Some(z) => ca.zone(&z).unwrap(),
            None => ca.root().unwrap(),
        };
        let creds = auth.issue(&id, IssueOptions::default()).unwrap();
        let prefix = self.dir.path().join(path.replace('/', "_"));
        trellis_ca::write_credentials(&prefix, &creds, &ca.bundle().unwrap()).unwrap();
        prefix
    }

    /// SHA-256 of the root, as `TRELLIS_TRUST_ROOT_FINGERPRINT` carries it.
    pub(crate) fn root_fingerprint(&self) -> String {
        let ca = CaDir::new(self.dir.path().join("ca"));
        let b = ca.bundle().unwrap();
        trellis_federation::token::sha256_hex(b.roots()[0].as_ref())
    }

    pub(crate) fn server_addr(&self) -> String {
        self.server.addr.to_string()
    }

    pub(crate) fn controller_config(&self, sync: bool) -> ControllerConfig {
        let creds = self.creds(&format!("zone/{ZONE}/controller/kube"));
        let kubeconfig = self.api.kubeconfig(self.dir.path()).unwrap();
        let text = format!(
            "name = \"kube\"\nzone = \"{ZONE}\"\ntrust_domain = \"test.local\"\nservers = [\"{}\"]\ncredentials = \"{}\"\nlisten = \"127.0.0.1:{}\"\nkubeconfig = \"{}\"\nsync = {sync}\nlease = \"30s\"\n",
            self.server_addr(),
            creds.display(),
            self.exchange_port,
            kubeconfig.display()
        );
        ControllerConfig::from_toml(&text).unwrap()
    }

    /// Starts a controller in this process.
    pub(crate) async fn controller(&self, sync: bool) -> Running {
        let c = Controller::bind(self.controller_config(sync))
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(c.run(stop.clone()));
        Running { stop, task }
    }

    pub(crate) fn exchange_url(&self) -> String {
        format!("https://127.0.0.1:{}/v1/exchange", self.exchange_port)
    }

    /// The registry as an operator reads it: (revision, endpoints).
    pub(crate) async fn registry(&self) -> (u64, Vec<proto::Endpoint>) {
        let mut r =
            RegistryClient::new(client::connect(&self.server_addr(), &self.operator).unwrap());
        let l = r
            .list(proto::ReadOptions { linearizable: true })
            .await
            .unwrap()
            .into_inner();
        (l.revision, l.endpoints)
    }

    /// Polls the registry until `check` holds; returns how long it took.
    pub(crate) async fn until(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&[proto::Endpoint]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let (_, eps) = self.registry().await;
            if check(&eps) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; registry: {eps:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Running {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The endpoint with this service and id, if registered.
pub(crate) fn find<'a>(
    eps: &'a [proto::Endpoint],
    service: &str,
    id: &str,
) -> Option<&'a proto::Endpoint> {
    eps.iter().find(|e| {
        e.key
            .as_ref()
            .is_some_and(|k| k.service == service && k.id == id)
    })
}
