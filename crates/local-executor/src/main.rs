//! The local Job executor: a development and test tool, NOT part of the operator.
//!
//! The local control plane has no kubelet, so nothing would run the operator's copy and remove
//! Jobs. This program stands in for the Job controller and the kubelet together: it watches Jobs
//! labelled `app.kubernetes.io/managed-by=templatecache`, runs each Job's container arguments
//! with a local `templatecache` binary, maps paths under the container's volume mounts to the
//! Job's `hostPath` volumes, fills `secretKeyRef` variables from the Secrets, and writes the
//! Job's status as the Job controller would. A deleted Job has its process killed.
//!
//!     templatecache-local-executor --templatecache target/debug/templatecache [--namespace NS]
//!         [--as-job-service-account]

use templatecache_local_executor::{identity, job_status};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::process::Command;
use tracing::{info, warn};

#[derive(Parser, Clone)]
struct Args {
    /// The `templatecache` binary to run Jobs with.
    #[arg(long)]
    templatecache: PathBuf,
    /// Run only the Jobs of this namespace (all namespaces when unset).
    #[arg(long)]
    namespace: Option<String>,
    /// Run each Job's process with a token of the Job's ServiceAccount, as a kubelet would,
    /// instead of with the executor's own credentials.
    #[arg(long)]
    as_job_service_account: bool,
}

/// Jobs running now, by UID, with the handle that kills their process.
type Running = Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: cannot reach the Kubernetes API: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let jobs: Api<Job> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = "app.kubernetes.io/managed-by=templatecache";
    let running: Running = Arc::default();
    let mut events = std::pin::pin!(watcher(jobs, watcher::Config::default().labels(selector)));
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(job) | Event::InitApply(job)) => {
                start_if_new(&client, &args, &running, job);
            }
            Ok(Event::Delete(job)) => kill(&running, &job),
            Ok(_) => {}
            Err(e) => warn!("watching Jobs: {e}"),
        }
    }
    std::process::ExitCode::SUCCESS
}

fn watcher(
    api: Api<Job>,
    config: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<Event<Job>>> {
    kube::runtime::watcher(api, config)
}

fn is_finished(job: &Job) -> bool {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_deref());
    conditions
        .unwrap_or_default()
        .iter()
        .any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
}

fn start_if_new(client: &Client, args: &Args, running: &Running, job: Job) {
    let uid = job.uid().unwrap_or_default();
    if is_finished(&job) || job.metadata.deletion_timestamp.is_some() {
        return;
    }
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    {
        let mut map = running.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&uid) {
            return;
        }
        map.insert(uid.clone(), kill_tx);
    }
    let (client, args, running) = (client.clone(), args.clone(), running.clone());
    tokio::spawn(async move {
        let namespace = job.namespace().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
        let outcome = run_job(&client, &args, &jobs, &job, kill_rx).await;
        match outcome {
            Ok(Some((succeeded, message))) => {
                if let Err(e) = job_status::mark_finished(&jobs, &job, succeeded, &message).await {
                    warn!(job = %job.name_any(), "writing the final status: {e}");
                }
            }
            Ok(None) => info!(job = %job.name_any(), "killed: the Job was deleted"),
            Err(e) => warn!(job = %job.name_any(), "could not run: {e}"),
        }
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&uid);
    });
}

fn kill(running: &Running, job: &Job) {
    let uid = job.uid().unwrap_or_default();
    if let Some(tx) = running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&uid)
    {
        let _ = tx.send(());
    }
}

/// Runs the Job's one container; `None` when it was killed.
async fn run_job(
    client: &Client,
    args: &Args,
    jobs: &Api<Job>,
    job: &Job,
    kill: tokio::sync::oneshot::Receiver<()>,
) -> Result<Option<(bool, String)>, String> {
    let pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or("the Job has no pod spec")?;
    let container = pod.containers.first().ok_or("the Job has no container")?;
    let namespace = job.namespace().unwrap_or_default();
    let mut command = Command::new(&args.templatecache);
    command.args(container_args(pod, container)?);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        command.env_remove(var);
    }
    for (name, value) in resolve_env(client, &namespace, container).await? {
        command.env(name, value);
    }
    // Kept until the process ends; the file is removed when this is dropped.
    let _identity = if args.as_job_service_account {
        let account = pod.service_account_name.as_deref().unwrap_or("default");
        let uid = job.uid().unwrap_or_default();
        let own = kube::config::Kubeconfig::read()
            .map_err(|e| format!("reading the executor's kubeconfig: {e}"))?;
        let (pod_name, pod_uid) = create_pod(client, job).await?;
        let bound = Some((pod_name.as_str(), pod_uid.as_str()));
        let identity =
            identity::AccountKubeconfig::issue_for(client, own, &namespace, account, bound, &uid)
                .await?;
        command.env("KUBECONFIG", identity.path());
        Some(identity)
    } else {
        None
    };
    command.kill_on_drop(true);
    job_status::mark_started(jobs, job)
        .await
        .map_err(|e| e.to_string())?;
    info!(job = %job.name_any(), "running");
    let output = command.output();
    tokio::select! {
        out = output => {
            let out = out.map_err(|e| format!("cannot start {}: {e}", args.templatecache.display()))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            info!(job = %job.name_any(), success = out.status.success(), "finished: {last}");
            Ok(Some((out.status.success(), last.chars().take(300).collect())))
        }
        _ = kill => Ok(None),
    }
}

/// The Pod the Job controller would make for `job` (named `<job>-<5 random>`, owned by the
/// Job, from its template), so the process can run with a token bound to it as under a kubelet.
/// It never runs (there is no kubelet); it goes with its Job. Returns its name and uid.
async fn create_pod(client: &Client, job: &Job) -> Result<(String, String), String> {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.generate_name = Some(format!("{}-", job.name_any()));
    metadata.owner_references = Some(vec![OwnerReference {
        api_version: "batch/v1".to_owned(),
        kind: "Job".to_owned(),
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let pod = Pod {
        metadata,
        spec: template.spec,
        status: None,
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let created = pods
        .create(&Default::default(), &pod)
        .await
        .map_err(|e| format!("creating the Pod of Job {}: {e}", job.name_any()))?;
    Ok((created.name_any(), created.uid().unwrap_or_default()))
}

/// The container's arguments with every path under a volume mount moved to its hostPath (the
/// mount's `subPath` under it, created if missing, as the kubelet does).
fn container_args(pod: &PodSpec, container: &Container) -> Result<Vec<String>, String> {
    let mut mappings = vec![];
    for mount in container.volume_mounts.iter().flatten() {
        let host = (pod.volumes.iter().flatten())
            .find(|v| v.name == mount.name)
            .and_then(|v| v.host_path.as_ref());
        if let Some(host) = host {
            mappings.push((mount.mount_path.clone(), mounted_dir(&host.path, mount)?));
        }
    }
    let map_value = |value: &str| {
        for (mount, host) in &mappings {
            if let Some(rest) = value.strip_prefix(mount.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{host}{rest}");
            }
        }
        value.to_owned()
    };
    Ok(container
        .args
        .iter()
        .flatten()
        .map(|arg| match arg.split_once('=') {
            Some((flag, value)) => format!("{flag}={}", map_value(value)),
            None => map_value(arg),
        })
        .collect())
}

/// The host folder a mount shows: the volume's path, or its `subPath` under it. A subPath that
/// climbs out (`..`, absolute) is refused, as the kubelet refuses it.
fn mounted_dir(
    host: &str,
    mount: &k8s_openapi::api::core::v1::VolumeMount,
) -> Result<String, String> {
    let Some(sub) = mount.sub_path.as_deref().filter(|s| !s.is_empty()) else {
        return Ok(host.to_owned());
    };
    let path = std::path::Path::new(sub);
    if path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
        return Err(format!(
            "subPath {sub} must be a relative path inside the volume"
        ));
    }
    let dir = format!("{host}/{sub}");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating the subPath {dir}: {e}"))?;
    Ok(dir)
}

/// Plain values and optional `secretKeyRef`s, read from the Secrets as the kubelet would.
async fn resolve_env(
    client: &Client,
    namespace: &str,
    container: &Container,
) -> Result<Vec<(String, String)>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut resolved = vec![];
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten().cloned()
    {
        if let Some(value) = value {
            resolved.push((name, value));
            continue;
        }
        let Some(key_ref) = value_from.and_then(|v| v.secret_key_ref) else {
            continue;
        };
        let optional = key_ref.optional.unwrap_or(false);
        let secret = secrets
            .get_opt(&key_ref.name)
            .await
            .map_err(|e| format!("reading Secret {}: {e}", key_ref.name))?;
        let bytes = secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(&key_ref.key));
        match bytes {
            Some(bytes) => resolved.push((name, String::from_utf8_lossy(&bytes.0).into_owned())),
            None if optional => {}
            None => {
                return Err(format!(
                    "Secret {} has no key {}",
                    key_ref.name, key_ref.key
                ));
            }
        }
    }
    Ok(resolved)
}
