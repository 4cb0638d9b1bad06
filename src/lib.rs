//! templatecache: a Kubernetes operator that keeps exactly one staging copy of each large
//! template and shares it by reference (the fix for CLOUDSTACK-7539 done the Kubernetes way).
//!
//! - [`api`]: the resource types, the contract.
//! - [`controller`]: one reconciler per resource.
//! - [`client`]: acquire / wait / release for in-cluster controllers written in Rust.
//! - [`copy`]: the data mover a copy Job runs; knows nothing of controllers.

pub mod api;
pub mod client;
pub mod controller;
pub mod copy;
pub mod runtime;
