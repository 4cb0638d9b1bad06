//! References are finalizers on a TemplateCache (the contract: README, "How it works"). The
//! reference count is the size of that set, so it is derived, never kept: it cannot drift or go negative, a double
//! release is a no-op, and a referenced cache cannot disappear.

use super::names::{CLAIM_REF_PREFIX, CONSUMER_REF_PREFIX, MAX_CONSUMER_ID_LEN, POD_REF_PREFIX};

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

/// True for a finalizer that is a reference (claim, Pod or hand-written), false for anything
/// else.
pub fn is_reference(finalizer: &str) -> bool {
    [CONSUMER_REF_PREFIX, POD_REF_PREFIX, CLAIM_REF_PREFIX]
        .iter()
        .any(|prefix| finalizer.starts_with(prefix))
}

/// True for a reference the operator writes (for a claim or a Pod) and so also removes; a
/// hand-written `ref.templatecache.io/<id>` belongs to whoever wrote it.
pub fn is_operator_reference(finalizer: &str) -> bool {
    finalizer.starts_with(CLAIM_REF_PREFIX) || finalizer.starts_with(POD_REF_PREFIX)
}

/// The Pod UID of a Pod reference, if `finalizer` is one.
pub fn pod_uid_of(finalizer: &str) -> Option<&str> {
    finalizer.strip_prefix(POD_REF_PREFIX)
}

/// The claim UID of a claim reference, if `finalizer` is one.
pub fn claim_uid_of(finalizer: &str) -> Option<&str> {
    finalizer.strip_prefix(CLAIM_REF_PREFIX)
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
            "example.com/other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(count_references(&finalizers), 3);
        assert_eq!(count_references(&Vec::new()), 0);
    }
}
