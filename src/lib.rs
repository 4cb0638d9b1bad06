//! templatecache, the operator: one reconciler per resource and the services they run on.
//!
//! - [`controller`]: the reconcilers (template cache, claim, pod gate, staging store).
//! - [`infra`]: leader election, metrics, the health and metrics endpoint, telemetry.
//!
//! The contract is the `templatecache-api` crate, the data mover `templatecache-mover`, the
//! consumer library `templatecache-client`; Cargo's dependency graph keeps those layers (none of
//! them depends on this crate).

pub mod controller;
pub mod infra;
