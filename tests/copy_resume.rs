//! Resume across attempts, end to end on the local control plane: the copy Job's process is
//! killed halfway (as an OOM kill or an eviction would), its Job fails, and the next attempt
//! takes over what the first one verified. The test server logs every ranged GET, so the test
//! sees exactly which bytes each attempt fetched.

use templatecache_test_support as support;

use std::time::Duration;

use serde_json::json;

use support::eventually;
use support::jobs::{running_movers, wait_for_reason};
use support::ranged_server::{RangedServer, Seen};
use support::rig::{Rig, random_bytes, resume_verified, sha256, store_files};
use support::throttle::ThrottleProxy;
use templatecache_api::Phase;
use templatecache_api::reasons::cache as reason;

const PART: u64 = 1 << 20;
const SIZE: usize = 24 << 20;

/// Per connection: one stream for the first 4 MiB (4 s), then 4 (5 s more). Slow enough that
/// the kill lands mid-copy even on a loaded machine, with a record every second.
const CONNECTION_RATE: u64 = 1 << 20;

/// A rig whose copies use 4 streams of 1 MiB parts, with two attempts 3 s apart: what a test
/// does between the kill and attempt 2 (replace the source) is done long before attempt 2
/// reads the source, however loaded the machine (with the tests' 200 ms, a busy test thread
/// replaced it after attempt 2 had pinned the old version, and the test failed on a 412).
async fn rig(prefix: &str) -> Rig {
    rig_with_backoff(prefix, Duration::from_secs(3)).await
}

/// [`rig`] with `backoff` between the two attempts.
async fn rig_with_backoff(prefix: &str, backoff: Duration) -> Rig {
    Rig::with_config(prefix, move |cfg| {
        cfg.jobs.copy.streams = 4;
        cfg.jobs.copy.part_size = PART;
        cfg.retry.max_attempts = 2;
        cfg.retry.base_delay = backoff;
        cfg.retry.max_delay = backoff;
    })
    .await
}

/// The `verified` of the resume record of `attempt`, if it has one yet.
fn recorded(rig: &Rig, cache: &str, attempt: u32) -> Option<u64> {
    resume_verified(
        &rig.folder()
            .join(format!(".partial/{cache}-{attempt}.resume")),
    )
}

/// Waits until attempt 1 of `cache` has recorded at least `at` bytes as verified, then kills
/// its process with SIGKILL: no cleanup runs, as when a Pod is killed. Returns the verified
/// length of the record the process left.
async fn kill_first_attempt_past(rig: &Rig, cache: &str, at: u64) -> u64 {
    eventually(
        &format!("attempt 1 of {cache} recording {at} verified bytes"),
        Duration::from_secs(30),
        || async { recorded(rig, cache, 1).filter(|v| *v >= at) },
    )
    .await;
    let pid = running_movers(&rig.ns.name)
        .into_iter()
        .find(|m| m.cache == cache)
        .expect("the copy process is running")
        .pid;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The record moves on about once a second until the process is gone; once it is, the
    // record is what attempt 2 will find.
    eventually(
        &format!("the killed copy process {pid} gone"),
        Duration::from_secs(10),
        || async { (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()) },
    )
    .await;
    recorded(rig, cache, 1).expect("the killed attempt's record")
}

/// The ranges asked for, sorted, as `start..end`.
fn ranges(gets: &[Seen]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = gets
        .iter()
        .map(|g| g.range.map_or((0, u64::MAX), |(s, e)| (s, e + 1)))
        .collect();
    ranges.sort();
    ranges
}

/// Parts of 1 MiB from `from` to the end of the object.
fn parts_from(from: u64) -> Vec<(u64, u64)> {
    (from..SIZE as u64)
        .step_by(PART as usize)
        .map(|s| (s, (s + PART).min(SIZE as u64)))
        .collect()
}

/// Starts a copy of `disk.img` through the throttling proxy and kills its first attempt once a
/// third is verified. The GETs logged so far, and the verified length the record held.
async fn copy_and_kill_halfway(
    rig: &Rig,
    server: &RangedServer,
    proxy: &ThrottleProxy,
    checksum: Option<String>,
) -> (usize, u64) {
    let url = format!("http://{}/files/disk.img", proxy.addr);
    let mut spec = json!({"source": {"http": {"url": url}}});
    if let Some(checksum) = checksum {
        spec["checksum"] = json!(checksum);
    }
    rig.create("disk", spec).await;
    let verified = kill_first_attempt_past(rig, "disk", SIZE as u64 / 3).await;
    // Requests the killed process had sent are in the log by now; attempt 2 is at least a
    // failed Job, the rig's 3 s backoff and a new Job away.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (server.gets().len(), verified)
}

#[tokio::test]
async fn a_copy_killed_halfway_is_resumed_by_the_next_attempt_which_fetches_only_the_rest() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(SIZE);
    server.put("disk.img", bytes.clone());
    let proxy = ThrottleProxy::start(server.addr, CONNECTION_RATE).await;
    let rig = rig("resume").await;

    let (first_gets, verified) =
        copy_and_kill_halfway(&rig, &server, &proxy, Some(sha256(&bytes))).await;

    rig.assert_copied("disk", &bytes).await;
    let cache = rig.settled("disk").await;
    let status = cache.status.expect("status");
    let progress = status.progress.expect("progress");
    assert_eq!(status.attempt, Some(2), "the first attempt was killed");
    // The part the record ends in is fetched again whole: parts stay aligned.
    let resumed = verified / PART * PART;
    assert_eq!(progress.bytes_resumed, Some(resumed), "{progress:?}");
    assert!(resumed > 0);
    let second = &server.gets()[first_gets..];
    assert_eq!(
        ranges(second),
        parts_from(resumed),
        "attempt 2 fetched each part past the verified prefix once, and nothing before it"
    );
    assert!(second.iter().all(|g| g.if_match.is_some()), "{second:?}");
    assert_eq!(rig.files(), ["disk"], "no partial file or record left");
}

#[tokio::test]
async fn a_source_replaced_between_attempts_is_fetched_whole_not_spliced() {
    let server = RangedServer::start().await;
    let old = random_bytes(SIZE);
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x5a).collect();
    server.put("disk.img", old);
    let proxy = ThrottleProxy::start(server.addr, CONNECTION_RATE).await;
    let rig = rig("resume-changed").await;

    let (first_gets, _) = copy_and_kill_halfway(&rig, &server, &proxy, None).await;
    server.put("disk.img", new.clone());

    rig.assert_copied("disk", &new).await;
    let status = rig.settled("disk").await.status.expect("status");
    assert_eq!(status.attempt, Some(2));
    assert_eq!(status.progress.expect("progress").bytes_resumed, None);
    let second = &server.gets()[first_gets..];
    assert_eq!(
        ranges(second),
        parts_from(0),
        "attempt 2 fetched the new version whole"
    );
    assert_eq!(rig.files(), ["disk"], "the old partial file is gone");
}

/// Issue 25, item 7: between a failed attempt and the next, the partial file the next attempt
/// resumes stays in the store. It counts there, up to the room granted to the attempt, in the
/// store's usage (and so in the namespace quota and eviction): before, a failed cache counted
/// 0 bytes while its partial file filled the volume.
#[tokio::test]
async fn a_failed_attempts_partial_file_counts_in_the_stores_usage_until_the_next_attempt() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(SIZE);
    server.put("disk.img", bytes.clone());
    let proxy = ThrottleProxy::start(server.addr, CONNECTION_RATE).await;
    // A backoff long enough to look at the failed cache before attempt 2 starts.
    let rig = rig_with_backoff("resume-counted", Duration::from_secs(20)).await;

    copy_and_kill_halfway(&rig, &server, &proxy, Some(sha256(&bytes))).await;
    let failed = wait_for_reason(&rig.ns.client, &rig.ns.name, "disk", reason::COPY_FAILED).await;
    let phase = failed.status.as_ref().and_then(|s| s.phase);
    assert_eq!(
        phase,
        Some(Phase::Failed),
        "attempt 1 failed, attempt 2 waits"
    );
    let files = store_files(&rig.folder());
    let Some(&(_, on_disk)) = files.iter().find(|(name, _)| name == ".partial/disk-1") else {
        panic!("the partial file stays for attempt 2: {files:?}");
    };
    let counted = eventually(
        "the store counting the failed cache's room",
        Duration::from_secs(10),
        || async { Some(rig.store_used_bytes().await).filter(|used| *used > 0) },
    )
    .await;
    assert_eq!(
        counted, SIZE as u64,
        "the room granted to attempt 1 (the object's size) is counted"
    );
    assert!(counted >= on_disk, "{counted} counted, {on_disk} on disk");
    support::corpus::record(
        "a copy that fails with its partial file kept for the next attempt",
        &format!(
            "the store counts the room granted to the failed attempt ({counted} bytes; the partial file is {on_disk}) until the next attempt asks again"
        ),
    );

    rig.assert_copied("disk", &bytes).await;
    assert_eq!(rig.store_used_bytes().await, SIZE as u64, "the Ready copy");
}
