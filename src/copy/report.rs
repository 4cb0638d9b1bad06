//! Progress and outcome of a copy, written into the cache's `status.progress` (the field the data
//! mover owns). Progress is written at most every two seconds, and a failure to write it never
//! fails the copy; the final report is retried, since the controller needs it to mark Ready.

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use super::landing::Front;
use super::{CopyError, Transferred};
use crate::api::names::COPY_MANAGER;
use crate::api::{StorageAdmission, TemplateCache};

const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// How often a copy waiting for room looks at its cache.
const ROOM_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Writes reports for one attempt of one cache; does nothing when there is no cache to report to.
pub struct Reporter {
    target: Option<(Api<TemplateCache>, String)>,
    attempt: u32,
    last: Option<Instant>,
}

impl Reporter {
    /// Reports to `<namespace>/<name>` with the in-cluster (or KUBECONFIG) credentials.
    pub async fn connect(cache: Option<&str>, attempt: u32) -> Result<Self, String> {
        let target = match cache {
            None => None,
            Some(key) => {
                let (namespace, name) = key
                    .split_once('/')
                    .ok_or_else(|| format!("--cache {key}: expected <namespace>/<name>"))?;
                let client = kube::Client::try_default().await.map_err(|e| {
                    format!("cannot reach the Kubernetes API to report progress: {e}")
                })?;
                Some((Api::namespaced(client, namespace), name.to_owned()))
            }
        };
        Ok(Self {
            target,
            attempt,
            last: None,
        })
    }

    /// Asks the cache's store for `bytes` of room (by reporting the size before any byte is
    /// copied) and waits until the StagingStore controller grants it. Fails if the cache moves on
    /// to another attempt or is deleted meanwhile; returns at once when there is no cache.
    pub async fn wait_for_room(&mut self, bytes: u64) -> Result<(), CopyError> {
        let Some((api, name)) = self.target.clone() else {
            return Ok(());
        };
        let request = json!({
            "attempt": self.attempt, "bytesCopied": 0, "totalBytes": bytes,
            "percent": percent(0, Some(bytes)), "checksum": null, "error": null,
            "bytesLanded": 0, "bytesResumed": null,
        });
        let mut last_answer = None;
        let mut requested = false;
        loop {
            if !requested {
                requested = self.write(request.clone()).await.is_ok();
                self.last = Some(Instant::now());
            }
            match api.get(&name).await {
                Ok(cache) => {
                    let answer = self.room_answer(&cache)?;
                    if answer.as_ref().is_some_and(|a| a.admitted) {
                        return Ok(());
                    }
                    let message = answer.and_then(|a| a.message);
                    if message.is_some() && message != last_answer {
                        info!(
                            "waiting for room: {}",
                            message.as_deref().unwrap_or_default()
                        );
                        last_answer = message;
                    }
                }
                Err(e) => warn!("cannot read the cache while waiting for room: {e}"),
            }
            tokio::time::sleep(ROOM_POLL_INTERVAL).await;
        }
    }

    /// The store's answer for this attempt, or why waiting is pointless.
    fn room_answer(&self, cache: &TemplateCache) -> Result<Option<StorageAdmission>, CopyError> {
        if cache.metadata.deletion_timestamp.is_some() {
            return Err(CopyError::Superseded("the cache is being deleted".into()));
        }
        let status = cache.status.clone().unwrap_or_default();
        if status.attempt != Some(self.attempt) {
            return Err(CopyError::Superseded(format!(
                "the cache is at attempt {}, not {}",
                status.attempt.unwrap_or(0),
                self.attempt
            )));
        }
        Ok(status.storage.filter(|s| s.attempt == self.attempt))
    }

    /// Reports progress if the last report is old enough. `bytesCopied` is the hashed front:
    /// bytes written and hashed in order, the part of the copy that is settled; `bytesLanded`
    /// adds the parts written ahead of it; `bytesResumed` is what was taken over from an
    /// earlier attempt.
    pub async fn progress(&mut self, front: Front, total: Option<u64>) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        let report = json!({
            "attempt": self.attempt, "bytesCopied": front.hashed, "totalBytes": total,
            "percent": percent(front.hashed, total), "checksum": null, "error": null,
            "bytesLanded": front.landed,
            "bytesResumed": (front.resumed > 0).then_some(front.resumed),
        });
        if let Err(e) = self.write(report).await {
            warn!("could not report progress (the copy goes on): {e}");
        }
    }

    /// The digest an OCI tag resolved to, which every later attempt must pull: written before
    /// anything is copied, and the copy stops if it cannot be written (a retry would otherwise
    /// resolve the tag again and could stage another version).
    pub async fn resolved(&self, digest: &str) -> Result<(), CopyError> {
        let report = json!({"attempt": self.attempt, "bytesCopied": 0, "resolvedDigest": digest});
        let mut result = self.write(report.clone()).await;
        for pause in [1, 2, 4] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(pause)).await;
            result = self.write(report.clone()).await;
        }
        result.map_err(|e| CopyError::Report(format!("recording the resolved digest: {e}")))
    }

    /// The final report of a copy that is in place.
    pub async fn succeeded(&self, done: &Transferred) -> Result<(), kube::Error> {
        let (bytes, resumed) = (done.bytes, done.resumed);
        let report = json!({
            "attempt": self.attempt, "bytesCopied": bytes, "totalBytes": bytes,
            "percent": "100%", "checksum": done.checksum, "error": null, "bytesLanded": bytes,
            "bytesResumed": (resumed > 0).then_some(resumed),
        });
        let mut result = self.write(report.clone()).await;
        for pause in [1, 2, 4, 8] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(pause)).await;
            result = self.write(report.clone()).await;
        }
        result
    }

    /// The one-line reason the copy failed, and whether another attempt would fail the same way.
    pub async fn failed(&self, bytes: u64, error: &CopyError) {
        let report = json!({"attempt": self.attempt, "bytesCopied": bytes,
            "error": error.to_string(), "checksum": null, "finalReason": final_reason(error)});
        if let Err(e) = self.write(report).await {
            warn!("could not report the failure: {e}");
        }
    }

    async fn write(&self, report: serde_json::Value) -> Result<(), kube::Error> {
        let Some((api, name)) = &self.target else {
            return Ok(());
        };
        let patch = json!({"status": {"progress": report}});
        let params = PatchParams {
            field_manager: Some(COPY_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        api.patch_status(name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
    }
}

/// A refused address stays refused whatever the attempt: the operator's allowlist decides, and
/// the operator fails the cache for good instead of retrying.
fn final_reason(error: &CopyError) -> Option<&'static str> {
    match error {
        CopyError::AddressRefused(_) => Some(crate::api::final_reason::ADDRESS_NOT_ALLOWED),
        _ => None,
    }
}

/// `42%`, when the total is known.
fn percent(bytes: u64, total: Option<u64>) -> Option<String> {
    let total = total.filter(|t| *t > 0)?;
    Some(format!("{}%", bytes.saturating_mul(100) / total))
}
