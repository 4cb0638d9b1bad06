//! Parallel ranged download benchmark: what K streams buy when each connection is limited, as
//! it is against a remote object store or mirror, and what they cost where it is not.
//!
//! Sources on loopback: the ranged HTTP server of `crates/test-support` (strong ETag, Range,
//! If-Match) and versitygw, each also behind the throttling proxy of `crates/test-support`, which
//! limits every connection to `BENCH_CONNECTION_MIBS` MiB/s (default 32). Tools, each timed to a
//! verified file with its peak RSS (`/usr/bin/time`): curl then `sha256sum`, rclone with 8
//! streams of 16 MiB chunks then `sha256sum` (built from `hack/rclone`), and the mover
//! (`target/release/templatecache copy`, which verifies as it copies) with 1 and with 8 streams
//! of 16 MiB parts. Throttled runs copy `BENCH_THROTTLED_MIB` (default 256), unthrottled ones
//! `BENCH_SIZE_MIB` (default 1024), so the whole run stays within about two minutes.
//! Writes `target/bench/mover-streams.md`; `hack/bench-mover.sh` appends it to the mover table.
//!
//!     cargo build --release --bin templatecache && cargo bench --bench mover_streams

use templatecache_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use support::ranged_server::RangedServer;
use support::rig::random_bytes;
use support::s3_server::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
use support::throttle::ThrottleProxy;

const KEY: &str = "template.img";

fn env_mib(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One source as a tool reaches it.
#[derive(Clone)]
struct Endpoint {
    kind: &'static str,
    /// `http://host:port`
    base: String,
}

impl Endpoint {
    fn curl(&self, out: &Path) -> Vec<String> {
        let mut args = vec!["curl".into(), "-sSf".into(), "-o".into(), path(out)];
        if self.kind == "S3" {
            args.extend([
                "--aws-sigv4".into(),
                "aws:amz:us-east-1:s3".into(),
                "--user".into(),
                format!("{ACCESS_KEY}:{SECRET_KEY}"),
                "-H".into(),
                "x-amz-content-sha256: UNSIGNED-PAYLOAD".into(),
            ]);
            args.push(format!("{}/{BUCKET}/{KEY}", self.base));
        } else {
            args.push(format!("{}/files/{KEY}", self.base));
        }
        args
    }

    /// rclone with `streams` ranged reads of 16 MiB (the mover's part size; rclone's default
    /// 64 MiB would give a 256 MiB object only 4 chunks), no config file.
    fn rclone(&self, rclone: &Path, out: &Path, streams: u16) -> Vec<String> {
        let mut args = vec![
            path(rclone),
            "--config=/dev/null".into(),
            "copyto".into(),
            format!("--multi-thread-streams={streams}"),
            "--multi-thread-chunk-size=16Mi".into(),
            "--multi-thread-cutoff=16Mi".into(),
        ];
        if self.kind == "S3" {
            args.extend([
                "--s3-provider=Other".into(),
                format!("--s3-endpoint={}", self.base),
                format!("--s3-access-key-id={ACCESS_KEY}"),
                format!("--s3-secret-access-key={SECRET_KEY}"),
                "--s3-region=us-east-1".into(),
                "--s3-force-path-style".into(),
                format!(":s3:{BUCKET}/{KEY}"),
            ]);
        } else {
            args.extend([
                format!("--http-url={}/files/", self.base),
                format!(":http:{KEY}"),
            ]);
        }
        args.push(path(out));
        args
    }

    fn mover(&self, out: &Path, streams: u16) -> Vec<String> {
        let mover = support::repo_root().join("target/release/templatecache");
        let mut args = vec![
            path(&mover),
            "copy".into(),
            "--attempt=1".into(),
            format!("--streams={streams}"),
            "--part-size=16Mi".into(),
            format!("--dest={}", path(out)),
            format!("--allow-internal-address={}", support::LOOPBACK_SOURCES),
        ];
        if self.kind == "S3" {
            args.extend([
                format!("--s3-bucket={BUCKET}"),
                format!("--s3-key={KEY}"),
                format!("--s3-endpoint={}", self.base),
            ]);
        } else {
            args.push(format!("--http-url={}/files/{KEY}", self.base));
        }
        args
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Wall seconds and peak RSS (KiB) of `commands` run one after the other, or why they failed.
fn timed(commands: &[Vec<String>]) -> (f64, u64) {
    let script = commands
        .iter()
        .map(|c| {
            c.iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(" && ");
    let start = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "bash", "-c", &format!("{script} >/dev/null")])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .expect("run /usr/bin/time");
    let seconds = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script}: {stderr}");
    let rss = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    (seconds, rss)
}

struct Row {
    link: String,
    source: &'static str,
    tool: &'static str,
    streams: u16,
    mib: u64,
    seconds: f64,
    rss_kib: u64,
}

fn measure(
    rows: &mut Vec<Row>,
    link: &str,
    endpoint: &Endpoint,
    mib: u64,
    out_dir: &Path,
    expected: &[u8],
) {
    let out = out_dir.join("copy.img");
    let sha256sum = || vec!["sha256sum".into(), path(&out)];
    let rclone = support::tools::built("rclone");
    let runs: [(&'static str, u16, Vec<Vec<String>>); 4] = [
        (
            "curl + sha256sum",
            1,
            vec![endpoint.curl(&out), sha256sum()],
        ),
        (
            "rclone + sha256sum",
            8,
            vec![endpoint.rclone(&rclone, &out, 8), sha256sum()],
        ),
        ("mover", 1, vec![endpoint.mover(&out, 1)]),
        ("mover", 8, vec![endpoint.mover(&out, 8)]),
    ];
    for (tool, streams, commands) in runs {
        let _ = std::fs::remove_file(&out);
        let (seconds, rss_kib) = timed(&commands);
        let copied = std::fs::read(&out).expect("copied file");
        assert!(
            copied == expected,
            "{tool} {streams}: not the source's bytes"
        );
        println!("{link} {} {tool} x{streams}: {seconds:.2} s", endpoint.kind);
        rows.push(Row {
            link: link.into(),
            source: endpoint.kind,
            tool,
            streams,
            mib,
            seconds,
            rss_kib,
        });
    }
}

fn table(rows: &[Row], connection_mibs: u64) -> String {
    let mut text = format!(
        "### Parallel ranged download\n\n`cargo bench --bench mover_streams` (run by \
         `hack/bench-mover.sh`), {}, this machine: {} cores, in the same run. \"Throttled\" \
         puts the throttling proxy of `crates/test-support` in front of the source: every connection at \
         most {connection_mibs} MiB/s, as a remote store serves one GET. The mover uses 16 MiB \
         parts and hashes as it copies; rclone (v1.76.0, `copyto --multi-thread-streams 8 \
         --multi-thread-chunk-size 16Mi`) uses 16 MiB chunks too; the times of curl and rclone \
         include `sha256sum` of their file. One run each.\n\n| link | source | tool | streams | MiB | MiB/s | time to a verified file | \
         peak RSS |\n|---|---|---|---|---|---|---|---|\n",
        today(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for r in rows {
        text += &format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} s | {} MiB |\n",
            r.link,
            r.source,
            r.tool,
            r.streams,
            r.mib,
            r.mib as f64 / r.seconds,
            r.seconds,
            r.rss_kib / 1024
        );
    }
    text += "\n![Mover throughput by tool and link](plots/mover-streams.svg)\n";
    text
}

/// The rows as tab-separated values for `benches/plots.rs`: link, source, tool, streams, MiB/s.
fn plot_data(rows: &[Row]) -> String {
    rows.iter()
        .map(|r| {
            let rate = r.mib as f64 / r.seconds;
            format!(
                "{}\t{}\t{}\t{}\t{rate:.1}\n",
                r.link, r.source, r.tool, r.streams
            )
        })
        .collect()
}

fn today() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn socket(base: &str) -> std::net::SocketAddr {
    base.trim_start_matches("http://")
        .parse()
        .expect("socket address")
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench targets without --bench: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let connection_mibs = env_mib("BENCH_CONNECTION_MIBS", 32);
    let throttled_mib = env_mib("BENCH_THROTTLED_MIB", 256);
    let unthrottled_mib = env_mib("BENCH_SIZE_MIB", 1024);
    // Built (or found built) before anything is timed.
    support::tools::built("rclone");
    let work: PathBuf = support::repo_root().join("target/bench/streams");
    std::fs::create_dir_all(&work).expect("work folder");
    let http = RangedServer::start().await;
    let s3 = S3Server::start().await;
    let mut rows = Vec::new();
    for (link, mib) in [("throttled", throttled_mib), ("loopback", unthrottled_mib)] {
        let bytes = Arc::new(random_bytes((mib << 20) as usize));
        http.put(KEY, bytes.to_vec());
        s3.put(KEY, bytes.to_vec()).await;
        // Loopback runs go to the servers directly; throttled ones through a proxy each.
        let proxies = if link == "throttled" {
            let rate = connection_mibs << 20;
            Some((
                ThrottleProxy::start(http.addr, rate).await,
                ThrottleProxy::start(socket(&s3.endpoint), rate).await,
            ))
        } else {
            None
        };
        let endpoints = match &proxies {
            Some((h, s)) => [
                (format!("http://{}", h.addr), "HTTP"),
                (format!("http://{}", s.addr), "S3"),
            ],
            None => [
                (format!("http://{}", http.addr), "HTTP"),
                (s3.endpoint.clone(), "S3"),
            ],
        };
        for (base, kind) in endpoints {
            let endpoint = Endpoint { kind, base };
            let (work, link, bytes) = (work.clone(), link.to_owned(), bytes.clone());
            let runs = tokio::task::spawn_blocking(move || {
                let mut rows = Vec::new();
                measure(&mut rows, &link, &endpoint, mib, &work, &bytes);
                rows
            });
            rows.extend(runs.await.expect("bench"));
        }
        if proxies.is_none() {
            rows.push(sha256_ceiling(&work, &bytes, mib));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let text = table(&rows, connection_mibs);
    support::write_report("bench/mover-streams.md", &text);
    support::write_report("bench/mover-streams.tsv", &plot_data(&rows));
    println!("{text}");
}

/// SHA-256 alone over the same bytes from the page cache, on one core: no mover that hashes
/// every byte in one stream can be faster.
fn sha256_ceiling(work: &Path, bytes: &[u8], mib: u64) -> Row {
    let file = work.join("hash.img");
    std::fs::write(&file, bytes).expect("write");
    let best = (0..2)
        .map(|_| {
            timed(&[vec![
                "openssl".into(),
                "dgst".into(),
                "-sha256".into(),
                path(&file),
            ]])
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("two runs");
    let _ = std::fs::remove_file(&file);
    Row {
        link: "loopback".into(),
        source: "page cache",
        tool: "SHA-256 alone (openssl, the ceiling)",
        streams: 1,
        mib,
        seconds: best.0,
        rss_kib: best.1,
    }
}
