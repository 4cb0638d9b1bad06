//! Progress and outcome of a copy, written into the cache's `status.progress` (the field the data
//! mover owns). Progress is written at most every two seconds, and a failure to write it never
//! fails the copy; the final report is retried, since the controller needs it to mark Ready.

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::landing::Front;
use crate::{CopyError, Transferred};
use templatecache_api::names::COPY_MANAGER;
use templatecache_api::{Progress, StorageAdmission, TemplateCache};

const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// How often a copy waiting for room looks at its cache.
const ROOM_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Writes reports for one attempt of one cache; does nothing when there is no cache to report to.
///
/// It keeps the attempt's whole report and writes all of it each time: the operator clears
/// `status.progress` when it starts an attempt, so within one no field ever has to be removed,
/// and a later report never loses what an earlier one said (the OCI digest, say).
pub struct Reporter {
    target: Option<(Api<TemplateCache>, String)>,
    report: Progress,
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
            report: Progress {
                attempt: Some(attempt),
                ..Progress::default()
            },
            last: None,
        })
    }

    fn attempt(&self) -> u32 {
        self.report.attempt.unwrap_or(0)
    }

    /// Asks the cache's store for `bytes` of room (by reporting the size before any byte is
    /// copied) and waits until the StagingStore controller grants it. Fails if the cache moves on
    /// to another attempt or is deleted meanwhile, or if the room granted is less than `bytes`;
    /// returns at once when there is no cache.
    ///
    /// The grant is checked because what was asked for is not to be trusted: `totalBytes` is
    /// written with the copy Pod's token, which anyone who can exec into the Pod holds. Every
    /// source stops at the size it announced (`bytes`), so a copy that passes never writes past
    /// the room granted.
    pub async fn wait_for_room(&mut self, bytes: u64) -> Result<(), CopyError> {
        let Some((api, name)) = self.target.clone() else {
            return Ok(());
        };
        self.count(0, 0, 0, Some(bytes));
        let mut last_answer = None;
        let mut requested = false;
        loop {
            if !requested {
                requested = self.write().await.is_ok();
                self.last = Some(Instant::now());
            }
            match api.get(&name).await {
                Ok(cache) => {
                    let answer = self.room_answer(&cache)?;
                    if requested && !shows_request(&cache, self.attempt(), bytes) {
                        // Written but not there as written (a write lost to an API server
                        // restart, a failure report of a replaced Pod of the same attempt
                        // since): the store grants only a clean request, so ask again.
                        warn!("the cache does not show this copy's request for room; asking again");
                        requested = false;
                    }
                    if let Some(granted) = answer.as_ref().filter(|a| a.admitted) {
                        return covers(granted, bytes);
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
        let attempt = self.attempt();
        if status.attempt != Some(attempt) {
            return Err(CopyError::Superseded(format!(
                "the cache is at attempt {}, not {attempt}",
                status.attempt.unwrap_or(0),
            )));
        }
        Ok(status.storage.filter(|s| s.attempt == attempt))
    }

    /// Reports progress if the last report is old enough. `bytesCopied` is the hashed front:
    /// bytes written and hashed in order, the part of the copy that is settled; `bytesLanded`
    /// adds the parts written ahead of it; `bytesResumed` is what was taken over from an
    /// earlier attempt.
    pub async fn progress(&mut self, front: Front, total: Option<u64>) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return;
        }
        let before = self.report.clone();
        self.count(front.hashed, front.landed, front.resumed, total);
        if self.last.is_some() && self.report == before {
            // Nothing moved since the last report: a write would only cost the API server.
            return;
        }
        self.last = Some(Instant::now());
        if let Err(e) = self.write().await {
            warn!("could not report progress (the copy goes on): {e}");
        }
    }

    /// The digest an OCI tag resolved to, which every later attempt must pull: written before
    /// anything is copied, and the copy stops if it cannot be written (a retry would otherwise
    /// resolve the tag again and could stage another version).
    pub async fn resolved(&mut self, digest: &str) -> Result<(), CopyError> {
        self.report.resolved_digest = Some(digest.to_owned());
        self.write_retrying(&[1, 2, 4])
            .await
            .map_err(|e| CopyError::DigestNotRecorded(e.to_string()))
    }

    /// The final report of a copy that is in place.
    pub async fn succeeded(&mut self, done: &Transferred) -> Result<(), kube::Error> {
        self.count(done.bytes, done.bytes, done.resumed, Some(done.bytes));
        self.report.checksum = Some(done.checksum.clone());
        self.write_retrying(&[1, 2, 4, 8]).await
    }

    /// The one-line reason the copy failed, and whether another attempt would fail the same way.
    pub async fn failed(&mut self, bytes: u64, error: &CopyError) {
        let report = &self.report;
        let landed = report.bytes_landed.unwrap_or(0).max(bytes);
        let resumed = report.bytes_resumed.unwrap_or(0);
        self.count(bytes, landed, resumed, report.total_bytes);
        self.report.error = Some(error.to_string());
        self.report.final_reason = final_reason(error).map(str::to_owned);
        if let Err(e) = self.write().await {
            warn!("could not report the failure: {e}");
        }
    }

    /// Records the counts: `hashed` bytes written and hashed in order (the settled part of the
    /// copy), `landed` adding the parts written ahead of them, `resumed` taken over from an
    /// earlier attempt, of `total`.
    fn count(&mut self, hashed: u64, landed: u64, resumed: u64, total: Option<u64>) {
        let report = &mut self.report;
        report.bytes_copied = hashed;
        report.bytes_landed = Some(landed);
        report.bytes_resumed = (resumed > 0).then_some(resumed);
        report.total_bytes = total;
        report.percent = percent(hashed, total);
    }

    /// [`Self::write`], tried again after each of `pauses` (seconds) while it fails: for the
    /// reports the operator cannot do without.
    async fn write_retrying(&self, pauses: &[u64]) -> Result<(), kube::Error> {
        let mut result = self.write().await;
        for pause in pauses {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(*pause)).await;
            result = self.write().await;
        }
        result
    }

    async fn write(&self) -> Result<(), kube::Error> {
        let Some((api, name)) = &self.target else {
            return Ok(());
        };
        // The whole report replaces the field, never merges into it: what another Pod of the
        // same attempt wrote there (a Pod of a Job the operator replaced, stopped by SIGTERM,
        // reports an error) must not stay beside this Pod's request for room, where the store
        // would read the attempt as failed and never grant it.
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/status/progress", "value": self.report}
        ]))
        .expect("a JSON patch");
        let params = PatchParams {
            field_manager: Some(COPY_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        api.patch_status(name, &params, &Patch::<()>::Json(patch))
            .await
            .map(drop)
    }
}

/// Whether the room `granted` holds `size` bytes.
fn covers(granted: &StorageAdmission, size: u64) -> Result<(), CopyError> {
    let room = granted.bytes.unwrap_or(0);
    if size > room {
        return Err(CopyError::RoomTooSmall {
            size,
            granted: room,
        });
    }
    Ok(())
}

/// A refused address stays refused whatever the attempt: the operator's allowlist decides, and
/// the operator fails the cache for good instead of retrying.
fn final_reason(error: &CopyError) -> Option<&'static str> {
    match error {
        CopyError::AddressRefused(_) => Some(templatecache_api::final_reason::ADDRESS_NOT_ALLOWED),
        _ => None,
    }
}

/// Whether the cache's status shows this attempt's request for `bytes` of room, and no failure
/// beside it.
fn shows_request(cache: &TemplateCache, attempt: u32, bytes: u64) -> bool {
    let progress = cache.status.as_ref().and_then(|s| s.progress.as_ref());
    progress.is_some_and(|p| {
        p.attempt == Some(attempt) && p.total_bytes == Some(bytes) && p.error.is_none()
    })
}

/// `42%`, when the total is known.
fn percent(bytes: u64, total: Option<u64>) -> Option<String> {
    let total = total.filter(|t| *t > 0)?;
    Some(format!("{}%", bytes.saturating_mul(100) / total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(bytes: Option<u64>) -> StorageAdmission {
        StorageAdmission {
            attempt: 1,
            admitted: true,
            bytes,
            message: None,
            reason: None,
        }
    }

    #[test]
    fn a_request_for_room_shows_only_with_its_attempt_and_size_and_no_failure_beside_it() {
        let cache = |progress: serde_json::Value| -> TemplateCache {
            serde_json::from_value(json!({
                "apiVersion": "templatecache.io/v1alpha1", "kind": "TemplateCache",
                "metadata": {"name": "c"},
                "spec": {"source": {"http": {"url": "http://example/x"}}},
                "status": {"attempt": 2, "progress": progress}
            }))
            .expect("cache")
        };
        let asked = cache(json!({"attempt": 2, "bytesCopied": 0, "totalBytes": 10}));
        assert!(shows_request(&asked, 2, 10));
        assert!(!shows_request(&asked, 3, 10), "another attempt's");
        assert!(!shows_request(&asked, 2, 11), "another size");
        let failed = cache(json!({"attempt": 2, "bytesCopied": 0, "totalBytes": 10,
                                  "error": "stopped by SIGTERM"}));
        assert!(
            !shows_request(&failed, 2, 10),
            "a replaced Pod's failure beside it"
        );
        assert!(!shows_request(&cache(serde_json::Value::Null), 2, 10));
    }

    #[test]
    fn a_copy_larger_than_the_room_granted_is_refused_before_writing() {
        assert!(covers(&granted(Some(1000)), 1000).is_ok());
        assert!(covers(&granted(Some(1001)), 1000).is_ok());
        for room in [Some(999), Some(0), None] {
            let error = covers(&granted(room), 1000)
                .expect_err("too small")
                .to_string();
            assert!(
                error.contains("granted")
                    && error.contains("1000 bytes")
                    && error.contains("nothing is written"),
                "{error}"
            );
        }
    }
}
