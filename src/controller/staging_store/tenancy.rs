//! Who may use a StagingStore and how much of it: `spec.namespaceSelector` (which namespaces'
//! caches may get room) and `spec.namespaceQuota` (bytes one namespace may hold). Pure: the
//! controller reads the namespaces' labels, this module judges them.
//!
//! Both are enforced where room is granted, so a refused copy never writes a byte: the data mover
//! waits for its grant before it opens the destination.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use templatecache_api::reasons::cache as reason;

/// The store's tenancy rules, with the namespaces already judged against its selector.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tenancy {
    /// Namespaces (of caches asking for room) that the selector does not admit.
    pub outside: BTreeSet<String>,
    /// The selector as written, for messages.
    pub selector: String,
    /// `spec.namespaceQuota` in bytes; no quota when `None`.
    pub quota: Option<u64>,
}

/// Why a copy gets no room on tenancy grounds: the Ready reason and a message naming the store,
/// the namespace and the numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct TenancyRefusal {
    pub reason: &'static str,
    pub message: String,
}

impl Tenancy {
    /// Judges a request for `bytes` from `namespace`, which already holds or reserves `held`.
    pub fn judge(
        &self,
        store: &str,
        namespace: &str,
        bytes: u64,
        held: u64,
    ) -> Option<TenancyRefusal> {
        if self.outside.contains(namespace) {
            return Some(TenancyRefusal {
                reason: reason::STORE_NOT_ALLOWED,
                message: format!(
                    "StagingStore {store} does not admit namespace {namespace}: its labels do not \
                     match the store's spec.namespaceSelector {}",
                    self.selector
                ),
            });
        }
        let quota = self.quota?;
        (held.saturating_add(bytes) > quota).then(|| TenancyRefusal {
            reason: reason::QUOTA_EXCEEDED,
            message: format!(
                "namespace {namespace} would exceed its quota of {quota} bytes in StagingStore \
                 {store}: it holds or has reserved {held} bytes and this copy needs {bytes}; \
                 delete caches of the namespace to free its quota"
            ),
        })
    }
}

/// Whether a namespace with `labels` is selected. An absent selector selects every namespace
/// (as a StorageClass serves every namespace); an empty one `{}` too, as in Kubernetes. An
/// operator it does not know selects nothing: a typo must not open the store to everyone.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_match =
        (selector.match_labels.iter().flatten()).all(|(key, value)| labels.get(key) == Some(value));
    labels_match
        && (selector.match_expressions.iter().flatten()).all(|req| requirement_holds(req, labels))
}

fn requirement_holds(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// The selector in one line, for messages (`{}` for "every namespace").
pub fn describe(selector: Option<&LabelSelector>) -> String {
    selector
        .and_then(|s| serde_json::to_string(s).ok())
        .unwrap_or_else(|| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).expect("selector literal")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_selector_admits_every_namespace() {
        assert!(selects(None, &labels(&[])));
        assert!(selects(Some(&selector(json!({}))), &labels(&[])));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = selector(json!({
            "matchLabels": {"tier": "vms"},
            "matchExpressions": [
                {"key": "team", "operator": "In", "values": ["a", "b"]},
                {"key": "quarantine", "operator": "DoesNotExist"},
            ]
        }));
        assert!(selects(
            Some(&s),
            &labels(&[("tier", "vms"), ("team", "a")])
        ));
        assert!(!selects(
            Some(&s),
            &labels(&[("tier", "vms"), ("team", "c")])
        ));
        assert!(!selects(Some(&s), &labels(&[("team", "a")])));
        assert!(!selects(
            Some(&s),
            &labels(&[("tier", "vms"), ("team", "a"), ("quarantine", "1")])
        ));
        let not_in = selector(json!({"matchExpressions": [
            {"key": "team", "operator": "NotIn", "values": ["x"]},
            {"key": "tier", "operator": "Exists"}]}));
        assert!(selects(Some(&not_in), &labels(&[("tier", "t")])));
        assert!(!selects(
            Some(&not_in),
            &labels(&[("tier", "t"), ("team", "x")])
        ));
    }

    #[test]
    fn an_unknown_operator_selects_nothing() {
        let s = selector(json!({"matchExpressions": [{"key": "a", "operator": "Like"}]}));
        assert!(!selects(Some(&s), &labels(&[("a", "1")])));
    }

    #[test]
    fn refusals_name_the_store_the_namespace_and_the_numbers() {
        let tenancy = Tenancy {
            outside: BTreeSet::from(["evil".to_owned()]),
            selector: "{\"matchLabels\":{\"tier\":\"vms\"}}".to_owned(),
            quota: Some(100),
        };
        let outside = tenancy.judge("nfs", "evil", 1, 0).expect("refused");
        assert_eq!(outside.reason, reason::STORE_NOT_ALLOWED);
        assert!(
            outside.message.contains("StagingStore nfs"),
            "{}",
            outside.message
        );
        assert!(
            outside.message.contains("namespace evil"),
            "{}",
            outside.message
        );
        assert!(outside.message.contains("tier"), "{}", outside.message);
        let over = tenancy.judge("nfs", "vms", 41, 60).expect("refused");
        assert_eq!(over.reason, reason::QUOTA_EXCEEDED);
        for number in ["100", "60", "41"] {
            assert!(over.message.contains(number), "{}", over.message);
        }
        assert_eq!(
            tenancy.judge("nfs", "vms", 40, 60),
            None,
            "exactly the quota fits"
        );
        let unlimited = Tenancy::default();
        assert_eq!(unlimited.judge("nfs", "vms", u64::MAX, u64::MAX), None);
    }
}
