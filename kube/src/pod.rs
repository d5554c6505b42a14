//! A pod's agent (`trellis agent --kubernetes`): its configuration from the
//! environment and files the injected pod spec gives it, and its first
//! identity from the token exchange.
//!
//! The environment (names shared with `trellis inject`):
//!
//! | variable | what |
//! | --- | --- |
//! | `TRELLIS_POD_NAME`, `TRELLIS_POD_NAMESPACE`, `TRELLIS_POD_IP`, `TRELLIS_SERVICE_ACCOUNT` | the pod (downward API) |
//! | `TRELLIS_ZONE` | the cluster's zone |
//! | `TRELLIS_TOKEN_EXCHANGE` | `https://…/v1/exchange` on the zone controller |
//! | `TRELLIS_TRUST_ROOT_FINGERPRINT` | SHA-256 (hex) of the mesh root, DER |
//! | `TRELLIS_PORTS` | the app's ports, `8080/http,9090/grpc` (protocol optional) |
//! | `TRELLIS_TOKEN_FILE` | default `/var/run/secrets/trellis/serviceaccount/token` |
//! | `TRELLIS_POD_LABELS_FILE` | default `/etc/trellis/pod/labels` |
//! | `TRELLIS_DATA_DIR` | default `/var/lib/trellis/agent` (an `emptyDir`) |
//! | `TRELLIS_INBOUND`, `TRELLIS_ADMIN`, `TRELLIS_DNS`, `TRELLIS_DNS_FORWARD` | listen addresses; defaults `0.0.0.0:15006`, `0.0.0.0:15020` (the kubelet probes it), `127.0.0.1:8600`, resolv.conf |

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_agent::AgentConfig;
use trellis_federation::token::JoinToken;

use crate::error::KubeError;
use crate::exchange::{self, ExchangeRequest};

/// Where the projected token is mounted (volume `trellis-token`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/trellis/serviceaccount/token";
/// Where the downward API writes the pod's labels.
pub const DEFAULT_LABELS_FILE: &str = "/etc/trellis/pod/labels";
/// The agent's data directory in a pod.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/trellis/agent";
/// How long the agent keeps trying a controller that does not answer
/// (starting, rolling) before it gives up and the kubelet restarts it.
const EXCHANGE_PATIENCE: Duration = Duration::from_secs(60);
/// What the first exchange learnt, kept beside the credentials so that a
/// restarted agent container needs no second exchange.
const STATE_FILE: &str = "kubernetes.json";

/// The pod as its environment describes it.
#[derive(Debug, Clone)]
pub struct PodEnv {
    /// `TRELLIS_POD_NAME`.
    pub pod: String,
    /// `TRELLIS_POD_NAMESPACE`.
    pub namespace: String,
    /// `TRELLIS_POD_IP`.
    pub ip: IpAddr,
    /// `TRELLIS_SERVICE_ACCOUNT`.
    pub account: String,
    /// `TRELLIS_ZONE`.
    pub zone: String,
    /// `TRELLIS_TOKEN_EXCHANGE`.
    pub exchange: String,
    /// `TRELLIS_TRUST_ROOT_FINGERPRINT`.
    pub fingerprint: String,
    /// `TRELLIS_PORTS`: port and declared protocol (None: detect).
    pub ports: Vec<(u16, Option<String>)>,
    /// `TRELLIS_TOKEN_FILE`.
    pub token_file: PathBuf,
    /// `TRELLIS_POD_LABELS_FILE`.
    pub labels_file: PathBuf,
    /// `TRELLIS_DATA_DIR`.
    pub data_dir: PathBuf,
    /// `TRELLIS_INBOUND`.
    pub inbound: SocketAddr,
    /// `TRELLIS_ADMIN`.
    pub admin: SocketAddr,
    /// `TRELLIS_DNS`.
    pub dns: SocketAddr,
    /// `TRELLIS_DNS_FORWARD`.
    pub dns_forward: Option<SocketAddr>,
}

/// What the exchange taught, kept in the data directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Learnt {
    servers: Vec<String>,
    trust_domain: String,
}

// === impl PodEnv ===

impl PodEnv {
    /// Reads the environment through `var` (injectable, so tests never
    /// touch the process environment), naming the variable at fault.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let need = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| KubeError::config(k, "must be set (the injected pod spec sets it)"))
        };
        let addr = |k: &str, default: &str| -> Result<SocketAddr, KubeError> {
            let v = var(k).unwrap_or_else(|| default.to_string());
            v.trim()
                .parse()
                .map_err(|e| KubeError::config(k, format!("{v:?}: {e} (ip:port)")))
        };
        let ip_text = need("TRELLIS_POD_IP")?;
        let ip = ip_text
            .parse()
            .map_err(|e| KubeError::config("TRELLIS_POD_IP", format!("{ip_text:?}: {e}")))?;
        let ports = parse_ports(&var("TRELLIS_PORTS").unwrap_or_default())?;
        let dns_forward = match var("TRELLIS_DNS_FORWARD").filter(|v| !v.trim().is_empty()) {
            Some(_) => Some(addr("TRELLIS_DNS_FORWARD", "")?),
            None => None,
        };
        Ok(Self {
            pod: need("TRELLIS_POD_NAME")?,
            namespace: need("TRELLIS_POD_NAMESPACE")?,
            ip,
            account: need("TRELLIS_SERVICE_ACCOUNT")?,
            zone: need("TRELLIS_ZONE")?,
            exchange: need("TRELLIS_TOKEN_EXCHANGE")?,
            fingerprint: need("TRELLIS_TRUST_ROOT_FINGERPRINT")?,
            ports,
            token_file: var("TRELLIS_TOKEN_FILE")
                .unwrap_or_else(|| DEFAULT_TOKEN_FILE.into())
                .into(),
            labels_file: var("TRELLIS_POD_LABELS_FILE")
                .unwrap_or_else(|| DEFAULT_LABELS_FILE.into())
                .into(),
            data_dir: var("TRELLIS_DATA_DIR")
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into())
                .into(),
            inbound: addr("TRELLIS_INBOUND", "0.0.0.0:15006")?,
            admin: addr("TRELLIS_ADMIN", "0.0.0.0:15020")?,
            dns: addr("TRELLIS_DNS", "127.0.0.1:8600")?,
            dns_forward,
        })
    }

    /// The agent's name in the zone.
    pub fn agent_name(&self) -> String {
        exchange::agent_name(&self.namespace, &self.pod)
    }

    /// The service this pod serves: its `app.kubernetes.io/name` label, else
    /// its `app` label.
    pub fn service_name(labels: &BTreeMap<String, String>) -> Result<String, KubeError> {
        labels
            .get("app.kubernetes.io/name")
            .or_else(|| labels.get("app"))
            .cloned()
            .ok_or_else(|| {
                KubeError::config(
                    "pod labels",
                    "neither app.kubernetes.io/name nor app names the service this pod serves",
                )
            })
    }

    /// The agent configuration for this pod, with `servers`, trust domain
    /// and (first start) join token from the exchange.
    pub fn agent_config(
        &self,
        labels: &BTreeMap<String, String>,
        servers: &[String],
        trust_domain: &str,
        join_token: Option<&str>,
    ) -> Result<AgentConfig, KubeError> {
        // A pod with no ports (a Job, a CronJob's run) only calls: it still
        // needs its identity, and a name even without an app label.
        let name = match Self::service_name(labels) {
            Err(_) if self.ports.is_empty() => self.account.clone(),
            r => r?,
        };
        let proto = |p: &Option<String>| p.clone().unwrap_or_else(|| "detect".into());
        let first = self
            .ports
            .first()
            .map_or_else(|| "detect".into(), |(_, p)| proto(p));
        let mut port_protocols = toml::Table::new();
        for (port, p) in self.ports.iter().skip(1) {
            if proto(p) != first {
                port_protocols.insert(port.to_string(), toml::Value::String(proto(p)));
            }
        }
        let mut svc_labels = toml::Table::new();
        for k in ["version", "app.kubernetes.io/version"] {
            if let Some(v) = labels.get(k) {
                svc_labels.insert("version".into(), toml::Value::String(v.clone()));
            }
        }
        let mut service = toml::Table::new();
        service.insert("name".into(), name.into());
        service.insert("namespace".into(), self.namespace.clone().into());
        service.insert("account".into(), self.account.clone().into());
        service.insert(
            "ports".into(),
            toml::Value::Array(
                self.ports
                    .iter()
                    .map(|(p, _)| toml::Value::Integer(i64::from(*p)))
                    .collect(),
            ),
        );
        service.insert("protocol".into(), first.into());
        service.insert("port_protocols".into(), port_protocols.into());
        service.insert("labels".into(), svc_labels.into());
        let mut t = toml::Table::new();
        t.insert("name".into(), self.agent_name().into());
        t.insert("zone".into(), self.zone.clone().into());
        t.insert("trust_domain".into(), trust_domain.into());
        t.insert(
            "servers".into(),
            toml::Value::Array(servers.iter().map(|s| s.clone().into()).collect()),
        );
        t.insert(
            "data_dir".into(),
            self.data_dir.display().to_string().into(),
        );
        t.insert("advertise".into(), self.ip.to_string().into());
        t.insert("inbound".into(), self.inbound.to_string().into());
        t.insert("admin".into(), self.admin.to_string().into());
        t.insert("dns".into(), self.dns.to_string().into());
        if let Some(f) = self.dns_forward {
            t.insert("dns_forward".into(), f.to_string().into());
        }
        t.insert(
            "services".into(),
            toml::Value::Array(vec![toml::Value::Table(service)]),
        );
        let text =
            toml::to_string(&t).map_err(|e| KubeError::config("agent config", e.to_string()))?;
        let mut cfg = AgentConfig::from_toml(&text).map_err(|e| KubeError::Config {
            field: e.field,
            reason: e.reason,
        })?;
        cfg.join_token = join_token.map(str::to_string);
        Ok(cfg)
    }
}

/// `8080/http,9090/grpc,5432` → ports with their declared protocols.
pub fn parse_ports(text: &str) -> Result<Vec<(u16, Option<String>)>, KubeError> {
    let mut out: Vec<(u16, Option<String>)> = Vec::new();
    for (i, item) in text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let field = || format!("TRELLIS_PORTS[{i}]");
        let (port, proto) = match item.split_once('/') {
            Some((p, proto)) => (p, Some(proto.trim().to_ascii_lowercase())),
            None => (item, None),
        };
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                KubeError::config(field(), format!("{item:?}: the port is not 1-65535"))
            })?;
        if let Some(p) = &proto
            && !["detect", "http", "http2", "grpc", "tcp"].contains(&p.as_str())
        {
            return Err(KubeError::config(
                field(),
                format!("{item:?}: protocol {p:?} is not detect, http, http2, grpc or tcp"),
            ));
        }
        if out.iter().any(|(q, _)| *q == port) {
            return Err(KubeError::config(
                field(),
                format!("port {port} is listed twice"),
            ));
        }
        out.push((port, proto));
    }
    Ok(out)
}

/// Parses the downward API's labels file: `key="value"` per line, values
/// quoted and escaped as Go's `%q` does.
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let inner = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match (c, chars.clone().next()) {
                    ('\\', Some(n @ ('"' | '\\'))) => {
                        out.push(n);
                        chars.next();
                    }
                    _ => out.push(c),
                }
            }
            (k.trim().to_string(), out)
        })
        .collect()
}

fn read(path: &Path) -> Result<String, KubeError> {
    std::fs::read_to_string(path).map_err(|source| KubeError::File {
        path: path.display().to_string(),
        source,
    })
}

fn has_credentials(prefix: &Path) -> bool {
    let (crt, key, bundle) = trellis_ca::credential_paths(prefix);
    crt.exists() && key.exists() && bundle.exists()
}

/// The pod agent's configuration: from what an earlier start kept when its
/// credentials are all there, otherwise after a token exchange (the join
/// itself is the agent's ordinary bootstrap, with the minted token).
pub async fn prepare(env: &PodEnv) -> Result<AgentConfig, KubeError> {
    let labels = parse_labels(&read(&env.labels_file)?);
    let state_path = env.data_dir.join(STATE_FILE);
    if let Ok(text) = std::fs::read_to_string(&state_path)
        && let Ok(learnt) = serde_json::from_str::<Learnt>(&text)
    {
        let cfg = env.agent_config(&labels, &learnt.servers, &learnt.trust_domain, None)?;
        let all = has_credentials(&cfg.node_credentials())
            && cfg
                .services
                .iter()
                .all(|s| has_credentials(&cfg.credentials_of(s)));
        if all {
            tracing::info!(dir = %env.data_dir.display(), "credentials from an earlier start; no exchange");
            return Ok(cfg);
        }
    }
    let reply = exchange_with_patience(env).await?;
    let token = JoinToken::parse(&reply.join_token).map_err(|e| KubeError::Exchange {
        url: env.exchange.clone(),
        reason: format!("the minted token: {e}"),
    })?;
    if token.ca_fingerprint != env.fingerprint.trim().to_ascii_lowercase() {
        return Err(KubeError::Exchange {
            url: env.exchange.clone(),
            reason: "the minted token names another root than TRELLIS_TRUST_ROOT_FINGERPRINT"
                .into(),
        });
    }
    tracing::info!(agent = %reply.name, workload = %reply.workload, "token exchange: identity granted; joining");
    let cfg = env.agent_config(
        &labels,
        &token.servers,
        &token.trust_domain,
        Some(&reply.join_token),
    )?;
    trellis_ca::files::create_private_dir(&env.data_dir).map_err(|e| KubeError::File {
        path: env.data_dir.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let learnt = Learnt {
        servers: token.servers.clone(),
        trust_domain: token.trust_domain.clone(),
    };
    std::fs::write(&state_path, serde_json::to_vec(&learnt).unwrap_or_default()).map_err(
        |source| KubeError::File {
            path: state_path.display().to_string(),
            source,
        },
    )?;
    Ok(cfg)
}

/// One exchange, retried while the controller is unreachable or says
/// `unavailable`; a refusal is final.
async fn exchange_with_patience(env: &PodEnv) -> Result<exchange::ExchangeReply, KubeError> {
    let deadline = tokio::time::Instant::now() + EXCHANGE_PATIENCE;
    let mut wait = Duration::from_millis(200);
    loop {
        // Read afresh each time: the kubelet rotates the projected token.
        let token = read(&env.token_file)?.trim().to_string();
        let ask = ExchangeRequest {
            token,
            namespace: env.namespace.clone(),
            pod: env.pod.clone(),
        };
        let r = exchange::request(&env.exchange, &env.fingerprint, &env.zone, &ask).await;
        let retry = match &r {
            Ok(_) => false,
            Err(KubeError::Refused { reason, .. }) => reason == "unavailable",
            Err(KubeError::Exchange { .. }) => true,
            Err(_) => false,
        };
        if !retry || tokio::time::Instant::now() + wait > deadline {
            return r;
        }
        if let Err(e) = &r {
            tracing::warn!(error = %e, "token exchange failed; retrying");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(extra: &[(&str, &str)]) -> Result<PodEnv, KubeError> {
        let mut m: BTreeMap<String, String> = [
            ("TRELLIS_POD_NAME", "web-7d9f-abcde"),
            ("TRELLIS_POD_NAMESPACE", "shop"),
            ("TRELLIS_POD_IP", "10.244.1.7"),
            ("TRELLIS_SERVICE_ACCOUNT", "web"),
            ("TRELLIS_ZONE", "k8s"),
            (
                "TRELLIS_TOKEN_EXCHANGE",
                "https://trellis-controller.trellis-system.svc:15012/v1/exchange",
            ),
            ("TRELLIS_TRUST_ROOT_FINGERPRINT", &"ab".repeat(32)),
            ("TRELLIS_PORTS", "8080/http,9090/grpc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            if v.is_empty() {
                m.remove(*k);
            } else {
                m.insert(k.to_string(), v.to_string());
            }
        }
        PodEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn config_from_the_pod() {
        let e = env(&[]).unwrap();
        let labels = parse_labels(
            "app.kubernetes.io/name=\"web\"\npod-template-hash=\"7d9f\"\nversion=\"v\\\"2\"\n",
        );
        assert_eq!(labels["version"], "v\"2");
        let cfg = e
            .agent_config(
                &labels,
                &["10.0.0.1:7400".into()],
                "trellis.local",
                Some("ta1:x"),
            )
            .unwrap();
        assert!(cfg.name.starts_with("web-7d9f-abcde-"), "{}", cfg.name);
        assert_ne!(
            exchange::agent_name("c", "a-b"),
            exchange::agent_name("b-c", "a"),
            "names of different pods never meet"
        );
        let long = exchange::agent_name("shop", &"x".repeat(253));
        assert!(long.len() <= 63, "{long}");
        let s = &cfg.services[0];
        assert_eq!(
            (s.name.as_str(), s.namespace.as_str(), s.account()),
            ("web", "shop", "web")
        );
        assert_eq!(s.ports, vec![8080, 9090]);
        assert_eq!(s.protocol, "http");
        assert_eq!(cfg.advertise, Some("10.244.1.7".parse().unwrap()));
    }

    #[test]
    fn refusals_name_the_variable() {
        let err = env(&[("TRELLIS_ZONE", "")]).unwrap_err().to_string();
        assert!(err.contains("TRELLIS_ZONE"), "{err}");
        let err = env(&[("TRELLIS_PORTS", "8080/smtp")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TRELLIS_PORTS[0]") && err.contains("smtp"),
            "{err}"
        );
        let err = env(&[("TRELLIS_POD_IP", "nope")]).unwrap_err().to_string();
        assert!(err.contains("TRELLIS_POD_IP"), "{err}");
        let e = env(&[]).unwrap();
        let err = e
            .agent_config(&BTreeMap::new(), &["a:1".into()], "trellis.local", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("app.kubernetes.io/name"), "{err}");
    }

    #[test]
    fn a_pod_without_ports_only_calls() {
        // A Job's pod: no containerPorts, and only the labels Kubernetes gives it.
        let e = env(&[("TRELLIS_PORTS", "")]).unwrap();
        let labels = parse_labels("batch.kubernetes.io/job-name=\"nightly\"\n");
        let cfg = e
            .agent_config(&labels, &["10.0.0.1:7400".into()], "trellis.local", None)
            .unwrap();
        let s = &cfg.services[0];
        assert!(s.ports.is_empty());
        assert_eq!((s.name.as_str(), s.account()), ("web", "web"));
    }
}
