//! The condition types of the API, and conditions in Kubernetes' conventions: one entry per
//! type, `lastTransitionTime` moves only when the status flips, so a reconcile that changes
//! nothing writes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The condition every TemplateCache carries; `kubectl wait --for=condition=Ready` waits on it.
pub const READY: &str = "Ready";

/// The condition that says a claim's reference is on its cache.
pub const BOUND: &str = "Bound";

/// Builds a condition observed now at `generation`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Puts `new` into `conditions`, keeping the old `lastTransitionTime` when the status is
/// unchanged.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = vec![];
        let mut first = condition(READY, false, "Copying", "copying".into(), Some(1));
        first.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        set_condition(&mut conds, first);
        set_condition(
            &mut conds,
            condition(READY, false, "Copying", "50%".into(), Some(1)),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert_eq!(conds[0].message, "50%");
        set_condition(
            &mut conds,
            condition(READY, true, "Copied", "done".into(), Some(1)),
        );
        assert_ne!(conds[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }
}
