//! Real bytes, end to end on the real node: the operator starts a copy Job, its Pod runs
//! `templatecache copy` from the pushed image against a hostPath StagingStore, and the data
//! mover reads from a real HTTP server on the node's address.

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use serde_json::json;

use support::eventually;
use support::http_server::{HttpServer, PASSWORD, USER};
use support::ranged_server::{self, RangedServer};
use support::rig::{Rig, random_bytes, ready_message, sha256};
use support::throttle::ThrottleProxy;
use templatecache_api::{Phase, TemplateCache};

#[tokio::test]
async fn an_http_template_is_copied_byte_for_byte_and_verified() {
    let server = HttpServer::start().await;
    let bytes = random_bytes(3 << 20);
    server.put("disk.qcow2", &bytes);
    let rig = Rig::new("e2e-http", 3).await;

    let spec =
        json!({"source": {"http": {"url": server.url("disk.qcow2")}}, "checksum": sha256(&bytes)});
    rig.create("disk", spec).await;
    rig.assert_copied("disk", &bytes).await;
    assert_eq!(rig.files(), ["disk"], "no partial file left");
}

#[tokio::test]
async fn an_s3_template_is_copied_with_credentials_from_a_secret_and_a_wrong_key_is_refused() {
    use support::s3_server::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
    let s3 = S3Server::start().await;
    let bytes = random_bytes(3 << 20);
    s3.put("images/ubuntu.qcow2", bytes.clone()).await;
    let rig = Rig::new("e2e-s3", 1).await;
    for (name, secret) in [("s3-creds", SECRET_KEY), ("s3-wrong", "not-the-secret")] {
        rig.ns
            .create::<Secret>(json!({
                "metadata": {"name": name},
                "stringData": {"accessKeyId": ACCESS_KEY, "secretAccessKey": secret}
            }))
            .await;
    }
    let source = |secret: &str| {
        json!({"s3": {"bucket": BUCKET, "key": "images/ubuntu.qcow2", "endpoint": s3.endpoint,
                      "secretRef": {"name": secret}}})
    };
    rig.create(
        "ubuntu",
        json!({"source": source("s3-creds"), "checksum": sha256(&bytes)}),
    )
    .await;
    rig.create("refused", json!({"source": source("s3-wrong")}))
        .await;

    rig.assert_copied("ubuntu", &bytes).await;

    let refused = rig.settled("refused").await;
    let message = ready_message(&refused);
    assert_eq!(
        refused.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Failed)
    );
    assert!(message.contains("refused our credentials"), "{message}");
    assert!(
        !message.contains("not-the-secret"),
        "no secret in the status"
    );
    assert!(!rig.data("refused").exists());
    assert_eq!(rig.files(), ["ubuntu"], "no partial file left");
}

#[tokio::test]
async fn a_broken_transfer_resumes_with_a_range_request() {
    let server = HttpServer::start().await;
    let bytes = random_bytes(2 << 20);
    server.put("disk.img", &bytes);
    let rig = Rig::new("e2e-resume", 1).await;
    let spec = json!({"source": {"http": {"url": server.url("flaky/disk.img")}}, "checksum": sha256(&bytes)});
    rig.create("resumed", spec).await;
    let cache = rig.settled("resumed").await;
    assert_eq!(
        cache.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Ready),
        "{}",
        ready_message(&cache)
    );
    assert_eq!(std::fs::read(rig.data("resumed")).expect("file"), bytes);
}

#[tokio::test]
async fn credentials_come_from_the_secret_and_a_refusal_is_reported() {
    let server = HttpServer::start().await;
    server.put("private.img", b"members only");
    let rig = Rig::new("e2e-auth", 1).await;
    rig.ns
        .create::<Secret>(json!({
            "metadata": {"name": "source-creds"},
            "stringData": {"username": USER, "password": PASSWORD}
        }))
        .await;

    let url = server.url("private/private.img");
    rig.create(
        "with-creds",
        json!({"source": {"http": {"url": url, "secretRef": {"name": "source-creds"}}}}),
    )
    .await;
    rig.create("without", json!({"source": {"http": {"url": url}}}))
        .await;

    let ok = rig.settled("with-creds").await;
    assert_eq!(
        ok.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Ready),
        "{}",
        ready_message(&ok)
    );
    assert_eq!(
        std::fs::read(rig.data("with-creds")).expect("file"),
        b"members only"
    );
    let refused = rig.settled("without").await;
    let message = ready_message(&refused);
    assert!(message.contains("refused our credentials"), "{message}");
    assert!(!rig.data("without").exists());
    // The password is nowhere a user (or anyone with read access) can see: not in a cache's
    // status, not in an Event, not in a Job or its pod template.
    let caches = rig.ns.list::<TemplateCache>().await;
    let jobs = rig.ns.list::<Job>().await;
    let events = rig.ns.list::<Event>().await;
    let visible = [
        serde_json::to_string(&caches).expect("json"),
        serde_json::to_string(&jobs).expect("json"),
        serde_json::to_string(&events).expect("json"),
    ];
    assert!(jobs.items.len() == 2 && !events.items.is_empty());
    for text in visible {
        assert!(!text.contains(PASSWORD), "the secret value leaked: {text}");
    }
}

#[tokio::test]
async fn bad_sources_fail_with_a_clear_condition_and_leave_no_file() {
    let server = HttpServer::start().await;
    let bytes = random_bytes(1 << 20);
    server.put("disk.img", &bytes);
    let rig = Rig::new("e2e-failures", 1).await;
    let wrong = format!("sha256:{}", "0".repeat(64));
    let cases = [
        (
            "wrong-sum",
            json!({"source": {"http": {"url": server.url("disk.img")}}, "checksum": wrong}),
            "checksum mismatch",
        ),
        (
            "missing",
            json!({"source": {"http": {"url": server.url("nope.img")}}}),
            "404 Not Found",
        ),
        (
            "truncated",
            json!({"source": {"http": {"url": server.url("truncated/disk.img")}}}),
            "cannot resume",
        ),
    ];
    for (name, spec, _) in &cases {
        rig.create(name, spec.clone()).await;
    }
    for (name, _, expected) in &cases {
        let message = rig.failed_for_good(name).await;
        assert!(message.contains(expected), "{name}: {message}");
        println!("{name}: {message}");
        assert!(
            !rig.data(name).exists(),
            "{name}: no file at the final path"
        );
    }
    assert!(
        rig.files().is_empty(),
        "no partial files: {:?}",
        rig.files()
    );
}

#[tokio::test]
async fn kubectl_shows_progress_while_a_copy_runs() {
    let server = HttpServer::start().await;
    server.put("big.img", &random_bytes(6 << 20)); // ~5 s through the slow route
    let rig = Rig::new("e2e-progress", 1).await;
    rig.create(
        "big",
        json!({"source": {"http": {"url": server.url("slow/big.img")}}}),
    )
    .await;

    let seen = eventually(
        "kubectl get tc showing a copy in progress with its percentage",
        Duration::from_secs(60),
        || async {
            let out = support::kubectl()
                .args(["get", "tc", "big", "-n", &rig.ns.name])
                .output()
                .expect("kubectl get tc");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let row = text.lines().nth(1).unwrap_or("").to_owned();
            let percent = row
                .split_whitespace()
                .any(|w| w.ends_with('%') && w != "0%" && w != "100%");
            (row.contains("Copying") && percent).then_some(text)
        },
    )
    .await;
    println!("{seen}");
    assert!(seen.lines().next().unwrap_or("").contains("PROGRESS"));
    let done = rig.settled("big").await;
    assert_eq!(
        done.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Ready)
    );
}

#[tokio::test]
async fn a_throttled_source_is_copied_over_eight_streams_and_becomes_ready() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(256 << 20);
    server.put("disk.img", bytes.clone());
    // 8 MiB/s per connection, as a remote store serves one GET: 32 s for one stream. (Slow
    // enough that the debug build's hash sits idle and the mover opens its streams.)
    let proxy = ThrottleProxy::start(server.addr, 8 << 20).await;
    let rig = Rig::new("e2e-streams", 1).await;
    let url = format!("http://{}/files/disk.img", proxy.addr);

    rig.create(
        "disk",
        json!({"source": {"http": {"url": url}}, "checksum": sha256(&bytes)}),
    )
    .await;

    rig.assert_copied("disk", &bytes).await;
    assert!(
        proxy.connections() >= 8,
        "copied over {} connections",
        proxy.connections()
    );
    assert_eq!(rig.files(), ["disk"], "no partial file left");
}

#[tokio::test]
async fn a_source_replaced_mid_copy_fails_with_the_reason_named_and_nothing_left() {
    let server = RangedServer::start().await;
    let old = random_bytes(128 << 20);
    let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
    server.put("disk.img", old);
    server.put_next_version("disk.img", new);
    let rig = Rig::new("e2e-replaced", 1).await;

    rig.create(
        "disk",
        json!({"source": {"http": {"url": server.url("changing", "disk.img")}}}),
    )
    .await;

    let cache = rig.settled("disk").await;
    let message = ready_message(&cache);
    println!("{message}");
    assert_eq!(
        cache.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Failed)
    );
    assert!(message.contains("changed during the copy"), "{message}");
    assert!(rig.files().is_empty(), "nothing left: {:?}", rig.files());
}

#[tokio::test]
async fn progress_counts_the_parts_landed_ahead_of_the_bytes_hashed_in_order() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(32 << 20);
    server.put("disk.img", bytes.clone());
    // 2 MiB/s per connection, 4 streams of 1 MiB parts; the part at 8 MiB (by then all 4
    // streams are open) answers 6 s late, so for 6 s the parts after it land ahead of the
    // hashed front, long past the mover's 2 s between reports.
    let proxy = ThrottleProxy::start(server.addr, 2 << 20).await;
    let rig = Rig::with_config("e2e-landed", |cfg| {
        cfg.jobs.copy.streams = 4;
        cfg.jobs.copy.part_size = 1 << 20;
    })
    .await;
    assert_eq!(
        ranged_server::LATE_PART_AT % (1 << 20),
        0,
        "the late range is a whole part"
    );
    let url = format!("http://{}/late-part/disk.img", proxy.addr);
    rig.create("disk", json!({"source": {"http": {"url": url}}}))
        .await;

    let caches = rig.ns.api::<TemplateCache>();
    // Every report the copy makes, sampled until the cache is Ready.
    let seen = std::cell::RefCell::new(vec![]);
    eventually(
        "the copy through 4 throttled streams",
        Duration::from_secs(60),
        || async {
            let cache = caches.get("disk").await.expect("cache");
            let status = cache.status.unwrap_or_default();
            if let Some(progress) = status.progress.filter(|p| p.bytes_copied > 0) {
                seen.borrow_mut()
                    .push((progress.bytes_copied, progress.bytes_landed));
            }
            (status.phase == Some(Phase::Ready)).then_some(())
        },
    )
    .await;
    let seen = seen.into_inner();
    println!("(bytesCopied, bytesLanded) seen: {seen:?}");
    rig.assert_copied("disk", &bytes).await;
    let total = bytes.len() as u64;
    assert!(
        seen.iter()
            .all(|(copied, landed)| landed.is_some_and(|l| l >= *copied)),
        "bytesLanded is never behind bytesCopied: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(copied, landed)| landed.is_some_and(|l| l > *copied)),
        "parts landed ahead of the hashed front were counted: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&(total, Some(total))), "{seen:?}");
}

/// Issue 25, item 5, through the operator: a source that sends 64 KiB and then nothing, with the
/// connection held open, fails the copy Job's attempt once the stall limit passes (2 s here; 60
/// by default, `copyJobs.stallSeconds` in the chart), and the cache's message names the stall.
/// Before, the cache stayed Copying for as long as the source kept the connection.
#[tokio::test]
async fn a_source_that_goes_silent_fails_the_attempt_with_the_stall_named() {
    let server = RangedServer::start().await;
    server.put("disk.img", random_bytes(3 << 20));
    let rig = Rig::with_config("e2e-stall", |cfg| {
        cfg.jobs.limits.stall_seconds = 2;
        cfg.retry.max_attempts = 1;
    })
    .await;

    let started = std::time::Instant::now();
    let url = server.url("stalling", "disk.img");
    rig.create("silent", json!({"source": {"http": {"url": url}}}))
        .await;
    let message = rig.failed_for_good("silent").await;
    assert!(
        message.contains("stalled") && message.contains("sent nothing for 2 s"),
        "{message}"
    );
    support::corpus::record(
        "a cache whose source sends 64 KiB then nothing, through the operator (stall limit 2 s)",
        &format!(
            "the copy Job's attempt failed after {} s and the cache says why: {message}",
            started.elapsed().as_secs()
        ),
    );
}
