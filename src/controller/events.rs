//! Kubernetes Events for the decisions a user wants to see in `kubectl describe`: why a Pod
//! stays gated, when a cache was evicted or refused room. An Event that cannot be written is
//! logged and never fails the reconcile that decided.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use templatecache_api::names::OPERATOR_MANAGER;

/// Publishes Events as the operator.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// `instance` tells replicas apart (the Pod name in a cluster).
    pub fn new(client: kube::Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: OPERATOR_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Records `note` on `object`; repeats of the same Event are folded into a series.
    pub async fn publish<K>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.to_owned()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            warn!("could not record the Event {reason}: {e}");
        }
    }
}
