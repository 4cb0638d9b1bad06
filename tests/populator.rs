//! The volume populator on the real node: a PersistentVolumeClaim whose `dataSourceRef` names a
//! TemplateCache gets its own volume, provisioned by the controller manager's host-path
//! provisioner, filled by a populate Job's Pod from the staged copy and bound to the claim by
//! the real PV controller. The claim holds a reference on the cache until it is bound, never
//! after; a claim smaller than the template is never filled; a claim made before its cache
//! waits for it; a claim deleted during its fill leaves nothing behind.

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use support::http_server::HttpServer;
use support::rig::{Rig, random_bytes, sha256};
use templatecache::controller::Config;
use templatecache::controller::jobs::populate_job_name;
use templatecache::controller::populator::plan::prime_name;
use templatecache_api::TemplateCache;
use templatecache_api::names::{POPULATE_FOR_LABEL, POPULATED_FROM_ANNOTATION, PVC_REF_PREFIX};

const MIB: usize = 1 << 20;

/// A StorageClass of the controller manager's host-path provisioner (node mode turns it on),
/// deleted when dropped.
struct HostPathClass {
    name: String,
}

impl HostPathClass {
    async fn new(rig: &Rig, binding: &str) -> Self {
        let name = format!("{}-hostpath", rig.ns.name);
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name},
            "provisioner": "kubernetes.io/host-path",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": binding
        }))
        .expect("class");
        Api::<StorageClass>::all(rig.client().clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create the StorageClass");
        Self { name }
    }
}

impl Drop for HostPathClass {
    fn drop(&mut self) {
        let mut delete = support::kubectl();
        delete.args(["delete", "storageclass", &self.name, "--wait=false"]);
        let _ = support::tools::run(delete);
    }
}

/// The operator's settings for these tests: prime claims and populate Jobs in `home`, run as
/// root, since the host-path provisioner makes root-owned folders (mode 0750).
fn populating(config: &mut Config, home: String) {
    config.operator_namespace = home;
    config.populate_as_root = true;
}

/// The rig of a populator test: the caches' namespace, and the operator's own (where prime
/// claims and populate Jobs go) as a second rig.
struct Populating {
    rig: Rig,
    home: Rig,
    class: HostPathClass,
    server: HttpServer,
}

impl Populating {
    async fn new(prefix: &str) -> Self {
        Self::with_binding(prefix, "Immediate").await
    }

    /// A rig whose class binds volumes `mode` (`Immediate` or `WaitForFirstConsumer`).
    async fn with_binding(prefix: &str, mode: &str) -> Self {
        Self::start(prefix, mode, "1Gi", json!({})).await
    }

    /// A rig whose class binds volumes `mode`, with a store of `capacity` and `eviction`.
    async fn start(prefix: &str, mode: &str, capacity: &str, eviction: serde_json::Value) -> Self {
        let home = Rig::builder(&format!("{prefix}-home")).start().await;
        let home_name = home.ns.name.clone();
        let rig = Rig::builder(prefix)
            .store(capacity)
            .eviction(eviction)
            .configured(move |config| populating(config, home_name))
            .runs_jobs()
            .start()
            .await;
        let class = HostPathClass::new(&rig, mode).await;
        Self {
            rig,
            home,
            class,
            server: HttpServer::start().await,
        }
    }

    /// A Ready cache `name` of `size` random bytes; its bytes.
    async fn ready_cache(&self, name: &str, size: usize) -> Vec<u8> {
        let bytes = random_bytes(size);
        self.server.put(name, &bytes);
        self.rig
            .create(
                name,
                json!({"source": {"http": {"url": self.server.url(name)}}}),
            )
            .await;
        self.rig.assert_copied(name, &bytes).await;
        bytes
    }

    /// A cache `name` of 1 MiB, made and held by a TemplateCacheClaim through the client.
    async fn held_cache(&self, name: &str) -> templatecache_client::Reference {
        let bytes = random_bytes(MIB);
        self.server.put(name, &bytes);
        let url = self.server.url(name);
        let spec = serde_json::from_value(json!({"source": {"http": {"url": url}}})).expect("spec");
        let request = self.rig.ns.request(name, Some(spec));
        templatecache_client::acquire(self.rig.client().clone(), &request, "holder")
            .await
            .expect("acquire")
    }

    /// Waits until the populate Job of the claim with `uid` exists.
    async fn populate_job_started(&self, uid: &str) {
        let jobs = self.home.ns.api::<Job>();
        let name = populate_job_name(uid);
        eventually(
            "the populate Job exists",
            Duration::from_secs(60),
            || async { jobs.get_opt(&name).await.ok()? },
        )
        .await;
    }

    /// Starts an operator again after `stop_operators`, with the same settings.
    async fn restart_operator(&mut self) {
        let mut config = self.rig.config();
        populating(&mut config, self.home.ns.name.clone());
        self.rig.start_operator(config).await;
    }

    /// A claim `name` of `storage` to be filled from cache `cache`.
    async fn claim(&self, name: &str, cache: &str, storage: &str) -> PersistentVolumeClaim {
        self.rig
            .ns
            .create::<PersistentVolumeClaim>(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": self.class.name,
                    "resources": {"requests": {"storage": storage}},
                    "dataSourceRef": {"apiGroup": "templatecache.io", "kind": "TemplateCache",
                                      "name": cache}
                }
            }))
            .await
    }

    /// The claim `name` once the PV controller has bound it, and its volume.
    async fn bound(&self, name: &str) -> (PersistentVolumeClaim, PersistentVolume) {
        let claims: Api<PersistentVolumeClaim> = self.rig.ns.api();
        let claim = eventually(
            &format!("claim {name} is filled and bound"),
            Duration::from_secs(180),
            || async {
                let claim = claims.get(name).await.ok()?;
                let phase = claim.status.as_ref()?.phase.clone();
                (phase.as_deref() == Some("Bound")).then_some(claim)
            },
        )
        .await;
        let volume_name = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        let volumes: Api<PersistentVolume> = Api::all(self.rig.client().clone());
        let volume = volumes
            .get(&volume_name.expect("bound to a volume"))
            .await
            .expect("the volume");
        (claim, volume)
    }

    /// Waits until nothing the populator made for `claim` is left in the operator's namespace
    /// and the cache holds no volume reference.
    async fn assert_nothing_left(&self, claim: &PersistentVolumeClaim, cache: &str) {
        let uid = claim.uid().expect("uid");
        let selector = ListParams::default().labels(&format!("{POPULATE_FOR_LABEL}={uid}"));
        let (primes, jobs) = (
            self.home.ns.api::<PersistentVolumeClaim>(),
            self.home.ns.api::<Job>(),
        );
        let caches = self.rig.ns.api::<TemplateCache>();
        eventually(
            "the prime claim, the Job and the reference are gone",
            Duration::from_secs(90),
            || async {
                let listed = (primes.list(&selector).await, jobs.list(&selector).await);
                let (Ok(primes), Ok(jobs)) = listed else {
                    return Err("no answer from the API server".to_owned());
                };
                let cache = caches.get(cache).await.map_err(|e| e.to_string())?;
                let held = cache
                    .finalizers()
                    .iter()
                    .any(|f| f.starts_with(PVC_REF_PREFIX));
                match (primes.items.len(), jobs.items.len(), held) {
                    (0, 0, false) => Ok(()),
                    left => Err(format!("prime claims, Jobs, reference held: {left:?}")),
                }
            },
        )
        .await;
    }

    /// The reasons of the Events on claim `name`.
    async fn event_reasons(&self, name: &str) -> Vec<String> {
        let events = self.events(name).await;
        events.into_iter().map(|(reason, _)| reason).collect()
    }

    /// The reasons and notes of the Events on claim `name`.
    async fn events(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<Event> = self.rig.ns.api();
        let selector = format!("regarding.name={name},regarding.kind=PersistentVolumeClaim");
        let listed = events
            .list(&ListParams::default().fields(&selector))
            .await
            .expect("events");
        (listed.items.into_iter())
            .filter_map(|e| Some((e.reason?, e.note.unwrap_or_default())))
            .collect()
    }

    /// Waits for an Event `reason` on claim `name`; its note.
    async fn event(&self, name: &str, reason: &str) -> String {
        eventually(
            &format!("{reason} on claim {name}"),
            Duration::from_secs(120),
            || async {
                let events = self.events(name).await;
                events
                    .into_iter()
                    .find(|(r, _)| r == reason)
                    .map(|(_, note)| note)
            },
        )
        .await
    }
}

/// The bytes at `disk.img` of a host-path volume (this machine is the node).
fn disk_image(volume: &PersistentVolume) -> Vec<u8> {
    let path = volume
        .spec
        .as_ref()
        .and_then(|s| s.host_path.as_ref())
        .map(|h| h.path.clone())
        .expect("a host-path volume");
    std::fs::read(std::path::Path::new(&path).join("disk.img")).expect("disk.img")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_gets_its_own_volume_filled_from_the_cache_and_releases_it_once_bound() {
    let t = Populating::new("populate").await;
    let bytes = t.ready_cache("img", 4 * MIB).await;
    let claim = t.claim("vm-1-root", "img", "16Mi").await;
    let (bound, volume) = t.bound("vm-1-root").await;
    assert_eq!(
        disk_image(&volume),
        bytes,
        "the claim's volume holds the template as disk.img"
    );
    let from = volume.annotations().get(POPULATED_FROM_ANNOTATION);
    assert_eq!(
        from,
        Some(&format!("{}/img@{}", t.rig.ns.name, sha256(&bytes))),
        "the volume says what it was filled from"
    );
    let claim_ref = volume
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.clone())
        .expect("claimRef");
    assert_eq!(
        claim_ref.uid,
        claim.uid(),
        "bound to the user's claim by UID"
    );
    t.assert_nothing_left(&bound, "img").await;
    let reasons = t.event_reasons("vm-1-root").await;
    for reason in ["Populating", "Populated"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
    // The cache is free again: the filled volume no longer needs it.
    let cache: TemplateCache = t.rig.ns.api().get("img").await.expect("cache");
    assert_eq!(cache.status.and_then(|s| s.ref_count), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_smaller_than_the_template_is_refused_and_one_before_its_cache_waits() {
    let t = Populating::new("populate-wait").await;
    // Before the cache exists: the claim waits and says why.
    let early = t.claim("early", "later", "16Mi").await;
    t.event("early", "CacheNotFound").await;
    let bytes = t.ready_cache("later", 2 * MIB).await;
    let (early_bound, volume) = t.bound("early").await;
    assert_eq!(disk_image(&volume), bytes);
    t.assert_nothing_left(&early_bound, "later").await;
    assert_eq!(early_bound.uid(), early.uid());

    // Smaller than the template: refused by an Event, nothing made.
    let small = t.claim("small", "later", "1Mi").await;
    let note = t.event("small", "VolumeTooSmall").await;
    assert!(note.contains(&format!("{} bytes", 2 * MIB)), "{note}");
    let uid = small.uid().expect("uid");
    let selector = ListParams::default().labels(&format!("{POPULATE_FOR_LABEL}={uid}"));
    let primes = t
        .home
        .ns
        .api::<PersistentVolumeClaim>()
        .list(&selector)
        .await;
    assert!(
        primes.expect("list").items.is_empty(),
        "no prime claim for it"
    );
    let claim: PersistentVolumeClaim = t.rig.ns.api().get("small").await.expect("claim");
    assert_ne!(
        claim.status.and_then(|s| s.phase).as_deref(),
        Some("Bound"),
        "never bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_deleted_during_its_fill_leaves_nothing_behind() {
    let t = Populating::new("populate-gone").await;
    t.ready_cache("img", 8 * MIB).await;
    let claim = t.claim("doomed", "img", "16Mi").await;
    let uid = claim.uid().expect("uid");
    t.populate_job_started(&uid).await;
    t.rig
        .ns
        .api::<PersistentVolumeClaim>()
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete the claim");
    t.assert_nothing_left(&claim, "img").await;
    let volumes: Api<PersistentVolume> = Api::all(t.rig.client().clone());
    eventually(
        "no volume is left for it",
        Duration::from_secs(90),
        || async {
            let listed = volumes.list(&ListParams::default()).await.ok()?;
            let left = listed.items.iter().any(|v| {
                let claim_ref = v.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
                claim_ref.is_some_and(|r| {
                    r.uid.as_deref() == Some(uid.as_str())
                        || r.name.as_deref() == Some(prime_name(&uid).as_str())
                })
            });
            (!left).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_file_changed_after_the_copy_never_reaches_a_volume() {
    let t = Populating::new("populate-tampered").await;
    let bytes = t.ready_cache("img", 2 * MIB).await;
    // Someone with write access to the store's folder swaps the bytes, keeping the size.
    let mut other = random_bytes(bytes.len());
    other[0] = bytes[0].wrapping_add(1);
    std::fs::write(t.rig.data("img"), &other).expect("tamper with the staged file");
    t.claim("vm-1-root", "img", "16Mi").await;
    let note = t.event("vm-1-root", "PopulateFailed").await;
    assert!(
        note.contains("not the cache's") && note.contains(&sha256(&bytes)),
        "the Event names the mismatch and the cache's checksum: {note}"
    );
    let claim: PersistentVolumeClaim = t.rig.ns.api().get("vm-1-root").await.expect("claim");
    assert_ne!(
        claim.status.and_then(|s| s.phase).as_deref(),
        Some("Bound"),
        "the claim is never bound to the volume"
    );
    // Failed at once (exit code 3, the Job's podFailurePolicy), not tried three more times.
    let uid = claim.metadata.uid.expect("uid");
    let pods = t.home.ns.api::<Pod>();
    let selector = ListParams::default().labels(&format!("job-name={}", populate_job_name(&uid)));
    let tries = pods.list(&selector).await.expect("pods").items.len();
    assert_eq!(tries, 1, "one Pod, no retry of a fill that cannot succeed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_deleted_during_a_fill_goes_only_once_the_volume_is_filled() {
    let t = Populating::new("populate-delete").await;
    let bytes = t.ready_cache("img", 4 * MIB).await;
    let claim = t.claim("vm-1-root", "img", "16Mi").await;
    let uid = claim.uid().expect("uid");
    let caches = t.rig.ns.api::<TemplateCache>();
    eventually(
        "the claim's reference is on the cache",
        Duration::from_secs(60),
        || async {
            let cache = caches.get("img").await.ok()?;
            let reference = format!("{PVC_REF_PREFIX}{uid}");
            cache.finalizers().contains(&reference).then_some(())
        },
    )
    .await;
    caches
        .delete("img", &DeleteParams::default())
        .await
        .expect("delete the cache");
    let (_, volume) = t.bound("vm-1-root").await;
    assert_eq!(disk_image(&volume), bytes, "the fill read a whole cache");
    support::jobs::wait_for_cache_gone(t.rig.client(), &t.rig.ns.name, "img").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_first_consumer_claim_fills_where_its_pod_is_scheduled_and_the_pod_reads_it() {
    let t = Populating::with_binding("populate-wffc", "WaitForFirstConsumer").await;
    let bytes = t.ready_cache("img", 2 * MIB).await;
    t.claim("vm-1-root", "img", "16Mi").await;
    t.event("vm-1-root", "WaitingForFirstConsumer").await;
    let (_, images) = support::jobs_on_node().expect("the node");
    // The host-path volume is root's (0750), so the reader runs as root in this
    // unrestricted namespace.
    t.rig
        .ns
        .create::<Pod>(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "vm-1"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{"name": "read", "image": images.consumer.pinned(),
                    "command": ["sha256sum", "/disk/disk.img"],
                    "securityContext": {"runAsUser": 0},
                    "volumeMounts": [{"name": "root", "mountPath": "/disk"}]}],
                "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "vm-1-root"}}]
            }
        }))
        .await;
    let (claim, volume) = t.bound("vm-1-root").await;
    assert_eq!(disk_image(&volume), bytes);
    let node = claim
        .annotations()
        .get("volume.kubernetes.io/selected-node")
        .cloned();
    assert!(node.is_some(), "the scheduler chose the node first");
    let pods = t.rig.ns.api::<Pod>();
    let digest = sha256(&bytes);
    let hex = digest.trim_start_matches("sha256:").to_owned();
    eventually(
        "the Pod read its volume",
        Duration::from_secs(120),
        || async {
            let log = pods.logs("vm-1", &Default::default()).await.ok()?;
            log.contains(&hex).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_stopped_mid_fill_finishes_the_fill_when_it_is_back() {
    let mut t = Populating::new("populate-restart").await;
    let bytes = t.ready_cache("img", 4 * MIB).await;
    let claim = t.claim("vm-1-root", "img", "16Mi").await;
    let uid = claim.uid().expect("uid");
    t.populate_job_started(&uid).await;
    t.rig.stop_operators().await;
    // The fill goes on without the operator; nothing hands the volume over meanwhile.
    support::jobs::wait_until_complete(t.rig.client(), &t.home.ns.name, &populate_job_name(&uid))
        .await;
    let claims: Api<PersistentVolumeClaim> = t.rig.ns.api();
    let unbound = claims.get("vm-1-root").await.expect("claim");
    assert_eq!(unbound.spec.and_then(|s| s.volume_name), None);
    t.restart_operator().await;
    let (bound, volume) = t.bound("vm-1-root").await;
    assert_eq!(disk_image(&volume), bytes);
    t.assert_nothing_left(&bound, "img").await;
}

/// The rollout the populator exists for: 50 claims of one template at once, one fetch.
const CLAIMS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_claims_of_one_cache_are_one_fetch_and_fifty_fills() {
    let t = Populating::new("populate-fifty").await;
    let bytes = t.ready_cache("img", 2 * MIB).await;
    let fetched = t.server.requests();
    let started = std::time::Instant::now();
    let names: Vec<String> = (0..CLAIMS).map(|i| format!("vm-{i}-root")).collect();
    futures::future::join_all(names.iter().map(|name| t.claim(name, "img", "8Mi"))).await;
    let mut claims = vec![];
    for name in &names {
        let (claim, volume) = t.bound(name).await;
        assert_eq!(disk_image(&volume), bytes, "{name}");
        claims.push(claim);
    }
    let filled = started.elapsed();
    for claim in &claims {
        t.assert_nothing_left(claim, "img").await;
    }
    let copies = t
        .rig
        .ns
        .api::<Job>()
        .list(&ListParams::default())
        .await
        .expect("jobs");
    let copy_jobs: Vec<String> = copies.items.iter().map(|j| j.name_any()).collect();
    assert_eq!(copy_jobs, ["img-copy-1"], "one fetch from the origin");
    assert_eq!(
        t.server.requests(),
        fetched,
        "the fills asked the origin for nothing: it served the template once, for the copy"
    );
    let cache: TemplateCache = t.rig.ns.api().get("img").await.expect("cache");
    assert_eq!(cache.status.and_then(|s| s.ref_count), Some(0));
    eprintln!(
        "{CLAIMS} claims filled and bound {:.1} s after they were made",
        filled.as_secs_f64()
    );
}

/// A loop device over a file of `size` bytes, detached when dropped: a block volume.
struct LoopDevice {
    path: String,
    _backing: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64) -> Self {
        let backing = tempfile::tempdir().expect("backing folder");
        let file = backing.path().join("device");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let mut attach = std::process::Command::new("losetup");
        attach.args(["--find", "--show"]).arg(&file);
        let path = support::tools::run(attach)
            .expect("losetup")
            .trim()
            .to_owned();
        Self {
            path,
            _backing: backing,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.path])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_claim_gets_the_raw_template_from_offset_zero() {
    let t = Populating::new("populate-block").await;
    let bytes = t.ready_cache("img", 2 * MIB).await;
    let device = LoopDevice::new(16 << 20);
    // A class without a provisioner: the test provisions the prime claim's volume itself, a
    // local block volume on the node pre-bound to the prime claim, as an admin would.
    let class = format!("{}-local", t.rig.ns.name);
    let storage_classes: Api<StorageClass> = Api::all(t.rig.client().clone());
    let local: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate"
    }))
    .expect("class");
    storage_classes
        .create(&PostParams::default(), &local)
        .await
        .expect("create the class");
    let claim: PersistentVolumeClaim = t
        .rig
        .ns
        .create(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "vm-1-root"},
            "spec": {
                "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                "storageClassName": class,
                "resources": {"requests": {"storage": "16Mi"}},
                "dataSourceRef": {"apiGroup": "templatecache.io", "kind": "TemplateCache",
                                  "name": "img"}
            }
        }))
        .await;
    let prime = prime_name(&claim.uid().expect("uid"));
    let primes = t.home.ns.api::<PersistentVolumeClaim>();
    let made = eventually("the prime claim", Duration::from_secs(60), || async {
        primes.get_opt(&prime).await.ok()?
    })
    .await;
    assert_eq!(
        made.spec.and_then(|s| s.volume_mode).as_deref(),
        Some("Block")
    );
    let (node, _) = support::jobs_on_node().expect("the node");
    let volume_name = format!("{}-block", t.rig.ns.name);
    let volumes: Api<PersistentVolume> = Api::all(t.rig.client().clone());
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": volume_name},
        "spec": {
            "capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Block", "storageClassName": class,
            "persistentVolumeReclaimPolicy": "Retain",
            "local": {"path": device.path},
            "claimRef": {"namespace": t.home.ns.name, "name": prime},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": [node.name]}]}]}}
        }
    }))
    .expect("volume");
    volumes
        .create(&PostParams::default(), &volume)
        .await
        .expect("create the volume");
    let (bound, _) = t.bound("vm-1-root").await;
    assert_eq!(
        bound.spec.as_ref().and_then(|s| s.volume_name.as_deref()),
        Some(volume_name.as_str())
    );
    let written = std::fs::read(&device.path).expect("read the device");
    assert_eq!(
        &written[..bytes.len()],
        &bytes[..],
        "the template from offset 0"
    );
    t.assert_nothing_left(&bound, "img").await;
    // Retained: the test's to delete, after its claim.
    t.rig
        .ns
        .api::<PersistentVolumeClaim>()
        .delete("vm-1-root", &DeleteParams::default())
        .await
        .expect("delete the claim");
    let _ = volumes.delete(&volume_name, &DeleteParams::default()).await;
    let _ = storage_classes
        .delete(&class, &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_for_its_fill_holds_its_cache_against_eviction() {
    // Room for 3 MiB; over 90 % the store evicts unheld caches down to 70 %.
    let eviction =
        json!({"highWatermarkPercent": 90, "lowWatermarkPercent": 70, "minUnusedSeconds": 0});
    let t = Populating::start("populate-evict", "WaitForFirstConsumer", "3Mi", eviction).await;
    let bytes = t.ready_cache("img", 2 * MIB).await;
    // No Pod uses the claim: it waits for its fill, holding its reference.
    t.claim("vm-1-root", "img", "16Mi").await;
    t.event("vm-1-root", "WaitingForFirstConsumer").await;
    // A held 1 MiB cache fills the store; a third one finds no room, since the only other
    // cache is held by the waiting claim.
    let other = t.held_cache("other").await;
    other
        .wait_ready(Duration::from_secs(120))
        .await
        .expect("other Ready");
    let more = t.held_cache("more").await;
    let reason_of = |c: &TemplateCache| {
        let status = c.status.as_ref()?;
        templatecache_api::conditions::find(
            &status.conditions,
            templatecache_api::conditions::READY,
        )
        .map(|r| r.reason.clone())
    };
    support::jobs::wait_for_cache(t.rig.client(), &t.rig.ns.name, "more", "StoreFull", |c| {
        reason_of(c).as_deref() == Some("StoreFull")
    })
    .await;
    t.rig.assert_copied("img", &bytes).await;
    // Once the claim goes, so does its reference: the cache is evicted and the third copied.
    t.rig
        .ns
        .api::<PersistentVolumeClaim>()
        .delete("vm-1-root", &DeleteParams::default())
        .await
        .expect("delete the claim");
    more.wait_ready(Duration::from_secs(120))
        .await
        .expect("more Ready");
    let img: TemplateCache = t.rig.ns.api().get("img").await.expect("img");
    assert_eq!(
        img.status.and_then(|s| s.phase),
        Some(templatecache_api::Phase::Evicted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_deleted_while_the_operator_is_down_leaves_nothing_behind() {
    let mut t = Populating::new("populate-orphan").await;
    t.ready_cache("img", 4 * MIB).await;
    let claim = t.claim("doomed", "img", "16Mi").await;
    let uid = claim.uid().expect("uid");
    t.populate_job_started(&uid).await;
    // Gone for good before any operator sees it being deleted: no reconcile of it will come.
    t.rig.stop_operators().await;
    let claims: Api<PersistentVolumeClaim> = t.rig.ns.api();
    claims
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete the claim");
    eventually("the claim is gone", Duration::from_secs(60), || async {
        claims.get_opt("doomed").await.ok()?.is_none().then_some(())
    })
    .await;
    t.restart_operator().await;
    t.assert_nothing_left(&claim, "img").await;
}
