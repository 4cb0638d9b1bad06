//! How the controllers write: JSON patches made of typed operations, and what the API server's
//! answer to a write means to a reconcile.
//!
//! Every conditional write of the operator is a JSON patch whose `test` operations hold the view
//! the decision was made from, or a merge patch carrying the `resourceVersion` it was made on.
//! When that view is stale the API server refuses the write (422 for a failed `test`, 409 for a
//! resourceVersion) and the reconcile looks again: [`Error::Conflict`], requeued after 200 ms and
//! not counted as a failure.

use json_patch::jsonptr::{PointerBuf, Token};
use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation};
use kube::api::Patch;
use serde_json::Value;

use super::error::Error;

/// The JSON pointer made of `tokens`, each escaped as RFC 6901 asks.
pub fn pointer<'t>(tokens: impl IntoIterator<Item: Into<Token<'t>>>) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

/// Fails the patch unless the value at `path` is `value` (`null` passes only while it is absent).
pub fn test(path: PointerBuf, value: impl serde::Serialize) -> Result<PatchOperation, Error> {
    Ok(PatchOperation::Test(TestOperation {
        path,
        value: serde_json::to_value(value)?,
    }))
}

/// Sets `path` to `value`, replacing what is there.
pub fn add(path: PointerBuf, value: impl serde::Serialize) -> Result<PatchOperation, Error> {
    Ok(PatchOperation::Add(AddOperation {
        path,
        value: serde_json::to_value(value)?,
    }))
}

/// Removes `path`.
pub fn remove(path: PointerBuf) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation { path })
}

/// The JSON patch of `operations`, applied in order and all or nothing.
pub fn json_patch(operations: Vec<PatchOperation>) -> Patch<()> {
    Patch::Json(json_patch::Patch(operations))
}

/// A merge patch of `status` written only on `version` of the object (409 otherwise), or on any
/// version when `version` is `None`.
pub fn status_merge(version: Option<&str>, status: Value) -> Patch<Value> {
    Patch::Merge(match version {
        Some(version) => serde_json::json!({
            "metadata": {"resourceVersion": version},
            "status": status,
        }),
        None => serde_json::json!({ "status": status }),
    })
}

/// The API server's answer to a write, read the way every reconcile reads it.
pub trait Answer<T> {
    /// A refusal for a stale view (409, 422) becomes [`Error::Conflict`] on `name`. For JSON
    /// patches, whose failed `test` is a 422.
    fn or_conflict(self, name: &str) -> Result<T, Error>;

    /// A stale resourceVersion (409) becomes [`Error::Conflict`] on `name`. For merge patches,
    /// where a 422 is invalid content, an error to see, not a view to refresh.
    fn or_version_conflict(self, name: &str) -> Result<T, Error>;

    /// An object deleted meanwhile (404) is `None`: there is nothing left to write to.
    fn unless_gone(self) -> kube::Result<Option<T>>;
}

impl<T> Answer<T> for kube::Result<T> {
    fn or_conflict(self, name: &str) -> Result<T, Error> {
        match self {
            Err(kube::Error::Api(status)) if matches!(status.code, 409 | 422) => {
                Err(Error::Conflict(name.to_owned()))
            }
            other => other.map_err(Error::from),
        }
    }

    fn or_version_conflict(self, name: &str) -> Result<T, Error> {
        match self {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                Err(Error::Conflict(name.to_owned()))
            }
            other => other.map_err(Error::from),
        }
    }

    fn unless_gone(self) -> kube::Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u16) -> kube::Result<()> {
        Err(kube::Error::Api(
            kube::core::Status::failure("refused", "Refused")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn a_stale_view_is_a_conflict_and_other_refusals_are_not() {
        assert!(matches!(refused(409).or_conflict("c"), Err(Error::Conflict(n)) if n == "c"));
        assert!(matches!(
            refused(422).or_conflict("c"),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(refused(403).or_conflict("c"), Err(Error::Kube(_))));
        assert!(matches!(refused(404).or_conflict("c"), Err(Error::Kube(_))));
        assert!(matches!(
            refused(409).or_version_conflict("c"),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            refused(422).or_version_conflict("c"),
            Err(Error::Kube(_))
        ));
    }

    #[test]
    fn a_deleted_object_is_none_and_still_a_conflict_when_stale() {
        assert!(matches!(refused(404).unless_gone(), Ok(None)));
        assert!(matches!(Ok(7).unless_gone(), Ok(Some(7))));
        assert!(matches!(
            refused(409).unless_gone().or_conflict("c"),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn pointers_escape_their_tokens() {
        let path = pointer(["metadata", "finalizers", "a/b~c"]);
        assert_eq!(path.as_str(), "/metadata/finalizers/a~1b~0c");
        let op = test(pointer(["status", "attempt"]), 3).expect("serializable");
        assert_eq!(
            serde_json::to_value(op).expect("json"),
            serde_json::json!({"op": "test", "path": "/status/attempt", "value": 3})
        );
    }
}
