//! `trellis inject`: Kubernetes YAML in, the same YAML out with the agent
//! added to every pod that opted in, as `linkerd inject` or `istioctl
//! kube-inject` do. Offline: no cluster is asked anything.
//!
//! The same mutation serves the admission webhook (`trellis webhook`), so
//! a pod admitted in an opted-in namespace is the pod this command prints.
//! What the agent gets (a native sidecar, its token, DNS, security context)
//! is in [`pod`]; the flags in [`options`]; the YAML stream in
//! [`documents`].

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::UsageError;

pub(crate) mod documents;
pub(crate) mod options;
pub(crate) mod pod;
#[cfg(test)]
mod tests;

pub(crate) use options::{InjectFlags, InjectOptions};
pub(crate) use pod::{Context as PodContext, NamespaceSays, Outcome, inject_template};

/// Add the Trellis agent to Kubernetes workloads that opt in.
///
/// A pod opts in with the annotation or label `trellis.io/inject: enabled`
/// on its template, or by its namespace's label (a Namespace document in
/// the input, or --enabled-namespace). Every kind with a pod template is
/// handled (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob,
/// Pod, and Lists of them); everything else passes through unchanged, as
/// do pods already injected. Print the result, or pipe it to `kubectl
/// apply -f -`.
#[derive(Debug, Args)]
pub(crate) struct InjectArgs {
    /// YAML files to read, `-` for standard input (the default).
    files: Vec<PathBuf>,
    /// The namespace of documents that name none (as `kubectl apply -n`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Treat pods in this namespace as opted in (repeatable).
    #[arg(long = "enabled-namespace", value_name = "NAMESPACE")]
    enabled_namespaces: Vec<String>,
    #[command(flatten)]
    flags: InjectFlags,
}

impl InjectArgs {
    pub(crate) fn run(self) -> Result<()> {
        let opts = self.flags.options()?;
        if self.flags.cluster_dns.is_none() {
            eprintln!(
                "note: pods forward names outside the mesh to {} (kubeadm's cluster DNS); \
                 if yours differs, pass --cluster-dns (kubectl -n kube-system get service kube-dns)",
                opts.cluster_dns
            );
        }
        let cx = documents::StreamContext {
            default_namespace: self.namespace,
            opted_in_namespaces: self.enabled_namespaces.into_iter().collect::<BTreeSet<_>>(),
        };
        let files = if self.files.is_empty() {
            vec![PathBuf::from("-")]
        } else {
            self.files
        };
        let mut outputs = Vec::new();
        for file in &files {
            let (source, text) = read_input(file)?;
            let mut docs =
                documents::parse_stream(&source, &text).map_err(|e| UsageError(e.to_string()))?;
            let (out, reports) = documents::inject_stream(&opts, &source, &mut docs, &cx)
                .map_err(|e| UsageError(e.to_string()))?;
            for r in reports {
                if let Some(w) = &r.warning {
                    eprintln!("warning: {source}: {}: {w}", r.what);
                }
                match r.outcome {
                    Outcome::Injected => eprintln!("{source}: {} injected", r.what),
                    Outcome::AlreadyInjected => {
                        eprintln!("{source}: {} already injected, left as it is", r.what)
                    }
                    Outcome::NotOptedIn => {
                        eprintln!(
                            "{source}: {} not opted in ({}), left as it is",
                            r.what,
                            options::ANNOTATION_INJECT
                        )
                    }
                    Outcome::Skipped(why) => {
                        eprintln!(
                            "warning: {source}: {} opted in but left as it is: {why}",
                            r.what
                        )
                    }
                }
            }
            outputs.push(out);
        }
        let joined = outputs.join("---\n");
        // One write: a half-written stream must not reach `kubectl apply`.
        outln!("{}", joined.trim_end_matches('\n'));
        Ok(())
    }
}

fn read_input(file: &PathBuf) -> Result<(String, String)> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("could not read standard input")?;
        Ok(("<stdin>".into(), text))
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("could not read {}", file.display()))?;
        Ok((file.display().to_string(), text))
    }
}
