//! The real node of the local cluster (hack/node.sh, `make test-node`): where it is, which images
//! its registry holds, and storage provisioned on it the way a platform team's provisioner
//! would.
//!
//! `.cluster/node.env` exists while node mode is on and `.cluster/images.env` once `make image`
//! (or `hack/image.sh`) has pushed the images; the tests read both instead of guessing ports or
//! digests, so they run against exactly what was built.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{TestNamespace, kubectl, repo_root};

/// The UID and GID the image runs as (Dockerfile `USER`, the Jobs' `runAsUser`/`runAsGroup`).
pub const IMAGE_USER: u32 = 65532;

/// The node as `hack/node.sh` describes it in `.cluster/node.env`.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// The node's address on the project's bridge: Pods reach the host there.
    pub ip: IpAddr,
    /// `host:port` of the registry the node pulls from.
    pub registry: String,
}

/// The images `hack/image.sh` pushed, each `name:tag@digest` (`.cluster/images.env`).
#[derive(Clone, Debug)]
pub struct Images {
    pub operator: ImageRef,
    pub consumer: ImageRef,
}

/// `repository:tag@sha256:...`, as the registry holds it.
#[derive(Clone, Debug)]
pub struct ImageRef {
    pub repository: String,
    pub tag: String,
    pub digest: String,
}

impl ImageRef {
    fn parse(pinned: &str) -> Self {
        let (name, digest) = pinned
            .split_once('@')
            .unwrap_or_else(|| panic!("{pinned}: not name@digest"));
        let (repository, tag) = name
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .unwrap_or_else(|| panic!("{pinned}: no tag"));
        Self {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            digest: digest.to_owned(),
        }
    }

    /// The reference a Pod spec names: pinned by digest, so the node runs what was built.
    pub fn pinned(&self) -> String {
        format!("{}:{}@{}", self.repository, self.tag, self.digest)
    }
}

/// Starts the control plane in node mode with the node (idempotent; nothing to do under
/// `make test-node`, which brought it up) and reads where it is and what its registry holds.
/// Call it before anything else of the test: see [`super::ensure_node_cluster`].
pub fn up() -> (Node, Images) {
    super::ensure_node_cluster();
    let node = read_env(
        ".cluster/node.env",
        "the node is not up: run `make node-up`",
    );
    let images = read_env(
        ".cluster/images.env",
        "no images: run `make image` (or `make test-node`)",
    );
    let get = |env: &BTreeMap<String, String>, key: &str| {
        env.get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} is missing"))
    };
    (
        Node {
            name: get(&node, "NODE_NAME"),
            ip: get(&node, "NODE_IP")
                .parse()
                .expect("NODE_IP is an address"),
            registry: get(&node, "REGISTRY"),
        },
        Images {
            operator: ImageRef::parse(&get(&images, "TEMPLATECACHE_IMAGE")),
            consumer: ImageRef::parse(&get(&images, "TEMPLATECACHE_CONSUMER_IMAGE")),
        },
    )
}

/// `KEY=value` lines of a file the node scripts write.
fn read_env(relative: &str, missing: &str) -> BTreeMap<String, String> {
    let path = repo_root().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; {missing}", path.display()));
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A ReadWriteMany volume on the node for a store: a host folder, a `hostPath`
/// PersistentVolume over it and the PersistentVolumeClaim that binds it in a namespace, since
/// the `restricted` Pod Security Standard admits a claim but no `hostPath` volume.
///
/// The folder is made as a provisioner makes one: owned by the image's user and group, mode
/// `2775`. It has to be: a `hostPath` volume gets no `fsGroup` ownership change, the kubelet
/// creates the Jobs' `subPath: <namespace>` folder as root with the volume root's mode, and the
/// mover (UID 65532, never root) must write there. The setgid bit gives that folder the group
/// 65532 and `g+rwx`; without it the copy fails with "cannot write /store/.partial: Permission
/// denied" (README, "Install with Helm"). Removed when dropped, the folder included.
pub struct ProvisionedVolume {
    pub claim: String,
    pub dir: PathBuf,
    volume: String,
}

impl ProvisionedVolume {
    pub fn new(ns: &TestNamespace, claim: &str) -> Self {
        let volume = format!("{}-{claim}", ns.name);
        let dir = repo_root().join(".cluster/node-stores").join(&volume);
        std::fs::create_dir_all(&dir).expect("the volume's folder");
        // The API server refuses a hostPath with `..` in it, as repo_root() has.
        let dir = dir.canonicalize().expect("the volume's folder");
        hand_to_the_mover(&dir);
        let this = Self {
            claim: claim.to_owned(),
            dir,
            volume,
        };
        apply(&json!({
            "apiVersion": "v1", "kind": "List", "items": [
            {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": this.volume, "labels": {"templatecache.io/test": "true"}},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {"namespace": ns.name, "name": claim},
                    "hostPath": {"path": this.dir, "type": "Directory"}
                }
            },
            {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": ns.name},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": this.volume,
                    "resources": {"requests": {"storage": "1Gi"}}
                }
            }]
        }));
        this
    }

    /// Where the store keeps cache `name` of `namespace` on the host.
    pub fn data(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(namespace).join(name)
    }
}

/// Makes `dir` a store folder the image's user writes into, as a provisioner would: owned by
/// UID and GID 65532, mode `2775` (see [`ProvisionedVolume`] for why the setgid bit).
pub fn hand_to_the_mover(dir: &Path) {
    std::os::unix::fs::chown(dir, Some(IMAGE_USER), Some(IMAGE_USER))
        .expect("chown the store's folder (node mode runs as root)");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2775))
        .expect("chmod the store's folder");
}

/// The ServiceAccount the chart gives copy and remove Jobs (`copyJobs.serviceAccountName`).
pub const MOVER_ACCOUNT: &str = "templatecache-mover";

/// The copy and remove Jobs' ServiceAccount in `namespace`, bound to the mover's ClusterRole,
/// as the chart makes them (`helm template`, so the rules are the chart's own), for a test
/// whose in-process operator runs its Jobs on the node.
pub fn mover_account(namespace: &str) {
    let mut template = super::tools::helm_offline();
    template
        .args([
            "template",
            "templatecache-tests",
            "charts/templatecache-operator",
        ])
        .args(["--namespace", namespace])
        .args(["--show-only", "templates/rbac.yaml"])
        .args(["--show-only", "templates/serviceaccount.yaml"]);
    let rendered = super::tools::run(template).unwrap_or_else(|e| panic!("helm template: {e}"));
    let movers: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .filter(|object: &serde_json::Value| {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            match object["kind"].as_str() {
                Some("ServiceAccount") => name == MOVER_ACCOUNT,
                Some("ClusterRole" | "RoleBinding") => name.ends_with("-mover"),
                _ => false,
            }
        })
        .collect();
    assert_eq!(
        movers.len(),
        3,
        "the chart's mover account, role and binding"
    );
    apply(&json!({"apiVersion": "v1", "kind": "List", "items": movers}));
}

impl Drop for ProvisionedVolume {
    fn drop(&mut self) {
        let mut delete = kubectl();
        delete.args([
            "delete",
            "pv",
            &self.volume,
            "--wait=false",
            "--ignore-not-found",
        ]);
        let _ = delete.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `kubectl apply` of one object (or a List), failing the test with kubectl's answer.
pub fn apply(object: &serde_json::Value) {
    if let Err(e) = try_apply(object) {
        panic!("kubectl apply {}: {e}", object["kind"]);
    }
}

/// `kubectl apply` of one object (or a List): kubectl's answer on a refusal.
pub fn try_apply(object: &serde_json::Value) -> Result<String, String> {
    let file = tempfile::NamedTempFile::new().expect("a manifest file");
    std::fs::write(file.path(), object.to_string()).expect("write the manifest");
    let mut command = kubectl();
    command.args(["apply", "-f"]).arg(file.path());
    super::tools::run(command)
}

/// Labels a namespace with the `restricted` Pod Security Standard, enforced.
pub fn enforce_restricted(namespace: &str) {
    let mut label = kubectl();
    label.args([
        "label",
        "--overwrite",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ]);
    if let Err(e) = super::tools::run(label) {
        panic!("label namespace {namespace}: {e}");
    }
}

/// The restricted container settings every test Pod needs under [`enforce_restricted`].
pub fn restricted_container() -> serde_json::Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}
    })
}
