//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas exactly one
//! reconciles. `kube-lease-manager` takes a free Lease with a non-forced server-side apply (so two
//! replicas can never both take it) and renews it with strategic merge patches; this module
//! decides when to act.
//!
//! A leader stops acting the moment it cannot be sure it still leads: when the Lease names
//! someone else, and also when it has not seen its own renewal for nearly a lease duration (a
//! leader cut off from the API server must stop before a standby may take over, not after).
//! Stopping drops the controllers at once, cancelling every reconcile at its next await, and the
//! process exits non-zero to start again as a standby, as controller-runtime does.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::metrics::Metrics;

/// Where the Lease is and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    pub namespace: String,
    pub lease: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// How long a Lease lasts without renewal; a standby takes over this long after the leader
    /// died.
    pub duration: Duration,
    /// The leader renews this long before the Lease would expire.
    pub renew_before: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot set up leader election: {0}")]
    Setup(String),
    #[error("lost the leader Lease {0}; stopping so that another replica leads")]
    Lost(String),
}

/// How often the leader checks that it still holds the Lease.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a replica the manager made leader waits before it confirms and acts.
const SETTLE: Duration = Duration::from_secs(1);

/// Runs `work` while this replica leads, until `shutdown`. `work` gets a future that resolves
/// when it should stop gracefully (on shutdown); on a lost Lease it is dropped at once.
pub async fn run_as_leader<W, F>(
    client: Client,
    settings: LeaderSettings,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
    work: W,
) -> Result<(), LeaderError>
where
    W: FnOnce(oneshot::Receiver<()>) -> F,
    F: Future<Output = ()>,
{
    let seconds = |d: Duration| d.as_secs().max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(seconds(settings.duration))
        .with_grace(seconds(settings.renew_before))
        .build()
        .await
        .map_err(|e| LeaderError::Setup(e.to_string()))?;
    let (mut leading, renewals) = manager.watch().await;
    tokio::pin!(shutdown);

    info!(lease = %settings.lease, identity = %settings.identity, "waiting to lead");
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    loop {
        if *leading.borrow_and_update() && confirmed(&leases, &settings).await {
            break;
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(LeaderError::Setup("the Lease manager stopped".into()));
                }
            }
            () = tokio::time::sleep(CHECK_INTERVAL), if *leading.borrow() => {}
            () = &mut shutdown => {
                drop(leading);
                let _ = renewals.await;
                return Ok(());
            }
        }
    }
    info!(identity = %settings.identity, "leading");
    metrics.leader.set(1);

    let (stop, stopped) = oneshot::channel();
    let work = work(stopped);
    tokio::pin!(work);
    let outcome = tokio::select! {
        () = &mut work => Ok(()),
        () = &mut shutdown => {
            let _ = stop.send(());
            work.await;
            Ok(())
        }
        lost = until_lost(&leases, &settings, &mut leading) => Err(lost),
    };
    metrics.leader.set(0);
    // Closing the channel makes the manager release the Lease, so a standby leads at once
    // instead of waiting for it to expire.
    drop(leading);
    let _ = renewals.await;
    outcome
}

/// Whether the Lease still names us a moment after the manager said it does. A precaution: the
/// manager releases a Lease it last read as expired without reading it again, so a replica that
/// read it just before another took it could take it away in that replica's first moment.
async fn confirmed(leases: &Api<Lease>, settings: &LeaderSettings) -> bool {
    tokio::time::sleep(SETTLE).await;
    match leases.get(&settings.lease).await {
        Ok(lease) => held_until(&lease, &settings.identity).is_some(),
        Err(e) => {
            warn!("cannot read the leader Lease: {e}");
            false
        }
    }
}

/// Resolves once this replica can no longer be sure it leads.
async fn until_lost(
    leases: &Api<Lease>,
    settings: &LeaderSettings,
    leading: &mut watch::Receiver<bool>,
) -> LeaderError {
    let lost = || LeaderError::Lost(settings.lease.clone());
    // Until a read shows otherwise, the Lease was renewed just now (the manager reported it).
    let mut valid_until = Timestamp::now() + settings.duration;
    loop {
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() || !*leading.borrow_and_update() {
                    return lost();
                }
            }
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        match tokio::time::timeout(CHECK_INTERVAL, leases.get(&settings.lease)).await {
            Ok(Ok(lease)) => match held_until(&lease, &settings.identity) {
                Some(until) => valid_until = until,
                None => return lost(),
            },
            Ok(Err(e)) => warn!("cannot read the leader Lease: {e}"),
            Err(_) => warn!("reading the leader Lease timed out"),
        }
        // Stop a moment before the Lease could expire in a standby's eyes.
        if Timestamp::now() + CHECK_INTERVAL >= valid_until {
            warn!("the leader Lease was not renewed in time");
            return lost();
        }
    }
}

/// When the Lease stops being ours, if we hold it.
fn held_until(lease: &Lease, identity: &str) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let seconds = spec.lease_duration_seconds?;
    renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
            seconds,
        )))
        .ok()
}
