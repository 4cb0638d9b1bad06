//! The `templatecache` binary: `run` (the operator), `crd` (print the CRDs), `copy` and `remove`
//! (what the operator's Jobs run).

use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use futures::FutureExt;
use templatecache::controller::jobs::{JobLimits, JobSettings};
use templatecache::controller::retry::RetryPolicy;
use templatecache::controller::{self, Config};
use templatecache::infra::http::{self, Readiness};
use templatecache::infra::leader::{self, LeaderSettings};
use templatecache::infra::metrics::Metrics;
use templatecache::infra::telemetry::{self, LogFormat};

/// templatecache: one staging copy per template, shared by reference.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TEMPLATECACHE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator's controllers.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Copy a template into a staging store (what a copy Job runs).
    Copy(templatecache_mover::CopyArgs),
    /// Remove a cache's data from a staging store (what a remove Job runs).
    Remove(templatecache_mover::RemoveArgs),
    /// Fill a new volume from a staged cache and read it back (what a populate Job runs).
    Populate(templatecache_mover::PopulateArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Reconcile only this namespace (all namespaces when unset).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// The operator's own namespace: remove Jobs of caches whose namespace is being deleted run
    /// here.
    #[arg(long, default_value = Config::DEFAULT_OPERATOR_NAMESPACE, env = "TEMPLATECACHE_OPERATOR_NAMESPACE")]
    operator_namespace: String,
    /// StagingStore for caches without `spec.storeRef`.
    #[arg(long, default_value = Config::DEFAULT_STORE, env = "TEMPLATECACHE_DEFAULT_STORE")]
    default_store: String,
    /// Image of the copy and remove Jobs (contains this binary).
    #[arg(long, env = "TEMPLATECACHE_JOB_IMAGE", default_value = Config::DEFAULT_JOB_IMAGE)]
    job_image: String,
    /// ServiceAccount of the copy and remove Jobs (the namespace's default when unset).
    #[arg(long, env = "TEMPLATECACHE_JOB_SERVICE_ACCOUNT")]
    job_service_account: Option<String>,
    /// Ranged GETs in flight per copy Job (HTTP(S) and S3 sources); 1 reads one stream.
    #[arg(long, default_value_t = templatecache_mover::DEFAULT_STREAMS,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    copy_streams: u16,
    /// Bytes per ranged GET of a copy Job (`16Mi`, `8Mi`, ...); smaller objects than four
    /// parts are read as one stream.
    #[arg(long, default_value_t = templatecache_mover::DEFAULT_PART_SIZE, value_parser = templatecache_mover::parse_part_size)]
    copy_part_size: u64,
    /// Copy attempts per cache before it is marked Failed for good.
    #[arg(long, default_value_t = RetryPolicy::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Wait after the first failed attempt, in seconds; doubles after each further failure.
    #[arg(long, default_value_t = RetryPolicy::DEFAULT_BASE_DELAY_SECONDS)]
    retry_base_seconds: u64,
    /// Caches reconciled at once.
    #[arg(long, default_value_t = Config::DEFAULT_CONCURRENCY)]
    concurrency: u16,
    /// Claims reconciled at once: how many claim status writes go out in parallel.
    #[arg(long, default_value_t = Config::DEFAULT_CLAIM_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    claim_concurrency: u16,
    /// Most references one cache takes; consumers past it wait with the claim condition
    /// `ReferenceLimit`. The default keeps a cache well under etcd's 1.5 MiB object limit.
    #[arg(long, default_value_t = templatecache::controller::DEFAULT_MAX_REFERENCES)]
    max_references: usize,
    /// Seconds between checks of a cache's claim and Pod references for consumers that are
    /// gone (a backstop for missed deletion events).
    #[arg(long, default_value_t = Config::DEFAULT_REFERENCE_SWEEP_SECONDS, value_parser = clap::value_parser!(u64).range(1..))]
    reference_sweep_seconds: u64,
    /// Name of this replica in Events and the leader Lease (`<host name>-<pid>` when unset).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Elect a leader among replicas on a Lease; only the leader reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "TEMPLATECACHE_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own namespace in a cluster).
    #[arg(
        long,
        default_value = "default",
        env = "TEMPLATECACHE_LEADER_ELECTION_NAMESPACE"
    )]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "templatecache-operator")]
    leader_election_lease: String,
    /// Seconds a leader's Lease lasts without renewal: how long a standby waits after the
    /// leader died.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=600))]
    lease_duration_seconds: u64,
    /// Prefixes a source must start with, comma-separated (e.g.
    /// `https://images.example.com/,s3://templates/`); every source is allowed when empty.
    /// S3 sources are matched as `<endpoint>/<bucket>/<key>`, or `s3://<bucket>/<key>` on AWS.
    #[arg(long, value_delimiter = ',', env = "TEMPLATECACHE_SOURCE_ALLOWLIST")]
    source_allowlist: Vec<String>,
    /// OCI registries served over plain HTTP, comma-separated `host:port` (or `host` for all its
    /// ports); every other registry is pulled over TLS.
    #[arg(
        long,
        value_delimiter = ',',
        env = "TEMPLATECACHE_OCI_PLAIN_HTTP_REGISTRIES"
    )]
    oci_plain_http_registries: Vec<String>,
    /// Internal destinations copy Jobs may read sources from, comma-separated or repeated:
    /// networks (`10.96.0.0/12`), addresses (`10.96.0.10`) or address:port
    /// (`10.96.0.10:9000`, `[fd00::10]:9000`). Without it the mover refuses every loopback,
    /// link-local (the cloud metadata service), private, CGNAT and other non-global address,
    /// checked on the address it connects to and on every redirect. Host names are refused.
    #[arg(
        long,
        value_delimiter = ',',
        env = "TEMPLATECACHE_ALLOW_INTERNAL_ADDRESS"
    )]
    allow_internal_address: Vec<templatecache_mover::address::AllowedInternal>,
    /// Seconds a copy's source may send nothing (no answer, no byte) before the attempt fails
    /// as stalled.
    #[arg(long, default_value_t = templatecache_mover::DEFAULT_STALL_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    copy_stall_seconds: u64,
    /// The slowest copy worth waiting for, in bytes per second (`1Mi`, `512Ki`, ...): a copy
    /// Job's activeDeadlineSeconds is the template's size at this rate plus 10 minutes (a day
    /// while the size is unknown).
    #[arg(long, default_value_t = JobLimits::DEFAULT_MIN_BYTES_PER_SECOND,
          value_parser = parse_rate)]
    copy_min_bytes_per_second: u64,
    /// ttlSecondsAfterFinished of the operator's Jobs. At least 600: a failed copy Job must
    /// outlive the longest wait before the next attempt, or the attempt would run again.
    #[arg(long, default_value_t = JobLimits::DEFAULT_TTL_SECONDS,
          value_parser = clap::value_parser!(i32).range(600..))]
    job_ttl_seconds: i32,
    /// Run populate Jobs as UID 0 with no capability, for volumes Kubernetes does not hand to
    /// the Pod's fsGroup (hostPath and in-tree host-path provisioning, some local-volume
    /// provisioners, raw block devices); 65532 otherwise.
    #[arg(long, env = "TEMPLATECACHE_POPULATE_AS_ROOT")]
    populate_as_root: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        default_value = "0.0.0.0:8080",
        env = "TEMPLATECACHE_METRICS_ADDRESS"
    )]
    metrics_address: std::net::SocketAddr,
}

impl RunArgs {
    fn config(&self) -> Config {
        Config {
            namespace: self.namespace.clone(),
            default_store: self.default_store.clone(),
            operator_namespace: self.operator_namespace.clone(),
            jobs: JobSettings {
                image: self.job_image.clone(),
                service_account: self.job_service_account.clone(),
                copy: templatecache_mover::Tuning {
                    streams: self.copy_streams,
                    part_size: self.copy_part_size,
                },
                oci_plain_http_registries: self.oci_plain_http_registries.clone(),
                allow_internal_addresses: self.allow_internal_address.clone(),
                limits: JobLimits {
                    stall_seconds: self.copy_stall_seconds,
                    min_bytes_per_second: self.copy_min_bytes_per_second,
                    ttl_seconds_after_finished: self.job_ttl_seconds,
                },
            },
            populate_as_root: self.populate_as_root,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base_delay: Duration::from_secs(self.retry_base_seconds),
                ..RetryPolicy::default()
            },
            concurrency: self.concurrency,
            claim_concurrency: self.claim_concurrency,
            max_references: self.max_references,
            reference_sweep: Duration::from_secs(self.reference_sweep_seconds),
            instance: Some(self.identity()),
            source_allowlist: self.source_allowlist.clone(),
        }
    }

    fn identity(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "templatecache".into());
            format!("{host}-{}", std::process::id())
        })
    }

    fn leader_settings(&self) -> LeaderSettings {
        let duration = Duration::from_secs(self.lease_duration_seconds);
        LeaderSettings {
            namespace: self.leader_election_namespace.clone(),
            lease: self.leader_election_lease.clone(),
            identity: self.identity(),
            duration,
            renew_before: duration / 3,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let result = match cli.command {
        Command::Crd => print_crds(),
        Command::Run(args) => run(args).await,
        Command::Copy(args) => templatecache_mover::run_copy(args)
            .await
            .map(|done| match done.resumed {
                0 => println!("copied {} bytes, {}", done.bytes, done.checksum),
                kept => println!(
                    "copied {} bytes, {} ({kept} of them taken over from an earlier attempt)",
                    done.bytes, done.checksum
                ),
            })
            .map_err(|e| e.to_string()),
        Command::Remove(args) => templatecache_mover::run_remove(args)
            .await
            .map_err(|e| e.to_string()),
        Command::Populate(args) => return populate(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A rate in bytes per second, with the mover's size suffixes; never zero.
fn parse_rate(text: &str) -> Result<u64, String> {
    match templatecache_mover::parse_bytes(text)? {
        0 => Err(format!("{text}: a rate must be above zero")),
        rate => Ok(rate),
    }
}

/// `templatecache populate`: file I/O only, on a blocking thread. A failure another try would
/// meet again exits with [`templatecache_mover::EXIT_FINAL`], which the Job does not retry.
async fn populate(args: templatecache_mover::PopulateArgs) -> ExitCode {
    let run = tokio::task::spawn_blocking(move || templatecache_mover::run_populate(&args)).await;
    match run {
        Ok(Ok(filled)) => {
            println!(
                "filled {} with {} bytes, {} ({:.0} MiB/s with the read-back)",
                filled.target.display(),
                filled.bytes,
                filled.checksum,
                filled.bytes as f64 / f64::from(1 << 20) / filled.seconds.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("error: {error}");
            match templatecache_mover::is_final(&error) {
                true => ExitCode::from(templatecache_mover::EXIT_FINAL),
                false => ExitCode::FAILURE,
            }
        }
        Err(stopped) => {
            eprintln!("error: the fill stopped: {stopped}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds() -> Result<(), String> {
    let yaml =
        templatecache_api::crds_yaml().map_err(|e| format!("cannot render the CRDs: {e}"))?;
    print!("{yaml}");
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let shutdown = shutdown_signal().shared();
    let endpoints = http::serve(
        args.metrics_address,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    );
    let endpoints = tokio::spawn(endpoints);
    client
        .apiserver_version()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    readiness.set(true);
    let config = args.config();
    let result = if args.leader_elect {
        let controllers = |stop: tokio::sync::oneshot::Receiver<()>| {
            controller::run_with(client.clone(), config, metrics.clone(), async {
                let _ = stop.await;
            })
        };
        let settings = args.leader_settings();
        leader::run_as_leader(client.clone(), settings, &metrics, shutdown, controllers)
            .await
            .map_err(|e| e.to_string())
    } else {
        controller::run_with(client, config, metrics.clone(), shutdown).await;
        Ok(())
    };
    endpoints.abort();
    result
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C, so in-flight reconciles finish.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
