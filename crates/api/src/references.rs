//! References are finalizers on a TemplateCache (the contract: README, "How it works"). The
//! reference count is the size of that set, so it is derived, never kept: it cannot drift or go negative, a double
//! release is a no-op, and a referenced cache cannot disappear.

use super::names::{
    CLAIM_REF_PREFIX, CONSUMER_REF_PREFIX, MAX_CONSUMER_ID_LEN, POD_REF_PREFIX, PVC_REF_PREFIX,
};

/// A consumer id that the contract does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid consumer id {0:?}: use 1 to {MAX_CONSUMER_ID_LEN} characters of [A-Za-z0-9._-] (a UID is the usual choice)"
)]
pub struct InvalidConsumerId(pub String);

/// The finalizer a library or kubectl consumer holds: `ref.templatecache.io/<id>`.
pub fn consumer_reference(consumer_id: &str) -> Result<String, InvalidConsumerId> {
    let valid = !consumer_id.is_empty()
        && consumer_id.len() <= MAX_CONSUMER_ID_LEN
        && consumer_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(format!("{CONSUMER_REF_PREFIX}{consumer_id}"))
    } else {
        Err(InvalidConsumerId(consumer_id.to_owned()))
    }
}

/// The finalizer the operator holds for a Pod: `pod.ref.templatecache.io/<pod-uid>`.
pub fn pod_reference(pod_uid: &str) -> String {
    format!("{POD_REF_PREFIX}{pod_uid}")
}

/// The finalizer the operator holds for a claim: `claim.ref.templatecache.io/<claim-uid>`.
pub fn claim_reference(claim_uid: &str) -> String {
    format!("{CLAIM_REF_PREFIX}{claim_uid}")
}

/// The finalizer the operator holds for a volume being filled from the cache:
/// `pvc.ref.templatecache.io/<pvc-uid>`.
pub fn volume_reference(pvc_uid: &str) -> String {
    format!("{PVC_REF_PREFIX}{pvc_uid}")
}

/// The references the operator writes (and so also removes).
const OPERATOR_REF_PREFIXES: [&str; 3] = [CLAIM_REF_PREFIX, POD_REF_PREFIX, PVC_REF_PREFIX];

/// True for a finalizer that is a reference (claim, Pod, volume or hand-written), false for
/// anything else.
pub fn is_reference(finalizer: &str) -> bool {
    finalizer.starts_with(CONSUMER_REF_PREFIX) || is_operator_reference(finalizer)
}

/// True for a reference the operator writes (for a claim, a Pod or a volume) and so also
/// removes; a hand-written `ref.templatecache.io/<id>` belongs to whoever wrote it.
pub fn is_operator_reference(finalizer: &str) -> bool {
    OPERATOR_REF_PREFIXES
        .iter()
        .any(|prefix| finalizer.starts_with(prefix))
}

/// The UID of the consumer (claim, Pod or volume) an operator reference is held for, if
/// `finalizer` is one.
pub fn operator_reference_uid(finalizer: &str) -> Option<&str> {
    OPERATOR_REF_PREFIXES
        .iter()
        .find_map(|prefix| finalizer.strip_prefix(prefix))
}

/// The Pod UID of a Pod reference, if `finalizer` is one.
pub fn pod_uid_of(finalizer: &str) -> Option<&str> {
    finalizer.strip_prefix(POD_REF_PREFIX)
}

/// Number of distinct references among `finalizers`.
pub fn count_references<'a>(finalizers: impl IntoIterator<Item = &'a String>) -> u32 {
    let distinct: std::collections::BTreeSet<&str> = finalizers
        .into_iter()
        .map(String::as_str)
        .filter(|f| is_reference(f))
        .collect();
    u32::try_from(distinct.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_ids_follow_the_contract() {
        assert_eq!(
            consumer_reference("a1b2-c3.d_4").as_deref(),
            Ok("ref.templatecache.io/a1b2-c3.d_4")
        );
        for bad in ["", "has space", "slash/no", "ünïcode", &"x".repeat(64)] {
            assert!(consumer_reference(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(consumer_reference(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn only_references_are_counted_and_each_once() {
        let finalizers: Vec<String> = [
            "templatecache.io/cleanup",
            "ref.templatecache.io/a",
            "ref.templatecache.io/a",
            "pod.ref.templatecache.io/uid-1",
            "claim.ref.templatecache.io/uid-2",
            "claim.ref.templatecache.io/uid-2",
            "pvc.ref.templatecache.io/uid-3",
            "example.com/other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(count_references(&finalizers), 4);
        assert_eq!(count_references(&Vec::new()), 0);
    }

    #[test]
    fn the_operator_owns_claim_pod_and_volume_references_and_no_hand_written_one() {
        assert!(is_operator_reference(&volume_reference("u")));
        assert!(is_operator_reference(&pod_reference("u")));
        assert!(is_operator_reference(&claim_reference("u")));
        let by_hand = consumer_reference("pvc.ref").expect("an id");
        assert!(is_reference(&by_hand) && !is_operator_reference(&by_hand));
        assert_eq!(operator_reference_uid(&by_hand), None);
        for reference in [
            volume_reference("u"),
            pod_reference("u"),
            claim_reference("u"),
        ] {
            assert_eq!(operator_reference_uid(&reference), Some("u"));
        }
    }
}
