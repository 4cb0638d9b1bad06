//! The one setup of the integration tests: a namespace of the test's own and, as the test asks,
//! a StagingStore, in-process operators, and Jobs run on the real node. Everything it started goes
//! when it is dropped, also when the test panics: a test never tears down by hand.
//!
//! Teardown order matters. The operators stop first (each is a drop guard of its own), so none
//! writes while the namespace goes; then the store is deleted and the
//! caches lose their finalizers and are deleted before the namespace is (see
//! [`delete_test_objects`]). Drop
//! cannot await, and a kube client is bound to the runtime it was made on, so that last part runs
//! on a thread of its own with a small runtime and a fresh client, joined before drop returns.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch};
use kube::{Api, Client};

use serde_json::json;
use sha2::{Digest, Sha256};
use templatecache::controller::Config;
use templatecache_api::conditions::{READY, find};
use templatecache_api::reasons::cache as reason;
use templatecache_api::{Phase, StagingStore, TemplateCache};

use super::TestNamespace;
use super::jobs::{wait_for_cache, wait_for_reason};
use super::operator::{Operator, TestStore, config};

/// A test's namespace and what runs in it; dropping it removes everything (see the module).
pub struct Rig {
    pub ns: TestNamespace,
    store: Option<TestStore>,
    operators: Vec<Operator>,
}

/// Changes a test makes to the tests' operator [`config`].
type Adjust = Box<dyn FnOnce(&mut Config)>;

/// What a [`Rig`] starts: a namespace always, the rest on request.
pub struct RigBuilder {
    prefix: String,
    store: Option<(String, serde_json::Value)>,
    operator: Option<Adjust>,
    runs_jobs: bool,
}

impl RigBuilder {
    /// A StagingStore of `capacity` over a fresh temporary folder, named `<namespace>-store`.
    pub fn store(mut self, capacity: &str) -> Self {
        let eviction = self
            .store
            .take()
            .map(|(_, e)| e)
            .unwrap_or_else(|| json!({}));
        self.store = Some((capacity.to_owned(), eviction));
        self
    }

    /// The store's `spec.eviction` policy.
    pub fn eviction(mut self, eviction: serde_json::Value) -> Self {
        let capacity = self
            .store
            .take()
            .map_or_else(|| "10Gi".to_owned(), |(c, _)| c);
        self.store = Some((capacity, eviction));
        self
    }

    /// An operator with the tests' [`config`] (a 10Gi store if none was asked for).
    pub fn operator(self) -> Self {
        self.configured(|_| {})
    }

    /// An operator with `adjust` applied to the tests' [`config`].
    pub fn configured(mut self, adjust: impl FnOnce(&mut Config) + 'static) -> Self {
        if self.store.is_none() {
            self = self.store("10Gi");
        }
        self.operator = Some(Box::new(adjust));
        self
    }

    /// The operator's Jobs run: as Pods on the real node, with the chart's mover account in the
    /// namespace. A test that asks for it fails at once without the node
    /// (`TEMPLATECACHE_JOBS=node`, as `make test-node` runs it), rather than waiting for Jobs
    /// nothing would run.
    pub fn runs_jobs(mut self) -> Self {
        self.runs_jobs = true;
        self
    }

    pub async fn start(self) -> Rig {
        let ns = TestNamespace::new(&self.prefix).await;
        let mut rig = Rig {
            ns,
            store: None,
            operators: vec![],
        };
        if let Some((capacity, eviction)) = self.store {
            let name = format!("{}-store", rig.ns.name);
            let store = TestStore::with_eviction(&rig.ns.client, &name, &capacity, eviction).await;
            rig.store = Some(store);
        }
        // The kubelet runs the Jobs, always with their ServiceAccount's token: the account must
        // exist before the operator makes the first Job.
        if self.runs_jobs {
            assert!(
                super::jobs_on_node().is_some(),
                "this test runs Jobs, which need the real node: `make test-node`, or \
                 TEMPLATECACHE_JOBS=node cargo test (as root; it brings the node up)"
            );
            super::node::mover_account(&rig.ns.name);
        }
        if let Some(adjust) = self.operator {
            let mut cfg = rig.config();
            adjust(&mut cfg);
            rig.start_operator(cfg).await;
        }
        rig
    }
}

impl Rig {
    /// A rig with a namespace named after `prefix`; ask the builder for the rest.
    pub fn builder(prefix: &str) -> RigBuilder {
        RigBuilder {
            prefix: prefix.to_owned(),
            store: None,
            operator: None,
            runs_jobs: false,
        }
    }

    /// A namespace and nothing else.
    pub async fn namespace(prefix: &str) -> Self {
        Self::builder(prefix).start().await
    }

    /// A namespace with a store and an operator whose Jobs never run (no kubelet on the plain
    /// control plane; no mover account for their Pods on the node): the test plays the Jobs.
    pub async fn operator(prefix: &str) -> Self {
        Self::builder(prefix).operator().start().await
    }

    /// A namespace with a store, an operator (retry limit `attempts`) and Jobs that run.
    pub async fn new(prefix: &str, attempts: u32) -> Self {
        Self::with_store(prefix, attempts, "10Gi", json!({})).await
    }

    /// A full rig whose store has `capacity` and the `eviction` policy.
    pub async fn with_store(
        prefix: &str,
        attempts: u32,
        capacity: &str,
        eviction: serde_json::Value,
    ) -> Self {
        Self::builder(prefix)
            .store(capacity)
            .eviction(eviction)
            .configured(move |cfg| cfg.retry.max_attempts = attempts)
            .runs_jobs()
            .start()
            .await
    }

    /// A full rig whose operator runs with `adjust` applied to the tests' [`config`].
    pub async fn with_config(prefix: &str, adjust: impl FnOnce(&mut Config) + 'static) -> Self {
        Self::builder(prefix)
            .configured(adjust)
            .runs_jobs()
            .start()
            .await
    }

    pub fn client(&self) -> &Client {
        &self.ns.client
    }

    /// The rig's store; panics if the rig was built without one.
    pub fn store(&self) -> &TestStore {
        self.store
            .as_ref()
            .expect("the rig was built without a store")
    }

    /// The tests' operator [`config`] for this namespace and store.
    pub fn config(&self) -> Config {
        config(&self.ns.name, &self.store().name)
    }

    /// Starts one more operator with `config`; it stops with the rig or [`Rig::stop_operators`].
    pub async fn start_operator(&mut self, config: Config) {
        self.operators.push(Operator::start(config).await);
    }

    /// Stops the rig's operators gracefully, as a scenario of an operator going down asks.
    pub async fn stop_operators(&mut self) {
        for operator in self.operators.drain(..) {
            operator.stop().await;
        }
    }

    pub async fn create(&self, name: &str, spec: serde_json::Value) {
        self.ns.create_cache(name, spec).await;
    }

    pub fn data(&self, name: &str) -> std::path::PathBuf {
        self.folder().join(name)
    }

    /// The namespace's folder in the store.
    pub fn folder(&self) -> std::path::PathBuf {
        self.store().dir.path().join(&self.ns.name)
    }

    /// The namespace's folder and its `.partial` folder made ahead of the first Job, as a Pod of
    /// the namespace mounting its folder could: on the node, writable by the mover's group like
    /// the folders the kubelet makes there. Returns the namespace's folder.
    pub fn make_folders(&self) -> std::path::PathBuf {
        let folder = self.folder();
        std::fs::create_dir_all(folder.join(".partial")).expect("the namespace's folders");
        if super::jobs_on_node().is_some() {
            for dir in [folder.clone(), folder.join(".partial")] {
                super::node::hand_to_the_mover(&dir);
            }
        }
        folder
    }

    /// Files of the namespace's folder in the store, partial files as `.partial/<name>`.
    pub fn files(&self) -> Vec<String> {
        store_files(&self.folder())
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// What the rig's store reports as used (`status.usedBytes`) now.
    pub async fn store_used_bytes(&self) -> u64 {
        let stores: Api<StagingStore> = Api::all(self.ns.client.clone());
        reported_usage(&stores, &self.store().name).await
    }

    /// Samples the namespace's folder in the store and the store's reported usage every 20 ms
    /// until the task is aborted; the largest of each so far.
    pub fn sample_usage(&self) -> (Arc<Mutex<(u64, u64)>>, tokio::task::JoinHandle<()>) {
        let peak = Arc::new(Mutex::new((0, 0)));
        let dir = self.folder();
        let stores: Api<StagingStore> = Api::all(self.ns.client.clone());
        let store = self.store().name.clone();
        let out = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                let disk = bytes_on_disk(&dir);
                let reported = reported_usage(&stores, &store).await;
                {
                    let mut peak = out.lock().unwrap();
                    peak.0 = peak.0.max(disk);
                    peak.1 = peak.1.max(reported);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        (peak, task)
    }

    pub async fn settled(&self, name: &str) -> TemplateCache {
        wait_for_cache(
            &self.ns.client,
            &self.ns.name,
            name,
            "Ready or Failed",
            |c| {
                let phase = c.status.as_ref().and_then(|s| s.phase);
                let ready = c.status.as_ref().and_then(|s| find(&s.conditions, READY));
                phase == Some(Phase::Ready)
                    || ready.is_some_and(|r| r.reason == reason::RETRIES_EXHAUSTED)
            },
        )
        .await
    }

    /// Waits until the cache has settled, asserts it failed for good (the rig's last attempt)
    /// and returns the message of its Ready condition.
    pub async fn failed_for_good(&self, name: &str) -> String {
        let cache = self.settled(name).await;
        let message = ready_message(&cache);
        let phase = cache.status.as_ref().and_then(|s| s.phase);
        assert_eq!(phase, Some(Phase::Failed), "{name}: {message}");
        message
    }

    /// Waits until the cache's source address is refused, asserts the refusal is final
    /// (Failed after one attempt, no file in the store) and that its message names each of
    /// `parts`; returns the message.
    pub async fn refused_for_good(&self, name: &str, parts: &[&str]) -> String {
        let wanted = reason::ADDRESS_NOT_ALLOWED;
        let cache = wait_for_reason(&self.ns.client, &self.ns.name, name, wanted).await;
        let status = cache.status.clone().expect("status");
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(status.attempt, Some(1), "refused once, not retried");
        let message = ready_message(&cache);
        for part in parts {
            assert!(
                message.contains(part),
                "the refusal names {part}: {message}"
            );
        }
        let files = self.files();
        assert!(files.is_empty(), "nothing is written: {files:?}");
        message
    }

    /// Asserts the cache is Ready, records the source's size and digest, and its file in the
    /// store is byte-identical to `source`.
    pub async fn assert_copied(&self, name: &str, source: &[u8]) {
        let cache = self.settled(name).await;
        let status = cache.status.clone().expect("status");
        assert_eq!(
            status.phase,
            Some(Phase::Ready),
            "{}",
            ready_message(&cache)
        );
        assert_eq!(status.size, Some(source.len() as u64));
        assert_eq!(status.checksum.as_deref(), Some(&*sha256(source)));
        assert_eq!(std::fs::read(self.data(name)).expect("copied file"), source);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Each operator stops as it drops (see `Operator`'s drop), before anything is deleted.
        self.operators.clear();
        let namespace = self.ns.name.clone();
        let store = self.store.as_ref().map(|s| s.name.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the teardown");
            runtime.block_on(delete_test_objects(&namespace, store.as_deref()));
        });
        // A failed teardown must not turn a test's panic into an abort; the next run's namespace
        // names differ, so what is left only loads the API server.
        if cleanup.join().is_err() {
            eprintln!("teardown of namespace {} failed", self.ns.name);
        }
    }
}

/// Deletes the store and the namespace with its objects. The test's operators are stopped by
/// now, so the caches' finalizers (references and cleanup) are dropped here: otherwise every
/// finished test would leave a namespace stuck Terminating that the namespace controller retries
/// forever, loading the shared API server for the tests after it. The caches are deleted here
/// too, before the namespace: a cluster-wide operator started meanwhile (the quickstart test's)
/// could otherwise add its cleanup finalizer to a cache the namespace controller has not reached
/// yet, and its remove Job is refused in a terminating namespace, so the namespace would never
/// go. A cache that got a finalizer again between the two calls is taken again.
async fn delete_test_objects(namespace: &str, store: Option<&str>) {
    let client = super::client().await;
    if let Some(store) = store {
        let _ = Api::<StagingStore>::all(client.clone())
            .delete(store, &DeleteParams::default())
            .await;
    }
    let caches: Api<TemplateCache> = Api::namespaced(client.clone(), namespace);
    let drop_finalizers = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    for _ in 0..10 {
        let Ok(list) = caches.list(&Default::default()).await else {
            break;
        };
        if list.items.is_empty() {
            break;
        }
        for cache in list {
            let name = cache.metadata.name.unwrap_or_default();
            let _ = caches
                .patch(&name, &Default::default(), &drop_finalizers)
                .await;
            let _ = caches.delete(&name, &DeleteParams::background()).await;
        }
    }
    let _ = Api::<Namespace>::all(client)
        .delete(namespace, &DeleteParams::background())
        .await;
}

/// Entries of a store folder with their sizes, sorted, partial files as `.partial/<name>`. The
/// partial folder itself is not listed: it stays, empty, between copies.
pub fn store_files(dir: &Path) -> Vec<(String, u64)> {
    let mut found = vec![];
    for (prefix, folder) in [("", dir.to_owned()), (".partial/", dir.join(".partial"))] {
        // A folder not made yet holds nothing; any other failure must not read as empty.
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read {}: {e}", folder.display()),
        };
        for entry in entries {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.path().symlink_metadata().expect("metadata");
            if prefix.is_empty() && name == ".partial" && meta.is_dir() {
                continue;
            }
            found.push((format!("{prefix}{name}"), meta.len()));
        }
    }
    found.sort();
    found
}

/// The `status.usedBytes` of `store` (0 before the operator first writes it).
async fn reported_usage(stores: &Api<StagingStore>, store: &str) -> u64 {
    stores
        .get(store)
        .await
        .expect("read the store's usage")
        .status
        .and_then(|s| s.used_bytes)
        .unwrap_or(0)
}

/// Bytes of every file (partial files included) in a store folder.
pub fn bytes_on_disk(dir: &Path) -> u64 {
    store_files(dir).iter().map(|(_, bytes)| bytes).sum()
}

/// Stops a task that watches or samples for the whole test, failing the test if it stopped
/// early (an error, a panic): what it saw would otherwise be silently short.
pub fn stop_observer(task: tokio::task::JoinHandle<()>, what: &str) {
    assert!(
        !task.is_finished(),
        "the {what} stopped before the test ended"
    );
    task.abort();
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

pub fn ready_message(cache: &TemplateCache) -> String {
    let status = cache.status.as_ref().expect("status");
    find(&status.conditions, READY)
        .expect("Ready")
        .message
        .clone()
}

/// Waits until the Ready condition of cache `name` has `wanted` as its reason; returns its
/// message.
pub async fn ready_reason(ns: &TestNamespace, name: &str, wanted: &'static str) -> String {
    ready_message(&wait_for_reason(&ns.client, &ns.name, name, wanted).await)
}

/// The `verified` length of the resume record at `path`, if there is a readable one.
pub fn resume_verified(path: &Path) -> Option<u64> {
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    record["verified"].as_u64()
}
