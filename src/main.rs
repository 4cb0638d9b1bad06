//! The `templatecache` binary: `run` (the operator), `crd` (print the CRDs), `copy` and `remove`
//! (what the operator's Jobs run).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use templatecache::controller::jobs::JobSettings;
use templatecache::controller::template_cache::lifecycle::RetryPolicy;
use templatecache::controller::{self, Config};
use templatecache::runtime::telemetry::{self, LogFormat};

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
    Copy(templatecache::copy::CopyArgs),
    /// Remove a cache's data from a staging store (what a remove Job runs).
    Remove(templatecache::copy::RemoveArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Reconcile only this namespace (all namespaces when unset).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// StagingStore for caches without `spec.storeRef`.
    #[arg(long, default_value = "default", env = "TEMPLATECACHE_DEFAULT_STORE")]
    default_store: String,
    /// Image of the copy and remove Jobs (contains this binary).
    #[arg(long, env = "TEMPLATECACHE_JOB_IMAGE", default_value = concat!("ghcr.io/templatecache/templatecache:", env!("CARGO_PKG_VERSION")))]
    job_image: String,
    /// ServiceAccount of the copy and remove Jobs (the namespace's default when unset).
    #[arg(long, env = "TEMPLATECACHE_JOB_SERVICE_ACCOUNT")]
    job_service_account: Option<String>,
    /// Copy attempts per cache before it is marked Failed for good.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Wait after the first failed attempt, in seconds; doubles after each further failure.
    #[arg(long, default_value_t = 10)]
    retry_base_seconds: u64,
    /// Caches reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Seconds between checks of a cache's Pod references for Pods that are gone (a backstop
    /// for missed deletion events).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    reference_sweep_seconds: u64,
    /// Name of this replica in Events and the leader Lease.
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

impl RunArgs {
    fn into_config(self) -> Config {
        Config {
            namespace: self.namespace,
            default_store: self.default_store,
            jobs: JobSettings {
                image: self.job_image,
                service_account: self.job_service_account,
            },
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base_delay: Duration::from_secs(self.retry_base_seconds),
                ..RetryPolicy::default()
            },
            concurrency: self.concurrency,
            reference_sweep: Duration::from_secs(self.reference_sweep_seconds),
            instance: self.instance,
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
        Command::Copy(args) => templatecache::copy::run_copy(args)
            .await
            .map(|done| println!("copied {} bytes, {}", done.bytes, done.checksum))
            .map_err(|e| e.to_string()),
        Command::Remove(args) => templatecache::copy::run_remove(args)
            .await
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds() -> Result<(), String> {
    let yaml =
        templatecache::api::crds_yaml().map_err(|e| format!("cannot render the CRDs: {e}"))?;
    print!("{yaml}");
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    controller::run(client, args.into_config(), shutdown_signal()).await;
    Ok(())
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
