//! Job status written the way the Job controller writes it, with the conditions Kubernetes' Job
//! status validation requires (`SuccessCriteriaMet` before `Complete`, `FailureTarget` before
//! `Failed`, `startTime` on every finished Job, `completionTime` only on complete ones): for the
//! suites on the plain control plane, which runs no Job controller, where the test decides how
//! a Job ends.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

/// Marks the Job started with one active pod, unless it already has a start time.
pub async fn mark_started(jobs: &Api<Job>, job: &Job) -> kube::Result<()> {
    let started = job.status.as_ref().and_then(|s| s.start_time.as_ref());
    if started.is_some() {
        return Ok(());
    }
    let status = json!({"startTime": Timestamp::now().to_string(), "active": 1, "ready": 0});
    write(jobs, job, status).await
}

/// Writes the terminal status of a Job whose single pod succeeded or failed.
pub async fn mark_finished(
    jobs: &Api<Job>,
    job: &Job,
    succeeded: bool,
    message: &str,
) -> kube::Result<()> {
    let now = Timestamp::now().to_string();
    // The start time is immutable once set: read the one the API server holds now.
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let job = &jobs.get(name).await?;
    let start = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or_else(|| now.clone(), |t| t.0.to_string());
    let condition = |type_: &str, reason: &str| {
        json!({"type": type_, "status": "True", "reason": reason, "message": message,
               "lastProbeTime": now, "lastTransitionTime": now})
    };
    let status = if succeeded {
        json!({
            "startTime": start, "completionTime": now, "active": 0, "ready": 0, "succeeded": 1,
            "conditions": [condition("SuccessCriteriaMet", "CompletionsReached"),
                           condition("Complete", "CompletionsReached")]
        })
    } else {
        json!({
            "startTime": start, "active": 0, "ready": 0, "failed": 1,
            "conditions": [condition("FailureTarget", "BackoffLimitExceeded"),
                           condition("Failed", "BackoffLimitExceeded")]
        })
    };
    write(jobs, job, status).await
}

async fn write(jobs: &Api<Job>, job: &Job, status: Value) -> kube::Result<()> {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    jobs.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map(drop)
}
