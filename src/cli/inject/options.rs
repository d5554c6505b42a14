//! What the injected agent is given, the names the zone controller and the
//! agent's `--kubernetes` mode agree on, and the flags that set them (shared
//! by `trellis inject` and `trellis webhook`).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

use crate::cli::UsageError;

/// The pod annotation or label that opts a pod (or, as a label, a
/// namespace) in: `enabled` or `disabled`.
pub(crate) const ANNOTATION_INJECT: &str = trellis_kube::INJECT_LABEL;
/// Per-port protocols: `8080=http,9090=grpc,5432=tcp`.
pub(crate) const ANNOTATION_PORT_PROTOCOLS: &str = "trellis.io/port-protocols";
/// Set on injected pods, to [`INJECTED_TRUE`]; the zone controller reads
/// it (`trellis_kube::INJECTED_ANNOTATION`).
pub(crate) const ANNOTATION_INJECTED: &str = trellis_kube::INJECTED_ANNOTATION;
/// The only value the zone controller takes for "this pod's agent
/// registers it".
pub(crate) const INJECTED_TRUE: &str = "true";
/// The agent's container name; its presence means "already injected".
pub(crate) const AGENT_CONTAINER: &str = "trellis-agent";
/// The projected service-account token volume (agreed with the controller).
pub(crate) const TOKEN_VOLUME: &str = "trellis-token";
/// Its mount point: the token is `TOKEN_DIR/token`.
pub(crate) const TOKEN_DIR: &str = "/var/run/secrets/trellis/serviceaccount";
/// The audience the token is bound to; the TokenReview asks for it.
pub(crate) const TOKEN_AUDIENCE: &str = trellis_kube::AUDIENCE;
/// Short-lived: the kubelet renews it at 80 % of this.
pub(crate) const TOKEN_EXPIRATION_SECONDS: u32 = 3600;
/// The downward-API volume: `labels` and `annotations` files.
pub(crate) const PODINFO_VOLUME: &str = "trellis-pod-info";
/// Its mount point: the labels are `LABELS_DIR/labels`.
pub(crate) const LABELS_DIR: &str = "/etc/trellis/pod";
/// The agent's keys and certificates (memory-backed emptyDir).
pub(crate) const DATA_VOLUME: &str = "trellis-data";
/// The agent's data directory (its default).
pub(crate) const DATA_DIR: &str = trellis_kube::pod::DEFAULT_DATA_DIR;
/// Where the agent answers DNS in the pod: the pod's first nameserver.
pub(crate) const AGENT_DNS: &str = "127.0.0.1:53";
/// The agent's inbound (mutual TLS from other agents and gateways).
pub(crate) const INBOUND_PORT: u16 = 15006;
/// The agent's admin port: `/ready` (the probes) and `/metrics`.
pub(crate) const ADMIN_PORT: u16 = 15020;

/// The image `--image` defaults to (built by `packaging/image/build`).
pub(crate) const DEFAULT_IMAGE: &str = concat!("trellis:", env!("CARGO_PKG_VERSION"));

/// Flags that shape the injected agent.
#[derive(Debug, Clone, Args)]
pub(crate) struct InjectFlags {
    /// The agent's image (built by packaging/image/build).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub(crate) image: String,
    /// The agent container's imagePullPolicy (the cluster's default if unset).
    #[arg(long, value_parser = ["Always", "IfNotPresent", "Never"])]
    pub(crate) image_pull_policy: Option<String>,
    /// The zone this cluster is in the mesh.
    #[arg(long, env = "TRELLIS_ZONE")]
    pub(crate) zone: String,
    /// The zone controller's token-exchange URL, where the agent trades its
    /// service-account token for its certificate.
    #[arg(
        long,
        default_value = "https://trellis-controller.trellis-system.svc:15012/v1/exchange"
    )]
    pub(crate) token_exchange: String,
    /// SHA-256 of the mesh root certificate (64 hex digits): the agent
    /// trusts the exchange only if it presents a chain to that root.
    #[arg(
        long,
        conflicts_with = "trust_bundle",
        required_unless_present = "trust_bundle"
    )]
    pub(crate) trust_root_fingerprint: Option<String>,
    /// The mesh trust bundle (e.g. CA_DIR/bundle.pem): its first root's
    /// fingerprint is given to the agent.
    #[arg(long)]
    pub(crate) trust_bundle: Option<PathBuf>,
    /// Add the agent as a native sidecar (an init container with
    /// restartPolicy Always, Kubernetes >= 1.29); false: a classic container.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) native_sidecar: bool,
    /// The cluster DNS service's address (`kubectl -n kube-system get
    /// service kube-dns`): the agent forwards names outside the mesh there.
    /// Default: `trellis inject`, 10.96.0.10 (kubeadm's); `trellis
    /// webhook`, the first nameserver of its own pod's resolv.conf.
    #[arg(long)]
    pub(crate) cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub(crate) cluster_domain: String,
    /// The agent's CPU request.
    #[arg(long, default_value = "20m")]
    pub(crate) agent_cpu_request: String,
    /// The agent's memory request.
    #[arg(long, default_value = "48Mi")]
    pub(crate) agent_memory_request: String,
    /// The agent's memory limit ("none" for no limit).
    #[arg(long, default_value = "256Mi")]
    pub(crate) agent_memory_limit: String,
    /// The agent's user and group ID (the image's non-root user).
    #[arg(long, default_value_t = 65532)]
    pub(crate) agent_uid: i64,
}

/// The checked form of [`InjectFlags`].
#[derive(Debug, Clone)]
pub(crate) struct InjectOptions {
    pub(crate) image: String,
    pub(crate) image_pull_policy: Option<String>,
    pub(crate) zone: String,
    pub(crate) token_exchange: String,
    pub(crate) trust_root_fingerprint: String,
    pub(crate) native_sidecar: bool,
    pub(crate) cluster_dns: IpAddr,
    pub(crate) cluster_domain: String,
    pub(crate) cpu_request: String,
    pub(crate) memory_request: String,
    pub(crate) memory_limit: Option<String>,
    pub(crate) uid: i64,
}

// === impl InjectFlags ===

impl InjectFlags {
    /// Checks every flag, naming the one that is wrong; without
    /// --cluster-dns, kubeadm's default cluster DNS address.
    pub(crate) fn options(&self) -> Result<InjectOptions, UsageError> {
        self.options_with_dns(|| KUBEADM_CLUSTER_DNS)
    }

    /// As [`InjectFlags::options`], for a process that runs in a
    /// `ClusterFirst` pod (the webhook): without --cluster-dns, the first
    /// nameserver of its own resolv.conf, which is the cluster DNS.
    pub(crate) fn options_in_cluster(&self) -> Result<InjectOptions, UsageError> {
        self.options_with_dns(pod_cluster_dns)
    }

    fn options_with_dns(
        &self,
        default_dns: impl FnOnce() -> IpAddr,
    ) -> Result<InjectOptions, UsageError> {
        let bad = |flag: &str, reason: String| UsageError(format!("--{flag}: {reason}"));
        if self.image.trim().is_empty() || self.image.contains(char::is_whitespace) {
            return Err(bad(
                "image",
                format!("{:?} is not an image reference", self.image),
            ));
        }
        // A zone is a SPIFFE path segment (its CA names it so).
        if self.zone.is_empty() || self.zone.contains('/') {
            return Err(bad("zone", format!("{:?} is not a zone name", self.zone)));
        }
        format!("spiffe://x/zone/{}", self.zone)
            .parse::<trellis_ca::SpiffeId>()
            .map_err(|e| bad("zone", format!("{:?} is not a zone name: {e}", self.zone)))?;
        if !self.token_exchange.starts_with("https://") {
            return Err(bad(
                "token-exchange",
                format!(
                    "{:?} must be an https:// URL (the service-account token travels on it)",
                    self.token_exchange
                ),
            ));
        }
        let fingerprint = match (&self.trust_root_fingerprint, &self.trust_bundle) {
            (Some(f), _) => {
                let f = f.to_ascii_lowercase();
                if f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(
                        "trust-root-fingerprint",
                        "must be 64 hex digits (SHA-256 of the root certificate)".into(),
                    ));
                }
                f
            }
            (None, Some(path)) => bundle_fingerprint(path)?,
            (None, None) => {
                return Err(UsageError(
                    "give --trust-root-fingerprint or --trust-bundle".into(),
                ));
            }
        };
        let domain = self.cluster_domain.trim_end_matches('.');
        if domain.is_empty()
            || !domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            return Err(bad(
                "cluster-domain",
                format!("{:?} is not a DNS domain", self.cluster_domain),
            ));
        }
        for (flag, q) in [
            ("agent-cpu-request", &self.agent_cpu_request),
            ("agent-memory-request", &self.agent_memory_request),
            ("agent-memory-limit", &self.agent_memory_limit),
        ] {
            let no_limit = flag == "agent-memory-limit" && q == "none";
            if !no_limit && !is_quantity(q) {
                return Err(bad(
                    flag,
                    format!("{q:?} is not a Kubernetes quantity (e.g. 20m, 48Mi)"),
                ));
            }
        }
        if self.agent_uid <= 0 {
            return Err(bad("agent-uid", "must be a non-root user ID (> 0)".into()));
        }
        Ok(InjectOptions {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            zone: self.zone.clone(),
            token_exchange: self.token_exchange.clone(),
            trust_root_fingerprint: fingerprint,
            native_sidecar: self.native_sidecar,
            cluster_dns: self.cluster_dns.unwrap_or_else(default_dns),
            cluster_domain: domain.to_owned(),
            cpu_request: self.agent_cpu_request.clone(),
            memory_request: self.agent_memory_request.clone(),
            memory_limit: (self.agent_memory_limit != "none")
                .then(|| self.agent_memory_limit.clone()),
            uid: self.agent_uid,
        })
    }
}

/// SHA-256 (hex) of the first certificate in a PEM bundle.
fn bundle_fingerprint(path: &std::path::Path) -> Result<String, UsageError> {
    let bad = |reason: String| UsageError(format!("--trust-bundle {}: {reason}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(format!("could not read it: {e}")))?;
    let certs =
        trellis_ca::certs_from_pem(&pem, "the trust bundle").map_err(|e| bad(e.to_string()))?;
    let root = certs
        .first()
        .ok_or_else(|| bad("holds no certificate".into()))?;
    Ok(trellis_federation::token::sha256_hex(root.as_ref()))
}

/// kubeadm's cluster DNS Service address (the default service CIDR's .10).
pub(crate) const KUBEADM_CLUSTER_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10));

/// Inside a `ClusterFirst` pod (where the webhook runs) the first
/// nameserver is the cluster DNS service; elsewhere kubeadm's default
/// stands in.
fn pod_cluster_dns() -> IpAddr {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| {
            t.lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                .find(|ip| !ip.is_loopback())
        })
        .unwrap_or(KUBEADM_CLUSTER_DNS)
}

/// A Kubernetes resource quantity: a decimal number and an optional suffix.
fn is_quantity(q: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    SUFFIXES.iter().any(|s| {
        q.strip_suffix(s).is_some_and(|n| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && n.bytes().filter(|b| *b == b'.').count() <= 1
                && n.bytes().any(|b| b.is_ascii_digit())
        })
    })
}
