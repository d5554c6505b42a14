//! Who a pod is: its projected service-account token checked by the API
//! server (`TokenReview`, audience-bound), then the pod it is bound to
//! checked to exist, be the same pod (uid), be alive and be opted in.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};

use crate::{INJECT_ENABLED, INJECT_LABEL};

/// `status.user.extra` keys the API server sets for a token bound to a pod.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Usernames of service accounts: `system:serviceaccount:NS:NAME`.
const SA_PREFIX: &str = "system:serviceaccount:";

/// A pod the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
    /// Its uid (a pod re-created under the same name has another).
    pub uid: String,
    /// Its service account: the workload identity's account.
    pub account: String,
}

/// Why a pod's exchange is refused. Each has a stable code the agent
/// shows (and tests match), and words that say what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The API server did not authenticate the token (expired, revoked,
    /// forged, or for another audience); its words follow.
    NotAuthenticated(String),
    /// Authenticated, but not for our audience.
    WrongAudience(Vec<String>),
    /// Not a service-account token bound to a pod (a legacy secret token).
    NotPodBound,
    /// The token's pod is not the one the request names.
    OtherPod(String),
    /// The pod no longer exists, or was re-created (another uid).
    PodGone(String),
    /// The pod is being deleted.
    PodTerminating(String),
    /// The pod has finished (Succeeded or Failed) or is Unknown.
    PodNotRunning(String),
    /// Neither the namespace nor the pod opts in to the mesh.
    NotOptedIn(String),
}

/// What [`verify`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The pod is refused.
    #[error("{0}")]
    Refused(Refusal),
    /// The API server could not be asked.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// Verifies `token` for `audience`, naming the pod `pod` in `namespace`.
pub async fn verify(
    client: &kube::Client,
    audience: &str,
    token: &str,
    namespace: &str,
    pod: &str,
) -> Result<PodIdentity, VerifyError> {
    let refuse = |r| Err(VerifyError::Refused(r));
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return refuse(Refusal::NotAuthenticated(
            status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server did not authenticate the token".into()),
        ));
    }
    // An API server that ignores spec.audiences would answer for its own
    // audience; the echo must name ours.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return refuse(Refusal::WrongAudience(audiences));
    }
    let user = status.user.unwrap_or_default();
    let Some((ns, account)) = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix(SA_PREFIX))
        .and_then(|u| u.split_once(':'))
    else {
        return refuse(Refusal::NotPodBound);
    };
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(bound_pod), Some(bound_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
        return refuse(Refusal::NotPodBound);
    };
    if ns != namespace || bound_pod != pod {
        return refuse(Refusal::OtherPod(format!(
            "the token belongs to pod {ns}/{bound_pod}, the request names {namespace}/{pod}"
        )));
    }
    let me = PodIdentity {
        namespace: ns.to_string(),
        pod: bound_pod,
        uid: bound_uid,
        account: account.to_string(),
    };
    check_pod(client, &me).await?;
    Ok(me)
}

/// The pod exists under the token's uid, is not finished or being deleted,
/// and is opted in.
async fn check_pod(client: &kube::Client, me: &PodIdentity) -> Result<(), VerifyError> {
    let refuse = |r| Err(VerifyError::Refused(r));
    let name = format!("{}/{}", me.namespace, me.pod);
    let Some(pod) = Api::<Pod>::namespaced(client.clone(), &me.namespace)
        .get_opt(&me.pod)
        .await?
    else {
        return refuse(Refusal::PodGone(name));
    };
    if pod.metadata.uid.as_deref() != Some(me.uid.as_str()) {
        return refuse(Refusal::PodGone(format!(
            "{name} was re-created (uid {}, the token's is {})",
            pod.metadata.uid.unwrap_or_default(),
            me.uid
        )));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return refuse(Refusal::PodTerminating(name));
    }
    // A native sidecar starts, and must have its identity, while the pod is
    // still Pending (its startup probe holds the app containers back), so
    // Pending is as good as Running here.
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    if phase != "Running" && phase != "Pending" {
        return refuse(Refusal::PodNotRunning(format!("{name} is {phase}")));
    }
    let opted = |m: &Option<std::collections::BTreeMap<String, String>>| {
        m.as_ref()
            .and_then(|m| m.get(INJECT_LABEL))
            .is_some_and(|v| v == INJECT_ENABLED)
    };
    if opted(&pod.metadata.labels) || opted(&pod.metadata.annotations) {
        return Ok(());
    }
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt(&me.namespace)
        .await?;
    if ns.is_some_and(|n| opted(&n.metadata.labels)) {
        return Ok(());
    }
    refuse(Refusal::NotOptedIn(me.namespace.clone()))
}

// === impl Refusal ===

impl Refusal {
    /// The stable code sent to the agent.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotAuthenticated(_) => "not-authenticated",
            Refusal::WrongAudience(_) => "wrong-audience",
            Refusal::NotPodBound => "not-pod-bound",
            Refusal::OtherPod(_) => "other-pod",
            Refusal::PodGone(_) => "pod-gone",
            Refusal::PodTerminating(_) => "pod-terminating",
            Refusal::PodNotRunning(_) => "pod-not-running",
            Refusal::NotOptedIn(_) => "namespace-not-opted-in",
        }
    }

    /// The HTTP status of the refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::NotAuthenticated(_) | Refusal::WrongAudience(_) | Refusal::NotPodBound => 401,
            _ => 403,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotAuthenticated(why) => write!(
                f,
                "the service-account token is not authenticated: {why} (is it the projected token with audience {}, and unexpired?)",
                crate::AUDIENCE
            ),
            Refusal::WrongAudience(a) => write!(
                f,
                "the token is for audiences {a:?}, not {:?}: mount a projected token with that audience",
                crate::AUDIENCE
            ),
            Refusal::NotPodBound => f.write_str(
                "not a service-account token bound to a pod (legacy secret tokens are refused): mount a projected token",
            ),
            Refusal::OtherPod(m) => write!(f, "{m}"),
            Refusal::PodGone(p) => write!(f, "pod {p} does not exist (any more)"),
            Refusal::PodTerminating(p) => write!(f, "pod {p} is terminating"),
            Refusal::PodNotRunning(m) => write!(f, "{m}: only a pending or running pod gets an identity"),
            Refusal::NotOptedIn(ns) => write!(
                f,
                "namespace {ns} is not in the mesh: label it {INJECT_LABEL}={INJECT_ENABLED} (or the pod)"
            ),
        }
    }
}
