//! `StagingStore`: the shared volume that holds caches (CloudStack's NFS secondary staging store).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired state of a StagingStore: its volume, its size and when to evict.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "templatecache.io",
    version = "v1alpha1",
    kind = "StagingStore",
    status = "StagingStoreStatus",
    shortname = "sst",
    category = "templatecaching",
    doc = "A shared volume that holds staged template caches, with LRU eviction of unreferenced ones.",
    printcolumn(name = "Capacity", type_ = "string", json_path = ".spec.capacity"),
    printcolumn(name = "Used", type_ = "integer", json_path = ".status.usedBytes"),
    printcolumn(name = "Caches", type_ = "integer", json_path = ".status.caches"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StagingStoreSpec {
    /// The volume that holds the caches. Immutable: moving a store would strand its data.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.volume is immutable"))]
    pub volume: StoreVolume,
    /// Size of the store as a Kubernetes quantity, e.g. `500Gi`.
    // At least one byte (fractions of a byte round down) and under 8Ei: the API server's CEL
    // quantity functions work in int64 and refuse anything from 2^63 up. Not `isInteger()`:
    // it refuses binary-suffixed values from 100Ti up, which are whole bytes.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1')) >= 0 && quantity(self).isLessThan(quantity('8Ei'))").message("spec.capacity must be a quantity of at least 1 byte and under 8Ei, such as 500Gi"))]
    #[schemars(length(min = 1, max = 64))]
    pub capacity: String,
    /// When to evict unreferenced caches.
    #[serde(default)]
    pub eviction: EvictionPolicy,
    /// Namespaces whose caches may use the store, by their labels; every namespace when absent
    /// (as with StorageClasses). A cache elsewhere is refused room, so nothing is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Bytes one namespace may hold in the store (finished copies and reserved room), as a
    /// quantity such as `50Gi`; no limit when absent. A copy past it is refused room.
    // The same bounds as `capacity`, for the same reasons.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1')) >= 0 && quantity(self).isLessThan(quantity('8Ei'))").message("spec.namespaceQuota must be a quantity of at least 1 byte and under 8Ei, such as 50Gi"))]
    #[schemars(length(min = 1, max = 64))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_quota: Option<String>,
}

impl StagingStoreSpec {
    /// `capacity` in bytes; `None` for a quantity that is not a whole number of bytes below
    /// 2^64 (the API server has already refused anything that is not a quantity).
    pub fn capacity_bytes(&self) -> Option<u64> {
        quantity_bytes(&self.capacity)
    }
}

/// A Kubernetes quantity (`500Gi`, `1.5G`, `1e9`, `1024`) in bytes, rounded down.
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let quantity = quantity.trim();
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 10u128.pow(3),
        "M" => 10u128.pow(6),
        "G" => 10u128.pow(9),
        "T" => 10u128.pow(12),
        "P" => 10u128.pow(15),
        "E" => 10u128.pow(18),
        exponent if exponent.starts_with(['e', 'E']) => {
            10u128.checked_pow(exponent[1..].parse().ok()?)?
        }
        _ => return None,
    };
    let mut bytes = whole.checked_mul(multiplier)?;
    if !fraction.is_empty() {
        let digits = u32::try_from(fraction.len()).ok()?;
        let fraction: u128 = fraction.parse().ok()?;
        bytes =
            bytes.checked_add(fraction.checked_mul(multiplier)? / 10u128.checked_pow(digits)?)?;
    }
    u64::try_from(bytes).ok()
}

/// Exactly one of `nfs`, `hostPath` or `persistentVolumeClaim`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.nfs) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) == 1").message("exactly one of spec.volume.nfs, spec.volume.hostPath or spec.volume.persistentVolumeClaim must be set"))]
#[serde(rename_all = "camelCase")]
pub struct StoreVolume {
    /// An NFS export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsVolume>,
    /// A directory on the node (single-node and test clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolume>,
    /// A ReadWriteMany PersistentVolumeClaim; a claim of this name must exist in every namespace
    /// whose caches use the store (copy Jobs and Pods mount it from their own namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcVolume>,
}

/// An NFS export.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NfsVolume {
    /// Host name or address of the NFS server.
    #[schemars(length(min = 1, max = 253))]
    pub server: String,
    /// Exported path, absolute.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub path: String,
}

/// A directory on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HostPathVolume {
    /// Absolute path of the directory.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(s, s == '..')").message("spec.volume.hostPath.path must not contain '..'"))]
    pub path: String,
}

/// A PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcVolume {
    /// Name of the claim.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// When unreferenced Ready caches are evicted, least recently referenced first.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.lowWatermarkPercent < self.highWatermarkPercent").message("spec.eviction.lowWatermarkPercent must be below spec.eviction.highWatermarkPercent"))]
#[serde(rename_all = "camelCase")]
pub struct EvictionPolicy {
    /// Eviction starts when usage passes this share of the capacity.
    #[serde(default = "default_high_watermark")]
    #[schemars(range(min = 1, max = 100))]
    pub high_watermark_percent: u8,
    /// Eviction stops when usage falls under this share of the capacity.
    #[serde(default = "default_low_watermark")]
    #[schemars(range(min = 0, max = 99))]
    pub low_watermark_percent: u8,
    /// A cache unreferenced for less than this is never evicted.
    #[serde(default = "default_min_unused_seconds")]
    #[schemars(range(min = 0))]
    pub min_unused_seconds: u64,
}

impl Default for EvictionPolicy {
    fn default() -> Self {
        Self {
            high_watermark_percent: default_high_watermark(),
            low_watermark_percent: default_low_watermark(),
            min_unused_seconds: default_min_unused_seconds(),
        }
    }
}

fn default_high_watermark() -> u8 {
    85
}

fn default_low_watermark() -> u8 {
    70
}

fn default_min_unused_seconds() -> u64 {
    600
}

/// Observed state of a StagingStore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StagingStoreStatus {
    /// Bytes used by the caches recorded in this store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Number of caches with data in this store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches: Option<u32>,
    /// Conditions in Kubernetes' conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::quantity_bytes;

    #[test]
    fn quantities_convert_to_bytes() {
        assert_eq!(quantity_bytes("500Gi"), Some(500 << 30));
        assert_eq!(quantity_bytes("3Mi"), Some(3 << 20));
        assert_eq!(quantity_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(quantity_bytes("1e3"), Some(1000));
        assert_eq!(quantity_bytes("1024"), Some(1024));
        assert_eq!(quantity_bytes("0.5Ki"), Some(512));
        assert_eq!(quantity_bytes("100m"), None);
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("20Ei"), None);
    }
}
