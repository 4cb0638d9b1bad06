//! A namespace with a store, an operator and a local Job executor: everything an end-to-end
//! test of real copies needs, and the checks those tests share.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Api;

use serde_json::json;
use sha2::{Digest, Sha256};
use templatecache::api::conditions::{READY, find};
use templatecache::api::reasons::cache as reason;
use templatecache::api::{Phase, StagingStore, TemplateCache};
use templatecache::controller::Config;

use super::TestNamespace;
use super::executor::Executor;
use super::jobs::wait_for_cache;
use super::operator::{Operator, TestStore, config};

/// A namespace with a store, an operator (retry limit `attempts`) and an executor.
pub struct Rig {
    pub ns: TestNamespace,
    pub store: TestStore,
    pub operator: Operator,
    _executor: Executor,
}

impl Rig {
    pub async fn new(prefix: &str, attempts: u32) -> Self {
        Self::with_store(prefix, attempts, "10Gi", json!({})).await
    }

    /// A rig whose store has `capacity` and the `eviction` policy.
    pub async fn with_store(
        prefix: &str,
        attempts: u32,
        capacity: &str,
        eviction: serde_json::Value,
    ) -> Self {
        Self::build(prefix, capacity, eviction, |cfg| {
            cfg.retry.max_attempts = attempts
        })
        .await
    }

    /// A rig whose operator runs with `adjust` applied to the tests' [`config`].
    pub async fn with_config(prefix: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::build(prefix, "10Gi", json!({}), adjust).await
    }

    /// A rig whose store has `capacity` and the `eviction` policy, and whose operator runs with
    /// `adjust` applied to the tests' [`config`].
    pub async fn build(
        prefix: &str,
        capacity: &str,
        eviction: serde_json::Value,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let ns = TestNamespace::new(prefix).await;
        let name = format!("{}-store", ns.name);
        let store = TestStore::with_eviction(&ns.client, &name, capacity, eviction).await;
        let mut cfg = config(&ns.name, &store.name);
        adjust(&mut cfg);
        let operator = Operator::start(cfg).await;
        let executor = Executor::start(&ns.name);
        Self {
            ns,
            store,
            operator,
            _executor: executor,
        }
    }

    pub async fn create(&self, name: &str, spec: serde_json::Value) {
        self.ns.create_cache(name, spec).await;
    }

    pub fn data(&self, name: &str) -> std::path::PathBuf {
        self.store.dir.path().join(&self.ns.name).join(name)
    }

    /// The namespace's folder in the store.
    pub fn folder(&self) -> std::path::PathBuf {
        self.store.dir.path().join(&self.ns.name)
    }

    /// Files of the namespace's folder in the store, partial files as `.partial/<name>`.
    pub fn files(&self) -> Vec<String> {
        store_files(&self.folder())
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Samples the namespace's folder in the store and the store's reported usage every 20 ms
    /// until the task is aborted; the largest of each so far.
    pub fn sample_usage(&self) -> (Arc<Mutex<(u64, u64)>>, tokio::task::JoinHandle<()>) {
        let peak = Arc::new(Mutex::new((0, 0)));
        let dir = self.folder();
        let stores: Api<StagingStore> = Api::all(self.ns.client.clone());
        let store = self.store.name.clone();
        let out = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                let disk = bytes_on_disk(&dir);
                let reported = stores
                    .get(&store)
                    .await
                    .expect("read the store's usage")
                    .status
                    .and_then(|s| s.used_bytes)
                    .unwrap_or(0);
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

    pub async fn stop(self) {
        self.operator.stop().await;
        self.store.delete().await;
        self.ns.delete().await;
    }
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
