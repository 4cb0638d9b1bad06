//! Finishing copy Jobs from a test the way the Job controller and the data mover would: the
//! mover's report goes into the cache's `status.progress`, the outcome into the Job's status with
//! the conditions Kubernetes' Job status validation requires.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{ListParams, LogParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use serde_json::json;
use templatecache_api::TemplateCache;
use templatecache_api::conditions::{READY, find};

use super::job_status;

/// The outcome a test gives a Job.
pub enum Outcome<'a> {
    Succeeded { bytes: u64, checksum: &'a str },
    Failed { error: &'a str },
}

/// Waits for the Job `name` to exist and returns it.
pub async fn wait_for_job(client: &Client, namespace: &str, name: &str) -> Job {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let found = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(jobs, name, |job: Option<&Job>| job.is_some()),
    )
    .await
    .unwrap_or_else(|_| panic!("Job {namespace}/{name} did not appear within 60s"))
    .expect("watch Job");
    found.expect("Job exists")
}

/// Waits until the Job controller has completed the Job `name` (its `Complete` condition).
pub async fn wait_until_complete(client: &Client, namespace: &str, name: &str) -> Job {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let complete = |job: Option<&Job>| {
        let conditions = job.and_then(|j| j.status.as_ref()?.conditions.as_ref());
        conditions.is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
        })
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(jobs, name, complete),
    )
    .await
    .unwrap_or_else(|_| panic!("Job {namespace}/{name} did not complete within 120s"))
    .expect("watch Job")
    .expect("Job exists")
}

/// All Jobs in the namespace labelled for `cache`.
pub async fn jobs_of(client: &Client, namespace: &str, cache: &str) -> Vec<Job> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let selector = format!("templatecache.io/cache={cache}");
    jobs.list(&ListParams::default().labels(&selector))
        .await
        .expect("list Jobs")
        .items
}

/// Finishes copy attempt `attempt` of `cache` with `outcome`.
pub async fn finish_copy(
    client: &Client,
    namespace: &str,
    cache: &str,
    attempt: u32,
    outcome: Outcome<'_>,
) {
    let caches: Api<TemplateCache> = Api::namespaced(client.clone(), namespace);
    let report = match outcome {
        Outcome::Succeeded { bytes, checksum } => json!({
            "attempt": attempt, "bytesCopied": bytes, "totalBytes": bytes,
            "percent": "100%", "checksum": checksum
        }),
        Outcome::Failed { error } => json!({"attempt": attempt, "bytesCopied": 0, "error": error}),
    };
    caches
        .patch_status(
            cache,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"progress": report}})),
        )
        .await
        .expect("write the mover's report");
    let succeeded = matches!(outcome, Outcome::Succeeded { .. });
    let job = format!("{cache}-copy-{attempt}");
    finish_job(client, namespace, &job, succeeded).await;
}

/// Writes a terminal Job status as the Job controller does.
pub async fn finish_job(client: &Client, namespace: &str, job: &str, succeeded: bool) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let current = jobs.get(job).await.expect("read Job");
    job_status::mark_finished(&jobs, &current, succeeded, "finished by the test")
        .await
        .unwrap_or_else(|e| panic!("write status of Job {job}: {e}"));
}

/// Waits until `cache` satisfies `condition`, returning it.
pub async fn wait_for_cache(
    client: &Client,
    namespace: &str,
    cache: &str,
    what: &str,
    condition: impl Fn(&TemplateCache) -> bool,
) -> TemplateCache {
    let caches: Api<TemplateCache> = Api::namespaced(client.clone(), namespace);
    // A bound to report a hang, not a performance claim: storms of 500 clients on 2 cores can
    // take minutes.
    let found = tokio::time::timeout(
        Duration::from_secs(240),
        watch_until(&caches, cache, |c: Option<&TemplateCache>| {
            c.is_some_and(&condition)
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("TemplateCache {namespace}/{cache} did not become {what} within 240s")
    });
    found.expect("cache exists")
}

/// Watches `cache` until `condition` holds; the caller bounds the time. A watch that fails (a
/// read the client timed out on a loaded machine: CI saw `ReadEvents(... TimedOut)`) is opened
/// again, which lists the cache afresh, rather than failing the test.
async fn watch_until(
    caches: &Api<TemplateCache>,
    cache: &str,
    condition: impl Fn(Option<&TemplateCache>) -> bool,
) -> Option<TemplateCache> {
    loop {
        match await_condition(caches.clone(), cache, &condition).await {
            Ok(found) => return found,
            Err(e) => {
                eprintln!("watch of TemplateCache {cache} failed, opened again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits until the Ready condition of `cache` has `reason` as its reason.
pub async fn wait_for_reason(
    client: &Client,
    namespace: &str,
    cache: &str,
    reason: &'static str,
) -> TemplateCache {
    wait_for_cache(client, namespace, cache, reason, move |c| {
        let ready = c.status.as_ref().and_then(|s| find(&s.conditions, READY));
        ready.is_some_and(|r| r.reason == reason)
    })
    .await
}

/// Waits until `cache` is gone (its finalizers done).
pub async fn wait_for_cache_gone(client: &Client, namespace: &str, cache: &str) {
    let caches: Api<TemplateCache> = Api::namespaced(client.clone(), namespace);
    tokio::time::timeout(
        Duration::from_secs(120),
        watch_until(&caches, cache, |c: Option<&TemplateCache>| c.is_none()),
    )
    .await
    .unwrap_or_else(|_| panic!("TemplateCache {namespace}/{cache} was not gone within 120s"));
}

/// A copy process of the data mover running on this machine: a copy Job's container on the node
/// (its processes are this machine's).
pub struct RunningMover {
    pub pid: u32,
    pub cache: String,
    pub attempt: u32,
}

/// The data movers copying caches of `namespace` now, found by their arguments
/// (`copy --cache=<namespace>/<name> --attempt=<n>`), the same wherever the Job runs.
pub fn running_movers(namespace: &str) -> Vec<RunningMover> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let ours = format!("--cache={namespace}/");
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.get(1).map(String::as_str) != Some("copy") {
                return None;
            }
            let cache = args.iter().find_map(|a| a.strip_prefix(&ours))?.to_owned();
            let attempt = args
                .iter()
                .find_map(|a| a.strip_prefix("--attempt="))?
                .parse()
                .ok()?;
            Some(RunningMover {
                pid,
                cache,
                attempt,
            })
        })
        .collect()
}

/// What the Job controller and the kubelet say about the Jobs named `names`: each Job's counts
/// and conditions, its Pods' phases and container states, for a test's failure message.
pub async fn describe_jobs(client: &Client, namespace: &str, names: &[String]) -> String {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut lines = vec![];
    for name in names {
        let Ok(job) = jobs.get(name).await else {
            lines.push(format!("Job {name}: gone"));
            continue;
        };
        let status = job.status.unwrap_or_default();
        let conditions: Vec<String> = (status.conditions.unwrap_or_default().into_iter())
            .map(|c| format!("{}={}", c.type_, c.status))
            .collect();
        lines.push(format!(
            "Job {name}: active {:?}, failed {:?}, succeeded {:?}, conditions {conditions:?}",
            status.active, status.failed, status.succeeded
        ));
        let selector = format!("job-name={name}");
        let listed = pods.list(&ListParams::default().labels(&selector)).await;
        for pod in listed.map(|l| l.items).unwrap_or_default() {
            lines.push(format!("  {}", pod_state(&pod)));
            let tail = LogParams {
                tail_lines: Some(15),
                ..LogParams::default()
            };
            if let Ok(log) = pods.logs(&pod.name_any(), &tail).await {
                lines.extend(log.lines().map(|line| format!("    | {line}")));
            }
        }
    }
    lines.join("\n")
}

/// One line for a Pod: its phase, node and each container's state.
fn pod_state(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let containers: Vec<String> = (status.container_statuses.unwrap_or_default().into_iter())
        .map(|c| {
            let state = c.state.unwrap_or_default();
            let now = match (state.waiting, state.running, state.terminated) {
                (Some(w), _, _) => format!("waiting {}", w.reason.unwrap_or_default()),
                (_, Some(r), _) => format!("running since {:?}", r.started_at.map(|t| t.0)),
                (_, _, Some(t)) => {
                    format!("exited {} {}", t.exit_code, t.reason.unwrap_or_default())
                }
                _ => "no state".to_owned(),
            };
            format!("{}: {now}, {} restarts", c.name, c.restart_count)
        })
        .collect();
    format!(
        "Pod {}: {} on {:?}, {containers:?}",
        pod.metadata.name.as_deref().unwrap_or_default(),
        status.phase.unwrap_or_default(),
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    )
}
