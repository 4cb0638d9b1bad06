//! The data mover's parallel ranged download, run as the copy Job runs it (`run_copy`, without a
//! cache to report to) against real servers on loopback: the ranged HTTP server of
//! `crates/test-support` and versitygw. No control plane needed. Parts are 256 KiB here so that small
//! objects span many parts.

use templatecache_test_support as support;

use std::path::PathBuf;

use support::ranged_server::{RangedServer, Seen};
use support::rig::{random_bytes, resume_verified, sha256, store_files};
use support::throttle::ThrottleProxy;
use templatecache_mover::{CopyArgs, CopyError, run_copy};

const PART: u64 = 256 << 10;

fn args(dest: PathBuf, url: &str, streams: u16) -> CopyArgs {
    CopyArgs {
        cache: None,
        attempt: 1,
        final_attempt: false,
        dest,
        http_url: Some(url.to_owned()),
        s3_bucket: None,
        s3_key: None,
        s3_endpoint: None,
        s3_region: None,
        s3_virtual_host: false,
        oci_reference: None,
        oci_file: None,
        oci_digest: None,
        oci_plain_http: false,
        checksum: None,
        streams,
        part_size: PART,
        allow_internal_address: support::loopback_sources(),
        stall_seconds: templatecache_mover::DEFAULT_STALL_SECONDS,
    }
}

/// The folder holds exactly `names`: no partial file left behind.
fn assert_only(dir: &tempfile::TempDir, names: &[&str]) {
    let found: Vec<String> = store_files(dir.path())
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(found, names);
}

fn ranged(gets: &[Seen]) -> Vec<(u64, u64)> {
    gets.iter().filter_map(|g| g.range).collect()
}

#[tokio::test]
async fn eight_streams_copy_a_large_object_byte_for_byte_each_part_pinned_to_its_etag() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(8 << 20 | 12345); // 33 parts, the last one short
    server.put("disk.img", bytes.clone());
    // A link slower than the hash (4 MiB/s per connection), so the mover opens its streams.
    let proxy = ThrottleProxy::start(server.addr, 4 << 20).await;
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");

    let url = format!("http://{}/files/disk.img", proxy.addr);
    let mut request = args(dest.clone(), &url, 8);
    request.checksum = Some(sha256(&bytes));
    let done = run_copy(request).await.expect("copy");

    assert_eq!(done.checksum, sha256(&bytes));
    assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
    let gets = server.gets();
    let mut parts = ranged(&gets);
    parts.sort();
    let expected: Vec<(u64, u64)> = (0..bytes.len() as u64)
        .step_by(PART as usize)
        .map(|start| (start, (start + PART).min(bytes.len() as u64) - 1))
        .collect();
    assert_eq!(parts, expected, "each part asked for once, nothing else");
    assert!(
        proxy.connections() >= 8,
        "{} connections",
        proxy.connections()
    );
    assert!(
        gets.iter().all(|g| g.if_match.is_some()),
        "every part is conditional on the ETag: {gets:?}"
    );
    assert_only(&dir, &["disk"]);
}

/// Copies an object of `size` bytes with 8 streams through the server's `mode` route, checks
/// it landed byte for byte with nothing else in the folder, and returns the GETs it took.
async fn copied_through(mode: &str, size: usize) -> Vec<Seen> {
    let server = RangedServer::start().await;
    let bytes = random_bytes(size);
    server.put("disk.img", bytes.clone());
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");

    run_copy(args(dest.clone(), &server.url(mode, "disk.img"), 8))
        .await
        .expect("copy");

    assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
    assert_only(&dir, &["disk"]);
    server.gets()
}

#[tokio::test]
async fn an_object_under_four_parts_is_read_as_one_stream() {
    let gets = copied_through("files", 3 * PART as usize).await;
    assert_eq!(gets.len(), 1, "one plain GET: {gets:?}");
    assert_eq!(gets[0].range, None);
}

#[tokio::test]
async fn a_server_that_ignores_range_gets_one_stream_after_one_probe() {
    let gets = copied_through("no-range", 2 << 20).await;
    let statuses: Vec<u16> = gets.iter().map(|g| g.status).collect();
    // The probe asked for the first part and got the whole object (200); then one plain GET.
    assert_eq!(statuses, [200, 200], "{gets:?}");
}

#[tokio::test]
async fn a_source_without_an_etag_is_read_as_one_stream() {
    let gets = copied_through("no-etag", 2 << 20).await;
    assert_eq!(
        gets.len(),
        1,
        "nothing to pin parts to, so one GET: {gets:?}"
    );
    assert_eq!(gets[0].range, None);
}

#[tokio::test]
async fn a_source_replaced_mid_copy_fails_the_attempt_and_leaves_nothing() {
    let server = RangedServer::start().await;
    let old = random_bytes(4 << 20);
    let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
    server.put("disk.img", old);
    server.put_next_version("disk.img", new);
    let dir = tempfile::tempdir().expect("dest");

    let error = run_copy(args(
        dir.path().join("disk"),
        &server.url("changing", "disk.img"),
        8,
    ))
    .await
    .expect_err("a spliced file");

    println!("{error}");
    assert!(
        matches!(error, CopyError::ChangedMidCopy { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("changed during the copy"), "{message}");
    assert!(message.contains("412 Precondition Failed"), "{message}");
    assert!(
        server.gets().iter().any(|g| g.status == 412),
        "the server refused a part"
    );
    assert_only(&dir, &[]);
}

#[tokio::test]
async fn a_server_answering_parts_longer_than_asked_fails_before_writing_past_the_reservation() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(8 * PART as usize);
    server.put("disk.img", bytes);
    let dir = tempfile::tempdir().expect("dest");

    let error = run_copy(args(
        dir.path().join("disk"),
        &server.url("long-parts", "disk.img"),
        8,
    ))
    .await
    .expect_err("a part longer than its range");

    let message = error.to_string();
    assert!(
        matches!(error, CopyError::SentMoreThanAnnounced { .. }),
        "{error:?}"
    );
    let announced = format!("sent more than the {PART} bytes it announced");
    assert!(message.contains(&announced), "{message}");
    assert!(
        server.gets().iter().all(|g| g.range.is_some()),
        "the parallel path was taken: {:?}",
        server.gets()
    );
    assert_only(&dir, &[]);
}

#[tokio::test]
async fn a_part_that_breaks_is_fetched_again_alone_from_where_it_broke() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(2 << 20); // 8 parts, each cut halfway once
    server.put("disk.img", bytes.clone());
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");

    run_copy(args(dest.clone(), &server.url("breaking", "disk.img"), 4))
        .await
        .expect("copy");

    assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
    let starts: Vec<u64> = ranged(&server.gets()).iter().map(|r| r.0).collect();
    let part_starts = starts.iter().filter(|s| *s % PART == 0).count();
    assert_eq!(
        part_starts, 8,
        "no part fetched again from its start: {starts:?}"
    );
    assert!(
        starts.iter().filter(|s| *s % PART == PART / 2).count() == 8,
        "each broken part resumed mid-part: {starts:?}"
    );
    assert_only(&dir, &["disk"]);
}

/// Attempt 1's leftovers of `disk.img` (`len` bytes) as `url` serves it: a partial file of
/// zeroes and a record that claims half of it verified.
fn plant_attempt_one(dir: &tempfile::TempDir, server: &RangedServer, url: &str, len: usize) {
    std::fs::create_dir(dir.path().join(".partial")).expect("partials");
    std::fs::write(dir.path().join(".partial/disk-1"), vec![0u8; len]).expect("plant");
    let record = serde_json::json!({"format": 1, "verified": len / 2, "identity": {
        "source": url, "size": len, "eTag": server.etag("disk.img"), "version": null}});
    std::fs::write(
        dir.path().join(".partial/disk-1.resume"),
        record.to_string(),
    )
    .expect("plant");
}

#[tokio::test]
async fn a_copy_that_cannot_resume_removes_what_earlier_attempts_left() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(2 << 20);
    server.put("disk.img", bytes.clone());
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");
    // The server no longer sends an ETag to pin parts to, so attempt 2 reads one stream from
    // zero and never looks at attempt 1's file.
    let url = server.url("no-etag", "disk.img");
    plant_attempt_one(&dir, &server, &url, bytes.len());

    let mut second = args(dest.clone(), &url, 8);
    second.attempt = 2;
    run_copy(second).await.expect("copy");

    assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
    assert_only(&dir, &["disk"]);
}

#[tokio::test]
async fn a_final_attempt_that_fails_leaves_no_partial_file_of_any_attempt() {
    let server = RangedServer::start().await;
    let bytes = random_bytes(2 << 20);
    server.put("disk.img", bytes.clone());
    let dir = tempfile::tempdir().expect("dest");
    let url = server.url("files", "disk.img");
    plant_attempt_one(&dir, &server, &url, bytes.len());

    // The source is gone by attempt 2, the last one: no later attempt would resume anything.
    let mut last = args(dir.path().join("disk"), &server.url("files", "gone.img"), 8);
    last.attempt = 2;
    last.final_attempt = true;
    run_copy(last).await.expect_err("the source is gone");

    assert_only(&dir, &[]);
}

#[tokio::test]
async fn a_forged_resume_record_over_a_bad_prefix_fails_the_checksum_and_the_next_attempt_starts_clean()
 {
    let server = RangedServer::start().await;
    let bytes = random_bytes(4 << 20); // 16 parts
    server.put("disk.img", bytes.clone());
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");
    let url = server.url("files", "disk.img");
    // What a Pod of the namespace could plant: attempt 1's partial file, all zeroes, and a
    // record naming the very version the server serves, claiming half of it verified.
    plant_attempt_one(&dir, &server, &url, bytes.len());

    let mut second = args(dest.clone(), &url, 4);
    second.attempt = 2;
    second.checksum = Some(sha256(&bytes));
    let error = run_copy(second.clone()).await.expect_err("a bad prefix");

    assert!(
        matches!(error, CopyError::ChecksumMismatch { .. }),
        "{error:?}"
    );
    let first_asked = ranged(&server.gets()).iter().map(|r| r.0).min();
    assert_eq!(
        first_asked,
        Some(bytes.len() as u64 / 2),
        "the record was taken at its word, and the checksum caught it"
    );
    assert_only(&dir, &[]);

    let gets_before = server.gets().len();
    let mut third = second;
    third.attempt = 3;
    run_copy(third).await.expect("a clean start");
    assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
    let asked = ranged(&server.gets()[gets_before..])
        .iter()
        .map(|r| r.0)
        .min();
    assert_eq!(asked, Some(0), "attempt 3 fetched everything");
    assert_only(&dir, &["disk"]);
}

mod s3 {
    //! The same against versitygw, through the throttling proxy of `crates/test-support` (which also
    //! counts the connections the mover opened). The mover runs as the copy Job runs it: as the
    //! `templatecache copy` process, credentials in its environment.

    use std::net::SocketAddr;
    use std::time::Duration;

    use super::ThrottleProxy;
    use super::support::eventually;
    use super::support::rig::{random_bytes, resume_verified, sha256};
    use super::support::s3_server::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
    use super::{PART, assert_only};

    fn endpoint_addr(s3: &S3Server) -> SocketAddr {
        s3.endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("endpoint address")
    }

    const KEY: &str = "images/disk.img";

    /// An 8 MiB object (32 parts) at [`KEY`], read through a proxy that limits each connection
    /// to `rate` bytes a second, and an empty folder to copy it into. Keep `s3` bound for the
    /// whole test: dropping it stops the server.
    struct Throttled {
        s3: S3Server,
        bytes: Vec<u8>,
        proxy: ThrottleProxy,
        dir: tempfile::TempDir,
    }

    async fn throttled_object(rate: u64) -> Throttled {
        let s3 = S3Server::start().await;
        let bytes = random_bytes(8 << 20);
        s3.put(KEY, bytes.clone()).await;
        let proxy = ThrottleProxy::start(endpoint_addr(&s3), rate).await;
        let dir = tempfile::tempdir().expect("dest");
        Throttled {
            s3,
            bytes,
            proxy,
            dir,
        }
    }

    /// The stdout of a mover that must have succeeded.
    fn succeeded(out: &std::process::Output) -> String {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn copy(proxy: &ThrottleProxy, key: &str, dest: &std::path::Path) -> tokio::process::Command {
        copy_attempt(proxy, key, dest, 1)
    }

    fn copy_attempt(
        proxy: &ThrottleProxy,
        key: &str,
        dest: &std::path::Path,
        attempt: u32,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_templatecache"));
        command
            .args(["copy", "--streams", "8"])
            .arg(format!("--attempt={attempt}"))
            .arg(format!("--part-size={PART}"))
            .args(["--allow-internal-address", super::support::LOOPBACK_SOURCES])
            .arg("--dest")
            .arg(dest)
            .args(["--s3-bucket", BUCKET, "--s3-key", key, "--s3-endpoint"])
            .arg(format!("http://{}", proxy.addr))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .kill_on_drop(true);
        command
    }

    #[tokio::test]
    async fn an_s3_object_is_copied_over_eight_connections() {
        // Slower per connection than the hash, so the mover opens its streams.
        let Throttled {
            s3: _server,
            bytes,
            proxy,
            dir,
        } = throttled_object(4 << 20).await;
        let dest = dir.path().join("disk");

        let out = copy(&proxy, KEY, &dest)
            .output()
            .await
            .expect("run the mover");

        let stdout = succeeded(&out);
        assert!(stdout.contains(&sha256(&bytes)), "{stdout}");
        assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
        assert!(
            proxy.connections() >= 8,
            "parts in parallel: {} connections",
            proxy.connections()
        );
        assert_only(&dir, &["disk"]);
    }

    #[tokio::test]
    async fn an_s3_object_overwritten_mid_copy_fails_the_attempt_and_leaves_nothing() {
        // 2 MiB/s per connection: the copy takes over 2 s, the overwrite comes after 1 s.
        let Throttled {
            s3,
            bytes: old,
            proxy,
            dir,
        } = throttled_object(2 << 20).await;

        let mover = copy(&proxy, KEY, &dir.path().join("disk"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the mover");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
        s3.put(KEY, new).await;
        let out = mover.wait_with_output().await.expect("mover");

        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stderr}");
        assert!(!out.status.success());
        assert!(stderr.contains("changed during the copy"), "{stderr}");
        assert_only(&dir, &[]);
    }

    #[tokio::test]
    async fn an_s3_copy_killed_halfway_is_resumed_by_the_next_attempt_from_its_record() {
        // 1 MiB/s per connection: one stream for the first 4 MiB, so the kill lands mid-copy.
        let Throttled {
            s3: _server,
            bytes,
            proxy,
            dir,
        } = throttled_object(1 << 20).await;
        let dest = dir.path().join("disk");
        let record = dir.path().join(".partial/disk-1.resume");

        let mut first = copy_attempt(&proxy, KEY, &dest, 1)
            .spawn()
            .expect("start attempt 1");
        eventually(
            "attempt 1 recording 2 MiB verified",
            Duration::from_secs(10),
            || async { resume_verified(&record).filter(|v| *v >= 2 << 20) },
        )
        .await;
        first.kill().await.expect("SIGKILL attempt 1");
        // Read once the process is gone: until then the record moves on.
        let verified = resume_verified(&record).expect("attempt 1's record");

        let out = copy_attempt(&proxy, KEY, &dest, 2)
            .arg(format!("--checksum={}", sha256(&bytes)))
            .output()
            .await
            .expect("run attempt 2");

        let stdout = succeeded(&out);
        let resumed = verified / PART * PART;
        let taken_over = format!("({resumed} of them taken over from an earlier attempt)");
        assert!(stdout.contains(&taken_over), "{stdout}");
        assert_eq!(std::fs::read(&dest).expect("copy"), bytes);
        assert_only(&dir, &["disk"]);
    }
}

/// The stalled sources of issue 25: a server that sends 64 KiB of each answer and then nothing,
/// holding the connection open. With a 2-second stall limit the attempt fails naming the stall,
/// whether the object is read as one stream or in parts, instead of holding the copy forever.
#[tokio::test]
async fn a_source_that_sends_64_kib_then_nothing_fails_the_attempt_naming_the_stall() {
    let server = RangedServer::start().await;
    for (case, size) in [("one stream", 3 * PART), ("in parts", 16 * PART)] {
        server.put("disk.img", random_bytes(size as usize));
        let dir = tempfile::tempdir().expect("dest");
        let url = server.url("stalling", "disk.img");
        let mut request = args(dir.path().join("disk"), &url, 8);
        request.stall_seconds = 2;
        let started = std::time::Instant::now();
        let copy = tokio::time::timeout(std::time::Duration::from_secs(30), run_copy(request));
        let error = copy
            .await
            .unwrap_or_else(|_| panic!("{case}: the stalled copy still runs after 30 s"))
            .expect_err("a stalled source fails the attempt");
        let message = error.to_string();
        assert!(
            matches!(error, CopyError::Stalled { .. })
                && message.contains("sent nothing for 2 s")
                && message.contains("stalled"),
            "{case}: {message}"
        );
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(15),
            "{case}: {took:?}"
        );
        support::corpus::record(
            &format!("a source that sends 64 KiB then nothing, read {case}"),
            &format!(
                "the attempt fails after the stall limit (2 s here, 60 by default): {message}"
            ),
        );
    }
}

/// The copy runs as PID 1 in its container, where SIGTERM without a handler is ignored: a
/// deleted copy Pod went on writing into the store until SIGKILL. With the handler, SIGTERM
/// stops the copy at once, the failure is reported, the process exits non-zero, and the partial
/// file with its resume record stays as a broken-off source leaves it, for the next attempt.
#[tokio::test]
async fn sigterm_stops_the_copy_promptly_and_keeps_a_resumable_partial_file() {
    let server = RangedServer::start().await;
    server.put("disk.img", random_bytes(32 << 20));
    // 2 MiB/s per connection: the copy is mid-way when the signal comes.
    let proxy = ThrottleProxy::start(server.addr, 2 << 20).await;
    let dir = tempfile::tempdir().expect("dest");
    let dest = dir.path().join("disk");
    let url = format!("http://{}/files/disk.img", proxy.addr);
    let mut mover = tokio::process::Command::new(env!("CARGO_BIN_EXE_templatecache"))
        .args(["copy", "--attempt", "1", "--dest"])
        .arg(&dest)
        .args(["--http-url", &url, "--part-size", "256Ki"])
        .args(["--allow-internal-address", support::LOOPBACK_SOURCES])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the mover");
    let record = dir.path().join(".partial/disk-1.resume");
    let verified = support::eventually(
        "the copy records verified bytes",
        std::time::Duration::from_secs(30),
        || async { resume_verified(&record).filter(|v| *v > 0) },
    )
    .await;
    let pid = mover.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let stopped = std::time::Instant::now();
    let output = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let status = mover.wait().await.expect("wait");
        let mut stderr = String::new();
        if let Some(mut pipe) = mover.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        (status, stderr)
    })
    .await
    .expect("the mover stops within 10 s of SIGTERM");
    let (status, stderr) = output;
    assert_eq!(
        status.code(),
        Some(1),
        "exits with a failure of its own, not killed by the signal: {status:?} {stderr}"
    );
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(!dest.exists(), "nothing published");
    let kept = resume_verified(&record).expect("the resume record stays");
    assert!(kept >= verified, "{kept} < {verified}");
    assert!(
        dir.path().join(".partial/disk-1").exists(),
        "the partial file stays"
    );
    support::corpus::record(
        "SIGTERM to a copy mid-way (its Pod deleted, its node drained)",
        &format!(
            "stops in {:?}, exits 1, keeps its partial file ({kept} bytes verified) for the next attempt: {}",
            stopped.elapsed(),
            stderr.lines().last().unwrap_or_default()
        ),
    );
}
