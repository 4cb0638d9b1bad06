//! A namespace with a store, an operator and a local Job executor: everything an end-to-end
//! test of real copies needs, and the checks those tests share.

use serde_json::json;
use sha2::{Digest, Sha256};
use templatecache::api::{Phase, TemplateCache};
use templatecache::controller::conditions::{READY, find};
use templatecache::controller::template_cache::lifecycle::reason;

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
        Self::with_config(prefix, capacity, eviction, |cfg| {
            cfg.retry.max_attempts = attempts;
        })
        .await
    }

    /// A rig whose operator settings `adjust` changes from the tests' defaults.
    pub async fn with_config(
        prefix: &str,
        capacity: &str,
        eviction: serde_json::Value,
        adjust: impl FnOnce(&mut templatecache::controller::Config),
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

    /// Files of the namespace's folder in the store.
    pub fn files(&self) -> Vec<String> {
        let dir = self.store.dir.path().join(&self.ns.name);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return vec![];
        };
        entries
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
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
